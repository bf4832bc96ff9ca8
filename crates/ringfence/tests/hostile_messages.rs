//! A malicious frontend's messages against the real backend process, one
//! case per row: each starts a fresh connection, brings the device to the
//! state the case needs, sends the attack, and checks the exact outcome:
//! which counters moved (read live with SIGUSR1; every other drop counter
//! must stay put), what the device answered, and that the same connection
//! is still served. The table runs twice and the backend's descriptors and
//! anonymous memory must be the same after both passes.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::process::Child;
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

use common::*;
use ringfence_bus::{area_addr, DoorbellDirection};
use ringfence_bus_local::{wire, Seqpacket};
use ringfence_virtio_msg::{decode, Body, Message, Vqueue, Words};

/// The counters a case may move; every one not named must stay put.
const DROPS: [&str; 5] = [
    "malformed",
    "unknown_device",
    "unexpected",
    "bus_dropped",
    "queue_failures",
];

struct Daemon {
    child: Child,
    lines: Receiver<String>,
}

impl Daemon {
    fn start(env: &Env) -> Daemon {
        let image = env.image(1);
        let mut child = backend_daemon(&env.socket(), &image, &[]);
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Daemon { child, lines }
    }

    /// Stops the backend (SIGTERM) and returns its final counters line.
    fn stop(mut self) -> String {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert!(self.child.wait().unwrap().success(), "backend failed");
        self.lines
            .recv_timeout(Duration::from_secs(5))
            .expect("no final stats line")
    }

    /// The backend's counters right now.
    fn stats(&self) -> BTreeMap<String, u64> {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGUSR1) };
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .expect("no stats line after SIGUSR1");
        line.trim_start_matches("backend stats: ")
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.parse().unwrap_or(u64::MAX)))
            .collect()
    }
}

/// Sends one transport message for device 1 and returns the answer's bytes.
fn call(c: &Seqpacket, body: Body<'_>) -> Vec<u8> {
    call_dev(c, 1, body)
}

fn call_dev(c: &Seqpacket, dev_num: u16, body: Body<'_>) -> Vec<u8> {
    let mut buf = [0u8; 300];
    let n = Message {
        dev_num,
        token: 77,
        body,
    }
    .encode(&mut buf)
    .unwrap();
    c.send(&buf[..n], &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(c.wait_readable(Some(left)).unwrap(), "no answer");
        let (n, _) = c.recv(&mut buf).unwrap();
        let m = decode(&buf[..n]).unwrap();
        // Skip events (EVENT_CONFIG after a failure) and bus answers.
        if m.token == 77 && m.body.kind().1 {
            return buf[..n].to_vec();
        }
    }
}

fn send(c: &Seqpacket, dev_num: u16, body: Body<'_>) {
    let mut buf = [0u8; 300];
    let n = Message {
        dev_num,
        token: 5,
        body,
    }
    .encode(&mut buf)
    .unwrap();
    c.send(&buf[..n], &[]).unwrap();
}

fn raw(c: &Seqpacket, bytes: &[u8]) {
    c.send(bytes, &[]).unwrap();
}

fn status(c: &Seqpacket) -> u32 {
    match decode(&call(c, Body::GetDeviceStatus)).unwrap().body {
        Body::DeviceStatus { status } => status,
        other => panic!("GET_DEVICE_STATUS answered {other:?}"),
    }
}

fn set_status(c: &Seqpacket, s: u32) -> u32 {
    match decode(&call(c, Body::SetDeviceStatus { status: s }))
        .unwrap()
        .body
    {
        Body::SetDeviceStatusResult { status } => status,
        other => panic!("SET_DEVICE_STATUS answered {other:?}"),
    }
}

fn driver_features(c: &Seqpacket, features: u64) {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&(features as u32).to_le_bytes());
    b[4..].copy_from_slice(&((features >> 32) as u32).to_le_bytes());
    call(
        c,
        Body::SetDriverFeatures {
            block_index: 0,
            features: Words::from_bytes(&b).unwrap(),
        },
    );
}

const ACK_DRIVER: u32 = 1 | 2;
const FEATURES_OK: u32 = ACK_DRIVER | 8;
const NEEDS_RESET: u32 = 0x40;
const VERSION_1: u64 = 1 << 32;

