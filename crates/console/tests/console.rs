//! virtio-console against real PTYs, Unix sockets and pipes, and against
//! hostile chains, through the same `process` path the transports use.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ringfence_console::{
    Console, ConsoleBackend, ConsoleOptions, ConsoleStats, CONFIG_SIZE, RX_HELD_MAX, TX_CHAIN_MAX,
    VIRTIO_CONSOLE_F_SIZE,
};
use ringfence_device::{
    ChainError, DeviceMemory, Processed, QueueFailure, QueueHandler, QueueStats, VirtioDevice,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

const AREA: u64 = 0x1_0000_0000;
const MEM: usize = 1 << 20;
const RXQ: u64 = AREA;
const TXQ: u64 = AREA + 0x4000;
const DATA: u64 = AREA + 0x10000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QSIZE: u16 = 16;
const PATTERN: u8 = 0xA5;

/// A driver side: a mock split queue whose chains are published one by one.
struct Driver<'a> {
    mem: &'a DeviceMemory,
    mock: MockSplitQueue<'a, DeviceMemory>,
    queue: Queue,
    next_desc: u16,
    avail: u16,
}

impl<'a> Driver<'a> {
    fn new(mem: &'a DeviceMemory, at: u64) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(at), QSIZE);
        let queue = mock.create_queue().unwrap();
        Self {
            mem,
            mock,
            queue,
            next_desc: 0,
            avail: 0,
        }
    }

    /// Publishes a chain of (addr, len, flags) linked in order.
    fn push(&mut self, descs: &[(u64, u32, u16)]) {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = (head + i as u16) % QSIZE;
            let last = i + 1 == descs.len();
            let flags = if last { flags } else { flags | F_NEXT };
            let d = SplitDescriptor::new(addr, len, flags, (idx + 1) % QSIZE);
            self.mock
                .desc_table()
                .store(idx, RawDescriptor::from(d))
                .unwrap();
        }
        self.publish(head);
        self.next_desc = (head + descs.len() as u16) % QSIZE;
    }

    /// Publishes raw descriptors (index, addr, len, flags, next), head first.
    fn push_raw(&mut self, descs: &[(u16, u64, u32, u16, u16)]) {
        for &(idx, addr, len, flags, next) in descs {
            let d = SplitDescriptor::new(addr, len, flags, next);
            self.mock
                .desc_table()
                .store(idx, RawDescriptor::from(d))
                .unwrap();
        }
        self.publish(descs[0].0);
    }

    fn publish(&mut self, head: u16) {
        self.mock
            .avail()
            .ring()
            .ref_at(usize::from(self.avail % QSIZE))
            .unwrap()
            .store(head);
        self.avail = self.avail.wrapping_add(1);
        self.mock.avail().idx().store(self.avail);
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(self.mock.used_addr().unchecked_add(2))
            .unwrap()
    }

    fn used_len(&self, i: u16) -> u32 {
        let at = 4 + 8 * u64::from(i % QSIZE) + 4;
        self.mem
            .read_obj(self.mock.used_addr().unchecked_add(at))
            .unwrap()
    }

    fn run(&mut self, h: &mut dyn QueueHandler) -> Result<Processed, QueueFailure> {
        h.process(&mut self.queue, self.mem, &QueueStats::default())
    }
}

fn memory() -> DeviceMemory {
    DeviceMemory::from_ranges(&[(GuestAddress(AREA), MEM)]).unwrap()
}

fn paint(mem: &DeviceMemory, at: u64, len: usize) {
    mem.write_slice(&vec![PATTERN; len], GuestAddress(at))
        .unwrap();
}

fn read(mem: &DeviceMemory, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(at)).unwrap();
    v
}

fn untouched(mem: &DeviceMemory, at: u64, len: usize) -> bool {
    read(mem, at, len).iter().all(|&b| b == PATTERN)
}

fn handlers(c: &mut Console) -> (Box<dyn QueueHandler>, Box<dyn QueueHandler>) {
    let mut v = c.activate(c.device_features()).unwrap();
    assert_eq!(v.len(), 2);
    let tx = v.pop().unwrap();
    let rx = v.pop().unwrap();
    (rx, tx)
}

