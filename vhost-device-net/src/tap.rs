//! The Linux tap device: open or create it, set its offloads and header size, and move
//! frames with their virtio-net header in and out.
//!
//! Every frame read from or written to the tap starts with a virtio-net header
//! (`IFF_VNET_HDR`) whose size is set to the guest's with `TUNSETVNETHDRSZ`, so the header
//! passes between guest and kernel untouched. With several queue pairs the tap is opened
//! once per pair with `IFF_MULTI_QUEUE`, and the kernel spreads flows over the queues.
//!
//! All `unsafe` of the crate is here: the tap and interface ioctls, and `writev`.

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// Why a tap could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded?)")]
    OpenTun(#[source] io::Error),
    /// The kernel refused to attach or create the tap.
    #[error("{}", attach_message(.name, .source))]
    Attach {
        /// The tap's name.
        name: String,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// An interface name that does not fit the kernel's 15 bytes, or has a NUL.
    #[error("invalid tap name {0:?}: at most 15 bytes, no '/', no NUL or blank")]
    BadName(String),
    /// A tap ioctl failed.
    #[error("tap {name}: {what} failed")]
    Ioctl {
        /// The tap's name.
        name: String,
        /// Which request.
        what: &'static str,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// An inherited descriptor is not a tap with a virtio-net header.
    #[error("file descriptor {fd} is not a tap device opened with IFF_TAP | IFF_VNET_HDR")]
    NotVnetTap {
        /// The descriptor number.
        fd: RawFd,
    },
}

fn attach_message(name: &str, err: &io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "no permission to attach or create tap {name}: run with CAP_NET_ADMIN, or create it \
             beforehand with `ip tuntap add {name} mode tap vnet_hdr [multi_queue] user USER`"
        ),
        Some(libc::EBUSY) => format!(
            "tap {name} is busy: another process holds it (or it was created without \
             multi_queue and several queue pairs were asked for)"
        ),
        Some(libc::EINVAL) => format!(
            "tap {name} exists with other flags (tun instead of tap, or without vnet_hdr, or \
             a multi_queue mismatch with --queue-pairs)"
        ),
        _ => format!("cannot attach tap {name}"),
    }
}

/// `struct ifreq`: a name and a 24-byte union, 40 bytes on 64-bit Linux.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Result<Self, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty()
            || bytes.len() >= libc::IFNAMSIZ
            || bytes
                .iter()
                .any(|&b| b == 0 || b == b'/' || b.is_ascii_whitespace())
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }

    fn with_short(name: &str, value: i16) -> Result<Self, TapError> {
        let mut req = Self::new(name)?;
        req.data[..2].copy_from_slice(&value.to_ne_bytes());
        Ok(req)
    }

    fn short(&self) -> i16 {
        i16::from_ne_bytes([self.data[0], self.data[1]])
    }

    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// The interface and tun flags (`IFF_*`) as the 16-bit field of `struct ifreq`: all of them
/// are below 0x8000, so the value is kept.
#[allow(clippy::cast_possible_truncation)]
fn flag16(flags: libc::c_int) -> i16 {
    flags as i16
}

