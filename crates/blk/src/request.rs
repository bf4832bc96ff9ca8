//! One queue's request processing. Everything read from shared memory is
//! copied once into a local value and validated before use.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ringfence_device::{
    answer_byte, walk_chain, Chain, ChainError, Completed, DeviceMemory, QueueHandler, Segment,
    Started,
};
use virtio_bindings::virtio_blk::*;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};

use crate::uring::{Op, Pending, RingPool, Uring};
use crate::{Disk, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, SECTOR_SIZE, SIZE_MAX};

/// Request counters of a block device.
#[derive(Debug, Default)]
pub struct RequestStats {
    /// Requests completed with OK.
    pub ok: AtomicU64,
    /// Requests completed with IOERR.
    pub ioerr: AtomicU64,
    /// Requests handed to io_uring (the rest ran on the queue's thread).
    pub submitted: AtomicU64,
    /// Reads and writes that came back short and were finished on the
    /// queue's thread.
    pub short: AtomicU64,
    /// O_DIRECT transfers whose guest buffers were not aligned for it and
    /// went through an aligned bounce buffer.
    pub bounced: AtomicU64,
    /// Requests completed with UNSUPP.
    pub unsupp: AtomicU64,
    /// Chains so malformed that no status could be written (each one broke its queue).
    pub unanswerable: AtomicU64,
    /// Bytes read from the image.
    pub bytes_read: AtomicU64,
    /// Bytes written to the image.
    pub bytes_written: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
enum ReqError {
    #[error("unsupported request type or flags {0:#x}")]
    Unsupported(u32),
    #[error("{count} segments, {max} offered")]
    TooManySegments { count: u64, max: u32 },
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    #[error("image I/O failed")]
    Io(#[source] std::io::Error),
}

/// The request handler of one queue.
#[derive(Debug)]
pub struct BlkQueue {
    disk: Arc<Disk>,
    /// The whole chain as the driver built it.
    descriptors: Vec<Segment>,
    /// The request's data: device-readable bytes after the header, then
    /// device-writable bytes before the status byte.
    segments: Vec<Segment>,
    max_descriptors: usize,
    /// Many requests in flight (aio io_uring); `None` runs them one by one.
    uring: Option<Uring>,
    /// Aligned staging for O_DIRECT transfers of unaligned guest buffers.
    bounce: Option<AlignedBuf>,
    /// Where the ring goes back when the queue stops.
    pool: Option<Arc<RingPool>>,
}

impl Drop for BlkQueue {
    fn drop(&mut self) {
        if let (Some(mut ring), Some(pool)) = (self.uring.take(), self.pool.take()) {
            if ring.drain() {
                pool.put(ring);
            }
        }
    }
}

/// Header of a virtio-blk request, copied out of shared memory.
#[derive(Debug, Clone, Copy)]
struct Header {
    req_type: u32,
    sector: u64,
}

const HEADER_LEN: usize = 16;

impl BlkQueue {
    pub(crate) fn new(disk: Arc<Disk>, queue_size: u16) -> Self {
        Self {
            disk,
            descriptors: Vec::with_capacity(usize::from(queue_size)),
            segments: Vec::with_capacity(usize::from(queue_size)),
            max_descriptors: usize::from(queue_size),
            uring: None,
            bounce: None,
            pool: None,
        }
    }

    /// Runs this queue's reads, writes and flushes on an io_uring: one
    /// from `pool` (made before the sandbox), else a new one.
    pub(crate) fn start_uring(&mut self, pool: &Arc<RingPool>) -> std::io::Result<()> {
        let entries = u16::try_from(self.max_descriptors).unwrap_or(u16::MAX);
        let ring = match pool.take(entries) {
            Some(r) => r,
            None => Uring::new(self.disk.file.as_raw_fd(), entries)?,
        };
        self.uring = Some(ring);
        self.pool = Some(pool.clone());
        Ok(())
    }

