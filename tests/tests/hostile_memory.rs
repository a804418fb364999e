//! A frontend is not trusted either: a memory region larger than the file behind it is
//! refused by every daemon (mapping it and touching it would kill the daemon with SIGBUS),
//! and the daemon serves the next frontend.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::frontend::{daemon_accepts_a_region_past_its_file, Frontend, Options};
use e2e::process::wait_for_path;
use e2e::ChildGuard;

fn check(name: &str, args: &[String], socket: &Path) {
    let mut cmd = Command::new(e2e::bin_path(name));
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::null());
    let mut daemon = ChildGuard::spawn(name, cmd).expect("spawn");
    assert!(
        wait_for_path(socket, Duration::from_secs(10)),
        "{name} socket"
    );
    let accepted = daemon_accepts_a_region_past_its_file(socket).expect("handshake");
    assert!(
        !accepted,
        "{name} accepted a memory region past the end of its file"
    );
    assert!(daemon.try_wait().is_none(), "{name} died");
    let fe = Frontend::connect_without_queues(socket, &Options::default())
        .expect("the next frontend is served");
    assert!(
        fe.features() != 0,
        "{name} offers features to the next frontend"
    );
}

#[test]
fn vsock_refuses_a_region_past_its_file() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("vsock.sock");
    let args = [
        "--guest-cid".to_string(),
        "3".into(),
        "--socket".into(),
        socket.display().to_string(),
        "--uds-path".into(),
        dir.path().join("vm").display().to_string(),
    ];
    check("vhost-device-vsock", &args, &socket);
}

#[test]
fn console_refuses_a_region_past_its_file() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("console.sock");
    let args = [
        "--socket-path".to_string(),
        socket.display().to_string(),
        "--backend".into(),
        format!("unix={}", dir.path().join("console").display()),
    ];
    check("vhost-device-console", &args, &socket);
}

#[test]
fn blk_refuses_a_region_past_its_file() {
    let dir = tempfile::tempdir().expect("dir");
    let socket = dir.path().join("blk.sock");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).expect("image");
    let args = [
        "--socket-path".to_string(),
        socket.display().to_string(),
        "--image".into(),
        image.display().to_string(),
    ];
    check("vhost-device-blk", &args, &socket);
}
