//! vCPU threads and the exit dispatch.
//!
//! `handle_exit` is a free function from one `VcpuExit` to an `ExitAction`, so it is tested
//! with synthetic exits. A vCPU thread runs `KVM_RUN` until the VM's `ExitSignal` is set;
//! the main thread then kicks every vCPU out of `KVM_RUN` with a signal and joins it.

use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::bus::Bus;
use crate::devices::{ExitReason, ExitSignal};

/// What the vCPU loop does after an exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitAction {
    /// Run the vCPU again.
    Continue,
    /// End the VM.
    Stop(ExitReason),
}

/// The buses a vCPU dispatches to.
#[derive(Debug, Clone)]
pub struct Buses {
    /// Port I/O.
    pub io: Arc<Bus>,
    /// MMIO.
    pub mmio: Arc<Bus>,
}

/// Dispatches one exit.
pub fn handle_exit(exit: VcpuExit<'_>, buses: &Buses) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            buses.io.read(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            buses.io.write(u64::from(port), data);
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if !buses.mmio.read(addr, data) {
                log::debug!("unhandled MMIO read at {addr:#x}");
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !buses.mmio.write(addr, data) {
                log::debug!("unhandled MMIO write at {addr:#x}");
            }
            ExitAction::Continue
        }
        // With the in-kernel LAPIC, HLT only exits to us if every vCPU halted for good.
        VcpuExit::Hlt => ExitAction::Continue,
        // A triple fault: what Linux's last-resort reboot does.
        VcpuExit::Shutdown => ExitAction::Stop(ExitReason::Reset),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(ExitReason::PowerOff),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(ExitReason::Reset),
            other => ExitAction::Stop(ExitReason::Error(format!("system event {other}"))),
        },
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Stop(ExitReason::Error(format!(
            "KVM entry failed (reason {reason:#x}, cpu {cpu})"
        ))),
        VcpuExit::InternalError => ExitAction::Stop(ExitReason::Error("KVM internal error".into())),
        VcpuExit::Intr | VcpuExit::IrqWindowOpen => ExitAction::Continue,
        other => {
            log::warn!("unexpected vCPU exit {other:?}");
            ExitAction::Continue
        }
    }
}

/// Signal used to kick vCPUs out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the kick signal, so it interrupts `KVM_RUN` with EINTR
/// instead of killing the process.
pub fn install_kick_handler() -> std::io::Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Runs vCPU `id` on its own thread until the VM ends.
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    buses: Buses,
    exit: Arc<ExitSignal>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            while !exit.is_requested() {
                let action = match vcpu.run() {
                    Ok(e) => handle_exit(e, &buses),
                    Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                        ExitAction::Continue
                    }
                    Err(e) => ExitAction::Stop(ExitReason::Error(format!(
                        "vcpu{id}: KVM_RUN failed: {e}"
                    ))),
                };
                if let ExitAction::Stop(reason) = action {
                    exit.request(reason);
                }
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::tests::Recorder;
    use std::sync::Mutex;

    fn buses() -> (Buses, Arc<Mutex<Recorder>>) {
        let b = Buses {
            io: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
        };
        let rec = Arc::new(Mutex::new(Recorder::default()));
        b.io.insert(rec.clone(), 0x3f8, 8).expect("io");
        b.mmio
            .insert(rec.clone(), 0xc000_0000, 0x1000)
            .expect("mmio");
        (b, rec)
    }

    #[test]
    fn io_and_mmio_dispatch() {
        let (b, rec) = buses();
        assert_eq!(
            handle_exit(VcpuExit::IoOut(0x3f8, b"A"), &b),
            ExitAction::Continue
        );
        let mut d = [0u8; 1];
        assert_eq!(
            handle_exit(VcpuExit::IoIn(0x3fd, &mut d), &b),
            ExitAction::Continue
        );
        assert_eq!(d, [5]);
        let mut unmapped = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x2f8, &mut unmapped), &b);
        assert_eq!(unmapped, [0xff, 0xff], "nothing there reads as all ones");
        handle_exit(VcpuExit::MmioWrite(0xc000_0010, &[1, 2]), &b);
        let mut m = [0u8; 4];
        handle_exit(VcpuExit::MmioRead(0xc000_0004, &mut m), &b);
        assert_eq!(m, [4; 4]);
        handle_exit(VcpuExit::MmioWrite(0xd000_0000, &[1]), &b);
        let writes = rec.lock().expect("lock").writes.clone();
        assert_eq!(
            writes,
            [(0x3f8, 0, b"A".to_vec()), (0xc000_0000, 0x10, vec![1, 2])]
        );
    }

    #[test]
    fn ending_exits() {
        let (b, _) = buses();
        assert_eq!(
            handle_exit(VcpuExit::Shutdown, &b),
            ExitAction::Stop(ExitReason::Reset)
        );
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                &b
            ),
            ExitAction::Stop(ExitReason::PowerOff)
        );
        assert_eq!(
            handle_exit(
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_RESET, &[]),
                &b
            ),
            ExitAction::Stop(ExitReason::Reset)
        );
        assert!(matches!(
            handle_exit(VcpuExit::FailEntry(0x80000021, 0), &b),
            ExitAction::Stop(ExitReason::Error(_))
        ));
        assert!(matches!(
            handle_exit(VcpuExit::InternalError, &b),
            ExitAction::Stop(ExitReason::Error(_))
        ));
        assert_eq!(handle_exit(VcpuExit::Hlt, &b), ExitAction::Continue);
    }
}
