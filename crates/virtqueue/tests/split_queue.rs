//! SplitQueue against the bytes of its rings: layout, free list, limits,
//! hostile used elements, and the notification-suppression arithmetic.
//! The test plays the device by reading and writing the shared memory at
//! device addresses.

#![allow(missing_docs)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use common::{Mem, Rng, PADDR};
use ringfence_virtqueue::{
    vring_need_event, DmaRegion, QueueError, Segment, SplitQueue, Used, UsedFault,
};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Rig {
    mem: Arc<Mem>,
    q: SplitQueue,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
}

fn rig(size: u16, event_idx: bool) -> Rig {
    let mem = Mem::new(1 << 20);
    let region = mem.region(0, SplitQueue::region_size(size));
    // SAFETY: the mapping lives in the rig as long as the queue.
    // SAFETY: `big` outlives the queue, which is dropped at once.
    let q = unsafe { SplitQueue::new(size, region, event_idx).unwrap() };
    let (desc, avail, used) = q.addresses();
    Rig {
        mem,
        q,
        size,
        desc,
        avail,
        used,
    }
}

fn r(addr: u64, len: u32) -> Segment {
    Segment {
        addr,
        len,
        device_writes: false,
    }
}

fn w(addr: u64, len: u32) -> Segment {
    Segment {
        addr,
        len,
        device_writes: true,
    }
}

impl Rig {
    fn desc_bytes(&self, i: u16) -> [u8; 16] {
        self.mem.read(self.desc + 16 * u64::from(i))
    }

    /// (addr, len, flags, next) of descriptor `i`.
    fn desc(&self, i: u16) -> (u64, u32, u16, u16) {
        let b = self.desc_bytes(i);
        (
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            u16::from_le_bytes(b[12..14].try_into().unwrap()),
            u16::from_le_bytes(b[14..16].try_into().unwrap()),
        )
    }

    /// Descriptor ids of the chain at `head`, following the table as a device would.
    fn chain(&self, head: u16) -> Vec<u16> {
        let mut ids = vec![head];
        let mut i = head;
        while self.desc(i).2 & F_NEXT != 0 {
            i = self.desc(i).3;
            assert!(ids.len() <= usize::from(self.size), "chain loops");
            ids.push(i);
        }
        ids
    }

    fn u16_at(&self, addr: u64) -> u16 {
        u16::from_le_bytes(self.mem.read(addr))
    }

    fn set_u16(&self, addr: u64, v: u16) {
        self.mem.write(addr, v.to_le_bytes());
    }

    fn avail_flags(&self) -> u16 {
        self.u16_at(self.avail)
    }

    fn avail_idx(&self) -> u16 {
        self.u16_at(self.avail + 2)
    }

    fn avail_ring(&self, slot: u16) -> u16 {
        self.u16_at(self.avail + 4 + 2 * u64::from(slot))
    }

    fn used_event(&self) -> u16 {
        self.u16_at(self.avail + 4 + 2 * u64::from(self.size))
    }

    fn used_idx(&self) -> u16 {
        self.u16_at(self.used + 2)
    }

    fn set_used_flags(&self, v: u16) {
        self.set_u16(self.used, v);
    }

    fn set_used_idx(&self, v: u16) {
        self.set_u16(self.used + 2, v);
    }

    fn set_avail_event(&self, v: u16) {
        self.set_u16(self.used + 4 + 8 * u64::from(self.size), v);
    }

    /// The device puts (id, len) in the used ring and bumps used.idx.
    fn push_used(&self, id: u32, len: u32) {
        let idx = self.used_idx();
        let slot = u64::from(idx % self.size);
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&id.to_le_bytes());
        e[4..].copy_from_slice(&len.to_le_bytes());
        self.mem.write(self.used + 4 + 8 * slot, e);
        self.set_used_idx(idx.wrapping_add(1));
    }

    /// One request through the whole cycle: add, publish, complete, pop.
    fn cycle(&mut self) -> bool {
        let head = self.q.add(&[w(0x5000, 8)]).unwrap();
        let notify = self.q.publish();
        self.push_used(u32::from(head), 8);
        assert_eq!(self.q.pop_used().unwrap(), Some(Used { head, len: 8 }));
        notify
    }
}

