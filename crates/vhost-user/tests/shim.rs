//! The early-enable shim: a frontend that sends SET_VRING_ENABLE before
//! SET_FEATURES (as QEMU 10's vhost-user-net does) is acked and survives, the
//! held enable reaches the backend after SET_FEATURES, descriptors pass both
//! ways, and a hostile frame ends the connection.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringfence_blk::{Blk, BlkOptions};
use ringfence_vhost_user::{serve_with_enable_shim, MemoryPolicy, ShimError, VhostUserDevice};
use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GET_FEATURES: u32 = 1;
const SET_OWNER: u32 = 3;
const SET_PROTOCOL_FEATURES: u32 = 16;
const SET_VRING_ENABLE: u32 = 18;
const V1: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
const PROTOCOL_FEATURES: u64 = 1 << 30;

const GPA: u64 = 0x4000_0000;
const MEM: usize = 1 << 20;
const Q: u16 = 16;
const DESC: usize = 0x0;
const AVAIL: usize = 0x1000;
const USED: usize = 0x2000;
const HDR: usize = 0x3000;
const STATUS: usize = 0x3100;
const DATA: usize = 0x4000;

/// Sealed memfd guest RAM, as QEMU's memfd backend makes it.
struct Guest {
    ptr: *mut u8,
    fd: std::fs::File,
}

impl Guest {
    fn new() -> Self {
        let name = std::ffi::CString::new("guest-ram").unwrap();
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        let fd = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        fd.set_len(MEM as u64).unwrap();
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
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

fn image(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ringfence-shim-{tag}-{}.img", std::process::id()));
    let content: Vec<u8> = (0..64 * 1024).map(|i| (i / 512) as u8).collect();
    std::fs::write(&p, content).unwrap();
    p
}

fn socket_path(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("ringfence-shim-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn blk(img: &Path) -> Arc<VhostUserDevice> {
    VhostUserDevice::new(
        Box::new(Blk::open(img, BlkOptions::default()).unwrap()),
        MemoryPolicy::FullShare,
    )
}

fn daemon(backend: &Arc<VhostUserDevice>) -> VhostUserDaemon<Arc<VhostUserDevice>> {
    VhostUserDaemon::new(
        "test".into(),
        backend.clone(),
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .unwrap()
}

/// Serves one frontend through the shim on another thread.
fn spawn_shim(socket: &Path, backend: &Arc<VhostUserDevice>) -> JoinHandle<Result<(), ShimError>> {
    let mut d = daemon(backend);
    let path = socket.to_owned();
    let t = std::thread::spawn(move || serve_with_enable_shim(&mut d, &path));
    wait_for(socket);
    t
}

/// Serves one frontend with plain `VhostUserDaemon::serve`.
fn spawn_plain(
    socket: &Path,
    backend: &Arc<VhostUserDevice>,
) -> JoinHandle<vhost_user_backend::Result<()>> {
    let mut d = daemon(backend);
    let path = socket.to_owned();
    let t = std::thread::spawn(move || d.serve(&path));
    wait_for(socket);
    t
}

fn wait_for(socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "socket never bound");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Joins a serving thread, failing the test if it does not end promptly.
fn join<R>(t: JoinHandle<R>) -> R {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !t.is_finished() {
        assert!(
            Instant::now() < deadline,
            "the serving function did not return"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    t.join().unwrap()
}

fn raw_connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn send(s: &mut UnixStream, request: u32, flags: u32, payload: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&request.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    s.write_all(&m).unwrap();
}

/// One message from the backend, or `None` when it closed the connection.
fn recv(s: &mut UnixStream) -> Option<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; 12];
    match s.read_exact(&mut h) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return None,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("reading a reply: {e}"),
    }
    let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    let mut body = vec![0u8; word(8) as usize];
    s.read_exact(&mut body).unwrap();
    Some((word(0), word(4), body))
}

fn vring_state(index: u32, num: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&index.to_le_bytes());
    b[4..].copy_from_slice(&num.to_le_bytes());
    b
}

/// QEMU 10's vhost-user-net order: features read, owner, protocol features
/// with REPLY_ACK, then SET_VRING_ENABLE(0, `enable`) with NEED_REPLY before
/// any SET_FEATURES. Returns the backend's answer to the enable.
fn early_enable(s: &mut UnixStream, enable: u32) -> Option<(u32, u32, Vec<u8>)> {
    send(s, GET_FEATURES, V1, &[]);
    let (req, flags, body) = recv(s).expect("GET_FEATURES answered");
    assert_eq!((req, flags), (GET_FEATURES, V1 | REPLY));
    let features = u64::from_le_bytes(body[..8].try_into().unwrap());
    assert_ne!(features & PROTOCOL_FEATURES, 0, "PROTOCOL_FEATURES offered");
    send(s, SET_OWNER, V1, &[]);
    let pf = VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ;
    send(s, SET_PROTOCOL_FEATURES, V1, &pf.bits().to_le_bytes());
    send(
        s,
        SET_VRING_ENABLE,
        V1 | NEED_REPLY,
        &vring_state(0, enable),
    );
    recv(s)
}

#[test]
fn an_early_enable_is_acked_by_the_shim_and_ends_a_plain_daemon() {
    let img = image("ack");
    let backend = blk(&img);

    // Without the shim: the vhost crate refuses the enable and hangs up.
    let socket = socket_path("plain");
    let plain = spawn_plain(&socket, &backend);
    let mut s = raw_connect(&socket);
    assert!(
        early_enable(&mut s, 1).is_none(),
        "a plain daemon kept the connection"
    );
    let r = join(plain);
    assert!(
        matches!(
            r,
            Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::InactiveFeature(_)
            ))
        ),
        "{r:?}"
    );

