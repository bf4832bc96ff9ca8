//! The local bus refuses what a hostile driver side could send it.

use std::os::fd::AsRawFd;

use ringfence_bus::{DeviceBus, DeviceBusEvent, DriverBus};
use ringfence_bus_local::{wire, LocalBusConfig, LocalDeviceBus, LocalDriverBus, Seqpacket};
use ringfence_virtio_msg::{Body, Message};

fn share_msg(id: u16, size: u64) -> Vec<u8> {
    let mut payload = [0u8; 16];
    payload[..2].copy_from_slice(&id.to_le_bytes());
    payload[8..].copy_from_slice(&size.to_le_bytes());
    let mut buf = [0u8; 64];
    let n = Message {
        dev_num: 0,
        token: 0,
        body: Body::BusSpecific {
            msg_id: wire::AREA_SHARE,
            response: false,
            payload: &payload,
        },
    }
    .encode(&mut buf)
    .unwrap();
    buf[..n].to_vec()
}

fn next_event(dev: &LocalDeviceBus) -> DeviceBusEvent {
    let mut buf = vec![0u8; 65536];
    loop {
        match dev.recv(&mut buf).unwrap() {
            DeviceBusEvent::Handled => continue,
            e => return e,
        }
    }
}

#[test]
fn oversized_messages_and_bad_areas_are_dropped() {
    let (a, b) = Seqpacket::pair().unwrap();
    let cfg = LocalBusConfig {
        max_msg_size: 48,
        ..Default::default()
    };
    let dev = LocalDeviceBus::new(a, cfg).unwrap();
    let drv = std::thread::spawn(move || LocalDriverBus::handshake(b, cfg).unwrap());
    assert!(matches!(
        dev.recv(&mut [0u8; 64]).unwrap(),
        DeviceBusEvent::Handled
    ));
    let drv = drv.join().unwrap();
    assert_eq!(drv.limits().max_msg_size, 48);

    // 49 bytes on a 48-byte bus: the driver side refuses to send it...
    assert!(drv.send(&[0u8; 49]).is_err());

    // ...and a well-behaved share works and is mapped.
    let t = std::thread::spawn(move || {
        let area = drv.share_area(64 * 1024).unwrap();
        (drv, area)
    });
    let DeviceBusEvent::AreaShared(area) = next_event(&dev) else {
        panic!("no area")
    };
    assert_eq!((area.id, area.mapping.size()), (1, 64 * 1024));
    let (_drv, _area) = t.join().unwrap();
}

#[test]
fn raw_hostile_sends_are_refused() {
    let (a, raw) = Seqpacket::pair().unwrap();
    let dev = LocalDeviceBus::new(
        a,
        LocalBusConfig {
            max_msg_size: 48,
            ..Default::default()
        },
    )
    .unwrap();
    let mut buf = vec![0u8; 48];
    let mut expect_drop = |what: &str| match dev.recv(&mut buf).unwrap() {
        DeviceBusEvent::Dropped { reason } => reason,
        _ => panic!("{what} was not dropped"),
    };
    // Oversized.
    raw.send(&[0u8; 300], &[]).unwrap();
    assert!(expect_drop("oversized").contains("larger"));
    // AREA_SHARE with no descriptor.
    raw.send(&share_msg(1, 4096), &[]).unwrap();
    expect_drop("share without fd");
    let mut reply = [0u8; 64];
    raw.recv(&mut reply).unwrap();
    // AREA_SHARE of a regular file (not a sealed memfd).
    let f = std::fs::File::open("/proc/self/exe").unwrap();
    raw.send(&share_msg(2, 4096), &[f.as_raw_fd()]).unwrap();
    assert!(expect_drop("unsealed").contains("memfd"));
    raw.recv(&mut reply).unwrap();
    // Area 0 and unaligned sizes.
    raw.send(&share_msg(0, 4096), &[f.as_raw_fd()]).unwrap();
    expect_drop("area 0");
    raw.recv(&mut reply).unwrap();
    raw.send(&share_msg(3, 1000), &[f.as_raw_fd()]).unwrap();
    expect_drop("unaligned");
    raw.recv(&mut reply).unwrap();
    // A descriptor riding on a transport message.
    raw.send(&[0, 7, 1, 0, 0, 0, 8, 0], &[f.as_raw_fd()])
        .unwrap();
    expect_drop("fd on transport message");
    // A plain transport message passes through untouched.
    raw.send(&[0, 7, 1, 0, 0, 0, 8, 0], &[]).unwrap();
    assert!(matches!(
        dev.recv(&mut buf).unwrap(),
        DeviceBusEvent::Message(8)
    ));
}