#[test]
fn layout_and_addresses() {
    // desc 16*8 = 128, avail 6+16 = 22 at 128, used at align4(150) = 152, 6+64 long.
    assert_eq!(SplitQueue::region_size(8), 222);
    assert_eq!(SplitQueue::region_size(1), 16 + 8 + 14);
    assert_eq!(SplitQueue::region_size(256), 4096 + 520 + 6 + 8 * 256);
    let rig = rig(8, true);
    assert_eq!(
        (rig.desc, rig.avail, rig.used),
        (PADDR, PADDR + 128, PADDR + 152)
    );
    assert_eq!(rig.q.size(), 8);
    assert_eq!(rig.q.free_descriptors(), 8);
    assert_eq!(rig.q.in_flight(), 0);
}

#[test]
fn chain_descriptors_byte_for_byte() {
    let mut rig = rig(8, true);
    let head = rig
        .q
        .add(&[
            r(0x1122_3344_5566_7788, 16),
            w(0x0000_0001_0000_2000, 0x0102_0304),
            w(0xffff_ffff_ffff_fff0, 1),
        ])
        .unwrap();
    assert_eq!(head, 0);
    let mut d0 = [0u8; 16];
    d0[..8].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    d0[8..12].copy_from_slice(&16u32.to_le_bytes());
    d0[12..14].copy_from_slice(&F_NEXT.to_le_bytes());
    d0[14..16].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(rig.desc_bytes(0), d0);
    assert_eq!(
        rig.desc(1),
        (0x0000_0001_0000_2000, 0x0102_0304, F_NEXT | F_WRITE, 2)
    );
    assert_eq!(rig.desc(2), (0xffff_ffff_ffff_fff0, 1, F_WRITE, 0));
    // In the ring, not yet published.
    assert_eq!(rig.avail_ring(0), 0);
    assert_eq!(rig.avail_idx(), 0);
    assert_eq!(rig.q.free_descriptors(), 5);
    assert_eq!(rig.q.in_flight(), 1);

    let head = rig.q.add(&[w(0x9000, 4)]).unwrap();
    assert_eq!(head, 3);
    assert_eq!(rig.desc(3), (0x9000, 4, F_WRITE, 0));
    assert_eq!(rig.avail_ring(1), 3);
    assert_eq!(rig.avail_idx(), 0);
    rig.q.publish();
    assert_eq!(rig.avail_idx(), 2, "one publish covers both chains");
    assert!(!rig.q.publish(), "nothing new: no notification");
    assert_eq!(rig.avail_idx(), 2);
}

#[test]
fn free_list_reuses_descriptors() {
    let mut rig = rig(4, true);
    assert_eq!(rig.q.next_head(), Some(0));
    let a = rig.q.add(&[r(0x1000, 1), w(0x2000, 1)]).unwrap();
    let b = rig.q.add(&[r(0x3000, 1), w(0x4000, 1)]).unwrap();
    assert_eq!((a, b), (0, 2));
    assert_eq!(rig.q.next_head(), None);
    assert_eq!(
        rig.q.add(&[r(0x5000, 1)]),
        Err(QueueError::QueueFull { needed: 1, free: 0 })
    );
    rig.q.publish();
    // Completed out of order.
    rig.push_used(u32::from(b), 1);
    rig.push_used(u32::from(a), 0);
    assert_eq!(rig.q.pop_used().unwrap(), Some(Used { head: b, len: 1 }));
    assert_eq!(rig.q.free_descriptors(), 2);
    assert_eq!(rig.q.pop_used().unwrap(), Some(Used { head: a, len: 0 }));
    assert_eq!(rig.q.pop_used().unwrap(), None);
    assert_eq!((rig.q.free_descriptors(), rig.q.in_flight()), (4, 0));
    // All four come back: a chain of the whole queue fits, over both old chains.
    let c = rig.q.add(&[r(1, 1), r(2, 1), r(3, 1), w(4, 1)]).unwrap();
    let mut ids = rig.chain(c);
    ids.sort();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    assert_eq!(rig.q.free_descriptors(), 0);
}

