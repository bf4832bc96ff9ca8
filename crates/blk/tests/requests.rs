//! virtio-blk request handling against a mock driver queue (virtio-queue's
//! MockSplitQueue) in memory placed where a shared area would be.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::path::PathBuf;

use ringfence_blk::{Blk, BlkOptions};
use ringfence_device::{process_until_idle, DeviceMemory, QueueStats, VirtioDevice};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress};

const AREA: u64 = 1 << 48;
/// Longest wait for a request in flight.
const WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const HDR: u64 = AREA + 0x10000;
const DATA: u64 = AREA + 0x20000;
const STATUS: u64 = AREA + 0x90000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct Image(PathBuf);
impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image(tag: &str, bytes: &[u8]) -> Image {
    let p = std::env::temp_dir().join(format!("ringfence-blk-{tag}-{}.img", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    Image(p)
}

fn memory() -> DeviceMemory {
    DeviceMemory::from_ranges(&[(GuestAddress(AREA), 1 << 20)]).unwrap()
}

/// Puts one chain on a fresh queue and lets the device handle it; returns (status, used len).
fn run(blk: &mut Blk, mem: &DeviceMemory, chain: &[(u64, u32, u16)]) -> (u8, u32) {
    let mut handlers = blk.activate(1 << VIRTIO_BLK_F_FLUSH).unwrap();
    let mock = MockSplitQueue::create(mem, GuestAddress(AREA), 16);
    for (i, &(addr, len, flags)) in chain.iter().enumerate() {
        let flags = if i + 1 < chain.len() {
            flags | F_NEXT
        } else {
            flags
        };
        let d = SplitDescriptor::new(addr, len, flags, (i + 1) as u16);
        mock.desc_table()
            .store(i as u16, RawDescriptor::from(d))
            .unwrap();
    }
    mock.avail().ring().ref_at(0).unwrap().store(u16::to_le(0));
    mock.avail().idx().store(u16::to_le(1));
    let mut q: Queue = mock.create_queue().unwrap();
    mem.write_obj(0xFFu8, GuestAddress(STATUS)).unwrap();
    let stats = QueueStats::default();
    let done = process_until_idle(&mut q, mem, handlers[0].as_mut(), &stats, WAIT).unwrap();
    assert_eq!(done.chains, 1);
    let used_len: u32 = mem.read_obj(mock.used_addr().unchecked_add(8)).unwrap();
    (mem.read_obj(GuestAddress(STATUS)).unwrap(), used_len)
}

fn header(mem: &DeviceMemory, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
}

use vm_memory::Address;

#[test]
fn read_and_write_move_bytes_between_image_and_shared_memory() {
    let mut content = vec![0u8; 8 * 512];
    content[512..1024].fill(0xAB);
    let img = image("rw", &content);
    let mut blk = Blk::open(&img.0, BlkOptions::default()).unwrap();
    let mem = memory();

    header(&mem, VIRTIO_BLK_T_IN, 1);
    let (s, used) = run(
        &mut blk,
        &mem,
        &[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)],
    );
    assert_eq!((s, used), (VIRTIO_BLK_S_OK as u8, 513));
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|&b| b == 0xAB));

    // Two data segments in one write.
    mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
    mem.write_slice(&[0x22; 1024], GuestAddress(DATA + 4096))
        .unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 4);
    let (s, used) = run(
        &mut blk,
        &mem,
        &[
            (HDR, 16, 0),
            (DATA, 512, 0),
            (DATA + 4096, 1024, 0),
            (STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!((s, used), (VIRTIO_BLK_S_OK as u8, 1));
    let disk = std::fs::read(&img.0).unwrap();
    assert!(disk[4 * 512..5 * 512].iter().all(|&b| b == 0x11));
    assert!(disk[5 * 512..7 * 512].iter().all(|&b| b == 0x22));
    assert_eq!(
        blk.stats()
            .bytes_written
            .load(std::sync::atomic::Ordering::Relaxed),
        1536
    );

    header(&mem, VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(
        run(&mut blk, &mem, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]).0,
        VIRTIO_BLK_S_OK as u8
    );
}

#[test]
fn bad_requests_get_ioerr_or_unsupp() {
    let img = image("bad", &[0u8; 8 * 512]);
    let mut blk = Blk::open(&img.0, BlkOptions::default()).unwrap();
    let mem = memory();
    let io = VIRTIO_BLK_S_IOERR as u8;
    // Past the end of the image, and straddling it.
    header(&mem, VIRTIO_BLK_T_IN, 8);
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)]
        )
        .0,
        io
    );
    header(&mem, VIRTIO_BLK_T_IN, 7);
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 1024, F_WRITE), (STATUS, 1, F_WRITE)]
        )
        .0,
        io
    );
    // Sector overflow.
    header(&mem, VIRTIO_BLK_T_IN, u64::MAX);
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)]
        )
        .0,
        io
    );
    // Not a multiple of 512.
    header(&mem, VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 100, F_WRITE), (STATUS, 1, F_WRITE)]
        )
        .0,
        io
    );
    // Wrong direction: a read into a device-readable buffer.
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]
        )
        .0,
        io
    );
    // Data buffer outside the shared memory.
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (0x1000, 512, F_WRITE), (STATUS, 1, F_WRITE)]
        )
        .0,
        io
    );
    // Header too short.
    assert_eq!(
        run(&mut blk, &mem, &[(HDR, 8, 0), (STATUS, 1, F_WRITE)]).0,
        io
    );
    // Unknown request type.
    header(&mem, 77, 0);
    assert_eq!(
        run(&mut blk, &mem, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)]).0,
        VIRTIO_BLK_S_UNSUPP as u8
    );
    assert_eq!(
        blk.stats().ioerr.load(std::sync::atomic::Ordering::Relaxed),
        7
    );
}

