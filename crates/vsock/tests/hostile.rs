//! A hostile guest: malformed packets and buffers, protocol violations,
//! credit overruns, and a host side that does not read. Each case states
//! the exact outcome: what was answered, what was counted, what is held.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;
use ringfence_vsock::*;

#[test]
fn len_not_matching_the_payload_is_dropped() {
    let mut h = Harness::new("badlen");
    let l = h.listen(52);
    let mut req = h.hdr(OP_REQUEST, 1, 52);
    req.len = 10; // no payload at all
    h.send_raw(req, &[]);
    let mut rw = h.hdr(OP_REQUEST, 1, 52);
    rw.len = 3;
    h.send_raw(rw, b"12345");
    h.expect_nothing();
    l.set_nonblocking(true).unwrap();
    assert!(l.accept().is_err(), "no connect may happen");
    assert_eq!(h.stat(|s| &s.dropped_malformed), 2);
    assert_eq!(h.stat(|s| &s.tx_packets), 0);
}

#[test]
fn wrong_cids_are_dropped() {
    let mut h = Harness::new("cid");
    let _l = h.listen(52);
    let mut a = h.hdr(OP_REQUEST, 1, 52);
    a.src_cid = 4; // not the guest
    let mut b = h.hdr(OP_REQUEST, 1, 52);
    b.dst_cid = 5; // not the host
    let mut c = h.hdr(OP_RW, 1, 52);
    c.src_cid = GUEST_CID | 1 << 32; // upper bits
    for p in [a, b, c] {
        h.send(p, &[]);
    }
    h.expect_nothing();
    assert_eq!(h.stat(|s| &s.dropped_malformed), 3);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn unknown_op_and_type_are_reset() {
    let mut h = Harness::new("op");
    let l = h.listen(52);
    let _host = h.guest_connect(&l, 1, 52, 4096);
    // An unknown op on a live connection resets it.
    h.send(h.hdr(99, 1, 52), &[]);
    let rst = h.expect_op(OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (52, 1));
    assert_eq!(h.dev.connections(), 0);
    // Op 0 and a seqpacket type, no connection: RST too.
    h.send(h.hdr(0, 2, 52), &[]);
    assert_eq!(h.expect_op(OP_RST).hdr.dst_port, 2);
    let mut seq = h.hdr(OP_REQUEST, 3, 52);
    seq.type_ = 2;
    h.send(seq, &[]);
    assert_eq!(h.expect_op(OP_RST).hdr.dst_port, 3);
    // ...but an RST is never answered, whatever its type.
    let mut rst_seq = h.hdr(OP_RST, 4, 52);
    rst_seq.type_ = 2;
    h.send(rst_seq, &[]);
    h.expect_nothing();
    assert_eq!(h.stat(|s| &s.rst_sent), 3);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn packets_for_unknown_connections_are_reset_except_rst() {
    let mut h = Harness::new("unknown");
    for op in [
        OP_RW,
        OP_RESPONSE,
        OP_SHUTDOWN,
        OP_CREDIT_UPDATE,
        OP_CREDIT_REQUEST,
    ] {
        h.send(h.hdr(op, 11, 52), b"");
        let rst = h.expect_op(OP_RST);
        assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (52, 11));
        assert_eq!((rst.hdr.buf_alloc, rst.hdr.fwd_cnt), (0, 0));
    }
    h.send(h.hdr(OP_RST, 11, 52), &[]);
    h.expect_nothing();
    assert_eq!(h.stat(|s| &s.rst_sent), 5);
    assert_eq!(h.stat(|s| &s.dropped_malformed), 0);
}

#[test]
fn protocol_violations_on_a_live_connection_reset_it() {
    let mut h = Harness::new("proto");
    let l = h.listen(52);
    // A second REQUEST for a live connection.
    let mut host = h.guest_connect(&l, 1, 52, 4096);
    h.send(h.hdr(OP_REQUEST, 1, 52), &[]);
    assert_eq!(h.expect_op(OP_RST).hdr.dst_port, 1);
    assert_eq!(read_to_eof(&mut host), b"");
    // A RESPONSE on an established connection.
    let mut host = h.guest_connect(&l, 2, 52, 4096);
    h.send(h.hdr(OP_RESPONSE, 2, 52), &[]);
    assert_eq!(h.expect_op(OP_RST).hdr.dst_port, 2);
    assert_eq!(read_to_eof(&mut host), b"");
    // Data after the guest's own SHUTDOWN(SEND).
    let mut host = h.guest_connect(&l, 3, 52, 4096);
    let mut shut = h.hdr(OP_SHUTDOWN, 3, 52);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    h.send(h.hdr(OP_RW, 3, 52), b"x");
    assert_eq!(h.expect_op(OP_RST).hdr.dst_port, 3);
    assert_eq!(read_to_eof(&mut host), b"");
    // Data for a host connect the guest has not accepted.
    let mut c = h.client();
    std::io::Write::write_all(&mut c, b"CONNECT 4\n").unwrap();
    let req = h.expect_op(OP_REQUEST);
    h.send(h.hdr(OP_RW, 4, req.hdr.src_port), b"x");
    assert_eq!(h.expect_op(OP_RST).hdr.dst_port, 4);
    assert_eq!(read_to_eof(&mut c), b"");

    assert_eq!(h.stat(|s| &s.dropped_malformed), 4);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn bad_tx_chains_are_dropped() {
    let mut h = Harness::new("txchain");
    let _l = h.listen(52);
    let hdr = h.hdr(OP_REQUEST, 1, 52);
    h.mem_write(TX_BUF, &hdr.to_bytes());
    // A device-writable descriptor in a tx chain.
    h.send_descs(&[(TX_BUF, HDR_LEN as u32, F_WRITE)]);
    h.send_descs(&[(TX_BUF, HDR_LEN as u32, 0), (TX_PAYLOAD, 8, F_WRITE)]);
    // Shorter than a header.
    h.send_descs(&[(TX_BUF, HDR_LEN as u32 - 1, 0)]);
    // Outside shared memory.
    h.send_descs(&[(0x1000, HDR_LEN as u32, 0)]);
    // A payload above 64 KiB, with a header that says so.
    let mut big = h.hdr(OP_RW, 1, 52);
    big.len = MAX_PAYLOAD + 1;
    h.mem_write(TX_BUF, &big.to_bytes());
    h.send_descs(&[
        (TX_BUF, HDR_LEN as u32, 0),
        (TX_PAYLOAD, MAX_PAYLOAD + 1, 0),
    ]);
    // A header split over two descriptors is fine.
    h.mem_write(TX_BUF, &hdr.to_bytes());
    h.mem_write(TX_PAYLOAD, &hdr.to_bytes()[20..]);
    h.send_descs(&[(TX_BUF, 20, 0), (TX_PAYLOAD, HDR_LEN as u32 - 20, 0)]);
    assert_eq!(h.expect_op(OP_RESPONSE).hdr.dst_port, 1);
    assert_eq!(h.stat(|s| &s.dropped_malformed), 5);
    assert_eq!(h.stat(|s| &s.tx_packets), 1);
}

#[test]
fn an_rx_buffer_that_cannot_take_a_header_keeps_the_packet_for_the_next() {
    let mut h = Harness::new("rxsmall");
    h.send(h.hdr(OP_RW, 1, 52), b"x"); // provokes an RST
                                       // Too small, then device-readable, then outside memory, then a good one.
    h.post_rx_raw(&[(AREA + 0x70_0000, HDR_LEN as u32 - 1, F_WRITE)]);
    let (_, got) = h.run_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].used, 0);
    h.post_rx_raw(&[(AREA + 0x70_0000, 4096, 0)]);
    let (_, got) = h.run_rx();
    assert_eq!((got.len(), got[0].used), (1, 0));
    h.post_rx_raw(&[(0x1000, 4096, F_WRITE)]);
    let (_, got) = h.run_rx();
    assert_eq!((got.len(), got[0].used), (1, 0));
    assert_eq!(h.stat(|s| &s.dropped_malformed), 3);
    assert_eq!(h.stat(|s| &s.rx_packets), 0);
    let rst = h.expect_op(OP_RST);
    assert_eq!(rst.used, HDR_LEN as u32);
    assert_eq!(rst.hdr.dst_port, 1);
    assert_eq!(h.stat(|s| &s.rst_sent), 1);
}

