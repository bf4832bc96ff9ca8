//! The NBD server against a hand-written client speaking raw protocol:
//! negotiation, hostile options and requests, byte-granular I/O over a disk
//! that only accepts 512-aligned access, and the exact counters.

mod common;

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use common::*;
use ringfence_nbd::{ConnEnd, NbdConfig, NbdError, NbdServer};

const MIB: usize = 1 << 20;

fn server() -> Arc<NbdServer> {
    Arc::new(NbdServer::default())
}

fn server_with(cfg: NbdConfig) -> Arc<NbdServer> {
    Arc::new(NbdServer::new(cfg).unwrap())
}

fn patterned(size: usize) -> MemDisk {
    let mut d = MemDisk::new(size);
    for (i, b) in d.data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    d
}

#[test]
fn negotiation_options() {
    let srv = server();
    let (mut c, h) = start(srv.clone(), MemDisk::new(MIB), "disk0");
    c.hello(3);

    // LIST: the configured name, then ACK.
    c.option(OPT_LIST, &[]);
    let (k, d) = c.opt_reply(OPT_LIST);
    assert_eq!(k, REP_SERVER);
    assert_eq!(d, b"\0\0\0\x05disk0");
    assert_eq!(c.opt_reply(OPT_LIST).0, REP_ACK);
    // LIST with data is malformed.
    c.option(OPT_LIST, b"x");
    assert_eq!(c.opt_reply(OPT_LIST).0, REP_ERR_INVALID);

    // INFO on the configured name: export info, block sizes, ACK; and the
    // negotiation goes on.
    c.option(OPT_INFO, &Client::info_data("disk0", &[3]));
    let (size, flags, bs) = c.read_infos(OPT_INFO);
    assert_eq!(size, MIB as u64);
    assert_eq!(flags, RW_FLAGS);
    assert_eq!(bs, Some((512, 4096, 32 << 20)));

    // Unknown name, malformed payloads.
    c.option(OPT_INFO, &Client::info_data("nope", &[]));
    assert_eq!(c.opt_reply(OPT_INFO).0, REP_ERR_UNKNOWN);
    let mut bad = Client::info_data("disk0", &[]);
    bad[3] = 200; // name length runs past the data
    c.option(OPT_GO, &bad);
    assert_eq!(c.opt_reply(OPT_GO).0, REP_ERR_INVALID);
    let mut trailing = Client::info_data("disk0", &[3]);
    trailing.push(0);
    c.option(OPT_GO, &trailing);
    assert_eq!(c.opt_reply(OPT_GO).0, REP_ERR_INVALID);
    c.option(OPT_GO, &[0, 0]);
    assert_eq!(c.opt_reply(OPT_GO).0, REP_ERR_INVALID);

    // Unsupported options.
    c.option(OPT_STRUCTURED_REPLY, &[]);
    let (k, msg) = c.opt_reply(OPT_STRUCTURED_REPLY);
    assert_eq!(k, REP_ERR_UNSUP);
    assert!(!msg.is_empty(), "error replies carry a message");
    c.option(0x1234_5678, b"whatever");
    assert_eq!(c.opt_reply(0x1234_5678).0, REP_ERR_UNSUP);

    // An oversized option is skipped and refused; the session survives.
    let big = vec![0x55; 9000];
    c.option(99, &big);
    assert_eq!(c.opt_reply(99).0, REP_ERR_TOO_BIG);

    // GO on the empty (default) name enters transmission.
    let (size, flags, _) = c.go("");
    assert_eq!((size, flags), (MIB as u64, RW_FLAGS));
    assert_eq!(c.read(0, 512).unwrap(), vec![0; 512]);
    c.disc();
    assert!(c.closed());

    let (r, disk) = h.join().unwrap();
    let st = r.unwrap();
    assert_eq!(st.end, ConnEnd::Disconnect);
    assert_eq!(st.options, 11);
    assert_eq!(st.options_refused, 8);
    assert_eq!(st.requests, 2);
    assert_eq!(st.reads, 1);
    assert_eq!(disk.ops, vec![Op::Read(0, 512)]);
    assert_eq!(srv.stats().options_refused.load(Ordering::Relaxed), 8);
    assert_eq!(srv.stats().connections.load(Ordering::Relaxed), 1);
    assert_eq!(srv.stats().failed_connections.load(Ordering::Relaxed), 0);
}

