//! `ringfence bench`: every memory model on the virtio-blk read and write
//! paths, side by side, in one run.
//!
//! This process is the frontend VM; two backend processes serve the same
//! image, one sleeping on every doorbell and one polling before it sleeps.
//! Every cell (model × size × depth × direction × wake-up mode) runs once per
//! round, rounds interleaved, so a ratio is the median of ratios measured
//! moments apart. The floor of a QD1 cell is measured in the same rounds and
//! the same way as the path: a GET_ID round trip through the same processes,
//! queue and wake-up method, a page-cache pread/pwrite of the request size,
//! and the copies the model makes, as warm as the path has them.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use crate::bench_blk::{
    CellResult, Link, Mode, ModelKind, Rng, IMAGE_BYTE, MAX_QD, MAX_REQUEST, SECTOR,
};
use crate::bench_report::{Cell, Dir, Report, Sample};
use crate::{spawn_backend, TempDir};

/// Options of `ringfence bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Only check that every model moves correct data (for CI): no timing.
    #[arg(long)]
    quick: bool,
    /// Image size in MiB (kept in the page cache).
    #[arg(long, default_value_t = 256)]
    image_mib: u64,
    /// Rounds; every cell runs once per round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Time per cell per round, in milliseconds.
    #[arg(long, default_value_t = 150)]
    cell_ms: u64,
    /// How long both sides spin before sleeping in polling mode, in microseconds.
    #[arg(long, default_value_t = 50)]
    poll_us: u64,
    /// Models to measure (default: all).
    #[arg(long, value_delimiter = ',')]
    models: Vec<ModelKind>,
    /// Request sizes in bytes, multiples of 512 up to 1 MiB (default: 512 B to 1 MiB).
    #[arg(long, value_delimiter = ',')]
    sizes: Vec<usize>,
    /// Skip polling mode.
    #[arg(long)]
    no_poll: bool,
    /// Directory for the report (report.md, results.json, *.svg).
    #[arg(long, default_value = "bench-report")]
    out: PathBuf,
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
    /// vhost-user-blk backends (ours, qemu-storage-daemon, any other) driven
    /// from this process, compared in one run.
    VhostUser(crate::bench_vhost::VhostBenchArgs),
    /// The local bus against ivshmem: PING round trip and 4 KiB blk QD1.
    Bus(crate::bench_bus::BusBenchArgs),
}

const DEFAULT_SIZES: [usize; 7] = [
    512,
    4 << 10,
    16 << 10,
    64 << 10,
    128 << 10,
    256 << 10,
    1 << 20,
];

/// Backend processes, killed when dropped.
struct Backends(Vec<Child>);

