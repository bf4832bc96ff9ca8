//! BusMux: one bus connection, several devices, one receiving thread per device.

use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ringfence_bus::{
    AreaId, BusError, BusLimits, Doorbell, DoorbellDirection, DriverBus, LocalArea,
};
use ringfence_msg_driver::{discover, BusMux, MsgTransport, MuxOptions};
use ringfence_virtio_msg::{decode, Body, DeviceInfo, Message};
use virtio_drivers::transport::{DeviceType, Transport};

type Item = Result<Vec<u8>, BusError>;
/// Answers a sent message with messages to deliver.
type Responder = Box<dyn Fn(&[u8]) -> Vec<Vec<u8>> + Send + Sync>;

/// A bus whose receive side is a channel fed by the test (or by `responder`,
/// which plays the device side for sent messages).
struct FakeBus {
    rx: Mutex<Receiver<Item>>,
    tx: Mutex<Sender<Item>>,
    responder: Option<Responder>,
    /// recv calls that were running at once (must never exceed 1).
    inside: Mutex<(u32, u32)>,
}

impl FakeBus {
    fn new(responder: Option<Responder>) -> (Arc<Self>, Sender<Item>) {
        let (tx, rx) = mpsc::channel();
        let bus = Arc::new(Self {
            rx: Mutex::new(rx),
            tx: Mutex::new(tx.clone()),
            responder,
            inside: Mutex::new((0, 0)),
        });
        (bus, tx)
    }

    fn max_concurrent_recv(&self) -> u32 {
        self.inside.lock().unwrap().1
    }
}

