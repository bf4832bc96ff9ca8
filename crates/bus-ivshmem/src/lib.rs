//! virtio-msg over ivshmem, as Linux's virtio-msg AMP layer speaks it.
//!
//! Ringfence is the ivshmem server (QEMU's `ivshmem-doorbell` device, or a
//! Ringfence frontend, connects to it as a client) and itself the peer with
//! id 0: the device side. The shared memory carries two message queues
//! ([`queue`]): page 0 driver → device, page 1 device → driver. A doorbell
//! (an eventfd per interrupt vector, handed out by the server) means "look
//! at the queue"; each side drains its queue on every wake-up.
//!
//! Addresses in this mode are the driver's guest-physical addresses, in any
//! of its RAM: the device side maps the driver's RAM file whole as area 0
//! (full share, as vhost-user does), laid out as on QEMU's q35 machine
//! (RAM below the PCI hole at file offset = physical address).
//!
//! Server protocol (QEMU `docs/specs/ivshmem-spec.rst`): the server sends
//! little-endian int64 messages on the client's stream socket, some with a
//! descriptor: the protocol version `0`; the client's peer id; `-1` with the
//! shared memory; then for every peer, itself included, the peer's id once
//! per vector with that vector's eventfd, in vector order.

pub mod queue;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfence_bus::{
    AreaId, BusError, BusLimits, DeviceBus, DeviceBusEvent, Doorbell, DoorbellDirection, DriverBus,
    LocalArea, SharedArea,
};
use ringfence_bus_local::{check_sealed_memfd, sealed_memfd, EventFdDoorbell};
use vm_memory::{FileOffset, MmapRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use queue::{Consumer, Producer, QUEUE_BYTES, SLOT_SIZE};

/// The protocol version the server announces.
pub const PROTOCOL_VERSION: i64 = 0;
/// The device side's peer id.
pub const DEVICE_PEER: i64 = 0;
/// Offset of the driver → device queue in the shared memory.
pub const TO_DEVICE_QUEUE: usize = 0;
/// Offset of the device → driver queue.
pub const TO_DRIVER_QUEUE: usize = QUEUE_BYTES;
/// Written by the server at [`MAGIC_OFFSET`] of the shared memory.
pub const MAGIC: &[u8; 16] = b"ringfence ivshm1";
/// Where [`MAGIC`] is: the page after the two queues.
pub const MAGIC_OFFSET: usize = 2 * QUEUE_BYTES;
/// The largest message: one slot.
pub const MAX_MSG_SIZE: usize = SLOT_SIZE;
/// q35 keeps all RAM below 4 GiB (at file offset = physical address) only
/// up to this size; beyond it RAM is split around the PCI hole.
pub const Q35_LOWMEM_LIMIT: u64 = 0xB000_0000;
/// How long a sender waits for room in a full queue (a paused guest is not
/// a dead one).
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may take to hand over its set-up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Most vectors a peer may have (QEMU's ivshmem-server has the same bound).
pub const MAX_VECTORS: usize = 64;

fn limits() -> BusLimits {
    BusLimits {
        max_msg_size: MAX_MSG_SIZE,
        doorbells: false,
        polling: false,
        can_grant: false,
        can_copy: false,
    }
}

fn io_err(op: &'static str) -> impl FnOnce(std::io::Error) -> BusError {
    move |e| BusError::io(op, e)
}

/// Counters of one ivshmem connection.
#[derive(Debug, Default)]
pub struct IvshmemStats {
    /// Doorbells received (eventfd wake-ups, each possibly several rings).
    pub doorbells: AtomicU64,
    /// Messages received.
    pub messages: AtomicU64,
    /// Times the peer published a queue index outside the ring.
    pub corrupt_indices: AtomicU64,
}

/// Maps the driver's RAM file whole, shared.
pub fn map_guest_ram(path: &Path) -> Result<Arc<MmapRegion>, BusError> {
    let file = File::options()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err("open guest RAM"))?;
    let size = file.metadata().map_err(io_err("stat guest RAM"))?.len();
    if size == 0 || size >= Q35_LOWMEM_LIMIT {
        return Err(BusError::Protocol {
            reason: format!(
                "guest RAM of {size} bytes: only RAM that q35 keeps below the PCI hole \
                 (1 byte..2.75 GiB) is supported"
            ),
        });
    }
    let size = usize::try_from(size).map_err(|_| BusError::Protocol {
        reason: "guest RAM too large".into(),
    })?;
    MmapRegion::build(
        Some(FileOffset::new(file, 0)),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
    )
    .map(Arc::new)
    .map_err(|e| BusError::Protocol {
        reason: format!("mmap of guest RAM failed: {e}"),
    })
}

fn poll_fds(fds: &[RawFd], timeout: Option<Duration>) -> Result<Vec<bool>, BusError> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
        if n >= 0 {
            return Ok(pfds.iter().map(|p| p.revents != 0).collect());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(BusError::io("poll", e));
        }
    }
}