fn memfd(size: u64, seals: i32) -> std::fs::File {
    let name = std::ffi::CString::new("attack-area").unwrap();
    // SAFETY: plain system calls on a descriptor this function owns.
    let file = unsafe {
        let fd = libc::memfd_create(name.as_ptr(), libc::MFD_ALLOW_SEALING | libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    file.set_len(size).unwrap();
    // SAFETY: as above.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) };
    assert_eq!(r, 0);
    file
}

const SEALED: i32 = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

fn share(c: &Seqpacket, id: u16, size: u64, fds: &[i32]) -> u32 {
    share_at(c, id, size, 0, fds)
}

/// AREA_SHARE of `size` bytes from `offset` of the memfd (a grant).
fn share_at(c: &Seqpacket, id: u16, size: u64, offset: u64, fds: &[i32]) -> u32 {
    c.send(
        &local_msg(&wire::LocalMsg::AreaShare {
            id,
            size,
            offset,
            copied: None,
        }),
        fds,
    )
    .unwrap();
    let mut buf = [0u8; 64];
    assert!(c.wait_readable(Some(Duration::from_secs(5))).unwrap());
    c.recv(&mut buf).unwrap();
    u32::from_le_bytes(buf[12..16].try_into().unwrap())
}

/// Where the case starts.
#[derive(Clone, Copy)]
enum Prep {
    Connected,
    Driver,
    FeaturesOk,
    /// FEATURES_OK and a 64 KiB area 1 shared.
    FeaturesOkWithArea,
}

fn prepare(c: &Seqpacket, prep: Prep) {
    if matches!(prep, Prep::Connected) {
        return;
    }
    assert_eq!(set_status(c, ACK_DRIVER), ACK_DRIVER);
    if matches!(prep, Prep::Driver) {
        return;
    }
    driver_features(c, VERSION_1);
    assert_eq!(set_status(c, FEATURES_OK), FEATURES_OK);
    if matches!(prep, Prep::FeaturesOkWithArea) {
        assert_eq!(
            share(c, 1, 64 * 1024, &[memfd(64 * 1024, SEALED).as_raw_fd()]),
            0
        );
    }
}

fn vqueue(index: u32, size: u32, base: u64) -> Body<'static> {
    Body::SetVqueue(Vqueue {
        index,
        max_size: 0,
        size,
        desc_addr: base,
        driver_addr: base.wrapping_add(0x1000),
        device_addr: base.wrapping_add(0x2000),
    })
}

fn area1() -> u64 {
    area_addr(1, 0).unwrap()
}

/// One attack: where it starts, what it does (returning `false` if what the
/// device answered is wrong), and which counters it must move by how much.
struct Case {
    name: &'static str,
    prep: Prep,
    attack: fn(&Seqpacket) -> bool,
    moves: &'static [(&'static str, u64)],
}

fn answered_config_len(bytes: &[u8]) -> Option<usize> {
    match decode(bytes).ok()?.body {
        Body::Config { data, .. } => Some(data.len()),
        _ => None,
    }
}

fn set_config_accepted(bytes: &[u8]) -> Option<u32> {
    match decode(bytes).ok()?.body {
        Body::SetConfigResult { length, .. } => Some(length),
        _ => None,
    }
}

