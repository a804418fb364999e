//! `cargo xtask bench net`: vhost-device-net against QEMU's built-in virtio-net on a tap
//! (`-netdev tap,vhost=off`; these machines have no `/dev/vhost-net`), same guest, same
//! network namespace set-up, same iperf3 runs, one after the other in one invocation.
//!
//! For each subject a fresh namespace `vdn-bench-<pid>-<n>` holds the tap (10.79.0.1/24)
//! and the iperf3 server; QEMU itself runs inside it (`ip netns exec`) so that its built-in
//! tap can be opened by name there. Nothing touches the root namespace. The guest
//! (10.79.0.2) runs, each for `--seconds` (default 10, `--quick` 4):
//! - TCP guest to host and host to guest (`iperf3 -c`, `-R`), Mbit/s at the receiver;
//! - small-packet UDP each way (`-u -b 0 -l 64`), packets per second that arrived.
//!
//! KVM where a real boot works, TCG otherwise. Under TCG both use INTx (`vectors=0`): QEMU
//! 7.2 crashes starting a vhost-user virtio-net with MSI-X there (see tests/src/qemu.rs), so
//! the baseline is run the same way. Compare the two columns, not absolute figures.
//! Each round runs both subjects, in alternating order; the table shows medians.
//! Options: `--quick` (4 s, one round), `--seconds N`, `--rounds N` (default 3),
//! `--cpus N` (guest vCPUs, default 1).
//!
//! `--nested` runs both subjects under KVM instead, where this machine's KVM cannot run a
//! stock kernel: inside one L2 guest (QEMU TCG with nested SVM, `--l2-cpus N`, default 2)
//! that holds the namespace, the tap, the iperf3 server, the daemon and QEMU, which boots
//! the same test guest with `-accel kvm` (MSI-X for both: the TCG crash does not apply).
//! Kicks then reach the daemon through KVM's ioeventfd and its interrupts go back through
//! irqfd, as on hardware, while the built-in device is served by QEMU's main loop. The
//! whole L2 is emulated, so absolute figures are small; compare the columns.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::guest::{compose_initrd, watch_vm, GuestSpec, Watch, GUEST_TAG};
use e2e::{paths, ChildGuard};

type Result<T> = std::result::Result<T, String>;

const HOST: &str = "10.79.0.1";
const GUEST: &str = "10.79.0.2";
const TAP: &str = "vdnbench0";
const MAC: &str = "52:54:00:be:e0:01";
const TESTS: [(&str, &str); 4] = [
    ("tcp_tx", "TCP guest->host"),
    ("tcp_rx", "TCP host->guest"),
    ("udp_tx", "UDP 64 B guest->host"),
    ("udp_rx", "UDP 64 B host->guest"),
];

/// A test network namespace, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(n: usize) -> Result<Self> {
        let name = format!("vdn-bench-{}-{n}", std::process::id());
        sh(&format!("ip netns add {name}"))?;
        let ns = Netns(name);
        ns.sh("ip link set lo up; sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1")?;
        Ok(ns)
    }

    fn sh(&self, script: &str) -> Result<String> {
        sh(&format!("ip netns exec {} sh -c '{script}'", self.0))
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.0]).arg(program);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

