//! `ringfence backend`: serve devices on a local-bus endpoint.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ringfence_blk::{Blk, BlkOptions};
use ringfence_bus_local::{Listener, LocalBusConfig, LocalDeviceBus};
use ringfence_device::VirtioDevice;
use ringfence_msg_device::{Backend, BackendStats};

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
    /// Unix socket the frontend connects to.
    #[arg(long)]
    pub socket_path: PathBuf,
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
    /// The device to serve.
    #[command(subcommand)]
    pub device: DeviceArgs,
}

/// Devices the backend can serve.
#[derive(Debug, clap::Subcommand)]
pub enum DeviceArgs {
    /// virtio-blk backed by a raw image.
    Blk {
        /// Raw disk image.
        #[arg(long)]
        image: PathBuf,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Request queues (VIRTIO_BLK_F_MQ when > 1).
        #[arg(long, default_value_t = 1)]
        num_queues: u16,
        /// Queue size offered.
        #[arg(long, default_value_t = 256)]
        queue_size: u16,
    },
}

/// Opens the device model the command line names.
pub fn build_device(
    args: &DeviceArgs,
) -> Result<Box<dyn VirtioDevice>, Box<dyn std::error::Error>> {
    Ok(DeviceTemplate::open(args)?.instance()?)
}

/// Installs the seccomp allow-list of `profile` unless told not to.
pub fn sandbox(
    profile: ringfence_sandbox::Profile,
    disabled: bool,
) -> Result<(), ringfence_sandbox::SandboxError> {
    if disabled {
        tracing::warn!("running without the seccomp sandbox");
        return Ok(());
    }
    let allowed = ringfence_sandbox::install(profile)?;
    tracing::info!(?profile, allowed, "seccomp sandbox installed");
    Ok(())
}

/// Devices opened at start; each connection gets its own instances.
pub enum DeviceTemplate {
    /// A block device on its image.
    Blk(Blk),
}

impl DeviceTemplate {
    /// Opens what the command line names.
    pub fn open(args: &DeviceArgs) -> Result<Self, Box<dyn std::error::Error>> {
        Ok(match args {
            DeviceArgs::Blk {
                image,
                read_only,
                num_queues,
                queue_size,
            } => DeviceTemplate::Blk(Blk::open(
                image,
                BlkOptions {
                    read_only: *read_only,
                    num_queues: *num_queues,
                    queue_size: *queue_size,
                    ..Default::default()
                },
            )?),
        })
    }

    /// A fresh device instance for one connection.
    pub fn instance(&self) -> std::io::Result<Box<dyn VirtioDevice>> {
        Ok(match self {
            DeviceTemplate::Blk(b) => Box::new(b.try_clone()?),
        })
    }
}

pub fn run(args: BackendArgs) -> Result<(), Box<dyn std::error::Error>> {
    install_signal_handlers();
    // The image is opened once, here: each connection gets its own device
    // instance on a duplicate of it, and the sandbox forbids opening files.
    let template = DeviceTemplate::open(&args.device)?;
    let cfg = LocalBusConfig {
        max_msg_size: args.max_msg_size,
        doorbells: !args.no_doorbells,
        handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
        ..Default::default()
    };
    let listener = Listener::bind(&args.socket_path)?;
    sandbox(ringfence_sandbox::Profile::Backend, args.no_sandbox)?;
    tracing::info!(socket = %args.socket_path.display(), pid = std::process::id(), max_connections = args.max_connections, "backend listening");
    let stats = Arc::new(BackendStats::default());
    let active = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicBool::new(false));
    let args = Arc::new(args);
    let template = Arc::new(template);
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
        let (args, template, stats, slot, finished) = (
            args.clone(),
            template.clone(),
            stats.clone(),
            active.clone(),
            finished.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .spawn(move || {
                if let Err(e) = serve_connection(&args, &template, sock, cfg, &stats) {
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

/// Serves one frontend with device instances of its own.
fn serve_connection(
    args: &BackendArgs,
    template: &DeviceTemplate,
    sock: ringfence_bus_local::Seqpacket,
    cfg: LocalBusConfig,
    stats: &Arc<BackendStats>,
) -> Result<(), Box<dyn std::error::Error>> {
    tracing::info!("frontend connected");
    let device = template.instance()?;
    let bus = Arc::new(LocalDeviceBus::new(sock, cfg)?);
    let mut backend = Backend::with_stats(vec![device], stats.clone());
    backend.set_poll(Duration::from_micros(args.poll_us));
    backend.serve(bus)?;
    Ok(())
}