const CASES: &[Case] = &[
    // Malformed messages: dropped and counted, nothing answered.
    Case {
        name: "two bytes",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0, 2]);
            true
        },
        moves: &[("malformed", 1)],
    },
    Case {
        name: "size field larger than the message",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0, 7, 1, 0, 0, 0, 12, 0]);
            true
        },
        moves: &[("malformed", 1)],
    },
    Case {
        name: "size field smaller than the message",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0, 7, 1, 0, 0, 0, 4, 0, 0, 0, 0, 0]);
            true
        },
        moves: &[("malformed", 1)],
    },
    Case {
        // The spec: reserved type bits are ignored on receive.
        name: "reserved type bit, ignored: the request is answered",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0x84, 7, 1, 0, 0, 0, 8, 0]);
            let mut buf = [0u8; 264];
            c.wait_readable(Some(Duration::from_secs(5))).unwrap()
                && c.recv(&mut buf).is_ok_and(|(n, _)| {
                    matches!(
                        decode(&buf[..n]).map(|m| m.body),
                        Ok(Body::DeviceStatus { .. })
                    )
                })
        },
        moves: &[],
    },
    Case {
        name: "unknown transport id",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0, 0x3F, 1, 0, 0, 0, 8, 0]);
            true
        },
        moves: &[("malformed", 1)],
    },
    Case {
        name: "SET_VQUEUE truncated",
        prep: Prep::FeaturesOk,
        attack: |c| {
            raw(c, &[0, 0x0A, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0]);
            true
        },
        moves: &[("malformed", 1)],
    },
    Case {
        name: "GET_CONFIG truncated",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0, 0x05, 1, 0, 0, 0, 10, 0, 0, 0]);
            true
        },
        moves: &[("malformed", 1)],
    },
    Case {
        name: "SET_DEVICE_STATUS truncated",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0, 0x08, 1, 0, 0, 0, 9, 0, 1]);
            true
        },
        moves: &[("malformed", 1)],
    },
    Case {
        name: "GET_DEVICES count not a multiple of 8",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0x02, 0x02, 0, 0, 0, 0, 12, 0, 0, 0, 0xFF, 0xFF]);
            true
        },
        moves: &[("malformed", 1)],
    },
    // Messages for nobody.
    Case {
        name: "request for device 9",
        prep: Prep::Connected,
        attack: |c| {
            send(c, 9, Body::GetDeviceInfo);
            true
        },
        moves: &[("unknown_device", 1)],
    },
    Case {
        name: "status write for device 0",
        prep: Prep::Connected,
        attack: |c| {
            send(c, 0, Body::SetDeviceStatus { status: 0 });
            true
        },
        moves: &[("unknown_device", 1)],
    },
    Case {
        name: "EVENT_AVAIL for device 9",
        prep: Prep::Connected,
        attack: |c| {
            send(
                c,
                9,
                Body::EventAvail {
                    vq_index: 0,
                    next_offset: 0,
                },
            );
            true
        },
        moves: &[("unknown_device", 1)],
    },
    // Messages a device side must never receive.
    Case {
        name: "a response sent to the device",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0x01, 0x07, 1, 0, 0, 0, 12, 0, 0, 0, 0, 0]);
            true
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "EVENT_CONFIG sent to the device",
        prep: Prep::Connected,
        attack: |c| {
            send(
                c,
                1,
                Body::EventConfig {
                    device_status: 0,
                    generation: 0,
                    offset: 0,
                    data: &[],
                },
            );
            true
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "EVENT_USED sent to the device",
        prep: Prep::Connected,
        attack: |c| {
            send(c, 1, Body::EventUsed { vq_index: 0 });
            true
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "EVENT_AVAIL for queue 999",
        prep: Prep::FeaturesOk,
        attack: |c| {
            send(
                c,
                1,
                Body::EventAvail {
                    vq_index: 999,
                    next_offset: 0,
                },
            );
            true
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "EVENT_AVAIL before DRIVER_OK",
        prep: Prep::FeaturesOk,
        attack: |c| {
            send(
                c,
                1,
                Body::EventAvail {
                    vq_index: 0,
                    next_offset: 0,
                },
            );
            true
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "1000 EVENT_AVAIL before DRIVER_OK",
        prep: Prep::FeaturesOk,
        attack: |c| {
            for _ in 0..1000 {
                send(
                    c,
                    1,
                    Body::EventAvail {
                        vq_index: 0,
                        next_offset: 0,
                    },
                );
            }
            true
        },
        moves: &[("unexpected", 1000)],
    },
    // The status machine refuses steps out of order, and says so in its answer.
    Case {
        name: "FEATURES_OK before DRIVER",
        prep: Prep::Connected,
        attack: |c| set_status(c, 1 | 8) == 1,
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "a reserved status bit",
        prep: Prep::Driver,
        attack: |c| set_status(c, ACK_DRIVER | 0x100) == ACK_DRIVER,
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "clearing status bits without a reset",
        prep: Prep::Driver,
        attack: |c| set_status(c, 1) == ACK_DRIVER,
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "DRIVER_OK without FEATURES_OK",
        prep: Prep::Driver,
        attack: |c| set_status(c, ACK_DRIVER | 4) == ACK_DRIVER && status(c) == ACK_DRIVER,
        moves: &[],
    },
    Case {
        name: "features before DRIVER",
        prep: Prep::Connected,
        attack: |c| {
            driver_features(c, VERSION_1);
            true
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "features after FEATURES_OK",
        prep: Prep::FeaturesOk,
        attack: |c| {
            driver_features(c, VERSION_1);
            true
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "a feature never offered",
        prep: Prep::Driver,
        attack: |c| {
            driver_features(c, VERSION_1 | 1 << 63);
            set_status(c, FEATURES_OK) == ACK_DRIVER
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "features without VERSION_1",
        prep: Prep::Driver,
        attack: |c| {
            driver_features(c, 1 << 9);
            set_status(c, FEATURES_OK) == ACK_DRIVER
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "features in blocks beyond 64 bits",
        prep: Prep::Driver,
        attack: |c| {
            let b = [0u8, 0, 0, 0, 1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF];
            call(
                c,
                Body::SetDriverFeatures {
                    block_index: 0,
                    features: Words::from_bytes(&b).unwrap(),
                },
            );
            set_status(c, FEATURES_OK) == ACK_DRIVER
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "SET_VQUEUE before FEATURES_OK",
        prep: Prep::Driver,
        attack: |c| {
            call(c, vqueue(0, 16, area1()));
            true
        },
        moves: &[("unexpected", 1)],
    },
    // Config space.
    Case {
        name: "GET_CONFIG beyond the config space",
        prep: Prep::Connected,
        attack: |c| {
            answered_config_len(&call(
                c,
                Body::GetConfig {
                    offset: 56,
                    length: 8,
                },
            )) == Some(0)
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "GET_CONFIG at offset 4 GiB - 1",
        prep: Prep::Connected,
        attack: |c| {
            answered_config_len(&call(
                c,
                Body::GetConfig {
                    offset: u32::MAX,
                    length: 1,
                },
            )) == Some(0)
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "GET_CONFIG longer than a message",
        prep: Prep::Connected,
        attack: |c| {
            answered_config_len(&call(
                c,
                Body::GetConfig {
                    offset: 0,
                    length: 0xFFFF,
                },
            )) == Some(0)
        },
        moves: &[("unexpected", 1)],
    },
    Case {
        name: "SET_CONFIG with a stale generation",
        prep: Prep::Connected,
        attack: |c| {
            set_config_accepted(&call(
                c,
                Body::SetConfig {
                    generation: 0x5555,
                    offset: 32,
                    data: &[1],
                },
            )) == Some(0)
        },
        moves: &[],
    },
    Case {
        name: "SET_CONFIG of read-only capacity",
        prep: Prep::Connected,
        attack: |c| {
            set_config_accepted(&call(
                c,
                Body::SetConfig {
                    generation: 0,
                    offset: 0,
                    data: &[0xFF; 8],
                },
            )) == Some(0)
        },
        moves: &[],
    },
    Case {
        name: "RESET_VQUEUE without RING_RESET",
        prep: Prep::FeaturesOk,
        attack: |c| {
            call(c, Body::ResetVqueue { index: 0 });
            true
        },
        moves: &[("unexpected", 1)],
    },
    // Queue set-up the device refuses: DEVICE_NEEDS_RESET, counted.
    Case {
        name: "queue size 3",
        prep: Prep::FeaturesOkWithArea,
        attack: |c| {
            call(c, vqueue(0, 3, area1()));
            status(c) & NEEDS_RESET != 0
        },
        moves: &[("queue_failures", 1)],
    },
    Case {
        name: "queue size 512, above the maximum",
        prep: Prep::FeaturesOkWithArea,
        attack: |c| {
            call(c, vqueue(0, 512, area1()));
            status(c) & NEEDS_RESET != 0
        },
        moves: &[("queue_failures", 1)],
    },
    Case {
        name: "queue index 7 of a one-queue device",
        prep: Prep::FeaturesOkWithArea,
        attack: |c| {
            call(c, vqueue(7, 16, area1()));
            status(c) & NEEDS_RESET != 0
        },
        moves: &[("queue_failures", 1)],
    },
    Case {
        name: "rings in no shared area",
        prep: Prep::FeaturesOk,
        attack: |c| {
            call(c, vqueue(0, 16, area_addr(9, 0).unwrap()));
            status(c) & NEEDS_RESET != 0
        },
        moves: &[("queue_failures", 1)],
    },
    Case {
        name: "rings running past the end of the area",
        prep: Prep::FeaturesOkWithArea,
        attack: |c| {
            call(c, vqueue(0, 256, area1() + 0xF000));
            status(c) & NEEDS_RESET != 0
        },
        moves: &[("queue_failures", 1)],
    },
    Case {
        name: "misaligned descriptor table",
        prep: Prep::FeaturesOkWithArea,
        attack: |c| {
            call(c, vqueue(0, 16, area1() + 8));
            status(c) & NEEDS_RESET != 0
        },
        moves: &[("queue_failures", 1)],
    },
    Case {
        name: "queue address at the top of the address space",
        prep: Prep::FeaturesOkWithArea,
        attack: |c| {
            call(c, vqueue(0, 16, u64::MAX - 0xFFF));
            status(c) & NEEDS_RESET != 0
        },
        moves: &[("queue_failures", 1)],
    },
    // The local bus's own messages.
    Case {
        name: "a message larger than negotiated",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0u8; 300]);
            true
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE of an unsealed memfd",
        prep: Prep::Connected,
        attack: |c| share(c, 2, 4096, &[memfd(4096, 0).as_raw_fd()]) == wire::STATUS_REJECTED,
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE of a regular file",
        prep: Prep::Connected,
        attack: |c| {
            share(
                c,
                2,
                4096,
                &[std::fs::File::open("/proc/self/exe").unwrap().as_raw_fd()],
            ) == wire::STATUS_REJECTED
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE larger than its memfd",
        prep: Prep::Connected,
        attack: |c| {
            share(c, 2, 1 << 20, &[memfd(4096, SEALED).as_raw_fd()]) == wire::STATUS_REJECTED
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE (grant) at an offset inside a page",
        prep: Prep::Connected,
        attack: |c| {
            share_at(c, 2, 4096, 100, &[memfd(16384, SEALED).as_raw_fd()]) == wire::STATUS_REJECTED
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE (grant) of pages beyond its memfd",
        prep: Prep::Connected,
        attack: |c| {
            share_at(c, 2, 8192, 12288, &[memfd(16384, SEALED).as_raw_fd()])
                == wire::STATUS_REJECTED
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE (grant) whose end overflows",
        prep: Prep::Connected,
        attack: |c| {
            share_at(
                c,
                2,
                4096,
                u64::MAX - 4095,
                &[memfd(16384, SEALED).as_raw_fd()],
            ) == wire::STATUS_REJECTED
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE of area 0",
        prep: Prep::Connected,
        attack: |c| share(c, 0, 4096, &[memfd(4096, SEALED).as_raw_fd()]) == wire::STATUS_REJECTED,
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE of an id already shared",
        prep: Prep::FeaturesOkWithArea,
        attack: |c| share(c, 1, 4096, &[memfd(4096, SEALED).as_raw_fd()]) == wire::STATUS_REJECTED,
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE without a descriptor",
        prep: Prep::Connected,
        attack: |c| share(c, 3, 4096, &[]) == wire::STATUS_REJECTED,
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE with two descriptors",
        prep: Prep::Connected,
        attack: |c| {
            let (a, b) = (memfd(4096, SEALED), memfd(4096, SEALED));
            c.send(
                &local_msg(&wire::LocalMsg::AreaShare {
                    id: 4,
                    size: 4096,
                    offset: 0,
                    copied: None,
                }),
                &[a.as_raw_fd(), b.as_raw_fd()],
            )
            .unwrap();
            true
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_SHARE for copy that was never negotiated (no broker)",
        prep: Prep::Connected,
        attack: |c| {
            c.send(
                &local_msg(&wire::LocalMsg::AreaShare {
                    id: 4,
                    size: 4096,
                    offset: 0,
                    copied: Some(1),
                }),
                &[],
            )
            .unwrap();
            let mut buf = [0u8; 64];
            assert!(c.wait_readable(Some(Duration::from_secs(5))).unwrap());
            c.recv(&mut buf).unwrap();
            // Refused, not staged.
            u32::from_le_bytes(buf[12..16].try_into().unwrap()) == wire::STATUS_REJECTED
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "AREA_UNSHARE of an unknown area",
        prep: Prep::Connected,
        attack: |c| {
            c.send(&local_msg(&wire::LocalMsg::AreaUnshare { id: 42 }), &[])
                .unwrap();
            let mut buf = [0u8; 64];
            c.wait_readable(Some(Duration::from_secs(5))).unwrap()
                && c.recv(&mut buf).is_ok()
                && buf[1] == wire::AREA_UNSHARE
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "a descriptor on a transport message",
        prep: Prep::Connected,
        attack: |c| {
            let f = memfd(4096, SEALED);
            c.send(&[0, 7, 1, 0, 0, 0, 8, 0], &[f.as_raw_fd()]).unwrap();
            true
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "an unknown local-bus message",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0x02, 0x90, 0, 0, 0, 0, 8, 0]);
            true
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "DOORBELL_ATTACH with an unknown direction",
        prep: Prep::Connected,
        attack: |c| {
            raw(c, &[0x02, 0xC1, 0, 0, 0, 0, 16, 0, 1, 0, 0, 0, 9, 0, 0, 0]);
            true
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "DOORBELL_ATTACH of a semaphore eventfd",
        prep: Prep::FeaturesOk,
        attack: |c| {
            let e = vmm_sys_util::eventfd::EventFd::new(libc::EFD_SEMAPHORE).unwrap();
            c.send(
                &local_msg(&wire::LocalMsg::DoorbellAttach {
                    dev_num: 1,
                    queue: 0,
                    direction: DoorbellDirection::ToDevice,
                }),
                &[e.as_raw_fd()],
            )
            .unwrap();
            true
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "DOORBELL_ATTACH for queue 999",
        prep: Prep::FeaturesOk,
        attack: |c| {
            let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
            c.send(
                &local_msg(&wire::LocalMsg::DoorbellAttach {
                    dev_num: 1,
                    queue: 999,
                    direction: DoorbellDirection::ToDriver,
                }),
                &[e.as_raw_fd()],
            )
            .unwrap();
            true
        },
        moves: &[("bus_dropped", 1)],
    },
    Case {
        name: "DOORBELL_ATTACH for device 9",
        prep: Prep::FeaturesOk,
        attack: |c| {
            let e = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
            c.send(
                &local_msg(&wire::LocalMsg::DoorbellAttach {
                    dev_num: 9,
                    queue: 0,
                    direction: DoorbellDirection::ToDevice,
                }),
                &[e.as_raw_fd()],
            )
            .unwrap();
            true
        },
        moves: &[("unknown_device", 1)],
    },
    // Harmless however often: answered, nothing counted.
    Case {
        name: "a second VERSION",
        prep: Prep::Connected,
        attack: |c| {
            c.send(
                &local_msg(&wire::LocalMsg::Version {
                    revision: 1,
                    max_msg_size: 65536,
                    features: 1,
                }),
                &[],
            )
            .unwrap();
            let mut buf = [0u8; 64];
            c.wait_readable(Some(Duration::from_secs(5))).unwrap() && c.recv(&mut buf).is_ok()
            // Still bounded by the backend's own maximum.
            && u32::from_le_bytes(buf[12..16].try_into().unwrap()) == 264
        },
        moves: &[],
    },
    Case {
        name: "GET_DEVICES at the top of the range",
        prep: Prep::Connected,
        attack: |c| {
            let a = call_dev(
                c,
                0,
                Body::GetDevices {
                    offset: 0xFFF8,
                    count: 0xFFF8,
                },
            );
            matches!(decode(&a).map(|m| m.body), Ok(Body::Devices { .. }))
        },
        moves: &[],
    },
    Case {
        name: "10 000 PINGs",
        prep: Prep::Connected,
        attack: |c| (0..10_000u32).all(|i| raw_ping(c, i)),
        moves: &[],
    },
];

fn run_case(d: &Daemon, socket: &std::path::Path, case: &Case) -> Result<(), String> {
    let c = raw_connection(socket);
    prepare(&c, case.prep);
    let before = d.stats();
    if !(case.attack)(&c) {
        return Err("the device's answer was wrong".into());
    }
    if !raw_ping(&c, 0xC0FFEE) {
        return Err("the connection is no longer served".into());
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let after = d.stats();
        let mut wrong = Vec::new();
        for name in DROPS {
            let want = case
                .moves
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, v)| *v);
            let got = after[name] - before[name];
            if got != want {
                wrong.push(format!("{name} moved by {got}, expected {want}"));
            }
        }
        if wrong.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(wrong.join(", "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_attack_has_its_exact_outcome_and_the_backend_stays_flat() {
    let env = Env::new("messages");
    let d = Daemon::start(&env);
    let mut failures = Vec::new();
    let mut flat = Vec::new();
    for pass in 0..2 {
        // RINGFENCE_CASE=substring runs only the matching cases (debugging).
        let only = std::env::var("RINGFENCE_CASE").unwrap_or_default();
        for case in CASES.iter().filter(|c| c.name.contains(&only)) {
            if let Err(e) = run_case(&d, &env.socket(), case) {
                failures.push(format!("pass {pass}: {}: {e}", case.name));
            }
        }
        // Connections end on their own threads: let them finish.
        std::thread::sleep(Duration::from_millis(300));
        flat.push(fds_and_rss(d.child.id()));
    }
    println!(
        "{} cases, twice; backend fds and RssAnon KiB after each pass: {flat:?}",
        CASES.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(flat[0].0, flat[1].0, "descriptors accumulate");
    assert!(
        flat[1].1 <= flat[0].1 + 1024,
        "anonymous memory grew: {flat:?}"
    );
    let stats = d.stop();
    assert!(stats.contains("workers_abandoned=0"), "{stats}");
}
