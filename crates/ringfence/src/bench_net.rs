//! `ringfence bench net`: TCP between two network namespaces whose only
//! link is Ringfence (backend TAP in one, frontend `--net-tap` TAP in the
//! other), against a veth pair between two other namespaces (the kernel's
//! own path, no isolation), measured in the same run in interleaved rounds.
//! MTU 1500 on both; offloads at their defaults (veth has checksum and
//! segmentation offloads; on the Ringfence path the frontend's endpoint
//! negotiates checksum offload and TSO with the device, and both TAPs carry
//! them). A second veth pair without segmentation offload shows what TSO
//! is worth.
//!
//! The TCP ends are this binary again (`--role`, hidden), started under
//! `ip netns exec`.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Options of `ringfence bench net`.
#[derive(Debug, clap::Args)]
pub struct NetBenchArgs {
    /// Seconds of each throughput measurement.
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Interleaved rounds (each: Ringfence and veth throughput both ways,
    /// then Ringfence and veth latency).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Round trips per latency measurement.
    #[arg(long, default_value_t = 2000)]
    samples: usize,
    /// Internal: run one TCP end (tput-server, tput-client, rr-server, rr-client).
    #[arg(long, hide = true)]
    role: Option<String>,
    /// Internal: the server's address, for the client roles.
    #[arg(long, hide = true)]
    addr: Option<SocketAddr>,
}

type BoxError = Box<dyn std::error::Error>;

const PORT_TPUT: u16 = 5201;
const PORT_RR: u16 = 5202;
const CHUNK: usize = 128 << 10;

/// Runs the benchmark, or one of its TCP ends.
pub fn run(args: NetBenchArgs) -> Result<bool, BoxError> {
    if let Some(role) = args.role.as_deref() {
        return role_main(role, &args);
    }
    let mut setup = Setup::new()?;
    let result = bench(&mut setup, &args);
    let reports = setup.finish();
    for line in reports {
        println!("  {line}");
    }
    result
}

// ---------------------------------------------------------------- the ends

fn role_main(role: &str, args: &NetBenchArgs) -> Result<bool, BoxError> {
    let addr = || args.addr.ok_or("--addr is needed");
    match role {
        "tput-server" => tput_server(PORT_TPUT),
        "tput-client" => tput_client(addr()?, Duration::from_secs(args.seconds)),
        "rr-server" => rr_server(PORT_RR),
        "rr-client" => rr_client(addr()?, args.samples),
        other => Err(format!("unknown role {other:?}").into()),
    }
}

fn listen(port: u16) -> Result<TcpListener, BoxError> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    // The parent waits for this line before starting the client.
    println!("listening");
    std::io::stdout().flush()?;
    Ok(l)
}

/// Reads until EOF, then answers the byte count (8 bytes LE).
fn tput_server(port: u16) -> Result<bool, BoxError> {
    let l = listen(port)?;
    let (mut s, _) = l.accept()?;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    s.write_all(&total.to_le_bytes())?;
    Ok(true)
}

fn connect(addr: SocketAddr) -> Result<TcpStream, BoxError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Sends for `secs`, then waits for the server's count: the time includes
/// draining what was queued.
fn tput_client(addr: SocketAddr, secs: Duration) -> Result<bool, BoxError> {
    let mut s = connect(addr)?;
    let chunk = vec![0x5au8; CHUNK];
    let t = Instant::now();
    let mut sent = 0u64;
    while t.elapsed() < secs {
        s.write_all(&chunk)?;
        sent += CHUNK as u64;
    }
    s.shutdown(Shutdown::Write)?;
    let mut got = [0u8; 8];
    s.read_exact(&mut got)?;
    let elapsed = t.elapsed().as_secs_f64();
    let received = u64::from_le_bytes(got);
    println!("{{\"sent\":{sent},\"received\":{received},\"secs\":{elapsed:.6}}}");
    Ok(sent == received)
}