#[test]
fn read_only_image_refuses_writes() {
    let img = image("ro", &[0u8; 8 * 512]);
    let mut blk = Blk::open(
        &img.0,
        BlkOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(blk.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    let mem = memory();
    mem.write_slice(&[0x33; 512], GuestAddress(DATA)).unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]
        )
        .0,
        VIRTIO_BLK_S_IOERR as u8
    );
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, F_WRITE)]
        )
        .0,
        VIRTIO_BLK_S_IOERR as u8
    );
    assert!(std::fs::read(&img.0).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn get_id_discard_and_write_zeroes() {
    let img = image("misc", &[0xEEu8; 16 * 512]);
    let mut blk = Blk::open(
        &img.0,
        BlkOptions {
            serial: "disk-42".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let mem = memory();
    header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let (s, used) = run(
        &mut blk,
        &mem,
        &[(HDR, 16, 0), (DATA, 20, F_WRITE), (STATUS, 1, F_WRITE)],
    );
    assert_eq!((s, used), (0, 21));
    let mut id = [0u8; 20];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..7], b"disk-42");

    // WRITE_ZEROES sectors 2..4 (no unmap), then DISCARD is accepted.
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&2u64.to_le_bytes());
    seg[8..12].copy_from_slice(&2u32.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, F_WRITE)]
        )
        .0,
        0
    );
    let disk = std::fs::read(&img.0).unwrap();
    assert!(disk[2 * 512..4 * 512].iter().all(|&b| b == 0));
    assert!(disk[..2 * 512]
        .iter()
        .chain(&disk[4 * 512..])
        .all(|&b| b == 0xEE));
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, F_WRITE)]
        )
        .0,
        0
    );
    // A segment past the end, and reserved flags.
    seg[..8].copy_from_slice(&15u64.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, F_WRITE)]
        )
        .0,
        VIRTIO_BLK_S_IOERR as u8
    );
    seg[..8].copy_from_slice(&0u64.to_le_bytes());
    seg[12..].copy_from_slice(&2u32.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, F_WRITE)]
        )
        .0,
        VIRTIO_BLK_S_UNSUPP as u8
    );
}

