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

/// Most file descriptors one message may carry; a message with more is dropped.
pub const MAX_FDS_PER_MSG: usize = 1;
/// Descriptors the receive buffer has room for, so that extra ones sent by a
/// peer are received (and closed) rather than half-installed.
pub const CMSG_FDS: usize = 8;
// CMSG_SPACE(CMSG_FDS * 4) on 64-bit Linux in u64 words: a 16-byte header
// and the descriptors, rounded up to 8 bytes (checked in a test).
const CMSG_WORDS: usize = (16 + CMSG_FDS * 4).div_ceil(8);

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
    /// one if the message was too large: the bus drops it) and the file
    /// descriptors it carried. Every descriptor the kernel installs is owned
    /// by the returned vector, so one that the caller does not want is closed
    /// when dropped; room is left for `CMSG_FDS` (8) of them, and anything
    /// beyond that is discarded by the kernel (MSG_CTRUNC) without being
    /// installed.
    pub fn recv(&self, buf: &mut [u8]) -> Result<(usize, Vec<File>), BusError> {
        loop {
            if let Some(got) = self.recv_with(buf, 0)? {
                return Ok(got);
            }
        }
    }

    /// Like [`Seqpacket::recv`], but `None` at once when no message is
    /// waiting (another thread may have taken the one poll reported).
    pub fn recv_nowait(&self, buf: &mut [u8]) -> Result<Option<(usize, Vec<File>)>, BusError> {
        self.recv_with(buf, libc::MSG_DONTWAIT)
    }

    fn recv_with(
        &self,
        buf: &mut [u8],
        flags: libc::c_int,
    ) -> Result<Option<(usize, Vec<File>)>, BusError> {
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
        // u64 elements keep the control buffer aligned for cmsghdr.
        let mut control = [0u64; CMSG_WORDS];
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iovecs.as_mut_ptr();
        msg.msg_iovlen = iovecs.len();
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = loop {
            // SAFETY: msg points at iovecs and a control buffer that live
            // for the duration of the call and are exclusively borrowed.
            let n = unsafe {
                libc::recvmsg(self.0.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC | flags)
            };
            if n >= 0 {
                break n as usize;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(None),
                Some(libc::ECONNRESET) => return Err(BusError::Disconnected),
                _ => return Err(BusError::io("recvmsg", e)),
            }
        };
        let mut files = Vec::new();
        // SAFETY: msg was filled by recvmsg; the CMSG_* macros walk the
        // control buffer within msg_controllen.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
        while !cmsg.is_null() {
            // SAFETY: cmsg is non-null and points into `control`.
            let (level, kind, len) =
                unsafe { ((*cmsg).cmsg_level, (*cmsg).cmsg_type, (*cmsg).cmsg_len) };
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) is a constant computation.
                let header = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = len.saturating_sub(header) / std::mem::size_of::<RawFd>();
                // SAFETY: the data of an SCM_RIGHTS message is `count` ints.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: i < count ints inside this cmsg; unaligned read
                    // because CMSG_DATA need not be int-aligned in general.
                    let fd = unsafe { data.add(i).read_unaligned() };
                    // SAFETY: the kernel installed this descriptor for us and
                    // nobody else owns it.
                    files.push(unsafe { File::from_raw_fd(fd) });
                }
            }
            // SAFETY: msg and cmsg are valid as above.
            cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
        }
        if n == 0 && files.is_empty() {
            return Err(BusError::Disconnected);
        }
        Ok(Some((n, files)))
    }

    /// Sends one message, waiting at most `timeout` for room in the socket
    /// buffer: a peer that stops reading cannot block the sender forever.
    pub fn send_bounded(&self, msg: &[u8], timeout: Duration) -> Result<(), BusError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            // SAFETY: msg is a valid readable buffer of msg.len() bytes.
            let n = unsafe {
                libc::send(
                    self.0.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if n >= 0 {
                return if n as usize == msg.len() {
                    Ok(())
                } else {
                    Err(BusError::Protocol {
                        reason: format!("short send: {n} of {} bytes", msg.len()),
                    })
                };
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() || !poll_fd(self.0.as_raw_fd(), libc::POLLOUT, Some(left))? {
                        return Err(BusError::Timeout(timeout));
                    }
                }
                Some(libc::EPIPE) | Some(libc::ECONNRESET) => return Err(BusError::Disconnected),
                _ => return Err(BusError::io("send", e)),
            }
        }
    }

    /// Waits until a message can be sent without blocking; `false` on timeout.
    pub fn wait_writable(&self, timeout: Option<Duration>) -> Result<bool, BusError> {
        poll_fd(self.0.as_raw_fd(), libc::POLLOUT, timeout)
    }

    /// The process id of the peer, as the kernel recorded it at connect
    /// time (`SO_PEERCRED`): an identity the peer cannot forge.
    pub fn peer_pid(&self) -> io::Result<u32> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, which
        // is a ucred of that size.
        let rc = unsafe {
            libc::getsockopt(
                self.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        u32::try_from(cred.pid).map_err(|_| io::Error::other("peer has no process id"))
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
        // The socket appears at `path` only once it listens: it is bound
        // under a temporary name and renamed, so a client that waits for
        // the file never finds it refusing connections.
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{}.tmp", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let bind_at = if sockaddr(&tmp).is_ok() { &tmp } else { path };
        let _ = std::fs::remove_file(&tmp);
        let fd = new_socket()?;
        let (addr, len) = sockaddr(bind_at)?;
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
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_file(bind_at);
            return Err(e);
        }
        if bind_at != path {
            if let Err(e) = std::fs::rename(bind_at, path) {
                let _ = std::fs::remove_file(bind_at);
                return Err(e);
            }
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
    poll_fd(fd, libc::POLLIN, timeout)
}

/// poll(2) one descriptor for `events`, retrying on EINTR.
fn poll_fd(fd: RawFd, events: libc::c_short, timeout: Option<Duration>) -> Result<bool, BusError> {
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    let mut pfd = libc::pollfd {
        fd,
        events,
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
    // Only shmem: a hugetlbfs memfd can be sealed too, but touching a page
    // the pool cannot back raises SIGBUS in whoever maps it.
    // SAFETY: statfs is plain integers; all zeroes is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a valid out-pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) } < 0 {
        return Err(format!("fstatfs failed: {}", io::Error::last_os_error()));
    }
    if fs.f_type != libc::TMPFS_MAGIC {
        return Err(format!(
            "memfd is not shmem (filesystem {:#x}): refused",
            fs.f_type
        ));
    }
    Ok(())
}

/// An eventfd doorbell.
///
/// The descriptor may be shared with the peer, which then controls its
/// file status flags (`O_NONBLOCK`) and its counter. So no operation here
/// relies on the flags: reads use `RWF_NOWAIT`, and a write is made only
/// when poll says it will not block (a counter the peer parked near its
/// maximum already reads as rung, so the write is not needed).
#[derive(Debug)]
pub struct EventFdDoorbell(EventFd);

/// Reads an eventfd's counter without ever blocking, whatever its flags.
fn read_nowait(fd: RawFd) -> io::Result<Option<u64>> {
    let mut value = 0u64;
    let iov = libc::iovec {
        iov_base: (&mut value as *mut u64).cast(),
        iov_len: 8,
    };
    loop {
        // SAFETY: iov points at an 8-byte local for the duration of the call;
        // offset -1 means "current position" (eventfds are not seekable).
        let n = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        if n == 8 {
            return Ok(Some(value));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) => return Ok(None),
            // Kernels before 5.x: no RWF_NOWAIT on eventfds. Poll first; a
            // peer racing us to the counter can then block this read, which
            // is why workers that read peer eventfds are stopped with a bound.
            Some(libc::EOPNOTSUPP) => {
                if !poll_readable(fd, Some(Duration::ZERO)).map_err(io::Error::other)? {
                    return Ok(None);
                }
                let mut buf = [0u8; 8];
                // SAFETY: buf is a valid writable 8-byte buffer.
                let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), 8) };
                return match n {
                    8 => Ok(Some(u64::from_ne_bytes(buf))),
                    _ => {
                        let e = io::Error::last_os_error();
                        if e.kind() == io::ErrorKind::WouldBlock {
                            Ok(None)
                        } else {
                            Err(e)
                        }
                    }
                };
            }
            _ if n >= 0 => return Err(io::Error::other("short eventfd read")),
            _ => return Err(e),
        }
    }
}

