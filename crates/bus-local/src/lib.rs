//! The local bus: the whole two-VM arrangement on one Linux machine.
//!
//! A "VM" is a process. Messages travel over a Unix `SOCK_SEQPACKET` socket
//! (message boundaries and a bounded size, like a hypervisor message queue).
//! Shared areas are sealed memfds passed with `SCM_RIGHTS`; doorbells are
//! eventfds. Bus-specific messages (ids 0x80 and up) carry the handshake and
//! the area and doorbell operations; see [`wire`].

pub mod broker;
mod staging;
mod sys;
pub mod wire;

use std::collections::{BTreeSet, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringfence_bus::{
    AreaCopier, AreaId, AreaRange, BusError, BusLimits, DeviceBus, DeviceBusEvent, Doorbell,
    DoorbellDirection, DriverBus, GrantAccess, LocalArea, PrivateMemory, SharedArea, GRANT_PAGE,
    MAX_COPY_RANGES,
};
use ringfence_virtio_msg::consts::{ABSOLUTE_MAX_MSG_SIZE, MIN_USABLE_MSG_SIZE};
use vm_memory::{FileOffset, MmapRegion};

pub use sys::{
    check_sealed_memfd, poll_readable, sealed_memfd, EventFdDoorbell, Listener, Seqpacket,
};
use wire::{LocalMsg, WireError};

use broker::{BrokerClient, CopyDirection};
use staging::StagingPool;

/// How a local bus endpoint is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalBusConfig {
    /// Largest message this side accepts (the two sides use the smaller).
    pub max_msg_size: usize,
    /// Use eventfd doorbells (otherwise EVENT_AVAIL/EVENT_USED travel in-band).
    pub doorbells: bool,
    /// Largest area the device side accepts.
    pub max_area_size: u64,
    /// Most areas the device side keeps at once.
    pub max_areas: usize,
    /// How long the device side waits for the driver's VERSION before it
    /// drops the connection.
    pub handshake_timeout: Duration,
    /// How long the device side waits for room to send one message before it
    /// gives up on a driver that does not read its replies.
    pub send_timeout: Duration,
}

