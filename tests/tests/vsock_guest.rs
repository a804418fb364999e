//! vhost-device-vsock with a real Linux guest under QEMU (`vhost-user-vsock-pci`): the
//! guest's own virtio-vsock driver and `socat` against host programs on the hybrid-vsock
//! Unix sockets. Guest runs are serialized by the harness; each test boots one guest.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use e2e::process::wait_for_path;
use e2e::{qemu_or_skip, ChildGuard, Device, GuestSpec};

const CID: u64 = 3;

/// Our daemon for one guest, in a fresh directory.
struct Host {
    _daemon: ChildGuard,
    dir: tempfile::TempDir,
}

impl Host {
    fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("vhost.sock");
        let uds = dir.path().join("vm.vsock");
        let mut cmd = Command::new(e2e::bin_path("vhost-device-vsock"));
        cmd.arg("--guest-cid")
            .arg(CID.to_string())
            .arg("--socket-path")
            .arg(&sock)
            .arg("--uds-path")
            .arg(&uds)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        let daemon = ChildGuard::spawn("vhost-device-vsock", cmd).expect("start daemon");
        assert!(
            wait_for_path(&sock, Duration::from_secs(10)),
            "daemon socket"
        );
        Host {
            _daemon: daemon,
            dir,
        }
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("vhost.sock")
    }

    fn uds(&self) -> PathBuf {
        self.dir.path().join("vm.vsock")
    }

    fn port(&self, port: u32) -> PathBuf {
        self.dir.path().join(format!("vm.vsock_{port}"))
    }
}

/// SHA-256 of `data` as hex, by the host's `sha256sum`.
fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum output");
    feeder.join().expect("feeder").expect("feed sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// Deterministic pseudo-random bytes (xorshift64).
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The value after `key ` on a line of the guest's output.
fn field<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
}

/// Accepts one connection on `listener` and returns everything read from it.
fn receive_all(listener: UnixListener) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return Vec::new();
        };
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        all
    })
}

