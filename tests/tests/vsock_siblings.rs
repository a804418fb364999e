//! Sibling VMs with real guests: ONE vhost-device-vsock process serves two VMs (`--vm ...
//! --vm ...`), two QEMU guests run at the same time (`-device vhost-user-vsock-pci`, one
//! vCPU each) and their own virtio-vsock drivers talk to each other by CID through the
//! daemon; a guest in another group is refused while the listener is there.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::process::wait_for_path;
use e2e::{qemu_or_skip, ChildGuard, Device, GuestRun, GuestSpec};

/// One daemon serving guests 3 and 4, each in the groups given.
struct Daemon {
    _guard: ChildGuard,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start(groups3: &str, groups4: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().display().to_string();
        let mut cmd = Command::new(e2e::bin_path("vhost-device-vsock"));
        cmd.arg("--vm")
            .arg(format!(
                "guest-cid=3,socket={d}/vm3.sock,uds-path={d}/vm3.vsock,groups={groups3}"
            ))
            .arg("--vm")
            .arg(format!(
                "guest-cid=4,socket={d}/vm4.sock,uds-path={d}/vm4.vsock,groups={groups4}"
            ))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null());
        let guard = ChildGuard::spawn("vhost-device-vsock", cmd).expect("start daemon");
        for cid in [3, 4] {
            let sock = dir.path().join(format!("vm{cid}.sock"));
            assert!(
                wait_for_path(&sock, Duration::from_secs(10)),
                "daemon socket {}",
                sock.display()
            );
        }
        Daemon { _guard: guard, dir }
    }

    fn sock(&self, cid: u64) -> PathBuf {
        self.dir.path().join(format!("vm{cid}.sock"))
    }

    /// The host listener path a guest with `cid` reaches as (CID 2, `port`).
    fn host_port(&self, cid: u64, port: u32) -> PathBuf {
        self.dir.path().join(format!("vm{cid}.vsock_{port}"))
    }
}

/// A guest of one CPU and 512 MiB running `script` on the daemon's device for `cid`.
fn guest(d: &Daemon, cid: u64, script: &str) -> GuestSpec {
    GuestSpec::new(script)
        .device(Device::vsock(&d.sock(cid), cid))
        .cpus(1)
        .memory_mib(512)
        .timeout(Duration::from_secs(180))
}

/// The value after `key ` on a line of the guest's output.
fn field<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key).map(str::trim))
}

/// Unwraps both guests' runs, printing both consoles if either failed.
fn both(runs: Vec<Result<GuestRun, e2e::guest::Error>>) -> (GuestRun, GuestRun) {
    let mut it = runs.into_iter();
    match (it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b))) => (a, b),
        (a, b) => panic!("guest runs failed:\n--- guest 3 ---\n{a:?}\n--- guest 4 ---\n{b:?}"),
    }
}