/// Issues an ioctl whose argument is a pointer to `arg`.
fn ioctl_ptr<T>(fd: RawFd, request: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every caller passes a request whose argument is a pointer to a struct of type
    // `T` (an `IfReq` of the kernel's `struct ifreq` size and layout, or a `c_int`); `arg` is
    // a valid, writable `T` for the whole call, and the kernel reads or writes at most
    // `size_of::<T>()` bytes there. A bad `fd` only makes the call fail.
    let ret = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Issues an ioctl whose argument is an integer value (not a pointer).
fn ioctl_val(fd: RawFd, request: libc::c_ulong, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the requests passed here (`TUNSETOFFLOAD`) take their argument by value, so
    // the kernel dereferences no memory of ours. A bad `fd` only makes the call fail.
    let ret = unsafe { libc::ioctl(fd, request as _, value) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One queue of a tap device.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to tap `name`, creating it if it does not exist, with a virtio-net header and,
    /// when `multi_queue`, as one more queue of a multi-queue tap.
    pub fn open(name: &str, multi_queue: bool) -> Result<Self, TapError> {
        let mut req = IfReq::new(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        if multi_queue {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        // The flags fit an i16: IFF_VNET_HDR, the largest, is 0x4000.
        req.data[..2].copy_from_slice(&flag16(flags).to_ne_bytes());
        ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF as libc::c_ulong, &mut req).map_err(
            |source| TapError::Attach {
                name: name.to_string(),
                source,
            },
        )?;
        Ok(Tap {
            file,
            name: req.name(),
        })
    }

    /// Takes an inherited tap descriptor (`--tap-fd`), checking it is a tap with a
    /// virtio-net header, and makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        ioctl_ptr(raw, libc::TUNGETIFF as libc::c_ulong, &mut req)
            .map_err(|_| TapError::NotVnetTap { fd: raw })?;
        let flags = i32::from(req.short());
        if flags & libc::IFF_TAP == 0 || flags & libc::IFF_VNET_HDR == 0 {
            return Err(TapError::NotVnetTap { fd: raw });
        }
        let file = File::from(fd);
        set_nonblocking(&file).map_err(|source| TapError::Ioctl {
            name: req.name(),
            what: "O_NONBLOCK",
            source,
        })?;
        Ok(Tap {
            file,
            name: req.name(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor, for epoll.
    pub fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn ioctl_error(&self, what: &'static str) -> impl FnOnce(io::Error) -> TapError + '_ {
        move |source| TapError::Ioctl {
            name: self.name.clone(),
            what,
            source,
        }
    }

    /// Sets the length of the virtio-net header in front of every frame.
    pub fn set_vnet_hdr_len(&self, len: usize) -> Result<(), TapError> {
        let mut value = libc::c_int::try_from(len).unwrap_or(libc::c_int::MAX);
        ioctl_ptr(
            self.raw_fd(),
            libc::TUNSETVNETHDRSZ as libc::c_ulong,
            &mut value,
        )
        .map_err(self.ioctl_error("TUNSETVNETHDRSZ"))
    }

    /// Sets which offloads the kernel may use in frames it hands to us (`TUN_F_*`).
    pub fn set_offloads(&self, flags: u32) -> Result<(), TapError> {
        ioctl_val(
            self.raw_fd(),
            libc::TUNSETOFFLOAD as libc::c_ulong,
            libc::c_ulong::from(flags),
        )
        .map_err(self.ioctl_error("TUNSETOFFLOAD"))
    }

    /// Attaches or detaches this queue of a multi-queue tap, so the kernel stops steering
    /// frames to a queue pair the guest does not use.
    pub fn set_queue_attached(&self, attached: bool) -> Result<(), TapError> {
        let flags = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut req = IfReq::with_short(&self.name, flag16(flags))?;
        ioctl_ptr(self.raw_fd(), libc::TUNSETQUEUE as libc::c_ulong, &mut req)
            .map_err(self.ioctl_error("TUNSETQUEUE"))
    }

    /// Reads one frame (header included) into `buf`; `WouldBlock` when none is queued.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        io::Read::read(&mut &self.file, buf)
    }

    /// Writes one frame given as a list of buffers.
    ///
    /// # Safety
    ///
    /// Every `iovec` must describe memory that is valid for reads of `iov_len` bytes for the
    /// duration of the call.
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees every iovec is readable for its length; the kernel
        // only reads `count` iovecs from `iov`, which is a live slice of that many.
        let ret = unsafe { libc::writev(self.raw_fd(), iov.as_ptr(), count) };
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one frame from a single buffer.
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        io::Write::write(&mut &self.file, buf)
    }
}

fn set_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: F_SETFL takes an int argument by value; we only add O_NONBLOCK.
    let ret = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The host side of the tap: an IPv4 address and prefix, brought up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAddr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0 to 32.
    pub prefix: u8,
}

/// Configures the host side of interface `name`: MTU, IPv4 address and netmask, link up.
pub fn configure_host(
    name: &str,
    addr: Option<HostAddr>,
    mtu: Option<u16>,
) -> Result<(), TapError> {
    // SAFETY: socket() takes no pointers; the result is checked and owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(TapError::Ioctl {
            name: name.to_string(),
            what: "socket(AF_INET)",
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let fail = |what: &'static str| {
        move |source| TapError::Ioctl {
            name: name.to_string(),
            what,
            source,
        }
    };
    if let Some(mtu) = mtu {
        let mut req = IfReq::new(name)?;
        req.data[..4].copy_from_slice(&i32::from(mtu).to_ne_bytes());
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req).map_err(fail("SIOCSIFMTU"))?;
    }
    if let Some(HostAddr { addr, prefix }) = addr {
        let mask = if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix.min(32)))
        };
        let mut req = IfReq::new(name)?;
        req.data[..16].copy_from_slice(&sockaddr_in(addr));
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFADDR, &mut req).map_err(fail("SIOCSIFADDR"))?;
        let mut req = IfReq::new(name)?;
        req.data[..16].copy_from_slice(&sockaddr_in(Ipv4Addr::from(mask)));
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &mut req)
            .map_err(fail("SIOCSIFNETMASK"))?;
    }
    let mut req = IfReq::new(name)?;
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req).map_err(fail("SIOCGIFFLAGS"))?;
    let flags = req.short() | flag16(libc::IFF_UP);
    let mut req = IfReq::with_short(name, flags)?;
    ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req).map_err(fail("SIOCSIFFLAGS"))?;
    Ok(())
}

/// A `struct sockaddr_in` as bytes: family (native endian), port 0, address (network order).
fn sockaddr_in(addr: Ipv4Addr) -> [u8; 16] {
    let mut b = [0u8; 16];
    // AF_INET is 2; it fits a u16.
    b[0..2].copy_from_slice(&u16::try_from(libc::AF_INET).unwrap_or(2).to_ne_bytes());
    b[4..8].copy_from_slice(&addr.octets());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(IfReq::new("tap0").is_ok());
        assert!(IfReq::new("").is_err());
        assert!(IfReq::new("a-name-that-is-too-long").is_err());
        assert!(IfReq::new("a/b").is_err());
        assert!(IfReq::new("a b").is_err());
        assert_eq!(
            IfReq::new("vdn0").map(|r| r.name()).ok().as_deref(),
            Some("vdn0")
        );
        assert_eq!(size_of::<IfReq>(), 40);
    }

    #[test]
    fn sockaddr_layout() {
        let b = sockaddr_in(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(i32::from(u16::from_ne_bytes([b[0], b[1]])), libc::AF_INET);
        assert_eq!(&b[4..8], &[10, 0, 0, 1]);
    }

    #[test]
    fn permission_and_busy_messages_say_what_to_do() {
        let eperm = attach_message("tap9", &io::Error::from_raw_os_error(libc::EPERM));
        assert!(eperm.contains("CAP_NET_ADMIN"), "{eperm}");
        let ebusy = attach_message("tap9", &io::Error::from_raw_os_error(libc::EBUSY));
        assert!(ebusy.contains("busy"), "{ebusy}");
    }
}
