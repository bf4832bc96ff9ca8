//! The adapter driven by the `vhost` crate's vhost-user frontend (no QEMU):
//! negotiation, config, I/O, a hostile descriptor, restricted memory, and a
//! frontend that disconnects followed by a new one.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_blk::{Blk, BlkOptions};
use ringfence_vhost_user::{MemoryPolicy, VhostUserDevice};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GPA: u64 = 0x4000_0000;
const MEM: usize = 1 << 20;
const Q: u16 = 16;
// Layout inside guest memory (offsets from GPA).
const DESC: usize = 0x0;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const HDR: usize = 0x3000;
const STATUS: usize = 0x3100;
const DATA: usize = 0x4000;

struct Guest {
    ptr: *mut u8,
    fd: std::fs::File,
}

impl Guest {
    /// Guest RAM sealed against shrinking, as QEMU's memfd backend makes it by default.
    fn new() -> Self {
        Self::with_seals(libc::F_SEAL_SHRINK | libc::F_SEAL_GROW)
    }

    /// Guest RAM the frontend could still truncate.
    fn unsealed() -> Self {
        Self::with_seals(0)
    }

    fn with_seals(seals: i32) -> Self {
        let name = std::ffi::CString::new("guest-ram").unwrap();
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        let fd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        fd.set_len(MEM as u64).unwrap();
        assert_eq!(
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) },
            0
        );
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        Guest {
            ptr: ptr.cast(),
            fd,
        }
    }
    fn va(&self, off: usize) -> u64 {
        self.ptr as u64 + off as u64
    }
    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= MEM);
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
    }
    fn read(&self, off: usize, out: &mut [u8]) {
        assert!(off + out.len() <= MEM);
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), out.as_mut_ptr(), out.len()) };
    }
    fn u16_at(&self, off: usize) -> u16 {
        let mut b = [0u8; 2];
        self.read(off, &mut b);
        u16::from_le_bytes(b)
    }
}

struct Driver {
    fe: Frontend,
    kick: EventFd,
    call: EventFd,
    next: u16,
}

fn start_daemon(
    socket: &Path,
    backend: Arc<VhostUserDevice>,
    connections: usize,
) -> std::thread::JoinHandle<()> {
    // A fresh daemon per connection, as the CLI does (vhost-user-backend keeps
    // per-connection ownership state in the daemon).
    let path = socket.to_owned();
    let t = std::thread::spawn(move || {
        for _ in 0..connections {
            let mut d = VhostUserDaemon::new(
                "test".into(),
                backend.clone(),
                GuestMemoryAtomic::new(GuestMemoryMmap::new()),
            )
            .unwrap();
            let _ = d.serve(&path);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    t
}

fn connect(socket: &Path, guest: &Guest, mem_size: u64) -> Result<Driver, vhost::Error> {
    connect_at(socket, guest, mem_size, 0)
}

/// Like [`connect`], with the guest RAM region at `mmap_offset` in its file.
fn connect_at(
    socket: &Path,
    guest: &Guest,
    mem_size: u64,
    mmap_offset: u64,
) -> Result<Driver, vhost::Error> {
    // Until the previous session's listener is gone, a new connection may be
    // accepted by nobody and reset: retry until the first request is answered.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut fe, features) = loop {
        let attempt = Frontend::connect(socket, 1).and_then(|f| {
            f.set_owner()?;
            let features = f.get_features()?;
            Ok((f, features))
        });
        match attempt {
            Ok(v) => break v,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e),
        }
    };
    assert_ne!(features & (1 << 33), 0, "ACCESS_PLATFORM not offered");
    assert_ne!(features & (1 << 29), 0, "EVENT_IDX not offered");
    fe.set_features(features & ((1 << 32) | (1 << 30) | (1 << 9)))?;
    let pf = fe.get_protocol_features()?;
    assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    fe.set_protocol_features(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK,
    )?;
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: GPA,
        memory_size: mem_size,
        userspace_addr: guest.va(0),
        mmap_offset,
        mmap_handle: guest.fd.as_raw_fd(),
    }])?;
    guest.write(0, &vec![0u8; 0x3000]);
    fe.set_vring_num(0, Q)?;
    fe.set_vring_addr(
        0,
        &VringConfigData {
            queue_max_size: Q,
            queue_size: Q,
            flags: 0,
            desc_table_addr: guest.va(DESC),
            used_ring_addr: guest.va(USED),
            avail_ring_addr: guest.va(AVAIL),
            log_addr: None,
        },
    )?;
    fe.set_vring_base(0, 0)?;
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(0, &call)?;
    fe.set_vring_kick(0, &kick)?;
    fe.set_vring_enable(0, true)?;
    Ok(Driver {
        fe,
        kick,
        call,
        next: 0,
    })
}

