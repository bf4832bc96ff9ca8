//! Writes the seed corpus: a few meaningful inputs per fuzz target, in each
//! target's input format (documented at the top of its file under
//! fuzz_targets/). Messages are built with the real encoder, so the seeds
//! follow the wire format as it evolves.
//!
//! Usage: `cargo run -p ringfence-fuzz-seeds [-- OUT_DIR]` (default: fuzz/corpus);
//! writes OUT_DIR/<target>/seed-<name>, overwriting earlier seeds.

use std::path::{Path, PathBuf};

use ringfence_virtio_msg::{Body, DeviceInfo, Message, Vqueue, Words};

/// A little-endian byte builder.
#[derive(Default)]
struct B(Vec<u8>);

impl B {
    fn u8(mut self, v: u8) -> Self {
        self.0.push(v);
        self
    }
    fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
}

/// One encoded message.
fn msg(dev_num: u16, body: Body<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    let n = Message {
        dev_num,
        token: 0,
        body,
    }
    .encode(&mut buf)
    .expect("seed message encodes");
    buf.truncate(n);
    buf
}

fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}

struct Out(PathBuf);

impl Out {
    fn write(&self, target: &str, name: &str, data: &[u8]) {
        let dir = self.0.join(target);
        std::fs::create_dir_all(&dir).expect("create corpus dir");
        std::fs::write(dir.join(format!("seed-{name}")), data).expect("write seed");
    }
}

// virtio numbers the seeds use.
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const F_BLK_FLUSH: u64 = 1 << 9;
const F_BLK_DISCARD: u64 = 1 << 13;
const F_BLK_WRITE_ZEROES: u64 = 1 << 14;
const F_INDIRECT_DESC: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;
const D_NEXT: u16 = 1;
const D_WRITE: u16 = 2;
const D_INDIRECT: u16 = 4;
const S_ACK: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;

fn header(req_type: u32, sector: u64) -> Vec<u8> {
    B::default().u32(req_type).u32(0).u64(sector).0
}

fn table_entry(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    B::default().u64(addr).u32(len).u16(flags).u16(next).0
}

mod blk {
    //! blk_chain: offsets inside the area (the rings sit at its start).
    use super::*;
    pub const AREA: u64 = 1 << 48;
    pub const HDR: u32 = 0x1000;
    pub const DATA: u32 = 0x2000;
    pub const TABLE: u32 = 0x4000;
    pub const STATUS: u32 = 0x6000;

    /// Descriptors are (offset in the area, len, flags, next); heads go on the
    /// avail ring; writes are (offset, bytes).
    pub fn input(
        features: u64,
        descs: &[(u32, u32, u16, u16)],
        heads: &[u16],
        writes: &[(u32, Vec<u8>)],
    ) -> Vec<u8> {
        let mut b = B::default()
            .u8(0)
            .u64(features)
            .u16(heads.len() as u16)
            .u8(descs.len() as u8);
        for &(off, len, flags, next) in descs {
            b = b.u8(0).u32(off).u32(len).u16(flags).u16(next);
        }
        b = b.u8(heads.len() as u8);
        for &h in heads {
            b = b.u16(h);
        }
        for (off, bytes) in writes {
            b = b.u16(*off as u16).u16(bytes.len() as u16).bytes(bytes);
        }
        b.0
    }
}

