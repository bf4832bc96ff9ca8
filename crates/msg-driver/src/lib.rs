//! virtio-msg transport, driver side (the frontend VM).
//!
//! [`MsgTransport`] implements `virtio-drivers`' [`Transport`] over any
//! [`DriverBus`], so that crate's unmodified drivers run over Ringfence.
//! [`BounceHal`] implements its [`Hal`] with a [`BouncePool`] in the shared
//! window: vrings are allocated in the window and every I/O buffer is copied
//! through it.

pub mod bounce;
pub mod models;
pub mod mux;

use std::cell::{Cell, RefCell};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ringfence_bus::{BusError, Doorbell, DoorbellDirection, DriverBus};
use ringfence_virtio_msg::{decode, Body, DeviceInfo, Message, Vqueue, Words};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use zerocopy::{FromBytes, Immutable, IntoBytes};

pub use bounce::{BounceError, BouncePool, BounceStats};
pub use models::{Adaptive, Bounce, Grant, InShared, IoBuf, Mapped, MemoryModel, ModelError};
pub use mux::{BusMux, MuxOptions, MuxStats};

/// How long to wait for a response before declaring the device gone.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Most messages read per drain, so a flooding device cannot hold the driver.
const MAX_DRAINED: usize = 256;

/// Config generations may change this many times in a row before the
/// driver stops believing the device (virtio-drivers rereads until stable).
const MAX_GENERATION_CHANGES: u32 = 64;

/// Errors of the driver side.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The bus failed.
    #[error("bus failure")]
    Bus(#[from] BusError),
    /// A response did not arrive in time.
    #[error("no response to {what} within {RESPONSE_TIMEOUT:?}")]
    Timeout {
        /// The request.
        what: &'static str,
    },
    /// The device answered with something unexpected.
    #[error("unexpected answer to {what}: {detail}")]
    Unexpected {
        /// The request.
        what: &'static str,
        /// What came back.
        detail: String,
    },
    /// The device asked for a reset.
    #[error("device needs reset")]
    NeedsReset,
    /// The device reported something this driver cannot use.
    #[error("device reported an invalid {what}: {value}")]
    InvalidDevice {
        /// Which value.
        what: &'static str,
        /// What it said.
        value: u64,
    },
    /// An earlier request failed; the transport takes no further requests.
    #[error("transport unusable after an earlier failure")]
    Failed,
}

/// State shared between the transport and completion waiters.
struct Shared {
    bus: Arc<dyn DriverBus>,
    dev_num: u16,
    rx: Mutex<RxState>,
    kicks: Mutex<Vec<Option<Arc<dyn Doorbell>>>>,
    calls: Mutex<Vec<Option<Arc<dyn Doorbell>>>>,
    /// The first error a `Transport` method swallowed (its trait cannot
    /// return errors).
    failure: Mutex<Option<DriverError>>,
    /// A request timed out or the bus failed: every later request fails at
    /// once instead of waiting out its own timeout.
    broken: std::sync::atomic::AtomicBool,
}

struct RxState {
    buf: Vec<u8>,
    used_pending: Vec<bool>,
    config_changed: bool,
    needs_reset: bool,
    /// Messages received that were neither responses nor known events.
    ignored: u64,
}