impl DriverBus for FakeBus {
    fn limits(&self) -> BusLimits {
        BusLimits {
            max_msg_size: 264,
            doorbells: false,
            polling: false,
            can_grant: false,
            can_copy: false,
        }
    }

    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        if let Some(r) = &self.responder {
            let tx = self.tx.lock().unwrap();
            for m in r(msg) {
                tx.send(Ok(m)).map_err(|_| BusError::Disconnected)?;
            }
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> Result<Option<usize>, BusError> {
        {
            let mut i = self.inside.lock().unwrap();
            i.0 += 1;
            i.1 = i.1.max(i.0);
        }
        // try_lock: the mux must never have two readers.
        let rx = self
            .rx
            .try_lock()
            .expect("two concurrent readers of the bus");
        let r = match timeout {
            Some(t) => rx.recv_timeout(t),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        drop(rx);
        self.inside.lock().unwrap().0 -= 1;
        match r {
            Ok(Ok(m)) if m == b"PANIC" => panic!("fake bus asked to panic"),
            Ok(Ok(m)) => {
                buf[..m.len()].copy_from_slice(&m);
                Ok(Some(m.len()))
            }
            Ok(Err(e)) => Err(e),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(BusError::Disconnected),
        }
    }

    fn share_area(&self, _size: usize) -> Result<LocalArea, BusError> {
        Err(BusError::Protocol {
            reason: "no areas on the fake bus".into(),
        })
    }

    fn unshare_area(&self, _id: AreaId) -> Result<(), BusError> {
        Ok(())
    }

    fn doorbell(
        &self,
        _dev_num: u16,
        _queue: u16,
        _direction: DoorbellDirection,
    ) -> Result<Option<Arc<dyn Doorbell>>, BusError> {
        Ok(None)
    }
}

fn encode(msg: Message<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; 264];
    let n = msg.encode(&mut buf).unwrap();
    buf.truncate(n);
    buf
}

/// An EVENT_USED for `dev_num` carrying `seq` in its queue index.
fn event(dev_num: u16, seq: u32) -> Vec<u8> {
    encode(Message {
        dev_num,
        token: 0,
        body: Body::EventUsed { vq_index: seq },
    })
}

/// Receives one message on `view` and returns (dev_num, seq).
fn recv_event(view: &dyn DriverBus, timeout: Duration) -> Option<(u16, u32)> {
    let mut buf = [0u8; 264];
    let n = view.recv(&mut buf, Some(timeout)).unwrap()?;
    let m = decode(&buf[..n]).unwrap();
    match m.body {
        Body::EventUsed { vq_index } => Some((m.dev_num, vq_index)),
        other => panic!("unexpected {other:?}"),
    }
}

const LONG: Duration = Duration::from_secs(3);

#[test]
fn interleaved_messages_reach_their_view_in_order() {
    let (bus, tx) = FakeBus::new(None);
    let mux = BusMux::new(bus.clone());
    let v1 = mux.device(1);
    let v2 = mux.device(2);
    for seq in 0..3 {
        tx.send(Ok(event(1, seq))).unwrap();
        tx.send(Ok(event(2, seq))).unwrap();
    }
    for seq in 0..3 {
        assert_eq!(recv_event(v1.as_ref(), LONG), Some((1, seq)));
    }
    for seq in 0..3 {
        assert_eq!(recv_event(v2.as_ref(), LONG), Some((2, seq)));
    }
    assert_eq!(recv_event(v1.as_ref(), Duration::ZERO), None);
    assert_eq!(recv_event(v2.as_ref(), Duration::ZERO), None);
    let s = mux.stats();
    assert_eq!(s.routed.load(Ordering::Relaxed), 6);
    // Reading for view 1 filed 2:0 and 2:1 for view 2; view 2 read 2:2 itself.
    assert_eq!(s.queued_for_other.load(Ordering::Relaxed), 2);
    assert_eq!(s.dropped_unknown_device.load(Ordering::Relaxed), 0);
}

#[test]
fn timeout_is_honoured_while_other_traffic_flows() {
    let (bus, tx) = FakeBus::new(None);
    let mux = BusMux::new(bus.clone());
    let v1 = mux.device(1);
    let v2 = mux.device(2);
    let feeder = thread::spawn(move || {
        for seq in 0..100 {
            tx.send(Ok(event(2, seq))).unwrap();
            thread::sleep(Duration::from_millis(3));
        }
        tx
    });
    let receiver = thread::spawn(move || {
        for seq in 0..100 {
            assert_eq!(recv_event(v2.as_ref(), LONG), Some((2, seq)));
        }
    });
    let start = Instant::now();
    assert_eq!(recv_event(v1.as_ref(), Duration::from_millis(150)), None);
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(waited < Duration::from_millis(400), "{waited:?}");
    // A zero timeout polls and returns at once.
    let start = Instant::now();
    assert_eq!(recv_event(v1.as_ref(), Duration::ZERO), None);
    assert!(start.elapsed() < Duration::from_millis(100));
    receiver.join().unwrap();
    drop(feeder.join().unwrap());
}

#[test]
fn no_timeout_waits_for_the_message() {
    let (bus, tx) = FakeBus::new(None);
    let mux = BusMux::new(bus.clone());
    let v1 = mux.device(1);
    let waiter = thread::spawn(move || {
        let mut buf = [0u8; 264];
        v1.recv(&mut buf, None)
            .map(|n| n.map(|n| buf[..n].to_vec()))
    });
    // Longer than a read slice: the reader must keep going.
    thread::sleep(Duration::from_millis(150));
    assert!(!waiter.is_finished());
    tx.send(Ok(event(1, 3))).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), Some(event(1, 3)));
}

#[test]
fn a_follower_returns_promptly_while_another_thread_reads() {
    let (bus, tx) = FakeBus::new(None);
    // A long slice: the first thread stays the reader throughout.
    let mux = BusMux::with_options(
        bus.clone(),
        MuxOptions {
            read_slice: Duration::from_secs(10),
            ..MuxOptions::default()
        },
    );
    let v1 = mux.device(1);
    let v2 = mux.device(2);
    let reader = thread::spawn(move || recv_event(v1.as_ref(), Duration::from_secs(5)));
    thread::sleep(Duration::from_millis(50));
    let follower = thread::spawn(move || {
        let start = Instant::now();
        let got = recv_event(v2.as_ref(), Duration::from_secs(5));
        (got, start.elapsed())
    });
    thread::sleep(Duration::from_millis(50));
    let sent = Instant::now();
    tx.send(Ok(event(2, 7))).unwrap();
    let (got, _) = follower.join().unwrap();
    assert_eq!(got, Some((2, 7)));
    assert!(
        sent.elapsed() < Duration::from_millis(500),
        "{:?}",
        sent.elapsed()
    );
    assert!(!reader.is_finished());
    tx.send(Ok(event(1, 8))).unwrap();
    assert_eq!(reader.join().unwrap(), Some((1, 8)));
    assert_eq!(mux.stats().queued_for_other.load(Ordering::Relaxed), 1);
}

