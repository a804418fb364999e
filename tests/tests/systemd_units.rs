//! The files shipped in `dist/` for running the daemons as services: systemd template units
//! (checked by `systemd-analyze verify`, as systemd itself would load them), QEMU's
//! vhost-user JSON descriptors, and the example configuration files.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::paths::workspace_root;
use e2e::qemu::{skip, which};
use vhost_device_common::capabilities::QEMU_TYPES;

/// The daemons, with the vhost-user type QEMU's schema gives each.
const DAEMONS: &[(&str, &str)] = &[
    ("blk", "block"),
    ("net", "net"),
    ("vsock", "vsock"),
    ("console", "console"),
];

fn dist() -> PathBuf {
    workspace_root().join("dist")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The values of `key=` lines in a unit file, in order.
fn values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn units_pass_systemd_analyze_verify() {
    let test = "units_pass_systemd_analyze_verify";
    let Some(analyze) = which("systemd-analyze") else {
        skip(
            test,
            "systemd-analyze is not installed (Debian package `systemd`)",
        );
        return;
    };
    let dir = staged_units();
    let mut failures = Vec::new();
    for (dev, _) in DAEMONS {
        for kind in ["service", "socket"] {
            let unit = dir.path().join(format!("vhost-device-{dev}@test.{kind}"));
            let out = Command::new(&analyze)
                .args(["verify", "--man=no"])
                .arg(&unit)
                .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
                .output()
                .expect("run systemd-analyze");
            let stderr = String::from_utf8_lossy(&out.stderr);
            // Warnings (an unknown key is only a warning) fail the test too.
            if !out.status.success() || !stderr.trim().is_empty() {
                failures.push(format!("{}: {}\n{stderr}", unit.display(), out.status));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "systemd-analyze verify:\n{}",
        failures.join("\n")
    );
}

/// The templates in a scratch unit directory, with ExecStart pointing at an executable that
/// exists: `systemd-analyze` checks it. Instances of the templates are what it verifies
/// (a template itself cannot be started).
fn staged_units() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    for (dev, _) in DAEMONS {
        let fake_bin = dir.path().join(format!("vhost-device-{dev}"));
        std::fs::write(&fake_bin, "#!/bin/sh\nexit 0\n").expect("write");
        let mut perms = std::fs::metadata(&fake_bin).expect("stat").permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&fake_bin, perms).expect("chmod");
        for kind in ["service", "socket"] {
            let name = format!("vhost-device-{dev}@.{kind}");
            let text = read(&dist().join("systemd").join(&name)).replace(
                &format!("/usr/bin/vhost-device-{dev}"),
                &fake_bin.display().to_string(),
            );
            std::fs::write(dir.path().join(&name), text).expect("write unit");
        }
    }
    dir
}

#[test]
fn services_score_ok_in_systemd_analyze_security() {
    let test = "services_score_ok_in_systemd_analyze_security";
    let Some(analyze) = which("systemd-analyze") else {
        skip(
            test,
            "systemd-analyze is not installed (Debian package `systemd`)",
        );
        return;
    };
    let dir = staged_units();
    for (dev, _) in DAEMONS {
        let unit = dir.path().join(format!("vhost-device-{dev}@test.service"));
        let out = Command::new(&analyze)
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(&unit)
            .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
            .output()
            .expect("run systemd-analyze security");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let score = stdout
            .lines()
            .find_map(|l| {
                l.split_once("Overall exposure level for ")?
                    .1
                    .split_once(": ")
            })
            .and_then(|(_, rest)| rest.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no exposure level: {stdout}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            });
        // 0 is fully locked down, 10 is unprotected; systemd calls up to 4.9 "OK".
        assert!(
            score <= 2.5,
            "vhost-device-{dev}@.service exposure {score}:\n{stdout}"
        );
    }
}

