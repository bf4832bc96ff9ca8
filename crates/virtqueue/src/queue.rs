//! The split virtqueue, driver side (virtio 1.2, 2.7).

use core::ptr::{self, NonNull};
use core::sync::atomic::{fence, AtomicU16, Ordering};

use thiserror::Error;

/// The largest queue the spec allows (2.7: "Queue Size ... maximum 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Default capacity of a [`SplitQueue`]'s private bookkeeping, in descriptors.
///
/// QEMU's and Linux's largest common queue size. A queue of up to 32768
/// descriptors needs `SplitQueue<32768>` (256 KiB of private state).
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 1024;

const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Device-visible memory handed to the driver.
#[derive(Debug, Clone, Copy)]
pub struct DmaRegion {
    /// This side's mapping of byte 0.
    pub vaddr: NonNull<u8>,
    /// The device's address of byte 0.
    pub paddr: u64,
    /// Length in bytes.
    pub len: usize,
}

// SAFETY: a DmaRegion only describes memory; every access through it goes
// through an unsafe constructor (`SplitQueue::new`, `BlkDriver::new`) whose
// contract covers that memory, wherever the region was described.
unsafe impl Send for DmaRegion {}
// SAFETY: as for Send: sharing the description gives no access by itself.
unsafe impl Sync for DmaRegion {}

/// One buffer of a descriptor chain, by device address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Device address of the buffer.
    pub addr: u64,
    /// Length in bytes (non-zero).
    pub len: u32,
    /// The device writes this buffer (`VIRTQ_DESC_F_WRITE`); otherwise it reads it.
    pub device_writes: bool,
}

/// A chain the device has finished with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Used {
    /// Head descriptor id, as [`SplitQueue::add`] returned it.
    pub head: u16,
    /// Bytes the device says it wrote into the chain's device-writable
    /// buffers (validated: never more than those buffers hold).
    pub len: u32,
}

/// What was wrong with what the device put in the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum UsedFault {
    /// `used.idx` moved past more elements than there are chains published
    /// and not yet taken back.
    #[error("used.idx {used_idx} is {pending} ahead of the last taken, but only {outstanding} chains are published and not taken")]
    IdxJump {
        /// The `used.idx` read.
        used_idx: u16,
        /// `used.idx` minus the driver's last used index.
        pending: u16,
        /// Chains published and not yet taken back.
        outstanding: u16,
    },
    /// The element's id is not a descriptor index.
    #[error("id {id} is not below the queue size {size}")]
    IdOutOfRange {
        /// The id the device wrote.
        id: u32,
        /// The queue size.
        size: u16,
    },
    /// The id names no chain head in flight (never added, or already taken).
    #[error("id {id} is not the head of a chain in flight")]
    NotInFlight {
        /// The id the device wrote.
        id: u16,
    },
    /// The device claims to have written more than the chain's writable buffers hold.
    #[error("len {len} exceeds the {writable} device-writable bytes of chain {id}")]
    LenTooLarge {
        /// The chain's head id.
        id: u16,
        /// The len the device wrote.
        len: u32,
        /// Device-writable bytes in that chain.
        writable: u32,
    },
}

