//! Confining a daemon once its sockets and files are open: an optional drop to another user
//! (`--user`) and a seccomp allow-list of system calls (`--seccomp`), as Firecracker does.
//!
//! [`crate::serve()`] calls [`Sandbox::enter`] after the listening socket, the image, the tap or
//! the endpoints are open and before it starts the accept thread, so every connection's
//! worker threads start confined. The filter is installed with `SECCOMP_FILTER_FLAG_TSYNC`,
//! so a thread a device started earlier (the console's endpoint threads) gets it too.
//!
//! The allow-list is [`common_syscalls`] (what the shared serving loop, vhost-user-backend,
//! the Rust runtime and glibc do while serving) plus the device's own list
//! ([`crate::Device::syscalls`]). Both were found by running every test of the daemons with
//! `--seccomp log` and reading the kernel's audit lines, not by guessing; `docs/security.md`
//! says how to do that again.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// What a system call that is not on the list does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum SeccompMode {
    /// The kernel kills the process (`SECCOMP_RET_KILL_PROCESS`): it dies of `SIGSYS`.
    #[default]
    Kill,
    /// The process gets `SIGSYS`; the daemon prints one line naming the system call's number,
    /// then dies of `SIGSYS`.
    Trap,
    /// The call is allowed and the kernel logs it (`dmesg`, audit `type=1326`): for finding
    /// what a new set-up needs.
    Log,
    /// No filter.
    None,
}

/// Why the daemon could not confine itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--user` names no user (or group) of this system.
    #[error("--user {spec}: no {what} named {name} on this system")]
    UnknownName {
        /// The `--user` value.
        spec: String,
        /// `user` or `group`.
        what: &'static str,
        /// The name that was not found.
        name: String,
    },
    /// Looking the user up failed.
    #[error("--user {spec}: cannot look up {name}")]
    Lookup {
        /// The `--user` value.
        spec: String,
        /// The name being looked up.
        name: String,
        /// What the system said.
        #[source]
        source: nix::Error,
    },
    /// `setgroups`, `setgid` or `setuid` failed (usually: the daemon is not root).
    #[error("--user {spec}: cannot drop privileges ({call})")]
    Drop {
        /// The `--user` value.
        spec: String,
        /// The failing call.
        call: &'static str,
        /// What the system said.
        #[source]
        source: nix::Error,
    },
    /// The filter could not be built (a bug in a list).
    #[error("cannot build the seccomp filter")]
    Build(#[source] seccompiler::BackendError),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter (--seccomp none runs without one)")]
    Install(#[source] seccompiler::Error),
    /// The `SIGSYS` handler for `--seccomp trap` could not be installed.
    #[error("cannot install the SIGSYS handler for --seccomp trap")]
    Handler(#[source] nix::Error),
}

/// A set of allowed system calls, each allowed outright or only for some argument values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Syscalls {
    /// `None`: allowed whatever the arguments; `Some(list)`: allowed when argument `.0`
    /// equals `.1` for one entry of the list.
    rules: BTreeMap<i64, Option<Vec<(u8, u64)>>>,
}

impl Syscalls {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Allows each of `numbers` (`libc::SYS_*`) whatever its arguments.
    pub fn allow(mut self, numbers: &[libc::c_long]) -> Self {
        for &nr in numbers {
            self.rules.insert(nr, None);
        }
        self
    }

    /// Allows `number` when its argument `arg` (0-based, compared as 32 bits) is one of
    /// `values`: ioctl request numbers, fcntl commands, socket domains.
    pub fn allow_arg(mut self, number: libc::c_long, arg: u8, values: &[u64]) -> Self {
        let entry = self.rules.entry(number).or_insert_with(|| Some(Vec::new()));
        if let Some(list) = entry {
            list.extend(values.iter().map(|&value| (arg, value)));
        }
        self
    }

    /// Allows `ioctl` with each of `requests` (`libc::TUNSETOFFLOAD`, ...), whatever the
    /// descriptor and the third argument.
    pub fn allow_ioctl(self, requests: &[libc::Ioctl]) -> Self {
        // The request is an `unsigned long` in the kernel, `Ioctl` in the libc crate (`c_ulong`
        // or `c_int` depending on the C library): the filter compares its low 32 bits.
        #[allow(clippy::unnecessary_cast)]
        let values: Vec<u64> = requests.iter().map(|&r| r as u64).collect();
        self.allow_arg(libc::SYS_ioctl, 1, &values)
    }

    /// Adds everything `other` allows.
    pub fn merge(mut self, other: &Syscalls) -> Self {
        for (&nr, rules) in &other.rules {
            match (self.rules.get_mut(&nr), rules) {
                (Some(Some(mine)), Some(theirs)) => mine.extend(theirs.iter().copied()),
                (Some(mine @ Some(_)), None) => *mine = None,
                (Some(None), _) => {}
                (None, rules) => {
                    self.rules.insert(nr, rules.clone());
                }
            }
        }
        self
    }

    /// How many system calls are on the list.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the list is empty.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `number` is on the list (with or without argument conditions).
    pub fn contains(&self, number: libc::c_long) -> bool {
        self.rules.contains_key(&number)
    }

    /// Compiles the list to a BPF program for this machine: what is on the list is allowed,
    /// anything else gets `mode`'s action. `None` for [`SeccompMode::None`].
    pub fn compile(&self, mode: SeccompMode) -> Result<Option<BpfProgram>, Error> {
        let mismatch = match mode {
            SeccompMode::Kill => SeccompAction::KillProcess,
            SeccompMode::Trap => SeccompAction::Trap,
            SeccompMode::Log => SeccompAction::Log,
            SeccompMode::None => return Ok(None),
        };
        let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(Error::Build)?;
        let mut rules = BTreeMap::new();
        for (&nr, list) in &self.rules {
            let mut chain = Vec::new();
            for &(arg, value) in list.iter().flatten() {
                let cond =
                    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
                        .map_err(Error::Build)?;
                chain.push(SeccompRule::new(vec![cond]).map_err(Error::Build)?);
            }
            // An empty chain allows the call outright, which `Some(empty)` never means.
            if list.is_some() && chain.is_empty() {
                continue;
            }
            rules.insert(nr, chain);
        }
        let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch)
            .map_err(Error::Build)?;
        BpfProgram::try_from(filter).map(Some).map_err(Error::Build)
    }
}

