//! Receive from a real TAP: frames injected on the interface with an
//! AF_PACKET socket arrive on the TAP queue, and from there in the
//! driver's buffers with their header and num_buffers.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::time::Duration;

use common::*;
use ringfence_device::{ChainError, DeviceMemory, QueueFailure, QueueHandler, VirtioDevice};
use virtio_bindings::virtio_net::*;
use virtio_queue::QueueT;

const WAIT: Duration = Duration::from_millis(1000);

const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

/// Injects `f` and waits until the receive handler's wake descriptor says so.
fn arrive(sock: &PacketSocket, rx: &dyn QueueHandler, f: &[u8]) {
    sock.inject(f);
    assert!(
        poll_readable(rx.wake_fd().unwrap(), WAIT),
        "frame did not reach the TAP queue"
    );
}

/// Checks the 12-byte header at the start of `got` and returns the rest.
fn header_then(got: &[u8], num_buffers: u16) -> &[u8] {
    assert_eq!(&got[..10], &[0u8; 10], "TAP header of a plain frame");
    assert_eq!(
        u16::from_le_bytes([got[10], got[11]]),
        num_buffers,
        "num_buffers"
    );
    &got[12..]
}

/// The bytes of used elements `from..from+n`, each read from its chain's buffer at `addr(id)`.
fn gather(
    ring: &Ring<'_>,
    mem: &DeviceMemory,
    from: u16,
    n: u16,
    addr: impl Fn(u32) -> u64,
) -> Vec<u8> {
    let mut v = Vec::new();
    for i in from..from + n {
        let (id, len) = ring.used(i);
        v.extend(read(mem, addr(id), len as usize));
    }
    v
}

#[test]
fn a_frame_arrives_with_its_header_and_one_buffer() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    let mut h = fx.net.activate(VERSION_1).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    write(&mem, BUFS, &[0xEE; 2048]);
    ring.publish(&[(BUFS, 2048, true)]);
    let f = frame(200, 5);
    arrive(&sock, h[0].as_ref(), &f);
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!((p.chains, p.notify, p.more), (1, true, false));
    assert_eq!(ring.used(0), (0, 212));
    let got = read(&mem, BUFS, 213);
    assert_eq!(header_then(&got[..212], 1), &f[..]);
    assert_eq!(got[212], 0xEE, "nothing written past the packet");
    let s = fx.net.stats();
    assert_eq!((load(&s.rx_packets), load(&s.rx_bytes)), (1, 200));
    // The readiness was consumed with the packet.
    assert!(!poll_readable(h[0].wake_fd().unwrap(), Duration::ZERO));
}

#[test]
fn without_data_the_queue_is_starved_and_its_wake_fd_quiet_until_a_frame_comes() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    let mut h = fx.net.activate(VERSION_1).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    ring.publish(&[(BUFS, 2048, true)]);
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, true));
    assert_eq!(ring.used_idx(), 0);
    assert_eq!(ring.queue.next_avail(), 0, "no buffer taken");
    assert!(!poll_readable(h[0].wake_fd().unwrap(), Duration::ZERO));
    let f = frame(60, 1);
    arrive(&sock, h[0].as_ref(), &f);
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!(p.chains, 1);
    assert_eq!(header_then(&read(&mem, BUFS, 72), 1), &f[..]);
}

#[test]
fn packets_wait_for_buffers_one_held_none_dropped() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    let mut h = fx.net.activate(VERSION_1).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    let (a, b) = (frame(100, 1), frame(150, 2));
    arrive(&sock, h[0].as_ref(), &a);
    sock.inject(&b);
    // No buffers: the first packet is held, the second stays in the TAP.
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!(
        (p.chains, p.starved),
        (0, false),
        "waiting for buffers, not starved"
    );
    assert_eq!(ring.used_idx(), 0);
    ring.publish(&[(BUFS, 2048, true)]);
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (1, false));
    assert_eq!(header_then(&read(&mem, BUFS, 112), 1), &a[..]);
    ring.publish(&[(BUFS + 0x1000, 2048, true)]);
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!(p.chains, 1);
    assert_eq!(ring.used(1), (1, 162));
    assert_eq!(header_then(&read(&mem, BUFS + 0x1000, 162), 1), &b[..]);
    let s = fx.net.stats();
    assert_eq!(load(&s.rx_packets), 2);
    assert_eq!(load(&s.rx_dropped_oversize), 0);
}

