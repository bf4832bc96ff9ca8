//! The transmit queue: packets from the guest. Each chain is one packet,
//! all device-readable; it is copied out of shared memory once (header and
//! payload), validated, and acted on. Every chain is used with length 0:
//! there is nothing to write back, and a bad packet is dropped and counted
//! (or answered with an RST on the rx queue).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ringfence_device::{walk_chain, Chain, ChainError, DeviceMemory, QueueHandler, Segment};
use vm_memory::Bytes;

use crate::conn::{Conn, Key, Phase, Shared, State};
use crate::packet::*;
use crate::{sys, HOST_CID, MAX_PAYLOAD};

/// The tx queue handler.
#[derive(Debug)]
pub(crate) struct TxQueue {
    shared: Arc<Shared>,
    descriptors: Vec<Segment>,
    max_descriptors: usize,
    /// The packet as copied out of shared memory.
    buf: Vec<u8>,
}

impl TxQueue {
    pub(crate) fn new(shared: Arc<Shared>, queue_size: u16) -> Self {
        TxQueue {
            shared,
            descriptors: Vec::with_capacity(usize::from(queue_size)),
            max_descriptors: usize::from(queue_size),
            buf: Vec::with_capacity(HDR_LEN + MAX_PAYLOAD as usize),
        }
    }

