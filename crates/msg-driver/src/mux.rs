//! Several devices on one bus connection.
//!
//! A [`DriverBus`] has one receive side, and a [`MsgTransport`](crate::MsgTransport)
//! consumes every message it reads. [`BusMux`] owns that receive side and
//! hands out per-device *views*, each a [`DriverBus`] whose `recv` returns only
//! the messages for its device number (bus messages, dev_num 0, go to the view
//! for device 0, which [`discover`](crate::discover) can use). Everything else a
//! view does goes straight to the underlying bus.
//!
//! Each device's driver runs on its own thread, so several threads call `recv`
//! on different views at once. One of them at a time (the *reader*) reads the
//! underlying bus, in slices of at most [`MuxOptions::read_slice`], files what
//! it read into the per-view queues and wakes the others; a thread whose
//! message was filed by the reader returns at once. The routing lock is never
//! held across the blocking read.
//!
//! The device side is hostile: per-view queues are bounded (a device that
//! floods loses its own messages, counted), and messages that do not decode
//! or are for a device without a view are dropped and counted.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ringfence_bus::{
    AreaId, BusError, BusLimits, Doorbell, DoorbellDirection, DriverBus, LocalArea, PrivateMemory,
};
use ringfence_virtio_msg::consts::{ABSOLUTE_MAX_MSG_SIZE, HEADER_SIZE};
use ringfence_virtio_msg::decode;

/// Default bound of each view's queue, in messages.
pub const DEFAULT_QUEUE_LIMIT: usize = 256;

/// Default longest single read of the underlying bus, after which the reader
/// looks at the state again (and gives up reading if its caller is done).
pub const DEFAULT_READ_SLICE: Duration = Duration::from_millis(50);

/// Tuning of a [`BusMux`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuxOptions {
    /// Most messages queued for one device number; more are dropped and
    /// counted in [`MuxStats::dropped_queue_full`]. At least 1 is used.
    pub queue_limit: usize,
    /// Longest single read of the underlying bus. At least 1 ms is used.
    pub read_slice: Duration,
}

impl Default for MuxOptions {
    fn default() -> Self {
        Self {
            queue_limit: DEFAULT_QUEUE_LIMIT,
            read_slice: DEFAULT_READ_SLICE,
        }
    }
}

/// What the mux did with the messages it read.
#[derive(Debug, Default)]
pub struct MuxStats {
    /// Messages filed into the queue of a view (for any thread).
    pub routed: AtomicU64,
    /// Of `routed`, those read by a thread waiting on another view.
    pub queued_for_other: AtomicU64,
    /// Messages for a device number nobody has a view for.
    pub dropped_unknown_device: AtomicU64,
    /// Messages dropped because their view's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Messages that did not decode as virtio-msg.
    pub dropped_undecodable: AtomicU64,
}

/// Counts one drop; logs the first of each kind loudly, the rest quietly, so
/// a flooding device cannot flood the log too.
fn count_drop(counter: &AtomicU64, dev_num: Option<u16>, why: &'static str) {
    if counter.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::warn!(?dev_num, why, "bus message dropped (first of its kind)");
    } else {
        tracing::debug!(?dev_num, why, "bus message dropped");
    }
}

