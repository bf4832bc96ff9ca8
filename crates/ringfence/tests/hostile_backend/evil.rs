//! A virtio-blk device side that the test controls: honest by default (a RAM
//! disk behind the virtio-msg transport over the local bus), with two hook
//! points where an attack replaces one behaviour:
//!
//! - [`ReplyHook`] sees every answer to a driver request before it is sent and
//!   decides what actually goes out (nothing, something else, more);
//! - [`ChainHook`] serves each descriptor chain the driver makes available and
//!   decides which used elements are published.
//!
//! Parameters the device merely reports (device id, capacity, queue size...)
//! are plain data in [`Params`].
//!
//! The device runs on one thread: it polls the bus socket every millisecond and
//! looks at the avail ring after each wake-up, so it needs neither the kick
//! doorbell nor EVENT_AVAIL (the frontend sends both; they are ignored).

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_bus::{
    split_area_addr, BusError, DeviceBus, DeviceBusEvent, Doorbell, DoorbellDirection, SharedArea,
};
use ringfence_bus_local::{poll_readable, Listener, LocalBusConfig, LocalDeviceBus};
use ringfence_virtio_msg::{decode, feature_blocks, Body, DeviceInfo, Message, Vqueue, Words};
use vm_memory::{ByteValued, Bytes, VolatileMemory, VolatileSlice};

/// The device number the device announces.
pub const DEV_NUM: u16 = 1;
/// Size of the RAM disk behind the device.
pub const DISK_BYTES: usize = 4 << 20;
/// virtio-blk request types.
pub const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
/// virtio-blk status bytes.
pub const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// Device status bits.
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
pub const NEEDS_RESET: u32 = 0x40;
/// Feature bits.
pub const F_VERSION_1: u64 = 1 << 32;
pub const F_FLUSH: u64 = 1 << 9;
const F_EVENT_IDX: u64 = 1 << 29;
/// Descriptor flags.
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
const D_INDIRECT: u16 = 4;

/// What the device reports about itself.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// GET_DEVICE_INFO device_id (2: block).
    pub device_id: u32,
    /// GET_DEVICE_INFO max_virtqueues.
    pub max_virtqueues: u32,
    /// GET_DEVICE_INFO config_size (the config space itself is always 60 bytes).
    pub config_size: u32,
    /// Capacity in 512-byte sectors written into the config space.
    pub capacity: u64,
    /// Offered features.
    pub features: u64,
    /// GET_VQUEUE max_size of queue 0.
    pub queue_max: u32,
    /// Whether FEATURES_OK is accepted.
    pub accept_features: bool,
}

/// An honest virtio-blk device over the RAM disk.
pub const HONEST: Params = Params {
    device_id: 2,
    max_virtqueues: 1,
    config_size: 60,
    capacity: (DISK_BYTES / 512) as u64,
    features: F_VERSION_1 | F_FLUSH,
    queue_max: 256,
    accept_features: true,
};