impl Default for LocalBusConfig {
    fn default() -> Self {
        Self {
            max_msg_size: ringfence_virtio_msg::consts::RECOMMENDED_MAX_MSG_SIZE,
            doorbells: true,
            max_area_size: 1 << 30,
            max_areas: 64,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            send_timeout: Duration::from_secs(2),
        }
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest sleep of a control request between checks for a response that
/// another thread read off the socket.
const CONTROL_SLICE: Duration = Duration::from_millis(1);
/// Longest sleep of a waiting `recv` while no control request is in flight.
const IDLE_SLICE: Duration = Duration::from_millis(20);
/// Control responses kept for requests of other threads.
const MAX_PENDING_REPLIES: usize = 16;
/// Largest area mapped with MAP_POPULATE (a grant of one large request).
const POPULATE_MAX: u64 = 1 << 20;
const DRIVER_SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Staging memory a device side reserves for grants for copy (allocated
/// only as slots are first used).
const STAGING_SIZE: usize = 64 << 20;

fn limits(max_msg_size: usize, doorbells: bool, can_copy: bool) -> BusLimits {
    BusLimits {
        max_msg_size,
        doorbells,
        polling: true,
        can_grant: true,
        can_copy,
    }
}

fn check_config(cfg: &LocalBusConfig) -> Result<(), BusError> {
    if !(MIN_USABLE_MSG_SIZE..=ABSOLUTE_MAX_MSG_SIZE).contains(&cfg.max_msg_size) {
        return Err(BusError::Protocol {
            reason: format!(
                "max_msg_size {} outside {MIN_USABLE_MSG_SIZE}..={ABSOLUTE_MAX_MSG_SIZE}",
                cfg.max_msg_size
            ),
        });
    }
    Ok(())
}

fn encode_local(msg: &LocalMsg, buf: &mut [u8]) -> Result<usize, BusError> {
    msg.encode_message(buf)
        .map_err(|WireError(reason)| BusError::Protocol { reason })
}

/// The device side of a local bus connection.
pub struct LocalDeviceBus {
    sock: Seqpacket,
    cfg: LocalBusConfig,
    negotiated: Mutex<BusLimits>,
    area_count: Mutex<Vec<AreaId>>,
    /// Set once VERSION was answered; nothing else is accepted before it.
    handshake_done: std::sync::atomic::AtomicBool,
    created: std::time::Instant,
    /// The broker to ask for copies, if this side offers grants for copy.
    broker: Option<PathBuf>,
    /// Its connection and the staging memory, made on the first grant for copy.
    copy: Mutex<Option<Arc<DeviceCopy>>>,
}

/// A device side's connection to the broker and the memory it copies into.
struct DeviceCopy {
    client: BrokerClient,
    pool: StagingPool,
    /// The driver's process, whose grants this connection may name.
    granter: u32,
}

/// Copies for one grant for copy, into its staging slot.
struct BrokerCopier {
    copy: Arc<DeviceCopy>,
    gref: u32,
    size: u64,
    staging_offset: u64,
}

impl BrokerCopier {
    fn run(&self, ranges: &[AreaRange], direction: CopyDirection) -> Result<(), BusError> {
        let mut out = [broker::CopyRange {
            grant_offset: 0,
            staging_offset: 0,
            len: 0,
        }; MAX_COPY_RANGES];
        if ranges.len() > out.len() {
            return Err(BusError::Protocol {
                reason: format!("{} ranges in one copy", ranges.len()),
            });
        }
        for (r, o) in ranges.iter().zip(out.iter_mut()) {
            let inside = r.offset.checked_add(r.len).is_some_and(|e| e <= self.size);
            *o = broker::to_copy_range(r, self.staging_offset)
                .filter(|_| inside)
                .ok_or_else(|| BusError::Protocol {
                    reason: format!("{r:?} outside a grant of {} bytes", self.size),
                })?;
        }
        let ranges = out.get(..ranges.len()).unwrap_or(&[]);
        self.copy
            .client
            .copy(self.copy.granter, self.gref, direction, ranges)
    }
}

impl AreaCopier for BrokerCopier {
    fn fetch(&self, ranges: &[AreaRange]) -> Result<(), BusError> {
        self.run(ranges, CopyDirection::GrantToStaging)
    }

    fn store(&self, ranges: &[AreaRange]) -> Result<(), BusError> {
        self.run(ranges, CopyDirection::StagingToGrant)
    }
}

impl LocalDeviceBus {
    /// Wraps an accepted connection; the driver's handshake is processed by `recv`.
    pub fn new(sock: Seqpacket, cfg: LocalBusConfig) -> Result<Self, BusError> {
        check_config(&cfg)?;
        Ok(Self {
            sock,
            cfg,
            negotiated: Mutex::new(limits(cfg.max_msg_size, cfg.doorbells, false)),
            area_count: Mutex::new(Vec::new()),
            handshake_done: std::sync::atomic::AtomicBool::new(false),
            created: std::time::Instant::now(),
            broker: None,
            copy: Mutex::new(None),
        })
    }

    /// Offers grants for copy, copied by the broker listening at `path`.
    pub fn with_broker(mut self, path: PathBuf) -> Self {
        self.broker = Some(path);
        self
    }

    fn device_copy(&self) -> Result<Arc<DeviceCopy>, String> {
        let mut copy = self.copy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = copy.as_ref() {
            return Ok(c.clone());
        }
        let path = self.broker.as_ref().ok_or("no broker")?;
        let client = BrokerClient::connect(path).map_err(|e| format!("broker: {e}"))?;
        let pool = StagingPool::new(STAGING_SIZE).map_err(|e| format!("staging memory: {e}"))?;
        client
            .register_staging(pool.file())
            .map_err(|e| format!("broker refused staging memory: {e}"))?;
        let granter = self
            .sock
            .peer_pid()
            .map_err(|e| format!("driver side has no process id: {e}"))?;
        let c = Arc::new(DeviceCopy {
            client,
            pool,
            granter,
        });
        *copy = Some(c.clone());
        Ok(c)
    }

    /// Checks a new area's id and size and claims the id.
    fn claim_area(&self, id: AreaId, size: u64) -> Result<(), String> {
        if id == 0 {
            return Err("area id 0 is reserved".into());
        }
        if size == 0 || size > self.cfg.max_area_size || !size.is_multiple_of(4096) {
            return Err(format!(
                "area size {size} not a page multiple in 4 KiB..={}",
                self.cfg.max_area_size
            ));
        }
        let mut areas = self.area_count.lock().unwrap_or_else(|p| p.into_inner());
        if areas.contains(&id) {
            return Err(format!("area {id} is already shared"));
        }
        if areas.len() >= self.cfg.max_areas {
            return Err(format!("more than {} areas", self.cfg.max_areas));
        }
        areas.push(id);
        Ok(())
    }

    fn release_area(&self, id: AreaId) {
        self.area_count
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&a| a != id);
    }

    /// A grant for copy: staging memory of our own, reached by the broker.
    fn copy_area(&self, id: AreaId, size: u64, gref: u32) -> Result<SharedArea, String> {
        if !self.limits().can_copy {
            return Err(format!("area {id}: grant for copy was not negotiated"));
        }
        self.claim_area(id, size)?;
        let staged = self.device_copy().and_then(|copy| {
            let (mapping, staging_offset) = copy
                .pool
                .alloc(size)
                .ok_or_else(|| format!("area {id}: staging memory full"))?;
            let copier = BrokerCopier {
                copy,
                gref,
                size,
                staging_offset,
            };
            Ok(SharedArea {
                id,
                mapping,
                copier: Some(Arc::new(copier)),
            })
        });
        staged.inspect_err(|_| self.release_area(id))
    }

    fn reply(&self, msg: &LocalMsg) -> Result<(), BusError> {
        let mut buf = [0u8; 64];
        let n = encode_local(msg, &mut buf)?;
        self.sock
            .send_bounded(buf.get(..n).unwrap_or(&[]), self.cfg.send_timeout)
    }

    fn map_area(
        &self,
        id: AreaId,
        size: u64,
        offset: u64,
        file: File,
    ) -> Result<SharedArea, String> {
        self.claim_area(id, size)?;
        self.map_claimed(id, size, offset, file)
            .inspect_err(|_| self.release_area(id))
    }

    fn map_claimed(
        &self,
        id: AreaId,
        size: u64,
        offset: u64,
        file: File,
    ) -> Result<SharedArea, String> {
        // A grant is a page range of a memfd; only that range is mapped.
        let end = offset
            .checked_add(size)
            .filter(|_| offset.is_multiple_of(4096))
            .ok_or_else(|| format!("area {id}: offset {offset:#x} not a page in range"))?;
        sys::check_sealed_memfd(&file, end)?;
        // Grant-sized areas are populated at once, as a hypervisor fills
        // stage-2 tables when it maps a grant: one call instead of a fault per
        // page. Larger ones are not, so that a driver cannot make the backend
        // allocate its whole area limit up front.
        let populate = if size <= POPULATE_MAX {
            libc::MAP_POPULATE
        } else {
            0
        };
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE | populate,
        )
        .map_err(|e| format!("mmap of area {id} failed: {e}"))?;
        Ok(SharedArea {
            id,
            mapping: Arc::new(mapping),
            copier: None,
        })
    }

    fn handle_local(&self, msg: LocalMsg, files: Vec<File>) -> Result<DeviceBusEvent, BusError> {
        let mut files = files.into_iter();
        Ok(match msg {
            LocalMsg::Version {
                revision,
                max_msg_size,
                features,
            } => {
                let max = (max_msg_size as usize).min(self.cfg.max_msg_size);
                let doorbells = self.cfg.doorbells && features & wire::FEATURE_DOORBELLS != 0;
                let copy = self.broker.is_some() && features & wire::FEATURE_COPY != 0;
                if revision != ringfence_virtio_msg::consts::TRANSPORT_REVISION
                    || max < MIN_USABLE_MSG_SIZE
                {
                    return Ok(DeviceBusEvent::Dropped {
                        reason: format!(
                            "unusable VERSION: revision {revision}, max {max_msg_size}"
                        ),
                    });
                }
                *self.negotiated.lock().unwrap_or_else(|p| p.into_inner()) =
                    limits(max, doorbells, copy);
                self.handshake_done.store(true, Ordering::SeqCst);
                self.reply(&LocalMsg::VersionResult {
                    revision: ringfence_virtio_msg::consts::TRANSPORT_REVISION,
                    max_msg_size: max as u32,
                    features: if doorbells {
                        wire::FEATURE_DOORBELLS
                    } else {
                        0
                    } | if copy { wire::FEATURE_COPY } else { 0 },
                })?;
                tracing::info!(max_msg_size = max, doorbells, copy, "bus handshake");
                DeviceBusEvent::Handled
            }
            LocalMsg::AreaShare {
                id,
                size,
                offset,
                copied: Some(gref),
            } => {
                let staged = if files.next().is_some() || offset != 0 {
                    Err(format!(
                        "grant for copy {id} with a descriptor or an offset"
                    ))
                } else {
                    self.copy_area(id, size, gref)
                };
                match staged {
                    Ok(area) => {
                        tracing::debug!(area = id, size, gref, "grant for copy");
                        DeviceBusEvent::AreaShared(area)
                    }
                    Err(reason) => {
                        self.reply(&LocalMsg::AreaShareResult {
                            id,
                            status: wire::STATUS_REJECTED,
                        })?;
                        DeviceBusEvent::Dropped { reason }
                    }
                }
            }
            LocalMsg::AreaShare {
                id,
                size,
                offset,
                copied: None,
            } => {
                let Some(file) = files.next() else {
                    self.reply(&LocalMsg::AreaShareResult {
                        id,
                        status: wire::STATUS_REJECTED,
                    })?;
                    return Ok(DeviceBusEvent::Dropped {
                        reason: format!("AREA_SHARE {id} without a descriptor"),
                    });
                };
                match self.map_area(id, size, offset, file) {
                    Ok(area) => {
                        // Answered by `complete_share` once the area is in the device memory.
                        tracing::debug!(area = id, size, offset, "area shared");
                        DeviceBusEvent::AreaShared(area)
                    }
                    Err(reason) => {
                        self.reply(&LocalMsg::AreaShareResult {
                            id,
                            status: wire::STATUS_REJECTED,
                        })?;
                        DeviceBusEvent::Dropped { reason }
                    }
                }
            }
            LocalMsg::AreaUnshare { id } => {
                let known = self
                    .area_count
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&id);
                if known {
                    // Answered by `complete_unshare`, once the device side has
                    // stopped using the area.
                    DeviceBusEvent::AreaUnshared(id)
                } else {
                    self.reply(&LocalMsg::AreaUnshareResult {
                        id,
                        status: wire::STATUS_REJECTED,
                    })?;
                    DeviceBusEvent::Dropped {
                        reason: format!("AREA_UNSHARE of unknown area {id}"),
                    }
                }
            }
            LocalMsg::DoorbellAttach {
                dev_num,
                queue,
                direction,
            } => {
                let Some(file) = files.next() else {
                    return Ok(DeviceBusEvent::Dropped {
                        reason: "DOORBELL_ATTACH without a descriptor".into(),
                    });
                };
                match EventFdDoorbell::from_peer(file) {
                    Ok(db) => DeviceBusEvent::DoorbellAttached {
                        dev_num,
                        queue,
                        direction,
                        doorbell: Arc::new(db),
                    },
                    Err(reason) => DeviceBusEvent::Dropped { reason },
                }
            }
            other => DeviceBusEvent::Dropped {
                reason: format!("unexpected bus message {other:?} on the device side"),
            },
        })
    }
}

