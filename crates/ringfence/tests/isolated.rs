//! Integration tests: backend and frontend as separate processes.
// The hostile-driver test writes raw rings into the window by hand. Every
// pointer it touches comes from `BouncePool::alloc` on the 1 MiB window the
// test holds mapped for its whole duration, at offsets below the allocation.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_bus::{area_addr, DriverBus};
use ringfence_bus_local::{LocalBusConfig, LocalDriverBus};
use ringfence_msg_driver::{discover, BouncePool, MsgTransport};
use ringfence_virtio_msg::{decode, Body, Message};
use virtio_drivers::transport::{DeviceStatus, Transport};

const BIN: &str = env!("CARGO_BIN_EXE_ringfence");

struct Env {
    dir: PathBuf,
}

impl Env {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ringfence-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Env { dir }
    }
    fn image(&self, mib: u64) -> PathBuf {
        let p = self.dir.join("disk.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        p
    }
    fn socket(&self) -> PathBuf {
        self.dir.join("blk.sock")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn backend(socket: &Path, image: &Path, extra: &[&str]) -> Child {
    let child = Command::new(BIN)
        .args(["backend", "--once", "--socket-path"])
        .arg(socket)
        .args(extra)
        .args(["blk", "--image"])
        .arg(image)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "backend did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn finish(mut child: Child) -> String {
    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "backend failed: {out}");
    out
}

/// The frontend's pattern (same formula as `frontend::fill_pattern`).
fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let mut x = seed ^ (offset / 8 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn run_frontend(socket: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["frontend", "--socket-path"])
        .arg(socket)
        .args(extra)
        .output()
        .unwrap()
}

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
    for l in maps.lines() {
        let mut parts = l.split_whitespace();
        let (range, perms) = (parts.next().unwrap(), parts.next().unwrap());
        if !perms.starts_with('r') || l.contains("[vvar]") || l.contains("[vsyscall]") {
            continue;
        }
        let (a, b) = range.split_once('-').unwrap();
        let (a, b) = (
            u64::from_str_radix(a, 16).unwrap(),
            u64::from_str_radix(b, 16).unwrap(),
        );
        let mut region = vec![0u8; (b - a) as usize];
        if std::os::unix::fs::FileExt::read_exact_at(&mem, &mut region, a).is_ok() {
            assert!(
                !region.windows(needle.len()).any(|w| w == needle),
                "private marker found in backend at {range}"
            );
        }
    }
    assert!(fe.wait().unwrap().success());
    finish(be);
}

fn raw_bus(socket: &Path) -> Arc<dyn DriverBus> {
    Arc::new(LocalDriverBus::connect(socket, LocalBusConfig::default()).unwrap())
}

fn ping(bus: &dyn DriverBus, data: u32) -> bool {
    let mut buf = [0u8; 264];
    let n = Message {
        dev_num: 0,
        token: 9,
        body: Body::Ping { data },
    }
    .encode(&mut buf)
    .unwrap();
    bus.send(&buf[..n]).unwrap();
    let n = bus
        .recv(&mut buf, Some(Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    decode(&buf[..n]).unwrap().body == Body::Pong { data }
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
        &[0x04, 0x07, 1, 0, 0, 0, 8, 0],  // reserved type bit
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

/// A hand-built driver queue: rings in the window, one request at a time.
struct RawQueue {
    index: u16,
    avail: u64,
    used: u64,
    desc_ptr: *mut u8,
    avail_ptr: *mut u8,
    used_ptr: *mut u8,
    next: u16,
}

const QSIZE: u32 = 16;

impl RawQueue {
    /// Submits a chain (addr, len, device-writable) and returns the used length.
    fn submit(&mut self, t: &mut MsgTransport, chain: &[(u64, u32, bool)]) -> u32 {
        for (i, &(addr, len, write)) in chain.iter().enumerate() {
            let flags: u16 = if i + 1 < chain.len() { 1 } else { 0 } | if write { 2 } else { 0 };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&((i + 1) as u16).to_le_bytes());
            unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), self.desc_ptr.add(16 * i), 16) };
        }
        unsafe {
            let slot = (self.next % QSIZE as u16) as usize;
            std::ptr::write_volatile(self.avail_ptr.add(4 + 2 * slot).cast::<u16>(), 0);
            self.next = self.next.wrapping_add(1);
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            std::ptr::write_volatile(self.avail_ptr.add(2).cast::<u16>(), self.next);
        }
        t.notify(self.index);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let idx = unsafe { std::ptr::read_volatile(self.used_ptr.add(2).cast::<u16>()) };
            if idx == self.next {
                let slot = ((self.next - 1) % QSIZE as u16) as usize;
                return unsafe {
                    std::ptr::read_volatile(self.used_ptr.add(4 + 8 * slot + 4).cast::<u32>())
                };
            }
            assert!(Instant::now() < deadline, "device never used the chain");
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Initialises the device by hand with `queues` queues in a 1 MiB window,
/// accepting VERSION_1 plus `features`.
fn raw_device(
    socket: &Path,
    queues: u16,
    features: u64,
) -> (MsgTransport, BouncePool, Vec<RawQueue>, Arc<dyn DriverBus>) {
    let bus = raw_bus(socket);
    let dev = discover(bus.as_ref()).unwrap()[0];
    let window = bus.share_area(1 << 20).unwrap();
    let pool = BouncePool::new(window);
    let mut t = MsgTransport::new(bus.clone(), dev).unwrap();
    t.set_status(DeviceStatus::empty());
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
    t.write_driver_features((1 << 32) | features);
    t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
    let mut raw = Vec::new();
    for index in 0..queues {
        let (desc, desc_ptr) = pool.alloc(4096, 4096).unwrap();
        let (avail, avail_ptr) = (desc + 16 * QSIZE as u64, unsafe {
            desc_ptr.add(16 * QSIZE as usize)
        });
        let (used, used_ptr) = (desc + 2048, unsafe { desc_ptr.add(2048) });
        t.queue_set(index, QSIZE, desc, avail, used);
        raw.push(RawQueue {
            index,
            avail,
            used,
            desc_ptr,
            avail_ptr,
            used_ptr,
            next: 0,
        });
    }
    t.set_status(
        DeviceStatus::ACKNOWLEDGE
            | DeviceStatus::DRIVER
            | DeviceStatus::FEATURES_OK
            | DeviceStatus::DRIVER_OK,
    );
    assert!(t.take_failure().is_none());
    (t, pool, raw, bus)
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
