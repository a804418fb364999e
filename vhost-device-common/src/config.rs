//! Configuration files: one TOML format for every daemon, every command-line option
//! settable, the command line overriding the file.
//!
//! The file holds one `key = value` per long option of the daemon's command line, with the
//! leading `--` dropped (`-` or `_` between words, as you like):
//!
//! ```toml
//! socket-path = "/run/vhost-device/blk/vm1.sock"
//! image = "/var/lib/vhost-device-blk/vm1.raw"
//! num-queues = 2          # numbers as numbers or strings
//! read-only = true        # a flag: true sets it, false leaves it unset
//! tap-fd = [5, 6]         # an option given several times: a list
//! ```
//!
//! [`parse`] finds `--config FILE` on the command line, turns the file into arguments,
//! puts them *before* the real command line and parses the lot with clap, each option
//! overriding itself, so what the command line says wins. An option from the file that the
//! command line replaces (the same option, or one it conflicts with, such as `--fd`
//! against the file's `socket-path`) is dropped. A key that names no option is a one-line
//! error naming the key and the file.
//!
//! A daemon switches from `Args::parse()` to `vhost_device_common::config::parse::<Args>()`;
//! nothing else changes. A daemon that already has a `--config` option of its own (vsock's
//! YAML file, the peer's format) keeps it: only a file whose name ends in `.toml` is read
//! here, any other is left to the daemon.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, CommandFactory, Parser};
use toml::Value;

/// The long option naming the configuration file.
pub const CONFIG_FLAG: &str = "config";

/// The clap id of the `--config` option added by [`command`], distinct from any field name.
const CONFIG_ID: &str = "vhost_device_config_file";

/// Largest configuration file read, so a wrong path (a device, a huge log) fails quickly.
const MAX_FILE_SIZE: u64 = 1 << 20;

/// Why the command line and configuration file do not make a valid set of options.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line itself is wrong (or asks for `--help`/`--version`).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    /// `--config` given more than once.
    #[error("--config given more than once: pass a single configuration file")]
    SeveralFiles,
    /// The file could not be read.
    #[error("cannot read configuration file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any configuration file should be.
    #[error("configuration file {0} is larger than 1 MiB: is it the right file?")]
    TooLarge(PathBuf),
    /// The file is not valid TOML.
    #[error("{path}:{line}:{column}: invalid TOML: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
        /// What the TOML parser said, on one line.
        message: String,
    },
    /// A key names no option of this daemon.
    #[error(
        "unknown key `{key}` in {path}: it is not an option of {program} (see {program} --help)"
    )]
    UnknownKey {
        /// The key as written.
        key: String,
        /// The file.
        path: PathBuf,
        /// The daemon's name.
        program: String,
    },
    /// A key's value does not fit its option.
    #[error("key `{key}` in {path}: {reason}")]
    BadValue {
        /// The key as written.
        key: String,
        /// The file.
        path: PathBuf,
        /// What is wrong, for the user.
        reason: String,
    },
}

/// The daemon's clap command with the `--config FILE` option added (unless it has its own)
/// and every option overriding itself. Use it where the command is needed outside parsing:
/// man pages, shell completions.
pub fn command<C: CommandFactory>() -> clap::Command {
    let cmd = C::command().args_override_self(true);
    if own_config_flag(&cmd) {
        return cmd;
    }
    cmd.arg(
        Arg::new(CONFIG_ID)
            .long(CONFIG_FLAG)
            .value_name("FILE")
            .value_hint(clap::ValueHint::FilePath)
            .value_parser(clap::value_parser!(PathBuf))
            .action(ArgAction::Set)
            .help(
                "Read options from this TOML file: one `key = value` per long option \
                 (`socket-path = \"/run/x.sock\"`, `read-only = true`, lists for repeated \
                 options); options on the command line override the file",
            ),
    )
}

/// Parses the process's command line, with `--config FILE` merged in, into `C`.
///
/// On a mistake it prints one line (clap's own message for command-line errors, help and
/// version as usual) and exits with status 2, like clap's `Parser::parse`.
pub fn parse<C: Parser>() -> C {
    match try_parse_from::<C, _, _>(std::env::args_os()) {
        Ok(args) => args,
        Err(Error::Cli(e)) => e.exit(),
        Err(e) => {
            let name = C::command().get_name().to_string();
            eprintln!("{name}: error: {}", crate::error_chain(&e));
            std::process::exit(2);
        }
    }
}