/// Errors of [`SplitQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum QueueError {
    /// The size is not a power of two in `1..=min(MAX, 32768)`.
    #[error("queue size {size} is not a power of two in 1..={max}")]
    BadSize {
        /// The size asked for.
        size: u16,
        /// The largest size this queue type takes.
        max: usize,
    },
    /// The region is smaller than [`SplitQueue::region_size`].
    #[error("region of {len} bytes is smaller than the {needed} a queue of {size} needs")]
    RegionTooSmall {
        /// The region's length.
        len: usize,
        /// Bytes needed.
        needed: usize,
        /// The queue size.
        size: u16,
    },
    /// The region is not 16-byte aligned on both sides (the descriptor table
    /// must be, and the rings are laid out from it).
    #[error("region not 16-byte aligned (vaddr {vaddr:#x}, paddr {paddr:#x})")]
    Misaligned {
        /// This side's address.
        vaddr: usize,
        /// The device's address.
        paddr: u64,
    },
    /// The region's device addresses wrap around the 64-bit space.
    #[error("region at device address {paddr:#x} of {len} bytes wraps the address space")]
    RegionWraps {
        /// The device's address.
        paddr: u64,
        /// Length in bytes.
        len: usize,
    },
    /// A chain must have 1..=size segments.
    #[error("a chain needs 1..={size} segments, got {segments}")]
    BadChainLength {
        /// Segments given.
        segments: usize,
        /// The queue size.
        size: u16,
    },
    /// Not enough free descriptors now; take completions back first.
    #[error("queue full: the chain needs {needed} descriptors, {free} are free")]
    QueueFull {
        /// Descriptors the chain needs.
        needed: usize,
        /// Descriptors free.
        free: u16,
    },
    /// Device-readable segments must all come before device-writable ones.
    #[error("segment {index} is device-readable but follows a device-writable one")]
    ReadableAfterWritable {
        /// Index of the offending segment.
        index: usize,
    },
    /// A zero-length segment.
    #[error("segment {index} is empty")]
    EmptySegment {
        /// Index of the offending segment.
        index: usize,
    },
    /// A segment wrapping the device address space.
    #[error("segment {index} at {addr:#x} of {len} bytes wraps the address space")]
    SegmentWraps {
        /// Index of the offending segment.
        index: usize,
        /// Its device address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The device-writable segments add up to more than a used element's
    /// 32-bit len can report.
    #[error("the chain's device-writable segments add up to more than u32::MAX bytes")]
    WritableTooLarge,
    /// The device wrote something invalid into the used ring. The queue is
    /// broken from then on: reset the device.
    #[error("bad used element at used index {last_used}: {fault}")]
    BadUsed {
        /// The driver's used index the element was read at.
        last_used: u16,
        /// What was wrong.
        fault: UsedFault,
    },
    /// An earlier [`QueueError::BadUsed`] broke the queue.
    #[error("the queue is broken by an earlier bad used element; reset the device")]
    Broken,
}

/// `vring_need_event` (virtio 1.2, 2.7.10; Linux `virtio_ring.h`): must the
/// other side be notified, now that its index moved from `old` to `new` and
/// the peer asked to hear once the index passes `event`?
///
/// True iff `event` lies in `[old, new)` on the 16-bit circle, i.e. the batch
/// `(old, new]` took the index past `event`. Wrapping arithmetic makes it
/// correct across 65535 → 0.
#[inline]
pub const fn vring_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Byte offsets of the three parts of a queue of `size` within its region.
#[derive(Clone, Copy)]
struct Layout {
    avail: usize,
    used: usize,
    total: usize,
}

impl Layout {
    const fn new(size: u16) -> Self {
        let n = size as usize;
        // Descriptor table 16 * n at 0 (16-aligned), avail ring 6 + 2n right
        // after it (2-aligned), used ring 6 + 8n at the next 4-byte boundary.
        let avail = 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        Layout {
            avail,
            used,
            total: used + 6 + 8 * n,
        }
    }
}

/// A descriptor as the device reads it (little-endian fields).
#[repr(C)]
struct RawDesc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A used element as the device writes it (little-endian fields).
#[repr(C)]
#[derive(Clone, Copy)]
struct RawUsedElem {
    id: u32,
    len: u32,
}

/// Driver-private state of one descriptor.
#[derive(Clone, Copy)]
struct Slot {
    /// Free: the next free descriptor. In a chain: the next one in the chain
    /// (chains are taken from the free list in order, so both coincide).
    next: u16,
    /// At the head of a chain in flight: its number of descriptors; 0 otherwise.
    chain_len: u16,
    /// At the head of a chain in flight: its device-writable bytes.
    writable: u32,
}

