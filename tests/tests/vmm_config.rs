//! Configuration changes under `vmm-frontend` (nested KVM, see `e2e::nested`): a daemon
//! that tells its frontend the configuration changed (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`
//! on the backend channel) reaches the guest as a configuration interrupt.

use std::path::PathBuf;
use std::time::Duration;

use e2e::{Device, GuestSpec};

/// The disk image grows and the daemon gets SIGHUP: the guest sees the new size without
/// any access of its own (the virtio-blk driver re-reads the capacity on the interrupt).
#[test]
fn a_disk_that_grows_reaches_the_guest() {
    let test = "vmm_config::a_disk_that_grows_reaches_the_guest";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    let b = format!("/tmp/e2e-vmm-grow-{}", std::process::id());
    let sock = format!("{b}.sock");
    let image = format!("{b}.img");
    let guest = r#"
echo before=$(cat /sys/block/vda/size)
echo MARK | dd of=/dev/vda conv=fsync 2>/dev/null
i=0; while [ "$(cat /sys/block/vda/size)" = 65536 ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
echo after=$(cat /sys/block/vda/size)
dmesg | grep -i "capacity change" | tail -n 1
"#;
    // Inside L2: once the guest wrote its mark, grow the image and tell the daemon ($D0).
    let grow = format!(
        "i=0; while [ \"$(stat -c %b {image})\" = 0 ] && [ $i -lt 900 ]; do sleep 0.2; i=$((i+1)); done; \
         truncate -s 48M {image} && kill -HUP $D0 && echo grown > {b}.grown"
    );
    let run = GuestSpec::new(guest)
        .device(Device::blk(&PathBuf::from(&sock)).daemon(
            "vhost-device-blk",
            &["--socket-path", "{socket}", "--image", &image],
        ))
        .host_setup(&format!("truncate -s 32M {image}"))
        .host_background(&grow)
        .host_check(&format!("cat {b}.grown; rm -f {image} {b}.grown"))
        .timeout(Duration::from_secs(150))
        .run(&vmm)
        .expect("guest run");
    e2e::guest::say(&format!(
        "{test}: {} in {:?}\n{}",
        run.launcher, run.duration, run.output
    ));
    assert!(run.host_output.contains("grown"), "{}", run.host_output);
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(run.output.contains("before=65536"), "{}", run.output);
    assert!(
        run.output.contains("after=98304"),
        "the guest did not see the disk grow:\n{}",
        run.console
    );
}
