//! Frontend endpoints: every device the backend offers, exposed to the
//! frontend VM's ordinary programs through `virtio-drivers`' own drivers
//! over the virtio-msg transport and the bounce pool.
//!
//! | device  | endpoint |
//! |---------|----------|
//! | blk     | an NBD server (`--nbd-socket`): qemu-img, qemu-io, nbd-client |
//! | net     | a TAP interface in this network namespace (`--net-tap`) |
//! | console | a PTY, its path printed (`--console-pty`) |
//! | rng     | a file or FIFO filled with entropy (`--rng-out`) |
//! | vsock   | Unix listeners per host port (`--vsock-listen`), and guest ports forwarded to Unix sockets (`--vsock-forward`) |
//!
//! Each device runs on its own thread with its own transport (one view of a
//! [`BusMux`](ringfence_msg_driver::BusMux)); they share the window and its
//! bounce pool. Every endpoint sleeps in one `poll` on its local descriptors
//! and its queues' call doorbells; none spins.

pub mod console;
pub mod nbd;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_msg_driver::{CompletionWaiter, MsgTransport};

/// An endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A local descriptor (TAP, PTY, file, socket) failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The virtio driver or the transport under it failed.
    #[error("{what}: {detail}")]
    Device {
        /// What was being done.
        what: &'static str,
        /// The driver's error, and the transport's first failure if any.
        detail: String,
    },
    /// An endpoint option is malformed.
    #[error("{option}: {detail}")]
    Option {
        /// The option.
        option: &'static str,
        /// What is wrong with it.
        detail: String,
    },
}

impl EndpointError {
    /// Maps an I/O error while doing `what`.
    pub fn io(what: &'static str) -> impl Fn(std::io::Error) -> EndpointError {
        move |source| EndpointError::Io { what, source }
    }

    /// Maps a virtio-drivers error while doing `what`, adding the
    /// transport's own failure (the `Transport` trait cannot return one).
    pub fn device<'a>(
        what: &'static str,
        waiter: &'a CompletionWaiter,
    ) -> impl Fn(virtio_drivers::Error) -> EndpointError + 'a {
        move |e| EndpointError::Device {
            what,
            detail: match waiter.failure() {
                Some(f) => format!("{e} (transport: {f})"),
                None => e.to_string(),
            },
        }
    }
}

/// What an endpoint did, printed as one line at the end.
#[derive(Debug)]
pub struct Report {
    /// Device kind.
    pub device: &'static str,
    /// Human-readable detail.
    pub detail: String,
}

/// Options of the endpoints (part of `ringfence frontend`). Giving any of
/// them runs the endpoints instead of the built-in block workload; a device
/// whose endpoint is not asked for is left alone.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EndpointArgs {
    /// blk: serve the disk as NBD on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,
    /// net: create this TAP interface here and carry its frames.
    #[arg(long, value_name = "NAME")]
    pub net_tap: Option<String>,
    /// console: open a PTY for the console (its path is printed).
    #[arg(long)]
    pub console_pty: bool,
    /// console: also make this symlink to the PTY.
    #[arg(long, value_name = "PATH")]
    pub console_link: Option<PathBuf>,
    /// rng: write the device's entropy here (a file or a FIFO).
    #[arg(long, value_name = "PATH")]
    pub rng_out: Option<PathBuf>,
    /// rng: bytes of entropy to write to --rng-out (0: until stopped).
    #[arg(long, default_value_t = 0)]
    pub rng_bytes: u64,
    /// vsock: listen on Unix socket PATH; each connection becomes a stream
    /// to the host's vsock port PORT (repeatable).
    #[arg(long, value_name = "PORT:PATH")]
    pub vsock_listen: Vec<String>,
    /// vsock: a host connection to this VM's port PORT is carried to the
    /// Unix socket PATH (repeatable).
    #[arg(long, value_name = "PORT:PATH")]
    pub vsock_forward: Vec<String>,
    /// Run the endpoints this many seconds, then exit (default: until
    /// SIGTERM/SIGINT, or until every endpoint has finished).
    #[arg(long)]
    pub duration_s: Option<u64>,
}

impl EndpointArgs {
    /// Whether any endpoint is asked for.
    pub fn any(&self) -> bool {
        self.nbd_socket.is_some()
            || self.net_tap.is_some()
            || self.console_pty
            || self.console_link.is_some()
            || self.rng_out.is_some()
            || !self.vsock_listen.is_empty()
            || !self.vsock_forward.is_empty()
    }
}

