//! The bounce pool: a slot allocator over the shared window. Every buffer the
//! driver hands to the device is copied into the window before the device
//! reads it and out of the window after the device wrote it; the driver's own
//! memory is never shared.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ringfence_bus::{area_addr, split_area_addr, LocalArea};
use vm_memory::{MmapRegion, VolatileMemory, VolatileSlice};

/// Granule of the pool.
pub const SLOT_SIZE: usize = 512;
/// Bytes at the start of area 0 (physical memory shared whole) that are
/// never handed out: their first has device address 0.
pub const RESERVED_IN_AREA_0: usize = 4096;

/// Errors of the bounce pool.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BounceError {
    /// No contiguous run of free slots is large enough.
    #[error("bounce pool exhausted: no run of {slots} free slots")]
    Exhausted {
        /// Slots asked for.
        slots: usize,
    },
    /// An address that the pool never handed out.
    #[error("address {addr:#x} was not handed out by this pool")]
    UnknownAddress {
        /// The address.
        addr: u64,
    },
}

/// Counters of the pool.
#[derive(Debug, Default)]
pub struct BounceStats {
    /// Bytes copied into the window.
    pub bytes_in: AtomicU64,
    /// Bytes copied out of the window.
    pub bytes_out: AtomicU64,
    /// Mappings made.
    pub maps: AtomicU64,
    /// Allocations that failed.
    pub exhausted: AtomicU64,
}

struct Slots {
    /// Length in slots of the run starting at each allocated slot, 0 if free/inside a run.
    run_len: Vec<u32>,
    used: Vec<bool>,
    hint: usize,
    in_use: usize,
}

impl Slots {
    fn alloc(&mut self, n: usize, align: usize) -> Option<usize> {
        let total = self.used.len();
        if n == 0 || n > total {
            return None;
        }
        let align = align.max(1);
        for pass in 0..2 {
            let (from, to) = if pass == 0 {
                (self.hint, total)
            } else {
                (0, total)
            };
            let mut start = from.next_multiple_of(align);
            while start + n <= to {
                match self
                    .used
                    .get(start..start + n)
                    .and_then(|r| r.iter().rposition(|&u| u))
                {
                    None => {
                        for u in self.used.get_mut(start..start + n)? {
                            *u = true;
                        }
                        *self.run_len.get_mut(start)? = n as u32;
                        self.hint = start + n;
                        self.in_use += n;
                        return Some(start);
                    }
                    Some(busy) => start = (start + busy + 1).next_multiple_of(align),
                }
            }
        }
        None
    }

    fn free(&mut self, start: usize) -> Option<usize> {
        let n = std::mem::take(self.run_len.get_mut(start)?) as usize;
        if n == 0 {
            return None;
        }
        for u in self.used.get_mut(start..start + n)? {
            *u = false;
        }
        self.in_use -= n;
        Some(n)
    }
}

/// Zeroes a window slice without allocating.
fn zero(w: &VolatileSlice<'_, ()>) {
    const ZEROS: [u8; 4096] = [0; 4096];
    let mut off = 0;
    while off < w.len() {
        let n = (w.len() - off).min(ZEROS.len());
        if let Ok(part) = w.subslice(off, n) {
            part.copy_from(&ZEROS[..n]);
        }
        off += n;
    }
}

/// A slot allocator and copier over one shared area.
pub struct BouncePool {
    area: LocalArea,
    slots: Mutex<Slots>,
    stats: Arc<BounceStats>,
}

impl std::fmt::Debug for BouncePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BouncePool")
            .field("area", &self.area.id)
            .field("size", &self.size())
            .finish()
    }
}

impl BouncePool {
    /// A pool over the whole of `area`.
    pub fn new(area: LocalArea) -> Self {
        let n = area.mapping.size() / SLOT_SIZE;
        let mut slots = Slots {
            run_len: vec![0; n],
            used: vec![false; n],
            hint: 0,
            in_use: 0,
        };
        // In area 0 (a bus that shares physical memory whole, as ivshmem
        // does) the first page would have device address 0, which
        // `virtio-drivers` reads as "no memory": it is never handed out.
        // Marked used without a run, so that no free() can release them
        // (and not counted in `in_use`, which is what callers hold).
        if area.id == 0 {
            let reserved = RESERVED_IN_AREA_0.div_ceil(SLOT_SIZE).min(n);
            for u in slots.used.iter_mut().take(reserved) {
                *u = true;
            }
            slots.hint = reserved;
        }
        Self {
            area,
            slots: Mutex::new(slots),
            stats: Arc::new(BounceStats::default()),
        }
    }

    /// Window size in bytes.
    pub fn size(&self) -> usize {
        self.area.mapping.size()
    }

    /// The window's area id.
    pub fn area_id(&self) -> u16 {
        self.area.id
    }

    /// The window's mapping (the shared models carve buffers out of it).
    pub(crate) fn mapping_arc(&self) -> Arc<MmapRegion> {
        self.area.mapping.clone()
    }

    /// The window's first byte in this process.
    pub(crate) fn mapping_ptr(&self) -> *mut u8 {
        self.area.mapping.as_ptr()
    }

    /// Bytes currently allocated.
    pub fn in_use(&self) -> usize {
        self.lock().in_use * SLOT_SIZE
    }

    /// The counters.
    pub fn stats(&self) -> &BounceStats {
        &self.stats
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn mapping(&self) -> &MmapRegion {
        &self.area.mapping
    }

    fn window(&self, offset: usize, len: usize) -> Option<VolatileSlice<'_, ()>> {
        self.mapping().get_slice(offset, len).ok()
    }

