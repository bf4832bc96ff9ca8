//! virtio-blk (virtio 1.2, 5.2) over any virtio-drivers `Transport`, on a [`SplitQueue`].

use core::ptr;

use thiserror::Error;
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};

use crate::features::{BLK_BLK_SIZE, BLK_FLUSH, BLK_RO, BLK_SEG_MAX, RING_EVENT_IDX, VERSION_1};
use crate::queue::{DmaRegion, QueueError, Segment, SplitQueue, DEFAULT_MAX_QUEUE_SIZE};

/// Request type: read (device writes the data buffer).
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Request type: write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Request type: flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Request type: get the device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: I/O error.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: request unsupported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Bytes of the id string a GET_ID request returns.
pub const VIRTIO_BLK_ID_BYTES: u32 = 20;

const SECTOR_SIZE: u32 = 512;
const QUEUE: u16 = 0;
const HEADER_BYTES: usize = 16;
/// Written to a status byte before the request goes out: not a status the
/// device may return, so a completion the device never wrote a status for
/// shows as 0xff.
const STATUS_UNSET: u8 = 0xff;
/// Features this driver accepts when offered (VERSION_1 is also required).
const WANTED: u64 = VERSION_1 | BLK_FLUSH | BLK_RO | BLK_BLK_SIZE | BLK_SEG_MAX;
/// Re-reads of the status after a reset, and of config space when its
/// generation moves, before giving up (no unbounded loops on a device's word).
const RETRIES: usize = 64;

/// config space offsets (virtio 1.2, 5.2.4).
const CFG_CAPACITY: usize = 0;
const CFG_SEG_MAX: usize = 12;
const CFG_BLK_SIZE: usize = 20;

/// One virtio-blk request; buffers are device addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkRequest {
    /// Read `len` bytes (a non-zero multiple of 512) from `sector` into `data`.
    Read {
        /// First 512-byte sector.
        sector: u64,
        /// Device address of the buffer.
        data: u64,
        /// Bytes.
        len: u32,
    },
    /// Write `len` bytes (a non-zero multiple of 512) from `data` at `sector`.
    Write {
        /// First 512-byte sector.
        sector: u64,
        /// Device address of the buffer.
        data: u64,
        /// Bytes.
        len: u32,
    },
    /// Flush the device's write cache (needs `VIRTIO_BLK_F_FLUSH`).
    Flush,
    /// Read the 20-byte device id string into `data`.
    GetId {
        /// Device address of a 20-byte buffer.
        data: u64,
    },
}

/// A finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkCompletion {
    /// The token [`BlkDriver::submit`] returned.
    pub token: u16,
    /// The status byte as the device wrote it: [`VIRTIO_BLK_S_OK`],
    /// [`VIRTIO_BLK_S_IOERR`], [`VIRTIO_BLK_S_UNSUPP`], or anything else
    /// as-is (0xff: the device wrote none).
    pub status: u8,
    /// Bytes the device says it wrote (data for reads and GET_ID, plus the
    /// status byte); validated against the request's writable bytes.
    pub used_len: u32,
}

