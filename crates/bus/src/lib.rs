//! The bus: everything the two sides may use to cooperate, and nothing else.
//!
//! A bus carries bounded-size virtio-msg messages between one driver side and
//! one device side, rings doorbells, and lets the driver side share memory
//! *areas* with the device side. Every address the device side sees is
//! `area_id << 48 | offset` ([`area_addr`]), as in the virtio-msg FF-A binding;
//! memory that was never shared has no address at all.
//!
//! Hypervisors differ, so a bus states its [`BusLimits`] and the transports
//! adapt (config in chunks, in-band events when there are no doorbells).

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use vm_memory::MmapRegion;

/// Identifies a shared area on one bus connection. Area 0 is never used, so a
/// zero or small address can never reach shared memory.
pub type AreaId = u16;

/// Bit position of the area id in a device-visible address.
pub const AREA_SHIFT: u32 = 48;
/// Largest offset inside one area.
pub const AREA_OFFSET_MASK: u64 = (1 << AREA_SHIFT) - 1;

/// The device-visible address of `offset` in area `id`, or `None` if the
/// offset does not fit in 48 bits.
pub fn area_addr(id: AreaId, offset: u64) -> Option<u64> {
    (offset <= AREA_OFFSET_MASK).then(|| (u64::from(id) << AREA_SHIFT) | offset)
}

/// Splits a device-visible address into (area id, offset).
pub fn split_area_addr(addr: u64) -> (AreaId, u64) {
    ((addr >> AREA_SHIFT) as AreaId, addr & AREA_OFFSET_MASK)
}

/// What a bus can do. Transports read this and adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BusLimits {
    /// Largest message (header included) the bus carries.
    pub max_msg_size: usize,
    /// Doorbells replace EVENT_AVAIL / EVENT_USED messages.
    pub doorbells: bool,
    /// The device side may be asked to poll instead of waiting for notifications.
    pub polling: bool,
    /// Areas can be shared and revoked at run time (grants).
    pub can_grant: bool,
    /// A trusted party can copy between the two sides.
    pub can_copy: bool,
}

/// Direction of a doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DoorbellDirection {
    /// Driver rings, device waits (replaces EVENT_AVAIL).
    ToDevice,
    /// Device rings, driver waits (replaces EVENT_USED / EVENT_CONFIG).
    ToDriver,
}

/// Errors of a bus operation. Every bus operation can fail: a peer can vanish.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The peer closed the connection.
    #[error("peer disconnected")]
    Disconnected,
    /// No answer in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A message larger than the bus carries.
    #[error("message of {len} bytes exceeds the bus maximum of {max}")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The bus maximum.
        max: usize,
    },
    /// The peer broke the bus protocol.
    #[error("bus protocol violation: {reason}")]
    Protocol {
        /// What was wrong.
        reason: String,
    },
    /// The bus cannot do this (no grants on this hypervisor, say).
    #[error("{op} is not supported by this bus")]
    Unsupported {
        /// The operation.
        op: &'static str,
    },
    /// A system call failed.
    #[error("{op} failed")]
    Io {
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl BusError {
    /// Wraps an I/O error with the operation that failed.
    pub fn io(op: &'static str, source: std::io::Error) -> Self {
        BusError::Io { op, source }
    }
}

/// A doorbell: a one-bit, coalescing notification between the two sides.
pub trait Doorbell: Send + Sync {
    /// Rings it.
    fn ring(&self) -> Result<(), BusError>;
    /// Waits until it has been rung (and clears it); `false` on timeout.
    fn wait(&self, timeout: Option<Duration>) -> Result<bool, BusError>;
    /// Clears it without waiting; `true` if it had been rung.
    fn try_clear(&self) -> Result<bool, BusError>;
    /// A file descriptor that becomes readable when rung, where the platform has one.
    fn pollable_fd(&self) -> Option<RawFd>;
}

/// A memory area as the device side sees it, with its id.
///
/// Usually `mapping` *is* the driver's memory, mapped. Where a trusted third
/// party copies instead (a hypervisor's grant copy), the device side never
/// maps driver memory: `mapping` is staging memory of the device side's own,
/// laid out like the area, and `copier` moves bytes between the two on
/// request. Either way the device models see memory at the area's addresses.
#[derive(Clone)]
pub struct SharedArea {
    /// Its id; its addresses start at `area_addr(id, 0)`.
    pub id: AreaId,
    /// The mapping in this process: the area itself, or its staging copy.
    pub mapping: Arc<MmapRegion>,
    /// Set when `mapping` is staging memory and the driver's bytes move only
    /// through this copier.
    pub copier: Option<Arc<dyn AreaCopier>>,
}

impl std::fmt::Debug for SharedArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedArea")
            .field("id", &self.id)
            .field("size", &self.mapping.size())
            .field("copied", &self.copier.is_some())
            .finish()
    }
}

/// A byte range inside one area: `offset..offset + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AreaRange {
    /// Start, from the area's first byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Most ranges one copy request carries (one descriptor chain's worth).
pub const MAX_COPY_RANGES: usize = 16;

/// Copies between an area the device side cannot map and the area's staging
/// memory (the same offsets in [`SharedArea::mapping`]), done by a party
/// both sides trust (Xen's GNTTABOP_copy; a broker process on the local bus).
pub trait AreaCopier: Send + Sync {
    /// Copies the driver's bytes in `ranges` into the staging memory.
    fn fetch(&self, ranges: &[AreaRange]) -> Result<(), BusError>;
    /// Copies the staging memory's bytes in `ranges` to the driver.
    fn store(&self, ranges: &[AreaRange]) -> Result<(), BusError>;
}

