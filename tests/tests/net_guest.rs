//! vhost-device-net under QEMU (`-netdev vhost-user`, TCG here) with a real Linux guest:
//! the daemon and its tap live in a test network namespace, the guest's own virtio-net
//! driver does the I/O, and the host end of every transfer runs in the namespace.

mod net_common;

use std::time::Duration;

use e2e::{qemu_or_skip, GuestSpec};
use net_common::{netns_or_skip, Daemon, Netns, GUEST_MAC_STR};

const HOST: &str = "10.78.0.1";
const GUEST: &str = "10.78.0.2";

fn daemon(ns: &Netns, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "--tap",
        "vdn0",
        "--ip",
        "10.78.0.1/24",
        "--mac",
        GUEST_MAC_STR,
    ];
    args.extend_from_slice(extra);
    Daemon::start(ns, &args)
}

/// The host's ping: iputils `ping` where installed, else busybox's.
fn host_ping() -> &'static str {
    if e2e::qemu::which("ping").is_some() {
        "ping"
    } else {
        "busybox ping"
    }
}

/// A host background job in the namespace that pings the guest once it answers, and
/// writes the result to `out`.
fn ping_guest_when_up(ns: &Netns, size: u32, out: &std::path::Path) -> String {
    format!(
        "{p} sh -c 'i=0; until {ping} -c1 -W1 {GUEST} >/dev/null 2>&1 || [ $i -ge 240 ]; do \
         i=$((i+1)); sleep 0.5; done; {ping} -c 3 -W 5 -s {size} {GUEST}' > {out} 2>&1",
        p = ns.prefix(),
        out = out.display(),
        ping = host_ping()
    )
}

