//! The stock Debian kernel under `vmm-frontend` with real KVM (nested in a QEMU TCG guest
//! where the host's KVM cannot run it, see `e2e::nested`): it boots to the initramfs with
//! one and two vCPUs, finds its virtio-pci devices, and the daemons serve them.
//!
//! Each test boots one guest; the harness serialises guest runs across processes.

use std::path::PathBuf;
use std::time::Duration;

use e2e::{Device, GuestSpec};

fn base(name: &str) -> String {
    format!("/tmp/e2e-vmm-{name}-{}", std::process::id())
}

fn boots_with(cpus: u8) {
    let test = format!("vmm_guest::boots_to_the_initramfs_with_{cpus}_vcpus");
    let Some(vmm) = e2e::vmm_or_skip(&test) else {
        return;
    };
    let run = GuestSpec::new(
        "nproc; grep -c ^processor /proc/cpuinfo; cat /proc/cmdline; \
         ls -1 /sys/firmware/acpi/tables; cat /sys/bus/pci/devices/0000:00:00.0/class",
    )
    .cpus(cpus)
    .timeout(Duration::from_secs(60))
    .run(&vmm)
    .expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    let lines: Vec<&str> = run.output.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(cpus.to_string().as_str()),
        "{}",
        run.output
    );
    assert_eq!(
        lines.get(1).copied(),
        Some(cpus.to_string().as_str()),
        "{}",
        run.output
    );
    assert!(
        lines.get(2).is_some_and(|l| l.contains("console=ttyS0")),
        "{}",
        run.output
    );
    for table in ["APIC", "DSDT", "FACP"] {
        assert!(
            run.output.lines().any(|l| l == table),
            "no {table}: {}",
            run.output
        );
    }
    assert!(
        run.output.contains("0x060000"),
        "no host bridge: {}",
        run.output
    );
}

#[test]
fn boots_to_the_initramfs_with_1_vcpu() {
    boots_with(1);
}

#[test]
fn boots_to_the_initramfs_with_2_vcpus() {
    boots_with(2);
}

/// Two queues of vhost-device-blk: the guest writes a pattern through its own driver from
/// two CPUs, reads it back, and the host sees the same bytes in the image.
#[test]
fn blk_daemon_serves_the_guest() {
    let test = "vmm_guest::blk_daemon_serves_the_guest";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let b = base("blk");
    let sock = PathBuf::from(format!("{b}.sock"));
    let image = format!("{b}.img");
    let guest = r#"
cat /sys/block/vda/size
ls /sys/block/vda/mq | wc -l
dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=64k seek=1 conv=fsync 2>/dev/null || exit 2
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=64k skip=1 count=16 iflag=direct 2>/dev/null || exit 3
cmp /tmp/pattern /tmp/back && echo "READBACK ok"
echo "GUEST-SUM $(md5sum < /tmp/pattern | cut -d' ' -f1)"
"#;
    let run = GuestSpec::new(guest)
        .device(Device::blk(&sock).queues(2).daemon(
            "vhost-device-blk",
            &["--socket-path", "{socket}", "--image", &image, "--num-queues", "2"],
        ))
        .cpus(2)
        .host_setup(&format!("truncate -s 32M {image}"))
        .host_check(&format!(
            "echo \"HOST-SUM $(dd if={image} bs=64k skip=1 count=16 2>/dev/null | md5sum | cut -d' ' -f1)\"; rm -f {image}"
        ))
        .timeout(Duration::from_secs(120))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    let lines: Vec<&str> = run.output.lines().collect();
    assert_eq!(lines.first().copied(), Some("65536"), "{}", run.output);
    assert_eq!(
        lines.get(1).copied(),
        Some("2"),
        "two queues: {}",
        run.output
    );
    assert!(run.output.contains("READBACK ok"), "{}", run.output);
    let guest_sum = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("GUEST-SUM "))
        .expect("guest sum");
    let host_sum = run
        .host_output
        .lines()
        .find_map(|l| l.strip_prefix("HOST-SUM "))
        .unwrap_or_else(|| panic!("host sum: {}", run.host_output));
    assert_eq!(
        guest_sum, host_sum,
        "bytes on the image differ from the guest's"
    );
}

