//! virtio-console (virtio 1.2 §5.3): one port (no MULTIPORT) on a PTY, a
//! Unix socket, the daemon's stdio, or descriptors given by the caller.
//!
//! Queues: receiveq (index 0, backend end → driver) and transmitq (index 1,
//! driver → backend end). VIRTIO_CONSOLE_F_SIZE is offered when the backend
//! end is a terminal (a PTY, or stdio / given descriptors that are a tty);
//! VIRTIO_CONSOLE_F_EMERG_WRITE is offered unless disabled in the options.
//!
//! # Backend ends ([`ConsoleBackend`])
//! - `Pty`: a new PTY. The slave path is logged and given by
//!   [`Console::pty_path`]. The device keeps one slave descriptor open itself
//!   (in raw mode, so bytes pass unchanged and guest output is never echoed
//!   back as input): with no slave open, Linux fails master reads with EIO
//!   and poll reports POLLHUP forever, which would spin the transport. So
//!   clients may open and close the slave at will. Output written while no
//!   client is attached stays in the PTY buffer (and is read by the next
//!   client) until it is full; then it is dropped.
//! - `UnixSocket(path)`: listens at `path` (a stale socket file from an
//!   earlier run is replaced; the file is removed when the device goes).
//!   One client at a time: a new client **replaces** the current one, so a
//!   user can always reattach, even when the old connection hangs. Output
//!   with no client connected is dropped.
//! - `Stdio`: the daemon's stdin/stdout, through private open file
//!   descriptions where possible so that O_NONBLOCK does not leak to the
//!   parent's terminal. The terminal mode is left alone.
//! - `Fds { read, write }`: descriptors already open. O_NONBLOCK is set on
//!   them (sockets are used with MSG_DONTWAIT instead).
//!
//! # Drop and count policy
//! Nothing ever blocks a queue thread and nothing is buffered without bound.
//! - Input is read only when nothing is held (at most [`RX_HELD_MAX`] bytes),
//!   so while the driver posts no receive buffer input stays in the backend
//!   end (the kernel's buffer, then the writer's flow control): it is never
//!   dropped. At end of file the input is no longer read or polled.
//! - Output the backend end cannot take right now (full, no reader, no
//!   client, EPIPE/EIO) is dropped and counted in
//!   [`ConsoleStats::tx_dropped`] (in bytes). Sockets are written with
//!   MSG_NOSIGNAL; a pipe with no reader relies on SIGPIPE being ignored, as
//!   the Rust runtime does by default.
//! - A chain with a descriptor of the wrong direction or outside shared
//!   memory gets used length 0 and is counted in [`ConsoleStats::malformed`];
//!   a chain that cannot be walked breaks its queue.
//!
//! # Terminal size
//! A PTY master's owner gets no SIGWINCH and no poll event on a resize, so
//! the size is looked at on a timer: with `VIRTIO_CONSOLE_F_SIZE` acked,
//! [`VirtioDevice::config_watch`] gives the transport a watch that re-reads
//! it every [`SIZE_POLL_INTERVAL`] and reports a change, upon which the
//! transport raises a config interrupt.

mod endpoint;
mod queues;
mod sys;

pub use sys::{open_pty, Pty};

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ringfence_device::{read_config_bytes, ConfigWatch, DeviceError, QueueHandler, VirtioDevice};

use endpoint::Endpoint;
use queues::Held;
pub use queues::{RxQueue, TxQueue};

/// virtio device id of a console.
pub const DEVICE_ID_CONSOLE: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
/// Feature: cols/rows in the config space are valid.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Feature: several ports (not offered).
pub const VIRTIO_CONSOLE_F_MULTIPORT: u32 = 1;
/// Feature: a config write to `emerg_wr` outputs one character.
pub const VIRTIO_CONSOLE_F_EMERG_WRITE: u32 = 2;
/// Size of the config space: cols u16, rows u16, max_nr_ports u32, emerg_wr u32.
pub const CONFIG_SIZE: usize = 12;
/// Offset of `emerg_wr` in the config space.
pub const EMERG_WR_OFFSET: u64 = 8;
/// Most input bytes read from the backend end and held for the driver.
pub const RX_HELD_MAX: usize = 4096;
/// Most bytes written for one transmit chain; the rest is dropped and counted.
pub const TX_CHAIN_MAX: u64 = 64 * 1024;

