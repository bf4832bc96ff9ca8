//! The net endpoint between two network namespaces whose only link is
//! Ringfence: backend (`--device net,tap=rfb0`) in namespace A, frontend
//! (`--net-tap rff0`) in namespace B. ICMP echo both ways, an oversized
//! frame dropped and counted, then 16 MiB over TCP each way with the
//! SHA-256 of what was sent compared with that of what arrived, and the
//! frontend's report counters checked against it all.
//!
//! Needs root, `ip` and `python3`; skipped (with a message) otherwise.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ringfence");
const TCP_BYTES: u64 = 16 << 20;

/// Sends `n` ICMP echo requests to argv[1]; prints how many came back
/// with the same id, sequence and payload.
const PING: &str = r#"
import os, socket, struct, sys, time
dst, n = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(2)
def csum(b):
    if len(b) % 2: b += b'\0'
    t = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    t = (t >> 16) + (t & 0xffff); t += t >> 16
    return ~t & 0xffff
ident, ok = os.getpid() & 0xffff, 0
for seq in range(n):
    payload = b'ringfence-%d-' % seq * 8
    c = csum(struct.pack('!BBHHH', 8, 0, 0, ident, seq) + payload)
    s.sendto(struct.pack('!BBHHH', 8, 0, c, ident, seq) + payload, (dst, 0))
    end = time.time() + 2
    while time.time() < end:
        try:
            d, _ = s.recvfrom(4096)
        except socket.timeout:
            break
        ihl = (d[0] & 15) * 4
        t, _, _, i, q = struct.unpack('!BBHHH', d[ihl:ihl + 8])
        if t == 0 and i == ident and q == seq and d[ihl + 8:] == payload:
            ok += 1
            break
print(ok)
"#;

/// Accepts one connection on argv[1]; prints the byte count and SHA-256
/// of everything received.
const SINK: &str = r#"
import hashlib, socket, sys
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(('0.0.0.0', int(sys.argv[1])))
l.listen(1)
print('listening', flush=True)
c, _ = l.accept()
h, n = hashlib.sha256(), 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    h.update(d)
    n += len(d)
print(n, h.hexdigest())
"#;

/// Sends argv[3] pseudo-random bytes (seed argv[4]) to argv[1]:argv[2];
/// prints the byte count and SHA-256 of what it sent.
const SOURCE: &str = r#"
import hashlib, random, socket, sys, time
host, port, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
data = random.Random(seed).randbytes(n)
end = time.time() + 10
while True:
    try:
        c = socket.create_connection((host, port), timeout=5)
        break
    except OSError:
        if time.time() > end:
            raise
        time.sleep(0.05)
c.settimeout(30)
c.sendall(data)
c.shutdown(socket.SHUT_WR)
c.recv(1)
print(n, hashlib.sha256(data).hexdigest())
"#;

fn have(cmd: &str, arg: &str) -> bool {
    Command::new(cmd)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Why the test cannot run here, if it cannot.
fn skip_reason() -> Option<&'static str> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (network namespaces, TAP devices)");
    }
    if !have("ip", "-V") {
        return Some("needs `ip` (iproute2)");
    }
    if !have("python3", "--version") {
        return Some("needs python3");
    }
    None
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn in_ns(ns: &str, prog: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, prog]).args(args);
    c.stdin(Stdio::null());
    c
}