impl Shared {
    fn broken(&self) -> bool {
        self.broken.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn fail(&self, e: DriverError) {
        tracing::error!(error = %e, "virtio-msg transport failure");
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(e);
    }

    /// Reads whatever the device sent meanwhile without waiting: events
    /// (EVENT_CONFIG with NEEDS_RESET in particular) and a disconnect are
    /// noticed even while completions arrive on doorbells.
    fn drain_events(&self, rx: &mut RxState) -> Result<(), DriverError> {
        for _ in 0..MAX_DRAINED {
            let RxState { buf, .. } = &mut *rx;
            let Some(n) = self.bus.recv(buf, Some(Duration::ZERO))? else {
                break;
            };
            let bytes = rx.buf.get(..n).unwrap_or(&[]).to_vec();
            let noted = decode(&bytes).is_ok_and(|m| Shared::note_event(rx, &m.body));
            if !noted {
                rx.ignored += 1;
            }
        }
        if rx.needs_reset {
            return Err(DriverError::NeedsReset);
        }
        Ok(())
    }

    fn note_event(rx: &mut RxState, body: &Body<'_>) -> bool {
        match *body {
            Body::EventUsed { vq_index } => {
                if let Some(p) = rx.used_pending.get_mut(vq_index as usize) {
                    *p = true;
                }
                true
            }
            Body::EventConfig { device_status, .. } => {
                rx.config_changed = true;
                if device_status & DeviceStatus::DEVICE_NEEDS_RESET.bits() != 0 {
                    rx.needs_reset = true;
                }
                true
            }
            _ => false,
        }
    }
}

/// Waits for used-buffer notifications of one device; cheap to clone.
#[derive(Clone)]
pub struct CompletionWaiter(Arc<Shared>);

impl CompletionWaiter {
    /// Waits until queue `q` has used buffers (doorbell or in-band EVENT_USED);
    /// `false` on timeout.
    pub fn wait(&self, q: u16, timeout: Duration) -> Result<bool, DriverError> {
        let call = self
            .0
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(usize::from(q))
            .cloned()
            .flatten();
        if let Some(db) = call {
            if db.wait(Some(timeout))? {
                return Ok(true);
            }
            // Nothing used in time: look at the message channel, where a
            // reset request or a disconnect would show.
            let mut rx = self.0.rx.lock().unwrap_or_else(|p| p.into_inner());
            self.0.drain_events(&mut rx)?;
            return Ok(false);
        }
        let deadline = std::time::Instant::now() + timeout;
        let mut rx = self.0.rx.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(p) = rx.used_pending.get_mut(usize::from(q)) {
                if std::mem::take(p) {
                    // Read what else queued up meanwhile: a device that
                    // floods events cannot bury its own responses.
                    self.0.drain_events(&mut rx)?;
                    return Ok(true);
                }
            }
            if rx.needs_reset {
                return Err(DriverError::NeedsReset);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let RxState { buf, .. } = &mut *rx;
            let Some(n) = self.0.bus.recv(buf, Some(left))? else {
                return Ok(false);
            };
            let bytes = rx.buf.get(..n).unwrap_or(&[]).to_vec();
            if let Ok(m) = decode(&bytes) {
                if !Shared::note_event(&mut rx, &m.body) {
                    rx.ignored += 1;
                }
            }
        }
    }

    /// The descriptor that becomes readable when queue `q` has used buffers
    /// (its call doorbell), for callers that wait on other sources too (a
    /// TAP, a PTY) in one poll; `None` when notifications travel in-band.
    /// After it is readable, `wait(q, Duration::ZERO)` clears it.
    pub fn call_fd(&self, q: u16) -> Option<std::os::fd::RawFd> {
        self.0
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(usize::from(q))
            .cloned()
            .flatten()
            .and_then(|db| db.pollable_fd())
    }

    /// Notifies queue `q` again. Harmless when spurious; a driver uses it when a
    /// completion is overdue, in case its notification was suppressed by mistake.
    pub fn kick(&self, q: u16) -> Result<(), DriverError> {
        let kick = self
            .0
            .kicks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(usize::from(q))
            .cloned()
            .flatten();
        match kick {
            Some(db) => Ok(db.ring()?),
            None => {
                let mut buf = [0u8; 16];
                let n = Message {
                    dev_num: self.0.dev_num,
                    token: 0,
                    body: Body::EventAvail {
                        vq_index: u32::from(q),
                        next_offset: 0,
                    },
                }
                .encode(&mut buf)
                .map_err(|e| DriverError::Unexpected {
                    what: "EVENT_AVAIL",
                    detail: e.to_string(),
                })?;
                Ok(self.0.bus.send(buf.get(..n).unwrap_or(&[]))?)
            }
        }
    }

