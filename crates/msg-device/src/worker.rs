//! One thread per active queue: wait for a kick, process, notify.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use ringfence_bus::Doorbell;
use ringfence_device::{
    process_queue, DeviceMemory, Interrupt, InterruptKind, QueueHandler, QueueStats,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};

/// A running queue worker.
pub(crate) struct Worker {
    stop: Arc<AtomicBool>,
    kick: Arc<dyn Doorbell>,
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

impl Worker {
    pub(crate) fn spawn(mut ctx: WorkerCtx) -> std::io::Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let kick = ctx.kick.clone();
        let stop_flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vq{}", ctx.index))
            .spawn(move || {
                ctx.run(&stop_flag);
                ctx.queue
            })?;
        Ok(Worker {
            stop,
            kick,
            thread: Some(thread),
        })
    }

    fn signal_stop(&self) {
        // The worker sleeps on its kick doorbell: ring it to wake it up.
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.kick.ring();
    }

    /// Stops the worker and returns its queue.
    pub(crate) fn stop(mut self) -> Option<Queue> {
        self.signal_stop();
        self.thread.take().and_then(|t| t.join().ok())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.signal_stop();
            let _ = t.join();
        }
    }
}

impl WorkerCtx {
    fn run(&mut self, stop: &AtomicBool) {
        // Buffers may already be waiting (the driver kicked before DRIVER_OK completed).
        let mut pending = true;
        loop {
            if !pending {
                if let Err(e) = self.kick.wait(None) {
                    tracing::error!(queue = self.index, error = %e, "waiting for a kick failed");
                    return;
                }
            }
            if stop.load(Ordering::SeqCst) {
                return;
            }
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
                    while !stop.load(Ordering::SeqCst) {
                        let _ = self.kick.wait(Some(std::time::Duration::from_millis(100)));
                    }
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