/// The system calls every daemon makes while serving: vhost-user messages with file
/// descriptors (`recvmsg`/`sendmsg`), guest memory (`mmap`), eventfds and epoll, worker
/// threads started per connection, the signalfd, logging, systemd notification (an
/// `AF_UNIX` datagram socket), removing the socket file at exit. Each was seen in a trace of
/// the daemons' tests, except where a comment says why it is here anyway. Built for the
/// calling process (`tgkill` is allowed towards its own PID only).
pub fn common_syscalls() -> Syscalls {
    use libc::*;
    let list = Syscalls::new()
        .allow(&[
            // I/O on the descriptors the daemon holds, the signalfd and the log.
            SYS_read,
            SYS_write,
            SYS_writev,
            SYS_close,
            SYS_statx,
            // Events.
            SYS_epoll_create1,
            SYS_epoll_ctl,
            SYS_eventfd2,
            // The vhost-user socket and frontends.
            SYS_accept4,
            SYS_recvmsg,
            SYS_sendmsg,
            SYS_recvfrom,
            SYS_sendto,
            SYS_shutdown,
            SYS_getsockopt,
            // sd_notify connects its datagram socket to $NOTIFY_SOCKET.
            SYS_connect,
            // Guest memory and the allocator (brk: glibc's main arena).
            SYS_mmap,
            SYS_munmap,
            SYS_mprotect,
            SYS_madvise,
            SYS_mremap,
            SYS_brk,
            // Threads (vhost-user-backend starts workers per connection) and their end;
            // `clone` is glibc's fallback where the kernel has no `clone3`.
            SYS_clone,
            SYS_clone3,
            SYS_futex,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_sched_getaffinity,
            SYS_sigaltstack,
            SYS_rt_sigprocmask,
            SYS_rt_sigaction,
            SYS_rt_sigreturn,
            SYS_restart_syscall,
            SYS_gettid,
            SYS_exit,
            SYS_exit_group,
            SYS_getpid,
            // Log timestamps: the vDSO answers, unless the clock source has no vDSO path.
            SYS_clock_gettime,
            // HashMap seeds.
            SYS_getrandom,
        ])
        .allow_arg(
            SYS_fcntl,
            1,
            &[
                F_GETFD as u64,
                F_GETFL as u64,
                F_SETFL as u64,
                F_DUPFD_CLOEXEC as u64,
            ],
        )
        // Rust's std sets O_NONBLOCK on sockets with FIONBIO.
        .allow_ioctl(&[FIONBIO])
        // sd_notify's datagram socket; no other kind of socket.
        .allow_arg(SYS_socket, 0, &[AF_UNIX as u64])
        // Thread names.
        .allow_arg(SYS_prctl, 0, &[PR_SET_NAME as u64])
        // abort() and `--seccomp trap` signal the calling thread: this process only.
        .allow_arg(SYS_tgkill, 0, &[u64::from(std::process::id())]);
    // Where x86_64 has the old calls, aarch64 has only their successors.
    #[cfg(target_arch = "x86_64")]
    let list = list.allow(&[SYS_epoll_wait, SYS_poll, SYS_unlink]);
    #[cfg(not(target_arch = "x86_64"))]
    let list = list.allow(&[SYS_epoll_pwait, SYS_ppoll, SYS_unlinkat]);
    list
}

