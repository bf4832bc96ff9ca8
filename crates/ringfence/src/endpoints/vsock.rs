//! vsock → Unix sockets, both ways:
//!
//! * `--vsock-listen PORT:PATH`: a listener on the Unix socket PATH; every
//!   local connection becomes a stream to the host (CID 2) port PORT.
//! * `--vsock-forward PORT:PATH`: this VM listens on vsock port PORT; a
//!   host connection to it is carried to a new connection to PATH.
//!
//! The endpoint drives virtio-drivers' `VirtQueue`s itself ([`VsockDev`])
//! rather than `VirtIOSocket`, which spins on the used ring for every
//! packet it sends (a device that answers slowly, or never, holds the
//! thread), panics on a used id or length the device makes up, and keeps
//! its credit counters in unchecked arithmetic. Here nothing waits on the
//! device: packets go into a fixed set of transmit buffers and are freed
//! when the device uses them; every value the device gives (used id, used
//! length, header fields) is checked before it is used.
//!
//! Flow control: a local socket is read only while the peer has credit,
//! at most that much, and only while a transmit buffer is free (with none
//! free, local sockets wait in their kernel buffers). Data from the peer
//! that the local socket does not take at once waits in a per-connection
//! buffer, which our advertised `buf_alloc` bounds (a peer that sends
//! beyond it is reset: that connection only), and credit returns to the
//! peer only as the local socket takes the data. So a local reader that
//! stops reading stops the peer, and memory stays bounded at
//! [`MAX_CONNECTIONS`] × [`BUF_ALLOC`].
//!
//! Control packets (REQUEST, RESPONSE, SHUTDOWN, CREDIT_UPDATE, RST) have
//! transmit buffers of their own and wait in a pending queue when those
//! are taken: at most one entry per live connection (its flags say what it
//! owes the peer) plus at most [`RST_MAX`] resets. While resets pile up,
//! neither the device's packets nor new local clients are taken, since
//! both can cause more.
//!
//! Closing (virtio 1.2 §5.10.6.6, as Linux does it): local EOF is a
//! SHUTDOWN(SEND). Once both directions are done (local EOF, and the peer's
//! SHUTDOWN(SEND) with all its data delivered locally), SHUTDOWN(RCV|SEND)
//! asks the peer to end the connection, and its RST does. We send RST
//! ourselves only as a reply to a peer that shut both ways, or when no RST
//! came within [`CLOSE_TIMEOUT`]: the peer may still hold data it accepted
//! from us but has not written out yet (the device keeps up to its
//! `buf_alloc` for a slow host reader), and an RST makes it drop that.
//!
//! Waiting: one `poll` on the listeners, the sockets that need something
//! and the queues' call doorbells. A notification can be lost in
//! virtio-drivers 0.13 (event indices compared without wrap-around), so a
//! transmit overdue by a few ms is kicked again (backing off to
//! [`WAIT_SLICE`] while the device stays silent), the receive queue is
//! kicked once after a quiet slice that follows reposted buffers, and both
//! are kicked just after their index wraps.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use ringfence_msg_driver::{BounceHal, CompletionWaiter, MsgTransport};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;

use super::{
    parse_port_path, wait_events, DeviceLink, EndpointArgs, EndpointError, Report, Stop, WAIT_SLICE,
};

/// Receive queue index.
const RX_Q: u16 = 0;
/// Transmit queue index.
const TX_Q: u16 = 1;
/// Event queue index.
const EV_Q: u16 = 2;

/// Size of a virtio-vsock packet header.
const HDR_LEN: usize = 44;
/// Largest payload of one packet (the backend's limit too).
const MAX_PAYLOAD: usize = 64 * 1024;
/// A receive buffer, or a data transmit buffer: a header and a full
/// payload (fewer, larger packets).
const PKT_BUF: usize = HDR_LEN + MAX_PAYLOAD;
/// Receive buffers, all posted all the time (about 1 MiB of the window).
const RX_BUFS: usize = 16;
/// Data transmit buffers (about 1 MiB of the window while all are in flight).
const TX_DATA_BUFS: usize = 16;
/// Header-only transmit buffers for control packets.
const TX_CTRL_BUFS: usize = 16;
/// Ring sizes: one descriptor per buffer.
const RX_RING: usize = RX_BUFS;
const TX_RING: usize = TX_DATA_BUFS + TX_CTRL_BUFS;
const EV_RING: usize = 4;
/// An event buffer (`le32 id`, with room to spare).
const EV_BUF: usize = 8;

/// Receive buffer advertised per connection: the most peer data held for a
/// local socket that does not read.
const BUF_ALLOC: u32 = 256 * 1024;
/// Credit goes back to the peer once this much was freed since it last
/// heard (every packet we send carries it too).
const CREDIT_UPDATE_AFTER: u32 = BUF_ALLOC / 2;
/// Live connections, both directions together.
const MAX_CONNECTIONS: usize = 128;
/// Time the host has to answer a connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time the host has to answer our SHUTDOWN(RCV|SEND) with RST (Linux's
/// VSOCK_CLOSE_TIMEOUT) before we reset the connection ourselves.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(8);
/// First local port of connections we open.
const FIRST_EPHEMERAL_PORT: u32 = 49152;
/// Packets taken from the device per round, before local sockets get a turn.
const RX_BATCH: usize = 64;
/// Packets read from one local socket per round (fairness).
const READS_PER_ROUND: usize = 4;
/// Local connections accepted per listener per round.
const ACCEPTS_PER_ROUND: usize = 16;
/// Resets waiting for a transmit buffer, at most; beyond, they are dropped.
const RST_MAX: usize = 256;
/// With this many resets waiting, the device's packets and new local
/// clients wait (both can cause more).
const RST_HIGH: usize = RST_MAX / 2;
/// While the device was active this recently, wait in short slices.
const ACTIVE_WINDOW: Duration = Duration::from_millis(50);
/// A transmit unanswered this long (at first) is kicked again; the
/// receive queue is kicked after a quiet slice this long.
const REKICK_AFTER: Duration = Duration::from_millis(2);
/// How long pending resets and transmits are given when stopping.
const DRAIN: Duration = Duration::from_millis(200);

/// The host's context id.
const HOST_CID: u64 = 2;
/// Stream sockets, the only type there is here.
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
/// SHUTDOWN flags: the sender will receive no more, send no more.
const SHUTDOWN_RCV: u32 = 1;
const SHUTDOWN_SEND: u32 = 2;
/// Event id: the device's transport was reset; every connection is gone.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// A connection is known by (peer port, our port); the peer is always the host.
type Key = (u32, u32);

/// A virtio-vsock packet header (virtio 1.2 §5.10.6), little-endian on
/// the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hdr {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl Hdr {
    /// Reads a header from the start of `b`; `None` if `b` is too short.
    fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; HDR_LEN] = b.get(..HDR_LEN)?.try_into().ok()?;
        let u16_at = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| u64::from(u32_at(at)) | (u64::from(u32_at(at + 4)) << 32);
        Some(Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        let mut put = |at: usize, bytes: &[u8]| {
            if let Some(d) = b.get_mut(at..at + bytes.len()) {
                d.copy_from_slice(bytes);
            }
        };
        put(0, &self.src_cid.to_le_bytes());
        put(8, &self.dst_cid.to_le_bytes());
        put(16, &self.src_port.to_le_bytes());
        put(20, &self.dst_port.to_le_bytes());
        put(24, &self.len.to_le_bytes());
        put(28, &self.type_.to_le_bytes());
        put(30, &self.op.to_le_bytes());
        put(32, &self.flags.to_le_bytes());
        put(36, &self.buf_alloc.to_le_bytes());
        put(40, &self.fwd_cnt.to_le_bytes());
        b
    }
}

