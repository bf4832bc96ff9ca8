//! The device as a transport sees it: features, queue layout, config
//! space, options, and TAP descriptors handed over from elsewhere.
#![allow(clippy::undocumented_unsafe_blocks)]

mod common;

use std::os::fd::{FromRawFd, OwnedFd};

use common::*;
use ringfence_device::{DeviceError, VirtioDevice};
use ringfence_net::{Net, NetError, NetOptions, Tap, CONFIG_SIZE};
use virtio_bindings::virtio_net::*;

#[test]
fn features_queues_and_config_space() {
    let fx = fixture(1);
    let net = &fx.net;
    assert_eq!(net.device_type(), 1);
    let f = net.device_features();
    for b in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_CTRL_VQ,
        VIRTIO_NET_F_CTRL_RX,
        VIRTIO_NET_F_CTRL_MAC_ADDR,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b}");
    }
    assert_eq!(f & bit(VIRTIO_NET_F_MQ), 0, "one pair: no MQ");
    assert_eq!(f & bit(VIRTIO_NET_F_CTRL_VLAN), 0);
    assert_eq!(net.num_queues(), 3);
    assert_eq!(net.max_queue_size(), 256);
    assert_eq!(net.config_size(), CONFIG_SIZE);
    let mut c = [0u8; CONFIG_SIZE];
    net.read_config(0, &mut c).unwrap();
    assert_eq!(c, [0x02, 0, 0, 0, 0, 0x42, 1, 0, 1, 0, 0xdc, 0x05]);
    let mut past = [0u8; 2];
    assert!(matches!(
        net.read_config(11, &mut past),
        Err(DeviceError::ConfigOutOfRange { .. })
    ));

    let fx2 = fixture(2);
    assert_ne!(fx2.net.device_features() & bit(VIRTIO_NET_F_MQ), 0);
    assert_eq!(fx2.net.num_queues(), 5);
    let mut pairs = [0u8; 2];
    fx2.net.read_config(8, &mut pairs).unwrap();
    assert_eq!(u16::from_le_bytes(pairs), 2);
}

#[test]
fn the_config_space_is_read_only_even_the_mac() {
    let mut fx = fixture(1);
    for offset in [0u64, 6, 10] {
        assert!(matches!(
            fx.net.write_config(offset, &[1, 2]),
            Err(DeviceError::ConfigReadOnly { .. })
        ));
    }
    assert_eq!(fx.net.mac(), [0x02, 0, 0, 0, 0, 0x42]);
}

#[test]
fn without_mq_the_control_queue_is_at_index_2_and_unused_queues_answer_empty() {
    let mut fx = fixture(2);
    let acked = VERSION_1 | bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_CTRL_RX);
    let mut h = fx.net.activate(acked).unwrap();
    assert_eq!(h.len(), 5, "one handler per queue");
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    write(&mem, BUFS, &[0, 0, 1]);
    write(&mem, BUFS + 0x100, &[0xAA]);
    ring.publish(&[(BUFS, 3, false), (BUFS + 0x100, 1, true)]);
    ring.run(h[2].as_mut()).unwrap();
    assert_eq!(
        read(&mem, BUFS + 0x100, 1),
        [VIRTIO_NET_OK as u8],
        "index 2 is ctrl"
    );
    // Index 4 is a queue these features leave unused.
    let mem2 = memory();
    let mut ring2 = Ring::new(&mem2, 16);
    write(&mem2, BUFS, &[0x55; 16]);
    ring2.publish(&[(BUFS, 16, true)]);
    let p = ring2.run(h[4].as_mut()).unwrap();
    assert_eq!(p.chains, 1);
    assert_eq!(ring2.used(0), (0, 0));
    assert_eq!(read(&mem2, BUFS, 16), [0x55; 16], "nothing written");
    assert_eq!(load(&fx.net.stats().unused_queue_chains), 1);
}

#[test]
fn without_ctrl_vq_the_control_index_still_has_a_handler() {
    let mut fx = fixture(1);
    let mut h = fx.net.activate(VERSION_1).unwrap();
    assert_eq!(h.len(), 3);
    let mem = memory();
    let mut ring = Ring::new(&mem, 16);
    write(&mem, BUFS, &[0, 0, 1, 0xAA]);
    ring.publish(&[(BUFS, 3, false), (BUFS + 3, 1, true)]);
    ring.run(h[2].as_mut()).unwrap();
    assert_eq!(ring.used(0), (0, 0));
    assert_eq!(read(&mem, BUFS + 3, 1), [0xAA], "no command executed");
    let s = fx.net.stats();
    assert_eq!(
        (load(&s.ctrl_commands), load(&s.unused_queue_chains)),
        (0, 1)
    );
}

#[test]
fn bad_options_are_refused() {
    let name = unique_name();
    let cases: Vec<(&str, u16, NetOptions)> = vec![
        (
            "more pairs than TAP queues",
            1,
            NetOptions {
                queue_pairs: 2,
                ..Default::default()
            },
        ),
        (
            "zero pairs",
            1,
            NetOptions {
                queue_pairs: 0,
                ..Default::default()
            },
        ),
        (
            "mtu below 68",
            1,
            NetOptions {
                mtu: 67,
                ..Default::default()
            },
        ),
        (
            "queue size not a power of two",
            1,
            NetOptions {
                queue_size: 100,
                ..Default::default()
            },
        ),
        (
            "multicast mac",
            1,
            NetOptions {
                mac: Some([1, 0, 0, 0, 0, 1]),
                ..Default::default()
            },
        ),
        (
            "zero mac",
            1,
            NetOptions {
                mac: Some([0; 6]),
                ..Default::default()
            },
        ),
    ];
    for (what, queues, opts) in cases {
        let taps = Tap::open(&name, queues).unwrap();
        assert!(
            matches!(Net::new(taps, opts), Err(NetError::InvalidOption { .. })),
            "{what}"
        );
    }
    assert!(matches!(
        Tap::open("this-name-is-too-long", 1),
        Err(NetError::BadName { .. })
    ));
    assert!(matches!(Tap::open("", 1), Err(NetError::BadName { .. })));
}

#[test]
fn a_random_mac_is_unicast_and_locally_administered() {
    let taps = Tap::open(&unique_name(), 1).unwrap();
    let net = Net::new(taps, NetOptions::default()).unwrap();
    let mac = net.mac();
    assert_eq!(mac[0] & 0x03, 0x02);
    assert_eq!(net.options().mac, Some(mac));
    let clone = net.try_clone().unwrap();
    assert_eq!(clone.mac(), mac, "every instance offers the same address");
}

fn open_tun(name: &str, flags: i32) -> OwnedFd {
    let path = c"/dev/net/tun";
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(fd >= 0);
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::TUNSETIFF,
            &mut ifr,
        )
    };
    assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    fd
}

#[test]
fn tap_descriptors_from_elsewhere_must_have_a_vnet_header() {
    let name = unique_name();
    let plain = open_tun(&name, libc::IFF_TAP | libc::IFF_NO_PI);
    assert!(matches!(Tap::from_fd(plain), Err(NetError::NotATap { .. })));
    let tun = open_tun(
        &unique_name(),
        libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
    );
    assert!(matches!(Tap::from_fd(tun), Err(NetError::NotATap { .. })));
    let name = unique_name();
    let good = open_tun(&name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR);
    let tap = Tap::from_fd(good).unwrap();
    assert_eq!(tap.name().unwrap(), name);
    assert!(!tap.is_multi_queue().unwrap());
    Net::new(vec![tap], NetOptions::default()).unwrap();
}
