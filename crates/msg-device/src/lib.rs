//! virtio-msg transport, device side.
//!
//! [`Backend`] serves one bus connection: it answers bus messages (GET_DEVICES,
//! PING), routes transport messages to a [`DeviceTransport`] per device number,
//! keeps the device-visible memory (exactly the areas the driver shared), and
//! drops and counts everything malformed. [`DeviceTransport`] owns the virtio
//! status state machine and runs one worker thread per queue once the driver
//! sets DRIVER_OK.

mod staging;
mod transport;
mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ringfence_bus::{BusError, DeviceBus, DeviceBusEvent, SharedArea};
use ringfence_device::{DeviceMemory, VirtioDevice};
use ringfence_virtio_msg::{decode, Body, Message};
use staging::CopiedAreas;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestRegionMmap};

pub use transport::DeviceTransport;

/// Counters of one backend; every dropped message is counted here.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// Messages that failed to decode (wrong size, bad type bits, unknown id, truncated).
    pub malformed: AtomicU64,
    /// Transport messages for a device number that does not exist.
    pub unknown_device: AtomicU64,
    /// Well-formed messages that a device side must not receive (responses, device events).
    pub unexpected: AtomicU64,
    /// Things the bus refused (oversized messages, bad areas or doorbells).
    pub bus_dropped: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
    /// Connections served (accepted and handed to a backend).
    pub connections: AtomicU64,
    /// Connections closed at once because the connection limit was reached.
    pub connections_refused: AtomicU64,
    /// Connections that ended with an error (handshake timeout, a driver
    /// that stopped reading, a bus failure).
    pub connections_failed: AtomicU64,
    /// EVENT_AVAIL received.
    pub avail_events: AtomicU64,
    /// DEVICE_NEEDS_RESET raised because the driver broke a queue (a bad
    /// ring or chain at run time, a bad SET_VQUEUE, a failed activation).
    pub queue_failures: AtomicU64,
    /// Queue workers that did not stop in time and were left behind.
    pub workers_abandoned: AtomicU64,
    /// AREA_UNSHARE requests answered only after the area was out of use.
    pub areas_revoked: AtomicU64,
    /// AREA_UNSHARE requests refused because a worker kept the area too long.
    pub revocations_timed_out: AtomicU64,
    /// AREA_SHARE answered although a worker still had an older view of
    /// memory (a request using the new area may then fail).
    pub shares_timed_out: AtomicU64,
    /// Copy requests made for grants for copy (fetches and stores).
    pub copies: AtomicU64,
    /// Chains whose copy failed (the queue then needs a reset).
    pub copies_failed: AtomicU64,
}

impl BackendStats {
    /// Sum of all drops.
    pub fn dropped(&self) -> u64 {
        self.malformed.load(Ordering::Relaxed)
            + self.unknown_device.load(Ordering::Relaxed)
            + self.unexpected.load(Ordering::Relaxed)
            + self.bus_dropped.load(Ordering::Relaxed)
    }
}

impl std::fmt::Display for BackendStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "connections={} connections_refused={} connections_failed={} requests={} avail_events={} malformed={} unknown_device={} unexpected={} bus_dropped={} \
             queue_failures={} workers_abandoned={} areas_revoked={} revocations_timed_out={} shares_timed_out={} copies={} copies_failed={}",
            self.connections.load(Ordering::Relaxed),
            self.connections_refused.load(Ordering::Relaxed),
            self.connections_failed.load(Ordering::Relaxed),
            self.requests.load(Ordering::Relaxed),
            self.avail_events.load(Ordering::Relaxed),
            self.malformed.load(Ordering::Relaxed),
            self.unknown_device.load(Ordering::Relaxed),
            self.unexpected.load(Ordering::Relaxed),
            self.bus_dropped.load(Ordering::Relaxed),
            self.queue_failures.load(Ordering::Relaxed),
            self.workers_abandoned.load(Ordering::Relaxed),
            self.areas_revoked.load(Ordering::Relaxed),
            self.revocations_timed_out.load(Ordering::Relaxed),
            self.shares_timed_out.load(Ordering::Relaxed),
            self.copies.load(Ordering::Relaxed),
            self.copies_failed.load(Ordering::Relaxed),
        )
    }
}

/// How long AREA_UNSHARE waits for workers to leave the area.
pub const REVOKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a revocation yields (rather than sleeps) waiting for workers.
const REVOKE_SPIN: std::time::Duration = std::time::Duration::from_millis(1);

