//! `cargo xtask bench blk-vmm`: the block benchmark's guest part with vmm-frontend as the
//! frontend, against QEMU (`-machine q35`, `vhost-user-blk-pci`), on the same daemon.
//!
//! The same test guest (the Debian kernel and the initramfs with fio) runs the same fio
//! workloads as `cargo xtask bench blk`'s guest part (direct, libaio) on a release build of
//! vhost-device-blk serving the same raw image in tmpfs; only the frontend differs. Both
//! frontends boot that guest under the same KVM: where the host's KVM cannot run a stock
//! kernel (these development machines), inside one L2 guest with nested KVM, as `bench
//! boot` does, alternating which frontend goes first in each run. A fresh daemon serves
//! every boot. Guest memory is a shared memfd for both.
//!
//! The ratio is vmm-frontend over QEMU (IOPS; at QD1 the inverse of the mean completion
//! latency), so above 1.0 means the guest does more I/O under vmm-frontend.
//!
//! Options: `--runs N` (3), `--seconds S` (fio runtime per workload, 3), `--cpus N` (guest
//! vCPUs, 1: L2 has one), `--queues N` (1), `--memory MIB` (guest, 512), `--json PATH`
//! (default `target/bench/blk-vmm.json`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::bench_blk::{self, Figure, Row, WORKLOADS};
use crate::bench_boot;
use crate::util::{step, Result};

/// The image vhost-device-blk serves inside L2 (tmpfs: L2's root is its initramfs).
const IMAGE_MIB: u64 = 512;

/// The two frontends, as the L2 script names them.
const OURS: &str = "vmm-frontend";
const THEIRS: &str = "qemu-q35";

#[derive(Debug, Clone, PartialEq)]
struct Settings {
    runs: u32,
    seconds: u32,
    cpus: u32,
    queues: u32,
    memory: u32,
    json: PathBuf,
}

fn parse(args: &[String]) -> Result<Settings> {
    let mut s = Settings {
        runs: 3,
        seconds: 3,
        cpus: 1,
        queues: 1,
        memory: 512,
        json: crate::man::target_dir().join("bench/blk-vmm.json"),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--json" {
            s.json = it.next().map(PathBuf::from).ok_or("--json needs a path")?;
            continue;
        }
        let mut value = |what: &str| -> Result<u32> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|v| *v > 0)
                .ok_or_else(|| format!("{what} needs a positive whole number"))
        };
        match a.as_str() {
            "--runs" => s.runs = value("--runs")?,
            "--seconds" => s.seconds = value("--seconds")?,
            "--cpus" => s.cpus = value("--cpus")?,
            "--queues" => s.queues = value("--queues")?,
            "--memory" => s.memory = value("--memory")?.max(128),
            other => {
                return Err(format!(
                    "unknown option {other} (--runs N, --seconds S, --cpus N, --queues N, --memory MIB, --json PATH)"
                ))
            }
        }
    }
    Ok(s)
}

