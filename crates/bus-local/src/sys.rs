//! The system calls of the local bus: seqpacket sockets, memfds, eventfds.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use ringfence_bus::{BusError, Doorbell};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Most file descriptors one message may carry.
pub const MAX_FDS_PER_MSG: usize = 1;

/// A connected `SOCK_SEQPACKET` Unix socket: message boundaries, bounded size.
#[derive(Debug)]
pub struct Seqpacket(OwnedFd);

impl ScmSocket for Seqpacket {
    fn socket_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain system call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Seqpacket {
    /// A connected pair (for tests and in-process use).
    pub fn pair() -> io::Result<(Seqpacket, Seqpacket)> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints for socketpair to fill.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both fds were just created by socketpair and are owned by nobody else.
        unsafe {
            Ok((
                Seqpacket(OwnedFd::from_raw_fd(fds[0])),
                Seqpacket(OwnedFd::from_raw_fd(fds[1])),
            ))
        }
    }

    /// Connects to a listening socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Seqpacket> {
        let fd = new_socket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: addr is a valid sockaddr_un of length len.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Seqpacket(fd))
    }

    /// Sends one message with optional file descriptors.
    pub fn send(&self, msg: &[u8], fds: &[RawFd]) -> Result<(), BusError> {
        let r = if fds.is_empty() {
            // SAFETY: msg is a valid readable buffer of msg.len() bytes.
            let n = unsafe {
                libc::send(
                    self.0.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        } else {
            self.send_with_fds(&[msg], fds)
                .map_err(|e| io::Error::from_raw_os_error(e.errno()))
        };
        match r {
            Ok(n) if n == msg.len() => Ok(()),
            Ok(n) => Err(BusError::Protocol {
                reason: format!("short send: {n} of {} bytes", msg.len()),
            }),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => Err(BusError::Disconnected),
            Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Err(BusError::Disconnected),
            Err(e) => Err(BusError::io("sendmsg", e)),
        }
    }

    /// Receives one message. Returns its length (which exceeds `buf.len()` by
    /// one if the message was too large: the bus drops it) and any file
    /// descriptors it carried.
    pub fn recv(&self, buf: &mut [u8]) -> Result<(usize, Vec<File>), BusError> {
        let mut spare = [0u8; 1];
        let mut iovecs = [
            libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
            libc::iovec {
                iov_base: spare.as_mut_ptr().cast(),
                iov_len: spare.len(),
            },
        ];
        let mut fds = [-1 as RawFd; MAX_FDS_PER_MSG];
        // SAFETY: the iovecs point at buffers we borrow mutably for the call.
        let r = unsafe { self.recv_with_fds(&mut iovecs, &mut fds) };
        let (n, nfds) = match r {
            Ok(v) => v,
            Err(e) if e.errno() == libc::ECONNRESET => return Err(BusError::Disconnected),
            Err(e) => {
                return Err(BusError::io(
                    "recvmsg",
                    io::Error::from_raw_os_error(e.errno()),
                ))
            }
        };
        let files = fds
            .iter()
            .take(nfds)
            // SAFETY: recvmsg handed us ownership of the first nfds descriptors.
            .map(|&fd| unsafe { File::from_raw_fd(fd) })
            .collect();
        if n == 0 && nfds == 0 {
            return Err(BusError::Disconnected);
        }
        Ok((n, files))
    }

    /// Waits until a message can be read; `false` on timeout.
    pub fn wait_readable(&self, timeout: Option<Duration>) -> Result<bool, BusError> {
        poll_readable(self.0.as_raw_fd(), timeout)
    }
}

impl AsRawFd for Seqpacket {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A listening seqpacket socket; removes its path when dropped.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: std::path::PathBuf,
}

impl Listener {
    /// Binds and listens at `path` (an existing stale socket file is replaced).
    pub fn bind(path: &Path) -> io::Result<Listener> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        let fd = new_socket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: addr is a valid sockaddr_un of length len.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: plain system call on a socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 4) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener {
            fd,
            path: path.to_owned(),
        })
    }

    /// Accepts one connection, waiting at most `timeout` (`None`: forever).
    pub fn accept(&self, timeout: Option<Duration>) -> io::Result<Option<Seqpacket>> {
        match poll_readable(self.fd.as_raw_fd(), timeout) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => return Err(io::Error::other(e)),
        }
        // SAFETY: null address pointers are allowed by accept4.
        let fd = unsafe {
            libc::accept4(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: accept4 returned a new descriptor that nobody else owns.
        Ok(Some(Seqpacket(unsafe { OwnedFd::from_raw_fd(fd) })))
    }

    /// The path it listens on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// poll(2) for readability, retrying on EINTR.
pub fn poll_readable(fd: RawFd, timeout: Option<Duration>) -> Result<bool, BusError> {
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: pfd is a valid pollfd for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(BusError::io("poll", e));
        }
        return Ok(r > 0);
    }
}