/// Decides what is sent for one request, given the honest encoded answer.
pub type ReplyHook = fn(&mut Dev, &Message<'_>, Vec<u8>) -> Vec<Vec<u8>>;
/// Serves one available chain and returns the used elements to publish.
pub type ChainHook = fn(&mut Dev, &Chain) -> Vec<Used>;

/// Sends the honest answer unchanged.
pub fn honest_reply(_: &mut Dev, _: &Message<'_>, reply: Vec<u8>) -> Vec<Vec<u8>> {
    vec![reply]
}

/// Serves the chain honestly.
pub fn honest_chain(d: &mut Dev, c: &Chain) -> Vec<Used> {
    d.serve(c)
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    /// Device-visible address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
    /// Index in its descriptor table.
    pub index: u16,
}

/// A parsed virtio-blk request.
#[derive(Debug, Clone)]
pub struct Chain {
    /// Head descriptor index (the used element id).
    pub head: u16,
    /// The buffers in chain order.
    pub segs: Vec<Seg>,
    /// Request type from the header.
    pub kind: u32,
    /// First sector from the header.
    pub sector: u64,
    /// Position of the head in the avail ring.
    pub avail_slot: u16,
}

/// A used element.
#[derive(Debug, Clone, Copy)]
pub struct Used {
    /// Chain head.
    pub id: u32,
    /// Bytes written by the device.
    pub len: u32,
}

/// What the device observed, for the test's assertions.
#[derive(Default)]
pub struct Report {
    /// The window the driver shared (kept mapped for the final scan).
    pub window: Option<SharedArea>,
    /// Non-zero bytes found in device-writable buffers when the device first saw them.
    pub stale_bytes: u64,
    /// The buffer with the most stale bytes, and how many.
    pub stale_example: Option<(u64, String)>,
    /// Result of the scan for the marker in the middle of the I/O phase.
    pub marker_mid_run: Option<bool>,
    /// Chains the device saw.
    pub chains: u64,
    /// Why the device stopped, if not because the driver left.
    pub error: Option<String>,
}

/// The device state; hooks get it mutably.
pub struct Dev {
    /// Reported parameters.
    p: Params,
    bus: LocalDeviceBus,
    raw: UnixDatagram,
    window: Option<SharedArea>,
    call: Option<Arc<dyn Doorbell>>,
    status: u32,
    driver_features: u64,
    generation: u32,
    queue: Option<Vqueue>,
    next_avail: u16,
    /// Next used index to publish; an attack may move it.
    pub used_idx: u16,
    disk: Vec<u8>,
    /// Free for attacks that need to count or remember something.
    pub counter: u64,
    /// The honest answer to the previous transport request.
    pub last_reply: Option<Vec<u8>>,
    /// Set by a hook: stop serving the queue (chains stay unanswered).
    pub io_stopped: bool,
    /// Set by a hook: drop the connection.
    pub hang_up: bool,
    marker: Vec<u8>,
    /// What the test gets back.
    pub report: Report,
}

/// Accepts one frontend on `listener` and serves it until it leaves or `stop` is set.
pub fn serve(
    listener: Listener,
    p: Params,
    reply: ReplyHook,
    chain: ChainHook,
    marker: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> Report {
    let mut dev = match Dev::accept(&listener, p, marker, &stop) {
        Ok(Some(dev)) => dev,
        Ok(None) => return Report::default(),
        Err(e) => {
            return Report {
                error: Some(e),
                ..Report::default()
            }
        }
    };
    if let Err(e) = dev.run(reply, chain, &stop) {
        dev.report.error = Some(e);
    }
    dev.report.window = dev.window.take();
    dev.report
}

impl Dev {
    /// Waits for the frontend to connect (`None` if `stop` comes first).
    fn accept(
        listener: &Listener,
        p: Params,
        marker: Vec<u8>,
        stop: &AtomicBool,
    ) -> Result<Option<Self>, String> {
        let sock = loop {
            if stop.load(Ordering::SeqCst) {
                return Ok(None);
            }
            if let Some(s) = listener
                .accept(Some(Duration::from_millis(50)))
                .map_err(|e| format!("accept: {e}"))?
            {
                break s;
            }
        };
        // A second handle on the same socket, to poll it and to send what the
        // bus itself would refuse (oversized messages). Non-blocking, so that
        // a flood into a full socket is dropped instead of stalling the device.
        // SAFETY: the descriptor belongs to `sock`, which is open for this
        // call; the clone is an independent descriptor.
        let raw = unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) }
            .try_clone_to_owned()
            .map(UnixDatagram::from)
            .map_err(|e| format!("dup: {e}"))?;
        raw.set_nonblocking(true).map_err(|e| e.to_string())?;
        let bus =
            LocalDeviceBus::new(sock, LocalBusConfig::default()).map_err(|e| e.to_string())?;
        Ok(Some(Dev {
            p,
            bus,
            raw,
            window: None,
            call: None,
            status: 0,
            driver_features: 0,
            generation: 0,
            queue: None,
            next_avail: 0,
            used_idx: 0,
            disk: vec![0; DISK_BYTES],
            counter: 0,
            last_reply: None,
            io_stopped: false,
            hang_up: false,
            marker,
            report: Report::default(),
        }))
    }
}

