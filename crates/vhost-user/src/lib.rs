//! vhost-user for any Ringfence device model.
//!
//! [`VhostUserDevice`] adapts a [`VirtioDevice`] to rust-vmm's
//! `vhost-user-backend`, so QEMU, crosvm or cloud-hypervisor guests use the same
//! device models that the virtio-msg transport serves. Nothing here is
//! device-specific: the device keeps its own feature bits and the adapter adds
//! only transport ones (VERSION_1, EVENT_IDX, INDIRECT_DESC, ACCESS_PLATFORM).
//!
//! In restricted mode ([`MemoryPolicy::SharedWindow`]) the backend refuses a
//! memory table larger than the window it agreed to serve, so a frontend that
//! offers all of guest RAM is turned away instead of mapped; every descriptor
//! outside the regions it was given fails translation and gets an error status.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use ringfence_device::{ConfigWatcher, DeviceMemory, QueueHandler, QueueStats, VirtioDevice};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringRwLock, VringT};
use virtio_bindings::virtio_config::{VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

pub mod inflight;
pub mod shim;
pub use inflight::InflightSlot;
pub use shim::{
    serve_listener_with_enable_shim, serve_with_enable_shim, BackendChannel, ShimError,
};

/// vhost-user's own feature bit (VHOST_USER_F_PROTOCOL_FEATURES).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Transport features the adapter implements itself.
pub const TRANSPORT_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_RING_F_EVENT_IDX)
    | (1 << VIRTIO_RING_F_INDIRECT_DESC)
    | (1 << VIRTIO_F_ACCESS_PLATFORM)
    | VHOST_USER_F_PROTOCOL_FEATURES;

/// How long GET_VRING_BASE waits for a ring's requests in flight (QEMU
/// waits for the reply, one queue after another).
const STOP_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// Which guest memory the backend accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryPolicy {
    /// Classic KVM: the frontend may share all of guest RAM.
    FullShare,
    /// Only a window: refuse memory tables larger than this many bytes.
    SharedWindow {
        /// Largest total size of all regions.
        max_bytes: u64,
    },
}