/// Errors of [`BlkDriver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum BlkError {
    /// The transport's device is not a block device.
    #[error("not a block device: {found:?}")]
    WrongDevice {
        /// The device type found.
        found: DeviceType,
    },
    /// The status did not read back as 0 after a reset.
    #[error("device status {status:#x} after reset, not 0")]
    ResetFailed {
        /// The status read.
        status: u32,
    },
    /// The device does not offer `VIRTIO_F_VERSION_1` (legacy devices are not driven).
    #[error("device offers no VIRTIO_F_VERSION_1 (features {offered:#x})")]
    NoVersion1 {
        /// Features offered.
        offered: u64,
    },
    /// The device did not keep `FEATURES_OK` after the driver's features.
    #[error("device refused features {features:#x} (status {status:#x})")]
    FeaturesRefused {
        /// Features written.
        features: u64,
        /// Status read back.
        status: u32,
    },
    /// Reading config space failed.
    #[error("reading config space at offset {offset}: {source}")]
    Config {
        /// Offset read.
        offset: usize,
        /// The transport's error.
        source: virtio_drivers::Error,
    },
    /// The config generation kept changing while reading.
    #[error("config space kept changing while read")]
    ConfigUnstable,
    /// Queue 0 does not exist (max size 0).
    #[error("device has no queue 0")]
    NoQueue,
    /// A queue size of 0 was asked for.
    #[error("queue size 0 asked for")]
    ZeroQueueSize,
    /// The region is smaller than [`BlkDriver::region_size`] of the requested size.
    #[error("region of {len} bytes is smaller than the {needed} needed")]
    RegionTooSmall {
        /// The region's length.
        len: usize,
        /// Bytes needed.
        needed: usize,
    },
    /// The device did not keep `DRIVER_OK` (or asks for a reset).
    #[error("device did not accept DRIVER_OK (status {status:#x})")]
    DriverOkRefused {
        /// Status read back.
        status: u32,
    },
    /// A queue error (including a hostile used element).
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// Not enough free descriptors for this request now.
    #[error("queue full: the request needs {needed} descriptors, {free} are free")]
    QueueFull {
        /// Descriptors needed (2 or 3).
        needed: u16,
        /// Descriptors free.
        free: u16,
    },
    /// Read/Write length not a non-zero multiple of 512.
    #[error("length {len} is not a non-zero multiple of 512")]
    BadLength {
        /// The length given.
        len: u32,
    },
    /// A write to a read-only device (`VIRTIO_BLK_F_RO`).
    #[error("the device is read-only")]
    ReadOnly,
    /// FLUSH without `VIRTIO_BLK_F_FLUSH` negotiated.
    #[error("the device does not take FLUSH")]
    FlushUnsupported,
}

/// The request header as the device reads it (little-endian fields).
#[repr(C)]
struct RawHeader {
    type_: u32,
    reserved: u32,
    sector: u64,
}

/// Where the parts of a [`BlkDriver`] region are, for a queue of a given size.
struct BlkLayout {
    ring: usize,
    headers: usize,
    status: usize,
    total: usize,
}

impl BlkLayout {
    const fn new(size: u16) -> Self {
        let ring = SplitQueue::region_size(size);
        let headers = (ring + 15) & !15;
        let status = headers + HEADER_BYTES * size as usize;
        BlkLayout {
            ring,
            headers,
            status,
            total: status + size as usize,
        }
    }
}

/// A virtio-blk driver with one request queue, over any virtio-drivers
/// [`Transport`]. The only part of this crate that talks to the transport.
///
/// Requests are [`submit`](Self::submit)ted (header, data, status as one
/// chain), [`kick`](Self::kick)ed, and taken back with [`pop`](Self::pop).
/// Headers and status bytes live in the driver's region, one per head id,
/// so nothing is allocated. `MAX` is the [`SplitQueue`] capacity.
pub struct BlkDriver<T: Transport, const MAX: usize = DEFAULT_MAX_QUEUE_SIZE> {
    transport: T,
    queue: SplitQueue<MAX>,
    region: DmaRegion,
    layout: BlkLayout,
    features: u64,
    capacity: u64,
    blk_size: Option<u32>,
    seg_max: Option<u32>,
}

impl<T: Transport> BlkDriver<T> {
    /// Region bytes for a queue of `queue_size`: the split queue, then (at a
    /// 16-byte boundary) one 16-byte request header and one status byte per
    /// descriptor.
    pub const fn region_size(queue_size: u16) -> usize {
        BlkLayout::new(queue_size).total
    }

    /// Resets the device and brings it up with queue 0 in `region`.
    ///
    /// Negotiates `VIRTIO_F_VERSION_1` (required),
    /// `VIRTIO_RING_F_EVENT_IDX` if offered and `event_idx`, and FLUSH, RO,
    /// BLK_SIZE, SEG_MAX if offered; nothing else. Queue 0 gets
    /// `min(queue_size, max_queue_size, DEFAULT_MAX_QUEUE_SIZE)` rounded down
    /// to a power of two. Reads the capacity, sets DRIVER_OK. On failure
    /// after the reset the device is left FAILED (before `queue_set`) or
    /// reset.
    ///
    /// # Safety
    ///
    /// As [`SplitQueue::new`] for `region` (it is zeroed here), and it stays
    /// valid until the driver is dropped: `Drop` resets the device and unsets
    /// the queue before the memory can be reused.
    ///
    /// # Errors
    ///
    /// Any [`BlkError`] of set-up.
    pub unsafe fn new(
        transport: T,
        region: DmaRegion,
        queue_size: u16,
        event_idx: bool,
    ) -> Result<Self, BlkError> {
        // SAFETY: the caller's contract is new_bounded's.
        unsafe { Self::new_bounded(transport, region, queue_size, event_idx) }
    }
}

