//! Memory models: where a frontend keeps its I/O buffers and how the device
//! side reaches them for one request. The driver (rings, headers) and the
//! device models are the same under every model; only the buffers differ.
//!
//! | model | buffer lives in | per request |
//! |---|---|---|
//! | [`Bounce`] | private memory | copy into / out of a window slot |
//! | [`Grant`] | private memory | grant its pages, revoke on completion |
//! | [`Grant::for_copy`] (hypervisor copy) | private memory | grant its pages to a copier, revoke on completion |
//! | [`InShared`] (born in the window) | the window | nothing |
//! | [`InShared`] (full share) | all-shared "RAM" | nothing |
//! | [`Adaptive`] | private memory | bounce below a crossover, grant above |
//!
//! See `docs/memory-models.md` for the local analog of each and where it
//! differs from a hypervisor.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ringfence_bus::{
    area_addr, AreaId, BusError, DriverBus, GrantAccess, PrivateMemory, GRANT_PAGE,
};
use vm_memory::{MmapRegion, VolatileMemory, VolatileSlice};

use crate::bounce::{BounceError, BouncePool};

/// Errors of a memory model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The window or RAM pool had no room.
    #[error("{model}: {source}")]
    Pool {
        /// The model.
        model: &'static str,
        /// The cause.
        #[source]
        source: BounceError,
    },
    /// A bus operation (grant, revoke, private memory) failed.
    #[error("{model}: {op} failed")]
    Bus {
        /// The model.
        model: &'static str,
        /// The operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: BusError,
    },
    /// A buffer that another model allocated, or a length beyond the buffer.
    #[error("{model}: buffer not usable here ({why})")]
    BadBuffer {
        /// The model.
        model: &'static str,
        /// Why.
        why: &'static str,
    },
}

/// An I/O buffer as a model allocated it.
pub struct IoBuf {
    mapping: Arc<MmapRegion>,
    offset: usize,
    len: usize,
    /// Device address when the buffer lives in shared memory already.
    shared_addr: Option<u64>,
    /// The private memory a grant is made from.
    private: Option<PrivateMemory>,
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("shared_addr", &self.shared_addr)
            .finish()
    }
}

impl IoBuf {
    /// The first `len` bytes, or an error if the buffer is shorter.
    fn prefix(&self, len: usize, model: &'static str) -> Result<usize, ModelError> {
        if len <= self.len {
            Ok(len)
        } else {
            Err(ModelError::BadBuffer {
                model,
                why: "request longer than its buffer",
            })
        }
    }

    /// Its length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Its bytes. Volatile: under the shared models the device side can
    /// write them while a request is in flight.
    pub fn slice(&self) -> VolatileSlice<'_, ()> {
        // The buffer was carved out of this mapping, in range by construction.
        self.mapping
            .get_slice(self.offset, self.len)
            .unwrap_or_else(|_| VolatileSlice::from(&mut [][..]))
    }
}

/// A device-visible mapping of one buffer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    /// The device address of the buffer's first byte.
    pub addr: u64,
    /// The grant backing it, if any.
    grant: Option<AreaId>,
}

/// Where a frontend keeps I/O buffers and how it lends them to the device.
pub trait MemoryModel: Send {
    /// Its name in reports.
    fn name(&self) -> &'static str;
    /// A buffer of `len` bytes where this model keeps I/O buffers.
    fn alloc(&mut self, len: usize) -> Result<IoBuf, ModelError>;
    /// Returns a buffer from [`MemoryModel::alloc`].
    fn free(&mut self, buf: IoBuf);
    /// Makes the first `len` bytes of `buf` reachable by the device for one
    /// request.
    fn map(&mut self, buf: &IoBuf, len: usize, device_reads: bool) -> Result<Mapped, ModelError>;
    /// Ends that request's access; after it the device cannot reach `buf`
    /// (except under the shared models, where it always can).
    /// `device_wrote`: the device wrote the buffer and reported success;
    /// only then are its bytes taken (a failed read leaves `buf` as it was
    /// under the copying models).
    fn unmap(
        &mut self,
        buf: &IoBuf,
        len: usize,
        mapped: Mapped,
        device_wrote: bool,
    ) -> Result<(), ModelError>;
    /// Bytes this model copied (both directions), for reports.
    fn bytes_copied(&self) -> u64 {
        0
    }
}

/// The talk's model: buffers stay private, every request is copied through
/// a slot of the shared window.
pub struct Bounce {
    pool: Arc<BouncePool>,
}

impl Bounce {
    /// Bounces through `pool`.
    pub fn new(pool: Arc<BouncePool>) -> Self {
        Self { pool }
    }
}

fn private_anon(len: usize) -> Result<Arc<MmapRegion>, ModelError> {
    MmapRegion::new(len.max(1))
        .map(Arc::new)
        .map_err(|_| ModelError::BadBuffer {
            model: "bounce",
            why: "anonymous mapping failed",
        })
}

