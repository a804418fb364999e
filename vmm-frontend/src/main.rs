//! `vmm-frontend`: parse the command line, run the VM, exit 0 when the guest powers off or
//! reboots.

use clap::Parser;
use vmm_frontend::{Args, Config, ExitReason, VmmError};

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error(transparent)]
    Config(#[from] vmm_frontend::config::ConfigError),
    #[error(transparent)]
    Vmm(#[from] VmmError),
}

fn main() {
    let args = Args::parse();
    vhost_device_common::logging::init();
    std::process::exit(vhost_device_common::run_main(
        "vmm-frontend",
        || -> Result<(), MainError> {
            let config = Config::try_from(args)?;
            match vmm_frontend::run(&config)? {
                ExitReason::PowerOff => log::info!("guest powered off"),
                ExitReason::Reset => log::info!("guest rebooted"),
                ExitReason::Error(e) => return Err(VmmError::Guest(e).into()),
            }
            Ok(())
        },
    ));
}