#[test]
fn discard_and_write_zeroes_segment_limits_are_offered_and_kept() {
    let img = image("segs", &[0xEEu8; 16 * 512]);
    assert!(Blk::open(
        &img.0,
        BlkOptions {
            max_discard_seg: 0,
            ..Default::default()
        }
    )
    .is_err());
    let mut blk = Blk::open(
        &img.0,
        BlkOptions {
            max_write_zeroes_seg: 1,
            ..Default::default()
        },
    )
    .unwrap();
    let mut cfg = [0u8; 4];
    blk.read_config(40, &mut cfg).unwrap();
    assert_eq!(u32::from_le_bytes(cfg), 32, "max_discard_seg");
    blk.read_config(52, &mut cfg).unwrap();
    assert_eq!(u32::from_le_bytes(cfg), 1, "max_write_zeroes_seg");
    // Two segments: sectors 0 and 1, one each.
    let mut segs = [0u8; 32];
    segs[8..12].copy_from_slice(&1u32.to_le_bytes());
    segs[16..24].copy_from_slice(&1u64.to_le_bytes());
    segs[24..28].copy_from_slice(&1u32.to_le_bytes());
    let mem = memory();
    mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    let two = [(HDR, 16, 0), (DATA, 32, 0), (STATUS, 1, F_WRITE)];
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(run(&mut blk, &mem, &two).0, VIRTIO_BLK_S_UNSUPP as u8);
    assert!(std::fs::read(&img.0).unwrap().iter().all(|&b| b == 0xEE));
    // DISCARD keeps its 32 (sectors 4 and 5, away from what follows).
    segs[..8].copy_from_slice(&4u64.to_le_bytes());
    segs[16..24].copy_from_slice(&5u64.to_le_bytes());
    mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    header(&mem, VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(run(&mut blk, &mem, &two).0, 0);
    // One segment (sector 0) is within the limit.
    segs[..8].copy_from_slice(&0u64.to_le_bytes());
    mem.write_slice(&segs, GuestAddress(DATA)).unwrap();
    header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    assert_eq!(
        run(
            &mut blk,
            &mem,
            &[(HDR, 16, 0), (DATA, 16, 0), (STATUS, 1, F_WRITE)]
        )
        .0,
        0
    );
    let disk = std::fs::read(&img.0).unwrap();
    assert!(disk[..512].iter().all(|&b| b == 0));
    assert!(disk[512..4 * 512].iter().all(|&b| b == 0xEE));
}

#[test]
fn multiqueue_handlers_serve_queues_concurrently() {
    let img = image("mq", &vec![0u8; 64 * 1024]);
    let mut blk = Blk::open(
        &img.0,
        BlkOptions {
            num_queues: 4,
            ..Default::default()
        },
    )
    .unwrap();
    assert_ne!(blk.device_features() & (1 << VIRTIO_BLK_F_MQ), 0);
    let handlers = blk.activate(1 << VIRTIO_BLK_F_MQ).unwrap();
    assert_eq!(handlers.len(), 4);
    // Each handler writes its own sectors from its own thread, with its own memory.
    let threads: Vec<_> = handlers
        .into_iter()
        .enumerate()
        .map(|(i, mut h)| {
            std::thread::spawn(move || {
                let mem = memory();
                let mock = MockSplitQueue::create(&mem, GuestAddress(AREA), 16);
                mem.write_slice(&[i as u8 + 1; 4096], GuestAddress(DATA))
                    .unwrap();
                header(&mem, VIRTIO_BLK_T_OUT, i as u64 * 8);
                for (j, (addr, len, flags)) in [
                    (HDR, 16u32, F_NEXT),
                    (DATA, 4096, F_NEXT),
                    (STATUS, 1, F_WRITE),
                ]
                .into_iter()
                .enumerate()
                {
                    mock.desc_table()
                        .store(
                            j as u16,
                            RawDescriptor::from(SplitDescriptor::new(
                                addr,
                                len,
                                flags,
                                j as u16 + 1,
                            )),
                        )
                        .unwrap();
                }
                mock.avail().ring().ref_at(0).unwrap().store(0);
                mock.avail().idx().store(1);
                let mut q: Queue = mock.create_queue().unwrap();
                let chain = q.iter(&mem).unwrap().next().unwrap();
                assert_eq!(h.handle_chain(chain, &mem), Ok(1));
                mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 0);
    }
    let disk = std::fs::read(&img.0).unwrap();
    for i in 0..4 {
        assert!(
            disk[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "queue {i}"
        );
    }
}

#[test]
fn capacity_follows_the_image_file_while_live() {
    let img = image("grow", &[0xEEu8; 8 * 512]);
    let mut blk = Blk::open(&img.0, BlkOptions::default()).unwrap();
    let capacity = |blk: &Blk| {
        let mut c = [0u8; 8];
        blk.read_config(0, &mut c).unwrap();
        u64::from_le_bytes(c)
    };
    assert_eq!(capacity(&blk), 8);
    let mut watch = blk.config_watch().expect("an image file is watched");
    assert!(!watch.poll(), "unchanged");
    let mem = memory();
    mem.write_slice(&[0x44; 512], GuestAddress(DATA)).unwrap();
    header(&mem, VIRTIO_BLK_T_OUT, 10);
    let write_10 = [(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)];
    assert_eq!(
        run(&mut blk, &mem, &write_10).0,
        VIRTIO_BLK_S_IOERR as u8,
        "sector 10 is beyond the end"
    );
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img.0)
        .unwrap()
        .set_len(16 * 512)
        .unwrap();
    assert!(watch.poll(), "a grown image is a config change");
    assert!(!watch.poll(), "reported once");
    assert_eq!(capacity(&blk), 16);
    assert_eq!(run(&mut blk, &mem, &write_10).0, 0, "now inside the image");
    assert!(std::fs::read(&img.0).unwrap()[10 * 512..11 * 512]
        .iter()
        .all(|&b| b == 0x44));
}