    // Through the shim: acked (REPLY_ACK success), and the connection lives on.
    let socket = socket_path("ack");
    let shim = spawn_shim(&socket, &backend);
    let mut s = raw_connect(&socket);
    let (req, flags, body) = early_enable(&mut s, 1).expect("the shim answers the enable");
    assert_eq!((req, flags), (SET_VRING_ENABLE, V1 | REPLY));
    assert_eq!(body, 0u64.to_le_bytes());
    send(&mut s, GET_FEATURES, V1, &[]);
    let (req, _, body) = recv(&mut s).expect("connection still served");
    assert_eq!((req, body.len()), (GET_FEATURES, 8));
    drop(s);
    join(shim).expect("a disconnect is a clean end");
    assert!(!socket.exists(), "socket file left behind");
    let _ = std::fs::remove_file(&img);
}

/// Continues a connection that sent an early enable with the `vhost` crate's
/// frontend: SET_FEATURES (the shim replays the held enable right after it),
/// memory table and ring with NEED_REPLY on every message, and no
/// SET_VRING_ENABLE of its own. Any stray ack for the replayed enable would
/// be taken as the answer to a later request and fail it.
fn finish_setup(s: UnixStream, guest: &Guest) -> (Frontend, EventFd, EventFd) {
    let mut fe = Frontend::from_stream(s, 1);
    let features = fe.get_features().unwrap();
    fe.set_features(features & ((1 << 32) | PROTOCOL_FEATURES | (1 << 9)))
        .unwrap();
    fe.set_protocol_features(
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK,
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    // The memfd and both eventfds cross the shim as SCM_RIGHTS.
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: GPA,
        memory_size: MEM as u64,
        userspace_addr: guest.va(0),
        mmap_offset: 0,
        mmap_handle: guest.fd.as_raw_fd(),
    }])
    .unwrap();
    guest.write(0, &[0u8; 0x3000]);
    fe.set_vring_num(0, Q).unwrap();
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
    )
    .unwrap();
    fe.set_vring_base(0, 0).unwrap();
    let kick = EventFd::new(EFD_NONBLOCK).unwrap();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    fe.set_vring_call(0, &call).unwrap();
    fe.set_vring_kick(0, &kick).unwrap();
    (fe, kick, call)
}