impl Drop for Backends {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts `ringfence broker` and waits for its socket.
fn spawn_broker(socket: &std::path::Path) -> std::io::Result<Child> {
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .args(["broker", "--socket-path"])
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            return Err(std::io::Error::other("broker did not start"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

pub fn run(args: BenchArgs) -> Result<bool, Box<dyn std::error::Error>> {
    match args.device {
        Some(BenchDevice::Net(a)) => return crate::bench_net::run(a),
        Some(BenchDevice::Vsock(a)) => return crate::bench_vsock::run(a),
        Some(BenchDevice::VhostUser(a)) => return crate::bench_vhost::run(a),
        Some(BenchDevice::Bus(a)) => return crate::bench_bus::run(a),
        None => {}
    }
    let models = if args.models.is_empty() {
        ModelKind::ALL.to_vec()
    } else {
        args.models.clone()
    };
    let sizes = if args.sizes.is_empty() {
        DEFAULT_SIZES.to_vec()
    } else {
        args.sizes.clone()
    };
    if let Some(bad) = sizes
        .iter()
        .find(|&&s| s == 0 || s % SECTOR as usize != 0 || s > MAX_REQUEST)
    {
        return Err(format!("request size {bad}: not a multiple of 512 in 512..=1 MiB").into());
    }
    let dir = TempDir::new("bench")?;
    let image = dir.0.join("bench.img");
    let image_mib = args.image_mib.max(8);
    {
        // Real data, written once and left in the page cache.
        let f = File::create(&image)?;
        let chunk = vec![IMAGE_BYTE; 1 << 20];
        for i in 0..image_mib {
            f.write_all_at(&chunk, i << 20)?;
        }
        f.sync_all()?;
    }
    let span = image_mib << 20;
    let mut backends = Backends(Vec::new());
    let mut modes = vec![(Mode::Notify, 0u64)];
    if !args.no_poll {
        modes.push((Mode::Poll, args.poll_us));
    }
    // The hypervisor-copy model's third process, shared by both backends as
    // a hypervisor is shared by its VMs.
    let broker_socket = dir.0.join("broker.sock");
    let broker = if models.contains(&ModelKind::HvCopy) {
        let child = spawn_broker(&broker_socket)?;
        let pid = child.id();
        backends.0.push(child);
        Some((broker_socket.as_path(), pid))
    } else {
        None
    };
    let broker_arg = broker_socket.to_string_lossy().into_owned();
    let mut links = Vec::new();
    for &(mode, poll_us) in &modes {
        let socket = dir.0.join(format!("{}.sock", mode.name()));
        let poll = poll_us.to_string();
        let mut extra = vec!["--poll-us", poll.as_str()];
        if broker.is_some() {
            extra.extend(["--broker", broker_arg.as_str()]);
        }
        let child = spawn_backend(&socket, &image, &extra)?;
        let pid = child.id();
        backends.0.push(child);
        let spin = Duration::from_micros(poll_us);
        let link = Link::connect(&socket, pid, broker, mode, spin, &models)?;
        links.push(link);
    }
    // The device's word on its size, not the file's, bounds the offsets.
    let span = links
        .iter()
        .map(|l| l.capacity.saturating_mul(SECTOR))
        .fold(span, u64::min);
    if span < MAX_REQUEST as u64 * 16 {
        return Err(
            format!("device capacity of {span} bytes is too small for the benchmark").into(),
        );
    }
    if args.quick {
        return quick(&mut links, &models, span);
    }
    // Read and written by the floor's own page-cache I/O.
    let file = File::options().read(true).write(true).open(&image)?;
    let mut report = Report::new(&args_summary(&args, image_mib, &sizes, &models));
    let cell_time = Duration::from_millis(args.cell_ms.max(20));
    let rt_time = cell_time / 4;
    let started = Instant::now();
    for round in 0..args.rounds.max(1) {
        for link in &mut links {
            let crossover = calibrate(link, span);
            report.crossover(round, link.mode, crossover);
        }
        for &size in &sizes {
            if let Some(link) = links.first_mut() {
                for write in [false, true] {
                    report.floor_copy(round, size, Dir::of(write), link.copy_us(size, write, 400));
                }
            }
        }
        for link in &mut links {
            for write in [false, true] {
                for qd in [1usize, MAX_QD] {
                    for &size in &sizes {
                        for &model in &models {
                            let cell = Cell {
                                mode: link.mode,
                                dir: Dir::of(write),
                                qd,
                                size,
                                model,
                            };
                            if qd == 1 {
                                // The round-trip and file parts of this cell's
                                // floor, measured just before it: the same
                                // processes, queue and wake-up method with no
                                // data; the same page cache and file state.
                                let rt = link.round_trips(rt_time);
                                let io = link.file_io_us(&file, span, size, write, 100);
                                report.floor_rt(round, cell, rt.percentile_us(0.5));
                                report.floor_io(round, cell, io);
                            }
                            let mut rng = Rng::new(0x5eed ^ size as u64 ^ round as u64);
                            let slots = (span / size as u64).max(1);
                            let mut at = |_| (rng.next() % slots) * (size as u64 / SECTOR);
                            let r =
                                link.run(model, size, qd, write, cell_time, None, None, &mut at);
                            report.add(Sample {
                                round,
                                cell,
                                result: r,
                            });
                        }
                    }
                }
            }
        }
        eprintln!(
            "round {}/{} done ({:.0} s)",
            round + 1,
            args.rounds.max(1),
            started.elapsed().as_secs_f64()
        );
    }
    std::fs::create_dir_all(&args.out)?;
    let ok = report.write(&args.out)?;
    println!("{}", report.headline());
    println!("report: {}", args.out.join("report.md").display());
    Ok(ok)
}

fn args_summary(args: &BenchArgs, image_mib: u64, sizes: &[usize], models: &[ModelKind]) -> String {
    format!(
        "{} rounds × {} ms per cell; image {image_mib} MiB in the page cache; sizes {}; models {}; polling spins {} µs",
        args.rounds.max(1),
        args.cell_ms,
        sizes.iter().map(|s| crate::bench_report::size_label(*s)).collect::<Vec<_>>().join(", "),
        models.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
        args.poll_us
    )
}

/// Finds the smallest request size from which granting beats bouncing (QD1
/// read p50, in alternating short runs) and sets it as the adaptive model's
/// crossover; `None` if grants never win (everything is bounced).
fn calibrate(link: &mut Link, span: u64) -> Option<usize> {
    let sizes = [
        4usize << 10,
        16 << 10,
        64 << 10,
        128 << 10,
        256 << 10,
        1 << 20,
    ];
    let mut grant_wins = Vec::new();
    for &size in &sizes {
        let slots = (span / size as u64).max(1);
        let mut p50 = [0f64; 2];
        for (i, model) in [ModelKind::Bounce, ModelKind::Grant]
            .into_iter()
            .enumerate()
        {
            let mut rng = Rng::new(size as u64);
            let mut at = |_| (rng.next() % slots) * (size as u64 / SECTOR);
            let r = link.run(
                model,
                size,
                1,
                false,
                Duration::from_millis(25),
                None,
                None,
                &mut at,
            );
            p50[i] = if r.errors == 0 {
                r.percentile_us(0.5)
            } else {
                f64::INFINITY
            };
        }
        grant_wins.push(p50[1] < p50[0]);
    }
    // The smallest size from which grants win at every larger size too.
    let from = (0..sizes.len())
        .find(|&i| grant_wins.get(i..).is_some_and(|w| w.iter().all(|&x| x)))
        .and_then(|i| sizes.get(i).copied());
    link.set_crossover(from.unwrap_or(usize::MAX));
    from
}

/// CI mode: each model writes patterns and reads them back at several sizes
/// and depths; any error, mismatch or stall fails the run.
fn quick(
    links: &mut [Link],
    models: &[ModelKind],
    span: u64,
) -> Result<bool, Box<dyn std::error::Error>> {
    let mut ok = true;
    let mut base = 0u64;
    for link in links.iter_mut() {
        // Adaptive must take both paths: grant from 64 KiB.
        link.set_crossover(64 << 10);
        for &model in models {
            for (size, qd, count) in [
                (4096usize, 1usize, 64u64),
                (64 << 10, 4, 32),
                (1 << 20, 8, 16),
                // Deep and many: a grant must be visible to a worker that is
                // already in the middle of a batch.
                (256 << 10, MAX_QD, 256),
            ] {
                let sectors = size as u64 / SECTOR;
                if base + count * sectors > span / SECTOR {
                    base = 0;
                }
                let b = base;
                let seed = 0xC0FFEE ^ b;
                let mut at = |i: u64| b + i * sectors;
                let w = link.run(
                    model,
                    size,
                    qd,
                    true,
                    Duration::MAX,
                    Some(count),
                    Some(seed),
                    &mut at,
                );
                let mut at = |i: u64| b + i * sectors;
                let r = link.run(
                    model,
                    size,
                    qd,
                    false,
                    Duration::MAX,
                    Some(count),
                    Some(seed),
                    &mut at,
                );
                base += count * sectors;
                let good = |c: &CellResult| c.errors == 0 && c.stalls == 0 && c.requests == count;
                let pass = good(&w) && good(&r) && r.mismatches == 0;
                ok &= pass;
                println!(
                    "{:<6} {:<10} {:>6} QD{:<2} x{count:<3} write+read {}",
                    link.mode.name(),
                    model.name(),
                    crate::bench_report::size_label(size),
                    qd,
                    if pass {
                        "verified".to_string()
                    } else {
                        format!(
                            "FAILED (errors {}+{}, stalls {}+{}, mismatches {})",
                            w.errors, r.errors, w.stalls, r.stalls, r.mismatches
                        )
                    }
                );
            }
        }
        println!(
            "{:<6} bytes copied by bounce: {} KiB; by in-window/full-share/grant: {} / {} / {}",
            link.mode.name(),
            link.bytes_copied(ModelKind::Bounce) / 1024,
            link.bytes_copied(ModelKind::InWindow),
            link.bytes_copied(ModelKind::FullShare),
            link.bytes_copied(ModelKind::Grant),
        );
    }
    println!(
        "bench --quick: {}",
        if ok {
            "every model moved correct data"
        } else {
            "FAILED"
        }
    );
    Ok(ok)
}
