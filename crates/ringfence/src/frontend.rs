//! `ringfence frontend`: attach over the bus, share one window, run
//! virtio-drivers' unmodified `VirtIOBlk` over the virtio-msg transport and the
//! bounce pool, and run a verified workload.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_bus::DriverBus;
use ringfence_bus_local::{LocalBusConfig, LocalDriverBus};
use ringfence_msg_driver::{
    discover, install_pool, BounceHal, BouncePool, BusMux, CompletionWaiter, MsgTransport,
};
use virtio_drivers::transport::DeviceType;

use crate::endpoints::{self, DeviceLink, EndpointArgs, EndpointError, Report, Stop};
use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, VirtIOBlk, SECTOR_SIZE};

/// Options of `ringfence frontend`.
#[derive(Debug, Clone, clap::Args)]
pub struct FrontendArgs {
    /// Unix socket of the backend.
    #[arg(long)]
    pub socket_path: PathBuf,
    /// The bus: `local` or `ivshmem` (attach to a Ringfence ivshmem server
    /// as a VM does; its whole RAM is then shared).
    #[arg(long, value_enum, default_value_t = crate::backend::BusKind::Local)]
    pub bus: crate::backend::BusKind,
    /// With `--bus ivshmem`: this frontend's RAM, a file the backend was
    /// given as `--guest-ram` (I/O buffers and rings live in it).
    #[arg(long, value_name = "FILE")]
    pub guest_ram: Option<PathBuf>,
    /// Size of the shared window in MiB (rings + bounce pool).
    #[arg(long, default_value_t = 8)]
    pub window_mib: usize,
    /// Largest bus message in bytes.
    #[arg(long, default_value_t = 264)]
    pub max_msg_size: usize,
    /// Carry notifications in-band instead of eventfd doorbells.
    #[arg(long)]
    pub no_doorbells: bool,
    /// MiB written and read back per request size.
    #[arg(long, default_value_t = 64)]
    pub mib_per_size: u64,
    /// Request sizes in KiB, comma separated.
    #[arg(long, default_value = "4,64,128", value_delimiter = ',')]
    pub sizes_kib: Vec<u64>,
    /// Requests in flight (VirtIOBlk's queue holds 16).
    #[arg(long, default_value_t = 8)]
    pub queue_depth: usize,
    /// Seed of the data pattern.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Microseconds to poll the used ring before sleeping on the notification
    /// (0, the default: interrupt-driven, like Linux's drivers; polling on both
    /// sides of a 2-CPU machine makes the two spinners fight for the CPUs).
    #[arg(long, default_value_t = 0)]
    pub poll_us: u64,
    /// Print the report as one JSON line.
    #[arg(long)]
    pub json: bool,
    /// Keep this marker in private memory during the run (isolation tests look for it).
    #[arg(long)]
    pub private_marker: Option<String>,
    /// Sleep this many ms after attaching, before the workload (tests inspect the backend meanwhile).
    #[arg(long, default_value_t = 0)]
    pub pause_ms: u64,
    /// Endpoints for local programs (instead of the built-in workload).
    #[command(flatten)]
    pub endpoints: crate::endpoints::EndpointArgs,
}

/// The remote disk as virtio-drivers drives it.
pub type Disk = VirtIOBlk<BounceHal, MsgTransport>;