/// How the daemon confines itself: `--seccomp` and `--user`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sandbox {
    /// What a system call off the list does.
    pub seccomp: SeccompMode,
    /// `USER[:GROUP]` to switch to, if any.
    pub user: Option<String>,
}

impl Sandbox {
    /// Drops to `--user` (if given), then installs the seccomp filter made of
    /// [`common_syscalls`] and `extra` in every thread of the process. `name` prefixes the
    /// `--seccomp trap` message.
    pub fn enter(&self, name: &str, extra: &Syscalls) -> Result<(), Error> {
        // Build the filter before anything changes, so a bug in a list changes nothing.
        let list = common_syscalls().merge(extra);
        let program = list.compile(self.seccomp)?;
        if let Some(spec) = &self.user {
            drop_privileges(spec)?;
        }
        let Some(program) = program else {
            log::warn!("running without a seccomp filter (--seccomp none)");
            return Ok(());
        };
        settle_allocator();
        if self.seccomp == SeccompMode::Trap {
            install_trap_handler(name)?;
        }
        seccompiler::apply_filter_all_threads(&program).map_err(Error::Install)?;
        let others = match self.seccomp {
            SeccompMode::Kill => "any other kills the process",
            SeccompMode::Trap => "any other is reported, then kills the process",
            SeccompMode::Log | SeccompMode::None => "any other is allowed and logged by the kernel",
        };
        log::info!(
            "seccomp filter installed: {} system calls allowed, {others}",
            list.len()
        );
        Ok(())
    }
}

/// Makes glibc's malloc decide now what it would otherwise find out under the filter, with a
/// file it opens (an `openat` the filter kills):
/// - the first time the process needs a ninth arena (a ninth thread allocating at once, e.g.
///   the workers of a device with many queues), glibc reads `/sys/devices/system/cpu/online`
///   to bound the number of arenas: setting the bound (glibc's own default, 8 per CPU)
///   skips that read;
/// - the first time `free` trims the top of a thread's heap (`shrink_heap`), glibc reads
///   `/proc/sys/vm/overcommit_memory` (found by the vsock daemon's reconnections): a trim
///   threshold no heap reaches keeps freed memory in the arena for reuse instead (whole
///   thread heaps are still unmapped when they empty).
fn settle_allocator() {
    #[cfg(target_env = "gnu")]
    {
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
        for (param, value) in [
            (libc::M_ARENA_MAX, arenas),
            (libc::M_TRIM_THRESHOLD, libc::c_int::MAX),
        ] {
            // SAFETY: mallopt(3) sets an allocator tunable under the allocator's own lock;
            // it reads and writes no memory of the caller.
            if unsafe { libc::mallopt(param, value) } != 1 {
                log::warn!(
                    "cannot set malloc tunable {param}; a busy daemon may die under the filter"
                );
            }
        }
    }
}

/// The uid and gid `USER[:GROUP]` names (numbers are accepted too).
pub fn resolve_user(spec: &str) -> Result<(nix::unistd::Uid, nix::unistd::Gid), Error> {
    use nix::unistd::{Gid, Group, Uid, User};
    let (user, group) = match spec.split_once(':') {
        Some((user, group)) => (user, Some(group)),
        None => (spec, None),
    };
    let unknown = |what, name: &str| Error::UnknownName {
        spec: spec.to_string(),
        what,
        name: name.to_string(),
    };
    let lookup = |name: &str, source| Error::Lookup {
        spec: spec.to_string(),
        name: name.to_string(),
        source,
    };
    let (uid, primary) = match User::from_name(user).map_err(|e| lookup(user, e))? {
        Some(entry) => (entry.uid, entry.gid),
        None => match user.parse::<u32>() {
            Ok(n) if !user.is_empty() => (Uid::from_raw(n), Gid::from_raw(n)),
            _ => return Err(unknown("user", user)),
        },
    };
    let gid = match group {
        None => primary,
        Some(group) => match Group::from_name(group).map_err(|e| lookup(group, e))? {
            Some(entry) => entry.gid,
            None => match group.parse::<u32>() {
                Ok(n) => Gid::from_raw(n),
                Err(_) => return Err(unknown("group", group)),
            },
        },
    };
    Ok((uid, gid))
}