/// One side's end of the queues and doorbells.
struct Endpoint {
    stream: UnixStream,
    rx: Mutex<Consumer>,
    tx: Mutex<Producer>,
    /// Our vectors: rung by the peer. The peer shares these descriptors,
    /// so they are only ever read without blocking and written when poll
    /// says a write will not block (`EventFdDoorbell`).
    own: Vec<EventFdDoorbell>,
    /// The peer's vector 0: we ring it.
    peer: EventFdDoorbell,
    /// A corrupt queue was reported: look again only after a doorbell.
    wait_first: AtomicBool,
    stats: Arc<IvshmemStats>,
}

impl Endpoint {
    fn new(
        stream: UnixStream,
        rx: Consumer,
        tx: Producer,
        own: Vec<EventFdDoorbell>,
        peer: EventFdDoorbell,
    ) -> Self {
        Self {
            stream,
            rx: Mutex::new(rx),
            tx: Mutex::new(tx),
            own,
            peer,
            wait_first: AtomicBool::new(false),
            stats: Arc::new(IvshmemStats::default()),
        }
    }

    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        if msg.len() > MAX_MSG_SIZE {
            return Err(BusError::TooLarge {
                len: msg.len(),
                max: MAX_MSG_SIZE,
            });
        }
        let deadline = Instant::now() + SEND_TIMEOUT;
        loop {
            let pushed = self
                .tx
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(msg)
                .map_err(|c| BusError::Protocol {
                    reason: c.to_string(),
                })?;
            if pushed {
                break;
            }
            // Full: the peer has not read; ring again and give it time.
            let _ = self.peer.ring();
            if Instant::now() >= deadline {
                return Err(BusError::Timeout(SEND_TIMEOUT));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        self.peer.ring()
    }

    /// The next message into `buf`, waiting at most `timeout`; `Ok(None)`
    /// on timeout; an `Err(reason)` in `Ok(Some(Err))` for a corrupt queue.
    fn recv(
        &self,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<Option<Result<usize, String>>, BusError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut slot = [0u8; SLOT_SIZE];
        loop {
            if !self.wait_first.swap(false, Ordering::SeqCst) {
                let popped = self
                    .rx
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pop(&mut slot);
                match popped {
                    Ok(true) => {
                        self.stats.messages.fetch_add(1, Ordering::Relaxed);
                        let n = buf.len().min(SLOT_SIZE);
                        if let (Some(d), Some(s)) = (buf.get_mut(..n), slot.get(..n)) {
                            d.copy_from_slice(s);
                        }
                        return Ok(Some(Ok(n)));
                    }
                    Ok(false) => {}
                    Err(c) => {
                        self.stats.corrupt_indices.fetch_add(1, Ordering::Relaxed);
                        self.wait_first.store(true, Ordering::SeqCst);
                        return Ok(Some(Err(c.to_string())));
                    }
                }
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if left.is_some_and(|l| l.is_zero()) {
                return Ok(None);
            }
            let mut fds: Vec<RawFd> = self.own.iter().map(|e| e.raw_fd()).collect();
            fds.push(self.stream.as_raw_fd());
            let ready = poll_fds(&fds, left)?;
            for (e, r) in self.own.iter().zip(&ready) {
                if *r && e.try_clear()? {
                    self.stats.doorbells.fetch_add(1, Ordering::Relaxed);
                }
            }
            if ready.last().copied().unwrap_or(false) {
                // The socket only ever carries server messages; EOF is the
                // peer gone. Anything else is read and ignored.
                let mut junk = [0u8; 64];
                match (&self.stream).read(&mut junk) {
                    Ok(0) => return Err(BusError::Disconnected),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return Err(BusError::Disconnected),
                }
            }
        }
    }
}

/// Ringfence as the ivshmem server and peer 0.
pub struct IvshmemServer {
    listener: UnixListener,
    path: PathBuf,
    shm_size: usize,
    vectors: usize,
    next_id: i64,
}

/// Maps `size` bytes of the shared memory `file`, shared.
fn map_shared(file: File, size: usize) -> Result<Arc<MmapRegion>, BusError> {
    MmapRegion::build(
        Some(FileOffset::new(file, 0)),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED,
    )
    .map(Arc::new)
    .map_err(|e| BusError::Protocol {
        reason: format!("mmap of shared memory failed: {e}"),
    })
}

/// This side's ends of the two queues in `shm`.
fn queues(
    shm: &Arc<MmapRegion>,
    rx_at: usize,
    tx_at: usize,
) -> Result<(Consumer, Producer), BusError> {
    let small = || BusError::Protocol {
        reason: "shared memory too small".into(),
    };
    let rx = Consumer::new(shm.clone(), rx_at).ok_or_else(small)?;
    let tx = Producer::new(shm.clone(), tx_at).ok_or_else(small)?;
    Ok((rx, tx))
}

/// The shared memory of one session: a sealed memfd, mapped here.
fn new_shared_memory(size: usize) -> Result<(File, Arc<MmapRegion>), BusError> {
    let file = sealed_memfd("ringfence-ivshmem", size).map_err(io_err("memfd_create"))?;
    let mapping = map_shared(file.try_clone().map_err(io_err("dup"))?, size)?;
    Ok((file, mapping))
}

impl IvshmemServer {
    /// Listens at `path` (owner-only) with `shm_size` bytes of shared
    /// memory per session (a power of two, as QEMU's BAR needs) and
    /// `vectors` interrupt vectors per peer.
    pub fn bind(path: &Path, shm_size: usize, vectors: usize) -> Result<Self, BusError> {
        if !shm_size.is_power_of_two() || shm_size < 4 * QUEUE_BYTES {
            return Err(BusError::Protocol {
                reason: format!("shared memory of {shm_size} bytes: a power of two ≥ 16 KiB"),
            });
        }
        if vectors == 0 || vectors > MAX_VECTORS {
            return Err(BusError::Protocol {
                reason: format!("{vectors} vectors: 1..={MAX_VECTORS}"),
            });
        }
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(io_err("bind"))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("chmod"))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            shm_size,
            vectors,
            next_id: 1,
        })
    }

    /// Waits for the next client (a QEMU ivshmem device or a Ringfence
    /// frontend) and sets up a session of its own: fresh shared memory and
    /// fresh doorbells, so nothing a former client kept reaches it.
    /// `guest_ram` is what its addresses reach. Returns `Ok(None)` when
    /// `stop()` says so (it is asked every 200 ms while waiting).
    pub fn accept(
        &mut self,
        guest_ram: Option<Arc<MmapRegion>>,
        stop: &dyn Fn() -> bool,
    ) -> Result<Option<IvshmemDeviceBus>, BusError> {
        loop {
            if stop() {
                return Ok(None);
            }
            let ready = poll_fds(
                &[self.listener.as_raw_fd()],
                Some(Duration::from_millis(200)),
            )?;
            if ready.first().copied().unwrap_or(false) {
                break;
            }
        }
        let (stream, _) = self.listener.accept().map_err(io_err("accept"))?;
        let id = self.next_id;
        self.next_id = if id >= i64::from(u16::MAX) { 1 } else { id + 1 };
        let (shm_file, shm) = new_shared_memory(self.shm_size)?;
        let new_vectors = || {
            (0..self.vectors)
                .map(|_| EventFdDoorbell::new())
                .collect::<Result<Vec<_>, _>>()
                .map_err(io_err("eventfd"))
        };
        let own = new_vectors()?;
        let mut peer = new_vectors()?;
        // A mark that says whose memory this is (a guest can check it
        // through BAR2).
        let _ = vm_memory::Bytes::write_slice(
            &vm_memory::VolatileMemory::as_volatile_slice(&*shm),
            MAGIC,
            MAGIC_OFFSET,
        );
        let (rx, tx) = queues(&shm, TO_DEVICE_QUEUE, TO_DRIVER_QUEUE)?;
        // At most 3 + 2 × 64 eight-byte messages, well within a socket
        // buffer: sent without blocking, so a client that shrank its buffer
        // and does not read is dropped instead of stalling the server.
        stream
            .set_nonblocking(true)
            .map_err(io_err("nonblocking"))?;
        let send = |v: i64, fd: Option<RawFd>| -> Result<(), BusError> {
            let bytes = v.to_le_bytes();
            let n = match fd {
                Some(fd) => stream.send_with_fd(&bytes[..], fd),
                None => stream.send_with_fds(&[&bytes[..]], &[]),
            }
            .map_err(|e| {
                BusError::io(
                    "send to ivshmem client",
                    std::io::Error::from_raw_os_error(e.errno()),
                )
            })?;
            if n == bytes.len() {
                Ok(())
            } else {
                Err(BusError::Protocol {
                    reason: "short send to ivshmem client".into(),
                })
            }
        };
        send(PROTOCOL_VERSION, None)?;
        send(id, None)?;
        send(-1, Some(shm_file.as_raw_fd()))?;
        for e in &own {
            send(DEVICE_PEER, Some(e.raw_fd()))?;
        }
        for e in &peer {
            send(id, Some(e.raw_fd()))?;
        }
        tracing::info!(peer = id, vectors = self.vectors, "ivshmem client attached");
        if peer.is_empty() {
            return Err(BusError::Protocol {
                reason: "no vector".into(),
            });
        }
        let ring = peer.swap_remove(0);
        Ok(Some(IvshmemDeviceBus {
            end: Endpoint::new(stream, rx, tx, own, ring),
            ram: Mutex::new(guest_ram),
            peer_id: id,
        }))
    }
}

