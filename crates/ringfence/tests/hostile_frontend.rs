//! A malicious frontend against the real backend process: fds it controls,
//! rings it breaks at run time, areas it revokes while in use, and peers that
//! stall. Each case checks the exact outcome and that the backend still
//! serves afterwards.
// Raw rings are written by hand into the window, as in `common`.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use ringfence_bus::{
    AreaId, BusError, BusLimits, Doorbell, DoorbellDirection, DriverBus, LocalArea,
};
use ringfence_bus_local::{wire, LocalBusConfig, LocalDriverBus, Seqpacket};
use ringfence_msg_driver::MsgTransport;
use ringfence_virtio_msg::{Body, Message};
use virtio_drivers::transport::{DeviceStatus, Transport};

type Doorbells = Vec<(u16, DoorbellDirection, Arc<dyn Doorbell>)>;

/// A driver bus that keeps the doorbells it creates, so a test can do to
/// their descriptors what a hostile driver would.
struct SpyBus {
    inner: LocalDriverBus,
    doorbells: Mutex<Doorbells>,
}

impl DriverBus for SpyBus {
    fn limits(&self) -> BusLimits {
        self.inner.limits()
    }
    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        self.inner.send(msg)
    }
    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> Result<Option<usize>, BusError> {
        self.inner.recv(buf, timeout)
    }
    fn share_area(&self, size: usize) -> Result<LocalArea, BusError> {
        self.inner.share_area(size)
    }
    fn unshare_area(&self, id: AreaId) -> Result<(), BusError> {
        self.inner.unshare_area(id)
    }
    fn doorbell(
        &self,
        dev_num: u16,
        queue: u16,
        direction: DoorbellDirection,
    ) -> Result<Option<Arc<dyn Doorbell>>, BusError> {
        let db = self.inner.doorbell(dev_num, queue, direction)?;
        if let Some(db) = &db {
            self.doorbells
                .lock()
                .unwrap()
                .push((queue, direction, db.clone()));
        }
        Ok(db)
    }
}

fn spy(socket: &std::path::Path) -> Arc<SpyBus> {
    Arc::new(SpyBus {
        inner: LocalDriverBus::connect(socket, LocalBusConfig::default()).unwrap(),
        doorbells: Mutex::new(Vec::new()),
    })
}

fn doorbell_fd(bus: &SpyBus, dir: DoorbellDirection) -> RawFd {
    bus.doorbells
        .lock()
        .unwrap()
        .iter()
        .find(|(q, d, _)| *q == 0 && *d == dir)
        .and_then(|(_, _, db)| db.pollable_fd())
        .unwrap()
}

/// What a hostile driver can do to a shared eventfd: make it blocking and
/// park its counter.
fn wedge(fd: RawFd, counter: u64) {
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, 0) }, 0);
    let mut drain = [0u8; 8];
    unsafe {
        libc::preadv2(
            fd,
            &libc::iovec {
                iov_base: drain.as_mut_ptr().cast(),
                iov_len: 8,
            },
            1,
            -1,
            libc::RWF_NOWAIT,
        )
    };
    if counter > 0 {
        assert_eq!(
            unsafe { libc::write(fd, counter.to_ne_bytes().as_ptr().cast(), 8) },
            8
        );
    }
}

const HDR_OFF: usize = 0x8000;
const DATA_OFF: usize = 0x9000;
const STATUS_OFF: usize = 0xA000;

/// Reads sector 0 through a raw queue; returns the status byte.
fn read_sector(t: &mut MsgTransport, q: &mut RawQueue, window: u64, ptr: *mut u8) -> u8 {
    let hdr = [0u8; 16]; // IN, sector 0
    unsafe {
        std::ptr::copy_nonoverlapping(hdr.as_ptr(), ptr.add(HDR_OFF), 16);
        std::ptr::write_volatile(ptr.add(STATUS_OFF), 0xFF);
    }
    q.submit(
        t,
        &[
            (window + HDR_OFF as u64, 16, false),
            (window + DATA_OFF as u64, 512, true),
            (window + STATUS_OFF as u64, 1, true),
        ],
    );
    unsafe { std::ptr::read_volatile(ptr.add(STATUS_OFF)) }
}