/// Mbit/s from iperf3's `-f m` receiver summary line.
fn iperf_receiver_mbits(section: &str) -> Option<f64> {
    let line = section.lines().find(|l| l.contains("receiver"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "Mbits/sec")?;
    words.get(at.checked_sub(1)?)?.parse().ok()
}

fn value<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

#[test]
fn guest_pings_transfers_256_mib_and_runs_iperf3_both_ways() {
    let test = "net_guest::ping_transfer_iperf3";
    let Some(qemu) = qemu_or_skip(test) else {
        return;
    };
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    let d = daemon(&ns, &[]);
    let dir = tempfile::tempdir().expect("tempdir");
    let blob = dir.path().join("blob");
    let p = ns.prefix();
    let dirp = dir.path().display();
    let sum = e2e::qemu::host_shell(&format!(
        "head -c 268435456 /dev/urandom > {b} && sha256sum {b} | cut -d' ' -f1",
        b = blob.display()
    ))
    .expect("make the 256 MiB blob");
    let sum = sum.trim().to_string();

    let guest = format!(
        "set -e
ip link set eth0 up
ip addr add {GUEST}/24 dev eth0
ping -c 3 -W 5 {HOST}
echo PING-OK
echo DOWN-SUM=$(socat -u TCP:{HOST}:5000 - | sha256sum | cut -d' ' -f1)
head -c 67108864 /dev/urandom > /tmp/up
echo UP-SUM=$(sha256sum /tmp/up | cut -d' ' -f1)
socat -u OPEN:/tmp/up TCP:{HOST}:5001
echo IPERF-TX
iperf3 -c {HOST} -p 5201 -t 5 -f m | tail -4
echo IPERF-RX
iperf3 -c {HOST} -p 5201 -t 5 -f m -R | tail -4
echo IPERF-END
sleep 3
"
    );
    let run = GuestSpec::new(&guest)
        .device(e2e::Device::net(&d.socket).mac(GUEST_MAC_STR))
        .memory_mib(1024)
        .host_background(&format!(
            "{p}socat -u OPEN:{} TCP-LISTEN:5000,reuseaddr",
            blob.display()
        ))
        .host_background(&format!(
            "{p}socat -u TCP-LISTEN:5001,reuseaddr - | sha256sum | cut -d' ' -f1 > {dirp}/up.sum"
        ))
        .host_background(&format!("{p}iperf3 -s -p 5201"))
        .host_background(&ping_guest_when_up(&ns, 56, &dir.path().join("ping.txt")))
        .host_check(&format!(
            "cat {dirp}/ping.txt; echo HOST-UP-SUM=$(cat {dirp}/up.sum)"
        ))
        .timeout(Duration::from_secs(420))
        .run(&qemu)
        .expect("guest run");
    let log = d.stop();
    let out = &run.output;
    assert_eq!(
        run.exit_code,
        Some(0),
        "{}\n--- daemon ---\n{log}",
        run.console
    );
    assert!(
        out.contains("PING-OK") && out.contains("3 packets received"),
        "{out}"
    );
    assert_eq!(
        value(out, "DOWN-SUM="),
        Some(sum.as_str()),
        "host to guest, 256 MiB\n{out}"
    );
    let up = value(out, "UP-SUM=").expect("guest sum");
    assert_eq!(
        value(&run.host_output, "HOST-UP-SUM="),
        Some(up),
        "guest to host, 64 MiB\n{}",
        run.host_output
    );
    assert!(
        run.host_output.contains("3 packets received"),
        "host pings the guest:\n{}",
        run.host_output
    );
    let tx = out
        .split("IPERF-TX")
        .nth(1)
        .and_then(|s| s.split("IPERF-RX").next())
        .unwrap_or("");
    let rx = out
        .split("IPERF-RX")
        .nth(1)
        .and_then(|s| s.split("IPERF-END").next())
        .unwrap_or("");
    let tx_mbits = iperf_receiver_mbits(tx).unwrap_or(0.0);
    let rx_mbits = iperf_receiver_mbits(rx).unwrap_or(0.0);
    assert!(tx_mbits > 0.0 && rx_mbits > 0.0, "iperf3 both ways:\n{out}");
    e2e::guest::say(&format!(
        "net_guest: {}: iperf3 TCP guest->host {tx_mbits} Mbit/s, host->guest {rx_mbits} Mbit/s; run took {:?}",
        run.launcher, run.duration
    ));
    assert!(log.contains("0 dropped"), "{log}");
}

#[test]
fn jumbo_frames_with_mtu_9000() {
    let test = "net_guest::mtu_9000";
    let Some(qemu) = qemu_or_skip(test) else {
        return;
    };
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    let d = daemon(&ns, &["--mtu", "9000"]);
    let dir = tempfile::tempdir().expect("tempdir");
    let dirp = dir.path().display();
    let p = ns.prefix();
    let guest = format!(
        "set -e
ip link set eth0 mtu 9000
ip link set eth0 up
ip addr add {GUEST}/24 dev eth0
cat /sys/class/net/eth0/mtu
ping -c 3 -W 5 -s 8972 {HOST}
echo JUMBO-SUM=$(socat -u TCP:{HOST}:5000 - | sha256sum | cut -d' ' -f1)
sleep 4
"
    );
    let blob = dir.path().join("blob");
    let sum = e2e::qemu::host_shell(&format!(
        "head -c 16777216 /dev/urandom > {b} && sha256sum {b} | cut -d' ' -f1",
        b = blob.display()
    ))
    .expect("blob");
    let run = GuestSpec::new(&guest)
        .device(e2e::Device::net(&d.socket).mac(GUEST_MAC_STR))
        .host_background(&format!(
            "{p}socat -u OPEN:{} TCP-LISTEN:5000,reuseaddr",
            blob.display()
        ))
        .host_background(&ping_guest_when_up(&ns, 8972, &dir.path().join("ping.txt")))
        .host_check(&format!("cat {dirp}/ping.txt"))
        .timeout(Duration::from_secs(240))
        .run(&qemu)
        .expect("guest run");
    let log = d.stop();
    assert_eq!(
        run.exit_code,
        Some(0),
        "{}\n--- daemon ---\n{log}",
        run.console
    );
    assert!(
        run.output.contains("8980 bytes from"),
        "9000-byte frames both ways:\n{}",
        run.output
    );
    assert_eq!(
        value(&run.output, "JUMBO-SUM="),
        Some(sum.trim()),
        "{}",
        run.output
    );
    assert!(
        run.host_output.contains("3 packets received"),
        "{}",
        run.host_output
    );
    assert!(log.contains("0 dropped"), "{log}");
}

#[test]
fn two_queue_pairs_are_both_used_by_a_guest_with_two_vcpus() {
    let test = "net_guest::two_queue_pairs";
    let Some(qemu) = qemu_or_skip(test) else {
        return;
    };
    let Some(ns) = netns_or_skip(test) else {
        return;
    };
    let d = daemon(&ns, &["--queue-pairs", "2"]);
    let p = ns.prefix();
    let guest = format!(
        "set -e
ip link set eth0 up
ip addr add {GUEST}/24 dev eth0
ls -d /sys/class/net/eth0/queues/rx-* | wc -l | sed 's/^/RX-QUEUES=/'
ping -c 2 -W 5 {HOST}
iperf3 -c {HOST} -p 5201 -t 4 -P 4 -f m | tail -3
iperf3 -c {HOST} -p 5201 -t 4 -P 4 -f m -R | tail -3
"
    );
    let run = GuestSpec::new(&guest)
        .device(e2e::Device::net(&d.socket).mac(GUEST_MAC_STR).queues(2))
        .cpus(2)
        .memory_mib(768)
        .host_background(&format!("{p}iperf3 -s -p 5201"))
        .timeout(Duration::from_secs(240))
        .run(&qemu)
        .expect("guest run");
    let log = d.wait_log("connection totals");
    assert_eq!(
        run.exit_code,
        Some(0),
        "{}\n--- daemon ---\n{log}",
        run.console
    );
    assert_eq!(
        value(&run.output, "RX-QUEUES="),
        Some("2"),
        "{}",
        run.output
    );
    let totals = log
        .lines()
        .find(|l| l.contains("connection totals"))
        .unwrap_or("");
    for pair in 0..2 {
        let counts = totals
            .split(&format!("pair {pair}: rx "))
            .nth(1)
            .expect("per-pair totals");
        let mut words = counts.split_whitespace();
        let rx: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        let tx: u64 = words
            .nth(1)
            .and_then(|w| w.trim_end_matches(';').parse().ok())
            .unwrap_or(0);
        assert!(
            rx > 0 && tx > 0,
            "pair {pair} carried traffic both ways: {totals}"
        );
    }
}