fn sh(script: &str) -> Result<String> {
    let out = Command::new("/bin/sh")
        .args(["-c", script])
        .output()
        .map_err(|e| format!("cannot run /bin/sh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{script}` failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subject {
    Ours,
    QemuTap,
}

impl Subject {
    fn name(self) -> &'static str {
        match self {
            Subject::Ours => "vhost-device-net",
            Subject::QemuTap => "QEMU virtio-net + tap (vhost=off)",
        }
    }
}

/// One subject's figures, by test name; `None` where iperf3 printed no receiver line.
#[derive(Debug, Default)]
struct Figures {
    values: Vec<(&'static str, Option<f64>)>,
    /// The guest's virtio interrupts during each test (a diagnostic: an emulated guest
    /// pays for every one).
    irqs: Vec<(&'static str, Option<u64>)>,
    daemon_cpu_s: Option<f64>,
}

/// Entry point for `cargo xtask bench net [options]`.
pub fn run(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let number = |flag: &str, default: u64| -> Result<u64> {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map(|v| v.parse().map_err(|_| format!("{flag} {v}: not a number")))
            .transpose()
            .map(|v| v.unwrap_or(default))
    };
    let seconds = number("--seconds", if quick { 4 } else { 10 })?;
    let cpus = number("--cpus", 1)?;
    let rounds = number("--rounds", if quick { 1 } else { 3 })?.max(1);
    if args.iter().any(|a| a == "--nested") {
        let l2_cpus = u8::try_from(number("--l2-cpus", 2)?.clamp(1, 8)).unwrap_or(2);
        return run_nested(seconds, rounds, l2_cpus);
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("bench net creates network namespaces and taps: run it as root".into());
    }
    for tool in ["qemu-system-x86_64", "iperf3", "ip"] {
        if crate::util::which(tool).is_none() {
            return Err(format!("{tool} is not installed (cargo xtask deps)"));
        }
    }
    if !paths::kernel().exists() || !paths::initrd().exists() {
        return Err("no guest image: run `cargo xtask guest` first".into());
    }
    let daemon = build_daemon()?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let initrd = work.path().join("initrd.gz");
    let spec = GuestSpec::new(&guest_script(seconds));
    let extra = spec.archive().map_err(|e| e.to_string())?;
    compose_initrd(&paths::initrd(), &[&extra], &initrd).map_err(|e| e.to_string())?;

    // KVM where a real boot shows it works (probed once and cached by the test harness),
    // TCG otherwise; decided before taking the guest lock, which the probe takes too.
    let qemu_bin = crate::util::which("qemu-system-x86_64").ok_or("no qemu-system-x86_64")?;
    let kvm = e2e::qemu::Qemu::new(qemu_bin)
        .map(|q| q.accel() == e2e::qemu::Accel::Kvm)
        .unwrap_or(false);
    // One emulated guest at a time on this machine, also against concurrent test runs.
    let _lock = e2e::qemu::lock_guests().map_err(|e| format!("guest lock: {e}"))?;
    let mut results = Vec::new();
    let mut n = 0;
    for round in 1..=rounds {
        // Alternate the order so a drift in machine load does not favour one subject.
        let order = if round % 2 == 1 {
            [Subject::Ours, Subject::QemuTap]
        } else {
            [Subject::QemuTap, Subject::Ours]
        };
        for subject in order {
            crate::util::step(&format!(
                "bench net: round {round}/{rounds}: {} ({seconds} s per test)",
                subject.name()
            ));
            let figures = measure(
                subject,
                n,
                &daemon,
                &initrd,
                work.path(),
                seconds,
                cpus,
                kvm,
            )?;
            n += 1;
            results.push((subject, figures));
        }
    }
    print_table(
        &results,
        seconds,
        cpus,
        rounds,
        if kvm { "KVM" } else { "TCG" },
    );
    Ok(())
}

/// The guest's device options: the same MAC for both subjects, and no option ROM (the
/// guest boots with `-kernel`; the nested L2 has no `efi-virtio.rom`).
fn nic(vectors: &str) -> String {
    format!("-device virtio-net-pci,netdev=n0,mac={MAC},romfile={vectors}")
}

/// The L2 script of `--nested`: one namespace with the iperf3 server; per round and subject
/// (alternating which goes first) the tap (ours creates it, QEMU's built-in device opens
/// one made for it), QEMU with KVM booting the test guest, and the guest's `BENCH-` lines
/// after a `BENCH-RUN <subject>` line, with the daemon's CPU ticks.
fn nested_script(rounds: u64, ip: &Path, limit: u64) -> String {
    let qemu = crate::bench_boot::qemu_l3("q35", "1024M", "$netdev");
    let nic = nic("");
    // iproute2's `ip` by its full path (the image has it there): busybox's shell would run
    // its own `ip` applet first, which has neither `netns` nor `tuntap`.
    let ip = ip.display();
    format!(
        r#"mkdir -p /run/netns /var/run 2>/dev/null; [ -e /var/run/netns ] || ln -s /run/netns /var/run/netns 2>/dev/null
err=$({ip} netns add b 2>&1) || {{ echo "BENCH-FAIL: L2 cannot make a network namespace: $err"; exit 1; }}
{ip} -n b link set lo up
{ip} netns exec b iperf3 -s -p 5201 -D
run() {{
  name=$1
  rm -f /tmp/net.sock /tmp/out /tmp/daemon.log
  d=""
  if [ "$name" = ours ]; then
    {ip} netns exec b /usr/bin/vhost-device-net --socket-path /tmp/net.sock --tap {TAP} --ip {HOST}/24 --mac {MAC} > /tmp/daemon.log 2>&1 &
    d=$!
    n=0; while [ ! -S /tmp/net.sock ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
    netdev="-chardev socket,id=c0,path=/tmp/net.sock -netdev vhost-user,id=n0,chardev=c0"
  else
    {ip} netns exec b sh -c "{ip} tuntap add {TAP} mode tap vnet_hdr && {ip} addr add {HOST}/24 dev {TAP} && {ip} link set {TAP} up"
    netdev="-netdev tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"
  fi
  timeout -s KILL {limit} {ip} netns exec b sh -c "exec {qemu} {nic}" > /tmp/out 2>/tmp/err
  rc=$?
  echo "BENCH-RUN $name"
  if [ -n "$d" ]; then
    echo "BENCH-CPU-TICKS $(cut -d' ' -f14,15 /proc/$d/stat)"
    kill -TERM $d; wait $d
  fi
  {ip} -n b link del {TAP} 2>/dev/null
  tr -d '\r' < /tmp/out | grep -E '^BENCH-|receiver|error'
  grep -q '@@E2E-END:g rc=0@@' /tmp/out || {{
    echo "failed run of $name (QEMU exit status $rc):"; tr -d '\r' < /tmp/out | tail -20
    echo "QEMU stderr:"; tail -5 /tmp/err; [ -f /tmp/daemon.log ] && tail -5 /tmp/daemon.log
  }}
}}
i=0
while [ $i -lt {rounds} ]; do
  if [ $((i % 2)) -eq 0 ]; then run ours; run qemu; else run qemu; run ours; fi
  i=$((i+1))
done
echo BENCH-RUN end
"#
    )
}

/// `--nested`: both subjects under KVM inside one L2 guest (see the module doc).
fn run_nested(seconds: u64, rounds: u64, l2_cpus: u8) -> Result<()> {
    crate::deps::ensure_packages()?;
    crate::guest::build()?;
    let release = crate::bench_boot::build_release(&["vhost-device-net"])?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut l3_initrd =
        std::fs::read(paths::initrd()).map_err(|e| format!("cannot read the guest: {e}"))?;
    l3_initrd.extend(
        GuestSpec::new(&guest_script(seconds))
            .archive()
            .map_err(|e| e.to_string())?,
    );
    let per_boot = 90 + TESTS.len() as u64 * (seconds + 20);
    let ip = crate::util::which("ip").ok_or("iproute2's ip is not installed (cargo xtask deps)")?;
    let (spec, version) = crate::bench_boot::l2_spec(
        &nested_script(rounds, &ip, per_boot),
        Duration::from_secs(2 * rounds * per_boot + 120),
        &[release.join("vhost-device-net")],
        &l3_initrd,
        work.path(),
    )?;
    crate::util::step(&format!(
        "bench net --nested: {rounds} round(s) of both subjects under KVM in one L2 guest \
         ({l2_cpus} vCPU, QEMU TCG), {seconds} s per test"
    ));
    let out = e2e::nested::run_l2_spec(&spec.cpus(l2_cpus)).map_err(|e| e.to_string())?;
    if let Some(line) = out.output.lines().find(|l| l.contains("BENCH-FAIL")) {
        return Err(line.trim().to_string());
    }
    let mut results = Vec::new();
    for section in out.output.split("BENCH-RUN ").skip(1) {
        let subject = match section.split_whitespace().next() {
            Some("ours") => Subject::Ours,
            Some("qemu") => Subject::QemuTap,
            _ => continue,
        };
        if let Some(at) = section.find("failed run of") {
            eprintln!("{}", &section[at..]);
        }
        let mut figures = parse_figures(section, seconds, subject);
        figures.daemon_cpu_s = section
            .split("BENCH-CPU-TICKS ")
            .nth(1)
            .and_then(|t| {
                let mut it = t.split_whitespace().map(str::parse::<f64>);
                Some(it.next()?.ok()? + it.next()?.ok()?)
            })
            // USER_HZ is 100 (see cpu_seconds).
            .map(|ticks| ticks / 100.0);
        report(subject, &figures);
        results.push((subject, figures));
    }
    if results
        .iter()
        .all(|(_, f)| f.values.iter().all(|(_, v)| v.is_none()))
    {
        return Err(format!(
            "no run produced a figure; L2 printed:\n{}",
            out.output
        ));
    }
    print_table(
        &results,
        seconds,
        1,
        rounds,
        &format!("KVM nested in QEMU TCG (L2 {l2_cpus} vCPU, MSI-X); {version}"),
    );
    Ok(())
}

fn build_daemon() -> Result<PathBuf> {
    crate::util::run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "-p", "vhost-device-net"])
            .current_dir(paths::workspace_root()),
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::workspace_root().join("target"));
    let bin = target.join("release").join("vhost-device-net");
    if bin.exists() {
        Ok(bin)
    } else {
        Err(format!("{} was not built", bin.display()))
    }
}

fn guest_script(seconds: u64) -> String {
    let mut s = format!(
        "ip link set eth0 up\nip addr add {GUEST}/24 dev eth0\n\
         i=0; until ping -c1 -W1 {HOST} >/dev/null 2>&1 || [ $i -ge 30 ]; do i=$((i+1)); done\n\
         echo BENCH-PING-TRIES=$i\n\
         irqs() {{ awk '/virtio/ {{ for (i = 2; i <= NF; i++) {{ if ($i ~ /^[0-9]+$/) s += $i; else break }} }} END {{ print s + 0 }}' /proc/interrupts; }}\n"
    );
    let runs = [
        ("tcp_tx", ""),
        ("tcp_rx", "-R"),
        ("udp_tx", "-u -b 0 -l 64"),
        ("udp_rx", "-u -b 0 -l 64 -R"),
    ];
    for (name, flags) in runs {
        s.push_str(&format!(
            "echo BENCH-{name}; i0=$(irqs); timeout -s KILL {limit} iperf3 -c {HOST} -p 5201 -t {seconds} -f m {flags} 2>&1 | grep -E 'receiver|error'; echo BENCH-IRQS-{name}=$(( $(irqs) - i0 ))\n",
            limit = seconds + 30
        ));
    }
    s.push_str("echo BENCH-END\n");
    s
}

#[allow(clippy::too_many_arguments)]
fn measure(
    subject: Subject,
    n: usize,
    daemon: &Path,
    initrd: &Path,
    work: &Path,
    seconds: u64,
    cpus: u64,
    kvm: bool,
) -> Result<Figures> {
    let ns = Netns::new(n)?;
    // INTx under TCG, where QEMU 7.2 crashes starting a vhost-user virtio-net with MSI-X.
    let vectors = if kvm { "" } else { ",vectors=0" };
    let mut guards = Vec::new();
    let socket = work.join(format!("net{n}.sock"));
    let netdev: Vec<String> = match subject {
        Subject::Ours => {
            let mut cmd = ns.command(daemon);
            cmd.arg("--socket-path").arg(&socket).args([
                "--tap",
                TAP,
                "--ip",
                &format!("{HOST}/24"),
                "--mac",
                MAC,
            ]);
            let log = std::fs::File::create(work.join(format!("daemon{n}.log")))
                .map_err(|e| format!("daemon log: {e}"))?;
            cmd.env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(log);
            let mut guard =
                ChildGuard::spawn("vhost-device-net", cmd).map_err(|e| e.to_string())?;
            let deadline = Instant::now() + Duration::from_secs(10);
            while !socket.exists() {
                if guard.try_wait().is_some() || Instant::now() > deadline {
                    return Err("vhost-device-net did not start".into());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            guards.push(guard);
            vec![
                "-chardev".into(),
                format!("socket,id=c0,path={}", socket.display()),
                "-netdev".into(),
                "vhost-user,id=n0,chardev=c0".into(),
                "-device".into(),
                format!("virtio-net-pci,netdev=n0,mac={MAC}{vectors}"),
            ]
        }
        Subject::QemuTap => {
            ns.sh(&format!(
                "ip tuntap add {TAP} mode tap vnet_hdr && ip addr add {HOST}/24 dev {TAP} && ip link set {TAP} up"
            ))?;
            vec![
                "-netdev".into(),
                format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
                "-device".into(),
                format!("virtio-net-pci,netdev=n0,mac={MAC}{vectors}"),
            ]
        }
    };
    guards.push(
        ChildGuard::spawn_shell_group(
            "iperf3",
            &format!("ip netns exec {} iperf3 -s -p 5201 >/dev/null 2>&1", ns.0),
        )
        .map_err(|e| e.to_string())?,
    );
    std::thread::sleep(Duration::from_millis(300));

    let qemu = crate::util::which("qemu-system-x86_64").ok_or("no qemu-system-x86_64")?;
    let mut cmd = ns.command(&qemu);
    cmd.args(["-machine", "q35,memory-backend=mem"]);
    if kvm {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    cmd.args(["-smp", &cpus.to_string(), "-m", "1024M"]);
    cmd.args(["-object", "memory-backend-memfd,id=mem,size=1024M,share=on"]);
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
    ]);
    cmd.args(["-monitor", "none", "-no-reboot"]);
    cmd.arg("-kernel")
        .arg(paths::kernel())
        .arg("-initrd")
        .arg(initrd);
    cmd.args([
        "-append",
        &format!("console=ttyS0 quiet panic=-1 e2e.tag={GUEST_TAG}"),
    ]);
    cmd.args(&netdev);
    let watch = Watch {
        launcher: format!("QEMU ({})", subject.name()),
        tag: GUEST_TAG.to_string(),
        boot_timeout: Duration::from_secs(60),
        command_timeout: Duration::from_secs(60 + 8 * seconds),
        echo: std::env::var_os("E2E_VERBOSE").is_some(),
    };
    let watched = watch_vm(cmd, &watch).map_err(|e| {
        let log = std::fs::read_to_string(work.join(format!("daemon{n}.log"))).unwrap_or_default();
        let link = ns
            .sh(&format!("ip -s link show {TAP}"))
            .unwrap_or_else(|e| e);
        format!("{e}\n--- vhost-device-net log ---\n{log}\n--- tap ---\n{link}")
    })?;
    let mut figures = parse_figures(&watched.output, seconds, subject);
    if subject == Subject::Ours {
        figures.daemon_cpu_s = guards.first().and_then(|g| cpu_seconds(g.pid()));
    }
    report(subject, &figures);
    drop(guards);
    Ok(figures)
}

/// A subject's figures from the guest's output (its `BENCH-` sections).
fn parse_figures(output: &str, seconds: u64, subject: Subject) -> Figures {
    let mut figures = Figures::default();
    for (name, _) in TESTS {
        let section = output
            .split(&format!("BENCH-{name}"))
            .nth(1)
            .and_then(|s| s.split("BENCH-").next())
            .unwrap_or("");
        let value = if name.starts_with("tcp") {
            mbits(section)
        } else {
            packets_per_second(section, seconds)
        };
        if value.is_none() {
            eprintln!(
                "bench net: {}: no figure for {name}: {}",
                subject.name(),
                section.trim()
            );
        }
        figures.values.push((name, value));
        let irqs = output
            .split(&format!("BENCH-IRQS-{name}="))
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|v| v.parse().ok());
        figures.irqs.push((name, irqs));
    }
    figures
}

/// Prints one subject run's figures.
fn report(subject: Subject, figures: &Figures) {
    eprintln!(
        "bench net: {}: {}",
        subject.name(),
        figures
            .values
            .iter()
            .zip(&figures.irqs)
            .map(|((name, v), (_, i))| format!(
                "{name} {} ({} guest interrupts)",
                v.map_or_else(|| "failed".into(), |v| format!("{v:.0}")),
                i.map_or_else(|| "?".into(), |i| i.to_string())
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// The receiver's Mbit/s from iperf3 `-f m` output.
fn mbits(section: &str) -> Option<f64> {
    let line = section.lines().find(|l| l.contains("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

/// Datagrams that arrived per second, from iperf3's UDP receiver line (`lost/total`).
fn packets_per_second(section: &str, seconds: u64) -> Option<f64> {
    let line = section.lines().find(|l| l.contains("receiver"))?;
    let pair = line.split_whitespace().find(|w| {
        w.contains('/')
            && w.split('/')
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
    })?;
    let (lost, total) = pair.split_once('/')?;
    let lost: f64 = lost.parse().ok()?;
    let total: f64 = total.parse().ok()?;
    #[allow(clippy::cast_precision_loss)]
    let secs = seconds as f64;
    Some((total - lost) / secs)
}

/// User plus system CPU seconds of a process, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ, the unit of /proc times, is 100 on every Linux architecture we build for.
    Some((utime + stime) / 100.0)
}

/// The median of a subject's figure for `name` over the rounds that produced one.
fn median(results: &[(Subject, Figures)], subject: Subject, name: &str) -> Option<f64> {
    let values: Vec<f64> = results
        .iter()
        .filter(|(s, _)| *s == subject)
        .filter_map(|(_, f)| {
            f.values
                .iter()
                .find(|(n, _)| *n == name)
                .and_then(|(_, v)| *v)
        })
        .collect();
    crate::util::median(values)
}

fn print_table(results: &[(Subject, Figures)], seconds: u64, cpus: u64, rounds: u64, accel: &str) {
    println!();
    println!(
        "vhost-device-net vs QEMU built-in virtio-net (tap, vhost=off); guest {cpus} vCPU, {accel}, \
         {seconds} s per test, median of {rounds} round(s)"
    );
    println!(
        "{:<24} {:>18} {:>18} {:>8}",
        "test", "vhost-device-net", "QEMU tap", "ratio"
    );
    for (name, label) in TESTS {
        let (a, b) = (
            median(results, Subject::Ours, name),
            median(results, Subject::QemuTap, name),
        );
        let unit = if name.starts_with("tcp") {
            "Mbit/s"
        } else {
            "pkt/s"
        };
        let fmt =
            |v: Option<f64>| v.map_or_else(|| "failed".to_string(), |v| format!("{v:.0} {unit}"));
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!("{label:<24} {:>18} {:>18} {ratio:>8}", fmt(a), fmt(b));
    }
    let cpu: f64 = results
        .iter()
        .filter_map(|(s, f)| {
            if *s == Subject::Ours {
                f.daemon_cpu_s
            } else {
                None
            }
        })
        .sum();
    println!("vhost-device-net CPU time, all rounds: {cpu:.1} s");
}
