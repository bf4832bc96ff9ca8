//! The control queue: the commands Linux sends, hostile ones answered with
//! VIRTIO_NET_ERR in-band, and VQ_PAIRS_SET steering the TAP queues.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::time::Duration;

use common::*;
use ringfence_device::{ChainError, DeviceMemory, QueueFailure, QueueHandler, VirtioDevice};
use ringfence_net::{RxFilter, MAC_TABLE_ENTRIES};
use virtio_bindings::virtio_net::*;

const OK: u8 = VIRTIO_NET_OK as u8;
const ERR: u8 = VIRTIO_NET_ERR as u8;
const CMD: u64 = BUFS;
const ACK: u64 = BUFS + 0x8000;
const WAIT: Duration = Duration::from_millis(1000);

fn ctrl_features() -> u64 {
    VERSION_1
        | bit(VIRTIO_NET_F_CTRL_VQ)
        | bit(VIRTIO_NET_F_CTRL_RX)
        | bit(VIRTIO_NET_F_CTRL_MAC_ADDR)
}

/// Sends one command (class, cmd, data in one descriptor, then a 1-byte
/// ack) and returns the ack.
fn send(ring: &mut Ring<'_>, ctrl: &mut dyn QueueHandler, class: u32, cmd: u32, data: &[u8]) -> u8 {
    let mem: &DeviceMemory = ring.mem;
    let mut bytes = vec![class as u8, cmd as u8];
    bytes.extend_from_slice(data);
    write(mem, CMD, &bytes);
    write(mem, ACK, &[0xAA]);
    let before = ring.used_idx();
    ring.publish(&[(CMD, bytes.len() as u32, false), (ACK, 1, true)]);
    let p = ring.run(ctrl).unwrap();
    assert_eq!(p.chains, 1);
    assert_eq!(ring.used_idx(), before.wrapping_add(1));
    assert_eq!(ring.used(before).1, 1, "used length: the ack byte");
    read(mem, ACK, 1)[0]
}

fn table(entries: &[[u8; 6]]) -> Vec<u8> {
    let mut v = (entries.len() as u32).to_le_bytes().to_vec();
    for e in entries {
        v.extend_from_slice(e);
    }
    v
}

fn mac_table(uni: &[[u8; 6]], multi: &[[u8; 6]]) -> Vec<u8> {
    let mut v = table(uni);
    v.extend(table(multi));
    v
}

const M1: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const MC1: [u8; 6] = [0x01, 0, 0x5e, 0, 0, 1];
const MC2: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const NEW_MAC: [u8; 6] = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];

#[test]
fn the_commands_linux_sends_are_accepted_and_recorded_until_reset() {
    let mut fx = fixture(1);
    let mut h = fx.net.activate(ctrl_features()).unwrap();
    assert_eq!(h.len(), 3);
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    let ctrl = h[2].as_mut();
    use VIRTIO_NET_CTRL_MAC as MAC;
    use VIRTIO_NET_CTRL_RX as RX;
    assert_eq!(
        send(&mut ring, ctrl, RX, VIRTIO_NET_CTRL_RX_PROMISC, &[0]),
        OK
    );
    assert_eq!(
        send(&mut ring, ctrl, RX, VIRTIO_NET_CTRL_RX_ALLMULTI, &[1]),
        OK
    );
    let t = mac_table(&[M1], &[MC1, MC2]);
    assert_eq!(
        send(&mut ring, ctrl, MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET, &t),
        OK
    );
    assert_eq!(
        send(&mut ring, ctrl, MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET, &NEW_MAC),
        OK
    );
    assert_eq!(
        fx.net.rx_filter(),
        RxFilter {
            promisc: false,
            allmulti: true,
            unicast: vec![M1],
            unicast_overflow: false,
            multicast: vec![MC1, MC2],
            multicast_overflow: false,
        }
    );
    let mut cfg = [0u8; 6];
    fx.net.read_config(0, &mut cfg).unwrap();
    assert_eq!(cfg, NEW_MAC, "the config space shows the new address");
    let s = fx.net.stats();
    assert_eq!((load(&s.ctrl_commands), load(&s.ctrl_errors)), (4, 0));
    drop(h);
    fx.net.reset();
    assert_eq!(fx.net.mac(), [0x02, 0, 0, 0, 0, 0x42]);
    assert_eq!(fx.net.rx_filter(), RxFilter::default());
}

