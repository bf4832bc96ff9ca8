//! The message queues in the ivshmem shared memory, laid out as Linux's
//! virtio-msg AMP layer lays them out: one 4 KiB page per direction, a
//! single-producer single-consumer ring of 64-byte slots.
//!
//! | offset | field |
//! |---|---|
//! | 0 | le32 `head`: the next slot the producer writes |
//! | 64 | le32 `tail`: the next slot the consumer reads |
//! | 128 + 64 × i | slot i, i < 62: one message, padded to 64 bytes |
//!
//! Indices wrap at 62; the queue is empty when `head == tail` and full when
//! `head + 1 == tail` (one slot stays free). Each side keeps its own index
//! privately and only publishes it: the peer's copy in shared memory is
//! never read back, so a peer that scribbles over it changes nothing. The
//! other side's index is read once per look, with acquire ordering, and
//! checked to be below 62.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Bytes, MmapRegion, VolatileMemory};

/// Bytes per slot (and the largest message).
pub const SLOT_SIZE: usize = 64;
/// Slots per queue.
pub const SLOTS: u32 = 62;
/// Bytes of one queue (one page).
pub const QUEUE_BYTES: usize = 4096;
const HEAD: usize = 0;
const TAIL: usize = 64;
const FIRST_SLOT: usize = 128;

/// The peer published an index outside the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the peer's queue index {index} is not below {SLOTS}")]
pub struct Corrupt {
    /// The index it published.
    pub index: u32,
}

fn slot_offset(index: u32) -> usize {
    FIRST_SLOT + index as usize * SLOT_SIZE
}

/// One queue page inside a shared mapping.
#[derive(Clone)]
struct Page {
    mem: Arc<MmapRegion>,
    base: usize,
}

impl Page {
    fn new(mem: Arc<MmapRegion>, base: usize) -> Option<Self> {
        (base.checked_add(QUEUE_BYTES)? <= mem.size()).then_some(Self { mem, base })
    }

    fn load(&self, at: usize) -> u32 {
        let v: u32 = self
            .mem
            .as_volatile_slice()
            .load(self.base + at, Ordering::Acquire)
            .unwrap_or(u32::MAX);
        u32::from_le(v)
    }

    fn store(&self, at: usize, v: u32) {
        let _ = self
            .mem
            .as_volatile_slice()
            .store(v.to_le(), self.base + at, Ordering::Release);
    }
}

/// The producer's end.
pub struct Producer {
    page: Page,
    head: u32,
}

impl Producer {
    /// The producer of the queue at `base` in `mem`, starting empty (it
    /// publishes head 0).
    pub fn new(mem: Arc<MmapRegion>, base: usize) -> Option<Self> {
        let page = Page::new(mem, base)?;
        page.store(HEAD, 0);
        Some(Self { page, head: 0 })
    }

    /// Puts one message (at most [`SLOT_SIZE`] bytes, zero padded) in the
    /// queue. `Ok(false)` when the queue is full.
    pub fn push(&mut self, msg: &[u8]) -> Result<bool, Corrupt> {
        let tail = self.page.load(TAIL);
        if tail >= SLOTS {
            return Err(Corrupt { index: tail });
        }
        let next = (self.head + 1) % SLOTS;
        if next == tail {
            return Ok(false);
        }
        let mut slot = [0u8; SLOT_SIZE];
        let n = msg.len().min(SLOT_SIZE);
        if let (Some(d), Some(s)) = (slot.get_mut(..n), msg.get(..n)) {
            d.copy_from_slice(s);
        }
        let _ = self
            .page
            .mem
            .as_volatile_slice()
            .write_slice(&slot, self.page.base + slot_offset(self.head));
        // Release: the slot's bytes are visible before the new head.
        self.page.store(HEAD, next);
        self.head = next;
        Ok(true)
    }
}

/// The consumer's end.
pub struct Consumer {
    page: Page,
    tail: u32,
}

