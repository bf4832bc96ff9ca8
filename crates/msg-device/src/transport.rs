//! The per-device transport: status state machine, features, config with
//! generation, queue setup validated against the shared areas.

use crate::staging::{CopiedAreas, Staged};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use ringfence_bus::{DeviceBus, Doorbell, DoorbellDirection};
use ringfence_device::{
    ConfigWatcher, DeviceMemory, Interrupt, InterruptError, InterruptKind, QueueStats, VirtioDevice,
};
use ringfence_virtio_msg::{feature_blocks, Body, DeviceInfo, Message, Vqueue, Words};
use virtio_bindings::virtio_config::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};

use crate::worker::{Stopped, Wake, Worker, WorkerCtx, STOP_TIMEOUT};
use crate::BackendStats;

const S_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const S_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const S_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const S_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const S_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// Features the transport itself implements (through virtio-queue).
pub const TRANSPORT_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC);

struct QueueSlot {
    setup: Option<Vqueue>,
    /// The driver's doorbell for this queue.
    kick: Option<Arc<dyn Doorbell>>,
    /// The running worker's private wake-up (in-band EVENT_AVAIL rings it).
    wake: Option<Arc<Wake>>,
    stats: Arc<QueueStats>,
}

/// What the device rings and sends; shared with the queue workers.
struct Notifier {
    dev_num: u16,
    bus: Mutex<Option<Arc<dyn DeviceBus>>>,
    to_driver: Mutex<Vec<Option<Arc<dyn Doorbell>>>>,
    generation: AtomicU32,
    status: AtomicU32,
    needs_reset: Arc<AtomicBool>,
}

impl Notifier {
    fn send(&self, body: Body<'_>) -> Result<(), String> {
        let bus = self.bus.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(bus) = bus else {
            return Err("no bus attached".into());
        };
        let mut buf = [0u8; 64];
        let n = Message {
            dev_num: self.dev_num,
            token: 0,
            body,
        }
        .encode(&mut buf)
        .map_err(|e| e.to_string())?;
        bus.send(buf.get(..n).unwrap_or(&[]))
            .map_err(|e| e.to_string())
    }

    fn device_status(&self) -> u32 {
        let s = self.status.load(Ordering::SeqCst);
        if self.needs_reset.load(Ordering::SeqCst) {
            s | S_NEEDS_RESET
        } else {
            s
        }
    }
}

impl Interrupt for Notifier {
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError> {
        let err = |reason| InterruptError { kind, reason };
        match kind {
            InterruptKind::Queue(q) => {
                let db = self
                    .to_driver
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(usize::from(q))
                    .cloned()
                    .flatten();
                match db {
                    Some(db) => db.ring().map_err(|e| err(e.to_string())),
                    None => self
                        .send(Body::EventUsed {
                            vq_index: u32::from(q),
                        })
                        .map_err(err),
                }
            }
            InterruptKind::Config => {
                // The generation moves before the driver can see the change.
                let generation = self
                    .generation
                    .fetch_add(1, Ordering::SeqCst)
                    .wrapping_add(1);
                self.send(Body::EventConfig {
                    device_status: self.device_status(),
                    generation,
                    offset: 0,
                    data: &[],
                })
                .map_err(err)
            }
        }
    }
}

/// One device behind the virtio-msg transport.
pub struct DeviceTransport {
    device: Box<dyn VirtioDevice>,
    driver_features: u64,
    queues: Vec<QueueSlot>,
    workers: Vec<Worker>,
    /// The device's config watch while it is live.
    config_watcher: Option<ConfigWatcher>,
    memory: GuestMemoryAtomic<DeviceMemory>,
    copied: Arc<CopiedAreas>,
    notifier: Arc<Notifier>,
    stats: Option<Arc<BackendStats>>,
    poll: std::time::Duration,
}

fn ring_sizes(size: u32) -> (u64, u64, u64) {
    let s = u64::from(size);
    (16 * s, 6 + 2 * s, 6 + 8 * s)
}

impl DeviceTransport {
    pub(crate) fn new(
        dev_num: u16,
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryAtomic<DeviceMemory>,
        copied: Arc<CopiedAreas>,
    ) -> Self {
        let n = usize::from(device.num_queues());
        let needs_reset = Arc::new(AtomicBool::new(false));
        Self {
            queues: (0..n)
                .map(|_| QueueSlot {
                    setup: None,
                    kick: None,
                    wake: None,
                    stats: Arc::new(QueueStats::default()),
                })
                .collect(),
            device,
            driver_features: 0,
            workers: Vec::new(),
            config_watcher: None,
            memory,
            copied,
            notifier: Arc::new(Notifier {
                dev_num,
                bus: Mutex::new(None),
                to_driver: Mutex::new(vec![None; n]),
                generation: AtomicU32::new(0),
                status: AtomicU32::new(0),
                needs_reset,
            }),
            stats: None,
            poll: std::time::Duration::ZERO,
        }
    }