/// Deterministic pattern: 8 bytes per (seed, byte offset), so any range can be regenerated.
pub(crate) fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let mut x = seed ^ (offset / 8 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

struct Slot {
    req: BlkReq,
    resp: BlkResp,
    buf: Vec<u8>,
    token: Option<u16>,
    started: Instant,
    sector: u64,
    write: bool,
}

#[derive(Debug, Default)]
pub struct PhaseResult {
    pub requests: u64,
    pub bytes: u64,
    pub elapsed: Duration,
    pub latencies_ns: Vec<u64>,
    pub mismatches: u64,
    pub errors: u64,
    /// Completions overdue by 2 ms, answered with a second notification.
    pub rekicks: u64,
}

impl PhaseResult {
    pub fn percentile_us(&mut self, p: f64) -> f64 {
        if self.latencies_ns.is_empty() {
            return 0.0;
        }
        self.latencies_ns.sort_unstable();
        let i = ((self.latencies_ns.len() - 1) as f64 * p).round() as usize;
        self.latencies_ns[i.min(self.latencies_ns.len() - 1)] as f64 / 1000.0
    }
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

fn slots_busy(slots: &[Slot]) -> bool {
    slots.iter().any(|s| s.token.is_some())
}

/// Runs `count` requests of `len` bytes at the sectors `sector_of(i)` with `qd` in flight.
#[allow(clippy::too_many_arguments)]
fn run_phase(
    disk: &mut Disk,
    waiter: &CompletionWaiter,
    write: bool,
    len: usize,
    count: u64,
    qd: usize,
    seed: u64,
    verify: bool,
    poll: Duration,
    sector_of: &dyn Fn(u64) -> u64,
) -> PhaseResult {
    let qd = qd.clamp(1, 16);
    let mut slots: Vec<Slot> = (0..qd)
        .map(|_| Slot {
            req: BlkReq::default(),
            resp: BlkResp::default(),
            buf: vec![0; len],
            token: None,
            started: Instant::now(),
            sector: 0,
            write,
        })
        .collect();
    let mut r = PhaseResult {
        latencies_ns: Vec::with_capacity(count as usize),
        ..Default::default()
    };
    let start = Instant::now();
    let mut next = 0u64;
    let mut done = 0u64;
    while done < count {
        // Submit into free slots.
        let mut in_flight = slots_busy(&slots);
        for slot in slots.iter_mut().filter(|s| s.token.is_none()) {
            if next >= count {
                break;
            }
            slot.sector = sector_of(next);
            if write {
                fill_pattern(seed, slot.sector * SECTOR_SIZE as u64, &mut slot.buf);
            }
            slot.started = Instant::now();
            // SAFETY: the slot's req/buf/resp stay in place and untouched until completion below.
            let t = unsafe {
                if write {
                    disk.write_blocks_nb(
                        slot.sector as usize,
                        &mut slot.req,
                        &slot.buf,
                        &mut slot.resp,
                    )
                } else {
                    disk.read_blocks_nb(
                        slot.sector as usize,
                        &mut slot.req,
                        &mut slot.buf,
                        &mut slot.resp,
                    )
                }
            };
            match t {
                Ok(t) => {
                    slot.token = Some(t);
                    in_flight = true;
                }
                // The ring is full: retry once something completes...
                Err(virtio_drivers::Error::QueueFull)
                    if in_flight || disk.peek_used().is_some() =>
                {
                    break
                }
                // ...unless nothing of ours is in flight: the ring is held by
                // requests the device never completed.
                Err(virtio_drivers::Error::QueueFull) => {
                    tracing::error!("queue full with no request of this phase in flight");
                    r.errors += 1;
                    r.elapsed = start.elapsed();
                    return r;
                }
                Err(e) => {
                    tracing::error!(error = %e, "submission failed");
                    r.errors += 1;
                    done += 1;
                }
            }
            next += 1;
        }
        // Complete whatever is used; sleep on the used notification otherwise.
        let mut progressed = false;
        while let Some(t) = disk.peek_used() {
            let Some(slot) = slots.iter_mut().find(|s| s.token == Some(t)) else {
                // A used id that is not in flight: the device lies about the
                // ring. Nothing used after it can be trusted either.
                tracing::error!(
                    used_id = t,
                    "device used a descriptor that is not in flight"
                );
                r.errors += 1;
                r.elapsed = start.elapsed();
                return r;
            };
            slot.token = None;
            // SAFETY: same buffers as passed to the *_nb call that returned `t`.
            let res = unsafe {
                if slot.write {
                    disk.complete_write_blocks(t, &slot.req, &slot.buf, &mut slot.resp)
                } else {
                    disk.complete_read_blocks(t, &slot.req, &mut slot.buf, &mut slot.resp)
                }
            };
            r.latencies_ns
                .push(slot.started.elapsed().as_nanos() as u64);
            if res.is_err() || slot.resp.status() != RespStatus::OK {
                r.errors += 1;
            } else if verify && !slot.write {
                let mut expect = vec![0u8; len];
                fill_pattern(seed, slot.sector * SECTOR_SIZE as u64, &mut expect);
                if expect != slot.buf {
                    r.mismatches += 1;
                }
            }
            r.requests += 1;
            r.bytes += len as u64;
            done += 1;
            progressed = true;
        }
        if !progressed && slots.iter().any(|s| s.token.is_some()) {
            let spin_until = Instant::now() + poll;
            while disk.peek_used().is_none() && Instant::now() < spin_until {
                std::hint::spin_loop();
            }
            if disk.peek_used().is_some() {
                continue;
            }
            // Sleep in short slices and kick again when a completion is overdue
            // by 2 ms: a descheduled backend makes this a harmless spurious kick,
            // and it rescues a lost one (virtio-drivers 0.13 reads avail_event
            // with no full barrier after publishing the avail index and compares
            // event indices without wrap-around).
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match waiter.wait(0, Duration::from_millis(2)) {
                    Ok(true) => break,
                    Ok(false) if disk.peek_used().is_some() => break,
                    Ok(false) if Instant::now() < deadline => {
                        r.rekicks += 1;
                        let _ = waiter.kick(0);
                    }
                    Ok(false) => {
                        tracing::error!("no completion within 10 s");
                        r.errors += 1;
                        r.elapsed = start.elapsed();
                        return r;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "waiting for completions failed");
                        r.errors += 1;
                        r.elapsed = start.elapsed();
                        return r;
                    }
                }
            }
        }
    }
    r.elapsed = start.elapsed();
    r
}

