//! `cargo xtask bench boot`: vmm-frontend against QEMU (`-machine q35` and `microvm`) booting
//! the same kernel and initramfs under the same KVM: time from start to the guest init's
//! marker, and the VMM's own resident memory.
//!
//! Where the host's KVM cannot run a stock kernel (these development machines), all three
//! run inside one L2 guest with nested KVM, alternating, so they share the same conditions.
//! Guest memory is a shared memfd for all three, so the memory column is the VMM's own
//! anonymous memory (`RssAnon`), with the peak resident set (`VmHWM`, guest pages the VMM
//! touched included) beside it. Options: `--rounds N` (default 5), `--memory MIB` (512).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::GuestSpec;

use crate::util::{step, Result};

/// Boot milliseconds, `RssAnon` KiB and `VmHWM` KiB, one entry per round.
type Samples = (Vec<u64>, Vec<u64>, Vec<u64>);

const SUBJECTS: [&str; 3] = ["vmm-frontend", "qemu-q35", "qemu-microvm"];

/// QEMU's firmware files the two machine types load.
const FIRMWARE: &[&str] = &[
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/bios-microvm.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/linuxboot.bin",
    "/usr/share/qemu/kvmvapic.bin",
    "/usr/share/qemu/pvh.bin",
];

/// The L3 guest's kernel command line (the test guest's marker tag is `g`).
pub(crate) const L3_APPEND: &str = "console=ttyS0 quiet panic=-1 e2e.tag=g";

/// The shell command, inside L2, of QEMU booting the L3 kernel and initramfs under KVM with
/// `memory` (e.g. `512M`) in a shared memfd, the serial console on stdout, and `extra`
/// arguments (devices) at the end.
pub(crate) fn qemu_l3(machine: &str, memory: &str, extra: &str) -> String {
    format!(
        "/usr/bin/qemu-system-x86_64 -L /usr/share/qemu -machine {machine},accel=kvm,memory-backend=mem \
         -object memory-backend-memfd,id=mem,size={memory},share=on -cpu host -m {memory} -nodefaults \
         -no-user-config -display none -serial stdio -no-reboot -kernel /l3/vmlinuz \
         -initrd /l3/initrd.gz -append '{L3_APPEND}' {extra}"
    )
}

/// The shell command, inside L2, of vmm-frontend booting the same L3 guest with `memory`
/// and `extra` arguments (devices) at the end.
pub(crate) fn vmm_l3(memory: &str, extra: &str) -> String {
    format!(
        "/usr/bin/vmm-frontend --kernel /l3/vmlinuz --initramfs /l3/initrd.gz --memory {memory} \
         --cmdline '{L3_APPEND}' --serial stdio {extra}"
    )
}

fn script(rounds: u32, memory: u32) -> String {
    let mem = format!("{memory}M");
    let qemu = |machine: &str| qemu_l3(machine, &mem, "");
    format!(
        r#"cs() {{ cut -d' ' -f1 /proc/uptime | tr -d .; }}
measure() {{
  name=$1; shift
  t0=$(cs); mark=""; last=""
  rm -f /tmp/out; sh -c "$*" > /tmp/out 2>/tmp/err &
  pid=$!
  while kill -0 $pid 2>/dev/null; do
    if [ -z "$mark" ] && grep -q '@@E2E-INIT:g@@' /tmp/out; then mark=$(( ($(cs) - t0) * 10 )); fi
    s=$(grep -E '^(VmHWM|RssAnon)' /proc/$pid/status 2>/dev/null | tr -s ' \t' ' ' | tr '\n' ' ')
    [ -n "$s" ] && last="$s"
    sleep 0.02
  done
  [ -z "$mark" ] && {{ echo "no marker from $name:"; tail -5 /tmp/out /tmp/err; }}
  echo "BENCH $name ms=$mark $last"
}}
i=0
while [ $i -lt {rounds} ]; do
  i=$((i+1))
  measure vmm-frontend "exec {vmm}"
  measure qemu-q35 "exec {q35}"
  measure qemu-microvm "exec {microvm}"
done
"#,
        vmm = vmm_l3(&mem, ""),
        q35 = qemu("q35"),
        microvm = qemu("microvm"),
    )
}

/// One parsed `BENCH` line: subject, ms to the marker, `RssAnon` and `VmHWM` in KiB.
fn parse(line: &str) -> Option<(String, u64, u64, u64)> {
    let rest = line.trim().strip_prefix("BENCH ")?;
    let mut words = rest.split_whitespace();
    let name = words.next()?.to_string();
    let ms = words.next()?.strip_prefix("ms=")?.parse().ok()?;
    let mut anon = 0;
    let mut hwm = 0;
    let words: Vec<&str> = words.collect();
    for w in words.windows(2) {
        match w[0] {
            "RssAnon:" => anon = w[1].parse().unwrap_or(0),
            "VmHWM:" => hwm = w[1].parse().unwrap_or(0),
            _ => {}
        }
    }
    Some((name, ms, anon, hwm))
}

/// The median (the mean of the two middle values for an even count; 0 for none).
fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    let mid = v.len() / 2;
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[mid],
        _ => v[mid - 1].midpoint(v[mid]),
    }
}