/// Random chains, completed in random order: no descriptor is ever in two
/// chains in flight, and the free count always matches.
#[test]
fn random_chains_never_share_descriptors() {
    let mut rig = rig(32, true);
    let mut rng = Rng(7);
    let mut in_flight: HashMap<u16, (Vec<u16>, u32)> = HashMap::new();
    let mut published: Vec<u16> = Vec::new();
    for step in 0..50_000 {
        let want = 1 + (rng.next() % 6) as usize;
        if rng.next().is_multiple_of(2) && want <= usize::from(rig.q.free_descriptors()) {
            let writable_from = (rng.next() % (want as u64 + 1)) as usize;
            let segs: Vec<Segment> = (0..want)
                .map(|i| Segment {
                    addr: 0x10_0000 + (step * 8 + i) as u64,
                    len: 1 + i as u32,
                    device_writes: i >= writable_from,
                })
                .collect();
            let writable: u32 = segs.iter().filter(|s| s.device_writes).map(|s| s.len).sum();
            let head = rig.q.add(&segs).unwrap();
            let ids = rig.chain(head);
            assert_eq!(ids.len(), want);
            for (i, id) in ids.iter().enumerate() {
                let (addr, len, flags, _) = rig.desc(*id);
                assert_eq!((addr, len), (segs[i].addr, segs[i].len));
                assert_eq!(flags & F_WRITE != 0, segs[i].device_writes);
            }
            let busy: BTreeSet<u16> = in_flight.values().flat_map(|(c, _)| c.clone()).collect();
            assert!(
                ids.iter().all(|i| !busy.contains(i)),
                "descriptor reused while in flight"
            );
            in_flight.insert(head, (ids, writable));
            published.push(head);
            rig.q.publish();
        } else if !published.is_empty() {
            let k = (rng.next() % published.len() as u64) as usize;
            let head = published.swap_remove(k);
            let writable = in_flight[&head].1;
            let len = (rng.next() % (u64::from(writable) + 1)) as u32;
            rig.push_used(u32::from(head), len);
            assert_eq!(rig.q.pop_used().unwrap(), Some(Used { head, len }));
            in_flight.remove(&head);
        }
        let used: usize = in_flight.values().map(|(c, _)| c.len()).sum();
        assert_eq!(usize::from(rig.q.free_descriptors()), 32 - used);
        assert_eq!(usize::from(rig.q.in_flight()), in_flight.len());
    }
}

#[test]
fn bad_chains_are_refused_and_change_nothing() {
    let mut rig = rig(4, true);
    let e = |rig: &mut Rig, segs: &[Segment]| rig.q.add(segs).unwrap_err();
    assert_eq!(
        e(&mut rig, &[]),
        QueueError::BadChainLength {
            segments: 0,
            size: 4
        }
    );
    assert_eq!(
        e(&mut rig, &[r(1, 1); 5]),
        QueueError::BadChainLength {
            segments: 5,
            size: 4
        }
    );
    assert_eq!(
        e(&mut rig, &[r(1, 1), w(2, 1), r(3, 1)]),
        QueueError::ReadableAfterWritable { index: 2 }
    );
    assert_eq!(
        e(&mut rig, &[r(1, 1), r(2, 0)]),
        QueueError::EmptySegment { index: 1 }
    );
    assert_eq!(
        e(&mut rig, &[r(u64::MAX - 3, 8)]),
        QueueError::SegmentWraps {
            index: 0,
            addr: u64::MAX - 3,
            len: 8
        }
    );
    assert_eq!(
        e(&mut rig, &[w(1, u32::MAX), w(2, 1)]),
        QueueError::WritableTooLarge
    );
    assert_eq!((rig.q.free_descriptors(), rig.q.in_flight()), (4, 0));
    assert_eq!(rig.desc(0), (0, 0, 0, 0), "nothing written on error");
    rig.q.add(&[r(1, 1), r(2, 1), w(3, 1)]).unwrap();
    assert_eq!(
        e(&mut rig, &[r(1, 1), w(2, 1)]),
        QueueError::QueueFull { needed: 2, free: 1 }
    );
    assert_eq!(rig.q.add(&[w(9, 1)]).unwrap(), 3);
}