#[test]
fn bad_commands_get_err_in_band_and_change_nothing() {
    let mut fx = fixture(1);
    let mut h = fx.net.activate(ctrl_features()).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 64);
    let ctrl = h[2].as_mut();
    use VIRTIO_NET_CTRL_MAC as MAC;
    use VIRTIO_NET_CTRL_RX as RX;
    let set = VIRTIO_NET_CTRL_MAC_TABLE_SET;
    let mut short = mac_table(&[M1, M1, M1], &[]);
    short.drain(4 + 12..4 + 18); // says 3 entries, holds 2
    let mut long = mac_table(&[M1], &[MC1]);
    long.push(0);
    let mut huge = u32::MAX.to_le_bytes().to_vec();
    huge.extend(table(&[]));
    let cases: Vec<(&str, u32, u32, Vec<u8>)> = vec![
        ("table shorter than its count", MAC, set, short),
        ("table with trailing bytes", MAC, set, long),
        ("table count 2^32-1", MAC, set, huge),
        ("table without its second count", MAC, set, table(&[M1])),
        (
            "address of 5 bytes",
            MAC,
            VIRTIO_NET_CTRL_MAC_ADDR_SET,
            vec![2, 0, 0, 0, 1],
        ),
        (
            "address of 7 bytes",
            MAC,
            VIRTIO_NET_CTRL_MAC_ADDR_SET,
            vec![2, 0, 0, 0, 0, 1, 0],
        ),
        (
            "multicast address",
            MAC,
            VIRTIO_NET_CTRL_MAC_ADDR_SET,
            MC1.to_vec(),
        ),
        (
            "zero address",
            MAC,
            VIRTIO_NET_CTRL_MAC_ADDR_SET,
            vec![0; 6],
        ),
        ("unknown MAC command", MAC, 7, vec![]),
        (
            "promisc with 2 bytes",
            RX,
            VIRTIO_NET_CTRL_RX_PROMISC,
            vec![0, 0],
        ),
        (
            "promisc without data",
            RX,
            VIRTIO_NET_CTRL_RX_PROMISC,
            vec![],
        ),
        ("promisc value 2", RX, VIRTIO_NET_CTRL_RX_PROMISC, vec![2]),
        (
            "ALLUNI needs CTRL_RX_EXTRA",
            RX,
            VIRTIO_NET_CTRL_RX_ALLUNI,
            vec![1],
        ),
        (
            "VLAN not offered",
            VIRTIO_NET_CTRL_VLAN,
            VIRTIO_NET_CTRL_VLAN_ADD,
            vec![1, 0],
        ),
        ("announce not offered", VIRTIO_NET_CTRL_ANNOUNCE, 0, vec![]),
        (
            "MQ not negotiated",
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            vec![1, 0],
        ),
        (
            "guest offloads not offered",
            VIRTIO_NET_CTRL_GUEST_OFFLOADS,
            0,
            vec![0; 8],
        ),
        ("unknown class", 99, 0, vec![]),
    ];
    for (what, class, cmd, data) in &cases {
        assert_eq!(send(&mut ring, ctrl, *class, *cmd, data), ERR, "{what}");
    }
    let n = cases.len() as u64;

    // Only a class byte.
    write(&mem, CMD, &[VIRTIO_NET_CTRL_RX as u8]);
    ring.publish(&[(CMD, 1, false), (ACK, 1, true)]);
    ring.run(ctrl).unwrap();
    assert_eq!(read(&mem, ACK, 1)[0], ERR, "no command byte");
    // A device-readable descriptor after a device-writable one.
    write(&mem, CMD, &[VIRTIO_NET_CTRL_RX as u8, 0, 0]);
    ring.publish(&[
        (CMD, 2, false),
        (CMD + 0x100, 4, true),
        (CMD + 2, 1, false),
        (ACK, 1, true),
    ]);
    ring.run(ctrl).unwrap();
    assert_eq!(read(&mem, ACK, 1)[0], ERR, "readable after writable");
    // Command data outside shared memory.
    write(&mem, CMD, &[VIRTIO_NET_CTRL_RX as u8, 0]);
    ring.publish(&[(CMD, 2, false), (0x1000, 1, false), (ACK, 1, true)]);
    ring.run(ctrl).unwrap();
    assert_eq!(read(&mem, ACK, 1)[0], ERR, "data outside memory");

    assert_eq!(fx.net.rx_filter(), RxFilter::default(), "nothing recorded");
    assert_eq!(fx.net.mac(), [0x02, 0, 0, 0, 0, 0x42]);
    let s = fx.net.stats();
    assert_eq!(load(&s.ctrl_commands), n + 3);
    assert_eq!(load(&s.ctrl_errors), n + 3);
    assert_eq!(load(&s.chain_errors), 0);

    // The ack byte is the last byte of a longer writable descriptor.
    write(&mem, CMD, &[VIRTIO_NET_CTRL_RX as u8, 0, 1]);
    write(&mem, ACK, &[0xAA; 8]);
    ring.publish(&[(CMD, 3, false), (ACK, 8, true)]);
    ring.run(ctrl).unwrap();
    assert_eq!(
        read(&mem, ACK, 8),
        [0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, 0xAA, OK]
    );
    assert!(fx.net.rx_filter().promisc);
}

