//! The attacks: each replaces one behaviour of the honest device.
//!
//! Reply hooks get the honest encoded answer and return what is sent instead.
//! Header attacks touch transport answers only: bus messages (GET_DEVICES)
//! carry no device and are matched by the bus layer.

use ringfence_virtio_msg::{decode, Body, DeviceInfo, Message, Vqueue, Words};

use crate::evil::{encode, is_transport, Chain, Dev, Used, DEV_NUM, NEEDS_RESET, S_OK, T_IN};

/// Data-plane attacks strike at this chain (a write of the 4 KiB phase, with
/// others in flight), once.
const STRIKE: u64 = 32;

fn strike(d: &Dev) -> bool {
    d.report.chains == STRIKE
}

fn with_u16(mut m: Vec<u8>, at: usize, v: u16) -> Vec<u8> {
    m[at..at + 2].copy_from_slice(&v.to_le_bytes());
    m
}

/// Re-encodes a transport answer after `f` rewrote its body (`None`: unchanged).
fn rewrite(
    req: &Message<'_>,
    reply: Vec<u8>,
    f: impl FnOnce(Body<'_>) -> Option<Vec<u8>>,
) -> Vec<Vec<u8>> {
    let msg = decode(&reply).expect("honest answers decode");
    match f(msg.body) {
        Some(b) if is_transport(req) => vec![b],
        _ => vec![reply],
    }
}

/// A plausible but false answer of the same kind, with `token`.
fn lie(honest: &[u8], token: u16) -> Vec<u8> {
    let m = decode(honest).expect("honest answers decode");
    let junk = [0xFF; 256];
    let body = match m.body {
        Body::DeviceInfo(i) => Body::DeviceInfo(DeviceInfo { device_id: 99, ..i }),
        Body::DeviceFeatures { block_index, .. } => Body::DeviceFeatures {
            block_index,
            features: Words::EMPTY,
        },
        Body::Config {
            generation,
            offset,
            data,
        } => Body::Config {
            generation: generation.wrapping_add(1),
            offset,
            data: &junk[..data.len()],
        },
        Body::DeviceStatus { .. } => Body::DeviceStatus {
            status: NEEDS_RESET,
        },
        Body::SetDeviceStatusResult { .. } => Body::SetDeviceStatusResult {
            status: NEEDS_RESET,
        },
        Body::VqueueInfo(q) => Body::VqueueInfo(Vqueue { max_size: 0, ..q }),
        other => other,
    };
    encode(m.dev_num, token, body)
}

pub fn wrong_token(_: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    vec![if is_transport(req) {
        with_u16(r, 4, req.token ^ 0x8000)
    } else {
        r
    }]
}

pub fn wrong_dev_num(_: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    vec![if is_transport(req) {
        with_u16(r, 2, req.dev_num.wrapping_add(1))
    } else {
        r
    }]
}

/// Relabels answers as another message with the same payload layout, so they
/// still decode: status results swap GET/SET_DEVICE_STATUS, empty ones swap
/// SET_DRIVER_FEATURES/SET_VQUEUE.
pub fn wrong_msg_id(_: &mut Dev, req: &Message<'_>, mut r: Vec<u8>) -> Vec<Vec<u8>> {
    if is_transport(req) {
        r[1] = match r[1] {
            0x07 => 0x08,
            0x08 => 0x07,
            0x04 => 0x0A,
            0x0A => 0x04,
            id => id,
        };
    }
    vec![r]
}

/// Goes silent from the first SET_DEVICE_STATUS on, without disconnecting.
pub fn never_replies(d: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    if matches!(req.body, Body::SetDeviceStatus { .. }) {
        d.counter = 1;
    }
    if d.counter == 1 {
        vec![]
    } else {
        vec![r]
    }
}

/// Before each answer, the answer to the previous request arrives again, with
/// that request's token: a reply that comes late, after the driver moved on.
/// Consecutive requests of one kind (SET_DEVICE_STATUS twice in a row, four
/// GET_CONFIGs for the capacity) make it look exactly like the awaited answer
/// except for the token.
pub fn late_reply(d: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    match &d.last_reply {
        Some(old) if is_transport(req) => vec![old.clone(), r],
        _ => vec![r],
    }
}

/// Sixteen false answers of the awaited kind, none with the request's token,
/// ahead of every true one.
pub fn unsolicited_flood(_: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    if !is_transport(req) {
        return vec![r];
    }
    let mut out: Vec<Vec<u8>> = (1..=16)
        .map(|i| lie(&r, req.token.wrapping_add(i)))
        .collect();
    out.push(r);
    out
}

/// Ahead of every answer, a false one with the right token padded to 1 KiB,
/// beyond the negotiated maximum. Its header's msg_size covers only the real
/// message, so a bus that truncates to the maximum instead of dropping hands
/// the driver a well-formed lie; it must be dropped.
pub fn oversized_lie(_: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    if !is_transport(req) {
        return vec![r];
    }
    let mut big = lie(&r, req.token);
    big.resize(1024, 0);
    vec![big, r]
}

pub fn config_shorter(_: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    rewrite(req, r, |b| match b {
        Body::Config {
            generation,
            offset,
            data,
        } if !data.is_empty() => Some(encode(
            req.dev_num,
            req.token,
            Body::Config {
                generation,
                offset,
                data: &data[..data.len() - 1],
            },
        )),
        _ => None,
    })
}

pub fn config_longer(_: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    rewrite(req, r, |b| match b {
        Body::Config {
            generation,
            offset,
            data,
        } => Some(encode(
            req.dev_num,
            req.token,
            Body::Config {
                generation,
                offset,
                data: &[data, &[0xEE; 16]].concat(),
            },
        )),
        _ => None,
    })
}

/// Every config read reports a new generation: the config never looks stable.
pub fn generation_churn(d: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    d.counter += 1;
    let generation = d.counter as u32;
    rewrite(req, r, |b| match b {
        Body::Config { offset, data, .. } => Some(encode(
            req.dev_num,
            req.token,
            Body::Config {
                generation,
                offset,
                data,
            },
        )),
        _ => None,
    })
}

/// Every SET_DEVICE_STATUS result carries DEVICE_NEEDS_RESET (the device
/// otherwise keeps working: only a driver that looks notices).
pub fn status_needs_reset(_: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    rewrite(req, r, |b| match b {
        Body::SetDeviceStatusResult { status } => Some(encode(
            req.dev_num,
            req.token,
            Body::SetDeviceStatusResult {
                status: status | NEEDS_RESET,
            },
        )),
        _ => None,
    })
}

pub fn no_devices(_: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    match req.body {
        Body::GetDevices { offset, .. } => vec![encode(
            0,
            req.token,
            Body::Devices {
                offset,
                count: 8,
                next_offset: 0,
                bitmap: &[0],
            },
        )],
        _ => vec![r],
    }
}

/// Every device number from 1 to 65535 is present, in as many pages as the
/// driver asks for.
pub fn all_devices(_: &mut Dev, req: &Message<'_>, r: Vec<u8>) -> Vec<Vec<u8>> {
    let Body::GetDevices { offset, count } = req.body else {
        return vec![r];
    };
    let count = count.min(1920);
    let mut bitmap = vec![0xFF; usize::from(count / 8)];
    if offset == 0 {
        bitmap[0] &= !1; // device number 0 does not exist
    }
    vec![encode(
        0,
        req.token,
        Body::Devices {
            offset,
            count,
            next_offset: offset.checked_add(count).unwrap_or(0),
            bitmap: &bitmap,
        },
    )]
}

pub fn used_id_out_of_range(d: &mut Dev, c: &Chain) -> Vec<Used> {
    let mut u = d.serve(c);
    if strike(d) {
        u[0].id = 0xFFFF;
    }
    u
}

/// Completes a chain under the index of its second descriptor: in range, but
/// the head of nothing in flight.
pub fn used_id_not_a_head(d: &mut Dev, c: &Chain) -> Vec<Used> {
    let mut u = d.serve(c);
    if strike(d) {
        u[0].id = u32::from(c.segs[1].index);
    }
    u
}

/// The first read reports 4 GiB written into its buffers.
pub fn used_len_oversized(d: &mut Dev, c: &Chain) -> Vec<Used> {
    let mut u = d.serve(c);
    if c.kind == T_IN && d.counter == 0 {
        d.counter = 1;
        u[0].len = u32::MAX;
    }
    u
}

pub fn used_idx_jump(d: &mut Dev, c: &Chain) -> Vec<Used> {
    if strike(d) {
        d.used_idx = d.used_idx.wrapping_add(1000);
    }
    d.serve(c)
}

pub fn used_idx_rewind(d: &mut Dev, c: &Chain) -> Vec<Used> {
    if strike(d) {
        d.used_idx = d.used_idx.wrapping_sub(8);
    }
    d.serve(c)
}

/// Two used elements for one chain, published together.
pub fn completed_twice(d: &mut Dev, c: &Chain) -> Vec<Used> {
    let mut u = d.serve(c);
    if strike(d) {
        u.push(u[0]);
    }
    u
}

pub fn status_garbage(d: &mut Dev, c: &Chain) -> Vec<Used> {
    let u = d.serve(c);
    if strike(d) {
        d.write_status(c, 0x55);
    }
    u
}

/// Overwrites every device-readable buffer (request header, write data) once
/// served: the driver must never read them back.
pub fn scribble_readable(d: &mut Dev, c: &Chain) -> Vec<Used> {
    let u = d.serve(c);
    for s in c.segs.iter().filter(|s| !s.writable) {
        d.fill(s, 0xA5);
    }
    u
}

/// Overwrites the chain's descriptors and its avail ring entry once served:
/// the driver must rely on its own copies.
pub fn scribble_rings(d: &mut Dev, c: &Chain) -> Vec<Used> {
    let u = d.serve(c);
    if let Some(q) = d.queue() {
        for s in &c.segs {
            let at = q.desc_addr + 16 * u64::from(s.index);
            let _ = d.write(at, u64::MAX);
            let _ = d.write(at + 8, u64::MAX);
        }
        let _ = d.write(q.driver_addr + 4 + 2 * u64::from(c.avail_slot), u16::MAX);
    }
    u
}

/// Reads complete with status OK and used length 1 (the status byte) without
/// a byte of data written: whatever the data buffers held is what the driver
/// gets. The check for stale data is `Dev::check_stale`, made in every case;
/// this case makes it count by running in a 1 MiB window, where the 4 KiB
/// reads reuse bounce slots that carried earlier writes. (The workload's own
/// verification cannot tell: a stale slot holding the right pattern passes.)
pub fn read_without_data(d: &mut Dev, c: &Chain) -> Vec<Used> {
    if c.kind != T_IN {
        return d.serve(c);
    }
    d.write_status(c, S_OK);
    vec![Used {
        id: u32::from(c.head),
        len: 1,
    }]
}

/// Mid-I/O, the device asks for a reset and stops serving.
pub fn needs_reset_event(d: &mut Dev, c: &Chain) -> Vec<Used> {
    if strike(d) {
        let _ = d.needs_reset();
        return vec![];
    }
    d.serve(c)
}

/// After every completion, 64 EVENT_USED for queue 0, a queue that does not
/// exist and queue u32::MAX (dropped when the socket is full).
pub fn event_used_flood(d: &mut Dev, c: &Chain) -> Vec<Used> {
    let u = d.serve(c);
    for vq_index in [0, 1, u32::MAX].into_iter().cycle().take(64) {
        d.send_or_drop(&encode(DEV_NUM, 0, Body::EventUsed { vq_index }));
    }
    u
}

pub fn disconnect(d: &mut Dev, c: &Chain) -> Vec<Used> {
    if strike(d) {
        d.hang_up = true;
        return vec![];
    }
    d.serve(c)
}
