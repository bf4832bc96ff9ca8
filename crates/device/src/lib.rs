//! The device API. A device model implements [`VirtioDevice`] and, once
//! activated, one [`QueueHandler`] per queue; it never learns which transport
//! (virtio-msg, vhost-user) or which memory model (window + bounce, grants,
//! full share) serves it. Memory is passed as a parameter on every call.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestAddress;

pub use virtio_bindings::virtio_config;

/// The memory a device may touch: exactly what the driver side shared, and
/// nothing else. Addresses outside it do not translate.
pub type DeviceMemory = vm_memory::GuestMemoryMmap;

/// A descriptor chain as handed to a device.
pub type Chain<'a> = DescriptorChain<&'a DeviceMemory>;

/// What a device asks its transport to signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// The config space changed (the transport bumps the generation).
    Config,
    /// Buffers were used on this queue.
    Queue(u16),
}

/// Signals the driver. Implemented by transports.
pub trait Interrupt: Send + Sync {
    /// Raises the interrupt.
    fn trigger(&self, kind: InterruptKind) -> Result<(), InterruptError>;
}

/// An interrupt could not be delivered.
#[derive(Debug, thiserror::Error)]
#[error("interrupt {kind:?} not delivered: {reason}")]
pub struct InterruptError {
    /// Which interrupt.
    pub kind: InterruptKind,
    /// Why.
    pub reason: String,
}

/// Errors of a device model's control path.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A config access outside the config space.
    #[error("config access of {len} bytes at offset {offset} outside {size}-byte config space")]
    ConfigOutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: usize,
        /// Config size.
        size: usize,
    },
    /// A config field that may not be written.
    #[error("config write to read-only bytes at offset {offset}")]
    ConfigReadOnly {
        /// Offset.
        offset: u64,
    },
    /// Activation failed.
    #[error("activation failed: {reason}")]
    Activate {
        /// Why.
        reason: String,
    },
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// virtio device id (2 = block, ...).
    fn device_type(&self) -> u32;
    /// Device-specific feature bits. The transport adds the transport features
    /// it implements itself (VERSION_1, EVENT_IDX, INDIRECT_DESC, ...).
    fn device_features(&self) -> u64;
    /// Number of queues.
    fn num_queues(&self) -> u16;
    /// Largest size of each queue (a power of two).
    fn max_queue_size(&self) -> u16;
    /// Size of the config space in bytes.
    fn config_size(&self) -> usize;
    /// Reads config bytes at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes config bytes at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// Starts the device with the features the driver accepted; returns one
    /// handler per queue, which the transport may run on separate threads.
    fn activate(&mut self, acked_features: u64) -> Result<Vec<Box<dyn QueueHandler>>, DeviceError>;
    /// Returns the device to its initial state (handlers have been dropped).
    fn reset(&mut self);
    /// A watch over config changes that come from outside the driver and
    /// have nothing to wait on (a terminal resized), for the transport to
    /// run while the device is live; asked for right after `activate`.
    /// `None`, the default, when the config changes only on driver writes.
    fn config_watch(&mut self) -> Option<Box<dyn ConfigWatch>> {
        None
    }
    /// Whether the device's queues may complete chains out of order (block
    /// I/O on io_uring). A transport that restarts a crashed backend must
    /// then know which chains were in flight (vhost-user's in-flight
    /// tracking); in order, the used index says it all.
    fn completes_out_of_order(&self) -> bool {
        false
    }
}

/// Looks for config changes on a timer (see [`VirtioDevice::config_watch`]).
/// It shares the model's config state, so what `poll` finds is what
/// `read_config` serves.
pub trait ConfigWatch: Send {
    /// How often to look.
    fn interval(&self) -> std::time::Duration;
    /// Looks; true if the config space changed (the transport then raises
    /// a config interrupt).
    fn poll(&mut self) -> bool;
}