#[test]
fn concurrent_receivers_each_get_theirs() {
    const VIEWS: u16 = 4;
    const PER_VIEW: u32 = 200;
    for round in 0..25 {
        let (bus, tx) = FakeBus::new(None);
        let mux = BusMux::new(bus.clone());
        let start = Arc::new(Barrier::new(usize::from(VIEWS) + 1));
        let receivers: Vec<_> = (1..=VIEWS)
            .map(|dev| {
                let view = mux.device(dev);
                let start = start.clone();
                thread::spawn(move || {
                    start.wait();
                    for seq in 0..PER_VIEW {
                        // A lost wake-up shows as a timeout here.
                        assert_eq!(
                            recv_event(view.as_ref(), LONG),
                            Some((dev, seq)),
                            "round {round}"
                        );
                    }
                })
            })
            .collect();
        start.wait();
        let began = Instant::now();
        // Interleaved in a scrambled but per-device ordered way.
        let mut next = [0u32; VIEWS as usize];
        let mut rng = 0x9e37_79b9_u32.wrapping_add(round);
        while next.iter().any(|&n| n < PER_VIEW) {
            rng = rng.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let k = (rng >> 16) as usize % usize::from(VIEWS);
            if next[k] < PER_VIEW {
                tx.send(Ok(event(k as u16 + 1, next[k]))).unwrap();
                next[k] += 1;
            }
            if k == 0 {
                thread::yield_now();
            }
        }
        for r in receivers {
            r.join().unwrap();
        }
        // A lost wake-up that a timeout later repairs still shows here (a
        // round takes milliseconds).
        assert!(began.elapsed() < Duration::from_secs(2), "round {round}");
        let s = mux.stats();
        assert_eq!(
            s.routed.load(Ordering::Relaxed),
            u64::from(VIEWS) * u64::from(PER_VIEW)
        );
        assert_eq!(s.dropped_queue_full.load(Ordering::Relaxed), 0);
        assert_eq!(bus.max_concurrent_recv(), 1);
    }
}

#[test]
fn request_response_round_trips_from_many_threads() {
    // The fake device answers every message with an EVENT_USED for the same
    // device: each thread waits for exactly the answer to its own message.
    let responder: Responder = Box::new(|sent| {
        let m = decode(sent).unwrap();
        let Body::EventAvail { vq_index, .. } = m.body else {
            panic!("unexpected {:?}", m.body)
        };
        vec![event(m.dev_num, vq_index)]
    });
    let (bus, _tx) = FakeBus::new(Some(responder));
    let mux = BusMux::new(bus.clone());
    let start = Arc::new(Barrier::new(5));
    let threads: Vec<_> = (1..=5u16)
        .map(|dev| {
            let view = mux.device(dev);
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                for seq in 0..2000u32 {
                    view.send(&encode(Message {
                        dev_num: dev,
                        token: 0,
                        body: Body::EventAvail {
                            vq_index: seq,
                            next_offset: 0,
                        },
                    }))
                    .unwrap();
                    assert_eq!(recv_event(view.as_ref(), LONG), Some((dev, seq)));
                }
            })
        })
        .collect();
    let began = Instant::now();
    for t in threads {
        t.join().unwrap();
    }
    // Tens of milliseconds normally; lost wake-ups cost seconds.
    assert!(
        began.elapsed() < Duration::from_secs(2),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(mux.stats().routed.load(Ordering::Relaxed), 10_000);
    assert_eq!(bus.max_concurrent_recv(), 1);
}