/// The driver side of a split virtqueue in caller-provided device-visible memory.
///
/// `MAX` bounds the queue size and sizes the private bookkeeping (8 bytes per
/// descriptor); the default fits sizes up to [`DEFAULT_MAX_QUEUE_SIZE`].
/// [`SplitQueue::new`] builds the default type; [`SplitQueue::new_bounded`]
/// any `MAX`.
///
/// Use: [`add`](Self::add) chains, [`publish`](Self::publish) them and notify
/// if it says so, take completions with [`pop_used`](Self::pop_used), and
/// before sleeping on the device's notification call [`arm`](Self::arm) and
/// sleep only if it returns false.
pub struct SplitQueue<const MAX: usize = DEFAULT_MAX_QUEUE_SIZE> {
    base: NonNull<u8>,
    paddr: u64,
    size: u16,
    layout: Layout,
    event_idx: bool,
    slots: [Slot; MAX],
    free_head: u16,
    num_free: u16,
    in_flight: u16,
    /// Next avail index to fill (private until published).
    avail_idx: u16,
    /// The avail index last stored to `avail.idx`.
    published: u16,
    /// Used index of the next element to take.
    last_used: u16,
    broken: bool,
}

// SAFETY: the queue owns its raw pointers into the region exclusively on the
// driver side (SplitQueue::new's contract: nothing but the device uses it), so
// moving the queue to another thread moves that exclusive use with it.
unsafe impl<const MAX: usize> Send for SplitQueue<MAX> {}

impl SplitQueue {
    /// Bytes of region a queue of `size` needs: descriptor table (16 * size,
    /// 16-aligned), avail ring (6 + 2 * size), used ring (6 + 8 * size) at a
    /// 4-byte aligned offset.
    pub const fn region_size(size: u16) -> usize {
        Layout::new(size).total
    }

    /// Lays out a queue of `size` descriptors in `region` and zeroes it.
    ///
    /// With `event_idx` (`VIRTIO_RING_F_EVENT_IDX` negotiated) notifications
    /// are suppressed by event indices, otherwise by ring flags. The queue
    /// starts armed: the device notifies on the first used element.
    ///
    /// # Safety
    ///
    /// `region` is valid for reads and writes for `region_size(size)` bytes,
    /// not used by anything else but the device while the queue lives, and
    /// the device sees it at `region.paddr`.
    ///
    /// # Errors
    ///
    /// [`QueueError::BadSize`] unless `size` is a power of two in
    /// `1..=DEFAULT_MAX_QUEUE_SIZE`; [`QueueError::RegionTooSmall`],
    /// [`QueueError::Misaligned`] (both addresses must be 16-aligned),
    /// [`QueueError::RegionWraps`].
    pub unsafe fn new(size: u16, region: DmaRegion, event_idx: bool) -> Result<Self, QueueError> {
        // SAFETY: the caller's contract is new_bounded's.
        unsafe { Self::new_bounded(size, region, event_idx) }
    }
}

impl<const MAX: usize> SplitQueue<MAX> {
    /// [`SplitQueue::new`] for any capacity `MAX` (sizes up to `min(MAX, 32768)`).
    ///
    /// # Safety
    ///
    /// As [`SplitQueue::new`].
    ///
    /// # Errors
    ///
    /// As [`SplitQueue::new`], with `min(MAX, 32768)` as the largest size.
    pub unsafe fn new_bounded(
        size: u16,
        region: DmaRegion,
        event_idx: bool,
    ) -> Result<Self, QueueError> {
        let max = if MAX < MAX_QUEUE_SIZE as usize {
            MAX
        } else {
            MAX_QUEUE_SIZE as usize
        };
        if !size.is_power_of_two() || usize::from(size) > max {
            return Err(QueueError::BadSize { size, max });
        }
        let layout = Layout::new(size);
        if region.len < layout.total {
            return Err(QueueError::RegionTooSmall {
                len: region.len,
                needed: layout.total,
                size,
            });
        }
        let vaddr = region.vaddr.as_ptr() as usize;
        if !vaddr.is_multiple_of(16) || !region.paddr.is_multiple_of(16) {
            return Err(QueueError::Misaligned {
                vaddr,
                paddr: region.paddr,
            });
        }
        if region.paddr.checked_add(layout.total as u64).is_none() {
            return Err(QueueError::RegionWraps {
                paddr: region.paddr,
                len: layout.total,
            });
        }
        for i in 0..layout.total {
            // SAFETY: i < layout.total <= region.len, and the caller gives us
            // the region for reads and writes. Volatile: the memory is shared.
            unsafe { ptr::write_volatile(region.vaddr.as_ptr().add(i), 0) };
        }
        let mut slots = [Slot {
            next: 0,
            chain_len: 0,
            writable: 0,
        }; MAX];
        // Free list 0 -> 1 -> ... -> size-1; the last link (size) is never
        // followed because num_free runs out first.
        for (i, slot) in slots.iter_mut().take(usize::from(size)).enumerate() {
            slot.next = (i as u16).wrapping_add(1);
        }
        Ok(SplitQueue {
            base: region.vaddr,
            paddr: region.paddr,
            size,
            layout,
            event_idx,
            slots,
            free_head: 0,
            num_free: size,
            in_flight: 0,
            avail_idx: 0,
            published: 0,
            last_used: 0,
            broken: false,
        })
    }

