//! `cargo xtask install [--prefix P] [--destdir D] [--no-build]`: the daemons, their man
//! pages and completions, the systemd units, QEMU's vhost-user descriptors and the example
//! configurations, where a distribution would put them.
//!
//! ```text
//! P/bin/vhost-device-*                           the daemons (and vmm-frontend)
//! P/share/man/man1/vhost-device-*.1              man pages
//! P/share/bash-completion/completions/, P/share/zsh/site-functions/,
//! P/share/fish/vendor_completions.d/             completions
//! P/lib/systemd/system/vhost-device-*@.{service,socket}   units (/usr/lib/... for P=/usr)
//! P/share/qemu/vhost-user/50-vhost-device-*.json QEMU/libvirt backend descriptors
//! P/share/doc/vhost-device/                      systemd.md and example configurations
//! /etc/vhost-device/<device>/                    instance configurations (created empty)
//! ```
//!
//! Every file goes under D (default: nothing, i.e. the real root), for packaging. The
//! units and descriptors name the binaries by their installed path `P/bin/...`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{run as run_cmd, step};

/// The devices, as the units and configuration directories name them.
const DEVICES: &[&str] = &["blk", "net", "vsock", "console"];
/// Binaries installed, beside the daemons.
const EXTRA_BINARIES: &[&str] = &["vmm-frontend"];

const USAGE: &str = "usage: cargo xtask install [--prefix P] [--destdir D] [--no-build]
  --prefix P    installation prefix (default /usr/local)
  --destdir D   stage everything under D, for packaging (default: install for real)
  --no-build    install the release binaries already built in the target directory";

/// Where things go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// `--prefix`.
    pub prefix: PathBuf,
    /// `--destdir`.
    pub destdir: PathBuf,
    /// Whether to build the release binaries first.
    pub build: bool,
}

impl Layout {
    /// Parses the task's arguments.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let mut layout = Layout {
            prefix: PathBuf::from("/usr/local"),
            destdir: PathBuf::from("/"),
            build: true,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .map(PathBuf::from)
                    .ok_or_else(|| format!("{name} needs a directory\n{USAGE}"))
            };
            match arg.as_str() {
                "--prefix" => layout.prefix = value("--prefix")?,
                "--destdir" => layout.destdir = value("--destdir")?,
                "--no-build" => layout.build = false,
                "-h" | "--help" => return Err(USAGE.to_string()),
                other => return Err(format!("unknown option `{other}`\n{USAGE}")),
            }
        }
        if !layout.prefix.is_absolute() {
            return Err(format!(
                "--prefix must be an absolute path, not {}",
                layout.prefix.display()
            ));
        }
        Ok(layout)
    }

    /// An installed path (`/usr/local/bin/x`) under the destdir.
    fn staged(&self, installed: &Path) -> PathBuf {
        let relative = installed.strip_prefix("/").unwrap_or(installed);
        self.destdir.join(relative)
    }

    fn bin(&self) -> PathBuf {
        self.prefix.join("bin")
    }

    fn share(&self) -> PathBuf {
        self.prefix.join("share")
    }

    /// systemd's unit directory for this prefix (`/usr/lib/systemd/system` for `/usr`,
    /// `/usr/local/lib/systemd/system` for `/usr/local`: both are on systemd's path).
    fn unit_dir(&self) -> PathBuf {
        self.prefix.join("lib/systemd/system")
    }
}

/// One file to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Where it comes from.
    pub source: PathBuf,
    /// Its installed path (before the destdir).
    pub target: PathBuf,
    /// Permissions.
    pub mode: u32,
    /// `/usr/bin/` in the file replaced by the installed binary directory.
    pub rewrite_bin: bool,
}

/// `cargo xtask install ...`.
pub fn run(args: &[String]) -> Result<(), String> {
    let layout = Layout::parse(args)?;
    let target = crate::man::target_dir();
    if layout.build {
        step("building the release binaries");
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.args(["build", "--release"]);
        for dev in DEVICES {
            cmd.args(["-p", &format!("vhost-device-{dev}")]);
        }
        for bin in EXTRA_BINARIES {
            cmd.args(["-p", bin]);
        }
        run_cmd(&mut cmd)?;
    }
    step("generating man pages and completions");
    let generated = target.join("dist");
    crate::man::generate(&generated)?;
    let items = plan(
        &layout,
        &target.join("release"),
        &generated,
        &e2e::paths::workspace_root(),
    )?;
    step(&format!("installing under {}", layout.destdir.display()));
    install(&layout, &items)?;
    for item in &items {
        println!("{}", layout.staged(&item.target).display());
    }
    Ok(())
}