    /// The first failure of the transport, if any (kept; a later call sees it too).
    pub fn failure(&self) -> Option<String> {
        self.0
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(e);
                while let Some(cause) = src {
                    msg.push_str(&format!(": {cause}"));
                    src = cause.source();
                }
                msg
            })
    }

    /// True once the device has asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.0
            .rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .needs_reset
    }
}

/// virtio-msg driver transport for one device.
pub struct MsgTransport {
    shared: Arc<Shared>,
    info: DeviceInfo,
    device_type: DeviceType,
    /// Token of the last request; every request gets a fresh one.
    token: Cell<u16>,
    generation: Cell<Option<u32>>,
    generation_changes: Cell<u32>,
    out: RefCell<Vec<u8>>,
    /// Whether `queue_unset` has reset the device already.
    reset_done: Cell<bool>,
}

/// Lists the device numbers present on the bus (GET_DEVICES).
pub fn discover(bus: &dyn DriverBus) -> Result<Vec<u16>, DriverError> {
    // A set: a device side that repeats its bitmap at every offset lists
    // each number once, and there are at most 65536 of them.
    let mut found = std::collections::BTreeSet::new();
    let mut offset = 0u16;
    let mut buf = vec![0u8; bus.limits().max_msg_size];
    // An honest device side needs a few rounds (at most 65536 numbers,
    // about 2000 per message); one that advances by one each time is cut
    // short instead of held for thousands of response timeouts.
    for _ in 0..64 {
        let max_count = ((bus.limits().max_msg_size - 14) * 8).min(2048) as u16 / 8 * 8;
        let n = Message {
            dev_num: 0,
            token: 0,
            body: Body::GetDevices {
                offset,
                count: max_count,
            },
        }
        .encode(&mut buf)
        .map_err(|e| DriverError::Unexpected {
            what: "GET_DEVICES",
            detail: e.to_string(),
        })?;
        bus.send(buf.get(..n).unwrap_or(&[]))?;
        let n = bus
            .recv(&mut buf, Some(RESPONSE_TIMEOUT))?
            .ok_or(DriverError::Timeout {
                what: "GET_DEVICES",
            })?;
        let msg = decode(buf.get(..n).unwrap_or(&[])).map_err(|e| DriverError::Unexpected {
            what: "GET_DEVICES",
            detail: e.to_string(),
        })?;
        let Body::Devices {
            offset: o,
            bitmap,
            next_offset,
            ..
        } = msg.body
        else {
            return Err(DriverError::Unexpected {
                what: "GET_DEVICES",
                detail: format!("{:?}", msg.body),
            });
        };
        for (i, byte) in bitmap.iter().enumerate() {
            for bit in 0..8 {
                if byte & (1 << bit) != 0 {
                    found.insert(o.wrapping_add((i * 8 + bit) as u16));
                }
            }
        }
        if next_offset == 0 || next_offset <= offset {
            break;
        }
        offset = next_offset;
    }
    Ok(found.into_iter().collect())
}