/// poll(2) for `events` within `timeout_ms`; returns revents.
fn poll(fd: RawFd, events: i16, timeout_ms: i32) -> i16 {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    if n == 1 {
        p.revents
    } else {
        0
    }
}

fn readable(fd: RawFd, timeout_ms: i32) -> bool {
    poll(fd, libc::POLLIN, timeout_ms) & libc::POLLIN != 0
}

/// Reads exactly `n` bytes within a few seconds (panics otherwise).
fn read_exact_timeout(f: &mut (impl Read + AsRawFd), n: usize) -> Vec<u8> {
    let fd = f.as_raw_fd();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::new();
    while out.len() < n {
        assert!(Instant::now() < deadline, "only {:?} arrived", out);
        if !readable(fd, 100) {
            continue;
        }
        let mut buf = vec![0; n - out.len()];
        let got = f.read(&mut buf).unwrap();
        out.extend_from_slice(&buf[..got]);
    }
    out
}

/// Nothing more to read within a short while.
fn quiet(fd: RawFd) -> bool {
    !readable(fd, 100)
}

fn open_slave(c: &Console) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(c.pty_path().expect("a PTY console has a slave path"))
        .unwrap()
}

fn pty() -> Console {
    Console::new(
        ConsoleBackend::Pty,
        ConsoleOptions {
            queue_size: QSIZE,
            ..Default::default()
        },
    )
    .unwrap()
}

fn counters(s: &ConsoleStats) -> [u64; 5] {
    [
        s.rx_bytes.load(Ordering::Relaxed),
        s.tx_bytes.load(Ordering::Relaxed),
        s.tx_dropped.load(Ordering::Relaxed),
        s.malformed.load(Ordering::Relaxed),
        s.broken.load(Ordering::Relaxed),
    ]
}

/// Waits until the RX handler's wake descriptor says input is there.
fn wait_input(rx: &dyn QueueHandler) {
    let fd = rx.wake_fd().expect("input is polled");
    assert!(readable(fd, 5000), "input never arrived");
}

#[test]
fn identity_features_and_config() {
    let c = pty();
    assert_eq!(c.device_type(), 3);
    assert_eq!(c.num_queues(), 2);
    assert_eq!(c.config_size(), CONFIG_SIZE);
    assert_eq!(c.device_features(), 0b101, "F_SIZE and F_EMERG_WRITE");
    let mut cfg = [0u8; CONFIG_SIZE];
    c.read_config(0, &mut cfg).unwrap();
    assert_eq!(
        u32::from_le_bytes(cfg[4..8].try_into().unwrap()),
        1,
        "max_nr_ports"
    );
    assert!(c.read_config(10, &mut [0u8; 4]).is_err());

    // A pipe is not a terminal: no F_SIZE.
    let (r, w) = pipe();
    let c = Console::new(
        ConsoleBackend::Fds { read: r, write: w },
        ConsoleOptions {
            queue_size: QSIZE,
            emergency_write: false,
        },
    )
    .unwrap();
    assert_eq!(c.device_features(), 0);
    assert_eq!(c.size(), None);
    assert!(Console::new(
        ConsoleBackend::Pty,
        ConsoleOptions {
            queue_size: 12,
            ..Default::default()
        }
    )
    .is_err());
}

#[test]
fn guest_output_appears_on_the_pty_slave() {
    let mem = memory();
    let mut c = pty();
    let mut slave = open_slave(&c);
    let (_rx, mut tx) = handlers(&mut c);
    let msg = b"hello\n\r\x00\x7fworld";
    mem.write_slice(msg, GuestAddress(DATA)).unwrap();
    mem.write_slice(b"+tail", GuestAddress(DATA + 0x1000))
        .unwrap();
    let mut drv = Driver::new(&mem, TXQ);
    drv.push(&[(DATA, msg.len() as u32, 0), (DATA + 0x1000, 5, 0)]);
    let p = drv.run(tx.as_mut()).unwrap();
    assert_eq!(p.chains, 1);
    assert_eq!((drv.used_idx(), drv.used_len(0)), (1, 0));
    let mut want = msg.to_vec();
    want.extend_from_slice(b"+tail");
    // Raw mode: bytes pass unchanged (no \n -> \r\n, nothing eaten).
    assert_eq!(read_exact_timeout(&mut slave, want.len()), want);
    assert!(quiet(slave.as_raw_fd()));
    assert_eq!(counters(c.stats()), [0, want.len() as u64, 0, 0, 0]);
}