fn add_file(spec: GuestSpec, dest: &str, src: &Path, mode: u32) -> Result<GuestSpec> {
    let body = std::fs::read(src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
    Ok(if mode & 0o111 != 0 {
        spec.exec_file(dest, body)
    } else {
        spec.file(dest, body)
    })
}

/// Builds `packages` with the release profile; returns the directory of the binaries.
pub(crate) fn build_release(packages: &[&str]) -> Result<PathBuf> {
    step(&format!("building {} (release)", packages.join(", ")));
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(["build", "--release"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    crate::util::run(&mut cmd)?;
    Ok(crate::man::target_dir().join("release"))
}

/// An L2 guest (nested KVM) that runs `script` within `timeout`, carrying QEMU with its
/// firmware, the `programs` under `/usr/bin` (stripped), the shared libraries of all of
/// them, and the L3 kernel and `l3_initrd` at `/l3/vmlinuz` and `/l3/initrd.gz`. Returns
/// the spec and QEMU's version line.
pub(crate) fn l2_spec(
    script: &str,
    timeout: Duration,
    programs: &[PathBuf],
    l3_initrd: &[u8],
    work: &Path,
) -> Result<(GuestSpec, String)> {
    let qemu =
        crate::util::which("qemu-system-x86_64").ok_or("qemu-system-x86_64 is not installed")?;
    let version = crate::util::output(Command::new(&qemu).arg("--version"))?
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let mut spec = GuestSpec::new(script).timeout(timeout);
    let mut libs: Vec<PathBuf> = e2e::nested::libraries(&qemu);
    for program in programs {
        let name = program
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("bin");
        spec = spec.exec_file(
            &format!("/usr/bin/{name}"),
            e2e::nested::stripped(program, work)?,
        );
        libs.extend(e2e::nested::libraries(program));
    }
    spec = add_file(spec, "/usr/bin/qemu-system-x86_64", &qemu, 0o755)?;
    libs.sort();
    libs.dedup();
    for lib in libs {
        spec = add_file(spec, &lib.display().to_string(), &lib, 0o755)?;
    }
    for fw in FIRMWARE {
        let src = Path::new(fw);
        if src.exists() {
            let name = src.file_name().and_then(|n| n.to_str()).unwrap_or("fw");
            spec = add_file(spec, &format!("/usr/share/qemu/{name}"), src, 0o644)?;
        }
    }
    spec = add_file(spec, "/l3/vmlinuz", &e2e::paths::kernel(), 0o644)?;
    Ok((spec.file("/l3/initrd.gz", l3_initrd), version))
}

/// Runs the benchmark.
pub fn run(args: &[String]) -> Result<()> {
    let mut rounds = 5u32;
    let mut memory = 512u32;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |what: &str| -> Result<u32> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{what} needs a number"))
        };
        match a.as_str() {
            "--rounds" => rounds = value("--rounds")?.max(1),
            "--memory" => memory = value("--memory")?.max(64),
            other => return Err(format!("unknown option {other} (--rounds N, --memory MIB)")),
        }
    }
    crate::deps::ensure_packages()?;
    crate::guest::build()?;
    let release = build_release(&["vmm-frontend"])?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let l3_initrd =
        std::fs::read(e2e::paths::initrd()).map_err(|e| format!("cannot read the guest: {e}"))?;
    let (spec, version) = l2_spec(
        &script(rounds, memory),
        Duration::from_secs(u64::from(rounds) * 3 * 90 + 60),
        &[release.join("vmm-frontend")],
        &l3_initrd,
        work.path(),
    )?;

    step(&format!(
        "booting the test guest {rounds} times with each VMM, alternating, in one nested-KVM guest"
    ));
    let out = e2e::nested::run_l2_spec(&spec).map_err(|e| e.to_string())?;
    let mut results: BTreeMap<String, Samples> = BTreeMap::new();
    for line in out.output.lines() {
        if line.starts_with("no marker") {
            eprintln!("{line}");
        }
        if let Some((name, ms, anon, hwm)) = parse(line) {
            let e = results.entry(name).or_default();
            e.0.push(ms);
            e.1.push(anon);
            e.2.push(hwm);
        }
    }
    if results.len() < SUBJECTS.len() {
        return Err(format!("not every VMM reported a boot:\n{}", out.output));
    }
    let mut table = format!(
        "boot to the guest init marker, median of {rounds}, {memory} MiB, 1 vCPU, nested KVM in QEMU TCG\n\
         {:<14} {:>10} {:>14} {:>12} {:>10}\n",
        "VMM", "boot ms", "RssAnon KiB", "VmHWM KiB", "boot ratio"
    );
    let mut med = BTreeMap::new();
    for name in SUBJECTS {
        let (ms, anon, hwm) = results.get_mut(name).ok_or("missing subject")?;
        med.insert(name, (median(ms), median(anon), median(hwm)));
    }
    let ours = med["vmm-frontend"].0.max(1);
    let mut json = String::from("{");
    for name in SUBJECTS {
        let (ms, anon, hwm) = med[name];
        let ratio = ms as f64 / ours as f64;
        let _ = writeln!(
            table,
            "{name:<14} {ms:>10} {anon:>14} {hwm:>12} {ratio:>9.2}x"
        );
        let _ = write!(
            json,
            "\"{name}\":{{\"boot_ms\":{ms},\"rss_anon_kib\":{anon},\"vm_hwm_kib\":{hwm}}},"
        );
    }
    let _ = write!(
        json,
        "\"rounds\":{rounds},\"memory_mib\":{memory},\"qemu\":\"{}\"}}",
        version.replace('"', "")
    );
    let _ = writeln!(
        table,
        "(boot ratio: the VMM's time over vmm-frontend's; {version}; the target is q35 >= 3x)"
    );
    print!("{table}");
    let dir = crate::man::target_dir().join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("boot.json"), json).map_err(|e| e.to_string())?;
    step(&format!("written {}", dir.join("boot.json").display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_lines_parse() {
        let l = "BENCH qemu-q35 ms=2340 VmHWM: 560000 kB RssAnon: 27000 kB ";
        assert_eq!(parse(l), Some(("qemu-q35".into(), 2340, 27000, 560_000)));
        assert_eq!(parse("BENCH vmm-frontend ms= "), None);
        assert_eq!(parse("noise"), None);
    }
}
