//! A request held by a worker while the driver acts: AREA_UNSHARE of the
//! area it uses waits for the worker, and one held too long is refused (the
//! area stays shared and can be revoked later); a reset does not wait for a
//! worker that will not stop, it abandons it after a bound and counts it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_bus::{area_addr, DriverBus};
use ringfence_bus_local::{LocalBusConfig, LocalDeviceBus, LocalDriverBus, Seqpacket};
use ringfence_device::{Chain, ChainError, DeviceError, DeviceMemory, QueueHandler, VirtioDevice};
use ringfence_msg_device::{Backend, REVOKE_TIMEOUT};
use ringfence_msg_driver::MsgTransport;
use virtio_drivers::transport::{DeviceStatus, Transport};
use vm_memory::{VolatileMemory, VolatileSlice};

/// One queue whose handler holds each chain for `hold`.
struct Slow {
    hold: Duration,
    started: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
}

struct SlowQueue {
    hold: Duration,
    started: Arc<AtomicBool>,
    finished: Arc<AtomicBool>,
}

impl QueueHandler for SlowQueue {
    fn handle_chain(&mut self, _chain: Chain<'_>, _mem: &DeviceMemory) -> Result<u32, ChainError> {
        self.started.store(true, Ordering::SeqCst);
        std::thread::sleep(self.hold);
        self.finished.store(true, Ordering::SeqCst);
        Ok(0)
    }
}

impl VirtioDevice for Slow {
    fn device_type(&self) -> u32 {
        4
    }
    fn device_features(&self) -> u64 {
        0
    }
    fn num_queues(&self) -> u16 {
        1
    }
    fn max_queue_size(&self) -> u16 {
        16
    }
    fn config_size(&self) -> usize {
        0
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        ringfence_device::read_config_bytes(&[], offset, data)
    }
    fn write_config(&mut self, offset: u64, _data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigReadOnly { offset })
    }
    fn activate(&mut self, _f: u64) -> Result<Vec<Box<dyn QueueHandler>>, DeviceError> {
        Ok(vec![Box::new(SlowQueue {
            hold: self.hold,
            started: self.started.clone(),
            finished: self.finished.clone(),
        })])
    }
    fn reset(&mut self) {}
}

fn put(window: &VolatileSlice<'_, ()>, at: usize, bytes: &[u8]) {
    window.subslice(at, bytes.len()).unwrap().copy_from(bytes);
}

/// Starts the device with one request in flight whose buffer lies in a
/// second area; returns once the handler holds it.
fn request_in_flight(
    hold: Duration,
) -> (
    Arc<dyn DriverBus>,
    u16,
    Arc<AtomicBool>,
    std::thread::JoinHandle<Backend>,
    MsgTransport,
) {
    let (a, b) = Seqpacket::pair().unwrap();
    let cfg = LocalBusConfig {
        doorbells: false,
        ..Default::default()
    };
    let dev_bus = Arc::new(LocalDeviceBus::new(a, cfg).unwrap());
    let started = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicBool::new(false));
    let mut backend = Backend::new(vec![Box::new(Slow {
        hold,
        started: started.clone(),
        finished: finished.clone(),
    })]);
    let server = std::thread::spawn(move || {
        backend.serve(dev_bus).unwrap();
        backend
    });
    let bus: Arc<dyn DriverBus> = Arc::new(LocalDriverBus::handshake(b, cfg).unwrap());
    let rings = bus.share_area(64 * 1024).unwrap();
    let data = bus.share_area(64 * 1024).unwrap();
    let base = area_addr(rings.id, 0).unwrap();
    let mut t = MsgTransport::new(bus.clone(), 1).unwrap();
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features(1 << 32);
    let fok = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
    t.set_status(fok);
    t.queue_set(0, 16, base, base + 256, base + 512);
    t.set_status(fok | DeviceStatus::DRIVER_OK);
    assert!(t.take_failure().is_none());
    // One descriptor in the data area, published as avail entry 0.
    let window = rings.mapping.get_slice(0, 4096).unwrap();
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&area_addr(data.id, 0).unwrap().to_le_bytes());
    desc[8..12].copy_from_slice(&512u32.to_le_bytes());
    put(&window, 0, &desc);
    put(&window, 256 + 4, &0u16.to_le_bytes());
    put(&window, 256 + 2, &1u16.to_le_bytes());
    t.notify(0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !started.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    (bus, data.id, finished, server, t)
}

#[test]
fn unshare_is_answered_only_after_the_worker_let_go_of_the_area() {
    let (bus, data, finished, server, t) = request_in_flight(Duration::from_millis(300));
    bus.unshare_area(data).unwrap();
    assert!(
        finished.load(Ordering::SeqCst),
        "AREA_UNSHARE acknowledged while a worker still used the area"
    );
    drop((t, bus));
    let backend = server.join().unwrap();
    assert_eq!(backend.stats().areas_revoked.load(Ordering::Relaxed), 1);
}

#[test]
fn a_worker_that_keeps_the_area_too_long_gets_the_revocation_refused_then_retried() {
    let (bus, data, finished, server, t) =
        request_in_flight(REVOKE_TIMEOUT + Duration::from_secs(1));
    assert!(
        bus.unshare_area(data).is_err(),
        "revocation accepted while in use"
    );
    while !finished.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The refused area is still shared, so a second request succeeds.
    bus.unshare_area(data).unwrap();
    drop((t, bus));
    let backend = server.join().unwrap();
    let stats = backend.stats();
    assert_eq!(stats.revocations_timed_out.load(Ordering::Relaxed), 1);
    assert_eq!(stats.areas_revoked.load(Ordering::Relaxed), 1);
}

#[test]
fn a_reset_abandons_a_worker_that_does_not_stop_in_time() {
    let (bus, _data, finished, server, mut t) = request_in_flight(Duration::from_secs(4));
    let start = Instant::now();
    t.set_status(DeviceStatus::empty());
    assert!(t.take_failure().is_none(), "reset not answered");
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "reset waited {took:?} for a stuck worker"
    );
    assert!(!finished.load(Ordering::SeqCst), "the worker was not stuck");
    assert_eq!(t.get_status(), DeviceStatus::empty());
    drop((t, bus));
    let backend = server.join().unwrap();
    assert_eq!(backend.stats().workers_abandoned.load(Ordering::Relaxed), 1);
}
