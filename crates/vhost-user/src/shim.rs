//! Early-enable shim: lets QEMU's vhost-user-net talk to rust-vmm's
//! vhost-user backend with `VHOST_USER_F_PROTOCOL_FEATURES` negotiated.
//!
//! The two disagree on when `VHOST_USER_SET_VRING_ENABLE` may come. QEMU 10's
//! vhost-user-net sends it for its rings in `vhost_net_start`, before
//! `VHOST_USER_SET_FEATURES`. The `vhost` crate (0.18) checks the feature on
//! the *acked* virtio features, which only `SET_FEATURES` sets, answers
//! `InactiveFeature` and ends the connection; QEMU then falls back to
//! userspace virtio and the guest has no network. Offering the device
//! without the feature is no way out either: QEMU 10 refuses vhost-user-net
//! without it.
//!
//! [`serve_with_enable_shim`] therefore sits between the frontend and the
//! daemon and forwards whole messages, file descriptors included. Until a
//! `SET_FEATURES` has gone through, it holds every well-formed
//! `SET_VRING_ENABLE` and, when the frontend asked for a reply (REPLY_ACK),
//! acknowledges it itself. Right after forwarding `SET_FEATURES` it replays
//! the held messages in order, with `NEED_REPLY` cleared so that the backend
//! answers nothing the frontend no longer waits for. It replays instead of
//! dropping because, with PROTOCOL_FEATURES negotiated, rings start
//! disabled: dropping an early `enable = 1` would leave the device dead.
//!
//! A reset (`RESET_DEVICE`, `RESET_OWNER`) clears the daemon's acked
//! features, and QEMU's vhost-user-net follows it with `SET_VRING_ENABLE 0`
//! for its rings while stopping: the gate closes again until the next
//! `SET_FEATURES`.
//!
//! It also signals every call eventfd that `SET_VRING_CALL` installs, once,
//! as libvhost-user does: a frontend whose interrupt was lost across a
//! backend reconnect is woken and looks at the used ring (QEMU's
//! vhost-user-blk `idx` qtest waits for exactly that). A spurious interrupt
//! costs the driver one look; EVENT_IDX suppression is untouched after it.
//!
//! And it keeps the backend-request channel (`SET_BACKEND_REQ_FD`) open in a
//! [`BackendChannel`]: rust-vmm's daemon drops the channel it is given, so
//! QEMU would see it close at once ("Unexpected end-of-file") and the
//! backend could never tell it that the config changed.
//!
//! Everything else passes untouched. The frontend is hostile: every frame is
//! bounded (the `vhost` crate's own payload and descriptor limits, so the
//! shim refuses nothing the backend would accept), and a malformed one ends
//! the connection with an error.

use std::fs::File;
use std::hash::{BuildHasher, Hasher};
use std::io::ErrorKind;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;

use vhost::vhost_user::message::{
    VhostUserProtocolFeatures, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::bitmap::BitmapReplace;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};

