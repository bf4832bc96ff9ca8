//! virtio-rng against hostile and honest chains, through the same
//! `process_queue` path the transports use.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_device::{
    ChainError, DeviceMemory, QueueFailure, QueueHandler, QueueStats, VirtioDevice,
};
use ringfence_rng::{RateLimiter, Rng, RngOptions, REQUEST_CAP};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

const AREA: u64 = 0x1_0000_0000;
const MEM: usize = 1 << 20;
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
    fn new(mem: &'a DeviceMemory) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(AREA), QSIZE);
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

    /// Publishes raw descriptors (addr, len, flags, next) at their index, head first.
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

    fn run(
        &mut self,
        h: &mut dyn QueueHandler,
    ) -> Result<ringfence_device::Processed, QueueFailure> {
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

/// Random bytes: at most a handful may equal the pattern by chance.
fn randomized(mem: &DeviceMemory, at: u64, len: usize) -> bool {
    let same = read(mem, at, len).iter().filter(|&&b| b == PATTERN).count();
    same <= len / 16 + 2
}

fn handler(rng: &mut Rng) -> Box<dyn QueueHandler> {
    rng.activate(0).unwrap().pop().unwrap()
}

fn readable_now(fd: RawFd, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let n = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    n == 1 && p.revents & libc::POLLIN != 0
}

#[test]
fn device_identity_and_empty_config() {
    let rng = Rng::new(RngOptions::default()).unwrap();
    assert_eq!(rng.device_type(), 4);
    assert_eq!(rng.device_features(), 0);
    assert_eq!(rng.num_queues(), 1);
    assert_eq!(rng.config_size(), 0);
    assert!(rng.read_config(0, &mut [0u8; 1]).is_err());
    assert!(rng.read_config(0, &mut []).is_ok());
    assert!(Rng::new(RngOptions {
        queue_size: 100,
        ..Default::default()
    })
    .is_err());
    assert!(RateLimiter::new(0).is_err());
}

#[test]
fn fills_exactly_the_writable_buffers() {
    let mem = memory();
    let mut rng = Rng::new(RngOptions::default()).unwrap();
    let mut h = handler(&mut rng);
    assert!(h.wake_fd().is_none());
    paint(&mem, DATA, 0x3000);
    let mut drv = Driver::new(&mem);
    // 100 bytes at +0x100 and 50 bytes at +0x1000: guard bytes around both.
    drv.push(&[(DATA + 0x100, 100, F_WRITE), (DATA + 0x1000, 50, F_WRITE)]);
    let p = drv.run(h.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (1, false));
    assert_eq!(drv.used_idx(), 1);
    assert_eq!(drv.used_len(0), 150);
    assert!(randomized(&mem, DATA + 0x100, 100));
    assert!(randomized(&mem, DATA + 0x1000, 50));
    assert!(untouched(&mem, DATA, 0x100));
    assert!(untouched(&mem, DATA + 0x100 + 100, 0x1000 - 0x100 - 100));
    assert!(untouched(&mem, DATA + 0x1000 + 50, 0x1000));
    assert_eq!(rng.stats().requests.load(Ordering::Relaxed), 1);
    assert_eq!(rng.stats().bytes.load(Ordering::Relaxed), 150);
    assert_eq!(rng.stats().malformed.load(Ordering::Relaxed), 0);
}

#[test]
fn a_request_is_capped_and_nothing_past_the_cap_is_written() {
    let mem = memory();
    let mut rng = Rng::new(RngOptions::default()).unwrap();
    let mut h = handler(&mut rng);
    let len = 2 * REQUEST_CAP as usize;
    paint(&mem, DATA, len);
    let mut drv = Driver::new(&mem);
    drv.push(&[(DATA, len as u32, F_WRITE)]);
    drv.run(h.as_mut()).unwrap();
    assert_eq!(drv.used_len(0), REQUEST_CAP as u32);
    assert!(randomized(&mem, DATA, REQUEST_CAP as usize));
    assert!(untouched(&mem, DATA + REQUEST_CAP, REQUEST_CAP as usize));
}

#[test]
fn a_readable_descriptor_gets_used_length_zero_and_is_counted() {
    let mem = memory();
    let mut rng = Rng::new(RngOptions::default()).unwrap();
    let mut h = handler(&mut rng);
    paint(&mem, DATA, 0x2000);
    let mut drv = Driver::new(&mem);
    drv.push(&[(DATA, 64, F_WRITE), (DATA + 0x100, 64, 0)]);
    // A buffer that leaves shared memory is malformed too.
    drv.push(&[(AREA + MEM as u64 - 16, 64, F_WRITE)]);
    // A huge length: must not be walked byte by byte or written.
    drv.push(&[(DATA, u32::MAX, F_WRITE)]);
    // The queue still works afterwards.
    drv.push(&[(DATA + 0x1000, 32, F_WRITE)]);
    let p = drv.run(h.as_mut()).unwrap();
    assert_eq!(p.chains, 4);
    assert_eq!(
        (
            drv.used_len(0),
            drv.used_len(1),
            drv.used_len(2),
            drv.used_len(3)
        ),
        (0, 0, 0, 32)
    );
    assert!(untouched(&mem, DATA, 0x1000));
    assert!(randomized(&mem, DATA + 0x1000, 32));
    assert_eq!(rng.stats().malformed.load(Ordering::Relaxed), 3);
    assert_eq!(rng.stats().requests.load(Ordering::Relaxed), 1);
}

#[test]
fn an_empty_writable_buffer_gets_zero_bytes_and_is_not_malformed() {
    let mem = memory();
    let mut rng = Rng::new(RngOptions::default()).unwrap();
    let mut h = handler(&mut rng);
    let mut drv = Driver::new(&mem);
    drv.push(&[(DATA, 0, F_WRITE)]);
    drv.run(h.as_mut()).unwrap();
    assert_eq!((drv.used_idx(), drv.used_len(0)), (1, 0));
    assert_eq!(rng.stats().malformed.load(Ordering::Relaxed), 0);
}

#[test]
fn a_looping_chain_breaks_the_queue() {
    let mem = memory();
    let mut rng = Rng::new(RngOptions::default()).unwrap();
    let mut h = handler(&mut rng);
    paint(&mem, DATA, 0x100);
    let mut drv = Driver::new(&mem);
    drv.push_raw(&[
        (0, DATA, 16, F_WRITE | F_NEXT, 1),
        (1, DATA + 16, 16, F_WRITE | F_NEXT, 0),
    ]);
    match drv.run(h.as_mut()) {
        Err(QueueFailure::Chain(ChainError::Broken { .. } | ChainError::TooLong { .. })) => {}
        other => panic!("expected a broken chain, got {other:?}"),
    }
    assert_eq!(drv.used_idx(), 0);
    assert!(untouched(&mem, DATA, 0x100));
    assert_eq!(rng.stats().broken.load(Ordering::Relaxed), 1);
}

#[test]
fn the_rate_limit_throttles_and_the_timer_wakes() {
    let mem = memory();
    let limiter = Arc::new(RateLimiter::new(4096).unwrap());
    let mut rng = Rng::new(RngOptions {
        rate_limit: Some(limiter.clone()),
        queue_size: QSIZE,
    })
    .unwrap();
    let mut h = handler(&mut rng);
    let fd = h.wake_fd().expect("a rate-limited queue has a timer");
    paint(&mem, DATA, 0x8000);
    let mut drv = Driver::new(&mem);
    // First request: the full bucket (one second's worth), not more.
    drv.push(&[(DATA, 8192, F_WRITE)]);
    let p = drv.run(h.as_mut()).unwrap();
    assert_eq!(p.chains, 1);
    assert_eq!(drv.used_len(0), 4096);
    assert!(untouched(&mem, DATA + 4096, 4096));

    // The budget is gone: the next buffer waits, the driver keeps it.
    drv.push(&[(DATA + 0x4000, 1024, F_WRITE)]);
    let start = Instant::now();
    let p = drv.run(h.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, true));
    assert_eq!(drv.used_idx(), 1);
    assert!(!h.ready());
    assert!(rng.stats().throttled.load(Ordering::Relaxed) >= 1);
    // 64 bytes at 4096 B/s take 15.625 ms to come back: an earlier wake-up is wrong.
    if readable_now(fd, 0) {
        assert!(
            start.elapsed() >= Duration::from_millis(15),
            "the timer fired early"
        );
    }

    // 64 bytes at 4096 B/s come back after ~15.6 ms.
    assert!(readable_now(fd, 5000), "the timer never fired");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(15),
        "woke after only {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(2),
        "woke only after {waited:?}"
    );
    let p = drv.run(h.as_mut()).unwrap();
    assert_eq!(p.chains, 1);
    let got = drv.used_len(1);
    assert!((64..=1024).contains(&got), "got {got} bytes");
    assert_eq!(
        rng.stats().bytes.load(Ordering::Relaxed),
        4096 + u64::from(got)
    );

    // Once budget is back, a ready() that needs no new timer must still
    // clear the expired one, or the transport would spin on it.
    std::thread::sleep(Duration::from_millis(60));
    assert!(readable_now(fd, 0), "the re-armed timer fired");
    drv.push(&[(DATA + 0x6000, 8, F_WRITE)]);
    let p = drv.run(h.as_mut()).unwrap();
    assert_eq!((p.chains, drv.used_len(2)), (1, 8));
    assert!(!readable_now(fd, 0), "ready() must clear the timer");
}