/// Creates a sealed-size memfd of `size` bytes. The size seals matter: a
/// peer that could shrink the file would make the other side fault (SIGBUS)
/// on pages it still maps.
pub fn sealed_memfd(name: &str, size: usize) -> io::Result<File> {
    let cname = std::ffi::CString::new(name).map_err(io::Error::other)?;
    // SAFETY: cname is a valid NUL-terminated string.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size as u64)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own with an integer argument.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Checks that `file` is a memfd whose size can no longer shrink and is at
/// least `size` bytes.
pub fn check_sealed_memfd(file: &File, size: u64) -> Result<(), String> {
    // SAFETY: fcntl on a descriptor we own.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        return Err("descriptor is not a sealable memfd".into());
    }
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Err("memfd is not sealed against shrinking".into());
    }
    let len = file
        .metadata()
        .map_err(|e| format!("fstat failed: {e}"))?
        .len();
    if len < size {
        return Err(format!("memfd holds {len} bytes, area claims {size}"));
    }
    Ok(())
}

/// An eventfd doorbell.
#[derive(Debug)]
pub struct EventFdDoorbell(EventFd);

impl EventFdDoorbell {
    /// A new, unrung doorbell.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(EFD_NONBLOCK)?))
    }

    /// A new, unrung doorbell whose `wait(None)` is one blocking read (for the
    /// side that sleeps on it without a timeout).
    pub fn new_blocking() -> io::Result<Self> {
        Ok(Self(EventFd::new(0)?))
    }

    /// Wraps a descriptor received from the peer after checking that it is an
    /// eventfd. Blocking or not, it cannot hang us: `wait(None)` is only used
    /// by a waiter that is woken by ringing this same doorbell, and every
    /// other read is preceded by poll.
    pub fn from_peer(file: File) -> Result<Self, String> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|e| format!("cannot inspect doorbell descriptor: {e}"))?;
        if link.as_os_str() != "anon_inode:[eventfd]" {
            return Err(format!(
                "doorbell descriptor is {}, not an eventfd",
                link.display()
            ));
        }
        // SAFETY: we own the descriptor, checked above to be an eventfd.
        Ok(Self(unsafe {
            EventFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(file))
        }))
    }

    /// The descriptor, to pass to the peer.
    pub fn raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl Doorbell for EventFdDoorbell {
    fn ring(&self) -> Result<(), BusError> {
        self.0
            .write(1)
            .map_err(|e| BusError::io("eventfd write", e))
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<bool, BusError> {
        loop {
            if timeout.is_none() {
                // One read when the descriptor blocks; EAGAIN when it does not.
                match self.0.read() {
                    Ok(_) => return Ok(true),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(BusError::io("eventfd read", e)),
                }
            }
            if !poll_readable(self.0.as_raw_fd(), timeout)? {
                return Ok(false);
            }
            if self.try_clear()? {
                return Ok(true);
            }
        }
    }

    fn try_clear(&self) -> Result<bool, BusError> {
        // poll first: the descriptor may be blocking.
        if !poll_readable(self.0.as_raw_fd(), Some(Duration::ZERO))? {
            return Ok(false);
        }
        match self.0.read() {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(BusError::io("eventfd read", e)),
        }
    }

    fn pollable_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}
