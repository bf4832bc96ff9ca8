//! `ringfence bench vsock`: one stream through the vsock device against a
//! Unix socket pair, in the same run, in interleaved rounds.
//!
//! Ringfence: `ringfence backend --device vsock,uds=U` and `ringfence
//! frontend --vsock-listen 5000:L --vsock-forward 6000:F` as processes.
//! Host to VM: a host client writes `CONNECT 6000` on U, then the data,
//! which a sink on F reads. VM to host: a client of L writes, a sink on
//! U_5000 reads. Baseline: the same writer and sink over a socket pair.
//! Every sink checks every byte; a transfer counts from the connect to the
//! sink's EOF.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::TempDir;

/// Options of `ringfence bench vsock`.
#[derive(Debug, clap::Args)]
pub struct VsockBenchArgs {
    /// Rounds; each round runs every path once, in turn.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// MiB per transfer.
    #[arg(long, default_value_t = 64)]
    mib: u64,
}

/// The data repeats this block; sinks compare against it.
const PATTERN_LEN: usize = 1 << 20;
/// Writes and reads in pieces this large.
const IO_CHUNK: usize = 256 << 10;
/// Longest a transfer may stall.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn pattern() -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..PATTERN_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `len` bytes of the pattern, then shuts the write side.
fn write_stream(mut s: UnixStream, pat: &[u8], len: u64) -> Result<(), BoxError> {
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut off = 0u64;
    while off < len {
        let at = (off % PATTERN_LEN as u64) as usize;
        let n = (len - off).min((PATTERN_LEN - at).min(IO_CHUNK) as u64) as usize;
        let chunk = pat.get(at..at + n).ok_or("pattern slice")?;
        s.write_all(chunk)?;
        off += n as u64;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}

/// Reads to EOF; returns (bytes, whether every byte matched the pattern).
fn sink(mut s: UnixStream, pat: &[u8]) -> Result<(u64, bool), BoxError> {
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; IO_CHUNK];
    let (mut total, mut ok) = (0u64, true);
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok((total, ok));
        }
        let mut got = buf.get(..n).unwrap_or(&[]);
        while !got.is_empty() {
            let at = (total % PATTERN_LEN as u64) as usize;
            let m = got.len().min(PATTERN_LEN - at);
            ok &= pat.get(at..at + m) == got.get(..m);
            got = got.get(m..).unwrap_or(&[]);
            total += m as u64;
        }
    }
}

/// One transfer: `connect` makes the writer's stream, `accept` the
/// sink's. Returns MiB/s, or an error if bytes were lost or wrong.
fn transfer(
    pat: &'static [u8],
    len: u64,
    connect: impl FnOnce() -> Result<UnixStream, BoxError>,
    accept: impl FnOnce() -> Result<UnixStream, BoxError> + Send + 'static,
) -> Result<f64, BoxError> {
    let t = Instant::now();
    let sinker = std::thread::spawn(move || sink(accept()?, pat));
    let w = connect()?;
    write_stream(w, pat, len)?;
    let (got, ok) = sinker.join().map_err(|_| "sink panicked")??;
    let secs = t.elapsed().as_secs_f64();
    if got != len || !ok {
        return Err(format!("sent {len} bytes, the sink got {got} (pattern intact: {ok})").into());
    }
    Ok(len as f64 / (1 << 20) as f64 / secs.max(1e-9))
}

/// A host client through the device: `CONNECT <port>`, then `OK <n>`.
fn host_connect(u: &Path, port: u32) -> Result<UnixStream, BoxError> {
    let mut s = UnixStream::connect(u)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") && line.len() < 64 {
        if s.read(&mut b)? == 0 {
            return Err("the device closed the CONNECT".into());
        }
        line.extend_from_slice(&b);
    }
    if !line.starts_with(b"OK ") {
        return Err(format!("CONNECT answered {:?}", String::from_utf8_lossy(&line)).into());
    }
    Ok(s)
}

