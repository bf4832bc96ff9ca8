//! One thread per active queue: wait for a kick, process, notify.
//!
//! The driver's kick doorbell is a descriptor the driver shares, so it
//! controls its flags and counter. A worker therefore never blocks on it: it
//! sleeps in `poll` on the kick and on a backend-private wake eventfd (rung
//! for in-band EVENT_AVAIL and to stop it), and clears the kick with a read
//! that cannot block. Stopping a worker has a time bound; a worker that does
//! not stop in time (blocked in a write the driver wedged, say) is abandoned
//! and counted, never joined forever.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringfence_bus::Doorbell;
use ringfence_device::{DeviceMemory, Interrupt, InterruptKind, QueueHandler, QueueStats};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::BackendStats;

/// How long a stopping worker gets before it is abandoned.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(1);

/// The backend-private wake-up of one worker.
pub(crate) struct Wake(EventFd);

impl Wake {
    pub(crate) fn new() -> std::io::Result<Self> {
        Ok(Self(EventFd::new(EFD_NONBLOCK)?))
    }

    /// Wakes the worker; a counter already at its maximum is rung anyway.
    pub(crate) fn ring(&self) {
        let _ = self.0.write(1);
    }

    fn clear(&self) -> bool {
        self.0.read().is_ok()
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A running queue worker.
pub(crate) struct Worker {
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<Queue>>,
}

pub(crate) struct WorkerCtx {
    pub index: u16,
    pub queue: Queue,
    pub handler: Box<dyn QueueHandler>,
    /// The driver's doorbell, if the bus has doorbells.
    pub kick: Option<Arc<dyn Doorbell>>,
    pub wake: Arc<Wake>,
    pub memory: GuestMemoryAtomic<DeviceMemory>,
    pub interrupt: Arc<dyn Interrupt>,
    pub needs_reset: Arc<AtomicBool>,
    pub stats: Arc<QueueStats>,
    pub backend_stats: Arc<BackendStats>,
    /// How long to keep polling the avail ring after a batch before sleeping.
    pub poll: Duration,
}

/// How a stop ended.
pub(crate) enum Stopped {
    /// The thread ended and gave its queue back.
    Joined,
    /// The thread did not end within the bound; it was detached.
    Abandoned,
}

impl Worker {
    pub(crate) fn spawn(mut ctx: WorkerCtx) -> std::io::Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let wake = ctx.wake.clone();
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vq{}", ctx.index))
            .spawn(move || {
                ctx.run(&stop_flag);
                ctx.queue
            })?;
        Ok(Worker {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    fn signal_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.ring();
    }

    /// Stops the worker, waiting at most `timeout` for its thread to end.
    pub(crate) fn stop(mut self, timeout: Duration) -> Stopped {
        self.signal_stop();
        let Some(thread) = self.thread.take() else {
            return Stopped::Joined;
        };
        let deadline = Instant::now() + timeout;
        while !thread.is_finished() {
            if Instant::now() >= deadline {
                // Dropping the handle detaches the thread. It holds only its
                // queue, its handler and a memory view; once unblocked it sees
                // the stop flag before touching the queue again.
                return Stopped::Abandoned;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = thread.join();
        Stopped::Joined
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.signal_stop();
        }
    }
}

/// Sleeps until one of `fds` is readable; returns which ones are (none on
/// EINTR, which the caller treats as a spurious wake-up).
fn poll_any(fds: &[RawFd]) -> [bool; 3] {
    let mut pfds = [libc::pollfd {
        fd: -1,
        events: libc::POLLIN,
        revents: 0,
    }; 3];
    for (p, &fd) in pfds.iter_mut().zip(fds) {
        p.fd = fd;
    }
    let n = fds.len().min(pfds.len());
    // SAFETY: pfds is a valid array of at least n pollfds for the call.
    unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, -1) };
    pfds.map(|p| p.revents & libc::POLLIN != 0)
}

impl WorkerCtx {
    /// Waits for a kick or a wake-up and clears what was rung: one poll and
    /// one read per wake-up. A kick that arrives while the queue is being
    /// processed leaves its descriptor readable, so the poll returns at once.
    /// A `starved` handler (driver buffers waiting, no data for them), or
    /// one with requests `in_flight`, is also woken by its own source,
    /// which it drains itself.
    fn wait_for_work(&self, starved: bool, in_flight: bool) {
        // -1 is ignored by poll.
        let kick_fd = self
            .kick
            .as_ref()
            .and_then(|k| k.pollable_fd())
            .unwrap_or(-1);
        let source_fd = if starved || in_flight {
            self.handler.wake_fd().unwrap_or(-1)
        } else {
            -1
        };
        loop {
            let [woken, kicked, source] = poll_any(&[self.wake.fd(), kick_fd, source_fd]);
            if source {
                return;
            }
            let kicked = kicked
                && self
                    .kick
                    .as_ref()
                    .is_some_and(|k| k.try_clear().unwrap_or(false));
            if (woken && self.wake.clear()) | kicked {
                return;
            }
        }
    }

    fn run(&mut self, stop: &AtomicBool) {
        // Buffers may already be waiting (the driver kicked before DRIVER_OK completed).
        let mut pending = true;
        let mut starved = false;
        let mut in_flight = false;
        loop {
            if !pending {
                self.wait_for_work(starved, in_flight);
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let mem = self.memory.memory();
            match self.handler.process(&mut self.queue, &mem, &self.stats) {
                Ok(done) => {
                    starved = done.starved;
                    in_flight = done.in_flight;
                    if done.notify {
                        if let Err(e) = self.interrupt.trigger(InterruptKind::Queue(self.index)) {
                            tracing::warn!(error = %e, "used notification lost");
                        }
                    }
                    if done.more {
                        // Notifications are still off: come straight back.
                        pending = true;
                        continue;
                    }
                }
                Err(e) => {
                    drop(mem);
                    tracing::warn!(queue = self.index, error = %e, "queue broken by the driver: device needs reset");
                    self.backend_stats
                        .queue_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.needs_reset.store(true, Ordering::SeqCst);
                    let _ = self.interrupt.trigger(InterruptKind::Config);
                    // Stay parked until reset: the queue is not touched again
                    // and kicks are no longer read. Requests still running
                    // are reaped (and dropped) as they finish, so that
                    // their memory views do not hold areas being revoked.
                    while !stop.load(Ordering::SeqCst) {
                        let source = if self.handler.in_flight() > 0 {
                            self.handler.wake_fd().unwrap_or(-1)
                        } else {
                            -1
                        };
                        poll_any(&[self.wake.fd(), source]);
                        self.wake.clear();
                        while self.handler.next_completed().is_some() {}
                    }
                    return;
                }
            }
            // Like QEMU's adaptive polling: a new request usually follows soon,
            // and catching it here saves a sleep and a wakeup on both sides.
            // A starved queue has buffers already: polling the avail ring
            // would spin until its source has data.
            // The batch's view of memory goes before polling: a revocation
            // (a grant ending) waits for every view that holds the area.
            // Requests in flight wake the worker through the handler's
            // source when they complete; spinning on the avail ring alone
            // would only delay that.
            drop(mem);
            pending = !starved && !in_flight && self.poll_for_work();
        }
    }

    fn poll_for_work(&self) -> bool {
        if self.poll.is_zero() {
            return false;
        }
        let deadline = Instant::now() + self.poll;
        loop {
            // A fresh view per look, held only for the look.
            let mem = self.memory.memory();
            match self.queue.avail_idx(&*mem, Ordering::Acquire) {
                Ok(idx) if idx.0 != self.queue.next_avail() => return true,
                Ok(_) => {}
                Err(_) => return true, // let process_queue report it
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}