/// Device-visible window access; every address must lie in the shared window.
impl Dev {
    fn slice(&self, addr: u64, len: usize) -> Result<VolatileSlice<'_>, String> {
        let (id, off) = split_area_addr(addr);
        let w = self.window.as_ref().ok_or("no window shared")?;
        if id != w.id {
            return Err(format!("address {addr:#x} outside the window"));
        }
        w.mapping
            .get_slice(off as usize, len)
            .map_err(|e| format!("address {addr:#x}+{len}: {e}"))
    }

    fn read<T: ByteValued>(&self, addr: u64) -> Result<T, String> {
        self.slice(addr, size_of::<T>())?
            .read_obj(0)
            .map_err(|e| e.to_string())
    }

    /// Writes `val` at `addr`.
    pub fn write<T: ByteValued>(&self, addr: u64, val: T) -> Result<(), String> {
        self.slice(addr, size_of::<T>())?
            .write_obj(val, 0)
            .map_err(|e| e.to_string())
    }

    fn read_bytes(&self, addr: u64, len: u32) -> Result<Vec<u8>, String> {
        let mut v = vec![0u8; len as usize];
        self.slice(addr, v.len())?.copy_to(&mut v);
        Ok(v)
    }

    /// Fills a buffer with `byte`.
    pub fn fill(&self, seg: &Seg, byte: u8) {
        if let Ok(s) = self.slice(seg.addr, seg.len as usize) {
            s.copy_from(&vec![byte; seg.len as usize]);
        }
    }

    /// The queue set up by the driver, if any.
    pub fn queue(&self) -> Option<Vqueue> {
        self.queue
    }

    /// True if the shared window holds the private marker.
    fn marker_in_window(&self) -> bool {
        self.window
            .as_ref()
            .is_some_and(|w| contains(&window_bytes(w), &self.marker))
    }
}

/// A copy of the whole window.
pub fn window_bytes(w: &SharedArea) -> Vec<u8> {
    let mut v = vec![0u8; w.mapping.size()];
    w.mapping.as_volatile_slice().copy_to(&mut v);
    v
}