#[test]
fn new_refuses_bad_sizes_and_regions() {
    let mem = Mem::new(1 << 16);
    let ok = mem.region(0, 1 << 16);
    // SAFETY: every region is inside `mem`, which outlives the queues made.
    let new = |size, region| unsafe { SplitQueue::new(size, region, true) }.map(|_| ());
    for size in [0, 3, 100, 2048, 32768, 65535] {
        assert!(
            matches!(new(size, ok), Err(QueueError::BadSize { .. })),
            "size {size}"
        );
    }
    assert_eq!(
        new(8, mem.region(0, 221)),
        Err(QueueError::RegionTooSmall {
            len: 221,
            needed: 222,
            size: 8
        })
    );
    assert!(matches!(
        new(8, mem.region(8, 1000)),
        Err(QueueError::Misaligned { .. })
    ));
    let wraps = DmaRegion {
        paddr: 0xffff_ffff_ffff_fff0,
        ..ok
    };
    assert!(matches!(new(8, wraps), Err(QueueError::RegionWraps { .. })));
    // A bigger capacity takes the spec's largest size.
    let big = Mem::new(SplitQueue::region_size(32768));
    // SAFETY: `big` outlives the queue, which is dropped at once.
    let q = unsafe {
        SplitQueue::<32768>::new_bounded(32768, big.region(0, big.len), false).map(|q| q.size())
    };
    assert_eq!(q, Ok(32768));
}

/// The region may hold anything before: the rings start zeroed.
#[test]
fn new_zeroes_the_rings() {
    let mem = Mem::new(1 << 16);
    let len = SplitQueue::region_size(8);
    mem.fill(PADDR, len, 0xaa);
    // SAFETY: the mapping outlives the queue.
    let mut q = unsafe { SplitQueue::new(8, mem.region(0, len), true).unwrap() };
    assert_eq!(mem.bytes(PADDR, len), vec![0; len]);
    assert_eq!(q.pop_used(), Ok(None));
    assert!(!q.arm());
}

// --- hostile used elements: an error, never a panic, and the queue stays broken ---

fn broken_after(rig: &mut Rig, expected: QueueError) {
    assert_eq!(rig.q.pop_used(), Err(expected));
    assert!(rig.q.is_broken());
    assert_eq!(rig.q.pop_used(), Err(QueueError::Broken));
    assert_eq!(rig.q.add(&[r(1, 1)]), Err(QueueError::Broken));
}

/// Two chains (heads 0 and 2, two descriptors each, 100 writable bytes), published.
fn two_in_flight() -> Rig {
    let mut rig = rig(8, true);
    assert_eq!(rig.q.add(&[r(0x1000, 16), w(0x2000, 100)]).unwrap(), 0);
    assert_eq!(rig.q.add(&[r(0x3000, 16), w(0x4000, 100)]).unwrap(), 2);
    rig.q.publish();
    rig
}

#[test]
fn used_id_out_of_range() {
    for id in [8, 9, 0x1_0000, u32::MAX] {
        let mut rig = two_in_flight();
        rig.push_used(id, 0);
        broken_after(
            &mut rig,
            QueueError::BadUsed {
                last_used: 0,
                fault: UsedFault::IdOutOfRange { id, size: 8 },
            },
        );
    }
}

#[test]
fn used_id_not_a_head_in_flight() {
    // 1 is inside chain 0, 5 was never used, both are not heads in flight.
    for id in [1u16, 5] {
        let mut rig = two_in_flight();
        rig.push_used(u32::from(id), 0);
        broken_after(
            &mut rig,
            QueueError::BadUsed {
                last_used: 0,
                fault: UsedFault::NotInFlight { id },
            },
        );
    }
}