/// A copy of a bus error, so one failure can be returned to every view.
fn replicate(e: &BusError) -> BusError {
    match e {
        BusError::Disconnected => BusError::Disconnected,
        BusError::Timeout(d) => BusError::Timeout(*d),
        BusError::TooLarge { len, max } => BusError::TooLarge {
            len: *len,
            max: *max,
        },
        BusError::Protocol { reason } => BusError::Protocol {
            reason: reason.clone(),
        },
        BusError::Unsupported { op } => BusError::Unsupported { op },
        BusError::Io { op, source } => BusError::Io {
            op,
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
    }
}

/// The queue of one device number.
struct Slot {
    queue: VecDeque<Vec<u8>>,
    /// Live views of this device number; the slot goes when the last does.
    views: usize,
}

struct State {
    slots: HashMap<u16, Slot>,
    /// A thread is reading the underlying bus.
    reading: bool,
    /// The first error of the underlying bus; every later `recv` returns it.
    error: Option<BusError>,
    /// The reader's buffer, taken out while it reads.
    read_buf: Vec<u8>,
}

/// Routes the messages of one bus connection to per-device views.
pub struct BusMux {
    bus: Arc<dyn DriverBus>,
    options: MuxOptions,
    state: Mutex<State>,
    /// Signalled when a message is filed, the reader steps down or the bus fails.
    changed: Condvar,
    stats: MuxStats,
}

impl std::fmt::Debug for BusMux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusMux")
            .field("options", &self.options)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl BusMux {
    /// Takes over the receive side of `bus`, with default options. Nothing
    /// else may call `bus.recv` from now on.
    pub fn new(bus: Arc<dyn DriverBus>) -> Arc<Self> {
        Self::with_options(bus, MuxOptions::default())
    }

    /// Like [`new`](Self::new), with explicit options.
    pub fn with_options(bus: Arc<dyn DriverBus>, options: MuxOptions) -> Arc<Self> {
        let options = MuxOptions {
            queue_limit: options.queue_limit.max(1),
            read_slice: options.read_slice.max(Duration::from_millis(1)),
        };
        Arc::new(Self {
            bus,
            options,
            state: Mutex::new(State {
                slots: HashMap::new(),
                reading: false,
                error: None,
                read_buf: Vec::new(),
            }),
            changed: Condvar::new(),
            stats: MuxStats::default(),
        })
    }

    /// A view of the bus for device `dev_num` (0: bus messages). Messages for
    /// a device are kept only while it has a view, so create the views before
    /// talking to the devices. Two views of one device share its queue (each
    /// message goes to one of them).
    pub fn device(self: &Arc<Self>, dev_num: u16) -> Arc<dyn DriverBus> {
        self.lock()
            .slots
            .entry(dev_num)
            .or_insert_with(|| Slot {
                queue: VecDeque::new(),
                views: 0,
            })
            .views += 1;
        Arc::new(MuxView {
            mux: self.clone(),
            dev_num,
        })
    }

    /// What the mux did so far.
    pub fn stats(&self) -> &MuxStats {
        &self.stats
    }

    /// The options in force (after clamping).
    pub fn options(&self) -> MuxOptions {
        self.options
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Files one message read from the bus by a thread waiting for `reader`.
    fn route(&self, st: &mut State, bytes: &[u8], reader: u16) {
        let dev_num = match decode(bytes) {
            Ok(m) => m.dev_num,
            Err(e) => {
                tracing::debug!(error = %e, "undecodable bus message");
                count_drop(&self.stats.dropped_undecodable, None, "undecodable");
                return;
            }
        };
        let Some(slot) = st.slots.get_mut(&dev_num) else {
            count_drop(
                &self.stats.dropped_unknown_device,
                Some(dev_num),
                "no view for this device",
            );
            return;
        };
        if slot.queue.len() >= self.options.queue_limit {
            count_drop(
                &self.stats.dropped_queue_full,
                Some(dev_num),
                "queue of the device full",
            );
            return;
        }
        slot.queue.push_back(bytes.to_vec());
        self.stats.routed.fetch_add(1, Ordering::Relaxed);
        if dev_num != reader {
            self.stats.queued_for_other.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn recv(
        &self,
        dev_num: u16,
        buf: &mut [u8],
        timeout: Option<Duration>,
    ) -> Result<Option<usize>, BusError> {
        // A timeout too large to add is as good as none.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = self.lock();
        loop {
            if let Some(msg) = st.slots.get_mut(&dev_num).and_then(|s| s.queue.pop_front()) {
                // Callers pass `limits().max_msg_size` bytes; a smaller
                // buffer loses the message rather than getting part of it.
                let max = buf.len();
                let dst = buf.get_mut(..msg.len()).ok_or(BusError::TooLarge {
                    len: msg.len(),
                    max,
                })?;
                dst.copy_from_slice(&msg);
                return Ok(Some(msg.len()));
            }
            if let Some(e) = &st.error {
                return Err(replicate(e));
            }
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if st.reading {
                // Follower: the reader wakes us when it files something, steps
                // down or the bus fails.
                st = match left {
                    None => self.changed.wait(st).unwrap_or_else(|p| p.into_inner()),
                    Some(l) if l.is_zero() => return Ok(None),
                    Some(l) => {
                        self.changed
                            .wait_timeout(st, l)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    }
                };
                continue;
            }
            // Reader. A zero timeout still polls the bus once.
            let slice = left.map_or(self.options.read_slice, |l| l.min(self.options.read_slice));
            st.reading = true;
            let mut rbuf = std::mem::take(&mut st.read_buf);
            let size = self
                .bus
                .limits()
                .max_msg_size
                .clamp(HEADER_SIZE, ABSOLUTE_MAX_MSG_SIZE);
            rbuf.resize(size, 0);
            drop(st);
            let guard = PanicGuard(self);
            let r = self.bus.recv(&mut rbuf, Some(slice));
            std::mem::forget(guard);
            st = self.lock();
            st.reading = false;
            match r {
                Ok(Some(n)) => self.route(&mut st, rbuf.get(..n).unwrap_or(&[]), dev_num),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, "bus receive failed; every device sees it");
                    st.error = Some(e);
                }
            }
            st.read_buf = rbuf;
            // Someone may have a message now, and someone must take over reading.
            self.changed.notify_all();
            if left.is_some_and(|l| l.is_zero())
                && st.slots.get(&dev_num).is_none_or(|s| s.queue.is_empty())
                && st.error.is_none()
            {
                return Ok(None);
            }
        }
    }
}

/// Armed while a thread reads the bus: if the bus panics, the reader's place
/// must not stay taken forever (the followers would never read again).
struct PanicGuard<'a>(&'a BusMux);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.reading = false;
        st.error.get_or_insert(BusError::Protocol {
            reason: "the bus panicked while receiving".into(),
        });
        self.0.changed.notify_all();
    }
}