#[test]
fn go_on_configured_name() {
    let (mut c, h) = start(server(), MemDisk::new(4096), "disk0");
    c.hello(1);
    let (size, flags, bs) = c.go("disk0");
    assert_eq!((size, flags), (4096, RW_FLAGS));
    assert!(bs.is_some());
    c.disc();
    assert_eq!(h.join().unwrap().0.unwrap().end, ConnEnd::Disconnect);
}

#[test]
fn option_too_big_to_skip_closes() {
    let (mut c, h) = start(server(), MemDisk::new(4096), "disk0");
    c.hello(3);
    c.option_len(99, 2 << 20, &[0; 16]);
    assert!(c.closed());
    match h.join().unwrap().0 {
        Err(NbdError::OptionTooBig { option: 99, len }) => assert_eq!(len, 2 << 20),
        other => panic!("{other:?}"),
    }
}

#[test]
fn oversized_export_name_closes() {
    let (mut c, h) = start(server(), MemDisk::new(4096), "disk0");
    c.hello(3);
    c.option(OPT_EXPORT_NAME, &[b'a'; 9000]);
    assert!(c.closed());
    assert!(matches!(
        h.join().unwrap().0,
        Err(NbdError::OptionTooBig {
            option: OPT_EXPORT_NAME,
            len: 9000
        })
    ));
}

#[test]
fn bad_client_flags_close() {
    let (mut c, h) = start(server(), MemDisk::new(4096), "disk0");
    c.hello(3 | 4);
    assert!(c.closed());
    assert!(matches!(
        h.join().unwrap().0,
        Err(NbdError::BadClientFlags { flags: 7 })
    ));
}

#[test]
fn bad_option_magic_closes() {
    let (mut c, h) = start(server(), MemDisk::new(4096), "disk0");
    c.hello(3);
    c.s.write_all(&[0xee; 16]).unwrap();
    assert!(c.closed());
    assert!(matches!(
        h.join().unwrap().0,
        Err(NbdError::BadOptionMagic {
            magic: 0xeeee_eeee_eeee_eeee
        })
    ));
}

#[test]
fn too_many_options_close() {
    let srv = server_with(NbdConfig {
        max_options: 5,
        ..NbdConfig::default()
    });
    let (mut c, h) = start(srv, MemDisk::new(4096), "disk0");
    c.hello(3);
    for _ in 0..5 {
        c.option(77, &[]);
        assert_eq!(c.opt_reply(77).0, REP_ERR_UNSUP);
    }
    c.option(77, &[]);
    assert!(c.closed());
    assert!(matches!(
        h.join().unwrap().0,
        Err(NbdError::TooManyOptions { limit: 5 })
    ));
}

#[test]
fn export_name_with_and_without_zeroes() {
    // With NO_ZEROES: size and flags only.
    let (mut c, h) = start(server(), patterned(8192), "disk0");
    c.hello(3);
    c.option(OPT_EXPORT_NAME, b"disk0");
    let r = c.take(10);
    assert_eq!(be64(&r), 8192);
    assert_eq!(be16(&r[8..]), RW_FLAGS);
    assert_eq!(c.read(512, 4).unwrap(), vec![10, 11, 12, 13]);
    c.disc();
    assert_eq!(h.join().unwrap().0.unwrap().end, ConnEnd::Disconnect);

    // Without: 124 zero bytes follow.
    let (mut c, h) = start(server(), MemDisk::new(8192), "disk0");
    c.hello(1);
    c.option(OPT_EXPORT_NAME, b"");
    let r = c.take(134);
    assert_eq!(be64(&r), 8192);
    assert!(r[10..].iter().all(|&b| b == 0));
    assert_eq!(c.read(0, 1).unwrap(), vec![0]);
    drop(c);
    assert_eq!(h.join().unwrap().0.unwrap().end, ConnEnd::Eof);
}

