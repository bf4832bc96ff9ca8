//! Thin, checked wrappers around the system calls the backend ends need.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Retries a system call returning -1/errno on EINTR, a bounded number of
/// times (a signal storm is not under the guest's control, but a loop that
/// cannot end is still avoided).
fn retry<F: FnMut() -> isize>(mut f: F) -> io::Result<usize> {
    let mut last = io::Error::from(io::ErrorKind::Interrupted);
    for _ in 0..64 {
        let n = f();
        if n >= 0 {
            return Ok(n as usize);
        }
        last = io::Error::last_os_error();
        if last.kind() != io::ErrorKind::Interrupted {
            return Err(last);
        }
    }
    Err(last)
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Wraps a descriptor just returned by the kernel.
fn owned(fd: libc::c_int) -> io::Result<OwnedFd> {
    let fd = check(fd)?;
    // SAFETY: `fd` was just returned by a successful system call and is
    // owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One end of a byte stream, used without ever blocking: sockets through
/// MSG_DONTWAIT (and MSG_NOSIGNAL, so a vanished peer is EPIPE, not
/// SIGPIPE), everything else through O_NONBLOCK.
#[derive(Debug)]
pub(crate) struct Stream {
    fd: OwnedFd,
    socket: bool,
}

impl Stream {
    /// Takes `fd`; sets O_NONBLOCK on it unless it is a socket.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        let socket = is_socket(fd.as_raw_fd())?;
        if !socket {
            set_nonblocking(fd.as_raw_fd())?;
        }
        Ok(Self { fd, socket })
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads what is there; `WouldBlock` when nothing is.
    pub(crate) fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        retry(|| {
            if self.socket {
                // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
                unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) }
            } else {
                // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`.
                unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) }
            }
        })
    }

    /// Writes what fits now; `WouldBlock` when nothing does.
    pub(crate) fn write(&self, buf: &[u8]) -> io::Result<usize> {
        let fd = self.fd.as_raw_fd();
        retry(|| {
            if self.socket {
                // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
                unsafe {
                    libc::send(
                        fd,
                        buf.as_ptr().cast(),
                        buf.len(),
                        libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                    )
                }
            } else {
                // SAFETY: the kernel reads at most `buf.len()` bytes from `buf`.
                unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) }
            }
        })
    }
}

fn is_socket(fd: RawFd) -> io::Result<bool> {
    Ok(file_type(fd)? == libc::S_IFSOCK)
}

fn file_type(fd: RawFd) -> io::Result<libc::mode_t> {
    // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, exclusively borrowed `stat` for the call.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT)
}

pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we hold; no memory involved.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: as above.
        check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    }
    Ok(())
}

pub(crate) fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor or -1; no memory involved.
    owned(unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) })
}

pub(crate) fn isatty(fd: RawFd) -> bool {
    // SAFETY: no memory involved.
    unsafe { libc::isatty(fd) == 1 }
}

/// A private open file description of the daemon's own descriptor `fd` (0
/// or 1), so that O_NONBLOCK does not leak to whoever shares the original
/// (the terminal or pipe of the parent shell). Regular files and sockets
/// are duplicated instead: a regular file never blocks and must keep its
/// offset and O_APPEND, and a socket is used with MSG_DONTWAIT.
pub(crate) fn reopen_stdio(fd: RawFd, write: bool) -> io::Result<OwnedFd> {
    let kind = file_type(fd)?;
    if kind == libc::S_IFREG || kind == libc::S_IFSOCK {
        return dup(fd);
    }
    let path = CString::new(format!("/proc/self/fd/{fd}")).map_err(io::Error::other)?;
    let mode = if write {
        libc::O_WRONLY
    } else {
        libc::O_RDONLY
    };
    // SAFETY: `path` is a valid NUL-terminated string.
    let r = owned(unsafe {
        libc::open(
            path.as_ptr(),
            mode | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    });
    match r {
        Ok(fd) => Ok(fd),
        Err(e) => {
            tracing::warn!(fd, error = %e, "cannot reopen stdio descriptor; O_NONBLOCK will be set on the shared one");
            dup(fd)
        }
    }
}

/// The terminal size (cols, rows) of a tty or PTY master.
pub(crate) fn winsize(fd: RawFd) -> io::Result<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `ws`.
    check(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) })?;
    Ok((ws.ws_col, ws.ws_row))
}