bitflags::bitflags! {
    /// Features the endpoint accepts (stream sockets need no bit).
    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    struct Features: u64 {
        const RING_EVENT_IDX = 1 << 29;
        const VERSION_1 = 1 << 32;
    }
}

/// The device: its transport and three queues. Dropping it resets the
/// device before the rings go back to the pool.
struct VsockDev {
    transport: MsgTransport,
    rx: VirtQueue<BounceHal, RX_RING>,
    tx: VirtQueue<BounceHal, TX_RING>,
    ev: VirtQueue<BounceHal, EV_RING>,
    guest_cid: u64,
}

impl VsockDev {
    fn new(mut transport: MsgTransport) -> Result<Self, String> {
        let sizes = [(RX_Q, RX_RING), (TX_Q, TX_RING), (EV_Q, EV_RING)];
        for (q, need) in sizes {
            let max = transport.max_queue_size(q);
            if (max as usize) < need {
                return Err(format!(
                    "queue {q} allows {max} entries, at least {need} needed"
                ));
            }
        }
        let features = transport.begin_init(Features::all());
        let event_idx = features.contains(Features::RING_EVENT_IDX);
        let e = |e: virtio_drivers::Error| e.to_string();
        let rx = VirtQueue::new(&mut transport, RX_Q, false, event_idx).map_err(e)?;
        let tx = VirtQueue::new(&mut transport, TX_Q, false, event_idx).map_err(e)?;
        let ev = VirtQueue::new(&mut transport, EV_Q, false, event_idx).map_err(e)?;
        let guest_cid = transport.read_config_space::<u64>(0).map_err(e)?;
        transport.finish_init();
        Ok(Self {
            transport,
            rx,
            tx,
            ev,
            guest_cid,
        })
    }

    /// Tells the device about new buffers on `q` unless it said it does
    /// not need to hear.
    fn notify(&mut self, q: u16) {
        // add() publishes the avail index with a release store; the device
        // may have moved avail_event meanwhile: a full barrier before
        // reading it (virtio's mb()), which virtio-drivers 0.13 leaves out.
        fence(Ordering::SeqCst);
        let should = match q {
            RX_Q => self.rx.should_notify(),
            TX_Q => self.tx.should_notify(),
            _ => self.ev.should_notify(),
        };
        if should {
            self.transport.notify(q);
        }
    }
}

impl Drop for VsockDev {
    fn drop(&mut self) {
        self.transport.queue_unset(RX_Q);
        self.transport.queue_unset(TX_Q);
        self.transport.queue_unset(EV_Q);
    }
}

/// What a transmit descriptor carries.
#[derive(Debug, Clone, Copy)]
enum TxUse {
    /// Data buffer `i`, its first `len` bytes.
    Data(usize, usize),
    /// Control buffer `i`.
    Ctrl(usize),
}

/// The buffers behind the descriptors, and which descriptor holds which.
/// A buffer handed to the device is not touched until its used entry comes
/// back (or the device is reset: [`VsockDev`] is dropped first).
struct Bufs {
    rx: Vec<Box<[u8]>>,
    rx_of_token: Vec<Option<usize>>,
    data: Vec<Box<[u8]>>,
    data_free: Vec<usize>,
    ctrl: Vec<[u8; HDR_LEN]>,
    ctrl_free: Vec<usize>,
    tx_of_token: Vec<Option<TxUse>>,
    ev: Vec<[u8; EV_BUF]>,
    ev_of_token: Vec<Option<usize>>,
    /// Adds so far per queue, as the driver's avail index (mod 2^16).
    rx_added: u16,
    tx_added: u16,
}

impl Bufs {
    fn new() -> Self {
        Self {
            rx: (0..RX_BUFS)
                .map(|_| vec![0u8; PKT_BUF].into_boxed_slice())
                .collect(),
            rx_of_token: vec![None; RX_RING],
            data: (0..TX_DATA_BUFS)
                .map(|_| vec![0u8; PKT_BUF].into_boxed_slice())
                .collect(),
            data_free: (0..TX_DATA_BUFS).rev().collect(),
            ctrl: vec![[0u8; HDR_LEN]; TX_CTRL_BUFS],
            ctrl_free: (0..TX_CTRL_BUFS).rev().collect(),
            tx_of_token: vec![None; TX_RING],
            ev: vec![[0u8; EV_BUF]; EV_RING],
            ev_of_token: vec![None; EV_RING],
            rx_added: 0,
            tx_added: 0,
        }
    }

    /// Transmit buffers the device holds.
    fn tx_count(&self) -> usize {
        (TX_DATA_BUFS + TX_CTRL_BUFS).saturating_sub(self.data_free.len() + self.ctrl_free.len())
    }

    fn tx_in_flight(&self) -> bool {
        self.tx_count() > 0
    }
}

/// A used id the driver did not hand out, or handed out for nothing.
fn bogus_id(queue: &'static str, id: u16) -> EndpointError {
    EndpointError::Device {
        what: "used ring",
        detail: format!("{queue} used descriptor {id}, which is not in flight"),
    }
}

fn kick_err(e: ringfence_msg_driver::DriverError) -> EndpointError {
    EndpointError::Device {
        what: "kick",
        detail: e.to_string(),
    }
}

/// Counters for the report.
#[derive(Debug, Default)]
struct Counters {
    to_host: u64,
    to_host_refused: u64,
    from_host: u64,
    from_host_refused: u64,
    bytes_to_host: u64,
    bytes_from_host: u64,
    /// Packets that could not be parsed or made no sense for their connection.
    bad_packets: u64,
    /// Connections reset because the peer sent beyond our credit.
    credit_violations: u64,
    /// Transmits kicked again because the device was silent.
    tx_rekicks: u64,
    /// Resets dropped because too many were waiting.
    rst_dropped: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Ours: waiting for the host's RESPONSE until the deadline.
    Connecting(Instant),
    /// The host's: our RESPONSE has not gone out yet.
    Accepting,
    Open,
}

struct Conn {
    stream: UnixStream,
    /// Opened by us (a local client) rather than by the host.
    outgoing: bool,
    phase: Phase,
    /// Peer data the local socket has not taken yet (at most BUF_ALLOC).
    to_local: VecDeque<u8>,
    /// The peer sent SHUTDOWN(SEND): no more data from it.
    peer_shut: bool,
    /// The peer sent SHUTDOWN(RCV): it takes no more data.
    peer_rcv_shut: bool,
    local_write_shut: bool,
    /// The local socket said EOF; SHUTDOWN(SEND) is owed or went out.
    local_eof: bool,
    /// Last readiness seen (level: cleared on WouldBlock).
    readable: bool,
    writable: bool,
    /// Control packets owed to the peer, sent in this order: REQUEST or
    /// RESPONSE, CREDIT_UPDATE, SHUTDOWN with the flags in `shut_owed`.
    owe_open: bool,
    owe_credit: bool,
    shut_owed: u32,
    /// SHUTDOWN flags that went out.
    shut_sent: u32,
    /// SHUTDOWN(RCV|SEND) went out: when we stop waiting for the peer's RST.
    rst_deadline: Option<Instant>,
    /// An entry for this connection is in the pending control queue.
    queued: bool,
    /// The peer's credit as it last said.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the peer (wrapping, as the protocol counts).
    tx_cnt: u32,
    /// Bytes of peer data the local socket took, and what the peer last heard.
    fwd_cnt: u32,
    fwd_told: u32,
}