/// The receiveq index.
pub const RX_QUEUE: u16 = 0;
/// The transmitq index.
pub const TX_QUEUE: u16 = 1;

/// Where the port's bytes come from and go to.
#[derive(Debug)]
pub enum ConsoleBackend {
    /// A new PTY; clients open its slave ([`Console::pty_path`]).
    Pty,
    /// A Unix socket listening at this path; one client at a time, a new
    /// client replaces the current one.
    UnixSocket(PathBuf),
    /// The daemon's stdin and stdout.
    Stdio,
    /// Descriptors already open (they may be the same file, duplicated).
    Fds {
        /// Input to the driver.
        read: OwnedFd,
        /// Output from the driver.
        write: OwnedFd,
    },
}

/// Options of a console.
#[derive(Debug, Clone)]
pub struct ConsoleOptions {
    /// Queue size offered (a power of two).
    pub queue_size: u16,
    /// Offer VIRTIO_CONSOLE_F_EMERG_WRITE.
    pub emergency_write: bool,
}

impl Default for ConsoleOptions {
    fn default() -> Self {
        Self {
            queue_size: 256,
            emergency_write: true,
        }
    }
}

/// Errors building a console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The backend end could not be set up.
    #[error("cannot set up the {what} backend end")]
    Backend {
        /// Which backend end.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An option is out of range.
    #[error("invalid option: {reason}")]
    Option {
        /// What is wrong.
        reason: String,
    },
}

/// Counters of a console.
#[derive(Debug, Default)]
pub struct ConsoleStats {
    /// Bytes delivered to the driver.
    pub rx_bytes: AtomicU64,
    /// Bytes written to the backend end.
    pub tx_bytes: AtomicU64,
    /// Driver bytes dropped: the backend end could not take them, or they
    /// were past [`TX_CHAIN_MAX`] in one chain.
    pub tx_dropped: AtomicU64,
    /// Chains answered with used length 0 (wrong direction, outside memory).
    pub malformed: AtomicU64,
    /// Chains that could not be walked (each one broke its queue).
    pub broken: AtomicU64,
}

/// A virtio-console device with one port.
#[derive(Debug)]
pub struct Console {
    end: Arc<Endpoint>,
    held: Arc<Mutex<Held>>,
    stats: Arc<ConsoleStats>,
    opts: ConsoleOptions,
    /// Shared with the size watch of the live instance.
    config: Arc<Mutex<ConfigState>>,
    acked: u64,
}

/// How often a live console looks at its terminal's size.
pub const SIZE_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

/// The config space and the terminal size it was built from.
#[derive(Debug, Clone, Copy)]
struct ConfigState {
    bytes: [u8; CONFIG_SIZE],
    size: Option<(u16, u16)>,
}

impl ConfigState {
    /// Reads `end`'s terminal size into the config; true if it changed.
    fn refresh(&mut self, end: &Endpoint) -> bool {
        let Some(size) = end.size() else {
            return false;
        };
        if self.size == Some(size) {
            return false;
        }
        self.size = Some(size);
        let (cols, rows) = size;
        self.bytes[0..2].copy_from_slice(&cols.to_le_bytes());
        self.bytes[2..4].copy_from_slice(&rows.to_le_bytes());
        true
    }
}

/// The live instance's terminal-size watch.
struct SizeWatch {
    end: Arc<Endpoint>,
    config: Arc<Mutex<ConfigState>>,
}

impl ConfigWatch for SizeWatch {
    fn interval(&self) -> std::time::Duration {
        SIZE_POLL_INTERVAL
    }

    fn poll(&mut self) -> bool {
        self.config
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refresh(&self.end)
    }
}

impl Console {
    /// Sets up the backend end.
    pub fn new(backend: ConsoleBackend, opts: ConsoleOptions) -> Result<Self, ConsoleError> {
        if !opts.queue_size.is_power_of_two() {
            return Err(ConsoleError::Option {
                reason: format!("queue_size {} not a power of two", opts.queue_size),
            });
        }
        let (what, end) = match backend {
            ConsoleBackend::Pty => ("pty", Endpoint::pty()),
            ConsoleBackend::UnixSocket(path) => ("unix socket", Endpoint::unix_socket(&path)),
            ConsoleBackend::Stdio => ("stdio", Endpoint::stdio()),
            ConsoleBackend::Fds { read, write } => ("fds", Endpoint::fds(read, write)),
        };
        let end = end.map_err(|source| ConsoleError::Backend { what, source })?;
        let mut console = Self {
            end: Arc::new(end),
            held: Arc::new(Mutex::new(Held::new())),
            stats: Arc::new(ConsoleStats::default()),
            opts,
            config: Arc::new(Mutex::new(ConfigState {
                bytes: [0; CONFIG_SIZE],
                size: None,
            })),
            acked: 0,
        };
        console.config_state().bytes[4..8].copy_from_slice(&1u32.to_le_bytes()); // max_nr_ports
        console.refresh_size();
        Ok(console)
    }