    pub(crate) fn set_poll(&mut self, poll: std::time::Duration) {
        self.poll = poll;
    }

    pub(crate) fn attach(&mut self, bus: Arc<dyn DeviceBus>, stats: Arc<BackendStats>) {
        *self.notifier.bus.lock().unwrap_or_else(|p| p.into_inner()) = Some(bus);
        self.stats = Some(stats);
    }

    pub(crate) fn detach(&mut self) {
        *self.notifier.bus.lock().unwrap_or_else(|p| p.into_inner()) = None;
        for q in &mut self.queues {
            q.kick = None;
        }
        self.notifier
            .to_driver
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter_mut()
            .for_each(|d| *d = None);
    }

    /// Current device status (with DEVICE_NEEDS_RESET if a queue broke).
    pub fn status(&self) -> u32 {
        self.notifier.device_status()
    }

    /// Chains processed on queue `q`.
    pub fn queue_stats(&self, q: usize) -> Option<Arc<QueueStats>> {
        self.queues.get(q).map(|s| s.stats.clone())
    }

    fn offered_features(&self) -> u64 {
        self.device.device_features() | TRANSPORT_FEATURES
    }

    pub(crate) fn attach_doorbell(
        &mut self,
        queue: u16,
        direction: DoorbellDirection,
        doorbell: Arc<dyn Doorbell>,
    ) -> Result<(), String> {
        if self.status() & S_DRIVER_OK != 0 {
            return Err("doorbell attached after DRIVER_OK".into());
        }
        let slot = self
            .queues
            .get_mut(usize::from(queue))
            .ok_or_else(|| format!("doorbell for queue {queue} of a device with fewer queues"))?;
        match direction {
            DoorbellDirection::ToDevice => slot.kick = Some(doorbell),
            DoorbellDirection::ToDriver => {
                if let Some(d) = self
                    .notifier
                    .to_driver
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_mut(usize::from(queue))
                {
                    *d = Some(doorbell);
                }
            }
        }
        Ok(())
    }

