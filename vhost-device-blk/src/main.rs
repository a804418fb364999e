//! `vhost-device-blk`: see `--help`, and the library for everything else.

use clap::Parser;

fn main() {
    let args = vhost_device_blk::cli::Args::parse();
    std::process::exit(vhost_device_common::run_main("vhost-device-blk", || {
        vhost_device_blk::run(args)
    }));
}