#[test]
fn export_name_unknown_closes() {
    let (mut c, h) = start(server(), MemDisk::new(4096), "disk0");
    c.hello(3);
    c.option(OPT_EXPORT_NAME, b"other");
    assert!(c.closed());
    match h.join().unwrap().0 {
        Err(NbdError::UnknownExport { name }) => assert_eq!(name, "other"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn abort_and_eof_during_negotiation() {
    let (mut c, h) = start(server(), MemDisk::new(4096), "disk0");
    c.hello(3);
    c.option(OPT_ABORT, &[]);
    assert_eq!(c.opt_reply(OPT_ABORT).0, REP_ACK);
    assert!(c.closed());
    assert_eq!(h.join().unwrap().0.unwrap().end, ConnEnd::Abort);

    let (mut c, h) = start(server(), MemDisk::new(4096), "disk0");
    c.hello(3);
    drop(c);
    let (r, disk) = h.join().unwrap();
    assert_eq!(r.unwrap().end, ConnEnd::HandshakeEof);
    assert!(disk.ops.is_empty());
}

#[test]
fn hostile_requests_get_errors_and_stay_in_sync() {
    let size = MIB;
    let srv = server();
    let (mut c, h) = start(srv.clone(), patterned(size), "");
    let (sz, _) = c.connect();
    assert_eq!(sz, size as u64);
    let s = size as u64;

    // Reads past the end, overflowing, too long: EINVAL and no payload
    // (the next reply header is read right after).
    assert_eq!(c.read(s - 512, 1024), Err(EINVAL));
    assert_eq!(c.read(s, 1), Err(EINVAL));
    assert_eq!(c.read(u64::MAX - 100, 200), Err(EINVAL));
    assert_eq!(c.read(0, (32 << 20) + 512), Err(EINVAL));
    // Writes past the end: payload consumed, ENOSPC.
    assert_eq!(c.write(s - 100, &[0xaa; 1000]), ENOSPC);
    assert_eq!(c.write(u64::MAX - 10, &[0xaa; 100]), ENOSPC);
    // Write-zeroes and trim past the end.
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, s, 512), ENOSPC);
    assert_eq!(c.cmd(0, CMD_TRIM, u64::MAX, 2), EINVAL);
    // Unknown and unadvertised commands.
    assert_eq!(c.cmd(0, 42, 0, 512), EINVAL);
    assert_eq!(c.cmd(0, CMD_CACHE, 0, 512), EINVAL);
    assert_eq!(c.cmd(0, CMD_BLOCK_STATUS, 0, 512), EINVAL);
    assert_eq!(c.cmd(0, 0xffff, 0, 0), EINVAL);
    // Flags that are not valid for the command.
    c.request(DF, CMD_READ, 9, 0, 512);
    assert_eq!(c.reply(9), EINVAL);
    assert_eq!(c.cmd(FAST_ZERO, CMD_WRITE_ZEROES, 0, 512), EINVAL);
    assert_eq!(c.cmd(NO_HOLE, CMD_TRIM, 0, 512), EINVAL);
    assert_eq!(c.write_flags(NO_HOLE, 0, &[0xaa; 512]), EINVAL);
    assert_eq!(c.cmd(0x8000, CMD_FLUSH, 0, 0), EINVAL);

    // Still in sync, nothing written.
    let expect: Vec<u8> = (0..4096).map(|i| (i % 251) as u8).collect();
    assert_eq!(c.read(0, 4096).unwrap(), expect);
    // Zero-length requests are harmless no-ops.
    assert_eq!(c.read(s, 0), Ok(vec![]));
    assert_eq!(c.write(100, &[]), 0);
    // A bad magic ends the connection.
    c.s.write_all(&[0u8; 28]).unwrap();
    assert!(c.closed());

    let (r, disk) = h.join().unwrap();
    assert!(matches!(r, Err(NbdError::BadRequestMagic { magic: 0 })));
    assert!(
        disk.ops.iter().all(|op| matches!(op, Op::Read(0, 4096))),
        "only the valid read reached the device: {:?}",
        disk.ops
    );
    assert_eq!(disk.ops.len(), 1);
    assert!(disk
        .data
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i % 251) as u8));
    let st = srv.stats();
    assert_eq!(st.requests.load(Ordering::Relaxed), 20);
    assert_eq!(st.invalid_requests.load(Ordering::Relaxed), 17);
    assert_eq!(st.error_replies.load(Ordering::Relaxed), 17);
    assert_eq!(st.failed_connections.load(Ordering::Relaxed), 1);
}

