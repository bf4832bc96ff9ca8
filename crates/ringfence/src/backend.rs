//! `ringfence backend`: serve devices on a local-bus endpoint.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringfence_bus_local::{Listener, LocalBusConfig, LocalDeviceBus};
use ringfence_msg_device::{Backend, BackendStats};

use crate::devices::{open, parse_config, parse_spec, DeviceArgs, DeviceTemplate, SpecError};

pub(crate) static STOP: AtomicBool = AtomicBool::new(false);
/// Set by SIGUSR1: print the counters now.
static DUMP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    if sig == libc::SIGUSR1 {
        DUMP.store(true, Ordering::SeqCst);
    } else {
        STOP.store(true, Ordering::SeqCst);
    }
}

/// Installs SIGTERM/SIGINT (stop) and SIGUSR1 (print the counters)
/// handlers without SA_RESTART, so blocking calls return EINTR.
pub fn install_signal_handlers() {
    // SAFETY: sigaction with a handler that only stores to an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1] {
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Options of `ringfence backend`.
#[derive(Debug, clap::Args)]
pub struct BackendArgs {
    /// Unix socket the frontend connects to (with `--bus ivshmem`: the
    /// ivshmem server socket that QEMU's `ivshmem-doorbell` chardev or a
    /// Ringfence frontend connects to).
    #[arg(long)]
    pub socket_path: PathBuf,
    /// The bus: `local` (memfd windows, seqpacket messages) or `ivshmem`
    /// (Ringfence is the ivshmem server and peer 0; 64-byte messages in the
    /// shared memory; the driver's RAM shared whole).
    #[arg(long, value_enum, default_value_t = BusKind::Local)]
    pub bus: BusKind,
    /// With `--bus ivshmem`: the driver's RAM file (QEMU's
    /// `memory-backend-file,share=on,mem-path=...`), mapped whole; addresses
    /// are its guest-physical addresses (q35 layout, RAM below 2.75 GiB).
    #[arg(long, value_name = "FILE")]
    pub guest_ram: Option<PathBuf>,
    /// With `--bus ivshmem`: bytes of ivshmem shared memory (a power of two;
    /// QEMU's device takes its size from the server).
    #[arg(long, default_value_t = 1 << 20)]
    pub shm_size: usize,
    /// With `--bus ivshmem`: interrupt vectors per peer (QEMU's
    /// `ivshmem-doorbell,vectors=N` must be at least this).
    #[arg(long, default_value_t = 1)]
    pub vectors: usize,
    /// Largest bus message in bytes (48..=65536; the spec recommends at most 264).
    #[arg(long, default_value_t = 264)]
    pub max_msg_size: usize,
    /// Carry EVENT_AVAIL/EVENT_USED in-band instead of eventfd doorbells.
    #[arg(long)]
    pub no_doorbells: bool,
    /// Microseconds a queue worker keeps polling for new requests before
    /// sleeping (0, the default: sleep on every doorbell; polling trades a CPU
    /// for latency, which a 2-CPU machine cannot spare).
    #[arg(long, default_value_t = 0)]
    pub poll_us: u64,
    /// Offer grants for copy (the hypervisor-copy model): the broker at
    /// this socket (`ringfence broker`) copies between a frontend's granted
    /// pages and this backend's own staging memory, which it never maps.
    #[arg(long, value_name = "SOCKET")]
    pub broker: Option<PathBuf>,
    /// Exit after the first frontend disconnects.
    #[arg(long)]
    pub once: bool,
    /// Frontends served at once, each on its own thread with its own device
    /// instances; further connections are closed at once.
    #[arg(long, default_value_t = 8)]
    pub max_connections: usize,
    /// Milliseconds a new connection has to send the bus VERSION handshake.
    #[arg(long, default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Do not install the seccomp allow-list after set-up (for debugging).
    #[arg(long)]
    pub no_sandbox: bool,
    /// A device to serve, as `kind,key=value,...` with the options of the
    /// device's subcommand (`net,tap=rf0`, `console,pty`, `rng,rate-limit=65536`);
    /// repeat for several devices (numbered 1, 2, ... in order: --config
    /// devices first, then --device, then the subcommand).
    #[arg(long = "device", value_name = "SPEC")]
    pub devices: Vec<String>,
    /// TOML file with one `[[device]]` table per device (`type = "blk"`,
    /// then the device's options).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// One more device, given as a subcommand with its options.
    #[command(subcommand)]
    pub device: Option<DeviceArgs>,
}

/// Which bus a backend or frontend speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BusKind {
    /// The local bus.
    Local,
    /// virtio-msg over ivshmem.
    Ivshmem,
}

