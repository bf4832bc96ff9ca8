//! In-flight I/O tracking (`VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD`), split
//! queues, as QEMU's vhost-user specification lays it out.
//!
//! A device that completes out of order (block I/O on io_uring) cannot be
//! restarted at the used index: QEMU rewinds a crashed backend's queue to
//! it, so chains completed past an older one would run twice and the older
//! one never. The backend therefore records, in memory the frontend keeps
//! across backend restarts, which heads it holds and in which order it took
//! them; a restarted backend resubmits them in that order and takes new
//! chains from `used index + in flight`.
//!
//! The frontend asks for the memory with `GET_INFLIGHT_FD` (we create a
//! sealed memfd) and hands it back with `SET_INFLIGHT_FD` on every
//! connection. Both messages are answered by the shim (rust-vmm's
//! vhost-user-backend refuses them); the adapter records into the memory.
//! The frontend can write the memory at any time: every value read from it
//! is checked (heads against the queue size) and loops are bounded by the
//! queue size.
//!
//! One queue region: `u64 features, u16 version, u16 desc_num,
//! u16 last_batch_head, u16 used_idx`, then `desc_num` descriptor states of
//! 16 bytes: `u8 inflight, 5 padding, u16 next, u64 counter`; regions are
//! 64-byte aligned, one after the other.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ringfence_device::InflightLog;

/// `VHOST_USER_GET_INFLIGHT_FD`.
pub const GET_INFLIGHT_FD: u32 = 31;
/// `VHOST_USER_SET_INFLIGHT_FD`.
pub const SET_INFLIGHT_FD: u32 = 32;
/// Payload of both messages: `u64 mmap_size, u64 mmap_offset, u16
/// num_queues, u16 queue_size`, padded to 24 bytes.
pub const INFLIGHT_PAYLOAD_LEN: usize = 24;
/// The region layout version this implements.
const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 16;
/// Most queues a device may have (QEMU's VIRTIO_QUEUE_MAX).
const MAX_QUEUES: u16 = 1024;
/// Largest split queue.
const MAX_QUEUE_SIZE: u16 = 32768;

/// Bytes of one queue's region for `queue_size` heads.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).next_multiple_of(64)
}