fn accept_one(l: &UnixListener) -> Result<UnixStream, BoxError> {
    // The listener is non-blocking: a transfer that never arrives fails
    // instead of hanging the benchmark.
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err("no connection arrived".into());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn wait_for(path: &Path, child: &mut Child) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            return Err(format!("{} never appeared", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Backend and frontend, ended on drop.
struct Procs {
    backend: Child,
    frontend: Option<Child>,
}

impl Drop for Procs {
    fn drop(&mut self) {
        if let Some(f) = &mut self.frontend {
            let _ = f.kill();
            let _ = f.wait();
        }
        let _ = self.backend.kill();
        let _ = self.backend.wait();
    }
}

fn start(dir: &Path) -> Result<Procs, BoxError> {
    let exe = std::env::current_exe()?;
    let socket = dir.join("bus.sock");
    let backend = Command::new(&exe)
        .args(["backend", "--once", "--socket-path"])
        .arg(&socket)
        .arg("--device")
        .arg(format!("vsock,uds={}", dir.join("U").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let mut procs = Procs {
        backend,
        frontend: None,
    };
    wait_for(&socket, &mut procs.backend)?;
    let frontend = Command::new(&exe)
        .args(["frontend", "--duration-s", "3600", "--socket-path"])
        .arg(&socket)
        .arg("--vsock-listen")
        .arg(format!("5000:{}", dir.join("L").display()))
        .arg("--vsock-forward")
        .arg(format!("6000:{}", dir.join("F").display()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let f = procs.frontend.insert(frontend);
    // L is bound after the device set-up, so the forward side is ready too.
    wait_for(&dir.join("L"), f)?;
    Ok(procs)
}

/// Runs the benchmark.
pub fn run(args: VsockBenchArgs) -> Result<bool, Box<dyn std::error::Error>> {
    bench(args).map_err(|e| e as Box<dyn std::error::Error>)
}

fn bench(args: VsockBenchArgs) -> Result<bool, BoxError> {
    let rounds = args.rounds.max(1);
    let len = args.mib.max(1) << 20;
    let pat: &'static [u8] = Vec::leak(pattern());
    let dir = TempDir::new("bench-vsock")?;
    let d: PathBuf = dir.0.clone();
    // Sinks on both sides of the device, in this process.
    let host_sink = UnixListener::bind(d.join("U_5000"))?;
    let vm_sink = UnixListener::bind(d.join("F"))?;
    host_sink.set_nonblocking(true)?;
    vm_sink.set_nonblocking(true)?;
    let mut procs = start(&d)?;
    let (mut unix, mut h2v, mut v2h) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (a, b) = UnixStream::pair()?;
        let mut b = Some(b);
        unix.push(transfer(
            pat,
            len,
            || Ok(a),
            move || b.take().ok_or_else(|| "used twice".into()),
        )?);
        let l = vm_sink.try_clone()?;
        let u = d.join("U");
        h2v.push(transfer(
            pat,
            len,
            || host_connect(&u, 6000),
            move || accept_one(&l),
        )?);
        let l = host_sink.try_clone()?;
        let lpath = d.join("L");
        v2h.push(transfer(
            pat,
            len,
            || Ok(UnixStream::connect(&lpath)?),
            move || accept_one(&l),
        )?);
    }
    // End the frontend and read its report.
    let fe = procs.frontend.take().ok_or("no frontend")?;
    // SAFETY: plain kill(2) on a child we started.
    unsafe { libc::kill(fe.id() as i32, libc::SIGTERM) };
    let out = fe.wait_with_output()?;
    let report = String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.contains("connections to the host"))
        .unwrap_or("(no report)")
        .to_string();
    let expect = u64::from(rounds) * len;
    let bytes_ok = report.contains(&format!(
        "{expect} bytes to the host, {expect} bytes from the host"
    ));
    let (mu, mh, mv) = (median(unix), median(h2v), median(v2h));
    println!(
        "vsock stream, {} MiB per transfer, {rounds} interleaved rounds (median MiB/s)",
        args.mib
    );
    println!("  Unix socket pair (baseline)      {mu:9.1}");
    println!(
        "  Ringfence host -> VM (CONNECT)   {mh:9.1}  = {:.3} x baseline",
        mh / mu
    );
    println!(
        "  Ringfence VM -> host (listen)    {mv:9.1}  = {:.3} x baseline",
        mv / mu
    );
    println!("  frontend {report}");
    let ok = out.status.success() && bytes_ok;
    println!(
        "{{\"bench\":\"vsock\",\"mib\":{},\"rounds\":{rounds},\"unix_mib_s\":{mu:.1},\
         \"ringfence_mib_s\":{mh:.1},\"ratio\":{:.4},\"ringfence_v2h_mib_s\":{mv:.1},\
         \"ratio_v2h\":{:.4},\"ok\":{ok}}}",
        args.mib,
        mh / mu,
        mv / mu
    );
    if !bytes_ok {
        println!("the frontend's byte counts do not match {expect} each way");
    }
    Ok(ok)
}