/// Checks a mapped region against its file before anything touches it: a
/// mapping that reaches past the end of its file faults (SIGBUS) on access.
fn check_region_file(region: &vm_memory::GuestRegionMmap) -> Result<(), VhostUserDeviceError> {
    let Some(fo) = region.file_offset() else {
        return Ok(()); // anonymous memory cannot be truncated under us
    };
    let file_len = fo
        .file()
        .metadata()
        .map_err(|e| VhostUserDeviceError::RegionFile {
            start: region.start_addr().0,
            reason: format!("fstat failed: {e}"),
        })?
        .len();
    // A memfd can be sealed against shrinking; one that is not could be
    // truncated under the mapping later. (QEMU seals its memfd backends by
    // default.) Files that cannot carry seals at all are accepted: the
    // threat model lists them as a residual risk.
    // SAFETY: fcntl on a descriptor the region owns.
    let seals = unsafe { libc::fcntl(fo.file().as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK == 0 {
        return Err(VhostUserDeviceError::RegionFile {
            start: region.start_addr().0,
            reason: "memfd not sealed against shrinking".into(),
        });
    }
    let end = fo.start().checked_add(region.len());
    if end.is_none_or(|end| end > file_len) {
        return Err(VhostUserDeviceError::RegionFile {
            start: region.start_addr().0,
            reason: format!(
                "mmap_offset {:#x} + size {:#x} exceeds the {file_len:#x}-byte file",
                fo.start(),
                region.len()
            ),
        });
    }
    Ok(())
}

/// Signals the frontend's call eventfd without ever blocking on it. The
/// frontend shares that file description, so it controls O_NONBLOCK and the
/// counter: a counter parked at its maximum would block write(2) forever. A
/// descriptor that poll does not report writable is already rung (its
/// counter is non-zero), so the write is skipped.
fn signal_used(index: u16, vring: &VringRwLock<GuestMemoryAtomic<DeviceMemory>>) {
    let writable = {
        let state = vring.get_ref();
        state.get_call().as_ref().map(|call| {
            let mut pfd = libc::pollfd {
                fd: call.as_raw_fd(),
                events: libc::POLLOUT,
                revents: 0,
            };
            // SAFETY: pfd is a valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 0) > 0 && pfd.revents & libc::POLLOUT != 0 }
        })
    };
    if writable == Some(false) {
        return;
    }
    if let Err(e) = vring.signal_used_queue() {
        tracing::warn!(queue = index, error = %e, "used notification failed");
    }
}

/// Errors of the adapter.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserDeviceError {
    /// A memory region does not fit its file.
    #[error("memory region at {start:#x}: {reason}")]
    RegionFile {
        /// Guest address of the region.
        start: u64,
        /// What is wrong.
        reason: String,
    },
    /// The memory table is larger than the window.
    #[error("memory table of {total} bytes exceeds the {max}-byte shared window")]
    WindowTooLarge {
        /// Bytes offered.
        total: u64,
        /// Bytes allowed.
        max: u64,
    },
    /// A queue is broken beyond one request.
    #[error("queue {queue} failed")]
    Queue {
        /// Queue index.
        queue: u16,
        /// Cause.
        #[source]
        source: ringfence_device::QueueFailure,
    },
    /// The device model refused to start.
    #[error("device activation failed")]
    Activate(#[source] ringfence_device::DeviceError),
}

impl From<VhostUserDeviceError> for std::io::Error {
    fn from(e: VhostUserDeviceError) -> Self {
        std::io::Error::other(e)
    }
}

struct Inner {
    device: Box<dyn VirtioDevice>,
    acked: u64,
    active: bool,
    /// The device's config watch while it is active.
    watcher: Option<ConfigWatcher>,
}

/// Counters of the adapter.
#[derive(Debug, Default)]
pub struct AdapterStats {
    /// Memory tables accepted.
    pub memory_updates: AtomicU64,
    /// Memory tables refused in restricted mode.
    pub memory_refused: AtomicU64,
    /// Queue failures (the queue stops being served until reset).
    pub queue_failures: AtomicU64,
    /// Chains resubmitted from the in-flight record after a restart.
    pub resubmitted: AtomicU64,
}

/// A device model served over vhost-user.
pub struct VhostUserDevice {
    inner: Mutex<Inner>,
    handlers: Vec<Mutex<Option<Box<dyn QueueHandler>>>>,
    queue_stats: Vec<QueueStats>,
    /// Queues the guest broke (bad ring index...): left alone until reset.
    broken: Vec<AtomicBool>,
    /// Queues whose handler has had requests in flight since activation:
    /// its wake fd (readable only on completions) stays watched, instead
    /// of two epoll_ctl calls per request at queue depth 1.
    asynchronous: Vec<AtomicBool>,
    /// In-flight tracking: the live connection's memory (see [`inflight`]).
    inflight: Arc<InflightSlot>,
    /// Each queue's record in it, from the queue's first service after
    /// activation (when the previous backend's chains are resubmitted).
    logs: Vec<Mutex<Option<inflight::QueueLog>>>,
    /// The record was looked for in this activation (once: memory that
    /// arrives later must not rewind a live queue).
    log_tried: Vec<AtomicBool>,
    /// Each queue's vring as last served, for `stop_vring`, which is not
    /// given it but must put what completes on its used ring.
    vrings: Vec<Mutex<Option<VringRwLock<GuestMemoryAtomic<DeviceMemory>>>>>,
    /// The wake fd of each starved queue's handler, while it is registered
    /// on that queue's worker epoll.
    watched: Vec<Mutex<Option<std::os::fd::RawFd>>>,
    /// The worker epolls of the current daemon (weak: they own us).
    epolls: Mutex<Vec<Weak<VringEpollHandler<Arc<VhostUserDevice>>>>>,
    /// The memory table this adapter accepted (a snapshot: vhost-user-backend
    /// installs a new table in its own shared view before asking us, so a
    /// refused table must never reach a queue through that view).
    memory: Mutex<Option<Arc<DeviceMemory>>>,
    num_queues: usize,
    max_queue_size: usize,
    device_features: u64,
    policy: MemoryPolicy,
    stats: AdapterStats,
    /// Offer VHOST_USER_F_PROTOCOL_FEATURES (see [`VhostUserDevice::without_protocol_features`]).
    protocol_features: AtomicBool,
    /// Called when the device's config watch finds a change (the daemon
    /// sends BACKEND_CONFIG_CHANGE_MSG on the backend-request channel).
    config_notify: Arc<Mutex<Option<ConfigNotify>>>,
}

/// What the adapter calls when the device's config changed.
pub type ConfigNotify = Arc<dyn Fn() + Send + Sync>;

impl VhostUserDevice {
    /// Wraps `device`.
    pub fn new(device: Box<dyn VirtioDevice>, policy: MemoryPolicy) -> Arc<Self> {
        let n = usize::from(device.num_queues());
        let out_of_order = device.completes_out_of_order();
        let this = Arc::new(Self {
            num_queues: n,
            max_queue_size: usize::from(device.max_queue_size()),
            device_features: device.device_features(),
            inner: Mutex::new(Inner {
                device,
                acked: 0,
                active: false,
                watcher: None,
            }),
            handlers: (0..n).map(|_| Mutex::new(None)).collect(),
            queue_stats: (0..n).map(|_| QueueStats::default()).collect(),
            broken: (0..n).map(|_| AtomicBool::new(false)).collect(),
            asynchronous: (0..n).map(|_| AtomicBool::new(false)).collect(),
            inflight: Arc::new(InflightSlot::default()),
            logs: (0..n).map(|_| Mutex::new(None)).collect(),
            log_tried: (0..n).map(|_| AtomicBool::new(false)).collect(),
            vrings: (0..n).map(|_| Mutex::new(None)).collect(),
            watched: (0..n).map(|_| Mutex::new(None)).collect(),
            epolls: Mutex::new(Vec::new()),
            memory: Mutex::new(None),
            policy,
            stats: AdapterStats::default(),
            protocol_features: AtomicBool::new(true),
            config_notify: Arc::new(Mutex::new(None)),
        });
        this.inflight.set_enabled(out_of_order);
        this
    }

    /// Stops offering in-flight tracking, which a device that completes out
    /// of order otherwise gets: a backend restarted under load then loses
    /// or repeats requests (for tests that show it, and frontends that
    /// mishandle the feature).
    pub fn without_inflight_tracking(&self) {
        self.inflight.set_enabled(false);
    }

    /// The in-flight memory slot, for the shim of each connection.
    pub fn inflight_slot(&self) -> Arc<InflightSlot> {
        self.inflight.clone()
    }

    /// Sets (or clears) what to call when the device's config changes on
    /// its own (a console resized, an image grown): the daemon passes the
    /// backend-request channel's `config_changed` of each connection.
    pub fn set_config_notifier(&self, notify: Option<ConfigNotify>) {
        *self.config_notify.lock().unwrap_or_else(|p| p.into_inner()) = notify;
    }

    /// Stops offering VHOST_USER_F_PROTOCOL_FEATURES. QEMU's
    /// vhost-user-net sends SET_VRING_ENABLE while setting up, before
    /// SET_FEATURES, and rust-vmm's `vhost` crate refuses that message until
    /// the feature is acked, ending the connection. Without the feature
    /// QEMU sends no SET_VRING_ENABLE and the rings start enabled; the cost
    /// is the protocol features (one queue pair, no CONFIG messages).
    pub fn without_protocol_features(&self) {
        self.protocol_features.store(false, Ordering::Relaxed);
    }

    /// The adapter's counters.
    pub fn stats(&self) -> &AdapterStats {
        &self.stats
    }

    /// Chains processed on queue `q`.
    pub fn chains(&self, q: usize) -> u64 {
        self.queue_stats
            .get(q)
            .map_or(0, |s| s.chains.load(Ordering::Relaxed))
    }

    /// Hands the adapter the worker epolls of a new daemon
    /// (`VhostUserDaemon::get_epoll_handlers`), on which a starved queue
    /// waits for its handler's own source (a TAP, a PTY, a timer).
    pub fn set_epoll_handlers(&self, handlers: &[Arc<VringEpollHandler<Arc<VhostUserDevice>>>]) {
        *self.epolls.lock().unwrap_or_else(|p| p.into_inner()) =
            handlers.iter().map(Arc::downgrade).collect();
    }

    /// Listener id of queue `q`'s handler source: ids up to num_queues
    /// belong to vhost-user-backend.
    fn source_id(&self, q: usize) -> u64 {
        (self.num_queues + 1 + q) as u64
    }

    /// Watches (`Some(fd)`) or stops watching (`None`) queue `q`'s source.
    fn watch_source(&self, q: usize, fd: Option<std::os::fd::RawFd>) {
        let Some(slot) = self.watched.get(q) else {
            return;
        };
        let mut watched = slot.lock().unwrap_or_else(|p| p.into_inner());
        if *watched == fd {
            return;
        }
        // One worker thread per queue (queues_per_thread), so queue q's epoll is q's.
        let epoll = self
            .epolls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(q)
            .and_then(Weak::upgrade);
        let Some(epoll) = epoll else {
            *watched = None;
            return;
        };
        if let Some(old) = watched.take() {
            let _ = epoll.unregister_listener(old, EventSet::IN, self.source_id(q));
        }
        if let Some(new) = fd {
            match epoll.register_listener(new, EventSet::IN, self.source_id(q)) {
                Ok(()) => *watched = Some(new),
                Err(e) => tracing::warn!(queue = q, error = %e, "cannot watch the queue's source"),
            }
        }
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deactivate(&self, inner: &mut Inner) {
        // Stop watching each handler's source before it closes it, under the
        // handler's lock: a worker inside serve_queue (which holds it) cannot
        // register the source again in between.
        for (q, h) in self.handlers.iter().enumerate() {
            let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
            self.watch_source(q, None);
            *h = None;
        }
        for b in self
            .broken
            .iter()
            .chain(&self.asynchronous)
            .chain(&self.log_tried)
        {
            b.store(false, Ordering::Relaxed);
        }
        for v in &self.vrings {
            *v.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        // After the handlers: serve_queue takes a queue's log while holding
        // its handler, never the other way round.
        for l in &self.logs {
            *l.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        // Joined before the reset: no change is reported for a device being reset.
        inner.watcher = None;
        if inner.active {
            inner.device.reset();
            inner.active = false;
        }
    }

    fn ensure_active(&self) -> Result<(), VhostUserDeviceError> {
        let mut inner = self.lock_inner();
        if inner.active {
            return Ok(());
        }
        let acked = inner.acked;
        let handlers = inner
            .device
            .activate(acked)
            .map_err(VhostUserDeviceError::Activate)?;
        for (slot, h) in self.handlers.iter().zip(handlers) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
        }
        if let Some(watch) = inner.device.config_watch() {
            let notify = self.config_notify.clone();
            let on_change = move || {
                let f = notify.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match f {
                    Some(f) => f(),
                    None => tracing::debug!("config changed; no channel to tell the frontend"),
                }
            };
            match ConfigWatcher::spawn(watch, on_change, "config-watch".into()) {
                Ok(w) => inner.watcher = Some(w),
                Err(e) => tracing::warn!(error = %e, "config changes will not be reported"),
            }
        }
        inner.active = true;
        Ok(())
    }

    fn serve_queue(
        &self,
        index: u16,
        vring: &VringRwLock<GuestMemoryAtomic<DeviceMemory>>,
    ) -> Result<(), VhostUserDeviceError> {
        // A queue left alone (broken, or no accepted memory) must not keep
        // its handler's completion fd watched: nothing would drain it and
        // the level-triggered epoll would spin.
        if self
            .broken
            .get(usize::from(index))
            .is_some_and(|b| b.load(Ordering::Relaxed))
        {
            self.watch_source(usize::from(index), None);
            return Ok(());
        }
        self.ensure_active()?;
        let Some(mem) = self
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        else {
            self.watch_source(usize::from(index), None);
            return Ok(());
        };
        // A ring being stopped (GET_VRING_BASE marks it not ready first):
        // stop_vring answers what is in flight; popping would break it.
        if !virtio_queue::QueueT::ready(vring.get_ref().get_queue()) {
            self.watch_source(usize::from(index), None);
            return Ok(());
        }
        // The vring of this connection's daemon (a new one per connection).
        if let Some(v) = self.vrings.get(usize::from(index)) {
            *v.lock().unwrap_or_else(|p| p.into_inner()) = Some(vring.clone());
        }
        let mut slot = self
            .handlers
            .get(usize::from(index))
            .map(|h| h.lock().unwrap_or_else(|p| p.into_inner()));
        let Some(handler) = slot.as_mut().and_then(|s| s.as_mut()) else {
            return Ok(()); // a queue the device does not use with these features
        };
        let Some(stats) = self.queue_stats.get(usize::from(index)) else {
            return Ok(());
        };
        let mut log = self
            .logs
            .get(usize::from(index))
            .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()));
        let first_look = self
            .log_tried
            .get(usize::from(index))
            .is_some_and(|t| !t.swap(true, Ordering::Relaxed));
        if let Some(log) = log.as_mut() {
            if first_look && self.inflight.enabled() {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                let (opened, answered) = self
                    .start_log(index, queue, &mem, handler.as_mut())
                    .map_err(|source| VhostUserDeviceError::Queue {
                        queue: index,
                        source,
                    })?;
                **log = opened;
                // Resubmitted chains answered at once are on the used ring:
                // the driver, waiting for them, must hear of it.
                let notify = answered > 0
                    && virtio_queue::QueueT::needs_notification(queue, &*mem).unwrap_or(true);
                drop(state);
                if notify {
                    signal_used(index, vring);
                }
            }
        }
        let mut log = log.as_mut().and_then(|l| l.as_mut());
        loop {
            let done = {
                let mut state = vring.get_mut();
                match log.as_mut() {
                    Some(log) => ringfence_device::process_queue_logged(
                        state.get_queue_mut(),
                        &mem,
                        handler.as_mut(),
                        stats,
                        *log,
                    ),
                    None => handler.process(state.get_queue_mut(), &mem, stats),
                }
            };
            let done = match done {
                Ok(d) => d,
                Err(source) => {
                    self.stats.queue_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(VhostUserDeviceError::Queue {
                        queue: index,
                        source,
                    });
                }
            };
            if done.notify {
                signal_used(index, vring);
            }
            if !done.more {
                let asynchronous = self.asynchronous.get(usize::from(index)).is_some_and(|a| {
                    if done.in_flight {
                        a.store(true, Ordering::Relaxed);
                    }
                    a.load(Ordering::Relaxed)
                });
                let source = if done.starved || asynchronous {
                    handler.wake_fd()
                } else {
                    None
                };
                self.watch_source(usize::from(index), source);
                return Ok(());
            }
        }
    }
}

impl VhostUserDevice {
    /// Opens queue `index`'s in-flight record for this activation and
    /// resubmits what the previous backend left in flight (see
    /// [`inflight`]); `None` when the frontend gave no memory for it.
    fn start_log(
        &self,
        index: u16,
        queue: &mut virtio_queue::Queue,
        mem: &DeviceMemory,
        handler: &mut dyn QueueHandler,
    ) -> Result<(Option<inflight::QueueLog>, u64), ringfence_device::QueueFailure> {
        use virtio_queue::QueueT;
        use vm_memory::{Bytes, GuestAddress};
        let Some(shm) = self.inflight.current() else {
            return Ok((None, 0));
        };
        let Some(mut log) = inflight::QueueLog::new(shm, index, queue.size()) else {
            tracing::warn!(
                queue = index,
                "inflight memory does not cover this queue: not tracked"
            );
            return Ok((None, 0));
        };
        let used_idx_addr = GuestAddress(queue.used_ring()).0.checked_add(2);
        let Some(ring_used) = used_idx_addr.and_then(|a| mem.read_obj::<u16>(GuestAddress(a)).ok())
        else {
            return Err(virtio_queue::Error::InvalidDescriptorIndex.into());
        };
        let recovery = log.recover(u16::from_le(ring_used));
        queue.set_next_avail(recovery.next_avail);
        queue.set_next_used(u16::from_le(ring_used));
        if !recovery.resubmit.is_empty() {
            // Would the frontend's rewind to the used index have fetched
            // exactly these again? Only if they are the next available
            // entries after it, in order: then nothing completed out of order.
            let avail_at = |i: u16| {
                let slot = u64::from(i % queue.size().max(1));
                GuestAddress(queue.avail_ring())
                    .0
                    .checked_add(4 + 2 * slot)
                    .and_then(|a| mem.read_obj::<u16>(GuestAddress(a)).ok())
                    .map(u16::from_le)
            };
            let rewind_would_do =
                recovery.resubmit.iter().enumerate().all(|(k, &h)| {
                    avail_at(u16::from_le(ring_used).wrapping_add(k as u16)) == Some(h)
                });
            tracing::info!(
                queue = index,
                count = recovery.resubmit.len(),
                heads = ?recovery.resubmit,
                out_of_order = !rewind_would_do,
                "resubmitting the requests a previous backend left in flight"
            );
            self.stats
                .resubmitted
                .fetch_add(recovery.resubmit.len() as u64, Ordering::Relaxed);
            let answered = inflight::resubmit(queue, mem, handler, &recovery.resubmit, &mut log)?;
            return Ok((Some(log), answered));
        } else if !recovery.fresh {
            tracing::info!(queue = index, "inflight record: nothing was in flight");
        }
        Ok((Some(log), 0))
    }
}

impl VhostUserBackend for VhostUserDevice {
    type Bitmap = ();
    type Vring = VringRwLock<GuestMemoryAtomic<DeviceMemory>>;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        self.max_queue_size
    }

    fn features(&self) -> u64 {
        let features = self.device_features | TRANSPORT_FEATURES;
        if self.protocol_features.load(Ordering::Relaxed) {
            features
        } else {
            features & !VHOST_USER_F_PROTOCOL_FEATURES
        }
    }

    fn acked_features(&self, features: u64) {
        let mut inner = self.lock_inner();
        // A new negotiation: a (re)connected frontend starts from a reset device.
        self.deactivate(&mut inner);
        inner.acked = features;
        tracing::info!(
            features = format_args!("{features:#x}"),
            event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0,
            access_platform = features & (1 << VIRTIO_F_ACCESS_PLATFORM) != 0,
            "frontend negotiated features"
        );
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // QEMU insists on BACKEND_REQ + REPLY_ACK whenever ACCESS_PLATFORM is
        // offered (it is the IOTLB channel when the guest has a vIOMMU).
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::BACKEND_REQ
            | VhostUserProtocolFeatures::RESET_DEVICE
            | if self.inflight.enabled() {
                VhostUserProtocolFeatures::INFLIGHT_SHMFD
            } else {
                VhostUserProtocolFeatures::empty()
            }
    }

    fn stop_vring(&self, queue_index: u32) -> std::io::Result<()> {
        // GET_VRING_BASE: the frontend is told how far the ring got, and an
        // asynchronous handler's chains in flight must be on the used ring
        // by then (else they are lost, or completed into a ring the driver
        // reset). Bounded: a request the disk never finishes is reported.
        let index = queue_index as usize;
        let Some(slot) = self.handlers.get(index) else {
            return Ok(());
        };
        let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
        // Completions are answered here now, not by the worker.
        self.watch_source(index, None);
        let Some(handler) = slot.as_mut() else {
            return Ok(());
        };
        if handler.in_flight() == 0 {
            return Ok(());
        }
        let vring = self
            .vrings
            .get(index)
            .and_then(|v| v.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let mem = self
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (Some(vring), Some(mem), Some(stats)) = (vring, mem, self.queue_stats.get(index))
        else {
            return Ok(());
        };
        let mut log = self
            .logs
            .get(index)
            .map(|l| l.lock().unwrap_or_else(|p| p.into_inner()));
        let deadline = std::time::Instant::now() + STOP_DRAIN_TIMEOUT;
        let mut answered = 0u64;
        loop {
            // Entries a busy kernel left in the submission queue go now, or
            // they would run after the frontend was told the ring stopped.
            handler.submit_started();
            let drained = {
                let mut state = vring.get_mut();
                let queue = state.get_queue_mut();
                match log.as_mut().and_then(|l| l.as_mut()) {
                    Some(l) => {
                        ringfence_device::drain_completed(queue, &mem, handler.as_mut(), stats, l)
                    }
                    None => ringfence_device::drain_completed(
                        queue,
                        &mem,
                        handler.as_mut(),
                        stats,
                        &mut ringfence_device::NoLog,
                    ),
                }
            };
            match drained {
                Ok(n) => answered += n,
                Err(e) => {
                    tracing::warn!(queue = index, error = %e, "ring broken while stopping");
                    break;
                }
            }
            if handler.in_flight() == 0 || std::time::Instant::now() >= deadline {
                break;
            }
            if let Some(fd) = handler.wake_fd() {
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, 50) };
            }
        }
        if handler.in_flight() > 0 {
            tracing::warn!(
                queue = index,
                in_flight = handler.in_flight(),
                "ring stopped with requests still running on the disk"
            );
        }
        if answered > 0 {
            tracing::debug!(
                queue = index,
                answered,
                "completed in flight before the ring stopped"
            );
            signal_used(u16::try_from(index).unwrap_or(u16::MAX), &vring);
        }
        Ok(())
    }

    fn reset_device(&self) {
        let mut inner = self.lock_inner();
        self.deactivate(&mut inner);
        if let Some(shm) = self.inflight.current() {
            shm.forget_all();
        }
        tracing::info!("device reset by the frontend");
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend configures the queues; nothing device-specific.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let inner = self.lock_inner();
        let len = (size as usize).min(inner.device.config_size());
        let mut buf = vec![0u8; len];
        match inner.device.read_config(u64::from(offset), &mut buf) {
            Ok(()) => buf,
            Err(e) => {
                tracing::warn!(error = %e, "config read refused");
                Vec::new()
            }
        }
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> std::io::Result<()> {
        self.lock_inner()
            .device
            .write_config(u64::from(offset), buf)
            .map_err(std::io::Error::other)
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<DeviceMemory>) -> std::io::Result<()> {
        let snapshot = mem.memory().into_inner();
        // Until this table is accepted, no queue touches guest memory.
        *self.memory.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let total: u64 = snapshot.iter().map(|r| r.len()).sum();
        let regions: Vec<String> = snapshot
            .iter()
            .map(|r| format!("{:#x}+{:#x}", r.start_addr().0, r.len()))
            .collect();
        for region in snapshot.iter() {
            if let Err(e) = check_region_file(region) {
                self.stats.memory_refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, ?regions, "refusing memory table");
                return Err(e.into());
            }
        }
        if let MemoryPolicy::SharedWindow { max_bytes } = self.policy {
            if total > max_bytes {
                self.stats.memory_refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    total,
                    max_bytes,
                    ?regions,
                    "refusing memory table larger than the shared window"
                );
                return Err(VhostUserDeviceError::WindowTooLarge {
                    total,
                    max: max_bytes,
                }
                .into());
            }
            tracing::info!(?regions, total, "serving shared window");
        } else {
            tracing::info!(?regions, total, "guest memory mapped (full share)");
        }
        self.stats.memory_updates.fetch_add(1, Ordering::Relaxed);
        *self.memory.lock().unwrap_or_else(|p| p.into_inner()) = Some(snapshot);
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        // One worker thread per queue.
        (0..self.num_queues.min(64)).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // Without one, a worker thread never leaves its epoll loop and the
        // daemon of a disconnected frontend cannot be dropped.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Self::Vring],
        thread_id: usize,
    ) -> std::io::Result<()> {
        if evset != EventSet::IN {
            return Err(std::io::Error::other(format!(
                "unexpected event set {evset:?}"
            )));
        }
        // One queue per worker thread (queues_per_thread): the thread's only
        // vring is queue `thread_id`, and vhost-user-backend numbers its
        // kick 0 within the thread. A handler's own source (watch_source)
        // has an id above num_queues and serves the same queue.
        let is_source = usize::from(device_event) > self.num_queues;
        let Some(vring) = vrings.first().filter(|_| device_event == 0 || is_source) else {
            return Err(std::io::Error::other(format!(
                "event {device_event} on worker {thread_id} matches no queue"
            )));
        };
        let device_event = u16::try_from(thread_id).unwrap_or(u16::MAX);
        // A queue the guest broke stops being served until the next reset, but
        // the worker thread (and every other queue) carries on: an error here
        // would end the thread for good.
        if let Err(e) = self.serve_queue(device_event, vring) {
            if let Some(b) = self.broken.get(usize::from(device_event)) {
                b.store(true, Ordering::Relaxed);
            }
            self.watch_source(usize::from(device_event), None);
            tracing::error!(error = %e, "queue stopped until the device is reset");
        }
        Ok(())
    }
}
