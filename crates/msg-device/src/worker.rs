//! One thread per active queue: wait for a kick, process, notify.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ringfence_bus::Doorbell;
use ringfence_device::{
    process_queue, DeviceMemory, Interrupt, InterruptKind, QueueHandler, QueueStats,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A running queue worker.
pub(crate) struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<Queue>>,
}

pub(crate) struct WorkerCtx {
    pub index: u16,
    pub queue: Queue,
    pub handler: Box<dyn QueueHandler>,
    pub kick: Arc<dyn Doorbell>,
    pub memory: GuestMemoryAtomic<DeviceMemory>,
    pub interrupt: Arc<dyn Interrupt>,
    pub needs_reset: Arc<AtomicBool>,
    pub stats: Arc<QueueStats>,
    /// How long to keep polling the avail ring after a batch before sleeping.
    pub poll: std::time::Duration,
}

fn poll2(a: RawFd, b: RawFd) -> std::io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfds for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let ready = |p: &libc::pollfd| p.revents != 0;
        return Ok((ready(&fds[0]), ready(&fds[1])));
    }
}

impl Worker {
    pub(crate) fn spawn(mut ctx: WorkerCtx) -> std::io::Result<Worker> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_fd = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(format!("vq{}", ctx.index))
            .spawn(move || {
                ctx.run(&stop_fd);
                ctx.queue
            })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the worker and returns its queue.
    pub(crate) fn stop(mut self) -> Option<Queue> {
        let _ = self.stop.write(1);
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = self.stop.write(1);
            let _ = t.join();
        }
    }
}

impl WorkerCtx {
    fn run(&mut self, stop: &EventFd) {
        let Some(kick_fd) = self.kick.pollable_fd() else {
            tracing::error!(queue = self.index, "doorbell without a pollable fd");
            return;
        };
        // Buffers may already be waiting (the driver kicked before DRIVER_OK completed).
        let mut pending = true;
        loop {
            if !pending {
                match poll2(kick_fd, stop.as_raw_fd()) {
                    Ok((_, true)) => return,
                    Ok((true, _)) => {}
                    Ok((false, false)) => continue,
                    Err(e) => {
                        tracing::error!(queue = self.index, error = %e, "poll failed");
                        return;
                    }
                }
            }
            let _ = self.kick.try_clear();
            let mem = self.memory.memory();
            match process_queue(&mut self.queue, &mem, self.handler.as_mut(), &self.stats) {
                Ok(done) => {
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
                    tracing::warn!(queue = self.index, error = %e, "queue broken by the driver: device needs reset");
                    self.needs_reset.store(true, Ordering::SeqCst);
                    let _ = self.interrupt.trigger(InterruptKind::Config);
                    // Stay parked until reset: the queue is not touched again.
                    let _ = poll2(stop.as_raw_fd(), stop.as_raw_fd());
                    return;
                }
            }
            // Like QEMU's adaptive polling: a new request usually follows soon,
            // and catching it here saves a sleep and a wakeup on both sides.
            pending = self.poll_for_work(&mem);
        }
    }

    fn poll_for_work(&self, mem: &DeviceMemory) -> bool {
        if self.poll.is_zero() {
            return false;
        }
        let deadline = std::time::Instant::now() + self.poll;
        loop {
            match self.queue.avail_idx(mem, Ordering::Acquire) {
                Ok(idx) if idx.0 != self.queue.next_avail() => return true,
                Ok(_) => {}
                Err(_) => return true, // let process_queue report it
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }
}
