//! Shared test fixtures: a real TAP interface, an AF_PACKET socket on it
//! (which sees what the device transmits and injects what it receives),
//! and a driver-side ring in memory built with virtio-queue's mock.
#![allow(dead_code, clippy::undocumented_unsafe_blocks)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use ringfence_device::{DeviceMemory, QueueFailure, QueueHandler, QueueStats};
use ringfence_net::{Net, NetOptions, Tap};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

pub use ringfence_device::Processed;

/// Where shared memory starts (high, so no address is accidentally valid).
pub const AREA: u64 = 1 << 40;
/// Size of shared memory.
pub const AREA_LEN: usize = 4 << 20;
/// Buffers live from here on.
pub const BUFS: u64 = AREA + 0x10000;
/// Ethertype of test frames (IEEE local experimental).
pub const ETHERTYPE: u16 = 0x88b5;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const VERSION_1: u64 = 1 << 32;
pub const EVENT_IDX: u64 = 1 << 29;

pub fn bit(b: u32) -> u64 {
    1u64 << b
}

pub fn memory() -> DeviceMemory {
    DeviceMemory::from_ranges(&[(GuestAddress(AREA), AREA_LEN)]).unwrap()
}

/// A unique interface name: rfnt<pid % 1000><n>.
pub fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "rfnt{}x{}",
        std::process::id() % 1000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A TAP interface, up, with IPv6 off so the kernel sends nothing of its
/// own through it; and the net device on it.
pub struct Fixture {
    pub name: String,
    pub ifindex: i32,
    pub net: Net,
}

pub fn fixture(pairs: u16) -> Fixture {
    fixture_with(NetOptions {
        queue_pairs: pairs,
        mac: Some([0x02, 0, 0, 0, 0, 0x42]),
        ..Default::default()
    })
}

pub fn fixture_with(opts: NetOptions) -> Fixture {
    let name = unique_name();
    let taps = Tap::open(&name, opts.queue_pairs).expect("TAP (tests run as root)");
    assert_eq!(taps[0].name().unwrap(), name);
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    taps[0].set_up().unwrap();
    let cname = std::ffi::CString::new(name.clone()).unwrap();
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
    assert!(ifindex > 0);
    let net = Net::new(taps, opts).unwrap();
    Fixture { name, ifindex, net }
}

/// An Ethernet frame of `len` bytes: broadcast, from 02:..:01, ETHERTYPE,
/// payload bytes counting from `seed`.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ETHERTYPE.to_be_bytes());
    let mut b = seed;
    while f.len() < len {
        f.push(b);
        b = b.wrapping_add(1);
    }
    f
}

/// An AF_PACKET socket bound to the interface for ETHERTYPE frames.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    pub fn new(ifindex: i32) -> Self {
        Self::for_protocol(ifindex, ETHERTYPE)
    }

    /// A socket for frames of ethertype `proto`.
    pub fn for_protocol(ifindex: i32, proto: u16) -> Self {
        let proto = proto.to_be();
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = ifindex;
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        PacketSocket { fd, ifindex }
    }

    /// The next frame the interface received (from the TAP), if one comes
    /// within `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if !poll_readable(self.fd.as_raw_fd(), left) {
                return None;
            }
            let mut buf = vec![0u8; 70000];
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut sl = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&mut sll as *mut libc::sockaddr_ll).cast(),
                    &mut sl,
                )
            };
            if n < 0 {
                continue;
            }
            if sll.sll_pkttype == libc::PACKET_OUTGOING {
                continue; // what we injected ourselves
            }
            buf.truncate(n as usize);
            return Some(buf);
        }
    }

    /// Sends `frame` out of the interface: it arrives on the TAP queue.
    pub fn inject(&self, frame: &[u8]) {
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = ETHERTYPE.to_be();
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&frame[..6]);
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "inject: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether `fd` becomes readable within `timeout`.
pub fn poll_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let r = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    r == 1 && p.revents & libc::POLLIN != 0
}

/// One descriptor: (address, length, device-writable).
pub type Desc = (u64, u32, bool);

/// The driver side of one split ring.
pub struct Ring<'a> {
    pub mem: &'a DeviceMemory,
    pub mock: MockSplitQueue<'a, DeviceMemory>,
    pub queue: Queue,
    pub stats: QueueStats,
    size: u16,
    next_desc: u16,
    avail: u16,
}

impl<'a> Ring<'a> {
    pub fn new(mem: &'a DeviceMemory, size: u16) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(AREA), size);
        let queue: Queue = mock.create_queue().unwrap();
        Ring {
            mem,
            mock,
            queue,
            stats: QueueStats::default(),
            size,
            next_desc: 0,
            avail: 0,
        }
    }

    pub fn event_idx(mut self) -> Self {
        self.queue.set_event_idx(true);
        self
    }

    /// Stores `descs` as one chain with raw flags and publishes it.
    pub fn publish_raw(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let head = self.next_desc;
        for &(addr, len, flags, next) in descs {
            let d = SplitDescriptor::new(addr, len, flags, next);
            self.mock
                .desc_table()
                .store(self.next_desc % self.size, RawDescriptor::from(d))
                .unwrap();
            self.next_desc = self.next_desc.wrapping_add(1);
        }
        self.push_avail(head % self.size);
        head % self.size
    }

    /// Publishes `descs` as one chain (NEXT links filled in).
    pub fn publish(&mut self, descs: &[Desc]) -> u16 {
        let base = self.next_desc;
        let raw: Vec<(u64, u32, u16, u16)> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let last = i + 1 == descs.len();
                let mut flags = if w { F_WRITE } else { 0 };
                if !last {
                    flags |= F_NEXT;
                }
                let next = (base.wrapping_add(i as u16 + 1)) % self.size;
                (addr, len, flags, next)
            })
            .collect();
        self.publish_raw(&raw)
    }

    fn push_avail(&mut self, head: u16) {
        let slot = self.avail % self.size;
        self.mock
            .avail()
            .ring()
            .ref_at(slot as usize)
            .unwrap()
            .store(head);
        self.avail = self.avail.wrapping_add(1);
        self.mock.avail().idx().store(self.avail);
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(self.mock.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// Used element `i`: (id, len).
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self
            .mock
            .used_addr()
            .unchecked_add(4 + 8 * u64::from(i % self.size));
        (
            self.mem.read_obj(at).unwrap(),
            self.mem.read_obj(at.unchecked_add(4)).unwrap(),
        )
    }

    /// The avail_event field the device writes (EVENT_IDX).
    pub fn avail_event(&self) -> u16 {
        self.mem
            .read_obj(
                self.mock
                    .used_addr()
                    .unchecked_add(4 + 8 * u64::from(self.size)),
            )
            .unwrap()
    }

    pub fn run(&mut self, h: &mut dyn QueueHandler) -> Result<Processed, QueueFailure> {
        h.process(&mut self.queue, self.mem, &self.stats)
    }
}

pub fn write(mem: &DeviceMemory, at: u64, bytes: &[u8]) {
    mem.write_slice(bytes, GuestAddress(at)).unwrap();
}

pub fn read(mem: &DeviceMemory, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

pub fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// An IPv4 frame (10.0.0.1 -> 10.0.0.2) carrying `l4` (a UDP or TCP header
/// and payload) with IP protocol `ip_proto`; checksums left zero.
pub fn ipv4_frame(ip_proto: u8, l4: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 0x42, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    let total = (20 + l4.len()) as u16;
    f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0]);
    f.extend_from_slice(&[64, ip_proto, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
    f.extend_from_slice(l4);
    f
}
