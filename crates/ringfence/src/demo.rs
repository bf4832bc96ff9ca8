//! `ringfence demo`: part 1 writes, reads back and verifies a disk over
//! virtio-msg; part 2 runs every device at once between two processes (two
//! network namespaces when run as root) and prints one line per device.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{spawn_backend, TempDir};

/// Options of `ringfence demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Part 1: MiB written and read back per request size.
    #[arg(long, default_value_t = 96)]
    mib_per_size: u64,
    /// Part 1: request sizes in KiB.
    #[arg(long, default_value = "4,16,64,128", value_delimiter = ',')]
    sizes_kib: Vec<u64>,
    /// Part 1: requests in flight.
    #[arg(long, default_value_t = 8)]
    queue_depth: usize,
    /// Part 2: the devices to run at once (none: skip part 2).
    #[arg(
        long,
        default_value = "blk,net,console,rng,vsock",
        value_delimiter = ','
    )]
    devices: Vec<String>,
    /// Part 2: MiB moved per device (TCP, NBD, vsock).
    #[arg(long, default_value_t = 64)]
    device_mib: u64,
}

/// Runs both parts; false if any check failed.
pub fn run(args: DemoArgs) -> Result<bool, Box<dyn std::error::Error>> {
    const KNOWN: [&str; 6] = ["blk", "net", "console", "rng", "vsock", "none"];
    if let Some(d) = args.devices.iter().find(|d| !KNOWN.contains(&d.as_str())) {
        return Err(format!(
            "--devices: unknown device {d:?} (known: {})",
            KNOWN.join(", ")
        )
        .into());
    }
    let disk_ok = disk_part(&args)?;
    let devices_ok = if args.devices.iter().all(|d| d.is_empty() || d == "none") {
        true
    } else {
        devices_part(&args)?
    };
    Ok(disk_ok && devices_ok)
}

fn disk_part(args: &DemoArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let dir = TempDir::new("demo")?;
    let image = dir.0.join("disk.img");
    let socket = dir.0.join("blk.sock");
    let size = (args.mib_per_size * args.sizes_kib.len() as u64 + 16) << 20;
    File::create(&image)?.set_len(size)?;
    println!("image   {} ({} MiB, sparse)", image.display(), size >> 20);
    let mut backend = spawn_backend(&socket, &image, &[])?;
    println!(
        "backend pid {} serving virtio-blk on {}",
        backend.id(),
        socket.display()
    );
    let sizes: Vec<String> = args.sizes_kib.iter().map(|s| s.to_string()).collect();
    let status = Command::new(std::env::current_exe()?)
        .args(["frontend", "--socket-path"])
        .arg(&socket)
        .args(["--mib-per-size", &args.mib_per_size.to_string()])
        .args(["--sizes-kib", &sizes.join(",")])
        .args(["--queue-depth", &args.queue_depth.to_string()])
        .status()?;
    let backend_ok = backend.wait()?.success();
    Ok(status.success() && backend_ok)
}

/// A network namespace, deleted on drop.
pub(crate) struct Netns(pub String);

impl Netns {
    /// Creates `name` with its loopback up.
    pub(crate) fn new(name: &str) -> std::io::Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        run_ip(&["netns", "add", name])?;
        let ns = Netns(name.to_string());
        run_ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command run inside the namespace.
    pub(crate) fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).arg(program);
        c
    }
}