    /// An in-band EVENT_AVAIL for `vq`: wakes its worker through the
    /// worker's private eventfd, never through a descriptor the driver holds.
    pub(crate) fn kick(&self, vq: u32) {
        let slot = usize::try_from(vq).ok().and_then(|i| self.queues.get(i));
        match slot.and_then(|s| s.wake.as_ref()) {
            Some(wake) => wake.ring(),
            None => {
                if let Some(s) = &self.stats {
                    s.unexpected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn bad(&self, what: &str) {
        if let Some(s) = &self.stats {
            s.unexpected.fetch_add(1, Ordering::Relaxed);
        }
        tracing::warn!(dev = self.notifier.dev_num, "refused: {what}");
    }

    /// Stops the workers, resets the device model and all transport state
    /// except the config generation.
    pub fn reset(&mut self) {
        self.config_watcher = None;
        for w in self.workers.drain(..) {
            if let Stopped::Abandoned = w.stop(STOP_TIMEOUT) {
                tracing::error!(
                    dev = self.notifier.dev_num,
                    "a queue worker did not stop within {STOP_TIMEOUT:?}: abandoned"
                );
                if let Some(s) = &self.stats {
                    s.workers_abandoned.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if self.notifier.status.load(Ordering::SeqCst) & S_DRIVER_OK != 0 {
            self.device.reset();
        }
        self.driver_features = 0;
        for q in &mut self.queues {
            q.setup = None;
            q.wake = None;
        }
        self.notifier.needs_reset.store(false, Ordering::SeqCst);
        self.notifier.status.store(0, Ordering::SeqCst);
    }

    fn fail(&mut self, why: &str) {
        tracing::warn!(dev = self.notifier.dev_num, "device needs reset: {why}");
        if let Some(s) = &self.stats {
            s.queue_failures.fetch_add(1, Ordering::Relaxed);
        }
        self.notifier.needs_reset.store(true, Ordering::SeqCst);
        let _ = self.notifier.trigger(InterruptKind::Config);
    }

    fn set_status(&mut self, new: u32) -> u32 {
        if new == 0 {
            self.reset();
            return 0;
        }
        let old = self.notifier.status.load(Ordering::SeqCst);
        if new & old != old
            || new & !(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK | S_FAILED) != 0
        {
            self.bad(&format!(
                "status {new:#x} clears bits of {old:#x} or sets reserved bits"
            ));
            return self.status();
        }
        let added = new & !old;
        let mut accepted = new;
        if added & S_FEATURES_OK != 0 {
            let offered = self.offered_features();
            let ok = old & S_DRIVER != 0
                && self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                self.bad(&format!(
                    "FEATURES_OK with features {:#x} (offered {offered:#x})",
                    self.driver_features
                ));
                accepted &= !(S_FEATURES_OK | S_DRIVER_OK);
            }
        }
        if accepted & S_DRIVER_OK != 0 && added & S_DRIVER_OK != 0 {
            if accepted & S_FEATURES_OK == 0 {
                accepted &= !S_DRIVER_OK;
            } else {
                self.notifier.status.store(accepted, Ordering::SeqCst);
                if let Err(why) = self.activate() {
                    self.fail(&why);
                }
                return self.status();
            }
        }
        self.notifier.status.store(accepted, Ordering::SeqCst);
        self.status()
    }

    fn activate(&mut self) -> Result<(), String> {
        let handlers = self
            .device
            .activate(self.driver_features)
            .map_err(|e| e.to_string())?;
        let event_idx = self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let dev_num = self.notifier.dev_num;
        for (index, handler) in handlers.into_iter().enumerate() {
            let Some(slot) = self.queues.get_mut(index) else {
                break;
            };
            let Some(setup) = slot.setup else {
                continue; // the driver does not use this queue
            };
            let mut queue = Queue::new(self.device.max_queue_size())
                .map_err(|e| format!("queue {index}: {e}"))?;
            queue
                .try_set_size(setup.size as u16)
                .map_err(|e| format!("queue {index} size: {e}"))?;
            queue
                .try_set_desc_table_address(GuestAddress(setup.desc_addr))
                .map_err(|e| format!("queue {index}: {e}"))?;
            queue
                .try_set_avail_ring_address(GuestAddress(setup.driver_addr))
                .map_err(|e| format!("queue {index}: {e}"))?;
            queue
                .try_set_used_ring_address(GuestAddress(setup.device_addr))
                .map_err(|e| format!("queue {index}: {e}"))?;
            queue.set_event_idx(event_idx);
            queue.set_ready(true);
            if !queue.is_valid(&*self.memory.memory()) {
                return Err(format!(
                    "queue {index} rings are not inside the shared areas"
                ));
            }
            let wake = Arc::new(Wake::new().map_err(|e| format!("eventfd: {e}"))?);
            slot.wake = Some(wake.clone());
            let backend_stats = self
                .stats
                .clone()
                .ok_or_else(|| "activated without a bus".to_string())?;
            let worker = Worker::spawn(WorkerCtx {
                index: index as u16,
                queue,
                handler: Box::new(Staged::new(handler, self.copied.clone())),
                kick: slot.kick.clone(),
                wake,
                backend_stats,
                memory: self.memory.clone(),
                interrupt: self.notifier.clone(),
                needs_reset: self.notifier.needs_reset.clone(),
                stats: slot.stats.clone(),
                poll: self.poll,
            })
            .map_err(|e| format!("spawn worker: {e}"))?;
            self.workers.push(worker);
        }
        if let Some(watch) = self.device.config_watch() {
            let notifier = self.notifier.clone();
            let on_change = move || {
                tracing::debug!(dev = dev_num, "config changed");
                if let Err(e) = notifier.trigger(InterruptKind::Config) {
                    tracing::warn!(error = %e, "config interrupt lost");
                }
            };
            let watcher = ConfigWatcher::spawn(watch, on_change, format!("config-watch-{dev_num}"))
                .map_err(|e| format!("spawn config watch: {e}"))?;
            self.config_watcher = Some(watcher);
        }
        tracing::info!(
            dev = dev_num,
            queues = self.workers.len(),
            features = format_args!("{:#x}", self.driver_features),
            "DRIVER_OK"
        );
        Ok(())
    }

    fn set_vqueue(&mut self, q: Vqueue) {
        let status = self.status();
        if status & S_FEATURES_OK == 0 || status & S_DRIVER_OK != 0 {
            self.bad("SET_VQUEUE outside FEATURES_OK..DRIVER_OK");
            return;
        }
        let max = u32::from(self.device.max_queue_size());
        let valid_size = q.size.is_power_of_two() && q.size <= max;
        let Some(slot) = usize::try_from(q.index)
            .ok()
            .filter(|_| valid_size)
            .and_then(|i| self.queues.get_mut(i))
        else {
            self.fail(&format!(
                "SET_VQUEUE index {} size {} invalid",
                q.index, q.size
            ));
            return;
        };
        let (d, a, u) = ring_sizes(q.size);
        let mem = self.memory.memory();
        let inside = |addr: u64, len: u64, align: u64| {
            addr.is_multiple_of(align) && mem.get_slice(GuestAddress(addr), len as usize).is_ok()
        };
        if !(inside(q.desc_addr, d, 16)
            && inside(q.driver_addr, a, 2)
            && inside(q.device_addr, u, 4))
        {
            drop(mem);
            self.fail(&format!(
                "queue {} rings outside the shared areas or misaligned",
                q.index
            ));
            return;
        }
        slot.setup = Some(q);
    }

    /// Handles one request and returns the response body (borrowing `scratch`).
    pub(crate) fn handle_request<'s>(
        &mut self,
        body: Body<'_>,
        max_msg: usize,
        scratch: &'s mut [u8; 256],
    ) -> Body<'s> {
        match body {
            Body::GetDeviceInfo => Body::DeviceInfo(DeviceInfo {
                device_id: self.device.device_type(),
                vendor_id: 0x5246_4e43, // "RFNC"
                num_feature_bits: 64,
                config_size: self.device.config_size() as u32,
                max_virtqueues: u32::from(self.device.num_queues()),
                admin_vq_start: 0,
                admin_vq_count: 0,
            }),
            Body::GetDeviceFeatures {
                block_index,
                num_blocks,
            } => {
                let room = (max_msg.saturating_sub(16) / 4).min(scratch.len() / 4);
                let n = (num_blocks as usize).min(room);
                let bytes =
                    feature_blocks(self.offered_features(), block_index, &mut scratch[..n * 4]);
                Body::DeviceFeatures {
                    block_index,
                    features: Words::from_bytes(bytes).unwrap_or(Words::EMPTY),
                }
            }
            Body::SetDriverFeatures {
                block_index,
                features,
            } => {
                let status = self.status();
                if status & S_DRIVER == 0 || status & S_FEATURES_OK != 0 {
                    self.bad("SET_DRIVER_FEATURES outside DRIVER..FEATURES_OK");
                } else {
                    for (i, word) in features.iter().enumerate() {
                        match u64::from(block_index).saturating_add(i as u64) {
                            0 => {
                                self.driver_features =
                                    (self.driver_features & !0xFFFF_FFFF) | u64::from(word)
                            }
                            1 => {
                                self.driver_features =
                                    (self.driver_features & 0xFFFF_FFFF) | (u64::from(word) << 32)
                            }
                            // Bits we never offered: remembered as unacceptable.
                            _ if word != 0 => self.driver_features |= 1 << 63,
                            _ => {}
                        }
                    }
                }
                Body::SetDriverFeaturesDone
            }
            Body::GetConfig { offset, length } => {
                let generation = self.notifier.generation.load(Ordering::SeqCst);
                let room = max_msg.saturating_sub(20).min(scratch.len());
                let len = length as usize;
                let ok = len <= room
                    && self
                        .device
                        .read_config(u64::from(offset), &mut scratch[..len.min(room)])
                        .is_ok();
                if !ok {
                    self.bad(&format!("GET_CONFIG {length} bytes at {offset}"));
                }
                Body::Config {
                    generation,
                    offset,
                    data: if ok { &scratch[..len] } else { &[] },
                }
            }
            Body::SetConfig {
                generation,
                offset,
                data,
            } => {
                let current = self.notifier.generation.load(Ordering::SeqCst);
                let ok = generation == current
                    && self.device.write_config(u64::from(offset), data).is_ok();
                Body::SetConfigResult {
                    generation: current,
                    offset,
                    length: if ok { data.len() as u32 } else { 0 },
                    data: &[],
                }
            }
            Body::GetDeviceStatus => Body::DeviceStatus {
                status: self.status(),
            },
            Body::SetDeviceStatus { status } => Body::SetDeviceStatusResult {
                status: self.set_status(status),
            },
            Body::GetVqueue { index } => {
                let max_size = u32::from(self.device.max_queue_size());
                match usize::try_from(index).ok().and_then(|i| self.queues.get(i)) {
                    Some(slot) => Body::VqueueInfo(slot.setup.map_or(
                        Vqueue {
                            index,
                            max_size,
                            ..Vqueue::default()
                        },
                        |s| Vqueue {
                            index,
                            max_size,
                            ..s
                        },
                    )),
                    // No such queue: max_size 0.
                    None => Body::VqueueInfo(Vqueue {
                        index,
                        ..Vqueue::default()
                    }),
                }
            }
            Body::SetVqueue(q) => {
                self.set_vqueue(q);
                Body::SetVqueueDone
            }
            Body::ResetVqueue { .. } => {
                // VIRTIO_F_RING_RESET is not offered.
                self.bad("RESET_VQUEUE without VIRTIO_F_RING_RESET");
                Body::ResetVqueueDone
            }
            Body::GetShm { index } => Body::Shm {
                index,
                length: 0,
                address: 0,
            },
            other => {
                // Routed here only for requests; anything else is a bug in routing.
                self.bad(&format!("not a request: {other:?}"));
                Body::DeviceStatus {
                    status: self.status(),
                }
            }
        }
    }
}
