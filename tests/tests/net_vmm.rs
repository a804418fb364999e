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
