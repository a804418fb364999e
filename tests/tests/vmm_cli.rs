//! `vmm-frontend` as a user starts it wrong: each mistake is one line on stderr naming what
//! is wrong, and a non-zero exit status. None of these need KVM: the VMM checks the kernel,
//! the initramfs and the daemons' sockets before it opens `/dev/kvm`.

use std::process::{Command, Output};

fn vmm(args: &[&str]) -> Option<Output> {
    let bin = e2e::bin_path("vmm-frontend");
    if !bin.exists() {
        e2e::qemu::skip(
            "vmm_cli",
            &format!(
                "{} is not built (cargo build -p vmm-frontend)",
                bin.display()
            ),
        );
        return None;
    }
    Some(
        Command::new(bin)
            .args(args)
            .output()
            .expect("run vmm-frontend"),
    )
}

/// The single stderr line, asserting there is exactly one and the exit status is 1.
fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("vmm-frontend: error: "), "{stderr}");
    lines[0].to_string()
}

#[test]
fn a_kernel_that_does_not_exist_is_named() {
    let Some(out) = vmm(&["--kernel", "/nonexistent/vmlinuz"]) else {
        return;
    };
    let line = one_line_error(&out);
    assert!(line.contains("/nonexistent/vmlinuz"), "{line}");
}

#[test]
fn an_initramfs_that_does_not_exist_is_named() {
    let kernel = std::env::current_exe().expect("exe");
    let kernel = kernel.to_str().expect("utf-8");
    let Some(out) = vmm(&["--kernel", kernel, "--initramfs", "/nonexistent/initrd.gz"]) else {
        return;
    };
    let line = one_line_error(&out);
    assert!(line.contains("/nonexistent/initrd.gz"), "{line}");
}

#[test]
fn a_missing_daemon_names_its_socket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("blk.sock");
    let kernel = std::env::current_exe().expect("exe");
    let Some(out) = vmm(&[
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--blk",
        &format!("socket={}", sock.display()),
    ]) else {
        return;
    };
    let line = one_line_error(&out);
    assert!(
        line.contains(&sock.display().to_string()) && line.contains("blk daemon"),
        "{line}"
    );
}

#[test]
fn malformed_device_options_are_refused() {
    for (args, needle) in [
        (&["--net", "socket=/x,mac=zz"][..], "mac must look like"),
        (&["--vsock", "socket=/x"], "cid=N is required"),
        (&["--blk", "queues=2"], "socket=PATH is required"),
        (&["--memory", "1M"], "--memory 1M"),
        (&["--serial", "tcp"], "--serial tcp"),
    ] {
        let mut all = vec!["--kernel", "/k"];
        all.extend_from_slice(args);
        let Some(out) = vmm(&all) else { return };
        let line = one_line_error(&out);
        assert!(line.contains(needle), "{args:?}: {line}");
    }
}
