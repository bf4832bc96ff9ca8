//! In-flight tracking: a backend that dies with requests in flight on an
//! out-of-order queue, and the next one that finds them in the record and
//! finishes them, each exactly once.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::sync::Arc;
use std::time::Duration;

use ringfence_blk::{Aio, Blk, BlkOptions, CacheMode};
use ringfence_device::{process_queue_logged, DeviceMemory, InflightLog, QueueStats, VirtioDevice};
use ringfence_vhost_user::inflight::{resubmit, InflightShm, QueueLog};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

const AREA: u64 = 0x10_0000;
const QSIZE: u16 = 128;
const HDRS: u64 = AREA + 0x8000;
const STATUSES: u64 = AREA + 0x9000;
const DATA: u64 = AREA + 0x10_0000;
const SLOT: u64 = 0x1_0000;

struct Image(std::path::PathBuf);
impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn blk(tag: &str) -> (Image, Blk) {
    let p = std::env::temp_dir().join(format!(
        "ringfence-inflight-{tag}-{}.img",
        std::process::id()
    ));
    let content: Vec<u8> = (0..2048 * 512)
        .map(|i| ((i / 512) % 251) as u8 + 1)
        .collect();
    std::fs::write(&p, content).unwrap();
    let blk = Blk::open(
        &p,
        BlkOptions {
            aio: Aio::IoUring,
            cache: CacheMode::None,
            queue_size: QSIZE,
            ..Default::default()
        },
    )
    .unwrap();
    (Image(p), blk)
}

/// `n` 32 KiB reads of sectors 64r, request r on descriptors 3r.. (head 3r).
fn publish_reads<'m>(mem: &'m DeviceMemory, n: u16) -> MockSplitQueue<'m, DeviceMemory> {
    let mock = MockSplitQueue::create(mem, GuestAddress(AREA), QSIZE);
    for r in 0..n {
        let hdr = HDRS + 16 * u64::from(r);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..].copy_from_slice(&(u64::from(r) * 64).to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        mem.write_obj(0xFFu8, GuestAddress(STATUSES + u64::from(r)))
            .unwrap();
        let descs = [
            (hdr, 16, 1u16),
            (DATA + SLOT * u64::from(r), 32 * 1024, 3),
            (STATUSES + u64::from(r), 1, 2),
        ];
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = 3 * r + i as u16;
            mock.desc_table()
                .store(
                    idx,
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, idx + 1)),
                )
                .unwrap();
        }
        mock.avail()
            .ring()
            .ref_at(usize::from(r))
            .unwrap()
            .store(3 * r);
    }
    mock.avail().idx().store(n);
    mock
}

fn used(mem: &DeviceMemory, mock: &MockSplitQueue<'_, DeviceMemory>) -> Vec<u16> {
    let idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
    (0..idx)
        .map(|i| {
            let id: u32 = mem
                .read_obj(mock.used_addr().unchecked_add(4 + 8 * u64::from(i)))
                .unwrap();
            id as u16 / 3
        })
        .collect()
}

#[test]
fn a_restarted_backend_finishes_what_the_dead_one_left_in_flight_exactly_once() {
    let (_img, mut blk) = blk("restart");
    let mem = DeviceMemory::from_ranges(&[(GuestAddress(AREA), 8 << 20)]).unwrap();
    let mock = publish_reads(&mem, 24);
    let shm = Arc::new(InflightShm::create(1, QSIZE).unwrap());

    // The first backend: a fresh record, all 24 reads submitted, then it
    // "dies": its queue is dropped with whatever had not completed.
    let mut log = QueueLog::new(shm.clone(), 0, QSIZE).unwrap();
    assert!(log.recover(0).fresh);
    let mut handlers = blk.activate(0).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let stats = QueueStats::default();
    process_queue_logged(&mut q, &mem, handlers[0].as_mut(), &stats, &mut log).unwrap();
    let in_flight = handlers[0].in_flight();
    assert!(in_flight > 0, "O_DIRECT reads still running");
    drop(handlers);
    blk.reset();
    let done_before = used(&mem, &mock);
    assert_eq!(done_before.len() + in_flight, 24);

    // The frontend rewinds the queue to the used index (QEMU after a crash).
    let ring_used = done_before.len() as u16;
    let mut q: Queue = mock.create_queue().unwrap();
    q.set_next_avail(ring_used);
    q.set_next_used(ring_used);

    // The second backend: the record lists exactly the heads left in
    // flight, in the order they were taken.
    let mut log = QueueLog::new(shm.clone(), 0, QSIZE).unwrap();
    let rec = log.recover(ring_used);
    assert!(!rec.fresh);
    let want: Vec<u16> = (0..24u16)
        .filter(|r| !done_before.contains(r))
        .map(|r| 3 * r)
        .collect();
    assert_eq!(rec.resubmit, want, "in-flight heads in pop order");
    assert_eq!(rec.next_avail, 24, "new chains after everything fetched");
    q.set_next_avail(rec.next_avail);
    let mut handlers = blk.activate(0).unwrap();
    resubmit(&mut q, &mem, handlers[0].as_mut(), &rec.resubmit, &mut log).unwrap();
    // Served as the adapter serves it: logged, until nothing is in flight.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while process_queue_logged(&mut q, &mem, handlers[0].as_mut(), &stats, &mut log)
        .unwrap()
        .in_flight
    {
        assert!(
            std::time::Instant::now() < deadline,
            "resubmitted reads never completed"
        );
        std::thread::sleep(Duration::from_millis(1));
    }

    let mut all = used(&mem, &mock);
    assert_eq!(all.len(), 24, "every request used once");
    all.sort_unstable();
    assert_eq!(all, (0..24).collect::<Vec<u16>>(), "none twice, none lost");
    for r in 0..24u64 {
        let status: u8 = mem.read_obj(GuestAddress(STATUSES + r)).unwrap();
        assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        let mut d = vec![0u8; 512];
        mem.read_slice(&mut d, GuestAddress(DATA + SLOT * r))
            .unwrap();
        assert!(
            d.iter().all(|&b| b == ((r * 64) % 251) as u8 + 1),
            "request {r}'s data"
        );
    }
    // Nothing left in flight in the record either.
    let mut after = QueueLog::new(shm, 0, QSIZE).unwrap();
    assert!(after.recover(24).resubmit.is_empty());
}