fn blk_chain(out: &Out) {
    use blk::*;
    let t = "blk_chain";
    let f = F_BLK_FLUSH | F_VERSION_1;
    let read = [
        (HDR, 16, D_NEXT, 1),
        (DATA, 512, D_WRITE | D_NEXT, 2),
        (STATUS, 1, D_WRITE, 0),
    ];
    out.write(t, "in", &input(f, &read, &[0], &[(HDR, header(T_IN, 3))]));
    let write = [
        (HDR, 16, D_NEXT, 1),
        (DATA, 512, D_NEXT, 2),
        (STATUS, 1, D_WRITE, 0),
    ];
    out.write(
        t,
        "out",
        &input(
            f,
            &write,
            &[0],
            &[(HDR, header(T_OUT, 5)), (DATA, vec![0x77; 512])],
        ),
    );
    let flush = [(HDR, 16, D_NEXT, 1), (STATUS, 1, D_WRITE, 0)];
    out.write(
        t,
        "flush",
        &input(f, &flush, &[0], &[(HDR, header(T_FLUSH, 0))]),
    );
    let split = [
        (HDR, 3, D_NEXT, 1),
        (HDR + 3, 13, D_NEXT, 2),
        (DATA, 512, D_WRITE | D_NEXT, 3),
        (STATUS, 1, D_WRITE, 0),
    ];
    out.write(
        t,
        "split-header",
        &input(f, &split, &[0], &[(HDR, header(T_IN, 7))]),
    );
    let mut table = table_entry(AREA + u64::from(HDR), 16, D_NEXT, 1);
    table.extend(table_entry(
        AREA + u64::from(DATA),
        1024,
        D_WRITE | D_NEXT,
        2,
    ));
    table.extend(table_entry(AREA + u64::from(STATUS), 1, D_WRITE, 0));
    out.write(
        t,
        "indirect",
        &input(
            f | F_INDIRECT_DESC,
            &[(TABLE, 48, D_INDIRECT, 0)],
            &[0],
            &[(HDR, header(T_IN, 1)), (TABLE, table)],
        ),
    );
    // Two chains, EVENT_IDX: a read at head 0 and a flush at head 3.
    let two = [
        (HDR, 16, D_NEXT, 1),
        (DATA, 512, D_WRITE | D_NEXT, 2),
        (STATUS, 1, D_WRITE, 0),
        (HDR + 16, 16, D_NEXT, 4),
        (STATUS + 1, 1, D_WRITE, 0),
    ];
    out.write(
        t,
        "two-chains-event-idx",
        &input(
            f | F_EVENT_IDX,
            &two,
            &[0, 3],
            &[(HDR, header(T_IN, 0)), (HDR + 16, header(T_FLUSH, 0))],
        ),
    );
    let get_id = [
        (HDR, 16, D_NEXT, 1),
        (DATA, 20, D_WRITE | D_NEXT, 2),
        (STATUS, 1, D_WRITE, 0),
    ];
    out.write(
        t,
        "get-id",
        &input(f, &get_id, &[0], &[(HDR, header(T_GET_ID, 0))]),
    );
    // DISCARD and WRITE_ZEROES (with UNMAP): one 16-byte segment each.
    let seg = |flags: u32| B::default().u64(8).u32(16).u32(flags).0;
    let ranged = [
        (HDR, 16, D_NEXT, 1),
        (DATA, 16, D_NEXT, 2),
        (STATUS, 1, D_WRITE, 0),
    ];
    let fr = f | F_BLK_DISCARD | F_BLK_WRITE_ZEROES;
    out.write(
        t,
        "discard",
        &input(
            fr,
            &ranged,
            &[0],
            &[(HDR, header(T_DISCARD, 0)), (DATA, seg(0))],
        ),
    );
    out.write(
        t,
        "write-zeroes-unmap",
        &input(
            fr,
            &ranged,
            &[0],
            &[(HDR, header(T_WRITE_ZEROES, 0)), (DATA, seg(1))],
        ),
    );
}

mod dev {
    //! device_messages events.
    use super::*;
    pub fn raw(m: &[u8]) -> Vec<u8> {
        B::default().u8(0).u16(m.len() as u16).bytes(m).0
    }
    /// Shares area `id` (1..=3) of `pages` 4 KiB pages (1..=16).
    pub fn share(id: u8, pages: u8) -> Vec<u8> {
        vec![2, id - 1, pages - 1]
    }
    pub fn unshare(id: u8) -> Vec<u8> {
        vec![3, id - 1]
    }
    pub fn write(id: u8, off: u16, bytes: &[u8]) -> Vec<u8> {
        B::default()
            .u8(4)
            .u8(id - 1)
            .u16(off)
            .u16(bytes.len() as u16)
            .bytes(bytes)
            .0
    }
    pub fn pause() -> Vec<u8> {
        vec![5]
    }
    pub fn status(s: u32) -> Vec<u8> {
        raw(&msg(1, Body::SetDeviceStatus { status: s }))
    }
}