    /// Walks the chain and finds its status byte; nothing is read from or
    /// written to its buffers before both are known.
    fn walk(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<GuestAddress, ChainError> {
        let head = chain.head_index();
        let walked = walk_chain(chain, self.max_descriptors, &mut self.descriptors)
            .and_then(|()| answer_byte(&self.descriptors, head, mem));
        if walked.is_err() {
            self.disk.stats.unanswerable.fetch_add(1, Ordering::Relaxed);
        }
        walked
    }

    /// Hands a parsed read, write or flush to io_uring. `Ok(false)`: the
    /// request is not for the ring (GET_ID, DISCARD, a flush that does
    /// nothing, buffers O_DIRECT cannot take as they are) and runs on the
    /// queue's thread instead.
    fn submit(
        &mut self,
        mem: &DeviceMemory,
        head: u16,
        status_addr: GuestAddress,
        header: Header,
    ) -> Result<bool, ReqError> {
        let op = match header.req_type {
            VIRTIO_BLK_T_IN => Op::Read,
            VIRTIO_BLK_T_OUT if !self.disk.read_only => Op::Write,
            VIRTIO_BLK_T_FLUSH if self.disk.flush && !self.disk.read_only => Op::Flush,
            _ => return Ok(false),
        };
        let (offset, len) = if op == Op::Flush {
            (0, 0)
        } else {
            let len = self.total_len(op == Op::Read)?;
            (self.disk_range(header.sector, len)?, len)
        };
        let direct = self.disk.direct;
        let Some(uring) = self.uring.as_mut() else {
            return Ok(false);
        };
        let Some(iovecs) = uring.next_iovecs() else {
            return Ok(false);
        };
        if op != Op::Flush {
            // Every buffer translates before the request goes anywhere.
            for s in &self.segments {
                for slice in mem.get_slices(s.addr, s.len as usize) {
                    let slice =
                        slice.map_err(|_| ReqError::Invalid("buffer outside shared memory"))?;
                    let base = slice.ptr_guard_mut().as_ptr();
                    if direct.is_some_and(|d| !d.fits(base as u64, slice.len() as u64)) {
                        return Ok(false);
                    }
                    iovecs.push(libc::iovec {
                        iov_base: base.cast(),
                        iov_len: slice.len(),
                    });
                }
            }
            if iovecs.len() > IOV_MAX {
                return Ok(false);
            }
        }
        uring
            .push(Pending {
                head,
                status_addr,
                mem: mem.clone(),
                op,
                offset,
                len,
            })
            .map_err(ReqError::Io)?;
        self.disk.stats.submitted.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The outcome of a request the kernel finished: a short transfer is
    /// finished here.
    fn finish(disk: &Disk, iovecs: &[libc::iovec], p: &Pending, res: i32) -> Result<u32, ReqError> {
        let moved = u64::try_from(res)
            .map_err(|_| ReqError::Io(std::io::Error::from_raw_os_error(res.saturating_neg())))?;
        let dir = match p.op {
            Op::Flush => return Ok(0),
            Op::Read => Direction::Read,
            Op::Write => Direction::Write,
        };
        if moved < p.len {
            disk.stats.short.fetch_add(1, Ordering::Relaxed);
            let mut skip = moved;
            let mut pos = p.offset.saturating_add(moved);
            for iov in iovecs {
                let len = iov.iov_len as u64;
                if skip >= len {
                    skip -= len;
                    continue;
                }
                let base = iov.iov_base.cast::<u8>().wrapping_add(skip as usize);
                // SAFETY: the iovec names guest memory that `p.mem` keeps
                // mapped; the kernel is done with the request.
                unsafe { transfer_raw(&disk.file, base, (len - skip) as usize, pos, dir)? };
                pos = pos.saturating_add(len - skip);
                skip = 0;
            }
        }
        match p.op {
            Op::Read => {
                disk.stats.bytes_read.fetch_add(p.len, Ordering::Relaxed);
                u32::try_from(p.len).map_err(|_| ReqError::Invalid("length overflow"))
            }
            _ => {
                disk.stats.bytes_written.fetch_add(p.len, Ordering::Relaxed);
                Ok(0)
            }
        }
    }

    /// Splits the chain, whose status byte is known, into header and data
    /// segments. The layout is a byte stream (VIRTIO_F_ANY_LAYOUT, implied
    /// by VERSION_1): the header may be split across descriptors or share
    /// one with data.
    fn parse(&mut self, mem: &DeviceMemory) -> Result<Header, ReqError> {
        self.segments.clear();
        let first_writable = self
            .descriptors
            .iter()
            .position(|d| d.writable)
            .unwrap_or(self.descriptors.len());
        let (readable, writable) = self.descriptors.split_at(first_writable);
        if writable.iter().any(|d| !d.writable) {
            return Err(ReqError::Invalid(
                "device-readable descriptor after a device-writable one",
            ));
        }
        let mut header = [0u8; HEADER_LEN];
        let mut filled = 0usize;
        for d in readable {
            let take = (HEADER_LEN - filled).min(d.len as usize);
            if take > 0 {
                let dst = header
                    .get_mut(filled..filled + take)
                    .ok_or(ReqError::Invalid("header"))?;
                mem.read_slice(dst, d.addr)
                    .map_err(|_| ReqError::Invalid("header outside shared memory"))?;
                filled += take;
            }
            let rest = d.len - take as u32;
            if rest > 0 {
                let addr = d
                    .addr
                    .checked_add(take as u64)
                    .ok_or(ReqError::Invalid("address overflow"))?;
                self.segments.push(Segment {
                    addr,
                    len: rest,
                    writable: false,
                });
            }
        }
        if filled < HEADER_LEN {
            return Err(ReqError::Invalid("header shorter than 16 bytes"));
        }
        // All device-writable bytes but the final status byte are data.
        let last = writable.len().saturating_sub(1);
        for (i, d) in writable.iter().enumerate() {
            let len = if i == last { d.len - 1 } else { d.len };
            if len > 0 {
                self.segments.push(Segment {
                    addr: d.addr,
                    len,
                    writable: true,
                });
            }
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = header;
        Ok(Header {
            req_type: u32::from_le_bytes([t0, t1, t2, t3]),
            sector: u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        })
    }

    /// The byte range on disk of `len` bytes at `sector`, if it is inside the image.
    fn disk_range(&self, sector: u64, len: u64) -> Result<u64, ReqError> {
        let end_sector = len
            .checked_div(SECTOR_SIZE)
            .and_then(|n| sector.checked_add(n))
            .ok_or(ReqError::Invalid("sector overflow"))?;
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(ReqError::Invalid("length not a multiple of 512"));
        }
        if end_sector > self.disk.sectors.load(Ordering::Relaxed) {
            return Err(ReqError::Invalid("beyond end of image"));
        }
        sector
            .checked_mul(SECTOR_SIZE)
            .ok_or(ReqError::Invalid("sector overflow"))
    }

    fn total_len(&self, writable: bool) -> Result<u64, ReqError> {
        let mut total = 0u64;
        for s in &self.segments {
            if s.writable != writable {
                return Err(ReqError::Invalid("data descriptor has the wrong direction"));
            }
            if s.len > SIZE_MAX {
                return Err(ReqError::Invalid("segment larger than size_max"));
            }
            total = total
                .checked_add(u64::from(s.len))
                .ok_or(ReqError::Invalid("length overflow"))?;
        }
        Ok(total)
    }

    fn execute(&mut self, mem: &DeviceMemory, req_type: u32, sector: u64) -> Result<u32, ReqError> {
        match req_type {
            VIRTIO_BLK_T_IN => {
                let total = self.transfer_all(mem, sector, Direction::Read)?;
                self.disk
                    .stats
                    .bytes_read
                    .fetch_add(total, Ordering::Relaxed);
                u32::try_from(total).map_err(|_| ReqError::Invalid("length overflow"))
            }
            VIRTIO_BLK_T_OUT => {
                if self.disk.read_only {
                    return Err(ReqError::Invalid("write to a read-only image"));
                }
                let total = self.transfer_all(mem, sector, Direction::Write)?;
                self.disk
                    .stats
                    .bytes_written
                    .fetch_add(total, Ordering::Relaxed);
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.disk.flush && !self.disk.read_only {
                    self.disk.file.sync_data().map_err(ReqError::Io)?;
                }
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let seg = match self.segments.as_slice() {
                    [s] if s.writable => *s,
                    _ => return Err(ReqError::Invalid("GET_ID needs one writable buffer")),
                };
                let n = (seg.len as usize).min(self.disk.id.len());
                let id = self.disk.id.get(..n).unwrap_or(&[]);
                mem.write_slice(id, seg.addr)
                    .map_err(|_| ReqError::Invalid("GET_ID buffer outside shared memory"))?;
                Ok(n as u32)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.disk.read_only {
                    return Err(ReqError::Invalid("discard on a read-only image"));
                }
                self.discard_or_zero(mem, req_type == VIRTIO_BLK_T_WRITE_ZEROES)?;
                Ok(0)
            }
            other => Err(ReqError::Unsupported(other)),
        }
    }

    /// Moves every data segment between the image and shared memory. All
    /// segments are checked (direction, size, translation) before the first
    /// byte moves, so a bad buffer fails the request without a partial write.
    fn transfer_all(
        &mut self,
        mem: &DeviceMemory,
        sector: u64,
        dir: Direction,
    ) -> Result<u64, ReqError> {
        let total = self.total_len(matches!(dir, Direction::Read))?;
        let mut pos = self.disk_range(sector, total)?;
        let mut aligned = true;
        for s in &self.segments {
            for slice in mem.get_slices(s.addr, s.len as usize) {
                let slice = slice.map_err(|_| ReqError::Invalid("buffer outside shared memory"))?;
                if let Some(d) = self.disk.direct {
                    aligned &= d.fits(slice.ptr_guard().as_ptr() as u64, slice.len() as u64);
                }
            }
        }
        if !aligned {
            self.disk.stats.bounced.fetch_add(1, Ordering::Relaxed);
            return self.transfer_bounced(mem, pos, total, dir);
        }
        for s in &self.segments {
            // A buffer may span two adjacent regions: one transfer per piece.
            for slice in mem.get_slices(s.addr, s.len as usize).flatten() {
                transfer(&self.disk.file, &slice, pos, dir)?;
                pos = pos.saturating_add(slice.len() as u64);
            }
        }
        Ok(total)
    }

    /// O_DIRECT with guest buffers it cannot take: through an aligned
    /// buffer, [`BOUNCE_CHUNK`] bytes at a time.
    fn transfer_bounced(
        &mut self,
        mem: &DeviceMemory,
        pos: u64,
        total: u64,
        dir: Direction,
    ) -> Result<u64, ReqError> {
        let buf = self.bounce.get_or_insert_with(AlignedBuf::new);
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(BOUNCE_CHUNK as u64) as usize;
            let chunk = buf
                .as_mut_slice()
                .get_mut(..n)
                .ok_or(ReqError::Invalid("bounce"))?;
            let at = pos.saturating_add(done);
            if let Direction::Write = dir {
                copy_stream(mem, &self.segments, done, chunk, dir)?;
            }
            // SAFETY: `chunk` is our own aligned buffer of `n` bytes.
            unsafe { transfer_raw(&self.disk.file, chunk.as_mut_ptr(), n, at, dir)? };
            if let Direction::Read = dir {
                copy_stream(mem, &self.segments, done, chunk, dir)?;
            }
            done += n as u64;
        }
        Ok(total)
    }

    fn discard_or_zero(&self, mem: &DeviceMemory, zero: bool) -> Result<(), ReqError> {
        const ENTRY: usize = 16;
        let total = self.total_len(false)?;
        if total == 0 || total % ENTRY as u64 != 0 {
            return Err(ReqError::Invalid("bad discard segment list"));
        }
        // More segments than offered: UNSUPP, as QEMU's own backends answer.
        let offered = if zero {
            self.disk.max_write_zeroes_seg
        } else {
            self.disk.max_discard_seg
        };
        let count = total / ENTRY as u64;
        let max = offered.min(MAX_DISCARD_SEG);
        if count > u64::from(max) {
            return Err(ReqError::TooManySegments { count, max });
        }
        // Copy the whole list out of shared memory once.
        let mut list = [0u8; MAX_DISCARD_SEG as usize * ENTRY];
        let mut at = 0usize;
        for s in &self.segments {
            let end = at.saturating_add(s.len as usize);
            let dst = list
                .get_mut(at..end)
                .ok_or(ReqError::Invalid("bad discard list"))?;
            mem.read_slice(dst, s.addr)
                .map_err(|_| ReqError::Invalid("discard list outside shared memory"))?;
            at = end;
        }
        for entry in list.get(..at).unwrap_or(&[]).chunks_exact(ENTRY) {
            let sector = u64::from_le_bytes(
                entry
                    .get(0..8)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or_default(),
            );
            let num = u32::from_le_bytes(
                entry
                    .get(8..12)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or_default(),
            );
            let flags = u32::from_le_bytes(
                entry
                    .get(12..16)
                    .and_then(|b| b.try_into().ok())
                    .unwrap_or_default(),
            );
            let allowed_flags = if zero {
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
            } else {
                0
            };
            if flags & !allowed_flags != 0 {
                return Err(ReqError::Unsupported(flags));
            }
            if num > MAX_DISCARD_SECTORS {
                return Err(ReqError::Invalid("discard segment too large"));
            }
            let len = u64::from(num) * SECTOR_SIZE;
            let offset = self.disk_range(sector, len)?;
            let mode = if zero && flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP == 0 {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            };
            fallocate_or_zero(&self.disk.file, mode, offset, len, zero)?;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Direction {
    /// Image to shared memory.
    Read,
    /// Shared memory to image.
    Write,
}

/// Most iovecs one readv/writev takes (IOV_MAX).
const IOV_MAX: usize = 1024;

/// Size of the aligned buffer of an O_DIRECT transfer that bounces.
const BOUNCE_CHUNK: usize = 1 << 20;

/// A page-aligned buffer of [`BOUNCE_CHUNK`] bytes.
#[derive(Debug)]
struct AlignedBuf(Vec<Page>);

#[derive(Debug, Clone, Copy)]
#[repr(C, align(4096))]
struct Page([u8; 4096]);

impl AlignedBuf {
    fn new() -> Self {
        Self(vec![Page([0; 4096]); BOUNCE_CHUNK / 4096])
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.0.len() * 4096;
        // SAFETY: `Page` is 4096 plain bytes without padding, so the vector's
        // buffer is `len` initialised bytes, borrowed mutably with `self`.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// Copies between `chunk` and the bytes `[from, from + chunk.len())` of the
/// request's data, which is the concatenation of `segments`.
fn copy_stream(
    mem: &DeviceMemory,
    segments: &[Segment],
    from: u64,
    chunk: &mut [u8],
    dir: Direction,
) -> Result<(), ReqError> {
    let end = from.saturating_add(chunk.len() as u64);
    let mut seg_start = 0u64;
    for s in segments {
        let seg_end = seg_start.saturating_add(u64::from(s.len));
        let (lo, hi) = (from.max(seg_start), end.min(seg_end));
        if lo < hi {
            let addr = s
                .addr
                .checked_add(lo - seg_start)
                .ok_or(ReqError::Invalid("address overflow"))?;
            let part = chunk
                .get_mut((lo - from) as usize..(hi - from) as usize)
                .ok_or(ReqError::Invalid("bounce"))?;
            let copied = match dir {
                Direction::Read => mem.write_slice(part, addr),
                Direction::Write => mem.read_slice(part, addr),
            };
            copied.map_err(|_| ReqError::Invalid("buffer outside shared memory"))?;
        }
        seg_start = seg_end;
        if seg_start >= end {
            break;
        }
    }
    Ok(())
}

/// Moves all of `slice` between the image at `offset` and shared memory with
/// pread/pwrite straight on the shared pages (no bounce in the backend).
fn transfer(
    file: &std::fs::File,
    slice: &VolatileSlice<'_, ()>,
    offset: u64,
    dir: Direction,
) -> Result<(), ReqError> {
    let guard = slice.ptr_guard_mut();
    // SAFETY: `guard` is a live mapping of shared memory of `slice.len()`
    // bytes, borrowed through `slice` for the duration of this call. The
    // peer may change the bytes concurrently, which only affects the data
    // it gets.
    unsafe { transfer_raw(file, guard.as_ptr(), slice.len(), offset, dir) }
}

/// Moves `len` bytes between the image at `offset` and memory at `base`,
/// retrying short transfers.
///
/// # Safety
/// `base..base + len` must be mapped memory the caller may have the kernel
/// read (Write) or write (Read) for the duration of the call.
unsafe fn transfer_raw(
    file: &std::fs::File,
    base: *mut u8,
    len: usize,
    mut offset: u64,
    dir: Direction,
) -> Result<(), ReqError> {
    let mut done = 0usize;
    while done < len {
        let (ptr, len, off) = (
            base.wrapping_add(done).cast(),
            len - done,
            offset as libc::off_t,
        );
        // SAFETY: the caller vouches for `base..base+len`; the kernel touches
        // at most `len - done` bytes from `base + done`.
        let n = unsafe {
            match dir {
                Direction::Read => libc::pread(file.as_raw_fd(), ptr, len, off),
                Direction::Write => libc::pwrite(file.as_raw_fd(), ptr, len, off),
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ReqError::Io(e));
        }
        if n == 0 {
            return Err(ReqError::Invalid("no progress at the end of the image"));
        }
        done += n as usize;
        offset = offset.saturating_add(n as u64);
    }
    Ok(())
}

fn fallocate_or_zero(
    file: &std::fs::File,
    mode: i32,
    offset: u64,
    len: u64,
    zero: bool,
) -> Result<(), ReqError> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain system call on a descriptor we own.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if !zero {
        // Discard is a hint; a file system without hole punching may ignore it.
        return Ok(());
    }
    if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(ReqError::Io(e));
    }
    // Aligned, so that an O_DIRECT image takes it as it is.
    let mut zeros = AlignedBuf::new();
    let zeros = zeros.as_mut_slice();
    let mut pos = offset;
    let end = offset.saturating_add(len);
    while pos < end {
        let n = ((end - pos) as usize).min(zeros.len());
        std::os::unix::fs::FileExt::write_all_at(file, zeros.get(..n).unwrap_or(&[]), pos)
            .map_err(ReqError::Io)?;
        pos += n as u64;
    }
    Ok(())
}

/// Writes the status of a finished request and counts it; the used length.
fn answer(
    stats: &RequestStats,
    mem: &DeviceMemory,
    head: u16,
    status_addr: GuestAddress,
    result: Result<u32, ReqError>,
) -> Result<u32, ChainError> {
    let (status, written) = match result {
        Ok(n) => {
            stats.ok.fetch_add(1, Ordering::Relaxed);
            (VIRTIO_BLK_S_OK, n)
        }
        Err(e @ (ReqError::Unsupported(_) | ReqError::TooManySegments { .. })) => {
            tracing::debug!(error = %e, "unsupported request");
            stats.unsupp.fetch_add(1, Ordering::Relaxed);
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
        Err(e) => {
            tracing::debug!(error = %e, "request failed");
            stats.ioerr.fetch_add(1, Ordering::Relaxed);
            (VIRTIO_BLK_S_IOERR, 0)
        }
    };
    // The address was checked in this memory view, which cannot change under us.
    if mem.write_obj(status as u8, status_addr).is_err() {
        stats.unanswerable.fetch_add(1, Ordering::Relaxed);
        return Err(ChainError::Unanswerable {
            head,
            reason: "status byte not writable",
        });
    }
    Ok(written.saturating_add(1))
}

impl QueueHandler for BlkQueue {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        let head = chain.head_index();
        let status_addr = self.walk(chain, mem)?;
        let result = self
            .parse(mem)
            .and_then(|h| self.execute(mem, h.req_type, h.sector));
        answer(&self.disk.stats, mem, head, status_addr, result)
    }

    fn start_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<Started, ChainError> {
        if self.uring.is_none() {
            return self.handle_chain(chain, mem).map(Started::Done);
        }
        let head = chain.head_index();
        let status_addr = self.walk(chain, mem)?;
        let result = match self.parse(mem) {
            Ok(header) => match self.submit(mem, head, status_addr, header) {
                Ok(true) => return Ok(Started::InFlight),
                Ok(false) => self.execute(mem, header.req_type, header.sector),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        answer(&self.disk.stats, mem, head, status_addr, result).map(Started::Done)
    }

    fn submit_started(&mut self) {
        if let Some(uring) = self.uring.as_mut() {
            uring.submit();
        }
    }

    fn next_completed(&mut self) -> Option<Completed> {
        let uring = self.uring.as_mut()?;
        let r = uring.reap()?;
        let p = &r.pending;
        let result = Self::finish(&self.disk, uring.iovecs(r.slot), p, r.res);
        // The status goes into the view the buffers were checked in.
        let len = answer(&self.disk.stats, &p.mem, p.head, p.status_addr, result).unwrap_or(0);
        let head = p.head;
        uring.release(r.slot);
        Some(Completed { head, len })
    }

    fn in_flight(&self) -> usize {
        self.uring.as_ref().map_or(0, Uring::in_flight)
    }

    fn ready(&mut self) -> bool {
        // A full table waits for a completion (the wake fd) before taking
        // more from the driver.
        self.uring.as_ref().is_none_or(Uring::has_room)
    }

    fn wake_fd(&self) -> Option<std::os::fd::RawFd> {
        self.uring.as_ref().map(Uring::fd)
    }
}
