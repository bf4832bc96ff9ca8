//! The io_uring engine: many requests in flight on one queue, completed in
//! the order they finish, with O_DIRECT, short transfers and a reset while
//! requests are in flight.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ringfence_blk::{Aio, Blk, BlkOptions, CacheMode};
use ringfence_device::{process_queue, process_until_idle, DeviceMemory, QueueStats, VirtioDevice};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress};

const AREA: u64 = 1 << 48;
const QSIZE: u16 = 256;
/// Per request r: header at HDRS + 16r, status at STATUSES + r, data at DATA + 64 KiB r.
const HDRS: u64 = AREA + 0x8000;
const STATUSES: u64 = AREA + 0x9000;
const DATA: u64 = AREA + 0x10_0000;
const SLOT: u64 = 0x1_0000;
const WAIT: Duration = Duration::from_secs(10);
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const SECTORS: u64 = 4096; // a 2 MiB image

struct Image(PathBuf);
impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An image whose sector s holds the byte (s % 251) + 1 throughout.
fn image(tag: &str) -> Image {
    let p = std::env::temp_dir().join(format!("ringfence-aio-{tag}-{}.img", std::process::id()));
    let content: Vec<u8> = (0..SECTORS * 512)
        .map(|i| ((i / 512) % 251) as u8 + 1)
        .collect();
    std::fs::write(&p, content).unwrap();
    Image(p)
}

fn open(img: &Image, aio: Aio, cache: CacheMode) -> Blk {
    Blk::open(
        &img.0,
        BlkOptions {
            aio,
            cache,
            queue_size: QSIZE,
            ..Default::default()
        },
    )
    .unwrap()
}

fn memory() -> DeviceMemory {
    DeviceMemory::from_ranges(&[(GuestAddress(AREA), 8 << 20)]).unwrap()
}

/// One request: type, sector, and its data buffer (offset from the request's
/// data slot, length); GET_ID takes a 20-byte buffer, FLUSH none.
#[derive(Clone, Copy)]
struct Req {
    kind: u32,
    sector: u64,
    data_offset: u64,
    len: u32,
}

fn req(kind: u32, sector: u64, len: u32) -> Req {
    Req {
        kind,
        sector,
        data_offset: 0,
        len,
    }
}

/// A driver queue with `reqs` published at once, request r on descriptors
/// 3r.. (header, data, status).
struct Driver<'m> {
    mem: &'m DeviceMemory,
    mock: MockSplitQueue<'m, DeviceMemory>,
    n: u16,
}

impl<'m> Driver<'m> {
    fn new(mem: &'m DeviceMemory, reqs: &[Req]) -> Self {
        let mock = MockSplitQueue::create(mem, GuestAddress(AREA), QSIZE);
        for (r, q) in reqs.iter().enumerate() {
            let r16 = r as u16;
            let hdr = HDRS + 16 * r as u64;
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&q.kind.to_le_bytes());
            h[8..].copy_from_slice(&q.sector.to_le_bytes());
            mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            let status = STATUSES + r as u64;
            mem.write_obj(0xFFu8, GuestAddress(status)).unwrap();
            let data = DATA + SLOT * r as u64 + q.data_offset;
            let write = if q.kind == VIRTIO_BLK_T_OUT {
                0
            } else {
                F_WRITE
            };
            let mut descs = vec![(hdr, 16, F_NEXT)];
            if q.len > 0 {
                descs.push((data, q.len, write | F_NEXT));
            }
            descs.push((status, 1, F_WRITE));
            let first = 3 * r16;
            for (i, &(addr, len, flags)) in descs.iter().enumerate() {
                let d = SplitDescriptor::new(addr, len, flags, first + i as u16 + 1);
                mock.desc_table()
                    .store(first + i as u16, RawDescriptor::from(d))
                    .unwrap();
            }
            mock.avail().ring().ref_at(r).unwrap().store(first);
        }
        mock.avail().idx().store(reqs.len() as u16);
        Driver {
            mem,
            mock,
            n: reqs.len() as u16,
        }
    }

    fn queue(&self) -> Queue {
        self.mock.create_queue().unwrap()
    }

    fn status(&self, r: usize) -> u8 {
        self.mem
            .read_obj(GuestAddress(STATUSES + r as u64))
            .unwrap()
    }

    fn data(&self, r: usize, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem
            .read_slice(&mut v, GuestAddress(DATA + SLOT * r as u64))
            .unwrap();
        v
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(self.mock.used_addr().unchecked_add(2))
            .unwrap()
    }

    /// The used ring's (request index, used length) in the order the device put them.
    fn used(&self) -> Vec<(usize, u32)> {
        (0..self.used_idx().min(self.n))
            .map(|i| {
                let at = self.mock.used_addr().unchecked_add(4 + 8 * u64::from(i));
                let id: u32 = self.mem.read_obj(at).unwrap();
                let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
                (id as usize / 3, len)
            })
            .collect()
    }
}

