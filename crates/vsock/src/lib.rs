//! virtio-vsock (virtio 1.2 §5.10, device id 19) on the hybrid Unix-socket
//! model of Firecracker and rust-vmm's vhost-device-vsock, so the host tools
//! written for those work unchanged.
//!
//! # The model
//!
//! The guest has context id `guest_cid` (config space: one le64); the host
//! is CID 2. Only stream sockets exist (`type` 1); SEQPACKET is not offered.
//! The host side is a family of Unix stream sockets named after `uds_path`:
//!
//! * **Guest to host.** A guest REQUEST for host port `P` makes the device
//!   connect (without blocking) to the Unix socket `<uds_path>_<P>`. Success
//!   is answered with RESPONSE, failure (no listener, a full backlog, the
//!   connection limit) with RST.
//! * **Host to guest.** The device listens on `uds_path`. A host client
//!   connects and writes `CONNECT <port>\n`; the device allocates a local
//!   port (from [`FIRST_LOCAL_PORT`] up, unique among live connections) and
//!   sends the guest a REQUEST from it. On the guest's RESPONSE the client
//!   reads `OK <local_port>\n` and the connection is open; on RST (or no
//!   answer within the connect timeout) the client is closed. Bytes the
//!   client writes after its newline are the first stream data.
//! * **Data.** RW payloads from the guest are written to the host socket;
//!   host socket data becomes RW packets for the guest. SHUTDOWN and RST
//!   work both ways: the host's EOF is a SHUTDOWN(SEND), a guest
//!   SHUTDOWN(SEND) shuts the host socket's write side once its data is
//!   written, a guest that shut both directions gets the RST it waits for,
//!   an RST closes the host socket, and a guest packet for a connection
//!   that does not exist is answered with RST (unless it is one).
//!
//! # Credit and the memory bounds
//!
//! Both directions use virtio-vsock's credit: every packet carries the
//! sender's `buf_alloc` and `fwd_cnt`, and nobody may have more than the
//! peer's `buf_alloc` in flight.
//!
//! * **Guest to host**: we advertise [`VsockOptions::buf_alloc`] and, as
//!   `fwd_cnt`, what the host socket has taken. What it has not taken yet
//!   is kept, at most `buf_alloc` bytes per connection: that is all the
//!   guest's credit allows, and a packet that would go beyond is hostile:
//!   the connection is reset and counted in
//!   [`VsockStats::credit_violations`]. A CREDIT_UPDATE goes out when the
//!   guest asks (CREDIT_REQUEST) and when half of `buf_alloc` was freed
//!   since we last told it.
//! * **Host to guest**: we never send more than the guest's credit
//!   (`buf_alloc - (sent - fwd_cnt)` as it last said). A connection
//!   without credit is taken out of the epoll set, so its data stays in
//!   the host socket (and the host writer blocks) until the guest frees
//!   buffer space. Host data is read straight into a guest buffer: the
//!   device holds none.
//!
//! So a device holds at most `max_connections × buf_alloc` bytes of guest
//! data, plus per handler one 64 KiB packet buffer, at most
//! [`MAX_PENDING_CLIENTS`] host clients with a [`CONNECT_LINE_MAX`]-byte
//! line each, and at most [`MAX_QUEUED_RST`] RSTs waiting for rx buffers
//! (further ones are dropped and counted: a guest that posts no rx buffers
//! but provokes RSTs only loses its own answers).
//!
//! # Validation
//!
//! Every tx chain is copied out of shared memory once (header and payload,
//! at most [`MAX_PAYLOAD`] bytes) and checked: device-writable descriptors,
//! `len` not equal to the payload, `src_cid` not the guest's, `dst_cid` not
//! the host: dropped and counted. A type other than stream or an unknown
//! op: answered with RST. An rx chain that cannot take a header (too
//! small, device-readable, outside shared memory) is used with length 0
//! and counted, and the packet meant for it goes into the next chain.
//! A chain that cannot be walked at all breaks the queue
//! ([`ChainError`](ringfence_device::ChainError)).
//!
//! # Threads and wake-ups
//!
//! The rx and tx handlers may run on separate threads and share the
//! connection table behind one mutex (held for table updates and
//! non-blocking socket calls only). The rx handler's
//! [`wake_fd`](ringfence_device::QueueHandler::wake_fd) is an epoll
//! descriptor holding the listener, the host clients, every host socket
//! that has something the device can act on, and an eventfd the tx handler
//! rings when it queues a packet for the guest. It is level-triggered, and
//! `ready()` consumes or acts on everything it reports. Deadlines (a
//! CONNECT line, an unanswered host connect) are checked by the rx handler
//! every quarter of the timeout (5 ms ..= 1 s), and a small timer thread
//! (a sleep loop: no timerfd, which the backend's seccomp list does not
//! give vsock) rings the eventfd on that period while any is pending. The
//! event queue's buffers are held: the device never sends events.