#[test]
fn instances_sharing_a_limiter_share_one_budget() {
    let mem_a = memory();
    let mem_b = memory();
    let limiter = Arc::new(RateLimiter::new(4096).unwrap());
    let opts = RngOptions {
        rate_limit: Some(limiter.clone()),
        queue_size: QSIZE,
    };
    let mut a = Rng::new(opts).unwrap();
    let mut b = a.try_clone().unwrap();
    let mut ha = handler(&mut a);
    let mut hb = handler(&mut b);

    // An instance that was ready but got no chain keeps no budget.
    let mut drv_b = Driver::new(&mem_b);
    drv_b.run(hb.as_mut()).unwrap();
    assert!(limiter.available() >= 4000);

    let mut drv_a = Driver::new(&mem_a);
    drv_a.push(&[(DATA, 4096, F_WRITE)]);
    let start = Instant::now();
    drv_a.run(ha.as_mut()).unwrap();
    assert_eq!(drv_a.used_len(0), 4096);

    drv_b.push(&[(DATA, 4096, F_WRITE)]);
    let p = drv_b.run(hb.as_mut()).unwrap();
    let elapsed = start.elapsed();
    if elapsed < Duration::from_millis(15) {
        // Less than 64 bytes' worth of time: B must be throttled.
        assert_eq!((p.chains, p.starved), (0, true));
    }
    let total = a.stats().bytes.load(Ordering::Relaxed) + b.stats().bytes.load(Ordering::Relaxed);
    let allowed = 4096 + (4096.0 * elapsed.as_secs_f64()).ceil() as u64;
    assert!(
        total <= allowed,
        "{total} bytes in {elapsed:?} through a 4096 B/s limiter"
    );
    assert_eq!(a.stats().throttled.load(Ordering::Relaxed), 0);
}
