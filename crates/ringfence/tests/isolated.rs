//! Integration tests: backend and frontend as separate processes.
// The hostile-driver test writes raw rings into the window by hand. Every
// pointer it touches comes from `BouncePool::alloc` on the 1 MiB window the
// test holds mapped for its whole duration, at offsets below the allocation.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use common::*;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringfence_bus::area_addr;
use virtio_drivers::transport::{DeviceStatus, Transport};

#[test]
fn written_pattern_reads_back_and_lands_on_disk() {
    for (tag, extra) in [
        ("db", &[][..]),
        ("inband48", &["--no-doorbells", "--max-msg-size", "48"][..]),
    ] {
        let env = Env::new(tag);
        let image = env.image(8);
        let be = backend(&env.socket(), &image, extra);
        let out = run_frontend(
            &env.socket(),
            &[
                &[
                    "--mib-per-size",
                    "2",
                    "--sizes-kib",
                    "4,64",
                    "--queue-depth",
                    "8",
                    "--seed",
                    "77",
                    "--json",
                ][..],
                extra,
            ]
            .concat(),
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{tag}: frontend failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("\"ok\":true") && stdout.contains("\"mismatches\":0"),
            "{stdout}"
        );
        let stats = finish(be);
        assert!(stats.contains("malformed=0"), "{stats}");
        // The image on disk holds exactly the pattern the frontend wrote.
        let disk = std::fs::read(&image).unwrap();
        let mut expect = vec![0u8; 4 << 20];
        pattern(77, 0, &mut expect);
        assert!(
            disk[..4 << 20] == expect[..],
            "{tag}: image differs from the written pattern"
        );
        assert!(
            disk[4 << 20..].iter().all(|&b| b == 0),
            "{tag}: bytes beyond the workload changed"
        );
    }
}

#[test]
fn backend_holds_only_the_window() {
    let env = Env::new("iso");
    let image = env.image(8);
    let be = backend(&env.socket(), &image, &[]);
    let be_pid = be.id();
    let marker = "RINGFENCE-PRIVATE-SECRET-7f3a";
    let mut fe = Command::new(BIN)
        .args(["frontend", "--socket-path"])
        .arg(env.socket())
        .args([
            "--mib-per-size",
            "1",
            "--sizes-kib",
            "4",
            "--private-marker",
            marker,
            "--pause-ms",
            "1500",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the frontend has attached (it prints its pid, then pauses).
    let mut buf = [0u8; 64];
    let n = fe.stdout.as_mut().unwrap().read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("attached"));

    let maps = std::fs::read_to_string(format!("/proc/{be_pid}/maps")).unwrap();
    let shared: Vec<&str> = maps.lines().filter(|l| l.contains("memfd:")).collect();
    assert!(!shared.is_empty(), "backend maps no window at all:\n{maps}");
    for l in &shared {
        assert!(
            l.contains("memfd:ringfence-area-1"),
            "unexpected shared mapping: {l}"
        );
    }
    let window_bytes: u64 = shared
        .iter()
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap()
        })
        .sum();
    assert_eq!(
        window_bytes,
        8 << 20,
        "backend maps more than the 8 MiB window"
    );
    for fd in std::fs::read_dir(format!("/proc/{be_pid}/fd")).unwrap() {
        let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        let t = target.to_string_lossy();
        assert!(
            !t.starts_with("/memfd:") || t.starts_with("/memfd:ringfence-area-1"),
            "backend holds {t}"
        );
    }
    // The frontend's private marker appears nowhere in the backend's memory.
    let mem = std::fs::File::open(format!("/proc/{be_pid}/mem")).unwrap();
    let needle = marker.as_bytes();
    let (mut scanned, mut unreadable) = (0u64, Vec::new());
    for l in maps.lines() {
        let mut parts = l.split_whitespace();
        let (range, perms) = (parts.next().unwrap(), parts.next().unwrap());
        // vvar pages (the vDSO data) cannot be read through /proc/pid/mem.
        if !perms.starts_with('r') || l.contains("[vvar") || l.contains("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut region = vec![0u8; (b - a) as usize];
        // A readable mapping that cannot be read is a hole in the scan: fail.
        if std::os::unix::fs::FileExt::read_exact_at(&mem, &mut region, a).is_err() {
            unreadable.push(l.to_string());
            continue;
        }
        scanned += b - a;
        assert!(
            !region.windows(needle.len()).any(|w| w == needle),
            "private marker found in backend at {range}"
        );
    }
    assert!(unreadable.is_empty(), "not scanned: {unreadable:#?}");
    // The window alone is 8 MiB: a scan that read less than that saw nothing.
    assert!(scanned > 8 << 20, "only {scanned} bytes scanned");
    assert!(fe.wait().unwrap().success());
    finish(be);
}

