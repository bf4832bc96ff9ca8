//! The driver side's bounce pool against a model. Its callers are
//! virtio-drivers (through `BounceHal`), whose addresses come back from a
//! device that may lie, so frees and unmaps of foreign, interior and stale
//! addresses must be refused, and the allocator must never hand out memory
//! twice, leak it, or give up while a fitting run is free.
//!
//! Input (little-endian; missing bytes read as zero):
//!   u16 window size - 1 (mod 32 KiB), u8 area id, then operations until the end:
//!   u8 op (mod 7), then:
//!   0 alloc        u16 len, u16 align
//!   1 map          u16 len, u8 flags (bit 0: device reads), u8 fill byte
//!   2 free         u8 pick: a live allocation (must succeed)
//!   3 unmap        u8 pick, u16 len, u8 flags (bit 0: device wrote): a live one
//!   4 free near    u8 pick, u16 delta: a live address + delta (interior, past the end)
//!   5 free         u64 address
//!   6 unmap        u64 address, u16 len, u8 flags
#![no_main]
use std::collections::BTreeMap;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use ringfence_bus::{area_addr, split_area_addr, LocalArea};
use ringfence_fuzz::Input;
use ringfence_msg_driver::bounce::{RESERVED_IN_AREA_0, SLOT_SIZE};
use ringfence_msg_driver::{BounceError, BouncePool};
use vm_memory::MmapRegion;

/// A live allocation as the model sees it.
struct Live {
    slots: usize,
    /// What `map` copied in (when the device was to read it).
    content: Option<Vec<u8>>,
}

struct Model {
    id: u16,
    total_slots: usize,
    /// Slots the pool never hands out (the first page of area 0).
    reserved: usize,
    /// Device address -> allocation.
    live: BTreeMap<u64, Live>,
}

impl Model {
    fn in_use(&self) -> usize {
        self.live.values().map(|l| l.slots * SLOT_SIZE).sum()
    }

    fn pick(&self, i: u8) -> Option<u64> {
        let n = self.live.len();
        (n > 0).then(|| *self.live.keys().nth(usize::from(i) % n).unwrap())
    }

    fn slot_free(&self, slot: usize) -> bool {
        slot >= self.reserved
            && self.live.iter().all(|(&a, l)| {
                let start = split_area_addr(a).1 as usize / SLOT_SIZE;
                !(start..start + l.slots).contains(&slot)
            })
    }

    /// Is there a free run of `slots` starting at a multiple of `align` slots?
    fn fits(&self, slots: usize, align: usize) -> bool {
        (0..self.total_slots)
            .step_by(align.max(1))
            .any(|s| s + slots <= self.total_slots && (s..s + slots).all(|x| self.slot_free(x)))
    }

    /// Checks and records a successful allocation.
    fn add(&mut self, addr: u64, len: usize, content: Option<Vec<u8>>) {
        let (id, off) = split_area_addr(addr);
        assert_eq!(id, self.id, "address {addr:#x} outside the window's area");
        assert_eq!(off % SLOT_SIZE as u64, 0, "{addr:#x} not on a slot");
        let start = off as usize / SLOT_SIZE;
        let slots = len.div_ceil(SLOT_SIZE).max(1);
        assert!(
            start + slots <= self.total_slots,
            "{addr:#x} runs past the window"
        );
        for s in start..start + slots {
            assert!(self.slot_free(s), "{addr:#x}: slot {s} handed out twice");
        }
        self.live.insert(addr, Live { slots, content });
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let size = usize::from(input.u16()) % (64 * SLOT_SIZE) + 1;
    let id = u16::from(input.u8());
    let mapping = Arc::new(MmapRegion::new(size).unwrap());
    let pool = BouncePool::new(LocalArea { id, mapping });
    let total_slots = size / SLOT_SIZE;
    let mut model = Model {
        id,
        total_slots,
        reserved: if id == 0 {
            RESERVED_IN_AREA_0.div_ceil(SLOT_SIZE).min(total_slots)
        } else {
            0
        },
        live: BTreeMap::new(),
    };

    while !input.is_empty() {
        match input.u8() % 7 {
            0 => {
                let (len, align) = (usize::from(input.u16()), usize::from(input.u16()));
                match pool.alloc(len, align) {
                    Ok((addr, ptr)) => {
                        if align.is_power_of_two() {
                            assert_eq!(split_area_addr(addr).1 % align as u64, 0, "misaligned");
                        }
                        // SAFETY: the pool says `ptr` points at `len` bytes of its window.
                        let bytes = unsafe { std::slice::from_raw_parts(ptr, len) };
                        assert!(bytes.iter().all(|&b| b == 0), "alloc not zeroed");
                        model.add(addr, len, None);
                    }
                    Err(BounceError::Exhausted { slots }) => {
                        let align_slots = align.div_ceil(SLOT_SIZE);
                        assert!(!model.fits(slots, align_slots), "exhausted with room left");
                    }
                    Err(e) => panic!("alloc: {e}"),
                }
            }
            1 => {
                let len = usize::from(input.u16());
                let device_reads = input.u8() & 1 != 0;
                let buf = vec![input.u8(); len];
                match pool.map(&buf, device_reads) {
                    Ok(addr) => model.add(addr, len, device_reads.then_some(buf)),
                    Err(BounceError::Exhausted { slots }) => {
                        assert!(!model.fits(slots, 1), "exhausted with room left")
                    }
                    Err(e) => panic!("map: {e}"),
                }
            }
            2 => {
                if let Some(addr) = model.pick(input.u8()) {
                    pool.free(addr).expect("free of a live allocation");
                    model.live.remove(&addr);
                }
            }
            3 => {
                let (pick, len) = (input.u8(), usize::from(input.u16()));
                let device_wrote = input.u8() & 1 != 0;
                if let Some(addr) = model.pick(pick) {
                    let mut buf = vec![0u8; len];
                    pool.unmap(addr, &mut buf, device_wrote)
                        .expect("unmap of a live mapping");
                    let live = model.live.remove(&addr).unwrap();
                    // Nobody wrote the window: what went in comes back out.
                    if let (true, Some(c)) = (device_wrote, live.content) {
                        if c.len() == len {
                            assert_eq!(c, buf, "bounce buffer round trip");
                        }
                    }
                }
            }
            op => {
                let (addr, unmap) = match op {
                    4 => {
                        let (pick, delta) = (input.u8(), u64::from(input.u16()));
                        let base = model.pick(pick).unwrap_or(area_addr(id, 0).unwrap());
                        (base.wrapping_add(delta), None)
                    }
                    5 => (input.u64(), None),
                    _ => (input.u64(), Some((input.u16(), input.u8() & 1 != 0))),
                };
                let r = match unmap {
                    None => pool.free(addr),
                    Some((len, wrote)) => pool.unmap(addr, &mut vec![0; len.into()], wrote),
                };
                match model.live.remove(&addr) {
                    Some(_) => r.expect("free of a live allocation"),
                    None => assert_eq!(r, Err(BounceError::UnknownAddress { addr })),
                }
            }
        }
        assert_eq!(
            pool.in_use(),
            model.in_use(),
            "in_use disagrees with the model"
        );
    }

    // Freeing everything leaves the pool empty: nothing leaked.
    for addr in std::mem::take(&mut model.live).into_keys() {
        pool.free(addr).expect("final free");
    }
    assert_eq!(pool.in_use(), 0, "leak");
});
