//! `ringfence vhost-user`: the same device models for QEMU/KVM guests.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;

use std::sync::Arc;

use ringfence_vhost_user::{
    serve_listener_with_enable_shim, BackendChannel, MemoryPolicy, VhostUserDevice,
};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend::{install_signal_handlers, sandbox, STOP};
use crate::devices::{open, DeviceArgs};

/// Options of `ringfence vhost-user`.
#[derive(Debug, clap::Args)]
pub struct VhostUserArgs {
    /// Unix socket QEMU connects to (`-chardev socket,path=...`).
    #[arg(long)]
    pub socket_path: Option<PathBuf>,
    /// Serve on this inherited, listening Unix socket instead (as
    /// qemu-storage-daemon's `addr.type=fd`). Under systemd socket
    /// activation (`LISTEN_FDS`/`LISTEN_PID`) neither option is needed.
    #[arg(long, conflicts_with = "socket_path")]
    pub socket_fd: Option<i32>,
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
    /// Do not offer in-flight tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD).
    /// A device that completes out of order (blk with --aio io_uring) then
    /// loses or repeats requests when it is restarted under load; for
    /// showing exactly that, and for frontends that mishandle the feature.
    #[arg(long)]
    pub no_inflight_tracking: bool,
    /// The device to serve.
    #[command(subcommand)]
    pub device: DeviceArgs,
}

pub fn run(args: VhostUserArgs) -> Result<bool, Box<dyn std::error::Error>> {
    install_signal_handlers();
    let template = open(&args.device)?;
    // The one instance keeps its rings across connections (each queue
    // returns its ring when it stops).
    crate::backend::prepare_template(&template, 1);
    let device = template.instance()?;
    let policy = if args.shared_window {
        MemoryPolicy::SharedWindow {
            max_bytes: args.window_max_mib << 20,
        }
    } else {
        MemoryPolicy::FullShare
    };
    let backend = VhostUserDevice::new(device, policy);
    if args.no_inflight_tracking {
        backend.without_inflight_tracking();
    }
    let inflight = backend.inflight_slot();
    let (listener, socket) = listener(&args)?;
    // The backend-request channel of whichever connection is live: the
    // device's config changes (console resized, image grown) go out on it.
    let channel = Arc::new(BackendChannel::default());
    let notify = channel.clone();
    backend.set_config_notifier(Some(Arc::new(move || match notify.config_changed() {
        Ok(true) => tracing::info!("config change sent to the frontend"),
        Ok(false) => tracing::debug!("config changed; the frontend gave no channel"),
        Err(e) => tracing::warn!(error = %e, "config change not delivered"),
    })));
    // vhost-user-backend blocks in accept/recv; leave promptly on SIGTERM/SIGINT.
    std::thread::spawn(move || loop {
        if STOP.load(Ordering::SeqCst) {
            tracing::info!("signal received, exiting");
            if let Some(socket) = &socket {
                let _ = std::fs::remove_file(socket);
            }
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
    sandbox(
        ringfence_sandbox::Profile::VhostUser,
        std::slice::from_ref(&args.device),
        args.no_sandbox,
        ringfence_sandbox::Extras {
            // GET_INFLIGHT_FD makes a memfd.
            memfd: inflight.enabled(),
            ..Default::default()
        },
    )?;
    tracing::info!(?policy, "vhost-user backend listening");
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
        // Every connection goes through the shim: it holds QEMU's early
        // SET_VRING_ENABLEs (vhost-user-net) and signals each new call fd
        // once, as libvhost-user does (see ringfence_vhost_user::shim).
        match serve_listener_with_enable_shim(&mut daemon, &listener, &channel, &inflight) {
            Ok(()) => tracing::info!("frontend disconnected"),
            Err(e) => tracing::warn!(error = %e, "connection ended with an error"),
        }
        if args.once {
            return Ok(true);
        }
    }
}

/// The listening socket: inherited (`--socket-fd`, or systemd's
/// `LISTEN_FDS` with `LISTEN_PID` naming us: fd 3), or bound at
/// `--socket-path` (returned too, to be removed on exit).
fn listener(
    args: &VhostUserArgs,
) -> Result<(Listener, Option<PathBuf>), Box<dyn std::error::Error>> {
    let inherited = args.socket_fd.or_else(systemd_listen_fd);
    if let Some(fd) = inherited {
        check_listening_unix_socket(fd)?;
        // SAFETY: `fd` is a listening Unix socket (checked above) that this
        // process inherited and nothing else in it owns.
        let l = unsafe { UnixListener::from_raw_fd(fd) };
        // Accept blocks between frontends (a non-blocking listener would
        // make vhost's accept loop spin), and no child inherits it.
        l.set_nonblocking(false)
            .map_err(|e| format!("socket fd {fd}: {e}"))?;
        // SAFETY: FD_CLOEXEC on a descriptor we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        return Ok((Listener::from(l), None));
    }
    let path = args.socket_path.clone().ok_or(
        "--socket-path, --socket-fd or systemd socket activation (LISTEN_FDS) is required",
    )?;
    let l = Listener::new(&path, true).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((l, Some(path)))
}

/// systemd socket activation: the first passed socket, fd 3, when
/// `LISTEN_PID` is this process. The variables are removed so that no
/// child takes them for its own.
fn systemd_listen_fd() -> Option<i32> {
    let pid = std::env::var("LISTEN_PID").ok()?.parse::<u32>().ok()?;
    let fds = std::env::var("LISTEN_FDS").ok()?.parse::<u32>().ok()?;
    std::env::remove_var("LISTEN_PID");
    std::env::remove_var("LISTEN_FDS");
    std::env::remove_var("LISTEN_FDNAMES");
    (pid == std::process::id() && fds >= 1).then_some(3)
}

/// Refuses anything but a listening Unix stream socket.
fn check_listening_unix_socket(fd: i32) -> Result<(), String> {
    let mut domain: libc::c_int = 0;
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `domain`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            (&mut domain as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(format!(
            "socket fd {fd} is not a listening Unix socket: {}",
            std::io::Error::last_os_error()
        ));
    }
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above, into `listening`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above, into `ty`.
    let r2 = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            (&mut ty as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    // vhost-user is a byte stream: a SEQPACKET listener would break framing.
    if r != 0 || r2 != 0 || domain != libc::AF_UNIX || ty != libc::SOCK_STREAM || listening == 0 {
        return Err(format!("socket fd {fd} is not a listening Unix socket"));
    }
    Ok(())
}