    /// Takes a run of `slots` slots aligned to `align` slots; returns its
    /// device address and window. Nothing stays allocated on an error.
    fn take_run(
        &self,
        slots: usize,
        align: usize,
    ) -> Result<(u64, VolatileSlice<'_, ()>), BounceError> {
        let start = self.lock().alloc(slots, align).ok_or_else(|| {
            self.stats.exhausted.fetch_add(1, Ordering::Relaxed);
            BounceError::Exhausted { slots }
        })?;
        let offset = start * SLOT_SIZE;
        let run = self
            .window(offset, slots * SLOT_SIZE)
            .zip(area_addr(self.area.id, offset as u64));
        match run {
            Some((window, addr)) => Ok((addr, window)),
            None => {
                self.lock().free(start);
                Err(BounceError::Exhausted { slots })
            }
        }
    }

    /// Allocates `len` bytes aligned to `align` bytes, zeroed; returns
    /// (device address, local pointer).
    pub fn alloc(&self, len: usize, align: usize) -> Result<(u64, *mut u8), BounceError> {
        let slots = len.div_ceil(SLOT_SIZE).max(1);
        let (addr, window) = self.take_run(slots, align.div_ceil(SLOT_SIZE))?;
        zero(&window);
        Ok((addr, window.ptr_guard_mut().as_ptr()))
    }

    /// Frees an allocation by its device address.
    pub fn free(&self, addr: u64) -> Result<(), BounceError> {
        let (id, offset) = split_area_addr(addr);
        let start =
            usize::try_from(offset).map_err(|_| BounceError::UnknownAddress { addr })? / SLOT_SIZE;
        if id != self.area.id || offset % SLOT_SIZE as u64 != 0 || self.lock().free(start).is_none()
        {
            return Err(BounceError::UnknownAddress { addr });
        }
        Ok(())
    }

    /// Bounces `buf` into the window: copies it in when the device will read
    /// it, and zeroes the slots otherwise.
    pub fn map(&self, buf: &[u8], device_reads: bool) -> Result<u64, BounceError> {
        let slots = buf.len().div_ceil(SLOT_SIZE).max(1);
        let (addr, window) = self.take_run(slots, 1)?;
        // The run holds at least buf.len() bytes.
        let w = window.subslice(0, buf.len()).unwrap_or(window);
        if device_reads {
            w.copy_from(buf);
            self.stats
                .bytes_in
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
        } else {
            // The whole buffer is copied back on unmap: bytes the device
            // does not write must read as zero, not as what an earlier
            // request left in these slots (the swiotlb leak,
            // CVE-2022-0854 class).
            zero(&w);
        }
        self.stats.maps.fetch_add(1, Ordering::Relaxed);
        Ok(addr)
    }

    /// Reserves slots for `len` bytes that the device will write, without
    /// zeroing them: for callers that copy them out only after the device
    /// reported success (see [`crate::Bounce`]); [`BouncePool::map`] zeroes
    /// because `virtio-drivers`' `Hal` copies back whatever the outcome.
    pub fn map_for_device_write(&self, len: usize) -> Result<u64, BounceError> {
        let (addr, _) = self.take_run(len.div_ceil(SLOT_SIZE).max(1), 1)?;
        self.stats.maps.fetch_add(1, Ordering::Relaxed);
        Ok(addr)
    }

    /// Ends a mapping; copies the window back into `buf` when the device wrote it.
    pub fn unmap(&self, addr: u64, buf: &mut [u8], device_wrote: bool) -> Result<(), BounceError> {
        let (id, offset) = split_area_addr(addr);
        if id != self.area.id {
            return Err(BounceError::UnknownAddress { addr });
        }
        if device_wrote {
            let w = usize::try_from(offset)
                .ok()
                .and_then(|o| self.window(o, buf.len()));
            if let Some(w) = w {
                w.copy_to(buf);
                self.stats
                    .bytes_out
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
            }
        }
        self.free(addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(size: usize) -> BouncePool {
        let mapping = Arc::new(MmapRegion::new(size).unwrap());
        BouncePool::new(LocalArea { id: 3, mapping })
    }

    #[test]
    fn map_copies_in_and_unmap_copies_out() {
        let p = pool(64 * 1024);
        let data = [7u8; 1000];
        let addr = p.map(&data, true).unwrap();
        assert_eq!(split_area_addr(addr).0, 3);
        assert_eq!(p.in_use(), 1024);
        let mut back = [0u8; 1000];
        p.unmap(addr, &mut back, true).unwrap();
        assert_eq!(back, data);
        assert_eq!(p.in_use(), 0);
        assert_eq!(p.stats().bytes_in.load(Ordering::Relaxed), 1000);
        assert_eq!(p.stats().bytes_out.load(Ordering::Relaxed), 1000);
    }

    #[test]
    fn contiguous_runs_alignment_and_exhaustion_without_leak() {
        let p = pool(16 * 1024);
        let (a, _) = p.alloc(4096, 4096).unwrap();
        assert_eq!(split_area_addr(a).1 % 4096, 0);
        let b = p.map(&[0u8; 8192], false).unwrap();
        // 4 KiB left; 8 KiB cannot fit.
        assert_eq!(
            p.map(&[0u8; 8192], false),
            Err(BounceError::Exhausted { slots: 16 })
        );
        assert_eq!(p.stats().exhausted.load(Ordering::Relaxed), 1);
        p.free(a).unwrap();
        p.unmap(b, &mut [], false).unwrap();
        assert_eq!(p.in_use(), 0);
        // Double free and foreign addresses are refused.
        assert_eq!(p.free(a), Err(BounceError::UnknownAddress { addr: a }));
        assert!(p.free(area_addr(9, 0).unwrap()).is_err());
        // After freeing, the whole window is one run again.
        let c = p.map(&[1u8; 16 * 1024], true).unwrap();
        p.unmap(c, &mut [], false).unwrap();
    }
}