impl DeviceBus for LocalDeviceBus {
    fn complete_share(&self, id: AreaId) -> Result<(), BusError> {
        self.reply(&LocalMsg::AreaShareResult {
            id,
            status: wire::STATUS_OK,
        })
    }

    fn complete_unshare(&self, id: AreaId, released: bool) -> Result<(), BusError> {
        if released {
            self.area_count
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|&a| a != id);
        }
        self.reply(&LocalMsg::AreaUnshareResult {
            id,
            status: if released {
                wire::STATUS_OK
            } else {
                wire::STATUS_REJECTED
            },
        })
    }

    fn limits(&self) -> BusLimits {
        *self.negotiated.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        let max = self.limits().max_msg_size;
        if msg.len() > max {
            return Err(BusError::TooLarge {
                len: msg.len(),
                max,
            });
        }
        self.sock.send_bounded(msg, self.cfg.send_timeout)
    }

    fn recv(&self, buf: &mut [u8]) -> Result<DeviceBusEvent, BusError> {
        let handshake_done = self.handshake_done.load(Ordering::SeqCst);
        if !handshake_done {
            let left = self
                .cfg
                .handshake_timeout
                .saturating_sub(self.created.elapsed());
            if left.is_zero() || !self.sock.wait_readable(Some(left))? {
                return Err(BusError::Timeout(self.cfg.handshake_timeout));
            }
        }
        let max = self.limits().max_msg_size.min(buf.len());
        let buf = buf.get_mut(..max).unwrap_or_default();
        let (n, files) = self.sock.recv(buf)?;
        if n > max {
            return Ok(DeviceBusEvent::Dropped {
                reason: format!("message larger than the bus maximum of {max} bytes"),
            });
        }
        if files.len() > sys::MAX_FDS_PER_MSG {
            // Dropping `files` closes every one of them.
            return Ok(DeviceBusEvent::Dropped {
                reason: format!("{} descriptors on one message", files.len()),
            });
        }
        let bytes = buf.get(..n).unwrap_or(&[]);
        let classified = wire::classify(bytes);
        if !handshake_done && !matches!(classified, Ok(Some(LocalMsg::Version { .. }))) {
            return Ok(DeviceBusEvent::Dropped {
                reason: "message before the VERSION handshake".into(),
            });
        }
        match classified {
            Ok(Some(local)) => self.handle_local(local, files),
            // A transport or standard bus message: descriptors never ride along.
            Ok(None) if files.is_empty() => Ok(DeviceBusEvent::Message(n)),
            Ok(None) => Ok(DeviceBusEvent::Dropped {
                reason: "descriptor attached to a transport message".into(),
            }),
            Err(WireError(reason)) => Ok(DeviceBusEvent::Dropped { reason }),
        }
    }
}

