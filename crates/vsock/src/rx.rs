//! The receive queue: packets for the guest, and the host side's event
//! loop. `ready()` polls the epoll set without blocking (new host clients,
//! their CONNECT lines, readable or writable host sockets, the tx handler's
//! wake-ups) and picks the next packet; `handle_chain` writes it.
//!
//! The packet is chosen before a chain is popped and stays chosen until a
//! usable chain comes: a chain that cannot take it (too small, readable
//! descriptors, memory not shared) is used with length 0 and counted, and
//! the packet goes into the next one. Host data is read straight into that
//! chain's packet, at most the guest's credit, so no host data is ever held
//! by the device.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_device::{walk_chain, Chain, ChainError, DeviceMemory, QueueHandler, Segment};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use crate::conn::{Client, Conn, Key, Phase, Shared, State, TOKEN_LISTENER, TOKEN_WAKE};
use crate::packet::*;
use crate::{sys, CONNECT_LINE_MAX, MAX_PAYLOAD, MAX_PENDING_CLIENTS};

/// epoll events handled per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 64;
/// `epoll_wait` calls per `ready()`: what is left wakes the worker again.
const WAITS_PER_POLL: usize = 4;
/// Host clients accepted per listener event.
const ACCEPTS_PER_EVENT: usize = 32;
/// How long the listener rests after accept() failed for want of resources.
const LISTENER_PAUSE: Duration = Duration::from_millis(100);

const EV_IN: u32 = libc::EPOLLIN as u32;
const EV_OUT: u32 = libc::EPOLLOUT as u32;
const EV_HUP_ERR: u32 = (libc::EPOLLHUP | libc::EPOLLERR) as u32;

/// The packet the next chain gets.
#[derive(Debug, Clone, Copy)]
enum Next {
    /// A header-only packet, built already.
    Control(Header),
    /// Whatever the host socket of this connection has (data, EOF, error).
    Data(Key),
}

/// The rx queue handler.
#[derive(Debug)]
pub(crate) struct RxQueue {
    shared: Arc<Shared>,
    descriptors: Vec<Segment>,
    max_descriptors: usize,
    next: Option<Next>,
    /// Header and payload of the packet being written.
    buf: Vec<u8>,
    events: Vec<EpollEvent>,
}

/// How often deadlines are checked (and the timer thread ticks).
pub(crate) fn tick(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(5), Duration::from_secs(1))
}

/// `CONNECT <port>`: two words, the port in decimal.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?;
    let mut words = s.split_ascii_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some("CONNECT"), Some(port), None) if port.bytes().all(|b| b.is_ascii_digit()) => {
            port.parse().ok()
        }
        _ => None,
    }
}

impl RxQueue {
    pub(crate) fn new(shared: Arc<Shared>, queue_size: u16) -> Self {
        RxQueue {
            shared,
            descriptors: Vec::with_capacity(usize::from(queue_size)),
            max_descriptors: usize::from(queue_size),
            next: None,
            buf: vec![0; HDR_LEN + MAX_PAYLOAD as usize],
            events: vec![EpollEvent::default(); EVENTS_PER_WAIT],
        }
    }

