//! vhost-device-console with a real Linux guest under `vmm-frontend` (QEMU 7.2 has no
//! vhost-user console device): the guest's own virtio_console driver writes to `/dev/hvc0`,
//! reads a line a host client typed, and finds the named port of a MULTIPORT device.
//! Where the host's KVM cannot run a stock kernel, the harness nests the run in a QEMU TCG
//! guest whose KVM runs the test guest (see docs and `e2e::nested`); the daemon and its host
//! clients then run inside that guest too.

use std::path::PathBuf;
use std::time::Duration;

use e2e::{Device, GuestSpec};

/// The guest: a raw hvc0 so bytes pass unchanged, a line out and a line back, then the
/// ports the driver announced, and a write to the one named `org.test.agent`.
const GUEST: &str = r#"
exec 4<>/dev/hvc0
stty raw -echo <&4 || echo "stty failed"
echo "guest says hi" >&4
if read -t 60 -r line <&4; then echo "GOT: $line"; else echo "no line from the host"; fi
agent=""
for p in /sys/class/virtio-ports/*; do
  name=$(cat "$p/name" 2>/dev/null)
  echo "PORT $(basename "$p") name=$name"
  [ "$name" = org.test.agent ] && agent=/dev/$(basename "$p")
done
[ -n "$agent" ] || { echo "no port named org.test.agent"; exit 1; }
echo "agent data" > "$agent" || exit 2
exec 4<&-
exit 0
"#;

#[test]
fn a_linux_guest_talks_on_hvc0_and_finds_its_named_ports() {
    let test = "console_guest::a_linux_guest_talks_on_hvc0_and_finds_its_named_ports";
    let Some(vmm) = e2e::vmm_or_skip(test) else {
        return;
    };
    // Plain /tmp names: they work on the host (direct KVM) and inside the nested guest.
    let base = format!("/tmp/e2e-console-{}", std::process::id());
    let sock = PathBuf::from(format!("{base}.sock"));
    let ports = format!("{base}.port");
    let (out0, out1, log) = (
        format!("{base}.out0"),
        format!("{base}.out1"),
        format!("{base}.log"),
    );
    let backend = format!("unix={ports}");
    let daemon_args = [
        "--socket-path",
        "{socket}",
        "--backend",
        &backend,
        "--ports",
        "2",
        "--port-names",
        "org.test.console,org.test.agent",
        "--log-file",
        &log,
    ];
    // Port 0's client answers the guest's first line with one of its own.
    let client0 = format!(
        "rm -f {base}.fifo; mkfifo {base}.fifo\n\
         ( while ! grep -q 'guest says hi' {out0} 2>/dev/null; do sleep 0.2; done\n\
           echo 'typed on the host'; sleep 600 ) > {base}.fifo &\n\
         socat - UNIX-CONNECT:{ports}.0 < {base}.fifo > {out0}"
    );
    let client1 = format!("socat -u UNIX-CONNECT:{ports}.1 - > {out1}");
    let check = format!(
        "echo '--- port0'; cat {out0}; echo; echo '--- port1'; cat {out1}; echo; \
         echo '--- log'; cat {log}; echo; echo '--- end'; \
         rm -f {out0} {out1} {log} {base}.fifo {ports}.0 {ports}.1"
    );
    let spec = GuestSpec::new(GUEST)
        .device(Device::console(&sock).daemon("vhost-device-console", &daemon_args))
        .host_background(&client0)
        .host_background(&client1)
        .host_check(&check)
        .timeout(Duration::from_secs(120));
    let run = spec.run(&vmm).expect("guest run");
    e2e::guest::say(&format!(
        "e2e: console guest run on {} in {:?}:\n{}\n{}",
        run.launcher, run.duration, run.output, run.host_output
    ));
    assert_eq!(
        run.exit_code,
        Some(0),
        "guest:\n{}\nhost:\n{}\nconsole:\n{}",
        run.output,
        run.host_output,
        run.console
    );
    assert!(
        run.output.contains("GOT: typed on the host"),
        "the guest read the host's line from hvc0:\n{}",
        run.output
    );
    assert!(
        run.output.contains("name=org.test.console"),
        "{}",
        run.output
    );
    assert!(run.output.contains("name=org.test.agent"), "{}", run.output);
    let section = |name: &str| {
        run.host_output
            .split(&format!("--- {name}\n"))
            .nth(1)
            .and_then(|s| s.split("\n--- ").next())
            .unwrap_or("")
            .to_string()
    };
    assert!(
        section("port0").contains("guest says hi"),
        "{}",
        run.host_output
    );
    assert!(
        section("port1").contains("agent data"),
        "{}",
        run.host_output
    );
    let log_text = section("log");
    assert!(
        log_text.contains("guest says hi") && log_text.contains("agent data"),
        "the log file has every port's output: {log_text:?}"
    );
}
