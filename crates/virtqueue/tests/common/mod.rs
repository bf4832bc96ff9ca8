//! Test scaffolding: one anonymous mapping seen both by the driver (a
//! `DmaRegion`) and by a device (a `GuestMemoryMmap` at guest address ==
//! `paddr`), a fake virtio-drivers `Transport`, and a virtio-blk device built
//! on rust-vmm's `virtio-queue`.

#![allow(dead_code, missing_docs)]

use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringfence_virtqueue::DmaRegion;
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::PhysAddr;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Device address of the mapping's byte 0: above 4 GiB so that the high
/// halves of queue addresses matter, and nothing like the vaddr.
pub const PADDR: u64 = 0x1_2340_0000;

/// One anonymous mapping, both sides' view.
pub struct Mem {
    pub gm: GuestMemoryMmap,
    vaddr: usize,
    pub len: usize,
}

impl Mem {
    pub fn new(len: usize) -> Arc<Mem> {
        let mapping = MmapRegion::<()>::new(len).expect("mmap");
        let vaddr = mapping.as_ptr() as usize;
        let region = GuestRegionMmap::new(mapping, GuestAddress(PADDR)).expect("region");
        let gm = GuestMemoryMmap::from_regions(vec![region]).expect("guest memory");
        Arc::new(Mem { gm, vaddr, len })
    }

    /// The part `[offset, offset + len)` as a driver region.
    pub fn region(&self, offset: usize, len: usize) -> DmaRegion {
        assert!(offset + len <= self.len);
        DmaRegion {
            vaddr: NonNull::new((self.vaddr + offset) as *mut u8).unwrap(),
            paddr: PADDR + offset as u64,
            len,
        }
    }

    pub fn read<T: vm_memory::ByteValued>(&self, paddr: u64) -> T {
        self.gm.read_obj(GuestAddress(paddr)).expect("read")
    }

    pub fn write<T: vm_memory::ByteValued>(&self, paddr: u64, v: T) {
        self.gm.write_obj(v, GuestAddress(paddr)).expect("write")
    }

    pub fn fill(&self, paddr: u64, len: usize, byte: u8) {
        self.gm
            .write_slice(&vec![byte; len], GuestAddress(paddr))
            .expect("write");
    }

    pub fn bytes(&self, paddr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.gm
            .read_slice(&mut v, GuestAddress(paddr))
            .expect("read");
        v
    }
}

/// Blocks until `fd` is readable or `timeout` passes; true if readable.
pub fn wait_readable(fd: &EventFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    loop {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        if r >= 0 {
            return r > 0;
        }
        assert_eq!(
            std::io::Error::last_os_error().kind(),
            std::io::ErrorKind::Interrupted
        );
    }
}

/// Queue 0 as the driver configured it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueInfo {
    pub size: u32,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

#[derive(Debug, Default)]
pub struct State {
    pub status: u32,
    /// Every status written, in order.
    pub status_log: Vec<u32>,
    pub driver_features: Option<u64>,
    pub queue: Option<QueueInfo>,
    pub queue_unsets: u32,
    /// FEATURES_OK is dropped from status writes (the device refuses the features).
    pub refuse_features_ok: bool,
    pub config_reads: Vec<usize>,
}

/// What a fake transport's device is.
pub struct Shared {
    pub device_features: u64,
    pub max_queue: u32,
    pub config: Vec<u8>,
    pub generation: AtomicU32,
    pub state: Mutex<State>,
    /// Written by notify(): the device waits on it.
    pub kick: EventFd,
    pub notifies: AtomicU64,
}

impl Shared {
    pub fn new(device_features: u64, max_queue: u32, capacity: u64) -> Arc<Shared> {
        let mut config = vec![0u8; 64];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&126u32.to_le_bytes()); // seg_max
        config[20..24].copy_from_slice(&4096u32.to_le_bytes()); // blk_size
        Arc::new(Shared {
            device_features,
            max_queue,
            config,
            generation: AtomicU32::new(0),
            state: Mutex::new(State::default()),
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            notifies: AtomicU64::new(0),
        })
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A failed assertion while holding the guard must not turn the
        // driver's Drop (which calls set_status) into a double panic.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A virtio-drivers Transport in front of `Shared`.
pub struct FakeTransport(pub Arc<Shared>);

impl Transport for FakeTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn read_device_features(&mut self) -> u64 {
        self.0.device_features
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.0.state().driver_features = Some(driver_features);
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        self.0.max_queue
    }

    fn notify(&mut self, queue: u16) {
        assert_eq!(queue, 0);
        self.0.notifies.fetch_add(1, Ordering::Relaxed);
        self.0.kick.write(1).unwrap();
    }