impl Drop for IvshmemServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The device side of one ivshmem client.
pub struct IvshmemDeviceBus {
    end: Endpoint,
    /// The driver's RAM, handed to the device side once as area 0.
    ram: Mutex<Option<Arc<MmapRegion>>>,
    peer_id: i64,
}

impl IvshmemDeviceBus {
    /// The counters.
    pub fn stats(&self) -> Arc<IvshmemStats> {
        self.end.stats.clone()
    }

    /// The client's peer id.
    pub fn peer_id(&self) -> i64 {
        self.peer_id
    }
}

impl DeviceBus for IvshmemDeviceBus {
    fn limits(&self) -> BusLimits {
        limits()
    }

    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        self.end.send(msg)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<DeviceBusEvent, BusError> {
        if let Some(ram) = self.ram.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Ok(DeviceBusEvent::AreaShared(SharedArea {
                id: 0,
                mapping: ram,
                copier: None,
            }));
        }
        match self.end.recv(buf, None)? {
            Some(Ok(n)) => Ok(DeviceBusEvent::Message(n)),
            Some(Err(reason)) => Ok(DeviceBusEvent::Dropped { reason }),
            None => Ok(DeviceBusEvent::Handled),
        }
    }

    fn complete_share(&self, _id: AreaId) -> Result<(), BusError> {
        Ok(())
    }

    fn complete_unshare(&self, _id: AreaId, _released: bool) -> Result<(), BusError> {
        Ok(())
    }
}