/// Everything to install, from the release binaries in `bin_dir`, the generated man pages
/// and completions in `generated`, and the repository's `dist/` and `docs/`.
pub fn plan(
    layout: &Layout,
    bin_dir: &Path,
    generated: &Path,
    repo: &Path,
) -> Result<Vec<Item>, String> {
    let mut items = Vec::new();
    let mut add = |source: PathBuf, target: PathBuf, mode: u32, rewrite_bin: bool| {
        items.push(Item {
            source,
            target,
            mode,
            rewrite_bin,
        });
    };
    for name in DEVICES
        .iter()
        .map(|d| format!("vhost-device-{d}"))
        .chain(EXTRA_BINARIES.iter().map(ToString::to_string))
    {
        add(bin_dir.join(&name), layout.bin().join(&name), 0o755, false);
    }
    let dist = repo.join("dist");
    for dev in DEVICES {
        let name = format!("vhost-device-{dev}");
        for kind in ["service", "socket"] {
            let unit = format!("{name}@.{kind}");
            add(
                dist.join("systemd").join(&unit),
                layout.unit_dir().join(&unit),
                0o644,
                true,
            );
        }
        let json = format!("50-{name}.json");
        add(
            dist.join("qemu").join(&json),
            layout.share().join("qemu/vhost-user").join(&json),
            0o644,
            true,
        );
        add(
            dist.join("config").join(format!("{dev}.toml")),
            layout
                .share()
                .join("doc/vhost-device/examples")
                .join(format!("{dev}.toml")),
            0o644,
            false,
        );
    }
    add(
        repo.join("docs/systemd.md"),
        layout.share().join("doc/vhost-device/systemd.md"),
        0o644,
        false,
    );
    for page in crate::man::pages() {
        let name = page.name;
        add(
            generated.join(format!("man/man1/{name}.1")),
            layout.share().join(format!("man/man1/{name}.1")),
            0o644,
            false,
        );
        for (source, target) in [
            (
                format!("completions/bash/{name}"),
                format!("bash-completion/completions/{name}"),
            ),
            (
                format!("completions/zsh/_{name}"),
                format!("zsh/site-functions/_{name}"),
            ),
            (
                format!("completions/fish/{name}.fish"),
                format!("fish/vendor_completions.d/{name}.fish"),
            ),
        ] {
            add(
                generated.join(source),
                layout.share().join(target),
                0o644,
                false,
            );
        }
    }
    let missing: Vec<String> = items
        .iter()
        .filter(|i| !i.source.exists())
        .map(|i| i.source.display().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "missing (build the release binaries, or drop --no-build): {}",
            missing.join(", ")
        ));
    }
    Ok(items)
}

