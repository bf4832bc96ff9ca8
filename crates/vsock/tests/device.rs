//! The device as a transport sees it: identity, config space, options,
//! the event queue, the listening socket.

mod common;

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use common::*;
use ringfence_device::{process_queue, DeviceError, QueueStats, VirtioDevice};
use ringfence_vsock::*;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::GuestAddress;

#[test]
fn identity_and_config_space() {
    let dir = Dir::new("ident");
    let mut o = opts(dir.0.join("v.sock"));
    o.guest_cid = 0x1234_5678;
    let mut dev = Vsock::new(o).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.num_queues(), 3);
    assert_eq!(dev.max_queue_size(), QSIZE);
    assert_eq!(dev.device_features(), 0);
    assert_eq!(dev.config_size(), 8);
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg).unwrap();
    assert_eq!(u64::from_le_bytes(cfg), 0x1234_5678);
    let mut hi = [0u8; 4];
    dev.read_config(4, &mut hi).unwrap();
    assert_eq!(hi, [0; 4]);
    assert!(matches!(
        dev.read_config(6, &mut hi),
        Err(DeviceError::ConfigOutOfRange {
            offset: 6,
            len: 4,
            size: 8
        })
    ));
    assert!(matches!(
        dev.write_config(0, &[1]),
        Err(DeviceError::ConfigReadOnly { offset: 0 })
    ));
}

#[test]
fn options_are_checked() {
    let dir = Dir::new("opts");
    let uds = dir.0.join("v.sock");
    let bad = |edit: &dyn Fn(&mut VsockOptions)| {
        let mut o = opts(uds.clone());
        edit(&mut o);
        Vsock::new(o).unwrap_err()
    };
    for cid in [0, 1, 2, 0xffff_ffff, 1 << 32] {
        assert!(
            matches!(bad(&|o| o.guest_cid = cid), VsockError::InvalidCid { cid: c } if c == cid)
        );
    }
    assert!(matches!(
        bad(&|o| o.queue_size = 3),
        VsockError::InvalidOption {
            name: "queue_size",
            ..
        }
    ));
    assert!(matches!(
        bad(&|o| o.buf_alloc = 100),
        VsockError::InvalidOption {
            name: "buf_alloc",
            ..
        }
    ));
    assert!(matches!(
        bad(&|o| o.max_connections = 0),
        VsockError::InvalidOption {
            name: "max_connections",
            ..
        }
    ));
    let long = PathBuf::from(format!("/tmp/{}", "x".repeat(92)));
    assert!(matches!(
        bad(&|o| o.uds_path = long.clone()),
        VsockError::PathTooLong {
            len: 97,
            max: 96,
            ..
        }
    ));
    assert!(!uds.exists(), "no socket for refused options");
}

#[test]
fn a_stale_socket_file_is_replaced_and_a_live_one_refused() {
    let dir = Dir::new("stale");
    let uds = dir.0.join("v.sock");
    drop(UnixListener::bind(&uds).unwrap());
    assert!(uds.exists());
    let dev = Vsock::new(opts(uds.clone())).unwrap();
    UnixStream::connect(&uds).unwrap();
    assert!(matches!(
        Vsock::new(opts(uds.clone())),
        Err(VsockError::Bind { .. })
    ));
    drop(dev);
    // Anything but a socket is left alone.
    let file = dir.0.join("file");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(
        Vsock::new(opts(file.clone())),
        Err(VsockError::Bind { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn the_event_queue_holds_its_buffers() {
    let mut h = Harness::new("evq");
    let mem = DeviceMemory::from_ranges(&[(GuestAddress(1 << 30), 1 << 20)]).unwrap();
    let mut mock = MockSplitQueue::create(&mem, GuestAddress(1 << 30), 8);
    mock.add_chain(1).unwrap();
    let mut q: Queue = mock.create_queue().unwrap();
    let st = QueueStats::default();
    let p = process_queue(&mut q, &mem, h.ev.as_mut(), &st).unwrap();
    assert_eq!((p.chains, p.starved, p.notify), (0, true, false));
    assert_eq!(h.ev.wake_fd(), None);
}

use ringfence_device::DeviceMemory;

#[test]
fn an_idle_device_does_not_wake_its_worker() {
    let mut h = Harness::new("idle");
    let (p, got) = h.run_rx();
    assert_eq!((p.chains, got.len()), (0, 0));
    h.post_rx(4);
    let (p, got) = h.run_rx();
    assert_eq!((p.chains, p.starved, got.len()), (0, true, 0));
    assert!(!h.wake_readable());
}

#[test]
fn reset_closes_every_connection_and_a_new_activation_serves_again() {
    let mut h = Harness::new("reset");
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 1, 52, 4096);
    let (mut client, _) = h.host_connect(80);
    assert_eq!(h.dev.connections(), 2);
    let handlers = std::mem::replace(&mut h.rx, Box::new(Noop));
    drop(handlers);
    drop(std::mem::replace(&mut h.tx, Box::new(Noop)));
    drop(std::mem::replace(&mut h.ev, Box::new(Noop)));
    h.dev.reset();
    assert_eq!(h.dev.connections(), 0);
    assert_eq!(read_to_eof(&mut host), b"");
    assert_eq!(read_to_eof(&mut client), b"");
    // The listener survives resets.
    let mut hs = h.dev.activate(0).unwrap();
    h.ev = hs.pop().unwrap();
    h.tx = hs.pop().unwrap();
    h.rx = hs.pop().unwrap();
    let _c = h.host_connect(81);
}

#[test]
fn try_clone_shares_the_listener() {
    let h = Harness::new("clone");
    let clone = h.dev.try_clone().unwrap();
    assert_eq!(clone.options().uds_path, h.uds);
    assert_eq!(
        clone
            .stats()
            .rx_packets
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

struct Noop;
impl ringfence_device::QueueHandler for Noop {
    fn handle_chain(
        &mut self,
        _chain: ringfence_device::Chain<'_>,
        _mem: &DeviceMemory,
    ) -> Result<u32, ringfence_device::ChainError> {
        Ok(0)
    }
}