/// Activates the device and serves the driver's queue until nothing is in
/// flight; returns the calls' sum and the queue's counters.
fn serve(blk: &mut Blk, driver: &Driver<'_>) -> (ringfence_device::Processed, QueueStats) {
    let mut handlers = blk.activate(0).unwrap();
    let mut q = driver.queue();
    let stats = QueueStats::default();
    let done = process_until_idle(&mut q, driver.mem, handlers[0].as_mut(), &stats, WAIT).unwrap();
    (done, stats)
}

fn sector_byte(s: u64) -> u8 {
    (s % 251) as u8 + 1
}

/// Whether `data` is what the image held from `sector` on.
fn holds_sectors(data: &[u8], sector: u64) -> bool {
    data.chunks(512)
        .enumerate()
        .all(|(i, c)| c.iter().all(|&b| b == sector_byte(sector + i as u64)))
}

#[test]
fn many_reads_in_flight_on_one_queue_all_complete_with_their_own_data() {
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let img = image("many");
        let mut blk = open(&img, Aio::IoUring, cache);
        let mem = memory();
        // 32 reads of 4 KiB scattered over the image.
        let reqs: Vec<Req> = (0..32)
            .map(|r| req(VIRTIO_BLK_T_IN, (r * 97 % 500) * 8, 4096))
            .collect();
        let driver = Driver::new(&mem, &reqs);
        let (done, stats) = serve(&mut blk, &driver);
        assert_eq!(done.chains, 32);
        assert!(!done.in_flight);
        assert_eq!(driver.used_idx(), 32);
        let mut used = driver.used();
        used.sort_unstable();
        for (r, q) in reqs.iter().enumerate() {
            assert_eq!(
                used[r],
                (r, 4097),
                "{cache:?}: request {r} used once, 4 KiB + status"
            );
            assert_eq!(driver.status(r), VIRTIO_BLK_S_OK as u8);
            assert!(
                holds_sectors(&driver.data(r, 4096), q.sector),
                "{cache:?}: request {r}"
            );
        }
        assert_eq!(
            blk.stats().submitted.load(Ordering::Relaxed),
            32,
            "{cache:?}"
        );
        assert_eq!(blk.stats().ok.load(Ordering::Relaxed), 32);
        assert_eq!(stats.chains.load(Ordering::Relaxed), 32);
    }
}

#[test]
fn a_request_answered_at_once_overtakes_a_read_in_flight() {
    let img = image("order");
    let mut blk = open(&img, Aio::IoUring, CacheMode::None);
    let mem = memory();
    // The read goes to the kernel; GET_ID is answered while it is parsed.
    let reqs = [
        req(VIRTIO_BLK_T_IN, 8, 4096),
        req(VIRTIO_BLK_T_GET_ID, 0, 20),
    ];
    let driver = Driver::new(&mem, &reqs);
    serve(&mut blk, &driver);
    assert_eq!(
        driver.used(),
        vec![(1, 21), (0, 4097)],
        "used ring in completion order, not avail order"
    );
    assert_eq!(&driver.data(1, 9), b"ringfence");
    assert!(holds_sectors(&driver.data(0, 4096), 8));
}