#[test]
fn rst_answers_are_bounded_when_the_guest_posts_no_buffers() {
    let mut h = Harness::new("rstflood");
    for port in 0..(MAX_QUEUED_RST as u32 + 10) {
        h.send(h.hdr(OP_RW, port, 52), b"");
    }
    assert_eq!(h.stat(|s| &s.rst_dropped), 10);
    let all = h.rx_until(|ps| ps.len() >= MAX_QUEUED_RST);
    assert!(all.iter().all(|p| p.hdr.op == OP_RST));
    h.expect_nothing();
    assert_eq!(h.stat(|s| &s.rst_sent), MAX_QUEUED_RST as u64);
}

/// The guest keeps to our credit while the host side does not read: the
/// device holds at most `buf_alloc`, stops granting credit, and a guest
/// that sends anyway is reset. Nothing it accepted is lost or reordered.
#[test]
fn a_host_that_does_not_read_bounds_what_the_device_holds() {
    const BUF: u32 = 16 * 1024;
    let mut h = Harness::with(
        "noread",
        |o| VsockOptions {
            buf_alloc: BUF,
            ..o
        },
        Duration::from_secs(5),
    );
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 1, 52, 65536);

    let mut sent: Vec<u8> = Vec::new();
    let mut fwd_adv = 0u32; // our fwd_cnt as the device last said
    let mut stalled = 0;
    while stalled < 3 {
        let credit = BUF - (sent.len() as u32 - fwd_adv);
        if credit > 0 {
            let chunk = pattern(credit.min(4096) as usize, sent.len() as u8);
            h.send(h.hdr(OP_RW, 1, 52), &chunk);
            sent.extend_from_slice(&chunk);
            stalled = 0;
        } else {
            stalled += 1;
        }
        for p in h.rx() {
            assert_eq!(p.hdr.op, OP_CREDIT_UPDATE);
            assert!(p.hdr.fwd_cnt >= fwd_adv);
            fwd_adv = p.hdr.fwd_cnt;
        }
        assert!(h.dev.buffered_bytes() <= BUF as usize);
        assert!(sent.len() < 64 << 20, "the host socket never filled");
    }
    // The kernel's socket buffer is full and the device holds the rest.
    let held = h.dev.buffered_bytes();
    assert!(held > 0 && held <= BUF as usize, "held {held}");
    assert_eq!(h.stat(|s| &s.credit_violations), 0);

    // Beyond the credit: reset, counted, memory freed.
    h.send(h.hdr(OP_RW, 1, 52), &pattern(BUF as usize, 0xEE));
    let rst = h.expect_op(OP_RST);
    assert_eq!(rst.hdr.dst_port, 1);
    assert_eq!(h.stat(|s| &s.credit_violations), 1);
    assert_eq!(h.dev.connections(), 0);
    assert_eq!(h.dev.buffered_bytes(), 0);

    // What reached the host is exactly the start of what was sent.
    let mut got = Vec::new();
    host.read_to_end(&mut got).unwrap();
    assert!(got.len() >= fwd_adv as usize);
    assert_eq!(got.len(), sent.len() - held);
    assert_eq!(got, sent[..got.len()]);
}

