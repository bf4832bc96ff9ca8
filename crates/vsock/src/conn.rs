//! The connection table the rx and tx handlers share, and what both do to
//! it: credit accounting, forwarding to the host socket, control packets
//! for the guest, the epoll interest of every host socket.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::packet::{Header, OP_CREDIT_UPDATE, OP_RST, TYPE_STREAM};
use crate::{sys, VsockStats, HOST_CID, MAX_QUEUED_RST};

/// A connection: (host-side port, guest-side port). For a guest connect
/// the host-side port is the port the guest asked for; for a host connect
/// it is the local port the device allocated.
pub(crate) type Key = (u32, u32);

/// epoll token of the listening socket.
pub(crate) const TOKEN_LISTENER: u64 = 0;
/// epoll token of the wake eventfd.
pub(crate) const TOKEN_WAKE: u64 = 1;
/// First token of a client or connection.
const FIRST_TOKEN: u64 = 16;

const EV_IN: u32 = libc::EPOLLIN as u32;
const EV_OUT: u32 = libc::EPOLLOUT as u32;

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Host connect: REQUEST queued or sent, the guest has not answered.
    AwaitResponse,
    /// Both sides agreed.
    Established,
}

/// One connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub(crate) stream: UnixStream,
    pub(crate) token: u64,
    pub(crate) phase: Phase,
    /// When an unanswered REQUEST gives up.
    pub(crate) deadline: Instant,
    /// Guest data the host socket has not taken yet; never more than our
    /// `buf_alloc` (the guest's credit).
    pub(crate) to_host: VecDeque<u8>,
    /// Guest bytes written to the host socket, ever (wrapping).
    pub(crate) fwd_cnt: u32,
    /// The `fwd_cnt` last advertised to the guest.
    pub(crate) fwd_cnt_sent: u32,
    /// Host bytes sent to the guest, ever (wrapping).
    pub(crate) tx_cnt: u32,
    /// The guest's receive buffer, as it last said.
    pub(crate) peer_buf_alloc: u32,
    /// The guest's forwarded count, as it last said.
    pub(crate) peer_fwd_cnt: u32,
    /// The host socket said EOF; SHUTDOWN(SEND) went to the guest.
    pub(crate) host_eof: bool,
    /// The guest will receive no more.
    pub(crate) guest_rcv_shut: bool,
    /// The guest will send no more.
    pub(crate) guest_send_shut: bool,
    /// The host socket's write side is shut down.
    pub(crate) host_write_shut: bool,
    /// epoll said the host socket has something (data, EOF, error).
    pub(crate) readable: bool,
    /// The rx handler picked this connection for its next packet.
    pub(crate) reading: bool,
    /// A CREDIT_UPDATE for this connection is queued.
    pub(crate) credit_update_queued: bool,
    /// Events registered with epoll (0: not registered).
    pub(crate) interest: u32,
}

impl Conn {
    pub(crate) fn new(stream: UnixStream, token: u64, phase: Phase, deadline: Instant) -> Self {
        Conn {
            stream,
            token,
            phase,
            deadline,
            to_host: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            host_eof: false,
            guest_rcv_shut: false,
            guest_send_shut: false,
            host_write_shut: false,
            readable: false,
            reading: false,
            credit_update_queued: false,
            interest: 0,
        }
    }

    /// Bytes the guest can take now. A guest that claims to have consumed
    /// more than it was sent gets nothing (the wrapping difference is huge).
    pub(crate) fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether reading the host socket could produce a packet.
    pub(crate) fn can_read_host(&self) -> bool {
        self.phase == Phase::Established && !self.host_eof && !self.guest_rcv_shut
    }

    /// What epoll must watch: input only while the guest has credit and no
    /// read is pending (otherwise a readable socket would wake the rx
    /// worker for nothing, forever), output only while guest data waits.
    fn wanted_events(&self) -> u32 {
        let mut ev = 0;
        if self.can_read_host() && self.credit() > 0 && !self.readable && !self.reading {
            ev |= EV_IN;
        }
        if !self.to_host.is_empty() {
            ev |= EV_OUT;
        }
        ev
    }
}

/// A host client that has not sent its `CONNECT <port>\n` line yet.
#[derive(Debug)]
pub(crate) struct Client {
    pub(crate) stream: UnixStream,
    pub(crate) line: Vec<u8>,
    pub(crate) deadline: Instant,
}

/// A header-only packet for the guest, built when it is sent so that it
/// carries the connection's current credit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Control {
    pub(crate) key: Key,
    pub(crate) op: u16,
    /// The connection it belongs to (its token): a connection closed and
    /// made again under the same key does not inherit its packets. None
    /// for an RST, which needs no connection.
    pub(crate) token: Option<u64>,
}