/// True if `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Control plane: the honest answers.
impl Dev {
    fn run(&mut self, reply: ReplyHook, chain: ChainHook, stop: &AtomicBool) -> Result<(), String> {
        let mut buf = vec![0u8; 1 << 16];
        while !stop.load(Ordering::SeqCst) && !self.hang_up {
            let readable = poll_readable(self.raw.as_raw_fd(), Some(Duration::from_millis(1)))
                .map_err(|e| e.to_string())?;
            if readable {
                match self.bus.recv(&mut buf) {
                    Ok(DeviceBusEvent::Message(n)) => {
                        let bytes = buf.get(..n).unwrap_or(&[]).to_vec();
                        self.on_message(reply, &bytes)?;
                    }
                    Ok(DeviceBusEvent::AreaShared(a)) => {
                        // The bus answers AREA_SHARE only once we say the area is in use.
                        self.bus.complete_share(a.id).map_err(|e| e.to_string())?;
                        self.window = Some(a);
                    }
                    Ok(DeviceBusEvent::DoorbellAttached {
                        queue: 0,
                        direction: DoorbellDirection::ToDriver,
                        doorbell,
                        ..
                    }) => self.call = Some(doorbell),
                    Ok(_) => {}
                    Err(BusError::Disconnected) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            }
            if self.status & DRIVER_OK != 0 && !self.io_stopped {
                self.poll_queue(chain)?;
            }
        }
        Ok(())
    }

    fn on_message(&mut self, hook: ReplyHook, bytes: &[u8]) -> Result<(), String> {
        let Ok(req) = decode(bytes) else {
            return Ok(());
        };
        let Some(honest) = self.answer(&req) else {
            return Ok(());
        };
        let out = hook(self, &req, honest.clone());
        if is_transport(&req) {
            self.last_reply = Some(honest);
        }
        for m in out {
            self.send(&m)?;
        }
        Ok(())
    }

    /// Encodes `body` as the answer to `req` (same device number and token).
    pub fn encode(&self, req: &Message<'_>, body: Body<'_>) -> Vec<u8> {
        encode(req.dev_num, req.token, body)
    }

    /// Sends one message, waiting up to 5 s for room in the socket.
    pub fn send(&self, msg: &[u8]) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.raw.send(msg) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => return Err(format!("send: {e}")),
            }
        }
    }

    /// Asks the driver for a reset (EVENT_CONFIG with DEVICE_NEEDS_RESET) and
    /// stops serving the queue, as a device that hit an internal error. The
    /// call doorbell rings too, to wake a driver sleeping on it.
    pub fn needs_reset(&mut self) -> Result<(), String> {
        self.status |= NEEDS_RESET;
        self.generation = self.generation.wrapping_add(1);
        self.io_stopped = true;
        let event = Body::EventConfig {
            device_status: self.status,
            generation: self.generation,
            offset: 0,
            data: &[],
        };
        self.send(&encode(DEV_NUM, 0, event))?;
        match &self.call {
            Some(db) => db.ring().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    /// Sends one message if the socket has room, else drops it (floods).
    pub fn send_or_drop(&self, msg: &[u8]) {
        let _ = self.raw.send(msg);
    }

    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            device_id: self.p.device_id,
            vendor_id: 0x4556_494c, // "EVIL"
            num_feature_bits: 64,
            config_size: self.p.config_size,
            max_virtqueues: self.p.max_virtqueues,
            admin_vq_start: 0,
            admin_vq_count: 0,
        }
    }

    /// The 60-byte virtio-blk config space: capacity, blk_size, num_queues.
    fn config(&self) -> [u8; 60] {
        let mut c = [0u8; 60];
        c[..8].copy_from_slice(&self.p.capacity.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[34..36].copy_from_slice(&1u16.to_le_bytes());
        c
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.status = 0;
            self.driver_features = 0;
            self.queue = None;
            self.next_avail = 0;
            self.used_idx = 0;
            return;
        }
        let mut s = new;
        if new & FEATURES_OK != 0 && self.status & FEATURES_OK == 0 && !self.p.accept_features {
            s &= !(FEATURES_OK | DRIVER_OK);
        }
        if s & FEATURES_OK == 0 {
            s &= !DRIVER_OK;
        }
        self.status = s;
    }

    fn answer(&mut self, req: &Message<'_>) -> Option<Vec<u8>> {
        let mut scratch = [0u8; 64];
        let config = self.config();
        let body = match req.body {
            Body::Ping { data } => Body::Pong { data },
            // Device number 1 only.
            Body::GetDevices { offset, .. } => {
                scratch[0] = if offset == 0 { 1 << DEV_NUM } else { 0 };
                Body::Devices {
                    offset,
                    count: 8,
                    next_offset: 0,
                    bitmap: &scratch[..1],
                }
            }
            Body::GetDeviceInfo => Body::DeviceInfo(self.info()),
            Body::GetDeviceFeatures {
                block_index,
                num_blocks,
            } => {
                let n = (num_blocks as usize).min(scratch.len() / 4);
                let bytes = feature_blocks(self.p.features, block_index, &mut scratch[..n * 4]);
                Body::DeviceFeatures {
                    block_index,
                    features: Words::from_bytes(bytes).unwrap_or(Words::EMPTY),
                }
            }
            Body::SetDriverFeatures {
                block_index,
                features,
            } => {
                for (i, w) in features.iter().enumerate() {
                    match u64::from(block_index) + i as u64 {
                        0 => {
                            self.driver_features = (self.driver_features >> 32 << 32) | u64::from(w)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xFFFF_FFFF) | (u64::from(w) << 32)
                        }
                        _ => {}
                    }
                }
                Body::SetDriverFeaturesDone
            }
            Body::GetConfig { offset, length } => Body::Config {
                generation: self.generation,
                offset,
                data: (offset as usize)
                    .checked_add(length as usize)
                    .and_then(|end| config.get(offset as usize..end))
                    .unwrap_or(&[]),
            },
            Body::SetConfig { offset, .. } => Body::SetConfigResult {
                generation: self.generation,
                offset,
                length: 0,
                data: &[],
            },
            Body::GetDeviceStatus => Body::DeviceStatus {
                status: self.status,
            },
            Body::SetDeviceStatus { status } => {
                self.set_status(status);
                Body::SetDeviceStatusResult {
                    status: self.status,
                }
            }
            Body::GetVqueue { index } => Body::VqueueInfo(Vqueue {
                index,
                max_size: if index == 0 { self.p.queue_max } else { 0 },
                ..self.queue.filter(|_| index == 0).unwrap_or_default()
            }),
            Body::SetVqueue(q) => {
                if q.index == 0 && q.size.is_power_of_two() && q.size <= 1 << 15 {
                    self.queue = Some(q);
                    self.next_avail = 0;
                    self.used_idx = 0;
                }
                Body::SetVqueueDone
            }
            Body::ResetVqueue { .. } => Body::ResetVqueueDone,
            Body::GetShm { index } => Body::Shm {
                index,
                length: 0,
                address: 0,
            },
            // EVENT_AVAIL and anything a device does not answer.
            _ => return None,
        };
        Some(self.encode(req, body))
    }
}