/// Parses `argv` (program name first) with `--config FILE` merged in, into `C`.
pub fn try_parse_from<C, I, T>(argv: I) -> Result<C, Error>
where
    C: Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let argv: Vec<OsString> = argv.into_iter().map(Into::into).collect();
    let mut cmd = command::<C>();
    cmd.build();
    let (file, rest) = split_config(&cmd, &argv)?;
    let merged = match file {
        None => rest,
        Some(path) => {
            let from_file = args_from_file(&cmd, &path)?;
            let kept = drop_overridden(&cmd, from_file, &rest);
            let mut merged = Vec::with_capacity(kept.len() + rest.len());
            let mut rest = rest.into_iter();
            merged.extend(rest.next()); // the program name
            merged.extend(kept.into_iter().flat_map(|a| a.tokens));
            merged.extend(rest);
            merged
        }
    };
    let matches = cmd.try_get_matches_from_mut(merged)?;
    C::from_arg_matches(&matches).map_err(|e| Error::Cli(e.format(&mut cmd)))
}

/// The arguments one key of the file turns into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileArg {
    /// The clap id of the option the key sets.
    pub id: String,
    /// The command-line tokens, e.g. `["--image=/x.raw"]`.
    pub tokens: Vec<OsString>,
}

/// Reads a configuration file and turns it into command-line arguments for `cmd`, in the
/// order of the file.
pub fn args_from_file(cmd: &clap::Command, path: &Path) -> Result<Vec<FileArg>, Error> {
    let text = read_limited(path)?;
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
        let (line, column) = e
            .span()
            .map_or((1, 1), |span| line_column(&text, span.start));
        Error::Syntax {
            path: path.to_owned(),
            line,
            column,
            message: e.message().replace('\n', " "),
        }
    })?;
    let mut out = Vec::with_capacity(table.len());
    for (key, value) in &table {
        let bad = |reason: &str| Error::BadValue {
            key: key.clone(),
            path: path.to_owned(),
            reason: reason.to_string(),
        };
        let arg = find_option(cmd, key).ok_or_else(|| Error::UnknownKey {
            key: key.clone(),
            path: path.to_owned(),
            program: cmd.get_name().to_string(),
        })?;
        if arg.get_long() == Some(CONFIG_FLAG) {
            return Err(bad("a configuration file cannot name another one"));
        }
        let long = arg.get_long().unwrap_or(key.as_str());
        let tokens = tokens_for(arg, long, value).map_err(|reason| bad(&reason))?;
        out.push(FileArg {
            id: arg.get_id().to_string(),
            tokens,
        });
    }
    Ok(out)
}

fn read_limited(path: &Path) -> Result<String, Error> {
    let read_err = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut text = String::new();
    file.take(MAX_FILE_SIZE + 1)
        .read_to_string(&mut text)
        .map_err(read_err)?;
    if text.len() as u64 > MAX_FILE_SIZE {
        return Err(Error::TooLarge(path.to_owned()));
    }
    Ok(text)
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Whether the daemon defines a `--config` of its own.
fn own_config_flag(cmd: &clap::Command) -> bool {
    cmd.get_arguments()
        .any(|a| a.get_long() == Some(CONFIG_FLAG) && a.get_id() != CONFIG_ID)
}

/// The option a key names: its long name or a long alias, `_` and `-` alike.
fn find_option<'a>(cmd: &'a clap::Command, key: &str) -> Option<&'a Arg> {
    let wanted = key.replace('_', "-");
    cmd.get_arguments().find(|a| {
        !a.is_positional()
            && !matches!(
                a.get_action(),
                ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
            )
            && a.get_long_and_visible_aliases()
                .into_iter()
                .flatten()
                .chain(a.get_aliases().into_iter().flatten())
                .any(|l| l == wanted)
    })
}