/// vhost-device-vsock: a line from the guest reaches a host program on the hybrid-vsock
/// Unix socket, and the guest reads the reply.
#[test]
fn vsock_daemon_serves_the_guest() {
    let test = "vmm_guest::vsock_daemon_serves_the_guest";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let b = base("vsock");
    let sock = PathBuf::from(format!("{b}.sock"));
    let uds = format!("{b}.uds");
    let guest = "cat /sys/class/vsock/vsock/local_cid 2>/dev/null || true\n\
                 echo 'hello from the guest' | timeout 60 socat -t 10 - VSOCK-CONNECT:2:5000";
    let run = GuestSpec::new(guest)
        .device(Device::vsock(&sock, 3).daemon(
            "vhost-device-vsock",
            &["--socket", "{socket}", "--guest-cid", "3", "--uds-path", &uds],
        ))
        .host_background(&format!(
            "rm -f {uds}_5000; socat UNIX-LISTEN:{uds}_5000 SYSTEM:'read l; echo \"host got: $l\" > {b}.got; echo reply-from-host'"
        ))
        .host_check(&format!("cat {b}.got; rm -f {b}.got {uds} {uds}_5000"))
        .timeout(Duration::from_secs(120))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(run.output.contains("reply-from-host"), "{}", run.console);
    assert!(
        run.host_output.contains("host got: hello from the guest"),
        "{}",
        run.host_output
    );
}

/// vhost-device-console with its default single port: what the guest writes to /dev/hvc0
/// reaches the host side.
#[test]
fn console_daemon_serves_the_guest() {
    let test = "vmm_guest::console_daemon_serves_the_guest";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let b = base("console");
    let sock = PathBuf::from(format!("{b}.sock"));
    let port = format!("{b}.port");
    let backend = format!("unix={port}");
    let run = GuestSpec::new("echo 'console line from the guest' > /dev/hvc0; sleep 1; ls /dev/hvc0")
        .device(Device::console(&sock).daemon(
            "vhost-device-console",
            &["--socket-path", "{socket}", "--backend", &backend],
        ))
        .host_background(&format!(
            "n=0; while [ ! -S {port}.0 ] && [ ! -S {port} ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done; \
             p={port}.0; [ -S $p ] || p={port}; socat -u UNIX-CONNECT:$p - > {b}.out"
        ))
        .host_check(&format!("cat {b}.out; rm -f {b}.out {port} {port}.0"))
        .timeout(Duration::from_secs(120))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(
        run.host_output.contains("console line from the guest"),
        "{}\n{}",
        run.host_output,
        run.console
    );
}

/// vhost-device-net on a tap inside a network namespace (made inside the nested guest, or
/// on a KVM host, never in the root namespace; iproute2's `ip` by full path, as busybox's
/// shell would run its own applet, which has no `netns`): the guest pings the host end of the tap and
/// fetches a file over TCP from it.
#[test]
fn net_daemon_serves_the_guest() {
    let test = "vmm_guest::net_daemon_serves_the_guest";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let b = base("net");
    let sock = PathBuf::from(format!("{b}.sock"));
    let ns = format!("vmmnet{}", std::process::id());
    let guest = "ip addr add 10.79.0.2/24 dev eth0 && ip link set eth0 up || exit 2\n\
                 cat /sys/class/net/eth0/address\n\
                 ping -c 3 -W 5 10.79.0.1 | grep -c 'bytes from'\n\
                 timeout 60 socat -u TCP:10.79.0.1:7000,retry=20,interval=0.5 - | md5sum | cut -d' ' -f1";
    let run = GuestSpec::new(guest)
        .device(
            Device::net(&sock)
                .mac("52:54:00:ab:cd:03")
                .daemon(
                    "vhost-device-net",
                    &[
                        "--socket-path",
                        "{socket}",
                        "--tap",
                        "vmmtap0",
                        "--ip",
                        "10.79.0.1/24",
                        "--mac",
                        "52:54:00:ab:cd:03",
                    ],
                )
                .in_netns(&ns),
        )
        .host_setup(&format!(
            "/usr/sbin/ip netns add {ns} && /usr/sbin/ip netns exec {ns} /usr/sbin/ip link set lo up && \
             head -c 1048576 /dev/urandom > {b}.data"
        ))
        .host_background(&format!(
            "/usr/sbin/ip netns exec {ns} socat -u FILE:{b}.data TCP-LISTEN:7000,reuseaddr"
        ))
        .host_check(&format!(
            "echo \"HOST-SUM $(md5sum < {b}.data | cut -d' ' -f1)\"; rm -f {b}.data; /usr/sbin/ip netns del {ns}"
        ))
        .timeout(Duration::from_secs(150))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    let lines: Vec<&str> = run.output.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some("52:54:00:ab:cd:03"),
        "{}",
        run.console
    );
    assert_eq!(lines.get(1).copied(), Some("3"), "pings: {}", run.console);
    let host_sum = run
        .host_output
        .lines()
        .find_map(|l| l.strip_prefix("HOST-SUM "))
        .unwrap_or_else(|| panic!("host sum: {}", run.host_output));
    assert_eq!(lines.get(2).copied(), Some(host_sum), "{}", run.console);
}