#[test]
fn input_on_the_slave_arrives_exactly_in_a_receive_buffer() {
    let mem = memory();
    let mut c = pty();
    let mut slave = open_slave(&c);
    let (mut rx, _tx) = handlers(&mut c);
    paint(&mem, DATA, 0x1000);
    let mut drv = Driver::new(&mem, RXQ);
    drv.push(&[(DATA + 0x100, 64, F_WRITE)]);

    // No input yet: not ready, and the buffer waits (starved).
    let p = drv.run(rx.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, true));
    assert_eq!(drv.used_idx(), 0);
    assert!(!rx.ready());

    let msg = b"ls -l\r\x03\x04\x1b[A";
    slave.write_all(msg).unwrap();
    wait_input(rx.as_ref());
    let p = drv.run(rx.as_mut()).unwrap();
    assert_eq!(p.chains, 1);
    assert_eq!(drv.used_len(0), msg.len() as u32);
    assert_eq!(read(&mem, DATA + 0x100, msg.len()), msg);
    assert!(untouched(&mem, DATA, 0x100));
    assert!(untouched(&mem, DATA + 0x100 + msg.len() as u64, 0x100));
    assert_eq!(counters(c.stats())[0], msg.len() as u64);
    // The input is drained: the wake descriptor is quiet again.
    assert!(!readable(rx.wake_fd().unwrap(), 0));
}

#[test]
fn input_is_held_while_the_driver_has_no_buffers_and_delivered_in_order() {
    let mem = memory();
    let mut c = pty();
    let mut slave = open_slave(&c);
    let (mut rx, _tx) = handlers(&mut c);
    let mut drv = Driver::new(&mem, RXQ);

    slave.write_all(b"xyz").unwrap();
    wait_input(rx.as_ref());
    // No buffer: the input is read into the held buffer and kept.
    let p = drv.run(rx.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, false));
    // More input while something is held stays in the PTY.
    slave.write_all(b"123").unwrap();
    assert!(readable(rx.wake_fd().unwrap(), 5000));
    let p = drv.run(rx.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, false));
    assert!(
        readable(rx.wake_fd().unwrap(), 0),
        "held input must not cause more reads"
    );

    drv.push(&[(DATA, 2, F_WRITE)]);
    drv.run(rx.as_mut()).unwrap();
    drv.push(&[(DATA + 0x100, 64, F_WRITE)]);
    drv.push(&[(DATA + 0x200, 64, F_WRITE)]);
    drv.run(rx.as_mut()).unwrap();
    assert_eq!(drv.used_idx(), 3);
    assert_eq!(
        (drv.used_len(0), drv.used_len(1), drv.used_len(2)),
        (2, 1, 3)
    );
    assert_eq!(read(&mem, DATA, 2), b"xy");
    assert_eq!(read(&mem, DATA + 0x100, 1), b"z");
    assert_eq!(read(&mem, DATA + 0x200, 3), b"123");
    assert_eq!(counters(c.stats())[0], 6);
}

#[test]
fn held_input_survives_a_reset() {
    let mem = memory();
    let mut c = pty();
    let mut slave = open_slave(&c);
    let (mut rx, _tx) = handlers(&mut c);
    slave.write_all(b"before reset").unwrap();
    wait_input(rx.as_ref());
    assert!(rx.ready());
    drop(rx);
    c.reset();
    let (mut rx, _tx) = handlers(&mut c);
    let mut drv = Driver::new(&mem, RXQ);
    drv.push(&[(DATA, 64, F_WRITE)]);
    drv.run(rx.as_mut()).unwrap();
    assert_eq!(drv.used_len(0), 12);
    assert_eq!(read(&mem, DATA, 12), b"before reset");
}