mod conn;
mod packet;
mod rx;
mod sys;
mod tx;

use std::io;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ringfence_device::{read_config_bytes, DeviceError, QueueHandler, VirtioDevice};

pub use packet::{
    Header, HDR_LEN, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};

/// virtio device id of a socket device.
pub const DEVICE_ID_VSOCK: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Size of the config space: `le64 guest_cid`.
pub const CONFIG_SIZE: usize = 8;
/// Largest payload of one packet either way.
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// Longest `CONNECT <port>\n` line, newline included.
pub const CONNECT_LINE_MAX: usize = 64;
/// Default time a host client has to send its CONNECT line, and the guest
/// to answer the REQUEST that follows.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Host clients that may be waiting for their CONNECT line at once; more
/// are closed at once and counted as refused.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// First local port given to a host connect.
pub const FIRST_LOCAL_PORT: u32 = 1024;
/// RSTs that may wait for rx buffers at once.
pub const MAX_QUEUED_RST: usize = 256;
/// Smallest `buf_alloc` accepted.
pub const MIN_BUF_ALLOC: u32 = 4096;
/// Largest `buf_alloc` accepted.
pub const MAX_BUF_ALLOC: u32 = 64 << 20;
/// Largest `max_connections` accepted.
pub const MAX_CONNECTIONS: usize = 65536;

/// Options of a vsock device.
#[derive(Debug, Clone)]
pub struct VsockOptions {
    /// The guest's context id (3 ..= 0xffff_fffe).
    pub guest_cid: u64,
    /// The host socket: host clients connect here, and a guest connect to
    /// port `P` reaches `<uds_path>_<P>`.
    pub uds_path: PathBuf,
    /// Queue size offered (a power of two).
    pub queue_size: u16,
    /// Receive buffer we advertise per connection, and the most guest data
    /// kept for one connection whose host socket does not read.
    pub buf_alloc: u32,
    /// Most live connections, both directions together.
    pub max_connections: usize,
}

