//! Hostile descriptor chains against the virtio-blk model, through the same
//! `process_queue` the transports use. Each case states the exact outcome: an
//! in-band status where the status byte is known, otherwise a broken queue
//! with nothing written anywhere.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use ringfence_blk::{Blk, BlkOptions};
use ringfence_device::{
    process_until_idle, ChainError, DeviceMemory, QueueFailure, QueueStats, VirtioDevice,
};
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

const AREA: u64 = 1 << 48;
/// Longest wait for a request in flight.
const WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const HDR: u64 = AREA + 0x10000;
const DATA: u64 = AREA + 0x20000;
const TABLE: u64 = AREA + 0x80000;
const STATUS: u64 = AREA + 0x90000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const QSIZE: u16 = 16;

struct Image(PathBuf);
impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn image(tag: &str, bytes: &[u8]) -> Image {
    let p = std::env::temp_dir().join(format!("ringfence-chain-{tag}-{}.img", std::process::id()));
    std::fs::write(&p, bytes).unwrap();
    Image(p)
}

fn blk(tag: &str) -> (Image, Blk) {
    let mut content = vec![0u8; 64 * 512];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i / 512) as u8 + 1;
    }
    let img = image(tag, &content);
    let blk = Blk::open(&img.0, BlkOptions::default()).unwrap();
    (img, blk)
}

fn memory() -> DeviceMemory {
    DeviceMemory::from_ranges(&[(GuestAddress(AREA), 1 << 20)]).unwrap()
}

fn header(mem: &DeviceMemory, at: u64, req_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&req_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(at)).unwrap();
}

/// A descriptor exactly as given: (addr, len, flags, next).
type Raw = (u64, u32, u16, u16);

struct Outcome {
    result: Result<u32, QueueFailure>,
    status: u8,
    used_idx: u16,
}

/// Stores `descs` at table indices 0.., publishes head 0, runs the device.
/// The data area is filled with 0x5A and the status byte with 0xFF first, so
/// any stray write shows.
fn run(blk: &mut Blk, mem: &DeviceMemory, descs: &[Raw]) -> Outcome {
    let mut handlers = blk.activate(1 << VIRTIO_BLK_F_FLUSH).unwrap();
    let mock = MockSplitQueue::create(mem, GuestAddress(AREA), QSIZE);
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        let d = SplitDescriptor::new(addr, len, flags, next);
        mock.desc_table()
            .store(i as u16, RawDescriptor::from(d))
            .unwrap();
    }
    mock.avail().ring().ref_at(0).unwrap().store(0);
    mock.avail().idx().store(1);
    let mut q: Queue = mock.create_queue().unwrap();
    mem.write_obj(0xFFu8, GuestAddress(STATUS)).unwrap();
    let stats = QueueStats::default();
    let result = process_until_idle(&mut q, mem, handlers[0].as_mut(), &stats, WAIT).map(|p| {
        assert_eq!(p.chains, 1);
        mem.read_obj::<u32>(mock.used_addr().unchecked_add(8))
            .unwrap()
    });
    let used_idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
    Outcome {
        result,
        status: mem.read_obj(GuestAddress(STATUS)).unwrap(),
        used_idx,
    }
}

