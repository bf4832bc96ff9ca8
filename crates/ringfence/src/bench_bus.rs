//! `ringfence bench bus`: the same device over two buses, in one run — the
//! local bus (seqpacket messages, eventfd doorbells) and ivshmem (64-byte
//! messages in shared-memory queues, one doorbell per message batch) — on a
//! PING round trip and on 4 KiB virtio-blk reads at QD1, interleaved rounds.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_bus::DriverBus;
use ringfence_bus_ivshmem::{map_guest_ram, IvshmemDriverBus};
use ringfence_bus_local::{LocalBusConfig, LocalDriverBus};
use ringfence_virtio_msg::{decode, Body, Message};

use crate::bench_blk::{percentile_us, Link, Mode, ModelKind, SECTOR};
use crate::{spawn_backend, TempDir};

/// Arguments of `ringfence bench bus`.
#[derive(Debug, clap::Args)]
pub struct BusBenchArgs {
    /// Rounds (each measures both buses).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Milliseconds per measurement.
    #[arg(long, default_value_t = 200)]
    pub cell_ms: u64,
}

fn wait_for(path: &Path, child: &mut Child) -> Result<(), Box<dyn std::error::Error>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            return Err(format!("no socket at {}", path.display()).into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// PING round trips on a fresh bus for `duration`; nanoseconds each.
fn pings(bus: &dyn DriverBus, duration: Duration) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut msg = [0u8; 64];
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < duration {
        n = n.wrapping_add(1);
        let len = Message {
            dev_num: 0,
            token: n as u16,
            body: Body::Ping { data: n },
        }
        .encode(&mut msg)?;
        let t = Instant::now();
        bus.send(msg.get(..len).unwrap_or(&[]))?;
        loop {
            let got = bus
                .recv(&mut buf, Some(Duration::from_secs(2)))?
                .ok_or("no PONG within 2 s")?;
            if let Ok(m) = decode(buf.get(..got).unwrap_or(&[])) {
                if m.body == (Body::Pong { data: n }) {
                    break;
                }
            }
        }
        out.push(t.elapsed().as_nanos() as u64);
    }
    Ok(out)
}

struct Killed(Vec<Child>);
impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn run(args: BusBenchArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let dir = TempDir::new("bench-bus")?;
    let image = dir.0.join("disk.img");
    {
        let f = File::create(&image)?;
        let chunk = vec![0x5Au8; 1 << 20];
        for i in 0..64u64 {
            f.write_all_at(&chunk, i << 20)?;
        }
    }
    let ram = dir.0.join("ram");
    File::create(&ram)?.set_len(96 << 20)?;
    let (local_sock, iv_sock) = (dir.0.join("local.sock"), dir.0.join("ivshmem.sock"));
    let mut children = Killed(Vec::new());
    children.0.push(spawn_backend(&local_sock, &image, &[])?);
    let mut iv = Command::new(std::env::current_exe()?)
        .args(["backend", "--bus", "ivshmem", "--once", "--socket-path"])
        .arg(&iv_sock)
        .arg("--guest-ram")
        .arg(&ram)
        .args(["blk", "--image"])
        .arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()?;
    wait_for(&iv_sock, &mut iv)?;
    let pids = vec![children.0[0].id(), iv.id()];
    children.0.push(iv);

    let local: Arc<dyn DriverBus> = Arc::new(LocalDriverBus::connect(
        &local_sock,
        LocalBusConfig::default(),
    )?);
    let ivshmem: Arc<dyn DriverBus> =
        Arc::new(IvshmemDriverBus::connect(&iv_sock, map_guest_ram(&ram)?)?);
    let buses = [("local", local), ("ivshmem", ivshmem)];
    let cell = Duration::from_millis(args.cell_ms.max(20));
    let rounds = args.rounds.max(1);
    // PING first, on the bare buses, in interleaved rounds.
    let mut ping_p50 = [Vec::new(), Vec::new()];
    for _ in 0..rounds {
        for (i, (_, bus)) in buses.iter().enumerate() {
            let rtts = pings(bus.as_ref(), cell)?;
            if let Some(v) = ping_p50.get_mut(i) {
                v.push(percentile_us(&rtts, 0.5));
            }
        }
    }
    // Then the same blk device through each, 4 KiB reads at QD1.
    let mut links = Vec::new();
    for ((_, bus), pid) in buses.iter().zip(&pids) {
        links.push(Link::over(
            bus.clone(),
            vec![*pid],
            Mode::Notify,
            Duration::ZERO,
            &[ModelKind::InWindow],
        )?);
    }
    let mut read_p50 = [Vec::new(), Vec::new()];
    let mut read_p99 = [Vec::new(), Vec::new()];
    let mut iops = [Vec::new(), Vec::new()];
    let mut errors = 0;
    for round in 0..rounds {
        for (i, link) in links.iter_mut().enumerate() {
            let mut x = round as u64 * 7919;
            let mut sector_of = |_| {
                x = (x + 4099) % ((48 << 20) / 4096);
                x * 4096 / SECTOR
            };
            let r = link.run(
                ModelKind::InWindow,
                4096,
                1,
                false,
                cell,
                None,
                None,
                &mut sector_of,
            );
            errors += r.errors + r.stalls;
            if let (Some(a), Some(b), Some(c)) =
                (read_p50.get_mut(i), read_p99.get_mut(i), iops.get_mut(i))
            {
                a.push(r.percentile_us(0.5));
                b.push(r.percentile_us(0.99));
                c.push(r.iops());
            }
        }
    }
    let ratios =
        |v: &[Vec<f64>; 2]| median(v[1].iter().zip(&v[0]).map(|(iv, lo)| iv / lo).collect());
    println!(
        "Buses, same device, same run ({rounds} rounds × {} ms, interleaved):",
        cell.as_millis()
    );
    println!("| figure | local bus | ivshmem | ivshmem ÷ local |\n|---|---|---|---|");
    let row = |name: &str, v: &[Vec<f64>; 2], unit: &str| {
        println!(
            "| {name} | {:.1} {unit} | {:.1} {unit} | {:.2} |",
            median(v[0].clone()),
            median(v[1].clone()),
            ratios(v)
        );
    };
    row("PING round trip p50", &ping_p50, "µs");
    row("4 KiB read QD1 p50", &read_p50, "µs");
    row("4 KiB read QD1 p99", &read_p99, "µs");
    row("4 KiB read QD1 IOPS", &iops, "");
    println!(
        "{{\"ping_p50_ratio\":{:.3},\"read4k_p50_ratio\":{:.3},\"read4k_iops_ratio\":{:.3},\"errors\":{errors}}}",
        ratios(&ping_p50),
        ratios(&read_p50),
        ratios(&iops)
    );
    Ok(errors == 0)
}