pub struct Attached {
    pub disk: Disk,
    pub waiter: CompletionWaiter,
    pub pool: &'static BouncePool,
    pub capacity_sectors: u64,
}

/// The bus, shared by every attached device.
pub struct Bus {
    /// Per-device views of the one bus connection.
    pub views: Vec<(u16, Arc<dyn DriverBus>)>,
    /// The bounce pool in the shared window.
    pub pool: &'static BouncePool,
}

/// Connects, lists the devices (GET_DEVICES), makes a mux view for each
/// and shares one window for all of them.
pub fn attach_bus(args: &FrontendArgs) -> Result<Bus, Box<dyn std::error::Error>> {
    let cfg = LocalBusConfig {
        max_msg_size: args.max_msg_size,
        doorbells: !args.no_doorbells,
        ..Default::default()
    };
    let bus: Arc<dyn DriverBus> = match args.bus {
        crate::backend::BusKind::Local => {
            Arc::new(LocalDriverBus::connect(&args.socket_path, cfg)?)
        }
        crate::backend::BusKind::Ivshmem => {
            let path = args
                .guest_ram
                .as_ref()
                .ok_or("--bus ivshmem needs --guest-ram FILE")?;
            let ram = ringfence_bus_ivshmem::map_guest_ram(path)?;
            Arc::new(ringfence_bus_ivshmem::IvshmemDriverBus::connect(
                &args.socket_path,
                ram,
            )?)
        }
    };
    let mux = BusMux::new(bus.clone());
    let devices = discover(mux.device(0).as_ref())?;
    if devices.is_empty() {
        return Err("no device on the bus".into());
    }
    // Every view exists before any device is spoken to: the mux drops
    // messages for a device number without one.
    let views = devices.iter().map(|&n| (n, mux.device(n))).collect();
    // On ivshmem the one area is the whole RAM (full share).
    let window = match args.bus {
        crate::backend::BusKind::Local => bus.share_area(args.window_mib << 20)?,
        crate::backend::BusKind::Ivshmem => bus.share_area(0)?,
    };
    let pool =
        install_pool(BouncePool::new(window)).map_err(|_| "bounce pool already installed")?;
    Ok(Bus { views, pool })
}