    /// Another device instance on the same backend end, with fresh
    /// counters. The input already read and held is shared too, so a
    /// frontend that replaces an earlier one (one instance at a time) loses
    /// nothing; instances live at the same time get input in whichever
    /// order they read it, and their output is interleaved.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            end: self.end.clone(),
            held: self.held.clone(),
            stats: Arc::new(ConsoleStats::default()),
            opts: self.opts.clone(),
            config: Arc::new(Mutex::new(*self.config_state())),
            acked: 0,
        })
    }

    fn config_state(&self) -> std::sync::MutexGuard<'_, ConfigState> {
        self.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The PTY slave clients open, for the `Pty` backend end.
    pub fn pty_path(&self) -> Option<&Path> {
        self.end.pty_path()
    }

    /// The listening socket, for the `UnixSocket` backend end.
    pub fn socket_path(&self) -> Option<&Path> {
        self.end.socket_path()
    }

    /// The terminal size as last read (cols, rows); `None` when the backend
    /// end is not a terminal.
    pub fn size(&self) -> Option<(u16, u16)> {
        self.config_state().size
    }

    /// Reads the terminal size again and updates the config space; true if
    /// it changed (the caller then raises a config interrupt).
    pub fn refresh_size(&mut self) -> bool {
        let end = self.end.clone();
        self.config_state().refresh(&end)
    }

    /// Counters of this instance.
    pub fn stats(&self) -> &ConsoleStats {
        &self.stats
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        DEVICE_ID_CONSOLE
    }

    fn device_features(&self) -> u64 {
        let mut f = 0u64;
        if self.end.has_size() {
            f |= 1 << VIRTIO_CONSOLE_F_SIZE;
        }
        if self.opts.emergency_write {
            f |= 1 << VIRTIO_CONSOLE_F_EMERG_WRITE;
        }
        f
    }

    fn num_queues(&self) -> u16 {
        2
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        read_config_bytes(&self.config_state().bytes, offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > CONFIG_SIZE as u64) {
            return Err(DeviceError::ConfigOutOfRange {
                offset,
                len: data.len(),
                size: CONFIG_SIZE,
            });
        }
        // Only emerg_wr is writable, as a whole field or its first byte;
        // may be used before the queues are set up (that is its purpose).
        let Some(&c) = data.first() else {
            return Ok(());
        };
        if !self.opts.emergency_write
            || offset != EMERG_WR_OFFSET
            || !(data.len() == 1 || data.len() == 4)
        {
            return Err(DeviceError::ConfigReadOnly { offset });
        }
        let n = self.end.write(&[c]) as u64;
        self.stats.tx_bytes.fetch_add(n, Ordering::Relaxed);
        self.stats
            .tx_dropped
            .fetch_add(1u64.saturating_sub(n), Ordering::Relaxed);
        Ok(())
    }

    fn activate(&mut self, acked_features: u64) -> Result<Vec<Box<dyn QueueHandler>>, DeviceError> {
        tracing::info!(
            pty = ?self.end.pty_path(),
            socket = ?self.end.socket_path(),
            features = format_args!("{acked_features:#x}"),
            "virtio-console activated"
        );
        self.acked = acked_features;
        let q = self.opts.queue_size;
        Ok(vec![
            Box::new(RxQueue::new(
                self.end.clone(),
                self.held.clone(),
                self.stats.clone(),
                q,
            )),
            Box::new(TxQueue::new(self.end.clone(), self.stats.clone(), q)),
        ])
    }

    fn reset(&mut self) {
        self.acked = 0;
    }

    fn config_watch(&mut self) -> Option<Box<dyn ConfigWatch>> {
        if self.acked & (1 << VIRTIO_CONSOLE_F_SIZE) == 0 || !self.end.has_size() {
            return None;
        }
        Some(Box::new(SizeWatch {
            end: self.end.clone(),
            config: self.config.clone(),
        }))
    }
}
