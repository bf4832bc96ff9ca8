//! The driver side's reply handling: `discover`, `MsgTransport::new` and the
//! `Transport` methods virtio-drivers calls, against a device (the fuzz
//! input) that answers anything at all. Every call must return; a missing
//! answer is a timeout error, and the fake bus times out at once when the
//! input is used up, so a slow input means a loop that ignores timeouts.
//!
//! Input (little-endian; missing bytes read as zero):
//!   u8  bus max_msg_size: 44 + (b mod 221), any legal size up to 264
//!   u8  n (mod 16), then n u8 method selectors (mod 16, see `call`)
//!   then the device's replies, one per `recv`, until the end:
//!   u8 tag (mod 4), then:
//!   0 raw              u16 len, len bytes, as they are
//!   1 raw, answering   u16 len, len bytes whose header dev_num and token
//!                      are overwritten with those of the last request sent
//!   2 built, answering `ringfence_fuzz::body` (any kind), with the last
//!                      request's dev_num and token
//!   3 timeout          no message this time
#![no_main]
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ringfence_bus::{AreaId, BusError, BusLimits, DoorbellDirection, DriverBus, LocalArea};
use ringfence_fuzz::{body, Input};
use ringfence_msg_driver::{discover, MsgTransport};
use ringfence_virtio_msg::Message;
use virtio_drivers::transport::{DeviceStatus, Transport};

struct Script {
    data: Vec<u8>,
    pos: usize,
    /// (dev_num, token) of the last request the driver sent.
    last: (u16, u16),
}

/// A bus whose device side is the fuzz input.
struct FakeBus {
    max: usize,
    script: Mutex<Script>,
}

fn unsupported(what: &str) -> BusError {
    BusError::Protocol {
        reason: format!("{what}: not on this bus"),
    }
}

impl DriverBus for FakeBus {
    fn limits(&self) -> BusLimits {
        BusLimits {
            max_msg_size: self.max,
            doorbells: false,
            polling: false,
            can_grant: false,
            can_copy: false,
        }
    }

    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        if msg.len() > self.max {
            return Err(BusError::TooLarge {
                len: msg.len(),
                max: self.max,
            });
        }
        if let (Some(d), Some(t)) = (msg.get(2..4), msg.get(4..6)) {
            let le = |b: &[u8]| u16::from_le_bytes([b[0], b[1]]);
            self.script.lock().unwrap().last = (le(d), le(t));
        }
        Ok(())
    }

    /// Never waits: an exhausted input is an immediate timeout.
    fn recv(&self, buf: &mut [u8], _timeout: Option<Duration>) -> Result<Option<usize>, BusError> {
        let mut s = self.script.lock().unwrap();
        let Script { data, pos, last } = &mut *s;
        let mut input = Input::new(data.get(*pos..).unwrap_or(&[]));
        if input.is_empty() {
            return Ok(None);
        }
        // A bus never delivers more than its maximum.
        let room = buf.len().min(self.max);
        let n = match input.u8() % 4 {
            tag @ (0 | 1) => {
                let len = usize::from(input.u16());
                let bytes = input.bytes(len);
                let n = bytes.len().min(room);
                buf[..n].copy_from_slice(&bytes[..n]);
                if tag == 1 && n >= 6 {
                    buf[2..4].copy_from_slice(&last.0.to_le_bytes());
                    buf[4..6].copy_from_slice(&last.1.to_le_bytes());
                }
                Some(n)
            }
            2 => {
                let body = body(&mut input);
                // Too large for this bus: arrives as an empty (malformed) message.
                let n = Message {
                    dev_num: last.0,
                    token: last.1,
                    body,
                }
                .encode(&mut buf[..room])
                .unwrap_or(0);
                Some(n)
            }
            _ => None,
        };
        *pos = data.len() - input.len();
        Ok(n)
    }

    fn share_area(&self, _size: usize) -> Result<LocalArea, BusError> {
        Err(unsupported("share_area"))
    }

    fn unshare_area(&self, _id: AreaId) -> Result<(), BusError> {
        Err(unsupported("unshare_area"))
    }

    fn doorbell(
        &self,
        _dev_num: u16,
        _queue: u16,
        _direction: DoorbellDirection,
    ) -> Result<Option<Arc<dyn ringfence_bus::Doorbell>>, BusError> {
        Ok(None)
    }
}

/// One `Transport` (or transport) call, as virtio-drivers makes them.
fn call(t: &mut MsgTransport, which: u8) {
    const AREA: u64 = 1 << 48;
    match which % 16 {
        0 => _ = t.read_device_features(),
        1 => t.write_driver_features(1 << 32),
        2 => _ = t.get_status(),
        3 => t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER),
        4 => t.set_status(DeviceStatus::FEATURES_OK),
        5 => _ = t.max_queue_size(0),
        6 => _ = t.queue_used(0),
        7 => t.queue_set(0, 16, AREA, AREA + 0x1000, AREA + 0x2000),
        8 => _ = t.read_config_space::<u64>(0),
        // Larger than one message on small buses: read in chunks.
        9 => _ = t.read_config_space::<[u8; 60]>(0),
        10 => _ = t.write_config_space::<u32>(32, 1),
        11 => _ = t.read_config_generation(),
        12 => _ = t.ack_interrupt(),
        13 => t.notify(0),
        14 => _ = t.waiter().wait(0, Duration::from_secs(1)),
        _ => _ = t.take_failure(),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let max = 44 + usize::from(input.u8()) % 221;
    let n_calls = usize::from(input.u8() % 16);
    let calls = input.bytes(n_calls).to_vec();
    let bus = Arc::new(FakeBus {
        max,
        script: Mutex::new(Script {
            data: input.bytes(data.len()).to_vec(),
            pos: 0,
            last: (0, 0),
        }),
    });
    let _ = discover(bus.as_ref());
    let Ok(mut t) = MsgTransport::new(bus, 1) else {
        return;
    };
    let _ = (t.info(), t.device_type());
    for which in calls {
        call(&mut t, which);
    }
});