/// Writes an indirect table at TABLE.
fn table(mem: &DeviceMemory, entries: &[Raw]) {
    for (i, &(addr, len, flags, next)) in entries.iter().enumerate() {
        let mut e = [0u8; 16];
        e[..8].copy_from_slice(&addr.to_le_bytes());
        e[8..12].copy_from_slice(&len.to_le_bytes());
        e[12..14].copy_from_slice(&flags.to_le_bytes());
        e[14..].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&e, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
}

fn fill_data(mem: &DeviceMemory) {
    mem.write_slice(&[0x5A; 8192], GuestAddress(DATA)).unwrap();
}

fn data_untouched(mem: &DeviceMemory) -> bool {
    let mut d = [0u8; 8192];
    mem.read_slice(&mut d, GuestAddress(DATA)).unwrap();
    d.iter().all(|&b| b == 0x5A)
}

/// The chain is unparsable: the queue breaks, nothing is used, nothing written.
fn assert_broken(o: &Outcome, mem: &DeviceMemory, expect: impl Fn(&ChainError) -> bool) {
    match &o.result {
        Err(QueueFailure::Chain(e)) => assert!(expect(e), "unexpected chain error {e:?}"),
        Err(other) => panic!("expected a chain error, got {other:?}"),
        Ok(n) => panic!("expected a broken queue, got used length {n}"),
    }
    assert_eq!(o.used_idx, 0, "a broken chain must not be used");
    assert_eq!(o.status, 0xFF, "no status may be written");
    assert!(data_untouched(mem), "no data may be written");
}

fn ok_read(o: &Outcome, used: u32) {
    assert_eq!(o.result.as_ref().ok(), Some(&used));
    assert_eq!((o.status, o.used_idx), (VIRTIO_BLK_S_OK as u8, 1));
}

#[test]
fn next_outside_the_table_breaks_the_queue_and_writes_nothing() {
    // The regression: header, a 513-byte writable buffer and a `next` out of
    // the table used to get status OK written into the data buffer.
    let (_img, mut blk) = blk("next-out");
    let mem = memory();
    fill_data(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let o = run(
        &mut blk,
        &mem,
        &[
            (HDR, 16, F_NEXT, 1),
            (DATA, 513, F_WRITE | F_NEXT, 200),
            (STATUS, 1, F_WRITE, 0),
        ],
    );
    assert_broken(&o, &mem, |e| {
        matches!(e, ChainError::Broken { walked: 2, .. })
    });
    assert_eq!(blk.stats().unanswerable.load(Ordering::Relaxed), 1);
    assert_eq!(blk.stats().ok.load(Ordering::Relaxed), 0);
}

#[test]
fn a_loop_in_the_table_breaks_the_queue() {
    let (_img, mut blk) = blk("loop");
    let mem = memory();
    fill_data(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let o = run(
        &mut blk,
        &mem,
        &[
            (HDR, 16, F_NEXT, 1),
            (DATA, 512, F_WRITE | F_NEXT, 2),
            (STATUS, 1, F_WRITE | F_NEXT, 0),
        ],
    );
    assert_broken(&o, &mem, |e| matches!(e, ChainError::Broken { .. }));
}

#[test]
fn an_indirect_table_that_loops_back_breaks_the_queue() {
    let (_img, mut blk) = blk("ind-loop");
    let mem = memory();
    fill_data(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    table(
        &mem,
        &[
            (HDR, 16, F_NEXT, 1),
            (DATA, 512, F_WRITE | F_NEXT, 2),
            (STATUS, 1, F_WRITE | F_NEXT, 0),
        ],
    );
    let o = run(&mut blk, &mem, &[(TABLE, 48, F_INDIRECT, 0)]);
    assert_broken(&o, &mem, |e| {
        matches!(e, ChainError::Broken { walked: 3, .. })
    });
}

#[test]
fn an_indirect_table_outside_memory_or_misshapen_breaks_the_queue() {
    let (_img, mut blk) = blk("ind-bad");
    let mem = memory();
    fill_data(&mem);
    for (addr, len) in [(0x1000u64, 48u32), (TABLE, 40), (TABLE, 0)] {
        let o = run(&mut blk, &mem, &[(addr, len, F_INDIRECT, 0)]);
        assert_broken(&o, &mem, |e| matches!(e, ChainError::Empty { head: 0 }));
    }
}

#[test]
fn an_indirect_entry_pointing_outside_its_table_breaks_the_queue() {
    let (_img, mut blk) = blk("ind-next");
    let mem = memory();
    fill_data(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    table(
        &mem,
        &[(HDR, 16, F_NEXT, 1), (DATA, 512, F_WRITE | F_NEXT, 7)],
    );
    let o = run(&mut blk, &mem, &[(TABLE, 32, F_INDIRECT, 0)]);
    assert_broken(&o, &mem, |e| {
        matches!(e, ChainError::Broken { walked: 2, .. })
    });
}

#[test]
fn a_chain_longer_than_the_queue_breaks_the_queue() {
    let (_img, mut blk) = blk("long");
    let mem = memory();
    fill_data(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    // 258 entries in an indirect table, more than the 256 the device accepts.
    let mut entries = vec![(HDR, 16, F_NEXT, 1)];
    for i in 1..257u16 {
        entries.push((DATA, 512, F_NEXT, i + 1));
    }
    entries.push((STATUS, 1, F_WRITE, 0));
    table(&mem, &entries);
    let o = run(
        &mut blk,
        &mem,
        &[(TABLE, 16 * entries.len() as u32, F_INDIRECT, 0)],
    );
    assert_broken(&o, &mem, |e| {
        matches!(e, ChainError::TooLong { max: 256, .. })
    });
}

#[test]
fn a_four_gib_descriptor_breaks_the_queue() {
    let (_img, mut blk) = blk("4g");
    let mem = memory();
    fill_data(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let o = run(
        &mut blk,
        &mem,
        &[
            (HDR, 16, F_NEXT, 1),
            (DATA, u32::MAX, F_WRITE | F_NEXT, 2),
            (STATUS, 1, F_WRITE, 0),
        ],
    );
    assert_broken(&o, &mem, |e| {
        matches!(e, ChainError::Broken { walked: 1, .. })
    });
}

#[test]
fn without_a_writable_status_byte_the_queue_breaks() {
    let (_img, mut blk) = blk("nostatus");
    let mem = memory();
    fill_data(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    // Read-only last descriptor, zero-length status, status outside memory.
    for last in [
        (STATUS, 1, 0, 0),
        (STATUS, 0, F_WRITE, 0),
        (0x2000, 1, F_WRITE, 0),
    ] {
        let o = run(
            &mut blk,
            &mem,
            &[(HDR, 16, F_NEXT, 1), (DATA, 512, F_WRITE | F_NEXT, 2), last],
        );
        assert_broken(&o, &mem, |e| {
            matches!(e, ChainError::Unanswerable { head: 0, .. })
        });
    }
    assert_eq!(blk.stats().unanswerable.load(Ordering::Relaxed), 3);
}

#[test]
fn a_header_split_at_an_odd_boundary_is_a_valid_request() {
    let (_img, mut blk) = blk("split");
    let mem = memory();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
    let o = run(
        &mut blk,
        &mem,
        &[
            (HDR, 3, F_NEXT, 1),
            (HDR + 3, 13, F_NEXT, 2),
            (DATA, 512, F_WRITE | F_NEXT, 3),
            (STATUS, 1, F_WRITE, 0),
        ],
    );
    ok_read(&o, 513);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got.iter().all(|&b| b == 4), "sector 3 holds 4s");
}

#[test]
fn header_and_data_in_one_descriptor_and_data_with_status_in_another() {
    let (img, mut blk) = blk("merged");
    let mem = memory();
    // OUT: header immediately followed by 512 bytes of data in one descriptor.
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 5);
    mem.write_slice(&[0x77; 512], GuestAddress(HDR + 16))
        .unwrap();
    let o = run(
        &mut blk,
        &mem,
        &[(HDR, 528, F_NEXT, 1), (STATUS, 1, F_WRITE, 0)],
    );
    assert_eq!(o.result.as_ref().ok(), Some(&1));
    assert_eq!(o.status, VIRTIO_BLK_S_OK as u8);
    let disk = std::fs::read(&img.0).unwrap();
    assert!(disk[5 * 512..6 * 512].iter().all(|&b| b == 0x77));
    assert!(disk[6 * 512..7 * 512].iter().all(|&b| b == 7));
    // IN: 512 data bytes and the status byte in one writable descriptor.
    header(&mem, HDR, VIRTIO_BLK_T_IN, 5);
    let o = run(
        &mut blk,
        &mem,
        &[(HDR, 16, F_NEXT, 1), (STATUS - 512, 513, F_WRITE, 0)],
    );
    ok_read(&o, 513);
    let mut got = [0u8; 512];
    mem.read_slice(&mut got, GuestAddress(STATUS - 512))
        .unwrap();
    assert!(got.iter().all(|&b| b == 0x77));
}

#[test]
fn a_readable_descriptor_after_a_writable_one_gets_ioerr() {
    let (_img, mut blk) = blk("order");
    let mem = memory();
    fill_data(&mem);
    header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let o = run(
        &mut blk,
        &mem,
        &[
            (HDR, 16, F_NEXT, 1),
            (DATA, 512, F_WRITE | F_NEXT, 2),
            (DATA + 4096, 512, F_NEXT, 3),
            (STATUS, 1, F_WRITE, 0),
        ],
    );
    assert_eq!(o.result.as_ref().ok(), Some(&1));
    assert_eq!(o.status, VIRTIO_BLK_S_IOERR as u8);
    assert!(data_untouched(&mem));
}

#[test]
fn a_buffer_spanning_two_adjacent_regions_is_served() {
    let (_img, mut blk) = blk("span");
    // Two regions, back to back in the device's address space.
    let mem = DeviceMemory::from_ranges(&[
        (GuestAddress(AREA), 0x30000),
        (GuestAddress(AREA + 0x30000), 0x70000),
    ])
    .unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
    let start = AREA + 0x30000 - 100;
    let o = run(
        &mut blk,
        &mem,
        &[
            (HDR, 16, F_NEXT, 1),
            (start, 1024, F_WRITE | F_NEXT, 2),
            (STATUS, 1, F_WRITE, 0),
        ],
    );
    ok_read(&o, 1025);
    let mut got = [0u8; 1024];
    mem.read_slice(&mut got, GuestAddress(start)).unwrap();
    assert!(got[..512].iter().all(|&b| b == 2) && got[512..].iter().all(|&b| b == 3));
}

#[test]
fn a_bad_buffer_fails_a_write_before_any_byte_reaches_the_image() {
    let (img, mut blk) = blk("partial");
    let mem = memory();
    mem.write_slice(&[0x99; 512], GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let o = run(
        &mut blk,
        &mem,
        &[
            (HDR, 16, F_NEXT, 1),
            (DATA, 512, F_NEXT, 2),
            (0x3000, 512, F_NEXT, 3),
            (STATUS, 1, F_WRITE, 0),
        ],
    );
    assert_eq!(o.status, VIRTIO_BLK_S_IOERR as u8);
    let disk = std::fs::read(&img.0).unwrap();
    assert!(disk[..512].iter().all(|&b| b == 1), "sector 0 unchanged");
}

#[test]
fn write_zeroes_with_unmap_reads_back_zeroes() {
    let (img, mut blk) = blk("unmap");
    let mem = memory();
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&8u64.to_le_bytes());
    seg[8..12].copy_from_slice(&16u32.to_le_bytes());
    seg[12..].copy_from_slice(&VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.to_le_bytes());
    mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
    header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let o = run(
        &mut blk,
        &mem,
        &[
            (HDR, 16, F_NEXT, 1),
            (DATA, 16, F_NEXT, 2),
            (STATUS, 1, F_WRITE, 0),
        ],
    );
    assert_eq!(o.status, VIRTIO_BLK_S_OK as u8);
    let disk = std::fs::read(&img.0).unwrap();
    assert!(disk[8 * 512..24 * 512].iter().all(|&b| b == 0));
    assert!(disk[7 * 512..8 * 512].iter().all(|&b| b == 8));
    assert!(disk[24 * 512..25 * 512].iter().all(|&b| b == 25));
}

#[test]
fn a_broken_queue_is_left_alone_after_the_failure() {
    // After a chain error the transport stops the queue; the queue object
    // itself reports the chain as consumed, so a retry cannot re-run it.
    let (_img, mut blk) = blk("after");
    let mem = memory();
    let mut handlers = blk.activate(0).unwrap();
    let mock = MockSplitQueue::create(&mem, GuestAddress(AREA), QSIZE);
    mock.desc_table()
        .store(
            0,
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, F_NEXT, 99)),
        )
        .unwrap();
    mock.avail().ring().ref_at(0).unwrap().store(0);
    mock.avail().idx().store(1);
    let mut q: Queue = mock.create_queue().unwrap();
    let stats = QueueStats::default();
    assert!(process_until_idle(&mut q, &mem, handlers[0].as_mut(), &stats, WAIT).is_err());
    assert_eq!(q.next_avail(), 1);
    assert_eq!(stats.chains.load(Ordering::Relaxed), 0);
}
