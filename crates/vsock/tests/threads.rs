//! The rx queue on its own worker thread, as a transport runs it, while
//! the tx queue runs on the test thread: a megabyte each way under credit
//! flow control, byte-exact, and a worker that sleeps when there is
//! nothing to do.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use ringfence_vsock::*;

const TOTAL: usize = 1 << 20;
const GUEST_BUF: u32 = 64 * 1024;

#[test]
fn a_megabyte_each_way_with_the_rx_queue_on_its_own_thread() {
    let mut h = Harness::new("threads");
    let l = h.listen(52);
    let host = h.guest_connect(&l, 100, 52, GUEST_BUF);
    let worker = h.spawn_rx_worker();

    let down = pattern(TOTAL, 0x5A);
    let up = pattern(TOTAL, 0xA5);
    let mut host_w = host.try_clone().unwrap();
    let writer = {
        let down = down.clone();
        std::thread::spawn(move || host_w.write_all(&down).unwrap())
    };
    let mut host_extra = host.try_clone().unwrap();
    let mut host_r = host;
    host_r
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; TOTAL];
        host_r.read_exact(&mut got).unwrap();
        got
    });

    let mut received = Vec::with_capacity(TOTAL);
    let mut sent = 0usize;
    let mut our_fwd = 0u32; // what the guest consumed
    let mut told_fwd = 0u32;
    let mut dev_fwd = 0u32; // the device's fwd_cnt as it last said
    let mut dev_buf = 64 * 1024u32;
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.len() < TOTAL || sent < TOTAL {
        assert!(
            Instant::now() < deadline,
            "stalled: got {} sent {sent}",
            received.len()
        );
        // Guest to host within the device's credit.
        let credit = dev_buf.saturating_sub(sent as u32 - dev_fwd) as usize;
        if sent < TOTAL && credit > 0 {
            let n = credit.min(4096).min(TOTAL - sent);
            let mut hdr = h.hdr(OP_RW, 100, 52);
            hdr.buf_alloc = GUEST_BUF;
            hdr.fwd_cnt = our_fwd;
            h.send(hdr, &up[sent..sent + n]);
            told_fwd = our_fwd;
            sent += n;
        }
        let wait = if credit == 0 || sent == TOTAL { 20 } else { 0 };
        while let Ok(p) = worker.packets.recv_timeout(Duration::from_millis(wait)) {
            assert_eq!((p.hdr.src_port, p.hdr.dst_port), (52, 100));
            dev_fwd = p.hdr.fwd_cnt;
            dev_buf = p.hdr.buf_alloc;
            match p.hdr.op {
                OP_RW => {
                    received.extend_from_slice(&p.data);
                    our_fwd = our_fwd.wrapping_add(p.data.len() as u32);
                    assert!(received.len() <= TOTAL);
                }
                OP_CREDIT_UPDATE => {}
                other => panic!("unexpected op {other}"),
            }
        }
        // The guest frees its buffer and says so every 16 KiB.
        if our_fwd.wrapping_sub(told_fwd) >= 16 * 1024 {
            let mut upd = h.hdr(OP_CREDIT_UPDATE, 100, 52);
            upd.buf_alloc = GUEST_BUF;
            upd.fwd_cnt = our_fwd;
            h.send(upd, &[]);
            told_fwd = our_fwd;
        }
    }
    writer.join().unwrap();
    assert!(received == down, "host to guest bytes differ");
    assert!(reader.join().unwrap() == up, "guest to host bytes differ");
    assert_eq!(h.stat(|s| &s.credit_violations), 0);
    assert_eq!(h.stat(|s| &s.rx_bytes), TOTAL as u64);
    assert_eq!(h.stat(|s| &s.tx_bytes), TOTAL as u64);

    // More host data than the guest's credit, which it does not renew:
    // the device sends what the credit allows and stops.
    let credit = GUEST_BUF - (received.len() as u32 - told_fwd);
    host_extra
        .write_all(&pattern(GUEST_BUF as usize * 2, 1))
        .unwrap();
    let mut extra = 0usize;
    while let Ok(p) = worker.packets.recv_timeout(Duration::from_millis(100)) {
        assert_eq!(p.hdr.op, OP_RW);
        extra += p.data.len();
    }
    assert_eq!(extra, credit as usize);

    // Idle with a readable socket and no credit: the worker sleeps in poll
    // (50 ms rounds), it does not spin.
    let before = worker.idle_rounds.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(300));
    let idle = worker.idle_rounds.load(Ordering::Relaxed) - before;
    assert!(idle <= 12, "{idle} idle rounds in 300 ms");
    drop(worker);
}
