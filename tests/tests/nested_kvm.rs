//! The nested set-up vmm-frontend's guest tests stand on: a QEMU TCG guest with `-cpu max`
//! has a working KVM once it loads the kvm modules of the same Debian kernel.

use std::time::Duration;

use e2e::qemu::{guest_image_or_skip, which};

#[test]
fn l2_guest_has_a_working_kvm() {
    let test = "nested_kvm::l2_guest_has_a_working_kvm";
    if which("qemu-system-x86_64").is_none() {
        e2e::qemu::skip(test, "qemu-system-x86_64 is not installed");
        return;
    }
    if !guest_image_or_skip(test) {
        return;
    }
    let run = e2e::nested::run_l2(
        "ls -l /dev/kvm; grep -E '^(kvm|kvm_amd|kvm_intel) ' /proc/modules | cut -d' ' -f1; dmesg | grep -i -E 'nested|svm' | head -5",
        Duration::from_secs(60),
    )
    .expect("L2 run");
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    assert!(
        run.output.contains("/dev/kvm"),
        "no /dev/kvm in L2:\n{}",
        run.output
    );
    assert!(
        run.output.lines().any(|l| l == "kvm"),
        "kvm not loaded:\n{}",
        run.output
    );
    e2e::guest::say(&format!("e2e: L2 KVM check:\n{}", run.output));
}