impl Conn {
    fn new(stream: UnixStream, outgoing: bool, phase: Phase) -> Self {
        Self {
            stream,
            outgoing,
            phase,
            to_local: VecDeque::new(),
            peer_shut: false,
            peer_rcv_shut: false,
            local_write_shut: false,
            local_eof: false,
            readable: true,
            writable: true,
            owe_open: true,
            owe_credit: false,
            shut_owed: 0,
            shut_sent: 0,
            rst_deadline: None,
            queued: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_told: 0,
        }
    }

    /// Bytes the peer can take now: `buf_alloc - (sent - fwd_cnt)`, zero if
    /// its numbers do not add up.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn note(&mut self, h: &Hdr) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    fn wants_read(&self) -> bool {
        self.phase == Phase::Open && !self.local_eof && !self.peer_rcv_shut && self.credit() > 0
    }

    fn owes(&self) -> bool {
        self.owe_open || self.owe_credit || self.shut_owed != 0
    }

    /// The next control packet owed to the peer (op, flags), taken off
    /// what is owed; `None` if nothing is.
    fn next_ctrl(&mut self, now: Instant) -> Option<(u16, u32)> {
        let (op, flags) = if self.owe_open {
            self.owe_open = false;
            if self.outgoing {
                (OP_REQUEST, 0)
            } else {
                self.phase = Phase::Open;
                (OP_RESPONSE, 0)
            }
        } else if self.owe_credit {
            self.owe_credit = false;
            (OP_CREDIT_UPDATE, 0)
        } else if self.shut_owed != 0 {
            self.shut_sent |= self.shut_owed;
            self.shut_owed = 0;
            if self.shut_sent == SHUTDOWN_RCV | SHUTDOWN_SEND && self.rst_deadline.is_none() {
                self.rst_deadline = Some(now + CLOSE_TIMEOUT);
            }
            (OP_SHUTDOWN, self.shut_sent)
        } else {
            return None;
        };
        self.fwd_told = self.fwd_cnt;
        Some((op, flags))
    }

    /// The next step of a clean disconnect (see the module notes): owes
    /// SHUTDOWN(RCV|SEND) once both directions are done. `true`: the
    /// connection is over and our RST ends it (the peer shut both ways and
    /// waits for it, or its own RST is overdue).
    fn close_step(&mut self, now: Instant) -> bool {
        if let Some(deadline) = self.rst_deadline {
            return now >= deadline;
        }
        if !self.peer_shut || !self.to_local.is_empty() {
            return false;
        }
        if self.peer_rcv_shut {
            return true;
        }
        if self.local_eof {
            // Not an RST: the peer may not have written out all we sent.
            self.shut_owed |= (SHUTDOWN_RCV | SHUTDOWN_SEND) & !self.shut_sent;
        }
        false
    }

    /// The local socket took `n` bytes of peer data.
    fn forwarded(&mut self, n: usize, counters: &mut Counters) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        counters.bytes_from_host = counters.bytes_from_host.saturating_add(n as u64);
        if self.fwd_cnt.wrapping_sub(self.fwd_told) >= CREDIT_UPDATE_AFTER {
            self.owe_credit = true;
        }
    }
}

/// Connects to the Unix socket `path` without blocking: a full backlog is
/// a refusal, not a stall of every other connection.
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2) call.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un of at least `len` bytes that
    // outlives the call; `fd` is open.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// Binds a listener at `path`, replacing a stale socket file (not any
/// other kind of file).
fn bind(path: &Path) -> Result<UnixListener, EndpointError> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        }
    }
    let l = UnixListener::bind(path).map_err(EndpointError::io("vsock listen socket"))?;
    l.set_nonblocking(true)
        .map_err(EndpointError::io("vsock listen socket"))?;
    Ok(l)
}

struct Listener {
    port: u32,
    path: PathBuf,
    sock: UnixListener,
}

/// What reading a local socket left to do.
enum Step {
    Idle,
    More,
    Reset,
}

/// What a local descriptor in the wait set stands for.
#[derive(Clone, Copy)]
enum Target {
    /// Listeners are accepted from on every round anyway.
    Listener,
    Read(Key),
    Write(Key),
}

/// An entry of the pending control queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctrl {
    /// A live connection owes the packets its flags say.
    Conn(Key),
    /// A reset, for a connection gone or never known.
    Rst(Key),
}

struct Endpoint<'a> {
    /// First, so it drops first: the device is reset before the buffers
    /// it may still hold go.
    dev: VsockDev,
    bufs: Bufs,
    waiter: &'a CompletionWaiter,
    listeners: Vec<Listener>,
    forwards: HashMap<u32, PathBuf>,
    conns: HashMap<Key, Conn>,
    next_port: u32,
    c: Counters,
    ctrl: VecDeque<Ctrl>,
    /// `Ctrl::Rst` entries in `ctrl`.
    rsts: usize,
    last_device_activity: Instant,
    /// Receive buffers were posted since the receive queue was last kicked
    /// by us, and when the device last used one.
    rx_unkicked: bool,
    last_rx: Instant,
    /// When a transmit last completed (or was kicked again), and how long
    /// the next silence may last before another kick.
    last_tx: Instant,
    tx_patience: Duration,
    /// Rotates which connection is read first.
    round: usize,
}

