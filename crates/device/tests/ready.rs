//! The `ready` contract of `process_queue`: a handler with nothing to put in
//! a chain costs the driver no buffer, and the result says whether buffers
//! are waiting (starved) so the transport knows to wait on the handler's
//! own source rather than spin on the avail ring.

use ringfence_device::{process_queue, Chain, ChainError, DeviceMemory, QueueHandler, QueueStats};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

const BASE: u64 = 0x10000;
const BUF: u64 = 0x40000;
const F_WRITE: u16 = 2;

/// Hands out one byte per chain from `data`; ready while data remains.
struct Source {
    data: Vec<u8>,
    asked: usize,
}

impl QueueHandler for Source {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        let desc = chain
            .into_iter()
            .next()
            .ok_or(ChainError::Empty { head: 0 })?;
        let byte = self.data.remove(0);
        mem.write_obj(byte, desc.addr())
            .map_err(|_| ChainError::Unanswerable {
                head: 0,
                reason: "unwritable",
            })?;
        Ok(1)
    }

    fn ready(&mut self) -> bool {
        self.asked += 1;
        !self.data.is_empty()
    }
}

fn queue_with_buffers(mem: &DeviceMemory, n: u16) -> (MockSplitQueue<'_, DeviceMemory>, Queue) {
    let mock = MockSplitQueue::create(mem, GuestAddress(BASE), 16);
    for i in 0..n {
        let d = SplitDescriptor::new(BUF + u64::from(i) * 16, 16, F_WRITE, 0);
        mock.desc_table().store(i, RawDescriptor::from(d)).unwrap();
        mock.avail().ring().ref_at(i.into()).unwrap().store(i);
    }
    mock.avail().idx().store(n);
    let q = mock.create_queue().unwrap();
    (mock, q)
}

fn memory() -> DeviceMemory {
    DeviceMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
}

#[test]
fn not_ready_with_buffers_waiting_is_starved_and_consumes_nothing() {
    let mem = memory();
    let (_mock, mut q) = queue_with_buffers(&mem, 3);
    let mut h = Source {
        data: vec![],
        asked: 0,
    };
    let done = process_queue(&mut q, &mem, &mut h, &QueueStats::default()).unwrap();
    assert_eq!((done.chains, done.starved, done.notify), (0, true, false));
    assert_eq!(q.next_avail(), 0, "no buffer taken");
    assert_eq!(h.asked, 1, "asked once, not spun on");
}

#[test]
fn data_for_some_buffers_fills_them_in_order_then_starves() {
    let mem = memory();
    let (mock, mut q) = queue_with_buffers(&mem, 3);
    let mut h = Source {
        data: vec![0xA1, 0xA2],
        asked: 0,
    };
    let done = process_queue(&mut q, &mem, &mut h, &QueueStats::default()).unwrap();
    assert_eq!((done.chains, done.starved), (2, true));
    assert_eq!(q.next_avail(), 2);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(BUF)).unwrap(), 0xA1);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(BUF + 16)).unwrap(), 0xA2);
    assert_eq!(
        mem.read_obj::<u8>(GuestAddress(BUF + 32)).unwrap(),
        0,
        "third buffer untouched"
    );
    let used_idx: u16 = mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
    assert_eq!(used_idx, 2);
}

#[test]
fn ready_without_buffers_is_not_starved() {
    let mem = memory();
    let (_mock, mut q) = queue_with_buffers(&mem, 0);
    let mut h = Source {
        data: vec![1],
        asked: 0,
    };
    let done = process_queue(&mut q, &mem, &mut h, &QueueStats::default()).unwrap();
    assert_eq!(
        (done.chains, done.starved),
        (0, false),
        "waits for a kick, not for data"
    );
    assert_eq!(h.data, vec![1], "data kept for later");
}
