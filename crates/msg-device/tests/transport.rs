//! The device-side transport driven by the driver-side transport over a real
//! local bus (in one process), with a toy device: no block specifics.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use ringfence_bus::DriverBus;
use ringfence_bus_local::{LocalBusConfig, LocalDeviceBus, LocalDriverBus, Seqpacket};
use ringfence_device::{DeviceError, QueueHandler, VirtioDevice};
use ringfence_msg_device::Backend;
use ringfence_msg_driver::{discover, MsgTransport};
use ringfence_virtio_msg::{decode, Body, Message};
use virtio_drivers::transport::{DeviceStatus, Transport};

/// A device with a 100-byte config space whose second half is writable.
struct Toy {
    config: Arc<Mutex<[u8; 100]>>,
}

impl VirtioDevice for Toy {
    fn device_type(&self) -> u32 {
        4
    }
    fn device_features(&self) -> u64 {
        1 << 3
    }
    fn num_queues(&self) -> u16 {
        2
    }
    fn max_queue_size(&self) -> u16 {
        64
    }
    fn config_size(&self) -> usize {
        100
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        ringfence_device::read_config_bytes(&*self.config.lock().unwrap(), offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let o = offset as usize;
        if o < 50 || o + data.len() > 100 {
            return Err(DeviceError::ConfigReadOnly { offset });
        }
        self.config.lock().unwrap()[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn activate(&mut self, _f: u64) -> Result<Vec<Box<dyn QueueHandler>>, DeviceError> {
        Ok(Vec::new())
    }
    fn reset(&mut self) {}
}

type Rig = (
    Arc<dyn DriverBus>,
    std::thread::JoinHandle<Backend>,
    Arc<Mutex<[u8; 100]>>,
);

fn setup(max_msg_size: usize) -> Rig {
    let (a, b) = Seqpacket::pair().unwrap();
    let config = Arc::new(Mutex::new([0u8; 100]));
    for (i, c) in config.lock().unwrap().iter_mut().enumerate() {
        *c = i as u8;
    }
    let cfg = LocalBusConfig {
        max_msg_size,
        doorbells: false,
        ..Default::default()
    };
    let dev_bus = Arc::new(LocalDeviceBus::new(a, cfg).unwrap());
    let mut backend = Backend::new(vec![Box::new(Toy {
        config: config.clone(),
    })]);
    let server = std::thread::spawn(move || {
        backend.serve(dev_bus).unwrap();
        backend
    });
    let bus: Arc<dyn DriverBus> = Arc::new(LocalDriverBus::handshake(b, cfg).unwrap());
    (bus, server, config)
}

#[test]
fn config_moves_in_chunks_at_the_minimum_message_size() {
    for max in [48usize, 264] {
        let (bus, server, _) = setup(max);
        assert_eq!(bus.limits().max_msg_size, max);
        assert_eq!(discover(bus.as_ref()).unwrap(), vec![1]);
        let mut t = MsgTransport::new(bus.clone(), 1).unwrap();
        assert_eq!(t.info().config_size, 100);
        assert_eq!(t.info().max_virtqueues, 2);
        let mut all = [0u8; 100];
        t.read_config(0, &mut all).unwrap();
        assert!(
            all.iter().enumerate().all(|(i, &b)| b == i as u8),
            "max {max}"
        );
        // Features arrive in 32-bit blocks even when only a few fit.
        let f = t.read_device_features();
        assert_eq!(f, (1 << 3) | (1 << 32) | (1 << 29) | (1 << 28));
        drop(t);
        drop(bus);
        let backend = server.join().unwrap();
        assert_eq!(backend.stats().dropped(), 0);
    }
}

#[test]
fn set_config_with_a_stale_generation_is_rejected() {
    let (bus, server, config) = setup(264);
    let t = MsgTransport::new(bus.clone(), 1).unwrap();
    let generation = t.read_config_generation();
    let send = |generation: u32, offset: u32, data: &[u8]| {
        t.request(
            "SET_CONFIG",
            Body::SetConfig {
                generation,
                offset,
                data,
            },
            |b| match b {
                Body::SetConfigResult { length, .. } => Some(*length),
                _ => None,
            },
        )
        .unwrap()
    };
    assert_eq!(send(generation, 60, &[9, 9]), 2);
    assert_eq!(config.lock().unwrap()[60..62], [9, 9]);
    assert_eq!(
        send(generation.wrapping_add(1), 60, &[7]),
        0,
        "stale generation accepted"
    );
    assert_eq!(send(generation, 10, &[7]), 0, "read-only bytes accepted");
    assert_eq!(config.lock().unwrap()[60], 9);
    drop(t);
    drop(bus);
    server.join().unwrap();
}

#[test]
fn status_machine_refuses_out_of_order_steps() {
    let (bus, server, _) = setup(264);
    let mut t = MsgTransport::new(bus.clone(), 1).unwrap();
    // FEATURES_OK before DRIVER: refused.
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::FEATURES_OK);
    assert!(!t.get_status().contains(DeviceStatus::FEATURES_OK));
    t.set_status(DeviceStatus::empty());
    // Without VERSION_1: refused.
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features(1 << 3);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    assert!(!t.get_status().contains(DeviceStatus::FEATURES_OK));
    // Correct sequence, then clearing a bit without reset is refused.
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features((1 << 32) | (1 << 3));
    let ok = DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK;
    t.set_status(ok);
    assert_eq!(t.get_status(), ok);
    t.set_status(DeviceStatus::ACKNOWLEDGE);
    assert_eq!(t.get_status(), ok);
    // Queue beyond the device's count: needs reset.
    t.queue_set(5, 8, 1 << 48, (1 << 48) + 4096, (1 << 48) + 8192);
    assert!(t.get_status().contains(DeviceStatus::DEVICE_NEEDS_RESET));
    // Reset clears it.
    t.set_status(DeviceStatus::empty());
    assert_eq!(t.get_status(), DeviceStatus::empty());
    drop(t);
    drop(bus);
    let backend = server.join().unwrap();
    assert!(backend.stats().unexpected.load(Ordering::Relaxed) >= 3);
}

#[test]
fn bus_ping_and_oversized_messages() {
    let (bus, server, _) = setup(48);
    let mut buf = [0u8; 48];
    let n = Message {
        dev_num: 0,
        token: 3,
        body: Body::Ping { data: 0xABCD },
    }
    .encode(&mut buf)
    .unwrap();
    bus.send(&buf[..n]).unwrap();
    let n = bus
        .recv(&mut buf, Some(std::time::Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    let m = decode(&buf[..n]).unwrap();
    assert_eq!((m.token, m.body), (3, Body::Pong { data: 0xABCD }));
    // The driver bus refuses to send beyond the negotiated maximum.
    assert!(bus.send(&[0u8; 49]).is_err());
    drop(bus);
    let backend = server.join().unwrap();
    assert_eq!(backend.stats().requests.load(Ordering::Relaxed), 1);
}