impl Endpoint<'_> {
    /// Kicks `q` while its avail index has just wrapped: virtio-drivers
    /// 0.13 compares event indices without wrap-around and may skip a
    /// notification the device waits for.
    fn kick_near_wrap(&self, added: u16, q: u16, ring: usize) -> Result<(), EndpointError> {
        if usize::from(added) < 2 * ring {
            self.waiter.kick(q).map_err(kick_err)?;
        }
        Ok(())
    }

    /// Posts receive buffer `i`.
    fn post_rx(&mut self, i: usize) -> Result<(), EndpointError> {
        let Some(buf) = self.bufs.rx.get_mut(i) else {
            return Ok(());
        };
        // SAFETY: the buffer is a heap allocation owned by `self.bufs`,
        // which outlives the queue's use of it (the device is reset first
        // on drop), and it is not touched until pop_used with this token.
        let token = unsafe { self.dev.rx.add(&[], &mut [&mut buf[..]]) }.map_err(
            EndpointError::device("posting a vsock rx buffer", self.waiter),
        )?;
        *self
            .bufs
            .rx_of_token
            .get_mut(usize::from(token))
            .ok_or(bogus_id("rx", token))? = Some(i);
        self.bufs.rx_added = self.bufs.rx_added.wrapping_add(1);
        self.rx_unkicked = true;
        self.kick_near_wrap(self.bufs.rx_added, RX_Q, RX_RING)
    }

    /// Posts event buffer `i`.
    fn post_ev(&mut self, i: usize) -> Result<(), EndpointError> {
        let Some(buf) = self.bufs.ev.get_mut(i) else {
            return Ok(());
        };
        // SAFETY: as for post_rx: owned by `self.bufs`, untouched until
        // pop_used with this token.
        let token = unsafe { self.dev.ev.add(&[], &mut [&mut buf[..]]) }.map_err(
            EndpointError::device("posting a vsock event buffer", self.waiter),
        )?;
        *self
            .bufs
            .ev_of_token
            .get_mut(usize::from(token))
            .ok_or(bogus_id("event", token))? = Some(i);
        Ok(())
    }

    /// Sends a header-only packet; `false` if no control buffer is free.
    fn send_ctrl_packet(&mut self, h: Hdr) -> Result<bool, EndpointError> {
        let Some(i) = self.bufs.ctrl_free.pop() else {
            return Ok(false);
        };
        let Some(buf) = self.bufs.ctrl.get_mut(i) else {
            return Ok(false);
        };
        *buf = h.to_bytes();
        // SAFETY: the buffer lives in `self.bufs` (a Vec never resized),
        // which outlives the queue's use of it, and it is not touched until
        // pop_used with this token.
        let token = unsafe { self.dev.tx.add(&[&buf[..]], &mut []) }
            .map_err(EndpointError::device("vsock tx", self.waiter))?;
        *self
            .bufs
            .tx_of_token
            .get_mut(usize::from(token))
            .ok_or(bogus_id("tx", token))? = Some(TxUse::Ctrl(i));
        self.tx_added()?;
        Ok(true)
    }

    /// After a transmit add: the wrap kick, the overdue clock.
    fn tx_added(&mut self) -> Result<(), EndpointError> {
        self.bufs.tx_added = self.bufs.tx_added.wrapping_add(1);
        self.kick_near_wrap(self.bufs.tx_added, TX_Q, TX_RING)?;
        if self.bufs.tx_count() == 1 {
            // The first in flight: the overdue clock starts now.
            self.last_tx = Instant::now();
        }
        Ok(())
    }

    fn header(&self, key: Key, op: u16, flags: u32, fwd_cnt: u32) -> Hdr {
        Hdr {
            src_cid: self.dev.guest_cid,
            dst_cid: HOST_CID,
            src_port: key.1,
            dst_port: key.0,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    /// Queues an RST for `key`; dropped (and counted) when too many wait.
    fn push_rst(&mut self, key: Key) {
        if self.rsts >= RST_MAX {
            self.c.rst_dropped += 1;
            tracing::debug!(?key, "vsock: too many resets waiting, one dropped");
            return;
        }
        self.ctrl.push_back(Ctrl::Rst(key));
        self.rsts += 1;
    }

    /// Puts `key` in the control queue if it owes something.
    fn due(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if conn.owes() && !conn.queued {
                conn.queued = true;
                self.ctrl.push_back(Ctrl::Conn(key));
            }
        }
    }

    /// Resets and forgets a connection (its local socket closes).
    fn reset(&mut self, key: Key) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if matches!(conn.phase, Phase::Connecting(_)) && conn.outgoing {
            self.c.to_host_refused += 1;
        }
        // Its queue entry (if any) becomes the reset: nothing else it owed
        // matters now, and the queue keeps one entry per connection.
        let slot = conn
            .queued
            .then(|| self.ctrl.iter_mut().find(|e| **e == Ctrl::Conn(key)))
            .flatten();
        match slot {
            Some(e) => {
                *e = Ctrl::Rst(key);
                self.rsts += 1;
            }
            None => self.push_rst(key),
        }
    }

    /// Sends what the control queue holds, as far as buffers allow.
    fn send_ctrl(&mut self) -> Result<(), EndpointError> {
        let mut sent = false;
        while let Some(&entry) = self.ctrl.front() {
            if self.bufs.ctrl_free.is_empty() {
                break;
            }
            let h = match entry {
                Ctrl::Rst(key) => {
                    self.ctrl.pop_front();
                    self.rsts = self.rsts.saturating_sub(1);
                    Hdr {
                        buf_alloc: 0,
                        ..self.header(key, OP_RST, 0, 0)
                    }
                }
                Ctrl::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        self.ctrl.pop_front();
                        continue;
                    };
                    let Some((op, flags)) = conn.next_ctrl(Instant::now()) else {
                        conn.queued = false;
                        self.ctrl.pop_front();
                        continue;
                    };
                    let fwd_cnt = conn.fwd_cnt;
                    self.header(key, op, flags, fwd_cnt)
                }
            };
            sent |= self.send_ctrl_packet(h)?;
        }
        if sent {
            self.dev.notify(TX_Q);
        }
        Ok(())
    }

    fn free_port(&mut self, peer_port: u32) -> Option<u32> {
        let span = u32::MAX - FIRST_EPHEMERAL_PORT;
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port =
                FIRST_EPHEMERAL_PORT + (p.saturating_sub(FIRST_EPHEMERAL_PORT) + 1) % span;
            if !self.conns.contains_key(&(peer_port, p)) {
                return Some(p);
            }
        }
        None
    }

    /// Whether new work may be taken on (resets are not piling up).
    fn calm(&self) -> bool {
        self.rsts < RST_HIGH
    }

    /// Accepts local clients and asks the host for a stream for each.
    fn accept_local(&mut self) -> Result<bool, EndpointError> {
        let mut more = false;
        for i in 0..self.listeners.len() {
            for n in 0..ACCEPTS_PER_ROUND {
                if !self.calm() {
                    return Ok(false);
                }
                let Some(l) = self.listeners.get(i) else {
                    break;
                };
                let port = l.port;
                let stream = match l.sock.accept() {
                    Ok((s, _)) => s,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "vsock: accept failed");
                        break;
                    }
                };
                if n + 1 == ACCEPTS_PER_ROUND {
                    more = true;
                }
                let local_port = match self.free_port(port) {
                    Some(p) if self.conns.len() < MAX_CONNECTIONS => p,
                    _ => {
                        tracing::warn!(port, "vsock: connection limit reached, client closed");
                        self.c.to_host_refused += 1;
                        continue;
                    }
                };
                stream
                    .set_nonblocking(true)
                    .map_err(EndpointError::io("vsock local socket"))?;
                let phase = Phase::Connecting(Instant::now() + CONNECT_TIMEOUT);
                let key = (port, local_port);
                self.conns.insert(key, Conn::new(stream, true, phase));
                self.due(key);
            }
        }
        Ok(more)
    }

    /// A host request for one of our ports.
    fn connection_request(&mut self, h: &Hdr) {
        let key = (h.src_port, h.dst_port);
        let stream = match self.forwards.get(&h.dst_port) {
            Some(_) if self.conns.len() >= MAX_CONNECTIONS => None,
            Some(path) => match connect_nonblocking(path) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::debug!(port = h.dst_port, path = %path.display(), error = %e, "vsock: forward refused");
                    None
                }
            },
            None => None,
        };
        let Some(stream) = stream else {
            self.c.from_host_refused += 1;
            self.push_rst(key);
            return;
        };
        let mut conn = Conn::new(stream, false, Phase::Accepting);
        conn.note(h);
        self.c.from_host += 1;
        self.conns.insert(key, conn);
        self.due(key);
    }

    /// Takes used buffers back from the transmit queue; true if any.
    fn poll_tx(&mut self) -> Result<bool, EndpointError> {
        let mut any = false;
        while let Some(token) = self.dev.tx.peek_used() {
            let what = self
                .bufs
                .tx_of_token
                .get_mut(usize::from(token))
                .and_then(Option::take)
                .ok_or(bogus_id("tx", token))?;
            let buf: &[u8] = match what {
                TxUse::Data(i, len) => self
                    .bufs
                    .data
                    .get(i)
                    .and_then(|b| b.get(..len))
                    .unwrap_or(&[]),
                TxUse::Ctrl(i) => self.bufs.ctrl.get(i).map_or(&[], |b| &b[..]),
            };
            // SAFETY: the same buffer (and length) as added with `token`.
            unsafe { self.dev.tx.pop_used(token, &[buf], &mut []) }
                .map_err(EndpointError::device("vsock tx completion", self.waiter))?;
            match what {
                TxUse::Data(i, _) => self.bufs.data_free.push(i),
                TxUse::Ctrl(i) => self.bufs.ctrl_free.push(i),
            }
            any = true;
        }
        if any {
            self.last_tx = Instant::now();
            self.tx_patience = REKICK_AFTER;
            self.last_device_activity = self.last_tx;
        }
        Ok(any)
    }

    /// Takes events from the device (a transport reset drops every
    /// connection).
    fn poll_events(&mut self) -> Result<(), EndpointError> {
        // Bounded: a device may use each reposted buffer again at once.
        for _ in 0..EV_RING {
            let Some(token) = self.dev.ev.peek_used() else {
                break;
            };
            let i = self
                .bufs
                .ev_of_token
                .get_mut(usize::from(token))
                .and_then(Option::take)
                .ok_or(bogus_id("event", token))?;
            let Some(buf) = self.bufs.ev.get_mut(i) else {
                return Err(bogus_id("event", token));
            };
            // SAFETY: the same buffer as posted with `token`.
            let len = unsafe { self.dev.ev.pop_used(token, &[], &mut [&mut buf[..]]) }
                .map_err(EndpointError::device("vsock event", self.waiter))?;
            let id = (len >= 4)
                .then(|| buf.first_chunk::<4>().copied())
                .flatten()
                .map(u32::from_le_bytes);
            match id {
                Some(EVENT_TRANSPORT_RESET) => {
                    tracing::info!(
                        connections = self.conns.len(),
                        "vsock: transport reset, every connection dropped"
                    );
                    // The device forgot them all: no RST to send either.
                    self.conns.clear();
                    self.ctrl.clear();
                    self.rsts = 0;
                    self.dev.guest_cid = self
                        .dev
                        .transport
                        .read_config_space::<u64>(0)
                        .map_err(EndpointError::device("vsock guest CID", self.waiter))?;
                }
                _ => tracing::debug!(len, ?id, "vsock: unknown event"),
            }
            self.post_ev(i)?;
            self.dev.notify(EV_Q);
        }
        Ok(())
    }

    /// Takes up to a batch of packets from the device. Returns (whether
    /// any came, whether more may be waiting).
    fn poll_rx(&mut self) -> Result<(bool, bool), EndpointError> {
        let mut taken = 0;
        while taken < RX_BATCH && self.calm() {
            let Some(token) = self.dev.rx.peek_used() else {
                break;
            };
            taken += 1;
            let i = self
                .bufs
                .rx_of_token
                .get_mut(usize::from(token))
                .and_then(Option::take)
                .ok_or(bogus_id("rx", token))?;
            // Out of the table while the packet is handled (the handler
            // needs `self`); back and reposted right after.
            let mut buf = std::mem::take(self.bufs.rx.get_mut(i).ok_or(bogus_id("rx", token))?);
            // SAFETY: the same buffer as posted with `token`.
            let used = unsafe { self.dev.rx.pop_used(token, &[], &mut [&mut buf[..]]) };
            let r = match used {
                Ok(len) => {
                    self.packet(&buf, len);
                    Ok(())
                }
                Err(e) => Err(EndpointError::device("vsock rx", self.waiter)(e)),
            };
            if let Some(slot) = self.bufs.rx.get_mut(i) {
                *slot = buf;
            }
            r?;
            self.post_rx(i)?;
        }
        if taken > 0 {
            self.dev.notify(RX_Q);
            self.last_device_activity = Instant::now();
            self.last_rx = self.last_device_activity;
        }
        Ok((taken > 0, taken == RX_BATCH))
    }

    /// One received packet: `len` bytes of `buf`, as the device says.
    fn packet(&mut self, buf: &[u8], len: u32) {
        let Some((h, body)) = parse_packet(buf, len) else {
            tracing::debug!(len, "vsock: packet with an impossible length");
            self.c.bad_packets += 1;
            return;
        };
        if h.dst_cid != self.dev.guest_cid
            || h.src_cid != HOST_CID
            || h.type_ != TYPE_STREAM
            || !(OP_REQUEST..=OP_CREDIT_REQUEST).contains(&h.op)
        {
            // Not for us, not from the host, or not a stream packet we
            // know: nothing to answer.
            tracing::debug!(?h, "vsock: packet ignored");
            self.c.bad_packets += 1;
            return;
        }
        let key = (h.src_port, h.dst_port);
        let Some(conn) = self.conns.get_mut(&key) else {
            match h.op {
                OP_REQUEST => self.connection_request(&h),
                OP_RST => {}
                // Anything else for a connection that does not exist (an
                // old one's packets in flight, typically) is answered with RST.
                _ => self.push_rst(key),
            }
            return;
        };
        conn.note(&h);
        match (h.op, conn.phase) {
            (OP_RESPONSE, Phase::Connecting(_)) => {
                conn.phase = Phase::Open;
                self.c.to_host += 1;
            }
            (OP_RST, phase) => {
                if matches!(phase, Phase::Connecting(_)) && conn.outgoing {
                    self.c.to_host_refused += 1;
                }
                // The local socket closes with it.
                if conn.queued {
                    self.ctrl.retain(|e| *e != Ctrl::Conn(key));
                }
                self.conns.remove(&key);
            }
            (OP_SHUTDOWN, Phase::Open) => {
                if h.flags & SHUTDOWN_SEND != 0 {
                    conn.peer_shut = true;
                }
                if h.flags & SHUTDOWN_RCV != 0 && !conn.peer_rcv_shut {
                    // Nobody will read: the local writer gets EPIPE.
                    conn.peer_rcv_shut = true;
                    let _ = conn.stream.shutdown(std::net::Shutdown::Read);
                }
            }
            (OP_RW, Phase::Open) => {
                if !deliver(conn, body, &mut self.c) {
                    self.reset(key);
                    return;
                }
                self.due(key);
            }
            (OP_CREDIT_UPDATE, _) => {}
            (OP_CREDIT_REQUEST, _) => {
                conn.owe_credit = true;
                self.due(key);
            }
            // A request for a live connection, a response we did not wait
            // for, data or a shutdown before the response: the peer broke
            // the protocol.
            _ => {
                self.c.bad_packets += 1;
                self.reset(key);
            }
        }
    }

    /// Moves data between each connection's local socket and the device.
    /// Returns whether some connection has more to do at once.
    fn pump(&mut self) -> Result<bool, EndpointError> {
        let mut keys: Vec<Key> = self.conns.keys().copied().collect();
        if !keys.is_empty() {
            self.round = self.round.wrapping_add(1);
            let n = self.round % keys.len();
            keys.rotate_left(n);
        }
        let mut more = false;
        for key in keys {
            more |= self.pump_one(key)?;
        }
        Ok(more)
    }

    fn pump_one(&mut self, key: Key) -> Result<bool, EndpointError> {
        let Some(conn) = self.conns.get_mut(&key) else {
            return Ok(false);
        };
        if let Phase::Connecting(deadline) = conn.phase {
            if Instant::now() >= deadline {
                tracing::debug!(?key, "vsock: connect not answered");
                self.reset(key);
            }
            return Ok(false);
        }
        // Peer data to the local socket.
        if conn.writable && !conn.to_local.is_empty() && flush(conn, &mut self.c).is_err() {
            self.reset(key);
            return Ok(false);
        }
        if conn.to_local.is_empty() && conn.peer_shut && !conn.local_write_shut {
            conn.local_write_shut = true;
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
        // Local data to the peer, never more than its credit.
        let step = self.read_local(key)?;
        self.due(key);
        match step {
            Step::More => return Ok(true),
            Step::Reset => {
                self.reset(key);
                return Ok(false);
            }
            Step::Idle => {}
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return Ok(false);
        };
        if conn.close_step(Instant::now()) {
            if conn.rst_deadline.is_some() {
                tracing::debug!(?key, "vsock: no RST from the host after our SHUTDOWN");
            }
            self.reset(key);
        } else {
            self.due(key);
        }
        Ok(false)
    }

    /// Reads the local socket of `key` into free transmit buffers and
    /// sends what it gives, a few packets at most, each within the peer's
    /// credit.
    fn read_local(&mut self, key: Key) -> Result<Step, EndpointError> {
        let mut reads = 0;
        loop {
            let Endpoint {
                conns,
                bufs,
                dev,
                waiter,
                c,
                ..
            } = self;
            let Some(conn) = conns.get_mut(&key) else {
                return Ok(Step::Idle);
            };
            if !(conn.readable && conn.wants_read()) {
                return Ok(Step::Idle);
            }
            let Some(&i) = bufs.data_free.last() else {
                // Back-pressure: the socket waits until a buffer frees.
                return Ok(Step::Idle);
            };
            if reads == READS_PER_ROUND {
                return Ok(Step::More);
            }
            reads += 1;
            let Some(buf) = bufs.data.get_mut(i) else {
                return Ok(Step::Idle);
            };
            let want = (conn.credit() as usize).min(MAX_PAYLOAD);
            let Some(room) = buf.get_mut(HDR_LEN..HDR_LEN + want) else {
                return Ok(Step::Idle);
            };
            match conn.stream.read(room) {
                Ok(0) => {
                    conn.local_eof = true;
                    conn.shut_owed |= SHUTDOWN_SEND;
                }
                Ok(n) => {
                    let n = n.min(want);
                    bufs.data_free.pop();
                    conn.fwd_told = conn.fwd_cnt;
                    conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                    c.bytes_to_host = c.bytes_to_host.saturating_add(n as u64);
                    let h = Hdr {
                        src_cid: dev.guest_cid,
                        dst_cid: HOST_CID,
                        src_port: key.1,
                        dst_port: key.0,
                        len: n as u32,
                        type_: TYPE_STREAM,
                        op: OP_RW,
                        flags: 0,
                        buf_alloc: BUF_ALLOC,
                        fwd_cnt: conn.fwd_cnt,
                    };
                    if let Some(hdr) = buf.get_mut(..HDR_LEN) {
                        hdr.copy_from_slice(&h.to_bytes());
                    }
                    let len = HDR_LEN + n;
                    let packet = buf.get(..len).unwrap_or(&[]);
                    // SAFETY: the buffer is a heap allocation owned by
                    // `self.bufs`, which outlives the queue's use of it, and
                    // it is not touched until pop_used with this token.
                    let token = unsafe { dev.tx.add(&[packet], &mut []) }
                        .map_err(EndpointError::device("vsock tx", waiter))?;
                    *bufs
                        .tx_of_token
                        .get_mut(usize::from(token))
                        .ok_or(bogus_id("tx", token))? = Some(TxUse::Data(i, len));
                    self.tx_added()?;
                    self.dev.notify(TX_Q);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(?key, error = %e, "vsock: local socket failed");
                    return Ok(Step::Reset);
                }
            }
        }
    }

    /// The descriptors to wait on, and what each stands for.
    fn wait_set(&self) -> (Vec<(RawFd, bool)>, Vec<Target>) {
        let mut fds = Vec::new();
        let mut targets = Vec::new();
        if self.calm() {
            for l in &self.listeners {
                fds.push((l.sock.as_raw_fd(), false));
                targets.push(Target::Listener);
            }
        }
        let can_send = !self.bufs.data_free.is_empty();
        for (&key, conn) in &self.conns {
            if can_send && !conn.readable && conn.wants_read() {
                fds.push((conn.stream.as_raw_fd(), false));
                targets.push(Target::Read(key));
            }
            if !conn.writable && !conn.to_local.is_empty() {
                fds.push((conn.stream.as_raw_fd(), true));
                targets.push(Target::Write(key));
            }
        }
        (fds, targets)
    }

    /// Kicks a queue whose device looks asleep (see the module notes).
    fn rekick(&mut self) -> Result<(), EndpointError> {
        if self.bufs.tx_in_flight() && self.last_tx.elapsed() >= self.tx_patience {
            self.waiter.kick(TX_Q).map_err(kick_err)?;
            self.c.tx_rekicks += 1;
            self.last_tx = Instant::now();
            // A device that stays silent is asked less and less often.
            self.tx_patience = (self.tx_patience * 2).min(WAIT_SLICE);
        }
        if self.rx_unkicked && self.last_rx.elapsed() >= REKICK_AFTER {
            // Harmless when spurious; rescues a notification of reposted
            // buffers that was lost.
            self.waiter.kick(RX_Q).map_err(kick_err)?;
            self.rx_unkicked = false;
        }
        Ok(())
    }

    /// How long the next wait may last.
    fn timeout(&self, more: bool) -> Duration {
        if more {
            return Duration::ZERO;
        }
        let mut t = WAIT_SLICE;
        if self.last_device_activity.elapsed() < ACTIVE_WINDOW || self.rx_unkicked {
            t = REKICK_AFTER;
        }
        if self.bufs.tx_in_flight() {
            let left = self.tx_patience.saturating_sub(self.last_tx.elapsed());
            t = t.min(left.max(Duration::from_millis(1)));
        }
        t
    }

    fn run(&mut self, stop: &Stop) -> Result<(), EndpointError> {
        for i in 0..RX_BUFS {
            self.post_rx(i)?;
        }
        self.dev.notify(RX_Q);
        for i in 0..EV_RING {
            self.post_ev(i)?;
        }
        self.dev.notify(EV_Q);
        let mut more = true;
        while !stop.stopped() {
            let (fds, targets) = self.wait_set();
            let ready = wait_events(&fds, self.waiter, &[RX_Q, TX_Q, EV_Q], self.timeout(more))?;
            if let Some(f) = self.waiter.failure() {
                return Err(EndpointError::Device {
                    what: "vsock transport",
                    detail: f,
                });
            }
            for (t, r) in targets.iter().zip(ready) {
                if !r {
                    continue;
                }
                match *t {
                    Target::Listener => {}
                    Target::Read(k) => {
                        if let Some(c) = self.conns.get_mut(&k) {
                            c.readable = true;
                        }
                    }
                    Target::Write(k) => {
                        if let Some(c) = self.conns.get_mut(&k) {
                            c.writable = true;
                        }
                    }
                }
            }
            // Our used_event stores (in pop_used) must be visible before we
            // look at the used rings again, or a completion could slip
            // between the look and the sleep unannounced.
            fence(Ordering::SeqCst);
            self.poll_events()?;
            self.poll_tx()?;
            let (_, rx_more) = self.poll_rx()?;
            self.send_ctrl()?;
            let accept_more = self.accept_local()?;
            let pump_more = self.pump()?;
            self.send_ctrl()?;
            self.rekick()?;
            more = rx_more || accept_more || pump_more;
        }
        Ok(())
    }

    /// Resets every connection and gives the resets (and transmits in
    /// flight) a moment to go out.
    fn close_all(&mut self) -> Result<(), EndpointError> {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.reset(key);
        }
        let deadline = Instant::now() + DRAIN;
        while Instant::now() < deadline {
            self.poll_tx()?;
            self.send_ctrl()?;
            if self.ctrl.is_empty() && !self.bufs.tx_in_flight() {
                break;
            }
            wait_events(&[], self.waiter, &[TX_Q], REKICK_AFTER)?;
            if self.waiter.failure().is_some() {
                break;
            }
            self.rekick()?;
        }
        Ok(())
    }
}