/// Waits for `child` at most `limit`; kills it past that.
fn wait_output(mut child: Child, limit: Duration, what: &str) -> Output {
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{what} did not finish within {limit:?}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn run_in(ns: &str, prog: &str, args: &[&str], limit: Duration) -> String {
    let child = in_ns(ns, prog, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, limit, &format!("{prog} {args:?} in {ns}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} in {ns}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The namespaces and the Ringfence processes, removed on every path.
struct Rig {
    a: String,
    b: String,
    socket: PathBuf,
    children: Vec<Child>,
}

impl Rig {
    fn new() -> Rig {
        let pid = std::process::id();
        let rig = Rig {
            a: format!("rftest-{pid}-a"),
            b: format!("rftest-{pid}-b"),
            socket: std::env::temp_dir().join(format!("ringfence-test-net-{pid}.sock")),
            children: Vec::new(),
        };
        let _ = std::fs::remove_file(&rig.socket);
        for ns in [&rig.a, &rig.b] {
            ip(&["netns", "add", ns]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        rig
    }

    fn spawn(&mut self, ns: &str, args: &[&str]) -> usize {
        let child = in_ns(ns, BIN, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.len() - 1
    }

    fn wait_for(&self, what: &str, ok: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to one of our children, then its whole output.
    fn stop(&mut self, i: usize) -> String {
        let pid = self.children[i].id() as libc::pid_t;
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let child = self.children.remove(i);
        let out = wait_output(child, Duration::from_secs(10), "stopping a child");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for mut c in self.children.drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// 16 MiB from `from` to a sink listening in `to` at `addr`; the digests
/// on both ends must agree.
fn tcp_transfer(from: &str, to: &str, addr: &str, port: u16, seed: u32) {
    let port_s = port.to_string();
    let mut sink = in_ns(to, "python3", &["-c", SINK, &port_s])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 10];
    sink.stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    assert_eq!(&first, b"listening\n");
    let sent = run_in(
        from,
        "python3",
        &[
            "-c",
            SOURCE,
            addr,
            &port_s,
            &TCP_BYTES.to_string(),
            &seed.to_string(),
        ],
        Duration::from_secs(60),
    );
    let got = wait_output(sink, Duration::from_secs(30), "the TCP sink");
    let got = String::from_utf8_lossy(&got.stdout).trim().to_string();
    let (n, digest) = sent.split_once(' ').expect("source output");
    assert_eq!(n, TCP_BYTES.to_string());
    assert_eq!(digest.len(), 64, "sha256 hex: {sent}");
    assert_eq!(
        got, sent,
        "{from} -> {to}: received (count digest) differs from sent"
    );
}

/// `N` in "... <label> N frames (B bytes)" of the report.
fn counter(report: &str, label: &str) -> (u64, u64) {
    let at = report
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} missing in {report:?}"));
    let mut words = report[at + label.len()..].split_whitespace();
    let frames = words.next().unwrap().parse().unwrap();
    assert_eq!(words.next(), Some("frames"));
    let bytes = words
        .next()
        .unwrap()
        .trim_start_matches('(')
        .parse()
        .unwrap();
    (frames, bytes)
}

/// `N` in "... N <label>" of the report.
fn count_before(report: &str, label: &str) -> u64 {
    let at = report
        .find(label)
        .unwrap_or_else(|| panic!("{label:?} missing in {report:?}"));
    report[..at]
        .split_whitespace()
        .last()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn tcp_and_icmp_between_namespaces_over_ringfence() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED tcp_and_icmp_between_namespaces_over_ringfence: {why}");
        return;
    }
    let mut rig = Rig::new();
    let (a, b) = (rig.a.clone(), rig.b.clone());
    let sock = rig.socket.to_string_lossy().into_owned();
    rig.spawn(
        &a,
        &[
            "backend",
            "--once",
            "--socket-path",
            &sock,
            "--device",
            "net,tap=rfb0",
        ],
    );
    rig.wait_for("the backend's socket", || rig.socket.exists());
    let fe = rig.spawn(
        &b,
        &[
            "frontend",
            "--socket-path",
            &sock,
            "--net-tap",
            "rff0",
            "--duration-s",
            "120",
        ],
    );
    let link_up = |ns: &str, dev: &str| {
        Command::new("ip")
            .args(["-n", ns, "link", "show", dev])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    rig.wait_for("the backend's TAP", || link_up(&a, "rfb0"));
    rig.wait_for("the frontend's TAP", || link_up(&b, "rff0"));
    ip(&["-n", &a, "addr", "add", "10.78.0.1/24", "dev", "rfb0"]);
    ip(&["-n", &a, "link", "set", "rfb0", "up"]);
    ip(&["-n", &b, "addr", "add", "10.78.0.2/24", "dev", "rff0"]);
    // The endpoint brought its TAP up itself; only the address is ours.
    let show = Command::new("ip")
        .args(["-n", &b, "link", "show", "rff0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&show.stdout).contains(",UP"),
        "rff0 not up: {}",
        String::from_utf8_lossy(&show.stdout)
    );

    // Each namespace's only route to the other is the Ringfence link.
    let pings = 5;
    let ok = run_in(
        &b,
        "python3",
        &["-c", PING, "10.78.0.1", "5"],
        Duration::from_secs(30),
    );
    assert_eq!(ok, pings.to_string(), "B -> A echo replies");
    let ok = run_in(
        &a,
        "python3",
        &["-c", PING, "10.78.0.2", "5"],
        Duration::from_secs(30),
    );
    assert_eq!(ok, pings.to_string(), "A -> B echo replies");

    tcp_transfer(&b, &a, "10.78.0.1", 5301, 1);
    tcp_transfer(&a, &b, "10.78.0.2", 5302, 2);

    let out = rig.stop(fe);
    let report = out
        .lines()
        .find(|l| l.starts_with("net: TAP rff0,"))
        .unwrap_or_else(|| panic!("no net report in: {out}"));
    let (sent_frames, sent_bytes) = counter(report, "sent");
    let (recv_frames, recv_bytes) = counter(report, "received");
    // Each way carried at least the 16 MiB of payload, and TSO carried it
    // in packets far beyond the 1500-byte MTU (without offloads every frame
    // would be at most 1514 bytes).
    for (dir, frames, bytes) in [
        ("sent", sent_frames, sent_bytes),
        ("received", recv_frames, recv_bytes),
    ] {
        assert!(bytes > TCP_BYTES, "{dir} {bytes} bytes: {report}");
        assert!(
            bytes > frames * 8 * 1514,
            "{dir}: {frames} frames for {bytes} bytes, no TSO: {report}"
        );
    }
    assert_eq!(count_before(report, "too long"), 0, "{report}");
    assert_eq!(count_before(report, "malformed"), 0, "{report}");
    assert_eq!(count_before(report, "refused by the TAP"), 0, "{report}");
}