impl VsockOptions {
    /// Options for `guest_cid` on `uds_path` with the usual sizes: queues of
    /// 256, 256 KiB per connection, 256 connections.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        VsockOptions {
            guest_cid,
            uds_path: uds_path.into(),
            queue_size: 256,
            buf_alloc: 256 * 1024,
            max_connections: 256,
        }
    }
}

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The guest CID is reserved or does not fit in 32 bits.
    #[error("guest cid {cid} is not in 3..=0xfffffffe")]
    InvalidCid {
        /// The CID given.
        cid: u64,
    },
    /// An option out of range.
    #[error("invalid option {name}: {reason}")]
    InvalidOption {
        /// The option.
        name: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The socket path is too long for `<path>_<port>` to fit a `sockaddr_un`.
    #[error("socket path {path} is {len} bytes; at most {max} leave room for _<port>")]
    PathTooLong {
        /// The path.
        path: PathBuf,
        /// Its length.
        len: usize,
        /// The longest accepted.
        max: usize,
    },
    /// The listening socket could not be set up.
    #[error("cannot listen on {path}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Counters of a vsock device. "rx" is the rx queue (to the guest), "tx"
/// the tx queue (from the guest).
#[derive(Debug, Default)]
pub struct VsockStats {
    /// Guest connects that reached a host listener (RESPONSE sent).
    pub connections_guest: AtomicU64,
    /// Host connects the guest accepted (`OK <port>` written).
    pub connections_host: AtomicU64,
    /// Connects refused: guest connects with no listener, a full backlog or
    /// the connection limit reached; host clients over the limits; host
    /// connects the guest reset or did not answer in time.
    pub refused: AtomicU64,
    /// RST packets put on the rx queue.
    pub rst_sent: AtomicU64,
    /// RSTs dropped because [`MAX_QUEUED_RST`] were already waiting.
    pub rst_dropped: AtomicU64,
    /// Packets put on the rx queue.
    pub rx_packets: AtomicU64,
    /// Packets taken from the tx queue that passed validation.
    pub tx_packets: AtomicU64,
    /// Payload bytes put on the rx queue.
    pub rx_bytes: AtomicU64,
    /// Payload bytes accepted from the tx queue for host sockets.
    pub tx_bytes: AtomicU64,
    /// Malformed packets or buffers dropped (see the crate doc), and
    /// protocol violations that reset a connection (a second REQUEST, data
    /// before the connection is open or after the guest's SHUTDOWN(SEND),
    /// a RESPONSE on an open connection).
    pub dropped_malformed: AtomicU64,
    /// Guest data beyond the credit we gave (the connection is reset).
    pub credit_violations: AtomicU64,
    /// Host clients closed for a malformed, too long, or late CONNECT line
    /// (or none at all).
    pub connect_line_errors: AtomicU64,
}

/// A virtio-vsock device.
#[derive(Debug)]
pub struct Vsock {
    opts: VsockOptions,
    listener: Arc<UnixListener>,
    stats: Arc<VsockStats>,
    connect_timeout: Duration,
    active: Option<Arc<conn::Shared>>,
}

/// `_4294967295`: the longest suffix a port adds to the path.
const PORT_SUFFIX_MAX: usize = 11;

fn bind(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            // A socket file nobody listens on is left over from a previous
            // run: replace it. A live one, or anything but a socket, is an
            // error.
            let is_socket = std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            match UnixStream::connect(path) {
                Err(c) if is_socket && c.kind() == io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(path)?;
                    UnixListener::bind(path)
                }
                _ => Err(e),
            }
        }
        other => other,
    }
}

impl Vsock {
    /// Checks `opts`, binds and listens on `uds_path` (non-blocking).
    pub fn new(opts: VsockOptions) -> Result<Self, VsockError> {
        if !(3..=0xffff_fffe).contains(&opts.guest_cid) {
            return Err(VsockError::InvalidCid {
                cid: opts.guest_cid,
            });
        }
        if !opts.queue_size.is_power_of_two() || opts.queue_size < 4 {
            return Err(VsockError::InvalidOption {
                name: "queue_size",
                reason: format!("{} is not a power of two >= 4", opts.queue_size),
            });
        }
        if !(MIN_BUF_ALLOC..=MAX_BUF_ALLOC).contains(&opts.buf_alloc) {
            return Err(VsockError::InvalidOption {
                name: "buf_alloc",
                reason: format!(
                    "{} not in {MIN_BUF_ALLOC}..={MAX_BUF_ALLOC}",
                    opts.buf_alloc
                ),
            });
        }
        if !(1..=MAX_CONNECTIONS).contains(&opts.max_connections) {
            return Err(VsockError::InvalidOption {
                name: "max_connections",
                reason: format!("{} not in 1..={MAX_CONNECTIONS}", opts.max_connections),
            });
        }
        let len = opts.uds_path.as_os_str().len();
        let max = sys::SUN_PATH_MAX - PORT_SUFFIX_MAX;
        if len == 0 || len > max {
            return Err(VsockError::PathTooLong {
                path: opts.uds_path.clone(),
                len,
                max,
            });
        }
        let listener = bind(&opts.uds_path)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| VsockError::Bind {
                path: opts.uds_path.clone(),
                source,
            })?;
        Ok(Vsock {
            opts,
            listener: Arc::new(listener),
            stats: Arc::new(VsockStats::default()),
            connect_timeout: CONNECT_TIMEOUT,
            active: None,
        })
    }

    /// Another device on the same listening socket (a duplicated
    /// descriptor, fresh counters, no connections), for a backend that
    /// serves several frontends or can no longer bind once sandboxed. Two
    /// active devices on one socket race for host connects: each client is
    /// accepted by one of them, and so reaches whichever guest that one
    /// serves. Give each guest its own `uds_path` instead.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Vsock {
            opts: self.opts.clone(),
            listener: Arc::new(self.listener.try_clone()?),
            stats: Arc::new(VsockStats::default()),
            connect_timeout: self.connect_timeout,
            active: None,
        })
    }

    /// Sets how long a host client has to send its CONNECT line and the
    /// guest to answer the REQUEST that follows (default
    /// [`CONNECT_TIMEOUT`]; taken into account at the next activation).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The options the device was made with.
    pub fn options(&self) -> &VsockOptions {
        &self.opts
    }

    /// Counters (shared by the queues, kept across resets).
    pub fn stats(&self) -> &VsockStats {
        &self.stats
    }

    /// Live connections (0 when not active).
    pub fn connections(&self) -> usize {
        self.active.as_ref().map_or(0, |s| s.lock().conns.len())
    }

    /// Header-only packets (RESPONSE, REQUEST, RST, CREDIT_UPDATE) waiting
    /// for rx buffers, including entries of connections closed since.
    pub fn queued_control(&self) -> usize {
        self.active.as_ref().map_or(0, |s| s.lock().control.len())
    }

    /// Guest data held because host sockets have not taken it, all
    /// connections together (at most `max_connections × buf_alloc`).
    pub fn buffered_bytes(&self) -> usize {
        self.active.as_ref().map_or(0, |s| {
            s.lock()
                .conns
                .values()
                .map(|c| c.to_host.len())
                .fold(0usize, usize::saturating_add)
        })
    }
}