impl Consumer {
    /// The consumer of the queue at `base` in `mem`, starting empty (it
    /// publishes tail 0).
    pub fn new(mem: Arc<MmapRegion>, base: usize) -> Option<Self> {
        let page = Page::new(mem, base)?;
        page.store(TAIL, 0);
        Some(Self { page, tail: 0 })
    }

    /// Takes the next message into `buf`; `Ok(false)` when the queue is empty.
    pub fn pop(&mut self, buf: &mut [u8; SLOT_SIZE]) -> Result<bool, Corrupt> {
        let head = self.page.load(HEAD);
        if head >= SLOTS {
            return Err(Corrupt { index: head });
        }
        if head == self.tail {
            return Ok(false);
        }
        // Copied out once; the peer may rewrite the slot meanwhile, but
        // only this copy is ever looked at.
        let _ = self
            .page
            .mem
            .as_volatile_slice()
            .read_slice(buf, self.page.base + slot_offset(self.tail));
        self.tail = (self.tail + 1) % SLOTS;
        self.page.store(TAIL, self.tail);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page() -> Arc<MmapRegion> {
        Arc::new(MmapRegion::new(2 * QUEUE_BYTES).unwrap())
    }

    #[test]
    fn layout_fills_a_page_exactly() {
        assert_eq!(slot_offset(SLOTS), QUEUE_BYTES);
    }

    #[test]
    fn messages_arrive_in_order_across_wrap_and_the_queue_keeps_one_slot_free() {
        let mem = page();
        let mut p = Producer::new(mem.clone(), QUEUE_BYTES).unwrap();
        let mut c = Consumer::new(mem.clone(), QUEUE_BYTES).unwrap();
        let mut buf = [0u8; SLOT_SIZE];
        let mut sent = 0u32;
        let mut got = 0u32;
        for _ in 0..5 {
            while p.push(&sent.to_le_bytes()).unwrap() {
                sent += 1;
            }
            assert_eq!(sent - got, SLOTS - 1, "full with one slot free");
            while c.pop(&mut buf).unwrap() {
                assert_eq!(&buf[..4], &got.to_le_bytes());
                assert!(buf[4..].iter().all(|&b| b == 0), "padded with zeroes");
                got += 1;
            }
            assert_eq!(got, sent);
        }
        // The indices the other side reads are where the spec puts them.
        let head: u32 = mem.as_volatile_slice().read_obj(QUEUE_BYTES).unwrap();
        let tail: u32 = mem.as_volatile_slice().read_obj(QUEUE_BYTES + 64).unwrap();
        assert_eq!((head, tail), (sent % SLOTS, got % SLOTS));
    }

    #[test]
    fn a_corrupt_index_is_refused_and_our_own_is_never_read_back() {
        let mem = page();
        let mut p = Producer::new(mem.clone(), 0).unwrap();
        let mut c = Consumer::new(mem.clone(), 0).unwrap();
        let mut buf = [0u8; SLOT_SIZE];
        mem.as_volatile_slice().write_obj(62u32, HEAD).unwrap();
        assert_eq!(c.pop(&mut buf), Err(Corrupt { index: 62 }));
        mem.as_volatile_slice().write_obj(u32::MAX, TAIL).unwrap();
        assert_eq!(p.push(b"x"), Err(Corrupt { index: u32::MAX }));
        // The peer rewrites our head: we publish our own again on the next push.
        mem.as_volatile_slice().write_obj(0u32, TAIL).unwrap();
        mem.as_volatile_slice().write_obj(40u32, HEAD).unwrap();
        assert!(p.push(b"y").unwrap());
        let head: u32 = mem.as_volatile_slice().read_obj(HEAD).unwrap();
        assert_eq!(head, 1);
        assert!(c.pop(&mut buf).unwrap());
        assert_eq!(buf[0], b'y');
        assert!(!c.pop(&mut buf).unwrap());
    }
}
