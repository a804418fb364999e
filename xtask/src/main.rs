//! Project tasks, after the cargo-xtask convention: `cargo xtask <task>`.

mod bench_blk;
mod bench_blk_vmm;
mod bench_boot;
mod bench_console;
mod bench_net;
mod bench_vsock;
mod demo;
mod deps;
mod fuzz;
mod guest;
mod guest_arm64;
mod install;
mod man;
mod test;
mod util;

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  demo             the main job: a guest booted by vmm-frontend with all four daemons
                   attached, using each device; needs nothing else
  test [-- ARGS]   the whole test suite: installs what is missing (as root), builds the
                   guest image, then fmt --check, clippy -D warnings, cargo test --workspace
  guest            build the test guest (Debian cloud kernel + initramfs) into target/guest
  guest-arm64      build the arm64 test guest (Debian arm64 cloud kernel Image + initramfs)
                   into target/guest-arm64, for the aarch64 vmm-frontend test
  deps             install the Debian packages the tests need (as root), and cargo-fuzz
  fuzz [--seconds N] [--seed] [TARGET...]
                   run the cargo-fuzz targets (all by default) N seconds each (600), with
                   the nightly toolchain; --seed rewrites the seed corpora in fuzz/corpus
  man [DIR]        man pages and shell completions from the clap definitions, into DIR
                   (default: the target directory): DIR/man/man1, DIR/completions
  install [--prefix P] [--destdir D] [--no-build]
                   build and install the daemons, man pages, completions, systemd units,
                   QEMU vhost-user descriptors and example configurations
  bench boot [--rounds N]
                   vmm-frontend against QEMU q35 and microvm: time to the guest's init and
                   the VMM's own memory, same kernel, initramfs and KVM (nested here)
  bench blk        vhost-device-blk against qemu-storage-daemon: synthetic frontend (IOPS,
                   latency, CPU per request) and guest fio; table + JSON (--quick)
  bench blk-vmm [--runs N] [--seconds S]
                   guest fio on vhost-device-blk with vmm-frontend against QEMU q35 as the
                   frontend, same guest, image and KVM (nested here); table + JSON
  bench net        our net daemon against QEMU's built-in virtio-net on a tap (vhost=off),
                   same guest and iperf3 runs: TCP each way, 64-byte UDP rate (--quick)
  bench vsock      our vsock daemon against rust-vmm's vhost-device-vsock (--quick)
  bench console    our console daemon against rust-vmm's vhost-device-console on a synthetic
                   frontend: throughput each way, CPU per MiB, line round trip (--quick)
";

/// Runs this task again from an optimised build of xtask, in place of this process.
fn run_optimized(args: &[String]) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let err = std::process::Command::new(&cargo)
        .args(["run", "--quiet", "--release", "--package", "xtask", "--"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .exec();
    Err(format!(
        "cannot run `{cargo} run --release --package xtask`: {err}"
    ))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => {
            let rest: Vec<String> = args
                .iter()
                .skip(1)
                .skip_while(|a| *a == "--")
                .cloned()
                .collect();
            test::run_all(&rest)
        }
        Some("demo") => demo::run_demo(),
        Some("guest") => deps::ensure_packages().and_then(|()| guest::build()),
        Some("guest-arm64") => deps::ensure_packages().and_then(|()| guest_arm64::build()),
        Some("deps") => deps::ensure_packages().and_then(|()| fuzz::ensure_cargo_fuzz()),
        Some("fuzz") => fuzz::run_cli(&args[1..]),
        Some("man") => man::run(
            &args
                .get(1)
                .map_or_else(man::target_dir, std::path::PathBuf::from),
        ),
        Some("install") => install::run(&args[1..]),
        // The synthetic frontends in the benchmarks are part of the measurement: built
        // without optimisation (`cargo xtask` runs the dev profile) they, not the daemons,
        // set the pace.
        Some("bench") if cfg!(debug_assertions) => run_optimized(&args),
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("blk") => bench_blk::run(&args[2..]),
            Some("blk-vmm") => bench_blk_vmm::run(&args[2..]),
            Some("boot") => bench_boot::run(&args[2..]),
            Some("console") => bench_console::run(&args[2..]),
            Some("net") => bench_net::run(&args[2..]),
            Some("vsock") => bench_vsock::run(&args[2..]),
            other => Err(format!("unknown benchmark {other:?}\n{USAGE}")),
        },
        Some("-h" | "--help" | "help") => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(format!("unknown task `{other}`\n{USAGE}")),
        None => Err(USAGE.to_string()),
    };
    if let Err(e) = result {
        eprintln!("xtask: error: {e}");
        std::process::exit(1);
    }
}