#[test]
fn large_input_arrives_complete_across_buffers() {
    let mem = memory();
    let mut c = pty();
    let slave = open_slave(&c);
    let (mut rx, _tx) = handlers(&mut c);
    let data: Vec<u8> = (0..3 * RX_HELD_MAX + 123)
        .map(|i| (i % 251) as u8)
        .collect();
    let mut w = slave.try_clone().unwrap();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || w.write_all(&data).unwrap())
    };
    let mut drv = Driver::new(&mem, RXQ);
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < data.len() {
        assert!(
            Instant::now() < deadline,
            "only {} bytes arrived",
            got.len()
        );
        let before = drv.used_idx();
        drv.push(&[(DATA, 1000, F_WRITE), (DATA + 0x1000, 1000, F_WRITE)]);
        let p = drv.run(rx.as_mut()).unwrap();
        if p.chains == 0 {
            let _ = readable(rx.wake_fd().unwrap(), 100);
            drv.run(rx.as_mut()).unwrap();
        }
        // The chain stays queued until it is used.
        if drv.used_idx() != before {
            let n = drv.used_len(before) as usize;
            let first = n.min(1000);
            got.extend(read(&mem, DATA, first));
            got.extend(read(&mem, DATA + 0x1000, n - first));
        } else {
            // The chain is still pending: do not publish another one.
            drv.avail = drv.avail.wrapping_sub(1);
            drv.mock.avail().idx().store(drv.avail);
        }
    }
    writer.join().unwrap();
    assert_eq!(got, data);
}

#[test]
fn output_nobody_reads_is_dropped_and_counted_without_blocking() {
    let mem = memory();
    let mut c = pty();
    let (_rx, mut tx) = handlers(&mut c);
    mem.write_slice(&vec![b'x'; TX_CHAIN_MAX as usize], GuestAddress(DATA))
        .unwrap();
    let mut drv = Driver::new(&mem, TXQ);
    let chains = 12u64;
    for _ in 0..chains {
        drv.push(&[(DATA, TX_CHAIN_MAX as u32, 0)]);
    }
    let start = Instant::now();
    let p = drv.run(tx.as_mut()).unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(p.chains, chains as usize);
    let [_, sent, dropped, malformed, _] = counters(c.stats());
    assert_eq!(sent + dropped, chains * TX_CHAIN_MAX);
    assert!(
        dropped > 0,
        "a PTY buffer cannot hold {} bytes",
        chains * TX_CHAIN_MAX
    );
    assert_eq!(malformed, 0);

    // A client that opens the slave later reads what the PTY held, in order.
    let mut slave = open_slave(&c);
    let got = read_exact_timeout(&mut slave, 100);
    assert!(got.iter().all(|&b| b == b'x'));
}

#[test]
fn the_master_never_hangs_up_when_clients_come_and_go() {
    let mut c = pty();
    let (rx, _tx) = handlers(&mut c);
    let fd = rx.wake_fd().unwrap();
    let all = libc::POLLIN | libc::POLLHUP | libc::POLLERR;
    assert_eq!(poll(fd, all, 0), 0, "no client yet: nothing to report");
    drop(open_slave(&c));
    assert_eq!(
        poll(fd, all, 50),
        0,
        "a client left: still nothing to report"
    );
    let mut again = open_slave(&c);
    again.write_all(b"k").unwrap();
    assert!(readable(fd, 5000));
}

#[test]
fn terminal_size_follows_the_slave() {
    let mut c = pty();
    let slave = open_slave(&c);
    let ws = libc::winsize {
        ws_row: 43,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    assert_eq!(
        unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
    assert!(c.refresh_size());
    assert!(!c.refresh_size(), "unchanged size is not a change");
    assert_eq!(c.size(), Some((132, 43)));
    let mut cfg = [0u8; 4];
    c.read_config(0, &mut cfg).unwrap();
    assert_eq!(cfg, [132, 0, 43, 0]);
}

fn set_size(slave: &File, cols: u16, rows: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    assert_eq!(
        unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSWINSZ, &ws) },
        0
    );
}

