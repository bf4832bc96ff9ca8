//! `ringfence vhost-user`: the same device models for QEMU/KVM guests.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ringfence_vhost_user::{serve_with_enable_shim, MemoryPolicy, VhostUserDevice};
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{install_signal_handlers, sandbox, STOP};
use crate::devices::{open, DeviceArgs};

/// Options of `ringfence vhost-user`.
#[derive(Debug, clap::Args)]
pub struct VhostUserArgs {
    /// Unix socket QEMU connects to (`-chardev socket,path=...`).
    #[arg(long)]
    pub socket_path: PathBuf,
    /// Restricted-memory mode: serve only a shared window, refuse a memory
    /// table larger than --window-max-mib (the guest must bounce its DMA there).
    #[arg(long)]
    pub shared_window: bool,
    /// Largest window accepted in restricted mode, in MiB.
    #[arg(long, default_value_t = 512)]
    pub window_max_mib: u64,
    /// Exit after the first frontend disconnects (default: wait for the next one).
    #[arg(long)]
    pub once: bool,
    /// Do not install the seccomp allow-list after set-up (for debugging).
    #[arg(long)]
    pub no_sandbox: bool,
    /// The device to serve.
    #[command(subcommand)]
    pub device: DeviceArgs,
}

pub fn run(args: VhostUserArgs) -> Result<bool, Box<dyn std::error::Error>> {
    install_signal_handlers();
    let device = open(&args.device)?.instance()?;
    let policy = if args.shared_window {
        MemoryPolicy::SharedWindow {
            max_bytes: args.window_max_mib << 20,
        }
    } else {
        MemoryPolicy::FullShare
    };
    let backend = VhostUserDevice::new(device, policy);
    // QEMU's vhost-user-net enables its rings before SET_FEATURES, which the
    // vhost crate refuses: net goes through the shim that holds those
    // messages back (see ringfence_vhost_user::shim).
    let enable_shim = matches!(args.device, DeviceArgs::Net { .. });
    let socket = args.socket_path.clone();
    // vhost-user-backend blocks in accept/recv; leave promptly on SIGTERM/SIGINT.
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            tracing::info!("signal received, exiting");
            let _ = std::fs::remove_file(&socket);
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    sandbox(
        ringfence_sandbox::Profile::VhostUser,
        std::slice::from_ref(&args.device),
        args.no_sandbox,
    )?;
    tracing::info!(socket = %args.socket_path.display(), ?policy, "vhost-user backend listening");
    loop {
        // A fresh daemon per connection: vhost-user-backend keeps ownership
        // state per daemon, and a new frontend (QEMU restarted, guest rebooted)
        // must start from scratch; the device model itself persists.
        let mut daemon = VhostUserDaemon::new(
            "ringfence-vhost-user".into(),
            backend.clone(),
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(|e| format!("vhost-user daemon: {e:?}"))?;
        backend.set_epoll_handlers(&daemon.get_epoll_handlers());
        let served = if enable_shim {
            serve_with_enable_shim(&mut daemon, &args.socket_path).map_err(|e| e.to_string())
        } else {
            daemon
                .serve(&args.socket_path)
                .map_err(|e| format!("{e:?}"))
        };
        match served {
            Ok(()) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!(error = %e, "connection ended with an error"),
        }
        if args.once {
            return Ok(true);
        }
    }
}