#[test]
fn writes_and_a_flush_in_flight_land_on_the_image() {
    for cache in [CacheMode::Writeback, CacheMode::None, CacheMode::Unsafe] {
        let img = image("writes");
        let mut blk = open(&img, Aio::IoUring, cache);
        let mem = memory();
        let mut reqs: Vec<Req> = (0..16)
            .map(|r| req(VIRTIO_BLK_T_OUT, 1000 + r * 16, 8192))
            .collect();
        reqs.push(req(VIRTIO_BLK_T_FLUSH, 0, 0));
        for r in 0..16 {
            mem.write_slice(&[0xC0 + r as u8; 8192], GuestAddress(DATA + SLOT * r))
                .unwrap();
        }
        let driver = Driver::new(&mem, &reqs);
        serve(&mut blk, &driver);
        assert_eq!(driver.used_idx(), 17);
        for r in 0..17 {
            assert_eq!(
                driver.status(r),
                VIRTIO_BLK_S_OK as u8,
                "{cache:?} request {r}"
            );
        }
        let disk = std::fs::read(&img.0).unwrap();
        for r in 0..16u64 {
            let at = ((1000 + r * 16) * 512) as usize;
            assert!(disk[at..at + 8192].iter().all(|&b| b == 0xC0 + r as u8));
        }
        // The flush is the ring's only in `writeback` and `none`; `unsafe`
        // answers it at once.
        let want = if cache == CacheMode::Unsafe { 16 } else { 17 };
        assert_eq!(
            blk.stats().submitted.load(Ordering::Relaxed),
            want,
            "{cache:?}"
        );
    }
}

#[test]
fn one_bad_request_among_good_ones_fails_alone() {
    let img = image("partial");
    let mut blk = open(&img, Aio::IoUring, CacheMode::Writeback);
    let mem = memory();
    let reqs = [
        req(VIRTIO_BLK_T_IN, 0, 4096),
        req(VIRTIO_BLK_T_IN, SECTORS - 4, 4096), // straddles the end
        req(VIRTIO_BLK_T_IN, 16, 4096),
        req(0xDEAD, 0, 512),
    ];
    let driver = Driver::new(&mem, &reqs);
    serve(&mut blk, &driver);
    assert_eq!(driver.used_idx(), 4);
    let statuses: Vec<u8> = (0..4).map(|r| driver.status(r)).collect();
    assert_eq!(
        statuses,
        [
            VIRTIO_BLK_S_OK as u8,
            VIRTIO_BLK_S_IOERR as u8,
            VIRTIO_BLK_S_OK as u8,
            VIRTIO_BLK_S_UNSUPP as u8
        ]
    );
    assert!(
        driver.data(1, 4096).iter().all(|&b| b == 0),
        "nothing read for the bad one"
    );
    assert!(holds_sectors(&driver.data(2, 4096), 16));
}

#[test]
fn a_read_cut_short_by_a_shrunk_image_is_an_error_not_a_hang() {
    let img = image("short");
    let mut blk = open(&img, Aio::IoUring, CacheMode::Writeback);
    let mem = memory();
    // The image shrinks by half a request after the capacity was read:
    // the kernel returns a short read, and the rest cannot be read.
    let reqs = [req(VIRTIO_BLK_T_IN, SECTORS - 8, 4096)];
    let driver = Driver::new(&mem, &reqs);
    let mut handlers = blk.activate(0).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img.0)
        .unwrap()
        .set_len((SECTORS - 4) * 512)
        .unwrap();
    let mut q = driver.queue();
    let stats = QueueStats::default();
    process_until_idle(&mut q, &mem, handlers[0].as_mut(), &stats, WAIT).unwrap();
    assert_eq!(driver.used(), vec![(0, 1)]);
    assert_eq!(driver.status(0), VIRTIO_BLK_S_IOERR as u8);
    assert_eq!(blk.stats().short.load(Ordering::Relaxed), 1);
    // What could be read was read.
    assert!(holds_sectors(&driver.data(0, 2048), SECTORS - 8));
}