/// Rings the rx handler's eventfd on every tick while a deadline is
/// pending, so a silent client is closed in time even when nothing else
/// happens. Ends within a tick of the activation going away.
fn spawn_timer(shared: Weak<conn::Shared>, tick: Duration) {
    let spawned = std::thread::Builder::new()
        .name("vsock-timer".into())
        .spawn(move || loop {
            std::thread::sleep(tick);
            let Some(s) = shared.upgrade() else {
                return;
            };
            if s.timed.load(Ordering::Relaxed) {
                s.ring();
            }
        });
    if let Err(e) = spawned {
        // Deadlines are then checked whenever anything else happens.
        tracing::warn!(error = %e, "vsock timer thread not started");
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_ID_VSOCK
    }

    fn device_features(&self) -> u64 {
        // Stream sockets are implied without VIRTIO_VSOCK_F_STREAM.
        0
    }

    fn num_queues(&self) -> u16 {
        3
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        read_config_bytes(&self.opts.guest_cid.to_le_bytes(), offset, data)
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigReadOnly { offset })
    }

    fn activate(&mut self, acked_features: u64) -> Result<Vec<Box<dyn QueueHandler>>, DeviceError> {
        let shared = conn::Shared::new(
            self.opts.guest_cid,
            self.opts.buf_alloc,
            self.opts.max_connections,
            self.opts.uds_path.clone(),
            self.connect_timeout,
            self.stats.clone(),
            self.listener.clone(),
        )
        .map_err(|e| DeviceError::Activate {
            reason: format!("vsock epoll set-up: {e}"),
        })?;
        let shared = Arc::new(shared);
        spawn_timer(Arc::downgrade(&shared), rx::tick(self.connect_timeout));
        self.active = Some(shared.clone());
        tracing::info!(
            guest_cid = self.opts.guest_cid,
            uds = %self.opts.uds_path.display(),
            features = format_args!("{acked_features:#x}"),
            "virtio-vsock activated"
        );
        let q = self.opts.queue_size;
        Ok(vec![
            Box::new(rx::RxQueue::new(shared.clone(), q)),
            Box::new(tx::TxQueue::new(shared, q)),
            Box::new(rx::EventQueue),
        ])
    }

    fn reset(&mut self) {
        // The handlers are gone; dropping the table closes every host socket.
        self.active = None;
    }
}
