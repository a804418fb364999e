//! The guest image boots under QEMU and runs a command: the ground every device test stands on.

use std::time::Duration;

use e2e::{qemu_or_skip, GuestSpec};

#[test]
fn guest_boots_and_runs_a_command() {
    let Some(qemu) = qemu_or_skip("boot::guest_boots_and_runs_a_command") else {
        return;
    };
    let run = GuestSpec::new("uname -r; cat /proc/cmdline; echo files: $(cat /e2e/hello); exit 7")
        .file("/e2e/hello", "from the test")
        .kernel_arg("e2e.extra=42")
        .timeout(Duration::from_secs(60))
        .run(&qemu)
        .expect("guest run");
    let release =
        std::fs::read_to_string(e2e::paths::guest_dir().join("stamp")).unwrap_or_default();
    let release = release
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_start_matches("linux-image-")
        .to_string();
    assert_eq!(run.exit_code, Some(7), "{}", run.console);
    let lines: Vec<&str> = run.output.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(release.as_str()),
        "{}",
        run.console
    );
    assert!(
        lines[1].contains("e2e.extra=42") && lines[1].contains("console=ttyS0"),
        "{}",
        run.output
    );
    assert_eq!(lines[2], "files: from the test");
}

#[test]
fn guest_sees_its_virtio_drivers_loaded() {
    let Some(qemu) = qemu_or_skip("boot::guest_sees_its_virtio_drivers_loaded") else {
        return;
    };
    let run =
        GuestSpec::new("cut -d' ' -f1 /proc/modules | sort; which fio socat iperf3; fio --version")
            .timeout(Duration::from_secs(60))
            .run(&qemu)
            .expect("guest run");
    assert_eq!(run.exit_code, Some(0), "{}", run.console);
    for module in [
        "virtio_pci",
        "virtio_blk",
        "virtio_net",
        "virtio_console",
        "vmw_vsock_virtio_transport",
    ] {
        assert!(
            run.output.lines().any(|l| l == module),
            "{module} not loaded:\n{}",
            run.output
        );
    }
    assert!(
        run.output.contains("/usr/bin/fio") && run.output.contains("fio-3."),
        "{}",
        run.output
    );
}

#[test]
fn a_hung_guest_command_fails_with_the_console() {
    let Some(qemu) = qemu_or_skip("boot::a_hung_guest_command_fails_with_the_console") else {
        return;
    };
    let err = GuestSpec::new("echo started; sleep 600")
        .timeout(Duration::from_secs(5))
        .run(&qemu)
        .expect_err("a command that outlives its timeout must fail the run");
    let text = err.to_string();
    assert!(text.contains("did not finish within 5 s"), "{text}");
    assert!(text.contains("started"), "{text}");
}
