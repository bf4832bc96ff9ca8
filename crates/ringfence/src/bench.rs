//! `ringfence bench`: the isolated path against the floor, in one run.
//!
//! The floor is what no implementation of the arrangement can avoid: an
//! eventfd round trip between two processes, a page-cache pread of the request
//! size in the backend, and the bounce copy in the frontend. Results are ratios
//! against it, because these machines are noisy.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::{spawn_backend, TempDir};

/// Options of `ringfence bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Image size in MiB.
    #[arg(long, default_value_t = 256)]
    image_mib: u64,
    /// Another device's benchmark instead of virtio-blk's.
    #[command(subcommand)]
    device: Option<BenchDevice>,
}

/// Benchmarks of the other devices.
#[derive(Debug, clap::Subcommand)]
pub enum BenchDevice {
    /// virtio-net between two network namespaces, against a veth pair.
    Net(crate::bench_net::NetBenchArgs),
    /// One vsock stream, against a Unix socket pair.
    Vsock(crate::bench_vsock::VsockBenchArgs),
}

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Median eventfd round trip between two processes, in microseconds.
fn eventfd_round_trip_us(n: usize) -> f64 {
    // SAFETY: plain eventfd creation.
    let (a, b) = unsafe { (libc::eventfd(0, 0), libc::eventfd(0, 0)) };
    // SAFETY: fork in a single-threaded process; the child only does
    // async-signal-safe read/write and _exit.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut v = 0u64;
        for _ in 0..n {
            // SAFETY: valid 8-byte buffer for eventfd read/write.
            unsafe {
                libc::read(a, (&mut v as *mut u64).cast(), 8);
                libc::write(b, (&1u64 as *const u64).cast(), 8);
            }
        }
        // SAFETY: terminate the child without running the parent's destructors.
        unsafe { libc::_exit(0) };
    }
    let mut samples = Vec::with_capacity(n);
    let mut v = 0u64;
    for _ in 0..n {
        let t = Instant::now();
        // SAFETY: valid 8-byte buffer for eventfd read/write.
        unsafe {
            libc::write(a, (&1u64 as *const u64).cast(), 8);
            libc::read(b, (&mut v as *mut u64).cast(), 8);
        }
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // SAFETY: reap the child and close our descriptors.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        libc::close(a);
        libc::close(b);
    }
    p50(samples)
}