#[test]
fn a_mergeable_packet_spans_small_chains_and_says_how_many() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    let mut h = fx.net.activate(VERSION_1 | MRG).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    let addr = |id: u32| BUFS + 0x1000 * u64::from(id);
    for i in 0..5 {
        ring.publish(&[(addr(i), 256, true)]);
    }
    let f = frame(1000, 9);
    arrive(&sock, h[0].as_ref(), &f);
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!(p.chains, 4);
    assert_eq!(ring.used_idx(), 4);
    let lens: Vec<u32> = (0..4).map(|i| ring.used(i).1).collect();
    assert_eq!(lens, [256, 256, 256, 244]);
    let got = gather(&ring, &mem, 0, 4, addr);
    assert_eq!(header_then(&got, 4), &f[..]);
    assert_eq!(
        ring.queue.next_avail(),
        4,
        "the fifth chain is left for later"
    );
}

#[test]
fn a_mergeable_packet_short_of_buffers_waits_and_asks_for_a_kick() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    let mut h = fx.net.activate(VERSION_1 | MRG | EVENT_IDX).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16).event_idx();
    let addr = |id: u32| BUFS + 0x1000 * u64::from(id);
    ring.publish(&[(addr(0), 256, true)]);
    ring.publish(&[(addr(1), 256, true)]);
    write(&mem, addr(0), &[0xEE; 256]);
    let f = frame(1000, 3);
    arrive(&sock, h[0].as_ref(), &f);
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!(
        (p.chains, p.starved, p.more, p.notify),
        (0, false, false, false)
    );
    assert_eq!(ring.used_idx(), 0, "nothing used before the packet fits");
    assert_eq!(ring.queue.next_avail(), 0, "the two chains were put back");
    // A kick is asked for once the driver goes past what it offered.
    assert_eq!(ring.avail_event(), 2);
    ring.publish(&[(addr(2), 256, true)]);
    ring.publish(&[(addr(3), 256, true)]);
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!(p.chains, 4);
    let ids: Vec<u32> = (0..4).map(|i| ring.used(i).0).collect();
    assert_eq!(ids, [0, 1, 2, 3]);
    assert_eq!(header_then(&gather(&ring, &mem, 0, 4, addr), 4), &f[..]);
    assert_eq!(load(&fx.net.stats().rx_dropped_oversize), 0);
}

#[test]
fn a_packet_no_buffer_can_hold_is_dropped_and_the_buffer_kept() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    // Without MRG_RXBUF one chain must hold the whole packet.
    let mut h = fx.net.activate(VERSION_1).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    ring.publish(&[(BUFS, 512, true)]);
    arrive(&sock, h[0].as_ref(), &frame(1000, 1));
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, true));
    assert_eq!(ring.used_idx(), 0);
    assert_eq!(ring.queue.next_avail(), 0);
    assert_eq!(load(&fx.net.stats().rx_dropped_oversize), 1);
    let small = frame(100, 2);
    arrive(&sock, h[0].as_ref(), &small);
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!(p.chains, 1);
    assert_eq!(ring.used(0), (0, 112));
    assert_eq!(header_then(&read(&mem, BUFS, 112), 1), &small[..]);
}

#[test]
fn a_mergeable_packet_larger_than_a_full_ring_is_dropped() {
    let mut fx = fixture(1);
    let sock = PacketSocket::new(fx.ifindex);
    let mut h = fx.net.activate(VERSION_1 | MRG).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 4);
    for i in 0..4 {
        ring.publish(&[(BUFS + 0x100 * i, 16, true)]);
    }
    arrive(&sock, h[0].as_ref(), &frame(100, 1));
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!(p.chains, 0);
    assert_eq!(ring.queue.next_avail(), 0);
    assert_eq!(load(&fx.net.stats().rx_dropped_oversize), 1);
}

#[test]
fn receive_buffers_with_no_room_for_an_answer_break_the_queue() {
    for (what, descs) in [
        ("device-readable", vec![(BUFS, 2048u32, false)]),
        ("smaller than the header", vec![(BUFS, 11, true)]),
        ("outside shared memory", vec![(0x1000, 2048, true)]),
    ] {
        let mut fx = fixture(1);
        let sock = PacketSocket::new(fx.ifindex);
        let mut h = fx.net.activate(VERSION_1).unwrap();
        let mem = memory();
        let mut ring = Ring::new(&mem, 16);
        ring.publish(&descs);
        arrive(&sock, h[0].as_ref(), &frame(60, 1));
        match ring.run(h[0].as_mut()) {
            Err(QueueFailure::Chain(ChainError::Unanswerable { head: 0, .. })) => {}
            other => panic!("{what}: expected an unanswerable chain, got {other:?}"),
        }
        assert_eq!(ring.used_idx(), 0, "{what}");
        assert_eq!(load(&fx.net.stats().chain_errors), 1, "{what}");
    }
}