/// A daemon killed while the guest runs: the VMM reports it and keeps the VM running, and
/// the guest's other disk still works (Firecracker's `test_vhost_user_block_disconnect`).
#[test]
fn a_dead_daemon_is_reported_and_the_vm_goes_on() {
    let test = "vmm_guest::a_dead_daemon_is_reported_and_the_vm_goes_on";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let b = base("death");
    let (sock_a, sock_b) = (format!("{b}-a.sock"), format!("{b}-b.sock"));
    let (img_a, img_b) = (format!("{b}-a.img"), format!("{b}-b.img"));
    let guest = r#"
echo FIRST-DISK-WRITTEN | dd of=/dev/vda conv=fsync 2>/dev/null || exit 2
i=0; while [ ! -e /tmp/never ] && [ $i -lt 15 ]; do sleep 1; i=$((i+1)); done
echo SECOND-DISK-OK | dd of=/dev/vdb conv=fsync 2>/dev/null || exit 3
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vdb bs=14 count=1 iflag=direct 2>/dev/null; echo
echo GUEST-STILL-RUNNING
"#;
    // Kill the first disk's daemon (found by its socket path) once the guest wrote to it.
    let killer = format!(
        "i=0; until grep -q FIRST-DISK-WRITTEN {img_a} 2>/dev/null || [ $i -ge 600 ]; do sleep 0.2; i=$((i+1)); done; \
         for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline 2>/dev/null | grep -q -- '--image {img_a}' && kill -9 ${{p#/proc/}} && echo killed > {b}.killed; done"
    );
    let daemon = |sock: &str, img: &str| {
        Device::blk(&PathBuf::from(sock)).daemon(
            "vhost-device-blk",
            &["--socket-path", "{socket}", "--image", img],
        )
    };
    let run = GuestSpec::new(guest)
        .device(daemon(&sock_a, &img_a))
        .device(daemon(&sock_b, &img_b))
        .host_setup(&format!("truncate -s 8M {img_a} {img_b}"))
        .host_background(&killer)
        .host_check(&format!("cat {b}.killed; rm -f {b}.killed {img_a} {img_b}"))
        .timeout(Duration::from_secs(150))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert!(
        run.host_output.contains("killed"),
        "daemon not killed: {}",
        run.host_output
    );
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(run.output.contains("SECOND-DISK-OK"), "{}", run.console);
    assert!(
        run.output.contains("GUEST-STILL-RUNNING"),
        "{}",
        run.console
    );
    assert!(
        run.console
            .contains("disconnected; the VM keeps running without it"),
        "the VMM did not report the dead daemon:\n{}",
        run.console
    );
}

/// A block daemon killed with SIGKILL while the guest's fio writes with verification, and
/// started again: vmm-frontend reconnects to it (replaying features, memory, rings and the
/// in-flight buffer), and the guest's verify passes with no I/O error.
#[test]
fn a_restarted_daemon_is_reconnected_and_the_guest_sees_no_error() {
    let test = "vmm_guest::a_restarted_daemon_is_reconnected_and_the_guest_sees_no_error";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let b = base("reconnect");
    let sock = format!("{b}.sock");
    let image = format!("{b}.img");
    let guest = r#"
fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k \
    --iodepth=16 --size=16M --fdatasync=8 --verify=crc32c --verify_fatal=1 \
    --group_reporting >/tmp/fio.log 2>&1
echo fio_rc=$?
grep -q "err= 0" /tmp/fio.log && echo fio=ok || cat /tmp/fio.log
echo ioerr=$(dmesg | grep -c "I/O error")
"#;
    let args = ["--socket-path", &sock, "--image", &image];
    // Inside L2: once the guest has written to the image, kill the daemon (its PID is $D0,
    // exported by the L2 script) and start it again on the same socket.
    let restart = format!(
        "i=0; while [ \"$(stat -c %b {image})\" = 0 ] && [ $i -lt 900 ]; do sleep 0.2; i=$((i+1)); done; \
         sleep 1; kill -9 $D0 && echo killed > {b}.restarted; sleep 0.5; \
         /usr/bin/vhost-device-blk {} > {b}.second.log 2>&1 &",
        args.join(" ")
    );
    let run = GuestSpec::new(guest)
        .device(Device::blk(&PathBuf::from(&sock)).daemon("vhost-device-blk", &args))
        .host_setup(&format!("truncate -s 32M {image}"))
        .host_background(&restart)
        .host_check(&format!(
            "cat {b}.restarted; echo '--- second daemon ---'; cat {b}.second.log; rm -f {image}"
        ))
        .timeout(Duration::from_secs(240))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!(
        "{test}: {} in {:?}\n{}\n{}",
        run.launcher, run.duration, run.output, run.host_output
    ));
    assert!(
        run.host_output.contains("killed"),
        "the daemon was not killed: {}",
        run.host_output
    );
    assert!(
        run.console.contains("reconnected"),
        "vmm-frontend did not reconnect:\n{}",
        run.console
    );
    assert!(
        run.host_output
            .contains("the frontend shares an in-flight buffer"),
        "the restarted daemon did not get the in-flight buffer back:\n{}",
        run.host_output
    );
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(run.output.contains("fio_rc=0"), "{}", run.output);
    assert!(run.output.contains("fio=ok"), "{}", run.output);
    assert!(run.output.contains("ioerr=0"), "{}", run.output);
}