/// Runs a [`ConfigWatch`] on its own thread while a device is live and
/// calls `on_change` for each change it finds; stopped (and joined) on drop.
/// Transports use it to raise their config interrupt.
pub struct ConfigWatcher {
    stop: std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConfigWatcher {
    /// Starts `watch`; `name` names the thread.
    pub fn spawn(
        mut watch: Box<dyn ConfigWatch>,
        on_change: impl Fn() + Send + 'static,
        name: String,
    ) -> std::io::Result<Self> {
        let stop = std::sync::Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
        let stopped = stop.clone();
        // Never faster than 10 ms, whatever the model asks.
        let interval = watch.interval().max(std::time::Duration::from_millis(10));
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let (lock, cv) = &*stopped;
            loop {
                {
                    let done = lock.lock().unwrap_or_else(|p| p.into_inner());
                    let (done, _) = cv
                        .wait_timeout_while(done, interval, |d| !*d)
                        .unwrap_or_else(|p| p.into_inner());
                    if *done {
                        return;
                    }
                }
                // Outside the lock: a slow look or notice never holds up
                // the drop that stops the watch for longer than itself.
                if watch.poll() {
                    on_change();
                }
            }
        })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Processes the requests of one queue.
pub trait QueueHandler: Send {
    /// Handles one chain and returns the number of bytes written into
    /// device-writable buffers (the used length). A malformed request is
    /// answered in-band (a status byte) wherever the device can identify
    /// where to answer; a chain it cannot parse at all is a [`ChainError`],
    /// which breaks the queue (the chain is not put on the used ring and
    /// nothing is written). Never panics.
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError>;

    /// Whether the handler has something for the next available chain.
    /// A queue that serves driver requests (TX, block) is always ready; a
    /// queue the backend fills on its own (net RX, console input) is ready
    /// once it holds data from its backend end, and a rate-limited one once
    /// its budget allows. It is asked before each chain is popped, so a
    /// handler that is not ready never costs the driver a buffer.
    fn ready(&mut self) -> bool {
        true
    }

    /// A descriptor that becomes readable when a handler that was not
    /// [`ready`](Self::ready) may be again (a TAP or PTY, a timer). The
    /// transport waits on it only while the driver has buffers the handler
    /// could not fill, so a source with data but no driver buffers is never
    /// polled (no busy loop) and its data stays where it is (no drop). The
    /// handler clears the readiness itself (in `ready`); one that stays
    /// readable while the handler is not ready would make the transport spin.
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }

    /// `true` while [`process`](Self::process) is the default, one
    /// [`handle_chain`](Self::handle_chain) per chain. A handler that
    /// overrides `process` says `false`, and a transport that must act
    /// around every chain (staging copies for grants it cannot map) then
    /// leaves the queue to the handler.
    fn serves_chain_by_chain(&self) -> bool {
        true
    }

    /// Starts answering a chain. The default answers it at once with
    /// [`handle_chain`](Self::handle_chain). An asynchronous handler (block
    /// I/O on io_uring) may instead keep the chain and answer
    /// [`Started::InFlight`]; it then owes a [`Completed`] for it from
    /// [`next_completed`](Self::next_completed), in any order, once its
    /// bytes are written. [`handle_chain`](Self::handle_chain) must still
    /// answer a chain in full: a transport that acts around every chain
    /// (staging copies) calls it instead.
    fn start_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<Started, ChainError> {
        self.handle_chain(chain, mem).map(Started::Done)
    }

    /// Hands the chains started since the last call to whatever executes
    /// them (one system call per batch); called after each batch of
    /// [`start_chain`](Self::start_chain).
    fn submit_started(&mut self) {}

    /// The next chain that finished since it was started
    /// [`InFlight`](Started::InFlight), if any. Never blocks.
    fn next_completed(&mut self) -> Option<Completed> {
        None
    }

    /// Chains started and not yet completed. While there are some, the
    /// transport waits on [`wake_fd`](Self::wake_fd) as well as on the
    /// kick, and serves the queue when it is readable.
    fn in_flight(&self) -> usize {
        0
    }