/// Attaches to the first block device on the bus.
pub fn attach(args: &FrontendArgs) -> Result<Attached, Box<dyn std::error::Error>> {
    let Bus { views, pool } = attach_bus(args)?;
    let mut found = None;
    for (dev_num, view) in views {
        let transport = MsgTransport::new(view, dev_num)?;
        if virtio_drivers::transport::Transport::device_type(&transport) == DeviceType::Block {
            found = Some((dev_num, transport));
            break;
        }
    }
    let (dev_num, transport) = found.ok_or("no block device on the bus")?;
    let waiter = transport.waiter();
    let disk = VirtIOBlk::<BounceHal, _>::new(transport);
    // The Transport trait cannot return errors: a failure during set-up
    // (refused features, a reset request, a device that stopped answering)
    // is kept by the transport and checked here.
    if let Some(failure) = waiter.failure() {
        return Err(format!("device set-up failed: {failure}").into());
    }
    let disk = disk.map_err(|e| format!("VirtIOBlk init: {e}"))?;
    let capacity_sectors = disk.capacity();
    tracing::info!(
        dev_num,
        capacity_sectors,
        window_mib = args.window_mib,
        "attached"
    );
    Ok(Attached {
        disk,
        waiter,
        pool,
        capacity_sectors,
    })
}

type EndpointFn = fn(DeviceLink, &EndpointArgs, &Stop) -> Result<Report, EndpointError>;

/// The endpoint asked for a device type, if any.
fn endpoint_for(ty: DeviceType, args: &EndpointArgs) -> Option<(&'static str, EndpointFn)> {
    match ty {
        DeviceType::Block if args.nbd_socket.is_some() => Some(("blk", endpoints::nbd::run)),
        DeviceType::Network if args.net_tap.is_some() => Some(("net", endpoints::net::run)),
        DeviceType::Console if args.console_pty || args.console_link.is_some() => {
            Some(("console", endpoints::console::run))
        }
        DeviceType::EntropySource if args.rng_out.is_some() => Some(("rng", endpoints::rng::run)),
        DeviceType::Socket if !args.vsock_listen.is_empty() || !args.vsock_forward.is_empty() => {
            Some(("vsock", endpoints::vsock::run))
        }
        _ => None,
    }
}

