//! vhost-device-blk as a real process, driven over its vhost-user socket by the in-test
//! frontend playing the guest's virtio-blk driver.
//!
//! Requests are encoded here from the specification (virtio 1.2, 5.2.6), independently of
//! the daemon's code, and every result is checked against the bytes of the image file on
//! the host. Run `cargo build -p vhost-device-blk` first (or `cargo build --workspace`).

// Test sizes are small constants: narrowing casts cannot truncate here.
#![allow(clippy::cast_possible_truncation)]

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::frontend::{Buf, Frontend, Options, Queue};
use e2e::process::wait_for_path;
use e2e::ChildGuard;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, GuestAddress};

const T: Duration = Duration::from_secs(10);
const IN: u32 = 0;
const OUT: u32 = 1;
const FLUSH: u32 = 4;
const GET_ID: u32 = 8;
const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_MQ: u64 = 1 << 12;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
const MIB: u64 = 1 << 20;

/// A daemon on a temporary socket and image, killed (by PID) when dropped.
struct Daemon {
    child: ChildGuard,
    dir: tempfile::TempDir,
    sock: PathBuf,
    image: PathBuf,
}

impl Daemon {
    /// Starts the daemon on a fresh `size`-byte image with extra `args`.
    fn start(size: u64, args: &[&str]) -> Daemon {
        Self::start_under(std::env::temp_dir(), size, args)
    }

    /// Like [`Daemon::start`], with the image and socket under `base`.
    fn start_under(base: impl AsRef<Path>, size: u64, args: &[&str]) -> Daemon {
        let dir = tempfile::tempdir_in(base).expect("temp dir");
        let image = dir.path().join("disk.img");
        fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .expect("image");
        Self::start_on(dir, image, args)
    }