/// Connects to the guest's listener on `port` through the hybrid-vsock handshake, retrying
/// while the guest is not yet listening (the guest refuses, the daemon closes).
fn connect_to_guest(uds: &Path, port: u32, deadline: Instant) -> Option<UnixStream> {
    while Instant::now() < deadline {
        if let Ok(mut s) = UnixStream::connect(uds) {
            s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
            if s.write_all(format!("CONNECT {port}\n").as_bytes()).is_ok() {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while let Ok(1) = s.read(&mut b) {
                    line.push(b[0]);
                    if b[0] == b'\n' {
                        break;
                    }
                }
                if line.starts_with(b"OK ") {
                    return Some(s);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    None
}

#[test]
fn guest_streams_64mib_each_way_with_equal_checksums() {
    let Some(qemu) = qemu_or_skip("vsock_guest::guest_streams_64mib_each_way_with_equal_checksums")
    else {
        return;
    };
    let host = Host::start(&[]);
    let g2h = receive_all(UnixListener::bind(host.port(5000)).expect("listener"));
    let h2g_data = pattern(64 << 20, 0x5eed);
    let h2g_sum = sha256(&h2g_data);
    let uds = host.uds();
    let sender = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(240);
        let Some(mut s) = connect_to_guest(&uds, 6000, deadline) else {
            return Err("guest never listened on port 6000".to_string());
        };
        s.write_all(&h2g_data).map_err(|e| e.to_string())?;
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        Ok(())
    });
    let script = r#"
set -e
dd if=/dev/urandom of=/tmp/out bs=1M count=64 2>/dev/null
echo "G2H_SUM $(sha256sum < /tmp/out | cut -d' ' -f1)"
t0=$(date +%s)
socat -u FILE:/tmp/out VSOCK-CONNECT:2:5000
t1=$(date +%s)
echo "G2H_SECONDS $((t1 - t0))"
rm /tmp/out
socat -u VSOCK-LISTEN:6000 CREATE:/tmp/in
t2=$(date +%s)
echo "H2G_SECONDS $((t2 - t1))"
echo "H2G_SUM $(sha256sum < /tmp/in | cut -d' ' -f1)"
echo "H2G_BYTES $(wc -c < /tmp/in)"
"#;
    let run = GuestSpec::new(script)
        .device(Device::vsock(&host.sock(), CID))
        .memory_mib(1024)
        .cpus(2)
        .timeout(Duration::from_secs(400))
        .run(&qemu)
        .expect("guest run");
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    sender
        .join()
        .expect("sender thread")
        .expect("host to guest");
    let got = g2h.join().expect("receiver thread");
    assert_eq!(got.len(), 64 << 20, "guest to host byte count");
    assert_eq!(
        field(&run.output, "G2H_SUM"),
        Some(sha256(&got).as_str()),
        "guest to host checksum\n{}",
        run.output
    );
    assert_eq!(
        field(&run.output, "H2G_SUM"),
        Some(h2g_sum.as_str()),
        "host to guest checksum\n{}",
        run.output
    );
    eprintln!(
        "vsock guest ({}): 64 MiB guest->host in {} s, host->guest in {} s",
        run.launcher,
        field(&run.output, "G2H_SECONDS").unwrap_or("?"),
        field(&run.output, "H2G_SECONDS").unwrap_or("?")
    );
}

/// Echo server: each connection's bytes come back, then it closes.
fn echo_server(listener: UnixListener, stop: mpsc::Receiver<()>) -> JoinHandle<usize> {
    std::thread::spawn(move || {
        listener.set_nonblocking(true).expect("nonblocking");
        let mut served = 0;
        let mut workers = Vec::new();
        loop {
            if stop.try_recv().is_ok() {
                break;
            }
            match listener.accept() {
                Ok((mut s, _)) => {
                    served += 1;
                    let _ = s.set_nonblocking(false);
                    workers.push(std::thread::spawn(move || {
                        let mut buf = Vec::new();
                        let _ = s.read_to_end(&mut buf);
                        let _ = s.write_all(&buf);
                    }));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        for w in workers {
            let _ = w.join();
        }
        served
    })
}

#[test]
fn concurrent_connections_refused_port_early_close_and_seqpacket() {
    use nix::sys::socket::{
        bind, listen, recv, socket, AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr,
    };
    let Some(qemu) =
        qemu_or_skip("vsock_guest::concurrent_connections_refused_port_early_close_and_seqpacket")
    else {
        return;
    };
    let host = Host::start(&[]);
    let (stop_tx, stop_rx) = mpsc::channel();
    let echo = echo_server(
        UnixListener::bind(host.port(7000)).expect("listener"),
        stop_rx,
    );

    // A host listener that closes every connection at once.
    let early = UnixListener::bind(host.port(7100)).expect("listener");
    let early_thread = std::thread::spawn(move || {
        let mut n = 0;
        if let Ok((s, _)) = early.accept() {
            drop(s);
            n += 1;
        }
        n
    });

    // A SEQPACKET listener that records message sizes.
    let fd = socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        fd.as_raw_fd(),
        &UnixAddr::new(&host.port(7200)).expect("addr"),
    )
    .expect("bind");
    listen(&fd, Backlog::new(4).expect("backlog")).expect("listen");
    let seq_listener = UnixListener::from(fd);
    let seq_thread = std::thread::spawn(move || {
        let Ok((s, _)) = seq_listener.accept() else {
            return Vec::new();
        };
        let mut sizes = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = recv(s.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            if n == 0 {
                break;
            }
            sizes.push(n);
        }
        sizes
    });

    let script = r#"
# 32 concurrent connections to an echo server.
for i in $(seq 1 32); do
  (echo "hello $i" | socat -t 60 - VSOCK-CONNECT:2:7000 > /tmp/c$i 2>/tmp/e$i) &
done
wait
echo "ECHOED $(cat /tmp/c* | sort -u | grep -c hello)"
# Nobody listens on port 7999: refused, promptly.
t0=$(date +%s)
if timeout 20 socat -u /dev/null VSOCK-CONNECT:2:7999 2>/tmp/refused; then echo "REFUSED no"; else echo "REFUSED yes $(( $(date +%s) - t0 ))s"; fi
cat /tmp/refused
# A host listener that closes at once: the guest's write fails, it does not hang.
dd if=/dev/zero of=/tmp/big bs=1M count=8 2>/dev/null
timeout 60 socat -u FILE:/tmp/big VSOCK-CONNECT:2:7100 2>/tmp/early
echo "EARLY rc=$?"
cat /tmp/early
# SEQPACKET: three writes, three messages.
(printf AAAA; sleep 1; printf BBBBBBBBBB; sleep 1; printf CCCCCCCCCCCCCCCCCCCC) | timeout 30 socat -t 5 -b 65536 -u - VSOCK-CONNECT:2:7200,so-type=5 2>/tmp/seq
echo "SEQ rc=$?"
cat /tmp/seq
"#;
    let run = GuestSpec::new(script)
        .device(Device::vsock(&host.sock(), CID))
        .cpus(2)
        .timeout(Duration::from_secs(300))
        .run(&qemu)
        .expect("guest run");
    let _ = stop_tx.send(());
    let served = echo.join().expect("echo");
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert_eq!(
        field(&run.output, "ECHOED"),
        Some("32"),
        "all 32 echoes back\n{}",
        run.output
    );
    assert_eq!(served, 32, "connections reached the host");
    let refused = field(&run.output, "REFUSED").unwrap_or("");
    assert!(refused.starts_with("yes"), "refused port\n{}", run.output);
    let secs: u64 = refused
        .trim_start_matches("yes ")
        .trim_end_matches('s')
        .parse()
        .unwrap_or(99);
    assert!(secs <= 2, "refusal took {secs} s\n{}", run.output);
    let early_rc = field(&run.output, "EARLY").unwrap_or("");
    assert!(
        early_rc.starts_with("rc=") && early_rc != "rc=0" && early_rc != "rc=124",
        "early close must fail the guest's write, not hang: {early_rc}\n{}",
        run.output
    );
    assert_eq!(early_thread.join().expect("early"), 1);
    assert_eq!(field(&run.output, "SEQ"), Some("rc=0"), "{}", run.output);
    assert_eq!(
        seq_thread.join().expect("seq"),
        vec![4, 10, 20],
        "message boundaries\n{}",
        run.output
    );
}
