//! `cargo xtask man [OUT]`: a man page and bash, zsh and fish completions per daemon,
//! generated from the daemons' clap definitions (with the `--config FILE` option every
//! daemon gets from `vhost_device_common::config`), so they cannot drift from `--help`.
//!
//! Layout under OUT (default: the target directory):
//! `man/man1/<daemon>.1`, `completions/bash/<daemon>`, `completions/zsh/_<daemon>`,
//! `completions/fish/<daemon>.fish`.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// A daemon whose command line is documented.
pub struct Page {
    /// The binary's name.
    pub name: &'static str,
    /// Its clap command, as the binary parses it.
    pub command: fn() -> clap::Command,
    /// Extra man page sections: the service, the files, the configuration.
    pub device: &'static str,
}

/// Every daemon whose clap definition is reachable from its library.
///
/// vhost-device-net keeps its `Args` in `main.rs`; once it moves to the library
/// (`vhost_device_net::cli::Args`) it belongs here too.
pub fn pages() -> Vec<Page> {
    use vhost_device_common::config::command;
    vec![
        Page {
            name: "vhost-device-blk",
            command: command::<vhost_device_blk::cli::Args>,
            device: "blk",
        },
        Page {
            name: "vhost-device-net",
            command: command::<vhost_device_net::cli::Args>,
            device: "net",
        },
        Page {
            name: "vhost-device-vsock",
            command: command::<vhost_device_vsock::cli::Args>,
            device: "vsock",
        },
        Page {
            name: "vhost-device-console",
            command: command::<vhost_device_console::cli::Args>,
            device: "console",
        },
    ]
}

/// The target directory cargo builds into.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || e2e::paths::workspace_root().join("target"),
        PathBuf::from,
    )
}

/// Writes every man page and completion file under `out_dir`.
pub fn run(out_dir: &Path) -> Result<(), String> {
    let written = generate(out_dir)?;
    for path in &written {
        println!("{}", path.display());
    }
    Ok(())
}

/// Writes every man page and completion file under `out_dir`; returns the files written.
pub fn generate(out_dir: &Path) -> Result<Vec<PathBuf>, String> {
    let mut written = Vec::new();
    for page in pages() {
        let cmd = (page.command)().name(page.name).bin_name(page.name);
        written.push(write(
            &out_dir.join("man/man1").join(format!("{}.1", page.name)),
            &man_page(&cmd, page.device)?,
        )?);
        for (shell, dir, file) in [
            (Shell::Bash, "bash", page.name.to_string()),
            (Shell::Zsh, "zsh", format!("_{}", page.name)),
            (Shell::Fish, "fish", format!("{}.fish", page.name)),
        ] {
            let mut cmd = cmd.clone();
            let mut text = Vec::new();
            clap_complete::generate(shell, &mut cmd, page.name, &mut text);
            written.push(write(
                &out_dir.join("completions").join(dir).join(file),
                &text,
            )?);
        }
    }
    Ok(written)
}

fn write(path: &Path, bytes: &[u8]) -> Result<PathBuf, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(path, bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path.to_owned())
}

/// The man page: clap_mangen's sections, then how to run the daemon as a service.
fn man_page(cmd: &clap::Command, device: &str) -> Result<Vec<u8>, String> {
    let man = clap_mangen::Man::new(cmd.clone()).section("1");
    let mut out = Vec::new();
    let io = |e: std::io::Error| format!("cannot render the man page: {e}");
    man.render_title(&mut out).map_err(io)?;
    man.render_name_section(&mut out).map_err(io)?;
    man.render_synopsis_section(&mut out).map_err(io)?;
    man.render_description_section(&mut out).map_err(io)?;
    man.render_options_section(&mut out).map_err(io)?;
    man.render_extra_section(&mut out).map_err(io)?;
    let name = cmd.get_name();
    out.extend_from_slice(service_sections(name, device).as_bytes());
    man.render_version_section(&mut out).map_err(io)?;
    Ok(out)
}

/// CONFIGURATION, SYSTEMD, SIGNALS, FILES and SEE ALSO, in roff.
fn service_sections(name: &str, device: &str) -> String {
    format!(
        r#".SH CONFIGURATION
Every long option can also be set in a TOML file passed with \fB\-\-config\fR \fIFILE\fR:
one \fBkey = value\fR per option, the key being the option without its leading dashes
(\fBnum\-queues = 2\fR, \fBread\-only = true\fR, a list for an option given several times).
Options given on the command line override the file. An unknown key is an error naming it.
.SH SYSTEMD
The template units \fB{name}@.socket\fR and \fB{name}@.service\fR run one daemon per
instance: \fBsystemctl enable \-\-now {name}@vm1.socket\fR listens on
\fI/run/vhost\-device/{device}/vm1.sock\fR and starts the daemon, configured by
\fI/etc/vhost\-device/{device}/vm1.toml\fR, when the frontend connects. The daemon takes
the listening socket from systemd (\fBLISTEN_FDS\fR), reports readiness with
\fBsd_notify\fR(3) (\fBREADY=1\fR once it accepts frontends, \fBSTOPPING=1\fR on the
way out) and logs to the journal with priority prefixes; \fBRUST_LOG\fR selects what is
logged (default \fBinfo\fR).
.PP
Following QEMU's vhost\-user backend program conventions, the daemon does not fork,
listens on \fB\-\-socket\-path\fR or on the inherited socket \fB\-\-fd\fR, prints its
capabilities as JSON with \fB\-\-print\-capabilities\fR and exits cleanly on SIGTERM.
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop serving, make acknowledged data durable, and exit with status 0.
.TP
\fBSIGHUP\fR
Re\-read what can change while running (\fBsystemctl reload\fR).
.SH FILES
.TP
\fI/etc/vhost\-device/{device}/INSTANCE.toml\fR
Configuration of \fB{name}@INSTANCE.service\fR.
.TP
\fI/usr/share/qemu/vhost\-user/50\-{name}.json\fR
The backend descriptor QEMU and libvirt look for.
.SH "SEE ALSO"
\fBsystemd.socket\fR(5), \fBsystemd.exec\fR(5), \fBqemu\fR(1)
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_and_completion_is_written_from_the_clap_definitions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let written = generate(dir.path()).expect("generate");
        assert_eq!(written.len(), pages().len() * 4);
        let man = std::fs::read_to_string(dir.path().join("man/man1/vhost-device-blk.1"))
            .expect("blk man page");
        assert!(
            man.starts_with(".ie"),
            "roff: {}",
            &man[..40.min(man.len())]
        );
        for needle in [
            ".TH vhost-device-blk 1",
            "\\-\\-image",
            "\\-\\-config",
            "\\-\\-socket\\-path",
        ] {
            assert!(man.contains(needle), "man page lacks {needle}");
        }
        assert!(man.contains("/etc/vhost\\-device/blk/vm1.toml"));
        let bash = std::fs::read_to_string(dir.path().join("completions/bash/vhost-device-vsock"))
            .expect("bash completion");
        assert!(bash.contains("--guest-cid") && bash.contains("--config"));
        let zsh = std::fs::read_to_string(dir.path().join("completions/zsh/_vhost-device-console"))
            .expect("zsh completion");
        assert!(zsh.starts_with("#compdef vhost-device-console"));
        assert!(dir
            .path()
            .join("completions/fish/vhost-device-blk.fish")
            .exists());
    }
}
