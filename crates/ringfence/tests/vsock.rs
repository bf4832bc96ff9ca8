//! The vsock endpoint, end to end with real processes: `ringfence backend
//! --device vsock,uds=U` (the host side: `U_<port>` listeners and
//! `CONNECT <port>` on `U`) and `ringfence frontend --vsock-listen
//! --vsock-forward` (the VM side: Unix sockets here).

mod common;

use common::{pattern, Env, BIN};

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A backend with one vsock device and a frontend with the given endpoint
/// options, both alive until [`Rig::finish`].
struct Rig {
    env: Env,
    backend: Child,
    frontend: Child,
    /// The frontend's stdout, line by line.
    lines: std::sync::mpsc::Receiver<String>,
}

impl Rig {
    fn new(tag: &str, listen: &[(u32, &str)], forward: &[(u32, &str)]) -> Self {
        let env = Env::new(&format!("vsock-{tag}"));
        let socket = env.dir.join("bus.sock");
        let backend = Command::new(BIN)
            .args(["backend", "--once", "--socket-path"])
            .arg(&socket)
            .arg("--device")
            .arg(format!("vsock,uds={}", env.dir.join("U").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(&socket);
        let mut cmd = Command::new(BIN);
        cmd.args(["frontend", "--duration-s", "120", "--socket-path"])
            .arg(&socket);
        for (port, name) in listen {
            cmd.arg("--vsock-listen")
                .arg(format!("{port}:{}", env.dir.join(name).display()));
        }
        for (port, name) in forward {
            cmd.arg("--vsock-forward")
                .arg(format!("{port}:{}", env.dir.join(name).display()));
        }
        let frontend = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(env.dir.join("frontend.err")).unwrap())
            .spawn()
            .unwrap();
        let mut frontend = frontend;
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = frontend.stdout.take().unwrap();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stdout).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        // The endpoint prints one line per listener and forward once the
        // device is set up and the listeners are bound.
        for _ in 0..listen.len() + forward.len() {
            let l = lines
                .recv_timeout(Duration::from_secs(10))
                .expect("frontend did not start");
            assert!(l.starts_with("vsock: "), "{l}");
        }
        Rig {
            env,
            backend,
            frontend,
            lines,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.env.dir.join(name)
    }

    /// Stops the frontend (SIGTERM) and returns its vsock report line.
    fn finish(mut self) -> String {
        // SAFETY: plain kill(2) on a child we started.
        unsafe { libc::kill(self.frontend.id() as i32, libc::SIGTERM) };
        let status = self.frontend.wait().unwrap();
        // Until the reader thread sees EOF.
        let mut lines = Vec::new();
        while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(10)) {
            lines.push(l);
        }
        let stdout = lines.join("\n");
        let stderr = std::fs::read_to_string(self.path("frontend.err")).unwrap_or_default();
        assert!(status.success(), "frontend failed: {stdout} {stderr}");
        let status = self.backend.wait().unwrap();
        assert!(status.success(), "backend failed");
        stdout
            .lines()
            .find(|l| l.starts_with("vsock: ") && l.contains("connections to the host"))
            .unwrap_or_else(|| panic!("no report in {stdout}"))
            .to_string()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.frontend.kill();
        let _ = self.frontend.wait();
        let _ = self.backend.kill();
        let _ = self.backend.wait();
    }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An echo server on `path`: every connection gets its bytes back, and
/// EOF after the client's EOF.
fn echo_server(path: &Path) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// A host client through the device's `CONNECT` line; `None` if refused.
fn host_connect(u: &Path, port: u32) -> Option<UnixStream> {
    let mut s = UnixStream::connect(u).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(0) | Err(_) => return None,
            Ok(_) => line.push(b[0]),
        }
    }
    let line = String::from_utf8(line).unwrap();
    let port: u32 = line
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("bad answer {line:?}"));
    assert!(port >= 1024, "{line:?}");
    s.set_read_timeout(None).unwrap();
    Some(s)
}

/// Sends `len` bytes of pattern `seed` (then EOF) while reading the echo,
/// and checks every byte came back, in order, and then EOF.
fn echo_round_trip(s: UnixStream, len: usize, seed: u64) {
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        while off < len {
            let n = buf.len().min(len - off);
            pattern(seed, off as u64, &mut buf[..n]);
            w.write_all(&buf[..n]).unwrap();
            off += n;
        }
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(len);
    let mut r = s;
    r.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    r.read_to_end(&mut got).unwrap();
    writer.join().unwrap();
    let mut expect = vec![0u8; len];
    pattern(seed, 0, &mut expect);
    assert_eq!(got.len(), len, "echo length");
    assert!(got == expect, "echo bytes differ (seed {seed})");
}

fn report_has(report: &str, parts: &[&str]) {
    for p in parts {
        assert!(report.contains(p), "{p:?} not in {report:?}");
    }
}

/// Whether the other end closed `s` (EOF or reset) within `within`.
fn closed_within(s: &mut UnixStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    }
}