    fn start_on(dir: tempfile::TempDir, image: PathBuf, args: &[&str]) -> Daemon {
        let sock = dir.path().join("blk.sock");
        let log = fs::File::create(dir.path().join("daemon.log")).expect("log");
        let child = spawn_daemon(&sock, &image, args, log);
        let d = Daemon {
            child,
            dir,
            sock,
            image,
        };
        assert!(wait_for_path(&d.sock, T), "no socket; log:\n{}", d.log());
        d
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Starts a new daemon process on the same socket path and image (after the old one
    /// died); its log is appended to the same file.
    fn respawn(&mut self, args: &[&str]) {
        let log = fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("log");
        self.child = spawn_daemon(&self.sock, &self.image, args, log);
    }

    fn connect(&self, options: Options) -> Blk {
        let fe = Frontend::connect(&self.sock, options)
            .unwrap_or_else(|e| panic!("connect: {e}\nlog:\n{}", self.log()));
        Blk { fe }
    }

    fn image_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let all = fs::read(&self.image).expect("read image");
        all[offset as usize..offset as usize + len].to_vec()
    }
}

/// Starts `vhost-device-blk` on `sock` and `image` with extra `args`, logging (at debug
/// level) to `log`.
fn spawn_daemon(sock: &Path, image: &Path, args: &[&str], log: fs::File) -> ChildGuard {
    let mut cmd = Command::new(e2e::bin_path("vhost-device-blk"));
    cmd.arg("--socket-path")
        .arg(sock)
        .arg("--image")
        .arg(image)
        .args(args)
        .env("RUST_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    ChildGuard::spawn("vhost-device-blk", cmd).expect("spawn")
}

/// The in-test virtio-blk driver.
struct Blk {
    fe: Frontend,
}

/// A request's outcome.
#[derive(Debug)]
struct Outcome {
    status: u8,
    used_len: u32,
    data: Vec<u8>,
}

fn header(t: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&t.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn segment(sector: u64, num: u32, flags: u32) -> Vec<u8> {
    let mut s = Vec::with_capacity(16);
    s.extend_from_slice(&sector.to_le_bytes());
    s.extend_from_slice(&num.to_le_bytes());
    s.extend_from_slice(&flags.to_le_bytes());
    s
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A request laid out in guest memory, ready to submit.
struct Prepared {
    bufs: Vec<Buf>,
    status: GuestAddress,
    data: Option<(GuestAddress, usize)>,
}

impl Blk {
    /// Lays out a request: header, readable `out` data, `in_len` writable bytes, status.
    fn prepare(&self, t: u32, sector: u64, out: &[u8], in_len: usize) -> Prepared {
        let mem = self.fe.memory();
        let hdr = mem.alloc_with(&header(t, sector));
        let mut bufs = vec![Buf::readable(hdr, 16)];
        if !out.is_empty() {
            bufs.push(Buf::readable(mem.alloc_with(out), out.len() as u32));
        }
        let mut data = None;
        if in_len > 0 {
            let at = mem.alloc(in_len);
            bufs.push(Buf::writable(at, in_len as u32));
            data = Some((at, in_len));
        }
        let status = mem.alloc(1);
        mem.write(status, &[0xff]);
        bufs.push(Buf::writable(status, 1));
        Prepared { bufs, status, data }
    }

    fn outcome(&self, p: &Prepared, used_len: u32) -> Outcome {
        let mem = self.fe.memory();
        Outcome {
            status: mem.read(p.status, 1)[0],
            used_len,
            data: p
                .data
                .map(|(at, len)| mem.read(at, len))
                .unwrap_or_default(),
        }
    }

    fn request(&mut self, q: usize, t: u32, sector: u64, out: &[u8], in_len: usize) -> Outcome {
        let p = self.prepare(t, sector, out, in_len);
        let queue = self.fe.queue(q);
        let head = queue.submit(&p.bufs).expect("submit");
        let used = queue.wait_used(T).expect("completion");
        assert_eq!(used.id, head);
        self.outcome(&p, used.len)
    }

    fn read(&mut self, sector: u64, len: usize) -> Outcome {
        self.request(0, IN, sector, &[], len)
    }

    fn write(&mut self, sector: u64, data: &[u8]) -> u8 {
        self.request(0, OUT, sector, data, 0).status
    }

    fn config(&mut self) -> Vec<u8> {
        self.fe.get_config(0, 60).expect("GET_CONFIG")
    }

    fn capacity(&mut self) -> u64 {
        u64::from_le_bytes(self.config()[0..8].try_into().expect("8 bytes"))
    }
}

#[test]
fn negotiates_features_and_serves_config() {
    let d = Daemon::start(
        8 * MIB,
        &["--num-queues", "2", "--logical-block-size", "4096"],
    );
    let mut b = d.connect(Options::default().queues(2));
    let offered = b.fe.offered_features();
    for (name, bit) in [
        ("VERSION_1", F_VERSION_1),
        ("EVENT_IDX", F_EVENT_IDX),
        ("FLUSH", F_FLUSH),
        ("MQ", F_MQ),
        ("DISCARD", F_DISCARD),
        ("WRITE_ZEROES", F_WRITE_ZEROES),
    ] {
        assert!(offered & bit != 0, "{name} not offered: {offered:#x}");
    }
    assert_eq!(offered & F_RO, 0, "a writable disk is not read-only");
    let pf = b.fe.protocol_features();
    for f in [
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::BACKEND_REQ,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(pf.contains(f), "{f:?} not negotiated: {pf:?}");
    }
    assert_eq!(b.fe.vhost().get_queue_num().expect("queue num"), 2);
    assert_eq!(b.fe.num_queues(), 2);
    let c = b.config();
    assert_eq!(
        u64::from_le_bytes(c[0..8].try_into().expect("8")),
        8 * MIB / 512,
        "capacity in sectors"
    );
    assert_eq!(
        u32::from_le_bytes(c[20..24].try_into().expect("4")),
        4096,
        "blk_size"
    );
    assert_eq!(
        u32::from_le_bytes(c[12..16].try_into().expect("4")),
        254,
        "seg_max"
    );
    assert_eq!(
        u16::from_le_bytes(c[34..36].try_into().expect("2")),
        2,
        "num_queues"
    );
    assert_eq!(c[32], 1, "writeback by default");
    // Offsets and sizes from the frontend are clamped, never out of bounds.
    assert_eq!(
        b.fe.get_config(56, 8).expect("tail"),
        vec![1, 0, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(b.fe.get_config(200, 16).expect("past the end"), vec![0; 16]);
}

#[test]
fn reads_and_writes_reach_the_image() {
    for engine in ["io-uring", "sync"] {
        let d = Daemon::start(4 * MIB, &["--engine", engine]);
        let mut b = d.connect(Options::default());
        let data = pattern(7, 8192);
        assert_eq!(b.write(100, &data), S_OK, "{engine}");
        assert_eq!(
            d.image_bytes(100 * 512, 8192),
            data,
            "{engine}: host bytes equal guest writes"
        );
        let r = b.read(100, 8192);
        assert_eq!((r.status, r.used_len), (S_OK, 8193), "{engine}");
        assert_eq!(r.data, data, "{engine}");
        // The last sector reads; one past it does not.
        assert_eq!(b.read(4 * MIB / 512 - 1, 512).status, S_OK, "{engine}");
        assert_eq!(b.read(4 * MIB / 512, 512).status, S_IOERR, "{engine}");
        assert_eq!(
            b.write(4 * MIB / 512 - 1, &[1; 1024]),
            S_IOERR,
            "{engine}: write across the end"
        );
        assert_eq!(
            d.image_bytes(4 * MIB - 512, 512),
            vec![0; 512],
            "{engine}: nothing written past the request check"
        );
    }
}

/// Whether files under `dir` can be opened with `O_DIRECT`.
fn supports_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(probe) = tempfile::NamedTempFile::new_in(dir) else {
        return false;
    };
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(probe.path())
        .is_ok()
}

#[test]
fn io_uring_serves_a_tmpfs_image_and_an_o_direct_image() {
    // tmpfs has no RWF_NOWAIT: the io_uring engine copies in the worker there. An image on
    // the root filesystem with --direct goes through the ring for aligned buffers and the
    // buffered descriptor for misaligned ones.
    let mut cases = vec![("/dev/shm", vec!["--engine", "io-uring"])];
    let root = std::env::temp_dir();
    cases.push((
        root.to_str().expect("utf-8"),
        vec!["--engine", "io-uring", "--direct"],
    ));
    for (base, args) in cases {
        if !Path::new(base).is_dir() {
            eprintln!("SKIPPED io_uring case under {base}: no such directory");
            continue;
        }
        if args.contains(&"--direct") && !supports_direct(Path::new(base)) {
            eprintln!("SKIPPED --direct under {base}: the filesystem refuses O_DIRECT");
            continue;
        }
        let d = Daemon::start_under(base, 4 * MIB, &args);
        let mut b = d.connect(Options::default());
        let data = pattern(9, 64 * 1024);
        assert_eq!(b.write(64, &data), S_OK, "{base} {args:?}");
        assert_eq!(b.read(64, data.len()).data, data, "{base} {args:?}");
        assert_eq!(d.image_bytes(64 * 512, data.len()), data, "{base} {args:?}");
        // A buffer at an odd guest address (not aligned for O_DIRECT).
        let mem = b.fe.memory().clone();
        let hdr = mem.alloc_with(&header(IN, 64));
        let odd = mem.alloc(4096 + 1).unchecked_add(1);
        let status = mem.alloc(1);
        let q = b.fe.queue(0);
        q.submit(&[
            Buf::readable(hdr, 16),
            Buf::writable(odd, 4096),
            Buf::writable(status, 1),
        ])
        .expect("submit");
        q.wait_used(T).expect("completion");
        assert_eq!(mem.read(status, 1)[0], S_OK, "{base} {args:?}");
        assert_eq!(mem.read(odd, 4096), data[..4096], "{base} {args:?}");
    }
}

#[test]
fn flush_get_id_discard_write_zeroes() {
    let d = Daemon::start(4 * MIB, &["--serial", "blk-serial-42"]);
    let mut b = d.connect(Options::default());
    assert_eq!(
        b.request(0, FLUSH, 0, &[], 0).status,
        S_OK,
        "flush with nothing dirty"
    );
    assert_eq!(b.write(0, &[0xab; 4096]), S_OK);
    assert_eq!(
        b.request(0, FLUSH, 0, &[], 0).status,
        S_OK,
        "flush after a write"
    );

    let id = b.request(0, GET_ID, 0, &[], 20);
    assert_eq!(id.status, S_OK);
    assert_eq!(&id.data[..13], b"blk-serial-42");
    assert_eq!(&id.data[13..], &[0; 7]);

    // Write 1 MiB of data, then discard it: the bytes read back as zeroes and the host file
    // gives its blocks back.
    let mib = vec![0x5a; MIB as usize];
    for i in 0..4 {
        assert_eq!(b.write(2048 + i * 512, &mib[..256 * 1024]), S_OK);
    }
    let blocks_before = fs::metadata(&d.image).expect("stat").blocks();
    let r = b.request(0, DISCARD, 0, &segment(2048, 2048, 0), 0);
    assert_eq!(r.status, S_OK);
    let blocks_after = fs::metadata(&d.image).expect("stat").blocks();
    assert!(
        blocks_after + 2000 <= blocks_before,
        "discard freed no space: {blocks_before} -> {blocks_after} blocks"
    );
    assert_eq!(d.image_bytes(MIB, MIB as usize), vec![0; MIB as usize]);

    // Write zeroes without and with UNMAP.
    assert_eq!(b.write(16, &[0x11; 4096]), S_OK);
    assert_eq!(
        b.request(0, WRITE_ZEROES, 0, &segment(16, 4, 0), 0).status,
        S_OK
    );
    assert_eq!(
        d.image_bytes(16 * 512, 4096),
        [vec![0; 2048], vec![0x11; 2048]].concat()
    );
    assert_eq!(
        b.request(0, WRITE_ZEROES, 0, &segment(20, 4, 1), 0).status,
        S_OK
    );
    assert_eq!(d.image_bytes(16 * 512, 4096), vec![0; 4096]);
    // Discard with UNMAP and unknown flags are unsupported, out of range is an error.
    assert_eq!(
        b.request(0, DISCARD, 0, &segment(0, 8, 1), 0).status,
        S_UNSUPP
    );
    assert_eq!(
        b.request(0, WRITE_ZEROES, 0, &segment(0, 8, 4), 0).status,
        S_UNSUPP
    );
    assert_eq!(
        b.request(0, DISCARD, 0, &segment(8191, 2, 0), 0).status,
        S_IOERR
    );
}

#[test]
fn hostile_chains_get_error_statuses_and_the_queue_keeps_serving() {
    let d = Daemon::start(MIB, &[]);
    let mut b = d.connect(Options::default());
    // Unknown request type.
    assert_eq!(b.request(0, 0x1234, 0, &[], 0).status, S_UNSUPP);
    // Data not a multiple of 512.
    assert_eq!(b.request(0, OUT, 0, &[1; 100], 0).status, S_IOERR);
    // Huge sector.
    assert_eq!(b.read(u64::MAX / 2, 512).status, S_IOERR);

    let mem = b.fe.memory().clone();
    let hdr = mem.alloc_with(&header(IN, 0));
    let status = mem.alloc(1);
    let q: &mut Queue = b.fe.queue(0);
    // A data buffer far outside guest memory: IOERR, nothing written anywhere.
    mem.write(status, &[0xff]);
    let head = q
        .submit(&[
            Buf::readable(hdr, 16),
            Buf::writable(GuestAddress(1 << 40), 512),
            Buf::writable(status, 1),
        ])
        .expect("submit");
    let used = q.wait_used(T).expect("completion");
    assert_eq!((used.id, mem.read(status, 1)[0]), (head, S_IOERR));
    // No writable byte at all: returned with a used length of 0.
    let head = q.submit(&[Buf::readable(hdr, 16)]).expect("submit");
    assert_eq!(
        q.wait_used(T).expect("completion"),
        e2e::frontend::Used { id: head, len: 0 }
    );
    // A descriptor that chains to itself.
    let ids = q.reserve(1).expect("descriptor");
    q.write_descriptor(ids[0], Descriptor::new(hdr.0, 16, 1, ids[0]));
    q.publish(ids[0]);
    q.kick().expect("kick");
    let used = q.wait_used(T).expect("a looping chain completes");
    assert_eq!(used.len, 0);
    // An indirect table pointing outside memory.
    let ids = q.reserve(1).expect("descriptor");
    q.write_descriptor(ids[0], Descriptor::new(1 << 40, 64, 4, 0));
    q.publish(ids[0]);
    q.kick().expect("kick");
    q.wait_used(T).expect("a bad indirect table completes");
    // The queue still serves real requests.
    assert_eq!(b.write(8, &[3; 512]), S_OK);
    assert_eq!(b.read(8, 512).data, vec![3; 512]);
    assert!(!d.log().contains("panicked"), "{}", d.log());
}

#[test]
fn many_requests_in_flight_on_two_queues() {
    for engine in ["io-uring", "sync"] {
        let d = Daemon::start(16 * MIB, &["--num-queues", "2", "--engine", engine]);
        let mut b = d.connect(Options::default().queues(2).queue_size(128));
        // 100 writes per queue (indirect descriptors) published together, one kick each.
        let mut expected = Vec::new();
        for q in 0..2usize {
            let mut prepared = Vec::new();
            for i in 0..100u64 {
                let sector = (q as u64 * 100 + i) * 8;
                let data = pattern((q * 100 + i as usize) as u8, 4096);
                prepared.push(b.prepare(OUT, sector, &data, 0));
                expected.push((sector, data));
            }
            let queue = b.fe.queue(q);
            for p in &prepared {
                let head = queue.add_indirect(&p.bufs).expect("add");
                queue.publish(head);
            }
            queue.kick().expect("kick");
        }
        for q in 0..2 {
            let used = b.fe.queue(q).wait_used_n(100, T).expect("all complete");
            assert_eq!(used.len(), 100, "{engine}");
        }
        for (sector, data) in &expected {
            assert_eq!(
                &d.image_bytes(sector * 512, 4096),
                data,
                "{engine}: sector {sector}"
            );
        }
        // Reads in flight together, checked against what was written.
        let prepared: Vec<_> = expected
            .iter()
            .map(|(s, _)| b.prepare(IN, *s, &[], 4096))
            .collect();
        let queue = b.fe.queue(1);
        let mut heads = Vec::new();
        for p in &prepared {
            let head = queue.add(&p.bufs).expect("add");
            queue.publish(head);
            heads.push(head);
            if heads.len() % 40 == 0 || heads.len() == prepared.len() {
                let n = (heads.len() - 1) % 40 + 1;
                queue.kick().expect("kick");
                queue.wait_used_n(n, T).expect("reads complete");
            }
        }
        for (p, (_, data)) in prepared.iter().zip(&expected) {
            let o = b.outcome(p, 0);
            assert_eq!((o.status, &o.data), (S_OK, data), "{engine}");
        }
    }
}

#[test]
fn read_only_device_refuses_writes() {
    let d = Daemon::start(MIB, &["--read-only"]);
    fs::write(&d.image, pattern(1, MIB as usize)).expect("fill image");
    let mut b = d.connect(Options::default());
    assert!(
        b.fe.offered_features() & F_RO != 0,
        "VIRTIO_BLK_F_RO offered"
    );
    assert_eq!(b.fe.offered_features() & F_DISCARD, 0);
    assert_eq!(b.write(0, &[9; 512]), S_IOERR);
    assert_eq!(
        b.request(0, DISCARD, 0, &segment(0, 8, 0), 0).status,
        S_IOERR
    );
    assert_eq!(b.read(0, 512).data, pattern(1, 512));
    assert_eq!(d.image_bytes(0, 512), pattern(1, 512), "image untouched");
}

#[test]
fn reconnect_on_the_same_socket_sees_the_same_disk() {
    let d = Daemon::start(MIB, &[]);
    let inode = fs::metadata(&d.sock).expect("socket").ino();
    for round in 0..3u8 {
        let mut b = d.connect(Options::default());
        if round > 0 {
            assert_eq!(
                b.read(0, 512).data,
                vec![round - 1; 512],
                "data from the previous connection"
            );
        }
        assert_eq!(b.write(0, &[round; 512]), S_OK);
        drop(b);
    }
    // A frontend that vanishes mid-set-up does not stop the daemon either.
    drop(std::os::unix::net::UnixStream::connect(&d.sock).expect("connect"));
    let mut b = d.connect(Options::default());
    assert_eq!(b.read(0, 512).data, vec![2; 512]);
    assert_eq!(
        fs::metadata(&d.sock).expect("socket").ino(),
        inode,
        "socket never re-created"
    );
}

#[test]
fn sigterm_exits_cleanly_with_writes_on_disk() {
    let mut d = Daemon::start(MIB, &[]);
    let mut b = d.connect(Options::default());
    assert_eq!(b.write(0, &[0x77; 4096]), S_OK);
    let status = d.child.terminate(T).expect("exits on SIGTERM");
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        d.log()
    );
    assert_eq!(d.image_bytes(0, 4096), vec![0x77; 4096]);
    assert!(!d.sock.exists(), "socket removed at exit");
}

#[test]
fn growing_the_image_notifies_the_frontend() {
    let d = Daemon::start(MIB, &[]);
    let mut b = d.connect(Options::default());
    assert_eq!(b.capacity(), 2048);
    fs::OpenOptions::new()
        .write(true)
        .open(&d.image)
        .and_then(|f| f.set_len(3 * MIB))
        .expect("grow");
    let seen = b.fe.config_changes();
    d.child
        .signal(nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP");
    b.fe.wait_config_change(seen, T)
        .unwrap_or_else(|e| panic!("{e}; log:\n{}", d.log()));
    assert_eq!(b.capacity(), 3 * 2048);
    // The new sectors are usable.
    assert_eq!(b.write(3 * 2048 - 1, &[5; 512]), S_OK);
}

#[test]
fn writethrough_mode_can_be_switched_by_the_guest() {
    let d = Daemon::start(MIB, &["--writethrough"]);
    let mut b = d.connect(Options::default());
    assert_eq!(b.config()[32], 0, "writethrough");
    b.fe.set_config(32, &[1]).expect("SET_CONFIG");
    assert_eq!(b.config()[32], 1, "writeback after the guest's switch");
    assert_eq!(b.write(0, &[1; 512]), S_OK);
}

#[test]
fn hostile_frontend_messages_are_refused() {
    let d = Daemon::start(MIB, &["--queue-size", "64"]);
    let opts = Options::default();
    let mut fe = Frontend::connect_without_queues(&d.sock, &opts).expect("handshake");
    assert!(
        fe.vhost().set_vring_num(0, 0).is_err(),
        "queue size 0 refused"
    );
    assert!(
        fe.vhost().set_vring_num(0, 128).is_err(),
        "queue size above the maximum refused"
    );
    assert!(
        fe.vhost().set_vring_num(5, 64).is_err(),
        "queue index out of range refused"
    );
    let bad = vhost::VringConfigData {
        queue_max_size: 64,
        queue_size: 64,
        flags: 0,
        desc_table_addr: 0x10,
        used_ring_addr: 0x20,
        avail_ring_addr: 0x30,
        log_addr: None,
    };
    assert!(
        fe.vhost().set_vring_addr(0, &bad).is_err(),
        "ring addresses outside memory refused"
    );
    drop(fe);
    // A memory region longer than the file behind it (touching it past the end would
    // raise SIGBUS in the daemon) is refused, and the daemon lives on.
    let mut fe = Frontend::connect_without_queues(&d.sock, &opts).expect("handshake");
    let small = e2e::frontend::Memory::new(1 << 20).expect("memory");
    let mut regions = small.regions().expect("regions");
    regions[0].memory_size = 64 << 20;
    assert!(
        fe.vhost().set_mem_table(&regions).is_err(),
        "region past EOF refused"
    );
    let far = vhost::VringConfigData {
        desc_table_addr: regions[0].userspace_addr + (32 << 20),
        used_ring_addr: regions[0].userspace_addr + (33 << 20),
        avail_ring_addr: regions[0].userspace_addr + (34 << 20),
        ..bad
    };
    let _ = fe.vhost().set_vring_num(0, 64);
    assert!(
        fe.vhost().set_vring_addr(0, &far).is_err(),
        "no memory to put rings in"
    );
    drop(fe);
    // The daemon serves the next frontend normally.
    let mut b = d.connect(Options::default().queue_size(64));
    assert_eq!(b.write(0, &[4; 512]), S_OK);
}

/// Runs the daemon binary with `args`, expecting it to fail at start; returns stderr.
fn start_error(args: &[&str], setup: impl FnOnce(&Path) -> Vec<String>) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut full = setup(dir.path());
    full.extend(args.iter().map(ToString::to_string));
    let mut cmd = Command::new(e2e::bin_path("vhost-device-blk"));
    cmd.args(&full)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = ChildGuard::spawn("vhost-device-blk", cmd).expect("spawn");
    let status = child.wait_timeout(T).expect("exits at once");
    let mut err = String::new();
    if let Some(mut e) = child.child_mut().stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    (status.code(), err)
}

#[test]
fn user_mistakes_get_one_clear_line() {
    let sock_and = |image: &str| {
        let image = image.to_string();
        move |dir: &Path| {
            let img = if image.starts_with('/') {
                image.clone()
            } else {
                dir.join(&image).display().to_string()
            };
            vec![
                "--socket-path".into(),
                dir.join("s.sock").display().to_string(),
                "--image".into(),
                img,
            ]
        }
    };
    let (code, err) = start_error(&[], sock_and("missing.img"));
    assert_eq!(code, Some(1));
    assert!(
        err.contains("does not exist") && err.lines().count() == 1,
        "{err}"
    );

    let (code, err) = start_error(&[], |dir| {
        fs::write(dir.join("odd.img"), vec![0; 1000]).expect("odd image");
        sock_and("odd.img")(dir)
    });
    assert_eq!(code, Some(1));
    assert!(
        err.contains("not a multiple of the 512-byte logical block size"),
        "{err}"
    );

    // Socket path in use by a running daemon.
    let d = Daemon::start(MIB, &[]);
    let sock = d.sock.display().to_string();
    let image = d.image.display().to_string();
    let (code, err) = start_error(&[], |_| {
        vec![
            "--socket-path".into(),
            sock.clone(),
            "--image".into(),
            image.clone(),
        ]
    });
    assert_eq!(code, Some(1));
    assert!(err.contains("in use"), "{err}");
    assert!(d.sock.exists(), "the running daemon's socket is left alone");

    let (code, err) = start_error(&["--queue-size", "100"], |dir| {
        fs::write(dir.join("x.img"), vec![0; 4096]).expect("image");
        sock_and("x.img")(dir)
    });
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("power of two"), "{err}");

    let (code, err) = start_error(&[], |dir| {
        vec!["--socket-path".into(), dir.join("s").display().to_string()]
    });
    assert_eq!(code, Some(1));
    assert!(err.contains("--image PATH"), "{err}");
}

#[test]
fn no_permission_is_a_clear_error() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!(
            "SKIPPED no_permission_is_a_clear_error: needs root to run the daemon as another user"
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let image = dir.path().join("root-only.img");
    fs::write(&image, vec![0; 4096]).expect("image");
    fs::set_permissions(&image, fs::Permissions::from_mode(0o600)).expect("chmod");
    let sockdir = tempfile::tempdir().expect("sock dir");
    fs::set_permissions(sockdir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
    let run = |image: &Path, sock: &Path| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(e2e::bin_path("vhost-device-blk"))
            .arg("--socket-path")
            .arg(sock)
            .arg("--image")
            .arg(image)
            .stdin(Stdio::null())
            .output()
            .expect("setpriv");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, err) = run(&image, &sockdir.path().join("s.sock"));
    assert_eq!(code, Some(1));
    assert!(err.contains("no permission to open image"), "{err}");
    // A socket directory the user may not write to.
    fs::set_permissions(&image, fs::Permissions::from_mode(0o666)).expect("chmod");
    let (code, err) = run(&image, &dir.path().join("s.sock"));
    assert_eq!(code, Some(1));
    assert!(err.contains("permission denied"), "{err}");
}

#[test]
fn without_event_idx_or_indirect_descriptors_requests_complete() {
    let d = Daemon::start(MIB, &[]);
    let features = !(F_EVENT_IDX | (1 << 28));
    let mut b = d.connect(Options::default().features(features));
    assert_eq!(b.fe.features() & (F_EVENT_IDX | (1 << 28)), 0);
    for i in 0..50u64 {
        assert_eq!(b.write(i * 8, &pattern(i as u8, 4096)), S_OK);
    }
    for i in 0..50u64 {
        assert_eq!(b.read(i * 8, 4096).data, pattern(i as u8, 4096));
    }
}

#[test]
fn stopping_a_queue_completes_what_it_took() {
    for engine in ["io-uring", "sync"] {
        let d = Daemon::start(16 * MIB, &["--engine", engine]);
        let mut b = d.connect(Options::default());
        let prepared: Vec<_> = (0..64u64)
            .map(|i| b.prepare(IN, i * 64, &[], 32 * 1024))
            .collect();
        let q = b.fe.queue(0);
        for p in &prepared {
            let head = q.add_indirect(&p.bufs).expect("add");
            q.publish(head);
        }
        q.kick().expect("kick");
        // Stop as soon as the device has started on the batch, with the rest in flight.
        let deadline = std::time::Instant::now() + T;
        while q.used_idx() == 0 && std::time::Instant::now() < deadline {
            std::hint::spin_loop();
        }
        let base = b.fe.stop_queue(0).expect("GET_VRING_BASE");
        let used = b.fe.queue(0).used_idx();
        assert_eq!(
            u32::from(used),
            base,
            "{engine}: every request the device took is completed when GET_VRING_BASE returns"
        );
    }
}

/// Writes descriptor `head`'s state in an in-flight buffer as a daemon that took the request
/// off the ring would have (layout: vhost-user specification, "Inflight I/O tracking").
fn mark_in_flight(buf: &mut [u8], head: u16, counter: u64) {
    let at = 16 + 16 * usize::from(head);
    buf[at] = 1;
    buf[at + 8..at + 16].copy_from_slice(&counter.to_le_bytes());
}

/// A daemon killed with requests in flight: the next daemon gets the in-flight buffer back
/// (`SET_INFLIGHT_FD`, as QEMU's `reconnect=` does) and finishes them with no kick, once each,
/// oldest first; one the dead daemon had already put on the used ring is not done again; and
/// the ring goes on from the right place.
#[test]
fn a_restarted_daemon_resubmits_what_was_in_flight() {
    use std::os::unix::fs::FileExt;

    let mut d = Daemon::start(MIB, &[]);
    let options = Options::default().queue_size(16);
    let mut fe = Frontend::connect_without_queues(&d.sock, &options)
        .unwrap_or_else(|e| panic!("connect: {e}\nlog:\n{}", d.log()));
    let (inflight, file) = fe.get_inflight(1, 16).expect("GET_INFLIGHT_FD");
    assert_eq!(
        inflight.mmap_size, 320,
        "one queue of 16: 16 * 16 + 2 rounded up to 64"
    );
    fe.set_inflight(&inflight, &file).expect("SET_INFLIGHT_FD");
    fe.setup_queues(1, 16).expect("queues");
    let mut b = Blk { fe };
    // The daemon keeps the log: after a completed write, nothing is marked and the used
    // index is recorded.
    assert_eq!(b.write(0, &[0x11; 512]), S_OK);
    let mut log = vec![0u8; inflight.mmap_size as usize];
    file.read_exact_at(&mut log, 0).expect("read log");
    assert_eq!(u16::from_le_bytes([log[8], log[9]]), 1, "version");
    assert_eq!(u16::from_le_bytes([log[14], log[15]]), 1, "used_idx");
    assert!(
        (0..16).all(|h| log[16 + 16 * h] == 0),
        "no request left marked"
    );

    // Kill the daemon, then lay out what it would have left: four writes taken off the ring;
    // the first (A) already on the used ring, its mark not yet cleared; B, C, D in flight.
    d.child
        .signal(nix::sys::signal::Signal::SIGKILL)
        .expect("SIGKILL");
    d.child.wait_timeout(T).expect("killed");
    let mut heads = Vec::new();
    let mut prepared = Vec::new();
    for (i, byte) in [0xaa_u8, 0xbb, 0xcc, 0xdd].into_iter().enumerate() {
        let p = b.prepare(OUT, 8 * (i as u64 + 1), &[byte; 4096], 0);
        let q = b.fe.queue(0);
        let head = q.add(&p.bufs).expect("add");
        q.publish(head);
        heads.push(head);
        prepared.push(p);
    }
    b.fe.queue(0).write_used_as_device(heads[0], 1);
    let a =
        b.fe.queue(0)
            .wait_used(T)
            .expect("A as the dead daemon completed it");
    assert_eq!(a.id, heads[0]);
    for (counter, head) in heads.iter().enumerate() {
        mark_in_flight(&mut log, *head, 10 + counter as u64);
    }
    log[12..14].copy_from_slice(&heads[0].to_le_bytes()); // last_batch_head
    file.write_all_at(&log, 0).expect("write log");

    let args: [&str; 0] = [];
    d.respawn(&args);
    b.fe.reconnect(&d.sock, &options, Some((&inflight, &file)))
        .unwrap_or_else(|e| panic!("reconnect: {e}\nlog:\n{}", d.log()));
    // No kick: the daemon resubmits on its own.
    let used =
        b.fe.queue(0)
            .wait_used_n(3, T)
            .unwrap_or_else(|e| panic!("resubmitted requests: {e}\nlog:\n{}", d.log()));
    assert_eq!(
        used.iter().map(|u| u.id).collect::<Vec<_>>(),
        heads[1..].to_vec(),
        "B, C, D completed, in the order they were taken"
    );
    for (i, p) in prepared.iter().enumerate().skip(1) {
        assert_eq!(b.outcome(p, 1).status, S_OK);
        let byte = [0xaa_u8, 0xbb, 0xcc, 0xdd][i];
        assert_eq!(d.image_bytes(4096 * (i as u64 + 1), 4096), vec![byte; 4096]);
    }
    // A was not done again (its status byte still holds the 0xff the driver put there),
    // and nothing more comes: the ring goes on after D.
    assert_eq!(b.outcome(&prepared[0], 1).status, 0xff, "A not resubmitted");
    assert!(b.fe.queue(0).wait_used(Duration::from_millis(300)).is_err());
    assert_eq!(b.write(40, &[0x22; 512]), S_OK);
    assert_eq!(d.image_bytes(40 * 512, 512), vec![0x22; 512]);
    assert!(
        d.log().contains("resubmitting 3 request(s)"),
        "log:\n{}",
        d.log()
    );
}
