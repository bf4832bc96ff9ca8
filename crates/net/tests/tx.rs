//! Transmit through a real TAP: what the driver sends is observed on the
//! interface with an AF_PACKET socket; hostile chains are dropped and
//! counted without breaking the queue, unless unparsable.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::time::Duration;

use common::*;
use ringfence_device::{ChainError, QueueFailure, VirtioDevice};
use ringfence_net::{VnetHeader, MAX_FRAME_LEN, TX_MAX_IOVECS};
use virtio_bindings::virtio_net::*;

const WAIT: Duration = Duration::from_millis(500);
const QUIET: Duration = Duration::from_millis(50);

fn hdr(flags: u8, gso_type: u8, gso_size: u16, csum_start: u16, csum_offset: u16) -> [u8; 12] {
    VnetHeader {
        flags,
        gso_type,
        gso_size,
        csum_start,
        csum_offset,
        ..Default::default()
    }
    .to_bytes()
}

/// Writes header + frame at `at` and returns its length.
fn packet(mem: &ringfence_device::DeviceMemory, at: u64, h: [u8; 12], f: &[u8]) -> u32 {
    write(mem, at, &h);
    write(mem, at + 12, f);
    (12 + f.len()) as u32
}

#[test]
fn a_frame_split_over_descriptors_reaches_the_interface_intact() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    let mut h = fx.net.activate(VERSION_1).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    let f = frame(300, 7);
    let len = packet(&mem, BUFS, hdr(0, 0, 0, 0, 0), &f);
    // The header itself split 5 + 7, then the frame in two pieces elsewhere.
    write(&mem, BUFS + 0x1000, &read(&mem, BUFS + 12, 100));
    write(
        &mem,
        BUFS + 0x2000,
        &read(&mem, BUFS + 112, len as usize - 112),
    );
    ring.publish(&[
        (BUFS, 5, false),
        (BUFS + 5, 7, false),
        (BUFS + 0x1000, 100, false),
        (BUFS + 0x2000, len - 112, false),
    ]);
    let p = ring.run(h[1].as_mut()).unwrap();
    assert_eq!((p.chains, p.starved, p.more), (1, false, false));
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(
        ring.used(0),
        (0, 0),
        "nothing written into a transmit buffer"
    );
    assert_eq!(sock.recv(WAIT).as_deref(), Some(&f[..]));
    let s = fx.net.stats();
    assert_eq!((load(&s.tx_packets), load(&s.tx_bytes)), (1, 300));
    assert_eq!(load(&s.tx_dropped), 0);
}

#[test]
fn a_chain_scattered_wider_than_the_iovec_array_is_sent_through_one_copy() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    let mut h = fx.net.activate(VERSION_1).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 256);
    let pieces = TX_MAX_IOVECS + 16;
    let f = frame(pieces * 10, 3);
    write(&mem, BUFS, &hdr(0, 0, 0, 0, 0));
    let mut descs = vec![(BUFS, 12u32, false)];
    for (i, chunk) in f.chunks(10).enumerate() {
        let at = BUFS + 0x1000 + 64 * i as u64;
        write(&mem, at, chunk);
        descs.push((at, chunk.len() as u32, false));
    }
    ring.publish(&descs);
    ring.run(h[1].as_mut()).unwrap();
    assert_eq!(sock.recv(WAIT).as_deref(), Some(&f[..]));
    assert_eq!(load(&fx.net.stats().tx_packets), 1);
}

