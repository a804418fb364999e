//! Host-side faults a daemon must survive, seen from the guest's side.
//!
//! - Block: the filesystem under the image fills up (ENOSPC) in the middle of the guest's
//!   writes. The guest gets `VIRTIO_BLK_S_IOERR` for the writes that found no space, its
//!   reads and its overwrites of allocated blocks still work, and the daemon keeps
//!   serving, with both I/O engines. The small filesystem is a 1 MiB tmpfs mounted in a
//!   private mount namespace that only the daemon lives in (`unshare -m`): nothing is
//!   mounted on the host, and the mount goes away with the daemon.
//!
//! - Block: the image shrinks under the daemon (another program truncates it), so reads
//!   of the lost part hit the end of the file: IOERR for those, the rest still served.
//!
//! (The vsock, console and net faults are in their devices' test files.)
//!
//! Run `cargo build -p vhost-device-blk` first (or `cargo build --workspace`).

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::frontend::{Buf, Frontend, Options};
use e2e::process::wait_for_path;
use e2e::ChildGuard;

const T: Duration = Duration::from_secs(10);
const IN: u32 = 0;
const OUT: u32 = 1;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
/// Bytes per guest write: 64 KiB.
const CHUNK: usize = 64 * 1024;

/// Why a test needing a private mount namespace cannot run here, if it cannot.
fn no_mount_namespace() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("mounting a tmpfs in a private mount namespace needs root".into());
    }
    let probe = Command::new("unshare")
        .args(["-m", "--propagation", "private", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match probe {
        Ok(s) if s.success() => None,
        Ok(s) => Some(format!("`unshare -m` fails here ({s})")),
        Err(e) => Some(format!("no unshare(1): {e}")),
    }
}

/// A vhost-device-blk whose image (8 MiB, sparse) sits on a 1 MiB tmpfs that only its own
/// mount namespace sees.
struct FullDisk {
    child: ChildGuard,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl FullDisk {
    fn start(engine: &str) -> FullDisk {
        let dir = tempfile::tempdir().expect("temp dir");
        let small = dir.path().join("small");
        fs::create_dir(&small).expect("mount point");
        let sock = dir.path().join("blk.sock");
        let image = small.join("disk.img");
        let script = format!(
            "mount -t tmpfs -o size=1m vhost-faults '{small}' && truncate -s 8M '{image}' && \
             exec '{bin}' --socket-path '{sock}' --image '{image}' --engine {engine}",
            small = small.display(),
            image = image.display(),
            sock = sock.display(),
            bin = e2e::bin_path("vhost-device-blk").display(),
        );
        let log = fs::File::create(dir.path().join("daemon.log")).expect("log");
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "/bin/sh", "-c", &script])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // unshare and sh exec: the PID the guard kills is the daemon's.
        let child = ChildGuard::spawn("vhost-device-blk (full disk)", cmd).expect("spawn");
        let d = FullDisk { child, dir, sock };
        assert!(wait_for_path(&d.sock, T), "no socket; log:\n{}", d.log());
        d
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }
}