/// Runs an endpoint for every device that has one asked for, each on its
/// own thread, until a signal, the deadline, or until all have finished.
fn run_endpoints(args: &FrontendArgs) -> Result<bool, Box<dyn std::error::Error>> {
    crate::backend::install_signal_handlers();
    let Bus { views, .. } = attach_bus(args)?;
    let ep = &args.endpoints;
    let stop = Stop::new(
        ep.duration_s
            .map(|s| Instant::now() + Duration::from_secs(s)),
    );
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let mut running = Vec::new();
    for (dev_num, view) in views {
        if stop.stopped() {
            break;
        }
        // A device that does not describe itself is left alone; a kind
        // asked for and not attached is reported as missing below.
        let transport = match MsgTransport::new(view, dev_num) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(dev_num, error = %e, "device left alone: GET_DEVICE_INFO failed");
                continue;
            }
        };
        let ty = virtio_drivers::transport::Transport::device_type(&transport);
        let Some((name, run)) = endpoint_for(ty, ep) else {
            tracing::info!(dev_num, ?ty, "no endpoint asked for: device left alone");
            continue;
        };
        if running.contains(&name) {
            tracing::warn!(dev_num, name, "a second device of this kind: left alone");
            continue;
        }
        running.push(name);
        let waiter = transport.waiter();
        let link = DeviceLink {
            dev_num,
            transport,
            waiter,
        };
        let (ep, stop, done_tx) = (ep.clone(), stop.clone(), done_tx.clone());
        std::thread::Builder::new()
            .name(format!("ep-{name}"))
            .spawn(move || {
                let _span = tracing::info_span!("endpoint", name, dev = link.dev_num).entered();
                // A driver that panics on what a hostile device said ends
                // its own endpoint, reported, not the others.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(link, &ep, &stop)
                }))
                .unwrap_or_else(|panic| {
                    Err(EndpointError::Device {
                        what: "driver panicked",
                        detail: panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_default(),
                    })
                });
                let _ = done_tx.send((name, result));
            })?;
    }
    drop(done_tx);
    let asked = [
        ("blk", ep.nbd_socket.is_some()),
        ("net", ep.net_tap.is_some()),
        ("console", ep.console_pty || ep.console_link.is_some()),
        ("rng", ep.rng_out.is_some()),
        (
            "vsock",
            !ep.vsock_listen.is_empty() || !ep.vsock_forward.is_empty(),
        ),
    ];
    let mut ok = true;
    for (name, wanted) in asked {
        if wanted && !running.contains(&name) {
            println!("{name}: FAILED: the backend offers no usable {name} device");
            ok = false;
        }
    }
    let mut left = running.len();
    let mut grace: Option<Instant> = None;
    while left > 0 {
        match done_rx.recv_timeout(endpoints::WAIT_SLICE) {
            Ok((_, Ok(report))) => {
                left -= 1;
                println!("{}: {}", report.device, report.detail);
            }
            Ok((name, Err(e))) => {
                left -= 1;
                ok = false;
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(cause) = src {
                    msg.push_str(&format!(": {cause}"));
                    src = cause.source();
                }
                println!("{name}: FAILED: {msg}");
                // One failed device does not stop the others (only an
                // endpoint stuck in a driver's unbounded wait stops them
                // all, through its watchdog: the process must end).
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if stop.stopped() {
            stop.stop();
            let g = *grace.get_or_insert_with(|| Instant::now() + Duration::from_secs(5));
            if Instant::now() >= g {
                println!("{left} endpoint(s) did not stop within 5 s");
                ok = false;
                break;
            }
        }
    }
    Ok(ok)
}

pub fn run(args: FrontendArgs) -> Result<bool, Box<dyn std::error::Error>> {
    // A secret that lives only in this process's private memory.
    let marker = args
        .private_marker
        .as_ref()
        .map(|m| std::hint::black_box(m.repeat(64).into_bytes()));
    if args.endpoints.any() {
        let ok = run_endpoints(&args)?;
        drop(marker);
        return Ok(ok);
    }
    let Attached {
        mut disk,
        waiter,
        pool,
        capacity_sectors,
    } = attach(&args)?;
    if args.pause_ms > 0 {
        println!("attached pid={}", std::process::id());
        std::thread::sleep(Duration::from_millis(args.pause_ms));
    }
    let ok = workload(&mut disk, &waiter, pool, capacity_sectors, &args);
    drop(marker);
    Ok(ok)
}

fn workload_poll(args: &FrontendArgs) -> Duration {
    Duration::from_micros(args.poll_us)
}

fn workload(
    disk: &mut Disk,
    waiter: &CompletionWaiter,
    pool: &BouncePool,
    capacity: u64,
    args: &FrontendArgs,
) -> bool {
    let poll = workload_poll(args);
    let mut total = PhaseResult::default();
    let mut all_ok = true;
    let mut base_sector = 0u64;
    let mut lines = Vec::new();
    for &kib in &args.sizes_kib {
        let len = (kib * 1024) as usize;
        let sectors = (len / SECTOR_SIZE) as u64;
        let count = (args.mib_per_size << 20) / len as u64;
        if sectors == 0 || base_sector + count * sectors > capacity {
            eprintln!(
                "image too small for {} MiB of {kib} KiB requests",
                args.mib_per_size
            );
            return false;
        }
        let b = base_sector;
        let at = move |i: u64| b + i * sectors;
        let w = run_phase(
            disk,
            waiter,
            true,
            len,
            count,
            args.queue_depth,
            args.seed,
            false,
            poll,
            &at,
        );
        let mut r = run_phase(
            disk,
            waiter,
            false,
            len,
            count,
            args.queue_depth,
            args.seed,
            true,
            poll,
            &at,
        );
        let ok = w.errors == 0 && r.errors == 0 && r.mismatches == 0 && r.requests == count;
        all_ok &= ok;
        lines.push(format!(
            "  {kib:>4} KiB x{count:<6} write {:>8.1} MiB/s  read {:>8.1} MiB/s {:>8.0} IOPS  p50 {:>7.1} us  p99 {:>7.1} us  {}",
            w.mib_s(), r.mib_s(), r.iops(), r.percentile_us(0.5), r.percentile_us(0.99),
            if ok { "verified".to_string() } else { format!("FAILED ({} errors, {} mismatches)", w.errors + r.errors, r.mismatches) }
        ));
        for p in [w, r] {
            total.requests += p.requests;
            total.bytes += p.bytes;
            total.elapsed += p.elapsed;
            total.errors += p.errors;
            total.rekicks += p.rekicks;
            total.mismatches += p.mismatches;
            total.latencies_ns.extend(p.latencies_ns);
        }
        base_sector += count * sectors;
        if !ok {
            break; // the device misbehaved: do not drive it further
        }
    }
    // FLUSH makes the acknowledged writes durable. virtio-drivers waits for
    // it by spinning without a bound, so a device that never answers is met
    // by a watchdog that ends the process with an error.
    if all_ok {
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watched = done.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(10));
            if !watched.load(Ordering::SeqCst) {
                eprintln!("ringfence: no response to FLUSH within 10 s: device gone");
                std::process::exit(1);
            }
        });
        all_ok = disk.flush().is_ok();
        done.store(true, Ordering::SeqCst);
    }
    if let Some(failure) = waiter.failure() {
        eprintln!("ringfence: transport failure: {failure}");
        all_ok = false;
    }
    let s = pool.stats();
    let bounced = s.bytes_in.load(Ordering::Relaxed) + s.bytes_out.load(Ordering::Relaxed);
    let (p50, p99) = (total.percentile_us(0.5), total.percentile_us(0.99));
    if args.json {
        println!(
            "{{\"ok\":{all_ok},\"requests\":{},\"bytes\":{},\"mib_s\":{:.1},\"iops\":{:.0},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"bytes_bounced\":{bounced},\"window_bytes\":{},\"errors\":{},\"mismatches\":{},\"rekicks\":{}}}",
            total.requests, total.bytes, total.mib_s(), total.iops(), pool.size(), total.errors, total.mismatches, total.rekicks
        );
    } else {
        println!(
            "Ringfence virtio-blk over virtio-msg, every buffer bounced through the shared window"
        );
        for l in lines {
            println!("{l}");
        }
        println!("  requests      {}", total.requests);
        println!(
            "  data          {:.0} MiB written and read back, {:.1} MiB/s, {:.0} IOPS",
            total.bytes as f64 / 2f64.powi(21),
            total.mib_s(),
            total.iops()
        );
        println!(
            "  latency       p50 {p50:.1} us, p99 {p99:.1} us (QD {})",
            args.queue_depth
        );
        println!(
            "  bytes bounced {:.1} MiB ({} maps, {} pool exhaustions)",
            bounced as f64 / 2f64.powi(20),
            s.maps.load(Ordering::Relaxed),
            s.exhausted.load(Ordering::Relaxed)
        );
        println!(
            "  window        {} KiB shared; frontend private memory never shared",
            pool.size() / 1024
        );
        println!(
            "  result        {}",
            if all_ok {
                "OK: all data verified"
            } else {
                "FAILED"
            }
        );
    }
    all_ok
}
