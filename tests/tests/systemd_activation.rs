//! Each daemon as a service would run it: its listening socket passed by systemd socket
//! activation (`systemd-socket-activate`, and `LISTEN_FDS`/`LISTEN_PID` set by hand), by
//! `--fd` (libvirt's way) or bound with `--socket-path`; readiness and stopping reported on
//! a `NOTIFY_SOCKET` the test listens on; a configuration file alone; and QEMU's
//! `--print-capabilities`. A frontend (the in-test one) then talks to the daemon and reads
//! back what the options said (disk size, CID, MAC).

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::frontend::{Frontend, Options, VIRTIO_F_VERSION_1};
use e2e::process::wait_for_path;
use e2e::qemu::{skip, which};
use e2e::ChildGuard;
use vhost_device_common::capabilities::{qemu_features, QEMU_TYPES};

const T: Duration = Duration::from_secs(10);
const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_CID: u64 = 7;
const DISK_BYTES: u64 = 1 << 20;

/// A network namespace for the net daemon's tap, deleted on drop.
struct Netns(String);

impl Netns {
    fn create(test: &str) -> Option<Self> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("vhd-svc-{}-{n}", std::process::id());
        let out = Command::new("ip").args(["netns", "add", &name]).output();
        match out {
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

/// One daemon with a scratch directory, its options, and what a frontend must find.
struct Daemon {
    dev: &'static str,
    bin: PathBuf,
    dir: tempfile::TempDir,
    options: Vec<(&'static str, String)>,
    netns: Option<Netns>,
}

impl Daemon {
    /// The built daemon, or `None` (with a loud skip) where it cannot run here.
    fn new(dev: &'static str, test: &str) -> Option<Self> {
        let bin = e2e::bin_path(&format!("vhost-device-{dev}"));
        let probe = Command::new(&bin)
            .arg("--print-capabilities")
            .output()
            .expect("run the daemon");
        if String::from_utf8_lossy(&probe.stderr).contains("not implemented yet") {
            skip(
                test,
                &format!("vhost-device-{dev} is still the placeholder binary"),
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let p = |name: &str| dir.path().join(name).display().to_string();
        let mut netns = None;
        let options = match dev {
            "blk" => {
                let image = dir.path().join("disk.raw");
                std::fs::File::create(&image)
                    .and_then(|f| f.set_len(DISK_BYTES))
                    .expect("create image");
                vec![("image", p("disk.raw"))]
            }
            "vsock" => vec![
                ("guest-cid", GUEST_CID.to_string()),
                ("uds-path", p("vm.vsock")),
            ],
            "console" => vec![("backend", format!("unix={}", p("console.sock")))],
            "net" => {
                netns = Some(Netns::create(test)?);
                let mac = MAC.map(|b| format!("{b:02x}")).join(":");
                vec![("tap", "svctap0".to_string()), ("mac", mac)]
            }
            other => panic!("unknown daemon {other}"),
        };
        Some(Daemon {
            dev,
            bin,
            dir,
            options,
            netns,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The options as command-line flags.
    fn flags(&self) -> Vec<String> {
        self.options
            .iter()
            .map(|(k, v)| format!("--{k}={v}"))
            .collect()
    }

    /// A command running `program args` (inside the namespace for net).
    fn command(&self, program: &Path, args: &[String]) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.0]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        cmd
    }

    /// What a frontend reads back must match the options.
    fn check_frontend(&self, socket: &Path, connect_timeout: Duration) {
        let options = Options {
            connect_timeout,
            ..Options::default()
        };
        let mut fe = Frontend::connect_without_queues(socket, &options)
            .unwrap_or_else(|e| panic!("vhost-device-{}: frontend set-up: {e}", self.dev));
        assert_ne!(fe.offered_features() & VIRTIO_F_VERSION_1, 0);
        match self.dev {
            "blk" => {
                let cfg = fe.get_config(0, 8).expect("config");
                let capacity = u64::from_le_bytes(cfg[..8].try_into().expect("8 bytes"));
                assert_eq!(capacity, DISK_BYTES / 512, "capacity in sectors");
            }
            "vsock" => {
                let cfg = fe.get_config(0, 8).expect("config");
                let cid = u64::from_le_bytes(cfg[..8].try_into().expect("8 bytes"));
                assert_eq!(cid, GUEST_CID);
            }
            "net" => {
                let cfg = fe.get_config(0, 6).expect("config");
                assert_eq!(cfg, MAC, "the MAC from the options");
            }
            "console" => {
                assert!(
                    wait_for_path(&self.path("console.sock"), T),
                    "the console's unix endpoint"
                );
            }
            _ => {}
        }
    }
}

/// The datagram socket a daemon's `sd_notify` messages arrive on.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        Notify {
            socket,
            path,
            seen: Vec::new(),
        }
    }

    /// Waits for a message with the line `line`; returns it.
    fn wait_for(&mut self, line: &str, daemon: &mut ChildGuard) -> String {
        let deadline = Instant::now() + T;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                self.seen.push(msg.clone());
                if msg.lines().any(|l| l == line) {
                    return msg;
                }
            }
            if let Some(status) = daemon.try_wait() {
                panic!(
                    "the daemon exited ({status}) before {line}; messages: {:?}",
                    self.seen
                );
            }
        }
        panic!("no {line} within {T:?}; messages: {:?}", self.seen);
    }

    /// Whether `line` arrived already or arrives within a short time.
    fn received(&mut self, line: &str) -> bool {
        let mut buf = [0u8; 4096];
        while let Ok(n) = self.socket.recv(&mut buf) {
            self.seen
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        self.seen.iter().any(|m| m.lines().any(|l| l == line))
    }
}

/// SIGTERM: `STOPPING=1` arrives and the daemon exits with status 0.
fn stop(mut daemon: ChildGuard, notify: &mut Notify) {
    daemon
        .signal(nix::sys::signal::Signal::SIGTERM)
        .expect("SIGTERM");
    let status = daemon.wait_timeout(T).expect("exit within 10 s of SIGTERM");
    assert!(status.success(), "clean exit on SIGTERM: {status}");
    assert!(
        notify.received("STOPPING=1"),
        "STOPPING=1; got {:?}",
        notify.seen
    );
}

fn socket_activate(dev: &'static str, test: &str) {
    socket_activate_with(dev, test, false);
}

/// A configuration naming the very socket systemd passes (one file for both ways of
/// running) takes systemd's socket instead of failing on a path in use.
#[test]
fn blk_socket_path_naming_the_activated_socket() {
    socket_activate_with(
        "blk",
        "systemd_activation::blk_socket_path_naming_the_activated_socket",
        true,
    );
}

fn socket_activate_with(dev: &'static str, test: &str, with_path: bool) {
    let Some(activate) = which("systemd-socket-activate") else {
        skip(
            test,
            "systemd-socket-activate is not installed (Debian package `systemd`)",
        );
        return;
    };
    let Some(d) = Daemon::new(dev, test) else {
        return;
    };
    let socket = d.path("vhost-user.sock");
    let mut notify = Notify::bind(d.dir.path());
    let mut args = vec![
        "-l".to_string(),
        socket.display().to_string(),
        format!("-ENOTIFY_SOCKET={}", notify.path.display()),
        "-ERUST_LOG=info".to_string(),
        d.bin.display().to_string(),
    ];
    args.extend(d.flags());
    if with_path {
        args.push(format!("--socket-path={}", socket.display()));
    }
    let mut daemon = ChildGuard::spawn(test, d.command(&activate, &args)).expect("spawn");
    assert!(wait_for_path(&socket, T), "systemd-socket-activate listens");
    // systemd-socket-activate starts the daemon on the first connection, as systemd does.
    d.check_frontend(&socket, T);
    let ready = notify.wait_for("READY=1", &mut daemon);
    assert!(
        ready.contains("socket from systemd"),
        "the daemon serves the socket systemd passed: {ready}"
    );
    stop(daemon, &mut notify);
}

/// A listening socket handed over as fd 3, with `LISTEN_FDS`/`LISTEN_PID` (systemd's
/// protocol) or `--fd 3` (libvirt's).
fn inherited(dev: &'static str, test: &str, systemd: bool) {
    let Some(d) = Daemon::new(dev, test) else {
        return;
    };
    let socket = d.path("vhost-user.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    let mut notify = Notify::bind(d.dir.path());
    // The shell moves the socket from stdin to fd 3 and, being replaced by the daemon
    // through exec, knows the daemon's PID for LISTEN_PID.
    let script = if systemd {
        "exec 3<&0 </dev/null; export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$@\""
    } else {
        "exec 3<&0 </dev/null; exec \"$@\" --fd 3"
    };
    let mut args = vec!["-c".to_string(), script.to_string(), "sh".to_string()];
    args.push(d.bin.display().to_string());
    args.extend(d.flags());
    let mut cmd = d.command(Path::new("/bin/sh"), &args);
    cmd.env("NOTIFY_SOCKET", &notify.path)
        .stdin(Stdio::from(OwnedFd::from(listener)));
    let mut daemon = ChildGuard::spawn(test, cmd).expect("spawn");
    let ready = notify.wait_for("READY=1", &mut daemon);
    let origin = if systemd {
        "socket from systemd"
    } else {
        "inherited fd 3"
    };
    assert!(ready.contains(origin), "{ready}");
    // Ready means serving: one connection attempt, no retries.
    d.check_frontend(&socket, Duration::ZERO);
    stop(daemon, &mut notify);
    assert!(
        socket.exists(),
        "a socket the daemon did not bind is not its to remove"
    );
}

/// `--socket-path`: READY=1 only once the socket accepts.
fn socket_path(dev: &'static str, test: &str) {
    let Some(d) = Daemon::new(dev, test) else {
        return;
    };
    let socket = d.path("vhost-user.sock");
    let mut notify = Notify::bind(d.dir.path());
    let mut args = vec![format!("--socket-path={}", socket.display())];
    args.extend(d.flags());
    let mut cmd = d.command(&d.bin, &args);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut daemon = ChildGuard::spawn(test, cmd).expect("spawn");
    notify.wait_for("READY=1", &mut daemon);
    d.check_frontend(&socket, Duration::ZERO);
    stop(daemon, &mut notify);
    assert!(!socket.exists(), "the daemon removes the socket it bound");
}

/// A configuration file alone (no flags but its path) runs the daemon.
fn config_file_alone(dev: &'static str, test: &str) {
    let Some(d) = Daemon::new(dev, test) else {
        return;
    };
    let socket = d.path("vhost-user.sock");
    let mut table = toml::Table::new();
    table.insert(
        "socket-path".into(),
        toml::Value::String(socket.display().to_string()),
    );
    for (k, v) in &d.options {
        let value = v
            .parse::<i64>()
            .map_or_else(|_| toml::Value::String(v.clone()), toml::Value::Integer);
        table.insert((*k).to_string(), value);
    }
    let file = d.path(&format!("{dev}.toml"));
    std::fs::write(&file, table.to_string()).expect("write config");
    let mut notify = Notify::bind(d.dir.path());
    let mut cmd = d.command(
        &d.bin,
        &["--config".to_string(), file.display().to_string()],
    );
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut daemon = ChildGuard::spawn(test, cmd).expect("spawn");
    notify.wait_for("READY=1", &mut daemon);
    d.check_frontend(&socket, Duration::ZERO);
    stop(daemon, &mut notify);

    // A typo in the file is one line naming the key and the file, and a failure.
    std::fs::write(&file, format!("{table}\nsoket-path = \"/x\"\n")).expect("write");
    let mut cmd = d.command(
        &d.bin,
        &["--config".to_string(), file.display().to_string()],
    );
    let out = cmd.stderr(Stdio::piped()).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}: {stderr}", out.status);
    assert!(
        stderr.contains("soket-path") && stderr.contains(&file.display().to_string()),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
}

/// `--print-capabilities`: one JSON object of QEMU's `VHostUserBackendCapabilities`.
fn print_capabilities(dev: &'static str, qemu_type: &str, test: &str) {
    let Some(d) = Daemon::new(dev, test) else {
        return;
    };
    let out = Command::new(&d.bin)
        .arg("--print-capabilities")
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    let obj = json.as_object().expect("a JSON object");
    let ty = obj.get("type").and_then(|t| t.as_str()).expect("a type");
    assert!(
        QEMU_TYPES.contains(&ty),
        "`{ty}` is not a VHostUserBackendType"
    );
    assert_eq!(ty, qemu_type);
    for key in obj.keys() {
        assert!(
            key == "type" || key == "features",
            "unknown member {key}: {stdout}"
        );
    }
    if let Some(features) = obj.get("features") {
        let allowed = qemu_features(ty);
        for f in features.as_array().expect("features is a list") {
            let f = f.as_str().expect("a feature name");
            assert!(
                allowed.contains(&f),
                "`{f}` is not a {ty} feature of QEMU's schema"
            );
        }
    }
}

/// Under the journal (`JOURNAL_STREAM` naming stderr): syslog priority prefixes, no
/// timestamps; `RUST_LOG` filters. On anything else: timestamps.
fn journal_logging(dev: &'static str, test: &str) {
    use std::os::unix::fs::MetadataExt;
    let Some(d) = Daemon::new(dev, test) else {
        return;
    };
    let run = |journal: bool, filter: &str| -> String {
        let log = d.path("stderr.log");
        let file = std::fs::File::create(&log).expect("log file");
        let meta = file.metadata().expect("stat");
        let socket = d.path("vhost-user.sock");
        let mut notify = Notify::bind(d.dir.path());
        let mut args = vec![format!("--socket-path={}", socket.display())];
        args.extend(d.flags());
        let mut cmd = d.command(&d.bin, &args);
        cmd.env("NOTIFY_SOCKET", &notify.path)
            .env("RUST_LOG", filter)
            .stderr(Stdio::from(file));
        if journal {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        let mut daemon = ChildGuard::spawn(test, cmd).expect("spawn");
        notify.wait_for("READY=1", &mut daemon);
        stop(daemon, &mut notify);
        std::fs::remove_file(&notify.path).expect("remove notify socket");
        std::fs::read_to_string(&log).expect("read log")
    };
    let journal = run(true, "info");
    assert!(!journal.is_empty(), "the daemon logs at info");
    for line in journal.lines() {
        let prio = line
            .strip_prefix('<')
            .and_then(|l| l.split_once('>'))
            .map(|(p, _)| p);
        assert!(
            matches!(prio, Some("3" | "4" | "6" | "7")),
            "a syslog priority prefix: {line:?}"
        );
        assert!(
            !line.contains("[20"),
            "no timestamp under the journal: {line:?}"
        );
    }
    assert!(
        journal.contains("<6>"),
        "info lines are priority 6: {journal}"
    );
    let quiet = run(true, "warn");
    assert!(
        !quiet.contains("<6>"),
        "RUST_LOG=warn drops info lines: {quiet}"
    );
    let terminal = run(false, "info");
    assert!(
        terminal.lines().all(|l| l.starts_with("[20")),
        "timestamps without the journal: {terminal}"
    );
}

/// Every key of the shipped example configuration, commented out or not, is an option of
/// the daemon (so uncommenting one never stops the service).
fn example_config_keys(dev: &'static str, test: &str) {
    let Some(d) = Daemon::new(dev, test) else {
        return;
    };
    let help = Command::new(&d.bin).arg("--help").output().expect("--help");
    let help = String::from_utf8_lossy(&help.stdout);
    let example = e2e::paths::workspace_root().join(format!("dist/config/{dev}.toml"));
    let text = std::fs::read_to_string(&example).expect("example config");
    let keys: Vec<&str> = text
        .lines()
        .map(|l| l.trim_start_matches('#').trim_start())
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '-'))
        .collect();
    assert!(keys.len() >= 2, "{}: {keys:?}", example.display());
    for key in keys {
        let flag = format!("--{key}");
        let found = help
            .match_indices(&flag)
            .any(|(i, m)| matches!(help[i + m.len()..].chars().next(), Some(' ' | '\n')));
        assert!(
            found,
            "{}: `{key}` is not an option of vhost-device-{dev}",
            example.display()
        );
    }
}

macro_rules! daemon_tests {
    ($($dev:ident => $qemu_type:literal),* $(,)?) => {
        $(
            mod $dev {
                #[test]
                fn systemd_socket_activate() {
                    super::socket_activate(stringify!($dev), concat!(stringify!($dev), "::systemd_socket_activate"));
                }
                #[test]
                fn listen_fds_by_hand() {
                    super::inherited(stringify!($dev), concat!(stringify!($dev), "::listen_fds_by_hand"), true);
                }
                #[test]
                fn inherited_fd() {
                    super::inherited(stringify!($dev), concat!(stringify!($dev), "::inherited_fd"), false);
                }
                #[test]
                fn socket_path_ready_means_listening() {
                    super::socket_path(stringify!($dev), concat!(stringify!($dev), "::socket_path_ready_means_listening"));
                }
                #[test]
                fn config_file_alone() {
                    super::config_file_alone(stringify!($dev), concat!(stringify!($dev), "::config_file_alone"));
                }
                #[test]
                fn journal_logging() {
                    super::journal_logging(stringify!($dev), concat!(stringify!($dev), "::journal_logging"));
                }
                #[test]
                fn example_config_keys() {
                    super::example_config_keys(stringify!($dev), concat!(stringify!($dev), "::example_config_keys"));
                }
                #[test]
                fn syscall_filter() {
                    super::syscall_filter(stringify!($dev), concat!(stringify!($dev), "::syscall_filter"));
                }
                #[test]
                fn print_capabilities() {
                    super::print_capabilities(stringify!($dev), $qemu_type, concat!(stringify!($dev), "::print_capabilities"));
                }
            }
        )*
    };
}

daemon_tests! {
    blk => "block",
    net => "net",
    vsock => "vsock",
    console => "console",
}

/// QEMU as the frontend of a socket-activated daemon configured by its file alone: the guest
/// reads what the file configured and writes through, and the daemon reported readiness.
#[test]
fn blk_qemu_guest_through_socket_activation() {
    let test = "systemd_activation::blk_qemu_guest_through_socket_activation";
    let Some(activate) = which("systemd-socket-activate") else {
        skip(
            test,
            "systemd-socket-activate is not installed (Debian package `systemd`)",
        );
        return;
    };
    let Some(qemu) = e2e::qemu_or_skip(test) else {
        return;
    };
    let Some(d) = Daemon::new("blk", test) else {
        return;
    };
    let image = d.path("disk.raw");
    let head: Vec<u8> = (0u8..16)
        .map(|i| i.wrapping_mul(17).wrapping_add(3))
        .collect();
    let mut bytes = vec![0u8; usize::try_from(DISK_BYTES).expect("size")];
    bytes[..16].copy_from_slice(&head);
    std::fs::write(&image, &bytes).expect("image");
    let config = d.path("vm1.toml");
    std::fs::write(
        &config,
        format!("image = \"{}\"\nserial = \"svc-vm1\"\n", image.display()),
    )
    .expect("config");
    let socket = d.path("vhost-user.sock");
    let mut notify = Notify::bind(d.dir.path());
    let args = vec![
        "-l".to_string(),
        socket.display().to_string(),
        format!("-ENOTIFY_SOCKET={}", notify.path.display()),
        d.bin.display().to_string(),
        "--config".to_string(),
        config.display().to_string(),
    ];
    let mut daemon = ChildGuard::spawn(test, d.command(&activate, &args)).expect("spawn");
    assert!(wait_for_path(&socket, T), "systemd-socket-activate listens");
    let cmd = r#"
echo size=$(cat /sys/block/vda/size)
echo serial=$(cat /sys/block/vda/serial)
echo head=$(head -c 16 /dev/vda | od -An -tx1 | tr -d ' \n')
printf 'written-by-guest' | dd of=/dev/vda bs=512 seek=8 count=1 conv=sync,fsync 2>/dev/null
sync
echo wrote=ok
"#;
    let run = e2e::GuestSpec::new(cmd)
        .device(e2e::Device::blk(&socket))
        .timeout(Duration::from_secs(180))
        .run(&qemu)
        .expect("guest run");
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    let hex: String = head.iter().map(|b| format!("{b:02x}")).collect();
    for want in [
        format!("size={}", DISK_BYTES / 512),
        "serial=svc-vm1".to_string(),
        format!("head={hex}"),
        "wrote=ok".to_string(),
    ] {
        assert!(
            run.output.lines().any(|l| l.trim() == want),
            "{want}\n{}",
            run.output
        );
    }
    let ready = notify.wait_for("READY=1", &mut daemon);
    assert!(ready.contains("socket from systemd"), "{ready}");
    stop(daemon, &mut notify);
    let on_disk = std::fs::read(&image).expect("image");
    assert_eq!(&on_disk[4096..4112], b"written-by-guest");
    assert!(on_disk[4112..4608].iter().all(|b| *b == 0));
}

/// Every system call named by a `systemd-analyze syscall-filter` group, groups expanded.
fn syscall_group(analyze: &Path, group: &str, out: &mut std::collections::BTreeSet<String>) {
    let listing = Command::new(analyze)
        .args(["syscall-filter", "--no-pager", group])
        .output()
        .expect("systemd-analyze syscall-filter");
    for line in String::from_utf8_lossy(&listing.stdout).lines().skip(1) {
        let name = line.trim();
        if name.is_empty() || name.starts_with('#') {
            continue;
        }
        if name.starts_with('@') {
            syscall_group(analyze, name, out);
        } else {
            out.insert(name.to_string());
        }
    }
}

/// The units' `SystemCallFilter=@system-service ~@privileged seccomp` allows every system
/// call the daemon makes from exec to exit (with a frontend connected), traced with strace: a call
/// outside the filter would fail with EPERM under systemd.
fn syscall_filter(dev: &'static str, test: &str) {
    let (Some(analyze), Some(strace)) = (which("systemd-analyze"), which("strace")) else {
        skip(test, "systemd-analyze or strace is not installed");
        return;
    };
    let Some(d) = Daemon::new(dev, test) else {
        return;
    };
    // The unit's SystemCallFilter= lines in order: an allow-list, `~` lines remove from it,
    // later plain lines add to it (`seccomp`, for the daemon's own filter).
    let unit = std::fs::read_to_string(
        e2e::paths::workspace_root().join(format!("dist/systemd/vhost-device-{dev}@.service")),
    )
    .expect("unit");
    let mut allowed = std::collections::BTreeSet::new();
    for value in unit
        .lines()
        .filter_map(|l| l.trim().strip_prefix("SystemCallFilter="))
    {
        let (deny, names) = match value.strip_prefix('~') {
            Some(names) => (true, names),
            None => (false, value),
        };
        let mut set = std::collections::BTreeSet::new();
        for name in names.split_whitespace() {
            if name.starts_with('@') {
                syscall_group(&analyze, name, &mut set);
            } else {
                set.insert(name.to_string());
            }
        }
        if deny {
            allowed.retain(|s| !set.contains(s));
        } else {
            allowed.extend(set);
        }
    }
    assert!(allowed.contains("io_uring_setup") && allowed.contains("epoll_wait"));
    assert!(!allowed.contains("setuid"), "@privileged stays out");

    let socket = d.path("vhost-user.sock");
    let trace = d.path("strace.log");
    let mut notify = Notify::bind(d.dir.path());
    let mut args = vec![
        "-f".to_string(),
        "-qq".to_string(),
        "-o".to_string(),
        trace.display().to_string(),
        d.bin.display().to_string(),
        format!("--socket-path={}", socket.display()),
    ];
    args.extend(d.flags());
    let mut cmd = d.command(&strace, &args);
    cmd.env("NOTIFY_SOCKET", &notify.path);
    let mut tracer = ChildGuard::spawn(test, cmd).expect("spawn strace");
    notify.wait_for("READY=1", &mut tracer);
    d.check_frontend(&socket, Duration::ZERO);
    // The daemon is strace's child: stop it by its PID, then strace ends with it.
    let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", tracer.pid()))
        .expect("strace's children");
    let daemon_pid: i32 = children
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("the traced daemon");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon_pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM the daemon");
    let status = tracer.wait_timeout(T).expect("exit within 10 s");
    assert!(status.success(), "clean exit under strace: {status}");
    assert!(notify.received("STOPPING=1"));

    let log = std::fs::read_to_string(&trace).expect("trace");
    let used: std::collections::BTreeSet<&str> = log
        .lines()
        .filter_map(|l| {
            let call = l.split_once(' ')?.1.trim_start();
            let name = call.split_once('(')?.0;
            (!name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then_some(name)
        })
        .collect();
    assert!(used.contains("execve") && used.len() > 20, "{used:?}");
    let refused: Vec<&&str> = used.iter().filter(|s| !allowed.contains(**s)).collect();
    assert!(
        refused.is_empty(),
        "vhost-device-{dev} calls {refused:?}, outside @system-service minus @privileged"
    );
}