impl Driver {
    /// One IN request for `sector` with a data buffer at guest address `data_gpa`; returns the status.
    fn read(&mut self, guest: &Guest, sector: u64, data_gpa: u64) -> u8 {
        self.post(guest, sector, data_gpa);
        let deadline = Instant::now() + Duration::from_secs(5);
        while guest.u16_at(USED + 2) != self.next {
            assert!(Instant::now() < deadline, "request not completed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.call.read();
        let mut s = [0u8];
        guest.read(STATUS, &mut s);
        s[0]
    }

    /// Publishes one IN request and kicks, without waiting for it.
    fn post(&mut self, guest: &Guest, sector: u64, data_gpa: u64) {
        let mut hdr = [0u8; 16];
        hdr[8..].copy_from_slice(&sector.to_le_bytes());
        guest.write(HDR, &hdr);
        guest.write(STATUS, &[0xFF]);
        let descs = [
            (GPA + HDR as u64, 16u32, 1u16),
            (data_gpa, 512, 1 | 2),
            (GPA + STATUS as u64, 1, 2),
        ];
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&(i as u16 + 1).to_le_bytes());
            guest.write(DESC + 16 * i, &d);
        }
        guest.write(
            AVAIL + 4 + 2 * usize::from(self.next % Q),
            &0u16.to_le_bytes(),
        );
        self.next = self.next.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        guest.write(AVAIL + 2, &self.next.to_le_bytes());
        self.kick.write(1).unwrap();
    }
}

fn image(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ringfence-vu-{tag}-{}.img", std::process::id()));
    let mut content = vec![0u8; 64 * 1024];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    std::fs::write(&p, content).unwrap();
    p
}

#[test]
fn serves_io_config_and_a_reconnecting_frontend() {
    let img = image("io");
    let socket = std::env::temp_dir().join(format!("ringfence-vu-{}.sock", std::process::id()));
    let backend = VhostUserDevice::new(
        Box::new(Blk::open(&img, BlkOptions::default()).unwrap()),
        MemoryPolicy::FullShare,
    );
    let daemon = start_daemon(&socket, backend.clone(), 2);
    let guest = Guest::new();

    for round in 0..2u64 {
        let mut drv =
            connect(&socket, &guest, MEM as u64).unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        // Config: capacity in sectors.
        let (_, cfg) = drv
            .fe
            .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])
            .unwrap();
        assert_eq!(u64::from_le_bytes(cfg[..8].try_into().unwrap()), 128);
        // A read lands the image's bytes in guest memory.
        assert_eq!(drv.read(&guest, 5 + round, GPA + DATA as u64), 0);
        let mut data = [0u8; 512];
        guest.read(DATA, &mut data);
        assert!(
            data.iter().all(|&b| u64::from(b) == 5 + round),
            "round {round}"
        );
        // A data buffer outside the memory table: IOERR, and the daemon keeps serving.
        assert_eq!(drv.read(&guest, 0, GPA + MEM as u64 + 0x1000), 1);
        assert_eq!(drv.read(&guest, 0, 0x1000), 1);
        assert_eq!(drv.read(&guest, 7, GPA + DATA as u64), 0);
        guest.read(DATA, &mut data);
        assert!(data.iter().all(|&b| b == 7));
        drop(drv); // disconnect; the next round is a new frontend
    }
    daemon.join().unwrap();
    assert!(backend.chains(0) >= 8);
    let _ = std::fs::remove_file(&img);
}