/// What the device side receives from a bus.
pub enum DeviceBusEvent {
    /// A virtio-msg message of this many bytes is in the receive buffer.
    Message(usize),
    /// The driver shared a new area; once the device side can reach it, it
    /// calls [`DeviceBus::complete_share`], which tells the driver.
    AreaShared(SharedArea),
    /// The driver revoked an area; the device must stop using it and then
    /// call [`DeviceBus::complete_unshare`]: the driver learns that the area
    /// is out of use only from that answer.
    AreaUnshared(AreaId),
    /// The driver attached a doorbell for one queue of one device.
    DoorbellAttached {
        /// Device number.
        dev_num: u16,
        /// Queue index.
        queue: u16,
        /// Direction.
        direction: DoorbellDirection,
        /// The doorbell.
        doorbell: Arc<dyn Doorbell>,
    },
    /// A bus-internal message (handshake...) was handled; nothing to do.
    Handled,
    /// Something arrived that the bus itself refused (oversized, malformed
    /// bus-specific message, unacceptable area); counted by the caller.
    Dropped {
        /// Why.
        reason: String,
    },
}

/// The device side of a bus (the backend VM).
pub trait DeviceBus: Send + Sync {
    /// What this bus can do.
    fn limits(&self) -> BusLimits;
    /// Sends one message (at most `limits().max_msg_size` bytes).
    fn send(&self, msg: &[u8]) -> Result<(), BusError>;
    /// Waits for the next event. `buf` must hold `limits().max_msg_size` bytes.
    fn recv(&self, buf: &mut [u8]) -> Result<DeviceBusEvent, BusError>;
    /// Tells the driver that area `id`, from an
    /// [`DeviceBusEvent::AreaShared`], is now reachable by the device side.
    fn complete_share(&self, id: AreaId) -> Result<(), BusError>;
    /// Tells the driver that area `id`, revoked by an
    /// [`DeviceBusEvent::AreaUnshared`], is no longer reachable by the
    /// device side (`released`), or that it could not be released in time.
    fn complete_unshare(&self, id: AreaId, released: bool) -> Result<(), BusError>;
}

/// An area as the driver side sees it: its id and its local mapping.
#[derive(Clone)]
pub struct LocalArea {
    /// Its id.
    pub id: AreaId,
    /// The mapping in this process.
    pub mapping: Arc<MmapRegion>,
}

/// Frontend memory that stays private until part of it is granted with
/// [`DriverBus::grant`]. How it is made grantable is the bus's business (a
/// memfd of its own on the local bus, guest pages on a hypervisor); the
/// device side cannot reach any of it until then.
#[derive(Clone)]
pub struct PrivateMemory {
    /// The mapping in this process.
    pub mapping: Arc<MmapRegion>,
}

impl std::fmt::Debug for PrivateMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateMemory")
            .field("size", &self.mapping.size())
            .finish()
    }
}

/// What the device side may do with a grant for copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantAccess {
    /// It may read the pages (a request the device reads: a disk write).
    pub device_reads: bool,
    /// It may write them (a request the device answers into: a disk read).
    pub device_writes: bool,
}

/// Page granularity of grants: a grant covers whole pages.
pub const GRANT_PAGE: u64 = 4096;

/// The driver side of a bus (the frontend VM).
pub trait DriverBus: Send + Sync {
    /// What this bus can do.
    fn limits(&self) -> BusLimits;
    /// Sends one message.
    fn send(&self, msg: &[u8]) -> Result<(), BusError>;
    /// Receives one message into `buf`; `Ok(None)` on timeout.
    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> Result<Option<usize>, BusError>;
    /// Shares a new zeroed area of `size` bytes with the device side.
    fn share_area(&self, size: usize) -> Result<LocalArea, BusError>;
    /// Revokes an area or a grant. Returns once the device side no longer
    /// reaches it.
    fn unshare_area(&self, id: AreaId) -> Result<(), BusError>;
    /// Allocates `size` bytes of private memory that can later be granted
    /// piecewise (for buses with `limits().can_grant`).
    fn alloc_private(&self, size: usize) -> Result<PrivateMemory, BusError> {
        let _ = size;
        Err(BusError::Unsupported {
            op: "alloc_private",
        })
    }
    /// Grants the device side the pages `offset..offset + len` of `memory`
    /// (both multiples of [`GRANT_PAGE`]) as a new area, until
    /// [`DriverBus::unshare_area`]. Returns once the device side can reach them.
    fn grant(&self, memory: &PrivateMemory, offset: u64, len: u64) -> Result<AreaId, BusError> {
        let _ = (memory, offset, len);
        Err(BusError::Unsupported { op: "grant" })
    }
    /// Like [`DriverBus::grant`], but the device side never maps the pages:
    /// a party both sides trust copies between them and the device side's
    /// own memory when the device side asks, and only in the directions
    /// `access` allows (for buses with `limits().can_copy`). Revoked with
    /// [`DriverBus::unshare_area`].
    fn grant_for_copy(
        &self,
        memory: &PrivateMemory,
        offset: u64,
        len: u64,
        access: GrantAccess,
    ) -> Result<AreaId, BusError> {
        let _ = (memory, offset, len, access);
        Err(BusError::Unsupported {
            op: "grant_for_copy",
        })
    }
    /// Creates a doorbell for `queue` of device `dev_num`, if the bus has doorbells.
    fn doorbell(
        &self,
        dev_num: u16,
        queue: u16,
        direction: DoorbellDirection,
    ) -> Result<Option<Arc<dyn Doorbell>>, BusError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_addresses() {
        assert_eq!(area_addr(1, 0x1000), Some(0x0001_0000_0000_1000));
        assert_eq!(area_addr(1, 1 << 48), None);
        assert_eq!(split_area_addr(0x0002_0000_0000_0040), (2, 0x40));
    }
}