    /// The queue size (number of descriptors).
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Whether event-index suppression is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Device addresses of (descriptor table, driver area = avail ring,
    /// device area = used ring), for `Transport::queue_set`.
    pub fn addresses(&self) -> (u64, u64, u64) {
        // No overflow: new() checked paddr + layout.total.
        (
            self.paddr,
            self.paddr + self.layout.avail as u64,
            self.paddr + self.layout.used as u64,
        )
    }

    /// Descriptors free for new chains.
    pub fn free_descriptors(&self) -> u16 {
        self.num_free
    }

    /// Chains added and not yet taken back by [`pop_used`](Self::pop_used).
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// The head id the next successful [`add`](Self::add) will return, if
    /// any descriptor is free. Lets a caller place per-request data indexed
    /// by head (as [`crate::BlkDriver`] does with its headers) before adding.
    pub fn next_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Whether a bad used element broke the queue.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Adds one chain without publishing it; returns its head id.
    ///
    /// Device-readable segments must come first (virtio 2.7.4.2), each segment
    /// non-empty and not wrapping the address space.
    ///
    /// # Errors
    ///
    /// [`QueueError::BadChainLength`], [`QueueError::QueueFull`],
    /// [`QueueError::ReadableAfterWritable`], [`QueueError::EmptySegment`],
    /// [`QueueError::SegmentWraps`], [`QueueError::WritableTooLarge`],
    /// [`QueueError::Broken`]. On error nothing was added.
    pub fn add(&mut self, segments: &[Segment]) -> Result<u16, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        let n = segments.len();
        if n == 0 || n > usize::from(self.size) {
            return Err(QueueError::BadChainLength {
                segments: n,
                size: self.size,
            });
        }
        if n > usize::from(self.num_free) {
            return Err(QueueError::QueueFull {
                needed: n,
                free: self.num_free,
            });
        }
        // Validate everything before touching any state.
        let mut writable: u32 = 0;
        let mut seen_writable = false;
        for (index, s) in segments.iter().enumerate() {
            if s.len == 0 {
                return Err(QueueError::EmptySegment { index });
            }
            if s.addr.checked_add(u64::from(s.len)).is_none() {
                return Err(QueueError::SegmentWraps {
                    index,
                    addr: s.addr,
                    len: s.len,
                });
            }
            if s.device_writes {
                seen_writable = true;
                writable = writable
                    .checked_add(s.len)
                    .ok_or(QueueError::WritableTooLarge)?;
            } else if seen_writable {
                return Err(QueueError::ReadableAfterWritable { index });
            }
        }
        let head = self.free_head;
        let mut idx = head;
        for (i, s) in segments.iter().enumerate() {
            let next = self.slots[usize::from(idx)].next;
            let last = i + 1 == n;
            let mut flags = if s.device_writes { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            let desc = RawDesc {
                addr: s.addr.to_le(),
                len: s.len.to_le(),
                flags: flags.to_le(),
                next: if last { 0 } else { next.to_le() },
            };
            // SAFETY: idx < size (free-list entries are), so the descriptor
            // lies within the table at the region's 16-aligned start.
            unsafe { ptr::write_volatile(self.desc_ptr(idx), desc) };
            if last {
                self.free_head = next;
            } else {
                idx = next;
            }
        }
        let slot = &mut self.slots[usize::from(head)];
        slot.chain_len = n as u16; // n <= size <= 32768
        slot.writable = writable;
        let ring_slot = self.avail_idx & (self.size - 1);
        // SAFETY: ring_slot < size: within the avail ring.
        unsafe { ptr::write_volatile(self.avail_ring_ptr(ring_slot), head.to_le()) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.num_free -= n as u16;
        self.in_flight += 1;
        Ok(head)
    }

    /// Publishes every chain added since the last publish, and says whether
    /// the device wants a notification (the caller must then notify).
    ///
    /// One release store of `avail.idx`, then a full fence, then the device's
    /// wish: with EVENT_IDX `vring_need_event(avail_event, new, old)`, without
    /// it `used.flags` lacks `NO_NOTIFY`. The fence pairs with the device's
    /// own (write `avail_event`, fence, re-read `avail.idx`): at least one of
    /// the two sides sees the other's store, so a request is never stranded.
    /// Returns false when nothing was added since the last publish.
    pub fn publish(&mut self) -> bool {
        let new = self.avail_idx;
        let old = self.published;
        if new == old {
            return false;
        }
        self.avail_idx_atomic()
            .store(new.to_le(), Ordering::Release);
        self.published = new;
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = u16::from_le(self.avail_event_atomic().load(Ordering::Relaxed));
            vring_need_event(event, new, old)
        } else {
            u16::from_le(self.used_flags_atomic().load(Ordering::Relaxed)) & USED_F_NO_NOTIFY == 0
        }
    }

    /// Takes the next used element, if any, and frees its chain.
    ///
    /// `used.idx` is loaded with acquire ordering (so the device's writes to
    /// the buffers are visible), the element is read once and validated: the
    /// index must not run ahead of what was published, the id must be the
    /// head of a chain in flight, len at most that chain's writable bytes.
    ///
    /// # Errors
    ///
    /// [`QueueError::BadUsed`] on any of those (the queue is broken from
    /// then on), [`QueueError::Broken`] after one.
    pub fn pop_used(&mut self) -> Result<Option<Used>, QueueError> {
        if self.broken {
            return Err(QueueError::Broken);
        }
        let used_idx = u16::from_le(self.used_idx_atomic().load(Ordering::Acquire));
        let pending = used_idx.wrapping_sub(self.last_used);
        if pending == 0 {
            return Ok(None);
        }
        // At most `size` chains are ever outstanding, so this u16 difference is exact.
        let outstanding = self.published.wrapping_sub(self.last_used);
        if pending > outstanding {
            return Err(self.bad_used(UsedFault::IdxJump {
                used_idx,
                pending,
                outstanding,
            }));
        }
        let ring_slot = self.last_used & (self.size - 1);
        // SAFETY: ring_slot < size: within the used ring, 4-aligned (the used
        // ring starts 4-aligned and elements are 8 bytes). Read once.
        let elem = unsafe { ptr::read_volatile(self.used_elem_ptr(ring_slot)) };
        let id = u32::from_le(elem.id);
        let len = u32::from_le(elem.len);
        if id >= u32::from(self.size) {
            return Err(self.bad_used(UsedFault::IdOutOfRange {
                id,
                size: self.size,
            }));
        }
        let head = id as u16;
        let slot = self.slots[usize::from(head)];
        if slot.chain_len == 0 {
            return Err(self.bad_used(UsedFault::NotInFlight { id: head }));
        }
        if len > slot.writable {
            return Err(self.bad_used(UsedFault::LenTooLarge {
                id: head,
                len,
                writable: slot.writable,
            }));
        }
        self.free_chain(head, slot.chain_len);
        self.last_used = self.last_used.wrapping_add(1);
        Ok(Some(Used { head, len }))
    }

    /// True if the device has used an element that [`SplitQueue::pop_used`]
    /// has not taken yet (for polling; `pop_used` validates it).
    pub fn has_used(&self) -> bool {
        u16::from_le(self.used_idx_atomic().load(Ordering::Acquire)) != self.last_used
    }

    /// Asks for a notification on the next used element and says whether
    /// one is already pending (then the caller must not sleep: take it).
    ///
    /// EVENT_IDX: `used_event = last_used`; otherwise clears
    /// `VRING_AVAIL_F_NO_INTERRUPT`. Then a full fence and a re-read of
    /// `used.idx`: pairs with the device's (write `used.idx`, fence, read
    /// `used_event`), so either the device sees the request to notify or
    /// this re-read sees its element.
    pub fn arm(&mut self) -> bool {
        if self.event_idx {
            self.used_event_atomic()
                .store(self.last_used.to_le(), Ordering::Relaxed);
        } else {
            self.avail_flags_atomic().store(0, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
        u16::from_le(self.used_idx_atomic().load(Ordering::Acquire)) != self.last_used
    }

    /// Stops asking for notifications (for polling): EVENT_IDX sets
    /// `used_event` one behind the last used index, i.e. as far behind as
    /// possible; otherwise sets `VRING_AVAIL_F_NO_INTERRUPT`. The device may
    /// still notify (a hint, not a guarantee).
    pub fn disarm(&mut self) {
        if self.event_idx {
            self.used_event_atomic()
                .store(self.last_used.wrapping_sub(1).to_le(), Ordering::Relaxed);
        } else {
            self.avail_flags_atomic()
                .store(AVAIL_F_NO_INTERRUPT.to_le(), Ordering::Relaxed);
        }
    }

    fn bad_used(&mut self, fault: UsedFault) -> QueueError {
        self.broken = true;
        QueueError::BadUsed {
            last_used: self.last_used,
            fault,
        }
    }

    fn free_chain(&mut self, head: u16, chain_len: u16) {
        let mut tail = head;
        // Bounded by chain_len <= size; the links are private, so they hold.
        for _ in 1..chain_len {
            tail = self.slots[usize::from(tail)].next;
        }
        self.slots[usize::from(tail)].next = self.free_head;
        let slot = &mut self.slots[usize::from(head)];
        slot.chain_len = 0;
        slot.writable = 0;
        self.free_head = head;
        self.num_free += chain_len;
        self.in_flight -= 1;
    }

    fn at(&self, offset: usize) -> *mut u8 {
        // SAFETY: callers pass offsets below layout.total <= region.len, so
        // the result stays within the region.
        unsafe { self.base.as_ptr().add(offset) }
    }

    fn desc_ptr(&self, idx: u16) -> *mut RawDesc {
        self.at(16 * usize::from(idx)).cast()
    }

    fn avail_ring_ptr(&self, slot: u16) -> *mut u16 {
        self.at(self.layout.avail + 4 + 2 * usize::from(slot))
            .cast()
    }

    fn used_elem_ptr(&self, slot: u16) -> *const RawUsedElem {
        self.at(self.layout.used + 4 + 8 * usize::from(slot)).cast()
    }

    /// The ring index or flag word at `offset` as an atomic: the region is
    /// shared with the device.
    fn atomic_u16(&self, offset: usize) -> &AtomicU16 {
        // SAFETY: every offset passed is 2-aligned (the region is 16-aligned,
        // avail and used start 2- and 4-aligned, the fields are at even
        // offsets in them) and below layout.total, so within the region,
        // which lives as long as self (new's contract). Only atomic and
        // volatile accesses are made to the shared memory.
        unsafe { AtomicU16::from_ptr(self.at(offset).cast()) }
    }

    fn avail_flags_atomic(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.avail)
    }

    fn avail_idx_atomic(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.avail + 2)
    }

    fn used_event_atomic(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.avail + 4 + 2 * usize::from(self.size))
    }

    fn used_flags_atomic(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.used)
    }

    fn used_idx_atomic(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.used + 2)
    }

    fn avail_event_atomic(&self) -> &AtomicU16 {
        self.atomic_u16(self.layout.used + 4 + 8 * usize::from(self.size))
    }
}

impl<const MAX: usize> core::fmt::Debug for SplitQueue<MAX> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SplitQueue")
            .field("paddr", &self.paddr)
            .field("size", &self.size)
            .field("event_idx", &self.event_idx)
            .field("free", &self.num_free)
            .field("in_flight", &self.in_flight)
            .field("avail_idx", &self.avail_idx)
            .field("published", &self.published)
            .field("last_used", &self.last_used)
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}
