//! Staging memory of a device side that a broker copies into: one sealed
//! memfd, mapped once here and once by the broker, carved into slots that
//! each mirror one grant for copy.
//!
//! Slots are reused once nothing references them any more, so a grant per
//! request costs no mapping change on the device side (a hypervisor copies
//! into memory the backend already has).

use std::fs::File;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, Weak};

use vm_memory::{FileOffset, MmapRegion};

use crate::sys;

/// Smallest slot.
const MIN_SLOT: u64 = 4096;

struct Slot {
    offset: u64,
    class: u64,
    /// Weak, so that the area's last user (a memory view) decides when the
    /// slot is free and revocation can wait for exactly those users.
    region: Weak<MmapRegion>,
}

struct Slots {
    /// Next never-used byte of the memfd.
    bump: u64,
    /// Slots handed out; free again once only this list references them.
    issued: Vec<Slot>,
    /// (offset, class) of free slots.
    free: Vec<(u64, u64)>,
}

/// The pool.
pub(crate) struct StagingPool {
    file: File,
    /// Unmapped in Drop only when no slot region is referenced any more.
    mapping: ManuallyDrop<MmapRegion>,
    slots: Mutex<Slots>,
}

impl StagingPool {
    /// A pool of `size` bytes (reserved, not allocated until touched).
    pub(crate) fn new(size: usize) -> std::io::Result<Self> {
        let file = sys::sealed_memfd("ringfence-staging", size)?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file.try_clone()?, 0)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(std::io::Error::other)?;
        Ok(Self {
            file,
            mapping: ManuallyDrop::new(mapping),
            slots: Mutex::new(Slots {
                bump: 0,
                issued: Vec::new(),
                free: Vec::new(),
            }),
        })
    }

    /// The memfd, for the broker.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Staging for an area of `size` bytes: its region and its offset in
    /// the memfd. `None` when the pool is full.
    pub(crate) fn alloc(&self, size: u64) -> Option<(Arc<MmapRegion>, u64)> {
        let class = size.max(MIN_SLOT).checked_next_power_of_two()?;
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        // Slots that no device memory view holds any more are free.
        let mut i = 0;
        while i < slots.issued.len() {
            if slots
                .issued
                .get(i)
                .is_some_and(|s| s.region.strong_count() == 0)
            {
                let s = slots.issued.swap_remove(i);
                slots.free.push((s.offset, s.class));
            } else {
                i += 1;
            }
        }
        let offset = match slots.free.iter().position(|&(_, c)| c == class) {
            Some(at) => slots.free.swap_remove(at).0,
            None => {
                let offset = slots.bump;
                let end = offset.checked_add(class)?;
                if end > self.mapping.size() as u64 {
                    return None;
                }
                slots.bump = end;
                offset
            }
        };
        let at = usize::try_from(offset).ok()?;
        let len = usize::try_from(size).ok()?;
        if at.checked_add(len)? > self.mapping.size() {
            return None;
        }
        let base = self.mapping.as_ptr().wrapping_add(at);
        // SAFETY: `base..base + len` lies inside `self.mapping` (checked
        // just above). A region from build_raw does not unmap on drop, and
        // `self.mapping` outlives every region handed out: Drop below leaks
        // the mapping rather than unmap it while a region is referenced.
        let region = unsafe {
            MmapRegion::build_raw(
                base,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
            )
        }
        .ok()?;
        let region = Arc::new(region);
        slots.issued.push(Slot {
            offset,
            class,
            region: Arc::downgrade(&region),
        });
        Some((region, offset))
    }
}

impl Drop for StagingPool {
    fn drop(&mut self) {
        let slots = self.slots.get_mut().unwrap_or_else(|p| p.into_inner());
        if slots.issued.iter().any(|s| s.region.strong_count() > 0) {
            // A worker that was abandoned still holds a view with a slot in
            // it: the memory stays mapped for as long as the process lives.
            tracing::warn!("staging memory still referenced; left mapped");
            return;
        }
        // SAFETY: no region carved out of the mapping is alive any more
        // (checked above; a dead Weak cannot come back), and the mapping is
        // not used after this.
        unsafe { ManuallyDrop::drop(&mut self.mapping) };
    }
}