/// The driver side of a local bus connection.
pub struct LocalDriverBus {
    sock: Seqpacket,
    limits: BusLimits,
    // Area ids in use: ids are 16 bits and grants come and go per request,
    // so a freed id is used again (lowest first).
    area_ids: Mutex<BTreeSet<AreaId>>,
    // Messages that arrived while waiting for a bus-specific response.
    stash: Mutex<VecDeque<Vec<u8>>>,
    // Control responses that a `recv` in another thread read off the socket.
    replies: Mutex<VecDeque<LocalMsg>>,
    control: Mutex<()>,
    /// The device side offered grants for copy.
    device_copies: bool,
    broker: Option<BrokerClient>,
    /// Grants for copy: area id → the broker's grant reference.
    copy_grants: Mutex<std::collections::HashMap<AreaId, u32>>,
}

impl LocalDriverBus {
    /// Connects to a device side listening at `path` and performs the handshake.
    pub fn connect(path: &Path, cfg: LocalBusConfig) -> Result<Self, BusError> {
        let sock = Seqpacket::connect(path).map_err(|e| BusError::io("connect", e))?;
        Self::handshake(sock, cfg)
    }

    /// Performs the handshake over an already connected socket.
    pub fn handshake(sock: Seqpacket, cfg: LocalBusConfig) -> Result<Self, BusError> {
        check_config(&cfg)?;
        let bus = Self {
            sock,
            limits: limits(cfg.max_msg_size, cfg.doorbells, false),
            area_ids: Mutex::new(BTreeSet::new()),
            stash: Mutex::new(VecDeque::new()),
            replies: Mutex::new(VecDeque::new()),
            control: Mutex::new(()),
            device_copies: false,
            broker: None,
            copy_grants: Mutex::new(std::collections::HashMap::new()),
        };
        let reply = bus.control(
            &LocalMsg::Version {
                revision: ringfence_virtio_msg::consts::TRANSPORT_REVISION,
                max_msg_size: cfg.max_msg_size as u32,
                features: wire::FEATURE_COPY
                    | if cfg.doorbells {
                        wire::FEATURE_DOORBELLS
                    } else {
                        0
                    },
            },
            None,
        )?;
        let LocalMsg::VersionResult {
            max_msg_size,
            features,
            ..
        } = reply
        else {
            return Err(BusError::Protocol {
                reason: format!("expected VERSION response, got {reply:?}"),
            });
        };
        let max = max_msg_size as usize;
        if !(MIN_USABLE_MSG_SIZE..=cfg.max_msg_size).contains(&max) {
            return Err(BusError::Protocol {
                reason: format!("device side offered max message size {max}"),
            });
        }
        Ok(Self {
            limits: limits(max, features & wire::FEATURE_DOORBELLS != 0, false),
            device_copies: features & wire::FEATURE_COPY != 0,
            ..bus
        })
    }

