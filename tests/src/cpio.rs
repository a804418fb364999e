//! A minimal writer for the `newc` cpio format the Linux initramfs unpacker reads
//! (`Documentation/driver-api/early-userspace/buffer-format.rst`), gzip-compressed.
//!
//! Archives may be concatenated: the kernel unpacks each in turn, so a test's files go in a
//! small archive appended to the base image.

use std::io::{self, Write};

use flate2::write::GzEncoder;
use flate2::Compression;

/// Builds one newc archive in memory.
#[derive(Debug, Default)]
pub struct Archive {
    data: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

impl Archive {
    /// An empty archive.
    pub fn new() -> Self {
        Archive {
            data: Vec::new(),
            ino: 1,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, body: &[u8]) {
        let name = name.trim_start_matches('/');
        let namesize = name.len() + 1;
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime: fixed, so an unchanged input gives an identical archive
            u32::try_from(body.len()).unwrap_or(u32::MAX),
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            u32::try_from(namesize).unwrap_or(u32::MAX),
            0, // check
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
    }

    /// Adds a directory (parents must be added first).
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, S_IFDIR | 0o755, &[]);
        self
    }

    /// Adds a regular file with the given permission bits.
    pub fn file(&mut self, name: &str, perm: u32, body: &[u8]) -> &mut Self {
        self.entry(name, S_IFREG | (perm & 0o7777), body);
        self
    }

    /// Adds a symbolic link.
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, S_IFLNK | 0o777, target.as_bytes());
        self
    }

    /// Adds `path` and every missing parent directory, recording which exist in `made`.
    pub fn dirs_for(&mut self, path: &str, made: &mut std::collections::BTreeSet<String>) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if made.insert(prefix.clone()) {
                self.dir(&prefix);
            }
        }
    }

    /// Ends the archive and returns it gzip-compressed.
    pub fn finish_gz(mut self) -> io::Result<Vec<u8>> {
        self.entry("TRAILER!!!", 0, &[]);
        let mut gz = GzEncoder::new(Vec::new(), Compression::new(6));
        gz.write_all(&self.data)?;
        gz.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut a = Archive::new();
        a.dir("bin")
            .file("bin/x", 0o755, b"hello")
            .symlink("sh", "bin/x");
        let raw = a.data.clone();
        assert!(raw.starts_with(b"070701"));
        assert_eq!(raw.len() % 4, 0);
        // The file body follows its header and name, 4-byte aligned.
        let pos = raw.windows(5).position(|w| w == b"hello").unwrap();
        assert_eq!(pos % 4, 0);
        let gz = a.finish_gz().unwrap();
        let mut out = Vec::new();
        use std::io::Read;
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .unwrap();
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
