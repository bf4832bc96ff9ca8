//! vsock → Unix sockets, both ways:
//!
//! * `--vsock-listen PORT:PATH`: a listener on the Unix socket PATH; every
//!   local connection becomes a stream to the host (CID 2) port PORT.
//! * `--vsock-forward PORT:PATH`: this VM listens on vsock port PORT; a
//!   host connection to it is carried to a new connection to PATH.
//!
//! Built on virtio-drivers' [`VirtIOSocket`] with our own connection table
//! rather than its `VsockConnectionManager`, which keeps the peer's credit
//! private (so we could not size reads from a local socket to it), answers
//! every SHUTDOWN with RST once its buffer drains (no half-close: a local
//! client that shuts its write side would lose the reply), accepts every
//! request on a listened port before we know whether the local socket
//! exists, and fails the whole device (not the one connection) on a peer
//! that exceeds its credit.
//!
//! Flow control: a local socket is read only while the peer has credit, at
//! most that much; data from the peer that the local socket does not take
//! at once waits in a per-connection buffer, which our advertised
//! `buf_alloc` bounds (a peer that sends beyond it is reset), and credit
//! returns to the peer only as the local socket takes the data. So a local
//! reader that stops reading stops the peer, and memory stays bounded at
//! [`MAX_CONNECTIONS`] × [`BUF_ALLOC`].
//!
//! Waiting: one `poll` on the listeners, the sockets that need something
//! and the queues' call doorbells. `VirtIOSocket` sends by spinning on the
//! tx used ring until the device answers (every packet, data or control);
//! a watchdog thread re-kicks the tx queue when a send is overdue (the lost
//! notification race of virtio-drivers 0.13) and stops the frontend if one
//! never ends, since the spin itself cannot be interrupted.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_msg_driver::{BounceHal, CompletionWaiter, MsgTransport};
use virtio_drivers::device::socket::{
    ConnectionInfo, DisconnectReason, SocketError, StreamShutdown, VirtIOSocket, VsockAddr,
    VsockEvent, VsockEventType, VMADDR_CID_HOST,
};

use super::{
    parse_port_path, wait_events, DeviceLink, EndpointArgs, EndpointError, Report, Stop, WAIT_SLICE,
};

/// Size of a virtio-vsock packet header.
const HDR_LEN: usize = 44;
/// Largest payload of one packet (the backend's limit too).
const MAX_PAYLOAD: usize = 64 * 1024;
/// Each rx buffer takes a header and a full payload: fewer, larger packets.
const RX_BUF: usize = HDR_LEN + MAX_PAYLOAD;
/// Receive buffer advertised per connection: the most peer data held for a
/// local socket that does not read.
const BUF_ALLOC: u32 = 256 * 1024;
/// Live connections, both directions together.
const MAX_CONNECTIONS: usize = 128;
/// Time the host has to answer a connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// First local port of connections we open.
const FIRST_EPHEMERAL_PORT: u32 = 49152;
/// Packets taken from the device per round, before local sockets get a turn.
const RX_BATCH: usize = 64;
/// Packets read from one local socket per round (fairness).
const READS_PER_ROUND: usize = 4;
/// Local connections accepted per listener per round.
const ACCEPTS_PER_ROUND: usize = 16;
/// While the device was active this recently, wait in short slices and
/// kick the rx queue when nothing came (a lost notification).
const ACTIVE_WINDOW: Duration = Duration::from_millis(50);
/// The short slice.
const REKICK_AFTER: Duration = Duration::from_millis(2);
/// A send that has not completed after this long is declared hung.
const TX_HUNG: Duration = Duration::from_secs(10);

type Socket = VirtIOSocket<BounceHal, MsgTransport, RX_BUF>;

/// A connection is known by (peer port, our port); the peer is always the host.
type Key = (u32, u32);

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
}