#[test]
fn hostile_transmit_chains_are_dropped_and_counted_and_the_queue_goes_on() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    let acked = VERSION_1 | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
    let mut h = fx.net.activate(acked).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 64);
    let f = frame(100, 1);
    let mut at = BUFS;
    let mut next = |h: [u8; 12], f: &[u8]| {
        let a = at;
        let len = packet(&mem, a, h, f);
        at += 0x1000;
        (a, len)
    };
    // 1. A device-writable descriptor in a transmit chain.
    let (a, len) = next(hdr(0, 0, 0, 0, 0), &f);
    ring.publish(&[(a, 12, false), (a + 12, len - 12, true)]);
    // 2. Flag bits a driver may not set (DATA_VALID).
    let (a, len) = next(hdr(VIRTIO_NET_HDR_F_DATA_VALID as u8, 0, 0, 0, 0), &f);
    ring.publish(&[(a, len, false)]);
    // 3. Unknown GSO type.
    let (a, len) = next(hdr(1, 2, 1400, 14, 16), &f);
    ring.publish(&[(a, len, false)]);
    // 4. Checksum field beyond the 100-byte frame: 90 + 9 + 2 = 101.
    let (a, len) = next(hdr(1, 0, 0, 90, 9), &f);
    ring.publish(&[(a, len, false)]);
    // 5. TCPv4 GSO with gso_size 0.
    let (a, len) = next(hdr(1, 1, 0, 34, 16), &f);
    ring.publish(&[(a, len, false)]);
    // 6. Shorter than a header.
    ring.publish(&[(BUFS + 0x40000, 10, false)]);
    // 7. A frame longer than MAX_FRAME_LEN.
    let big = BUFS + 0x100000;
    write(&mem, big, &hdr(0, 0, 0, 0, 0));
    ring.publish(&[(big, 12 + MAX_FRAME_LEN as u32 + 1, false)]);
    // 8. A buffer outside shared memory.
    let (a, _) = next(hdr(0, 0, 0, 0, 0), &f);
    ring.publish(&[(a, 12, false), (0x1000, 100, false)]);
    // 9. UDP GSO, whose feature was not negotiated.
    let (a, len) = next(hdr(1, 3, 1400, 14, 6), &f);
    ring.publish(&[(a, len, false)]);
    // 10. Finally a good one.
    let good = frame(120, 9);
    let (a, len) = next(hdr(0, 0, 0, 0, 0), &good);
    ring.publish(&[(a, len, false)]);

    let p = ring.run(h[1].as_mut()).unwrap();
    assert_eq!(p.chains, 10);
    assert_eq!(ring.used_idx(), 10);
    for i in 0..10 {
        assert_eq!(ring.used(i).1, 0);
    }
    assert_eq!(sock.recv(WAIT).as_deref(), Some(&good[..]));
    assert_eq!(sock.recv(QUIET), None, "nothing else reached the interface");
    let s = fx.net.stats();
    assert_eq!(load(&s.tx_packets), 1);
    assert_eq!(load(&s.tx_dropped), 9);
    assert_eq!(load(&s.tx_dropped_bad_header), 6);
    assert_eq!(load(&s.tx_dropped_oversize), 1);
    assert_eq!(load(&s.tx_dropped_bad_chain), 2);
    assert_eq!(load(&s.tx_dropped_tap_full), 0);
    assert_eq!(load(&s.chain_errors), 0);
}

#[test]
fn an_unparsable_transmit_chain_breaks_the_queue() {
    let mut fx = fixture(1);
    let mut h = fx.net.activate(VERSION_1).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    // Descriptor 0 -> 1 -> 0: a loop.
    ring.publish_raw(&[(BUFS, 12, F_NEXT, 1), (BUFS + 12, 60, F_NEXT, 0)]);
    match ring.run(h[1].as_mut()) {
        Err(QueueFailure::Chain(ChainError::Broken { .. })) => {}
        other => panic!("expected a broken chain, got {other:?}"),
    }
    assert_eq!(ring.used_idx(), 0);
    let s = fx.net.stats();
    assert_eq!((load(&s.chain_errors), load(&s.tx_dropped)), (1, 0));
}

#[test]
fn offloaded_packets_are_laid_out_as_the_kernel_expects() {
    // The kernel checks csum_start/csum_offset, gso_type, gso_size and
    // hdr_len itself and refuses a write that does not add up: both
    // packets getting through shows the header crosses unchanged.
    let mut fx = fixture(1);
    let sock = PacketSocket::for_protocol(fx.ifindex, 0x0800);
    let acked = VERSION_1 | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4);
    let mut h = fx.net.activate(acked).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    let mut udp = vec![0x30, 0x39, 0, 9, 0, 108, 0, 0];
    udp.extend((0..100u8).collect::<Vec<_>>());
    let udp = ipv4_frame(17, &udp);
    let len = packet(&mem, BUFS, hdr(1, 0, 0, 34, 6), &udp);
    ring.publish(&[(BUFS, len, false)]);
    let mut tcp = vec![
        0x30, 0x39, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ];
    tcp.extend(std::iter::repeat_n(0x61, 400));
    let tcp = ipv4_frame(6, &tcp);
    let mut tso = VnetHeader::from_bytes(hdr(1, VIRTIO_NET_HDR_GSO_TCPV4 as u8, 100, 34, 16));
    tso.hdr_len = 54;
    let len = packet(&mem, BUFS + 0x1000, tso.to_bytes(), &tcp);
    ring.publish(&[(BUFS + 0x1000, len, false)]);
    assert_eq!(ring.run(h[1].as_mut()).unwrap().chains, 2);
    let s = fx.net.stats();
    assert_eq!((load(&s.tx_packets), load(&s.tx_dropped)), (2, 0));
    assert_eq!(load(&s.tx_bytes), (udp.len() + tcp.len()) as u64);
    assert_eq!(sock.recv(WAIT).as_deref(), Some(&udp[..]));
    let got = sock.recv(WAIT).expect("the TSO packet");
    assert_eq!(&got[..54], &tcp[..54], "the TCP packet's headers");
}