/// Copies the items under the destdir and creates the configuration directories.
pub fn install(layout: &Layout, items: &[Item]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let bin = format!("{}/", layout.bin().display());
    for item in items {
        let dest = layout.staged(&item.target);
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let read_err = |e: std::io::Error| format!("cannot read {}: {e}", item.source.display());
        let write_err = |e: std::io::Error| format!("cannot write {}: {e}", dest.display());
        // Replace rather than overwrite in place: a running binary stays intact.
        let tmp = partial(&dest);
        if item.rewrite_bin {
            let text = std::fs::read_to_string(&item.source).map_err(read_err)?;
            std::fs::write(&tmp, text.replace("/usr/bin/", &bin)).map_err(write_err)?;
        } else {
            std::fs::copy(&item.source, &tmp).map_err(read_err)?;
        }
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(item.mode))
            .map_err(write_err)?;
        std::fs::rename(&tmp, &dest).map_err(write_err)?;
    }
    for dev in DEVICES {
        let dir = layout.staged(&Path::new("/etc/vhost-device").join(dev));
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// The name a file is written under before it replaces `dest`.
fn partial(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_owned();
    name.push(".xtask-new");
    dest.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn options_parse_and_mistakes_are_refused() {
        let l = Layout::parse(&args(&["--prefix", "/usr", "--destdir", "/tmp/pkg"])).expect("ok");
        assert_eq!(l.prefix, PathBuf::from("/usr"));
        assert_eq!(
            l.staged(&l.unit_dir()),
            PathBuf::from("/tmp/pkg/usr/lib/systemd/system")
        );
        assert!(l.build);
        assert!(Layout::parse(&args(&["--prefix"])).is_err());
        assert!(Layout::parse(&args(&["--prefix", "usr"])).is_err());
        assert!(Layout::parse(&args(&["--frobnicate"])).is_err());
        assert_eq!(
            Layout::parse(&[]).expect("defaults").prefix,
            PathBuf::from("/usr/local")
        );
    }

    #[test]
    fn installs_everything_under_the_destdir_pointing_at_the_prefix() {
        let repo = e2e::paths::workspace_root();
        let scratch = tempfile::tempdir().expect("tempdir");
        let bins = scratch.path().join("release");
        std::fs::create_dir_all(&bins).expect("mkdir");
        for name in DEVICES
            .iter()
            .map(|d| format!("vhost-device-{d}"))
            .chain(EXTRA_BINARIES.iter().map(ToString::to_string))
        {
            std::fs::write(bins.join(name), "#!/bin/sh\n").expect("fake binary");
        }
        let generated = scratch.path().join("generated");
        crate::man::generate(&generated).expect("man pages");
        let destdir = scratch.path().join("pkg");
        let layout = Layout::parse(&args(&[
            "--prefix",
            "/opt/vd",
            "--destdir",
            destdir.to_str().expect("utf-8"),
            "--no-build",
        ]))
        .expect("layout");
        let items = plan(&layout, &bins, &generated, &repo).expect("plan");
        install(&layout, &items).expect("install");

        let root = destdir.join("opt/vd");
        let service =
            std::fs::read_to_string(root.join("lib/systemd/system/vhost-device-net@.service"))
                .expect("unit installed");
        assert!(
            service.contains(
                "ExecStart=/opt/vd/bin/vhost-device-net --config /etc/vhost-device/net/%i.toml"
            ),
            "{service}"
        );
        let json =
            std::fs::read_to_string(root.join("share/qemu/vhost-user/50-vhost-device-blk.json"))
                .expect("descriptor");
        assert!(
            json.contains("\"binary\": \"/opt/vd/bin/vhost-device-blk\""),
            "{json}"
        );
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(root.join("bin/vhost-device-vsock"))
                .expect("binary")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o755);
        assert!(root.join("share/man/man1/vhost-device-blk.1").exists());
        assert!(root
            .join("share/bash-completion/completions/vhost-device-console")
            .exists());
        assert!(root
            .join("share/zsh/site-functions/_vhost-device-vsock")
            .exists());
        assert!(root
            .join("share/doc/vhost-device/examples/blk.toml")
            .exists());
        assert!(destdir.join("etc/vhost-device/vsock").is_dir());
        // Nothing outside the destdir, nothing left half-written.
        for item in &items {
            let staged = layout.staged(&item.target);
            assert!(
                staged.starts_with(&destdir) && staged.exists(),
                "{}",
                staged.display()
            );
            assert!(!partial(&staged).exists());
        }
    }

    #[test]
    fn a_missing_binary_is_named() {
        let scratch = tempfile::tempdir().expect("tempdir");
        let layout = Layout::parse(&args(&["--no-build"])).expect("layout");
        let err = plan(
            &layout,
            scratch.path(),
            scratch.path(),
            &e2e::paths::workspace_root(),
        )
        .expect_err("nothing built");
        assert!(err.contains("vhost-device-blk"), "{err}");
    }
    /// The example configurations installed for users parse, with the daemon's own command
    /// line and validation, into a configuration: what `--config FILE` alone gives the
    /// daemon once its main parses with `vhost_device_common::config::parse`.
    #[test]
    fn example_configurations_make_valid_daemon_configurations() {
        use vhost_device_common::config::try_parse_from;
        let example = |dev: &str| {
            let path = e2e::paths::workspace_root().join(format!("dist/config/{dev}.toml"));
            vec![
                format!("vhost-device-{dev}"),
                "--config".to_string(),
                path.display().to_string(),
            ]
        };
        let args = try_parse_from::<vhost_device_blk::cli::Args, _, _>(example("blk"))
            .expect("blk example");
        let config = vhost_device_blk::config::Config::try_from(args).expect("blk config");
        assert_eq!(config.num_queues, 2);
        assert_eq!(
            config.image,
            PathBuf::from("/var/lib/vhost-device-blk/vm1.raw")
        );

        let args = try_parse_from::<vhost_device_vsock::cli::Args, _, _>(example("vsock"))
            .expect("vsock example");
        let config = vhost_device_vsock::config::Config::try_from(args).expect("vsock config");
        assert_eq!(config.vms.len(), 1);
        assert_eq!(config.vms[0].guest_cid, 3);

        let args = try_parse_from::<vhost_device_console::cli::Args, _, _>(example("console"))
            .expect("console example");
        vhost_device_console::Config::try_from(args).expect("console config");
    }
}