impl EventFdDoorbell {
    /// A new, unrung doorbell.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(EFD_NONBLOCK)?))
    }

    /// Wraps a descriptor received from the peer after checking that it is
    /// an eventfd in counter mode. A semaphore eventfd (`EFD_SEMAPHORE`)
    /// stays readable after a read while its counter is above zero: a huge
    /// counter would make the waiter spin, so it is refused.
    pub fn from_peer(file: File) -> Result<Self, String> {
        let fd = file.as_raw_fd();
        let link = std::fs::read_link(format!("/proc/self/fd/{fd}"))
            .map_err(|e| format!("cannot inspect doorbell descriptor: {e}"))?;
        if link.as_os_str() != "anon_inode:[eventfd]" {
            return Err(format!(
                "doorbell descriptor is {}, not an eventfd",
                link.display()
            ));
        }
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .map_err(|e| format!("cannot inspect doorbell descriptor: {e}"))?;
        let semaphore = info
            .lines()
            .find_map(|l| l.strip_prefix("eventfd-semaphore:"))
            .map(str::trim);
        if semaphore != Some("0") {
            return Err(format!(
                "doorbell eventfd is in semaphore mode (or of unknown mode: {semaphore:?})"
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
        let fd = self.0.as_raw_fd();
        // Not writable means the counter is within 1 of its maximum: the
        // waiter will see it rung anyway.
        if !poll_fd(fd, libc::POLLOUT, Some(Duration::ZERO))? {
            return Ok(());
        }
        match self.0.write(1) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(BusError::io("eventfd write", e)),
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> Result<bool, BusError> {
        // Poll, then clear: a rung doorbell makes the poll return at once.
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            if !poll_readable(self.0.as_raw_fd(), left)? {
                return Ok(false);
            }
            // Readable but emptied meanwhile (by the peer): wait again.
            if self.try_clear()? {
                return Ok(true);
            }
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(false);
            }
        }
    }

    fn try_clear(&self) -> Result<bool, BusError> {
        read_nowait(self.0.as_raw_fd())
            .map(|v| v.is_some())
            .map_err(|e| BusError::io("eventfd read", e))
    }

    fn pollable_fd(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hugetlbfs_memfd_is_refused_even_when_sealed() {
        let name = std::ffi::CString::new("huge").unwrap();
        // SAFETY: a valid name; flags only.
        let fd = unsafe {
            libc::memfd_create(
                name.as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | libc::MFD_HUGETLB,
            )
        };
        if fd < 0 {
            eprintln!("no hugetlbfs memfds here: nothing to refuse");
            return;
        }
        // SAFETY: a new descriptor that nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        if file.set_len(2 << 20).is_err() {
            eprintln!("no huge page size of 2 MiB here");
            return;
        }
        // SAFETY: fcntl on our descriptor with an integer argument.
        unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        let refused = check_sealed_memfd(&file, 4096).unwrap_err();
        assert!(refused.contains("not shmem"), "{refused}");
        assert!(check_sealed_memfd(&sealed_memfd("shm", 4096).unwrap(), 4096).is_ok());
    }

    #[test]
    fn control_buffer_holds_cmsg_fds_descriptors() {
        // SAFETY: constant computation.
        let space = unsafe { libc::CMSG_SPACE((CMSG_FDS * std::mem::size_of::<RawFd>()) as u32) };
        assert_eq!(space as usize, CMSG_WORDS * 8);
    }

    #[test]
    fn a_peer_cannot_make_ring_or_wait_block() {
        let db = EventFdDoorbell::new().unwrap();
        let fd = db.raw_fd();
        // The peer clears O_NONBLOCK and parks the counter at its maximum.
        // SAFETY: fcntl on a descriptor we own.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, 0) }, 0);
        let max = (u64::MAX - 1).to_ne_bytes();
        // SAFETY: writing 8 bytes from a valid buffer.
        assert_eq!(unsafe { libc::write(fd, max.as_ptr().cast(), 8) }, 8);
        db.ring().unwrap(); // would block forever in write(2)
        assert!(db.try_clear().unwrap());
        // Empty and blocking: neither try_clear nor a timed wait blocks.
        assert!(!db.try_clear().unwrap());
        let t = std::time::Instant::now();
        assert!(!db.wait(Some(Duration::from_millis(50))).unwrap());
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn semaphore_and_foreign_descriptors_are_refused_as_doorbells() {
        let sem = EventFd::new(libc::EFD_SEMAPHORE).unwrap();
        // SAFETY: dup of a descriptor we own; the File owns the copy.
        let file = unsafe { File::from_raw_fd(libc::dup(sem.as_raw_fd())) };
        let err = EventFdDoorbell::from_peer(file).unwrap_err();
        assert!(err.contains("semaphore"), "{err}");
        let memfd = sealed_memfd("not-an-eventfd", 4096).unwrap();
        let err = EventFdDoorbell::from_peer(memfd).unwrap_err();
        assert!(err.contains("not an eventfd"), "{err}");
        let ok = EventFd::new(0).unwrap();
        // SAFETY: as above.
        let file = unsafe { File::from_raw_fd(libc::dup(ok.as_raw_fd())) };
        assert!(EventFdDoorbell::from_peer(file).is_ok());
    }
}