/// Waits until `done()` (workers let go of a view of memory, which they do at
/// the end of each batch); false after [`REVOKE_TIMEOUT`]. Grants come and go
/// per request and a worker usually lets go within microseconds, so it
/// yields first and sleeps only when that does not do.
fn wait_until(done: impl Fn() -> bool) -> bool {
    let started = std::time::Instant::now();
    while !done() {
        let waited = started.elapsed();
        if waited >= REVOKE_TIMEOUT {
            return false;
        }
        if waited < REVOKE_SPIN {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
    true
}

/// The device side of one bus: device numbers to device transports.
pub struct Backend {
    devices: BTreeMap<u16, DeviceTransport>,
    areas: BTreeMap<u16, SharedArea>,
    memory: GuestMemoryAtomic<DeviceMemory>,
    /// The areas whose bytes move by copy (staging, see [`staging`]).
    copied: Arc<CopiedAreas>,
    stats: Arc<BackendStats>,
}

fn build_memory(areas: &BTreeMap<u16, SharedArea>) -> DeviceMemory {
    let regions = areas.values().filter_map(|a| {
        let base = ringfence_bus::area_addr(a.id, 0)?;
        GuestRegionMmap::with_arc(a.mapping.clone(), GuestAddress(base))
    });
    DeviceMemory::from_regions(regions.collect()).unwrap_or_default()
}

impl Backend {
    /// A backend serving `devices`, numbered from 1 in order.
    pub fn new(devices: Vec<Box<dyn VirtioDevice>>) -> Self {
        Self::with_stats(devices, Arc::new(BackendStats::default()))
    }

    /// Like [`Backend::new`], counting into `stats` (shared by the
    /// connections of one backend process).
    pub fn with_stats(devices: Vec<Box<dyn VirtioDevice>>, stats: Arc<BackendStats>) -> Self {
        let memory = GuestMemoryAtomic::new(DeviceMemory::default());
        let copied = Arc::new(CopiedAreas::new(stats.clone()));
        let devices = devices
            .into_iter()
            .zip(1u16..)
            .map(|(d, n)| {
                let transport = DeviceTransport::new(n, d, memory.clone(), copied.clone());
                (n, transport)
            })
            .collect();
        Self {
            devices,
            areas: BTreeMap::new(),
            memory,
            copied,
            stats,
        }
    }

    /// Keep polling each queue for this long after a batch before sleeping
    /// (0 = always wait for a notification).
    pub fn set_poll(&mut self, poll: std::time::Duration) {
        for d in self.devices.values_mut() {
            d.set_poll(poll);
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<BackendStats> {
        self.stats.clone()
    }

    /// The device transport with number `dev_num`.
    pub fn device(&self, dev_num: u16) -> Option<&DeviceTransport> {
        self.devices.get(&dev_num)
    }

    fn drop_msg(&self, counter: &AtomicU64, why: &dyn std::fmt::Display) {
        counter.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("dropped message: {why}");
    }

    /// Serves one connection until the driver side disconnects. Devices are
    /// reset afterwards so the next connection starts clean.
    pub fn serve(&mut self, bus: Arc<dyn DeviceBus>) -> Result<(), BusError> {
        let mut buf = vec![0u8; ringfence_virtio_msg::consts::ABSOLUTE_MAX_MSG_SIZE];
        let mut out = vec![0u8; ringfence_virtio_msg::consts::ABSOLUTE_MAX_MSG_SIZE];
        for dev in self.devices.values_mut() {
            dev.attach(bus.clone(), self.stats.clone());
        }
        let result = loop {
            let event = match bus.recv(&mut buf) {
                Ok(e) => e,
                Err(BusError::Disconnected) => break Ok(()),
                Err(e) => break Err(e),
            };
            match event {
                DeviceBusEvent::Message(n) => {
                    let bytes = buf.get(..n).unwrap_or(&[]);
                    if let Err(e) = self.handle_message(bytes, &mut out, bus.as_ref()) {
                        if matches!(e, BusError::Disconnected) {
                            break Ok(());
                        }
                        break Err(e);
                    }
                }
                DeviceBusEvent::AreaShared(area) => {
                    let id = area.id;
                    if let Some(copier) = &area.copier {
                        self.copied
                            .insert(id, area.mapping.size() as u64, copier.clone());
                    }
                    self.areas.insert(id, area);
                    let old = self.memory.memory().into_inner();
                    self.memory
                        .lock()
                        .map(|g| g.replace(build_memory(&self.areas)))
                        .ok();
                    // The driver may use the area as soon as it hears back
                    // (a grant is used by the very next request): no worker
                    // may still be in a batch that started with a view
                    // without it.
                    if !wait_until(|| Arc::strong_count(&old) == 1) {
                        self.stats.shares_timed_out.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(
                            area = id,
                            "a worker kept an older view of memory after {REVOKE_TIMEOUT:?}"
                        );
                    }
                    drop(old);
                    if let Err(e) = bus.complete_share(id) {
                        break Self::ended(e);
                    }
                }
                DeviceBusEvent::AreaUnshared(id) => {
                    let released = self.revoke_area(id);
                    if let Err(e) = bus.complete_unshare(id, released) {
                        break Self::ended(e);
                    }
                }
                DeviceBusEvent::DoorbellAttached {
                    dev_num,
                    queue,
                    direction,
                    doorbell,
                } => match self.devices.get_mut(&dev_num) {
                    Some(d) => {
                        if let Err(why) = d.attach_doorbell(queue, direction, doorbell) {
                            self.drop_msg(&self.stats.bus_dropped, &why);
                        }
                    }
                    None => self.drop_msg(
                        &self.stats.unknown_device,
                        &format!("doorbell for device {dev_num}"),
                    ),
                },
                DeviceBusEvent::Handled => {}
                DeviceBusEvent::Dropped { reason } => {
                    self.drop_msg(&self.stats.bus_dropped, &reason)
                }
            }
        };
        for dev in self.devices.values_mut() {
            dev.reset();
            dev.detach();
        }
        self.areas.clear();
        self.copied.clear();
        self.memory
            .lock()
            .map(|g| g.replace(DeviceMemory::default()))
            .ok();
        tracing::info!(stats = %self.stats, "driver side disconnected");
        result
    }

    /// How a bus error ends a connection: a disconnect is a normal end.
    fn ended(e: BusError) -> Result<(), BusError> {
        match e {
            BusError::Disconnected => Ok(()),
            e => Err(e),
        }
    }

    /// Takes area `id` out of the device memory and waits until no worker
    /// holds a view that contains it; only then may the driver hear that it
    /// is out of use. `false` if a worker kept it beyond [`REVOKE_TIMEOUT`]
    /// (a worker stuck inside one batch, on a hung disk say): the area is
    /// then put back and stays shared.
    fn revoke_area(&mut self, id: u16) -> bool {
        let Some(area) = self.areas.remove(&id) else {
            return false;
        };
        let copier = self.copied.remove(id);
        self.memory
            .lock()
            .map(|g| g.replace(build_memory(&self.areas)))
            .ok();
        // Every view of the old memory holds a reference to the mapping;
        // workers drop theirs at the end of each batch.
        if !wait_until(|| Arc::strong_count(&area.mapping) == 1) {
            self.stats
                .revocations_timed_out
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(area = id, "area still in use after {REVOKE_TIMEOUT:?}");
            // Refused: the area stays shared, as the bus still lists it,
            // and the driver may ask again.
            self.areas.insert(id, area);
            if let Some((size, copier)) = copier {
                self.copied.insert(id, size, copier);
            }
            self.memory
                .lock()
                .map(|g| g.replace(build_memory(&self.areas)))
                .ok();
            return false;
        }
        self.stats.areas_revoked.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(area = id, "area revoked");
        true
    }

    fn handle_message(
        &mut self,
        bytes: &[u8],
        out: &mut [u8],
        bus: &dyn DeviceBus,
    ) -> Result<(), BusError> {
        let msg = match decode(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.drop_msg(&self.stats.malformed, &e);
                return Ok(());
            }
        };
        let max = bus.limits().max_msg_size.min(out.len());
        let out = out.get_mut(..max).unwrap_or_default();
        let reply = |body: Body<'_>, out: &mut [u8]| -> Result<(), BusError> {
            let n = Message {
                dev_num: msg.dev_num,
                token: msg.token,
                body,
            }
            .encode(out)
            .map_err(|e| BusError::Protocol {
                reason: e.to_string(),
            })?;
            bus.send(out.get(..n).unwrap_or(&[]))
        };
        match msg.body {
            Body::Ping { data } => {
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                reply(Body::Pong { data }, out)
            }
            Body::GetDevices { offset, count } => {
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                // Bitmap bytes that fit in one message.
                let room = max.saturating_sub(ringfence_virtio_msg::consts::HEADER_SIZE + 6);
                let count = usize::from(count).min(room * 8).min(256 * 8) / 8 * 8;
                let mut bitmap = [0u8; 256];
                for &n in self.devices.keys() {
                    if let Some(rel) = n.checked_sub(offset).map(usize::from) {
                        if rel < count {
                            if let Some(b) = bitmap.get_mut(rel / 8) {
                                *b |= 1 << (rel % 8);
                            }
                        }
                    }
                }
                let last = self.devices.keys().next_back().copied().unwrap_or(0);
                let end = usize::from(offset) + count;
                let next_offset = if usize::from(last) >= end {
                    end as u16
                } else {
                    0
                };
                reply(
                    Body::Devices {
                        offset,
                        count: count as u16,
                        next_offset,
                        bitmap: bitmap.get(..count / 8).unwrap_or(&[]),
                    },
                    out,
                )
            }
            Body::EventAvail { vq_index, .. } => {
                self.stats.avail_events.fetch_add(1, Ordering::Relaxed);
                match self.devices.get(&msg.dev_num) {
                    Some(d) => {
                        d.kick(vq_index);
                        Ok(())
                    }
                    None => {
                        self.drop_msg(
                            &self.stats.unknown_device,
                            &format!("EVENT_AVAIL for device {}", msg.dev_num),
                        );
                        Ok(())
                    }
                }
            }
            body if body.kind().1
                || body.kind().2
                || ringfence_virtio_msg::is_event_id(body.kind().0) =>
            {
                self.drop_msg(
                    &self.stats.unexpected,
                    &format!("{body:?} is not a request for a device"),
                );
                Ok(())
            }
            body => {
                let Some(dev) = self.devices.get_mut(&msg.dev_num) else {
                    self.drop_msg(
                        &self.stats.unknown_device,
                        &format!("request for device {}", msg.dev_num),
                    );
                    return Ok(());
                };
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                let mut scratch = [0u8; 256];
                let response = dev.handle_request(body, max, &mut scratch);
                reply(response, out)
            }
        }
    }
}