use crate::inflight::{
    InflightDesc, InflightShm, InflightSlot, GET_INFLIGHT_FD, INFLIGHT_PAYLOAD_LEN, SET_INFLIGHT_FD,
};
use vm_memory::bitmap::NewBitmap;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// `VHOST_USER_SET_FEATURES`.
const SET_FEATURES: u32 = 2;
/// `VHOST_USER_SET_PROTOCOL_FEATURES`.
const SET_PROTOCOL_FEATURES: u32 = 16;
/// `VHOST_USER_SET_VRING_ENABLE`.
const SET_VRING_ENABLE: u32 = 18;
/// `VHOST_USER_SET_VRING_CALL`.
const SET_VRING_CALL: u32 = 13;
/// `VHOST_USER_RESET_OWNER` and `VHOST_USER_RESET_DEVICE`.
const RESET_OWNER: u32 = 4;
const RESET_DEVICE: u32 = 34;
/// `VHOST_USER_SET_BACKEND_REQ_FD`.
const SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` (a backend request).
const BACKEND_CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1.
const VERSION_1: u32 = 0x1;
/// Header flags: this is a reply.
const REPLY: u32 = 0x4;
/// Header flags: the sender waits for a reply (with REPLY_ACK).
const NEED_REPLY: u32 = 0x8;
/// Header size: request, flags, size, each a little-endian u32.
const HEADER_LEN: usize = 12;
/// Payload of `SET_VRING_ENABLE` (`VhostUserVringState`: u32 index, u32 num).
const VRING_STATE_LEN: u32 = 8;
/// Most early enables held: one per ring, and a virtio device has at most
/// 1024 queues (QEMU's VIRTIO_QUEUE_MAX).
pub const MAX_HELD_ENABLES: usize = 1024;

/// Errors of [`serve_with_enable_shim`].
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The frontend's listening socket could not be bound.
    #[error("cannot listen on the vhost-user socket")]
    Listen(#[source] VhostUserError),
    /// Accepting the frontend failed.
    #[error("cannot accept the frontend")]
    Accept(#[source] VhostUserError),
    /// The private link to the daemon could not be set up.
    #[error("cannot link the shim to the daemon: {step}")]
    Link {
        /// What failed.
        step: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process connected to the private link before the shim.
    #[error("a stranger connected to the shim's private link")]
    LinkRace,
    /// The daemon failed to start or ended with an error.
    #[error("vhost-user daemon: {reason}")]
    Daemon {
        /// The daemon's error (vhost-user-backend's error type is not `std::error::Error`).
        reason: String,
    },
    /// A forwarding thread could not be started.
    #[error("cannot start a forwarding thread")]
    Spawn(#[source] std::io::Error),
    /// A forwarding thread panicked (a bug, never input).
    #[error("a forwarding thread panicked")]
    Panicked,
    /// Reading or writing a socket failed.
    #[error("{side} socket")]
    Io {
        /// `"frontend"` or `"backend"`: whose socket.
        side: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A frame announced a payload larger than vhost-user allows.
    #[error("{side} sent request {request} with a {size}-byte payload (at most {max})")]
    Oversized {
        /// Who sent it.
        side: &'static str,
        /// Request code.
        request: u32,
        /// Announced payload size.
        size: u32,
        /// The limit.
        max: usize,
    },
    /// File descriptors came with a payload instead of a header, or more of them than
    /// vhost-user allows.
    #[error("{side} sent file descriptors out of place or more than {max}")]
    BadFds {
        /// Who sent them.
        side: &'static str,
        /// The limit.
        max: usize,
    },
    /// The frontend sent more early `SET_VRING_ENABLE`s than there can be rings.
    #[error("more than {max} SET_VRING_ENABLE before SET_FEATURES")]
    TooManyHeld {
        /// The limit.
        max: usize,
    },
}

/// Serves one frontend like `VhostUserDaemon::serve`, through the early-enable
/// shim (see the module documentation).
///
/// Binds `socket` (removing a stale one), accepts one frontend, serves it
/// until it or the daemon ends the connection, stops the daemon's workers
/// and removes the socket file. A disconnect is `Ok`, as with `serve`; call
/// again with a fresh daemon for the next frontend.
pub fn serve_with_enable_shim<T>(
    daemon: &mut VhostUserDaemon<T>,
    socket: &Path,
) -> Result<(), ShimError>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    // vhost's Listener unlinks a stale socket and removes its file when dropped.
    let listener = Listener::new(socket, true).map_err(ShimError::Listen)?;
    serve_listener_with_enable_shim(
        daemon,
        &listener,
        &BackendChannel::default(),
        &InflightSlot::default(),
    )
}

/// The backend-request channel of the current connection, kept by the shim.
#[derive(Debug, Default)]
pub struct BackendChannel(Mutex<Option<UnixStream>>);

impl BackendChannel {
    /// Tells the frontend that the device's config changed
    /// (`VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`; QEMU reads the config again
    /// and notifies the guest). `Ok(false)` when no frontend gave a channel.
    ///
    /// Never waits: a frontend that does not read its channel loses the
    /// notice (`WouldBlock`), and one that leaves a frame half sent loses
    /// the channel, rather than holding the config watch and every lock
    /// behind it.
    pub fn config_changed(&self) -> std::io::Result<bool> {
        let mut guard = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let Some(sock) = guard.as_ref() else {
            return Ok(false);
        };
        let hdr = Header {
            request: BACKEND_CONFIG_CHANGE_MSG,
            flags: VERSION_1,
            size: 0,
        }
        .encode();
        // SAFETY: sends `hdr.len()` bytes from a live buffer on a socket we own.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                hdr.as_ptr().cast(),
                hdr.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        match usize::try_from(n) {
            Ok(n) if n == hdr.len() => Ok(true),
            Ok(_) => {
                // Half a frame on the channel: nothing more can follow it.
                *guard = None;
                Err(std::io::Error::other(
                    "backend-request channel: short send, closed",
                ))
            }
            Err(_) => Err(std::io::Error::last_os_error()),
        }
    }

    fn set(&self, sock: Option<UnixStream>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = sock;
    }
}

/// As [`serve_with_enable_shim`], on a listener the caller owns (one bound
/// by path and kept across connections, or one inherited: `--socket-fd`,
/// systemd's `LISTEN_FDS`). With `inflight` enabled, the shim also answers
/// GET/SET_INFLIGHT_FD (see [`crate::inflight`]).
pub fn serve_listener_with_enable_shim<T>(
    daemon: &mut VhostUserDaemon<T>,
    listener: &Listener,
    channel: &BackendChannel,
    inflight: &InflightSlot,
) -> Result<(), ShimError>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    let frontend = loop {
        match listener.accept() {
            Ok(Some(s)) => break s,
            Ok(None) => continue, // a connection that went away before accept
            Err(e) => return Err(ShimError::Accept(e)),
        }
    };
    tracing::debug!("frontend connected");
    let backend = link_daemon(daemon)?;
    let result = run(frontend, backend, channel, inflight);
    channel.set(None);
    inflight.set(None);
    let daemon_result = daemon.wait();
    stop_workers(daemon);
    result?;
    match daemon_result {
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected | VhostUserError::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(ShimError::Daemon {
            reason: e.to_string(),
        }),
    }
}

/// Starts `daemon` on a private connection and returns the shim's end.
///
/// The daemon only accepts from a listener, so the link is an abstract Unix
/// socket that lives for one accept. Anyone in the network namespace could
/// connect to it too, so the shim connects first and then checks that no
/// other connection is queued: the daemon accepted exactly one, and the
/// shim's was queued before it did, so an empty queue means it got ours.
fn link_daemon<T>(daemon: &mut VhostUserDaemon<T>) -> Result<UnixStream, ShimError>
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let link = |step| move |source| ShimError::Link { step, source };
    // Unpredictable, so that nobody can squat the name in advance.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, Ordering::Relaxed));
    let name = format!(
        "ringfence-vhost-user-shim/{}/{:016x}",
        std::process::id(),
        h.finish()
    );
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(link("address"))?;
    let private = UnixListener::bind_addr(&addr).map_err(link("bind"))?;
    let check = private.try_clone().map_err(link("dup"))?;
    let ours = UnixStream::connect_addr(&addr).map_err(link("connect"))?;
    daemon
        .start(&mut Listener::from(private))
        .map_err(|e| ShimError::Daemon {
            reason: e.to_string(),
        })?;
    let queued = check
        .set_nonblocking(true)
        .and_then(|()| match check.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(e),
        });
    let failure = match queued {
        Ok(false) => return Ok(ours),
        Ok(true) => ShimError::LinkRace,
        Err(source) => ShimError::Link {
            step: "check",
            source,
        },
    };
    // The daemon may be talking to a stranger: stop it before returning.
    daemon.request_shutdown();
    let _ = daemon.wait();
    stop_workers(daemon);
    Err(failure)
}

/// As `serve` does once a connection ended: the vring workers leave their epoll loops.
fn stop_workers<T>(daemon: &VhostUserDaemon<T>)
where
    T: VhostUserBackend + Clone + 'static,
    T::Bitmap: BitmapReplace + NewBitmap + Clone + Send + Sync,
    T::Vring: Clone + Send + Sync,
{
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
}

/// Both sockets of one connection.
struct Link {
    frontend: UnixStream,
    backend: UnixStream,
    /// Held across every whole-message write to the frontend, so a reply the
    /// shim makes up never lands inside a forwarded one.
    frontend_write: Mutex<()>,
}

impl Link {
    /// Ends both directions: the daemon sees a disconnect, every blocked read returns.
    fn close(&self) {
        let _ = self.frontend.shutdown(Shutdown::Both);
        let _ = self.backend.shutdown(Shutdown::Both);
    }

    fn send_frontend(&self, frame: &[u8], fds: &[RawFd]) -> Result<(), ShimError> {
        let _guard = self
            .frontend_write
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        send_frame(&self.frontend, frame, fds).map_err(|source| ShimError::Io {
            side: "frontend",
            source,
        })
    }
}

/// Runs both forwarding directions until either side closes.
fn run(
    frontend: UnixStream,
    backend: UnixStream,
    channel: &BackendChannel,
    inflight: &InflightSlot,
) -> Result<(), ShimError> {
    let link = Arc::new(Link {
        frontend,
        backend,
        frontend_write: Mutex::new(()),
    });
    thread::scope(|scope| {
        let up = {
            let link = link.clone();
            thread::Builder::new()
                .name("vhost-user-shim".into())
                .spawn_scoped(scope, move || {
                    let r = frontend_to_backend(&link, channel, inflight);
                    link.close();
                    r
                })
        };
        let up = match up {
            Ok(t) => t,
            Err(e) => {
                link.close();
                return Err(ShimError::Spawn(e));
            }
        };
        let down = backend_to_frontend(&link);
        link.close();
        let up = up.join().unwrap_or(Err(ShimError::Panicked));
        // The frontend's misbehaviour is the more useful error.
        up.and(down)
    })
}

/// What the frontend has negotiated so far, as far as early enables care.
#[derive(Default)]
struct Gate {
    /// A SET_FEATURES went through: everything passes from now on.
    open: bool,
    /// REPLY_ACK acked: the frontend expects an answer to NEED_REPLY.
    reply_ack: bool,
    /// Payloads of the held SET_VRING_ENABLEs, in arrival order.
    held: Vec<[u8; 8]>,
    /// INFLIGHT_SHMFD acked.
    inflight: bool,
}

/// Answers GET_INFLIGHT_FD (fresh memory) or SET_INFLIGHT_FD (the memory
/// a previous backend was given) for the adapter. A description the shim
/// cannot honour gets no memory (GET: size 0, which QEMU takes as "no
/// tracking") or an error reply (SET), never a dropped connection.
fn answer_inflight(
    link: &Link,
    hdr: &Header,
    payload: &[u8],
    fds: Vec<OwnedFd>,
    slot: &InflightSlot,
    reply_ack: bool,
) -> Result<(), ShimError> {
    let desc = InflightDesc::decode(payload);
    if hdr.request == GET_INFLIGHT_FD {
        drop(fds);
        let made = desc.ok_or("short payload").and_then(|d| {
            InflightShm::create(d.num_queues, d.queue_size).map_err(|e| {
                tracing::warn!(error = %e, "GET_INFLIGHT_FD refused");
                "refused"
            })
        });
        let (answer, fd) = match made {
            Ok(shm) => {
                let answer = shm.desc();
                let shm = Arc::new(shm);
                let fd = shm.fd();
                tracing::info!(
                    num_queues = answer.num_queues,
                    queue_size = answer.queue_size,
                    bytes = answer.mmap_size,
                    "inflight memory created"
                );
                slot.set(Some(shm));
                (answer, Some(fd))
            }
            Err(_) => (
                InflightDesc {
                    mmap_size: 0,
                    mmap_offset: 0,
                    num_queues: desc.map_or(0, |d| d.num_queues),
                    queue_size: desc.map_or(0, |d| d.queue_size),
                },
                None,
            ),
        };
        let reply = Header {
            request: GET_INFLIGHT_FD,
            flags: VERSION_1 | REPLY,
            size: INFLIGHT_PAYLOAD_LEN as u32,
        };
        let mut frame = [0u8; HEADER_LEN + INFLIGHT_PAYLOAD_LEN];
        frame[..HEADER_LEN].copy_from_slice(&reply.encode());
        frame[HEADER_LEN..].copy_from_slice(&answer.encode());
        // The slot keeps the memory (and its descriptor) alive past the send.
        return link.send_frontend(&frame, fd.as_slice());
    }
    let mapped = match (desc, <[OwnedFd; 1]>::try_from(fds)) {
        (Some(d), Ok([fd])) => InflightShm::map(File::from(fd), &d).map_err(|e| e.to_string()),
        _ => Err("SET_INFLIGHT_FD without a description and one descriptor".to_string()),
    };
    let status: u64 = match mapped {
        Ok(shm) => {
            tracing::info!(?desc, "inflight memory of the frontend mapped");
            slot.set(Some(Arc::new(shm)));
            0
        }
        Err(e) => {
            tracing::warn!(error = %e, "SET_INFLIGHT_FD refused: requests are not tracked");
            slot.set(None);
            1
        }
    };
    if hdr.flags & NEED_REPLY != 0 && reply_ack {
        let ack = Header {
            request: SET_INFLIGHT_FD,
            flags: VERSION_1 | REPLY,
            size: 8,
        };
        let mut frame = [0u8; HEADER_LEN + 8];
        frame[..HEADER_LEN].copy_from_slice(&ack.encode());
        frame[HEADER_LEN..].copy_from_slice(&status.to_le_bytes());
        link.send_frontend(&frame, &[])?;
    }
    Ok(())
}

fn frontend_to_backend(
    link: &Link,
    channel: &BackendChannel,
    inflight: &InflightSlot,
) -> Result<(), ShimError> {
    let mut gate = Gate::default();
    let mut buf = Vec::with_capacity(HEADER_LEN + MAX_MSG_SIZE);
    loop {
        let Some((hdr, fds)) = recv_frame(&link.frontend, &mut buf, "frontend")? else {
            tracing::debug!("frontend closed the connection");
            return Ok(());
        };
        tracing::debug!(
            request = hdr.request,
            flags = format_args!("{:#x}", hdr.flags),
            size = hdr.size,
            fds = fds.len(),
            "frontend -> backend"
        );
        let payload = buf.get(HEADER_LEN..).unwrap_or_default();
        if !gate.open && is_plain_enable(&hdr, payload, &fds) {
            if gate.held.len() >= MAX_HELD_ENABLES {
                return Err(ShimError::TooManyHeld {
                    max: MAX_HELD_ENABLES,
                });
            }
            let mut state = [0u8; 8];
            state.copy_from_slice(payload.get(..8).unwrap_or(&[0; 8]));
            gate.held.push(state);
            tracing::info!(
                index = u32_at(&state, 0),
                enable = u32_at(&state, 4),
                held = gate.held.len(),
                "holding SET_VRING_ENABLE until SET_FEATURES"
            );
            // The backend answers NEED_REPLY only with REPLY_ACK acked; so does the shim.
            if hdr.flags & NEED_REPLY != 0 && gate.reply_ack {
                let ack = Header {
                    request: SET_VRING_ENABLE,
                    flags: VERSION_1 | REPLY,
                    size: 8,
                };
                let mut reply = [0u8; HEADER_LEN + 8];
                reply[..HEADER_LEN].copy_from_slice(&ack.encode());
                link.send_frontend(&reply, &[])?;
            }
            continue;
        }
        if hdr.request == SET_PROTOCOL_FEATURES && hdr.size == 8 {
            let acked = u64::from_le_bytes(payload.try_into().unwrap_or([0; 8]));
            gate.reply_ack = acked & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0;
            gate.inflight = acked & VhostUserProtocolFeatures::INFLIGHT_SHMFD.bits() != 0;
        }
        if inflight.enabled()
            && gate.inflight
            && (hdr.request == GET_INFLIGHT_FD || hdr.request == SET_INFLIGHT_FD)
        {
            answer_inflight(link, &hdr, payload, fds, inflight, gate.reply_ack)?;
            continue;
        }
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        send_backend(link, &buf, &raw)?;
        // A reset clears the acked features in the daemon: QEMU's
        // vhost-user-net then disables its rings (SET_VRING_ENABLE 0) before
        // any SET_FEATURES, exactly the early enable the gate exists for.
        if hdr.request == RESET_DEVICE || hdr.request == RESET_OWNER {
            gate.open = false;
        }
        if hdr.request == SET_VRING_CALL {
            if let [call] = fds.as_slice() {
                signal_once(call);
            }
        }
        if hdr.request == SET_BACKEND_REQ_FD {
            if let [fd] = fds.as_slice() {
                match fd.try_clone() {
                    Ok(fd) => channel.set(Some(UnixStream::from(fd))),
                    Err(e) => tracing::warn!(error = %e, "keeping the backend-request channel"),
                }
            }
        }
        drop(fds); // the backend has its own copies now
        if hdr.request == SET_FEATURES && !gate.open {
            gate.open = true;
            let held = std::mem::take(&mut gate.held);
            if !held.is_empty() {
                tracing::info!(
                    count = held.len(),
                    "replaying held SET_VRING_ENABLE after SET_FEATURES"
                );
            }
            for state in held {
                let hdr = Header {
                    request: SET_VRING_ENABLE,
                    flags: VERSION_1, // no NEED_REPLY: the frontend had its answer
                    size: VRING_STATE_LEN,
                };
                let mut frame = [0u8; HEADER_LEN + 8];
                frame[..HEADER_LEN].copy_from_slice(&hdr.encode());
                frame[HEADER_LEN..].copy_from_slice(&state);
                send_backend(link, &frame, &[])?;
            }
        }
    }
}

/// Writes 1 to an eventfd the frontend gave as a call fd. Whatever the
/// frontend passed, a failed write only loses the courtesy interrupt.
///
/// The frontend chose the descriptor: only a non-blocking one that is
/// writable right now is written, so a counter it saturated, a full pipe or
/// a blocking descriptor cannot hold the shim (QEMU's are non-blocking
/// eventfds). A frontend racing to make it blocking between the look and
/// the write only harms its own connection.
fn signal_once(call: &OwnedFd) {
    let fd = call.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    }];
    // SAFETY: one valid pollfd, no waiting.
    let ready = unsafe { libc::poll(p.as_mut_ptr(), 1, 0) } == 1 && p[0].revents == libc::POLLOUT;
    if flags < 0 || flags & libc::O_NONBLOCK == 0 || !ready {
        tracing::debug!("call fd not signalled: blocking or not writable");
        return;
    }
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to a descriptor we own.
    let n = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
    if n != 8 {
        tracing::debug!("signalling a new call fd failed");
    }
}

/// A SET_VRING_ENABLE the backend would accept once features are set: the
/// only kind worth holding. Anything else goes through and the backend
/// refuses it as it always would.
fn is_plain_enable(hdr: &Header, payload: &[u8], fds: &[OwnedFd]) -> bool {
    hdr.request == SET_VRING_ENABLE
        && hdr.flags & !NEED_REPLY == VERSION_1
        && hdr.size == VRING_STATE_LEN
        && fds.is_empty()
        && matches!(u32_at(payload, 4), Some(0 | 1))
}

fn backend_to_frontend(link: &Link) -> Result<(), ShimError> {
    let mut buf = Vec::with_capacity(HEADER_LEN + MAX_MSG_SIZE);
    loop {
        let Some((hdr, fds)) = recv_frame(&link.backend, &mut buf, "backend")? else {
            tracing::debug!("backend closed the connection");
            return Ok(());
        };
        tracing::debug!(
            request = hdr.request,
            flags = format_args!("{:#x}", hdr.flags),
            size = hdr.size,
            fds = fds.len(),
            "backend -> frontend"
        );
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        match link.send_frontend(&buf, &raw) {
            Ok(()) => {}
            // The frontend left; its reader reports how.
            Err(ShimError::Io { source, .. }) if is_disconnect(&source) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn send_backend(link: &Link, frame: &[u8], fds: &[RawFd]) -> Result<(), ShimError> {
    match send_frame(&link.backend, frame, fds) {
        Ok(()) => Ok(()),
        // The daemon ended the connection; daemon.wait() reports why.
        Err(e) if is_disconnect(&e) => Ok(()),
        Err(source) => Err(ShimError::Io {
            side: "backend",
            source,
        }),
    }
}

/// A vhost-user message header (little-endian on the wire).
#[derive(Debug, Clone, Copy)]
struct Header {
    request: u32,
    flags: u32,
    size: u32,
}

impl Header {
    fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Self {
            request: word(0),
            flags: word(4),
            size: word(8),
        }
    }

    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..].copy_from_slice(&self.size.to_le_bytes());
        b
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn is_disconnect(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::NotConnected
    )
}

/// Reads one whole message into `buf` (header then payload) with the
/// descriptors that came with its header. `None` when the peer closed the
/// connection, also in the middle of a message (`serve` counts a partial
/// message as a disconnect too).
fn recv_frame(
    sock: &UnixStream,
    buf: &mut Vec<u8>,
    side: &'static str,
) -> Result<Option<(Header, Vec<OwnedFd>)>, ShimError> {
    let mut fds = Vec::new();
    let mut header = [0u8; HEADER_LEN];
    if !fill(sock, &mut header, Some(&mut fds), side)? {
        return Ok(None);
    }
    let hdr = Header::decode(&header);
    let size = usize::try_from(hdr.size).unwrap_or(usize::MAX);
    if size > MAX_MSG_SIZE {
        return Err(ShimError::Oversized {
            side,
            request: hdr.request,
            size: hdr.size,
            max: MAX_MSG_SIZE,
        });
    }
    buf.clear();
    buf.extend_from_slice(&header);
    buf.resize(HEADER_LEN + size, 0);
    if !fill(
        sock,
        buf.get_mut(HEADER_LEN..).unwrap_or_default(),
        None,
        side,
    )? {
        return Ok(None);
    }
    Ok(Some((hdr, fds)))
}

/// Fills `buf` from `sock`, taking descriptors into `fds` when given (and
/// refusing them otherwise). `false` on end of stream.
fn fill(
    sock: &UnixStream,
    buf: &mut [u8],
    mut fds: Option<&mut Vec<OwnedFd>>,
    side: &'static str,
) -> Result<bool, ShimError> {
    let bad_fds = ShimError::BadFds {
        side,
        max: MAX_ATTACHED_FD_ENTRIES,
    };
    let mut done = 0usize;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else {
            break;
        };
        let mut iov = [libc::iovec {
            iov_base: rest.as_mut_ptr().cast(),
            iov_len: rest.len(),
        }];
        let mut raw = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
        let room = fds
            .as_ref()
            .map_or(0, |f| MAX_ATTACHED_FD_ENTRIES.saturating_sub(f.len()));
        let slots = raw.get_mut(..room).unwrap_or_default();
        // SAFETY: the iovec covers `rest`, a live, exclusively borrowed byte
        // slice: any bytes may be written there.
        let got = unsafe { sock.recv_with_fds(&mut iov, slots) };
        let (n, nfds) = match got {
            Ok(v) => v,
            Err(e) if e.errno() == libc::EINTR => continue,
            // Descriptors beyond the room we gave (vmm-sys-util closed them).
            Err(e) if e.errno() == libc::ENOBUFS => return Err(bad_fds),
            Err(e) if is_disconnect(&std::io::Error::from(e)) => return Ok(false),
            Err(e) => {
                return Err(ShimError::Io {
                    side,
                    source: e.into(),
                })
            }
        };
        if let Some(fds) = fds.as_deref_mut() {
            for &fd in raw.get(..nfds).unwrap_or_default() {
                // SAFETY: recvmsg just installed this descriptor for us and
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
        if n == 0 {
            return Ok(false);
        }
        done = done.saturating_add(n);
    }
    Ok(true)
}

/// Writes one whole message, the descriptors with its first byte.
fn send_frame(sock: &UnixStream, frame: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let mut sent = 0usize;
    let mut fds = fds;
    while let Some(rest) = frame.get(sent..).filter(|r| !r.is_empty()) {
        match sock.send_with_fds(&[rest], fds) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                sent = sent.saturating_add(n);
                fds = &[];
            }
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
