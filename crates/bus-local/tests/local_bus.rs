//! The local bus refuses what a hostile driver side could send it.

use std::os::fd::AsRawFd;

use ringfence_bus::{DeviceBus, DeviceBusEvent, DriverBus};
use ringfence_bus_local::{wire, LocalBusConfig, LocalDeviceBus, LocalDriverBus, Seqpacket};

fn share_msg(id: u16, size: u64) -> Vec<u8> {
    local(&wire::LocalMsg::AreaShare {
        id,
        size,
        offset: 0,
        copied: None,
    })
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
    // The driver hears of the share only once the device side says it is in use.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!t.is_finished());
    dev.complete_share(area.id).unwrap();
    let (_drv, _area) = t.join().unwrap();
}

fn local(msg: &wire::LocalMsg) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let n = msg.encode_message(&mut buf).unwrap();
    buf[..n].to_vec()
}

/// A device side and a raw socket playing a hostile driver, handshake done.
fn raw_pair(cfg: LocalBusConfig) -> (LocalDeviceBus, Seqpacket) {
    let (a, raw) = Seqpacket::pair().unwrap();
    let dev = LocalDeviceBus::new(a, cfg).unwrap();
    let version = wire::LocalMsg::Version {
        revision: 1,
        max_msg_size: 48,
        features: 0,
    };
    raw.send(&local(&version), &[]).unwrap();
    assert!(matches!(
        dev.recv(&mut [0u8; 64]).unwrap(),
        DeviceBusEvent::Handled
    ));
    let mut reply = [0u8; 64];
    raw.recv(&mut reply).unwrap();
    (dev, raw)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn memfd(size: u64, seals: i32) -> std::fs::File {
    let name = std::ffi::CString::new("test-area").unwrap();
    // SAFETY: plain system calls on a descriptor this function owns.
    let file = unsafe {
        let fd = libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    file.set_len(size).unwrap();
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(r, 0);
    file
}

const SEALED: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

#[test]
fn nothing_is_accepted_before_the_version_handshake() {
    let (a, raw) = Seqpacket::pair().unwrap();
    let dev = LocalDeviceBus::new(a, LocalBusConfig::default()).unwrap();
    raw.send(&[0, 7, 1, 0, 0, 0, 8, 0], &[]).unwrap();
    match dev.recv(&mut [0u8; 300]).unwrap() {
        DeviceBusEvent::Dropped { reason } => {
            assert!(reason.contains("before the VERSION"), "{reason}")
        }
        _ => panic!("a transport request before VERSION was accepted"),
    }
    raw.send(&share_msg(1, 4096), &[memfd(4096, SEALED).as_raw_fd()])
        .unwrap();
    assert!(matches!(
        dev.recv(&mut [0u8; 300]).unwrap(),
        DeviceBusEvent::Dropped { .. }
    ));
}

#[test]
fn a_driver_that_never_says_version_is_dropped_after_the_handshake_timeout() {
    let (a, _raw) = Seqpacket::pair().unwrap();
    let dev = LocalDeviceBus::new(
        a,
        LocalBusConfig {
            handshake_timeout: std::time::Duration::from_millis(200),
            ..Default::default()
        },
    )
    .unwrap();
    let t = std::time::Instant::now();
    assert!(matches!(
        dev.recv(&mut [0u8; 300]),
        Err(ringfence_bus::BusError::Timeout(_))
    ));
    assert!(t.elapsed() < std::time::Duration::from_secs(2));
}

#[test]
fn a_driver_that_never_reads_cannot_block_the_device_side() {
    let (dev, _raw) = raw_pair(LocalBusConfig {
        send_timeout: std::time::Duration::from_millis(200),
        ..Default::default()
    });
    let t = std::time::Instant::now();
    let err = loop {
        if let Err(e) = dev.send(&[0u8; 48]) {
            break e;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(10),
            "send never gave up"
        );
    };
    assert!(matches!(err, ringfence_bus::BusError::Timeout(_)), "{err}");
}

#[test]
fn raw_hostile_sends_are_refused() {
    let (dev, raw) = raw_pair(LocalBusConfig {
        max_msg_size: 48,
        max_area_size: 1 << 20,
        ..Default::default()
    });
    let mut buf = vec![0u8; 48];
    let mut reply = [0u8; 64];
    let expect_drop = |what: &str, needle: &str| match dev.recv(&mut [0u8; 48]).unwrap() {
        DeviceBusEvent::Dropped { reason } => {
            assert!(reason.contains(needle), "{what}: {reason}")
        }
        _ => panic!("{what} was not dropped"),
    };
    // Oversized.
    raw.send(&[0u8; 300], &[]).unwrap();
    expect_drop("oversized", "larger");
    // AREA_SHARE with no descriptor; every refused share is answered.
    raw.send(&share_msg(1, 4096), &[]).unwrap();
    expect_drop("share without fd", "without a descriptor");
    raw.recv(&mut reply).unwrap();
    assert_eq!(&reply[8..10], &1u16.to_le_bytes());
    assert_eq!(&reply[12..16], &wire::STATUS_REJECTED.to_le_bytes());
    // Each bad area is otherwise valid, so only the named check can refuse it.
    let regular = std::fs::File::open("/proc/self/exe").unwrap();
    let cases: [(&str, u16, u64, std::fs::File, &str); 7] = [
        ("regular file", 2, 4096, regular, "not a sealable memfd"),
        (
            "unsealed memfd",
            3,
            4096,
            memfd(4096, 0),
            "not sealed against shrinking",
        ),
        (
            "memfd smaller than claimed",
            4,
            8192,
            memfd(4096, SEALED),
            "holds 4096 bytes",
        ),
        ("area 0", 0, 4096, memfd(4096, SEALED), "reserved"),
        (
            "unaligned size",
            5,
            1000,
            memfd(4096, SEALED),
            "page multiple",
        ),
        (
            "larger than allowed",
            6,
            2 << 20,
            memfd(2 << 20, SEALED),
            "page multiple",
        ),
        (
            "grow-only seal",
            7,
            4096,
            memfd(4096, libc::F_SEAL_GROW),
            "not sealed against shrinking",
        ),
    ];
    for (what, id, size, file, needle) in cases {
        raw.send(&share_msg(id, size), &[file.as_raw_fd()]).unwrap();
        expect_drop(what, needle);
        raw.recv(&mut reply).unwrap();
        assert_eq!(
            &reply[12..16],
            &wire::STATUS_REJECTED.to_le_bytes(),
            "{what}"
        );
    }
    // A valid share, then the same id again.
    raw.send(&share_msg(8, 4096), &[memfd(4096, SEALED).as_raw_fd()])
        .unwrap();
    assert!(matches!(
        dev.recv(&mut buf).unwrap(),
        DeviceBusEvent::AreaShared(_)
    ));
    dev.complete_share(8).unwrap();
    raw.recv(&mut reply).unwrap();
    assert_eq!(&reply[12..16], &wire::STATUS_OK.to_le_bytes());
    raw.send(&share_msg(8, 4096), &[memfd(4096, SEALED).as_raw_fd()])
        .unwrap();
    expect_drop("duplicate id", "already shared");
    raw.recv(&mut reply).unwrap();
    // Two descriptors on one message: dropped, and neither stays open here.
    let (x, y) = (memfd(4096, SEALED), memfd(4096, SEALED));
    let before = open_fds();
    for _ in 0..50 {
        raw.send(&share_msg(9, 4096), &[x.as_raw_fd(), y.as_raw_fd()])
            .unwrap();
        expect_drop("two descriptors", "2 descriptors");
    }
    assert_eq!(open_fds(), before, "received descriptors leaked");
    // A descriptor riding on a transport message.
    raw.send(&[0, 7, 1, 0, 0, 0, 8, 0], &[x.as_raw_fd()])
        .unwrap();
    expect_drop("fd on transport message", "descriptor attached");
    assert_eq!(open_fds(), before, "received descriptor leaked");
    // AREA_UNSHARE of an unknown area is refused with AREA_UNSHARE's own id.
    raw.send(&local(&wire::LocalMsg::AreaUnshare { id: 77 }), &[])
        .unwrap();
    expect_drop("unknown unshare", "unknown area 77");
    raw.recv(&mut reply).unwrap();
    assert_eq!(reply[1], wire::AREA_UNSHARE);
    // A plain transport message passes through untouched.
    raw.send(&[0, 7, 1, 0, 0, 0, 8, 0], &[]).unwrap();
    assert!(matches!(
        dev.recv(&mut buf).unwrap(),
        DeviceBusEvent::Message(8)
    ));
}