#[test]
fn a_flood_for_one_view_is_bounded_and_spares_the_other() {
    let (bus, tx) = FakeBus::new(None);
    let mux = BusMux::new(bus.clone());
    let v1 = mux.device(1);
    let v2 = mux.device(2);
    for seq in 0..300 {
        tx.send(Ok(event(2, seq))).unwrap();
    }
    tx.send(Ok(event(1, 42))).unwrap();
    assert_eq!(recv_event(v1.as_ref(), LONG), Some((1, 42)));
    let s = mux.stats();
    assert_eq!(s.dropped_queue_full.load(Ordering::Relaxed), 300 - 256);
    assert_eq!(s.queued_for_other.load(Ordering::Relaxed), 256);
    // The oldest 256 were kept, in order.
    for seq in 0..256 {
        assert_eq!(recv_event(v2.as_ref(), LONG), Some((2, seq)));
    }
    assert_eq!(recv_event(v2.as_ref(), Duration::ZERO), None);
    // Room again once drained.
    tx.send(Ok(event(2, 1000))).unwrap();
    tx.send(Ok(event(1, 43))).unwrap();
    assert_eq!(recv_event(v1.as_ref(), LONG), Some((1, 43)));
    assert_eq!(recv_event(v2.as_ref(), LONG), Some((2, 1000)));
    assert_eq!(s.dropped_queue_full.load(Ordering::Relaxed), 300 - 256);
}

#[test]
fn unknown_devices_and_garbage_are_counted() {
    let (bus, tx) = FakeBus::new(None);
    let mux = BusMux::new(bus.clone());
    let v1 = mux.device(1);
    {
        let dropped = mux.device(3);
        drop(dropped);
    }
    // No view: device 7, device 3 (its only view is gone), bus messages (no view 0).
    tx.send(Ok(event(7, 0))).unwrap();
    tx.send(Ok(event(3, 0))).unwrap();
    tx.send(Ok(encode(Message {
        dev_num: 0,
        token: 0,
        body: Body::Ping { data: 1 },
    })))
    .unwrap();
    // Garbage: short, an unknown id, size beyond what arrived, a bus
    // message that names a device.
    tx.send(Ok(vec![0xff; 3])).unwrap();
    let mut unknown = event(1, 0);
    unknown[1] = 0x3F;
    tx.send(Ok(unknown)).unwrap();
    let mut long = event(1, 0);
    long[6] = 200;
    tx.send(Ok(long)).unwrap();
    let mut bus_dev = encode(Message {
        dev_num: 0,
        token: 0,
        body: Body::Ping { data: 1 },
    });
    bus_dev[2] = 1;
    tx.send(Ok(bus_dev)).unwrap();
    tx.send(Ok(event(1, 5))).unwrap();
    assert_eq!(recv_event(v1.as_ref(), LONG), Some((1, 5)));
    let s = mux.stats();
    assert_eq!(s.dropped_unknown_device.load(Ordering::Relaxed), 3);
    assert_eq!(s.dropped_undecodable.load(Ordering::Relaxed), 4);
    assert_eq!(s.routed.load(Ordering::Relaxed), 1);
}

