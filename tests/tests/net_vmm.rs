//! vhost-device-net under `vmm-frontend` with real KVM (nested in a QEMU TCG guest where the
//! host's KVM cannot run a stock kernel, see `e2e::nested`): the daemon and its tap run in
//! that L2 machine, never on the host, and the L3 guest's virtio-net pings L2's end.

use std::time::Duration;

use e2e::{Device, GuestSpec};

#[test]
fn vmm_frontend_guest_pings_through_the_daemon() {
    let test = "net_vmm::vmm_frontend_guest_pings_through_the_daemon";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let sock = format!("/tmp/e2e-vmm-net-{}.sock", std::process::id());
    let guest = "set -e
ip link set eth0 up
ip addr add 10.80.0.2/24 dev eth0
cat /sys/class/net/eth0/address
ping -c 3 -W 5 10.80.0.1
";
    let run = GuestSpec::new(guest)
        .device(
            Device::net(std::path::Path::new(&sock))
                .mac("52:54:00:00:80:02")
                .daemon(
                    "vhost-device-net",
                    &[
                        "--socket-path",
                        "{socket}",
                        "--tap",
                        "vdn0",
                        "--ip",
                        "10.80.0.1/24",
                        "--mac",
                        "52:54:00:00:80:02",
                    ],
                ),
        )
        .timeout(Duration::from_secs(120))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(
        run.output.contains("52:54:00:00:80:02"),
        "the MAC reaches the guest:\n{}",
        run.output
    );
    assert!(run.output.contains("3 packets received"), "{}", run.output);
}

/// Two queue pairs (`--net socket=...,queues=2`, the daemon with `--queue-pairs 2`) and two
/// vCPUs: the guest sees two rx and two tx queues, its driver enables both pairs through the
/// control queue the VMM serves (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` at probe), and one
/// download per vCPU (XPS sends from CPU i through tx queue i) brings the file intact. The
/// daemon's per-pair counters, printed when the connection ends, show both pairs carried
/// frames (one download per listener: a forking socat would share the file's offset).
#[test]
fn two_queue_pairs_carry_traffic() {
    let test = "net_vmm::two_queue_pairs_carry_traffic";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let pid = std::process::id();
    let b = format!("/tmp/e2e-vmm-netmq-{pid}");
    let sock = std::path::PathBuf::from(format!("{b}.sock"));
    let ns = format!("vmmnetmq{pid}");
    let guest = "ip addr add 10.81.0.2/24 dev eth0 && ip link set eth0 up || exit 2
echo \"queues: $(ls /sys/class/net/eth0/queues/ | tr '\\n' ' ')\"
echo \"pings: $(ping -c 3 -W 5 10.81.0.1 | grep -c 'bytes from')\"
command -v taskset >/dev/null && echo taskset=yes
for c in 0 1; do
  ( taskset -c $c true 2>/dev/null && pin=\"taskset -c $c\"
    $pin timeout 60 socat -u TCP:10.81.0.1:700$c,retry=20,interval=0.5 - | md5sum | cut -d' ' -f1 > /tmp/sum$c ) &
done
wait
echo \"sum0: $(cat /tmp/sum0)\"
echo \"sum1: $(cat /tmp/sum1)\"
grep virtio /proc/interrupts
";
    let run = GuestSpec::new(guest)
        .cpus(2)
        .device(
            Device::net(&sock)
                .queues(2)
                .mac("52:54:00:ab:cd:81")
                .daemon(
                    "vhost-device-net",
                    &[
                        "--socket-path",
                        "{socket}",
                        "--tap",
                        "vmmmq0",
                        "--ip",
                        "10.81.0.1/24",
                        "--mac",
                        "52:54:00:ab:cd:81",
                        "--queue-pairs",
                        "2",
                    ],
                )
                .in_netns(&ns),
        )
        .host_setup(&format!(
            "/usr/sbin/ip netns add {ns} && /usr/sbin/ip netns exec {ns} /usr/sbin/ip link set lo up && \
             head -c 4194304 /dev/urandom > {b}.data"
        ))
        .host_background(&format!(
            "/usr/sbin/ip netns exec {ns} socat -u FILE:{b}.data TCP-LISTEN:7000,reuseaddr"
        ))
        .host_background(&format!(
            "/usr/sbin/ip netns exec {ns} socat -u FILE:{b}.data TCP-LISTEN:7001,reuseaddr"
        ))
        .host_check(&format!(
            "echo \"HOST-SUM $(md5sum < {b}.data | cut -d' ' -f1)\"; rm -f {b}.data; /usr/sbin/ip netns del {ns}"
        ))
        .timeout(Duration::from_secs(180))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    let field = |name: &str| {
        run.output
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("queues:"), "rx-0 rx-1 tx-0 tx-1", "{}", run.console);
    assert_eq!(field("pings:"), "3", "{}", run.console);
    let host_sum = run
        .host_output
        .lines()
        .find_map(|l| l.strip_prefix("HOST-SUM "))
        .unwrap_or_else(|| panic!("host sum: {}", run.host_output));
    assert_eq!(field("sum0:"), host_sum, "{}", run.console);
    assert_eq!(field("sum1:"), host_sum, "{}", run.console);
    for l in run.output.lines().filter(|l| l.contains("virtio")) {
        e2e::guest::say(&format!("{test}: guest interrupts: {}", l.trim()));
    }
    // "...; pair 0: rx A tx B; pair 1: rx C tx D" from the daemon's log, which the nested
    // launcher prints after the VM ends.
    let Some(totals) = run
        .console
        .lines()
        .find(|l| l.contains("connection totals"))
    else {
        e2e::guest::say(&format!(
            "{test}: the daemon's counters are not in the console"
        ));
        return;
    };
    e2e::guest::say(&format!("{test}: daemon: {totals}"));
    let pair = |i: u32| -> u64 {
        let Some(rest) = totals.split(&format!("pair {i}: ")).nth(1) else {
            panic!("pair {i}: {totals}")
        };
        rest.split(';')
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok())
            .sum()
    };
    assert!(pair(0) > 0, "pair 0 carried nothing: {totals}");
    if run.output.contains("taskset=yes") {
        assert!(pair(1) > 0, "pair 1 carried nothing: {totals}");
    }
}

