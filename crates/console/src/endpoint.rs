//! The backend end of the port, shared by the receiveq and transmitq
//! handlers (which may run on different threads) and by cloned devices.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::sys::{self, Stream};

/// What a non-blocking read of the backend end found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    /// This many bytes.
    Data(usize),
    /// Nothing now; the wake descriptor tells when.
    Empty,
}

#[derive(Debug)]
pub(crate) enum Endpoint {
    /// A PTY, stdio or given descriptors.
    Streams(Streams),
    /// A listening Unix socket with at most one client.
    Socket(SocketEnd),
}

#[derive(Debug)]
pub(crate) struct Streams {
    input: Stream,
    output: Stream,
    /// The input reached end of file (or failed): it is no longer read nor
    /// offered as a wake descriptor, which would be readable (or HUP)
    /// forever and make the transport spin.
    input_closed: AtomicBool,
    /// Where the terminal size is read (a PTY master or a tty).
    size_fd: Option<RawFd>,
    /// The PTY's slave, kept open for the life of the device.
    pty: Option<(PathBuf, OwnedFd)>,
}

#[derive(Debug)]
pub(crate) struct SocketEnd {
    path: PathBuf,
    listener: OwnedFd,
    /// Readable when a client connects, sends, or hangs up.
    epoll: OwnedFd,
    client: Mutex<Option<Arc<Stream>>>,
}

impl Endpoint {
    pub(crate) fn pty() -> io::Result<Self> {
        let pty = sys::open_pty()?;
        let output = sys::dup(pty.master.as_raw_fd())?;
        let size_fd = Some(pty.master.as_raw_fd());
        tracing::info!(path = %pty.path.display(), "virtio-console PTY");
        Ok(Self::Streams(Streams {
            input: Stream::new(pty.master)?,
            output: Stream::new(output)?,
            input_closed: AtomicBool::new(false),
            size_fd,
            pty: Some((pty.path, pty.slave)),
        }))
    }

    pub(crate) fn fds(read: OwnedFd, write: OwnedFd) -> io::Result<Self> {
        let size_fd = [write.as_raw_fd(), read.as_raw_fd()]
            .into_iter()
            .find(|&fd| sys::isatty(fd));
        Ok(Self::Streams(Streams {
            input: Stream::new(read)?,
            output: Stream::new(write)?,
            input_closed: AtomicBool::new(false),
            size_fd,
            pty: None,
        }))
    }

    pub(crate) fn stdio() -> io::Result<Self> {
        let read = sys::reopen_stdio(libc::STDIN_FILENO, false)?;
        let write = sys::reopen_stdio(libc::STDOUT_FILENO, true)?;
        Self::fds(read, write)
    }

    pub(crate) fn unix_socket(path: &Path) -> io::Result<Self> {
        let listener = sys::listen_unix(path)?;
        let epoll = sys::epoll_create()?;
        sys::epoll_add(epoll.as_raw_fd(), listener.as_raw_fd())?;
        tracing::info!(path = %path.display(), "virtio-console listening");
        Ok(Self::Socket(SocketEnd {
            path: path.to_owned(),
            listener,
            epoll,
            client: Mutex::new(None),
        }))
    }

    pub(crate) fn pty_path(&self) -> Option<&Path> {
        match self {
            Self::Streams(s) => s.pty.as_ref().map(|(p, _)| p.as_path()),
            Self::Socket(_) => None,
        }
    }

    pub(crate) fn socket_path(&self) -> Option<&Path> {
        match self {
            Self::Streams(_) => None,
            Self::Socket(s) => Some(&s.path),
        }
    }

    /// The terminal size, if the backend end is a terminal.
    pub(crate) fn size(&self) -> Option<(u16, u16)> {
        match self {
            Self::Streams(Streams {
                size_fd: Some(fd), ..
            }) => sys::winsize(*fd).ok(),
            _ => None,
        }
    }

    pub(crate) fn has_size(&self) -> bool {
        matches!(
            self,
            Self::Streams(Streams {
                size_fd: Some(_),
                ..
            })
        )
    }

    /// Readable when [`read`](Self::read) may find something.
    pub(crate) fn wake_fd(&self) -> Option<RawFd> {
        match self {
            Self::Streams(s) if s.input_closed.load(Ordering::Relaxed) => None,
            Self::Streams(s) => Some(s.input.raw()),
            Self::Socket(s) => Some(s.epoll.as_raw_fd()),
        }
    }