#[test]
fn a_live_console_with_f_size_is_watched_for_resizes() {
    let mut c = pty();
    let slave = open_slave(&c);
    // Without F_SIZE acked there is nothing to watch.
    let _ = c.activate(0).unwrap();
    assert!(c.config_watch().is_none());
    c.reset();
    let _ = c.activate(1 << VIRTIO_CONSOLE_F_SIZE).unwrap();
    let mut watch = c.config_watch().expect("F_SIZE acked on a terminal");
    assert!(watch.interval() <= Duration::from_secs(1));
    assert!(!watch.poll(), "no resize yet");
    set_size(&slave, 100, 37);
    assert!(watch.poll(), "a resize is a config change");
    assert!(!watch.poll(), "and only once");
    // The model serves what the watch found.
    let mut cfg = [0u8; 4];
    c.read_config(0, &mut cfg).unwrap();
    assert_eq!(cfg, [100, 0, 37, 0]);
    assert_eq!(c.size(), Some((100, 37)));
}

#[test]
fn emergency_write_outputs_one_character() {
    let mut c = pty();
    let mut slave = open_slave(&c);
    c.write_config(8, &u32::from(b'!').to_le_bytes()).unwrap();
    c.write_config(8, b"?").unwrap();
    assert_eq!(read_exact_timeout(&mut slave, 2), b"!?");
    assert!(c.write_config(0, &[1, 0]).is_err(), "cols is read-only");
    assert!(c.write_config(9, &[1]).is_err());
    assert!(c.write_config(8, &[1, 2]).is_err());
    assert!(c.write_config(12, &[1]).is_err());
    assert!(c.write_config(u64::MAX, &[1]).is_err());
    assert_eq!(counters(c.stats())[1], 2);
}

fn socket_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "ringfence-console-{tag}-{}.sock",
        std::process::id()
    ))
}

#[test]
fn unix_socket_round_trip_and_client_replacement() {
    let mem = memory();
    let path = socket_path("rt");
    let mut c = Console::new(
        ConsoleBackend::UnixSocket(path.clone()),
        ConsoleOptions {
            queue_size: QSIZE,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.socket_path(), Some(path.as_path()));
    assert_eq!(c.device_features() & 1, 0, "a socket has no size");
    let (mut rx, mut tx) = handlers(&mut c);
    let wake = rx.wake_fd().unwrap();
    let mut rxd = Driver::new(&mem, RXQ);
    let mut txd = Driver::new(&mem, TXQ);

    // Output with no client is dropped.
    mem.write_slice(b"early", GuestAddress(DATA)).unwrap();
    txd.push(&[(DATA, 5, 0)]);
    txd.run(tx.as_mut()).unwrap();
    assert_eq!(counters(c.stats())[2], 5);

    let mut a = UnixStream::connect(&path).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The transmit side picks the client up by itself.
    mem.write_slice(b"to a", GuestAddress(DATA)).unwrap();
    txd.push(&[(DATA, 4, 0)]);
    txd.run(tx.as_mut()).unwrap();
    assert_eq!(read_exact_timeout(&mut a, 4), b"to a");

    a.write_all(b"ping").unwrap();
    rxd.push(&[(DATA + 0x1000, 64, F_WRITE)]);
    assert!(readable(wake, 5000));
    rxd.run(rx.as_mut()).unwrap();
    assert_eq!(rxd.used_len(0), 4);
    assert_eq!(read(&mem, DATA + 0x1000, 4), b"ping");

    // A second client replaces the first, which sees end of file.
    let mut b = UnixStream::connect(&path).unwrap();
    rxd.push(&[(DATA + 0x1000, 64, F_WRITE)]);
    assert!(readable(wake, 5000), "a new client wakes the receive side");
    let p = rxd.run(rx.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, true));
    let mut eof = [0u8; 1];
    assert_eq!(a.read(&mut eof).unwrap(), 0, "the old client is closed");
    mem.write_slice(b"to b", GuestAddress(DATA)).unwrap();
    txd.push(&[(DATA, 4, 0)]);
    txd.run(tx.as_mut()).unwrap();
    assert_eq!(read_exact_timeout(&mut b, 4), b"to b");
    b.write_all(b"pong").unwrap();
    assert!(readable(wake, 5000));
    rxd.run(rx.as_mut()).unwrap();
    assert_eq!(rxd.used_len(1), 4);
    assert_eq!(read(&mem, DATA + 0x1000, 4), b"pong");

    // The client leaves: the wake descriptor settles (no spin), output drops.
    drop(b);
    rxd.push(&[(DATA + 0x1000, 64, F_WRITE)]);
    assert!(readable(wake, 5000), "a hang-up wakes the receive side");
    let p = rxd.run(rx.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, true));
    assert!(
        !readable(wake, 50),
        "a gone client must not keep the wake fd readable"
    );
    txd.push(&[(DATA, 4, 0)]);
    txd.run(tx.as_mut()).unwrap();
    assert_eq!(counters(c.stats())[2], 9);
    drop((rx, tx));
    drop(c);
    assert!(!path.exists(), "the socket file is removed with the device");
}