/// The window's base address and local pointer, from an allocation at its start.
fn window_base(pool: &ringfence_msg_driver::BouncePool) -> (u64, *mut u8) {
    // raw_device allocated the rings first: the window starts 0 bytes below them.
    let (addr, ptr) = pool.alloc(512, 512).unwrap();
    let off = ringfence_bus::split_area_addr(addr).1 as usize;
    (addr - off as u64, unsafe { ptr.sub(off) })
}

#[test]
fn a_wedged_call_and_kick_eventfd_cannot_hang_the_backend() {
    // The driver clears O_NONBLOCK on both doorbells and parks the call
    // counter at its maximum: a write(2) there would block forever, and the
    // status reset would then join that worker forever.
    let env = Env::new("wedge");
    let image = env.image(1);
    let be = backend(&env.socket(), &image, &[]);
    let bus = spy(&env.socket());
    let (mut t, pool, mut queues, _) = raw_device_on(bus.clone(), 1, 0);
    let (window, ptr) = window_base(&pool);
    wedge(doorbell_fd(&bus, DoorbellDirection::ToDriver), u64::MAX - 1);
    wedge(doorbell_fd(&bus, DoorbellDirection::ToDevice), 0);
    for _ in 0..3 {
        assert_eq!(read_sector(&mut t, &mut queues[0], window, ptr), 0);
    }
    let start = Instant::now();
    t.set_status(DeviceStatus::empty());
    assert!(t.take_failure().is_none(), "reset was not answered");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "reset took {:?}",
        start.elapsed()
    );
    assert_eq!(t.get_status(), DeviceStatus::empty());
    assert!(ping(bus.as_ref(), 7));
    drop((t, queues, pool, bus));
    let stats = finish(be);
    assert!(stats.contains("workers_abandoned=0"), "{stats}");
}

#[test]
fn a_ring_broken_at_run_time_raises_needs_reset_and_a_reset_recovers() {
    for (tag, breakage) in [("avail", 0u8), ("chain", 1u8)] {
        let env = Env::new(&format!("broken-{tag}"));
        let image = env.image(1);
        let be = backend(&env.socket(), &image, &[]);
        let (mut t, pool, mut queues, bus) = raw_device(&env.socket(), 1, 0);
        let (window, ptr) = window_base(&pool);
        assert_eq!(read_sector(&mut t, &mut queues[0], window, ptr), 0);
        let q = &mut queues[0];
        match breakage {
            // An avail index far ahead of the ring.
            0 => unsafe {
                std::ptr::write_volatile(
                    q.avail_ptr.add(2).cast::<u16>(),
                    q.next.wrapping_add(1000),
                )
            },
            // A chain whose `next` leaves the table.
            _ => unsafe {
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&(window + HDR_OFF as u64).to_le_bytes());
                d[8..12].copy_from_slice(&16u32.to_le_bytes());
                d[12..14].copy_from_slice(&1u16.to_le_bytes());
                d[14..16].copy_from_slice(&500u16.to_le_bytes());
                std::ptr::copy_nonoverlapping(d.as_ptr(), q.desc_ptr, 16);
                let slot = (q.next % QSIZE as u16) as usize;
                std::ptr::write_volatile(q.avail_ptr.add(4 + 2 * slot).cast::<u16>(), 0);
                q.next = q.next.wrapping_add(1);
                std::ptr::write_volatile(q.avail_ptr.add(2).cast::<u16>(), q.next);
            },
        }
        t.notify(0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !t.get_status().contains(DeviceStatus::DEVICE_NEEDS_RESET) {
            assert!(Instant::now() < deadline, "{tag}: no DEVICE_NEEDS_RESET");
            std::thread::sleep(Duration::from_millis(5));
        }
        let used_before = unsafe { std::ptr::read_volatile(q.used_ptr.add(2).cast::<u16>()) };
        assert_eq!(used_before, 1, "{tag}: nothing more may be used");
        // Reset and set the device up again: it serves as new.
        drop((t, queues, pool));
        let (mut t, pool, mut queues, _) = raw_device_on(bus.clone(), 1, 0);
        let (window, ptr) = window_base(&pool);
        assert_eq!(read_sector(&mut t, &mut queues[0], window, ptr), 0, "{tag}");
        drop((t, queues, pool, bus));
        let stats = finish(be);
        assert!(stats.contains("queue_failures=1"), "{tag}: {stats}");
    }
}

