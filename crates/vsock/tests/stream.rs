//! Connections both ways over real Unix sockets: set-up, data byte-exact
//! in both directions, credit, shutdown and reset.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use ringfence_vsock::*;

#[test]
fn guest_connect_reaches_the_port_socket_and_carries_data_both_ways() {
    let mut h = Harness::new("gconn");
    let l = h.listen(52);
    let mut req = h.hdr(OP_REQUEST, 40000, 52);
    req.buf_alloc = 1 << 20;
    h.send(req, &[]);
    let resp = h.expect_op(OP_RESPONSE);
    assert_eq!(
        resp.hdr,
        Header {
            src_cid: HOST_CID,
            dst_cid: GUEST_CID,
            src_port: 52,
            dst_port: 40000,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RESPONSE,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    );
    let (mut host, _) = l.accept().unwrap();
    host.set_read_timeout(Some(Duration::from_secs(3))).unwrap();

    // Guest to host.
    let up = pattern(3000, 0x11);
    h.send(h.hdr(OP_RW, 40000, 52), &up);
    let mut got = vec![0u8; up.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, up);

    // Host to guest: 100 000 bytes in 4 KiB packets, all within credit.
    let down = pattern(100_000, 0x22);
    host.write_all(&down).unwrap();
    let all = h.rx_until(|ps| ps.iter().map(|p| p.data.len()).sum::<usize>() >= down.len());
    let mut data = Vec::new();
    for p in &all {
        assert_eq!(p.hdr.op, OP_RW);
        assert_eq!((p.hdr.src_port, p.hdr.dst_port), (52, 40000));
        assert!(p.data.len() <= 4096, "a packet fits the 4 KiB buffer");
        // Every packet advertises our credit: 3000 bytes forwarded.
        assert_eq!((p.hdr.buf_alloc, p.hdr.fwd_cnt), (64 * 1024, 3000));
        data.extend_from_slice(&p.data);
    }
    assert_eq!(data, down);
    assert_eq!(h.stat(|s| &s.connections_guest), 1);
    assert_eq!(h.stat(|s| &s.tx_bytes), 3000);
    assert_eq!(h.stat(|s| &s.rx_bytes), 100_000);
    assert_eq!(h.stat(|s| &s.rx_packets), 1 + all.len() as u64);
    assert_eq!(h.stat(|s| &s.tx_packets), 2);
    assert_eq!(h.dev.connections(), 1);
}

#[test]
fn guest_connect_without_listener_is_reset() {
    let mut h = Harness::new("nolisten");
    h.send(h.hdr(OP_REQUEST, 1234, 53), &[]);
    let rst = h.expect_op(OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (53, 1234));
    assert_eq!((rst.hdr.src_cid, rst.hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(h.stat(|s| &s.refused), 1);
    assert_eq!(h.stat(|s| &s.rst_sent), 1);
    assert_eq!(h.stat(|s| &s.connections_guest), 0);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn guest_connects_beyond_the_limit_are_reset() {
    let mut h = Harness::with(
        "limit",
        |o| VsockOptions {
            max_connections: 2,
            ..o
        },
        Duration::from_secs(5),
    );
    let l = h.listen(52);
    let _a = h.guest_connect(&l, 1, 52, 4096);
    let _b = h.guest_connect(&l, 2, 52, 4096);
    h.send(h.hdr(OP_REQUEST, 3, 52), &[]);
    let rst = h.expect_op(OP_RST);
    assert_eq!(rst.hdr.dst_port, 3);
    assert_eq!(h.stat(|s| &s.refused), 1);
    assert_eq!(h.dev.connections(), 2);
}

#[test]
fn host_data_stops_at_the_guest_credit_and_resumes_on_credit_update() {
    let mut h = Harness::new("credit");
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 7, 52, 1000);
    let down = pattern(5000, 0x33);
    host.write_all(&down).unwrap();

    let first = h.rx_data(1000);
    assert_eq!(first, down[..1000]);
    // No credit: nothing more, and nothing left that would wake the worker.
    h.expect_nothing();
    assert!(!h.rx.ready());
    assert!(
        !h.wake_readable(),
        "a socket without credit must not wake the worker"
    );

    // A guest that claims to have consumed more than it got gets nothing.
    let mut bogus = h.hdr(OP_CREDIT_UPDATE, 7, 52);
    bogus.buf_alloc = 1000;
    bogus.fwd_cnt = 5000;
    h.send(bogus, &[]);
    h.expect_nothing();

    let mut upd = h.hdr(OP_CREDIT_UPDATE, 7, 52);
    upd.buf_alloc = 1000;
    upd.fwd_cnt = 1000;
    h.send(upd, &[]);
    let second = h.rx_data(1000);
    assert_eq!(second, down[1000..2000]);
    h.expect_nothing();

    // The host closes while the guest has no credit: the hang-up must not
    // wake the worker either, and the data and EOF wait for credit.
    drop(host);
    std::thread::sleep(Duration::from_millis(10));
    h.expect_nothing();
    assert!(
        !h.wake_readable(),
        "a hung-up socket without credit must not wake the worker"
    );

    let mut upd = h.hdr(OP_CREDIT_UPDATE, 7, 52);
    upd.buf_alloc = 1 << 20;
    upd.fwd_cnt = 2000;
    h.send(upd, &[]);
    let all = h.rx_until(|ps| ps.iter().any(|p| p.hdr.op == OP_SHUTDOWN));
    let (shut, data) = all.split_last().unwrap();
    assert!(data.iter().all(|p| p.hdr.op == OP_RW));
    let rest: Vec<u8> = data.iter().flat_map(|p| p.data.clone()).collect();
    assert_eq!(rest, down[2000..]);
    assert_eq!(h.stat(|s| &s.rx_bytes), 5000);
    assert_eq!((shut.hdr.op, shut.hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
}

#[test]
fn credit_update_on_request_and_after_half_the_buffer_is_freed() {
    let mut h = Harness::with(
        "credupd",
        |o| VsockOptions {
            buf_alloc: 8192,
            ..o
        },
        Duration::from_secs(5),
    );
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 9, 52, 65536);

    h.send(h.hdr(OP_CREDIT_REQUEST, 9, 52), &[]);
    let upd = h.expect_op(OP_CREDIT_UPDATE);
    assert_eq!((upd.hdr.buf_alloc, upd.hdr.fwd_cnt), (8192, 0));

    // 4000 bytes forwarded: less than half of 8192, no update yet.
    h.send(h.hdr(OP_RW, 9, 52), &pattern(4000, 1));
    h.expect_nothing();
    // 4100 more: 8100 freed since we last said 0.
    h.send(h.hdr(OP_RW, 9, 52), &pattern(4100, 2));
    let upd = h.expect_op(OP_CREDIT_UPDATE);
    assert_eq!((upd.hdr.buf_alloc, upd.hdr.fwd_cnt), (8192, 8100));
    h.expect_nothing();
    let mut got = vec![0u8; 8100];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got[..4000], pattern(4000, 1)[..]);
    assert_eq!(got[4000..], pattern(4100, 2)[..]);
}

#[test]
fn host_connect_gets_ok_and_carries_data_sent_after_the_line() {
    let mut h = Harness::new("hconn");
    let mut c = h.client();
    // The bytes after the newline are stream data, not part of the line.
    c.write_all(b"CONNECT 1234\nearly bytes").unwrap();
    let req = h.expect_op(OP_REQUEST);
    assert_eq!(
        (
            req.hdr.src_cid,
            req.hdr.dst_cid,
            req.hdr.dst_port,
            req.hdr.type_
        ),
        (HOST_CID, GUEST_CID, 1234, TYPE_STREAM)
    );
    let local = req.hdr.src_port;
    assert!(local >= FIRST_LOCAL_PORT);
    assert_eq!((req.hdr.buf_alloc, req.hdr.fwd_cnt), (64 * 1024, 0));
    // Until the guest answers, the client's data stays in its socket.
    h.expect_nothing();

    let mut resp = h.hdr(OP_RESPONSE, 1234, local);
    resp.buf_alloc = 4096;
    h.send(resp, &[]);
    assert_eq!(read_line(&mut c), format!("OK {local}\n"));
    assert_eq!(h.rx_data(11), b"early bytes");

    h.send(h.hdr(OP_RW, 1234, local), b"pong");
    let mut got = [0u8; 4];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"pong");
    assert_eq!(h.stat(|s| &s.connections_host), 1);
    assert_eq!(h.stat(|s| &s.connect_line_errors), 0);
}

#[test]
fn host_connects_get_distinct_local_ports() {
    let mut h = Harness::new("ports");
    let (_a, pa) = h.host_connect(80);
    let (_b, pb) = h.host_connect(80);
    let (_c, pc) = h.host_connect(81);
    assert!(pa != pb && pb != pc && pa != pc, "{pa} {pb} {pc}");
    assert_eq!(h.dev.connections(), 3);
}

#[test]
fn host_connect_reset_by_the_guest_closes_the_client() {
    let mut h = Harness::new("hrst");
    let mut c = h.client();
    c.write_all(b"CONNECT 77\n").unwrap();
    let req = h.expect_op(OP_REQUEST);
    h.send(h.hdr(OP_RST, 77, req.hdr.src_port), &[]);
    // Nothing comes back for an RST.
    h.expect_nothing();
    assert_eq!(read_to_eof(&mut c), b"");
    assert_eq!(h.stat(|s| &s.refused), 1);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn host_connect_the_guest_never_answers_times_out() {
    let mut h = Harness::with("hlate", |o| o, Duration::from_millis(100));
    let mut c = h.client();
    c.write_all(b"CONNECT 78\n").unwrap();
    let req = h.expect_op(OP_REQUEST);
    let rst = h.expect_op(OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (req.hdr.src_port, 78));
    assert_eq!(read_to_eof(&mut c), b"");
    assert_eq!(h.stat(|s| &s.refused), 1);
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn host_eof_is_a_shutdown_and_guest_close_gets_its_rst() {
    let mut h = Harness::new("eof");
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 5, 52, 65536);
    host.write_all(b"last words").unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let all = h.rx_until(|ps| ps.iter().any(|p| p.hdr.op == OP_SHUTDOWN));
    let data: Vec<u8> = all.iter().flat_map(|p| p.data.clone()).collect();
    assert_eq!(data, b"last words");
    let shut = all.last().unwrap();
    assert_eq!((shut.hdr.op, shut.hdr.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
    h.expect_nothing();

    // Half-closed: the guest can still send.
    h.send(h.hdr(OP_RW, 5, 52), b"reply");
    let mut got = [0u8; 5];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"reply");

    let mut shut = h.hdr(OP_SHUTDOWN, 5, 52);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(shut, &[]);
    let rst = h.expect_op(OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (52, 5));
    assert_eq!(read_to_eof(&mut host), b"");
    assert_eq!(h.dev.connections(), 0);
}

#[test]
fn guest_close_with_data_still_buffered_writes_it_all_out_before_the_rst() {
    // The clean close of a guest done both ways while the host reader
    // lags: what the device holds for the host socket still goes out,
    // then the host sees EOF and the guest its RST. (The vsock endpoint
    // closes this way rather than with an RST, which drops that data.)
    let mut h = Harness::with(
        "gclose",
        |o| VsockOptions {
            buf_alloc: 1 << 20,
            ..o
        },
        Duration::from_secs(5),
    );
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 12, 52, 65536);
    // More than the host socket's kernel buffer takes: the rest waits in
    // the device.
    let up = pattern(512 * 1024, 0x44);
    for chunk in up.chunks(MAX_PAYLOAD as usize) {
        h.send(h.hdr(OP_RW, 12, 52), chunk);
    }
    assert!(h.dev.buffered_bytes() > 0, "the host socket took it all");
    let mut shut = h.hdr(OP_SHUTDOWN, 12, 52);
    shut.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    h.send(shut, &[]);
    // No RST while data waits for the host.
    h.expect_nothing();
    assert_eq!(h.dev.connections(), 1);
    let reader = std::thread::spawn(move || read_to_eof(&mut host));
    let rst = h.expect_op(OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (52, 12));
    let got = reader.join().unwrap();
    assert_eq!(got.len(), up.len());
    assert!(got == up, "bytes differ");
    assert_eq!(h.dev.connections(), 0);
    assert_eq!(h.dev.buffered_bytes(), 0);
}

#[test]
fn guest_shutdown_send_half_closes_the_host_socket() {
    let mut h = Harness::new("gshut");
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 6, 52, 65536);
    h.send(h.hdr(OP_RW, 6, 52), b"bye");
    let mut shut = h.hdr(OP_SHUTDOWN, 6, 52);
    shut.flags = SHUTDOWN_SEND;
    h.send(shut, &[]);
    assert_eq!(read_to_eof(&mut host), b"bye");
    // The other direction still works.
    host.write_all(b"still here").unwrap();
    assert_eq!(h.rx_data(10), b"still here");
    assert_eq!(h.dev.connections(), 1);
}

#[test]
fn guest_rst_closes_the_host_socket() {
    let mut h = Harness::new("grst");
    let l = h.listen(52);
    let mut host = h.guest_connect(&l, 8, 52, 65536);
    h.send(h.hdr(OP_RST, 8, 52), &[]);
    h.expect_nothing();
    assert_eq!(read_to_eof(&mut host), b"");
    assert_eq!(h.dev.connections(), 0);
    // The connection is gone: data for it is answered with RST.
    h.send(h.hdr(OP_RW, 8, 52), b"late");
    let rst = h.expect_op(OP_RST);
    assert_eq!((rst.hdr.src_port, rst.hdr.dst_port), (52, 8));
}

#[test]
fn host_close_with_the_guest_closed_too_resets_cleanly() {
    let mut h = Harness::new("hclose");
    let l = h.listen(52);
    let host = h.guest_connect(&l, 10, 52, 65536);
    drop(host);
    let shut = h.expect_op(OP_SHUTDOWN);
    assert_eq!(shut.hdr.flags, SHUTDOWN_SEND);
    // The guest writes into the closed socket: the host side is gone.
    h.send(h.hdr(OP_RW, 10, 52), b"anyone?");
    let rst = h.expect_op(OP_RST);
    assert_eq!(rst.hdr.dst_port, 10);
    assert_eq!(h.dev.connections(), 0);
    assert!(!h.rx.ready());
    assert!(!h.wake_readable());
}