/// Echoes one byte at a time until EOF.
fn rr_server(port: u16) -> Result<bool, BoxError> {
    let l = listen(port)?;
    let (mut s, _) = l.accept()?;
    s.set_nodelay(true)?;
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(true),
            Ok(_) => s.write_all(&b)?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// `samples` one-byte round trips after a warm-up.
fn rr_client(addr: SocketAddr, samples: usize) -> Result<bool, BoxError> {
    let mut s = connect(addr)?;
    s.set_nodelay(true)?;
    let mut b = [0u8; 1];
    let mut v = Vec::with_capacity(samples);
    for i in 0..samples + 100 {
        let t = Instant::now();
        s.write_all(&[i as u8])?;
        s.read_exact(&mut b)?;
        if b[0] != i as u8 {
            return Err(format!("round trip {i}: sent {} got {}", i as u8, b[0]).into());
        }
        if i >= 100 {
            v.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    v.sort_by(f64::total_cmp);
    println!(
        "{{\"p50_us\":{:.2},\"p99_us\":{:.2}}}",
        percentile(&v, 0.5),
        percentile(&v, 0.99)
    );
    Ok(true)
}

// ------------------------------------------------------------- the set-up

/// Runs `ip ARGS`, failing on a non-zero status.
fn ip(args: &[&str]) -> Result<(), BoxError> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// `ip netns exec NS <this binary> ARGS`.
fn in_ns(ns: &str, args: &[&str]) -> Result<Command, BoxError> {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .arg(std::env::current_exe()?)
        .args(args)
        .stdin(Stdio::null());
    Ok(c)
}

/// The four namespaces and the Ringfence processes; everything is removed
/// on drop, whatever path led there.
struct Setup {
    /// Ringfence ends: backend side, frontend side.
    rf: (String, String),
    /// veth ends.
    veth: (String, String),
    /// veth ends with segmentation offload capped at one MTU-sized frame:
    /// the kernel path carrying the same frames as Ringfence.
    veth_frames: (String, String),
    namespaces: Vec<String>,
    backend: Option<Child>,
    frontend: Option<Child>,
    socket: PathBuf,
}

impl Setup {
    fn new() -> Result<Self, BoxError> {
        let pid = std::process::id();
        let name = |s: &str| format!("rfbench-{pid}-{s}");
        let mut setup = Setup {
            rf: (name("rfa"), name("rfb")),
            veth: (name("vea"), name("veb")),
            veth_frames: (name("vfa"), name("vfb")),
            namespaces: Vec::new(),
            backend: None,
            frontend: None,
            socket: std::env::temp_dir().join(format!("ringfence-bench-net-{pid}.sock")),
        };
        let all = [
            &setup.rf.0,
            &setup.rf.1,
            &setup.veth.0,
            &setup.veth.1,
            &setup.veth_frames.0,
            &setup.veth_frames.1,
        ]
        .map(String::clone);
        for ns in all {
            ip(&["netns", "add", &ns])?;
            setup.namespaces.push(ns.clone());
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        for ((va, vb), net, one_frame) in [
            (setup.veth.clone(), "10.79.0", false),
            (setup.veth_frames.clone(), "10.80.0", true),
        ] {
            ip(&[
                "-n", &va, "link", "add", "veth0", "mtu", "1500", "type", "veth", "peer", "name",
                "veth1", "netns", &vb,
            ])?;
            if one_frame {
                for (ns, dev) in [(&va, "veth0"), (&vb, "veth1")] {
                    ip(&[
                        "-n",
                        ns,
                        "link",
                        "set",
                        dev,
                        "gso_max_segs",
                        "1",
                        "gso_max_size",
                        "1500",
                    ])?;
                }
            }
            ip(&[
                "-n",
                &va,
                "addr",
                "add",
                &format!("{net}.1/24"),
                "dev",
                "veth0",
            ])?;
            ip(&[
                "-n",
                &vb,
                "addr",
                "add",
                &format!("{net}.2/24"),
                "dev",
                "veth1",
            ])?;
            ip(&["-n", &va, "link", "set", "veth0", "up"])?;
            ip(&["-n", &vb, "link", "set", "veth1", "up"])?;
        }

        let (ra, rb) = setup.rf.clone();
        let _ = std::fs::remove_file(&setup.socket);
        let sock = setup.socket.to_string_lossy().into_owned();
        setup.backend = Some(
            in_ns(
                &ra,
                &[
                    "backend",
                    "--once",
                    "--socket-path",
                    &sock,
                    "--device",
                    "net,tap=rfb0",
                ],
            )?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
        );
        wait_for(|| setup.socket.exists(), "the backend's socket")?;
        setup.frontend = Some(
            in_ns(
                &rb,
                &[
                    "frontend",
                    "--socket-path",
                    &sock,
                    "--net-tap",
                    "rff0",
                    "--duration-s",
                    "3600",
                ],
            )?
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?,
        );
        wait_for(
            || ip(&["-n", &rb, "link", "show", "rff0"]).is_ok(),
            "the frontend's TAP",
        )?;
        wait_for(
            || ip(&["-n", &ra, "link", "show", "rfb0"]).is_ok(),
            "the backend's TAP",
        )?;
        ip(&["-n", &ra, "addr", "add", "10.78.0.1/24", "dev", "rfb0"])?;
        ip(&["-n", &ra, "link", "set", "rfb0", "mtu", "1500", "up"])?;
        ip(&["-n", &rb, "addr", "add", "10.78.0.2/24", "dev", "rff0"])?;
        ip(&["-n", &rb, "link", "set", "rff0", "mtu", "1500", "up"])?;
        Ok(setup)
    }

    /// Stops the Ringfence processes and returns their last lines (the
    /// frontend's report, the backend's stats).
    fn finish(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for child in [self.frontend.take(), self.backend.take()]
            .into_iter()
            .flatten()
        {
            lines.extend(stop_child(child));
        }
        lines
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = self.finish();
        for ns in self.namespaces.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// SIGTERM, a bounded wait, SIGKILL if needed; the child's output lines.
fn stop_child(mut child: Child) -> Vec<String> {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if matches!(child.try_wait(), Ok(None)) {
        let _ = child.kill();
    }
    let mut text = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut text);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut text);
    }
    let _ = child.wait();
    text.lines()
        .filter(|l| l.starts_with("net:") || l.starts_with("backend stats"))
        .map(str::to_string)
        .collect()
}

fn wait_for(mut ok: impl FnMut() -> bool, what: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// ------------------------------------------------------------ measuring

fn json_field(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = line.get(at..)?;
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest.get(..end)?.trim().parse().ok()
}

/// Runs a server role in `server_ns` and a client role in `client_ns`;
/// returns the client's JSON line.
fn pair(
    server_ns: &str,
    client_ns: &str,
    server_role: &str,
    client_role: &str,
    addr: &str,
    extra: &[&str],
) -> Result<String, BoxError> {
    let mut server = in_ns(server_ns, &["bench", "net", "--role", server_role])?
        .stdout(Stdio::piped())
        .spawn()?;
    // Wait for "listening" so the client's first connect finds it.
    let mut out = server.stdout.take().ok_or("server stdout")?;
    let mut first = [0u8; 10];
    let ready = out.read_exact(&mut first).is_ok() && &first == b"listening\n";
    if !ready {
        let _ = server.kill();
        let _ = server.wait();
        return Err(format!("{server_role} in {server_ns} did not start").into());
    }
    let client = in_ns(
        client_ns,
        &[
            &["bench", "net", "--role", client_role, "--addr", addr],
            extra,
        ]
        .concat(),
    )?
    .output()?;
    let status = server.wait()?;
    let stdout = String::from_utf8_lossy(&client.stdout);
    let line = stdout.lines().find(|l| l.starts_with('{'));
    match line {
        Some(l) if client.status.success() && status.success() => Ok(l.to_string()),
        _ => Err(format!(
            "{client_role} {server_ns}<-{client_ns} failed: {} {}",
            stdout.trim(),
            String::from_utf8_lossy(&client.stderr).trim()
        )
        .into()),
    }
}

/// CPU seconds (user + system, all threads) of process `pid` so far.
fn cpu_s(pid: u32) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised name: state is field 3, utime 14, stime 15.
    let rest = s.get(s.rfind(')')? + 2..)?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// Busy and total CPU seconds of the machine so far (/proc/stat).
fn machine_s() -> Option<(f64, f64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let f: Vec<f64> = s
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = f.iter().sum();
    let idle = f.get(3)? + f.get(4).unwrap_or(&0.0);
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(((total - idle) / hz, total / hz))
}

/// Where the CPU went during one measurement, in percent of one CPU.
#[derive(Default, Clone, Copy)]
struct CpuShare {
    frontend: f64,
    backend: f64,
    machine: f64,
}

/// Mbit/s from `client` to a server in `server`, and the CPU the
/// Ringfence processes (`pids`: frontend, backend) used meanwhile.
fn throughput(
    server: &str,
    client: &str,
    addr: &str,
    secs: u64,
    pids: (u32, u32),
) -> Result<(f64, CpuShare), BoxError> {
    let s = secs.to_string();
    let t0 = Instant::now();
    let before = (cpu_s(pids.0), cpu_s(pids.1), machine_s());
    let line = pair(
        server,
        client,
        "tput-server",
        "tput-client",
        addr,
        &["--seconds", &s],
    )?;
    let wall = t0.elapsed().as_secs_f64();
    let after = (cpu_s(pids.0), cpu_s(pids.1), machine_s());
    let pct = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => 100.0 * (b - a) / wall,
        _ => f64::NAN,
    };
    let machine = match (before.2, after.2) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => 100.0 * (b1 - b0) / (t1 - t0),
        _ => f64::NAN,
    };
    let cpu = CpuShare {
        frontend: pct(before.0, after.0),
        backend: pct(before.1, after.1),
        machine,
    };
    let bytes = json_field(&line, "received").ok_or("no byte count")?;
    let t = json_field(&line, "secs").ok_or("no time")?;
    Ok((bytes * 8.0 / t / 1e6, cpu))
}

/// (p50, p99) in µs of one-byte round trips from `client`.
fn latency(server: &str, client: &str, addr: &str, n: usize) -> Result<(f64, f64), BoxError> {
    let n = n.to_string();
    let line = pair(
        server,
        client,
        "rr-server",
        "rr-client",
        addr,
        &["--samples", &n],
    )?;
    Ok((
        json_field(&line, "p50_us").ok_or("no p50")?,
        json_field(&line, "p99_us").ok_or("no p99")?,
    ))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[derive(Default)]
struct Series {
    rf_out: Vec<f64>,
    veth_out: Vec<f64>,
    rf_in: Vec<f64>,
    veth_in: Vec<f64>,
    frames_out: Vec<f64>,
    frames_in: Vec<f64>,
    rf_p50: Vec<f64>,
    rf_p99: Vec<f64>,
    veth_p50: Vec<f64>,
    veth_p99: Vec<f64>,
}

fn bench(setup: &mut Setup, args: &NetBenchArgs) -> Result<bool, BoxError> {
    let (ra, rb) = setup.rf.clone();
    let (va, vb) = setup.veth.clone();
    let (fa, fb) = setup.veth_frames.clone();
    let tput_f_a = format!("10.80.0.1:{PORT_TPUT}");
    let tput_f_b = format!("10.80.0.2:{PORT_TPUT}");
    let tput_rf_a = format!("10.78.0.1:{PORT_TPUT}");
    let tput_rf_b = format!("10.78.0.2:{PORT_TPUT}");
    let tput_v_a = format!("10.79.0.1:{PORT_TPUT}");
    let tput_v_b = format!("10.79.0.2:{PORT_TPUT}");
    let rr_rf = format!("10.78.0.1:{PORT_RR}");
    let rr_v = format!("10.79.0.1:{PORT_RR}");
    let secs = args.seconds.max(1);
    let pids = (
        setup.frontend.as_ref().map_or(0, Child::id),
        setup.backend.as_ref().map_or(0, Child::id),
    );
    println!(
        "net: TCP through Ringfence (frontend TAP ns B -> virtio-net -> backend TAP ns A) vs a veth pair; MTU 1500, default offloads; {} rounds of {secs} s",
        args.rounds
    );
    println!(
        "{:>5} {:>14} {:>14} {:>14} {:>14} {:>22} {:>22}",
        "round",
        "rf B->A Mb/s",
        "veth B->A",
        "rf A->B Mb/s",
        "veth A->B",
        "rf rr p50/p99 us",
        "veth rr p50/p99 us"
    );
    let mut s = Series::default();
    for round in 1..=args.rounds.max(1) {
        // B (the frontend's side, "the VM") sends: the device's transmit queue.
        let (rf_out, cpu_out) = throughput(&ra, &rb, &tput_rf_a, secs, pids)?;
        let (veth_out, _) = throughput(&va, &vb, &tput_v_a, secs, pids)?;
        let (frames_out, _) = throughput(&fa, &fb, &tput_f_a, secs, pids)?;
        // A sends: the device's receive queue.
        let (rf_in, cpu_in) = throughput(&rb, &ra, &tput_rf_b, secs, pids)?;
        let (veth_in, _) = throughput(&vb, &va, &tput_v_b, secs, pids)?;
        let (frames_in, _) = throughput(&fb, &fa, &tput_f_b, secs, pids)?;
        let (rf50, rf99) = latency(&ra, &rb, &rr_rf, args.samples)?;
        let (v50, v99) = latency(&va, &vb, &rr_v, args.samples)?;
        println!(
            "{round:>5} {rf_out:>14.0} {veth_out:>14.0} {rf_in:>14.0} {veth_in:>14.0} {:>22} {:>22}",
            format!("{rf50:.1} / {rf99:.1}"),
            format!("{v50:.1} / {v99:.1}")
        );
        for (dir, c) in [("B->A", cpu_out), ("A->B", cpu_in)] {
            println!(
                "      rf {dir} CPU: frontend {:.0} %, backend {:.0} % of one CPU; machine {:.0} % busy",
                c.frontend, c.backend, c.machine
            );
        }
        println!(
            "      reference, veth without segmentation offload (gso_max_segs 1): B->A {frames_out:.0}, A->B {frames_in:.0} Mb/s"
        );
        s.frames_out.push(frames_out);
        s.frames_in.push(frames_in);
        s.rf_out.push(rf_out);
        s.veth_out.push(veth_out);
        s.rf_in.push(rf_in);
        s.veth_in.push(veth_in);
        s.rf_p50.push(rf50);
        s.rf_p99.push(rf99);
        s.veth_p50.push(v50);
        s.veth_p99.push(v99);
    }
    let (rf_out, veth_out) = (median(s.rf_out), median(s.veth_out));
    let (rf_in, veth_in) = (median(s.rf_in), median(s.veth_in));
    let (rf50, rf99) = (median(s.rf_p50), median(s.rf_p99));
    let (frames_out, frames_in) = (median(s.frames_out), median(s.frames_in));
    let (v50, v99) = (median(s.veth_p50), median(s.veth_p99));
    println!(
        "median {rf_out:>13.0} {veth_out:>14.0} {rf_in:>14.0} {veth_in:>14.0} {:>22} {:>22}",
        format!("{rf50:.1} / {rf99:.1}"),
        format!("{v50:.1} / {v99:.1}")
    );
    println!(
        "ratio ringfence/veth: throughput B->A {:.3}, A->B {:.3} (goal >= 0.5); latency p50 {:.2}x, p99 {:.2}x",
        rf_out / veth_out,
        rf_in / veth_in,
        rf50 / v50,
        rf99 / v99
    );
    // What segmentation offload is worth: the kernel's own path with every
    // segment its own 1500-byte frame (what Ringfence would be without TSO).
    println!(
        "reference: veth without segmentation offload B->A {frames_out:.0}, A->B {frames_in:.0} Mb/s; ringfence/that {:.2}, {:.2}",
        rf_out / frames_out,
        rf_in / frames_in
    );
    println!(
        "{{\"ringfence_mbit_s\":{rf_out:.1},\"veth_mbit_s\":{veth_out:.1},\"ratio\":{:.4},\"ringfence_rx_mbit_s\":{rf_in:.1},\"veth_rx_mbit_s\":{veth_in:.1},\"rx_ratio\":{:.4},\"ringfence_p50_us\":{rf50:.2},\"veth_p50_us\":{v50:.2},\"p50_ratio\":{:.3},\"ringfence_p99_us\":{rf99:.2},\"veth_p99_us\":{v99:.2},\"p99_ratio\":{:.3},\"veth_nogso_mbit_s\":{frames_out:.1},\"veth_nogso_rx_mbit_s\":{frames_in:.1}}}",
        rf_out / veth_out,
        rf_in / veth_in,
        rf50 / v50,
        rf99 / v99
    );
    Ok(true)
}