#[test]
fn malformed_messages_are_dropped_and_counted() {
    let env = Env::new("malformed");
    let image = env.image(1);
    let be = backend(&env.socket(), &image, &[]);
    let bus = raw_bus(&env.socket());
    assert!(ping(bus.as_ref(), 1));
    let bad: [&[u8]; 5] = [
        &[0x00, 0x07, 1, 0, 0, 0, 12, 0], // msg_size larger than what arrived
        &[0x00, 0x05, 1, 0, 0, 0, 8, 0],  // GET_CONFIG without its payload
        &[0x00, 0x3F, 1, 0, 0, 0, 8, 0],  // unknown id
        &[0x00, 0x0A, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0], // SET_VQUEUE truncated
        &[0x00, 0x02],                    // shorter than a header
    ];
    for m in bad {
        bus.send(m).unwrap();
        assert!(
            ping(bus.as_ref(), 2),
            "backend stopped answering after {m:?}"
        );
    }
    // A request for a device that does not exist, and a response sent to the device side.
    bus.send(&[0x00, 0x07, 9, 0, 0, 0, 8, 0]).unwrap();
    bus.send(&[0x01, 0x07, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0])
        .unwrap();
    assert!(ping(bus.as_ref(), 3));
    drop(bus);
    let stats = finish(be);
    assert!(stats.contains("malformed=5"), "{stats}");
    assert!(stats.contains("unknown_device=1"), "{stats}");
    assert!(stats.contains("unexpected=1"), "{stats}");
}

#[test]
fn multiqueue_requests_are_served_by_one_worker_per_queue() {
    let env = Env::new("mq");
    let image = env.image(1);
    std::fs::write(
        &image,
        (0..2048u32)
            .flat_map(|s| [s as u8; 512])
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let be = Command::new(BIN)
        .args(["backend", "--once", "--socket-path"])
        .arg(env.socket())
        .args(["blk", "--num-queues", "2", "--image"])
        .arg(&image)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !env.socket().exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    // VIRTIO_BLK_F_MQ (bit 12) accepted: both queues are live.
    let (mut t, pool, mut queues, bus) = raw_device(&env.socket(), 2, 1 << 12);
    // A new thread names itself once it runs: give both a moment.
    let names = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", be.id()))
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.unwrap().path().join("comm")).ok())
            .map(|c| c.trim().to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let threads = names();
        if threads.iter().any(|c| c == "vq0") && threads.iter().any(|c| c == "vq1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no worker per queue: {threads:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for (i, q) in queues.iter_mut().enumerate() {
        let (hdr, hdr_ptr) = pool.alloc(16, 16).unwrap();
        let (data, data_ptr) = pool.alloc(512, 512).unwrap();
        let (status, status_ptr) = pool.alloc(1, 1).unwrap();
        let sector = 100 + i as u64;
        unsafe {
            std::ptr::write_bytes(hdr_ptr, 0, 16);
            std::ptr::copy_nonoverlapping(sector.to_le_bytes().as_ptr(), hdr_ptr.add(8), 8);
            std::ptr::write_volatile(status_ptr, 0xFF);
        }
        let used = q.submit(
            &mut t,
            &[(hdr, 16, false), (data, 512, true), (status, 1, true)],
        );
        assert_eq!(
            (unsafe { std::ptr::read_volatile(status_ptr) }, used),
            (0, 513),
            "queue {i}"
        );
        assert!(
            (0..512).all(|j| unsafe { std::ptr::read_volatile(data_ptr.add(j)) } == sector as u8)
        );
    }
    drop((t, bus, pool));
    finish(be);
}