/// The tokens for one option set to `value`.
fn tokens_for(arg: &Arg, long: &str, value: &Value) -> Result<Vec<OsString>, String> {
    let flag = || OsString::from(format!("--{long}"));
    let with_value = |v: &str| OsString::from(format!("--{long}={v}"));
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => {
            let sets = matches!(arg.get_action(), ArgAction::SetTrue);
            match value {
                Value::Boolean(b) if *b == sets => Ok(vec![flag()]),
                Value::Boolean(_) => Ok(Vec::new()),
                _ => Err("expects true or false".into()),
            }
        }
        ArgAction::Count => match value {
            Value::Boolean(true) => Ok(vec![flag()]),
            Value::Boolean(false) => Ok(Vec::new()),
            Value::Integer(n) if (0..=i64::from(u8::MAX)).contains(n) => {
                Ok((0..*n).map(|_| flag()).collect())
            }
            _ => Err("expects a count from 0 to 255, or true/false".into()),
        },
        _ => {
            let takes_several = arg.get_num_args().is_some_and(|r| r.max_values() > 1);
            let repeats = matches!(arg.get_action(), ArgAction::Append);
            match value {
                // `--pair a b`: one occurrence with several values.
                Value::Array(items) if takes_several => {
                    let mut tokens = vec![flag()];
                    for v in items {
                        tokens.push(OsString::from(scalar(v)?));
                    }
                    Ok(tokens)
                }
                // `--tap-fd=5 --tap-fd=6`: the option repeated.
                Value::Array(items) if repeats => items
                    .iter()
                    .map(|v| scalar(v).map(|s| with_value(&s)))
                    .collect(),
                Value::Array(_) => Err("takes a single value, not a list".into()),
                v => Ok(vec![with_value(&scalar(v)?)]),
            }
        }
    }
}

/// A TOML scalar as the text the command line would carry.
fn scalar(value: &Value) -> Result<String, String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Integer(i) => Ok(i.to_string()),
        Value::Float(f) => Ok(f.to_string()),
        Value::Boolean(b) => Ok(b.to_string()),
        Value::Datetime(d) => Ok(d.to_string()),
        Value::Array(_) => Err("expects a single value here, not a nested list".into()),
        Value::Table(_) => Err("expects a value, not a table".into()),
    }
}

/// Splits `--config FILE` (or `--config=FILE`) off `argv`. Leaves it in place when the
/// daemon has a `--config` of its own and the file is not a `.toml` file.
fn split_config(
    cmd: &clap::Command,
    argv: &[OsString],
) -> Result<(Option<PathBuf>, Vec<OsString>), Error> {
    let own = own_config_flag(cmd);
    let flag = format!("--{CONFIG_FLAG}");
    let prefix = format!("--{CONFIG_FLAG}=");
    let mut file: Option<PathBuf> = None;
    let mut rest = Vec::with_capacity(argv.len());
    let mut i = 0;
    let mut after_double_dash = false;
    while i < argv.len() {
        let token = &argv[i];
        let text = token.to_str();
        let value: Option<(OsString, usize)> = match text {
            _ if after_double_dash || i == 0 => None,
            Some("--") => {
                after_double_dash = true;
                None
            }
            Some(t) if t == flag => argv.get(i + 1).map(|v| (v.clone(), 2)),
            Some(t) if t.starts_with(&prefix) => Some((OsString::from(&t[prefix.len()..]), 1)),
            _ => None,
        };
        match value {
            Some((path, used)) if !own || is_toml(&path) => {
                if file.replace(PathBuf::from(path)).is_some() {
                    return Err(Error::SeveralFiles);
                }
                i += used;
            }
            _ => {
                rest.push(token.clone());
                i += 1;
            }
        }
    }
    Ok((file, rest))
}

fn is_toml(path: &OsStr) -> bool {
    Path::new(path)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("toml"))
}

