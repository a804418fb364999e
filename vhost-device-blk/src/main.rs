//! `vhost-device-blk`: see `--help`, and the library for everything else.

fn main() {
    // Command line, with `--config FILE.toml` merged under it.
    let args = vhost_device_common::config::parse::<vhost_device_blk::cli::Args>();
    std::process::exit(vhost_device_common::run_main("vhost-device-blk", || {
        vhost_device_blk::run(args)
    }));
}