impl MsgTransport {
    /// Attaches to device `dev_num` (GET_DEVICE_INFO).
    pub fn new(bus: Arc<dyn DriverBus>, dev_num: u16) -> Result<Self, DriverError> {
        let max = bus.limits().max_msg_size;
        let mut t = Self {
            shared: Arc::new(Shared {
                bus,
                dev_num,
                rx: Mutex::new(RxState {
                    buf: vec![0; max],
                    used_pending: Vec::new(),
                    config_changed: false,
                    needs_reset: false,
                    ignored: 0,
                }),
                kicks: Mutex::new(Vec::new()),
                calls: Mutex::new(Vec::new()),
                failure: Mutex::new(None),
                broken: std::sync::atomic::AtomicBool::new(false),
            }),
            info: DeviceInfo::default(),
            device_type: DeviceType::Block,
            token: Cell::new(0),
            generation: Cell::new(None),
            generation_changes: Cell::new(0),
            out: RefCell::new(vec![0; max]),
            reset_done: Cell::new(false),
        };
        let info = t.request("GET_DEVICE_INFO", Body::GetDeviceInfo, |b| match b {
            Body::DeviceInfo(i) => Some(*i),
            _ => None,
        })?;
        // Everything the device says about itself is checked before use.
        t.device_type = match DeviceType::try_from(info.device_id) {
            Ok(ty) if info.device_id != 0 => ty,
            _ => {
                return Err(DriverError::InvalidDevice {
                    what: "device type",
                    value: u64::from(info.device_id),
                })
            }
        };
        if info.max_virtqueues == 0 {
            return Err(DriverError::InvalidDevice {
                what: "number of queues",
                value: 0,
            });
        }
        let n = info.max_virtqueues.min(1024) as usize;
        t.shared
            .rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .used_pending = vec![false; n];
        *t.shared.kicks.lock().unwrap_or_else(|p| p.into_inner()) = vec![None; n];
        *t.shared.calls.lock().unwrap_or_else(|p| p.into_inner()) = vec![None; n];
        t.info = info;
        Ok(t)
    }

    /// What GET_DEVICE_INFO said.
    pub fn info(&self) -> DeviceInfo {
        self.info
    }

    /// A handle to wait for completions.
    pub fn waiter(&self) -> CompletionWaiter {
        CompletionWaiter(self.shared.clone())
    }

    /// The first error a `Transport` method swallowed (its trait cannot return errors).
    pub fn take_failure(&self) -> Option<DriverError> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Sends a request and waits for its response; events arriving meanwhile are recorded.
    pub fn request<T>(
        &self,
        what: &'static str,
        body: Body<'_>,
        accept: impl Fn(&Body<'_>) -> Option<T>,
    ) -> Result<T, DriverError> {
        if self.shared.broken() {
            return Err(DriverError::Failed);
        }
        let r = self.exchange(what, body, accept);
        if matches!(r, Err(DriverError::Timeout { .. } | DriverError::Bus(_))) {
            self.shared
                .broken
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        r
    }

    fn exchange<T>(
        &self,
        what: &'static str,
        body: Body<'_>,
        accept: impl Fn(&Body<'_>) -> Option<T>,
    ) -> Result<T, DriverError> {
        let (id, _, _) = body.kind();
        // A fresh token per request: a late answer to an earlier request
        // cannot be taken for this one.
        let token = self.token.get().wrapping_add(1);
        self.token.set(token);
        let mut out = self.out.borrow_mut();
        let n = Message {
            dev_num: self.shared.dev_num,
            token,
            body,
        }
        .encode(&mut out)
        .map_err(|e| DriverError::Unexpected {
            what,
            detail: e.to_string(),
        })?;
        self.shared.bus.send(out.get(..n).unwrap_or(&[]))?;
        let deadline = std::time::Instant::now() + RESPONSE_TIMEOUT;
        let mut rx = self.shared.rx.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            // Checked before every read, so a flood cannot outrun the deadline.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(DriverError::Timeout { what });
            }
            let RxState { buf, .. } = &mut *rx;
            let n = self
                .shared
                .bus
                .recv(buf, Some(left))?
                .ok_or(DriverError::Timeout { what })?;
            let bytes = rx.buf.get(..n).unwrap_or(&[]).to_vec();
            let Ok(msg) = decode(&bytes) else {
                rx.ignored += 1;
                continue;
            };
            if Shared::note_event(&mut rx, &msg.body) {
                continue;
            }
            let (rid, response, bus) = msg.body.kind();
            if response
                && !bus
                && rid == id
                && msg.dev_num == self.shared.dev_num
                && msg.token == token
            {
                return accept(&msg.body).ok_or_else(|| DriverError::Unexpected {
                    what,
                    detail: format!("{:?}", msg.body),
                });
            }
            rx.ignored += 1;
        }
    }

    fn record<T: Default>(&self, r: Result<T, DriverError>) -> T {
        r.unwrap_or_else(|e| {
            self.shared.fail(e);
            T::default()
        })
    }

    fn config_generation(&self) -> Result<u32, DriverError> {
        self.request(
            "GET_CONFIG",
            Body::GetConfig {
                offset: 0,
                length: 0,
            },
            |b| match b {
                Body::Config { generation, .. } => Some(*generation),
                _ => None,
            },
        )
    }

    /// Reads config bytes in chunks that fit the bus's message size.
    pub fn read_config(&self, offset: usize, out: &mut [u8]) -> Result<u32, DriverError> {
        let chunk = self
            .shared
            .bus
            .limits()
            .max_msg_size
            .saturating_sub(20)
            .max(1);
        let mut generation = 0;
        for (i, part) in out.chunks_mut(chunk).enumerate() {
            let off = (offset + i * chunk) as u32;
            generation = self
                .request(
                    "GET_CONFIG",
                    Body::GetConfig {
                        offset: off,
                        length: part.len() as u32,
                    },
                    |b| match b {
                        Body::Config {
                            generation, data, ..
                        } if data.len() == part.len() => Some((*generation, data.to_vec())),
                        _ => None,
                    },
                )
                .map(|(g, d)| {
                    part.copy_from_slice(&d);
                    g
                })?;
        }
        Ok(generation)
    }
}

impl Transport for MsgTransport {
    fn device_type(&self) -> DeviceType {
        self.device_type
    }

