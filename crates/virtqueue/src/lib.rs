//! The driver side of a virtio split virtqueue, and a virtio-blk driver on it.
//!
//! Written for Ringfence's frontends and for RTOS guests alike: `no_std`, no
//! allocation anywhere, data buffers given by *device address* (where they live
//! is the caller's memory model: bounced, granted, in a window).
//!
//! It is correct by construction where virtio-drivers 0.13 is not:
//! - publishing `avail.idx` and reading `avail_event` (or `used.flags`) are
//!   separated by a full fence, and so are writing `used_event` and re-reading
//!   `used.idx` ([`SplitQueue::arm`]);
//! - event indices are compared with the wrap-around-correct
//!   [`vring_need_event`];
//! - the device is hostile: every used element is copied once and validated,
//!   and a bad one is an error, never a panic or an out-of-bounds access.
//!
//! Driver-private bookkeeping (free list, chain lengths, writable bytes per
//! chain) lives in the [`SplitQueue`] itself, never in device-visible memory,
//! so the device cannot corrupt it. Its capacity is the const parameter `MAX`
//! (default [`DEFAULT_MAX_QUEUE_SIZE`]): 8 bytes per descriptor.

#![no_std]

mod blk;
mod queue;

pub use blk::{
    BlkCompletion, BlkDriver, BlkError, BlkRequest, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
pub use queue::{
    vring_need_event, DmaRegion, QueueError, Segment, SplitQueue, Used, UsedFault,
    DEFAULT_MAX_QUEUE_SIZE, MAX_QUEUE_SIZE,
};

/// Feature bits this crate negotiates (virtio 1.2, 2.2 and 5.2.3).
pub mod features {
    /// `VIRTIO_BLK_F_SEG_MAX`: `seg_max` in config space is valid.
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    /// `VIRTIO_BLK_F_RO`: the device is read-only.
    pub const BLK_RO: u64 = 1 << 5;
    /// `VIRTIO_BLK_F_BLK_SIZE`: `blk_size` in config space is valid.
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    /// `VIRTIO_BLK_F_FLUSH`: the device takes FLUSH requests.
    pub const BLK_FLUSH: u64 = 1 << 9;
    /// `VIRTIO_RING_F_EVENT_IDX`: `used_event` / `avail_event` suppression.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// `VIRTIO_F_VERSION_1`: a virtio 1.x (not legacy) device.
    pub const VERSION_1: u64 = 1 << 32;
}