/// Every device the command line names, in device-number order.
pub fn device_list(
    config: Option<&std::path::Path>,
    specs: &[String],
    sub: Option<&DeviceArgs>,
) -> Result<Vec<DeviceArgs>, SpecError> {
    let mut list = match config {
        Some(path) => parse_config(path)?,
        None => Vec::new(),
    };
    for spec in specs {
        list.push(parse_spec(spec)?);
    }
    list.extend(sub.cloned());
    Ok(list)
}

/// Installs the seccomp allow-list of `profile` unless told not to.
pub fn sandbox(
    profile: ringfence_sandbox::Profile,
    devices: &[DeviceArgs],
    disabled: bool,
    more: ringfence_sandbox::Extras,
) -> Result<(), ringfence_sandbox::SandboxError> {
    if disabled {
        tracing::warn!("running without the seccomp sandbox");
        return Ok(());
    }
    let mut extras = more;
    for d in devices {
        match d {
            DeviceArgs::Rng {
                rate_limit: Some(_),
            } => extras.timers = true,
            DeviceArgs::Console {
                socket: Some(_), ..
            }
            | DeviceArgs::Net { .. } => extras.epoll = true,
            DeviceArgs::Blk {
                aio: ringfence_blk::Aio::IoUring,
                ..
            } => extras.io_uring = true,
            DeviceArgs::Vsock { .. } => {
                extras.epoll = true;
                extras.unix_connect = true;
            }
            _ => {}
        }
    }
    let allowed = ringfence_sandbox::install_with(profile, extras)?;
    tracing::info!(?profile, allowed, "seccomp sandbox installed");
    Ok(())
}

/// Makes, before the sandbox forbids it, what `instances` instances of
/// `template` need (io_uring rings); a failure leaves those instances to
/// run without (aio sync), with a warning.
pub fn prepare_template(template: &DeviceTemplate, instances: usize) {
    match template.prepare(instances) {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            kind = template.kind(),
            rings = n,
            "io_uring rings made before the sandbox"
        ),
        Err(e) => {
            tracing::warn!(kind = template.kind(), error = %e, "io_uring rings not made: queues without one run aio sync")
        }
    }
}