    fn get_status(&self) -> DeviceStatus {
        DeviceStatus::from_bits_retain(self.0.state().status)
    }

    fn set_status(&mut self, status: DeviceStatus) {
        let mut s = self.0.state();
        let mut bits = status.bits();
        s.status_log.push(bits);
        if s.refuse_features_ok {
            bits &= !DeviceStatus::FEATURES_OK.bits();
        }
        s.status = bits;
        if bits == 0 {
            s.queue = None;
        }
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        assert_eq!(queue, 0);
        self.0.state().queue = Some(QueueInfo {
            size,
            desc: descriptors,
            avail: driver_area,
            used: device_area,
        });
    }

    fn queue_unset(&mut self, _queue: u16) {
        let mut s = self.0.state();
        s.queue = None;
        s.queue_unsets += 1;
    }

    fn queue_used(&mut self, _queue: u16) -> bool {
        self.0.state().queue.is_some()
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        self.0.generation.load(Ordering::SeqCst)
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        self.0.state().config_reads.push(offset);
        let end = offset + std::mem::size_of::<T>();
        let bytes = self
            .0
            .config
            .get(offset..end)
            .ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        T::read_from_bytes(bytes).map_err(|_| virtio_drivers::Error::InvalidParam)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> virtio_drivers::Result<()> {
        Err(virtio_drivers::Error::Unsupported)
    }
}

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const ID: &[u8; 20] = b"ringfence-test-disk\0";

/// A virtio-blk device on rust-vmm's virtio-queue over the shared mapping.
pub struct BlkDevice {
    pub q: Queue,
    pub mem: Arc<Mem>,
}

/// What the device saw of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub head: u16,
    pub type_: u32,
    pub sector: u64,
    pub data: Option<(u64, u32, bool)>,
}

impl BlkDevice {
    pub fn new(mem: Arc<Mem>, info: QueueInfo, event_idx: bool) -> BlkDevice {
        let mut q = Queue::new(32768).unwrap();
        q.set_size(info.size as u16);
        q.set_desc_table_address(Some(info.desc as u32), Some((info.desc >> 32) as u32));
        q.set_avail_ring_address(Some(info.avail as u32), Some((info.avail >> 32) as u32));
        q.set_used_ring_address(Some(info.used as u32), Some((info.used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        assert!(q.is_valid(&mem.gm), "queue layout invalid for virtio-queue");
        BlkDevice { q, mem }
    }

    /// Serves one available request, if any: a read gets the sector number in
    /// its first 8 bytes, GET_ID the id string; the status is `status(seen)`.
    pub fn serve_one(&mut self, status: impl Fn(&Seen) -> u8) -> Result<Option<Seen>, String> {
        let mem = &self.mem.gm;
        let Some(chain) = self.q.pop_descriptor_chain(mem) else {
            return Ok(None);
        };
        let head = chain.head_index();
        let mut descs = [(0u64, 0u32, false); 3];
        let mut n = 0;
        for d in chain {
            if n == 3 {
                return Err(format!("chain {head} longer than 3"));
            }
            descs[n] = (d.addr().0, d.len(), d.is_write_only());
            n += 1;
        }
        if n < 2 {
            return Err(format!("chain {head} of {n} descriptors"));
        }
        let (haddr, hlen, hw) = descs[0];
        let (saddr, slen, sw) = descs[n - 1];
        if hlen != 16 || hw || slen != 1 || !sw {
            return Err(format!("chain {head}: bad header or status {descs:?}"));
        }
        let hdr: [u8; 16] = self.mem.read(haddr);
        let seen = Seen {
            head,
            type_: u32::from_le_bytes(hdr[0..4].try_into().unwrap()),
            sector: u64::from_le_bytes(hdr[8..16].try_into().unwrap()),
            data: (n == 3).then_some(descs[1]),
        };
        let mut used_len = 1;
        match (seen.type_, seen.data) {
            (T_IN, Some((addr, len, true))) => {
                self.mem.write(addr, seen.sector.to_le_bytes());
                used_len += len;
            }
            (T_GET_ID, Some((addr, 20, true))) => {
                self.mem.write(addr, *ID);
                used_len += 20;
            }
            (T_OUT, Some((_, _, false))) | (T_FLUSH, None) => {}
            _ => return Err(format!("malformed request {seen:?}")),
        }
        self.mem.write(saddr, status(&seen));
        self.q
            .add_used(mem, head, used_len)
            .map_err(|e| format!("add_used: {e}"))?;
        Ok(Some(seen))
    }
}

/// xorshift64*, for reproducible variety without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}