/// Moves the calling thread (only) into the network namespace `name`.
fn enter_netns(name: &str) -> std::io::Result<()> {
    let f = File::open(format!("/run/netns/{name}"))?;
    // SAFETY: setns on a namespace fd we hold open; CLONE_NEWNET moves only
    // the calling thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs `ip ARGS`, failing with its stderr.
pub(crate) fn run_ip(args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether network namespaces can be made here (root and iproute2).
pub(crate) fn can_use_netns() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    root && Command::new("ip")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn wait_path(path: &Path, child: &mut Child, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if child.try_wait().ok().flatten().is_some() {
            return Err(format!("{what} exited early"));
        }
        if Instant::now() > deadline {
            return Err(format!("{what}: {} did not appear", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What one device's check found.
enum Verdict {
    Ok { rate: String, detail: String },
    Failed(String),
    Skipped(String),
}

/// 8 bytes of a pattern per offset, as the disk workload uses.
fn pattern(seed: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let mut x = seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn mib_s(bytes: u64, took: Duration) -> String {
    format!(
        "{:.1} MiB/s",
        bytes as f64 / f64::from(1 << 20) / took.as_secs_f64().max(1e-9)
    )
}

/// Serves echo on `listener` (one thread per connection) until the process ends.
fn echo_server(listener: UnixListener) {
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = conn;
                let Ok(mut w) = r.try_clone() else { return };
                let _ = std::io::copy(&mut r, &mut w);
            });
        }
    });
}

/// Sends `data` on `s` from a second thread while reading it back here.
fn echo_round(s: UnixStream, data: &[u8]) -> Result<Duration, String> {
    let start = Instant::now();
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let mut r = s;
    r.set_read_timeout(Some(Duration::from_secs(20)))
        .map_err(|e| e.to_string())?;
    let to_send = data.to_vec();
    let writer = std::thread::spawn(move || w.write_all(&to_send));
    let mut back = vec![0u8; data.len()];
    r.read_exact(&mut back)
        .map_err(|e| format!("echo read: {e}"))?;
    writer
        .join()
        .map_err(|_| "echo writer panicked".to_string())?
        .map_err(|e| format!("echo write: {e}"))?;
    if back != data {
        return Err("echoed bytes differ".into());
    }
    Ok(start.elapsed())
}

struct Paths {
    socket: PathBuf,
    image: PathBuf,
    nbd: PathBuf,
    console: PathBuf,
    pty: PathBuf,
    rng: PathBuf,
    vsock_uds: PathBuf,
    vsock_listen: PathBuf,
    vsock_forward: PathBuf,
}

const RNG_BYTES: u64 = 1 << 20;

fn devices_part(args: &DemoArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let want = |d: &str| args.devices.iter().any(|x| x == d);
    let dir = TempDir::new("demo-devices")?;
    let p = Paths {
        socket: dir.0.join("vm.sock"),
        image: dir.0.join("disk2.img"),
        nbd: dir.0.join("disk.nbd"),
        console: dir.0.join("console.sock"),
        pty: dir.0.join("console.pty"),
        rng: dir.0.join("entropy.bin"),
        vsock_uds: dir.0.join("vm.vsock"),
        vsock_listen: dir.0.join("to-host-5000.sock"),
        vsock_forward: dir.0.join("guest-6000.sock"),
    };
    let exe = std::env::current_exe()?;
    let netns = want("net") && can_use_netns();
    let (ns_a, ns_b) = if netns {
        let pid = std::process::id();
        (
            Some(Netns::new(&format!("rf-demo-a{pid}"))?),
            Some(Netns::new(&format!("rf-demo-b{pid}"))?),
        )
    } else {
        (None, None)
    };
    println!();
    println!("Part 2: every device at once, backend and frontend in separate processes");
    let mut backend = match &ns_a {
        Some(ns) => ns.command(&exe),
        None => Command::new(&exe),
    };
    backend
        .args(["backend", "--once", "--socket-path"])
        .arg(&p.socket);
    let mut frontend = match &ns_b {
        Some(ns) => ns.command(&exe),
        None => Command::new(&exe),
    };
    frontend
        .args(["frontend", "--socket-path"])
        .arg(&p.socket)
        .args(["--duration-s", "120"]);
    if want("blk") {
        File::create(&p.image)?.set_len((args.device_mib + 16) << 20)?;
        backend
            .arg("--device")
            .arg(format!("blk,image={}", p.image.display()));
        frontend.arg("--nbd-socket").arg(&p.nbd);
    }
    if netns {
        backend.args(["--device", "net,tap=rfd0"]);
        frontend.args(["--net-tap", "rfd1"]);
    }
    if want("console") {
        backend
            .arg("--device")
            .arg(format!("console,socket={}", p.console.display()));
        frontend
            .args(["--console-pty", "--console-link"])
            .arg(&p.pty);
    }
    if want("rng") {
        backend.args(["--device", "rng"]);
        frontend.arg("--rng-out").arg(&p.rng);
        frontend.args(["--rng-bytes", &RNG_BYTES.to_string()]);
    }
    if want("vsock") {
        backend
            .arg("--device")
            .arg(format!("vsock,uds={}", p.vsock_uds.display()));
        frontend
            .arg("--vsock-listen")
            .arg(format!("5000:{}", p.vsock_listen.display()));
        frontend
            .arg("--vsock-forward")
            .arg(format!("6000:{}", p.vsock_forward.display()));
        // The host's service on port 5000, and the frontend's on 6000.
        let mut host_5000 = p.vsock_uds.as_os_str().to_owned();
        host_5000.push("_5000");
        echo_server(UnixListener::bind(&host_5000)?);
        echo_server(UnixListener::bind(&p.vsock_forward)?);
    }
    let backend_log = File::create(dir.0.join("backend.log"))?;
    let mut backend = backend
        .stdin(Stdio::null())
        .stdout(backend_log.try_clone()?)
        .stderr(backend_log)
        .spawn()?;
    if let Err(e) = wait_path(&p.socket, &mut backend, "backend") {
        let _ = backend.kill();
        return Err(e.into());
    }
    let front_log = dir.0.join("frontend.log");
    let mut frontend = frontend
        .stdin(Stdio::null())
        .stdout(File::create(&front_log)?)
        .stderr(Stdio::null())
        .spawn()?;
    let mut results: Vec<(&str, Verdict)> = Vec::new();
    let started = [
        (want("blk"), &p.nbd),
        (want("console"), &p.pty),
        (want("vsock"), &p.vsock_listen),
    ]
    .into_iter()
    .filter(|(w, _)| *w)
    .try_for_each(|(_, path)| wait_path(path, &mut frontend, "frontend"));
    if let Err(e) = started {
        results.push(("frontend", Verdict::Failed(e)));
    } else {
        if want("blk") {
            results.push(("blk", check_blk(&p, args.device_mib, &dir.0)));
        }
        if want("net") {
            results.push((
                "net",
                match (&ns_a, &ns_b) {
                    (Some(a), Some(b)) => check_net(a, b, args.device_mib),
                    _ => Verdict::Skipped("needs root and iproute2 (network namespaces)".into()),
                },
            ));
        }
        if want("console") {
            results.push(("console", check_console(&p)));
        }
        if want("rng") {
            results.push(("rng", check_rng(&p)));
        }
        if want("vsock") {
            results.push(("vsock", check_vsock(&p, args.device_mib)));
        }
    }
    // SAFETY: plain kill(2) on a child we started.
    unsafe { libc::kill(frontend.id() as i32, libc::SIGTERM) };
    let front_ok = frontend.wait()?.success();
    let back_ok = backend.wait()?.success();
    let report = std::fs::read_to_string(&front_log)?;
    // The rng endpoint fills its file on its own from the start: its rate
    // is the one it measured.
    for (device, verdict) in results.iter_mut() {
        if let (&mut "rng", Verdict::Ok { rate, .. }) = (device, verdict) {
            if let Some(kib_s) = report
                .lines()
                .rfind(|l| l.starts_with("rng: "))
                .and_then(|l| {
                    l.split_once('(')?
                        .1
                        .split_once(" KiB/s")?
                        .0
                        .parse::<f64>()
                        .ok()
                })
            {
                *rate = format!("{:.1} MiB/s", kib_s / 1024.0);
            }
        }
    }
    let mut ok = front_ok && back_ok;
    for (device, verdict) in &results {
        match verdict {
            Verdict::Ok { rate, detail } => println!("  {device:<8} {rate:>16}  OK    {detail}"),
            Verdict::Failed(why) => {
                ok = false;
                println!("  {device:<8} {:>16}  FAILED {why}", "-");
            }
            Verdict::Skipped(why) => println!("  {device:<8} {:>16}  skipped: {why}", "-"),
        }
    }
    if !front_ok || !back_ok {
        println!(
            "  frontend {} / backend {}; frontend's report:",
            if front_ok { "ok" } else { "FAILED" },
            if back_ok { "ok" } else { "FAILED" }
        );
        for line in report.lines() {
            println!("    {line}");
        }
    }
    println!(
        "  result   {}",
        if ok {
            "OK: every device checked"
        } else {
            "FAILED"
        }
    );
    Ok(ok)
}

fn check_blk(p: &Paths, mib: u64, dir: &Path) -> Verdict {
    let src = dir.join("source.raw");
    let mut data = vec![0u8; (mib << 20) as usize];
    pattern(0xb1c, &mut data);
    if let Err(e) = std::fs::write(&src, &data) {
        return Verdict::Failed(format!("writing the source: {e}"));
    }
    let url = format!("nbd+unix:///?socket={}", p.nbd.display());
    let start = Instant::now();
    let convert = Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&url)
        .output();
    let took = start.elapsed();
    match convert {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Verdict::Skipped("qemu-img not found (qemu-utils)".into())
        }
        Err(e) => return Verdict::Failed(format!("qemu-img: {e}")),
        Ok(o) if !o.status.success() => {
            return Verdict::Failed(format!(
                "qemu-img convert: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ))
        }
        Ok(_) => {}
    }
    let start = Instant::now();
    let compare = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&url)
        .output();
    let read_took = start.elapsed();
    match compare {
        Ok(o) if o.status.success() => {}
        Ok(o) => {
            return Verdict::Failed(format!(
                "qemu-img compare: {}",
                String::from_utf8_lossy(&o.stdout).trim()
            ))
        }
        Err(e) => return Verdict::Failed(format!("qemu-img compare: {e}")),
    }
    // And the bytes are in the backend's image file.
    let mut on_disk = vec![0u8; data.len()];
    let read = File::open(&p.image).and_then(|mut f| f.read_exact(&mut on_disk));
    if read.is_err() || on_disk != data {
        return Verdict::Failed("the backend's image does not hold the bytes written".into());
    }
    Verdict::Ok {
        rate: mib_s(mib << 20, took),
        detail: format!(
            "qemu-img wrote {mib} MiB through NBD, compare read it back at {}; image file matches",
            mib_s(mib << 20, read_took)
        ),
    }
}

fn check_console(p: &Paths) -> Verdict {
    let run = || -> Result<(Duration, usize), String> {
        let mut host = UnixStream::connect(&p.console).map_err(|e| e.to_string())?;
        host.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut pty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p.pty)
            .map_err(|e| e.to_string())?;
        // The backend takes a socket client as its console end on its
        // next look at the listener.
        std::thread::sleep(Duration::from_millis(200));
        let line = b"hello from the service VM's console\n";
        let start = Instant::now();
        host.write_all(line).map_err(|e| e.to_string())?;
        let mut got = vec![0u8; line.len()];
        pty.read_exact(&mut got)
            .map_err(|e| format!("PTY read: {e}"))?;
        pty.write_all(&got).map_err(|e| e.to_string())?;
        let mut back = vec![0u8; line.len()];
        host.read_exact(&mut back)
            .map_err(|e| format!("console socket read: {e}"))?;
        if back != line {
            return Err("the line came back changed".into());
        }
        Ok((start.elapsed(), line.len()))
    };
    match run() {
        Ok((rtt, n)) => Verdict::Ok {
            rate: format!("{:.0} us RTT", rtt.as_secs_f64() * 1e6),
            detail: format!("a {n}-byte line backend socket → PTY → back"),
        },
        Err(e) => Verdict::Failed(e),
    }
}