impl MemoryModel for Bounce {
    fn name(&self) -> &'static str {
        "bounce"
    }

    fn alloc(&mut self, len: usize) -> Result<IoBuf, ModelError> {
        Ok(IoBuf {
            mapping: private_anon(len)?,
            offset: 0,
            len,
            shared_addr: None,
            private: None,
        })
    }

    fn free(&mut self, _buf: IoBuf) {}

    fn map(&mut self, buf: &IoBuf, len: usize, device_reads: bool) -> Result<Mapped, ModelError> {
        let len = buf.prefix(len, "bounce")?;
        // Only private memory is bounced: a buffer in shared memory could
        // change under the plain slices below.
        if buf.shared_addr.is_some() {
            return Err(ModelError::BadBuffer {
                model: "bounce",
                why: "buffer lives in shared memory",
            });
        }
        // SAFETY: the buffer is this process's private memory (the device
        // side has no mapping of it); nothing writes it while the slice lives.
        let bytes =
            unsafe { std::slice::from_raw_parts(buf.mapping.as_ptr().add(buf.offset), len) };
        // A slot the device is to write is not zeroed: `unmap` copies it out
        // only when the request succeeded, when the device has written all of
        // it. Stale bytes of an earlier request can then never reach `buf`
        // from an honest device, and a lying one sees the whole window (and
        // can write anything into it) anyway.
        let addr = if device_reads {
            self.pool.map(bytes, true)
        } else {
            self.pool.map_for_device_write(len)
        }
        .map_err(|source| ModelError::Pool {
            model: "bounce",
            source,
        })?;
        Ok(Mapped { addr, grant: None })
    }

    fn unmap(
        &mut self,
        buf: &IoBuf,
        len: usize,
        mapped: Mapped,
        device_wrote: bool,
    ) -> Result<(), ModelError> {
        let len = buf.prefix(len, "bounce")?;
        // SAFETY: as in map; the caller does not touch the buffer meanwhile.
        let bytes =
            unsafe { std::slice::from_raw_parts_mut(buf.mapping.as_ptr().add(buf.offset), len) };
        self.pool
            .unmap(mapped.addr, bytes, device_wrote)
            .map_err(|source| ModelError::Pool {
                model: "bounce",
                source,
            })
    }

    fn bytes_copied(&self) -> u64 {
        let s = self.pool.stats();
        s.bytes_in.load(Ordering::Relaxed) + s.bytes_out.load(Ordering::Relaxed)
    }
}

/// Buffers that live in shared memory from the start, so nothing is copied
/// or granted per request: "born in the window" when the pool is the small
/// window, "full share" when it is all of the frontend's I/O memory.
pub struct InShared {
    pool: Arc<BouncePool>,
    name: &'static str,
}

impl InShared {
    /// Buffers born in `pool`'s window.
    pub fn born_in_window(pool: Arc<BouncePool>) -> Self {
        Self {
            pool,
            name: "in-window",
        }
    }

    /// Buffers in memory that is shared whole (no isolation).
    pub fn full_share(pool: Arc<BouncePool>) -> Self {
        Self {
            pool,
            name: "full-share",
        }
    }
}

impl MemoryModel for InShared {
    fn name(&self) -> &'static str {
        self.name
    }

    fn alloc(&mut self, len: usize) -> Result<IoBuf, ModelError> {
        let (addr, ptr) = self
            .pool
            .alloc(len, 4096)
            .map_err(|source| ModelError::Pool {
                model: self.name,
                source,
            })?;
        let offset = (ptr as usize).wrapping_sub(self.pool.mapping_ptr() as usize);
        Ok(IoBuf {
            mapping: self.pool.mapping_arc(),
            offset,
            len,
            shared_addr: Some(addr),
            private: None,
        })
    }

    fn free(&mut self, buf: IoBuf) {
        if let Some(addr) = buf.shared_addr {
            let _ = self.pool.free(addr);
        }
    }

    fn map(&mut self, buf: &IoBuf, len: usize, _device_reads: bool) -> Result<Mapped, ModelError> {
        buf.prefix(len, self.name)?;
        let addr = buf.shared_addr.ok_or(ModelError::BadBuffer {
            model: self.name,
            why: "not in shared memory",
        })?;
        Ok(Mapped { addr, grant: None })
    }

    fn unmap(&mut self, _: &IoBuf, _: usize, _: Mapped, _: bool) -> Result<(), ModelError> {
        Ok(())
    }
}

/// Buffers stay private; each request grants exactly its buffer's pages
/// (one grant per request, not per page) and revokes them on completion.
/// The device side maps the grant ([`Grant::new`]), or never maps it and has
/// a trusted party copy to and from it ([`Grant::for_copy`]).
pub struct Grant {
    bus: Arc<dyn DriverBus>,
    grants: u64,
    for_copy: bool,
}

impl Grant {
    /// Grants over `bus` (which must have `limits().can_grant`).
    pub fn new(bus: Arc<dyn DriverBus>) -> Self {
        Self {
            bus,
            grants: 0,
            for_copy: false,
        }
    }