#[test]
fn unaligned_buffers_with_o_direct_go_through_the_bounce_buffer() {
    for aio in [Aio::IoUring, Aio::Sync] {
        let img = image("unaligned");
        let mut blk = open(&img, aio, CacheMode::None);
        let mem = memory();
        // Off by one byte, and a length that is not a multiple of 512 in
        // two descriptors is not possible here: one odd address does it.
        let odd = |kind, sector| Req {
            kind,
            sector,
            data_offset: 1,
            len: 4096,
        };
        mem.write_slice(&[0xE7; 4096], GuestAddress(DATA + SLOT + 1))
            .unwrap();
        let reqs = [odd(VIRTIO_BLK_T_IN, 24), odd(VIRTIO_BLK_T_OUT, 64)];
        let driver = Driver::new(&mem, &reqs);
        serve(&mut blk, &driver);
        assert_eq!(driver.status(0), VIRTIO_BLK_S_OK as u8, "{aio:?}");
        assert_eq!(driver.status(1), VIRTIO_BLK_S_OK as u8, "{aio:?}");
        let mut got = vec![0u8; 4096];
        mem.read_slice(&mut got, GuestAddress(DATA + 1)).unwrap();
        assert!(holds_sectors(&got, 24), "{aio:?}");
        let disk = std::fs::read(&img.0).unwrap();
        assert!(
            disk[64 * 512..72 * 512].iter().all(|&b| b == 0xE7),
            "{aio:?}"
        );
        assert_eq!(blk.stats().bounced.load(Ordering::Relaxed), 2, "{aio:?}");
        assert_eq!(blk.stats().submitted.load(Ordering::Relaxed), 0, "{aio:?}");
    }
}

#[test]
fn a_reset_with_requests_in_flight_waits_for_them_and_answers_none() {
    let img = image("reset");
    let mut blk = open(&img, Aio::IoUring, CacheMode::None);
    let mem = memory();
    let reqs: Vec<Req> = (0..48)
        .map(|r| req(VIRTIO_BLK_T_IN, r * 64, 32 * 1024))
        .collect();
    let driver = Driver::new(&mem, &reqs);
    let mut handlers = blk.activate(0).unwrap();
    let mut q = driver.queue();
    let stats = QueueStats::default();
    // One call submits everything; whatever has not completed by its end is
    // in flight when the device is reset (the handler dropped).
    let first = process_queue(&mut q, &mem, handlers[0].as_mut(), &stats).unwrap();
    assert_eq!(first.chains, 48);
    let in_flight = handlers[0].in_flight();
    assert!(
        in_flight > 0,
        "O_DIRECT reads still running when the call returns"
    );
    let started = Instant::now();
    drop(handlers);
    blk.reset();
    assert!(started.elapsed() < Duration::from_secs(5));
    // Whatever was answered is on the used ring with its status; whatever
    // was in flight at the reset is neither: no status, no used entry, also
    // not after the kernel finished it.
    std::thread::sleep(Duration::from_millis(50));
    let used = driver.used();
    assert_eq!(
        used.len() + in_flight,
        48,
        "every request is either answered or dropped"
    );
    for r in 0..48 {
        let answered = used.iter().any(|&(u, _)| u == r);
        let status = driver.status(r);
        if answered {
            assert_eq!(status, VIRTIO_BLK_S_OK as u8);
        } else {
            assert_eq!(status, 0xFF, "request {r} dropped at reset got a status");
        }
    }
}

#[test]
fn sync_engine_answers_in_order_with_nothing_in_flight() {
    let img = image("sync");
    let mut blk = open(&img, Aio::Sync, CacheMode::Writeback);
    let mem = memory();
    let reqs = [
        req(VIRTIO_BLK_T_IN, 8, 4096),
        req(VIRTIO_BLK_T_GET_ID, 0, 20),
    ];
    let driver = Driver::new(&mem, &reqs);
    let mut handlers = blk.activate(0).unwrap();
    let mut q = driver.queue();
    let stats = QueueStats::default();
    let done = process_queue(&mut q, &mem, handlers[0].as_mut(), &stats).unwrap();
    assert!(!done.in_flight);
    assert!(handlers[0].wake_fd().is_none());
    assert_eq!(driver.used(), vec![(0, 4097), (1, 21)]);
    assert_eq!(blk.stats().submitted.load(Ordering::Relaxed), 0);
}