#[test]
fn oversized_write_is_refused_and_closes() {
    let srv = server_with(NbdConfig {
        max_payload: 64 << 10,
        ..NbdConfig::default()
    });
    let (mut c, h) = start(srv, MemDisk::new(MIB), "");
    let (_, _, bs) = {
        c.hello(3);
        c.go("")
    };
    assert_eq!(bs, Some((512, 4096, 64 << 10)));
    // A read over the limit is just refused.
    assert_eq!(c.read(0, (64 << 10) + 1), Err(EINVAL));
    assert_eq!(c.read(0, 64 << 10).unwrap().len(), 64 << 10);
    // A write over the limit is refused, then the server hangs up without
    // reading the payload.
    c.request(0, CMD_WRITE, 77, 0, (64 << 10) + 512);
    assert_eq!(c.reply(77), EINVAL);
    assert!(c.closed());
    let (r, disk) = h.join().unwrap();
    assert!(matches!(
        r,
        Err(NbdError::PayloadTooBig {
            len: 66048,
            max: 65536
        })
    ));
    assert!(!disk.ops.iter().any(|o| matches!(o, Op::Write(..))));
}

/// Byte-granular reads, writes, write-zeroes and trims against a model; the
/// disk panics on any unaligned access, so passing proves the server only
/// sends aligned I/O.
#[test]
fn unaligned_io_matches_model() {
    let size = 256 << 10;
    let (mut c, h) = start(server(), patterned(size), "");
    c.connect();
    let mut model: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();

    let writes: &[(u64, usize, u8)] = &[
        (100, 1000, 0x11),          // head and tail partial, spans sectors
        (1, 1, 0x22),               // inside one sector
        (511, 2, 0x33),             // straddles a boundary, no whole sector
        (4096, 8192, 0x44),         // aligned
        (8000, 513, 0x55),          // unaligned start, tail partial
        (65536 - 7, 7, 0x66),       // ends on a boundary
        (size as u64 - 3, 3, 0x77), // last bytes of the disk
    ];
    for &(off, len, pat) in writes {
        assert_eq!(c.write(off, &vec![pat; len]), 0, "write {off}+{len}");
        model[off as usize..off as usize + len].fill(pat);
    }
    for &(off, len) in &[
        (10u64, 100u32),
        (0, 3000),
        (7999, 600),
        (size as u64 - 5, 5),
    ] {
        let got = c.read(off, len).unwrap();
        assert_eq!(
            got,
            model[off as usize..off as usize + len as usize],
            "read {off}+{len}"
        );
    }
    // Write-zeroes: partial in one sector, partial at both ends, aligned.
    for &(off, len) in &[(20_000u64, 10u32), (30_000, 5000), (40_960, 4096)] {
        assert_eq!(c.cmd(NO_HOLE, CMD_WRITE_ZEROES, off, len), 0);
        model[off as usize..(off + u64::from(len)) as usize].fill(0);
    }
    // Trim: only whole sectors inside the range are discarded (0xdd).
    assert_eq!(c.cmd(0, CMD_TRIM, 50_000, 3000), 0);
    // 50_000 rounds up to 50_176, 53_000 down to 52_736.
    model[50_176..52_736].fill(0xdd);
    assert_eq!(c.cmd(0, CMD_TRIM, 60_001, 100), 0); // no whole sector: no-op
    assert_eq!(c.read(0, size as u32).unwrap(), model);
    c.disc();

    let (r, disk) = h.join().unwrap();
    let st = r.unwrap();
    assert_eq!(disk.data, model);
    assert_eq!(st.writes, 7);
    assert_eq!(st.bytes_written, 1000 + 1 + 2 + 8192 + 513 + 7 + 3);
    assert_eq!(st.write_zeroes, 3);
    assert_eq!(st.trims, 2);
    assert_eq!(st.reads, 5);
    // Unaligned: 6 writes, 4 reads (the full-disk read is aligned), 2 zeroes,
    // 2 trims.
    assert_eq!(st.unaligned, 6 + 4 + 2 + 2);
    assert_eq!(st.error_replies, 0);
    assert!(disk.ops.contains(&Op::Discard(50_176, 2560)));
    assert!(disk.ops.contains(&Op::Zeroes(30_208, 4608)));
    assert!(disk.ops.contains(&Op::Zeroes(40_960, 4096)));
}