#[test]
fn a_host_that_reads_late_gets_everything_and_credit_returns() {
    const BUF: u32 = 16 * 1024;
    let mut h = Harness::with(
        "late",
        |o| VsockOptions {
            buf_alloc: BUF,
            ..o
        },
        Duration::from_secs(5),
    );
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 1, 52, 65536);
    let mut sent: Vec<u8> = Vec::new();
    let mut fwd_adv = 0u32;
    // Fill until the device holds something.
    while h.dev.buffered_bytes() == 0 {
        let credit = BUF - (sent.len() as u32 - fwd_adv);
        assert!(credit > 0, "stalled before anything was held");
        let chunk = pattern(credit.min(4096) as usize, sent.len() as u8);
        h.send(h.hdr(OP_RW, 1, 52), &chunk);
        sent.extend_from_slice(&chunk);
        for p in h.rx() {
            fwd_adv = p.hdr.fwd_cnt;
        }
    }
    // The host reads everything; the device flushes on EPOLLOUT.
    let mut got = vec![0u8; sent.len()];
    let reader = std::thread::spawn(move || {
        host.read_exact(&mut got).unwrap();
        got
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while h.dev.buffered_bytes() > 0 {
        for p in h.rx() {
            assert_eq!(p.hdr.op, OP_CREDIT_UPDATE);
        }
        assert!(std::time::Instant::now() < deadline, "never flushed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(reader.join().unwrap(), sent);
    h.send(h.hdr(OP_CREDIT_REQUEST, 1, 52), &[]);
    let upd = h.expect_op(OP_CREDIT_UPDATE);
    assert_eq!(
        (upd.hdr.buf_alloc, upd.hdr.fwd_cnt),
        (BUF, sent.len() as u32)
    );
    assert_eq!(h.stat(|s| &s.credit_violations), 0);
}

#[test]
fn connect_and_reset_cycles_without_rx_buffers_do_not_grow_the_queue() {
    let mut h = Harness::with(
        "cycles",
        |o| VsockOptions {
            max_connections: 4,
            ..o
        },
        Duration::from_secs(5),
    );
    let l = h.listen(52);
    l.set_nonblocking(true).unwrap();
    for _ in 0..2000 {
        // Same key every time: each REQUEST queues a RESPONSE, each RST
        // closes the connection it belonged to.
        h.send(h.hdr(OP_REQUEST, 1, 52), &[]);
        h.send(h.hdr(OP_RST, 1, 52), &[]);
        while l.accept().is_ok() {}
    }
    assert_eq!(h.stat(|s| &s.connections_guest), 2000);
    assert!(
        h.dev.queued_control() <= 2 * 4 + MAX_QUEUED_RST + 1,
        "{}",
        h.dev.queued_control()
    );
    // Closed connections' RESPONSEs are never sent, not even to a new
    // connection under the same key: it gets exactly one.
    h.send(h.hdr(OP_REQUEST, 1, 52), &[]);
    let all = h.rx_until(|ps| !ps.is_empty());
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].hdr.op, OP_RESPONSE);
    h.expect_nothing();
    assert_eq!(h.stat(|s| &s.rx_packets), 1);
}
