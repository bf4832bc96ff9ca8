//! Receive: packets from the pair's TAP queue into the driver's buffers.
//!
//! The handler holds at most one packet, read from the TAP only when it
//! holds none. A packet waits (never dropped) while the driver has no room
//! for it; only a packet the driver's buffers can never hold is dropped.
//!
//! Its wake descriptor is an epoll set of the TAP queue and the pair's
//! eventfd, rather than the TAP queue itself, so that the handler decides
//! what may wake it: while its pair is disabled (VQ_PAIRS_SET) it must not
//! read, so the TAP queue leaves the set and a readable queue cannot keep
//! the transport spinning; the eventfd says when the pair is enabled again.
//! A TAP queue that fails for good (its interface deleted: it then polls
//! as an error forever) leaves the set the same way.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ringfence_device::{
    walk_chain, Chain, ChainError, DeviceMemory, Processed, QueueFailure, QueueHandler, QueueStats,
    Segment, MAX_CHAINS_PER_CALL,
};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::header::{VnetHeader, ETH_HLEN, HDR_LEN};
use crate::{inc, Shared, MAX_FRAME_LEN};

/// Most descriptors, over all its chains, one packet may be written into.
const MAX_PACKET_DESCRIPTORS: usize = 1024;
/// Unusable packets (wrong size or offloads) skipped in one `ready()`.
const READS_PER_READY: usize = 8;
/// Packets dropped for not fitting in one `process()` call.
const MAX_DROPS_PER_CALL: usize = 64;
/// EVENT_IDX re-check rounds in one `process()` call.
const MAX_ROUNDS: usize = 16;
/// The read buffer: one byte more than the largest packet, so a longer one shows.
const RX_BUF_LEN: usize = HDR_LEN + MAX_FRAME_LEN as usize + 1;

const TOKEN_WAKE: u64 = 0;
const TOKEN_TAP: u64 = 1;

/// One chain taken for the packet being delivered.
#[derive(Debug, Clone, Copy)]
struct RxChain {
    head: u16,
    /// End of its descriptors in `segments`.
    end: usize,
    /// Bytes written into it.
    used: u32,
}

/// What one delivery attempt did.
enum Delivery {
    /// The packet went into this many chains.
    Delivered(usize),
    /// The packet can never fit the driver's buffers: dropped, chains kept.
    Dropped,
    /// Not enough buffers yet: chains put back, packet kept.
    Waiting,
    /// The packet needs more chains than this call may still use.
    OutOfBudget,
}

/// The receive handler of one queue pair.
pub(crate) struct RxQueue {
    shared: Arc<Shared>,
    pair: usize,
    acked: u64,
    mrg: bool,
    /// The held packet is `buf[..held]` (header then frame); 0: none.
    buf: Box<[u8]>,
    held: usize,
    /// One chain's descriptors, then all of the packet's.
    walk: Vec<Segment>,
    segments: Vec<Segment>,
    chains: Vec<RxChain>,
    max_descriptors: usize,
    epoll: Epoll,
    /// The TAP descriptor is in the epoll set.
    registered: bool,
    seen_generation: u64,
}

