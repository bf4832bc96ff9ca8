//! The notification handshakes as a store-buffer litmus test, at high rate.
//!
//! Queue depth 1, both sides "sleep" by spinning on a flag instead of an
//! eventfd, so every request is a fresh race between the driver publishing
//! (store avail.idx, fence, load avail_event) and the device going to sleep
//! (store avail_event, fence, load avail.idx), and between the driver arming
//! (store used_event, fence, load used.idx) and the device completing (store
//! used.idx, fence, load used_event). Without either fence, x86's store
//! buffer lets both sides read the other's old value: a lost wakeup, which
//! here is a stall of 1 s and a failure. No re-kick anywhere.
//!
//! The 10M eventfd test rarely hits the publish window (the device is asleep
//! in a syscall most of the time); this one hits it every request.

#![allow(missing_docs)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{Mem, QueueInfo, PADDR};
use ringfence_virtqueue::{Segment, SplitQueue};
use virtio_queue::{Queue, QueueT};

const SIZE: u16 = 16;
/// Both sides spin: one race at a time on a 2-core machine.
static SERIAL: Mutex<()> = Mutex::new(());
const STALL: Duration = Duration::from_secs(1);

/// Spins until `flag` is set (then clears it) or `stop` is; yields now and
/// then so that a loaded machine still schedules the other side.
fn wait_flag(flag: &AtomicBool, stop: &AtomicBool, timeout: Duration) -> bool {
    let t = Instant::now();
    let mut spins = 0u32;
    loop {
        if flag.swap(false, Ordering::SeqCst) {
            return true;
        }
        if stop.load(Ordering::SeqCst) || t.elapsed() > timeout {
            return false;
        }
        spins += 1;
        if spins.is_multiple_of(1024) {
            thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
}

fn device(
    mem: Arc<Mem>,
    info: QueueInfo,
    event_idx: bool,
    kick: Arc<AtomicBool>,
    call: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> u64 {
    let gm = &mem.gm;
    let mut q = Queue::new(SIZE).unwrap();
    q.set_size(info.size as u16);
    q.set_desc_table_address(Some(info.desc as u32), Some((info.desc >> 32) as u32));
    q.set_avail_ring_address(Some(info.avail as u32), Some((info.avail >> 32) as u32));
    q.set_used_ring_address(Some(info.used as u32), Some((info.used >> 32) as u32));
    q.set_event_idx(event_idx);
    q.set_ready(true);
    let mut served = 0;
    // The device sleeps only on the kick flag: its timeout merely checks stop.
    while wait_flag(&kick, &stop, Duration::from_secs(3600)) {
        loop {
            q.disable_notification(gm).unwrap();
            while let Some(chain) = q.pop_descriptor_chain(gm) {
                let head = chain.head_index();
                q.add_used(gm, head, 0).unwrap();
                served += 1;
            }
            if q.needs_notification(gm).unwrap() {
                call.store(true, Ordering::SeqCst);
            }
            if !q.enable_notification(gm).unwrap() {
                break;
            }
        }
    }
    served
}

/// Runs QD1 requests for `budget` (or `max` requests) and returns how many.
fn race(event_idx: bool, budget: Duration, max: u64) -> u64 {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mem = Mem::new(1 << 16);
    let region = mem.region(0, SplitQueue::region_size(SIZE));
    // SAFETY: the mapping outlives the queue; only the device thread shares it.
    let mut q = unsafe { SplitQueue::new(SIZE, region, event_idx).unwrap() };
    let (desc, avail, used) = q.addresses();
    let info = QueueInfo {
        size: u32::from(SIZE),
        desc,
        avail,
        used,
    };
    let kick = Arc::new(AtomicBool::new(false));
    let call = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let dev = {
        let (mem, kick, call, stop) = (mem.clone(), kick.clone(), call.clone(), stop.clone());
        thread::spawn(move || device(mem, info, event_idx, kick, call, stop))
    };
    let seg = Segment {
        addr: PADDR + 0x8000,
        len: 64,
        device_writes: false,
    };
    let start = Instant::now();
    let mut done = 0u64;
    let mut stalled = None;
    'run: while done < max && start.elapsed() < budget {
        let head = q.add(&[seg]).unwrap();
        if q.publish() {
            kick.store(true, Ordering::SeqCst);
        }
        loop {
            if let Some(u) = q.pop_used().unwrap() {
                assert_eq!(u.head, head);
                done += 1;
                break;
            }
            if q.arm() {
                continue;
            }
            if !wait_flag(&call, &stop, STALL) {
                stalled = Some(done);
                break 'run;
            }
            q.disarm();
        }
    }
    stop.store(true, Ordering::SeqCst);
    let served = dev.join().unwrap();
    if let Some(done) = stalled {
        panic!(
            "stall (event_idx {event_idx}): no notification for {STALL:?} after {done} requests; \
             device served {served}"
        );
    }
    assert_eq!(served, done);
    println!(
        "event_idx {event_idx}: {done} QD1 requests in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    done
}

#[test]
fn qd1_notification_races_event_idx() {
    race(true, Duration::from_secs(3), 3_000_000);
}

#[test]
fn qd1_notification_races_flags() {
    race(false, Duration::from_secs(2), 2_000_000);
}