#[test]
fn a_region_past_the_end_of_its_file_is_refused_before_anything_touches_it() {
    // The regression: such a region used to be mapped and served, and the
    // first access killed the daemon with SIGBUS.
    let img = image("sigbus");
    let socket = std::env::temp_dir().join(format!("ringfence-vu-s-{}.sock", std::process::id()));
    let backend = VhostUserDevice::new(
        Box::new(Blk::open(&img, BlkOptions::default()).unwrap()),
        MemoryPolicy::FullShare,
    );
    let daemon = start_daemon(&socket, backend.clone(), 3);
    let guest = Guest::new();
    let refused = connect_at(&socket, &guest, MEM as u64, MEM as u64);
    assert!(refused.is_err(), "a region beyond its file was accepted");
    // A memfd the frontend could still shrink under the mapping later.
    let unsealed = Guest::unsealed();
    assert!(
        connect(&socket, &unsealed, MEM as u64).is_err(),
        "an unsealed memfd was accepted"
    );
    assert_eq!(
        backend
            .stats()
            .memory_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    // The daemon is alive and the next frontend is served.
    let mut drv = connect(&socket, &guest, MEM as u64).unwrap();
    assert_eq!(drv.read(&guest, 4, GPA + DATA as u64), 0);
    drop(drv);
    daemon.join().unwrap();
    let _ = std::fs::remove_file(&img);
}

#[test]
fn a_wedged_call_eventfd_cannot_stop_the_queue() {
    // The frontend makes its call eventfd blocking and parks the counter
    // one below its maximum: a plain write(2) from the worker would block
    // until the frontend reads, and the queue would stop.
    let img = image("wedge");
    let socket = std::env::temp_dir().join(format!("ringfence-vu-w-{}.sock", std::process::id()));
    let backend = VhostUserDevice::new(
        Box::new(Blk::open(&img, BlkOptions::default()).unwrap()),
        MemoryPolicy::FullShare,
    );
    let daemon = start_daemon(&socket, backend.clone(), 1);
    let guest = Guest::new();
    let mut drv = connect(&socket, &guest, MEM as u64).unwrap();
    let fd = drv.call.as_raw_fd();
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, 0) }, 0);
    let parked = (u64::MAX - 1).to_ne_bytes();
    assert_eq!(unsafe { libc::write(fd, parked.as_ptr().cast(), 8) }, 8);
    for sector in 0..3u64 {
        drv.post(&guest, sector, GPA + DATA as u64);
        let deadline = Instant::now() + Duration::from_secs(5);
        while guest.u16_at(USED + 2) != drv.next {
            assert!(
                Instant::now() < deadline,
                "queue stopped after request {sector}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut status = [0xFFu8];
        guest.read(STATUS, &mut status);
        assert_eq!(status[0], 0);
    }
    drop(drv);
    daemon.join().unwrap();
    let _ = std::fs::remove_file(&img);
}

#[test]
fn restricted_mode_refuses_a_memory_table_beyond_the_window() {
    let img = image("restricted");
    let socket = std::env::temp_dir().join(format!("ringfence-vu-r-{}.sock", std::process::id()));
    let backend = VhostUserDevice::new(
        Box::new(Blk::open(&img, BlkOptions::default()).unwrap()),
        MemoryPolicy::SharedWindow {
            max_bytes: (MEM / 2) as u64,
        },
    );
    let daemon = start_daemon(&socket, backend.clone(), 2);
    let guest = Guest::new();
    // All of "guest RAM" offered: refused, nothing mapped.
    assert!(connect(&socket, &guest, MEM as u64).is_err());
    assert_eq!(
        backend
            .stats()
            .memory_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Only the window: served; a descriptor past the window gets IOERR.
    let mut drv = connect(&socket, &guest, (MEM / 2) as u64).unwrap();
    assert_eq!(drv.read(&guest, 3, GPA + DATA as u64), 0);
    assert_eq!(drv.read(&guest, 3, GPA + (MEM / 2) as u64 + 0x1000), 1);
    assert_eq!(drv.read(&guest, 2, GPA + DATA as u64), 0);
    drop(drv);
    daemon.join().unwrap();
    let _ = std::fs::remove_file(&img);
}

#[test]
fn a_broken_ring_stops_that_queue_not_the_daemon() {
    let img = image("broken");
    let socket = std::env::temp_dir().join(format!("ringfence-vu-b-{}.sock", std::process::id()));
    let backend = VhostUserDevice::new(
        Box::new(Blk::open(&img, BlkOptions::default()).unwrap()),
        MemoryPolicy::FullShare,
    );
    let daemon = start_daemon(&socket, backend.clone(), 2);
    let guest = Guest::new();
    let drv = connect(&socket, &guest, MEM as u64).unwrap();
    // An avail index 1000 entries ahead of a 16-entry ring.
    guest.write(AVAIL + 2, &1000u16.to_le_bytes());
    drv.kick.write(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while backend
        .stats()
        .queue_failures
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(Instant::now() < deadline, "broken ring not detected");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The driver repairs the ring and kicks again: the queue stays stopped
    // until the device is reset, so nothing is used and nothing re-read.
    let mut drv = drv;
    guest.write(AVAIL + 2, &0u16.to_le_bytes());
    drv.post(&guest, 1, GPA + DATA as u64);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        guest.u16_at(USED + 2),
        0,
        "nothing may be used from a broken ring"
    );
    assert_eq!(
        backend
            .stats()
            .queue_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(drv);
    // A new frontend (the guest rebooted) is served normally.
    let mut drv = connect(&socket, &guest, MEM as u64).unwrap();
    assert_eq!(drv.read(&guest, 9, GPA + DATA as u64), 0);
    drop(drv);
    daemon.join().unwrap();
    let _ = std::fs::remove_file(&img);
}