/// Encodes a message into a fresh buffer.
pub fn encode(dev_num: u16, token: u16, body: Body<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; 1 << 16];
    let n = Message {
        dev_num,
        token,
        body,
    }
    .encode(&mut buf)
    .expect("the device encodes only valid messages");
    buf.truncate(n);
    buf
}

/// True for transport (per-device) messages, false for bus messages.
pub fn is_transport(m: &Message<'_>) -> bool {
    !m.body.kind().2
}

/// Data plane: the avail ring, virtio-blk requests, the used ring.
impl Dev {
    fn poll_queue(&mut self, hook: ChainHook) -> Result<(), String> {
        let Some(q) = self.queue else {
            return Ok(());
        };
        let avail_idx: u16 = self.read(q.driver_addr + 2)?;
        fence(Ordering::Acquire);
        let before = self.used_idx;
        while self.next_avail != avail_idx && !self.io_stopped && !self.hang_up {
            let slot = self.next_avail & (q.size as u16 - 1);
            let head: u16 = self.read(q.driver_addr + 4 + 2 * u64::from(slot))?;
            self.next_avail = self.next_avail.wrapping_add(1);
            let chain = self.parse(&q, head, slot)?;
            self.report.chains += 1;
            self.check_stale(&chain);
            if self.report.chains == 100 {
                self.report.marker_mid_run = Some(self.marker_in_window());
            }
            for u in hook(self, &chain) {
                let at = q.device_addr + 4 + 8 * u64::from(self.used_idx & (q.size as u16 - 1));
                self.write(at, u.id)?;
                self.write(at + 4, u.len)?;
                self.used_idx = self.used_idx.wrapping_add(1);
            }
        }
        if self.driver_features & F_EVENT_IDX != 0 {
            // avail_event: notify me when the next chain is made available.
            self.write(q.device_addr + 4 + 8 * u64::from(q.size), self.next_avail)?;
        }
        if self.used_idx != before && !self.hang_up {
            fence(Ordering::SeqCst);
            self.write(q.device_addr + 2, self.used_idx)?;
            fence(Ordering::SeqCst);
            self.notify()?;
        }
        Ok(())
    }

    /// Used-buffer notification: the call doorbell, or EVENT_USED in-band.
    fn notify(&self) -> Result<(), String> {
        match &self.call {
            Some(db) => db.ring().map_err(|e| e.to_string()),
            None => self.send(&encode(DEV_NUM, 0, Body::EventUsed { vq_index: 0 })),
        }
    }

    fn parse(&self, q: &Vqueue, head: u16, avail_slot: u16) -> Result<Chain, String> {
        let (mut table, mut entries) = (q.desc_addr, q.size);
        let mut i = head;
        let mut segs = Vec::new();
        // A chain longer than a table (plus one indirect hop) is a loop.
        for _ in 0..=2 * q.size {
            if u32::from(i) >= entries {
                return Err(format!("descriptor {i} outside a table of {entries}"));
            }
            let d = table + 16 * u64::from(i);
            let (addr, len): (u64, u32) = (self.read(d)?, self.read(d + 8)?);
            let (flags, next): (u16, u16) = (self.read(d + 12)?, self.read(d + 14)?);
            if flags & D_INDIRECT != 0 && table == q.desc_addr {
                (table, entries, i) = (addr, len / 16, 0);
                continue;
            }
            segs.push(Seg {
                addr,
                len,
                writable: flags & D_WRITE != 0,
                index: i,
            });
            if flags & D_NEXT == 0 {
                let hdr = segs.first().filter(|s| !s.writable && s.len >= 16);
                let hdr = hdr.ok_or("chain without a 16-byte request header")?;
                return Ok(Chain {
                    head,
                    kind: self.read(hdr.addr)?,
                    sector: self.read(hdr.addr + 8)?,
                    segs,
                    avail_slot,
                });
            }
            i = next;
        }
        Err(format!("descriptor chain from {head} loops"))
    }

