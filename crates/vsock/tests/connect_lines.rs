//! Host clients that do not send a proper `CONNECT <port>\n`: each is
//! closed and counted, none reaches the guest.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::*;
use ringfence_vsock::*;

/// Drives the device until the client sees EOF.
fn until_closed(h: &mut Harness, c: &mut UnixStream) {
    c.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 64];
    loop {
        let got = h.rx();
        assert!(got.is_empty(), "nothing may reach the guest: {got:?}");
        match std::io::Read::read(c, &mut buf) {
            Ok(0) => return,
            Ok(n) => panic!("client got {:?}", &buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("client read: {e}"),
        }
        assert!(Instant::now() < deadline, "client was not closed");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn malformed_lines_close_the_client() {
    let mut h = Harness::new("badline");
    let lines: [&[u8]; 5] = [
        b"HELLO 5\n",
        b"CONNECT\n",
        b"CONNECT 99999999999\n",
        b"CONNECT 5 6\n",
        b"CONNECT -1\n",
    ];
    for (i, line) in lines.iter().enumerate() {
        let mut c = h.client();
        c.write_all(line).unwrap();
        until_closed(&mut h, &mut c);
        assert_eq!(h.stat(|s| &s.connect_line_errors), i as u64 + 1);
    }
    assert_eq!(h.dev.connections(), 0);
    assert_eq!(h.stat(|s| &s.rx_packets), 0);
}

#[test]
fn a_line_longer_than_the_bound_closes_the_client() {
    let mut h = Harness::new("longline");
    let mut c = h.client();
    // 64 bytes and no newline: the bound is reached without a line.
    c.write_all(&[b'7'; CONNECT_LINE_MAX]).unwrap();
    until_closed(&mut h, &mut c);
    assert_eq!(h.stat(|s| &s.connect_line_errors), 1);

    // A line that fits, sent in pieces, is fine.
    let mut c = h.client();
    c.write_all(b"CONN").unwrap();
    h.expect_nothing();
    c.write_all(b"ECT    ").unwrap();
    h.expect_nothing();
    c.write_all(b"42\n").unwrap();
    let req = h.expect_op(OP_REQUEST);
    assert_eq!(req.hdr.dst_port, 42);
    assert_eq!(h.stat(|s| &s.connect_line_errors), 1);
}

#[test]
fn a_client_that_closes_without_a_line_is_counted() {
    let mut h = Harness::new("noline");
    let c = h.client();
    drop(c);
    let deadline = Instant::now() + Duration::from_secs(2);
    while h.stat(|s| &s.connect_line_errors) == 0 {
        assert!(h.rx().is_empty());
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(h.stat(|s| &s.connect_line_errors), 1);
}

#[test]
fn a_line_that_does_not_come_in_time_closes_the_client() {
    let mut h = Harness::with("lateline", |o| o, Duration::from_millis(100));
    let mut c = h.client();
    c.write_all(b"CONNECT 4").unwrap();
    let start = Instant::now();
    // Nothing else happens on the device: the timer thread's tick wakes
    // the rx handler, visible on its wake descriptor.
    let deadline = Instant::now() + Duration::from_secs(2);
    h.expect_nothing();
    while !h.wake_readable() {
        assert!(Instant::now() < deadline, "no wake-up for the deadline");
        std::thread::sleep(Duration::from_millis(5));
    }
    until_closed(&mut h, &mut c);
    assert!(start.elapsed() >= Duration::from_millis(90));
    assert_eq!(h.stat(|s| &s.connect_line_errors), 1);
    // Once nothing is pending, the device is quiet again.
    std::thread::sleep(Duration::from_millis(100));
    assert!(!h.rx.ready());
    std::thread::sleep(Duration::from_millis(60));
    assert!(
        !h.wake_readable(),
        "no ticking while no deadline is pending"
    );
}

#[test]
fn too_many_silent_clients_are_refused() {
    let mut h = Harness::new("flood");
    let mut clients: Vec<UnixStream> = (0..MAX_PENDING_CLIENTS).map(|_| h.client()).collect();
    h.expect_nothing();
    assert_eq!(h.stat(|s| &s.refused), 0);
    let mut extra = h.client();
    until_closed(&mut h, &mut extra);
    assert_eq!(h.stat(|s| &s.refused), 1);
    // The waiting ones still work.
    clients[0].write_all(b"CONNECT 9\n").unwrap();
    let req = h.expect_op(OP_REQUEST);
    assert_eq!(req.hdr.dst_port, 9);
}
