//! `cargo xtask test`: the project's one test command (the README's, and CI's).
//!
//! Installs what is missing, builds the guest images, then runs `cargo fmt --check`,
//! clippy and `cargo doc` with `-D warnings`, the aarch64 build, `cargo test --workspace`
//! and 30 s of each fuzz target, and
//! prints a summary that names every test that was skipped and why.

use std::process::Command;

use crate::util::{run, step, Result};

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Runs the whole suite.
pub fn run_all(extra_test_args: &[String]) -> Result<()> {
    let started = std::time::Instant::now();
    crate::deps::ensure_packages()?;
    if let Err(e) = crate::fuzz::ensure_cargo_fuzz() {
        step(&format!(
            "cargo-fuzz could not be installed ({e}); fuzzing will be skipped"
        ));
    }
    crate::guest::build()?;
    // The arm64 guest only serves the aarch64 e2e test, which says SKIPPED without it.
    if let Err(e) = crate::guest_arm64::build() {
        eprintln!("xtask: no arm64 guest image ({e}); the aarch64 e2e test will be skipped");
    }
    let skip_log = e2e::paths::skip_log();
    let _ = std::fs::remove_file(&skip_log);

    let mut results: Vec<(&str, Result<()>)> = Vec::new();
    step("cargo fmt --check");
    results.push((
        "cargo fmt --all -- --check",
        run(cargo().args(["fmt", "--all", "--", "--check"])),
    ));
    step("cargo clippy");
    results.push((
        "cargo clippy --workspace --all-targets -- -D warnings",
        run(cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])),
    ));
    step("cargo doc");
    results.push((
        "RUSTDOCFLAGS=-D warnings cargo doc --workspace --no-deps",
        run(cargo()
            .env("RUSTDOCFLAGS", "-D warnings")
            .args(["doc", "--workspace", "--no-deps"])),
    ));
    let aarch64 = "aarch64-unknown-linux-gnu";
    let target_installed = || {
        crate::util::output(Command::new("rustup").args(["target", "list", "--installed"]))
            .is_ok_and(|t| t.lines().any(|l| l.trim() == aarch64))
    };
    let mut installed = target_installed();
    if !installed {
        // A fresh machine has only the host target: add it (this needs rustup's download
        // server; where that is out of reach the build below says NOT BUILT).
        step(&format!("rustup target add {aarch64}"));
        let added = Command::new("timeout")
            .args(["300", "rustup", "target", "add", aarch64])
            .status()
            .is_ok_and(|s| s.success());
        installed = added && target_installed();
    }
    let mut notes = Vec::new();
    if installed {
        // A real link (cross linker from gcc-aarch64-linux-gnu), not only a check, and
        // before `cargo test`: the aarch64 e2e test boots these binaries inside an
        // emulated arm64 machine.
        step(&format!("cargo build --target {aarch64}"));
        results.push((
            "cargo build --target aarch64-unknown-linux-gnu -p vmm-frontend -p vhost-device-blk",
            run(cargo().args([
                "build",
                "--target",
                aarch64,
                "-p",
                "vmm-frontend",
                "-p",
                "vhost-device-blk",
            ])),
        ));
        step(&format!(
            "cargo check --target {aarch64} (the other daemons)"
        ));
        results.push((
            "cargo check --target aarch64-unknown-linux-gnu -p vhost-device-net -p vhost-device-vsock -p vhost-device-console",
            run(cargo().args([
                "check",
                "--target",
                aarch64,
                "-p",
                "vhost-device-net",
                "-p",
                "vhost-device-vsock",
                "-p",
                "vhost-device-console",
            ])),
        ));
    } else {
        notes.push(format!(
            "NOT BUILT: the {aarch64} build of vmm-frontend and the daemons (the Rust target is not installed: rustup target add {aarch64})"
        ));
    }

    // The end-to-end tests run the daemons' and vmm-frontend's real binaries, which
    // `cargo test` alone does not build for another package's tests.
    step("cargo build --workspace --bins");
    let built = run(cargo().args(["build", "--workspace", "--bins"]));
    let tested = if built.is_ok() {
        step("cargo test");
        run(cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .args(extra_test_args))
    } else {
        Err("not run: the binaries did not build".into())
    };
    results.push(("cargo build --workspace --bins", built));
    results.push(("cargo test --workspace --no-fail-fast", tested));
    // A short run of every fuzz target (a longer one: cargo xtask fuzz --seconds N).
    match crate::fuzz::unavailable() {
        Some(why) => {
            eprintln!("SKIPPED fuzz: {why}");
            notes.push(format!("SKIPPED fuzz: {why}"));
        }
        None => results.push((
            "cargo xtask fuzz --seconds 30 (every target, 30 s each)",
            crate::fuzz::run_targets(&[], 30),
        )),
    }

    eprintln!(
        "\n==================== summary ({:.0} s) ====================",
        started.elapsed().as_secs_f64()
    );
    let mut failed = false;
    for (what, result) in &results {
        match result {
            Ok(()) => eprintln!("  ok    {what}"),
            Err(e) => {
                failed = true;
                eprintln!("  FAIL  {what}: {e}");
            }
        }
    }
    for n in &notes {
        eprintln!("  {n}");
    }
    match std::fs::read_to_string(&skip_log) {
        Ok(text) if !text.trim().is_empty() => {
            eprintln!("  SKIPPED tests (they did not run, see why):");
            for line in text.lines() {
                eprintln!("    - {line}");
            }
        }
        _ => eprintln!("  no test was skipped"),
    }
    if failed {
        Err("the test suite failed".into())
    } else {
        Ok(())
    }
}