    fn read_device_features(&mut self) -> u64 {
        let r = self.request(
            "GET_DEVICE_FEATURES",
            Body::GetDeviceFeatures {
                block_index: 0,
                num_blocks: 2,
            },
            |b| match b {
                Body::DeviceFeatures {
                    block_index: 0,
                    features,
                } => Some(
                    features
                        .iter()
                        .take(2)
                        .enumerate()
                        .fold(0u64, |acc, (i, w)| acc | (u64::from(w) << (32 * i))),
                ),
                _ => None,
            },
        );
        self.record(r)
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&(driver_features as u32).to_le_bytes());
        bytes[4..].copy_from_slice(&((driver_features >> 32) as u32).to_le_bytes());
        let features = Words::from_bytes(&bytes).unwrap_or(Words::EMPTY);
        let r = self.request(
            "SET_DRIVER_FEATURES",
            Body::SetDriverFeatures {
                block_index: 0,
                features,
            },
            |b| matches!(b, Body::SetDriverFeaturesDone).then_some(()),
        );
        self.record(r)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        let r = self.request(
            "GET_VQUEUE",
            Body::GetVqueue {
                index: u32::from(queue),
            },
            |b| match b {
                Body::VqueueInfo(q) => Some(q.max_size),
                _ => None,
            },
        );
        self.record(r)
    }

    fn notify(&mut self, queue: u16) {
        let r = self.waiter().kick(queue);
        self.record(r)
    }

    fn get_status(&self) -> DeviceStatus {
        let r = self.request("GET_DEVICE_STATUS", Body::GetDeviceStatus, |b| match b {
            Body::DeviceStatus { status } => Some(DeviceStatus::from_bits_retain(*status)),
            _ => None,
        });
        r.unwrap_or_else(|e| {
            self.shared.fail(e);
            DeviceStatus::FAILED
        })
    }