    /// Reads available input without blocking.
    pub(crate) fn read(&self, buf: &mut [u8]) -> Input {
        match self {
            Self::Streams(s) => s.read(buf),
            Self::Socket(s) => s.read(buf),
        }
    }

    /// Writes as much of `data` as fits now; returns the bytes written.
    pub(crate) fn write(&self, data: &[u8]) -> usize {
        match self {
            Self::Streams(s) => write_all_now(&s.output, data).0,
            Self::Socket(s) => s.write(data),
        }
    }
}

/// Writes until done, the output is full, or it fails; never blocks.
fn write_all_now(out: &Stream, data: &[u8]) -> (usize, Option<io::Error>) {
    let mut done = 0usize;
    // Bounded: every iteration writes at least one byte or returns.
    while let Some(rest) = data.get(done..).filter(|r| !r.is_empty()) {
        match out.write(rest) {
            Ok(0) => return (done, None),
            Ok(n) => done = done.saturating_add(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (done, None),
            Err(e) => return (done, Some(e)),
        }
    }
    (done, None)
}

impl Streams {
    fn read(&self, buf: &mut [u8]) -> Input {
        if self.input_closed.load(Ordering::Relaxed) {
            return Input::Empty;
        }
        match self.input.read(buf) {
            Ok(0) => {
                tracing::info!("virtio-console input reached end of file");
                self.input_closed.store(true, Ordering::Relaxed);
                Input::Empty
            }
            Ok(n) => Input::Data(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Input::Empty,
            Err(e) => {
                tracing::warn!(error = %e, "virtio-console input failed; no longer read");
                self.input_closed.store(true, Ordering::Relaxed);
                Input::Empty
            }
        }
    }
}

impl SocketEnd {
    fn lock(&self) -> MutexGuard<'_, Option<Arc<Stream>>> {
        // Every update is a single assignment: a poisoned lock is consistent.
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes pending connections: the newest replaces the current client.
    /// Returns the current client.
    fn current(&self) -> Option<Arc<Stream>> {
        let mut client = self.lock();
        // Bounded: at most a backlog's worth of connections per call.
        for _ in 0..16 {
            let fd = match sys::accept(self.listener.as_raw_fd()) {
                Ok(Some(fd)) => fd,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-console accept failed");
                    break;
                }
            };
            let stream = match Stream::new(fd) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!(error = %e, "virtio-console client unusable");
                    continue;
                }
            };
            if let Err(e) = sys::epoll_add(self.epoll.as_raw_fd(), stream.raw()) {
                tracing::warn!(error = %e, "virtio-console client cannot be polled");
                continue;
            }
            if let Some(old) = client.replace(stream) {
                sys::epoll_del(self.epoll.as_raw_fd(), old.raw());
                tracing::info!(path = %self.path.display(), "virtio-console client replaced by a new one");
            } else {
                tracing::info!(path = %self.path.display(), "virtio-console client connected");
            }
        }
        client.clone()
    }

    /// Forgets `gone` if it is still the current client.
    fn drop_client(&self, gone: &Arc<Stream>) {
        let mut client = self.lock();
        if client.as_ref().is_some_and(|c| Arc::ptr_eq(c, gone)) {
            sys::epoll_del(self.epoll.as_raw_fd(), gone.raw());
            *client = None;
            tracing::info!(path = %self.path.display(), "virtio-console client disconnected");
        }
    }

    fn read(&self, buf: &mut [u8]) -> Input {
        let Some(c) = self.current() else {
            return Input::Empty;
        };
        match c.read(buf) {
            Ok(0) => {
                self.drop_client(&c);
                Input::Empty
            }
            Ok(n) => Input::Data(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Input::Empty,
            Err(e) => {
                tracing::debug!(error = %e, "virtio-console client read failed");
                self.drop_client(&c);
                Input::Empty
            }
        }
    }

    fn write(&self, data: &[u8]) -> usize {
        let Some(c) = self.current() else {
            return 0;
        };
        let (n, err) = write_all_now(&c, data);
        if let Some(e) = err {
            tracing::debug!(error = %e, "virtio-console client write failed");
            self.drop_client(&c);
        }
        n
    }
}

impl Drop for SocketEnd {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
