//! vhost-device-console: parse the command line (with `--config FILE.toml` merged under it),
//! run the daemon, exit with its status.

fn main() {
    let args = vhost_device_common::config::parse::<vhost_device_console::cli::Args>();
    std::process::exit(vhost_device_common::run_main(
        "vhost-device-console",
        || vhost_device_console::run(args),
    ));
}
