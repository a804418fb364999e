//! Building the VM from a `Config`, running it, and ending it.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
#[cfg(target_arch = "x86_64")]
use std::sync::Mutex;
use std::time::Duration;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::Kvm;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::current as arch;
use crate::bus::{Bus, BusError};
use crate::config::{Config, SerialMode};
use crate::devices::{ExitReason, ExitSignal};
#[cfg(target_arch = "x86_64")]
use crate::pci::PciRoot;
use crate::vcpu::{self, Buses};
use crate::vhost_user::{VhostUserDevice, VhostUserError};
use crate::virtio_pci::VirtioPciError;
#[cfg(target_arch = "x86_64")]
use crate::virtio_pci::{VirtioPciDevice, BAR_SIZE};
use crate::vm_ops::{KvmVmOps, VmOps};

/// A failure that ends the VMM, worded for the user.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {0} failed")]
    KvmIoctl(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Architecture set-up failed.
    #[error(transparent)]
    Arch(#[from] arch::ArchError),
    /// A daemon could not be attached.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    /// A virtio-pci function could not be built.
    #[error("device {0}")]
    VirtioPci(String, #[source] VirtioPciError),
    /// A virtio-mmio device could not be built (aarch64).
    #[error("device {0}")]
    VirtioMmio(String, #[source] crate::virtio_mmio::VirtioMmioError),
    /// PCI bus set-up failed.
    #[error(transparent)]
    Pci(#[from] crate::pci::PciError),
    /// A bus range conflict (a bug).
    #[error("device address conflict")]
    Bus(#[source] BusError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// An irqfd could not be registered.
    #[error("cannot register an interrupt eventfd")]
    Irqfd(#[source] std::io::Error),
    /// The serial output file could not be opened.
    #[error("cannot open serial output file {0}")]
    SerialFile(String, #[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    /// The devices do not fit the BAR window.
    #[error("too many devices for the PCI memory window")]
    NoBarSpace,
    /// The kernel or initramfs cannot be opened.
    #[error("cannot open {0}")]
    Open(String, #[source] std::io::Error),
    /// The guest failed.
    #[error("the guest stopped: {0}")]
    Guest(String),
}

/// A daemon whose socket is watched for hang-ups, and reconnected to after one.
struct Watched {
    fd: RawFd,
    what: String,
    daemon: crate::vhost_user::Reconnector,
}

fn serial_output(mode: &SerialMode) -> Result<Box<dyn Write + Send>, VmmError> {
    Ok(match mode {
        SerialMode::Stdio => Box::new(std::io::stdout()),
        SerialMode::None => Box::new(std::io::sink()),
        SerialMode::File(p) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| VmmError::SerialFile(p.display().to_string(), e))?,
        ),
    })
}

/// Builds and runs the VM; returns how the guest ended it.
pub fn run(config: &Config) -> Result<ExitReason, VmmError> {
    // What the user most likely got wrong is checked first, before KVM is touched: the
    // kernel and initramfs paths, then the daemons (a missing one names its socket).
    for path in std::iter::once(&config.kernel).chain(config.initramfs.as_ref()) {
        std::fs::File::open(path).map_err(|e| VmmError::Open(path.display().to_string(), e))?;
    }
    let ranges: Vec<(GuestAddress, u64)> = arch::ram_ranges(config.memory)
        .into_iter()
        .map(|(a, s)| (GuestAddress(a), s))
        .collect();
    let mem = crate::memory::create(&ranges)?;
    let mut backends = Vec::new();
    for d in &config.devices {
        backends.push((d.clone(), VhostUserDevice::connect(d, mem.clone())?));
    }

    let kvm = Kvm::new().map_err(VmmError::Kvm)?;
    let vm = Arc::new(
        kvm.create_vm()
            .map_err(|e| VmmError::KvmIoctl("CREATE_VM", e))?,
    );
    // `()` on x86_64, the in-kernel GIC on aarch64.
    #[allow(clippy::let_unit_value)]
    let arch_vm = arch::setup_vm(&vm)?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmmError::Guest("guest memory region without a host mapping".into()))?;
        let r = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap_or(u32::MAX),
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the region maps `memory_size` bytes at `userspace_addr` and lives in `mem`,
        // which outlives the VM: `run` drops the vCPUs and the VM before returning, and the
        // slot numbers and guest ranges are distinct by construction of `ram_ranges`.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| VmmError::KvmIoctl("SET_USER_MEMORY_REGION", e))?;
    }

    let entry = arch::load_guest(&mem, config, &arch_vm)?;

    // Every vCPU exists before any interrupt is wired: on aarch64 the vGIC is initialised
    // once all vCPUs are created, and KVM accepts irqfds only after that.
    let mut vcpus = Vec::new();
    for id in 0..config.cpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|e| VmmError::KvmIoctl("CREATE_VCPU", e))?;
        arch::configure_vcpu(&kvm, &vm, &fd, id, config.cpus, entry)?;
        vcpus.push(fd);
    }
    arch::finish_vcpus(&arch_vm)?;

    let ops = Arc::new(KvmVmOps::new(
        vm.clone(),
        &arch::legacy_routes(),
        arch::FIRST_MSI_GSI,
    ));
    ops.commit_initial().map_err(VmmError::Irqfd)?;
    let exit = Arc::new(ExitSignal::new().map_err(VmmError::EventFd)?);
    let buses = Buses {
        io: Arc::new(Bus::new()),
        mmio: Arc::new(Bus::new()),
    };
    let serial =
        arch::add_platform_devices(&buses, &exit, serial_output(&config.serial)?, ops.as_ref())?;
    if config.serial == SerialMode::Stdio {
        crate::devices::serial::spawn_stdin_reader(serial).map_err(VmmError::Thread)?;
    }

    #[cfg(target_arch = "x86_64")]
    let root = Arc::new(Mutex::new(PciRoot::new(buses.mmio.clone())));
    #[cfg(target_arch = "x86_64")]
    let (pci_start, pci_size) = arch::PCI_MMIO;
    let mut watched = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for (i, (cfg, backend)) in backends.into_iter().enumerate() {
        let n = counts.entry(cfg.kind.name()).or_insert(0);
        let name = format!("{}{}", cfg.kind.name(), n);
        *n += 1;
        let daemon = backend.reconnector();
        watched.push(Watched {
            fd: daemon.raw_fd(),
            daemon,
            what: format!(
                "{} ({} daemon at {})",
                name,
                cfg.kind.name(),
                cfg.socket.display()
            ),
        });
        #[cfg(target_arch = "aarch64")]
        {
            let addr = arch::add_virtio_device(
                &buses,
                i,
                &name,
                Box::new(backend),
                ops.clone() as Arc<dyn VmOps>,
            )?;
            log::info!("{name}: virtio-mmio at {addr:#x}");
        }
        #[cfg(target_arch = "x86_64")]
        {
            let bar = pci_start + i as u64 * BAR_SIZE;
            if bar + BAR_SIZE > pci_start + pci_size {
                return Err(VmmError::NoBarSpace);
            }
            let bar32 = u32::try_from(bar).map_err(|_| VmmError::NoBarSpace)?;
            let dev = VirtioPciDevice::new(
                name.clone(),
                Box::new(backend),
                ops.clone() as Arc<dyn VmOps>,
                bar32,
            )
            .map_err(|e| VmmError::VirtioPci(name.clone(), e))?;
            let dev = Arc::new(Mutex::new(dev));
            let slot = root
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .add(dev.clone(), dev, &[(bar, BAR_SIZE)])?;
            log::info!("{name}: PCI 00:{slot:02x}.0, BAR0 {bar:#x}");
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (cfg_port, cfg_len) = arch::PCI_CONFIG_PORTS;
        buses
            .io
            .insert(root, cfg_port, cfg_len)
            .map_err(VmmError::Bus)?;
    }

    vcpu::install_kick_handler().map_err(VmmError::Thread)?;
    let mut handles = Vec::new();
    for (id, fd) in (0..config.cpus).zip(vcpus) {
        handles.push(vcpu::spawn(id, fd, buses.clone(), exit.clone()).map_err(VmmError::Thread)?);
    }

    wait_for_exit(&exit, &mut watched);

    for h in handles {
        while !h.is_finished() {
            // SAFETY: the thread has not been joined, so its pthread_t is valid; the kick
            // signal has a no-op handler installed, so it only interrupts KVM_RUN.
            unsafe { libc::pthread_kill(h.as_pthread_t(), vcpu::kick_signal()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        if h.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
    let reason = exit
        .reason()
        .unwrap_or(ExitReason::Error("no exit reason".into()));
    drop(vm);
    log_memory_use();
    Ok(reason)
}

/// How often a daemon that went away is looked for again.
const RECONNECT_INTERVAL_MS: i32 = 1000;

/// Waits for the exit signal, reporting daemons that hang up meanwhile and connecting to
/// them again once they are back (a restarted daemon, or systemd restarting the unit).
fn wait_for_exit(exit: &ExitSignal, watched: &mut Vec<Watched>) {
    use std::os::fd::AsRawFd;
    let mut gone: Vec<(Watched, Option<String>)> = Vec::new();
    loop {
        let mut fds: Vec<libc::pollfd> = vec![libc::pollfd {
            fd: exit.event().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        fds.extend(watched.iter().map(|w| libc::pollfd {
            fd: w.fd,
            events: libc::POLLRDHUP,
            revents: 0,
        }));
        let timeout = if gone.is_empty() {
            -1
        } else {
            RECONNECT_INTERVAL_MS
        };
        // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structures that
        // lives across the call; poll only writes their `revents`.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("poll: {e}");
            std::thread::sleep(Duration::from_millis(100));
        }
        if exit.is_requested() {
            return;
        }
        let hung: Vec<usize> = fds[1..]
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0
            })
            .map(|(i, _)| i)
            .collect();
        for i in hung.into_iter().rev() {
            let w = watched.remove(i);
            w.daemon.disconnected();
            log::error!(
                "{} disconnected; the VM keeps running without it, reconnecting",
                w.what
            );
            eprintln!(
                "vmm-frontend: {} disconnected; the VM keeps running without it",
                w.what
            );
            gone.push((w, None));
        }
        let mut i = 0;
        while i < gone.len() {
            match gone[i].0.daemon.reconnect() {
                Ok(fd) => {
                    let (mut w, _) = gone.remove(i);
                    w.fd = fd;
                    log::info!("{} reconnected", w.what);
                    eprintln!("vmm-frontend: {} reconnected", w.what);
                    watched.push(w);
                }
                Err(e) => {
                    // Said once per new reason, not every second.
                    if gone[i].1.as_deref() != Some(e.as_str()) {
                        log::warn!("{}: not back yet: {e}", gone[i].0.what);
                        gone[i].1 = Some(e);
                    }
                    i += 1;
                }
            }
        }
        let _ = exit.event().read();
    }
}

/// Logs the VMM's own peak and current memory use: `VmHWM` counts the guest pages the VMM
/// mapped too, `RssAnon` is the VMM's overhead proper (guest RAM is shared memfd memory).
fn log_memory_use() {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return;
    };
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map_or("?", str::trim)
            .to_string()
    };
    log::info!(
        "memory: peak resident {}, anonymous {}, guest (shared) {}",
        field("VmHWM:"),
        field("RssAnon:"),
        field("RssShmem:")
    );
}
