//! The backend end: a Linux TAP device, one file descriptor per queue pair.
//!
//! Every descriptor is in `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` mode (plus
//! `IFF_MULTI_QUEUE` when there are several), non-blocking, with a 12-byte
//! vnet header (`struct virtio_net_hdr_v1`), so a packet crosses the TAP
//! exactly as it crosses the virtqueue: header, then Ethernet frame.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::header::HDR_LEN;
use crate::NetError;

/// Longest interface name the kernel accepts (IFNAMSIZ minus the NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Flags every TAP queue must have.
const REQUIRED_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// One queue of a TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
}

fn zeroed_ifreq() -> libc::ifreq {
    // SAFETY: ifreq is plain old data (a name array and a union of
    // integers, addresses and a pointer); all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// An `ifreq` holding `name`, or an error if the name does not fit.
fn ifreq_named(name: &str) -> Result<libc::ifreq, NetError> {
    let bad = || NetError::BadName {
        name: name.to_string(),
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.bytes().any(|b| b == 0) {
        return Err(bad());
    }
    let mut ifr = zeroed_ifreq();
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(ifr)
}

/// The name stored in an `ifreq` by the kernel.
fn ifreq_name(ifr: &libc::ifreq) -> String {
    let bytes: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `ioctl(fd, req, arg)` with a pointer argument.
///
/// # Safety
///
/// `arg` must point to a live object of the type `req` reads or writes.
unsafe fn ioctl_ptr<T>(fd: RawFd, req: libc::Ioctl, arg: *mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees `arg` matches `req`; `fd` is a plain
    // descriptor number (a stale one only yields EBADF).
    let r = unsafe { libc::ioctl(fd, req, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `ioctl(fd, req, value)` with an integer argument passed by value.
fn ioctl_val(fd: RawFd, req: libc::Ioctl, value: libc::c_ulong) -> io::Result<()> {
    // SAFETY: the request takes its argument by value: no memory is touched.
    let r = unsafe { libc::ioctl(fd, req, value) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ioctl_err(op: &'static str) -> impl FnOnce(io::Error) -> NetError {
    move |source| NetError::Ioctl { op, source }
}

impl Tap {
    /// Creates (or attaches to) the TAP interface `name` and opens `queues`
    /// queues of it, one per queue pair. With more than one queue the
    /// interface is multi-queue; an existing interface must have been
    /// created in the same mode. `name` may be a pattern such as `tap%d`;
    /// [`Tap::name`] tells the name the kernel chose.
    pub fn open(name: &str, queues: u16) -> Result<Vec<Tap>, NetError> {
        if queues == 0 {
            return Err(NetError::InvalidOption {
                option: "queues",
                reason: "at least one TAP queue is needed".into(),
            });
        }
        let mut flags = REQUIRED_FLAGS;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE;
        }
        let mut name = name.to_string();
        let mut taps = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/net/tun")
                .map_err(|source| NetError::TapOpen {
                    name: name.clone(),
                    source,
                })?;
            let mut ifr = ifreq_named(&name)?;
            ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is.
            unsafe { ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) }.map_err(
                |source| NetError::TapOpen {
                    name: name.clone(),
                    source,
                },
            )?;
            // Later queues attach to exactly the interface the first one got.
            name = ifreq_name(&ifr);
            let tap = Tap {
                fd: OwnedFd::from(file),
            };
            tap.set_vnet_hdr_size()?;
            taps.push(tap);
        }
        Ok(taps)
    }

    /// Takes over a TAP queue opened elsewhere (passed by a privileged
    /// parent, for instance). It must be in `IFF_TAP | IFF_NO_PI |
    /// IFF_VNET_HDR` mode and attached; it is made non-blocking and its
    /// vnet header size set to 12.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, NetError> {
        let tap = Tap { fd };
        let flags = tap.flags()?;
        if flags & REQUIRED_FLAGS != REQUIRED_FLAGS {
            return Err(NetError::NotATap {
                flags: flags as u32,
            });
        }
        let raw = tap.fd.as_raw_fd();
        // SAFETY: F_GETFL / F_SETFL on a descriptor we own touch no memory.
        let fl = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(NetError::Ioctl {
                op: "fcntl(O_NONBLOCK)",
                source: io::Error::last_os_error(),
            });
        }
        tap.set_vnet_hdr_size()?;
        Ok(tap)
    }

    /// Another descriptor for the same queue (`dup`).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            fd: self.fd.try_clone()?,
        })
    }

    fn get_ifreq(&self) -> Result<libc::ifreq, NetError> {
        let mut ifr = zeroed_ifreq();
        // SAFETY: TUNGETIFF writes one `struct ifreq`, which `ifr` is.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) }
            .map_err(ioctl_err("TUNGETIFF"))?;
        Ok(ifr)
    }

    /// The TUN flags of the queue (`IFF_TAP`, `IFF_VNET_HDR`, ...).
    fn flags(&self) -> Result<libc::c_int, NetError> {
        let ifr = self.get_ifreq()?;
        // SAFETY: TUNGETIFF fills `ifru_flags`; any bit pattern is a valid c_short.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        Ok(libc::c_int::from(flags) & 0xffff)
    }

    /// The interface name.
    pub fn name(&self) -> Result<String, NetError> {
        Ok(ifreq_name(&self.get_ifreq()?))
    }

    /// Whether the interface is multi-queue (`IFF_MULTI_QUEUE`).
    pub fn is_multi_queue(&self) -> Result<bool, NetError> {
        Ok(self.flags()? & libc::IFF_MULTI_QUEUE != 0)
    }

    fn set_vnet_hdr_size(&self) -> Result<(), NetError> {
        let mut size: libc::c_int = HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int, which `size` is.
        unsafe { ioctl_ptr(self.fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &mut size) }
            .map_err(ioctl_err("TUNSETVNETHDRSZ"))
    }

    /// Runs `f` with a socket suitable for interface ioctls and an
    /// `ifreq` naming this interface.
    fn with_ifreq<R>(
        &self,
        op: &'static str,
        f: impl FnOnce(RawFd, &mut libc::ifreq) -> io::Result<R>,
    ) -> Result<R, NetError> {
        let mut ifr = ifreq_named(&self.name()?)?;
        // SAFETY: socket() touches no memory; the result is checked.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(NetError::Ioctl {
                op,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: `s` is a descriptor we just created and own alone.
        let sock = unsafe { OwnedFd::from_raw_fd(s) };
        f(sock.as_raw_fd(), &mut ifr).map_err(ioctl_err(op))
    }

    /// Brings the interface up (`SIOCSIFFLAGS` with `IFF_UP`). Addresses
    /// and routes are the caller's business.
    pub fn set_up(&self) -> Result<(), NetError> {
        self.with_ifreq("SIOCSIFFLAGS", |sock, ifr| {
            // SAFETY: SIOCGIFFLAGS reads and writes one `struct ifreq`.
            unsafe { ioctl_ptr(sock, libc::SIOCGIFFLAGS, ifr) }?;
            // SAFETY: SIOCGIFFLAGS filled `ifru_flags`; any value is valid.
            let flags = unsafe { ifr.ifr_ifru.ifru_flags };
            ifr.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
            // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`.
            unsafe { ioctl_ptr(sock, libc::SIOCSIFFLAGS, ifr) }
        })
    }

    /// Sets the interface MTU (`SIOCSIFMTU`); it should match
    /// [`NetOptions::mtu`](crate::NetOptions::mtu).
    pub fn set_mtu(&self, mtu: u16) -> Result<(), NetError> {
        self.with_ifreq("SIOCSIFMTU", |sock, ifr| {
            ifr.ifr_ifru.ifru_mtu = libc::c_int::from(mtu);
            // SAFETY: SIOCSIFMTU reads one `struct ifreq`.
            unsafe { ioctl_ptr(sock, libc::SIOCSIFMTU, ifr) }
        })
    }

    /// Tells the TAP which offloads the guest accepts (`TUNSETOFFLOAD`,
    /// `TUN_F_*`): it then hands over packets needing exactly those.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        ioctl_val(
            self.fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    }

    /// Attaches or detaches this queue (`TUNSETQUEUE`), so the kernel
    /// steers packets only to the queues of active pairs. Asking for the
    /// state the queue is already in is not an error.
    pub(crate) fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        let mut ifr = zeroed_ifreq();
        ifr.ifr_ifru.ifru_flags = if attached {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        } as libc::c_short;
        // SAFETY: TUNSETQUEUE reads one `struct ifreq`, which `ifr` is.
        match unsafe { ioctl_ptr(self.fd.as_raw_fd(), libc::TUNSETQUEUE, &mut ifr) } {
            // EINVAL: already attached (or already detached).
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            other => other,
        }
    }

    /// Reads one packet (header and frame) without blocking.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is a live, writable byte buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// Writes one packet gathered from `iov` without blocking.
    ///
    /// # Safety
    ///
    /// Every entry of `iov` must describe memory that stays mapped and
    /// readable for the duration of the call (its contents may change: the
    /// kernel only copies them).
    pub(crate) unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `iov` is a live array of `count` iovecs, each valid for
        // reading by the caller's guarantee; writev only reads them.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), count) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