/// A restarted daemon gets only the pairs the guest enabled: with one vCPU the driver asks
/// for one of the two pairs (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 1`); the daemon is killed
/// and started again on the same persistent multi-queue tap, the VMM replays the rings with
/// pair 1's left disabled (the restarted daemon never attaches pair 1's tap queue), and the
/// guest's pings work again.
#[test]
fn a_restarted_daemon_keeps_the_disabled_pair_disabled() {
    let test = "net_vmm::a_restarted_daemon_keeps_the_disabled_pair_disabled";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let pid = std::process::id();
    let b = format!("/tmp/e2e-vmm-netmqr-{pid}");
    let sock = format!("{b}.sock");
    let ns = format!("vmmmqr{pid}");
    let ip = "/usr/sbin/ip";
    let guest = "ip addr add 10.82.0.2/24 dev eth0 && ip link set eth0 up || exit 2
echo \"queues: $(ls /sys/class/net/eth0/queues/ | tr '\\n' ' ')\"
echo \"ping-before=$(ping -c 2 -W 5 10.82.0.1 | grep -c 'bytes from')\"
sleep 15
echo \"ping-after=$(ping -c 5 -W 5 10.82.0.1 | grep -c 'bytes from')\"
";
    let args = [
        "--socket-path",
        sock.as_str(),
        "--tap",
        "vmmmqr0",
        "--ip",
        "10.82.0.1/24",
        "--mac",
        "52:54:00:ab:cd:82",
        "--queue-pairs",
        "2",
    ];
    // Inside L2: once the guest's first pings crossed the tap, kill the daemon ($D0) and
    // start it again with its tap-queue log.
    let restart = format!(
        "i=0; until [ \"$({ip} netns exec {ns} cat /sys/class/net/vmmmqr0/statistics/rx_packets)\" -ge 3 ] || [ $i -ge 900 ]; do sleep 0.2; i=$((i+1)); done; sleep 2; \
         kill -9 $D0 && echo killed > {b}.restarted; sleep 0.5; \
         RUST_LOG=vhost_device_net::backend=debug {ip} netns exec {ns} /usr/bin/vhost-device-net {} > {b}.net2.log 2>&1",
        args.join(" ")
    );
    let run = GuestSpec::new(guest)
        .device(
            Device::net(std::path::Path::new(&sock))
                .queues(2)
                .mac("52:54:00:ab:cd:82")
                .daemon("vhost-device-net", &args)
                .in_netns(&ns),
        )
        .host_setup(&format!(
            "{ip} netns add {ns} && {ip} netns exec {ns} {ip} link set lo up && \
             {ip} netns exec {ns} {ip} tuntap add dev vmmmqr0 mode tap vnet_hdr multi_queue"
        ))
        .host_background(&restart)
        .host_check(&format!(
            "cat {b}.restarted; echo '--- second daemon ---'; cat {b}.net2.log; echo '--- end ---'; \
             rm -f {b}.*; {ip} netns del {ns}"
        ))
        .timeout(Duration::from_secs(240))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!(
        "{test}: {} in {:?}\n{}\n{}",
        run.launcher, run.duration, run.output, run.host_output
    ));
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(
        run.output.contains("queues: rx-0 tx-0 "),
        "one pair in use (the guest's queue directories follow the enabled pairs): {}",
        run.console
    );
    assert!(
        run.console.contains("the guest uses 1 queue pair(s)"),
        "{}",
        run.console
    );
    // The kill may catch the second ping: one reply is enough before the restart.
    assert!(
        run.output.contains("ping-before=2") || run.output.contains("ping-before=1"),
        "{}",
        run.console
    );
    assert!(run.host_output.contains("killed"), "{}", run.host_output);
    let after: u32 = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("ping-after="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(after >= 3, "pings after the restart: {}", run.console);
    assert!(
        run.host_output.contains("queue pair 0: tap queue attached"),
        "the restarted daemon started pair 0: {}",
        run.host_output
    );
    assert!(
        !run.host_output.contains("queue pair 1: tap queue attached"),
        "pair 1 must stay disabled: {}",
        run.host_output
    );
}