impl RxQueue {
    pub(crate) fn new(
        shared: Arc<Shared>,
        pair: usize,
        acked: u64,
        queue_size: u16,
    ) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let state = shared
            .pairs
            .get(pair)
            .ok_or_else(|| io::Error::other("no such queue pair"))?;
        epoll.ctl(
            ControlOperation::Add,
            state.wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        // Generation first, then drain: a later change bumps the generation
        // after its eventfd write, so no write is left behind unnoticed.
        let seen_generation = state.generation.load(Ordering::Acquire);
        let _ = state.wake.read();
        let active = state.active.load(Ordering::Acquire);
        let mut rx = Self {
            shared: shared.clone(),
            pair,
            acked,
            mrg: acked & (1u64 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            buf: vec![0u8; RX_BUF_LEN].into_boxed_slice(),
            held: 0,
            walk: Vec::with_capacity(usize::from(queue_size)),
            segments: Vec::with_capacity(usize::from(queue_size)),
            chains: Vec::new(),
            max_descriptors: usize::from(queue_size),
            epoll,
            registered: false,
            seen_generation,
        };
        if active {
            rx.register(true)?;
        }
        Ok(rx)
    }

    fn tap_fd(&self) -> Option<RawFd> {
        self.shared.taps.get(self.pair).map(AsRawFd::as_raw_fd)
    }

    /// Puts the TAP descriptor into the epoll set or takes it out.
    fn register(&mut self, on: bool) -> io::Result<()> {
        if on == self.registered {
            return Ok(());
        }
        let fd = self
            .tap_fd()
            .ok_or_else(|| io::Error::other("no TAP queue"))?;
        let op = if on {
            ControlOperation::Add
        } else {
            ControlOperation::Delete
        };
        self.epoll
            .ctl(op, fd, EpollEvent::new(EventSet::IN, TOKEN_TAP))?;
        self.registered = on;
        Ok(())
    }

    /// Follows the control queue enabling or disabling the pair; returns
    /// whether it is enabled.
    fn follow_activation(&mut self) -> bool {
        let Some(state) = self.shared.pairs.get(self.pair) else {
            return false;
        };
        let generation = state.generation.load(Ordering::Acquire);
        let active = state.active.load(Ordering::Acquire);
        if generation != self.seen_generation {
            self.seen_generation = generation;
            // Clears the wake-up, or the transport would poll a readable set forever.
            let _ = state.wake.read();
            if let Err(e) = self.register(active) {
                tracing::warn!(pair = self.pair, error = %e, "cannot (un)watch the TAP queue");
            }
        }
        active
    }

    /// Reads packets until one the driver can take is held.
    fn fill(&mut self) -> bool {
        let stats = &self.shared.stats;
        let Some(tap) = self.shared.taps.get(self.pair) else {
            return false;
        };
        for _ in 0..READS_PER_READY {
            let n = match tap.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // A detached or vanished queue: its descriptor stays
                    // "ready" with an error, so stop watching it until the
                    // pair is enabled again.
                    inc(&stats.rx_tap_errors);
                    tracing::warn!(pair = self.pair, error = %e, "TAP read failed; queue set aside");
                    if let Err(e) = self.register(false) {
                        tracing::warn!(error = %e, "cannot unwatch the TAP queue");
                    }
                    return false;
                }
            };
            if n < HDR_LEN + ETH_HLEN as usize || n > HDR_LEN + MAX_FRAME_LEN as usize {
                inc(&stats.rx_dropped_oversize);
                tracing::debug!(
                    pair = self.pair,
                    len = n,
                    "TAP packet of unusable size dropped"
                );
                continue;
            }
            let Some(hdr) = self.buf.first_chunk_mut::<HDR_LEN>() else {
                return false;
            };
            match VnetHeader::from_bytes(*hdr).for_guest(self.acked) {
                Some(h) => {
                    *hdr = h.to_bytes();
                    self.held = n;
                    return true;
                }
                None => {
                    inc(&stats.rx_dropped_offload);
                    continue;
                }
            }
        }
        false
    }

    /// Walks one receive chain into `walk` and returns its capacity. A
    /// buffer the device cannot write an answer into breaks the queue.
    fn take_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        let head = chain.head_index();
        walk_chain(chain, self.max_descriptors, &mut self.walk)?;
        let unanswerable = |reason| ChainError::Unanswerable { head, reason };
        let mut capacity = 0u32;
        for s in &self.walk {
            if !s.writable {
                return Err(unanswerable(
                    "device-readable descriptor in a receive buffer",
                ));
            }
            if !mem.check_range(s.addr, s.len as usize) {
                return Err(unanswerable("receive buffer outside shared memory"));
            }
            capacity = capacity.saturating_add(s.len);
        }
        if (capacity as usize) < HDR_LEN {
            return Err(unanswerable("receive buffer smaller than the header"));
        }
        Ok(capacity)
    }

    /// Tries to put the held packet into the driver's buffers, using at
    /// most `budget` chains. Nothing reaches the used ring unless the
    /// whole packet was written.
    fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &DeviceMemory,
        budget: usize,
    ) -> Result<Delivery, QueueFailure> {
        let len = self.held;
        let start = queue.next_avail();
        self.segments.clear();
        self.chains.clear();
        let max_chains = if self.mrg { budget } else { budget.min(1) };
        let mut capacity = 0usize;
        let mut fragmented = false;
        while capacity < len && self.chains.len() < max_chains {
            let Some(chain) = queue.iter(mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            let cap = match self.take_chain(chain, mem) {
                Ok(c) => c,
                Err(e) => {
                    inc(&self.shared.stats.chain_errors);
                    return Err(e.into());
                }
            };
            if self.segments.len().saturating_add(self.walk.len()) > MAX_PACKET_DESCRIPTORS {
                fragmented = true;
                break;
            }
            self.segments.extend_from_slice(&self.walk);
            self.chains.push(RxChain {
                head,
                end: self.segments.len(),
                used: 0,
            });
            capacity = capacity.saturating_add(cap as usize);
        }
        if capacity < len {
            let popped = queue.next_avail().wrapping_sub(start);
            queue.set_next_avail(start);
            // Whether more buffers could ever make it fit.
            let never = fragmented
                || (!self.mrg && popped > 0)
                || popped >= queue.size()
                || self.chains.len() >= MAX_CHAINS_PER_CALL;
            if never {
                self.held = 0;
                inc(&self.shared.stats.rx_dropped_oversize);
                tracing::debug!(
                    pair = self.pair,
                    len,
                    capacity,
                    chains = popped,
                    "received packet does not fit the driver's buffers: dropped"
                );
                return Ok(Delivery::Dropped);
            }
            if self.chains.len() >= max_chains {
                return Ok(Delivery::OutOfBudget);
            }
            return Ok(Delivery::Waiting);
        }

        // Every byte first, then the used ring: add_used publishes at once.
        let num_buffers = self.chains.len() as u16; // <= MAX_CHAINS_PER_CALL
        if let Some(nb) = self.buf.get_mut(10..HDR_LEN) {
            nb.copy_from_slice(&num_buffers.to_le_bytes());
        }
        let packet = self.buf.get(..len).unwrap_or_default();
        let mut off = 0usize;
        let mut first = 0usize;
        for c in self.chains.iter_mut() {
            for s in self.segments.get(first..c.end).unwrap_or_default() {
                let Some(rest) = packet.get(off..).filter(|r| !r.is_empty()) else {
                    break;
                };
                let piece = rest.get(..s.len as usize).unwrap_or(rest);
                if mem.write_slice(piece, s.addr).is_err() {
                    inc(&self.shared.stats.chain_errors);
                    return Err(ChainError::Unanswerable {
                        head: c.head,
                        reason: "receive buffer not writable",
                    }
                    .into());
                }
                off += piece.len();
                c.used = c.used.saturating_add(piece.len() as u32);
            }
            first = c.end;
        }
        for c in &self.chains {
            queue.add_used(mem, c.head, c.used)?;
        }
        let stats = &self.shared.stats;
        inc(&stats.rx_packets);
        stats
            .rx_bytes
            .fetch_add((len - HDR_LEN) as u64, Ordering::Relaxed);
        self.held = 0;
        Ok(Delivery::Delivered(self.chains.len()))
    }

    /// With EVENT_IDX, asks for a kick once the driver adds buffers beyond
    /// those already available (which were too few for the held packet);
    /// `enable_notification` would only ask for one past `next_avail`,
    /// which the driver has passed already. Returns whether buffers were
    /// added meanwhile.
    fn arm_past_available(queue: &mut Queue, mem: &DeviceMemory) -> Result<bool, QueueFailure> {
        let resume = queue.next_avail();
        let end = queue.avail_idx(mem, Ordering::Acquire)?.0;
        queue.set_next_avail(end);
        let added = queue.enable_notification(mem);
        queue.set_next_avail(resume);
        Ok(added?)
    }
}