    /// Makes grants for copy through the broker listening at `path` (the
    /// device side must have offered them: `limits().can_copy` tells).
    pub fn with_broker(mut self, path: &Path) -> Result<Self, BusError> {
        self.broker = Some(BrokerClient::connect(path)?);
        self.limits.can_copy = self.device_copies;
        Ok(self)
    }

    /// The lowest area id not in use.
    fn take_area_id(&self) -> Result<AreaId, BusError> {
        let mut ids = self.area_ids.lock().unwrap_or_else(|p| p.into_inner());
        // Ids in use are ascending from 1: the first gap is free.
        // Area 0xFFFF is never handed out: drivers use it for "no buffer".
        let id = (1..AreaId::MAX)
            .zip(ids.iter().copied().chain(std::iter::repeat(0)))
            .find(|&(want, have)| want != have)
            .map(|(want, _)| want)
            .ok_or(BusError::Protocol {
                reason: "every area id is in use".into(),
            })?;
        ids.insert(id);
        Ok(id)
    }

    fn release_area_id(&self, id: AreaId) {
        self.area_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Frees `id` after a failed share, unless the device never answered:
    /// it may still map the area under that id, so the id is not used again
    /// on this connection.
    fn release_area_id_unless_unanswered(&self, id: AreaId, e: &BusError) {
        if !matches!(e, BusError::Timeout(_)) {
            self.release_area_id(id);
        }
    }

    /// AREA_SHARE of `size` bytes of `file` from `offset`, as area `id`.
    fn send_area(&self, id: AreaId, file: &File, offset: u64, size: u64) -> Result<(), BusError> {
        let msg = LocalMsg::AreaShare {
            id,
            size,
            offset,
            copied: None,
        };
        let reply = self.control(&msg, Some(file))?;
        if reply
            != (LocalMsg::AreaShareResult {
                id,
                status: wire::STATUS_OK,
            })
        {
            return Err(BusError::Protocol {
                reason: format!("device side refused area {id}: {reply:?}"),
            });
        }
        Ok(())
    }

    /// Sends a bus-specific request and waits for its response, stashing
    /// anything else that arrives meanwhile.
    fn control(&self, msg: &LocalMsg, fd: Option<&dyn AsRawFd>) -> Result<LocalMsg, BusError> {
        let _serialise = self.control.lock().unwrap_or_else(|p| p.into_inner());
        // A late answer to an earlier, timed-out request must not answer this one.
        self.replies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|r| !r.answers(msg));
        let mut buf = vec![0u8; ABSOLUTE_MAX_MSG_SIZE.min(self.limits.max_msg_size.max(64))];
        let n = encode_local(msg, &mut buf)?;
        let fds: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
        self.sock.send(buf.get(..n).unwrap_or(&[]), &fds)?;
        if msg.is_event() {
            return Ok(LocalMsg::None);
        }
        let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
        loop {
            {
                let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(at) = replies.iter().position(|r| r.answers(msg)) {
                    if let Some(reply) = replies.remove(at) {
                        return Ok(reply);
                    }
                }
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(BusError::Timeout(HANDSHAKE_TIMEOUT));
            }
            // Short slices: a thread in `recv` may take our response off the
            // socket and leave it in `replies`.
            if !self.sock.wait_readable(Some(left.min(CONTROL_SLICE)))? {
                continue;
            }
            let (n, _files) = match self.sock.recv_nowait(&mut buf)? {
                Some(got) => got,
                None => continue,
            };
            let bytes = buf.get(..n.min(buf.len())).unwrap_or(&[]);
            match wire::classify(bytes) {
                Ok(Some(reply)) if reply.answers(msg) => return Ok(reply),
                Ok(Some(other)) => {
                    tracing::warn!(?other, "unexpected bus message from the device side");
                }
                _ => self
                    .stash
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push_back(bytes.to_vec()),
            }
        }
    }
}

