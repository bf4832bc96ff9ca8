//! virtio-msg over ivshmem between real processes: a Ringfence backend as
//! the ivshmem server (peer 0) and a Ringfence frontend attached as a VM
//! would be, 64-byte messages in the shared memory, the frontend's RAM file
//! shared whole.

mod common;

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, BIN};
use ringfence_virtio_msg::{decode, Body, Message};
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

fn ram(env: &Env, mib: u64) -> std::path::PathBuf {
    let path = env.dir.join("ram");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    path
}

fn ivshmem_backend(env: &Env, ram: &std::path::Path, devices: &[String]) -> Child {
    let socket = env.dir.join("ivshmem.sock");
    let mut cmd = Command::new(BIN);
    cmd.args(["backend", "--bus", "ivshmem", "--once", "--socket-path"])
        .arg(&socket)
        .arg("--guest-ram")
        .arg(ram);
    for d in devices {
        cmd.args(["--device", d]);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_socket(&socket);
    child
}

fn frontend(env: &Env, ram: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["frontend", "--bus", "ivshmem", "--socket-path"])
        .arg(env.dir.join("ivshmem.sock"))
        .arg("--guest-ram")
        .arg(ram)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn blk_moves_verified_data_over_ivshmem_queues() {
    let env = Env::new("ivshmem-blk");
    let image = env.image(16);
    let ram = ram(&env, 32);
    let be = ivshmem_backend(&env, &ram, &[format!("blk,image={}", image.display())]);
    let (ok, out) = frontend(
        &env,
        &ram,
        &["--mib-per-size", "2", "--sizes-kib", "4,64,128"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("OK: all data verified"), "{out}");
    let stats = common::finish(be);
    // Every message fitted a 64-byte slot; none was dropped.
    assert!(stats.contains("malformed=0"), "{stats}");
    assert!(stats.contains("bus_dropped=0"), "{stats}");
    assert!(stats.contains("queue_failures=0"), "{stats}");
    // The data went through the RAM file, never a window of its own.
    let on_disk = std::fs::read(&image).unwrap();
    assert!(on_disk.iter().any(|&b| b != 0), "nothing reached the image");
}

#[test]
fn rng_entropy_arrives_over_ivshmem() {
    let env = Env::new("ivshmem-rng");
    let ram = ram(&env, 16);
    let be = ivshmem_backend(&env, &ram, &["rng".into()]);
    let out_path = env.dir.join("rng.bin");
    let (ok, out) = frontend(
        &env,
        &ram,
        &[
            "--rng-out",
            out_path.to_str().unwrap(),
            "--rng-bytes",
            "65536",
            "--duration-s",
            "30",
        ],
    );
    assert!(ok, "{out}");
    let bytes = std::fs::read(&out_path).unwrap();
    assert_eq!(bytes.len(), 65536, "{out}");
    let zeros = bytes.iter().filter(|&&b| b == 0).count();
    assert!(zeros < 1024, "{zeros} zero bytes: not entropy");
    let stats = common::finish(be);
    assert!(stats.contains("malformed=0"), "{stats}");
}

/// A raw ivshmem client that follows the server protocol and then misbehaves.
struct RawPeer {
    /// Held open: closing it is the peer leaving.
    _stream: UnixStream,
    shm: MmapRegion,
    ring_device: EventFd,
    own: EventFd,
}

fn raw_peer(socket: &std::path::Path) -> RawPeer {
    let stream = UnixStream::connect(socket).unwrap();
    let next = || {
        let mut b = [0u8; 8];
        let (n, fd) = stream.recv_with_fd(&mut b).unwrap();
        assert_eq!(n, 8);
        (i64::from_le_bytes(b), fd)
    };
    assert_eq!(next().0, 0, "protocol version 0");
    let id = next().0;
    assert!(id > 0, "peer id {id}: 0 is the device side");
    let (minus_one, shm) = next();
    assert_eq!(minus_one, -1);
    let shm = shm.expect("shared memory descriptor");
    let size = shm.metadata().unwrap().len() as usize;
    let (dev, dev_fd) = next();
    assert_eq!(dev, 0, "the device side's vector first");
    let (own_id, own_fd) = next();
    assert_eq!(own_id, id, "then our own vector");
    let to_eventfd = |f: File| {
        // SAFETY: an eventfd just received, owned by `f` and handed over.
        unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }
    };
    RawPeer {
        shm: MmapRegion::build(
            Some(FileOffset::new(shm, 0)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
        .unwrap(),
        ring_device: to_eventfd(dev_fd.unwrap()),
        own: to_eventfd(own_fd.unwrap()),
        _stream: stream,
    }
}

impl RawPeer {
    fn put_u32(&self, at: usize, v: u32) {
        self.shm.as_volatile_slice().write_obj(v, at).unwrap();
    }
    fn get_u32(&self, at: usize) -> u32 {
        self.shm.as_volatile_slice().read_obj(at).unwrap()
    }
    fn slot(&self, queue: usize, i: usize) -> usize {
        queue + 128 + 64 * i
    }
    fn ring(&self) {
        self.ring_device.write(1).unwrap();
    }
}

#[test]
fn a_hostile_ivshmem_peer_is_counted_and_survived() {
    let env = Env::new("ivshmem-hostile");
    let ram = ram(&env, 16);
    let be = ivshmem_backend(&env, &ram, &["rng".into()]);
    let p = raw_peer(&env.dir.join("ivshmem.sock"));
    let (to_dev, to_drv) = (0usize, 4096usize);

    // The backend marked the memory as its own.
    let mut magic = [0u8; 16];
    p.shm
        .as_volatile_slice()
        .read_slice(&mut magic, 8192)
        .unwrap();
    assert_eq!(&magic, b"ringfence ivshm1");

    // A head outside the ring.
    p.put_u32(to_dev, 1000);
    p.ring();
    std::thread::sleep(Duration::from_millis(300));
    // A garbage slot.
    p.shm
        .as_volatile_slice()
        .write_slice(&[0xA5u8; 64], p.slot(to_dev, 0))
        .unwrap();
    p.put_u32(to_dev, 1);
    p.ring();
    // A doorbell flood.
    for _ in 0..50_000 {
        let _ = p.ring_device.write(1);
    }
    // Still served: a PING in the next slot is answered.
    let mut ping = [0u8; 64];
    let n = Message {
        dev_num: 0,
        token: 7,
        body: Body::Ping { data: 0xC0FFEE },
    }
    .encode(&mut ping)
    .unwrap();
    assert!(n <= 64);
    p.shm
        .as_volatile_slice()
        .write_slice(&ping, p.slot(to_dev, 1))
        .unwrap();
    p.put_u32(to_dev, 2);
    p.ring();
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.get_u32(to_drv) == 0 {
        assert!(Instant::now() < deadline, "no answer after the attack");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut pong = [0u8; 64];
    p.shm
        .as_volatile_slice()
        .read_slice(&mut pong, p.slot(to_drv, 0))
        .unwrap();
    assert_eq!(
        decode(&pong).unwrap().body,
        Body::Pong { data: 0xC0FFEE },
        "answered, echoing the token"
    );
    assert_eq!(decode(&pong).unwrap().token, 7);
    assert!(p.own.read().unwrap() >= 1, "the backend rang our vector");
    // Half a message, and gone.
    p.shm
        .as_volatile_slice()
        .write_slice(&ping[..4], p.slot(to_dev, 2))
        .unwrap();
    drop(p);
    let stats = common::finish(be);
    // The corrupt head is reported once per look: once, or twice when the
    // backend saw it before the doorbell that announced it arrived.
    let dropped: u64 = stats
        .split_whitespace()
        .find_map(|w| w.strip_prefix("bus_dropped="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!((1..=2).contains(&dropped), "the corrupt head: {stats}");
    assert!(stats.contains("malformed=1"), "the garbage slot: {stats}");
}

/// A PING in slot `i` of the driver -> device queue, head moved past it, rung.
fn send_ping(p: &RawPeer, i: usize, data: u32) {
    let mut ping = [0u8; 64];
    Message {
        dev_num: 0,
        token: 1,
        body: Body::Ping { data },
    }
    .encode(&mut ping)
    .unwrap();
    p.shm
        .as_volatile_slice()
        .write_slice(&ping, p.slot(0, i))
        .unwrap();
    p.put_u32(0, (i + 1) as u32);
    p.ring();
}

#[test]
fn a_former_client_reaches_nothing_of_the_next_session_and_sigterm_ends_the_server() {
    let env = Env::new("ivshmem-sessions");
    let ram = ram(&env, 16);
    let socket = env.dir.join("ivshmem.sock");
    let be = Command::new(BIN)
        .args(["backend", "--bus", "ivshmem", "--socket-path"])
        .arg(&socket)
        .arg("--guest-ram")
        .arg(&ram)
        .arg("rng")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_socket(&socket);
    // Only its owner may connect.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A connects, then leaves, keeping its mapping and its doorbell.
    let a = raw_peer(&socket);
    let RawPeer {
        _stream,
        shm: a_shm,
        ring_device: a_ring,
        own: a_own,
    } = a;
    drop(_stream);
    std::thread::sleep(Duration::from_millis(300));
    // B is the next VM.
    let b = raw_peer(&socket);
    // A writes a request into what it still maps and rings what it kept.
    let a = RawPeer {
        _stream: UnixStream::pair().unwrap().0,
        shm: a_shm,
        ring_device: a_ring,
        own: a_own,
    };
    send_ping(&a, 0, 0xBAD);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.get_u32(4096), 0, "the backend answered a former client");
    assert_eq!(b.get_u32(0), 0, "A's request landed in B's queue");
    // B is served.
    send_ping(&b, 0, 0x600D);
    let deadline = Instant::now() + Duration::from_secs(5);
    while b.get_u32(4096) == 0 {
        assert!(Instant::now() < deadline, "B not served");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut pong = [0u8; 64];
    b.shm
        .as_volatile_slice()
        .read_slice(&mut pong, b.slot(4096, 0))
        .unwrap();
    assert_eq!(decode(&pong).unwrap().body, Body::Pong { data: 0x600D });
    // SIGTERM ends the server while B is still attached.
    // SAFETY: plain kill(2) on a child we started.
    unsafe { libc::kill(be.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let out = be.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "SIGTERM ignored"
    );
    let stats = String::from_utf8_lossy(&out.stdout);
    assert!(stats.contains("connections=2"), "{stats}");
    drop(b);
}
