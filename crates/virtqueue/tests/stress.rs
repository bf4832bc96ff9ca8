//! The driver against a real device side (rust-vmm virtio-queue) in its own
//! thread, with notifications both ways over eventfds and no re-kick anywhere:
//! a single lost notification stalls the run, and a wait of more than 1 s
//! with requests in flight fails the test.
//!
//! Run in release: `cargo test --release -p ringfence-virtqueue --test stress`.

#![allow(missing_docs)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{wait_readable, BlkDevice, FakeTransport, Mem, QueueInfo, Rng, Shared, PADDR};
use ringfence_virtqueue::{features, BlkDriver, BlkRequest, VIRTIO_BLK_S_OK};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const QD: usize = 16;
const QUEUE_SIZE: u16 = 64; // 16 chains of up to 3 descriptors
const BUF: u32 = 512;
const CAPACITY: u64 = 1 << 20;
const STALL: Duration = Duration::from_secs(1);
/// One run at a time: each has two busy threads, and the machine two cores.
static SERIAL: Mutex<()> = Mutex::new(());

struct Stop(Arc<AtomicBool>, Arc<Shared>);

impl Drop for Stop {
    /// Stops the device thread however the driver side ends (a panic included).
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
        let _ = self.1.kick.write(1);
    }
}

/// The device: sleeps on the kick eventfd, serves everything available,
/// signals per virtio-queue's needs_notification (sometimes after each
/// element, sometimes per batch), re-enables notifications, and before
/// sleeping spins 0..8 µs watching avail.idx, so that both the sleeping and
/// the polling windows of the protocol are exercised.
fn device(
    mem: Arc<Mem>,
    info: QueueInfo,
    event_idx: bool,
    shared: Arc<Shared>,
    call: Arc<EventFd>,
    stop: Arc<AtomicBool>,
) -> Result<u64, String> {
    let mut dev = BlkDevice::new(mem.clone(), info, event_idx);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut served = 0u64;
    'sleep: loop {
        // Only a kick (or the stop) wakes the device: the timeout looks at
        // nothing but the stop flag, so a lost kick is never papered over.
        loop {
            if stop.load(Ordering::SeqCst) {
                break 'sleep;
            }
            if wait_readable(&shared.kick, Duration::from_millis(200)) {
                let _ = shared.kick.read();
                break;
            }
        }
        'serve: loop {
            dev.q
                .disable_notification(&mem.gm)
                .map_err(|e| e.to_string())?;
            let per_element = rng.next().is_multiple_of(4);
            while dev.serve_one(|_| VIRTIO_BLK_S_OK)?.is_some() {
                served += 1;
                if per_element
                    && dev
                        .q
                        .needs_notification(&mem.gm)
                        .map_err(|e| e.to_string())?
                {
                    call.write(1).map_err(|e| e.to_string())?;
                }
            }
            if dev
                .q
                .needs_notification(&mem.gm)
                .map_err(|e| e.to_string())?
            {
                call.write(1).map_err(|e| e.to_string())?;
            }
            if dev
                .q
                .enable_notification(&mem.gm)
                .map_err(|e| e.to_string())?
            {
                continue 'serve;
            }
            let spin = Duration::from_nanos(rng.next() % 8_000);
            let t = Instant::now();
            while t.elapsed() < spin {
                let avail = dev
                    .q
                    .avail_idx(&mem.gm, Ordering::Acquire)
                    .map_err(|e| e.to_string())?;
                if avail.0 != dev.q.next_avail() {
                    continue 'serve;
                }
                std::hint::spin_loop();
            }
            continue 'sleep;
        }
    }
    Ok(served)
}