/// One device's view of a [`BusMux`].
struct MuxView {
    mux: Arc<BusMux>,
    dev_num: u16,
}

impl Drop for MuxView {
    fn drop(&mut self) {
        let mut st = self.mux.lock();
        if let Some(slot) = st.slots.get_mut(&self.dev_num) {
            slot.views = slot.views.saturating_sub(1);
            if slot.views == 0 {
                st.slots.remove(&self.dev_num);
            }
        }
    }
}

impl DriverBus for MuxView {
    fn limits(&self) -> BusLimits {
        self.mux.bus.limits()
    }

    fn send(&self, msg: &[u8]) -> Result<(), BusError> {
        self.mux.bus.send(msg)
    }

    fn recv(&self, buf: &mut [u8], timeout: Option<Duration>) -> Result<Option<usize>, BusError> {
        self.mux.recv(self.dev_num, buf, timeout)
    }

    fn share_area(&self, size: usize) -> Result<LocalArea, BusError> {
        self.mux.bus.share_area(size)
    }

    fn unshare_area(&self, id: AreaId) -> Result<(), BusError> {
        self.mux.bus.unshare_area(id)
    }

    fn alloc_private(&self, size: usize) -> Result<PrivateMemory, BusError> {
        self.mux.bus.alloc_private(size)
    }

    fn grant(&self, memory: &PrivateMemory, offset: u64, len: u64) -> Result<AreaId, BusError> {
        self.mux.bus.grant(memory, offset, len)
    }

    fn doorbell(
        &self,
        dev_num: u16,
        queue: u16,
        direction: DoorbellDirection,
    ) -> Result<Option<Arc<dyn Doorbell>>, BusError> {
        self.mux.bus.doorbell(dev_num, queue, direction)
    }
}