    /// Serves the queue once: pops available chains, answers them and puts
    /// them on the used ring. The default answers one chain at a time with
    /// [`handle_chain`](Self::handle_chain) (see [`process_queue`]); a
    /// handler whose answers span several chains (net RX with mergeable
    /// buffers) overrides it and must keep the same contract: at most
    /// [`MAX_CHAINS_PER_CALL`] chains, EVENT_IDX honoured, nothing visible
    /// to the driver on the used ring before its bytes are written.
    fn process(
        &mut self,
        queue: &mut Queue,
        mem: &DeviceMemory,
        stats: &QueueStats,
    ) -> Result<Processed, QueueFailure> {
        process_queue(queue, mem, self, stats)
    }
}

/// What [`QueueHandler::start_chain`] did with a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// Answered: the used length.
    Done(u32),
    /// Still running: it comes back from [`QueueHandler::next_completed`].
    InFlight,
}

/// A chain an asynchronous handler finished: its bytes are written and it
/// may go on the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completed {
    /// Head index of the chain.
    pub head: u16,
    /// Used length.
    pub len: u32,
}

/// One descriptor of a chain, copied out of shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Device-visible address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// A descriptor chain that cannot be parsed: there is no place where the
/// device could answer it in-band, so the queue is broken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head does not yield a descriptor (an index or indirect table
    /// that does not translate, a nested or misaligned indirect table).
    #[error("chain at head {head} yields no descriptor")]
    Empty {
        /// Head index.
        head: u16,
    },
    /// The walk stopped on a descriptor that still says NEXT: a `next`
    /// outside the table, a loop, an unreadable indirect entry, or more
    /// than 4 GiB in total.
    #[error("chain at head {head} breaks after {walked} descriptors (last one still has NEXT)")]
    Broken {
        /// Head index.
        head: u16,
        /// Descriptors read before the walk stopped.
        walked: usize,
    },
    /// More descriptors than the device accepts in one chain.
    #[error("chain at head {head} is longer than {max} descriptors")]
    TooLong {
        /// Head index.
        head: u16,
        /// The bound.
        max: usize,
    },
    /// The device-specific layout has no place for an answer (for example
    /// no device-writable status byte inside shared memory).
    #[error("chain at head {head} has no place for the device's answer: {reason}")]
    Unanswerable {
        /// Head index.
        head: u16,
        /// What is missing.
        reason: &'static str,
    },
}

/// The in-band answer byte that virtio-blk (status) and virtio-net's control
/// queue (ack) put last: the last byte of the last descriptor, which must be
/// device-writable and inside shared memory. Without it the chain cannot be
/// answered at all.
pub fn answer_byte(
    segments: &[Segment],
    head: u16,
    mem: &DeviceMemory,
) -> Result<GuestAddress, ChainError> {
    use vm_memory::{Address, GuestMemoryBackend};
    let unanswerable = |reason| ChainError::Unanswerable { head, reason };
    let last = segments.last().ok_or(unanswerable("no descriptor"))?;
    if !last.writable || last.len == 0 {
        return Err(unanswerable(
            "last descriptor is not a device-writable answer byte",
        ));
    }
    let addr = last
        .addr
        .checked_add(u64::from(last.len - 1))
        .ok_or(unanswerable("answer byte address overflows"))?;
    mem.check_address(addr)
        .ok_or(unanswerable("answer byte outside shared memory"))
}