/// A refused inflight description or memory.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// Queue count or size out of range.
    #[error("{num_queues} queues of {queue_size}: not a device's queues")]
    Shape {
        /// Queues asked for.
        num_queues: u16,
        /// Their size.
        queue_size: u16,
    },
    /// The memory does not hold the regions it must.
    #[error("inflight memory of {mmap_size} bytes at offset {mmap_offset}: {reason}")]
    Memory {
        /// Size given.
        mmap_size: u64,
        /// Offset given.
        mmap_offset: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A system call failed.
    #[error("{call}")]
    Io {
        /// Which call.
        call: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(call: &'static str) -> impl FnOnce(io::Error) -> InflightError {
    move |source| InflightError::Io { call, source }
}

/// The decoded payload of GET/SET_INFLIGHT_FD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightDesc {
    /// Bytes of shared memory.
    pub mmap_size: u64,
    /// Where they start in the file.
    pub mmap_offset: u64,
    /// Queues tracked.
    pub num_queues: u16,
    /// Heads per queue.
    pub queue_size: u16,
}

impl InflightDesc {
    /// Reads the payload (at least 20 bytes; padding ignored).
    pub fn decode(p: &[u8]) -> Option<Self> {
        let u64_at = |o: usize| Some(u64::from_le_bytes(p.get(o..o + 8)?.try_into().ok()?));
        let u16_at = |o: usize| Some(u16::from_le_bytes(p.get(o..o + 2)?.try_into().ok()?));
        Some(Self {
            mmap_size: u64_at(0)?,
            mmap_offset: u64_at(8)?,
            num_queues: u16_at(16)?,
            queue_size: u16_at(18)?,
        })
    }

    /// The 24-byte payload.
    pub fn encode(&self) -> [u8; INFLIGHT_PAYLOAD_LEN] {
        let mut p = [0u8; INFLIGHT_PAYLOAD_LEN];
        p[0..8].copy_from_slice(&self.mmap_size.to_le_bytes());
        p[8..16].copy_from_slice(&self.mmap_offset.to_le_bytes());
        p[16..18].copy_from_slice(&self.num_queues.to_le_bytes());
        p[18..20].copy_from_slice(&self.queue_size.to_le_bytes());
        p
    }

    fn check_shape(&self) -> Result<usize, InflightError> {
        let ok = (1..=MAX_QUEUES).contains(&self.num_queues)
            && (1..=MAX_QUEUE_SIZE).contains(&self.queue_size);
        if !ok {
            return Err(InflightError::Shape {
                num_queues: self.num_queues,
                queue_size: self.queue_size,
            });
        }
        Ok(usize::from(self.num_queues) * queue_region_size(self.queue_size))
    }
}

/// The mapped inflight memory of one connection.
pub struct InflightShm {
    base: NonNull<u8>,
    len: usize,
    queue_size: u16,
    num_queues: u16,
    file: File,
}

// SAFETY: the mapping is plain shared memory, accessed only with volatile
// reads and writes at checked offsets; it lives until Drop.
unsafe impl Send for InflightShm {}
// SAFETY: as above; concurrent access from two queues' threads touches
// disjoint regions, and the frontend may write anything anyway.
unsafe impl Sync for InflightShm {}

impl std::fmt::Debug for InflightShm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightShm")
            .field("len", &self.len)
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightShm {
    /// Fresh, zeroed memory for GET_INFLIGHT_FD: a memfd sealed against
    /// resizing, so neither side can make the other's mapping fault.
    pub fn create(num_queues: u16, queue_size: u16) -> Result<Self, InflightError> {
        let desc = InflightDesc {
            mmap_size: 0,
            mmap_offset: 0,
            num_queues,
            queue_size,
        };
        let len = desc.check_shape()?;
        // SAFETY: a NUL-terminated name; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(
                c"ringfence-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io_err("memfd_create")(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(io_err("ftruncate"))?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor we own.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
            return Err(io_err("F_ADD_SEALS")(io::Error::last_os_error()));
        }
        Self::map_file(file, len, 0, num_queues, queue_size)
    }

    /// Maps what SET_INFLIGHT_FD hands over. The file must be sealed
    /// against shrinking (as the memfds we create are) and hold the whole
    /// range, so that the mapping can never fault.
    pub fn map(file: File, desc: &InflightDesc) -> Result<Self, InflightError> {
        let need = desc.check_shape()?;
        let bad = |reason| InflightError::Memory {
            mmap_size: desc.mmap_size,
            mmap_offset: desc.mmap_offset,
            reason,
        };
        let len = usize::try_from(desc.mmap_size).map_err(|_| bad("size"))?;
        if len < need {
            return Err(bad("smaller than the queues it must track"));
        }
        if !desc.mmap_offset.is_multiple_of(4096) {
            return Err(bad("offset not page-aligned"));
        }
        // SAFETY: fcntl on a descriptor we own.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(bad("file not sealed against shrinking"));
        }
        // Only shmem: a hugetlbfs memfd can lose its pages under a sealed
        // size (a punched hole, an empty pool) and fault us with SIGBUS.
        // SAFETY: statfs is plain old data; all-zero is a valid value.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: fstatfs on a descriptor we own writes one struct statfs.
        let r = unsafe { libc::fstatfs(file.as_raw_fd(), &mut fs) };
        if r != 0 || fs.f_type != libc::TMPFS_MAGIC {
            return Err(bad("not a shmem memfd"));
        }
        let file_len = file.metadata().map_err(io_err("fstat"))?.len();
        if desc
            .mmap_offset
            .checked_add(desc.mmap_size)
            .is_none_or(|end| end > file_len)
        {
            return Err(bad("range past the end of the file"));
        }
        // Only what the queues need: the rest is the frontend's business.
        Self::map_file(
            file,
            need,
            desc.mmap_offset,
            desc.num_queues,
            desc.queue_size,
        )
    }

    fn map_file(
        file: File,
        len: usize,
        offset: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let off = libc::off_t::try_from(offset).map_err(|_| InflightError::Memory {
            mmap_size: len as u64,
            mmap_offset: offset,
            reason: "offset",
        })?;
        // SAFETY: a fresh shared mapping of a file range checked to exist;
        // nothing else in this process refers to the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io_err("mmap")(io::Error::last_os_error()));
        }
        let base = NonNull::new(p.cast::<u8>()).ok_or(InflightError::Memory {
            mmap_size: len as u64,
            mmap_offset: offset,
            reason: "mapped at null",
        })?;
        Ok(Self {
            base,
            len,
            queue_size,
            num_queues,
            file,
        })
    }

    /// Forgets every queue's record (a device reset: the driver forgot its
    /// requests, so none may be resubmitted to the next one).
    pub fn forget_all(&self) {
        let region = queue_region_size(self.queue_size);
        for q in 0..usize::from(self.num_queues) {
            self.write::<u16>(q * region + VERSION_AT, 0);
        }
    }

    /// The descriptor to hand to the frontend.
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The description to answer GET_INFLIGHT_FD with.
    pub fn desc(&self) -> InflightDesc {
        InflightDesc {
            mmap_size: self.len as u64,
            mmap_offset: 0,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
        }
    }

    /// Pointer to the `T` at byte `at`, if it lies inside the mapping and
    /// is aligned for `T`.
    fn at<T>(&self, at: usize) -> Option<*mut T> {
        let end = at.checked_add(std::mem::size_of::<T>())?;
        if end > self.len || !at.is_multiple_of(std::mem::align_of::<T>()) {
            return None;
        }
        // The mapping is page-aligned, so `at` aligned means the pointer is.
        Some(self.base.as_ptr().wrapping_add(at).cast())
    }

    fn read<T: Copy + Default>(&self, at: usize) -> T {
        match self.at::<T>(at) {
            // SAFETY: in bounds and aligned (checked by `at`), mapped until
            // Drop; the frontend may write concurrently, hence volatile.
            Some(p) => unsafe { p.read_volatile() },
            None => T::default(),
        }
    }

    fn write<T: Copy>(&self, at: usize, v: T) {
        if let Some(p) = self.at::<T>(at) {
            // SAFETY: as in `read`.
            unsafe { p.write_volatile(v) }
        }
    }
}

