//! The io_uring engine of one queue: requests are submitted as they are
//! parsed and come back in the order the kernel finishes them.
//!
//! Every request in flight owns a slot: its iovecs (which the kernel reads)
//! and a clone of the memory view its buffers are in, so the mapping
//! outlives the I/O even if the transport installs a new view meanwhile.
//! There are as many slots as the queue has entries; a full table makes
//! the queue not ready until a completion frees one. The ring is created
//! disabled and restricted to READV, WRITEV and FSYNC on the one registered
//! image, so that even a compromised backend cannot use it to reach beyond
//! what its seccomp filter allows.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use ringfence_device::DeviceMemory;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long dropping a queue waits for its requests in flight before it
/// leaks their buffers instead (the kernel may still write into them).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a request in flight does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    /// Image to guest buffers.
    Read,
    /// Guest buffers to image.
    Write,
    /// fdatasync.
    Flush,
}

/// A request the kernel is working on.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) head: u16,
    pub(crate) status_addr: GuestAddress,
    /// Keeps the buffers mapped until the kernel is done with them.
    pub(crate) mem: DeviceMemory,
    pub(crate) op: Op,
    /// Image offset.
    pub(crate) offset: u64,
    /// Bytes to move.
    pub(crate) len: u64,
}

#[derive(Debug, Default)]
struct Slot {
    iovecs: Vec<libc::iovec>,
    pending: Option<Pending>,
    /// Reaped and not yet released: the only state in which `release`
    /// frees it (no scan of the free list on the completion path).
    reaped: bool,
}

// SAFETY: the iovecs point into the guest memory mapping that `pending.mem`
// keeps alive; they are plain addresses, touched only by the kernel while
// the request is in flight and by the owning queue's thread after.
unsafe impl Send for Slot {}

/// A finished request.
pub(crate) struct Reaped {
    pub(crate) slot: usize,
    pub(crate) pending: Pending,
    /// The kernel's result: bytes moved, or a negative errno.
    pub(crate) res: i32,
}

/// One queue's ring.
pub(crate) struct Uring {
    ring: IoUring,
    /// Rung by the kernel on every completion: the queue's wake fd.
    event: EventFd,
    slots: Vec<Slot>,
    free: Vec<usize>,
    unsubmitted: bool,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("slots", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Uring {
    /// A ring for `entries` requests in flight on `image`.
    pub(crate) fn new(image: RawFd, entries: u16) -> io::Result<Self> {
        let entries = entries.max(1);
        let ring: IoUring = IoUring::builder()
            .setup_r_disabled()
            .setup_cqsize(u32::from(entries) * 2)
            .build(u32::from(entries))?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        let submitter = ring.submitter();
        submitter.register_files(&[image])?;
        submitter.register_eventfd(event.as_raw_fd())?;
        let fixed = squeue::Flags::FIXED_FILE.bits();
        submitter.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(fixed),
            Restriction::sqe_flags_required(fixed),
        ])?;
        submitter.register_enable_rings()?;
        let slots = (0..entries).map(|_| Slot::default()).collect();
        Ok(Self {
            ring,
            event,
            slots,
            free: (0..usize::from(entries)).rev().collect(),
            unsubmitted: false,
        })
    }

