//! Runs a device's [`ConfigWatch`] while it is live and raises a config
//! interrupt (EVENT_CONFIG, with a new generation) on each change it finds.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ringfence_device::{ConfigWatch, Interrupt, InterruptKind};

/// A running watch; stopped (and joined) on drop.
pub(crate) struct ConfigWatcher {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl ConfigWatcher {
    /// Starts `watch` on its own thread, signalling through `interrupt`.
    pub(crate) fn spawn(
        mut watch: Box<dyn ConfigWatch>,
        interrupt: Arc<dyn Interrupt>,
        dev_num: u16,
    ) -> std::io::Result<Self> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stopped = stop.clone();
        // Never faster than 10 ms, whatever the model asks.
        let interval = watch.interval().max(Duration::from_millis(10));
        let thread = std::thread::Builder::new()
            .name(format!("config-watch-{dev_num}"))
            .spawn(move || {
                let (lock, cv) = &*stopped;
                let mut done = lock.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    done = cv
                        .wait_timeout(done, interval)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                    if *done {
                        return;
                    }
                    if watch.poll() {
                        tracing::debug!(dev = dev_num, "config changed");
                        if let Err(e) = interrupt.trigger(InterruptKind::Config) {
                            tracing::warn!(error = %e, "config interrupt lost");
                        }
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