#[test]
fn local_client_reaches_host_listener_and_gets_its_bytes_back() {
    let rig = Rig::new("listen", &[(5000, "L")], &[]);
    echo_server(&rig.path("U_5000"));
    let s = UnixStream::connect(rig.path("L")).unwrap();
    echo_round_trip(s, 4 << 20, 1);
    let report = rig.finish();
    report_has(
        &report,
        &[
            "1 connections to the host (0 refused)",
            "0 from the host (0 refused)",
            "4194304 bytes to the host, 4194304 bytes from the host",
            "0 bad packets, 0 credit violations",
        ],
    );
}

#[test]
fn host_client_reaches_forwarded_port_and_gets_its_bytes_back() {
    let rig = Rig::new("forward", &[], &[(6000, "F")]);
    echo_server(&rig.path("F"));
    let s = host_connect(&rig.path("U"), 6000).expect("CONNECT 6000 refused");
    echo_round_trip(s, 4 << 20, 2);
    let report = rig.finish();
    report_has(
        &report,
        &[
            "0 connections to the host (0 refused)",
            "1 from the host (0 refused)",
            "4194304 bytes to the host, 4194304 bytes from the host",
            "0 bad packets, 0 credit violations",
        ],
    );
}

#[test]
fn many_connections_both_ways_at_once() {
    let rig = Rig::new("many", &[(5000, "L")], &[(6000, "F")]);
    echo_server(&rig.path("U_5000"));
    echo_server(&rig.path("F"));
    const EACH: usize = 1 << 20;
    let mut clients = Vec::new();
    for i in 0..6u64 {
        let l = rig.path("L");
        clients.push(std::thread::spawn(move || {
            echo_round_trip(UnixStream::connect(l).unwrap(), EACH, 100 + i)
        }));
        let u = rig.path("U");
        clients.push(std::thread::spawn(move || {
            let s = host_connect(&u, 6000).expect("CONNECT 6000 refused");
            echo_round_trip(s, EACH, 200 + i)
        }));
    }
    for c in clients {
        c.join().unwrap();
    }
    let report = rig.finish();
    report_has(
        &report,
        &[
            "6 connections to the host (0 refused)",
            "6 from the host (0 refused)",
            "12582912 bytes to the host, 12582912 bytes from the host",
            "0 bad packets, 0 credit violations",
        ],
    );
}

#[test]
fn refused_connects_close_the_client_and_the_endpoint_stays_up() {
    let rig = Rig::new(
        "refused",
        &[(5000, "L"), (5001, "L_nobody")],
        &[(6000, "F"), (6001, "F_missing")],
    );
    echo_server(&rig.path("U_5000"));
    echo_server(&rig.path("F"));
    // Host port 5001 has no listener: the host answers RST, and the local
    // client is closed (well before the endpoint's 5 s connect timeout).
    let mut s = UnixStream::connect(rig.path("L_nobody")).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(2)));
    // A host connect to a port nobody forwards, and to a forwarded port
    // whose local socket does not exist: both refused.
    assert!(host_connect(&rig.path("U"), 7000).is_none());
    assert!(host_connect(&rig.path("U"), 6001).is_none());
    // Still serving both ways.
    echo_round_trip(UnixStream::connect(rig.path("L")).unwrap(), 256 << 10, 3);
    let s = host_connect(&rig.path("U"), 6000).expect("CONNECT 6000 refused");
    echo_round_trip(s, 256 << 10, 4);
    let report = rig.finish();
    report_has(
        &report,
        &[
            "1 connections to the host (1 refused)",
            "1 from the host (2 refused)",
            "524288 bytes to the host, 524288 bytes from the host",
        ],
    );
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may contain spaces).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[test]
fn a_local_reader_that_stops_stops_the_host_writer_and_nothing_is_lost() {
    let rig = Rig::new("stall", &[], &[(6000, "F")]);
    let local = UnixListener::bind(rig.path("F")).unwrap();
    let mut host = host_connect(&rig.path("U"), 6000).expect("CONNECT 6000 refused");
    let (mut reader, _) = local.accept().unwrap();
    // The local reader does not read: the host writes until its writes
    // block. Everything in between (the sockets' own buffers, the
    // endpoint's per-connection buffer) is bounded by credit, far below
    // what the host tries to write.
    const TRY: usize = 16 << 20;
    host.set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut written = 0usize;
    while written < TRY {
        let n = buf.len().min(TRY - written);
        pattern(9, written as u64, &mut buf[..n]);
        match host.write(&buf[..n]) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("host write failed: {e}"),
        }
    }
    assert!(
        written < 4 << 20,
        "{written} bytes accepted with nobody reading: buffering is not bounded"
    );
    // While stalled, the frontend sleeps (no spinning on the device or
    // the socket): well under half a CPU over a second.
    let pid = rig.frontend.id();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let ticks = cpu_ticks(pid) - before;
    // SAFETY: sysconf is always safe to call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    assert!(
        ticks * 2 < hz,
        "frontend used {ticks} of {hz} clock ticks in 1 s while idle"
    );
    // The reader resumes: every byte arrives, in order.
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    reader.read_to_end(&mut got).unwrap();
    let mut expect = vec![0u8; written];
    pattern(9, 0, &mut expect);
    assert_eq!(got.len(), written);
    assert!(got == expect, "bytes differ after the stall");
    drop(reader);
    let report = rig.finish();
    report_has(
        &report,
        &[
            "1 from the host (0 refused)",
            &format!("{written} bytes from the host"),
            "0 credit violations",
        ],
    );
}