struct Conn {
    info: ConnectionInfo,
    stream: UnixStream,
    /// Opened by us (a local client) rather than by the host.
    outgoing: bool,
    /// Set while we wait for the host's RESPONSE.
    connecting_until: Option<Instant>,
    /// Peer data the local socket has not taken yet (at most BUF_ALLOC).
    to_local: VecDeque<u8>,
    /// The peer sent SHUTDOWN: no more data from it.
    peer_shut: bool,
    local_write_shut: bool,
    /// The local socket said EOF; SHUTDOWN(SEND) went to the peer.
    local_eof: bool,
    /// Last readiness seen (level: cleared on WouldBlock).
    readable: bool,
    writable: bool,
    /// Credit mirror (ConnectionInfo keeps its own private).
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    /// Bytes of peer data the local socket took, and what the peer last heard.
    fwd_cnt: u32,
    fwd_told: u32,
}

impl Conn {
    fn new(info: ConnectionInfo, stream: UnixStream, outgoing: bool) -> Self {
        Self {
            info,
            stream,
            outgoing,
            connecting_until: None,
            to_local: VecDeque::new(),
            peer_shut: false,
            local_write_shut: false,
            local_eof: false,
            readable: true,
            writable: true,
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

    fn note(&mut self, event: &VsockEvent) {
        self.info.update_for_event(event);
        self.peer_buf_alloc = event.buffer_status.buffer_allocation;
        self.peer_fwd_cnt = event.buffer_status.forward_count;
    }

    fn wants_read(&self) -> bool {
        self.connecting_until.is_none() && !self.local_eof && self.credit() > 0
    }

    /// The local socket took `n` bytes of peer data.
    fn forwarded(&mut self, n: usize, counters: &mut Counters) {
        self.info.done_forwarding(n);
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
        counters.bytes_from_host = counters.bytes_from_host.saturating_add(n as u64);
    }
}

/// Shared with the tx watchdog: odd while a send is in progress.
#[derive(Default)]
struct TxState {
    seq: AtomicU64,
    done: AtomicBool,
    rekicks: AtomicU64,
    hung: AtomicBool,
}

/// Re-kicks the tx queue while one send is overdue; see the module notes.
fn watchdog(tx: &TxState, waiter: &CompletionWaiter, stop: &Stop) {
    let mut last = 0u64;
    let mut overdue_since: Option<Instant> = None;
    while !tx.done.load(Ordering::Acquire) {
        let seq = tx.seq.load(Ordering::Acquire);
        let in_send = seq % 2 == 1;
        if in_send && seq == last {
            let since = *overdue_since.get_or_insert_with(Instant::now);
            tx.rekicks.fetch_add(1, Ordering::Relaxed);
            let _ = waiter.kick(1);
            if since.elapsed() >= TX_HUNG && !tx.hung.swap(true, Ordering::AcqRel) {
                tracing::error!("vsock: the device has not completed a send in {TX_HUNG:?}");
                stop.stop();
            }
        } else {
            overdue_since = None;
        }
        last = seq;
        // Sends take tens of microseconds: a tick that sees one in progress
        // looks again soon; otherwise rarely.
        std::thread::park_timeout(if in_send {
            REKICK_AFTER
        } else {
            Duration::from_millis(20)
        });
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

/// Runs one tx operation bracketed for the watchdog (odd `seq` while in
/// it); refuses when the transport is already broken, where the driver's
/// send would spin for ever. The outer error is the refusal.
fn tx_raw<T>(
    tx: &TxState,
    waiter: &CompletionWaiter,
    what: &'static str,
    op: impl FnOnce() -> virtio_drivers::Result<T>,
) -> Result<virtio_drivers::Result<T>, EndpointError> {
    if let Some(f) = waiter.failure() {
        return Err(EndpointError::Device {
            what,
            detail: format!("transport: {f}"),
        });
    }
    tx.seq.fetch_add(1, Ordering::AcqRel);
    let r = op();
    tx.seq.fetch_add(1, Ordering::AcqRel);
    Ok(r)
}

/// What a local descriptor in the wait set stands for.
#[derive(Clone, Copy)]
enum Target {
    /// Listeners are accepted from on every round anyway.
    Listener,
    Read(Key),
    Write(Key),
}

struct Endpoint<'a> {
    driver: Socket,
    waiter: &'a CompletionWaiter,
    tx: &'a TxState,
    guest_cid: u64,
    listeners: Vec<Listener>,
    forwards: HashMap<u32, PathBuf>,
    conns: HashMap<Key, Conn>,
    next_port: u32,
    c: Counters,
    scratch: Vec<u8>,
    last_device_activity: Instant,
}

impl Endpoint<'_> {
    /// Runs one tx operation (see [`tx_raw`]).
    fn tx_op(
        &mut self,
        what: &'static str,
        op: impl FnOnce(&mut Socket) -> virtio_drivers::Result,
    ) -> Result<(), EndpointError> {
        let driver = &mut self.driver;
        tx_raw(self.tx, self.waiter, what, || op(driver))?
            .map_err(EndpointError::device(what, self.waiter))
    }

    /// Sends RST for `key` (known or not).
    fn rst(&mut self, peer_port: u32, local_port: u32) -> Result<(), EndpointError> {
        let info = ConnectionInfo::new(
            VsockAddr {
                cid: VMADDR_CID_HOST,
                port: peer_port,
            },
            local_port,
        );
        self.tx_op("vsock RST", |d| d.force_close(&info))
    }

    /// Resets and forgets a connection (its local socket closes).
    fn reset(&mut self, key: Key) -> Result<(), EndpointError> {
        if let Some(conn) = self.conns.remove(&key) {
            if conn.connecting_until.is_some() && conn.outgoing {
                self.c.to_host_refused += 1;
            }
            self.rst(key.0, key.1)?;
        }
        Ok(())
    }

    fn free_port(&mut self, peer_port: u32) -> Option<u32> {
        let span = u32::MAX - FIRST_EPHEMERAL_PORT;
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_port;
            self.next_port = FIRST_EPHEMERAL_PORT + (p - FIRST_EPHEMERAL_PORT + 1) % span;
            if !self.conns.contains_key(&(peer_port, p)) {
                return Some(p);
            }
        }
        None
    }

    /// Accepts local clients and asks the host for a stream for each.
    fn accept_local(&mut self) -> Result<bool, EndpointError> {
        let mut more = false;
        for i in 0..self.listeners.len() {
            for n in 0..ACCEPTS_PER_ROUND {
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
                let mut info = ConnectionInfo::new(
                    VsockAddr {
                        cid: VMADDR_CID_HOST,
                        port,
                    },
                    local_port,
                );
                info.buf_alloc = BUF_ALLOC;
                self.tx_op("vsock connect", |d| d.connect(&info))?;
                let mut conn = Conn::new(info, stream, true);
                conn.connecting_until = Some(Instant::now() + CONNECT_TIMEOUT);
                self.conns.insert((port, local_port), conn);
            }
        }
        Ok(more)
    }

    /// A host request for one of our ports.
    fn connection_request(&mut self, event: &VsockEvent) -> Result<(), EndpointError> {
        let (peer, port) = (event.source.port, event.destination.port);
        let stream = match self.forwards.get(&port) {
            Some(_) if self.conns.len() >= MAX_CONNECTIONS => None,
            Some(path) => match connect_nonblocking(path) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::debug!(port, path = %path.display(), error = %e, "vsock: forward refused");
                    None
                }
            },
            None => None,
        };
        let Some(stream) = stream else {
            self.c.from_host_refused += 1;
            return self.rst(peer, port);
        };
        let mut info = ConnectionInfo::new(event.source, port);
        info.buf_alloc = BUF_ALLOC;
        let mut conn = Conn::new(info, stream, false);
        conn.note(event);
        self.tx_op("vsock accept", |d| d.accept(&conn.info))?;
        self.c.from_host += 1;
        self.conns.insert((peer, port), conn);
        Ok(())
    }

    /// Takes up to a batch of packets from the device.
    fn poll_device(&mut self) -> Result<(bool, bool), EndpointError> {
        let mut any = false;
        let mut taken = 0;
        while taken < RX_BATCH {
            taken += 1;
            // Data is handed to the local socket inside the handler, while
            // the packet is still in the driver's rx buffer.
            let mut reset_after: Option<Key> = None;
            let (guest_cid, conns, c) = (self.guest_cid, &mut self.conns, &mut self.c);
            let polled = self.driver.poll(|event, body| {
                if let VsockEventType::Received { .. } = event.event_type {
                    let key = (event.source.port, event.destination.port);
                    if event.destination.cid == guest_cid && event.source.cid == VMADDR_CID_HOST {
                        if let Some(conn) = conns.get_mut(&key) {
                            if !deliver(conn, body, c) {
                                reset_after = Some(key);
                            }
                        }
                    }
                }
                Ok(Some(event))
            });
            let event = match polled {
                Ok(Some(e)) => e,
                Ok(None) => break,
                // A packet the driver could not parse (recycled all the
                // same): the device's problem, not a reason to stop.
                Err(virtio_drivers::Error::SocketDeviceError(e)) => {
                    tracing::debug!(error = %e, "vsock: bad packet");
                    self.c.bad_packets += 1;
                    any = true;
                    continue;
                }
                Err(e) => return Err(EndpointError::device("vsock rx", self.waiter)(e)),
            };
            any = true;
            if let Some(key) = reset_after {
                self.reset(key)?;
                continue;
            }
            self.handle(event)?;
        }
        if any {
            self.last_device_activity = Instant::now();
        }
        Ok((any, taken == RX_BATCH))
    }

    fn handle(&mut self, event: VsockEvent) -> Result<(), EndpointError> {
        if event.destination.cid != self.guest_cid || event.source.cid != VMADDR_CID_HOST {
            // Not for us, or not from the host: nothing to answer.
            self.c.bad_packets += 1;
            return Ok(());
        }
        let key = (event.source.port, event.destination.port);
        let Some(conn) = self.conns.get_mut(&key) else {
            return match event.event_type {
                VsockEventType::ConnectionRequest => self.connection_request(&event),
                VsockEventType::Disconnected {
                    reason: DisconnectReason::Reset,
                } => Ok(()),
                // Anything else for a connection that does not exist (an
                // old one's packets in flight, typically) is answered with RST.
                _ => self.rst(key.0, key.1),
            };
        };
        conn.note(&event);
        match event.event_type {
            VsockEventType::Connected if conn.connecting_until.is_some() => {
                conn.connecting_until = None;
                self.c.to_host += 1;
            }
            VsockEventType::Disconnected {
                reason: DisconnectReason::Reset,
            } => {
                if conn.connecting_until.is_some() && conn.outgoing {
                    self.c.to_host_refused += 1;
                }
                // The local socket closes with it.
                self.conns.remove(&key);
            }
            VsockEventType::Disconnected {
                reason: DisconnectReason::Shutdown,
            } if conn.connecting_until.is_none() => conn.peer_shut = true,
            VsockEventType::Received { .. } | VsockEventType::CreditUpdate => {}
            VsockEventType::CreditRequest => {
                let info = conn.info.clone();
                conn.fwd_told = conn.fwd_cnt;
                self.tx_op("vsock credit update", |d| d.credit_update(&info))?;
            }
            // A request for a live connection, a response we did not wait
            // for, a shutdown before the response: the peer broke the
            // protocol.
            _ => {
                self.c.bad_packets += 1;
                self.reset(key)?;
            }
        }
        Ok(())
    }

    /// Moves data between each connection's local socket and the device.
    /// Returns whether some connection has more to do at once.
    fn pump(&mut self) -> Result<bool, EndpointError> {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
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
        if let Some(deadline) = conn.connecting_until {
            if Instant::now() >= deadline {
                tracing::debug!(?key, "vsock: connect not answered");
                self.reset(key)?;
            }
            return Ok(false);
        }
        // Peer data to the local socket.
        if conn.writable && !conn.to_local.is_empty() && flush(conn, &mut self.c).is_err() {
            return self.reset(key).map(|()| false);
        }
        if conn.to_local.is_empty() && conn.peer_shut && !conn.local_write_shut {
            conn.local_write_shut = true;
            let _ = conn.stream.shutdown(std::net::Shutdown::Write);
        }
        // Credit back to the peer once half its window was freed (every
        // packet we send carries it too).
        if conn.fwd_cnt.wrapping_sub(conn.fwd_told) >= BUF_ALLOC / 2 {
            conn.fwd_told = conn.fwd_cnt;
            let info = conn.info.clone();
            self.tx_op("vsock credit update", |d| d.credit_update(&info))?;
        }
        // Local data to the peer, never more than its credit.
        match self.read_local(key)? {
            Step::More => return Ok(true),
            Step::Reset => return self.reset(key).map(|()| false),
            Step::Idle => {}
        }
        let Some(conn) = self.conns.get(&key) else {
            return Ok(false);
        };
        if conn.local_eof && conn.peer_shut && conn.to_local.is_empty() {
            // Both sides are done: RST ends it for the peer.
            self.conns.remove(&key);
            self.rst(key.0, key.1)?;
        }
        Ok(false)
    }

    /// Reads the local socket of `key` and sends what it gives, a few
    /// packets at most, each within the peer's credit.
    fn read_local(&mut self, key: Key) -> Result<Step, EndpointError> {
        let Endpoint {
            conns,
            scratch,
            driver,
            tx,
            waiter,
            c,
            ..
        } = self;
        let Some(conn) = conns.get_mut(&key) else {
            return Ok(Step::Idle);
        };
        let mut reads = 0;
        while conn.readable && conn.wants_read() {
            if reads == READS_PER_ROUND {
                return Ok(Step::More);
            }
            reads += 1;
            let want = (conn.credit() as usize).min(MAX_PAYLOAD);
            let buf = scratch.get_mut(..want).unwrap_or(&mut []);
            match conn.stream.read(buf) {
                Ok(0) => {
                    conn.local_eof = true;
                    conn.fwd_told = conn.fwd_cnt;
                    let info = &conn.info;
                    tx_raw(tx, waiter, "vsock shutdown", || {
                        driver.shutdown_with_hints(info, StreamShutdown::SEND)
                    })?
                    .map_err(EndpointError::device("vsock shutdown", waiter))?;
                }
                Ok(n) => {
                    let n = n.min(want);
                    conn.fwd_told = conn.fwd_cnt;
                    let data = scratch.get(..n).unwrap_or(&[]);
                    // Our credit mirror says it fits; the driver checks again.
                    let info = &mut conn.info;
                    match tx_raw(tx, waiter, "vsock send", || driver.send(data, info))? {
                        Ok(()) => {
                            conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                            c.bytes_to_host = c.bytes_to_host.saturating_add(n as u64);
                        }
                        Err(virtio_drivers::Error::SocketDeviceError(
                            SocketError::InsufficientBufferSpaceInPeer,
                        )) => {
                            // Cannot happen with an honest mirror; the data
                            // was read, so the stream is broken.
                            tracing::warn!(?key, "vsock: credit mirror disagrees with the driver");
                            return Ok(Step::Reset);
                        }
                        Err(e) => return Err(EndpointError::device("vsock send", waiter)(e)),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(?key, error = %e, "vsock: local socket failed");
                    return Ok(Step::Reset);
                }
            }
        }
        Ok(Step::Idle)
    }

    /// The descriptors to wait on, and what each stands for.
    fn wait_set(&self) -> (Vec<(RawFd, bool)>, Vec<Target>) {
        let mut fds = Vec::new();
        let mut targets = Vec::new();
        for l in &self.listeners {
            fds.push((l.sock.as_raw_fd(), false));
            targets.push(Target::Listener);
        }
        for (&key, conn) in &self.conns {
            if !conn.readable && conn.wants_read() {
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

    fn run(&mut self, stop: &Stop) -> Result<(), EndpointError> {
        let mut more = true;
        while !stop.stopped() {
            let (fds, targets) = self.wait_set();
            let recent = self.last_device_activity.elapsed() < ACTIVE_WINDOW;
            let timeout = if more {
                Duration::ZERO
            } else if recent {
                REKICK_AFTER
            } else {
                WAIT_SLICE
            };
            let ready = wait_events(&fds, self.waiter, &[0, 1, 2], timeout)?;
            let mut local = false;
            for (t, r) in targets.iter().zip(ready) {
                if !r {
                    continue;
                }
                local = true;
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
            let (device, rx_more) = self.poll_device()?;
            if !device && !local && !more && recent {
                // Quiet for a short slice right after activity: in case the
                // notification of our recycled rx buffers was lost, tell
                // the device again (harmless when spurious).
                let _ = self.waiter.kick(0);
            }
            let accept_more = self.accept_local()?;
            let pump_more = self.pump()?;
            more = rx_more || accept_more || pump_more;
        }
        Ok(())
    }
}

/// Hands a packet's payload to the local socket, keeping what it does not
/// take. `false`: the connection must be reset (no data expected now, the
/// peer exceeded our credit, or the local socket is gone).
fn deliver(conn: &mut Conn, body: &[u8], c: &mut Counters) -> bool {
    if conn.connecting_until.is_some() || conn.peer_shut {
        c.bad_packets += 1;
        return false;
    }
    if conn.to_local.len().saturating_add(body.len()) > BUF_ALLOC as usize {
        c.credit_violations += 1;
        return false;
    }
    let mut taken = 0;
    if conn.to_local.is_empty() && conn.writable {
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

/// Stops the watchdog when the endpoint ends, however it ends.
struct WatchdogGuard<'a> {
    tx: &'a TxState,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for WatchdogGuard<'_> {
    fn drop(&mut self) {
        self.tx.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
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
    // virtio-drivers panics on some impossible device answers (a used id
    // outside the ring, for one): that is a device error here, not a
    // crash of the frontend.
    let waiter = link.waiter.clone();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        serve(link, listen, forwards, stop)
    })) {
        Ok(r) => r,
        Err(p) => Err(EndpointError::Device {
            what: "vsock driver panicked",
            detail: match waiter.failure() {
                Some(f) => format!("{} (transport: {f})", panic_text(&p)),
                None => panic_text(&p),
            },
        }),
    }
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn serve(
    link: DeviceLink,
    listen: Vec<(u32, PathBuf)>,
    forwards: HashMap<u32, PathBuf>,
    stop: &Stop,
) -> Result<Report, EndpointError> {
    let DeviceLink {
        transport, waiter, ..
    } = link;
    let driver = Socket::new(transport);
    if let Some(f) = waiter.failure() {
        return Err(EndpointError::Device {
            what: "VirtIOSocket set-up",
            detail: f,
        });
    }
    let driver = driver.map_err(EndpointError::device("VirtIOSocket set-up", &waiter))?;
    let guest_cid = driver.guest_cid();
    let mut listeners = Vec::new();
    for (port, path) in listen {
        let sock = bind(&path)?;
        println!("vsock: {} -> host port {port}", path.display());
        listeners.push(Listener { port, path, sock });
    }
    for (port, path) in &forwards {
        println!("vsock: port {port} -> {}", path.display());
    }
    let tx = Arc::new(TxState::default());
    let _guard = WatchdogGuard {
        tx: &tx,
        thread: Some({
            let (tx, waiter, stop) = (tx.clone(), waiter.clone(), stop.clone());
            std::thread::Builder::new()
                .name("vsock-tx-watchdog".into())
                .spawn(move || watchdog(&tx, &waiter, &stop))
                .map_err(EndpointError::io("vsock watchdog thread"))?
        }),
    };
    let started = Instant::now();
    let mut ep = Endpoint {
        driver,
        waiter: &waiter,
        tx: &tx,
        guest_cid,
        listeners,
        forwards,
        conns: HashMap::new(),
        next_port: FIRST_EPHEMERAL_PORT,
        c: Counters::default(),
        scratch: vec![0; MAX_PAYLOAD],
        last_device_activity: started,
    };
    let result = ep.run(stop);
    for l in &ep.listeners {
        let _ = std::fs::remove_file(&l.path);
    }
    result?;
    // Tell the host about every connection still open.
    let keys: Vec<Key> = ep.conns.keys().copied().collect();
    for key in keys {
        ep.reset(key)?;
    }
    let c = &ep.c;
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
            tx.rekicks.load(Ordering::Relaxed),
        ),
    })
}