#[test]
fn write_zeroes_fallback_and_discard_unsupported() {
    let mut d = patterned(64 << 10);
    d.zeroes_supported = false;
    d.discard_supported = false;
    let srv = server_with(NbdConfig {
        max_device_io: 4096,
        ..NbdConfig::default()
    });
    let (mut c, h) = start(srv, d, "");
    c.connect();
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 1000, 20_000), 0);
    assert_eq!(c.cmd(0, CMD_TRIM, 0, 8192), 0);
    let got = c.read(0, 64 << 10).unwrap();
    c.disc();
    let (r, disk) = h.join().unwrap();
    let st = r.unwrap();
    assert_eq!(st.zero_fallbacks, 1);
    assert_eq!(st.trims, 1);
    for (i, &b) in got.iter().enumerate() {
        let want = if (1000..21_000).contains(&i) {
            0
        } else {
            (i % 251) as u8
        };
        assert_eq!(b, want, "byte {i}");
    }
    assert_eq!(disk.data, got);
    // The middle [1024, 20992) went to write_zeroes, was refused, then
    // written as zero buffers of at most 4096 bytes.
    let zero_writes: Vec<_> = disk
        .ops
        .iter()
        .skip_while(|o| !matches!(o, Op::Zeroes(..)))
        .skip(1)
        .take_while(|o| matches!(o, Op::Write(..)))
        .copied()
        .collect();
    assert_eq!(zero_writes.first(), Some(&Op::Write(1024, 4096)));
    assert_eq!(zero_writes.last(), Some(&Op::Write(17_408, 3584)));
    assert_eq!(zero_writes.len(), 5);
    assert!(disk.ops.contains(&Op::Discard(0, 8192)));
}

#[test]
fn fua_and_flush_reach_the_device() {
    let (mut c, h) = start(server(), MemDisk::new(64 << 10), "");
    c.connect();
    assert_eq!(c.write_flags(FUA, 0, &[1; 512]), 0);
    assert_eq!(c.cmd(0, CMD_FLUSH, 0, 0), 0);
    assert_eq!(c.cmd(FUA, CMD_WRITE_ZEROES, 0, 512), 0);
    assert_eq!(c.cmd(FUA, CMD_TRIM, 512, 512), 0);
    c.request(FUA, CMD_READ, 5, 0, 512); // FUA is accepted on any command
    assert_eq!(c.reply(5), 0);
    c.take(512);
    c.disc();
    let (r, disk) = h.join().unwrap();
    let st = r.unwrap();
    assert_eq!(st.flushes, 1);
    assert_eq!(
        disk.ops,
        vec![
            Op::Write(0, 512),
            Op::Flush,
            Op::Flush,
            Op::Zeroes(0, 512),
            Op::Flush,
            Op::Discard(512, 512),
            Op::Flush,
            Op::Read(0, 512),
        ]
    );
}