    /// Handles whatever the epoll set reports, without blocking. Everything
    /// readable is either consumed here (accept, CONNECT bytes, the wake
    /// counter, writable sockets flushed) or becomes a pending packet, and
    /// a socket whose data cannot go anywhere yet is out of the set: a
    /// `ready() == false` leaves nothing that would wake the worker again.
    fn poll_sources(&mut self) {
        self.expire();
        for _ in 0..WAITS_PER_POLL {
            let n = match self.shared.epoll.wait(0, &mut self.events) {
                Ok(n) => n.min(self.events.len()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "vsock epoll_wait failed");
                    return;
                }
            };
            for i in 0..n {
                let Some(ev) = self.events.get(i).copied() else {
                    break;
                };
                self.on_event(ev.data(), ev.events());
            }
            if n < self.events.len() {
                break;
            }
        }
    }

    fn on_event(&mut self, token: u64, events: u32) {
        match token {
            TOKEN_LISTENER => self.accept_clients(),
            TOKEN_WAKE => {
                let _ = self.shared.wake.read();
            }
            token => {
                let shared = self.shared.clone();
                let mut st = shared.lock();
                if st.clients.contains_key(&token) {
                    self.client_input(&mut st, token);
                } else if let Some(&key) = st.tokens.get(&token) {
                    Self::conn_event(&shared, &mut st, key, events);
                }
                // Otherwise it closed since epoll_wait returned.
            }
        }
    }

    fn accept_clients(&mut self) {
        let shared = self.shared.clone();
        for _ in 0..ACCEPTS_PER_EVENT {
            match shared.listener.accept() {
                Ok((stream, _)) => {
                    let mut st = shared.lock();
                    if st.clients.len() >= MAX_PENDING_CLIENTS
                        || stream.set_nonblocking(true).is_err()
                    {
                        // Dropping it closes it: the client sees EOF.
                        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let token = Shared::new_token(&mut st);
                    let ev = EpollEvent::new(EventSet::IN, token);
                    if let Err(e) = shared
                        .epoll
                        .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                    {
                        tracing::warn!(error = %e, "vsock: cannot watch a host client");
                        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    st.clients.insert(
                        token,
                        Client {
                            stream,
                            line: Vec::with_capacity(CONNECT_LINE_MAX),
                            deadline: Instant::now() + shared.connect_timeout,
                        },
                    );
                    shared.timed.store(true, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e)
                    if e.kind() == std::io::ErrorKind::Interrupted
                        || e.kind() == std::io::ErrorKind::ConnectionAborted =>
                {
                    continue
                }
                Err(e) => {
                    // Out of descriptors or memory: the pending connect
                    // stays readable, so rest instead of spinning on it.
                    tracing::warn!(error = %e, "vsock accept failed; pausing the listener");
                    let mut st = shared.lock();
                    let _ = shared.epoll.ctl(
                        ControlOperation::Delete,
                        shared.listener.as_raw_fd(),
                        EpollEvent::default(),
                    );
                    st.listener_paused_until = Some(Instant::now() + LISTENER_PAUSE);
                    shared.timed.store(true, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    fn close_client(shared: &Shared, st: &mut State, token: u64) -> Option<Client> {
        let client = st.clients.remove(&token)?;
        let _ = shared.epoll.ctl(
            ControlOperation::Delete,
            client.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(client)
    }

    /// Reads what a client sent towards its CONNECT line. Bytes after the
    /// newline stay in the socket: they are the first data for the guest.
    fn client_input(&mut self, st: &mut State, token: u64) {
        let shared = self.shared.clone();
        let Some(client) = st.clients.get_mut(&token) else {
            return;
        };
        let room = CONNECT_LINE_MAX.saturating_sub(client.line.len());
        let mut peek = [0u8; CONNECT_LINE_MAX];
        let seen = peek.get_mut(..room).unwrap_or(&mut []);
        let outcome: Result<bool, &'static str> = match sys::recv(&client.stream, seen, true) {
            Ok(0) => Err("closed before its CONNECT line"),
            Ok(n) => {
                let seen = seen.get(..n).unwrap_or(&[]);
                let (take, done) = match seen.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (n, false),
                };
                let mut sink = [0u8; CONNECT_LINE_MAX];
                match sys::recv(
                    &client.stream,
                    sink.get_mut(..take).unwrap_or(&mut []),
                    false,
                ) {
                    Ok(got) if got == take => {
                        let line = seen.get(..take - usize::from(done)).unwrap_or(&[]);
                        client.line.extend_from_slice(line);
                        if done {
                            Ok(true)
                        } else if client.line.len() >= CONNECT_LINE_MAX {
                            Err("CONNECT line too long")
                        } else {
                            Ok(false)
                        }
                    }
                    _ => Err("CONNECT line read failed"),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
            Err(_) => Err("CONNECT line read failed"),
        };
        match outcome {
            Ok(false) => {}
            Ok(true) => {
                let Some(client) = Self::close_client(&shared, st, token) else {
                    return;
                };
                match parse_connect(&client.line) {
                    Some(port) => Self::host_connect(&shared, st, token, client, port),
                    None => {
                        tracing::debug!("vsock: malformed CONNECT line");
                        shared
                            .stats
                            .connect_line_errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(reason) => {
                tracing::debug!(reason, "vsock host client closed");
                Self::close_client(&shared, st, token);
                shared
                    .stats
                    .connect_line_errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A complete `CONNECT <port>`: a local port and a REQUEST to the guest.
    fn host_connect(shared: &Shared, st: &mut State, token: u64, client: Client, port: u32) {
        if st.conns.len() >= shared.max_connections {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Some(local) = Shared::alloc_port(st) else {
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let key = (local, port);
        let deadline = Instant::now() + shared.connect_timeout;
        // Not in the epoll set until the guest accepts: its data waits in
        // the socket.
        let conn = Conn::new(client.stream, token, Phase::AwaitResponse, deadline);
        shared.insert(st, key, conn);
        shared.queue(st, key, OP_REQUEST);
        shared.timed.store(true, Ordering::Relaxed);
    }

    fn conn_event(shared: &Shared, st: &mut State, key: Key, events: u32) {
        let Some(conn) = st.conns.get_mut(&key) else {
            return;
        };
        if events & (EV_OUT | EV_HUP_ERR) != 0 && !conn.to_host.is_empty() {
            if let Err(e) = Shared::flush(conn) {
                tracing::debug!(error = %e, "vsock host socket gone");
                shared.reset(st, key);
                return;
            }
        }
        let Some(conn) = st.conns.get_mut(&key) else {
            return;
        };
        if events & (EV_IN | EV_HUP_ERR) != 0
            && conn.can_read_host()
            && !conn.readable
            && !conn.reading
        {
            conn.readable = true;
            st.readable.push_back(key);
        }
        shared.settle(st, key);
        if events & EV_HUP_ERR != 0 {
            // A hung-up socket stays "ready" while registered: one that
            // is still watched with no read coming is unusable.
            if let Some(c) = st.conns.get(&key) {
                if c.interest != 0 && !c.readable && !c.reading {
                    shared.reset(st, key);
                }
            }
        }
    }

    /// Closes clients and host connects past their deadline, brings a
    /// rested listener back. At most once per tick.
    fn expire(&mut self) {
        let shared = self.shared.clone();
        let now = Instant::now();
        let mut st = shared.lock();
        if now.saturating_duration_since(st.last_expiry) < tick(shared.connect_timeout) {
            return;
        }
        st.last_expiry = now;
        let late: Vec<u64> = st
            .clients
            .iter()
            .filter(|(_, c)| c.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            tracing::debug!("vsock host client sent no CONNECT line in time");
            Self::close_client(&shared, &mut st, token);
            shared
                .stats
                .connect_line_errors
                .fetch_add(1, Ordering::Relaxed);
        }
        let late: Vec<Key> = st
            .awaiting
            .iter()
            .filter(|k| st.conns.get(k).is_some_and(|c| c.deadline <= now))
            .copied()
            .collect();
        for key in late {
            tracing::debug!(?key, "vsock guest did not answer a host connect");
            shared.stats.refused.fetch_add(1, Ordering::Relaxed);
            shared.reset(&mut st, key);
        }
        if st.listener_paused_until.is_some_and(|t| t <= now) {
            let ev = EpollEvent::new(EventSet::IN, TOKEN_LISTENER);
            match shared
                .epoll
                .ctl(ControlOperation::Add, shared.listener.as_raw_fd(), ev)
            {
                Ok(()) => st.listener_paused_until = None,
                Err(_) => st.listener_paused_until = Some(now + LISTENER_PAUSE),
            }
        }
        let timed =
            !st.clients.is_empty() || !st.awaiting.is_empty() || st.listener_paused_until.is_some();
        shared.timed.store(timed, Ordering::Relaxed);
    }

    /// The next packet: control packets first, then host data round robin.
    fn pick(shared: &Shared, st: &mut State) -> Option<Next> {
        while let Some(c) = st.control.pop_front() {
            if c.op == OP_RST {
                st.queued_rst = st.queued_rst.saturating_sub(1);
                // The connection is gone (or is a new one): no credit.
                return Some(Next::Control(shared.header(c.key, OP_RST)));
            }
            if Shared::is_current(&st.conns, &c) {
                if let Some(conn) = st.conns.get_mut(&c.key) {
                    return Some(Next::Control(shared.conn_header(c.key, conn, c.op)));
                }
            }
            // Stale: the connection closed since, and its RST is queued.
        }
        while let Some(key) = st.readable.pop_front() {
            let Some(conn) = st.conns.get_mut(&key) else {
                continue;
            };
            if !conn.readable {
                continue;
            }
            conn.readable = false;
            if conn.can_read_host() && conn.credit() > 0 {
                conn.reading = true;
                return Some(Next::Data(key));
            }
            // No credit (or nowhere to send): out of the epoll set until
            // the guest gives some.
            shared.set_interest(conn);
        }
        None
    }

    /// Checks a receive chain before the packet is committed to it.
    fn check_buffers(&self, mem: &DeviceMemory) -> Result<usize, &'static str> {
        let mut total = 0u64;
        for d in &self.descriptors {
            if !d.writable {
                return Err("device-readable descriptor in an rx chain");
            }
            if !mem.check_range(d.addr, d.len as usize) {
                return Err("rx buffer outside shared memory");
            }
            total = total.saturating_add(u64::from(d.len));
        }
        if total < HDR_LEN as u64 {
            return Err("rx buffer smaller than a header");
        }
        Ok(total.min((HDR_LEN as u64).saturating_add(u64::from(MAX_PAYLOAD))) as usize)
    }

    /// Reads host data for `key` into `self.buf` after the header, at most
    /// `room` bytes and the guest's credit. Returns the header to send and
    /// the payload length. Whatever happened in the meantime, the answer is
    /// a valid packet: RST if the connection is gone, a CREDIT_UPDATE if
    /// there turned out to be nothing to send.
    fn read_host(&mut self, key: Key, room: usize) -> (Header, usize) {
        let shared = self.shared.clone();
        let mut st = shared.lock();
        let Some(conn) = st.conns.get_mut(&key) else {
            return (shared.header(key, OP_RST), 0);
        };
        conn.reading = false;
        let want = room.min(MAX_PAYLOAD as usize).min(conn.credit() as usize);
        if !conn.can_read_host() || want == 0 {
            let hdr = shared.conn_header(key, conn, OP_CREDIT_UPDATE);
            shared.set_interest(conn);
            return (hdr, 0);
        }
        let dst = self
            .buf
            .get_mut(HDR_LEN..HDR_LEN.saturating_add(want))
            .unwrap_or(&mut []);
        match sys::recv(&conn.stream, dst, false) {
            Ok(0) => {
                conn.host_eof = true;
                let mut hdr = shared.conn_header(key, conn, OP_SHUTDOWN);
                hdr.flags = SHUTDOWN_SEND;
                shared.set_interest(conn);
                (hdr, 0)
            }
            Ok(n) => {
                let n = n.min(want);
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                let mut hdr = shared.conn_header(key, conn, OP_RW);
                hdr.len = n as u32;
                shared.set_interest(conn);
                (hdr, n)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let hdr = shared.conn_header(key, conn, OP_CREDIT_UPDATE);
                shared.set_interest(conn);
                (hdr, 0)
            }
            Err(e) => {
                tracing::debug!(error = %e, "vsock host socket failed");
                shared.remove(&mut st, key);
                (shared.header(key, OP_RST), 0)
            }
        }
    }

    /// Writes `self.buf[..len]` over the chain's buffers (checked already).
    fn scatter(&self, mem: &DeviceMemory, len: usize) -> Result<(), vm_memory::GuestMemoryError> {
        let data = self.buf.get(..len).unwrap_or(&[]);
        let mut at = 0usize;
        for d in &self.descriptors {
            if at >= data.len() {
                break;
            }
            let n = (d.len as usize).min(data.len() - at);
            mem.write_slice(data.get(at..at + n).unwrap_or(&[]), d.addr)?;
            at += n;
        }
        Ok(())
    }
}

impl QueueHandler for RxQueue {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        walk_chain(chain, self.max_descriptors, &mut self.descriptors)?;
        let stats = self.shared.stats.clone();
        let cap = match self.check_buffers(mem) {
            Ok(cap) => cap,
            Err(reason) => {
                // The packet waits for the next chain.
                tracing::debug!(reason, "vsock rx buffer dropped");
                stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
                return Ok(0);
            }
        };
        if self.next.is_none() && !self.ready() {
            // Only a caller that skipped ready() gets here.
            return Ok(0);
        }
        let Some(next) = self.next.take() else {
            return Ok(0);
        };
        let (hdr, n) = match next {
            Next::Control(hdr) => (hdr, 0),
            Next::Data(key) => self.read_host(key, cap.saturating_sub(HDR_LEN)),
        };
        if let Some(h) = self.buf.get_mut(..HDR_LEN) {
            h.copy_from_slice(&hdr.to_bytes());
        }
        let len = HDR_LEN.saturating_add(n);
        if let Err(e) = self.scatter(mem, len) {
            // Not expected: every buffer was checked above. Host data is
            // lost with it, so the stream cannot go on.
            tracing::warn!(error = %e, "vsock rx write failed");
            stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            if n > 0 {
                let shared = self.shared.clone();
                let mut st = shared.lock();
                shared.reset(&mut st, (hdr.src_port, hdr.dst_port));
            }
            return Ok(0);
        }
        stats.rx_packets.fetch_add(1, Ordering::Relaxed);
        stats.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
        if hdr.op == OP_RST {
            stats.rst_sent.fetch_add(1, Ordering::Relaxed);
        }
        Ok(len as u32)
    }

    fn ready(&mut self) -> bool {
        if self.next.is_some() {
            return true;
        }
        self.poll_sources();
        let shared = self.shared.clone();
        let mut st = shared.lock();
        self.next = Self::pick(&shared, &mut st);
        self.next.is_some()
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.shared.epoll.as_raw_fd())
    }
}

/// The event queue: the device sends no events, so it holds the driver's
/// buffers and never uses them.
#[derive(Debug, Default)]
pub(crate) struct EventQueue;

impl QueueHandler for EventQueue {
    fn handle_chain(&mut self, _chain: Chain<'_>, _mem: &DeviceMemory) -> Result<u32, ChainError> {
        // Never reached through process_queue (never ready); a caller that
        // skips ready() gets the buffer back untouched.
        Ok(0)
    }

    fn ready(&mut self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::parse_connect;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT  4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296"), None);
        assert_eq!(parse_connect(b"CONNECT +5"), None);
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT 5 6"), None);
        assert_eq!(parse_connect(b"connect 5"), None);
        assert_eq!(parse_connect(b"CONNECT \xff"), None);
    }
}
