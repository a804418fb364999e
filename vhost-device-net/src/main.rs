//! `vhost-device-net`: serves a virtio-net device over vhost-user, backed by a tap.

fn main() {
    // Command line, with `--config FILE.toml` merged under it.
    let args = vhost_device_common::config::parse::<vhost_device_net::cli::Args>();
    std::process::exit(vhost_device_common::run_main("vhost-device-net", || {
        vhost_device_net::cli::run(args)
    }));
}