fn pread_us(file: &File, len: usize, span: u64, n: usize) -> f64 {
    let mut buf = vec![0u8; len];
    let slots = (span / len as u64).max(1);
    let samples = (0..n)
        .map(|i| {
            let off = ((i as u64).wrapping_mul(2654435761) % slots) * len as u64;
            let t = Instant::now();
            let _ = file.read_at(&mut buf, off);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    p50(samples)
}

fn memcpy_us(len: usize, n: usize) -> f64 {
    let src = vec![1u8; len];
    let mut dst = vec![0u8; len];
    let t = Instant::now();
    for _ in 0..n {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn json_field(line: &str, key: &str) -> Option<f64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &line[at..];
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim().parse().ok()
}

fn rss_anon_kib(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("RssAnon:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn run(args: BenchArgs) -> Result<bool, Box<dyn std::error::Error>> {
    match args.device {
        Some(BenchDevice::Net(a)) => return crate::bench_net::run(a),
        Some(BenchDevice::Vsock(a)) => return crate::bench_vsock::run(a),
        None => {}
    }
    let dir = TempDir::new("bench")?;
    let image = dir.0.join("bench.img");
    let socket = dir.0.join("bench.sock");
    {
        // Real data, written once and left in the page cache.
        let f = File::create(&image)?;
        let chunk = vec![0xA5u8; 1 << 20];
        for i in 0..args.image_mib {
            f.write_all_at(&chunk, i << 20)?;
        }
        f.sync_all()?;
    }
    let file = File::open(&image)?;
    let span = args.image_mib << 20;
    let _ = pread_us(&file, 128 << 10, span, 2048); // warm the cache
    let rt = eventfd_round_trip_us(20_000);
    let pread4 = pread_us(&file, 4096, span, 20_000);
    let copy4 = memcpy_us(4096, 200_000);
    let pread128 = pread_us(&file, 128 << 10, span, 4000);
    let copy128 = memcpy_us(128 << 10, 20_000);
    let _ = file.as_raw_fd();
    let floor4 = rt + pread4 + copy4;
    let serial_mib_s = 128.0 / 1024.0 / ((pread128 + copy128) / 1e6);
    let pipelined_mib_s = 128.0 / 1024.0 / (pread128.max(copy128) / 1e6);

    println!("Floor (measured now, same machine)");
    println!("  eventfd round trip, two processes   {rt:8.2} us");
    println!("  page-cache pread 4 KiB               {pread4:8.2} us");
    println!("  bounce copy 4 KiB                    {copy4:8.2} us");
    println!("  floor for a 4 KiB read               {floor4:8.2} us");
    println!("  128 KiB: pread {pread128:.1} us + copy {copy128:.1} us -> copy-bound {serial_mib_s:.0} MiB/s serial, {pipelined_mib_s:.0} MiB/s pipelined");
    let mut ok = true;
    for (label, poll) in [
        (
            "backend sleeps on every doorbell (default, --poll-us 0)",
            "0",
        ),
        ("backend polls 32 us before sleeping (--poll-us 32)", "32"),
    ] {
        let r = isolated(&socket, &image, &["--poll-us", poll])?;
        ok &= r.ok;
        println!("Isolated path, {label}");
        println!(
            "  4 KiB QD1 randread p50 {:8.2} us  = {:.2} x floor (target <= 1.25)",
            r.qd1_p50,
            r.qd1_p50 / floor4
        );
        println!(
            "  4 KiB QD1 randread p99 {:8.2} us  = {:.2} x floor",
            r.qd1_p99,
            r.qd1_p99 / floor4
        );
        println!(
            "  4 KiB QD16 randread    {:8.0} IOPS = {:.2} x 1/floor",
            r.qd16,
            r.qd16 * floor4 / 1e6
        );
        println!("  128 KiB seq read QD16  {:8.1} MiB/s = {:.0} % of serial copy bound (target >= 75 %), {:.0} % of pipelined", r.seq, 100.0 * r.seq / serial_mib_s, 100.0 * r.seq / pipelined_mib_s);
        println!(
            "  backend RssAnon (max)  {:8.1} MiB (the window is shared memory, not counted)",
            r.rss_max_kib as f64 / 1024.0
        );
    }
    Ok(ok)
}

struct Isolated {
    ok: bool,
    qd1_p50: f64,
    qd1_p99: f64,
    qd16: f64,
    seq: f64,
    rss_max_kib: u64,
}

fn isolated(
    socket: &std::path::Path,
    image: &std::path::Path,
    backend_args: &[&str],
) -> Result<Isolated, Box<dyn std::error::Error>> {
    let mut backend = spawn_backend(socket, image, backend_args)?;
    let backend_pid = backend.id();
    let sampler = std::thread::spawn(move || {
        let mut max = 0;
        while let Some(kib) = rss_anon_kib(backend_pid) {
            max = max.max(kib);
            std::thread::sleep(Duration::from_millis(50));
        }
        max
    });
    let out = Command::new(std::env::current_exe()?)
        .args(["frontend", "--bench", "--json", "--socket-path"])
        .arg(socket)
        .output()?;
    let _ = backend.wait();
    let rss_max_kib = sampler.join().unwrap_or(0);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find(|l| l.starts_with('{')).ok_or_else(|| {
        format!(
            "frontend produced no result: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let get = |k| json_field(line, k).unwrap_or(f64::NAN);
    Ok(Isolated {
        ok: out.status.success(),
        qd1_p50: get("qd1_p50_us"),
        qd1_p99: get("qd1_p99_us"),
        qd16: get("qd16_iops"),
        seq: get("seq128k_mib_s"),
        rss_max_kib,
    })
}
