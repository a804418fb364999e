//! `vmm-frontend` built for aarch64 boots the Debian arm64 cloud kernel under KVM, inside an
//! emulated arm64 machine (QEMU TCG `virt` with EL2 and GICv3, see `e2e::aarch64`): the
//! guest reaches its initramfs with 2 vCPUs, sees both, writes and reads back a vhost-user
//! block device served by the aarch64 `vhost-device-blk` (virtio-mmio in the FDT), powers
//! off through PSCI, and `vmm-frontend` exits 0. The host side (inside the emulated
//! machine) checks the bytes in the image.
//!
//! A second test boots on the GICv2 fallback with two block devices.
//!
//! The whole run is emulated, yet quick: 15-25 s per test here (see docs/aarch64.md).

use std::path::PathBuf;
use std::time::Duration;

use e2e::{Device, GuestSpec, Launcher};

#[test]
fn arm64_guest_boots_with_2_vcpus_and_uses_a_vhost_user_blk_device() {
    let test = "vmm_aarch64::arm64_guest_boots_with_2_vcpus_and_uses_a_vhost_user_blk_device";
    let Some(vmm) = e2e::aarch64::aarch64_or_skip(test) else {
        return;
    };
    let b = format!("/tmp/e2e-arm64-blk-{}", std::process::id());
    let sock = PathBuf::from(format!("{b}.sock"));
    let image = format!("{b}.img");
    let guest = r#"
echo "NPROC $(nproc)"
echo "ARCH $(uname -m)"
grep -q GICv3 /proc/interrupts && echo "IRQCHIP GICv3"
cat /sys/block/vda/size
dd if=/dev/urandom of=/tmp/pattern bs=64k count=16 2>/dev/null
dd if=/tmp/pattern of=/dev/vda bs=64k seek=1 conv=fsync 2>/dev/null || exit 2
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=64k skip=1 count=16 2>/dev/null || exit 3
cmp /tmp/pattern /tmp/back && echo "READBACK ok"
echo "GUEST-SUM $(md5sum < /tmp/pattern | cut -d' ' -f1)"
"#;
    let spec = GuestSpec::new(guest)
        .device(Device::blk(&sock).daemon(
            "vhost-device-blk",
            &["--socket-path", "{socket}", "--image", &image],
        ))
        .cpus(2)
        .memory_mib(512)
        .host_setup(&format!("truncate -s 32M {image}"))
        .host_check(&format!(
            "echo \"HOST-SUM $(dd if={image} bs=64k skip=1 count=16 2>/dev/null | md5sum | cut -d' ' -f1)\"; rm -f {image}"
        ))
        .timeout(Duration::from_secs(180));
    let run = vmm.run(&spec).expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert!(
        run.console.contains("@@E2E-VMM rc=0@@"),
        "vmm-frontend did not exit 0 after the guest's power-off:\n{}",
        run.console
    );
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(run.output.contains("NPROC 2"), "{}", run.output);
    assert!(run.output.contains("ARCH aarch64"), "{}", run.output);
    assert!(run.output.contains("IRQCHIP GICv3"), "{}", run.output);
    assert!(
        run.output.contains("\n65536\n"),
        "32 MiB disk: {}",
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

/// KVM in an emulated machine with a GICv2 has no GICv3 to offer: `vmm-frontend` falls
/// back to an in-kernel GICv2 (and says so), and the guest boots with both CPUs on it. Two
/// block devices this time: two virtio-mmio slots, two SPIs, two daemons.
#[test]
fn arm64_guest_boots_on_the_gicv2_fallback_with_two_devices() {
    let test = "vmm_aarch64::arm64_guest_boots_on_the_gicv2_fallback_with_two_devices";
    let Some(vmm) = e2e::aarch64::aarch64_or_skip(test) else {
        return;
    };
    let vmm = vmm.with_gic_v2();
    let b = format!("/tmp/e2e-arm64-two-{}", std::process::id());
    let mut spec = GuestSpec::new(
        r#"
echo "NPROC $(nproc)"
grep -o 'GIC[^ ]*' /proc/interrupts | sort -u | tr '\n' ' '; echo
for d in vda vdb; do
  echo "$d $(cat /sys/block/$d/size)"
  dd if=/dev/urandom of=/tmp/p-$d bs=64k count=2 2>/dev/null
  dd if=/tmp/p-$d of=/dev/$d bs=64k conv=fsync 2>/dev/null || exit 2
done
echo 3 > /proc/sys/vm/drop_caches
for d in vda vdb; do
  dd if=/dev/$d of=/tmp/b-$d bs=64k count=2 2>/dev/null || exit 3
  cmp /tmp/p-$d /tmp/b-$d && echo "READBACK $d ok"
  echo "GUEST-SUM $d $(md5sum < /tmp/p-$d | cut -d' ' -f1)"
done
"#,
    )
    .cpus(2)
    .memory_mib(256)
    .timeout(Duration::from_secs(120));
    let mut setup = Vec::new();
    let mut check = Vec::new();
    for (name, mib) in [("vda", 16), ("vdb", 8)] {
        let image = format!("{b}-{name}.img");
        spec = spec.device(
            Device::blk(&PathBuf::from(format!("{b}-{name}.sock"))).daemon(
                "vhost-device-blk",
                &["--socket-path", "{socket}", "--image", &image],
            ),
        );
        setup.push(format!("truncate -s {mib}M {image}"));
        check.push(format!(
            "echo \"HOST-SUM {name} $(dd if={image} bs=64k count=2 2>/dev/null | md5sum | cut -d' ' -f1)\"; rm -f {image}"
        ));
    }
    let spec = spec
        .host_setup(&setup.join("\n"))
        .host_check(&check.join("\n"));
    let run = vmm.run(&spec).expect("guest run");
    e2e::guest::say(&format!("{test}: {} in {:?}", run.launcher, run.duration));
    assert!(
        run.console.contains("using GICv2"),
        "vmm-frontend did not fall back to GICv2:\n{}",
        run.console
    );
    assert!(
        run.console.contains("@@E2E-VMM rc=0@@"),
        "vmm-frontend did not exit 0:\n{}",
        run.console
    );
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(run.output.contains("NPROC 2"), "{}", run.output);
    // The GICv2 driver names its chip "GIC-0", the GICv3 one "GICv3".
    assert!(
        run.output.contains("GIC-0") && !run.output.contains("GICv3"),
        "{}",
        run.output
    );
    // Device order follows the FDT: slot 0 (16 MiB) is vda, slot 1 (8 MiB) vdb.
    assert!(run.output.contains("vda 32768"), "{}", run.output);
    assert!(run.output.contains("vdb 16384"), "{}", run.output);
    for d in ["vda", "vdb"] {
        assert!(
            run.output.contains(&format!("READBACK {d} ok")),
            "{}",
            run.output
        );
        let prefix = format!("{d} ");
        let guest_sum = run
            .output
            .lines()
            .filter_map(|l| l.strip_prefix("GUEST-SUM "))
            .find_map(|l| l.strip_prefix(&prefix))
            .expect("guest sum");
        let host_sum = run
            .host_output
            .lines()
            .filter_map(|l| l.strip_prefix("HOST-SUM "))
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("host sum: {}", run.host_output));
        assert_eq!(
            guest_sum, host_sum,
            "{d}: the image differs from the guest's bytes"
        );
    }
}