/// The L2 script: make the image, touch twice the guest's memory once (L2's memory is
/// backed lazily by its host; without this, the first pair, where vmm-frontend always goes
/// first, was vmm-frontend's worst in each of three runs here), then per run and frontend (alternating which goes
/// first) start a fresh daemon, boot the guest, stop the daemon, and print the guest's
/// result lines as `BENCH <frontend> 0 <workload> <terse>`.
fn script(s: &Settings) -> String {
    let mem = format!("{}M", s.memory);
    let sock = "/tmp/blk.sock";
    let vmm = bench_boot::vmm_l3(
        &mem,
        &format!("--cpus {} --blk socket={sock},queues={}", s.cpus, s.queues),
    );
    let qemu = bench_boot::qemu_l3(
        "q35",
        &mem,
        &format!(
            "-smp {} -chardev socket,id=blk0,path={sock} -device vhost-user-blk-pci,chardev=blk0,num-queues={}",
            s.cpus, s.queues
        ),
    );
    format!(
        r#"cd /tmp
dd if=/dev/zero of=/tmp/disk.img bs=1M count={IMAGE_MIB} 2>/dev/null || {{ echo "cannot make the image"; exit 1; }}
dd if=/dev/zero of=/tmp/warm bs=1M count={warm} 2>/dev/null; rm -f /tmp/warm
run() {{
  name=$1; shift
  rm -f {sock} /tmp/out
  /usr/bin/vhost-device-blk --socket-path {sock} --image /tmp/disk.img --num-queues {queues} > /tmp/daemon.log 2>&1 &
  d=$!
  n=0; while [ ! -S {sock} ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  if [ -S {sock} ]; then sh -c "$*" > /tmp/out 2>/tmp/err; else echo "vhost-device-blk did not start"; fi
  kill -TERM $d 2>/dev/null; wait $d
  tr -d '\r' < /tmp/out | grep '^R ' | sed "s/^R /BENCH $name /"
  grep -q '@@E2E-END:g rc=0@@' /tmp/out || {{ echo "failed run of $name:"; tr -d '\r' < /tmp/out | tail -20; tail -5 /tmp/err /tmp/daemon.log; }}
}}
i=0
while [ $i -lt {runs} ]; do
  if [ $((i % 2)) -eq 0 ]; then
    run {OURS} "exec {vmm}"; run {THEIRS} "exec {qemu}"
  else
    run {THEIRS} "exec {qemu}"; run {OURS} "exec {vmm}"
  fi
  i=$((i+1))
done
"#,
        queues = s.queues,
        runs = s.runs,
        warm = 2 * s.memory,
    )
}

/// One parsed `BENCH` line: frontend, workload index, figure.
fn parse_line(line: &str) -> Option<(String, usize, Figure)> {
    let rest = line.trim().strip_prefix("BENCH ")?;
    let mut parts = rest.splitn(4, ' ');
    let name = parts.next()?.to_string();
    let _zero = parts.next()?;
    let i: usize = parts.next()?.parse().ok()?;
    let w = WORKLOADS.get(i)?;
    let f = bench_blk::parse_terse(parts.next()?, w.write)?;
    Some((name, i, f))
}

/// Entry point for `cargo xtask bench blk-vmm [options]`.
pub fn run(args: &[String]) -> Result<()> {
    let s = parse(args)?;
    crate::deps::ensure_packages()?;
    crate::guest::build()?;
    let release = bench_boot::build_release(&["vmm-frontend", "vhost-device-blk"])?;
    let work = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut l3_initrd =
        std::fs::read(e2e::paths::initrd()).map_err(|e| format!("cannot read the guest: {e}"))?;
    l3_initrd.extend(
        e2e::GuestSpec::new(&bench_blk::fio_script(s.seconds))
            .archive()
            .map_err(|e| e.to_string())?,
    );
    let per_boot = 60 + WORKLOADS.len() as u64 * (u64::from(s.seconds) + 15);
    let (spec, version) = bench_boot::l2_spec(
        &script(&s),
        Duration::from_secs(2 * u64::from(s.runs) * per_boot + 120),
        &[
            release.join("vmm-frontend"),
            release.join("vhost-device-blk"),
        ],
        &l3_initrd,
        work.path(),
    )?;
    step(&format!(
        "guest fio on vhost-device-blk, {} runs with each frontend, alternating, in one nested-KVM guest",
        s.runs
    ));
    let out = e2e::nested::run_l2_spec(&spec).map_err(|e| e.to_string())?;
    let mut figures: HashMap<(String, usize), Vec<Figure>> = HashMap::new();
    for line in out.output.lines() {
        if line.starts_with("failed run") || line.contains("did not start") {
            eprintln!("{line}");
        }
        if let Some((name, i, f)) = parse_line(line) {
            eprintln!(
                "bench blk-vmm: {:18} {name:13} {:9.0} IOPS {:8.1} MiB/s clat {:8.1} us",
                WORKLOADS[i].name, f.iops, f.mibs, f.lat_us
            );
            figures.entry((name, i)).or_default().push(f);
        }
    }
    let mut rows = Vec::new();
    let mut per_run = String::new();
    let mut paired_json = String::new();
    for (i, w) in WORKLOADS.iter().enumerate() {
        let mut take = |name: &str| {
            figures
                .remove(&(name.to_string(), i))
                .filter(|v| !v.is_empty())
                .ok_or_else(|| {
                    format!(
                        "no result for {} under {name}; the L2 guest printed:\n{}",
                        w.name, out.output
                    )
                })
        };
        let (ours, theirs) = (take(OURS)?, take(THEIRS)?);
        // Run k of each frontend ran back to back, so their ratio is free of the drift of
        // a shared machine's load over the whole benchmark.
        let paired: Vec<f64> = ours
            .iter()
            .zip(&theirs)
            .map(|(o, t)| {
                Row {
                    workload: *w,
                    ours: *o,
                    theirs: *t,
                }
                .ratio()
            })
            .collect();
        let mut sorted = paired.clone();
        sorted.sort_by(f64::total_cmp);
        let list = |f: &dyn Fn(&f64) -> String| paired.iter().map(f).collect::<Vec<_>>();
        let _ = writeln!(
            per_run,
            "{:18} | median {:5.2} | {}",
            w.name,
            sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
            list(&|r| format!("{r:5.2}")).join(" ")
        );
        let _ = write!(
            paired_json,
            "{}\"{}\": [{}]",
            if i == 0 { "" } else { ", " },
            w.name,
            list(&|r| format!("{r:.3}")).join(", ")
        );
        rows.push(Row {
            workload: *w,
            ours: bench_blk::median(ours),
            theirs: bench_blk::median(theirs),
        });
    }
    bench_blk::print_table(
        &format!(
            "vmm-frontend (ours) vs QEMU q35 (theirs), both on vhost-device-blk: guest fio (direct, \
             libaio), {} vCPU, {} queue, median of {} runs of {} s, nested KVM in QEMU TCG; {version}",
            s.cpus, s.queues, s.runs, s.seconds
        ),
        &rows,
        false,
    );
    println!("ratio within each run's back-to-back pair (run 1 first):\n{per_run}");
    let mut json = String::from("{\n  \"machine\": ");
    let _ = write!(
        json,
        "{:?},\n  \"qemu\": {:?},\n  \"ours\": \"vmm-frontend\",\n  \"theirs\": \"QEMU q35 vhost-user-blk-pci\",\n  \
         \"daemon\": \"vhost-device-blk (release)\",\n  \"image\": \"{IMAGE_MIB} MiB raw in L2 tmpfs\",\n  \
         \"cpus\": {},\n  \"queues\": {},\n  \"runs\": {},\n  \"fio_seconds\": {}",
        bench_blk::machine(),
        version,
        s.cpus,
        s.queues,
        s.runs,
        s.seconds
    );
    bench_blk::rows_json(&mut json, "guest", &rows);
    let _ = write!(json, ",\n  \"paired_ratios\": {{{paired_json}}}");
    json.push_str("\n}\n");
    if let Some(dir) = s.json.parent() {
        crate::util::mkdir(dir)?;
    }
    std::fs::write(&s.json, json).map_err(|e| format!("{}: {e}", s.json.display()))?;
    step(&format!("written {}", s.json.display()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked() {
        assert!(parse(&["--bogus".into()]).is_err());
        assert!(parse(&["--runs".into(), "0".into()]).is_err());
        let s =
            parse(&["--runs".into(), "5".into(), "--seconds".into(), "2".into()]).expect("valid");
        assert_eq!((s.runs, s.seconds, s.cpus, s.queues), (5, 2, 1, 1));
    }

    #[test]
    fn script_alternates_and_attaches_the_same_daemon() {
        let s = parse(&[]).expect("defaults");
        let text = script(&s);
        assert!(
            text.contains("--blk socket=/tmp/blk.sock,queues=1"),
            "{text}"
        );
        assert!(
            text.contains("-device vhost-user-blk-pci,chardev=blk0,num-queues=1"),
            "{text}"
        );
        assert!(text.contains("-cpu host"), "{text}");
        assert!(text.contains("run vmm-frontend") && text.contains("run qemu-q35"));
    }

    #[test]
    fn bench_lines_parse() {
        let mut f = vec!["0"; 130];
        f[6] = "4000";
        f[7] = "1000";
        f[15] = "250.5";
        let line = format!("BENCH vmm-frontend 0 0 {}", f.join(";"));
        let (name, i, fig) = parse_line(&line).expect("parsed");
        assert_eq!(
            (name.as_str(), i, fig.iops, fig.lat_us),
            (OURS, 0, 1000.0, 250.5)
        );
        assert!(parse_line("BENCH qemu-q35 0 9 1;2").is_none());
        assert!(parse_line("noise").is_none());
    }
}