/// A Ringfence frontend as an ivshmem client peer.
pub struct IvshmemDriverBus {
    end: Endpoint,
    ram: Arc<MmapRegion>,
    ram_handed_out: AtomicBool,
    peer_id: i64,
}

fn recv_i64(stream: &UnixStream) -> Result<(i64, Option<File>), BusError> {
    let mut b = [0u8; 8];
    let (n, fd) = stream.recv_with_fd(&mut b).map_err(|e| {
        BusError::io(
            "read from ivshmem server",
            std::io::Error::from_raw_os_error(e.errno()),
        )
    })?;
    if n == 0 {
        return Err(BusError::Disconnected);
    }
    if n != 8 {
        return Err(BusError::Protocol {
            reason: format!("ivshmem server sent {n} bytes, not an int64"),
        });
    }
    Ok((i64::from_le_bytes(b), fd))
}

impl IvshmemDriverBus {
    /// Connects to the server at `path` as a VM would; the device side
    /// reaches `ram` (the same file it was given) at physical address 0.
    pub fn connect(path: &Path, ram: Arc<MmapRegion>) -> Result<Self, BusError> {
        let stream = UnixStream::connect(path).map_err(io_err("connect to ivshmem server"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io_err("timeout"))?;
        let (version, _) = recv_i64(&stream)?;
        if version != PROTOCOL_VERSION {
            return Err(BusError::Protocol {
                reason: format!("ivshmem protocol version {version}"),
            });
        }
        let (id, _) = recv_i64(&stream)?;
        if id <= DEVICE_PEER || id > i64::from(u16::MAX) {
            return Err(BusError::Protocol {
                reason: format!("ivshmem peer id {id}"),
            });
        }
        let (minus_one, shm) = recv_i64(&stream)?;
        let shm = shm.filter(|_| minus_one == -1).ok_or(BusError::Protocol {
            reason: "no shared memory from the ivshmem server".into(),
        })?;
        let size = shm.metadata().map_err(io_err("stat shared memory"))?.len();
        // Sealed shmem: the server cannot shrink it under our mapping.
        check_sealed_memfd(&shm, size).map_err(|reason| BusError::Protocol {
            reason: format!("ivshmem shared memory: {reason}"),
        })?;
        let size = usize::try_from(size).map_err(|_| BusError::Protocol {
            reason: "shared memory too large".into(),
        })?;
        let shm = map_shared(shm, size)?;
        // Peers' vectors, then our own; ours complete the set-up, within a
        // bounded time and number of messages.
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let mut device: Vec<EventFdDoorbell> = Vec::new();
        let mut own: Vec<EventFdDoorbell> = Vec::new();
        let mut messages = 0usize;
        while own.is_empty() || device.is_empty() || own.len() < device.len() {
            messages += 1;
            if Instant::now() > deadline || messages > 4 * MAX_VECTORS + 8 {
                return Err(BusError::Protocol {
                    reason: "the ivshmem server did not finish the set-up".into(),
                });
            }
            let (peer, fd) = recv_i64(&stream)?;
            let Some(fd) = fd else {
                continue; // a peer left
            };
            if peer != id && peer != DEVICE_PEER {
                continue; // another VM: not ours to ring
            }
            // Only a real eventfd is used as a doorbell.
            let e = EventFdDoorbell::from_peer(fd).map_err(|reason| BusError::Protocol {
                reason: format!("ivshmem vector of peer {peer}: {reason}"),
            })?;
            if peer == id {
                own.push(e);
            } else {
                device.push(e);
            }
            if own.len() > MAX_VECTORS || device.len() > MAX_VECTORS {
                return Err(BusError::Protocol {
                    reason: "too many vectors".into(),
                });
            }
        }
        let (rx, tx) = queues(&shm, TO_DRIVER_QUEUE, TO_DEVICE_QUEUE)?;
        stream
            .set_nonblocking(true)
            .map_err(io_err("nonblocking"))?;
        let peer = device.swap_remove(0);
        tracing::info!(peer = id, "attached to the ivshmem server");
        Ok(Self {
            end: Endpoint::new(stream, rx, tx, own, peer),
            ram,
            ram_handed_out: AtomicBool::new(false),
            peer_id: id,
        })
    }

    /// Our peer id.
    pub fn peer_id(&self) -> i64 {
        self.peer_id
    }

    /// The counters.
    pub fn stats(&self) -> Arc<IvshmemStats> {
        self.end.stats.clone()
    }
}

impl DriverBus for IvshmemDriverBus {
    fn limits(&self) -> BusLimits {
        limits()
    }

    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        self.end.send(msg)
    }

    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> Result<Option<usize>, BusError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            match self.end.recv(buf, left)? {
                Some(Ok(n)) => return Ok(Some(n)),
                Some(Err(reason)) => tracing::warn!("ivshmem queue from the device: {reason}"),
                None => return Ok(None),
            }
        }
    }

    /// The whole RAM, once: in this mode the device side reaches all of it.
    fn share_area(&self, size: usize) -> Result<LocalArea, BusError> {
        if size > self.ram.size() || self.ram_handed_out.swap(true, Ordering::SeqCst) {
            return Err(BusError::Unsupported {
                op: "share_area beyond the one RAM area of the ivshmem bus",
            });
        }
        Ok(LocalArea {
            id: 0,
            mapping: self.ram.clone(),
        })
    }

    fn unshare_area(&self, _id: AreaId) -> Result<(), BusError> {
        Err(BusError::Unsupported {
            op: "unshare_area on the ivshmem bus",
        })
    }

    fn doorbell(
        &self,
        _dev_num: u16,
        _queue: u16,
        _direction: DoorbellDirection,
    ) -> Result<Option<Arc<dyn Doorbell>>, BusError> {
        Ok(None)
    }
}