impl DriverBus for LocalDriverBus {
    fn limits(&self) -> BusLimits {
        self.limits
    }

    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        if msg.len() > self.limits.max_msg_size {
            return Err(BusError::TooLarge {
                len: msg.len(),
                max: self.limits.max_msg_size,
            });
        }
        // A device side that stops reading cannot block the driver forever.
        self.sock.send_bounded(msg, DRIVER_SEND_TIMEOUT)
    }

    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> Result<Option<usize>, BusError> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        let mut looked = false;
        loop {
            // A flood of messages this loop keeps to itself (control
            // responses, oversized ones) cannot outrun the deadline.
            if looked && deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(None);
            }
            looked = true;
            // Messages a control request stashed come first (another thread's,
            // or one read while this thread's own request waited).
            if let Some(m) = self
                .stash
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front()
            {
                let n = m.len().min(buf.len());
                if let (Some(dst), Some(src)) = (buf.get_mut(..n), m.get(..n)) {
                    dst.copy_from_slice(src);
                }
                return Ok(Some(n));
            }
            let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
            // Slices, so a message a control request stashes meanwhile is
            // seen: short while one is in flight, longer otherwise.
            let step = if self.control.try_lock().is_err() {
                CONTROL_SLICE
            } else {
                IDLE_SLICE
            };
            let slice = left.map_or(step, |l| l.min(step));
            if !self.sock.wait_readable(Some(slice))? {
                continue;
            }
            // Descriptors from the device side are never wanted here: dropped, closed.
            let Some((n, _files)) = self.sock.recv_nowait(buf)? else {
                continue; // a control request in another thread took it
            };
            if n <= buf.len() {
                // A response to another thread's control request goes to it.
                if let Ok(Some(reply)) = wire::classify(buf.get(..n).unwrap_or(&[])) {
                    if reply.is_control_response() {
                        let mut replies = self.replies.lock().unwrap_or_else(|p| p.into_inner());
                        // Bounded: a device that floods responses to nothing
                        // loses the oldest.
                        if replies.len() >= MAX_PENDING_REPLIES {
                            replies.pop_front();
                            tracing::warn!(
                                "unclaimed control responses from the device side dropped"
                            );
                        }
                        replies.push_back(reply);
                        continue;
                    }
                }
                return Ok(Some(n));
            }
            // Larger than negotiated: dropped whole, never cut down.
            tracing::warn!(
                max = buf.len(),
                "oversized message from the device side dropped"
            );
        }
    }

    fn share_area(&self, size: usize) -> Result<LocalArea, BusError> {
        let id = self.take_area_id()?;
        let file = sys::sealed_memfd(&format!("ringfence-area-{id}"), size)
            .map_err(|e| BusError::io("memfd_create", e))
            .inspect_err(|_| self.release_area_id(id))?;
        if let Err(e) = self.send_area(id, &file, 0, size as u64) {
            self.release_area_id_unless_unanswered(id, &e);
            return Err(e);
        }
        let mapping = MmapRegion::from_file(FileOffset::new(file, 0), size).map_err(|e| {
            BusError::Protocol {
                reason: format!("mmap of own area failed: {e}"),
            }
        })?;
        Ok(LocalArea {
            id,
            mapping: Arc::new(mapping),
        })
    }

    fn unshare_area(&self, id: AreaId) -> Result<(), BusError> {
        let answer = self.control(&LocalMsg::AreaUnshare { id }, None);
        // A grant for copy ends at the broker whatever the device side
        // says: the broker, not the backend, decides when access stops
        // (it waits for a copy in flight).
        let gref = self
            .copy_grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        if let (Some(gref), Some(broker)) = (gref, self.broker.as_ref()) {
            if let Err(e) = broker.ungrant(gref) {
                tracing::error!(area = id, error = %e, "the broker did not end a grant");
            }
        }
        match answer? {
            LocalMsg::AreaUnshareResult {
                status: wire::STATUS_OK,
                ..
            } => {
                self.release_area_id(id);
                Ok(())
            }
            other => Err(BusError::Protocol {
                reason: format!("unshare of area {id} refused: {other:?}"),
            }),
        }
    }

    fn alloc_private(&self, size: usize) -> Result<PrivateMemory, BusError> {
        // One memfd per allocation: a grant passes the descriptor, so what
        // the device side could ever reach is this allocation, never the
        // rest of the frontend's memory.
        let file = sys::sealed_memfd("ringfence-private", size)
            .map_err(|e| BusError::io("memfd_create", e))?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, 0), size).map_err(|e| {
            BusError::Protocol {
                reason: format!("mmap of private memory failed: {e}"),
            }
        })?;
        Ok(PrivateMemory {
            mapping: Arc::new(mapping),
        })
    }

    fn grant(&self, memory: &PrivateMemory, offset: u64, len: u64) -> Result<AreaId, BusError> {
        let (file, offset) = grant_range(memory, offset, len)?;
        let id = self.take_area_id()?;
        self.send_area(id, file, offset, len)
            .inspect_err(|e| self.release_area_id_unless_unanswered(id, e))?;
        Ok(id)
    }

    fn grant_for_copy(
        &self,
        memory: &PrivateMemory,
        offset: u64,
        len: u64,
        access: GrantAccess,
    ) -> Result<AreaId, BusError> {
        let broker = self
            .broker
            .as_ref()
            .filter(|_| self.limits.can_copy)
            .ok_or(BusError::Unsupported {
                op: "grant_for_copy without a broker both sides use",
            })?;
        let (file, offset) = grant_range(memory, offset, len)?;
        let grantee = self
            .sock
            .peer_pid()
            .map_err(|e| BusError::io("SO_PEERCRED", e))?;
        let bits = if access.device_reads {
            broker::ACCESS_READ
        } else {
            0
        } | if access.device_writes {
            broker::ACCESS_WRITE
        } else {
            0
        };
        let gref = broker.grant(grantee, bits, file, offset, len)?;
        let id = self.take_area_id().inspect_err(|_| {
            let _ = broker.ungrant(gref);
        })?;
        let msg = LocalMsg::AreaShare {
            id,
            size: len,
            offset: 0,
            copied: Some(gref),
        };
        let answered = self.control(&msg, None).and_then(|reply| {
            if reply
                == (LocalMsg::AreaShareResult {
                    id,
                    status: wire::STATUS_OK,
                })
            {
                Ok(())
            } else {
                Err(BusError::Protocol {
                    reason: format!("device side refused grant for copy {id}: {reply:?}"),
                })
            }
        });
        if let Err(e) = answered {
            self.release_area_id_unless_unanswered(id, &e);
            let _ = broker.ungrant(gref);
            return Err(e);
        }
        self.copy_grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, gref);
        Ok(id)
    }

    fn doorbell(
        &self,
        dev_num: u16,
        queue: u16,
        direction: DoorbellDirection,
    ) -> Result<Option<Arc<dyn Doorbell>>, BusError> {
        if !self.limits.doorbells {
            return Ok(None);
        }
        let db = match direction {
            DoorbellDirection::ToDevice | DoorbellDirection::ToDriver => EventFdDoorbell::new(),
        }
        .map_err(|e| BusError::io("eventfd", e))?;
        struct Fd(i32);
        impl AsRawFd for Fd {
            fn as_raw_fd(&self) -> i32 {
                self.0
            }
        }
        self.control(
            &LocalMsg::DoorbellAttach {
                dev_num,
                queue,
                direction,
            },
            Some(&Fd(db.raw_fd())),
        )?;
        Ok(Some(Arc::new(db)))
    }
}