#[test]
fn read_only_export() {
    let mut d = patterned(64 << 10);
    d.read_only = true;
    let (mut c, h) = start(server(), d, "");
    let (_, flags) = c.connect();
    assert_eq!(flags, RO_FLAGS);
    assert_eq!(c.write(0, &[0; 512]), EPERM);
    assert_eq!(c.cmd(0, CMD_TRIM, 0, 512), EPERM);
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 0, 512), EPERM);
    assert_eq!(c.cmd(0, CMD_FLUSH, 0, 0), 0);
    assert_eq!(c.read(1, 2).unwrap(), vec![1, 2]);
    c.disc();
    let (r, disk) = h.join().unwrap();
    let st = r.unwrap();
    assert_eq!(st.invalid_requests, 3);
    assert_eq!(disk.ops, vec![Op::Flush, Op::Read(0, 512)]);
}

#[test]
fn device_errors_become_eio() {
    let mut d = patterned(64 << 10);
    d.fail_at = Some(10_000);
    let (mut c, h) = start(server(), d, "");
    c.connect();
    assert_eq!(c.read(8192, 4096), Err(EIO));
    assert_eq!(c.write(9728, &[0; 1024]), EIO);
    // Read-modify-write of a failing sector fails before writing.
    assert_eq!(c.write(9999, &[0; 2]), EIO);
    assert_eq!(c.cmd(0, CMD_WRITE_ZEROES, 9990, 20), EIO);
    // Neighbours still work, and the stream is in sync.
    assert_eq!(c.read(0, 4).unwrap(), vec![0, 1, 2, 3]);
    c.disc();
    let (r, disk) = h.join().unwrap();
    let st = r.unwrap();
    assert_eq!(st.error_replies, 4);
    assert_eq!(st.invalid_requests, 0);
    assert_eq!(st.reads, 1);
    assert!(disk
        .data
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i % 251) as u8 || (9728..10752).contains(&i)));
    // The RMW write never reached the device.
    assert!(!disk.ops.contains(&Op::Write(9728, 512)));
}

#[test]
fn large_requests_are_split_for_the_device() {
    let srv = server_with(NbdConfig {
        max_device_io: 4096,
        ..NbdConfig::default()
    });
    let (mut c, h) = start(srv, patterned(MIB), "");
    c.connect();
    let data: Vec<u8> = (0..65536 + 100).map(|i| (i * 7 % 256) as u8).collect();
    assert_eq!(c.write(100, &data), 0);
    assert_eq!(c.read(100, data.len() as u32).unwrap(), data);
    c.disc();
    let (r, disk) = h.join().unwrap();
    r.unwrap();
    assert!(disk.ops.iter().all(|o| match o {
        Op::Read(_, l) | Op::Write(_, l) => *l <= 4096,
        _ => true,
    }));
    // 65636 bytes at 100 cover [0, 66048): 17 chunks each way, plus the
    // head and tail sector reads of the read-modify-write.
    let writes = disk
        .ops
        .iter()
        .filter(|o| matches!(o, Op::Write(..)))
        .count();
    let reads = disk
        .ops
        .iter()
        .filter(|o| matches!(o, Op::Read(..)))
        .count();
    assert_eq!(writes, 17);
    assert_eq!(reads, 2 + 17);
}

#[test]
fn unaligned_device_size_is_rounded_down() {
    let (mut c, h) = start(server(), MemDisk::new(4096 + 100), "");
    let (size, _) = c.connect();
    assert_eq!(size, 4096);
    assert_eq!(c.read(4000, 100), Err(EINVAL));
    assert_eq!(c.read(4000, 96).unwrap(), vec![0; 96]);
    c.disc();
    h.join().unwrap().0.unwrap();
}

#[test]
fn eof_mid_request_is_an_error() {
    let (mut c, h) = start(server(), MemDisk::new(4096), "");
    c.connect();
    c.request(0, CMD_WRITE, 1, 0, 512);
    c.s.write_all(&[0; 100]).unwrap();
    drop(c);
    let (r, disk) = h.join().unwrap();
    assert!(matches!(r, Err(NbdError::Io(_))), "{r:?}");
    assert!(
        disk.ops.is_empty(),
        "a truncated write never reaches the disk"
    );
}