/// Everything behind the lock.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) conns: HashMap<Key, Conn>,
    pub(crate) tokens: HashMap<u64, Key>,
    /// Live connections per host-side port, so a host connect gets a port
    /// no live connection uses.
    local_ports: HashMap<u32, usize>,
    pub(crate) clients: HashMap<u64, Client>,
    /// Host connects whose REQUEST the guest has not answered.
    pub(crate) awaiting: HashSet<Key>,
    pub(crate) control: VecDeque<Control>,
    /// RST entries in `control` (bounded by [`MAX_QUEUED_RST`]).
    pub(crate) queued_rst: usize,
    /// Connections epoll found readable, in order (round robin).
    pub(crate) readable: VecDeque<Key>,
    next_token: u64,
    next_port: u32,
    /// accept() failed for want of resources: the listener is out of the
    /// epoll set until then, or it would wake the worker in a loop.
    pub(crate) listener_paused_until: Option<Instant>,
    pub(crate) last_expiry: Instant,
}

/// State and descriptors shared by the handlers of one activation.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) guest_cid: u64,
    pub(crate) buf_alloc: u32,
    pub(crate) max_connections: usize,
    pub(crate) uds_path: PathBuf,
    pub(crate) connect_timeout: Duration,
    pub(crate) stats: Arc<VsockStats>,
    pub(crate) listener: Arc<UnixListener>,
    pub(crate) epoll: Epoll,
    /// Rung by the tx handler (and the timer thread) for the rx handler.
    pub(crate) wake: EventFd,
    /// Something has a deadline: the timer thread rings `wake` on each tick.
    pub(crate) timed: AtomicBool,
    state: Mutex<State>,
}

impl Shared {
    pub(crate) fn new(
        guest_cid: u64,
        buf_alloc: u32,
        max_connections: usize,
        uds_path: PathBuf,
        connect_timeout: Duration,
        stats: Arc<VsockStats>,
        listener: Arc<UnixListener>,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        Ok(Shared {
            guest_cid,
            buf_alloc,
            max_connections,
            uds_path,
            connect_timeout,
            stats,
            listener,
            epoll,
            wake,
            timed: AtomicBool::new(false),
            state: Mutex::new(State {
                conns: HashMap::new(),
                tokens: HashMap::new(),
                local_ports: HashMap::new(),
                clients: HashMap::new(),
                awaiting: HashSet::new(),
                control: VecDeque::new(),
                queued_rst: 0,
                readable: VecDeque::new(),
                next_token: FIRST_TOKEN,
                next_port: crate::FIRST_LOCAL_PORT,
                listener_paused_until: None,
                last_expiry: Instant::now(),
            }),
        })
    }

    /// Locks the table. A handler that panicked under the lock left it
    /// consistent enough to keep closing connections.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the rx handler's worker.
    pub(crate) fn ring(&self) {
        // A counter at its maximum is readable already.
        let _ = self.wake.write(1);
    }

    pub(crate) fn new_token(st: &mut State) -> u64 {
        let t = st.next_token;
        st.next_token = st.next_token.wrapping_add(1).max(FIRST_TOKEN);
        t
    }

    /// A host-side port no live connection uses, from [`crate::FIRST_LOCAL_PORT`] up.
    pub(crate) fn alloc_port(st: &mut State) -> Option<u32> {
        // Every port that is taken is in `local_ports`: at most that many
        // probes fail before one succeeds.
        let probes = st.local_ports.len().saturating_add(1);
        for _ in 0..probes {
            let p = st.next_port;
            st.next_port = p
                .checked_add(1)
                .unwrap_or(crate::FIRST_LOCAL_PORT)
                .max(crate::FIRST_LOCAL_PORT);
            if !st.local_ports.contains_key(&p) {
                return Some(p);
            }
        }
        None
    }

    /// Brings the epoll registration of `conn` in line with what it needs.
    pub(crate) fn set_interest(&self, conn: &mut Conn) {
        let want = conn.wanted_events();
        if want == conn.interest {
            return;
        }
        let op = if conn.interest == 0 {
            ControlOperation::Add
        } else if want == 0 {
            ControlOperation::Delete
        } else {
            ControlOperation::Modify
        };
        let ev = EpollEvent::new(EventSet::from_bits_truncate(want), conn.token);
        match self.epoll.ctl(op, conn.stream.as_raw_fd(), ev) {
            Ok(()) => conn.interest = want,
            Err(e) => tracing::warn!(error = %e, "epoll_ctl on a vsock host socket failed"),
        }
    }

