//! `ringfence bench vhost-user`: any vhost-user-blk backends, driven from
//! this process by the same virtio-blk driver (no guest, no TCG), compared in
//! one run with interleaved rounds on 4 KiB QD1 latency, 4 KiB QD32 IOPS and
//! 128 KiB sequential throughput.
//!
//! `--cold` measures storage instead of the page cache: a large image,
//! dropped from the page cache before every backend's turn, reads and
//! writes, and the backends in their O_DIRECT configurations (ours with
//! `--cache none --aio io_uring`, qemu-storage-daemon with an iothread,
//! `aio=io_uring` and `cache.direct=on`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ringfence_virtqueue::{BlkDriver, DmaRegion};

use crate::bench_blk::{
    drive, percentile_us, wait_used, CellResult, CellSpec, Lender, Rng, MAX_SLOTS, SECTOR,
};
use crate::vhost_frontend::{GuestRam, VhostTransport, GPA};
use crate::TempDir;

/// Options of `ringfence bench vhost-user`.
#[derive(Debug, clap::Args)]
pub struct VhostBenchArgs {
    /// A backend's command line, run by `sh -c`; `{socket}` and `{image}`
    /// are replaced. Repeat for each backend; the first is the baseline of
    /// the ratios. Default: `ringfence vhost-user blk` and
    /// qemu-storage-daemon (iothread, io_uring, page cache).
    #[arg(long = "backend")]
    backends: Vec<String>,
    /// Image size in MiB (default 256, in the page cache; 4096 with --cold).
    #[arg(long)]
    image_mib: Option<u64>,
    /// Cold storage: O_DIRECT backends, reads and writes, the image dropped
    /// from the page cache before each backend's turn in every round.
    #[arg(long)]
    cold: bool,
    /// Rounds; every backend runs every row once per round.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Time per row per backend per round, in milliseconds.
    #[arg(long, default_value_t = 500)]
    cell_ms: u64,
}

const QSD: &str = "qemu-storage-daemon \
    --blockdev driver=file,node-name=file0,filename={image},aio=io_uring,cache.direct=off \
    --blockdev driver=raw,node-name=disk0,file=file0 \
    --object iothread,id=iothread0 \
    --export type=vhost-user-blk,id=export0,addr.type=unix,addr.path={socket},node-name=disk0,writable=on,iothread=iothread0";

/// qemu-storage-daemon in its fastest configuration for storage.
const QSD_DIRECT: &str = "qemu-storage-daemon \
    --blockdev driver=file,node-name=file0,filename={image},aio=io_uring,cache.direct=on \
    --blockdev driver=raw,node-name=disk0,file=file0 \
    --object iothread,id=iothread0 \
    --export type=vhost-user-blk,id=export0,addr.type=unix,addr.path={socket},node-name=disk0,writable=on,iothread=iothread0";

