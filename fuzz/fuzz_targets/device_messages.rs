//! The device side of the virtio-msg transport driven by a hostile driver:
//! `Backend::serve` over a fake bus that replays the input as bus events.
//! This reaches the message router, the per-device status state machine,
//! SET_VQUEUE checks against shared areas, DRIVER_OK activation (worker
//! threads over virtio-blk) and the reset on disconnect. Only a panic (or
//! a hang, which libFuzzer reports as a timeout) is a bug.
//!
//! Input: events until the input ends (then the bus reports Disconnected):
//!   u8 event (mod 7), then:
//!   0 raw message      u16 len (mod MAX_MSG + 1), len bytes
//!   1 built message    u8 dev (0 = bus, 1 = the blk device, 2 = none),
//!                      u16 token, `ringfence_fuzz::body` (any kind)
//!   2 share area       u8 id (1..=3 by mod), u8 size in 4 KiB pages (1..=16 by mod)
//!   3 revoke area      u8 id (1..=3 by mod)
//!   4 driver writes    u8 id (1..=3 by mod), u16 off, u16 len, len bytes
//!                      into an area it shared (rings, descriptors, requests)
//!   5 pause            100 µs, so that queue workers get to run
//!   6 attach doorbell  u8 dev (mod 3), u8 queue, u8 direction (bit 0: to driver);
//!                      the driver picks dev and queue, the bus passes them on
#![no_main]
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ringfence_blk::{Blk, BlkOptions};
use ringfence_bus::{
    AreaId, BusError, BusLimits, DeviceBus, DeviceBusEvent, Doorbell, DoorbellDirection, SharedArea,
};
use ringfence_fuzz::{body, image_path, Input};
use ringfence_msg_device::Backend;
use ringfence_virtio_msg::Message;
use vm_memory::{MmapRegion, VolatileMemory};

/// What the bus carries at most; the recommended maximum of the spec.
const MAX_MSG: usize = 264;

struct Script {
    data: Vec<u8>,
    pos: usize,
    /// What the driver shared, so that it can keep writing into it.
    areas: BTreeMap<AreaId, Arc<MmapRegion>>,
}

/// A doorbell without a file descriptor (the trait allows it): the device
/// side notices its kicks only when it looks, never by sleeping on it.
#[derive(Default)]
struct FakeDoorbell(AtomicBool);

impl Doorbell for FakeDoorbell {
    fn ring(&self) -> Result<(), BusError> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn wait(&self, _timeout: Option<Duration>) -> Result<bool, BusError> {
        self.try_clear()
    }
    fn try_clear(&self) -> Result<bool, BusError> {
        Ok(self.0.swap(false, Ordering::SeqCst))
    }
    fn pollable_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

/// A bus whose driver side is the fuzz input.
struct FakeBus(Mutex<Script>);

impl FakeBus {
    /// The next event, or None when the input is used up.
    fn next_event(s: &mut Script, buf: &mut [u8]) -> Option<DeviceBusEvent> {
        let Script { data, pos, areas } = s;
        let mut input = Input::new(data.get(*pos..)?);
        if input.is_empty() {
            return None;
        }
        let area_id = |input: &mut Input| AreaId::from(input.u8() % 3 + 1);
        let event = match input.u8() % 7 {
            0 => {
                let len = usize::from(input.u16()) % (MAX_MSG + 1);
                let bytes = input.bytes(len);
                buf[..bytes.len()].copy_from_slice(bytes);
                DeviceBusEvent::Message(bytes.len())
            }
            1 => {
                let dev_num = u16::from(input.u8() % 3);
                let token = input.u16();
                let body = body(&mut input);
                // A message that does not fit the bus arrives empty (malformed).
                let n = Message {
                    dev_num,
                    token,
                    body,
                }
                .encode(&mut buf[..MAX_MSG])
                .unwrap_or(0);
                DeviceBusEvent::Message(n)
            }
            2 => {
                let id = area_id(&mut input);
                let size = (usize::from(input.u8() % 16) + 1) * 4096;
                let mapping = Arc::new(MmapRegion::new(size).expect("anonymous mapping"));
                areas.insert(id, mapping.clone());
                DeviceBusEvent::AreaShared(SharedArea {
                    id,
                    mapping,
                    copier: None,
                })
            }
            3 => {
                let id = area_id(&mut input);
                areas.remove(&id);
                DeviceBusEvent::AreaUnshared(id)
            }
            4 => {
                let id = area_id(&mut input);
                let off = usize::from(input.u16());
                let len = usize::from(input.u16());
                let bytes = input.bytes(len);
                if let Some(m) = areas.get(&id) {
                    let len = bytes.len().min(m.size().saturating_sub(off));
                    if let Ok(s) = m.get_slice(off, len) {
                        s.copy_from(&bytes[..len]);
                    }
                }
                DeviceBusEvent::Handled
            }
            5 => {
                std::thread::sleep(Duration::from_micros(100));
                DeviceBusEvent::Handled
            }
            _ => DeviceBusEvent::DoorbellAttached {
                dev_num: u16::from(input.u8() % 3),
                queue: u16::from(input.u8()),
                direction: if input.u8() & 1 == 0 {
                    DoorbellDirection::ToDevice
                } else {
                    DoorbellDirection::ToDriver
                },
                doorbell: Arc::new(FakeDoorbell::default()),
            },
        };
        *pos = data.len() - input.len();
        Some(event)
    }
}

impl DeviceBus for FakeBus {
    fn limits(&self) -> BusLimits {
        BusLimits {
            max_msg_size: MAX_MSG,
            doorbells: false,
            polling: false,
            can_grant: false,
            can_copy: false,
        }
    }

    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        // Replies and events go nowhere; oversized ones fail as on a real bus.
        if msg.len() > MAX_MSG {
            return Err(BusError::TooLarge {
                len: msg.len(),
                max: MAX_MSG,
            });
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8]) -> Result<DeviceBusEvent, BusError> {
        let mut s = self.0.lock().unwrap();
        Self::next_event(&mut s, buf).ok_or(BusError::Disconnected)
    }

    // The driver side of this bus learns nothing from these answers.
    fn complete_share(&self, _id: AreaId) -> Result<(), BusError> {
        Ok(())
    }

    fn complete_unshare(&self, _id: AreaId, _released: bool) -> Result<(), BusError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let blk = Blk::open(image_path(), BlkOptions::default()).unwrap();
    let mut backend = Backend::new(vec![Box::new(blk)]);
    let bus = Arc::new(FakeBus(Mutex::new(Script {
        data: data.to_vec(),
        pos: 0,
        areas: BTreeMap::new(),
    })));
    // Err is a legitimate end of a connection; serve() resets the device
    // (stopping its workers) before returning either way.
    let _ = backend.serve(bus);
});