/// The vsock, console and net daemons killed with SIGKILL at once while the guest runs, and
/// started again with the same arguments: vmm-frontend reconnects to each, and what a user
/// sees works again. A new vsock connection from the guest reaches the host program (one
/// open at the kill is closed in the guest by the frontend's transport reset event), the
/// guest's pings reach the host end of the tap (a persistent tap, which survives its daemon
/// with its address and MAC), and a line the guest writes to the same open /dev/hvc0
/// reaches a client of the restarted console.
#[test]
fn restarted_vsock_console_and_net_daemons_are_reconnected() {
    let test = "vmm_guest::restarted_vsock_console_and_net_daemons_are_reconnected";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let b = base("restart3");
    let (vsock_sock, console_sock, net_sock) = (
        format!("{b}-vsock.sock"),
        format!("{b}-console.sock"),
        format!("{b}-net.sock"),
    );
    let uds = format!("{b}.uds");
    let port = format!("{b}.port");
    let backend = format!("unix={port}");
    let ns = format!("vmmrs{}", std::process::id());
    let guest = r#"
ip addr add 10.79.0.2/24 dev eth0 && ip link set eth0 up || exit 2
exec 3>/dev/hvc0
echo "ping-before=$(ping -c 2 -W 5 10.79.0.1 | grep -c 'bytes from')"
echo before | timeout 30 socat -t 5 - VSOCK-CONNECT:2:5000
( socat -u VSOCK-CONNECT:2:5001 - > /tmp/held.out 2>&1; echo "held-closed rc=$?" > /tmp/held.rc ) &
i=0; until grep -q held-open /tmp/held.out 2>/dev/null || [ $i -ge 100 ]; do sleep 0.2; i=$((i+1)); done
cat /tmp/held.out
echo 'console line before the restart' >&3
sleep 15
cat /tmp/held.rc 2>/dev/null || echo held-still-open
cat /tmp/held.out
echo "ping-after=$(ping -c 5 -W 5 10.79.0.1 | grep -c 'bytes from')"
echo after | timeout 30 socat -t 5 - VSOCK-CONNECT:2:5000
echo 'console line after the restart' >&3
sleep 2
echo guest-done
"#;
    let vsock_args = [
        "--socket",
        vsock_sock.as_str(),
        "--guest-cid",
        "3",
        "--uds-path",
        uds.as_str(),
    ];
    let console_args = [
        "--socket-path",
        console_sock.as_str(),
        "--backend",
        backend.as_str(),
    ];
    let net_args = [
        "--socket-path",
        net_sock.as_str(),
        "--tap",
        "vmmtap0",
        "--ip",
        "10.79.0.1/24",
        "--mac",
        "52:54:00:ab:cd:04",
    ];
    let ip = "/usr/sbin/ip";
    // Inside L2: a client on the console's port; once the guest's first line is there, kill
    // the three daemons ($D0 $D1 $D2, in the order of the devices below), start them again
    // and connect a new client to the restarted console.
    let restart = format!(
        "n=0; while [ ! -S {port}.0 ] && [ ! -S {port} ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done; \
         p={port}.0; [ -S $p ] || p={port}; \
         socat -u UNIX-CONNECT:$p - > {b}.out1 & \
         i=0; until grep -q 'line before the restart' {b}.out1 2>/dev/null || [ $i -ge 900 ]; do sleep 0.2; i=$((i+1)); done; \
         kill -9 $D0 $D1 $D2 && echo killed > {b}.restarted; sleep 0.5; \
         /usr/bin/vhost-device-vsock {vsock} > {b}.vsock2.log 2>&1 & \
         /usr/bin/vhost-device-console {console} > {b}.console2.log 2>&1 & \
         {ip} netns exec {ns} /usr/bin/vhost-device-net {net} > {b}.net2.log 2>&1 & \
         i=0; until socat -u UNIX-CONNECT:$p - > {b}.out2 2>/dev/null || [ $i -ge 150 ]; do sleep 0.2; i=$((i+1)); done",
        vsock = vsock_args.join(" "),
        console = console_args.join(" "),
        net = net_args.join(" "),
    );
    let run = GuestSpec::new(guest)
        .device(Device::vsock(&PathBuf::from(&vsock_sock), 3).daemon("vhost-device-vsock", &vsock_args))
        .device(Device::console(&PathBuf::from(&console_sock)).daemon("vhost-device-console", &console_args))
        .device(
            Device::net(&PathBuf::from(&net_sock))
                .mac("52:54:00:ab:cd:04")
                .daemon("vhost-device-net", &net_args)
                .in_netns(&ns),
        )
        .host_setup(&format!(
            "{ip} netns add {ns} && {ip} netns exec {ns} {ip} link set lo up && \
             {ip} netns exec {ns} {ip} tuntap add dev vmmtap0 mode tap vnet_hdr"
        ))
        .host_background(&format!(
            "rm -f {uds}_5000; socat UNIX-LISTEN:{uds}_5000,fork SYSTEM:'read l; echo \"host got: $l\" >> {b}.got; echo reply-$l'"
        ))
        .host_background(&format!(
            "rm -f {uds}_5001; socat UNIX-LISTEN:{uds}_5001 SYSTEM:'echo held-open; sleep 200'"
        ))
        .host_background(&restart)
        .host_check(&format!(
            "cat {b}.restarted; echo '--- vsock host ---'; cat {b}.got; \
             echo '--- console before ---'; cat {b}.out1; echo '--- console after ---'; cat {b}.out2; \
             echo '--- end ---'; for d in vsock console net; do echo \"--- second $d daemon ---\"; cat {b}.$d\"2.log\"; done; \
             rm -f {b}.* {uds} {uds}_5000 {uds}_5001 {port} {port}.0; {ip} netns del {ns}"
        ))
        .timeout(Duration::from_secs(240))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!(
        "{test}: {} in {:?}\n{}\n{}",
        run.launcher, run.duration, run.output, run.host_output
    ));
    assert!(
        run.host_output.contains("killed"),
        "the daemons were not killed: {}",
        run.host_output
    );
    for (name, sock) in [
        ("vsock0", &vsock_sock),
        ("console0", &console_sock),
        ("net0", &net_sock),
    ] {
        assert!(
            run.console.lines().any(|l| l.contains(&format!("{name} ("))
                && l.contains(sock.as_str())
                && l.contains("reconnected")),
            "vmm-frontend did not reconnect {name}:\n{}",
            run.console
        );
    }
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(run.output.contains("guest-done"), "{}", run.console);
    // Before the restart: everything works.
    assert!(run.output.contains("ping-before=2"), "{}", run.console);
    assert!(run.output.contains("reply-before"), "{}", run.console);
    assert!(run.output.contains("held-open"), "{}", run.console);
    // The connection open at the kill is closed in the guest (the frontend's transport
    // reset event), not left hanging.
    assert!(
        run.output.contains("held-closed rc=1"),
        "the guest's open vsock connection was not reset:\n{}",
        run.console
    );
    // After: a new vsock connection, pings, and the console line on the new client.
    let pings: u32 = run
        .output
        .lines()
        .find_map(|l| l.strip_prefix("ping-after="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        pings >= 4,
        "{pings} of 5 pings after the restart:\n{}",
        run.console
    );
    assert!(run.output.contains("reply-after"), "{}", run.console);
    assert!(
        run.host_output.contains("host got: after"),
        "{}",
        run.host_output
    );
    let after = run
        .host_output
        .split("--- console after ---")
        .nth(1)
        .and_then(|s| s.split("--- end ---").next())
        .unwrap_or_default();
    assert!(
        after.contains("console line after the restart"),
        "the restarted console's client did not get the guest's line:\n{}",
        run.host_output
    );
}