#[test]
fn a_broken_unit_is_caught_by_the_verification() {
    // The check above must be able to fail: an unknown key gives a warning, a missing
    // binary an error.
    let test = "a_broken_unit_is_caught_by_the_verification";
    let Some(analyze) = which("systemd-analyze") else {
        skip(
            test,
            "systemd-analyze is not installed (Debian package `systemd`)",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let text = read(&dist().join("systemd/vhost-device-blk@.service"))
        .replace("ProtectSystem=strict", "ProtectSystm=strict")
        .replace("/usr/bin/vhost-device-blk", "/nonexistent/vhost-device-blk");
    std::fs::write(dir.path().join("broken@.service"), text).expect("write");
    let out = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(dir.path().join("broken@x.service"))
        .env("SYSTEMD_UNIT_PATH", format!("{}:", dir.path().display()))
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ProtectSystm"), "{stderr}");
    assert!(!out.status.success(), "the binary does not exist: {stderr}");
}

#[test]
fn services_are_socket_activated_notify_services_reading_their_instance_file() {
    for (dev, _) in DAEMONS {
        let service = read(&dist().join(format!("systemd/vhost-device-{dev}@.service")));
        let socket = read(&dist().join(format!("systemd/vhost-device-{dev}@.socket")));
        let ctx = format!("vhost-device-{dev}@.service");
        assert_eq!(values(&service, "Type"), ["notify"], "{ctx}");
        assert_eq!(
            values(&service, "ExecStart"),
            [format!(
                "/usr/bin/vhost-device-{dev} --config /etc/vhost-device/{dev}/%i.toml"
            )],
            "{ctx}: the instance selects the configuration file, nothing else on the command line"
        );
        assert_eq!(
            values(&service, "Requires"),
            [format!("vhost-device-{dev}@%i.socket")]
        );
        assert_eq!(
            values(&socket, "ListenStream"),
            [format!("/run/vhost-device/{dev}/%i.sock")],
            "exactly one socket: the daemon refuses several"
        );
        assert!(
            values(&socket, "Accept").iter().all(|v| *v == "no"),
            "one daemon per instance"
        );
    }
}

#[test]
fn services_are_hardened() {
    for (dev, _) in DAEMONS {
        let unit = read(&dist().join(format!("systemd/vhost-device-{dev}@.service")));
        let ctx = format!("vhost-device-{dev}@.service");
        for (key, want) in [
            ("ProtectSystem", "strict"),
            ("PrivateTmp", "yes"),
            ("NoNewPrivileges", "yes"),
            ("DynamicUser", "yes"),
            ("ProtectHome", "yes"),
            ("RestrictNamespaces", "yes"),
            ("SystemCallArchitectures", "native"),
        ] {
            assert_eq!(values(&unit, key), [want], "{ctx}: {key}");
        }
        let caps = values(&unit, "CapabilityBoundingSet");
        let expected = if *dev == "net" { "CAP_NET_ADMIN" } else { "" };
        assert_eq!(caps, [expected], "{ctx}: only net keeps a capability");
        assert_eq!(values(&unit, "AmbientCapabilities"), [expected], "{ctx}");
        let families = values(&unit, "RestrictAddressFamilies");
        assert_eq!(families.len(), 1, "{ctx}");
        assert!(
            families[0].split(' ').any(|f| f == "AF_UNIX"),
            "{ctx}: vhost-user is AF_UNIX"
        );
        let devices = values(&unit, "DeviceAllow");
        match *dev {
            "blk" => assert_eq!(devices, ["block-* rw"], "{ctx}"),
            "net" => assert_eq!(devices, ["/dev/net/tun rw"], "{ctx}"),
            _ => assert_eq!(values(&unit, "PrivateDevices"), ["yes"], "{ctx}"),
        }
        if *dev != "net" && *dev != "console" {
            assert_eq!(
                values(&unit, "PrivateNetwork"),
                ["yes"],
                "{ctx}: no network needed"
            );
        }
    }
}

#[test]
fn qemu_descriptors_follow_the_vhost_user_json_schema() {
    for (dev, qemu_type) in DAEMONS {
        let path = dist().join(format!("qemu/50-vhost-device-{dev}.json"));
        let json: serde_json::Value = serde_json::from_str(&read(&path))
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let obj = json.as_object().expect("a JSON object");
        // VhostUserBackend: description, type, binary, optional tags; nothing else.
        for key in obj.keys() {
            assert!(
                ["description", "type", "binary", "tags"].contains(&key.as_str()),
                "{}: unknown member {key}",
                path.display()
            );
        }
        let ty = obj["type"].as_str().expect("type is a string");
        assert!(
            QEMU_TYPES.contains(&ty),
            "{ty} is not a VHostUserBackendType"
        );
        assert_eq!(ty, *qemu_type);
        assert!(obj["description"].as_str().is_some_and(|d| !d.is_empty()));
        assert_eq!(
            obj["binary"].as_str(),
            Some(format!("/usr/bin/vhost-device-{dev}").as_str())
        );
    }
}

#[test]
fn example_configurations_are_toml_without_a_socket() {
    for (dev, _) in DAEMONS {
        let path = dist().join(format!("config/{dev}.toml"));
        let table: toml::Table = read(&path)
            .parse()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(!table.is_empty(), "{}", path.display());
        for key in ["socket-path", "socket", "fd"] {
            assert!(
                !table.contains_key(key),
                "{}: the socket comes from the .socket unit, not the file",
                path.display()
            );
        }
    }
}