#[test]
fn an_oversized_mac_table_is_accepted_as_overflowing() {
    let mut fx = fixture(1);
    let mut h = fx.net.activate(ctrl_features()).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    let many: Vec<[u8; 6]> = (0..70u8).map(|i| [0x01, 0, 0x5e, 0, 1, i]).collect();
    let t = mac_table(&[M1], &many);
    assert_eq!(
        send(
            &mut ring,
            h[2].as_mut(),
            VIRTIO_NET_CTRL_MAC,
            VIRTIO_NET_CTRL_MAC_TABLE_SET,
            &t
        ),
        OK
    );
    let f = fx.net.rx_filter();
    assert_eq!((f.unicast_overflow, f.multicast_overflow), (false, true));
    assert_eq!(f.multicast.len(), MAC_TABLE_ENTRIES);
    assert_eq!(f.multicast[..], many[..MAC_TABLE_ENTRIES]);
}

#[test]
fn a_control_chain_without_an_ack_byte_breaks_the_queue() {
    let mut fx = fixture(1);
    let mut h = fx.net.activate(ctrl_features()).unwrap();
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    write(&mem, CMD, &[0, 0, 1]);
    ring.publish(&[(CMD, 3, false)]);
    match ring.run(h[2].as_mut()) {
        Err(QueueFailure::Chain(ChainError::Unanswerable { .. })) => {}
        other => panic!("expected an unanswerable chain, got {other:?}"),
    }
    assert_eq!(ring.used_idx(), 0);
    let s = fx.net.stats();
    assert_eq!((load(&s.chain_errors), load(&s.ctrl_commands)), (1, 0));
}

/// An IPv4/UDP frame from `port` (so flows hash differently).
fn udp_frame(port: u16) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    let ip = [
        0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
    ];
    f.extend_from_slice(&ip);
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&[0, 9, 0, 8, 0, 0]);
    f
}

/// Sends `f` out of the interface as IPv4.
fn inject_ip(ifindex: i32, f: &[u8]) {
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(fd >= 0);
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = 0x0800u16.to_be();
        sll.sll_ifindex = ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&f[..6]);
        let n = libc::sendto(
            fd,
            f.as_ptr().cast(),
            f.len(),
            0,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        libc::close(fd);
        assert_eq!(n, f.len() as isize);
    }
}