    fn set_status(&mut self, status: DeviceStatus) {
        let r = self.request(
            "SET_DEVICE_STATUS",
            Body::SetDeviceStatus {
                status: status.bits(),
            },
            |b| match b {
                Body::SetDeviceStatusResult { status } => Some(*status),
                _ => None,
            },
        );
        if let Ok(result) = r {
            if result != status.bits() {
                // FEATURES_OK refused, DRIVER_OK failed or a reset requested:
                // kept for the caller, who must not drive the device further.
                self.shared.fail(DriverError::Unexpected {
                    what: "SET_DEVICE_STATUS (feature negotiation or device reset)",
                    detail: format!("asked {:#x}, device has {result:#x}", status.bits()),
                });
            }
        } else {
            self.record(r.map(|_| ()));
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
        let q = Vqueue {
            index: u32::from(queue),
            max_size: 0,
            size,
            desc_addr: descriptors,
            driver_addr: driver_area,
            device_addr: device_area,
        };
        let r = self.request("SET_VQUEUE", Body::SetVqueue(q), |b| {
            matches!(b, Body::SetVqueueDone).then_some(())
        });
        self.record(r);
        // Doorbells replace EVENT_AVAIL / EVENT_USED when the bus has them.
        let bus = self.shared.bus.clone();
        let dev = self.shared.dev_num;
        for (dir, list) in [
            (DoorbellDirection::ToDevice, &self.shared.kicks),
            (DoorbellDirection::ToDriver, &self.shared.calls),
        ] {
            match bus.doorbell(dev, queue, dir) {
                Ok(Some(db)) => {
                    if let Some(slot) = list
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(usize::from(queue))
                    {
                        *slot = Some(db);
                    }
                }
                Ok(None) => {}
                Err(e) => self.record(Err::<(), _>(e.into())),
            }
        }
    }

    fn queue_unset(&mut self, _queue: u16) {
        // virtio-drivers calls this only when a driver is dropped, right
        // before it frees the ring pages back to the bounce pool. Without
        // VIRTIO_F_RING_RESET only a device reset takes the queues back, and
        // it must come first: a device still at DRIVER_OK could write into
        // pages that by then hold another device's buffers. Once is enough.
        if self.shared.broken.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        if self.reset_done.replace(true) {
            return;
        }
        self.set_status(DeviceStatus::empty());
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        let r = self.request(
            "GET_VQUEUE",
            Body::GetVqueue {
                index: u32::from(queue),
            },
            |b| match b {
                Body::VqueueInfo(q) => Some(q.size != 0),
                _ => None,
            },
        );
        self.record(r)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        let mut status = InterruptStatus::empty();
        for db in self
            .shared
            .calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .flatten()
        {
            if db.try_clear().unwrap_or(false) {
                status |= InterruptStatus::QUEUE_INTERRUPT;
            }
        }
        let mut rx = self.shared.rx.lock().unwrap_or_else(|p| p.into_inner());
        if rx.used_pending.iter_mut().any(std::mem::take) {
            status |= InterruptStatus::QUEUE_INTERRUPT;
        }
        if std::mem::take(&mut rx.config_changed) {
            status |= InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT;
        }
        status
    }

    fn read_config_generation(&self) -> u32 {
        let r = self.config_generation();
        let generation = self.record(r);
        // virtio-drivers rereads config until the generation is stable; a
        // device that changes it forever would hold the driver forever.
        if self.generation.replace(Some(generation)) == Some(generation) {
            self.generation_changes.set(0);
        } else {
            let changes = self.generation_changes.get().saturating_add(1);
            self.generation_changes.set(changes);
            if changes > MAX_GENERATION_CHANGES {
                self.shared.fail(DriverError::InvalidDevice {
                    what: "config generation (never settles)",
                    value: u64::from(generation),
                });
                // Unusable from here: later reads fail (and read as 0) at once.
                self.shared
                    .broken
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        generation
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        if offset.saturating_add(size_of::<T>()) > self.info.config_size as usize {
            return Err(virtio_drivers::Error::ConfigSpaceTooSmall);
        }
        let mut bytes = vec![0u8; size_of::<T>()];
        self.read_config(offset, &mut bytes).map_err(|e| {
            tracing::error!(error = %e, "config read failed");
            virtio_drivers::Error::IoError
        })?;
        T::read_from_bytes(&bytes).map_err(|_| virtio_drivers::Error::IoError)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> virtio_drivers::Result<()> {
        let generation = self
            .config_generation()
            .map_err(|_| virtio_drivers::Error::IoError)?;
        let data = value.as_bytes();
        let accepted = self
            .request(
                "SET_CONFIG",
                Body::SetConfig {
                    generation,
                    offset: offset as u32,
                    data,
                },
                |b| match b {
                    Body::SetConfigResult { length, .. } => Some(*length),
                    _ => None,
                },
            )
            .map_err(|_| virtio_drivers::Error::IoError)?;
        if accepted as usize == data.len() {
            Ok(())
        } else {
            Err(virtio_drivers::Error::Unsupported)
        }
    }
}

static POOL: OnceLock<BouncePool> = OnceLock::new();

/// A bounce pool was already installed in this process.
#[derive(Debug, thiserror::Error)]
#[error("a bounce pool is already installed (one window per frontend process)")]
pub struct PoolAlreadyInstalled;

/// Installs the process's bounce pool (one window per VM pair, since
/// `virtio-drivers`' `Hal` has no `self`).
pub fn install_pool(pool: BouncePool) -> Result<&'static BouncePool, PoolAlreadyInstalled> {
    let mut fresh = false;
    let installed = POOL.get_or_init(|| {
        fresh = true;
        pool
    });
    if fresh {
        Ok(installed)
    } else {
        Err(PoolAlreadyInstalled)
    }
}

/// The installed pool.
pub fn pool() -> Option<&'static BouncePool> {
    POOL.get()
}

/// `virtio-drivers` Hal that places rings in the shared window and bounces
/// every buffer through it.
#[derive(Debug)]
pub struct BounceHal;

/// The address handed to the device for a buffer that could not be
/// bounced: in area 0xFFFF, which no bus shares.
pub const UNSHARED_ADDR: u64 = 0xFFFF << ringfence_bus::AREA_SHIFT;

// SAFETY: dma_alloc returns zeroed, page-aligned memory inside the shared
// window, which stays mapped for the life of the process (the pool is static)
// and is reachable by the device at the returned address; share() returns a
// window address holding a copy of the buffer, valid until unshare(), which
// copies device-written data back and frees the slots. Addresses are never
// handed out twice while in use (the slot allocator tracks runs).
unsafe impl Hal for BounceHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        match pool().map(|p| p.alloc(pages * PAGE_SIZE, PAGE_SIZE)) {
            Some(Ok((addr, ptr))) => (addr, NonNull::new(ptr).unwrap_or(NonNull::dangling())),
            _ => (0, NonNull::dangling()),
        }
    }