#[test]
fn descriptor_outside_the_window_gets_ioerr_and_backend_keeps_serving() {
    let env = Env::new("hostile");
    let image = env.image(1);
    std::fs::write(&image, vec![0x5Au8; 1 << 20]).unwrap();
    let be = backend(&env.socket(), &image, &[]);
    let (mut t, pool, mut queues, bus) = raw_device(&env.socket(), 1, 0);
    let q = &mut queues[0];
    let (hdr, hdr_ptr) = pool.alloc(16, 16).unwrap();
    let (data, data_ptr) = pool.alloc(512, 512).unwrap();
    let (status, status_ptr) = pool.alloc(1, 1).unwrap();
    unsafe { std::ptr::write_bytes(hdr_ptr, 0, 16) }; // IN, sector 0
    let status_of = || unsafe { std::ptr::read_volatile(status_ptr) };

    // Data buffer in an area that was never shared, and one far past the window's end.
    for outside in [
        area_addr(7, 0x1000).unwrap(),
        area_addr(pool.area_id(), 64 << 20).unwrap(),
        0x1000,
    ] {
        unsafe { std::ptr::write_volatile(status_ptr, 0xFF) };
        let used = q.submit(
            &mut t,
            &[(hdr, 16, false), (outside, 512, true), (status, 1, true)],
        );
        assert_eq!(
            status_of(),
            1,
            "expected VIRTIO_BLK_S_IOERR for {outside:#x}"
        );
        assert_eq!(used, 1);
    }
    // Out-of-range sector: IOERR; unknown type: UNSUPP.
    unsafe { std::ptr::copy_nonoverlapping(4096u64.to_le_bytes().as_ptr(), hdr_ptr.add(8), 8) };
    q.submit(
        &mut t,
        &[(hdr, 16, false), (data, 512, true), (status, 1, true)],
    );
    assert_eq!(status_of(), 1);
    unsafe { std::ptr::write_bytes(hdr_ptr, 0, 16) };
    unsafe { std::ptr::write_volatile(hdr_ptr, 99) };
    q.submit(
        &mut t,
        &[(hdr, 16, false), (data, 512, true), (status, 1, true)],
    );
    assert_eq!(status_of(), 2);

    // The backend keeps serving: a valid read returns the image's bytes.
    unsafe { std::ptr::write_bytes(hdr_ptr, 0, 16) };
    let used = q.submit(
        &mut t,
        &[(hdr, 16, false), (data, 512, true), (status, 1, true)],
    );
    assert_eq!((status_of(), used), (0, 513));
    assert!((0..512).all(|i| unsafe { std::ptr::read_volatile(data_ptr.add(i)) } == 0x5A));

    // Rings placed outside the shared areas: DEVICE_NEEDS_RESET.
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features(1 << 32);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    t.queue_set(0, QSIZE, area_addr(9, 0).unwrap(), q.avail, q.used);
    assert!(t.get_status().contains(DeviceStatus::DEVICE_NEEDS_RESET));
    // Features never offered are refused at FEATURES_OK.
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features((1 << 32) | (1 << 50));
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    assert!(!t.get_status().contains(DeviceStatus::FEATURES_OK));
    assert!(ping(bus.as_ref(), 5));
    drop(t);
    drop(bus);
    drop((queues, pool));
    finish(be);
}