/// Walks the whole chain into `out` (cleared first), at most `max`
/// descriptors, and checks that it ended where the driver said it ends: on
/// a descriptor without NEXT. `virtio-queue`'s iterator stops silently on a
/// bad `next`, a loop or a bad indirect table; this turns each of those into
/// an error instead of a shorter chain.
pub fn walk_chain(chain: Chain<'_>, max: usize, out: &mut Vec<Segment>) -> Result<(), ChainError> {
    let head = chain.head_index();
    out.clear();
    let mut last_has_next = false;
    for desc in chain {
        if out.len() >= max {
            return Err(ChainError::TooLong { head, max });
        }
        out.push(Segment {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
        last_has_next = desc.has_next();
    }
    if out.is_empty() {
        return Err(ChainError::Empty { head });
    }
    if last_has_next {
        return Err(ChainError::Broken {
            head,
            walked: out.len(),
        });
    }
    Ok(())
}

/// Counters a transport keeps per queue.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Chains processed.
    pub chains: AtomicU64,
    /// Driver notifications sent.
    pub notifications: AtomicU64,
}

/// The queue itself is broken (not one request): the device needs a reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueFailure {
    /// The rings themselves are unusable (an avail index too far ahead, a
    /// ring that no longer translates).
    #[error("virtqueue failure")]
    Ring(#[from] virtio_queue::Error),
    /// A chain that cannot be answered in-band.
    #[error("unparsable descriptor chain")]
    Chain(#[from] ChainError),
}

/// Hard bound on chains processed per call, so one busy queue cannot starve
/// the others or the control path.
pub const MAX_CHAINS_PER_CALL: usize = 1024;

/// What one [`process_queue`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Processed {
    /// Chains popped from the available ring.
    pub chains: usize,
    /// The driver must be notified.
    pub notify: bool,
    /// The per-call bound was hit with chains still available: call again
    /// without waiting for a notification (none may come).
    pub more: bool,
    /// The driver has buffers the handler could not fill (it was not
    /// ready): wait on [`QueueHandler::wake_fd`] as well as on the kick.
    pub starved: bool,
    /// Chains are still running in the handler: wait on
    /// [`QueueHandler::wake_fd`] as well as on the kick.
    pub in_flight: bool,
}

/// Pops every available chain of `queue` (at most [`MAX_CHAINS_PER_CALL`]),
/// starts it in `handler`, puts what is answered or completed on the used
/// ring (in completion order), and tells whether the driver must be
/// notified (honouring EVENT_IDX when enabled on the queue). Completions
/// are signalled as they are found, once per call, never held for a batch.
/// A chain's bytes are written before it goes on the used ring.
pub fn process_queue<H: QueueHandler + ?Sized>(
    queue: &mut Queue,
    mem: &DeviceMemory,
    handler: &mut H,
    stats: &QueueStats,
) -> Result<Processed, QueueFailure> {
    process_queue_logged(queue, mem, handler, stats, &mut NoLog)
}

/// Records, in memory that outlives the backend process, which chains the
/// device holds, so that a restarted backend can finish them (vhost-user's
/// in-flight tracking). [`process_queue_logged`] calls it around every pop
/// and every used entry.
pub trait InflightLog {
    /// `head` was taken from the available ring.
    fn popped(&mut self, head: u16);
    /// `head` is about to go on the used ring.
    fn completing(&mut self, head: u16);
    /// `head` is on the used ring, whose index is now `used_idx`.
    fn completed(&mut self, head: u16, used_idx: u16);
}

/// Logs nothing.
#[derive(Debug, Default)]
pub struct NoLog;

impl InflightLog for NoLog {
    fn popped(&mut self, _: u16) {}
    fn completing(&mut self, _: u16) {}
    fn completed(&mut self, _: u16, _: u16) {}
}

/// Puts one answered chain on the used ring, logged.
pub fn add_used_logged(
    queue: &mut Queue,
    mem: &DeviceMemory,
    head: u16,
    len: u32,
    log: &mut dyn InflightLog,
) -> Result<(), QueueFailure> {
    log.completing(head);
    queue.add_used(mem, head, len)?;
    log.completed(head, queue.next_used());
    Ok(())
}

/// Puts every chain `handler` has finished on the used ring (logged) and
/// takes no new ones: for a ring being stopped, whose chains in flight must
/// be answered before the frontend is told where the ring stands. Returns
/// how many were put.
pub fn drain_completed<H: QueueHandler + ?Sized>(
    queue: &mut Queue,
    mem: &DeviceMemory,
    handler: &mut H,
    stats: &QueueStats,
    log: &mut dyn InflightLog,
) -> Result<u64, QueueFailure> {
    let mut answered = 0u64;
    while let Some(done) = handler.next_completed() {
        add_used_logged(queue, mem, done.head, done.len, log)?;
        answered += 1;
    }
    stats.chains.fetch_add(answered, Ordering::Relaxed);
    Ok(answered)
}

/// [`process_queue`], recording every chain popped and every chain used in
/// `log`.
pub fn process_queue_logged<H: QueueHandler + ?Sized>(
    queue: &mut Queue,
    mem: &DeviceMemory,
    handler: &mut H,
    stats: &QueueStats,
    log: &mut dyn InflightLog,
) -> Result<Processed, QueueFailure> {
    let mut processed = 0usize;
    let mut answered = 0u64;
    let mut starved = false;
    loop {
        if queue.event_idx_enabled() {
            queue.disable_notification(mem)?;
        }
        // One chain at a time: no allocation on the data path, and a broken
        // avail index surfaces as an error instead of an empty queue.
        while processed < MAX_CHAINS_PER_CALL {
            if !handler.ready() {
                starved = queue.avail_idx(mem, Ordering::Acquire)?.0 != queue.next_avail();
                break;
            }
            let Some(chain) = queue.iter(mem)?.next() else {
                break;
            };
            let head = chain.head_index();
            log.popped(head);
            if let Started::Done(used) = handler.start_chain(chain, mem)? {
                add_used_logged(queue, mem, head, used, log)?;
                answered += 1;
            }
            processed = processed.saturating_add(1);
        }
        // Buffered I/O that hits the page cache completes during the
        // submission: reaping right after it spares a wake-up.
        handler.submit_started();
        while let Some(done) = handler.next_completed() {
            add_used_logged(queue, mem, done.head, done.len, log)?;
            answered += 1;
        }
        // With EVENT_IDX, re-enable and re-check so a buffer added meanwhile
        // is not missed. A starved handler has buffers already: re-checking
        // would spin until its backend end has data.
        if starved
            || processed >= MAX_CHAINS_PER_CALL
            || !queue.event_idx_enabled()
            || !queue.enable_notification(mem)?
        {
            break;
        }
    }
    stats.chains.fetch_add(answered, Ordering::Relaxed);
    let notify = answered > 0 && queue.needs_notification(mem)?;
    if notify {
        stats.notifications.fetch_add(1, Ordering::Relaxed);
    }
    Ok(Processed {
        chains: processed,
        notify,
        more: processed >= MAX_CHAINS_PER_CALL,
        starved,
        in_flight: handler.in_flight() > 0,
    })
}

/// Copies `data` into a config-space image after checking bounds; shared by device models.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
    let src = usize::try_from(offset)
        .ok()
        .and_then(|o| config.get(o..o.checked_add(data.len())?))
        .ok_or(DeviceError::ConfigOutOfRange {
            offset,
            len: data.len(),
            size: config.len(),
        })?;
    data.copy_from_slice(src);
    Ok(())
}

/// Serves `queue` with [`process_queue`] until nothing is in flight,
/// sleeping on the handler's [`QueueHandler::wake_fd`] in between (at most
/// `timeout` per wait). For tests of asynchronous handlers. Returns the
/// calls' sum: chains popped, and whether any asked to notify.
#[cfg(feature = "test-utils")]
pub fn process_until_idle<H: QueueHandler + ?Sized>(
    queue: &mut Queue,
    mem: &DeviceMemory,
    handler: &mut H,
    stats: &QueueStats,
    timeout: std::time::Duration,
) -> Result<Processed, QueueFailure> {
    let mut total = process_queue(queue, mem, handler, stats)?;
    while total.in_flight {
        if let Some(fd) = handler.wake_fd() {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            if unsafe { libc::poll(&mut pfd, 1, ms) } == 0 {
                break; // still in flight: the caller sees `in_flight`
            }
        }
        let p = process_queue(queue, mem, handler, stats)?;
        total.chains += p.chains;
        total.notify |= p.notify;
        total.in_flight = p.in_flight;
        total.more |= p.more;
        total.starved = p.starved;
    }
    Ok(total)
}
