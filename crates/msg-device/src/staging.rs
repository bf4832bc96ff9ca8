//! Grants for copy, on the device side: the transport stages a chain's
//! bytes so that device models never learn that the driver's memory is not
//! mapped.
//!
//! An area with a copier is staging memory of the backend's own, laid out
//! like the driver's grant. Before a chain is handed to its device model,
//! the bytes of its device-readable descriptors that lie in such areas are
//! fetched into staging; after the model answered, the bytes it wrote (the
//! used length, in descriptor order) are stored back. Both are one copy
//! request per area and chain, done by the party the bus trusts (the broker
//! on the local bus, the hypervisor elsewhere).

use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ringfence_bus::{split_area_addr, AreaCopier, AreaId, AreaRange, MAX_COPY_RANGES};
use ringfence_device::{
    process_queue, walk_chain, Chain, ChainError, Completed, DeviceMemory, Processed, QueueFailure,
    QueueHandler, QueueStats, Segment,
};
use virtio_queue::Queue;

use crate::BackendStats;

/// Longest chain staged (the largest queue size).
const MAX_STAGED_DESCRIPTORS: usize = 1024;
/// Most copy requests for one chain in one direction: a chain scattered
/// over many grants (or alternating between two) would otherwise cost the
/// shared copier a round trip per descriptor.
const MAX_COPIES_PER_CHAIN: usize = 8;
/// Most bytes staged for one chain in one direction: descriptors that
/// repeat the same range would otherwise make the copier move gigabytes.
const MAX_STAGED_BYTES: u64 = 32 << 20;

/// A copied area: its size and who copies for it.
type Copied = (u64, Arc<dyn AreaCopier>);

/// The areas of the current connection whose bytes move by copy.
pub(crate) struct CopiedAreas {
    areas: RwLock<BTreeMap<AreaId, Copied>>,
    count: AtomicUsize,
    stats: Arc<BackendStats>,
}

impl CopiedAreas {
    pub(crate) fn new(stats: Arc<BackendStats>) -> Self {
        Self {
            areas: RwLock::new(BTreeMap::new()),
            count: AtomicUsize::new(0),
            stats,
        }
    }

    pub(crate) fn insert(&self, id: AreaId, size: u64, copier: Arc<dyn AreaCopier>) {
        let mut areas = self.areas.write().unwrap_or_else(|p| p.into_inner());
        areas.insert(id, (size, copier));
        self.count.store(areas.len(), Ordering::SeqCst);
    }

    pub(crate) fn remove(&self, id: AreaId) -> Option<Copied> {
        let mut areas = self.areas.write().unwrap_or_else(|p| p.into_inner());
        let removed = areas.remove(&id);
        self.count.store(areas.len(), Ordering::SeqCst);
        removed
    }

    pub(crate) fn clear(&self) {
        let mut areas = self.areas.write().unwrap_or_else(|p| p.into_inner());
        areas.clear();
        self.count.store(0, Ordering::SeqCst);
    }

    fn is_empty(&self) -> bool {
        self.count.load(Ordering::SeqCst) == 0
    }

    fn get(&self, id: AreaId) -> Option<Copied> {
        self.areas
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
    }
}

/// Which way a transfer goes.
#[derive(Clone, Copy)]
enum Transfer {
    /// Driver → staging, before the model reads.
    Fetch,
    /// Staging → driver, after the model wrote.
    Store,
}

/// A queue handler with staging around it.
pub(crate) struct Staged {
    inner: Box<dyn QueueHandler>,
    copied: Arc<CopiedAreas>,
    segments: Vec<Segment>,
}

impl Staged {
    pub(crate) fn new(inner: Box<dyn QueueHandler>, copied: Arc<CopiedAreas>) -> Self {
        Self {
            inner,
            copied,
            segments: Vec::new(),
        }
    }