#[test]
fn a_completion_published_but_not_cleared_is_not_resubmitted() {
    let shm = Arc::new(InflightShm::create(2, 16).unwrap());
    let mut log = QueueLog::new(shm.clone(), 1, 16).unwrap();
    assert!(log.recover(7).fresh);
    for h in [4, 9, 2] {
        log.popped(h);
    }
    // Head 9 completes fully; head 4 is published on the used ring (index
    // 7 -> 9) but the backend dies before clearing it.
    log.completing(9);
    log.completed(9, 8);
    log.completing(4);
    let mut next = QueueLog::new(shm.clone(), 1, 16).unwrap();
    let rec = next.recover(9);
    assert_eq!(rec.resubmit, vec![2]);
    assert_eq!(rec.next_avail, 10);
    // Queue 0's region is untouched by queue 1's record.
    let mut q0 = QueueLog::new(shm, 0, 16).unwrap();
    assert!(q0.recover(0).fresh);
}

#[test]
fn hostile_records_are_bounded_by_the_queue() {
    // A record for 16 heads used by a live queue of 8: heads 8.. are ignored.
    let shm = Arc::new(InflightShm::create(1, 16).unwrap());
    let mut log = QueueLog::new(shm.clone(), 0, 16).unwrap();
    log.recover(0);
    for h in [3, 12, 15] {
        log.popped(h);
    }
    let mut small = QueueLog::new(shm.clone(), 0, 8).unwrap();
    assert_eq!(small.recover(0).resubmit, vec![3]);
    assert!(QueueLog::new(shm.clone(), 1, 8).is_none(), "no such queue");
    assert!(
        QueueLog::new(shm, 0, 32).is_none(),
        "queue larger than its record"
    );
    assert!(InflightShm::create(0, 16).is_err());
    assert!(InflightShm::create(1, 0).is_err());
}

/// Request 1 of `publish_reads` turned into a GET_ID, which the device
/// answers at once, ahead of request 0's read still running.
fn make_get_id(mem: &DeviceMemory, r: u64) {
    mem.write_obj(VIRTIO_BLK_T_GET_ID.to_le(), GuestAddress(HDRS + 16 * r))
        .unwrap();
}

#[test]
fn without_the_record_a_rewind_to_the_used_index_repeats_one_request_and_loses_another() {
    for tracked in [false, true] {
        let (_img, mut blk) = blk(if tracked { "tracked" } else { "untracked" });
        let mem = DeviceMemory::from_ranges(&[(GuestAddress(AREA), 8 << 20)]).unwrap();
        let mock = publish_reads(&mem, 2);
        make_get_id(&mem, 1);
        let shm = Arc::new(InflightShm::create(1, QSIZE).unwrap());
        let mut log = QueueLog::new(shm.clone(), 0, QSIZE).unwrap();
        log.recover(0);
        let stats = QueueStats::default();
        let mut handlers = blk.activate(0).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        process_queue_logged(&mut q, &mem, handlers[0].as_mut(), &stats, &mut log).unwrap();
        assert_eq!(used(&mem, &mock), vec![1], "GET_ID overtook the read");
        assert_eq!(handlers[0].in_flight(), 1);
        // The backend dies; the frontend rewinds to the used index (1).
        drop(handlers);
        blk.reset();
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_next_avail(1);
        q.set_next_used(1);
        let mut handlers = blk.activate(0).unwrap();
        let mut log = QueueLog::new(shm, 0, QSIZE).unwrap();
        if tracked {
            let rec = log.recover(1);
            q.set_next_avail(rec.next_avail);
            resubmit(&mut q, &mem, handlers[0].as_mut(), &rec.resubmit, &mut log).unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while process_queue_logged(&mut q, &mem, handlers[0].as_mut(), &stats, &mut log)
            .unwrap()
            .in_flight
        {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(1));
        }
        if tracked {
            assert_eq!(
                used(&mem, &mock),
                vec![1, 0],
                "each once: the read resubmitted"
            );
        } else {
            // The GET_ID ran twice and the read never completes: a guest
            // waiting for it hangs.
            assert_eq!(used(&mem, &mock), vec![1, 1]);
        }
    }
}