impl<T: Transport, const MAX: usize> BlkDriver<T, MAX> {
    /// [`BlkDriver::new`] for any queue capacity `MAX` (queue sizes up to
    /// `min(MAX, 32768)`).
    ///
    /// # Safety
    ///
    /// As [`BlkDriver::new`].
    ///
    /// # Errors
    ///
    /// As [`BlkDriver::new`].
    pub unsafe fn new_bounded(
        mut transport: T,
        region: DmaRegion,
        queue_size: u16,
        event_idx: bool,
    ) -> Result<Self, BlkError> {
        let found = transport.device_type();
        if found != DeviceType::Block {
            return Err(BlkError::WrongDevice { found });
        }
        if queue_size == 0 {
            return Err(BlkError::ZeroQueueSize);
        }
        let needed = BlkLayout::new(queue_size).total;
        if region.len < needed {
            return Err(BlkError::RegionTooSmall {
                len: region.len,
                needed,
            });
        }
        if region.paddr.checked_add(needed as u64).is_none() {
            return Err(QueueError::RegionWraps {
                paddr: region.paddr,
                len: needed,
            }
            .into());
        }

        transport.set_status(DeviceStatus::empty());
        let mut status = transport.get_status();
        for _ in 0..RETRIES {
            if status.is_empty() {
                break;
            }
            core::hint::spin_loop();
            status = transport.get_status();
        }
        if !status.is_empty() {
            return Err(BlkError::ResetFailed {
                status: status.bits(),
            });
        }
        transport.set_status(DeviceStatus::ACKNOWLEDGE);
        transport.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);

        let offered = transport.read_device_features();
        if offered & VERSION_1 == 0 {
            return Err(fail(&mut transport, BlkError::NoVersion1 { offered }));
        }
        let mut wanted = WANTED;
        if event_idx {
            wanted |= RING_EVENT_IDX;
        }
        let features = offered & wanted;
        transport.write_driver_features(features);
        let features_ok =
            DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
        transport.set_status(features_ok);
        let status = transport.get_status();
        if !status.contains(DeviceStatus::FEATURES_OK) {
            let err = BlkError::FeaturesRefused {
                features,
                status: status.bits(),
            };
            return Err(fail(&mut transport, err));
        }

        let config = read_config(&transport, features);
        let (capacity, seg_max, blk_size) = match config {
            Ok(c) => c,
            Err(e) => return Err(fail(&mut transport, e)),
        };