    /// Copies the given byte ranges of the chain (device-visible address,
    /// length) that lie in copied areas, one request per run of ranges in
    /// the same area.
    fn transfer(
        &self,
        head: u16,
        ranges: impl Iterator<Item = (u64, u64)>,
        way: Transfer,
    ) -> Result<(), ChainError> {
        let failed = |reason| {
            self.copied
                .stats
                .copies_failed
                .fetch_add(1, Ordering::Relaxed);
            ChainError::Unanswerable { head, reason }
        };
        let mut batch: Option<(AreaId, Arc<dyn AreaCopier>)> = None;
        let mut pending = [AreaRange { offset: 0, len: 0 }; MAX_COPY_RANGES];
        let mut n = 0usize;
        let mut requests = 0usize;
        let mut bytes = 0u64;
        let flush = |batch: &Option<(AreaId, Arc<dyn AreaCopier>)>,
                     pending: &[AreaRange]|
         -> Result<(), ChainError> {
            let Some((_, copier)) = batch else {
                return Ok(());
            };
            if pending.is_empty() {
                return Ok(());
            }
            self.copied.stats.copies.fetch_add(1, Ordering::Relaxed);
            let done = match way {
                Transfer::Fetch => copier.fetch(pending),
                Transfer::Store => copier.store(pending),
            };
            done.map_err(|e| {
                tracing::warn!(error = %e, "copy by the bus failed");
                failed("the copy between the driver's grant and staging failed")
            })
        };
        for (addr, len) in ranges {
            if len == 0 {
                continue;
            }
            let (id, offset) = split_area_addr(addr);
            let Some((size, copier)) = self.copied.get(id) else {
                continue; // mapped memory: nothing to stage
            };
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(failed("descriptor runs past the end of a grant"));
            }
            bytes = bytes.saturating_add(len);
            if bytes > MAX_STAGED_BYTES {
                return Err(failed("chain stages more bytes than a request may"));
            }
            let same = batch.as_ref().is_some_and(|(b, _)| *b == id);
            if !same || n == pending.len() {
                flush(&batch, pending.get(..n).unwrap_or(&[]))?;
                if n > 0 {
                    requests += 1;
                }
                if requests >= MAX_COPIES_PER_CHAIN {
                    return Err(failed("chain scattered over too many grants"));
                }
                n = 0;
                batch = Some((id, copier));
            }
            if let Some(slot) = pending.get_mut(n) {
                *slot = AreaRange { offset, len };
                n += 1;
            }
        }
        flush(&batch, pending.get(..n).unwrap_or(&[]))
    }
}

impl QueueHandler for Staged {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        if self.copied.is_empty() {
            return self.inner.handle_chain(chain, mem);
        }
        let head = chain.head_index();
        let mut segments = std::mem::take(&mut self.segments);
        let staged =
            walk_chain(chain.clone(), MAX_STAGED_DESCRIPTORS, &mut segments).and_then(|()| {
                let readable = segments
                    .iter()
                    .filter(|s| !s.writable)
                    .map(|s| (s.addr.0, u64::from(s.len)));
                self.transfer(head, readable, Transfer::Fetch)?;
                let used = self.inner.handle_chain(chain, mem)?;
                // What the model wrote: the used length from the start of
                // the writable part, and the answer byte at its very end
                // (virtio-blk's status, net control's ack), which a model
                // writes even when it writes nothing else (used length 1).
                let mut left = u64::from(used);
                let prefix = segments.iter().filter(|s| s.writable).map(|s| {
                    let take = left.min(u64::from(s.len));
                    left -= take;
                    (s.addr.0, take)
                });
                let answer = segments
                    .last()
                    .filter(|s| s.writable && s.len > 0 && used > 0)
                    .map(|s| (s.addr.0.saturating_add(u64::from(s.len) - 1), 1));
                self.transfer(head, prefix.chain(answer), Transfer::Store)?;
                Ok(used)
            });
        self.segments = segments;
        staged
    }

    fn ready(&mut self) -> bool {
        self.inner.ready()
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.inner.wake_fd()
    }

    fn serves_chain_by_chain(&self) -> bool {
        self.inner.serves_chain_by_chain()
    }

    // Staged chains are answered in full (handle_chain); chains the model
    // started before any area was copied still complete through it.
    fn submit_started(&mut self) {
        self.inner.submit_started();
    }

    fn next_completed(&mut self) -> Option<Completed> {
        self.inner.next_completed()
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight()
    }

    fn process(
        &mut self,
        queue: &mut Queue,
        mem: &DeviceMemory,
        stats: &QueueStats,
    ) -> Result<Processed, QueueFailure> {
        if self.copied.is_empty() || !self.inner.serves_chain_by_chain() {
            // No copied areas, or a model that serves the queue its own
            // way (net RX, rng): the model's own way. Such queues are not
            // staged; their buffers must be mapped memory.
            self.inner.process(queue, mem, stats)
        } else {
            // Chain by chain, so that every chain is staged.
            process_queue(queue, mem, self, stats)
        }
    }
}