    /// Readable when requests completed.
    pub(crate) fn fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    pub(crate) fn has_room(&self) -> bool {
        !self.free.is_empty()
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// The iovec list of the next free slot, emptied, to fill before
    /// [`push`](Self::push).
    pub(crate) fn next_iovecs(&mut self) -> Option<&mut Vec<libc::iovec>> {
        let slot = self.slots.get_mut(*self.free.last()?)?;
        slot.iovecs.clear();
        Some(&mut slot.iovecs)
    }

    /// Queues `pending` in the next free slot, with the iovecs filled by
    /// [`next_iovecs`](Self::next_iovecs) (ignored for a flush).
    pub(crate) fn push(&mut self, pending: Pending) -> io::Result<()> {
        let index = *self
            .free
            .last()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBUSY))?;
        let slot = self
            .slots
            .get_mut(index)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EBUSY))?;
        let iovcnt = u32::try_from(slot.iovecs.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let file = types::Fixed(0);
        let entry = match pending.op {
            Op::Read => opcode::Readv::new(file, slot.iovecs.as_ptr(), iovcnt)
                .offset(pending.offset)
                .build(),
            Op::Write => opcode::Writev::new(file, slot.iovecs.as_ptr(), iovcnt)
                .offset(pending.offset)
                .build(),
            Op::Flush => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
        }
        .user_data(index as u64);
        // SAFETY: the iovecs and the buffers they name stay valid until the
        // completion for `index` is reaped: the slot keeps both (the memory
        // view in `pending`), is not reused before `release`, and a queue
        // that is dropped first waits for the kernel (see Drop).
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            // The SQ has as many entries as there are slots; it can only be
            // full of entries not yet submitted.
            let _ = self.ring.submit();
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }
                .map_err(|_| io::Error::from_raw_os_error(libc::EBUSY))?;
        }
        if let Some(slot) = self.slots.get_mut(index) {
            slot.pending = Some(pending);
        }
        self.free.pop();
        self.unsubmitted = true;
        Ok(())
    }

    /// Hands every queued request to the kernel.
    pub(crate) fn submit(&mut self) {
        if !self.unsubmitted {
            return;
        }
        loop {
            match self.ring.submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => {
                    // EAGAIN/EBUSY: the kernel is short of resources; what
                    // is left in the SQ goes with the next submission (every
                    // completion wakes the queue).
                    tracing::warn!(error = %e, "io_uring submission deferred");
                    break;
                }
            }
        }
        // The kernel may take fewer entries than queued: whatever is left
        // waits for the next call, which a completion always brings.
        self.unsubmitted = !self.ring.submission().is_empty();
    }

    /// The next finished request, if any. Never blocks.
    pub(crate) fn reap(&mut self) -> Option<Reaped> {
        let first = self.ring.completion().next();
        let cqe = match first {
            Some(c) => c,
            None => {
                // Clear the wake-up before looking again: a completion
                // after this look rings it anew.
                let _ = self.event.read();
                self.ring.completion().next()?
            }
        };
        let index = usize::try_from(cqe.user_data()).ok()?;
        let slot = self.slots.get_mut(index)?;
        let pending = slot.pending.take()?;
        slot.reaped = true;
        Some(Reaped {
            slot: index,
            pending,
            res: cqe.result(),
        })
    }

    /// The iovecs of a reaped slot (to finish a short transfer).
    pub(crate) fn iovecs(&self, slot: usize) -> &[libc::iovec] {
        self.slots.get(slot).map_or(&[], |s| s.iovecs.as_slice())
    }

    /// Returns a reaped slot to the free list.
    pub(crate) fn release(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot).filter(|s| s.reaped) {
            s.reaped = false;
            self.free.push(slot);
        }
    }
}

impl Uring {
    /// A reset or a disconnect: the chains in flight are abandoned (the
    /// driver forgot them), but the kernel may still be moving their bytes.
    /// Waits for it, boundedly; past the bound, leaks the slots (and so the
    /// memory views) rather than let the kernel write into freed memory.
    /// True when nothing is left in flight: the ring can serve again.
    pub(crate) fn drain(&mut self) -> bool {
        self.submit();
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        loop {
            while let Some(r) = self.reap() {
                self.release(r.slot);
            }
            if self.in_flight() == 0 {
                let _ = self.event.read();
                return true;
            }
            if Instant::now() >= deadline {
                tracing::error!(
                    in_flight = self.in_flight(),
                    "image I/O still running after {DRAIN_TIMEOUT:?}: leaking its buffers"
                );
                std::mem::forget(std::mem::take(&mut self.slots));
                self.free.clear();
                return false;
            }
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
        }
    }

    /// How many requests the ring can hold in flight.
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        self.drain();
    }
}

/// Rings made before the sandbox forbids making them (`io_uring_setup`
/// would let code that took over the process build an unrestricted ring),
/// shared by every instance of one image and returned when a queue stops.
#[derive(Debug, Default)]
pub(crate) struct RingPool(std::sync::Mutex<Vec<Uring>>);

impl RingPool {
    pub(crate) fn put(&self, ring: Uring) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push(ring);
    }

    /// A ring for at least `entries` requests, if one is free.
    pub(crate) fn take(&self, entries: u16) -> Option<Uring> {
        let mut rings = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let at = rings
            .iter()
            .position(|r| r.capacity() >= usize::from(entries))?;
        Some(rings.swap_remove(at))
    }

    pub(crate) fn len(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}