#[test]
fn an_interface_deleted_under_the_device_leaves_a_quiet_wake_fd() {
    let mut fx = fixture(1);
    let mut h = fx.net.activate(VERSION_1).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    ring.publish(&[(BUFS, 2048, true)]);
    assert!(ring.run(h[0].as_mut()).unwrap().starved);
    let st = std::process::Command::new("ip")
        .args(["link", "del", &fx.name])
        .status()
        .unwrap();
    assert!(st.success());
    // The TAP descriptor now reports an error for good; the handler sees
    // it once, counts it, and stops watching it.
    assert!(poll_readable(h[0].wake_fd().unwrap(), WAIT));
    let p = ring.run(h[0].as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, true));
    assert_eq!(load(&fx.net.stats().rx_tap_errors), 1);
    assert!(
        !poll_readable(h[0].wake_fd().unwrap(), Duration::ZERO),
        "a dead TAP must not keep the transport spinning"
    );
}

/// Sends a TCP/IPv4 frame of `payload` bytes as one GSO packet (segments of
/// 100 bytes) out of the interface, through a packet socket with
/// PACKET_VNET_HDR; returns the frame.
fn inject_tso(ifindex: i32, payload: usize) -> Vec<u8> {
    let mut tcp = vec![
        0x30, 0x39, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0,
    ];
    tcp.extend(std::iter::repeat_n(0x61, payload));
    let f = ipv4_frame(6, &tcp);
    // virtio_net_hdr (10 bytes): NEEDS_CSUM, TCPV4, hdr_len 54, gso_size 100, csum 34+16.
    let mut pkt = vec![1, 1, 54, 0, 100, 0, 34, 0, 16, 0];
    pkt.extend_from_slice(&f);
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0);
        let on: libc::c_int = 1;
        let r = libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&on as *const libc::c_int).cast(),
            4,
        );
        assert_eq!(r, 0);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = 0x0800u16.to_be();
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&f[..6]);
        let n = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
        assert_eq!(n, pkt.len() as isize, "{}", std::io::Error::last_os_error());
    }
    f
}

#[test]
fn the_tap_hands_over_gso_packets_only_when_the_driver_takes_them() {
    let addr = |id: u32| BUFS + 0x1000 * u64::from(id);
    // With GUEST_CSUM | GUEST_TSO4 the TAP keeps the packet whole and its
    // header says how to segment it.
    let mut fx = fixture(1);
    let tso = VERSION_1 | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
    let mut h = fx.net.activate(tso).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    ring.publish(&[(addr(0), 4096, true)]);
    let f = inject_tso(fx.ifindex, 400);
    assert!(poll_readable(h[0].wake_fd().unwrap(), WAIT));
    assert_eq!(ring.run(h[0].as_mut()).unwrap().chains, 1);
    let (_, len) = ring.used(0);
    assert_eq!(len as usize, 12 + f.len());
    let got = read(&mem, addr(0), len as usize);
    let hdr = ringfence_net::VnetHeader::from_bytes(got[..12].try_into().unwrap());
    assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4 as u8);
    assert_eq!(hdr.gso_size, 100);
    assert_eq!(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8, 1);
    assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 16));
    assert_eq!(hdr.num_buffers, 1);
    assert_eq!(&got[12..12 + 54], &f[..54]);
    drop(h);
    fx.net.reset();

    // Without them (offloads reset to none), the kernel segments first.
    let mut h = fx.net.activate(VERSION_1).unwrap();
    let mut ring = Ring::new(&mem, 16);
    for i in 0..8 {
        ring.publish(&[(addr(i), 4096, true)]);
    }
    inject_tso(fx.ifindex, 400);
    assert!(poll_readable(h[0].wake_fd().unwrap(), WAIT));
    let mut chains = 0;
    for _ in 0..50 {
        chains += ring.run(h[0].as_mut()).unwrap().chains;
        if chains >= 4 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(chains, 4, "four 100-byte segments");
    for i in 0..4 {
        let (id, len) = ring.used(i);
        assert_eq!(len, 12 + 54 + 100);
        let got = read(&mem, addr(id), 12);
        assert_eq!(&got[..2], &[0, 0], "no offload flags, no GSO");
    }
}