impl Drop for InflightShm {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map_file`; nothing
        // refers to it once the last Arc is gone.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

/// What a queue's log says after a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// The region was new: nothing to resubmit.
    pub fresh: bool,
    /// Heads in flight when the previous backend stopped, in the order it
    /// took them.
    pub resubmit: Vec<u16>,
    /// Where to take new chains from: used index + heads in flight.
    pub next_avail: u16,
}

/// One queue's region, recording as the queue is served.
#[derive(Debug)]
pub struct QueueLog {
    shm: Arc<InflightShm>,
    base: usize,
    /// Heads this queue can have (the live queue's size, at most the
    /// region's).
    heads: u16,
    counter: u64,
}

const VERSION_AT: usize = 8;
const DESC_NUM_AT: usize = 10;
const LAST_BATCH_AT: usize = 12;
const USED_IDX_AT: usize = 14;

impl QueueLog {
    /// Queue `index`'s region, for a live queue of `queue_size` heads.
    pub fn new(shm: Arc<InflightShm>, index: u16, queue_size: u16) -> Option<Self> {
        if index >= shm.num_queues || queue_size == 0 || queue_size > shm.queue_size {
            return None;
        }
        let base = usize::from(index) * queue_region_size(shm.queue_size);
        Some(Self {
            shm,
            base,
            heads: queue_size,
            counter: 0,
        })
    }

    fn desc_at(&self, head: u16) -> Option<usize> {
        (head < self.heads).then(|| self.base + HEADER_LEN + DESC_LEN * usize::from(head))
    }

    fn is_inflight(&self, head: u16) -> bool {
        self.desc_at(head)
            .is_some_and(|d| self.shm.read::<u8>(d) == 1)
    }

    /// Reads the region as the previous backend left it, given the used
    /// ring's index now: finishes the record of a completion it published
    /// but did not clear, and lists the heads to resubmit.
    pub fn recover(&mut self, ring_used_idx: u16) -> Recovery {
        let shm = &self.shm;
        if shm.read::<u16>(self.base + VERSION_AT) == 0 {
            // A new region (or one the frontend reset with the device).
            for head in 0..self.heads {
                if let Some(d) = self.desc_at(head) {
                    shm.write::<u8>(d, 0);
                }
            }
            shm.write::<u16>(self.base + DESC_NUM_AT, shm.queue_size);
            shm.write::<u16>(self.base + USED_IDX_AT, ring_used_idx);
            fence(Ordering::SeqCst);
            shm.write::<u16>(self.base + VERSION_AT, VERSION);
            self.counter = 0;
            return Recovery {
                fresh: true,
                resubmit: Vec::new(),
                next_avail: ring_used_idx,
            };
        }
        if shm.read::<u16>(self.base + USED_IDX_AT) != ring_used_idx {
            // Killed between publishing a used entry and clearing its head
            // (batches are of one): that head is done.
            let last = shm.read::<u16>(self.base + LAST_BATCH_AT);
            if let Some(d) = self.desc_at(last) {
                shm.write::<u8>(d, 0);
            }
            shm.write::<u16>(self.base + USED_IDX_AT, ring_used_idx);
        }
        let mut held: Vec<(u64, u16)> = (0..self.heads)
            .filter(|&h| self.is_inflight(h))
            .filter_map(|h| Some((shm.read::<u64>(self.desc_at(h)? + 8), h)))
            .collect();
        held.sort_unstable();
        self.counter = held.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        let in_flight = u16::try_from(held.len()).unwrap_or(u16::MAX);
        Recovery {
            fresh: false,
            resubmit: held.into_iter().map(|(_, h)| h).collect(),
            next_avail: ring_used_idx.wrapping_add(in_flight),
        }
    }
}

impl InflightLog for QueueLog {
    fn popped(&mut self, head: u16) {
        let Some(d) = self.desc_at(head) else {
            return;
        };
        self.shm.write::<u64>(d + 8, self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::Release);
        self.shm.write::<u8>(d, 1);
    }

    fn completing(&mut self, head: u16) {
        let Some(d) = self.desc_at(head) else {
            return;
        };
        let last = self.shm.read::<u16>(self.base + LAST_BATCH_AT);
        self.shm.write::<u16>(d + 6, last);
        self.shm.write::<u16>(self.base + LAST_BATCH_AT, head);
        fence(Ordering::Release);
    }

    fn completed(&mut self, head: u16, used_idx: u16) {
        fence(Ordering::Release);
        if let Some(d) = self.desc_at(head) {
            self.shm.write::<u8>(d, 0);
        }
        fence(Ordering::Release);
        self.shm.write::<u16>(self.base + USED_IDX_AT, used_idx);
    }
}

/// The inflight memory of the live connection, shared between the shim
/// (which answers GET/SET_INFLIGHT_FD) and the adapter (which records).
#[derive(Debug, Default)]
pub struct InflightSlot {
    enabled: AtomicBool,
    shm: Mutex<Option<Arc<InflightShm>>>,
}

impl InflightSlot {
    /// Whether the device wants tracking (and the protocol feature is offered).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Turns tracking on or off (before a frontend connects).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    /// The memory of the live connection, if the frontend gave one.
    pub fn current(&self) -> Option<Arc<InflightShm>> {
        self.shm.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Installs (or clears) the live connection's memory.
    pub fn set(&self, shm: Option<Arc<InflightShm>>) {
        *self.shm.lock().unwrap_or_else(|p| p.into_inner()) = shm;
    }
}

/// Resubmits `heads` (in order) on `queue` after a restart: each chain is
/// started again in `handler`, and what it answers at once goes on the used
/// ring (logged); the rest completes as usual. Returns how many were
/// answered at once.
///
/// The heads are no longer on the available ring (the driver may have
/// reused those slots), and `virtio-queue` makes chains only from it, so
/// they are read through a private available ring: a scratch page placed
/// after the guest's memory in a view that also holds all of it.
pub fn resubmit(
    queue: &mut virtio_queue::Queue,
    mem: &ringfence_device::DeviceMemory,
    handler: &mut dyn ringfence_device::QueueHandler,
    heads: &[u16],
    log: &mut QueueLog,
) -> Result<u64, ringfence_device::QueueFailure> {
    use ringfence_device::{add_used_logged, ChainError, Started};
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

    let size = queue.size();
    let broken = |head| ringfence_device::QueueFailure::Chain(ChainError::Empty { head });
    let first = heads.first().copied().unwrap_or(0);
    let end = mem
        .iter()
        .map(|r| r.last_addr().0)
        .max()
        .and_then(|a| a.checked_add(1))
        .and_then(|a| a.checked_next_multiple_of(4096))
        .ok_or(broken(first))?;
    // Available ring (flags, idx, ring, used_event) then used ring, 4-aligned.
    let avail_len = (6 + 2 * usize::from(size)).next_multiple_of(4);
    let used_len = 6 + 8 * usize::from(size);
    let scratch_len = (avail_len + used_len).next_multiple_of(4096);
    let scratch = GuestRegionMmap::<()>::from_range(GuestAddress(end), scratch_len, None)
        .map_err(|_| broken(first))?;
    let view = mem
        .insert_region(Arc::new(scratch))
        .map_err(|_| broken(first))?;
    let n = u16::try_from(heads.len()).map_err(|_| broken(first))?;
    for (i, &h) in heads.iter().enumerate() {
        view.write_obj(h, GuestAddress(end + 4 + 2 * i as u64))
            .map_err(|_| broken(h))?;
    }
    view.write_obj(n, GuestAddress(end + 2))
        .map_err(|_| broken(first))?;
    let mut private =
        virtio_queue::Queue::new(size).map_err(ringfence_device::QueueFailure::Ring)?;
    let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
    let (lo, hi) = split(queue.desc_table());
    private.set_desc_table_address(lo, hi);
    let (lo, hi) = split(end);
    private.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(end + avail_len as u64);
    private.set_used_ring_address(lo, hi);
    private.set_ready(true);
    let mut answered = 0u64;
    while let Some(chain) = private.pop_descriptor_chain(&view) {
        let head = chain.head_index();
        log.popped(head);
        // Buffers resolve in guest memory only: the scratch page is for
        // reading the heads, never for a descriptor to point at.
        if let Started::Done(len) = handler.start_chain(chain, mem)? {
            add_used_logged(queue, mem, head, len, log)?;
            answered += 1;
        }
    }
    handler.submit_started();
    Ok(answered)
}