    /// Grants for copy over `bus` (which must have `limits().can_copy`):
    /// the hypervisor-copy model.
    pub fn for_copy(bus: Arc<dyn DriverBus>) -> Self {
        Self {
            bus,
            grants: 0,
            for_copy: true,
        }
    }

    /// Grants made so far.
    pub fn grants(&self) -> u64 {
        self.grants
    }
}

fn pages(len: usize) -> u64 {
    (len as u64).div_ceil(GRANT_PAGE).max(1) * GRANT_PAGE
}

impl MemoryModel for Grant {
    fn name(&self) -> &'static str {
        if self.for_copy {
            "hv-copy"
        } else {
            "grant"
        }
    }

    fn alloc(&mut self, len: usize) -> Result<IoBuf, ModelError> {
        let size = usize::try_from(pages(len)).unwrap_or(usize::MAX);
        let private = self
            .bus
            .alloc_private(size)
            .map_err(|source| ModelError::Bus {
                model: "grant",
                op: "alloc_private",
                source,
            })?;
        Ok(IoBuf {
            mapping: private.mapping.clone(),
            offset: 0,
            len,
            shared_addr: None,
            private: Some(private),
        })
    }

    fn free(&mut self, _buf: IoBuf) {}

    fn map(&mut self, buf: &IoBuf, len: usize, device_reads: bool) -> Result<Mapped, ModelError> {
        let len = buf.prefix(len, "grant")?;
        let private = buf.private.as_ref().ok_or(ModelError::BadBuffer {
            model: "grant",
            why: "not private memory of this bus",
        })?;
        let granted = if self.for_copy {
            // One direction only: the broker refuses the other.
            let access = GrantAccess {
                device_reads,
                device_writes: !device_reads,
            };
            self.bus.grant_for_copy(private, 0, pages(len), access)
        } else {
            self.bus.grant(private, 0, pages(len))
        };
        let id = granted.map_err(|source| ModelError::Bus {
            model: self.name(),
            op: "grant",
            source,
        })?;
        self.grants += 1;
        let addr = area_addr(id, 0).ok_or(ModelError::BadBuffer {
            model: "grant",
            why: "area id out of range",
        })?;
        Ok(Mapped {
            addr,
            grant: Some(id),
        })
    }

    fn unmap(&mut self, _: &IoBuf, _: usize, mapped: Mapped, _: bool) -> Result<(), ModelError> {
        match mapped.grant {
            Some(id) => self.bus.unshare_area(id).map_err(|source| ModelError::Bus {
                model: "grant",
                op: "revoke",
                source,
            }),
            None => Ok(()),
        }
    }
}

/// Per request, the cheaper of [`Bounce`] and [`Grant`] for its size:
/// requests of at least `crossover` bytes are granted, smaller ones bounced.
/// The crossover is measured (by whoever owns the handle from
/// [`Adaptive::crossover`]) and can change while requests run.
pub struct Adaptive {
    bounce: Bounce,
    grant: Grant,
    crossover: Arc<AtomicUsize>,
}

impl Adaptive {
    /// Bounces through `pool`, grants over `bus`; everything is bounced
    /// until a crossover is set.
    pub fn new(pool: Arc<BouncePool>, bus: Arc<dyn DriverBus>) -> Self {
        Self {
            bounce: Bounce::new(pool),
            grant: Grant::new(bus),
            crossover: Arc::new(AtomicUsize::new(usize::MAX)),
        }
    }

    /// The crossover, in bytes, shared with its owner.
    pub fn crossover(&self) -> Arc<AtomicUsize> {
        self.crossover.clone()
    }

    fn grants(&self, len: usize) -> bool {
        len >= self.crossover.load(Ordering::Relaxed)
    }
}

impl MemoryModel for Adaptive {
    fn name(&self) -> &'static str {
        "adaptive"
    }

    fn alloc(&mut self, len: usize) -> Result<IoBuf, ModelError> {
        // Grantable private memory, which the bounce path copies from as well.
        self.grant.alloc(len)
    }

    fn free(&mut self, buf: IoBuf) {
        self.grant.free(buf)
    }

    fn map(&mut self, buf: &IoBuf, len: usize, device_reads: bool) -> Result<Mapped, ModelError> {
        if self.grants(len) {
            self.grant.map(buf, len, device_reads)
        } else {
            self.bounce.map(buf, len, device_reads)
        }
    }

    fn unmap(
        &mut self,
        buf: &IoBuf,
        len: usize,
        mapped: Mapped,
        device_wrote: bool,
    ) -> Result<(), ModelError> {
        // The mapping says which path lent it, whatever the crossover is now.
        if mapped.grant.is_some() {
            self.grant.unmap(buf, len, mapped, device_wrote)
        } else {
            self.bounce.unmap(buf, len, mapped, device_wrote)
        }
    }

    fn bytes_copied(&self) -> u64 {
        self.bounce.bytes_copied()
    }
}
