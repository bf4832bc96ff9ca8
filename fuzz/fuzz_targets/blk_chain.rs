//! virtio-blk request parsing over a mock split queue, as in rust-vmm
//! vm-virtio's fuzz targets: the driver (the fuzzer) owns the descriptor
//! table, the avail ring and every byte of shared memory. `process_queue`
//! may fail (a broken queue is the device's answer to an unparsable chain);
//! it must never panic, and no request may grow the image.
//!
//! Input (little-endian; missing bytes read as zero):
//!   u8  options: bit 0 opens the image read-only, bit 1 runs requests
//!       one at a time (aio sync) instead of on io_uring
//!   u64 features handed to `activate`; VIRTIO_RING_F_EVENT_IDX (bit 29)
//!       also turns on EVENT_IDX on the queue, as the transport does
//!   u16 avail idx the driver publishes
//!   u8  n (mod 17) descriptors at table indices 0..n, 13 bytes each:
//!       u8 where (mod 4), u32 off, u32 len, u16 flags, u16 next
//!       where: 0 AREA + off % MEM_SIZE, 1 AREA + off (may run past the
//!       end), 2 off (below the area: never shared), 3 u64::MAX - off
//!   u8  h (mod 17) avail ring entries, u16 each
//!   then, to the end: memory writes `u16 off, u16 len, len bytes` at
//!       AREA + off (headers, indirect tables, segments, or the rings)
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringfence_blk::{Aio, Blk, BlkOptions};
use ringfence_device::{process_until_idle, DeviceMemory, QueueStats, VirtioDevice};
use ringfence_fuzz::{image_len, image_path, Input, IMAGE_SECTORS};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Device-visible base of the one shared area (area id 1, as the transport would map it).
const AREA: u64 = 1 << 48;
/// Small, so that creating it per input is cheap; the rings sit at its start.
const MEM_SIZE: usize = 0x10000;
const QSIZE: u16 = 16;
const EVENT_IDX: u64 = 1 << 29;

fn addr(input: &mut Input) -> u64 {
    let (kind, off) = (input.u8() % 4, input.u32());
    match kind {
        0 => AREA + u64::from(off) % MEM_SIZE as u64,
        1 => AREA + u64::from(off),
        2 => u64::from(off),
        _ => u64::MAX - u64::from(off),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let options = input.u8();
    let read_only = options & 1 != 0;
    let sync = options & 2 != 0;
    let features = input.u64();
    let avail_idx = input.u16();

    // A fresh memory per input: nothing leaks from one run into the next.
    let mem = DeviceMemory::from_ranges(&[(GuestAddress(AREA), MEM_SIZE)]).unwrap();
    let mock = MockSplitQueue::create(&mem, GuestAddress(AREA), QSIZE);
    for i in 0..input.u8() % (QSIZE as u8 + 1) {
        let a = addr(&mut input);
        let d = SplitDescriptor::new(a, input.u32(), input.u16(), input.u16());
        mock.desc_table()
            .store(u16::from(i), RawDescriptor::from(d))
            .unwrap();
    }
    for i in 0..input.u8() % (QSIZE as u8 + 1) {
        mock.avail()
            .ring()
            .ref_at(usize::from(i))
            .unwrap()
            .store(input.u16());
    }
    mock.avail().idx().store(avail_idx);
    while !input.is_empty() {
        let off = u64::from(input.u16());
        let len = usize::from(input.u16());
        // Writes running past the end of the area are cut short, not dropped.
        let bytes = input.bytes(len.min(MEM_SIZE - off as usize));
        mem.write_slice(bytes, GuestAddress(AREA + off)).unwrap();
    }

    let mut q: Queue = mock.create_queue().unwrap();
    q.set_event_idx(features & EVENT_IDX != 0);
    let opts = BlkOptions {
        read_only,
        aio: if sync { Aio::Sync } else { Aio::IoUring },
        ..BlkOptions::default()
    };
    let mut blk = Blk::open(image_path(), opts).unwrap();
    let mut handlers = blk.activate(features).unwrap();
    let stats = QueueStats::default();
    // Err (a broken queue) is a legitimate outcome; only a panic is a bug.
    let wait = std::time::Duration::from_secs(5);
    let _ = process_until_idle(&mut q, &mem, handlers[0].as_mut(), &stats, wait);
    // Requests are bounds-checked against the capacity: the file never grows.
    assert_eq!(image_len(), IMAGE_SECTORS * 512, "a request grew the image");
});