/// A PTY pair: the master (non-blocking) and the slave, opened once and
/// kept so that the master never sees a hang-up.
#[derive(Debug)]
pub struct Pty {
    /// The master side, where the console's bytes go in and out.
    pub master: OwnedFd,
    /// The slave side, held open.
    pub slave: OwnedFd,
    /// The slave's path, for the user's terminal program.
    pub path: PathBuf,
}

/// Opens a PTY pair in raw mode with a non-blocking master.
pub fn open_pty() -> io::Result<Pty> {
    // SAFETY: no memory involved; the result is checked.
    let master =
        owned(unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    let m = master.as_raw_fd();
    // SAFETY: no memory involved.
    check(unsafe { libc::grantpt(m) })?;
    // SAFETY: no memory involved.
    check(unsafe { libc::unlockpt(m) })?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name of at most `name.len()` bytes.
    let r = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let cname = unsafe { CStr::from_ptr(name.as_ptr()) }.to_owned();
    let path = PathBuf::from(std::ffi::OsStr::from_bytes(cname.to_bytes()));
    // SAFETY: `cname` is a valid NUL-terminated path.
    let slave = owned(unsafe {
        libc::open(
            cname.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    make_raw(slave.as_raw_fd())?;
    set_nonblocking(m)?;
    Ok(Pty {
        master,
        slave,
        path,
    })
}

/// Raw mode on a terminal: bytes pass unchanged in both directions, and
/// above all nothing the guest writes is echoed back to it as input.
fn make_raw(fd: RawFd) -> io::Result<()> {
    // SAFETY: an all-zero `termios` is a valid value of this plain C struct.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr fills `t`.
    check(unsafe { libc::tcgetattr(fd, &mut t) })?;
    // SAFETY: cfmakeraw only modifies `t`.
    unsafe { libc::cfmakeraw(&mut t) };
    // SAFETY: `t` is a valid termios.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &t) })?;
    Ok(())
}

/// A Unix stream socket listening at `path`, non-blocking. A socket file
/// left by a previous run (nobody accepts on it) is replaced; anything else
/// at `path` is an error.
pub(crate) fn listen_unix(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::net::{UnixListener, UnixStream};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() && UnixStream::connect(path).is_err() {
            tracing::info!(path = %path.display(), "removing stale console socket");
            std::fs::remove_file(path)?;
        }
    }
    let l = UnixListener::bind(path)?;
    l.set_nonblocking(true)?;
    Ok(OwnedFd::from(l))
}

/// Accepts one pending connection, non-blocking; `None` when none is pending.
pub(crate) fn accept(listener: RawFd) -> io::Result<Option<OwnedFd>> {
    // SAFETY: null address pointers ask for no peer address.
    let r = retry(|| unsafe {
        libc::accept4(
            listener,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        ) as isize
    });
    match r {
        // The value came from accept4 and fits a descriptor.
        Ok(fd) => owned(fd as libc::c_int).map(Some),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        // A connection that died in the backlog: nothing to accept now.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(crate) fn epoll_create() -> io::Result<OwnedFd> {
    // SAFETY: no memory involved.
    owned(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })
}

pub(crate) fn epoll_add(epoll: RawFd, fd: RawFd) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: fd as u64,
    };
    // SAFETY: `ev` is a valid epoll_event for the call.
    check(unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
    Ok(())
}

pub(crate) fn epoll_del(epoll: RawFd, fd: RawFd) {
    // SAFETY: a null event is allowed for EPOLL_CTL_DEL.
    let _ = unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut()) };
}