#[test]
fn used_id_twice() {
    let mut rig = two_in_flight();
    rig.push_used(2, 1);
    rig.push_used(2, 1);
    assert_eq!(rig.q.pop_used(), Ok(Some(Used { head: 2, len: 1 })));
    broken_after(
        &mut rig,
        QueueError::BadUsed {
            last_used: 1,
            fault: UsedFault::NotInFlight { id: 2 },
        },
    );
    assert_eq!(rig.q.in_flight(), 1, "chain 0 still in flight");
}

#[test]
fn used_len_above_writable_bytes() {
    let mut rig = two_in_flight();
    rig.push_used(0, 100);
    rig.push_used(2, 101);
    assert_eq!(rig.q.pop_used(), Ok(Some(Used { head: 0, len: 100 })));
    broken_after(
        &mut rig,
        QueueError::BadUsed {
            last_used: 1,
            fault: UsedFault::LenTooLarge {
                id: 2,
                len: 101,
                writable: 100,
            },
        },
    );
}

#[test]
fn used_idx_jumps_past_outstanding() {
    for jump in [3u16, 0x8000, 0xffff] {
        let mut rig = two_in_flight();
        rig.set_used_idx(jump);
        broken_after(
            &mut rig,
            QueueError::BadUsed {
                last_used: 0,
                fault: UsedFault::IdxJump {
                    used_idx: jump,
                    pending: jump,
                    outstanding: 2,
                },
            },
        );
    }
}

#[test]
fn used_before_publish_is_a_jump() {
    let mut rig = rig(8, true);
    let head = rig.q.add(&[w(0x1000, 4)]).unwrap();
    // The device read the unpublished ring entry and completed it.
    rig.push_used(u32::from(head), 4);
    broken_after(
        &mut rig,
        QueueError::BadUsed {
            last_used: 0,
            fault: UsedFault::IdxJump {
                used_idx: 1,
                pending: 1,
                outstanding: 0,
            },
        },
    );
}

#[test]
fn used_ring_garbage_never_panics() {
    let mut rng = Rng(99);
    for _ in 0..2000 {
        let mut rig = two_in_flight();
        for _ in 0..4 {
            rig.push_used(rng.next() as u32 % 12, rng.next() as u32 % 200);
        }
        rig.set_used_idx(rng.next() as u16 % 5);
        for _ in 0..6 {
            let _ = rig.q.pop_used();
        }
        assert!(rig.q.in_flight() <= 2);
        assert!(rig.q.free_descriptors() <= 8);
    }
}

// --- notification suppression ---

#[test]
fn need_event_cases() {
    // (event, new, old, expected)
    let cases = [
        (0, 1, 0, true),
        (0, 2, 1, false),
        (5, 6, 5, true),
        (5, 10, 0, true),
        (5, 5, 0, false),
        (65535, 0, 65535, true),
        (65534, 1, 65534, true),
        (65534, 1, 65535, false),
        (65535, 1, 65534, true),
        (0, 1, 65535, true),
        (1, 1, 65535, false),
        (100, 99, 98, false),
        (7, 7, 7, false),
    ];
    for (event, new, old, expected) in cases {
        assert_eq!(
            vring_need_event(event, new, old),
            expected,
            "event {event} new {new} old {old}"
        );
    }
    // Against the definition (event in [old, new) on the circle), around the wrap.
    let mut rng = Rng(3);
    for _ in 0..200_000 {
        let old = (rng.next() as u16).wrapping_add(if rng.next().is_multiple_of(2) {
            0
        } else {
            65500
        });
        let batch = (rng.next() % 300) as u16;
        let event = old
            .wrapping_add((rng.next() % 600) as u16)
            .wrapping_sub(150);
        let new = old.wrapping_add(batch);
        let expected = (0..batch).any(|k| old.wrapping_add(k) == event);
        assert_eq!(vring_need_event(event, new, old), expected);
    }
}