/// Switches the whole process to `USER[:GROUP]`: supplementary groups to just that group,
/// then the gid, then the uid (glibc applies each to every thread).
pub fn drop_privileges(spec: &str) -> Result<(), Error> {
    let (uid, gid) = resolve_user(spec)?;
    let fail = |call, source| Error::Drop {
        spec: spec.to_string(),
        call,
        source,
    };
    nix::unistd::setgroups(&[gid]).map_err(|e| fail("setgroups", e))?;
    nix::unistd::setgid(gid).map_err(|e| fail("setgid", e))?;
    nix::unistd::setuid(uid).map_err(|e| fail("setuid", e))?;
    // A process that could go back to root has not dropped anything.
    if nix::unistd::setuid(nix::unistd::Uid::from_raw(0)).is_ok() && !uid.is_root() {
        return Err(fail("setuid", nix::Error::EPERM));
    }
    log::info!("running as uid {uid}, gid {gid}");
    Ok(())
}

/// `NAME: seccomp: ` written by the `SIGSYS` handler, built before the filter is installed.
static TRAP_PREFIX: OnceLock<Vec<u8>> = OnceLock::new();

/// The `_sigsys` member of the kernel's `siginfo_t` (`include/uapi/asm-generic/siginfo.h`),
/// which the libc crate does not expose: after `si_signo`, `si_errno`, `si_code` and the
/// padding that aligns the union to 8 bytes on 64-bit machines.
#[repr(C)]
struct SigsysInfo {
    signo: libc::c_int,
    errno: libc::c_int,
    code: libc::c_int,
    #[cfg(target_pointer_width = "64")]
    _pad: libc::c_int,
    call_addr: *mut libc::c_void,
    syscall: libc::c_int,
    arch: libc::c_uint,
}

fn install_trap_handler(name: &str) -> Result<(), Error> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let _ = TRAP_PREFIX.set(format!("{name}: seccomp: blocked system call number ").into_bytes());
    let action = SigAction::new(
        SigHandler::SigAction(on_sigsys),
        SaFlags::SA_SIGINFO,
        SigSet::empty(),
    );
    // SAFETY: `on_sigsys` only makes async-signal-safe calls (write, sigaction, tgkill) and
    // reads a `OnceLock` that was set before the handler could run.
    unsafe { sigaction(Signal::SIGSYS, &action) }
        .map(drop)
        .map_err(Error::Handler)
}