/// Runs `n` requests at queue depth 16 and returns requests per second.
fn run(n: u64, event_idx: bool) -> f64 {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let data_off = 4096;
    let mem = Mem::new(data_off + QD * 4096);
    let offered = features::VERSION_1 | features::RING_EVENT_IDX | features::BLK_FLUSH;
    let shared = Shared::new(offered, 256, CAPACITY);
    let region = mem.region(0, BlkDriver::<FakeTransport>::region_size(QUEUE_SIZE));
    assert!(region.len <= data_off);
    // SAFETY: the mapping outlives the driver (dropped at the end of this
    // function, before `mem`), and only the device thread shares it.
    let mut drv = unsafe {
        BlkDriver::new(FakeTransport(shared.clone()), region, QUEUE_SIZE, event_idx).unwrap()
    };
    assert_eq!(drv.event_idx(), event_idx);
    assert_eq!(drv.queue_size(), QUEUE_SIZE);
    let info = shared.state().queue.unwrap();
    let call = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let stop_flag = Arc::new(AtomicBool::new(false));
    let dev = {
        let (mem, shared, call, stop) =
            (mem.clone(), shared.clone(), call.clone(), stop_flag.clone());
        thread::spawn(move || device(mem, info, event_idx, shared, call, stop))
    };
    let stop = Stop(stop_flag, shared.clone());

    let buf_addr = |b: usize| PADDR + (data_off + b * 4096) as u64;
    let mut free_bufs: Vec<usize> = (0..QD).collect();
    // token -> (buffer, sector, request type)
    let mut pending: Vec<Option<(usize, u64, u8)>> = vec![None; usize::from(QUEUE_SIZE)];
    let (mut submitted, mut completed) = (0u64, 0u64);
    let (mut sleeps, mut kicks) = (0u64, 0u64);
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let start = Instant::now();
    while completed < n {
        while usize::from(drv.in_flight()) < QD && submitted < n {
            let b = free_bufs.pop().unwrap();
            let sector = submitted.wrapping_mul(0x9e37_79b9) % CAPACITY;
            // Mix chain lengths: reads and writes take 3 descriptors, flushes 2.
            let (req, kind) = match submitted % 64 {
                13 => (BlkRequest::Flush, 2),
                k if k % 8 == 5 => (
                    BlkRequest::Write {
                        sector,
                        data: buf_addr(b),
                        len: BUF,
                    },
                    1,
                ),
                _ => {
                    // Poison, so a read the device did not serve shows.
                    mem.write(buf_addr(b), (!sector).to_le_bytes());
                    (
                        BlkRequest::Read {
                            sector,
                            data: buf_addr(b),
                            len: BUF,
                        },
                        0,
                    )
                }
            };
            let token = drv.submit(req).unwrap();
            assert!(pending[usize::from(token)]
                .replace((b, sector, kind))
                .is_none());
            submitted += 1;
        }
        if drv.kick() {
            kicks += 1;
        }
        let mut got = 0;
        while let Some(c) = drv.pop().unwrap() {
            let (b, sector, kind) = pending[usize::from(c.token)]
                .take()
                .expect("token not pending");
            assert_eq!(c.status, VIRTIO_BLK_S_OK);
            match kind {
                0 => {
                    assert_eq!(c.used_len, BUF + 1);
                    let first: [u8; 8] = mem.read(buf_addr(b));
                    assert_eq!(u64::from_le_bytes(first), sector, "read data of request");
                }
                _ => assert_eq!(c.used_len, 1),
            }
            free_bufs.push(b);
            completed += 1;
            got += 1;
        }
        if got > 0 || drv.arm() {
            continue;
        }
        sleeps += 1;
        if !wait_readable(&call, STALL) {
            drop(stop);
            let served = dev.join();
            panic!(
                "stall: no notification for {STALL:?} with {} in flight after {completed} \
                 completions ({submitted} submitted, {kicks} kicks); device: {served:?}",
                drv.in_flight()
            );
        }
        let _ = call.read();
        // Half the time poll with notifications off until the next sleep,
        // half the time leave them on while working.
        if rng.next().is_multiple_of(2) {
            drv.disarm();
        }
    }
    let elapsed = start.elapsed();
    drop(stop);
    let served = dev.join().unwrap().unwrap();
    assert_eq!(served, n);
    assert_eq!(drv.in_flight(), 0);
    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "{n} requests (event_idx {event_idx}) in {:.2} s: {:.0} requests/s; {sleeps} driver sleeps, \
         {kicks} kicks, {} notifies",
        elapsed.as_secs_f64(),
        rate,
        shared.notifies.load(Ordering::Relaxed)
    );
    drop(drv);
    rate
}

/// 10,000,000 requests: avail and used indices wrap about 152 times.
/// (300,000, still 4 wraps, in an unoptimised build: the full count is for
/// `cargo test --release`, as CI runs it.)
#[test]
fn ten_million_requests_no_stall() {
    let n = if cfg!(debug_assertions) {
        300_000
    } else {
        10_000_000
    };
    run(n, true);
}

/// The same protocol with ring flags instead of event indices.
#[test]
fn one_million_requests_no_stall_without_event_idx() {
    let n = if cfg!(debug_assertions) {
        100_000
    } else {
        1_000_000
    };
    run(n, false);
}
