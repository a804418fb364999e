//! The daemons' sandbox as a user sees it: each daemon, started as every other test starts it
//! (no `--seccomp` flag, so the default `kill`), serves with a seccomp filter in every thread,
//! including the worker threads started for a frontend; `--user nobody` leaves a daemon
//! running as nobody; an unknown user is a one-line error. That a call off the list kills
//! the process is proved in `vhost-device-common`'s `sandbox` unit tests, which install the
//! same filter in a forked child and call `socket(AF_INET)` and `execve`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::frontend::{Buf, Frontend, Options};
use e2e::process::wait_for_path;
use e2e::qemu::skip;
use e2e::ChildGuard;

const T: Duration = Duration::from_secs(10);

/// A network namespace for the net daemon's tap, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(test: &str) -> Option<Self> {
        let name = format!("vhd-sandbox-{}", std::process::id());
        match Command::new("ip").args(["netns", "add", &name]).output() {
            Ok(o) if o.status.success() => Some(Netns(name)),
            Ok(o) => {
                skip(
                    test,
                    &format!(
                        "cannot create a network namespace for the tap (needs root): {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    ),
                );
                None
            }
            Err(e) => {
                skip(test, &format!("cannot run `ip` (iproute2): {e}"));
                None
            }
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// The command for daemon `dev` on `socket`, with the device's required options.
fn daemon_command(dev: &str, dir: &Path, socket: &Path, netns: Option<&Netns>) -> Command {
    let bin = e2e::bin_path(&format!("vhost-device-{dev}"));
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.0]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.arg(format!("--socket-path={}", socket.display()));
    match dev {
        "blk" => {
            let image = dir.join("disk.raw");
            std::fs::File::create(&image)
                .and_then(|f| f.set_len(1 << 20))
                .expect("create image");
            cmd.arg(format!("--image={}", image.display()));
        }
        "vsock" => {
            cmd.args(["--guest-cid=7"])
                .arg(format!("--uds-path={}", dir.join("vm.vsock").display()));
        }
        "console" => {
            cmd.arg(format!(
                "--backend=unix={}",
                dir.join("console.sock").display()
            ));
        }
        "net" => {
            cmd.args(["--tap=sbtap0"]);
        }
        other => panic!("unknown daemon {other}"),
    }
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// The `Key:` line of `/proc/<pid>/task/<tid>/status`, whitespace-normalised.
fn status_line(task: &Path, key: &str) -> String {
    let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Every thread of `pid`.
fn tasks(pid: u32) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// The threads of `pid` once there are `at_least` of them (or after 10 s).
fn wait_for_threads(pid: u32, at_least: usize) -> Vec<PathBuf> {
    let deadline = Instant::now() + T;
    loop {
        let t = tasks(pid);
        if t.len() >= at_least || Instant::now() > deadline {
            return t;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn runs_under_its_filter(dev: &'static str) {
    let test = format!("sandbox::{dev}_runs_under_its_filter");
    let netns = if dev == "net" {
        match Netns::create(&test) {
            Some(ns) => Some(ns),
            None => return,
        }
    } else {
        None
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vhost-user.sock");
    let cmd = daemon_command(dev, dir.path(), &socket, netns.as_ref());
    let mut daemon = ChildGuard::spawn(&test, cmd).expect("spawn the daemon");
    assert!(wait_for_path(&socket, T), "{dev}: no socket");
    let options = Options {
        num_queues: if dev == "blk" { 2 } else { 1 },
        ..Options::default()
    };
    // Worker threads start per connection, after the filter: connect, then look at them.
    let fe = if dev == "blk" {
        Frontend::connect(&socket, options)
    } else {
        Frontend::connect_without_queues(&socket, &options)
    }
    .unwrap_or_else(|e| panic!("{dev}: frontend: {e}"));
    let threads = wait_for_threads(daemon.pid(), if dev == "blk" { 4 } else { 2 });
    assert!(threads.len() >= 2, "{dev}: threads {threads:?}");
    for task in &threads {
        // 2 = SECCOMP_MODE_FILTER.
        assert_eq!(
            status_line(task, "Seccomp:"),
            "2",
            "{dev}: {} has no seccomp filter",
            task.display()
        );
        assert_eq!(status_line(task, "NoNewPrivs:"), "1", "{dev}");
    }
    drop(fe);
    let status = daemon.terminate(T).expect("exit after SIGTERM");
    assert!(
        status.success(),
        "{dev}: clean exit under the filter: {status}"
    );
}

#[test]
fn blk_runs_under_its_filter() {
    runs_under_its_filter("blk");
}

#[test]
fn net_runs_under_its_filter() {
    runs_under_its_filter("net");
}

#[test]
fn vsock_runs_under_its_filter() {
    runs_under_its_filter("vsock");
}

#[test]
fn console_runs_under_its_filter() {
    runs_under_its_filter("console");
}

/// Many worker threads at once, connection after connection: glibc's malloc gives each
/// thread an arena and, the first time it needs a ninth one, reads
/// `/sys/devices/system/cpu/online`; the sandbox settles that before the filter, so the
/// daemon survives what would otherwise be an `openat` off its list.
#[test]
fn blk_survives_many_workers_and_reconnections() {
    let test = "sandbox::blk_survives_many_workers_and_reconnections";
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vhost-user.sock");
    let mut cmd = daemon_command("blk", dir.path(), &socket, None);
    cmd.arg("--num-queues=16");
    let mut daemon = ChildGuard::spawn(test, cmd).expect("spawn the daemon");
    assert!(wait_for_path(&socket, T), "no socket");
    for round in 0..6 {
        let options = Options {
            num_queues: 16,
            queue_size: 16,
            ..Options::default()
        };
        let mut fe = Frontend::connect(&socket, options)
            .unwrap_or_else(|e| panic!("round {round}: frontend: {e}"));
        // One read of sector 0 on every queue, so every worker thread allocates.
        for q in 0..16 {
            let header = fe.memory().alloc_with(&[0u8; 16]); // VIRTIO_BLK_T_IN, sector 0
            let data = fe.memory().alloc(512);
            let status = fe.memory().alloc_with(&[0xff]);
            let queue = fe.queue(q);
            let head = queue
                .submit(&[
                    Buf::readable(header, 16),
                    Buf::writable(data, 512),
                    Buf::writable(status, 1),
                ])
                .expect("submit");
            let used = queue
                .wait_used(T)
                .unwrap_or_else(|e| panic!("round {round}: read on queue {q}: {e}"));
            assert_eq!(used.id, head);
            assert_eq!(fe.memory().read(status, 1), [0], "VIRTIO_BLK_S_OK");
        }
        drop(fe);
        assert!(
            daemon.try_wait().is_none(),
            "round {round}: the daemon died: {:?}",
            daemon.try_wait()
        );
    }
    let status = daemon.terminate(T).expect("exit after SIGTERM");
    assert!(status.success(), "clean exit: {status}");
}

/// `--user nobody`: every thread of the serving daemon runs as nobody, with nobody's group
/// and no other group, and still serves a frontend and SIGHUP.
#[test]
fn user_nobody_drops_privileges() {
    let test = "sandbox::user_nobody_drops_privileges";
    let (Ok(Some(nobody)), true) = (
        nix::unistd::User::from_name("nobody"),
        nix::unistd::geteuid().is_root(),
    ) else {
        skip(test, "needs root and a `nobody` user");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vhost-user.sock");
    let mut cmd = daemon_command("blk", dir.path(), &socket, None);
    cmd.arg("--user=nobody");
    let mut daemon = ChildGuard::spawn(test, cmd).expect("spawn the daemon");
    assert!(wait_for_path(&socket, T), "no socket");
    let fe = Frontend::connect(&socket, Options::default()).expect("frontend as nobody");
    let uid = nobody.uid.as_raw();
    let gid = nobody.gid.as_raw();
    let threads = wait_for_threads(daemon.pid(), 3);
    for task in &threads {
        assert_eq!(
            status_line(task, "Uid:"),
            format!("{uid} {uid} {uid} {uid}"),
            "{}",
            task.display()
        );
        assert_eq!(
            status_line(task, "Gid:"),
            format!("{gid} {gid} {gid} {gid}")
        );
        assert_eq!(status_line(task, "Groups:"), gid.to_string());
        assert_eq!(status_line(task, "Seccomp:"), "2");
    }
    // A reload (fstat of the open image) still works as nobody under the filter.
    daemon
        .signal(nix::sys::signal::Signal::SIGHUP)
        .expect("SIGHUP");
    std::thread::sleep(Duration::from_millis(200));
    assert!(daemon.try_wait().is_none(), "the daemon died on SIGHUP");
    drop(fe);
    let status = daemon.terminate(T).expect("exit after SIGTERM");
    assert!(status.success(), "clean exit as nobody: {status}");
}

/// An unknown `--user` is one line on stderr and exit status 1, and leaves no socket file.
#[test]
fn unknown_user_is_a_one_line_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vhost-user.sock");
    let mut cmd = daemon_command("blk", dir.path(), &socket, None);
    cmd.arg("--user=no-such-user-here").stderr(Stdio::piped());
    let out = cmd.output().expect("run the daemon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(
        lines,
        ["vhost-device-blk: error: --user no-such-user-here: no user named no-such-user-here on this system"],
        "{stderr}"
    );
    assert!(!socket.exists(), "socket file left behind");
}

/// `--seccomp` takes the four modes and nothing else.
#[test]
fn seccomp_mode_is_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("vhost-user.sock");
    let mut cmd = daemon_command("blk", dir.path(), &socket, None);
    cmd.arg("--seccomp=maybe").stderr(Stdio::piped());
    let out = cmd.output().expect("run the daemon");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("[possible values: kill, trap, log, none]"),
        "{stderr}"
    );
}
