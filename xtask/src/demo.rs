//! `cargo xtask demo`: the README's main job.
//!
//! Builds everything and the guest image, creates a small disk image, starts the four
//! daemons, boots the guest with `vmm-frontend` and all four devices attached, with the
//! consoles on the terminal; the guest makes a file system on the disk and reads it back,
//! pings the host end of the tap (inside a network namespace the demo made), exchanges a
//! line over vsock with a host program, and writes to its virtio console; then it powers off
//! and every process the demo started is stopped.
//!
//! On a host whose KVM runs a stock kernel, all of it runs right here. On one whose KVM
//! cannot (these development machines: KVM on PVM), the same runs inside a QEMU TCG guest
//! with nested KVM, exactly as the vmm-frontend tests do.

use std::process::Command;
use std::time::Duration;

use e2e::{Device, GuestSpec, Launcher};

use crate::util::{run, step, Result};

/// What the guest does.
const GUEST: &str = r#"set -e
echo "== virtio-blk through vhost-device-blk: /dev/vda, $(($(cat /sys/block/vda/size) / 2048)) MiB"
mke2fs -q /dev/vda
mount /dev/vda /mnt
echo "written by the guest through vhost-device-blk" > /mnt/hello.txt
umount /mnt
mount -o ro /dev/vda /mnt
echo "read back: $(cat /mnt/hello.txt)"
umount /mnt
echo "== virtio-net through vhost-device-net: eth0"
ip link set eth0 up
ip addr add 10.77.0.2/24 dev eth0
ping -c 3 -W 5 10.77.0.1
echo "== virtio-vsock through vhost-device-vsock: guest CID 3 to host port 5000"
echo "hello from the guest over vsock" | socat -t 5 - VSOCK-CONNECT:2:5000
echo "== virtio-console through vhost-device-console: /dev/hvc0"
echo "hello from the guest on its virtio console" > /dev/hvc0
echo "== all four devices worked; powering off"
"#;

/// Runs the demo.
pub fn run_demo() -> Result<()> {
    crate::deps::ensure_packages()?;
    crate::guest::build()?;
    step("building the daemons and vmm-frontend");
    run(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into())).args([
            "build",
            "--workspace",
            "--bins",
        ]),
    )?;
    let launcher = e2e::vmm_or_skip("demo")
        .ok_or("vmm-frontend cannot run here (see the SKIPPED line above for why)")?;
    step(&format!("booting the guest under {}", launcher.describe()));

    let dir = format!("/tmp/vhost-devices-demo.{}", std::process::id());
    let ns = format!("vhd-demo-{}", std::process::id());
    let ip = e2e::nested::ip_path();
    let spec = GuestSpec::new(GUEST)
        .memory_mib(512)
        .timeout(Duration::from_secs(180))
        .host_setup(&format!(
            "mkdir -p {dir} && truncate -s 64M {dir}/disk.img && {ip} netns add {ns}"
        ))
        .device(Device::blk(std::path::Path::new(&format!("{dir}/blk.sock"))).daemon(
            "vhost-device-blk",
            &["--socket-path", "{socket}", "--image", &format!("{dir}/disk.img"), "--serial", "demo-disk"],
        ))
        .device(
            Device::net(std::path::Path::new(&format!("{dir}/net.sock")))
                .mac("52:54:00:12:34:56")
                .daemon(
                    "vhost-device-net",
                    &["--socket-path", "{socket}", "--tap", "vhd0", "--ip", "10.77.0.1/24"],
                )
                .in_netns(&ns),
        )
        .device(Device::vsock(std::path::Path::new(&format!("{dir}/vsock.sock")), 3).daemon(
            "vhost-device-vsock",
            &["--guest-cid", "3", "--socket", "{socket}", "--uds-path", &format!("{dir}/vsock")],
        ))
        .device(Device::console(std::path::Path::new(&format!("{dir}/console.sock"))).daemon(
            "vhost-device-console",
            &[
                "--socket-path",
                "{socket}",
                "--backend",
                &format!("unix={dir}/console"),
                "--log-file",
                &format!("{dir}/console.log"),
            ],
        ))
        .host_background(&format!(
            "socat UNIX-LISTEN:{dir}/vsock_5000 SYSTEM:'read line; echo \"the host program received: $line\"'"
        ))
        .host_check(&format!(
            "echo \"virtio console output, as vhost-device-console logged it:\"; cat {dir}/console.log; \
             echo \"disk image on the host: $(du -h {dir}/disk.img | cut -f1) used of 64M\"; \
             {ip} netns del {ns}; rm -rf {dir}"
        ));
    // Has the harness echo the consoles to the terminal as they come (set while this
    // process has no other thread).
    std::env::set_var("E2E_VERBOSE", "1");
    let result = spec.run(&launcher);
    // The host check removes them on success; make sure on failure too (direct mode).
    if std::path::Path::new("/run/netns").join(&ns).exists() {
        let _ = Command::new(&ip).args(["netns", "del", &ns]).status();
    }
    let _ = std::fs::remove_dir_all(&dir);
    let guest = result.map_err(|e| e.to_string())?;
    eprintln!("\n== on the host\n{}", guest.host_output.trim_end());
    match guest.exit_code {
        Some(0) => {
            step(&format!(
                "demo done in {:.0} s: the guest used all four devices and powered off",
                guest.duration.as_secs_f64()
            ));
            Ok(())
        }
        other => Err(format!("the guest's demo script failed (status {other:?})")),
    }
}
