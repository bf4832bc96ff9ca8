//! Helpers shared by the multi-process integration tests.
// The raw-driver helpers write rings into the window by hand. Every pointer
// they touch comes from `BouncePool::alloc` on the 1 MiB window the test holds
// mapped for its whole duration, at offsets below the allocation.
#![allow(clippy::undocumented_unsafe_blocks, dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_bus::DriverBus;
use ringfence_bus_local::{wire, LocalBusConfig, LocalDriverBus, Seqpacket};
use ringfence_msg_driver::{discover, BouncePool, MsgTransport};
use ringfence_virtio_msg::{decode, Body, Message};
use virtio_drivers::transport::{DeviceStatus, Transport};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringfence");

pub struct Env {
    pub dir: PathBuf,
}

impl Env {
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ringfence-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Env { dir }
    }
    pub fn image(&self, mib: u64) -> PathBuf {
        let p = self.dir.join("disk.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        p
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join("blk.sock")
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn backend(socket: &Path, image: &Path, extra: &[&str]) -> Child {
    spawn_backend(socket, image, &[&["--once"], extra].concat())
}

fn spawn_backend(socket: &Path, image: &Path, extra: &[&str]) -> Child {
    let child = Command::new(BIN)
        .args(["backend", "--socket-path"])
        .arg(socket)
        .args(extra)
        .args(["blk", "--image"])
        .arg(image)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(socket);
    child
}

/// Waits (at most 10 s) for a daemon's socket to appear.
pub fn wait_for_socket(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "nothing listens at {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Ends a backend started without `--once` (SIGTERM) and returns its stats line.
pub fn terminate(child: Child) -> String {
    // SAFETY: plain kill(2) on a child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    finish(child)
}

/// The backend's open descriptors and anonymous resident memory (KiB).
pub fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    (fds, rss)
}

/// A backend on `image` that serves until SIGTERM (several frontends at once).
pub fn backend_daemon(socket: &Path, image: &Path, extra: &[&str]) -> Child {
    spawn_backend(socket, image, extra)
}

pub fn finish(mut child: Child) -> String {
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
pub fn pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let mut x = seed ^ (offset / 8 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

pub fn run_frontend(socket: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["frontend", "--socket-path"])
        .arg(socket)
        .args(extra)
        .output()
        .unwrap()
}

pub fn raw_bus(socket: &Path) -> Arc<dyn DriverBus> {
    Arc::new(LocalDriverBus::connect(socket, LocalBusConfig::default()).unwrap())
}

pub fn ping(bus: &dyn DriverBus, data: u32) -> bool {
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

/// A hand-built driver queue: rings in the window, one request at a time.
pub struct RawQueue {
    pub index: u16,
    pub avail: u64,
    pub used: u64,
    pub desc_ptr: *mut u8,
    pub avail_ptr: *mut u8,
    pub used_ptr: *mut u8,
    pub next: u16,
}

pub const QSIZE: u32 = 16;

impl RawQueue {
    /// Submits a chain (addr, len, device-writable) and returns the used length.
    pub fn submit(&mut self, t: &mut MsgTransport, chain: &[(u64, u32, bool)]) -> u32 {
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
pub fn raw_device(
    socket: &Path,
    queues: u16,
    features: u64,
) -> (MsgTransport, BouncePool, Vec<RawQueue>, Arc<dyn DriverBus>) {
    raw_device_on(raw_bus(socket), queues, features)
}

/// [`raw_device`] over a bus the caller made.
pub fn raw_device_on(
    bus: Arc<dyn DriverBus>,
    queues: u16,
    features: u64,
) -> (MsgTransport, BouncePool, Vec<RawQueue>, Arc<dyn DriverBus>) {
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

pub fn local_msg(msg: &wire::LocalMsg) -> Vec<u8> {
    let mut buf = [0u8; 64];
    let n = msg.encode_message(&mut buf).unwrap();
    buf[..n].to_vec()
}

/// A raw connection that has done the VERSION handshake.
pub fn raw_connection(socket: &std::path::Path) -> Seqpacket {
    let sock = Seqpacket::connect(socket).unwrap();
    let version = wire::LocalMsg::Version {
        revision: 1,
        max_msg_size: 264,
        features: wire::FEATURE_DOORBELLS,
    };
    sock.send(&local_msg(&version), &[]).unwrap();
    let mut buf = [0u8; 300];
    assert!(sock.wait_readable(Some(Duration::from_secs(5))).unwrap());
    sock.recv(&mut buf).unwrap();
    sock
}

pub fn raw_ping(sock: &Seqpacket, data: u32) -> bool {
    let mut buf = [0u8; 300];
    let n = Message {
        dev_num: 0,
        token: 1,
        body: Body::Ping { data },
    }
    .encode(&mut buf)
    .unwrap();
    sock.send(&buf[..n], &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while sock
        .wait_readable(Some(deadline.saturating_duration_since(Instant::now())))
        .unwrap()
    {
        let (n, _) = sock.recv(&mut buf).unwrap();
        if decode(&buf[..n]).map(|m| m.body) == Ok(Body::Pong { data }) {
            return true;
        }
    }
    false
}