/// Checks that `offset..offset + len` are whole pages of `memory` and
/// returns its memfd with the offset in the file.
fn grant_range(memory: &PrivateMemory, offset: u64, len: u64) -> Result<(&File, u64), BusError> {
    let in_range = offset
        .checked_add(len)
        .is_some_and(|end| end <= memory.mapping.size() as u64);
    if len == 0
        || !offset.is_multiple_of(GRANT_PAGE)
        || !len.is_multiple_of(GRANT_PAGE)
        || !in_range
    {
        return Err(BusError::Protocol {
            reason: format!(
                "grant of {len:#x} bytes at {offset:#x}: not whole pages of the memory"
            ),
        });
    }
    let file_offset = memory.mapping.file_offset().ok_or(BusError::Unsupported {
        op: "grant of memory not from alloc_private",
    })?;
    // Offsets are the mapping's; the grant names the file's.
    let offset = file_offset
        .start()
        .checked_add(offset)
        .ok_or(BusError::Protocol {
            reason: "grant offset overflows".into(),
        })?;
    Ok((file_offset.file(), offset))
}

/// Creates both ends of a local bus in one process (tests, benchmarks).
pub fn pair(
    cfg: LocalBusConfig,
) -> Result<
    (
        LocalDeviceBus,
        std::thread::JoinHandle<Result<LocalDriverBus, BusError>>,
    ),
    BusError,
> {
    let (a, b) = Seqpacket::pair().map_err(|e| BusError::io("socketpair", e))?;
    let dev = LocalDeviceBus::new(a, cfg)?;
    let drv = std::thread::spawn(move || LocalDriverBus::handshake(b, cfg));
    Ok((dev, drv))
}