    /// The swiotlb info-leak check. A device-writable bounce buffer must hold
    /// nothing but zeros when the device first sees it: whatever it holds is
    /// exactly what the driver copies back for bytes the device does not
    /// write, so anything else is stale data of earlier requests offered to
    /// the device and handed back to the driver as if the device had written it.
    fn check_stale(&mut self, c: &Chain) {
        for s in c.segs.iter().filter(|s| s.writable) {
            let Ok(bytes) = self.read_bytes(s.addr, s.len) else {
                continue;
            };
            let dirty = bytes.iter().filter(|&&b| b != 0).count() as u64;
            self.report.stale_bytes += dirty;
            if dirty > self.report.stale_example.as_ref().map_or(0, |e| e.0) {
                let what = format!(
                    "chain #{} (type {}, sector {}): {dirty} of {} bytes non-zero",
                    self.report.chains, c.kind, c.sector, s.len
                );
                self.report.stale_example = Some((dirty, what));
            }
        }
    }

    /// Serves a request honestly: moves the data, writes the status byte and
    /// returns the one used element.
    pub fn serve(&mut self, c: &Chain) -> Vec<Used> {
        let (status, written) = self.execute(c);
        self.write_status(c, status);
        vec![Used {
            id: u32::from(c.head),
            len: written + 1,
        }]
    }

    /// Writes the status byte (the last device-writable byte of the chain).
    pub fn write_status(&self, c: &Chain, status: u8) {
        if let Some(s) = c.segs.iter().rev().find(|s| s.writable && s.len > 0) {
            let _ = self.write(s.addr + u64::from(s.len) - 1, status);
        }
    }

    /// Performs the request on the disk; returns (status, data bytes written to the driver).
    fn execute(&mut self, c: &Chain) -> (u8, u32) {
        let writable: Vec<Seg> = c.segs.iter().filter(|s| s.writable).copied().collect();
        let room = writable.iter().map(|s| u64::from(s.len)).sum::<u64>();
        let range = |len: u64| {
            let start = c.sector.checked_mul(512)?;
            let end = start.checked_add(len)?;
            (end <= DISK_BYTES as u64).then_some(start as usize..end as usize)
        };
        match c.kind {
            T_IN => {
                let Some(r) = range(room.saturating_sub(1)) else {
                    return (S_IOERR, 0);
                };
                let data = self.disk[r].to_vec();
                match self.write_stream(&writable, &data) {
                    Ok(()) => (S_OK, data.len() as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            T_OUT => {
                let mut data = Vec::new();
                for s in c.segs.iter().filter(|s| !s.writable) {
                    match self.read_bytes(s.addr, s.len) {
                        Ok(b) => data.extend(b),
                        Err(_) => return (S_IOERR, 0),
                    }
                }
                let data = &data[16..];
                match range(data.len() as u64) {
                    Some(r) => {
                        self.disk[r].copy_from_slice(data);
                        (S_OK, 0)
                    }
                    None => (S_IOERR, 0),
                }
            }
            T_FLUSH => (S_OK, 0),
            T_GET_ID => {
                let id = b"ringfence-evil\0\0\0\0\0\0";
                let n = room.saturating_sub(1).min(20) as usize;
                match self.write_stream(&writable, &id[..n]) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    /// Writes `data` across the writable buffers in order.
    fn write_stream(&self, segs: &[Seg], mut data: &[u8]) -> Result<(), String> {
        for s in segs {
            let n = (s.len as usize).min(data.len());
            self.slice(s.addr, n)?.copy_from(&data[..n]);
            data = &data[n..];
        }
        Ok(())
    }
}
