//! vhost-device-console: parse the command line, run the daemon, exit with its status.

use clap::Parser;

fn main() {
    let args = vhost_device_console::cli::Args::parse();
    std::process::exit(vhost_device_common::run_main(
        "vhost-device-console",
        || vhost_device_console::run(args),
    ));
}
