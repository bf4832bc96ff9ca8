//! A guest driver in a few lines: split rings in memory (set up with
//! virtio-queue's `MockSplitQueue`), packets written and read by hand, the
//! device's handlers run through `process_queue` exactly as a transport
//! runs them. Real Unix sockets in a temporary directory on the host side.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ringfence_device::{
    process_queue, DeviceMemory, Processed, QueueHandler, QueueStats, VirtioDevice,
};
use ringfence_vsock::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

pub const AREA: u64 = 1 << 40;
const MEM_SIZE: usize = 8 << 20;
const TXQ: u64 = AREA;
const RXQ: u64 = AREA + 0x1_0000;
const EVQ: u64 = AREA + 0x2_0000;
/// Where a tx packet is put: header here, payload at +0x1000.
pub const TX_BUF: u64 = AREA + 0x10_0000;
pub const TX_PAYLOAD: u64 = TX_BUF + 0x1000;
const RX_BUF: u64 = AREA + 0x40_0000;
const RX_SLOT: u64 = 0x1_1000;
pub const QSIZE: u16 = 16;
pub const GUEST_CID: u64 = 3;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
/// What a Linux guest posts: a header and 4 KiB.
pub const RX_LEN: u32 = 44 + 4096;

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A temporary directory, removed on drop. Short, for sun_path.
pub struct Dir(pub PathBuf);