/// Accepts one connection on `path`'s listener before `deadline`.
fn accept_by(listener: &UnixListener, deadline: Instant) -> Option<UnixStream> {
    listener.set_nonblocking(true).ok()?;
    while Instant::now() < deadline {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
                return Some(s);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    None
}

fn bind(path: &Path) -> UnixListener {
    UnixListener::bind(path).expect("host listener")
}

#[test]
fn two_guests_in_one_group_stream_to_each_other_by_cid() {
    let Some(qemu) =
        qemu_or_skip("vsock_siblings::two_guests_in_one_group_stream_to_each_other_by_cid")
    else {
        return;
    };
    let d = Daemon::start("g", "g+other");
    // Guest 4 listens on port 9000 and answers each connection with the SHA-256 of what it
    // received; it keeps a copy to check on its side too.
    let listener = r#"
timeout 150 socat -u VSOCK-LISTEN:9000 SYSTEM:'tee /tmp/got | sha256sum > /tmp/sum' 2>/tmp/err
echo "LISTEN rc=$?"
cat /tmp/err
echo "GOT_BYTES $(wc -c < /tmp/got)"
echo "GOT_SUM $(cut -d' ' -f1 /tmp/sum)"
"#;
    // Guest 3 connects to CID 4, retrying while guest 4 is still booting (the two boot
    // side by side, either may be first), sends 16 MiB and reads nothing back.
    let sender = r#"
dd if=/dev/urandom of=/tmp/out bs=1M count=16 2>/dev/null
echo "SENT_SUM $(sha256sum < /tmp/out | cut -d' ' -f1)"
i=0
while [ $i -lt 120 ]; do
  if socat -u FILE:/tmp/out VSOCK-CONNECT:4:9000 2>/tmp/err; then
    echo "CONNECTED after $i retries"
    break
  fi
  i=$((i+1))
  sleep 0.5
done
[ $i -lt 120 ] || { echo "NEVER CONNECTED"; cat /tmp/err; exit 1; }
"#;
    let started = Instant::now();
    let (g3, g4) = both(qemu.run_together(&[guest(&d, 3, sender), guest(&d, 4, listener)]));
    eprintln!(
        "vsock siblings ({}): guest 3 -> guest 4, 16 MiB, both guests done in {:.1} s; {}",
        g3.launcher,
        started.elapsed().as_secs_f64(),
        g3.output
            .lines()
            .find(|l| l.starts_with("CONNECTED"))
            .unwrap_or("?")
    );
    assert_eq!(g3.exit_code, Some(0), "guest 3:\n{}", g3.output);
    assert_eq!(g4.exit_code, Some(0), "guest 4:\n{}", g4.output);
    assert_eq!(
        field(&g4.output, "LISTEN"),
        Some("rc=0"),
        "guest 4's listener:\n{}",
        g4.output
    );
    assert_eq!(
        field(&g4.output, "GOT_BYTES"),
        Some("16777216"),
        "{}",
        g4.output
    );
    let sent = field(&g3.output, "SENT_SUM").expect("guest 3's checksum");
    assert_eq!(
        field(&g4.output, "GOT_SUM"),
        Some(sent),
        "guest 4 received what guest 3 sent\n--- guest 3 ---\n{}\n--- guest 4 ---\n{}",
        g3.output,
        g4.output
    );
}

#[test]
fn a_guest_in_another_group_is_refused() {
    let Some(qemu) = qemu_or_skip("vsock_siblings::a_guest_in_another_group_is_refused") else {
        return;
    };
    let d = Daemon::start("g", "h");
    // Sync through the host: guest 4 says `ready` on host port 9100 once it listens; the
    // host then says `go` to guest 3 on port 9101; guest 3 tries CID 4 and reports on port
    // 9102; then the host closes guest 4's line and guest 4 stops listening.
    let ready = bind(&d.host_port(4, 9100));
    let go = bind(&d.host_port(3, 9101));
    let report = bind(&d.host_port(3, 9102));
    let host = std::thread::spawn(move || -> Result<String, String> {
        let deadline = Instant::now() + Duration::from_secs(240);
        let g4 = accept_by(&ready, deadline).ok_or("guest 4 never said ready")?;
        let mut line = String::new();
        BufReader::new(&g4)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            return Err(format!("guest 4 said {line:?}"));
        }
        let mut g3 = accept_by(&go, deadline).ok_or("guest 3 never asked to go")?;
        g3.write_all(b"go\n").map_err(|e| e.to_string())?;
        drop(g3);
        let mut r = accept_by(&report, deadline).ok_or("guest 3 never reported")?;
        let mut text = String::new();
        r.read_to_string(&mut text).map_err(|e| e.to_string())?;
        drop(g4);
        Ok(text)
    });
    let listener = r#"
socat -u VSOCK-LISTEN:9000 CREATE:/tmp/got 2>/dev/null &
pid=$!
sleep 2
echo ready | timeout 200 socat -t 200 - VSOCK-CONNECT:2:9100
echo "SYNC rc=$?"
kill $pid 2>/dev/null
if [ -e /tmp/got ]; then echo "LISTENER accepted"; else echo "LISTENER idle"; fi
"#;
    let refused = r#"
timeout 200 socat -u VSOCK-CONNECT:2:9101 - 
t0=$(date +%s)
if timeout 20 socat -u /dev/null VSOCK-CONNECT:4:9000 2>/tmp/err; then r="connected"; else r="refused $(( $(date +%s) - t0 ))s"; fi
echo "TO4 $r"
cat /tmp/err
echo "$r" | socat -u - VSOCK-CONNECT:2:9102
"#;
    let (g3, g4) = both(qemu.run_together(&[guest(&d, 3, refused), guest(&d, 4, listener)]));
    let told = host.join().expect("host thread");
    assert_eq!(g3.exit_code, Some(0), "guest 3:\n{}", g3.output);
    assert_eq!(g4.exit_code, Some(0), "guest 4:\n{}", g4.output);
    assert_eq!(
        field(&g3.output, "go"),
        Some(""),
        "guest 3 waited for guest 4 to listen\n{}",
        g3.output
    );
    let to4 = field(&g3.output, "TO4").unwrap_or("");
    assert!(
        to4.starts_with("refused"),
        "guest 3 (group g) must not reach guest 4 (group h)\n--- guest 3 ---\n{}",
        g3.output
    );
    let secs: u64 = to4
        .trim_start_matches("refused ")
        .trim_end_matches('s')
        .parse()
        .unwrap_or(99);
    assert!(secs <= 2, "refusal took {secs} s\n{}", g3.output);
    assert!(
        g3.output.contains("Connection reset") || g3.output.contains("refused"),
        "socat's error\n{}",
        g3.output
    );
    assert_eq!(told.as_deref().map(str::trim), Ok(to4), "guest 3's report");
    assert_eq!(field(&g4.output, "SYNC"), Some("rc=0"), "{}", g4.output);
    assert_eq!(
        field(&g4.output, "LISTENER"),
        Some("idle"),
        "nothing reached guest 4's listener\n{}",
        g4.output
    );
    eprintln!(
        "vsock siblings ({}): guest 3 (group g) to guest 4 (group h): {to4}",
        g3.launcher
    );
}