#[test]
fn vq_pairs_set_attaches_and_detaches_the_tap_queues() {
    let mut fx = fixture(2);
    let sock = PacketSocket::new(fx.ifindex);
    let acked = VERSION_1 | bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_MQ);
    let mut h = fx.net.activate(acked).unwrap();
    assert_eq!(h.len(), 5, "rx0 tx0 rx1 tx1 ctrl");
    assert_eq!(fx.net.active_queue_pairs(), 1);
    let mem = memory();
    let mut cring = Ring::new(&mem, 16);
    // Each ring in its own memory (the mock puts every ring at AREA).
    let mem1 = DeviceMemory::from_ranges(&[(vm_memory::GuestAddress(AREA), AREA_LEN)]).unwrap();
    let mem0 = DeviceMemory::from_ranges(&[(vm_memory::GuestAddress(AREA), AREA_LEN)]).unwrap();
    let mem_tx = DeviceMemory::from_ranges(&[(vm_memory::GuestAddress(AREA), AREA_LEN)]).unwrap();
    let mut rx0 = Ring::new(&mem0, 64);
    let mut rx1 = Ring::new(&mem1, 16);
    let mut tx1 = Ring::new(&mem_tx, 16);
    let (ctrl, rest) = h.split_last_mut().unwrap();
    let ctrl = ctrl.as_mut();
    let [h_rx0, _tx0, h_rx1, h_tx1] = rest else {
        unreachable!()
    };
    let pairs_set = |ring: &mut Ring<'_>, ctrl: &mut dyn QueueHandler, n: u16| {
        send(
            ring,
            ctrl,
            VIRTIO_NET_CTRL_MQ,
            VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
            &n.to_le_bytes(),
        )
    };
    let transmit = |ring: &mut Ring<'_>, h: &mut dyn QueueHandler, f: &[u8]| {
        write(ring.mem, BUFS, &[0; 12]);
        write(ring.mem, BUFS + 12, f);
        ring.publish(&[(BUFS, 12 + f.len() as u32, false)]);
        ring.run(h).unwrap();
    };

    // Pair 1 starts detached: the kernel steers every flow to pair 0.
    for i in 0..16 {
        rx0.publish(&[(BUFS + 0x1000 * i, 2048, true)]);
    }
    rx1.publish(&[(BUFS, 2048, true)]);
    let flows_all_on_pair_0 = |rx0: &mut Ring<'_>, h_rx0: &mut dyn QueueHandler, base: u16| {
        for port in 0..16 {
            inject_ip(fx.ifindex, &udp_frame(base + port));
        }
        assert!(poll_readable(h_rx0.wake_fd().unwrap(), WAIT));
        let mut got = 0;
        for _ in 0..50 {
            got += rx0.run(h_rx0).unwrap().chains;
            if got == 16 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(got, 16, "every flow on pair 0");
    };
    flows_all_on_pair_0(&mut rx0, h_rx0.as_mut(), 1000);
    let p = rx1.run(h_rx1.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, true));

    // Bad pair counts are refused; 2 attaches pair 1.
    assert_eq!(pairs_set(&mut cring, ctrl, 0), ERR);
    assert_eq!(pairs_set(&mut cring, ctrl, 3), ERR);
    assert_eq!(fx.net.active_queue_pairs(), 1);
    assert_eq!(pairs_set(&mut cring, ctrl, 2), OK);
    assert_eq!(fx.net.active_queue_pairs(), 2);
    let f = frame(90, 2);
    transmit(&mut tx1, h_tx1.as_mut(), &f);
    assert_eq!(sock.recv(WAIT).as_deref(), Some(&f[..]));
    assert_eq!(load(&fx.net.stats().tx_packets), 1);

    // Some flow now lands on pair 1.
    let mut got = false;
    for port in 0..64 {
        inject_ip(fx.ifindex, &udp_frame(2000 + port));
        if poll_readable(h_rx1.wake_fd().unwrap(), Duration::from_millis(5))
            && rx1.run(h_rx1.as_mut()).unwrap().chains == 1
        {
            got = true;
            break;
        }
    }
    assert!(got, "no flow reached the re-attached pair 1");

    // Back to one pair: the handler is woken, follows, and goes quiet;
    // flows go to pair 0 again.
    rx1.publish(&[(BUFS + 0x1000, 2048, true)]);
    assert_eq!(pairs_set(&mut cring, ctrl, 1), OK);
    assert!(
        poll_readable(h_rx1.wake_fd().unwrap(), Duration::ZERO),
        "pair 1 told"
    );
    let p = rx1.run(h_rx1.as_mut()).unwrap();
    assert_eq!((p.chains, p.starved), (0, true));
    assert!(
        !poll_readable(h_rx1.wake_fd().unwrap(), Duration::ZERO),
        "the wake-up was consumed, or the transport spins"
    );
    for i in 0..16 {
        rx0.publish(&[(BUFS + 0x1000 * i, 2048, true)]);
    }
    flows_all_on_pair_0(&mut rx0, h_rx0.as_mut(), 3000);
    let s = fx.net.stats();
    assert_eq!((load(&s.ctrl_commands), load(&s.ctrl_errors)), (4, 2));
}
