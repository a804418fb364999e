//! Child processes a test starts: killed by PID when the guard drops, also when the test
//! panics, and when the test process itself dies (`PR_SET_PDEATHSIG`).

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A running child that is killed (SIGKILL, by its PID) and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
    name: String,
    group: bool,
    status: Option<std::process::ExitStatus>,
}

impl ChildGuard {
    /// Spawns `cmd`, arranging for the kernel to kill it if this process dies first.
    pub fn spawn(name: &str, mut cmd: Command) -> std::io::Result<Self> {
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(ChildGuard {
            child: Some(child),
            name: name.to_string(),
            group: false,
            status: None,
        })
    }

    /// Spawns `sh -c script` as the leader of a new process group; the whole group is
    /// killed on drop (a pipeline's processes too).
    pub fn spawn_shell_group(name: &str, script: &str) -> std::io::Result<Self> {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]).process_group(0);
        let mut guard = Self::spawn(name, cmd)?;
        guard.group = true;
        Ok(guard)
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The child itself (for its pipes).
    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("child is present until drop")
    }

    /// Whether the child has exited, and with what status.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for the child to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal to the child by PID.
    ///
    /// A shell group gets it as a group. Nothing is sent once the child has been reaped, so
    /// a recycled PID is never hit.
    pub fn signal(&self, signal: nix::sys::signal::Signal) -> nix::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        let pid = nix::unistd::Pid::from_raw(
            i32::try_from(self.pid()).map_err(|_| nix::errno::Errno::ESRCH)?,
        );
        if self.group {
            nix::sys::signal::killpg(pid, signal)
        } else {
            nix::sys::signal::kill(pid, signal)
        }
    }

    /// Sends SIGTERM and waits up to `timeout` for a clean exit; SIGKILL after that.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        let _ = self.signal(nix::sys::signal::Signal::SIGTERM);
        let status = self.wait_timeout(timeout);
        if status.is_none() {
            self.kill();
        }
        status
    }

    /// Kills the child (by PID; a shell group as a group) and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_some() {
            return;
        }
        // The child is unreaped here, so its PID (and group ID) still names it.
        let _ = self.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(child) = self.child.as_mut() {
            self.status = child.wait().ok();
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `path` exists (a daemon's socket), or the timeout passes.
pub fn wait_for_path(path: &std::path::Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    path.exists()
}
