//! BlkDriver against a fake virtio-drivers Transport and a virtio-queue
//! device served in the test's own thread: negotiation, queue set-up,
//! config reads, request chains as the device sees them, status bytes.

#![allow(missing_docs)]

mod common;

use std::sync::Arc;

use common::{BlkDevice, FakeTransport, Mem, Shared, ID, PADDR, T_FLUSH, T_GET_ID, T_IN, T_OUT};
use ringfence_virtqueue::{
    features as f, BlkCompletion, BlkDriver, BlkError, BlkRequest, QueueError, UsedFault,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_queue::QueueT;

const CAPACITY: u64 = 0x1_2345_6789;
const DATA: u64 = PADDR + 0x10000;
const ACK: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const FAILED: u32 = 128;

/// Everything a block device could offer that this driver must not take.
const UNWANTED: u64 =
    (1 << 1) | (1 << 4) | (1 << 10) | (1 << 12) | (1 << 13) | (1 << 28) | (1 << 33) | (1 << 34);
const ALL_WANTED: u64 =
    f::VERSION_1 | f::RING_EVENT_IDX | f::BLK_FLUSH | f::BLK_RO | f::BLK_BLK_SIZE | f::BLK_SEG_MAX;

struct Rig {
    mem: Arc<Mem>,
    shared: Arc<Shared>,
}

fn rig(features: u64, max_queue: u32) -> Rig {
    Rig {
        mem: Mem::new(1 << 17),
        shared: Shared::new(features, max_queue, CAPACITY),
    }
}

impl Rig {
    fn driver(
        &self,
        queue_size: u16,
        event_idx: bool,
    ) -> Result<BlkDriver<FakeTransport>, BlkError> {
        let len = BlkDriver::<FakeTransport>::region_size(queue_size);
        // SAFETY: the rig's mapping outlives every driver made from it, and
        // the driver's part [0, len) is below the data buffers at 0x10000.
        unsafe {
            BlkDriver::new(
                FakeTransport(self.shared.clone()),
                self.mem.region(0, len),
                queue_size,
                event_idx,
            )
        }
    }

    fn device(&self) -> BlkDevice {
        let info = self.shared.state().queue.expect("queue set");
        let event_idx = self.shared.state().driver_features.unwrap() & f::RING_EVENT_IDX != 0;
        BlkDevice::new(self.mem.clone(), info, event_idx)
    }
}

#[test]
fn negotiation_features_status_capacity_queue() {
    let rig = rig(ALL_WANTED | UNWANTED, 100);
    let drv = rig.driver(128, true).unwrap();
    {
        let s = rig.shared.state();
        assert_eq!(
            s.driver_features,
            Some(ALL_WANTED),
            "exactly the wanted features"
        );
        assert_eq!(
            s.status_log,
            vec![
                0,
                ACK,
                ACK | DRIVER,
                ACK | DRIVER | FEATURES_OK,
                ACK | DRIVER | FEATURES_OK | DRIVER_OK
            ]
        );
        // 100 offered, 128 asked: 64, the largest power of two in both.
        let q = s.queue.unwrap();
        assert_eq!(q.size, 64);
        assert_eq!(q.desc, PADDR);
        assert_eq!((q.avail, q.used), (PADDR + 1024, PADDR + 1160));
        // capacity as two u32 halves, then seg_max and blk_size.
        assert_eq!(s.config_reads, vec![0, 4, 12, 20]);
    }
    assert_eq!(drv.capacity_sectors(), CAPACITY);
    assert_eq!(drv.queue_size(), 64);
    assert!(drv.read_only());
    assert!(drv.event_idx());
    assert!(drv.flush_supported());
    assert_eq!(drv.blk_size(), Some(4096));
    assert_eq!(drv.seg_max(), Some(126));
    assert_eq!(drv.features(), ALL_WANTED);
}

#[test]
fn negotiation_takes_event_idx_only_when_asked_and_offered() {
    let rig1 = rig(ALL_WANTED, 256);
    let drv = rig1.driver(16, false).unwrap();
    assert_eq!(
        rig1.shared.state().driver_features,
        Some(ALL_WANTED & !f::RING_EVENT_IDX)
    );
    assert!(!drv.event_idx());

    let rig2 = rig(f::VERSION_1, 256);
    let mut drv = rig2.driver(16, true).unwrap();
    assert_eq!(rig2.shared.state().driver_features, Some(f::VERSION_1));
    assert_eq!(rig2.shared.state().config_reads, vec![0, 4]);
    assert!(!drv.event_idx() && !drv.read_only() && !drv.flush_supported());
    assert_eq!((drv.blk_size(), drv.seg_max()), (None, None));
    assert_eq!(
        drv.submit(BlkRequest::Flush),
        Err(BlkError::FlushUnsupported)
    );
}

#[test]
fn negotiation_refuses_legacy_device() {
    let rig = rig(ALL_WANTED & !f::VERSION_1, 256);
    let err = rig.driver(16, true).unwrap_err();
    assert_eq!(
        err,
        BlkError::NoVersion1 {
            offered: ALL_WANTED & !f::VERSION_1
        }
    );
    let s = rig.shared.state();
    assert_eq!(s.status & FAILED, FAILED);
    assert_eq!(s.driver_features, None);
    assert_eq!(s.queue, None);
}

#[test]
fn negotiation_features_ok_refused() {
    let rig = rig(ALL_WANTED, 256);
    rig.shared.state().refuse_features_ok = true;
    let err = rig.driver(16, true).unwrap_err();
    assert_eq!(
        err,
        BlkError::FeaturesRefused {
            features: ALL_WANTED,
            status: ACK | DRIVER
        }
    );
    let s = rig.shared.state();
    assert_eq!(s.status & FAILED, FAILED);
    assert_eq!(s.queue, None, "no queue set after FEATURES_OK failed");
}

#[test]
fn queue_size_and_region_checks() {
    let rig1 = rig(ALL_WANTED, 256);
    assert_eq!(rig1.driver(48, true).unwrap().queue_size(), 32);
    let rig2 = rig(ALL_WANTED, 256);
    assert_eq!(rig2.driver(1, true).unwrap().queue_size(), 1);
    let rig3 = rig(ALL_WANTED, 0);
    assert_eq!(rig3.driver(16, true).unwrap_err(), BlkError::NoQueue);
    assert_eq!(rig3.shared.state().status & FAILED, FAILED);
    let rig4 = rig(ALL_WANTED, 256);
    assert_eq!(rig4.driver(0, true).unwrap_err(), BlkError::ZeroQueueSize);
    // The default capacity caps the size even if the device offers more.
    let rig6 = rig(ALL_WANTED, 32768);
    assert_eq!(rig6.driver(2048, true).unwrap().queue_size(), 1024);

    let rig7 = rig(ALL_WANTED, 256);
    let needed = BlkDriver::<FakeTransport>::region_size(16);
    // SAFETY: the mapping outlives the attempt.
    let err = unsafe {
        BlkDriver::new(
            FakeTransport(rig7.shared.clone()),
            rig7.mem.region(0, needed - 1),
            16,
            true,
        )
    }
    .unwrap_err();
    assert_eq!(
        err,
        BlkError::RegionTooSmall {
            len: needed - 1,
            needed
        }
    );
    assert!(
        rig7.shared.state().status_log.is_empty(),
        "device untouched"
    );
}

/// The header and status arrays start zeroed too, whatever was there.
#[test]
fn new_zeroes_the_whole_region() {
    let rig = rig(ALL_WANTED, 256);
    let len = BlkDriver::<FakeTransport>::region_size(16);
    rig.mem.fill(PADDR, len, 0x55);
    let _drv = rig.driver(16, true).unwrap();
    assert_eq!(rig.mem.bytes(PADDR, len), vec![0; len]);
}

#[test]
fn region_size_layout() {
    // queue 16: descriptors 256, avail 38 at 256, used 134 at 296 (ends at 430),
    // headers at 432, status bytes at 688.
    assert_eq!(
        BlkDriver::<FakeTransport>::region_size(16),
        432 + 16 * 16 + 16
    );
}

#[test]
fn requests_as_the_device_sees_them_and_status_passed_through() {
    let rig = rig(ALL_WANTED & !f::BLK_RO, 256);
    let mut drv = rig.driver(16, true).unwrap();
    let mut dev = rig.device();

    let reqs = [
        BlkRequest::Read {
            sector: 7,
            data: DATA,
            len: 4096,
        },
        BlkRequest::Write {
            sector: u64::MAX - 1,
            data: DATA + 0x1000,
            len: 512,
        },
        BlkRequest::Flush,
        BlkRequest::GetId {
            data: DATA + 0x2000,
        },
        BlkRequest::Read {
            sector: 9,
            data: DATA + 0x3000,
            len: 512,
        },
    ];
    let tokens: Vec<u16> = reqs.iter().map(|r| drv.submit(*r).unwrap()).collect();
    assert_eq!(tokens, vec![0, 3, 6, 8, 11], "3, 3, 2, 3, 3 descriptors");
    assert_eq!(drv.in_flight(), 5);
    assert!(drv.kick(), "first publish: the device wants to hear");
    assert_eq!(
        rig.shared
            .notifies
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );

    // Statuses the device returns, in order: OK, IOERR, UNSUPP, OK, and a
    // value outside the spec, which must come back as-is.
    let statuses = [
        VIRTIO_BLK_S_OK,
        VIRTIO_BLK_S_IOERR,
        VIRTIO_BLK_S_UNSUPP,
        VIRTIO_BLK_S_OK,
        0x7f,
    ];
    let mut seen = Vec::new();
    for st in statuses {
        seen.push(dev.serve_one(|_| st).unwrap().unwrap());
    }
    assert_eq!(dev.serve_one(|_| 0).unwrap(), None);
    let hdr = |i: usize| (seen[i].head, seen[i].type_, seen[i].sector, seen[i].data);
    assert_eq!(hdr(0), (0, T_IN, 7, Some((DATA, 4096, true))));
    assert_eq!(
        hdr(1),
        (3, T_OUT, u64::MAX - 1, Some((DATA + 0x1000, 512, false)))
    );
    assert_eq!(hdr(2), (6, T_FLUSH, 0, None));
    assert_eq!(hdr(3), (8, T_GET_ID, 0, Some((DATA + 0x2000, 20, true))));
    assert_eq!(hdr(4), (11, T_IN, 9, Some((DATA + 0x3000, 512, true))));

    let mut got = Vec::new();
    while let Some(c) = drv.pop().unwrap() {
        got.push(c);
    }
    let c = |token, status, used_len| BlkCompletion {
        token,
        status,
        used_len,
    };
    assert_eq!(
        got,
        vec![
            c(0, VIRTIO_BLK_S_OK, 4097),
            c(3, VIRTIO_BLK_S_IOERR, 1),
            c(6, VIRTIO_BLK_S_UNSUPP, 1),
            c(8, VIRTIO_BLK_S_OK, 21),
            c(11, 0x7f, 513),
        ]
    );
    assert_eq!(rig.mem.bytes(DATA, 8), 7u64.to_le_bytes());
    assert_eq!(rig.mem.bytes(DATA + 0x2000, 20), ID);
    assert_eq!(drv.in_flight(), 0);
    assert_eq!(drv.free_descriptors(), 16);
}

#[test]
fn submit_checks() {
    let rig = rig(ALL_WANTED, 256);
    let mut drv = rig.driver(8, true).unwrap();
    assert!(drv.read_only());
    assert_eq!(
        drv.submit(BlkRequest::Write {
            sector: 0,
            data: DATA,
            len: 512
        }),
        Err(BlkError::ReadOnly)
    );
    for len in [0, 1, 511, 513, 4095] {
        assert_eq!(
            drv.submit(BlkRequest::Read {
                sector: 0,
                data: DATA,
                len
            }),
            Err(BlkError::BadLength { len })
        );
    }
    assert_eq!(
        drv.submit(BlkRequest::Read {
            sector: 0,
            data: u64::MAX - 100,
            len: 512
        }),
        Err(BlkError::Queue(QueueError::SegmentWraps {
            index: 1,
            addr: u64::MAX - 100,
            len: 512
        }))
    );
    let read = BlkRequest::Read {
        sector: 0,
        data: DATA,
        len: 512,
    };
    assert_eq!(drv.submit(read), Ok(0));
    assert_eq!(drv.submit(read), Ok(3));
    // 2 descriptors left: a read needs 3, a flush 2.
    assert_eq!(
        drv.submit(read),
        Err(BlkError::QueueFull { needed: 3, free: 2 })
    );
    assert_eq!(drv.submit(BlkRequest::Flush), Ok(6));
    assert_eq!(
        drv.submit(BlkRequest::Flush),
        Err(BlkError::QueueFull { needed: 2, free: 0 })
    );
    assert_eq!(drv.in_flight(), 3);
}

#[test]
fn hostile_completion_is_an_error() {
    let rig = rig(ALL_WANTED, 256);
    let mut drv = rig.driver(8, true).unwrap();
    let t = drv
        .submit(BlkRequest::Read {
            sector: 1,
            data: DATA,
            len: 512,
        })
        .unwrap();
    let u = drv.submit(BlkRequest::Flush).unwrap();
    drv.kick();
    let used = rig.shared.state().queue.unwrap().used;
    let push = |slot: u64, id: u32, len: u32| {
        let mut e = [0u8; 8];
        e[..4].copy_from_slice(&id.to_le_bytes());
        e[4..].copy_from_slice(&len.to_le_bytes());
        rig.mem.write(used + 4 + 8 * slot, e);
        rig.mem.write(used + 2, (slot as u16 + 1).to_le_bytes());
    };
    // A completion the device wrote no status for: 0xff, as-is.
    push(0, u32::from(u), 1);
    assert_eq!(
        drv.pop(),
        Ok(Some(BlkCompletion {
            token: u,
            status: 0xff,
            used_len: 1
        }))
    );
    // Claims 514 bytes written into 513 writable ones.
    push(1, u32::from(t), 514);
    assert_eq!(
        drv.pop(),
        Err(BlkError::Queue(QueueError::BadUsed {
            last_used: 1,
            fault: UsedFault::LenTooLarge {
                id: t,
                len: 514,
                writable: 513
            }
        }))
    );
    assert_eq!(drv.pop(), Err(BlkError::Queue(QueueError::Broken)));
}

#[test]
fn kick_notifies_only_when_asked() {
    let rig = rig(ALL_WANTED, 256);
    let mut drv = rig.driver(16, true).unwrap();
    let mut dev = rig.device();
    let flush = BlkRequest::Flush;
    drv.submit(flush).unwrap();
    assert!(drv.kick());
    assert!(!drv.kick(), "nothing new");
    // The device is busy (has not re-enabled notifications): no kick.
    drv.submit(flush).unwrap();
    assert!(!drv.kick());
    while dev.serve_one(|_| 0).unwrap().is_some() {}
    // The device goes to sleep: avail_event = next_avail.
    assert!(!dev.q.enable_notification(&rig.mem.gm).unwrap());
    drv.submit(flush).unwrap();
    assert!(drv.kick());
    assert_eq!(
        rig.shared
            .notifies
            .load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[test]
fn drop_resets_then_unsets_queue() {
    let rig = rig(ALL_WANTED, 256);
    let drv = rig.driver(16, true).unwrap();
    assert_eq!(rig.shared.state().queue_unsets, 0);
    drop(drv);
    let s = rig.shared.state();
    assert_eq!(s.status, 0);
    assert_eq!(s.status_log.last(), Some(&0));
    assert_eq!(s.queue_unsets, 1);
    assert_eq!(s.queue, None);
}

/// Both move to another thread with their transport (a frontend's I/O thread).
#[test]
fn driver_and_queue_are_send() {
    fn send<T: Send>() {}
    send::<ringfence_virtqueue::SplitQueue>();
    send::<ringfence_virtqueue::SplitQueue<8>>();
    send::<BlkDriver<FakeTransport>>();
    send::<ringfence_virtqueue::DmaRegion>();
}