    unsafe fn dma_dealloc(paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        match pool().map(|p| p.free(paddr)) {
            Some(Ok(())) => 0,
            _ => -1,
        }
    }

    unsafe fn mmio_phys_to_virt(_paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        // virtio-msg has no MMIO; virtio-drivers only calls this for MMIO/PCI transports.
        NonNull::dangling()
    }

    unsafe fn share(buffer: NonNull<[u8]>, direction: BufferDirection) -> PhysAddr {
        // SAFETY: virtio-drivers passes a buffer valid for reads for the duration of the call.
        let buf = unsafe { buffer.as_ref() };
        let device_reads = matches!(
            direction,
            BufferDirection::DriverToDevice | BufferDirection::Both
        );
        // An exhausted pool yields an address in an area no bus ever shares
        // (not 0: on a bus that shares physical memory whole, 0 is memory):
        // the device fails the request with an error status instead of the
        // driver panicking.
        pool()
            .and_then(|p| p.map(buf, device_reads).ok())
            .unwrap_or(UNSHARED_ADDR)
    }

    unsafe fn unshare(paddr: PhysAddr, mut buffer: NonNull<[u8]>, direction: BufferDirection) {
        if paddr == UNSHARED_ADDR {
            return;
        }
        let device_wrote = matches!(
            direction,
            BufferDirection::DeviceToDriver | BufferDirection::Both
        );
        // SAFETY: virtio-drivers passes the same buffer it shared, valid for writes
        // and not otherwise accessed until this returns.
        let buf = unsafe { buffer.as_mut() };
        if let Some(Err(e)) = pool().map(|p| p.unmap(paddr, buf, device_wrote)) {
            tracing::error!(error = %e, "unshare of an unknown address");
        }
    }
}
