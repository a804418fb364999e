//! `cargo xtask fuzz [--seconds N] [--seed] [TARGET...]`: the cargo-fuzz targets of `fuzz/`.
//!
//! The targets build guest memory and virtqueues from libFuzzer's input and drive the
//! daemons' real parsers and queue handlers (see `fuzz/src/lib.rs`). They need the nightly
//! toolchain (`-Zsanitizer=address`) and cargo-fuzz; [`ensure_cargo_fuzz`] installs the
//! latter with `cargo install` when it is missing. Builds go to `target/fuzz-build`, new
//! corpus entries to `target/fuzz-corpus/<target>` (the committed seeds in
//! `fuzz/corpus/<target>` are read, never written), crash inputs to `fuzz/artifacts/`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::util::{output, run, step, Result};

/// Every fuzz target, as named in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &["blk_request", "net_tx", "vsock_tx", "console_control"];

/// Longest input libFuzzer makes (the guest memory image is 64 KiB; the seeds are < 20 KB).
const MAX_LEN: &str = "-max_len=20000";

fn root() -> PathBuf {
    e2e::paths::workspace_root()
}

/// `cargo` through rustup's proxy, so `+nightly` selects the toolchain (not the `$CARGO`
/// of the stable toolchain running the xtask).
fn nightly_cargo() -> Command {
    let mut c = Command::new("cargo");
    c.arg("+nightly")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_TARGET_DIR", root().join("target/fuzz-build"))
        .current_dir(root().join("fuzz"));
    c
}

fn has_nightly() -> bool {
    Command::new("cargo")
        .args(["+nightly", "--version"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn has_cargo_fuzz() -> bool {
    output(
        Command::new("cargo")
            .args(["+nightly", "fuzz", "--version"])
            .env_remove("RUSTUP_TOOLCHAIN"),
    )
    .is_ok()
}

/// Installs cargo-fuzz into cargo's bin directory when it is missing and the nightly
/// toolchain is there to use it (the `deps` step).
pub fn ensure_cargo_fuzz() -> Result<()> {
    if !has_nightly() {
        step("cargo-fuzz: not installed, the nightly toolchain is missing (rustup toolchain install nightly); fuzzing will be skipped");
        return Ok(());
    }
    if has_cargo_fuzz() {
        step("cargo-fuzz: present");
        return Ok(());
    }
    step("installing cargo-fuzz: cargo install cargo-fuzz --locked");
    run(Command::new("cargo").env_remove("RUSTUP_TOOLCHAIN").args([
        "install",
        "cargo-fuzz",
        "--locked",
    ]))
}

/// Why fuzzing cannot run here, or `None` when it can.
pub fn unavailable() -> Option<String> {
    if !has_nightly() {
        return Some("no nightly toolchain (rustup toolchain install nightly)".into());
    }
    if !has_cargo_fuzz() {
        return Some("cargo-fuzz is not installed (cargo xtask deps installs it)".into());
    }
    None
}

/// libFuzzer's final figures for one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Inputs executed.
    pub execs: u64,
    /// Average executions per second.
    pub per_sec: u64,
}

fn stat(log: &str, name: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.strip_prefix(&format!("stat::{name}:")))
        .filter_map(|v| v.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// Builds every target (address sanitizer, optimized).
pub fn build() -> Result<()> {
    step("cargo +nightly fuzz build -O (target/fuzz-build)");
    run(nightly_cargo().args(["fuzz", "build", "-O"]))
}

/// Runs `target` for `seconds`; a crash is an error naming the input that caused it.
pub fn run_target(target: &str, seconds: u64) -> Result<Stats> {
    let bin = root()
        .join("target/fuzz-build/x86_64-unknown-linux-gnu/release")
        .join(target);
    let work = root().join("target/fuzz-corpus").join(target);
    let seeds = root().join("fuzz/corpus").join(target);
    let artifacts = root().join("fuzz/artifacts").join(target);
    for d in [&work, &artifacts] {
        crate::util::mkdir(d)?;
    }
    step(&format!("fuzz {target} for {seconds} s"));
    let started = Instant::now();
    let out = Command::new(&bin)
        .arg(format!("-max_total_time={seconds}"))
        .arg(MAX_LEN)
        .arg("-timeout=10")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&work)
        .arg(&seeds)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let stats = Stats {
        execs: stat(&log, "number_of_executed_units"),
        per_sec: stat(&log, "average_exec_per_sec"),
    };
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        eprintln!("{}", tail.join("\n"));
        return Err(format!(
            "fuzz target {target} crashed after {:.0} s ({}); the input is in {} (replay: {} <file>)",
            started.elapsed().as_secs_f64(),
            out.status,
            artifacts.display(),
            bin.display()
        ));
    }
    step(&format!(
        "fuzz {target}: {} executions, {} exec/s, no crash",
        stats.execs, stats.per_sec
    ));
    Ok(stats)
}

/// Builds and runs `targets` (all when empty) for `seconds` each.
pub fn run_targets(targets: &[String], seconds: u64) -> Result<()> {
    for t in targets {
        if !TARGETS.contains(&t.as_str()) {
            return Err(format!(
                "unknown fuzz target `{t}`; the targets are: {}",
                TARGETS.join(", ")
            ));
        }
    }
    let chosen: Vec<&str> = if targets.is_empty() {
        TARGETS.to_vec()
    } else {
        targets.iter().map(String::as_str).collect()
    };
    build()?;
    let mut failures = Vec::new();
    for t in chosen {
        if let Err(e) = run_target(t, seconds) {
            failures.push(e);
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// `cargo xtask fuzz [--seconds N] [--seed] [TARGET...]`.
pub fn run_cli(args: &[String]) -> Result<()> {
    let mut seconds = 600u64;
    let mut seed = false;
    let mut targets = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                let v = it.next().ok_or("--seconds needs a number")?;
                seconds = v
                    .parse()
                    .map_err(|_| format!("--seconds {v}: not a number of seconds"))?;
            }
            "--seed" => seed = true,
            other if other.starts_with('-') => {
                return Err(format!(
                    "unknown option {other}; usage: cargo xtask fuzz [--seconds N] [--seed] [TARGET...]"
                ))
            }
            other => targets.push(other.to_string()),
        }
    }
    if let Some(why) = unavailable() {
        return Err(format!("cannot fuzz: {why}"));
    }
    if seed {
        step("writing the seed corpora into fuzz/corpus (cargo +nightly run --example seed)");
        return run(nightly_cargo().args(["run", "--release", "--example", "seed"]));
    }
    run_targets(&targets, seconds)
}