#[test]
fn a_host_reader_that_stops_holds_the_local_writer_within_credit() {
    let rig = Rig::new("stall-up", &[(5000, "L")], &[]);
    let host = UnixListener::bind(rig.path("U_5000")).unwrap();
    let mut local = UnixStream::connect(rig.path("L")).unwrap();
    let (mut reader, _) = host.accept().unwrap();
    // The endpoint may read the local socket only as far as the host's
    // credit goes: reading more would leave it with data it cannot send.
    const TRY: usize = 16 << 20;
    local
        .set_write_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    let mut written = 0usize;
    while written < TRY {
        let n = buf.len().min(TRY - written);
        pattern(10, written as u64, &mut buf[..n]);
        match local.write(&buf[..n]) {
            Ok(n) => written += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => panic!("local write failed: {e}"),
        }
    }
    assert!(
        written < 4 << 20,
        "{written} bytes accepted with nobody reading"
    );
    local.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    reader
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    reader.read_to_end(&mut got).unwrap();
    let mut expect = vec![0u8; written];
    pattern(10, 0, &mut expect);
    assert_eq!(got.len(), written);
    assert!(got == expect, "bytes differ after the stall");
    // The host side closes: the local client sees EOF.
    drop(reader);
    assert!(closed_within(&mut local, Duration::from_secs(5)));
    let report = rig.finish();
    report_has(
        &report,
        &[
            "1 connections to the host (0 refused)",
            &format!("{written} bytes to the host, 0 bytes from the host"),
            "0 credit violations",
        ],
    );
}

/// Sends `len` bytes of pattern `seed` over `w`, then EOF, and checks that
/// `w` gets EOF back with nothing before it.
fn send_all_then_eof(mut w: UnixStream, len: usize, seed: u64) {
    let mut buf = vec![0u8; len];
    pattern(seed, 0, &mut buf);
    w.write_all(&buf).unwrap();
    w.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = Vec::new();
    w.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    w.read_to_end(&mut got).unwrap();
    assert!(
        got.is_empty(),
        "{} bytes from a peer that sent none",
        got.len()
    );
}

/// Reads `r` to EOF and checks it got `len` bytes of pattern `seed`.
fn expect_all(mut r: UnixStream, len: usize, seed: u64) {
    let mut got = Vec::new();
    r.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    r.read_to_end(&mut got).unwrap();
    let mut expect = vec![0u8; len];
    pattern(seed, 0, &mut expect);
    assert_eq!(got.len(), len, "bytes the late reader got (seed {seed})");
    assert!(got == expect, "bytes differ (seed {seed})");
}

#[test]
fn a_host_that_reads_late_gets_everything_the_vm_side_sent_before_closing() {
    // More than a host socket's kernel buffer takes (about 228 KiB), so
    // the device still holds part of it when the VM side is done, yet well
    // within what the device's credit (256 KiB beyond what it told us it
    // forwarded) lets the endpoint send before the host reads anything.
    // The endpoint must then close so that the device writes that part out
    // first (SHUTDOWN both ways, then the device's RST), not reset the
    // connection under it.
    const LEN: usize = 320 << 10;
    let rig = Rig::new("late", &[(5000, "L")], &[(6000, "F")]);

    // Host to VM: the host client sends nothing, and reads only after the
    // local server wrote everything, got EOF and the endpoint had time to
    // close.
    let local = UnixListener::bind(rig.path("F")).unwrap();
    let host = host_connect(&rig.path("U"), 6000).expect("CONNECT 6000 refused");
    host.shutdown(std::net::Shutdown::Write).unwrap();
    let (server, _) = local.accept().unwrap();
    send_all_then_eof(server, LEN, 11);
    std::thread::sleep(Duration::from_millis(300));
    expect_all(host, LEN, 11);

    // VM to host, the same with the roles swapped.
    let listener = UnixListener::bind(rig.path("U_5000")).unwrap();
    let client = UnixStream::connect(rig.path("L")).unwrap();
    let (host, _) = listener.accept().unwrap();
    host.shutdown(std::net::Shutdown::Write).unwrap();
    send_all_then_eof(client, LEN, 12);
    std::thread::sleep(Duration::from_millis(300));
    expect_all(host, LEN, 12);

    let report = rig.finish();
    report_has(
        &report,
        &[
            "1 connections to the host (0 refused)",
            "1 from the host (0 refused)",
            &format!("{} bytes to the host, 0 bytes from the host", 2 * LEN),
            "0 bad packets, 0 credit violations",
        ],
    );
}