    /// Copies the packet out of shared memory and checks what makes it a
    /// packet of this device at all. On success `self.buf` holds the header
    /// and exactly `len` payload bytes.
    fn read_packet(&mut self, mem: &DeviceMemory) -> Result<Header, &'static str> {
        let mut total = 0u64;
        for d in &self.descriptors {
            if d.writable {
                return Err("device-writable descriptor in a tx chain");
            }
            total = total.saturating_add(u64::from(d.len));
        }
        if total < HDR_LEN as u64 {
            return Err("chain shorter than a header");
        }
        if total > (HDR_LEN as u64).saturating_add(u64::from(MAX_PAYLOAD)) {
            return Err("payload larger than 64 KiB");
        }
        // Bounded by the check above.
        let total = total as usize;
        self.buf.clear();
        self.buf.resize(total, 0);
        let mut at = 0usize;
        for d in &self.descriptors {
            let end = at.saturating_add(d.len as usize);
            let dst = self.buf.get_mut(at..end).ok_or("chain length")?;
            mem.read_slice(dst, d.addr)
                .map_err(|_| "buffer outside shared memory")?;
            at = end;
        }
        let mut raw = [0u8; HDR_LEN];
        raw.copy_from_slice(self.buf.get(..HDR_LEN).ok_or("chain length")?);
        let hdr = Header::from_bytes(&raw);
        if u64::from(hdr.len) != (total - HDR_LEN) as u64 {
            return Err("len does not match the payload");
        }
        if hdr.src_cid != self.shared.guest_cid {
            return Err("src_cid is not the guest's");
        }
        if hdr.dst_cid != HOST_CID {
            return Err("dst_cid is not the host");
        }
        Ok(hdr)
    }

    fn dispatch(&mut self, hdr: Header) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        stats.tx_packets.fetch_add(1, Ordering::Relaxed);
        let key: Key = (hdr.dst_port, hdr.src_port);
        let mut st = shared.lock();
        if hdr.type_ != TYPE_STREAM {
            tracing::debug!(
                type_ = hdr.type_,
                "vsock packet of a type other than stream"
            );
            if hdr.op != OP_RST {
                shared.reset(&mut st, key);
            }
            return;
        }
        match hdr.op {
            OP_REQUEST => self.on_request(&mut st, key, &hdr),
            OP_RST => {
                if let Some(conn) = shared.remove(&mut st, key) {
                    if conn.phase == Phase::AwaitResponse {
                        // The guest refused a host connect.
                        stats.refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            OP_RESPONSE | OP_SHUTDOWN | OP_RW | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {
                let Some(conn) = st.conns.get_mut(&key) else {
                    shared.queue(&mut st, key, OP_RST);
                    return;
                };
                conn.peer_buf_alloc = hdr.buf_alloc;
                conn.peer_fwd_cnt = hdr.fwd_cnt;
                match hdr.op {
                    OP_RESPONSE => self.on_response(&mut st, key),
                    OP_SHUTDOWN => self.on_shutdown(&mut st, key, hdr.flags),
                    OP_RW => self.on_rw(&mut st, key),
                    OP_CREDIT_REQUEST => {
                        if !conn.credit_update_queued {
                            conn.credit_update_queued = true;
                            shared.queue(&mut st, key, OP_CREDIT_UPDATE);
                        }
                        if let Some(conn) = st.conns.get_mut(&key) {
                            shared.set_interest(conn);
                        }
                    }
                    // CREDIT_UPDATE: the new credit may let host data flow.
                    _ => shared.set_interest(conn),
                }
            }
            other => {
                tracing::debug!(op = other, "vsock packet with an unknown op");
                shared.reset(&mut st, key);
            }
        }
    }

    fn on_request(&mut self, st: &mut State, key: Key, hdr: &Header) {
        let shared = &*self.shared;
        let stats = &shared.stats;
        if st.conns.contains_key(&key) {
            // A second REQUEST for a live connection: the guest's view and
            // ours disagree; close ours and say so.
            tracing::debug!(?key, "vsock REQUEST for a live connection");
            stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            shared.reset(st, key);
            return;
        }
        if st.conns.len() >= shared.max_connections {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            shared.queue(st, key, OP_RST);
            return;
        }
        let path = port_path(&shared.uds_path, key.0);
        let stream = match sys::connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "vsock guest connect refused");
                stats.refused.fetch_add(1, Ordering::Relaxed);
                shared.queue(st, key, OP_RST);
                return;
            }
        };
        let token = Shared::new_token(st);
        let mut conn = Conn::new(stream, token, Phase::Established, Instant::now());
        conn.peer_buf_alloc = hdr.buf_alloc;
        conn.peer_fwd_cnt = hdr.fwd_cnt;
        shared.insert(st, key, conn);
        stats.connections_guest.fetch_add(1, Ordering::Relaxed);
        shared.queue(st, key, OP_RESPONSE);
    }

    fn on_response(&mut self, st: &mut State, key: Key) {
        let shared = &*self.shared;
        let Some(conn) = st.conns.get_mut(&key) else {
            return;
        };
        if conn.phase != Phase::AwaitResponse {
            tracing::debug!(?key, "vsock RESPONSE on an established connection");
            shared
                .stats
                .dropped_malformed
                .fetch_add(1, Ordering::Relaxed);
            shared.reset(st, key);
            return;
        }
        let line = format!("OK {}\n", key.0);
        // A fresh socket has an empty send buffer: the line goes at once
        // or the client is gone.
        match sys::send(&conn.stream, line.as_bytes()) {
            Ok(n) if n == line.len() => {
                conn.phase = Phase::Established;
                st.awaiting.remove(&key);
                shared
                    .stats
                    .connections_host
                    .fetch_add(1, Ordering::Relaxed);
                if let Some(conn) = st.conns.get_mut(&key) {
                    shared.set_interest(conn);
                }
            }
            _ => {
                shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                shared.reset(st, key);
            }
        }
    }

    fn on_shutdown(&mut self, st: &mut State, key: Key, flags: u32) {
        let shared = &*self.shared;
        let Some(conn) = st.conns.get_mut(&key) else {
            return;
        };
        if conn.phase != Phase::Established {
            shared.reset(st, key);
            return;
        }
        conn.guest_rcv_shut |= flags & SHUTDOWN_RCV != 0;
        conn.guest_send_shut |= flags & SHUTDOWN_SEND != 0;
        if let Err(e) = Shared::flush(conn) {
            tracing::debug!(error = %e, "vsock host socket gone");
            shared.reset(st, key);
            return;
        }
        shared.settle(st, key);
    }

    fn on_rw(&mut self, st: &mut State, key: Key) {
        let shared = &*self.shared;
        let stats = &shared.stats;
        let Some(conn) = st.conns.get_mut(&key) else {
            return;
        };
        if conn.phase != Phase::Established || conn.guest_send_shut {
            tracing::debug!(?key, "vsock data outside an open connection");
            stats.dropped_malformed.fetch_add(1, Ordering::Relaxed);
            shared.reset(st, key);
            return;
        }
        let payload = self.buf.get(HDR_LEN..).unwrap_or(&[]);
        let buffered = conn.to_host.len().saturating_add(payload.len());
        if buffered > shared.buf_alloc as usize {
            // More than the credit we gave: a guest that respects the
            // protocol cannot get here.
            tracing::debug!(?key, buffered, "vsock guest exceeded its credit");
            stats.credit_violations.fetch_add(1, Ordering::Relaxed);
            shared.reset(st, key);
            return;
        }
        stats
            .tx_bytes
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        let mut sent = 0usize;
        if conn.to_host.is_empty() && !payload.is_empty() {
            match sys::send(&conn.stream, payload) {
                Ok(n) => sent = n.min(payload.len()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    tracing::debug!(error = %e, "vsock host socket gone");
                    shared.reset(st, key);
                    return;
                }
            }
            conn.fwd_cnt = conn.fwd_cnt.wrapping_add(sent as u32);
        }
        conn.to_host
            .extend(payload.get(sent..).unwrap_or(&[]).iter().copied());
        if let Err(e) = Shared::flush(conn) {
            tracing::debug!(error = %e, "vsock host socket gone");
            shared.reset(st, key);
            return;
        }
        shared.settle(st, key);
    }
}

/// `<uds_path>_<port>`.
pub(crate) fn port_path(uds: &std::path::Path, port: u32) -> PathBuf {
    let mut s = OsString::from(uds.as_os_str());
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

impl QueueHandler for TxQueue {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        walk_chain(chain, self.max_descriptors, &mut self.descriptors)?;
        match self.read_packet(mem) {
            Ok(hdr) => self.dispatch(hdr),
            Err(reason) => {
                tracing::debug!(reason, "vsock tx packet dropped");
                self.shared
                    .stats
                    .dropped_malformed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(0)
    }
}