/// A row: name, request size, depth, sequential, writes.
type Row = (&'static str, usize, usize, bool, bool);

/// The rows from the page cache.
const WARM_ROWS: [Row; 3] = [
    ("4 KiB random read QD1", 4096, 1, false, false),
    ("4 KiB random read QD32", 4096, 32, false, false),
    ("128 KiB sequential read QD8", 128 << 10, 8, true, false),
];

/// The rows from cold storage.
const COLD_ROWS: [Row; 6] = [
    ("4 KiB random read QD1", 4096, 1, false, false),
    ("4 KiB random read QD32", 4096, 32, false, false),
    ("4 KiB random write QD1", 4096, 1, false, true),
    ("4 KiB random write QD32", 4096, 32, false, true),
    ("128 KiB sequential read QD8", 128 << 10, 8, true, false),
    ("128 KiB sequential write QD8", 128 << 10, 8, true, true),
];

/// Drops the image's clean pages from the page cache, so the next reads
/// come from the disk (for backends that do not bypass the cache).
fn drop_from_page_cache(image: &File) {
    use std::os::fd::AsRawFd;
    let _ = image.sync_data();
    // SAFETY: plain advice on a descriptor we own.
    unsafe { libc::posix_fadvise(image.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

const RAM: usize = 64 << 20;
const QUEUE: u16 = 256;
/// Guest RAM offset of the data buffers (after the driver's region).
const DATA: u64 = 1 << 20;

struct Peer {
    name: String,
    child: Child,
    driver: BlkDriver<VhostTransport>,
    _ram: GuestRam,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Buffers at fixed places in guest RAM: vhost-user shares all of it.
struct RamLender {
    len: usize,
}

impl Lender for RamLender {
    fn lend(&mut self, i: usize, _len: usize, _write: bool, _sector: u64) -> Option<u64> {
        Some(GPA + DATA + (i * self.len) as u64)
    }
    fn give_back(&mut self, _: usize, _: usize, _: bool, _: u64, _: bool) -> bool {
        true
    }
}

fn start(
    cmd: &str,
    name: String,
    socket: &std::path::Path,
    image: &std::path::Path,
) -> Result<Peer, Box<dyn std::error::Error>> {
    // Paths are quoted for the shell (a quote inside becomes '\'').
    let quote =
        |p: &std::path::Path| format!("'{}'", p.display().to_string().replace('\'', "'\\''"));
    let line = cmd
        .replace("{socket}", &quote(socket))
        .replace("{image}", &quote(image));
    let child = Command::new("sh")
        .args(["-c", &format!("exec {line}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    let mut child = ChildGuard(Some(child));
    let ram = GuestRam::new(RAM)?;
    let transport = VhostTransport::connect(socket, &ram)?;
    let len = BlkDriver::<VhostTransport>::region_size(QUEUE);
    let region = DmaRegion {
        vaddr: std::ptr::NonNull::new(ram.host_ptr(GPA).ok_or("no RAM")?).ok_or("null RAM")?,
        paddr: GPA,
        len,
    };
    // SAFETY: the first MiB of guest RAM (zeroed memfd) holds only the
    // driver's region; `ram` lives in the same Peer as the driver and is
    // dropped after it (field order).
    let driver = unsafe { BlkDriver::new(transport, region, QUEUE, true) }
        .map_err(|e| format!("{name}: driver set-up failed: {e}"))?;
    let pid = child.0.take().ok_or("no child")?;
    Ok(Peer {
        name,
        child: pid,
        driver,
        _ram: ram,
    })
}

/// Kills the child unless taken.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn run_row(peer: &mut Peer, row: &Row, duration: Duration, span: u64, seed: u64) -> CellResult {
    let &(_, len, qd, seq, write) = row;
    let slots = (span / len as u64).max(1);
    let mut rng = Rng::new(seed);
    // A sequential row starts somewhere new each time, so that no round
    // reads what an earlier one left in a cache.
    let start = rng.next() % slots;
    let mut at = |i: u64| {
        let n = if seq {
            (start + i) % slots
        } else {
            rng.next() % slots
        };
        n * (len as u64 / SECTOR)
    };
    let spec = CellSpec {
        len,
        qd: qd.min(MAX_SLOTS),
        write,
        duration,
        count: None,
    };
    let pid = peer.child.id();
    let mut wait = |d: &mut BlkDriver<VhostTransport>| {
        wait_used(d, Duration::ZERO, false, |d, t| d.transport().wait(t))
    };
    drive(
        &mut peer.driver,
        &mut wait,
        &mut RamLender { len },
        &spec,
        &mut at,
        &[pid],
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(args: VhostBenchArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let backends = if !args.backends.is_empty() {
        args.backends.clone()
    } else if args.cold {
        vec![
            format!(
                "{} vhost-user --once --socket-path {{socket}} blk --image {{image}} --cache none --aio io_uring",
                exe.display()
            ),
            QSD_DIRECT.to_string(),
        ]
    } else {
        vec![
            format!(
                "{} vhost-user --once --socket-path {{socket}} blk --image {{image}}",
                exe.display()
            ),
            QSD.to_string(),
        ]
    };
    let rows: &[Row] = if args.cold { &COLD_ROWS } else { &WARM_ROWS };
    // The image is made in $TMPDIR: for a cold run, point it at the disk
    // to be measured (a tmpfs has no cold storage, nor O_DIRECT).
    let dir = TempDir::new("bench-vhost")?;
    let image = dir.0.join("bench.img");
    let image_mib = args
        .image_mib
        .unwrap_or(if args.cold { 4096 } else { 256 })
        .max(8);
    {
        let f = File::create(&image)?;
        // Distinct bytes per MiB: a backend that returned the wrong block
        // would not go unseen by a reader of the image, and nothing here
        // is a hole the file system could answer without the disk.
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..image_mib {
            chunk.fill(0xA5 ^ (i as u8));
            f.write_all_at(&chunk, i << 20)?;
        }
        f.sync_all()?;
    }
    let image_file = File::open(&image)?;
    let span = image_mib << 20;
    let mut peers = Vec::new();
    for (i, cmd) in backends.iter().enumerate() {
        let name = cmd
            .split_whitespace()
            .next()
            .and_then(|p| p.rsplit('/').next())
            .unwrap_or("backend")
            .to_string();
        let name = if backends
            .iter()
            .take(i)
            .any(|c| c.split_whitespace().next() == cmd.split_whitespace().next())
        {
            format!("{name}#{i}")
        } else {
            name
        };
        let socket = dir.0.join(format!("peer{i}.sock"));
        peers.push(start(cmd, name, &socket, &image)?);
    }
    let duration = Duration::from_millis(args.cell_ms.max(50));
    // results[row][peer][round]
    let mut results: Vec<Vec<Vec<CellResult>>> = vec![vec![Vec::new(); peers.len()]; rows.len()];
    // Warm both paths once (the code, not the data: a cold run drops it).
    for peer in &mut peers {
        for row in rows {
            let _ = run_row(peer, row, Duration::from_millis(100), span, 1);
        }
    }
    let n_peers = peers.len();
    for round in 0..args.rounds.max(1) {
        for (row, per_peer) in rows.iter().zip(results.iter_mut()) {
            // Who goes first alternates from round to round: whatever the
            // first leaves behind (a warmer disk, a busier one) is shared.
            for k in 0..n_peers {
                let p = (k + round) % n_peers;
                let Some(peer) = peers.get_mut(p) else {
                    continue;
                };
                let seed = if args.cold {
                    drop_from_page_cache(&image_file);
                    // Offsets of their own: blocks another backend just
                    // read may still sit in the disk's (or the host's) cache.
                    (round * n_peers + p) as u64 + 11
                } else {
                    // The same offsets for every backend within a round.
                    round as u64 + 11
                };
                let r = run_row(peer, row, duration, span, seed);
                if let Some(v) = per_peer.get_mut(p) {
                    v.push(r);
                }
            }
        }
    }
    let mut ok = true;
    println!(
        "vhost-user-blk backends, one in-process frontend, {} rounds × {} ms per row (image {image_mib} MiB, {})",
        args.rounds.max(1),
        args.cell_ms,
        if args.cold {
            "dropped from the page cache before every turn; O_DIRECT backends"
        } else {
            "in the page cache"
        }
    );
    let base = peers.first().map(|p| p.name.clone()).unwrap_or_default();
    println!(
        "(\"{base} ÷ other\": the median of per-round ratios, oriented so that > 1 means {base} is better)"
    );
    let mut json = String::from("{\"rows\":[");
    for (row, per_peer) in results.iter().enumerate() {
        let Some(&(label, len, qd, _, _)) = rows.get(row) else {
            continue;
        };
        println!("{label}");
        for (p, rounds) in per_peer.iter().enumerate() {
            let errors: u64 = rounds.iter().map(|r| r.errors + r.stalls).sum();
            ok &= errors == 0;
            let lat: Vec<u64> = rounds
                .iter()
                .flat_map(|r| r.latencies_ns.iter().copied())
                .collect();
            let iops = median(rounds.iter().map(CellResult::iops).collect());
            let mib = median(rounds.iter().map(CellResult::mib_s).collect());
            let cpu = median(
                rounds
                    .iter()
                    .map(|r| {
                        let (f, b) = r.cpu_us_per_request();
                        f + b
                    })
                    .collect(),
            );
            let backend_cpu = median(rounds.iter().map(|r| r.cpu_us_per_request().1).collect());
            // Ratio of the baseline to this peer, per round: > 1 means the baseline is better.
            let ratio = |f: &dyn Fn(&CellResult) -> f64, higher_better: bool| {
                let base_rounds = per_peer.first()?;
                Some(median(
                    base_rounds
                        .iter()
                        .zip(rounds)
                        .map(|(b, o)| {
                            if higher_better {
                                f(b) / f(o)
                            } else {
                                f(o) / f(b)
                            }
                        })
                        .collect(),
                ))
            };
            let metric: (&str, f64, Option<f64>) = if qd == 1 {
                (
                    "p50",
                    percentile_us(&lat, 0.5),
                    ratio(&|r| r.percentile_us(0.5), false),
                )
            } else if len <= 4096 {
                ("IOPS", iops, ratio(&|r| r.iops(), true))
            } else {
                ("MiB/s", mib, ratio(&|r| r.mib_s(), true))
            };
            let name = &peers[p].name;
            // p99 and backend CPU as ratios too (> 1: the baseline is better).
            let p99_ratio = ratio(&|r| r.percentile_us(0.99), false);
            let cpu_ratio = ratio(&|r| r.cpu_us_per_request().1, false);
            let vs = if p == 0 {
                String::new()
            } else {
                format!(
                    "  {base} ÷ {name}: {} {:.2}, p99 {:.2}, backend CPU {:.2}",
                    metric.0,
                    metric.2.unwrap_or(f64::NAN),
                    p99_ratio.unwrap_or(f64::NAN),
                    cpu_ratio.unwrap_or(f64::NAN)
                )
            };
            println!(
                "  {name:<22} {:>8.0} IOPS {:>8.1} MiB/s  p50 {:>7.1} µs  p99 {:>7.1} µs  CPU {:>6.1} µs/req (backend {:>5.1})  errors {errors}{vs}",
                iops,
                mib,
                percentile_us(&lat, 0.5),
                percentile_us(&lat, 0.99),
                cpu,
                backend_cpu
            );
            let fmt_ratio = |r: Option<f64>| {
                if p == 0 {
                    "null".to_string()
                } else {
                    format!("{:.3}", r.unwrap_or(f64::NAN))
                }
            };
            json.push_str(&format!(
                "{}{{\"row\":{label:?},\"backend\":{name:?},\"iops\":{iops:.0},\"mib_s\":{mib:.1},\"p50_us\":{:.2},\"p99_us\":{:.2},\"cpu_us_per_req\":{cpu:.2},\"backend_cpu_us_per_req\":{backend_cpu:.2},\"baseline_ratio\":{},\"p99_ratio\":{},\"backend_cpu_ratio\":{}}}",
                if row == 0 && p == 0 { "" } else { "," },
                percentile_us(&lat, 0.5),
                percentile_us(&lat, 0.99),
                fmt_ratio(metric.2),
                fmt_ratio(p99_ratio),
                fmt_ratio(cpu_ratio)
            ));
        }
    }
    json.push_str("]}");
    println!("{json}");
    Ok(ok)
}