/// The header and payload of a received packet whose used length the
/// device says is `len`; `None` unless the buffer holds that much, `len`
/// holds a header, and the header's `len` fits in the rest.
fn parse_packet(buf: &[u8], len: u32) -> Option<(Hdr, &[u8])> {
    let used = usize::try_from(len).ok().filter(|&l| l <= buf.len())?;
    let avail = used.checked_sub(HDR_LEN)?;
    let h = Hdr::parse(buf)?;
    let n = usize::try_from(h.len).ok().filter(|&n| n <= avail)?;
    Some((h, buf.get(HDR_LEN..HDR_LEN.checked_add(n)?)?))
}

/// Hands a packet's payload to the local socket, keeping what it does not
/// take. `false`: the connection must be reset (no data expected now, the
/// peer exceeded our credit, or the local socket is gone).
fn deliver(conn: &mut Conn, body: &[u8], c: &mut Counters) -> bool {
    if conn.peer_shut {
        c.bad_packets += 1;
        return false;
    }
    if conn.to_local.len().saturating_add(body.len()) > BUF_ALLOC as usize {
        c.credit_violations += 1;
        return false;
    }
    let mut taken = 0;
    if conn.to_local.is_empty() && conn.writable && !body.is_empty() {
        match (&conn.stream).write(body) {
            Ok(n) => taken = n.min(body.len()),
            Err(e) if e.kind() == ErrorKind::WouldBlock => conn.writable = false,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
        conn.forwarded(taken, c);
    }
    if let Some(rest) = body.get(taken..) {
        conn.to_local.extend(rest);
    }
    true
}

/// Writes buffered peer data to the local socket until it is empty or full.
fn flush(conn: &mut Conn, c: &mut Counters) -> std::io::Result<()> {
    // Each round empties one of the two slices or stops on a full socket.
    for _ in 0..4 {
        let (front, _) = conn.to_local.as_slices();
        if front.is_empty() {
            break;
        }
        match (&conn.stream).write(front) {
            Ok(n) => {
                let n = n.min(front.len());
                conn.to_local.drain(..n);
                conn.forwarded(n, c);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                conn.writable = false;
                break;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if conn.to_local.is_empty() && conn.to_local.capacity() > MAX_PAYLOAD {
        // An idle connection does not keep a full window of memory.
        conn.to_local = VecDeque::new();
    }
    Ok(())
}

/// Runs the vsock endpoint until stopped.
pub fn run(link: DeviceLink, args: &EndpointArgs, stop: &Stop) -> Result<Report, EndpointError> {
    let mut listen = Vec::new();
    for s in &args.vsock_listen {
        listen.push(parse_port_path("--vsock-listen", s)?);
    }
    let mut forwards = HashMap::new();
    for s in &args.vsock_forward {
        let (port, path) = parse_port_path("--vsock-forward", s)?;
        if forwards.insert(port, path).is_some() {
            return Err(EndpointError::Option {
                option: "--vsock-forward",
                detail: format!("port {port} given twice"),
            });
        }
    }
    let DeviceLink {
        transport, waiter, ..
    } = link;
    let dev = VsockDev::new(transport);
    if let Some(f) = waiter.failure() {
        return Err(EndpointError::Device {
            what: "vsock set-up",
            detail: f,
        });
    }
    let dev = dev.map_err(|detail| EndpointError::Device {
        what: "vsock set-up",
        detail,
    })?;
    let mut listeners = Vec::new();
    for (port, path) in listen {
        let sock = bind(&path)?;
        println!("vsock: {} -> host port {port}", path.display());
        listeners.push(Listener { port, path, sock });
    }
    for (port, path) in &forwards {
        println!("vsock: port {port} -> {}", path.display());
    }
    let started = Instant::now();
    let mut ep = Endpoint {
        dev,
        bufs: Bufs::new(),
        waiter: &waiter,
        listeners,
        forwards,
        conns: HashMap::new(),
        next_port: FIRST_EPHEMERAL_PORT,
        c: Counters::default(),
        ctrl: VecDeque::new(),
        rsts: 0,
        last_device_activity: started,
        rx_unkicked: false,
        last_rx: started,
        last_tx: started,
        tx_patience: REKICK_AFTER,
        round: 0,
    };
    let result = ep.run(stop);
    for l in &ep.listeners {
        let _ = std::fs::remove_file(&l.path);
    }
    result?;
    // Tell the host about every connection still open.
    ep.close_all()?;
    let c = &ep.c;
    if c.rst_dropped > 0 {
        tracing::warn!(dropped = c.rst_dropped, "vsock: resets dropped");
    }
    Ok(Report {
        device: "vsock",
        detail: format!(
            "{:.1} s, {} connections to the host ({} refused), {} from the host ({} refused), \
             {} bytes to the host, {} bytes from the host, {} bad packets, {} credit violations, \
             {} tx re-kicks",
            started.elapsed().as_secs_f64(),
            c.to_host,
            c.to_host_refused,
            c.from_host,
            c.from_host_refused,
            c.bytes_to_host,
            c.bytes_from_host,
            c.bad_packets,
            c.credit_violations,
            c.tx_rekicks,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(len: u32) -> Hdr {
        Hdr {
            src_cid: HOST_CID,
            dst_cid: 3,
            src_port: 0x0102_0304,
            dst_port: 6000,
            len,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: SHUTDOWN_SEND,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: u32::MAX,
        }
    }

    /// A receive buffer holding `h` and `payload` bytes after it.
    fn packet_buf(h: Hdr, payload: usize) -> Vec<u8> {
        let mut b = vec![0u8; PKT_BUF];
        b[..HDR_LEN].copy_from_slice(&h.to_bytes());
        for (i, x) in b[HDR_LEN..HDR_LEN + payload].iter_mut().enumerate() {
            *x = i as u8;
        }
        b
    }

    #[test]
    fn header_is_44_little_endian_bytes_at_the_spec_offsets() {
        let b = hdr(5).to_bytes();
        assert_eq!(b[0..8], 2u64.to_le_bytes());
        assert_eq!(b[8..16], 3u64.to_le_bytes());
        assert_eq!(b[16..20], [4, 3, 2, 1]);
        assert_eq!(b[20..24], 6000u32.to_le_bytes());
        assert_eq!(b[24..28], 5u32.to_le_bytes());
        assert_eq!(b[28..30], [1, 0]);
        assert_eq!(b[30..32], [5, 0]);
        assert_eq!(b[32..36], [2, 0, 0, 0]);
        assert_eq!(b[36..40], BUF_ALLOC.to_le_bytes());
        assert_eq!(b[40..44], [0xff; 4]);
        assert_eq!(Hdr::parse(&b), Some(hdr(5)));
        assert_eq!(Hdr::parse(&b[..43]), None);
    }

    #[test]
    fn received_lengths_the_buffer_cannot_back_are_refused() {
        let b = packet_buf(hdr(100), 100);
        let (h, body) = parse_packet(&b, (HDR_LEN + 100) as u32).unwrap();
        assert_eq!(h, hdr(100));
        assert_eq!(body.len(), 100);
        assert_eq!(body[99], 99);
        // More used bytes than the header claims: the header's len counts.
        assert_eq!(parse_packet(&b, PKT_BUF as u32).unwrap().1.len(), 100);
        // A used length beyond the buffer, or shorter than a header.
        assert!(parse_packet(&b, PKT_BUF as u32 + 1).is_none());
        assert!(parse_packet(&b, u32::MAX).is_none());
        assert!(parse_packet(&b, HDR_LEN as u32 - 1).is_none());
        assert!(parse_packet(&b, 0).is_none());
        // A header len beyond what the device wrote, or beyond the buffer.
        assert!(parse_packet(&b, (HDR_LEN + 99) as u32).is_none());
        let b = packet_buf(hdr(u32::MAX), 0);
        assert!(parse_packet(&b, PKT_BUF as u32).is_none());
        let b = packet_buf(hdr(MAX_PAYLOAD as u32 + 1), 0);
        assert!(parse_packet(&b, PKT_BUF as u32).is_none());
        let b = packet_buf(hdr(MAX_PAYLOAD as u32), MAX_PAYLOAD);
        assert_eq!(
            parse_packet(&b, PKT_BUF as u32).unwrap().1.len(),
            MAX_PAYLOAD
        );
    }

    #[test]
    fn credit_wraps_and_never_exceeds_what_the_peer_offered() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a, true, Phase::Open);
        // Counters near the wrap, as after 4 GiB on one connection.
        conn.peer_buf_alloc = 1000;
        conn.peer_fwd_cnt = u32::MAX - 99;
        conn.tx_cnt = 200; // 300 in flight across the wrap
        assert_eq!(conn.credit(), 700);
        // A peer that claims to have forwarded more than was sent, or
        // offers less than is in flight: no credit, no overflow.
        conn.peer_fwd_cnt = 500;
        assert_eq!(conn.credit(), 0);
        conn.peer_fwd_cnt = u32::MAX - 99;
        conn.peer_buf_alloc = 10;
        assert_eq!(conn.credit(), 0);
        assert!(!conn.wants_read());
    }

    #[test]
    fn a_clean_close_asks_the_peer_for_its_rst_and_resets_only_when_it_is_overdue() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a, false, Phase::Accepting);
        let t0 = Instant::now();
        assert_eq!(conn.next_ctrl(t0), Some((OP_RESPONSE, 0)));
        assert_eq!(conn.next_ctrl(t0), None);
        // Local EOF (as read_local sees it): SHUTDOWN(SEND), and the peer
        // may still send.
        conn.local_eof = true;
        conn.shut_owed |= SHUTDOWN_SEND;
        assert!(!conn.close_step(t0));
        assert_eq!(conn.next_ctrl(t0), Some((OP_SHUTDOWN, SHUTDOWN_SEND)));
        assert!(!conn.close_step(t0));
        assert!(!conn.owes());
        // The peer's SHUTDOWN(SEND) with its data not yet delivered locally.
        conn.peer_shut = true;
        conn.to_local.extend([1u8, 2, 3]);
        assert!(!conn.close_step(t0));
        assert!(!conn.owes());
        // Both directions done. The peer may still hold data of ours it has
        // not written out: not an RST, but SHUTDOWN both ways, and the
        // peer's RST ends the connection.
        conn.to_local.clear();
        assert!(!conn.close_step(t0));
        assert_eq!(
            conn.next_ctrl(t0),
            Some((OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND))
        );
        assert_eq!(conn.next_ctrl(t0), None);
        assert!(!conn.close_step(t0 + CLOSE_TIMEOUT / 2));
        assert!(!conn.owes());
        // No RST in time: we reset it.
        assert!(conn.close_step(t0 + CLOSE_TIMEOUT));

        // A peer that shut both ways waits for our RST: it gets it once
        // its data is delivered, whatever we still had to send.
        let (a, _b) = UnixStream::pair().unwrap();
        let mut conn = Conn::new(a, true, Phase::Open);
        conn.peer_shut = true;
        conn.peer_rcv_shut = true;
        conn.to_local.extend([1u8]);
        assert!(!conn.close_step(t0));
        conn.to_local.clear();
        assert!(conn.close_step(t0));
    }

    #[test]
    fn a_peer_beyond_our_credit_is_refused_and_what_fits_is_kept() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut conn = Conn::new(a, false, Phase::Open);
        let mut c = Counters::default();
        // The local socket is not read: everything lands in its kernel
        // buffer or ours, and ours stops at BUF_ALLOC.
        conn.writable = false;
        let chunk = vec![7u8; MAX_PAYLOAD];
        for _ in 0..BUF_ALLOC as usize / MAX_PAYLOAD {
            assert!(deliver(&mut conn, &chunk, &mut c));
        }
        assert_eq!(conn.to_local.len(), BUF_ALLOC as usize);
        assert!(!deliver(&mut conn, &[1], &mut c));
        assert_eq!(c.credit_violations, 1);
        assert_eq!(conn.to_local.len(), BUF_ALLOC as usize);
        // Once the local socket takes data, the freed credit is owed back.
        conn.writable = true;
        flush(&mut conn, &mut c).unwrap();
        let taken = BUF_ALLOC as usize - conn.to_local.len();
        assert!(taken > 0);
        assert_eq!(c.bytes_from_host, taken as u64);
        assert_eq!(conn.fwd_cnt, taken as u32);
        assert_eq!(conn.owe_credit, taken as u32 >= CREDIT_UPDATE_AFTER);
        let mut got = vec![0u8; taken];
        b.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|&x| x == 7));
    }
}
