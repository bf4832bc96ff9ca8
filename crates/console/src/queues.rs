//! The receiveq (backend end → driver) and transmitq (driver → backend end)
//! handlers of port 0.

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use ringfence_device::{walk_chain, Chain, ChainError, DeviceMemory, QueueHandler, Segment};
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use crate::endpoint::{Endpoint, Input};
use crate::{ConsoleStats, RX_HELD_MAX, TX_CHAIN_MAX};

/// Input read from the backend end that no driver buffer has taken yet.
/// Owned by the device (not the handler), so a reset does not lose it.
#[derive(Debug)]
pub(crate) struct Held {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Held {
    pub(crate) fn new() -> Self {
        Self {
            buf: vec![0; RX_HELD_MAX].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn pending(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or(&[])
    }

    fn consume(&mut self, n: usize) {
        self.start = self.start.saturating_add(n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads from `end` if nothing is held; true if something is held after.
    fn refill(&mut self, end: &Endpoint) -> bool {
        if self.start < self.end {
            return true;
        }
        match end.read(&mut self.buf) {
            Input::Data(n) => {
                self.start = 0;
                self.end = n.min(self.buf.len());
                self.end > 0
            }
            Input::Empty => false,
        }
    }
}

/// Checks that every descriptor has direction `writable` and lies inside
/// shared memory; returns the total length.
fn validate(descs: &[Segment], mem: &DeviceMemory, writable: bool) -> Result<u64, &'static str> {
    let mut total = 0u64;
    for d in descs {
        if d.writable != writable {
            return Err(if writable {
                "device-readable descriptor in a receiveq chain"
            } else {
                "device-writable descriptor in a transmitq chain"
            });
        }
        if !mem.check_range(d.addr, d.len as usize) {
            return Err("buffer outside shared memory");
        }
        total = total.saturating_add(u64::from(d.len));
    }
    Ok(total)
}

/// receiveq: delivers input from the backend end into driver buffers.
#[derive(Debug)]
pub struct RxQueue {
    end: Arc<Endpoint>,
    held: Arc<Mutex<Held>>,
    stats: Arc<ConsoleStats>,
    descriptors: Vec<Segment>,
    max_descriptors: usize,
}

impl RxQueue {
    pub(crate) fn new(
        end: Arc<Endpoint>,
        held: Arc<Mutex<Held>>,
        stats: Arc<ConsoleStats>,
        queue_size: u16,
    ) -> Self {
        Self {
            end,
            held,
            stats,
            descriptors: Vec::with_capacity(usize::from(queue_size)),
            max_descriptors: usize::from(queue_size),
        }
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        // Every update keeps start <= end <= len: a poisoned lock is consistent.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl QueueHandler for RxQueue {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        let head = chain.head_index();
        if let Err(e) = walk_chain(chain, self.max_descriptors, &mut self.descriptors) {
            self.stats.broken.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        if let Err(reason) = validate(&self.descriptors, mem, true) {
            // Used length 0: the buffer is returned empty, the input stays held.
            tracing::debug!(head, reason, "malformed virtio-console receive buffer");
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return Ok(0);
        }
        let end = self.end.clone();
        let mut held = self.held();
        held.refill(&end);
        let mut copied = 0usize;
        for d in &self.descriptors {
            let data = held.pending().get(copied..).unwrap_or(&[]);
            if data.is_empty() {
                break;
            }
            let n = data.len().min(d.len as usize);
            let Some(part) = data.get(..n) else { break };
            // Validated above: the whole descriptor translates.
            if mem.write_slice(part, d.addr).is_err() {
                break;
            }
            copied = copied.saturating_add(n);
        }
        held.consume(copied);
        drop(held);
        self.stats
            .rx_bytes
            .fetch_add(copied as u64, Ordering::Relaxed);
        // At most RX_HELD_MAX bytes.
        Ok(u32::try_from(copied).unwrap_or(u32::MAX))
    }

    fn ready(&mut self) -> bool {
        let end = self.end.clone();
        self.held().refill(&end)
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.end.wake_fd()
    }
}

/// transmitq: writes driver output to the backend end, dropping (and
/// counting) what does not fit now.
#[derive(Debug)]
pub struct TxQueue {
    end: Arc<Endpoint>,
    stats: Arc<ConsoleStats>,
    descriptors: Vec<Segment>,
    max_descriptors: usize,
}

impl TxQueue {
    pub(crate) fn new(end: Arc<Endpoint>, stats: Arc<ConsoleStats>, queue_size: u16) -> Self {
        Self {
            end,
            stats,
            descriptors: Vec::with_capacity(usize::from(queue_size)),
            max_descriptors: usize::from(queue_size),
        }
    }
}

/// Copies shared memory out in chunks of this size before writing it.
const CHUNK: usize = 4096;

impl QueueHandler for TxQueue {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        let head = chain.head_index();
        if let Err(e) = walk_chain(chain, self.max_descriptors, &mut self.descriptors) {
            self.stats.broken.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        let total = match validate(&self.descriptors, mem, false) {
            Ok(t) => t,
            Err(reason) => {
                tracing::debug!(head, reason, "malformed virtio-console transmit buffer");
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                return Ok(0);
            }
        };
        let budget = total.min(TX_CHAIN_MAX);
        let mut sent = 0u64;
        let mut chunk = [0u8; CHUNK];
        'chain: for d in &self.descriptors {
            let mut off = 0u64;
            while off < u64::from(d.len) && sent < budget {
                let n = (u64::from(d.len) - off)
                    .min(budget - sent)
                    .min(CHUNK as u64) as usize;
                let (Some(buf), Some(addr)) = (chunk.get_mut(..n), d.addr.checked_add(off)) else {
                    break 'chain;
                };
                // Copied out once; the driver may change the source meanwhile.
                if mem.read_slice(buf, addr).is_err() {
                    break 'chain;
                }
                let w = self.end.write(buf);
                sent = sent.saturating_add(w as u64);
                if w < n {
                    // Full or gone: the rest of the chain is dropped rather
                    // than written later with a hole in the middle.
                    break 'chain;
                }
                off = off.saturating_add(n as u64);
            }
        }
        self.stats.tx_bytes.fetch_add(sent, Ordering::Relaxed);
        let dropped = total.saturating_sub(sent);
        if dropped > 0 {
            self.stats.tx_dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        Ok(0)
    }
}