#[test]
fn a_stale_socket_file_is_replaced_but_other_files_are_not() {
    let path = socket_path("stale");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let c = Console::new(
        ConsoleBackend::UnixSocket(path.clone()),
        ConsoleOptions::default(),
    )
    .unwrap();
    assert!(UnixStream::connect(&path).is_ok());
    // A live socket is not stolen.
    assert!(Console::new(
        ConsoleBackend::UnixSocket(path.clone()),
        ConsoleOptions::default()
    )
    .is_err());
    drop(c);

    let file = socket_path("regular");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(Console::new(
        ConsoleBackend::UnixSocket(file.clone()),
        ConsoleOptions::default()
    )
    .is_err());
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
    std::fs::remove_file(&file).unwrap();
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) = std::io::pipe().unwrap();
    (r.into(), w.into())
}

#[test]
fn fds_backend_stops_polling_at_end_of_input_and_drops_on_epipe() {
    let mem = memory();
    let (in_r, in_w) = pipe();
    let (out_r, out_w) = pipe();
    let mut c = Console::new(
        ConsoleBackend::Fds {
            read: in_r,
            write: out_w,
        },
        ConsoleOptions {
            queue_size: QSIZE,
            ..Default::default()
        },
    )
    .unwrap();
    let (mut rx, mut tx) = handlers(&mut c);
    let mut in_w = File::from(in_w);
    in_w.write_all(b"last words").unwrap();
    drop(in_w);
    let mut rxd = Driver::new(&mem, RXQ);
    rxd.push(&[(DATA, 64, F_WRITE)]);
    rxd.push(&[(DATA + 0x100, 64, F_WRITE)]);
    let p = rxd.run(rx.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (1, true));
    assert_eq!(read(&mem, DATA, 10), b"last words");
    // End of file: the pipe would report POLLHUP forever, so it is no longer offered.
    assert_eq!(rx.wake_fd(), None);
    assert!(!rx.ready());

    // Output to a pipe whose reader is gone: EPIPE, dropped, no signal.
    drop(out_r);
    mem.write_slice(b"void", GuestAddress(DATA)).unwrap();
    let mut txd = Driver::new(&mem, TXQ);
    txd.push(&[(DATA, 4, 0)]);
    txd.run(tx.as_mut()).unwrap();
    assert_eq!(counters(c.stats()), [10, 0, 4, 0, 0]);
}

#[test]
fn a_transmit_chain_is_capped() {
    let mem = memory();
    let (in_r, _in_w) = pipe();
    let out = std::env::temp_dir().join(format!("ringfence-console-cap-{}", std::process::id()));
    let file = File::create(&out).unwrap();
    let mut c = Console::new(
        ConsoleBackend::Fds {
            read: in_r,
            write: file.into(),
        },
        ConsoleOptions {
            queue_size: QSIZE,
            ..Default::default()
        },
    )
    .unwrap();
    let (_rx, mut tx) = handlers(&mut c);
    let len = 2 * TX_CHAIN_MAX as usize;
    let data: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
    mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    let mut txd = Driver::new(&mem, TXQ);
    txd.push(&[(DATA, 1000, 0), (DATA + 1000, (len - 1000) as u32, 0)]);
    txd.run(tx.as_mut()).unwrap();
    let written = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    assert_eq!(written, &data[..TX_CHAIN_MAX as usize]);
    assert_eq!(counters(c.stats()), [0, TX_CHAIN_MAX, TX_CHAIN_MAX, 0, 0]);
}