pub fn run(args: BackendArgs) -> Result<(), Box<dyn std::error::Error>> {
    install_signal_handlers();
    // The image is opened once, here: each connection gets its own device
    // instance on a duplicate of it, and the sandbox forbids opening files.
    let list = device_list(args.config.as_deref(), &args.devices, args.device.as_ref())?;
    if list.is_empty() {
        return Err("no device to serve: give --device, --config or a device subcommand".into());
    }
    let templates = list.iter().map(open).collect::<Result<Vec<_>, _>>()?;
    for (n, t) in templates.iter().enumerate() {
        tracing::info!(dev_num = n + 1, kind = t.kind(), "device ready");
    }
    if args.bus == BusKind::Ivshmem {
        return run_ivshmem(&args, &list, &templates);
    }
    let cfg = LocalBusConfig {
        max_msg_size: args.max_msg_size,
        doorbells: !args.no_doorbells,
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        ..Default::default()
    };
    let listener = Listener::bind(&args.socket_path)?;
    for t in &templates {
        prepare_template(t, args.max_connections);
    }
    sandbox(
        ringfence_sandbox::Profile::Backend,
        &list,
        args.no_sandbox,
        ringfence_sandbox::Extras {
            broker: args.broker.is_some(),
            ..Default::default()
        },
    )?;
    tracing::info!(socket = %args.socket_path.display(), pid = std::process::id(), max_connections = args.max_connections, "backend listening");
    let stats = Arc::new(BackendStats::default());
    let active = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let args = Arc::new(args);
    let templates = Arc::new(templates);
    while !(STOP.load(Ordering::SeqCst) || args.once && finished.load(Ordering::SeqCst)) {
        if DUMP.swap(false, Ordering::SeqCst) {
            println!("backend stats: {stats}");
        }
        let sock = match listener.accept(Some(Duration::from_millis(200))) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        if active.load(Ordering::SeqCst) >= args.max_connections {
            stats.connections_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                max = args.max_connections,
                "connection limit reached: frontend refused"
            );
            continue; // dropping the socket closes it
        }
        active.fetch_add(1, Ordering::SeqCst);
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (args, templates, stats, slot, finished) = (
            args.clone(),
            templates.clone(),
            stats.clone(),
            active.clone(),
            finished.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .spawn(move || {
                if let Err(e) = serve_connection(&args, &templates, sock, cfg, &stats) {
                    stats.connections_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "connection ended with an error");
                }
                slot.fetch_sub(1, Ordering::SeqCst);
                finished.store(true, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::error!(error = %e, "cannot start a connection thread");
        }
    }
    // With --once, let the connection's teardown (device reset) finish first.
    while args.once && active.load(Ordering::SeqCst) > 0 && !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("backend stats: {stats}");
    Ok(())
}

/// `--bus ivshmem`: one driver (a VM or a Ringfence frontend) at a time,
/// each with fresh device instances.
fn run_ivshmem(
    args: &BackendArgs,
    list: &[DeviceArgs],
    templates: &[DeviceTemplate],
) -> Result<(), Box<dyn std::error::Error>> {
    let ram_path = args
        .guest_ram
        .as_ref()
        .ok_or("--bus ivshmem needs --guest-ram FILE (the driver's RAM)")?;
    let ram = ringfence_bus_ivshmem::map_guest_ram(ram_path)?;
    let mut server =
        ringfence_bus_ivshmem::IvshmemServer::bind(&args.socket_path, args.shm_size, args.vectors)?;
    // One driver at a time: one instance's rings, returned after each session.
    for t in templates {
        prepare_template(t, 1);
    }
    sandbox(
        ringfence_sandbox::Profile::Backend,
        list,
        args.no_sandbox,
        ringfence_sandbox::Extras {
            memfd: true,
            ..Default::default()
        },
    )?;
    tracing::info!(socket = %args.socket_path.display(), pid = std::process::id(), shm_size = args.shm_size, vectors = args.vectors, "ivshmem server listening (device side is peer 0)");
    let stats = Arc::new(BackendStats::default());
    let stop = || STOP.load(Ordering::SeqCst);
    loop {
        let bus = match server.accept(Some(ram.clone()), &stop) {
            Ok(Some(bus)) => bus,
            Ok(None) => break,
            Err(e) => {
                // A client that left during set-up, or out of descriptors:
                // the server serves on.
                stats.connections_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "ivshmem client set-up failed");
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let ivshmem = bus.stats();
        let devices = templates
            .iter()
            .map(DeviceTemplate::instance)
            .collect::<Result<Vec<_>, _>>()?;
        let mut backend = Backend::with_stats(devices, stats.clone());
        backend.set_poll(Duration::from_micros(args.poll_us));
        // Served on its own thread, so that SIGTERM ends the process even
        // while a client stays connected.
        let served = std::thread::Builder::new()
            .name("ivshmem".into())
            .spawn(move || backend.serve(Arc::new(bus)))?;
        while !served.is_finished() && !stop() {
            if DUMP.swap(false, Ordering::SeqCst) {
                println!("backend stats: {stats}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !served.is_finished() {
            break;
        }
        if let Ok(Err(e)) = served.join() {
            stats.connections_failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "ivshmem driver connection failed");
        }
        tracing::info!(
            doorbells = ivshmem.doorbells.load(Ordering::Relaxed),
            messages = ivshmem.messages.load(Ordering::Relaxed),
            corrupt_indices = ivshmem.corrupt_indices.load(Ordering::Relaxed),
            "ivshmem driver detached"
        );
        if args.once {
            break;
        }
    }
    println!("backend stats: {stats}");
    Ok(())
}

/// Serves one frontend with device instances of its own.
fn serve_connection(
    args: &BackendArgs,
    templates: &[DeviceTemplate],
    sock: ringfence_bus_local::Seqpacket,
    cfg: LocalBusConfig,
    stats: &Arc<BackendStats>,
) -> Result<(), Box<dyn std::error::Error>> {
    tracing::info!("frontend connected");
    let devices = templates
        .iter()
        .map(DeviceTemplate::instance)
        .collect::<Result<Vec<_>, _>>()?;
    let mut bus = LocalDeviceBus::new(sock, cfg)?;
    if let Some(path) = &args.broker {
        bus = bus.with_broker(path.clone());
    }
    let bus = Arc::new(bus);
    let mut backend = Backend::with_stats(devices, stats.clone());
    backend.set_poll(Duration::from_micros(args.poll_us));
    backend.serve(bus)?;
    Ok(())
}