impl Dir {
    pub fn new(tag: &str) -> Dir {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let p = PathBuf::from(format!("/tmp/rfv-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Dir(p)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One packet the device put on the rx queue.
#[derive(Debug, Clone)]
pub struct Packet {
    pub hdr: Header,
    pub data: Vec<u8>,
    /// The used length (0 for a dropped buffer).
    pub used: u32,
}

struct Rings {
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    queue: Queue,
    avail_idx: u16,
    used_seen: u16,
}

impl Rings {
    /// Rings at `at`: descriptors, then avail at +0x1000, used at +0x2000.
    /// Not `MockSplitQueue::create`: its layout puts the used ring inside
    /// the avail ring (the avail ring's end counts entries as bytes), which
    /// shows as soon as more than a few buffers are in flight.
    fn new(mem: &DeviceMemory, at: u64) -> Rings {
        let (desc, avail, used) = (at, at + 0x1000, at + 0x2000);
        mem.write_slice(&[0u8; 0x3000], GuestAddress(at)).unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        Rings {
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            queue,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    fn set_desc(&self, mem: &DeviceMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&d, self.desc.unchecked_add(16 * u64::from(i)))
            .unwrap();
    }

    fn publish(&mut self, mem: &DeviceMemory, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, self.avail.unchecked_add(4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// New used entries: (id, len).
    fn take_used(&mut self, mem: &DeviceMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(self.used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self
                .used
                .unchecked_add(4 + 8 * u64::from(self.used_seen % QSIZE));
            let id: u32 = mem.read_obj(at).unwrap();
            let len: u32 = mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

pub struct Harness {
    pub dir: Dir,
    pub uds: PathBuf,
    pub mem: DeviceMemory,
    pub dev: Vsock,
    pub rx: Box<dyn QueueHandler>,
    pub tx: Box<dyn QueueHandler>,
    pub ev: Box<dyn QueueHandler>,
    rxq: Rings,
    txq: Rings,
    evq: Rings,
    /// Posted rx slots (descriptor index = slot), oldest first.
    posted: VecDeque<u16>,
    /// Length of the rx buffers posted from now on.
    pub rx_len: u32,
    pub qstats: QueueStats,
}

pub fn opts(uds: PathBuf) -> VsockOptions {
    VsockOptions {
        guest_cid: GUEST_CID,
        uds_path: uds,
        queue_size: QSIZE,
        buf_alloc: 64 * 1024,
        max_connections: 16,
    }
}

impl Harness {
    pub fn new(tag: &str) -> Harness {
        Harness::with(tag, |o| o, Duration::from_secs(5))
    }

    pub fn with(
        tag: &str,
        edit: impl FnOnce(VsockOptions) -> VsockOptions,
        connect_timeout: Duration,
    ) -> Harness {
        let dir = Dir::new(tag);
        let uds = dir.0.join("v.sock");
        let mut dev = Vsock::new(edit(opts(uds.clone())))
            .unwrap()
            .with_connect_timeout(connect_timeout);
        let mem = DeviceMemory::from_ranges(&[(GuestAddress(AREA), MEM_SIZE)]).unwrap();
        let rxq = Rings::new(&mem, RXQ);
        let txq = Rings::new(&mem, TXQ);
        let evq = Rings::new(&mem, EVQ);
        let mut h = dev.activate(0).unwrap();
        assert_eq!(h.len(), 3);
        let ev = h.pop().unwrap();
        let tx = h.pop().unwrap();
        let rx = h.pop().unwrap();
        Harness {
            dir,
            uds,
            mem,
            dev,
            rx,
            tx,
            ev,
            rxq,
            txq,
            evq,
            posted: VecDeque::new(),
            rx_len: RX_LEN,
            qstats: QueueStats::default(),
        }
    }

    pub fn stat(&self, f: impl Fn(&VsockStats) -> &AtomicU64) -> u64 {
        f(self.dev.stats()).load(Ordering::Relaxed)
    }

    /// A listener for guest connects to `port`.
    pub fn listen(&self, port: u32) -> UnixListener {
        let mut p = self.uds.as_os_str().to_owned();
        p.push(format!("_{port}"));
        UnixListener::bind(PathBuf::from(p)).unwrap()
    }

    /// A host client of the device's socket.
    pub fn client(&self) -> UnixStream {
        let s = UnixStream::connect(&self.uds).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    }

    /// A guest header for the connection guest `gport` <-> host `hport`.
    pub fn hdr(&self, op: u16, gport: u32, hport: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port: gport,
            dst_port: hport,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 256 * 1024,
            fwd_cnt: 0,
        }
    }

    pub fn mem_write(&self, at: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
    }

    /// Runs the tx queue over one chain made of `descs` (addr, len, flags).
    pub fn send_descs(&mut self, descs: &[(u64, u32, u16)]) -> Processed {
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | F_NEXT };
            self.txq
                .set_desc(&self.mem, i as u16, addr, len, flags, i as u16 + 1);
        }
        self.txq.publish(&self.mem, 0);
        let p = process_queue(
            &mut self.txq.queue,
            &self.mem,
            self.tx.as_mut(),
            &self.qstats,
        )
        .unwrap();
        let used = self.txq.take_used(&self.mem);
        assert_eq!(
            used,
            vec![(0, 0)],
            "a tx chain is used at once with length 0"
        );
        p
    }

    /// Sends a packet: `hdr.len` is set to the payload length.
    pub fn send(&mut self, mut hdr: Header, payload: &[u8]) {
        hdr.len = payload.len() as u32;
        self.send_raw(hdr, payload);
    }

    /// Sends a packet with the header exactly as given.
    pub fn send_raw(&mut self, hdr: Header, payload: &[u8]) {
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(TX_BUF))
            .unwrap();
        if payload.is_empty() {
            self.send_descs(&[(TX_BUF, HDR_LEN as u32, 0)]);
        } else {
            self.mem
                .write_slice(payload, GuestAddress(TX_PAYLOAD))
                .unwrap();
            self.send_descs(&[
                (TX_BUF, HDR_LEN as u32, 0),
                (TX_PAYLOAD, payload.len() as u32, 0),
            ]);
        }
    }

    /// Posts one rx chain made of `descs` at descriptor `head` (for odd
    /// buffers); the regular slots use heads 0..QSIZE-2.
    pub fn post_rx_raw(&mut self, descs: &[(u64, u32, u16)]) {
        let head = QSIZE - 1;
        assert!(descs.len() == 1, "one descriptor at the spare head");
        let (addr, len, flags) = descs[0];
        self.rxq.set_desc(&self.mem, head, addr, len, flags, 0);
        self.rxq.publish(&self.mem, head);
        self.posted.push_back(head);
    }

    /// Posts rx buffers until `n` are outstanding.
    pub fn post_rx(&mut self, n: usize) {
        let n = n.min(usize::from(QSIZE) - 1);
        while self.posted.len() < n {
            let slot = (0..QSIZE - 1).find(|s| !self.posted.contains(s)).unwrap();
            let addr = RX_BUF + RX_SLOT * u64::from(slot);
            self.rxq
                .set_desc(&self.mem, slot, addr, self.rx_len, F_WRITE, 0);
            self.rxq.publish(&self.mem, slot);
            self.posted.push_back(slot);
        }
    }

    /// Runs the rx queue once over what is posted; returns the packets.
    pub fn run_rx(&mut self) -> (Processed, Vec<Packet>) {
        let p = process_queue(
            &mut self.rxq.queue,
            &self.mem,
            self.rx.as_mut(),
            &self.qstats,
        )
        .unwrap();
        let mut out = Vec::new();
        for (id, len) in self.rxq.take_used(&self.mem) {
            let id = id as u16;
            let pos = self.posted.iter().position(|&s| s == id).unwrap();
            self.posted.remove(pos);
            let addr = if id == QSIZE - 1 {
                // The odd buffer: only its length matters, nothing is read.
                out.push(Packet {
                    hdr: Header::default(),
                    data: Vec::new(),
                    used: len,
                });
                continue;
            } else {
                RX_BUF + RX_SLOT * u64::from(id)
            };
            let mut hdr = Header::default();
            let mut data = Vec::new();
            if len as usize >= HDR_LEN {
                let mut raw = [0u8; HDR_LEN];
                self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                hdr = Header::from_bytes(&raw);
                data = vec![0u8; len as usize - HDR_LEN];
                self.mem
                    .read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
                    .unwrap();
                assert_eq!(hdr.len as usize, data.len(), "header len = payload written");
            }
            out.push(Packet {
                hdr,
                data,
                used: len,
            });
        }
        (p, out)
    }

    /// Keeps buffers posted and runs the rx queue once.
    pub fn rx(&mut self) -> Vec<Packet> {
        self.post_rx(usize::from(QSIZE) - 1);
        self.run_rx().1
    }

    /// Runs the rx queue until `done` holds for what came so far (2 s at most).
    pub fn rx_until(&mut self, done: impl Fn(&[Packet]) -> bool) -> Vec<Packet> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut all = Vec::new();
        loop {
            all.extend(self.rx());
            if done(&all) {
                return all;
            }
            assert!(Instant::now() < deadline, "rx timed out; got {all:?}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Runs the rx queue until a packet with `op` comes; returns it and what came before.
    pub fn expect_op(&mut self, op: u16) -> Packet {
        let all = self.rx_until(|ps| ps.iter().any(|p| p.hdr.op == op));
        all.into_iter().find(|p| p.hdr.op == op).unwrap()
    }

    /// Runs the rx queue a few times and asserts nothing came.
    pub fn expect_nothing(&mut self) {
        for _ in 0..5 {
            let got = self.rx();
            assert!(got.is_empty(), "expected no packet, got {got:?}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Whether the rx handler's wake descriptor is readable right now.
    pub fn wake_readable(&self) -> bool {
        fd_readable(self.rx.wake_fd().unwrap())
    }

    /// Guest connect from `gport` to host `hport` (a listener must exist);
    /// returns the host side.
    pub fn guest_connect(
        &mut self,
        listener: &UnixListener,
        gport: u32,
        hport: u32,
        buf_alloc: u32,
    ) -> UnixStream {
        let mut h = self.hdr(OP_REQUEST, gport, hport);
        h.buf_alloc = buf_alloc;
        self.send(h, &[]);
        let p = self.expect_op(OP_RESPONSE);
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (hport, gport));
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s
    }

    /// Host connect to guest port `gport` accepted by the guest; returns
    /// the client (after its `OK` line) and the local port.
    pub fn host_connect(&mut self, gport: u32) -> (UnixStream, u32) {
        let mut c = self.client();
        c.write_all(format!("CONNECT {gport}\n").as_bytes())
            .unwrap();
        let req = self.expect_op(OP_REQUEST);
        assert_eq!(req.hdr.dst_port, gport);
        let local = req.hdr.src_port;
        self.send(self.hdr(OP_RESPONSE, gport, local), &[]);
        let line = read_line(&mut c);
        assert_eq!(line, format!("OK {local}\n"));
        (c, local)
    }

    /// Collects `n` payload bytes from RW packets of one connection.
    pub fn rx_data(&mut self, n: usize) -> Vec<u8> {
        let all = self.rx_until(|ps| {
            ps.iter()
                .filter(|p| p.hdr.op == OP_RW)
                .map(|p| p.data.len())
                .sum::<usize>()
                >= n
        });
        assert!(
            all.iter().all(|p| p.hdr.op == OP_RW),
            "only data expected: {all:?}"
        );
        let data: Vec<u8> = all.iter().flat_map(|p| p.data.iter().copied()).collect();
        assert_eq!(data.len(), n, "more data than expected");
        data
    }
}

/// The rx queue run the way a transport worker runs it, on its own thread:
/// process, and when starved sleep on the handler's wake descriptor. The
/// thread also plays the guest's receive side (reposts buffers, hands the
/// packets over).
pub struct RxWorker {
    stop: Arc<AtomicBool>,
    pub packets: mpsc::Receiver<Packet>,
    /// Rounds that put nothing on the used ring.
    pub idle_rounds: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for RxWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Harness {
    /// Moves the rx handler and its queue to a worker thread.
    pub fn spawn_rx_worker(&mut self) -> RxWorker {
        struct Gone;
        impl QueueHandler for Gone {
            fn handle_chain(
                &mut self,
                _c: ringfence_device::Chain<'_>,
                _m: &DeviceMemory,
            ) -> Result<u32, ringfence_device::ChainError> {
                panic!("the rx queue runs on its worker");
            }
        }
        let mut handler = std::mem::replace(&mut self.rx, Box::new(Gone));
        let mut rings = std::mem::replace(&mut self.rxq, Rings::new(&self.mem, RXQ + 0x8000));
        let mem = self.mem.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let idle = Arc::new(AtomicU64::new(0));
        let (send, packets) = mpsc::channel();
        let rx_len = self.rx_len;
        let posted = std::mem::take(&mut self.posted);
        assert!(
            posted.iter().all(|&s| s != QSIZE - 1),
            "no odd buffer may be posted"
        );
        let (stop2, idle2) = (stop.clone(), idle.clone());
        let thread = std::thread::spawn(move || {
            let stats = QueueStats::default();
            for slot in (0..QSIZE).filter(|s| !posted.contains(s)) {
                let addr = RX_BUF + RX_SLOT * u64::from(slot);
                rings.set_desc(&mem, slot, addr, rx_len, F_WRITE, 0);
                rings.publish(&mem, slot);
            }
            while !stop2.load(Ordering::SeqCst) {
                let p = process_queue(&mut rings.queue, &mem, handler.as_mut(), &stats).unwrap();
                let used = rings.take_used(&mem);
                if used.is_empty() {
                    idle2.fetch_add(1, Ordering::Relaxed);
                }
                for (id, len) in used {
                    let addr = RX_BUF + RX_SLOT * u64::from(id);
                    let mut raw = [0u8; HDR_LEN];
                    mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
                    let hdr = Header::from_bytes(&raw);
                    let mut data = vec![0u8; len as usize - HDR_LEN];
                    mem.read_slice(&mut data, GuestAddress(addr + HDR_LEN as u64))
                        .unwrap();
                    let _ = send.send(Packet {
                        hdr,
                        data,
                        used: len,
                    });
                    rings.publish(&mem, id as u16);
                }
                if p.starved {
                    let mut pfd = libc::pollfd {
                        fd: handler.wake_fd().unwrap(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 50) };
                }
            }
        });
        RxWorker {
            stop,
            packets,
            idle_rounds: idle,
            thread: Some(thread),
        }
    }
}

pub fn fd_readable(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

/// Reads one line byte by byte (so nothing after it is taken).
pub fn read_line(s: &mut UnixStream) -> String {
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while out.last() != Some(&b'\n') {
        let n = s.read(&mut b).unwrap();
        assert_eq!(n, 1, "EOF before the end of the line: {out:?}");
        out.push(b[0]);
    }
    String::from_utf8(out).unwrap()
}

/// Reads until EOF (read timeout applies); returns what came.
pub fn read_to_eof(s: &mut UnixStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

/// A recognisable byte pattern.
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}