/// A device parked with avail_event = e; the driver adds one request at a
/// time through 65535 -> 0: it must notify exactly when it adds entry e.
#[test]
fn publish_notifies_exactly_at_avail_event_across_wrap() {
    let mut rig = rig(4, true);
    for _ in 0..65530 {
        rig.set_avail_event(rig.avail_idx().wrapping_add(30_000));
        rig.cycle();
    }
    for e in [65533u16, 65534, 65535, 0, 1] {
        // Entries 65530 (first round) or 65531 up to 1 or 2: e is among them.
        for _ in 0..8 {
            rig.set_avail_event(e);
            let at = rig.avail_idx();
            assert_eq!(rig.cycle(), at == e, "avail_event {e}, adding entry {at}");
        }
        // Back to just before the wrap for the next event value.
        while rig.avail_idx() != 65531 {
            rig.set_avail_event(rig.avail_idx().wrapping_add(30_000));
            rig.cycle();
        }
    }
}

/// A batch notifies when avail_event is anywhere inside it, not only at its end.
#[test]
fn publish_batch_covering_avail_event() {
    let mut rig = rig(8, true);
    for _ in 0..65534 {
        rig.set_avail_event(rig.avail_idx().wrapping_add(30_000));
        rig.cycle();
    }
    rig.set_avail_event(65535);
    // Batch adds entries 65534, 65535, 0, 1.
    for _ in 0..4 {
        rig.q.add(&[w(0x1000, 1)]).unwrap();
    }
    assert!(rig.q.publish());
    for _ in 0..4 {
        rig.q.add(&[w(0x1000, 1)]).unwrap();
    }
    assert!(!rig.q.publish(), "entries 2..=5 do not pass 65535");
}

#[test]
fn publish_with_flags_honours_no_notify() {
    let mut rig = rig(4, false);
    rig.q.add(&[w(1, 1)]).unwrap();
    assert!(rig.q.publish());
    rig.set_used_flags(1);
    rig.q.add(&[w(1, 1)]).unwrap();
    assert!(!rig.q.publish());
    rig.set_used_flags(0);
    assert!(!rig.q.publish(), "nothing new to publish");
    rig.q.add(&[w(1, 1)]).unwrap();
    assert!(rig.q.publish());
    assert_eq!(rig.avail_idx(), 3);
}

#[test]
fn arm_and_disarm_with_event_idx() {
    let mut rig = rig(8, true);
    for _ in 0..5 {
        rig.cycle();
    }
    rig.q.disarm();
    assert_eq!(rig.used_event(), 4, "far behind: one before last_used");
    assert!(!rig.q.arm(), "nothing pending");
    assert_eq!(rig.used_event(), 5, "notify on the next used element");
    let head = rig.q.add(&[w(1, 1)]).unwrap();
    rig.q.publish();
    rig.push_used(u32::from(head), 1);
    assert!(rig.q.arm(), "an element is pending: do not sleep");
    assert_eq!(rig.q.pop_used().unwrap(), Some(Used { head, len: 1 }));
    assert!(!rig.q.arm());
    assert_eq!(rig.used_event(), 6);
    assert_eq!(rig.avail_flags(), 0, "flags untouched with event_idx");
    // Across the wrap: disarm at last_used 0 is 65535.
    let mut rig = self::rig(2, true);
    for _ in 0..65536 {
        rig.cycle();
    }
    rig.q.disarm();
    assert_eq!(rig.used_event(), 65535);
    assert!(!rig.q.arm());
    assert_eq!(rig.used_event(), 0);
}

#[test]
fn arm_and_disarm_with_flags() {
    let mut rig = rig(8, false);
    rig.q.disarm();
    assert_eq!(rig.avail_flags(), 1, "VRING_AVAIL_F_NO_INTERRUPT");
    assert!(!rig.q.arm());
    assert_eq!(rig.avail_flags(), 0);
    let head = rig.q.add(&[w(1, 1)]).unwrap();
    rig.q.publish();
    rig.push_used(u32::from(head), 1);
    rig.q.disarm();
    assert!(rig.q.arm());
    assert_eq!(
        rig.used_event(),
        0,
        "used_event untouched without event_idx"
    );
}