#[test]
fn a_bus_error_reaches_every_view_and_sticks() {
    let (bus, tx) = FakeBus::new(None);
    let mux = BusMux::new(bus.clone());
    let v1 = mux.device(1);
    let v2 = mux.device(2);
    let v3 = mux.device(3);
    let waiting: Vec<_> = [v1.clone(), v2.clone()]
        .into_iter()
        .map(|v| {
            thread::spawn(move || {
                let mut buf = [0u8; 264];
                v.recv(&mut buf, Some(LONG))
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(50));
    tx.send(Ok(event(3, 9))).unwrap();
    tx.send(Err(BusError::Protocol {
        reason: "peer went mad".into(),
    }))
    .unwrap();
    let failed = Instant::now();
    for w in waiting {
        match w.join().unwrap() {
            Err(BusError::Protocol { reason }) => assert_eq!(reason, "peer went mad"),
            other => panic!("unexpected {other:?}"),
        }
    }
    // Woken by the failure, long before their timeout.
    assert!(failed.elapsed() < Duration::from_secs(1));
    // What arrived before the failure is still delivered, then the failure.
    assert_eq!(recv_event(v3.as_ref(), LONG), Some((3, 9)));
    let mut buf = [0u8; 264];
    for v in [&v1, &v2, &v3] {
        assert!(matches!(
            v.recv(&mut buf, Some(Duration::ZERO)),
            Err(BusError::Protocol { .. })
        ));
    }
    // Sticky even when the bus would deliver again.
    tx.send(Ok(event(1, 1))).unwrap();
    assert!(matches!(
        v1.recv(&mut buf, Some(LONG)),
        Err(BusError::Protocol { .. })
    ));
}

/// Answers GET_DEVICES (devices 1..=5) and GET_DEVICE_INFO (1 = net, 2 = block).
fn fake_backend() -> Responder {
    Box::new(|sent| {
        let m = decode(sent).unwrap();
        let mut out = Vec::new();
        match m.body {
            Body::GetDevices { offset, count } => {
                // An event for device 1 overtakes the answer, as a busy backend may.
                out.push(event(1, 77));
                let bitmap = [0b0011_1110u8, 0];
                out.push(encode(Message {
                    dev_num: 0,
                    token: m.token,
                    body: Body::Devices {
                        offset,
                        count: 16.min(count),
                        next_offset: 0,
                        bitmap: &bitmap[..usize::from(16.min(count) / 8)],
                    },
                }));
            }
            Body::GetDeviceInfo => {
                let device_id = match m.dev_num {
                    1 => 1,
                    _ => 2,
                };
                out.push(encode(Message {
                    dev_num: m.dev_num,
                    token: m.token,
                    body: Body::DeviceInfo(DeviceInfo {
                        device_id,
                        vendor_id: 0,
                        num_feature_bits: 64,
                        config_size: 8,
                        max_virtqueues: 2,
                        admin_vq_start: 0,
                        admin_vq_count: 0,
                    }),
                }));
            }
            other => panic!("unexpected {other:?}"),
        }
        out
    })
}

#[test]
fn discover_works_through_the_bus_view() {
    let (bus, _tx) = FakeBus::new(Some(fake_backend()));
    let mux = BusMux::new(bus.clone());
    let v0 = mux.device(0);
    let v1 = mux.device(1);
    assert_eq!(discover(v0.as_ref()).unwrap(), vec![1, 2, 3, 4, 5]);
    // The event that overtook the answer waited for device 1's view.
    assert_eq!(recv_event(v1.as_ref(), Duration::ZERO), Some((1, 77)));
    assert_eq!(mux.stats().queued_for_other.load(Ordering::Relaxed), 1);
}

#[test]
fn two_transports_share_one_bus() {
    let (bus, _tx) = FakeBus::new(Some(fake_backend()));
    let mux = BusMux::new(bus.clone());
    let views = [mux.device(1), mux.device(2)];
    let threads: Vec<_> = views
        .into_iter()
        .enumerate()
        .map(|(i, view)| {
            thread::spawn(move || {
                let dev = i as u16 + 1;
                let t = MsgTransport::new(view, dev).unwrap();
                (t.device_type(), t.info().device_id)
            })
        })
        .collect();
    let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(got, vec![(DeviceType::Network, 1), (DeviceType::Block, 2)]);
}

#[test]
fn a_panicking_bus_does_not_strand_the_other_views() {
    let (bus, tx) = FakeBus::new(None);
    let mux = BusMux::new(bus.clone());
    let v1 = mux.device(1);
    let v2 = mux.device(2);
    let reader = thread::spawn(move || recv_event(v1.as_ref(), LONG));
    thread::sleep(Duration::from_millis(20));
    let follower = thread::spawn(move || {
        let mut buf = [0u8; 264];
        v2.recv(&mut buf, Some(LONG))
    });
    thread::sleep(Duration::from_millis(20));
    let sent = Instant::now();
    tx.send(Ok(b"PANIC".to_vec())).unwrap();
    assert!(reader.join().is_err());
    assert!(matches!(
        follower.join().unwrap(),
        Err(BusError::Protocol { .. })
    ));
    assert!(sent.elapsed() < Duration::from_secs(1));
}