#[test]
fn area_unshare_is_answered_only_once_the_backend_has_unmapped_it() {
    let env = Env::new("unshare");
    let image = env.image(1);
    let be = backend(&env.socket(), &image, &[]);
    let (mut t, pool, mut queues, bus) = raw_device(&env.socket(), 1, 0);
    let (window, ptr) = window_base(&pool);
    let data = bus.share_area(64 * 1024).unwrap();
    let data_addr = ringfence_bus::area_addr(data.id, 0).unwrap();
    let maps = || std::fs::read_to_string(format!("/proc/{}/maps", be.id())).unwrap();
    let name = format!("ringfence-area-{}", data.id);
    assert!(maps().contains(&name));
    // Requests into the data area work while it is shared...
    let submit = |t: &mut MsgTransport, q: &mut RawQueue| {
        unsafe { std::ptr::write_volatile(ptr.add(STATUS_OFF), 0xFF) };
        q.submit(
            t,
            &[
                (window + HDR_OFF as u64, 16, false),
                (data_addr, 4096, true),
                (window + STATUS_OFF as u64, 1, true),
            ],
        );
        unsafe { std::ptr::read_volatile(ptr.add(STATUS_OFF)) }
    };
    unsafe { std::ptr::write_bytes(ptr.add(HDR_OFF), 0, 16) };
    assert_eq!(submit(&mut t, &mut queues[0]), 0);
    // ...and once the revocation is acknowledged the backend holds no
    // mapping of it and every request into it fails.
    bus.unshare_area(data.id).unwrap();
    assert!(
        !maps().contains(&name),
        "area still mapped after the acknowledgement"
    );
    assert_eq!(submit(&mut t, &mut queues[0]), 1, "IOERR expected");
    assert!(ping(bus.as_ref(), 3));
    drop((t, queues, pool, bus));
    let stats = finish(be);
    assert!(stats.contains("areas_revoked=1"), "{stats}");
}

#[test]
fn event_idx_suppresses_notifications_exactly() {
    const EVENT_IDX: u64 = 1 << 29;
    let env = Env::new("eventidx");
    let image = env.image(1);
    let be = backend(&env.socket(), &image, &[]);
    let bus = spy(&env.socket());
    let (mut t, pool, mut queues, _) = raw_device_on(bus.clone(), 1, EVENT_IDX);
    let (window, ptr) = window_base(&pool);
    let call = bus
        .doorbells
        .lock()
        .unwrap()
        .iter()
        .find(|(q, d, _)| *q == 0 && *d == DoorbellDirection::ToDriver)
        .map(|(_, _, db)| db.clone())
        .unwrap();
    let used_event = |q: &RawQueue, v: u16| unsafe {
        std::ptr::write_volatile(q.avail_ptr.add(4 + 2 * QSIZE as usize).cast::<u16>(), v)
    };
    // used_event far ahead: no notification for this request.
    let _ = call.try_clear();
    used_event(&queues[0], 100);
    assert_eq!(read_sector(&mut t, &mut queues[0], window, ptr), 0);
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !call.try_clear().unwrap(),
        "notified although used_event was ahead"
    );
    // used_event equal to the index being used: exactly one notification.
    let next = queues[0].next;
    used_event(&queues[0], next);
    assert_eq!(read_sector(&mut t, &mut queues[0], window, ptr), 0);
    assert!(
        call.wait(Some(Duration::from_secs(2))).unwrap(),
        "not notified"
    );
    drop((t, queues, pool, bus));
    finish(be);
}