fn header(t: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&t.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn chunk_pattern(i: u64) -> Vec<u8> {
    (0..CHUNK)
        .map(|j| u8::try_from((j as u64 * 7 + i * 13) % 251).unwrap_or(0))
        .collect()
}

/// One request: `out` bytes from the guest, `in_len` bytes for the guest. Returns the
/// status byte and what the device wrote.
fn request(fe: &mut Frontend, t: u32, sector: u64, out: &[u8], in_len: usize) -> (u8, Vec<u8>) {
    let mem = fe.memory().clone();
    let hdr = mem.alloc_with(&header(t, sector));
    let mut bufs = vec![Buf::readable(hdr, 16)];
    if !out.is_empty() {
        let len = u32::try_from(out.len()).expect("small buffer");
        bufs.push(Buf::readable(mem.alloc_with(out), len));
    }
    let data = (in_len > 0).then(|| mem.alloc(in_len));
    if let Some(at) = data {
        bufs.push(Buf::writable(at, u32::try_from(in_len).expect("small")));
    }
    let status = mem.alloc(1);
    mem.write(status, &[0xff]);
    bufs.push(Buf::writable(status, 1));
    let q = fe.queue(0);
    let head = q.submit(&bufs).expect("submit");
    let used = q.wait_used(T).expect("the device answers every request");
    assert_eq!(used.id, head);
    let bytes = data.map(|at| mem.read(at, in_len)).unwrap_or_default();
    (mem.read(status, 1)[0], bytes)
}

fn full_disk_answers_ioerr_and_keeps_serving(engine: &str) {
    let test = format!("full_disk_answers_ioerr_and_keeps_serving ({engine})");
    if let Some(why) = no_mount_namespace() {
        e2e::qemu::skip(&test, &why);
        return;
    }
    let mut d = FullDisk::start(engine);
    let mut fe = Frontend::connect(&d.sock, Options::default().mem_size(32 << 20))
        .unwrap_or_else(|e| panic!("connect: {e}\nlog:\n{}", d.log()));

    // Write 64 KiB chunks until the 1 MiB filesystem is full: the guest sees IOERR.
    let sectors = (CHUNK / 512) as u64;
    let mut written = Vec::new();
    let mut first_error = None;
    for i in 0..64u64 {
        let (status, _) = request(&mut fe, OUT, i * sectors, &chunk_pattern(i), 0);
        match status {
            S_OK => written.push(i),
            S_IOERR => {
                first_error = Some(i);
                break;
            }
            other => panic!("write {i}: status {other}, neither OK nor IOERR"),
        }
    }
    let Some(full_at) = first_error else {
        panic!(
            "4 MiB written to a 1 MiB filesystem without an error; log:\n{}",
            d.log()
        );
    };
    assert!(
        !written.is_empty() && full_at <= 16,
        "the first IOERR came at chunk {full_at} (64 KiB each) on a 1 MiB filesystem"
    );
    // Another write that needs space fails the same way; the daemon is still there.
    let (status, _) = request(&mut fe, OUT, (full_at + 1) * sectors, &chunk_pattern(99), 0);
    assert_eq!(status, S_IOERR, "a second write past the space");
    assert!(
        d.child.try_wait().is_none(),
        "the daemon died; log:\n{}",
        d.log()
    );

    // Reads still work and return what was written; so do overwrites of allocated blocks.
    for &i in &written {
        let (status, data) = request(&mut fe, IN, i * sectors, &[], CHUNK);
        assert_eq!(status, S_OK, "read of chunk {i} after the disk filled up");
        assert!(
            data == chunk_pattern(i),
            "chunk {i} reads back different bytes"
        );
    }
    let (status, _) = request(&mut fe, OUT, 0, &chunk_pattern(7), 0);
    assert_eq!(
        status, S_OK,
        "overwriting an allocated chunk needs no new space"
    );
    let (status, data) = request(&mut fe, IN, 0, &[], CHUNK);
    assert_eq!(status, S_OK);
    assert!(data == chunk_pattern(7), "the overwrite reads back");

    let log = d.log();
    assert!(
        log.contains("No space left on device"),
        "the daemon names the cause in its log:\n{log}"
    );
    println!(
        "{test}: {} chunks of 64 KiB written, IOERR from chunk {full_at} on",
        written.len()
    );
}

#[test]
fn full_disk_answers_ioerr_and_keeps_serving_sync() {
    full_disk_answers_ioerr_and_keeps_serving("sync");
}

#[test]
fn full_disk_answers_ioerr_and_keeps_serving_io_uring() {
    full_disk_answers_ioerr_and_keeps_serving("io-uring");
}

#[test]
fn reads_past_a_truncated_image_answer_ioerr_and_the_rest_is_served() {
    for engine in ["sync", "io-uring"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("disk.img");
        fs::File::create(&image)
            .and_then(|f| f.set_len(8 << 20))
            .expect("image");
        let sock = dir.path().join("blk.sock");
        let log_path = dir.path().join("daemon.log");
        let mut cmd = Command::new(e2e::bin_path("vhost-device-blk"));
        cmd.arg("--socket-path")
            .arg(&sock)
            .arg("--image")
            .arg(&image)
            .args(["--engine", engine])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log_path).expect("log"));
        let mut child = ChildGuard::spawn("vhost-device-blk", cmd).expect("spawn");
        let log = || fs::read_to_string(&log_path).unwrap_or_default();
        assert!(wait_for_path(&sock, T), "no socket; log:\n{}", log());
        let mut fe = Frontend::connect(&sock, Options::default().mem_size(8 << 20))
            .unwrap_or_else(|e| panic!("connect: {e}\nlog:\n{}", log()));
        let sectors = (CHUNK / 512) as u64;
        assert_eq!(request(&mut fe, OUT, 0, &chunk_pattern(1), 0).0, S_OK);

        // Another program cuts the image to 1 MiB behind the daemon's back.
        fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .and_then(|f| f.set_len(1 << 20))
            .expect("truncate");
        let (status, _) = request(&mut fe, IN, 64 * sectors, &[], CHUNK);
        assert_eq!(status, S_IOERR, "{engine}: a read at 4 MiB of a 1 MiB file");
        let (status, data) = request(&mut fe, IN, 0, &[], CHUNK);
        assert_eq!(status, S_OK, "{engine}: a read inside what is left");
        assert!(
            data == chunk_pattern(1),
            "{engine}: the data is still there"
        );
        assert!(
            child.try_wait().is_none(),
            "the daemon died; log:\n{}",
            log()
        );
    }
}