        let max = transport.max_queue_size(QUEUE);
        if max == 0 {
            return Err(fail(&mut transport, BlkError::NoQueue));
        }
        let limit = u32::from(queue_size)
            .min(max)
            .min(u32::try_from(MAX).unwrap_or(u32::MAX))
            .min(u32::from(crate::MAX_QUEUE_SIZE));
        if limit == 0 {
            return Err(fail(&mut transport, BlkError::NoQueue));
        }
        // Round down to a power of two; limit <= 32768 fits u16.
        let size = (1u32 << (31 - limit.leading_zeros())) as u16;
        let layout = BlkLayout::new(size);
        for i in layout.ring..layout.total {
            // SAFETY: i < layout.total <= needed <= region.len (the layout
            // grows with the size and size <= queue_size), and the caller
            // gives us the region. Volatile: the memory is shared.
            unsafe { ptr::write_volatile(region.vaddr.as_ptr().add(i), 0) };
        }
        let ring = DmaRegion {
            len: layout.ring,
            ..region
        };
        // SAFETY: the ring part of the caller's region, under the caller's contract.
        let queue = match unsafe {
            SplitQueue::<MAX>::new_bounded(size, ring, features & RING_EVENT_IDX != 0)
        } {
            Ok(q) => q,
            Err(e) => return Err(fail(&mut transport, e.into())),
        };
        let (desc, avail, used) = queue.addresses();
        transport.queue_set(QUEUE, u32::from(size), desc, avail, used);
        transport.set_status(features_ok | DeviceStatus::DRIVER_OK);
        let status = transport.get_status();
        if !status.contains(DeviceStatus::DRIVER_OK)
            || status.contains(DeviceStatus::DEVICE_NEEDS_RESET)
        {
            // The device may already know the ring: take it back before the
            // caller may reuse the memory.
            transport.set_status(DeviceStatus::empty());
            transport.queue_unset(QUEUE);
            return Err(BlkError::DriverOkRefused {
                status: status.bits(),
            });
        }
        Ok(BlkDriver {
            transport,
            queue,
            region,
            layout,
            features,
            capacity,
            blk_size,
            seg_max,
        })
    }

    /// Capacity in 512-byte sectors, as read at set-up.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    /// The size of queue 0.
    pub fn queue_size(&self) -> u16 {
        self.queue.size()
    }

    /// Whether the device is read-only (`VIRTIO_BLK_F_RO`).
    pub fn read_only(&self) -> bool {
        self.features & BLK_RO != 0
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub fn event_idx(&self) -> bool {
        self.features & RING_EVENT_IDX != 0
    }

    /// Whether FLUSH requests are accepted (`VIRTIO_BLK_F_FLUSH`).
    pub fn flush_supported(&self) -> bool {
        self.features & BLK_FLUSH != 0
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The device's block size, if it offered `VIRTIO_BLK_F_BLK_SIZE`.
    pub fn blk_size(&self) -> Option<u32> {
        self.blk_size
    }

    /// The device's maximum segments per request, if it offered `VIRTIO_BLK_F_SEG_MAX`.
    pub fn seg_max(&self) -> Option<u32> {
        self.seg_max
    }

    /// Adds a request (header, data, status as one chain of 2 or 3
    /// descriptors) without notifying; returns its token (the head id).
    ///
    /// # Errors
    ///
    /// [`BlkError::BadLength`], [`BlkError::ReadOnly`],
    /// [`BlkError::FlushUnsupported`], [`BlkError::QueueFull`], or a
    /// [`BlkError::Queue`] error of the chain (e.g. a data address that wraps).
    pub fn submit(&mut self, req: BlkRequest) -> Result<u16, BlkError> {
        let (type_, sector, data) = match req {
            BlkRequest::Read { sector, data, len } => {
                check_len(len)?;
                (VIRTIO_BLK_T_IN, sector, Some((data, len, true)))
            }
            BlkRequest::Write { sector, data, len } => {
                check_len(len)?;
                if self.read_only() {
                    return Err(BlkError::ReadOnly);
                }
                (VIRTIO_BLK_T_OUT, sector, Some((data, len, false)))
            }
            BlkRequest::Flush => {
                if !self.flush_supported() {
                    return Err(BlkError::FlushUnsupported);
                }
                (VIRTIO_BLK_T_FLUSH, 0, None)
            }
            BlkRequest::GetId { data } => (
                VIRTIO_BLK_T_GET_ID,
                0,
                Some((data, VIRTIO_BLK_ID_BYTES, true)),
            ),
        };
        let needed: u16 = if data.is_some() { 3 } else { 2 };
        let free = self.queue.free_descriptors();
        let head = match self.queue.next_head() {
            Some(head) if free >= needed => head,
            _ => return Err(BlkError::QueueFull { needed, free }),
        };
        let header = RawHeader {
            type_: type_.to_le(),
            reserved: 0,
            sector: sector.to_le(),
        };
        // SAFETY: head < queue size, so the header and status byte are within
        // the region's header and status arrays (new() laid them out for this
        // size); the header array is 16-aligned. Volatile: shared memory.
        unsafe {
            ptr::write_volatile(self.header_ptr(head), header);
            ptr::write_volatile(self.status_ptr(head), STATUS_UNSET);
        }
        let header_seg = Segment {
            addr: self.device_addr(self.layout.headers + HEADER_BYTES * usize::from(head)),
            len: HEADER_BYTES as u32,
            device_writes: false,
        };
        let status_seg = Segment {
            addr: self.device_addr(self.layout.status + usize::from(head)),
            len: 1,
            device_writes: true,
        };
        let added = match data {
            Some((addr, len, device_writes)) => self.queue.add(&[
                header_seg,
                Segment {
                    addr,
                    len,
                    device_writes,
                },
                status_seg,
            ]),
            None => self.queue.add(&[header_seg, status_seg]),
        }?;
        // SplitQueue::add takes the head next_head() named.
        debug_assert_eq!(added, head);
        Ok(added)
    }

    /// Publishes what was submitted and notifies the device if it asked for
    /// it; returns whether it notified.
    pub fn kick(&mut self) -> bool {
        let notify = self.queue.publish();
        if notify {
            self.transport.notify(QUEUE);
        }
        notify
    }

    /// The next completion, if any: a used element (validated), and its
    /// request's status byte, read once.
    ///
    /// # Errors
    ///
    /// [`BlkError::Queue`] with [`QueueError::BadUsed`] on a hostile used
    /// element (the queue is broken from then on: drop the driver).
    pub fn pop(&mut self) -> Result<Option<BlkCompletion>, BlkError> {
        let Some(used) = self.queue.pop_used()? else {
            return Ok(None);
        };
        // SAFETY: used.head < queue size (validated by pop_used): within the
        // status array. The acquire load of used.idx in pop_used orders this
        // read after the device's write.
        let status = unsafe { ptr::read_volatile(self.status_ptr(used.head)) };
        Ok(Some(BlkCompletion {
            token: used.head,
            status,
            used_len: used.len,
        }))
    }

    /// See [`SplitQueue::arm`]: true if a completion is already pending (do
    /// not sleep then).
    pub fn arm(&mut self) -> bool {
        self.queue.arm()
    }

    /// True if a completion is waiting to be popped (for polling).
    pub fn has_used(&self) -> bool {
        self.queue.has_used()
    }

    /// See [`SplitQueue::disarm`].
    pub fn disarm(&mut self) {
        self.queue.disarm()
    }

    /// Requests submitted and not yet popped.
    pub fn in_flight(&self) -> u16 {
        self.queue.in_flight()
    }

    /// Descriptors free (a request needs 2 or 3).
    pub fn free_descriptors(&self) -> u16 {
        self.queue.free_descriptors()
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport, mutably (e.g. to acknowledge interrupts).
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    fn device_addr(&self, offset: usize) -> u64 {
        // No overflow: offset < layout.total <= needed, and new() checked
        // paddr + needed.
        self.region.paddr + offset as u64
    }

    fn header_ptr(&self, head: u16) -> *mut RawHeader {
        let offset = self.layout.headers + HEADER_BYTES * usize::from(head);
        // SAFETY: callers pass head < queue size, so offset < layout.total <= region.len.
        unsafe { self.region.vaddr.as_ptr().add(offset).cast() }
    }

    fn status_ptr(&self, head: u16) -> *mut u8 {
        let offset = self.layout.status + usize::from(head);
        // SAFETY: callers pass head < queue size, so offset < layout.total <= region.len.
        unsafe { self.region.vaddr.as_ptr().add(offset) }
    }
}

impl<T: Transport, const MAX: usize> Drop for BlkDriver<T, MAX> {
    fn drop(&mut self) {
        // Reset first: a device at DRIVER_OK could still write the ring or
        // buffers once the caller reuses the memory.
        self.transport.set_status(DeviceStatus::empty());
        self.transport.queue_unset(QUEUE);
    }
}

impl<T: Transport, const MAX: usize> core::fmt::Debug for BlkDriver<T, MAX> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BlkDriver")
            .field("queue", &self.queue)
            .field("features", &self.features)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

fn check_len(len: u32) -> Result<(), BlkError> {
    if len == 0 || !len.is_multiple_of(SECTOR_SIZE) {
        return Err(BlkError::BadLength { len });
    }
    Ok(())
}

/// Marks the device FAILED (virtio 3.1.1: the driver gave up) and passes `err` on.
fn fail<T: Transport>(transport: &mut T, err: BlkError) -> BlkError {
    let status = transport.get_status();
    transport.set_status(status | DeviceStatus::FAILED);
    err
}

/// (capacity, seg_max, blk_size), consistent under one config generation.
fn read_config<T: Transport>(
    transport: &T,
    features: u64,
) -> Result<(u64, Option<u32>, Option<u32>), BlkError> {
    let read = |offset: usize| {
        transport
            .read_config_space::<u32>(offset)
            .map_err(|source| BlkError::Config { offset, source })
    };
    for _ in 0..RETRIES {
        let before = transport.read_config_generation();
        let low = read(CFG_CAPACITY)?;
        let high = read(CFG_CAPACITY + 4)?;
        let seg_max = if features & BLK_SEG_MAX != 0 {
            Some(read(CFG_SEG_MAX)?)
        } else {
            None
        };
        let blk_size = if features & BLK_BLK_SIZE != 0 {
            Some(read(CFG_BLK_SIZE)?)
        } else {
            None
        };
        if transport.read_config_generation() == before {
            return Ok((u64::from(high) << 32 | u64::from(low), seg_max, blk_size));
        }
    }
    Err(BlkError::ConfigUnstable)
}