/// Parses `PORT:PATH`.
pub fn parse_port_path(option: &'static str, s: &str) -> Result<(u32, PathBuf), EndpointError> {
    let bad = |detail: String| EndpointError::Option { option, detail };
    let (port, path) = s
        .split_once(':')
        .ok_or_else(|| bad(format!("{s:?} is not PORT:PATH")))?;
    let port = port
        .parse::<u32>()
        .map_err(|e| bad(format!("port {port:?}: {e}")))?;
    if path.is_empty() {
        return Err(bad(format!("{s:?} has an empty path")));
    }
    Ok((port, PathBuf::from(path)))
}

/// One attached device, handed to its endpoint's thread.
pub struct DeviceLink {
    /// Its device number on the bus.
    pub dev_num: u16,
    /// Its transport (over its own mux view).
    pub transport: MsgTransport,
    /// Its completion waiter.
    pub waiter: CompletionWaiter,
}

/// When an endpoint should stop: on SIGTERM/SIGINT, at the deadline of
/// `--duration-s`, or when the frontend says so. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Stop {
    deadline: Option<Instant>,
    flag: Arc<AtomicBool>,
}

impl Stop {
    /// Stops at `deadline` if given, and on a signal.
    pub fn new(deadline: Option<Instant>) -> Self {
        Self {
            deadline,
            flag: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether to stop now.
    pub fn stopped(&self) -> bool {
        crate::backend::STOP.load(Ordering::SeqCst)
            || self.flag.load(Ordering::SeqCst)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Asks every holder to stop.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }
}

/// How long one wait may last before an endpoint looks at [`Stop`] again.
pub const WAIT_SLICE: Duration = Duration::from_millis(100);

/// While notifications travel in-band (no call doorbells to poll), the
/// longest sleep on the bus before the local descriptors are looked at again.
const IN_BAND_SLICE: Duration = Duration::from_millis(2);

/// Polls `fds` for `timeout`; an interrupted poll counts as a timeout.
fn poll_fds(fds: &mut [libc::pollfd], timeout: Duration) -> Result<(), EndpointError> {
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fds` is a valid array of `fds.len()` pollfd entries that
    // outlives the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(EndpointError::io("poll")(e));
        }
    }
    Ok(())
}

/// Whether `fd` is readable, after at most `timeout`.
pub fn readable(fd: RawFd, timeout: Duration) -> Result<bool, EndpointError> {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    poll_fds(&mut p, timeout)?;
    Ok(p[0].revents != 0)
}

/// Sleeps until one of `local` is readable (or writable, for the entries
/// with `true`), one of the device's `queues` has been notified, or
/// `timeout` passes. Returns, per entry of `local`, whether it is ready.
/// Queue notifications are consumed here: the caller looks at every queue
/// after each return.
pub fn wait_events(
    local: &[(RawFd, bool)],
    waiter: &CompletionWaiter,
    queues: &[u16],
    timeout: Duration,
) -> Result<Vec<bool>, EndpointError> {
    let device_err = |e: ringfence_msg_driver::DriverError| EndpointError::Device {
        what: "waiting for the device",
        detail: e.to_string(),
    };
    let mut fds: Vec<libc::pollfd> = local
        .iter()
        .map(|&(fd, write)| libc::pollfd {
            fd,
            events: if write { libc::POLLOUT } else { libc::POLLIN },
            revents: 0,
        })
        .collect();
    let calls: Option<Vec<RawFd>> = queues.iter().map(|&q| waiter.call_fd(q)).collect();
    match calls {
        Some(calls) => {
            fds.extend(calls.into_iter().map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            }));
            poll_fds(&mut fds, timeout)?;
            // Clear the doorbells that rang (a reset request or a
            // disconnect shows here too).
            for &q in queues {
                waiter.wait(q, Duration::ZERO).map_err(device_err)?;
            }
        }
        None => {
            // In-band: the bus is the only thing to sleep on, so sleep on
            // it in short slices between looks at the local descriptors.
            poll_fds(&mut fds, Duration::ZERO)?;
            if fds.iter().all(|p| p.revents == 0) {
                if let Some(&q) = queues.first() {
                    waiter
                        .wait(q, timeout.min(IN_BAND_SLICE))
                        .map_err(device_err)?;
                }
                poll_fds(&mut fds, Duration::ZERO)?;
            }
        }
    }
    Ok(fds
        .iter()
        .take(local.len())
        .map(|p| p.revents != 0)
        .collect())
}