/// Posts one blk IN request for `sector` (descriptor chain at 0, avail entry
/// `n`) and kicks.
fn post(guest: &Guest, kick: &EventFd, n: u16, sector: u64) {
    let mut hdr = [0u8; 16];
    hdr[8..].copy_from_slice(&sector.to_le_bytes());
    guest.write(HDR, &hdr);
    guest.write(STATUS, &[0xFF]);
    let descs = [
        (GPA + HDR as u64, 16u32, 1u16),
        (GPA + DATA as u64, 512, 1 | 2),
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
    guest.write(AVAIL + 4 + 2 * usize::from(n % Q), &0u16.to_le_bytes());
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    guest.write(AVAIL + 2, &(n + 1).to_le_bytes());
    kick.write(1).unwrap();
}

/// Waits up to `within` for the used index to reach `n`.
fn used(guest: &Guest, n: u16, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while guest.u16_at(USED + 2) != n {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[test]
fn the_held_enable_reaches_the_backend_after_set_features() {
    let img = image("replay");
    let backend = blk(&img);
    let socket = socket_path("replay");
    let guest = Guest::new();

    let shim = spawn_shim(&socket, &backend);
    let mut s = raw_connect(&socket);
    assert!(early_enable(&mut s, 1).is_some());
    let (fe, kick, call) = finish_setup(s, &guest);
    // As libvhost-user does, a newly installed call fd is signalled once.
    assert_eq!(call.read().unwrap(), 1, "the new call fd was not signalled");
    // The ring was enabled only by the replayed message: the request is served.
    post(&guest, &kick, 0, 6);
    assert!(
        used(&guest, 1, Duration::from_secs(5)),
        "the replayed enable never reached the backend"
    );
    let mut status = [0xFFu8];
    guest.read(STATUS, &mut status);
    assert_eq!(status[0], 0);
    let mut data = [0u8; 512];
    guest.read(DATA, &mut data);
    assert!(data.iter().all(|&b| b == 6));
    assert_eq!(call.read().unwrap(), 1);
    assert_eq!(backend.chains(0), 1);
    drop(fe);
    join(shim).expect("clean end");

    // The same with an early enable = 0: replayed as is, the ring stays
    // disabled (with PROTOCOL_FEATURES rings start disabled, which is why the
    // shim cannot drop early enables) until the frontend enables it.
    let shim = spawn_shim(&socket, &backend);
    let mut s = raw_connect(&socket);
    assert!(early_enable(&mut s, 0).is_some());
    let (mut fe, kick, _call) = finish_setup(s, &guest);
    post(&guest, &kick, 0, 7);
    assert!(
        !used(&guest, 1, Duration::from_millis(300)),
        "a disabled ring was served"
    );
    assert_eq!(backend.chains(0), 1);
    fe.set_vring_enable(0, true).unwrap();
    assert!(used(&guest, 1, Duration::from_secs(5)));
    guest.read(DATA, &mut data);
    assert!(data.iter().all(|&b| b == 7));
    drop(fe);
    join(shim).expect("clean end");
    let _ = std::fs::remove_file(&img);
}

#[test]
fn an_oversized_frame_ends_the_connection() {
    let img = image("big");
    let backend = blk(&img);
    let socket = socket_path("big");
    let shim = spawn_shim(&socket, &backend);
    let mut s = raw_connect(&socket);
    let mut m = Vec::new();
    for w in [GET_FEATURES, V1, 0x1_0000] {
        m.extend_from_slice(&w.to_le_bytes());
    }
    s.write_all(&m).unwrap();
    assert!(recv(&mut s).is_none(), "connection kept open");
    let r = join(shim);
    assert!(
        matches!(
            r,
            Err(ShimError::Oversized {
                request: GET_FEATURES,
                size: 0x1_0000,
                ..
            })
        ),
        "{r:?}"
    );
    assert!(!socket.exists());
    let _ = std::fs::remove_file(&img);
}

#[test]
fn garbage_from_the_frontend_ends_the_connection_without_a_panic() {
    let img = image("junk");
    let backend = blk(&img);
    let socket = socket_path("junk");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for round in 0..8 {
        let shim = spawn_shim(&socket, &backend);
        let mut s = raw_connect(&socket);
        let junk: Vec<u8> = (0..64 + round * 40)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = s.write_all(&junk);
        drop(s);
        // Either the shim or the daemon refuses it; the function returns.
        let _ = join(shim);
        assert!(!socket.exists());
    }
    let _ = std::fs::remove_file(&img);
}

#[test]
fn an_enable_after_a_device_reset_is_held_like_an_early_one() {
    let img = image("reset");
    let backend = blk(&img);
    let socket = socket_path("reset");
    let shim = spawn_shim(&socket, &backend);
    let mut s = raw_connect(&socket);
    send(&mut s, GET_FEATURES, V1, &[]);
    let (_, _, body) = recv(&mut s).expect("GET_FEATURES answered");
    let features = u64::from_le_bytes(body[..8].try_into().unwrap());
    send(&mut s, SET_OWNER, V1, &[]);
    const SET_FEATURES: u32 = 2;
    const RESET_DEVICE: u32 = 34;
    send(&mut s, SET_FEATURES, V1, &features.to_le_bytes());
    let pf = VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::RESET_DEVICE;
    send(&mut s, SET_PROTOCOL_FEATURES, V1, &pf.bits().to_le_bytes());
    // As QEMU's vhost-user-net stops: a reset, then its rings disabled.
    send(&mut s, RESET_DEVICE, V1, &[]);
    send(
        &mut s,
        SET_VRING_ENABLE,
        V1 | NEED_REPLY,
        &vring_state(0, 0),
    );
    let (req, flags, body) = recv(&mut s).expect("the disable is acknowledged");
    assert_eq!((req, flags), (SET_VRING_ENABLE, V1 | REPLY));
    assert_eq!(body, 0u64.to_le_bytes(), "success");
    // The connection is still served (the daemon did not hang up).
    send(&mut s, GET_FEATURES, V1, &[]);
    assert!(recv(&mut s).is_some(), "the daemon ended the connection");
    drop(s);
    join(shim).expect("clean end");
}

#[test]
fn a_call_fd_that_would_block_is_not_signalled_and_holds_nothing() {
    use std::os::fd::FromRawFd;
    let img = image("blockingcall");
    let backend = blk(&img);
    let socket = socket_path("blockingcall");
    let shim = spawn_shim(&socket, &backend);
    let fe = Frontend::from_stream(raw_connect(&socket), 1);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    fe.set_features(features & ((1 << 32) | PROTOCOL_FEATURES))
        .unwrap();
    // A blocking pipe with a full buffer as the "call eventfd": a write to
    // it would wait for ever.
    let mut fds = [0; 2];
    assert_eq!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK) },
        0
    );
    let chunk = [0u8; 4096];
    while unsafe { libc::write(fds[1], chunk.as_ptr().cast(), chunk.len()) } > 0 {}
    assert_eq!(unsafe { libc::fcntl(fds[1], libc::F_SETFL, 0) }, 0);
    let call = unsafe { EventFd::from_raw_fd(fds[1]) };
    // The shim must still be forwarding: the next request is answered. In
    // a thread with a bound, so that a stuck shim fails the test.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = fe.set_vring_call(0, &call).and_then(|()| fe.get_features());
        let _ = tx.send((r.map_err(|e| e.to_string()), fe, call));
    });
    let (answered, fe, _call) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the shim is stuck on the call fd");
    assert_eq!(answered.unwrap(), features);
    drop(fe);
    join(shim).expect("clean end");
    unsafe { libc::close(fds[0]) };
}