    pub(crate) fn insert(&self, st: &mut State, key: Key, mut conn: Conn) {
        self.set_interest(&mut conn);
        st.tokens.insert(conn.token, key);
        let n = st.local_ports.entry(key.0).or_insert(0);
        *n = n.saturating_add(1);
        if conn.phase == Phase::AwaitResponse {
            st.awaiting.insert(key);
        }
        st.conns.insert(key, conn);
    }

    /// Removes a connection; dropping it closes the host socket.
    pub(crate) fn remove(&self, st: &mut State, key: Key) -> Option<Conn> {
        let conn = st.conns.remove(&key)?;
        st.tokens.remove(&conn.token);
        st.awaiting.remove(&key);
        if let Some(n) = st.local_ports.get_mut(&key.0) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.local_ports.remove(&key.0);
            }
        }
        if conn.interest != 0 {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        Some(conn)
    }

    /// Queues a header-only packet for the guest and wakes the rx handler.
    /// Each live connection has at most one RESPONSE or REQUEST and one
    /// CREDIT_UPDATE queued, and entries of closed connections are purged
    /// when they would make the queue grow past that; RSTs, which a guest
    /// can provoke at will, are bounded and the excess dropped and counted.
    pub(crate) fn queue(&self, st: &mut State, key: Key, op: u16) {
        let token = if op == OP_RST {
            if st.queued_rst >= MAX_QUEUED_RST {
                self.stats.rst_dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            st.queued_rst = st.queued_rst.saturating_add(1);
            None
        } else {
            let Some(conn) = st.conns.get(&key) else {
                return;
            };
            Some(conn.token)
        };
        let live_bound = self
            .max_connections
            .saturating_mul(2)
            .saturating_add(MAX_QUEUED_RST);
        if st.control.len() > live_bound {
            // Only entries of closed connections can be in excess.
            let State { control, conns, .. } = &mut *st;
            control.retain(|c| c.token.is_none() || Self::is_current(conns, c));
        }
        st.control.push_back(Control { key, op, token });
        self.ring();
    }

    /// Whether a queued entry still belongs to a live connection.
    pub(crate) fn is_current(conns: &HashMap<Key, Conn>, c: &Control) -> bool {
        conns
            .get(&c.key)
            .is_some_and(|conn| Some(conn.token) == c.token)
    }

    /// Closes a connection (if there is one) and tells the guest.
    pub(crate) fn reset(&self, st: &mut State, key: Key) {
        self.remove(st, key);
        self.queue(st, key, OP_RST);
    }

    /// A packet header from the host side of `key`.
    pub(crate) fn header(&self, key: Key, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// A header for a live connection: it advertises our credit.
    pub(crate) fn conn_header(&self, key: Key, conn: &mut Conn, op: u16) -> Header {
        conn.fwd_cnt_sent = conn.fwd_cnt;
        if op == OP_CREDIT_UPDATE {
            conn.credit_update_queued = false;
        }
        Header {
            buf_alloc: self.buf_alloc,
            fwd_cnt: conn.fwd_cnt,
            ..self.header(key, op)
        }
    }

    /// Writes queued guest data to the host socket until it is empty or
    /// the socket is full. An error means the host side is gone.
    pub(crate) fn flush(conn: &mut Conn) -> std::io::Result<()> {
        // Each round either empties a slice or stops on a full socket.
        for _ in 0..4 {
            let (front, _) = conn.to_host.as_slices();
            if front.is_empty() {
                break;
            }
            match sys::send(&conn.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    conn.to_host.drain(..n.min(front.len()));
                    conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if conn.to_host.is_empty() {
            // An idle connection does not keep a full buffer's worth of memory.
            if conn.to_host.capacity() > 64 * 1024 {
                conn.to_host = VecDeque::new();
            }
            if conn.guest_send_shut && !conn.host_write_shut {
                conn.host_write_shut = true;
                let _ = conn.stream.shutdown(std::net::Shutdown::Write);
            }
        }
        Ok(())
    }

    /// After guest data moved (or the guest shut down): closes a connection
    /// both sides are done with, tells the guest about freed buffer space,
    /// updates the epoll registration.
    pub(crate) fn settle(&self, st: &mut State, key: Key) {
        let Some(conn) = st.conns.get_mut(&key) else {
            return;
        };
        if conn.guest_rcv_shut && conn.guest_send_shut && conn.to_host.is_empty() {
            // The guest closed and waits for our RST to finish.
            self.reset(st, key);
            return;
        }
        let freed = conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_sent);
        let queue_update = !conn.credit_update_queued && freed >= (self.buf_alloc / 2).max(1);
        if queue_update {
            conn.credit_update_queued = true;
        }
        self.set_interest(conn);
        if queue_update {
            self.queue(st, key, OP_CREDIT_UPDATE);
        }
    }
}