#[test]
fn hostile_doorbell_attachments_are_dropped_and_counted() {
    let env = Env::new("doorbell");
    let image = env.image(1);
    let be = backend(&env.socket(), &image, &[]);
    let sock = raw_connection(&env.socket());
    let attach = |dev_num: u16, queue: u16| {
        local_msg(&wire::LocalMsg::DoorbellAttach {
            dev_num,
            queue,
            direction: DoorbellDirection::ToDevice,
        })
    };
    let semaphore = vmm_sys_util::eventfd::EventFd::new(libc::EFD_SEMAPHORE).unwrap();
    let good = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
    let memfd = std::fs::File::open("/proc/self/exe").unwrap();
    // A regular file, a semaphore eventfd, no descriptor, queue 999, device 9,
    // two descriptors on one message.
    sock.send(&attach(1, 0), &[memfd.as_raw_fd()]).unwrap();
    sock.send(&attach(1, 0), &[semaphore.as_raw_fd()]).unwrap();
    sock.send(&attach(1, 0), &[]).unwrap();
    sock.send(&attach(1, 999), &[good.as_raw_fd()]).unwrap();
    sock.send(&attach(9, 0), &[good.as_raw_fd()]).unwrap();
    sock.send(&attach(1, 0), &[good.as_raw_fd(), good.as_raw_fd()])
        .unwrap();
    assert!(raw_ping(&sock, 5), "backend stopped answering");
    drop(sock);
    let stats = finish(be);
    assert!(stats.contains("bus_dropped=5"), "{stats}");
    assert!(stats.contains("unknown_device=1"), "{stats}");
}

#[test]
fn stalled_and_silent_peers_cost_only_their_own_connection() {
    let env = Env::new("stall");
    let image = env.image(8);
    let be = backend_daemon(&env.socket(), &image, &["--handshake-timeout-ms", "500"]);
    // One peer connects and never says VERSION; another handshakes and then
    // floods requests without ever reading a reply.
    let silent = Seqpacket::connect(&env.socket()).unwrap();
    let deaf = raw_connection(&env.socket());
    let deaf_flood = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let n = Message {
            dev_num: 0,
            token: 1,
            body: Body::Ping { data: 1 },
        }
        .encode(&mut buf)
        .unwrap();
        // Until the backend gives up on it and closes the connection.
        let start = Instant::now();
        while deaf.send(&buf[..n], &[]).is_ok() && start.elapsed() < Duration::from_secs(20) {}
        start.elapsed()
    });
    // Meanwhile a real frontend is served in full.
    let out = run_frontend(
        &env.socket(),
        &["--mib-per-size", "1", "--sizes-kib", "4,64"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK: all data verified"));
    let flood_time = deaf_flood.join().unwrap();
    assert!(
        flood_time < Duration::from_secs(20),
        "the deaf peer was never dropped"
    );
    // The silent peer was dropped after the handshake timeout.
    let mut buf = [0u8; 64];
    assert!(silent.wait_readable(Some(Duration::from_secs(5))).unwrap());
    assert!(matches!(silent.recv(&mut buf), Err(BusError::Disconnected)));
    let stats = terminate(be);
    assert!(stats.contains("connections=3"), "{stats}");
    assert!(stats.contains("connections_failed=2"), "{stats}");
}

#[test]
fn connections_beyond_the_limit_are_closed_and_descriptors_do_not_accumulate() {
    let env = Env::new("limit");
    let image = env.image(1);
    let be = backend_daemon(&env.socket(), &image, &["--max-connections", "2"]);
    let a = raw_connection(&env.socket());
    let b = raw_connection(&env.socket());
    let c = Seqpacket::connect(&env.socket()).unwrap();
    let mut buf = [0u8; 64];
    assert!(c.wait_readable(Some(Duration::from_secs(5))).unwrap());
    assert!(matches!(c.recv(&mut buf), Err(BusError::Disconnected)));
    assert!(raw_ping(&a, 1) && raw_ping(&b, 2));
    drop((a, b));
    // Repeated connect / share / disconnect leaves fds and memory flat (each
    // connection's teardown runs on its own thread: give it time to finish).
    let cycle = || {
        std::thread::sleep(Duration::from_millis(30));
        let bus = raw_bus(&env.socket());
        let _area = bus.share_area(1 << 20).unwrap();
        assert!(ping(bus.as_ref(), 9));
    };
    for _ in 0..5 {
        cycle();
    }
    std::thread::sleep(Duration::from_millis(300));
    let (fds0, rss0) = fds_and_rss(be.id());
    for _ in 0..50 {
        cycle();
    }
    std::thread::sleep(Duration::from_millis(300));
    let (fds1, rss1) = fds_and_rss(be.id());
    assert_eq!(fds1, fds0, "descriptors accumulate");
    assert!(
        rss1 < rss0 + 2048,
        "anonymous memory grew from {rss0} to {rss1} KiB"
    );
    let stats = terminate(be);
    assert!(stats.contains("connections_refused=1"), "{stats}");
}