/// Writes `NAME: seccomp: blocked system call number N (see docs/security.md)` to stderr,
/// then makes the process die of `SIGSYS` as in [`SeccompMode::Kill`].
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let mut line = [0u8; 256];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        for &b in bytes {
            if let Some(slot) = line.get_mut(len) {
                *slot = b;
                len += 1;
            }
        }
    };
    if let Some(prefix) = TRAP_PREFIX.get() {
        push(prefix);
    }
    // SAFETY: the kernel passes a valid siginfo for a SA_SIGINFO handler; for SIGSYS from
    // seccomp (si_code SYS_SECCOMP) its union holds `_sigsys`, whose layout `SigsysInfo`
    // reproduces. Only plain integers are read.
    let nr = unsafe { info.cast::<SigsysInfo>().as_ref() }.map_or(-1, |i| i.syscall);
    let mut digits = [0u8; 12];
    let mut n = i64::from(nr).unsigned_abs();
    let mut start = digits.len();
    loop {
        start -= 1;
        if let Some(d) = digits.get_mut(start) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || start == 0 {
            break;
        }
    }
    if nr < 0 {
        push(b"-");
    }
    push(digits.get(start..).unwrap_or_default());
    push(b" (see docs/security.md; --seccomp log lists them all)\n");
    // SAFETY: write(2) on stderr with a buffer and a length inside it; signal(2) back to the
    // default action and tgkill(2) of this thread are async-signal-safe. SIGSYS stays blocked
    // until this handler returns, then the pending one ends the process.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            libc::syscall(libc::SYS_gettid),
            libc::SIGSYS,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{fork, ForkResult};

    /// Runs `body` in a forked child under `program`; returns how the child ended. The
    /// program is compiled before the fork, so the child only makes system calls.
    fn in_child(program: &BpfProgram, body: fn() -> i32) -> WaitStatus {
        // SAFETY: the child only calls async-signal-safe functions (prctl, seccomp, the
        // system calls in `body`, _exit) before it exits; it never returns to the test harness.
        match unsafe { fork() }.expect("fork") {
            ForkResult::Child => {
                let code = match seccompiler::apply_filter(program) {
                    Ok(()) => body(),
                    Err(_) => 100,
                };
                // SAFETY: ends the child without running the parent's atexit handlers.
                unsafe { libc::_exit(code) }
            }
            ForkResult::Parent { child } => waitpid(child, None).expect("waitpid"),
        }
    }

    fn inet_socket() -> i32 {
        // SAFETY: socket(2) with constant arguments; the descriptor is closed if it exists.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        if fd >= 0 {
            // SAFETY: closing the descriptor just created.
            unsafe { libc::close(fd) };
            return 0;
        }
        std::io::Error::last_os_error().raw_os_error().unwrap_or(1)
    }

    fn unix_socket_and_eventfd() -> i32 {
        // SAFETY: socket(2) and eventfd(2) with constant arguments; both closed.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            let ev = libc::eventfd(0, libc::EFD_CLOEXEC);
            if fd < 0 || ev < 0 {
                return 2;
            }
            libc::close(fd);
            libc::close(ev);
        }
        0
    }

    fn exec_true() -> i32 {
        let path = c"/bin/true";
        let argv = [path.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        // SAFETY: execve(2) with NUL-terminated strings and NULL-terminated arrays.
        unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        3
    }

    fn signal_the_parent() -> i32 {
        // SAFETY: kill(2) with signal 0 only checks that the parent exists.
        unsafe { libc::kill(libc::getppid(), 0) }
    }

    fn program(mode: SeccompMode) -> BpfProgram {
        common_syscalls()
            .compile(mode)
            .expect("filter builds")
            .expect("a program")
    }

    #[test]
    fn an_inet_socket_kills_the_process() {
        let status = in_child(&program(SeccompMode::Kill), inet_socket);
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "{status:?}"
        );
    }

    #[test]
    fn execve_kills_the_process() {
        let status = in_child(&program(SeccompMode::Kill), exec_true);
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "{status:?}"
        );
    }

    #[test]
    fn signalling_another_process_kills_the_process() {
        let status = in_child(&program(SeccompMode::Kill), signal_the_parent);
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "{status:?}"
        );
    }

    #[test]
    fn what_the_list_allows_still_works() {
        let status = in_child(&program(SeccompMode::Kill), unix_socket_and_eventfd);
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    }

    #[test]
    fn log_mode_lets_the_call_through() {
        let status = in_child(&program(SeccompMode::Log), inet_socket);
        assert!(matches!(status, WaitStatus::Exited(_, 0)), "{status:?}");
    }

    #[test]
    fn trap_mode_dies_of_sigsys() {
        // The handler in this (unfiltered) test process is inherited by the child.
        install_trap_handler("test").expect("handler");
        let status = in_child(&program(SeccompMode::Trap), inet_socket);
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "{status:?}"
        );
    }

    #[test]
    fn none_mode_has_no_program() {
        assert!(common_syscalls()
            .compile(SeccompMode::None)
            .expect("ok")
            .is_none());
    }

    #[test]
    fn merge_keeps_the_wider_rule() {
        let narrow = Syscalls::new().allow_arg(libc::SYS_ioctl, 1, &[1]);
        let wide = Syscalls::new().allow(&[libc::SYS_ioctl]);
        let merged = narrow.clone().merge(&wide);
        assert_eq!(merged.rules.get(&libc::SYS_ioctl), Some(&None));
        let both = narrow.merge(&Syscalls::new().allow_arg(libc::SYS_ioctl, 1, &[2]));
        assert!(matches!(both.rules.get(&libc::SYS_ioctl), Some(Some(r)) if r.len() == 2));
    }

    #[test]
    fn unknown_user_is_named() {
        let err = resolve_user("no-such-user-here").expect_err("unknown");
        assert_eq!(
            err.to_string(),
            "--user no-such-user-here: no user named no-such-user-here on this system"
        );
        let err = resolve_user("root:no-such-group").expect_err("unknown group");
        assert!(err.to_string().contains("no group named no-such-group"));
        assert_eq!(
            resolve_user("root").expect("root").0,
            nix::unistd::Uid::from_raw(0)
        );
    }
}