fn device_messages(out: &Out) {
    use dev::*;
    let t = "device_messages";
    let area = |off: u64| (1u64 << 48) | off;
    let features = F_VERSION_1 | F_BLK_FLUSH | F_INDIRECT_DESC;
    let fw = words(&[features as u32, (features >> 32) as u32]);
    let handshake: Vec<Vec<u8>> = vec![
        raw(&msg(
            0,
            Body::GetDevices {
                offset: 0,
                count: 64,
            },
        )),
        raw(&msg(1, Body::GetDeviceInfo)),
        status(0),
        status(S_ACK),
        status(S_ACK | S_DRIVER),
        raw(&msg(
            1,
            Body::GetDeviceFeatures {
                block_index: 0,
                num_blocks: 2,
            },
        )),
        raw(&msg(
            1,
            Body::SetDriverFeatures {
                block_index: 0,
                features: Words::from_bytes(&fw).unwrap(),
            },
        )),
        status(S_ACK | S_DRIVER | S_FEATURES_OK),
        raw(&msg(1, Body::GetDeviceStatus)),
        raw(&msg(
            1,
            Body::GetConfig {
                offset: 0,
                length: 60,
            },
        )),
        raw(&msg(1, Body::GetVqueue { index: 0 })),
    ];
    let set_vqueue = raw(&msg(
        1,
        Body::SetVqueue(Vqueue {
            index: 0,
            max_size: 0,
            size: 16,
            desc_addr: area(0),
            driver_addr: area(0x100),
            device_addr: area(0x200),
        }),
    ));
    let driver_ok = status(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
    let kick = raw(&msg(
        1,
        Body::EventAvail {
            vq_index: 0,
            next_offset: 1,
        },
    ));

    // The rings (desc 0x0, avail 0x100, used 0x200) and one read request.
    let mut desc = table_entry(area(0x1000), 16, D_NEXT, 1);
    desc.extend(table_entry(area(0x2000), 512, D_WRITE | D_NEXT, 2));
    desc.extend(table_entry(area(0x3000), 1, D_WRITE, 0));
    let avail = B::default().u16(0).u16(1).u16(0).0; // flags, idx 1, ring[0] = head 0
    let request = [
        write(1, 0, &desc),
        write(1, 0x100, &avail),
        write(1, 0x1000, &header(T_IN, 2)),
    ];

    let mut full = vec![share(1, 16)];
    full.extend(handshake.iter().cloned());
    full.extend(request.iter().cloned());
    full.extend([
        set_vqueue.clone(),
        driver_ok.clone(),
        pause(),
        kick.clone(),
        pause(),
    ]);
    full.push(raw(&msg(1, Body::GetDeviceStatus)));
    out.write(t, "handshake-and-read", &full.concat());

    // The same handshake; then the driver revokes the area under the running
    // queue, kicks, and resets.
    let mut revoke = vec![share(1, 16)];
    revoke.extend(handshake.iter().cloned());
    revoke.extend(request.iter().cloned());
    revoke.extend([
        set_vqueue.clone(),
        driver_ok.clone(),
        unshare(1),
        kick.clone(),
        pause(),
    ]);
    revoke.push(status(0));
    out.write(t, "revoke-while-running", &revoke.concat());

    // A handshake without a queue, then a config write (refused) and a reset.
    let mut no_queue = handshake.clone();
    no_queue.push(driver_ok.clone());
    no_queue.push(raw(&msg(
        1,
        Body::SetConfig {
            generation: 0,
            offset: 32,
            data: &[1],
        },
    )));
    no_queue.push(status(0));
    out.write(t, "handshake-no-queue", &no_queue.concat());

    // Messages a device must never receive, and one for a missing device.
    let odd = [
        raw(&msg(1, Body::DeviceStatus { status: 0xF })),
        raw(&msg(1, Body::EventUsed { vq_index: 0 })),
        raw(&msg(7, Body::GetDeviceInfo)),
        raw(&msg(0, Body::Ping { data: 0x1234 })),
    ];
    out.write(t, "unexpected", &odd.concat());
}

fn decode(out: &Out) {
    let t = "decode";
    let info = DeviceInfo {
        device_id: 2,
        vendor_id: 0x5246_4e43,
        num_feature_bits: 64,
        config_size: 60,
        max_virtqueues: 1,
        admin_vq_start: 0,
        admin_vq_count: 0,
    };
    let fw = words(&[0x200, 1]);
    let seeds: [(&str, Vec<u8>); 10] = [
        ("get-device-info", msg(1, Body::GetDeviceInfo)),
        ("device-info", msg(1, Body::DeviceInfo(info))),
        (
            "set-driver-features",
            msg(
                1,
                Body::SetDriverFeatures {
                    block_index: 0,
                    features: Words::from_bytes(&fw).unwrap(),
                },
            ),
        ),
        (
            "config",
            msg(
                1,
                Body::Config {
                    generation: 1,
                    offset: 0,
                    data: &[1, 2, 3, 4, 5, 6, 7, 8],
                },
            ),
        ),
        (
            "set-vqueue",
            msg(
                1,
                Body::SetVqueue(Vqueue {
                    index: 0,
                    max_size: 0,
                    size: 256,
                    desc_addr: 1 << 48,
                    driver_addr: (1 << 48) | 0x1000,
                    device_addr: (1 << 48) | 0x2000,
                }),
            ),
        ),
        (
            "set-device-status",
            msg(1, Body::SetDeviceStatus { status: 0xF }),
        ),
        (
            "event-avail",
            msg(
                1,
                Body::EventAvail {
                    vq_index: 0,
                    next_offset: 0x8000_0001,
                },
            ),
        ),
        (
            "event-config",
            msg(
                1,
                Body::EventConfig {
                    device_status: 0x40,
                    generation: 2,
                    offset: 0,
                    data: &[],
                },
            ),
        ),
        (
            "devices",
            msg(
                0,
                Body::Devices {
                    offset: 0,
                    count: 16,
                    next_offset: 0,
                    bitmap: &[0b10, 0],
                },
            ),
        ),
        ("ping", msg(0, Body::Ping { data: 7 })),
    ];
    for (name, bytes) in seeds {
        out.write(t, name, &bytes);
    }
}

fn local_wire(out: &Out) {
    let t = "local_wire";
    let specific = |msg_id: u8, response: bool, payload: &[u8]| {
        msg(
            0,
            Body::BusSpecific {
                msg_id,
                response,
                payload,
            },
        )
    };
    // VERSION, AREA_SHARE (+ its answer), AREA_UNSHARE, DOORBELL_ATTACH:
    // payloads as documented in crates/bus-local/src/wire.rs.
    let version = B::default().u32(1).u32(264).u32(1).0;
    let share = B::default().u16(1).u16(0).u32(0).u64(1 << 20).0;
    let answer = B::default().u16(1).u16(0).u32(0).0;
    let unshare = B::default().u16(1).u16(0).0;
    let doorbell = B::default().u16(1).u16(0).u32(1).0;
    out.write(t, "version", &specific(0x80, false, &version));
    out.write(t, "version-result", &specific(0x80, true, &version));
    out.write(t, "area-share", &specific(0x81, false, &share));
    out.write(t, "area-share-result", &specific(0x81, true, &answer));
    out.write(t, "area-unshare", &specific(0x82, false, &unshare));
    out.write(t, "doorbell-attach", &specific(0xC1, false, &doorbell));
    out.write(t, "transport-message", &msg(1, Body::GetDeviceInfo));
}

mod pool {
    //! bounce_pool operations.
    use super::*;
    pub fn window(size: u16, id: u8) -> Vec<u8> {
        B::default().u16(size - 1).u8(id).0
    }
    pub fn alloc(len: u16, align: u16) -> Vec<u8> {
        B::default().u8(0).u16(len).u16(align).0
    }
    pub fn map(len: u16, device_reads: bool, fill: u8) -> Vec<u8> {
        B::default()
            .u8(1)
            .u16(len)
            .u8(device_reads.into())
            .u8(fill)
            .0
    }
    pub fn free_pick(pick: u8) -> Vec<u8> {
        vec![2, pick]
    }
    pub fn unmap_pick(pick: u8, len: u16, device_wrote: bool) -> Vec<u8> {
        B::default()
            .u8(3)
            .u8(pick)
            .u16(len)
            .u8(device_wrote.into())
            .0
    }
    pub fn free_near(pick: u8, delta: u16) -> Vec<u8> {
        B::default().u8(4).u8(pick).u16(delta).0
    }
    pub fn free_addr(addr: u64) -> Vec<u8> {
        B::default().u8(5).u64(addr).0
    }
    pub fn unmap_addr(addr: u64, len: u16, device_wrote: bool) -> Vec<u8> {
        B::default()
            .u8(6)
            .u64(addr)
            .u16(len)
            .u8(device_wrote.into())
            .0
    }
}

fn bounce_pool(out: &Out) {
    use pool::*;
    let t = "bounce_pool";
    // 16 KiB window in area 3: a page-aligned alloc, two 8 KiB maps (the
    // second cannot fit), frees of an interior and a foreign address, an
    // unmap that copies out, and the whole window once everything is freed.
    let a = [
        window(16 * 1024, 3),
        alloc(4096, 4096),
        map(8192, true, 7),
        map(8192, false, 0),
        free_near(0, 512),
        free_addr(9 << 48),
        unmap_pick(1, 8192, true),
        free_pick(0),
        free_pick(0),
        map(16 * 1024, true, 1),
    ];
    out.write(t, "alloc-map-free", &a.concat());
    // Eight one-slot maps fill a 4 KiB window; three are freed out of
    // order (one by address), then a two-slot aligned alloc finds no room.
    let mut b = vec![window(4096, 1)];
    b.extend((0..8).map(|_| map(300, true, 0x5A)));
    b.extend([
        unmap_pick(5, 300, true),
        free_pick(2),
        unmap_addr(1 << 48, 10, true),
        alloc(1024, 1024),
    ]);
    out.write(t, "small-maps", &b.concat());
    // A window that is not a whole number of slots.
    let c = [
        window(1000, 2),
        alloc(600, 0),
        map(512, true, 9),
        map(1, false, 0),
    ];
    out.write(t, "partial-slot", &c.concat());
}

mod drv {
    //! driver_replies: replies that answer the last request (tag 1).
    use super::*;
    pub fn reply(body: Body<'_>) -> Vec<u8> {
        let m = msg(0, body);
        B::default().u8(1).u16(m.len() as u16).bytes(&m).0
    }
    pub fn timeout() -> Vec<u8> {
        vec![3]
    }
    pub fn devices() -> Vec<u8> {
        reply(Body::Devices {
            offset: 0,
            count: 8,
            next_offset: 0,
            bitmap: &[0b10],
        })
    }
    pub fn info() -> Vec<u8> {
        reply(Body::DeviceInfo(DeviceInfo {
            device_id: 2,
            vendor_id: 0x5246_4e43,
            num_feature_bits: 64,
            config_size: 60,
            max_virtqueues: 1,
            admin_vq_start: 0,
            admin_vq_count: 0,
        }))
    }
    pub fn config(data: &[u8]) -> Vec<u8> {
        reply(Body::Config {
            generation: 0,
            offset: 0,
            data,
        })
    }
}

fn driver_replies(out: &Out) {
    use drv::*;
    let t = "driver_replies";
    // Method selectors: see `call` in fuzz_targets/driver_replies.rs.
    let calls = [0u8, 3, 1, 4, 2, 5, 7, 8, 9, 11, 12, 13, 14, 15];
    let fw = words(&[(F_BLK_FLUSH) as u32, 1]);
    let mut replies = vec![
        devices(),
        info(),
        reply(Body::DeviceFeatures {
            block_index: 0,
            features: Words::from_bytes(&fw).unwrap(),
        }),
        reply(Body::SetDeviceStatusResult {
            status: S_ACK | S_DRIVER,
        }),
        reply(Body::SetDriverFeaturesDone),
        reply(Body::SetDeviceStatusResult {
            status: S_FEATURES_OK,
        }),
        reply(Body::DeviceStatus {
            status: S_ACK | S_DRIVER | S_FEATURES_OK,
        }),
        reply(Body::VqueueInfo(Vqueue {
            index: 0,
            max_size: 256,
            ..Vqueue::default()
        })),
        reply(Body::SetVqueueDone),
        config(&64u64.to_le_bytes()),
        // An event in the middle of a request is recorded, not taken as the answer.
        reply(Body::EventConfig {
            device_status: 0,
            generation: 1,
            offset: 0,
            data: &[],
        }),
        config(&[0x11; 60]),
        config(&[]),
        reply(Body::EventUsed { vq_index: 0 }),
    ];
    let mut happy = B::default().u8(220).u8(calls.len() as u8).bytes(&calls).0;
    happy.extend(replies.concat());
    out.write(t, "happy-path", &happy);

    // The smallest bus (44 bytes): a 60-byte config read takes three chunks.
    let mut small = vec![0u8, 1, 9];
    small.extend(
        [
            devices(),
            info(),
            config(&[1; 24]),
            config(&[2; 24]),
            config(&[3; 12]),
        ]
        .concat(),
    );
    out.write(t, "small-bus-chunks", &small);

    // Answers for another device or request, garbage, then a timeout.
    let stray = msg(5, Body::DeviceStatus { status: 0xF });
    replies = vec![
        devices(),
        info(),
        B::default().u8(0).u16(stray.len() as u16).bytes(&stray).0,
        B::default().u8(0).u16(3).bytes(&[0xFF, 0, 1]).0,
        reply(Body::EventConfig {
            device_status: 0x40, // DEVICE_NEEDS_RESET
            generation: 9,
            offset: 0,
            data: &[],
        }),
        timeout(),
        reply(Body::DeviceStatus { status: 0x40 }),
    ];
    let mut stray_seed = vec![220u8, 3, 2, 2, 14];
    stray_seed.extend(replies.concat());
    out.write(t, "stray-answers", &stray_seed);
}

fn main() {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("corpus")
        });
    let out = Out(dir);
    decode(&out);
    local_wire(&out);
    blk_chain(&out);
    device_messages(&out);
    bounce_pool(&out);
    driver_replies(&out);
    println!("seeds written to {}", out.0.display());
}