#[test]
fn hostile_chains_are_counted_and_write_nothing() {
    let mem = memory();
    let mut c = pty();
    let mut slave = open_slave(&c);
    let (mut rx, mut tx) = handlers(&mut c);
    slave.write_all(b"secret").unwrap();
    wait_input(rx.as_ref());
    paint(&mem, DATA, 0x2000);
    let mut rxd = Driver::new(&mem, RXQ);
    // Receive: a device-readable descriptor, a buffer leaving memory, a
    // huge length. None may be written, and the input must stay held.
    rxd.push(&[(DATA, 64, F_WRITE), (DATA + 0x100, 64, 0)]);
    rxd.push(&[(AREA + MEM as u64 - 8, 64, F_WRITE)]);
    rxd.push(&[(DATA, u32::MAX, F_WRITE)]);
    rxd.push(&[(DATA + 0x1000, 64, F_WRITE)]);
    let p = rxd.run(rx.as_mut()).unwrap();
    assert_eq!(p.chains, 4);
    assert_eq!(
        (
            rxd.used_len(0),
            rxd.used_len(1),
            rxd.used_len(2),
            rxd.used_len(3)
        ),
        (0, 0, 0, 6)
    );
    assert!(untouched(&mem, DATA, 0x1000));
    assert_eq!(read(&mem, DATA + 0x1000, 6), b"secret");

    // Transmit: a device-writable descriptor, a buffer leaving memory, a huge length.
    mem.write_slice(b"leak", GuestAddress(DATA)).unwrap();
    let mut txd = Driver::new(&mem, TXQ);
    txd.push(&[(DATA, 4, 0), (DATA + 0x100, 4, F_WRITE)]);
    txd.push(&[(AREA + MEM as u64 - 2, 4, 0)]);
    txd.push(&[(DATA, u32::MAX, 0)]);
    let p = txd.run(tx.as_mut()).unwrap();
    assert_eq!(p.chains, 3);
    assert_eq!(
        (txd.used_len(0), txd.used_len(1), txd.used_len(2)),
        (0, 0, 0)
    );
    assert!(
        quiet(slave.as_raw_fd()),
        "nothing of a malformed chain may be written"
    );
    assert_eq!(counters(c.stats()), [6, 0, 0, 6, 0]);

    // A loop breaks the queue, without touching the input.
    txd.push_raw(&[(8, DATA, 4, F_NEXT, 9), (9, DATA, 4, F_NEXT, 8)]);
    match txd.run(tx.as_mut()) {
        Err(QueueFailure::Chain(ChainError::Broken { .. } | ChainError::TooLong { .. })) => {}
        other => panic!("expected a broken chain, got {other:?}"),
    }
    assert!(quiet(slave.as_raw_fd()));
    assert_eq!(c.stats().broken.load(Ordering::Relaxed), 1);
}

#[test]
fn clones_share_the_backend_end() {
    let mem = memory();
    let mut a = pty();
    let mut b = a.try_clone().unwrap();
    assert_eq!(a.pty_path(), b.pty_path());
    let mut slave = open_slave(&a);
    let (_rx, mut tx) = handlers(&mut b);
    mem.write_slice(b"from b", GuestAddress(DATA)).unwrap();
    let mut txd = Driver::new(&mem, TXQ);
    txd.push(&[(DATA, 6, 0)]);
    txd.run(tx.as_mut()).unwrap();
    assert_eq!(read_exact_timeout(&mut slave, 6), b"from b");
    assert_eq!(counters(b.stats())[1], 6);
    assert_eq!(counters(a.stats())[1], 0);

    // Input held by one instance is not lost when a clone takes over.
    let (mut rx_a, _tx_a) = handlers(&mut a);
    slave.write_all(b"typed").unwrap();
    wait_input(rx_a.as_ref());
    assert!(rx_a.ready());
    drop(rx_a);
    drop(a);
    let (mut rx_b, _tx_b) = handlers(&mut b);
    let mut rxd = Driver::new(&mem, RXQ);
    rxd.push(&[(DATA + 0x1000, 64, F_WRITE)]);
    rxd.run(rx_b.as_mut()).unwrap();
    assert_eq!(rxd.used_len(0), 5);
    assert_eq!(read(&mem, DATA + 0x1000, 5), b"typed");
}

#[test]
fn stdio_backend_builds() {
    let c = Console::new(ConsoleBackend::Stdio, ConsoleOptions::default()).unwrap();
    assert_eq!(c.pty_path(), None);
}