/// Drops the file's options that the command line replaces: the same option, or one that
/// conflicts with an option the command line gives.
fn drop_overridden(cmd: &clap::Command, from_file: Vec<FileArg>, cli: &[OsString]) -> Vec<FileArg> {
    let Ok(matches) = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(cli.iter().cloned())
    else {
        // `--help`, `--version`: the real parse reports it.
        return from_file;
    };
    let on_cli: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| {
            matches.value_source(a.get_id().as_str())
                == Some(clap::parser::ValueSource::CommandLine)
        })
        .collect();
    from_file
        .into_iter()
        .filter(|f| {
            let Some(file_arg) = cmd.get_arguments().find(|a| a.get_id() == f.id.as_str()) else {
                return true;
            };
            !on_cli.iter().any(|c| {
                c.get_id() == file_arg.get_id()
                    || cmd
                        .get_arg_conflicts_with(c)
                        .iter()
                        .any(|x| x.get_id() == file_arg.get_id())
                    || cmd
                        .get_arg_conflicts_with(file_arg)
                        .iter()
                        .any(|x| x.get_id() == c.get_id())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A daemon's command line in miniature.
    #[derive(Parser, Debug, PartialEq)]
    #[command(name = "vhost-device-test")]
    struct Args {
        #[command(flatten)]
        common: crate::cli::CommonArgs,
        /// An image.
        #[arg(long)]
        image: Option<PathBuf>,
        /// A required option.
        #[arg(long)]
        serial: String,
        /// A number.
        #[arg(long, default_value_t = 1)]
        num_queues: u16,
        /// A flag.
        #[arg(long)]
        read_only: bool,
        /// Repeated.
        #[arg(long)]
        tap_fd: Vec<i32>,
        /// Counted.
        #[arg(short, long, action = ArgAction::Count)]
        verbose: u8,
        /// Several values at once.
        #[arg(long, num_args = 2)]
        pair: Vec<String>,
    }

    /// A daemon with its own `--config` (vsock's YAML).
    #[derive(Parser, Debug)]
    #[command(name = "vhost-device-own")]
    struct OwnConfig {
        /// YAML.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A value.
        #[arg(long)]
        guest_cid: Option<u64>,
    }

    struct File {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    fn file(name: &str, text: &str) -> File {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        File { _dir: dir, path }
    }

    fn parse_with(f: &File, cli: &[&str]) -> Result<Args, Error> {
        let mut argv = vec!["vhost-device-test".to_string(), "--config".into()];
        argv.push(f.path.display().to_string());
        argv.extend(cli.iter().map(ToString::to_string));
        try_parse_from::<Args, _, _>(argv)
    }

    fn message(err: &Error) -> String {
        crate::error_chain(err)
    }

    #[test]
    fn the_file_alone_sets_every_kind_of_option() {
        let f = file(
            "vm1.toml",
            r#"
socket-path = "/run/vm1.sock"
image = "/var/lib/vm1.raw"
serial = "disk-1"
num_queues = 4
read-only = true
tap-fd = [5, 6]
verbose = 2
pair = ["a", "b"]
"#,
        );
        let args = parse_with(&f, &[]).expect("valid file");
        assert_eq!(
            args.common.socket_path,
            Some(PathBuf::from("/run/vm1.sock"))
        );
        assert_eq!(args.image, Some(PathBuf::from("/var/lib/vm1.raw")));
        assert_eq!(args.serial, "disk-1");
        assert_eq!(args.num_queues, 4);
        assert!(args.read_only);
        assert_eq!(args.tap_fd, vec![5, 6]);
        assert_eq!(args.verbose, 2);
        assert_eq!(args.pair, vec!["a", "b"]);
    }

    #[test]
    fn the_command_line_wins_over_the_file() {
        let f = file(
            "vm1.toml",
            "serial = \"from-file\"\nnum-queues = 4\ntap-fd = [5, 6]\nsocket-path = \"/run/f.sock\"\n",
        );
        let args = parse_with(&f, &["--serial", "from-cli", "--tap-fd", "9"]).expect("valid");
        assert_eq!(args.serial, "from-cli");
        assert_eq!(
            args.num_queues, 4,
            "untouched keys still come from the file"
        );
        assert_eq!(
            args.tap_fd,
            vec![9],
            "a repeated option is replaced, not extended"
        );
        // --fd conflicts with --socket-path: the command line's --fd replaces the file's path.
        let args = parse_with(&f, &["--fd", "3"]).expect("valid");
        assert_eq!((args.common.fd, args.common.socket_path), (Some(3), None));
        // Flags given before --config win too: order on the command line does not matter.
        let argv = ["vhost-device-test", "--serial", "early", "--config"];
        let argv = argv
            .iter()
            .map(|s| OsString::from(*s))
            .chain([f.path.clone().into()]);
        let args = try_parse_from::<Args, _, _>(argv).expect("valid");
        assert_eq!(args.serial, "early");
    }

    #[test]
    fn false_leaves_a_flag_unset_and_underscores_equal_dashes() {
        let f = file(
            "x.toml",
            "serial = \"s\"\nread_only = false\nsocket_path = \"/s\"\n",
        );
        let args = parse_with(&f, &[]).expect("valid");
        assert!(!args.read_only);
        assert_eq!(args.common.socket_path, Some(PathBuf::from("/s")));
    }

    #[test]
    fn without_config_it_is_plain_clap() {
        let args = try_parse_from::<Args, _, _>([
            "vhost-device-test",
            "--serial",
            "s",
            "--num-queues",
            "3",
        ])
        .expect("valid");
        assert_eq!((args.serial.as_str(), args.num_queues), ("s", 3));
        let err =
            try_parse_from::<Args, _, _>(["vhost-device-test"]).expect_err("serial is required");
        assert!(matches!(err, Error::Cli(_)));
        assert!(message(&err).contains("--serial"), "{}", message(&err));
    }

    #[test]
    fn an_unknown_key_names_the_key_and_the_file() {
        let f = file("vm1.toml", "serial = \"s\"\nimgae = \"/x\"\n");
        let err = parse_with(&f, &[]).expect_err("typo");
        let line = message(&err);
        assert!(line.contains("unknown key `imgae`"), "{line}");
        assert!(line.contains(&f.path.display().to_string()), "{line}");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn wrong_values_say_which_key() {
        for (text, needle) in [
            ("read-only = \"yes\"", "key `read-only`"),
            ("image = [\"a\", \"b\"]", "single value"),
            ("image = { path = \"/x\" }", "not a table"),
            ("verbose = 1000", "count"),
            ("config = \"/other.toml\"", "cannot name another"),
            ("help = true", "unknown key `help`"),
        ] {
            let f = file("x.toml", &format!("serial = \"s\"\n{text}\n"));
            let line = message(&parse_with(&f, &[]).expect_err(text));
            assert!(line.contains(needle), "{text}: {line}");
        }
        // A value clap rejects is clap's error, naming the option.
        let f = file("x.toml", "serial = \"s\"\nnum-queues = \"many\"\n");
        let line = message(&parse_with(&f, &[]).expect_err("not a number"));
        assert!(line.contains("--num-queues"), "{line}");
    }

    #[test]
    fn broken_files_are_one_line_errors() {
        let f = file("x.toml", "serial = \"s\"\nimage = \n");
        let line = message(&parse_with(&f, &[]).expect_err("syntax"));
        assert!(
            line.starts_with(&format!("{}:2:", f.path.display())),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");

        let missing = File {
            path: PathBuf::from("/nonexistent/vhost-device/x.toml"),
            _dir: tempfile::tempdir().expect("tempdir"),
        };
        let line = message(&parse_with(&missing, &[]).expect_err("missing"));
        assert!(
            line.contains("cannot read configuration file /nonexistent/vhost-device/x.toml"),
            "{line}"
        );

        let f = file("x.toml", "serial = \"s\"\n");
        let argv = [
            "vhost-device-test",
            "--config",
            "/a.toml",
            "--config=/b.toml",
        ];
        assert!(matches!(
            try_parse_from::<Args, _, _>(argv).expect_err("two files"),
            Error::SeveralFiles
        ));
        drop(f);
    }

    #[test]
    fn a_daemon_with_its_own_config_keeps_non_toml_files() {
        let yaml = file("vms.yaml", "vms: []\n");
        let argv = [
            "vhost-device-own".into(),
            "--config".into(),
            yaml.path.clone().into_os_string(),
        ];
        let args = try_parse_from::<OwnConfig, _, OsString>(argv).expect("valid");
        assert_eq!(args.config, Some(yaml.path.clone()));

        let toml = file("vm.toml", "guest-cid = 7\n");
        let argv = [
            "vhost-device-own".into(),
            "--config".into(),
            toml.path.clone().into_os_string(),
        ];
        let args = try_parse_from::<OwnConfig, _, OsString>(argv).expect("valid");
        assert_eq!((args.config, args.guest_cid), (None, Some(7)));
    }

    #[test]
    fn help_shows_the_config_option() {
        let help = command::<Args>().render_long_help().to_string();
        assert!(help.contains("--config <FILE>"), "{help}");
        let own = command::<OwnConfig>();
        assert_eq!(
            own.get_arguments()
                .filter(|a| a.get_long() == Some("config"))
                .count(),
            1
        );
    }

    #[test]
    fn line_column_counts_from_one() {
        assert_eq!(line_column("ab\ncd", 4), (2, 2));
        assert_eq!(line_column("ab", 0), (1, 1));
    }
}