fn check_rng(p: &Paths) -> Verdict {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let len = std::fs::metadata(&p.rng).map_or(0, |m| m.len());
        if len >= RNG_BYTES {
            break;
        }
        if Instant::now() > deadline {
            return Verdict::Failed(format!("only {len} of {RNG_BYTES} bytes of entropy"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let Ok(bytes) = std::fs::read(&p.rng) else {
        return Verdict::Failed("cannot read the entropy file".into());
    };
    let mut counts = [0u64; 256];
    for &b in &bytes {
        counts[usize::from(b)] += 1;
    }
    let n = bytes.len() as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let q = c as f64 / n;
            -q * q.log2()
        })
        .sum();
    if entropy < 7.9 {
        return Verdict::Failed(format!("{entropy:.3} bits per byte"));
    }
    Verdict::Ok {
        rate: "-".into(),
        detail: format!("{RNG_BYTES} bytes to a file, {entropy:.4} bits per byte"),
    }
}

fn check_vsock(p: &Paths, mib: u64) -> Verdict {
    let mut data = vec![0u8; (mib.min(16) << 20) as usize];
    pattern(0x5c0c, &mut data);
    let outbound = UnixStream::connect(&p.vsock_listen)
        .map_err(|e| e.to_string())
        .and_then(|s| echo_round(s, &data));
    let out_took = match outbound {
        Ok(t) => t,
        Err(e) => return Verdict::Failed(format!("frontend → host port 5000: {e}")),
    };
    // A host client asks for the frontend's port 6000.
    let inbound = || -> Result<Duration, String> {
        let mut s = UnixStream::connect(&p.vsock_uds).map_err(|e| e.to_string())?;
        s.write_all(b"CONNECT 6000\n").map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        let mut reply = Vec::new();
        let mut b = [0u8; 1];
        while reply.last() != Some(&b'\n') && reply.len() < 32 {
            s.read_exact(&mut b)
                .map_err(|e| format!("CONNECT reply: {e}"))?;
            reply.push(b[0]);
        }
        if !reply.starts_with(b"OK ") {
            return Err(format!(
                "CONNECT answered {:?}",
                String::from_utf8_lossy(&reply)
            ));
        }
        echo_round(s, &data)
    };
    match inbound() {
        Ok(in_took) => Verdict::Ok {
            rate: mib_s(2 * data.len() as u64, out_took),
            detail: format!(
                "{} MiB echoed frontend → host:5000; host CONNECT 6000 echoed at {}",
                data.len() >> 20,
                mib_s(2 * data.len() as u64, in_took)
            ),
        },
        Err(e) => Verdict::Failed(format!("host → frontend port 6000: {e}")),
    }
}

/// A 64-bit FNV-1a over a byte stream, to compare what was sent with what arrived.
#[derive(Clone, Copy)]
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

/// Addresses both TAPs, then moves `mib` MiB over TCP from the frontend's
/// namespace to the backend's, hashed on both ends.
fn check_net(a: &Netns, b: &Netns, mib: u64) -> Verdict {
    let run = || -> Result<(Duration, u64), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while run_ip(&["-n", &b.0, "link", "show", "rfd1"]).is_err() {
            if Instant::now() > deadline {
                return Err("the frontend's TAP rfd1 did not appear".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (ns, dev, addr) in [(a, "rfd0", "10.79.0.1/24"), (b, "rfd1", "10.79.0.2/24")] {
            run_ip(&["-n", &ns.0, "addr", "add", addr, "dev", dev]).map_err(|e| e.to_string())?;
            run_ip(&["-n", &ns.0, "link", "set", dev, "up"]).map_err(|e| e.to_string())?;
        }
        let total = mib << 20;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let a_name = a.0.clone();
        let server = std::thread::spawn(move || -> Result<(u64, Fnv), String> {
            enter_netns(&a_name).map_err(|e| e.to_string())?;
            let l = std::net::TcpListener::bind("10.79.0.1:5301").map_err(|e| e.to_string())?;
            let _ = ready_tx.send(());
            let (mut conn, _) = l.accept().map_err(|e| e.to_string())?;
            conn.set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| e.to_string())?;
            let (mut got, mut hash, mut buf) = (0u64, Fnv::new(), vec![0u8; 256 << 10]);
            loop {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        hash.update(&buf[..n]);
                        got += n as u64;
                    }
                    Err(e) => return Err(format!("receive: {e}")),
                }
            }
            Ok((got, hash))
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the receiver did not start".to_string())?;
        let b_name = b.0.clone();
        let client = std::thread::spawn(move || -> Result<(Duration, Fnv), String> {
            enter_netns(&b_name).map_err(|e| e.to_string())?;
            let addr: std::net::SocketAddr = ([10, 79, 0, 1], 5301).into();
            // The first packets may wait for ARP across the device.
            let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
                .map_err(|e| format!("connect: {e}"))?;
            let mut chunk = vec![0u8; 256 << 10];
            let (mut sent, mut hash, start) = (0u64, Fnv::new(), Instant::now());
            while sent < total {
                let n = chunk.len().min((total - sent) as usize);
                pattern(0x7e7 ^ sent, &mut chunk[..n]);
                conn.write_all(&chunk[..n])
                    .map_err(|e| format!("send: {e}"))?;
                hash.update(&chunk[..n]);
                sent += n as u64;
            }
            conn.shutdown(std::net::Shutdown::Write)
                .map_err(|e| e.to_string())?;
            Ok((start.elapsed(), hash))
        });
        let (took, sent_hash) = client.join().map_err(|_| "sender panicked".to_string())??;
        let (got, got_hash) = server
            .join()
            .map_err(|_| "receiver panicked".to_string())??;
        if got != total || got_hash.0 != sent_hash.0 {
            return Err(format!(
                "received {got} of {total} bytes, hash {:x} vs {:x}",
                got_hash.0, sent_hash.0
            ));
        }
        Ok((took, total))
    };
    match run() {
        Ok((took, bytes)) => Verdict::Ok {
            rate: format!(
                "{:.0} Mbit/s",
                bytes as f64 * 8.0 / 1e6 / took.as_secs_f64().max(1e-9)
            ),
            detail: format!(
                "{} MiB over TCP between two network namespaces linked only by Ringfence, hash matches",
                bytes >> 20
            ),
        },
        Err(e) => Verdict::Failed(e),
    }
}