impl QueueHandler for RxQueue {
    /// Unused: `process` takes the chains itself, as one packet may span
    /// several. Answers as an empty packet would, should anyone call it.
    fn handle_chain(&mut self, chain: Chain<'_>, _mem: &DeviceMemory) -> Result<u32, ChainError> {
        Err(ChainError::Unanswerable {
            head: chain.head_index(),
            reason: "receive chains are taken by process()",
        })
    }

    fn ready(&mut self) -> bool {
        let active = self.follow_activation();
        if self.held > 0 {
            if active {
                return true;
            }
            // Held from before the pair was disabled; it may no longer be used.
            self.held = 0;
            inc(&self.shared.stats.rx_dropped_inactive);
        }
        active && self.registered && self.fill()
    }

    fn wake_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn serves_chain_by_chain(&self) -> bool {
        false
    }

    fn process(
        &mut self,
        queue: &mut Queue,
        mem: &DeviceMemory,
        stats: &QueueStats,
    ) -> Result<Processed, QueueFailure> {
        let mut processed = 0usize;
        let mut drops = 0usize;
        let mut starved = false;
        let mut more = false;
        let mut rounds = 0usize;
        loop {
            if queue.event_idx_enabled() {
                queue.disable_notification(mem)?;
            }
            let mut waiting = false;
            loop {
                if processed >= MAX_CHAINS_PER_CALL || drops >= MAX_DROPS_PER_CALL {
                    more = true;
                    break;
                }
                if !self.ready() {
                    starved = queue.avail_idx(mem, Ordering::Acquire)?.0 != queue.next_avail();
                    break;
                }
                match self.deliver(queue, mem, MAX_CHAINS_PER_CALL - processed)? {
                    Delivery::Delivered(n) => processed = processed.saturating_add(n),
                    Delivery::Dropped => drops += 1,
                    Delivery::Waiting => {
                        waiting = true;
                        break;
                    }
                    Delivery::OutOfBudget => {
                        more = true;
                        break;
                    }
                }
            }
            // As in process_queue: with EVENT_IDX, re-enable and re-check so
            // a buffer added meanwhile is not missed; a starved handler has
            // buffers already and re-checking would spin.
            if starved || more || !queue.event_idx_enabled() {
                break;
            }
            let again = if waiting {
                Self::arm_past_available(queue, mem)?
            } else {
                queue.enable_notification(mem)?
            };
            if !again {
                break;
            }
            rounds += 1;
            if rounds >= MAX_ROUNDS {
                more = true;
                break;
            }
        }
        stats.chains.fetch_add(processed as u64, Ordering::Relaxed);
        let notify = processed > 0 && queue.needs_notification(mem)?;
        if notify {
            stats.notifications.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Processed {
            chains: processed,
            notify,
            more,
            starved,
            in_flight: false,
        })
    }
}
