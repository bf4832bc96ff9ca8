//! virtio-rng (virtio 1.2 §5.4): entropy from `getrandom(2)` with an
//! optional rate limit.
//!
//! One queue (requestq), no feature bits, no config space. Each chain must
//! consist of device-writable buffers only, all inside shared memory; the
//! device fills them in order with up to [`REQUEST_CAP`] random bytes and
//! answers with the number of bytes written as the used length.
//!
//! There is no status byte, so a chain with a device-readable descriptor or
//! a buffer outside shared memory is answered with used length 0 (nothing
//! written) and counted in [`RngStats::malformed`]; only a chain that cannot
//! be walked at all (a loop, a bad `next`, too long) breaks the queue.
//!
//! With a [`RateLimiter`] (a token bucket, burst of one second's worth) the
//! handler is not [`ready`](ringfence_device::QueueHandler::ready) while the
//! budget is short; its [`wake_fd`](ringfence_device::QueueHandler::wake_fd)
//! is a timerfd armed for when enough budget returns. A request gets what the
//! budget allows (a partial fill is fine for virtio-rng), never zero bytes
//! once the handler said it was ready. Share one `Arc<RateLimiter>` between
//! device instances to bound them together.

mod limiter;
mod queue;

use std::io;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ringfence_device::{read_config_bytes, DeviceError, QueueHandler, VirtioDevice};

pub use limiter::{RateLimiter, WAKE_GRANT};
pub use queue::RngQueue;

/// virtio device id of an entropy device.
pub const DEVICE_ID_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

/// Most bytes written for one request, whatever the buffers' size.
pub const REQUEST_CAP: u64 = 64 * 1024;

/// Options of an entropy device.
#[derive(Debug, Clone)]
pub struct RngOptions {
    /// Entropy budget; `None` is unlimited. Share the `Arc` between
    /// instances so that several frontends draw from one budget.
    pub rate_limit: Option<Arc<RateLimiter>>,
    /// Queue size offered (a power of two).
    pub queue_size: u16,
}

impl Default for RngOptions {
    fn default() -> Self {
        Self {
            rate_limit: None,
            queue_size: 256,
        }
    }
}

/// Errors building an entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// An option is out of range.
    #[error("invalid option: {reason}")]
    Option {
        /// What is wrong.
        reason: String,
    },
}

/// Counters of an entropy device.
#[derive(Debug, Default)]
pub struct RngStats {
    /// Requests answered (including those that got fewer bytes than asked).
    pub requests: AtomicU64,
    /// Random bytes written to the driver.
    pub bytes: AtomicU64,
    /// Times the driver's buffers had to wait because the budget was short.
    pub throttled: AtomicU64,
    /// Chains answered with used length 0: a device-readable descriptor or
    /// a buffer outside shared memory.
    pub malformed: AtomicU64,
    /// Chains that could not be walked (each one broke its queue).
    pub broken: AtomicU64,
    /// getrandom failures (the request got the bytes written before it).
    pub entropy_errors: AtomicU64,
}

/// A virtio-rng device.
#[derive(Debug)]
pub struct Rng {
    opts: RngOptions,
    stats: Arc<RngStats>,
}

impl Rng {
    /// A new entropy device.
    pub fn new(opts: RngOptions) -> Result<Self, RngError> {
        if !opts.queue_size.is_power_of_two() {
            return Err(RngError::Option {
                reason: format!("queue_size {} not a power of two", opts.queue_size),
            });
        }
        Ok(Self {
            opts,
            stats: Arc::new(RngStats::default()),
        })
    }

    /// Another device instance with the same options (and the same rate
    /// limiter, so the budget stays shared) and fresh counters.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            opts: self.opts.clone(),
            stats: Arc::new(RngStats::default()),
        })
    }

    /// Counters of this instance.
    pub fn stats(&self) -> &RngStats {
        &self.stats
    }

    /// The rate limiter, if any.
    pub fn rate_limiter(&self) -> Option<&Arc<RateLimiter>> {
        self.opts.rate_limit.as_ref()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        DEVICE_ID_RNG
    }

    fn device_features(&self) -> u64 {
        0
    }

    fn num_queues(&self) -> u16 {
        1
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn config_size(&self) -> usize {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        read_config_bytes(&[], offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        Err(DeviceError::ConfigOutOfRange {
            offset,
            len: data.len(),
            size: 0,
        })
    }

    fn activate(&mut self, acked_features: u64) -> Result<Vec<Box<dyn QueueHandler>>, DeviceError> {
        let q = RngQueue::new(
            self.stats.clone(),
            self.opts.rate_limit.clone(),
            self.opts.queue_size,
        )
        .map_err(|e| DeviceError::Activate {
            reason: format!("cannot create the rate-limit timer: {e}"),
        })?;
        tracing::info!(
            rate_limit = self.opts.rate_limit.as_ref().map(|l| l.bytes_per_sec()),
            features = format_args!("{acked_features:#x}"),
            "virtio-rng activated"
        );
        Ok(vec![Box::new(q)])
    }

    fn reset(&mut self) {}
}
