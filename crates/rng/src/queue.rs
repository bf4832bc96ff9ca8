//! The requestq handler: fills device-writable buffers with getrandom bytes.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ringfence_device::{
    process_queue, walk_chain, Chain, ChainError, DeviceMemory, Processed, QueueFailure,
    QueueHandler, QueueStats, Segment,
};
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestMemoryBackend};

use crate::{RateLimiter, RngStats, REQUEST_CAP};

/// getrandom is called for at most this many bytes at a time (the kernel
/// returns at most 32 MiB per call anyway; this keeps the buffer on the stack).
const CHUNK: usize = 4096;

/// A non-blocking one-shot CLOCK_MONOTONIC timerfd.
#[derive(Debug)]
struct Timer {
    fd: OwnedFd,
    armed: bool,
}

impl Timer {
    fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked before use.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            armed: false,
        })
    }

    /// Fires once after `after` (at least 1 ns: a zero value would disarm).
    fn arm(&mut self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: libc::time_t::try_from(after.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_nsec: libc::c_long::from(after.subsec_nanos() as i32),
            },
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed = true;
        Ok(())
    }

    /// Consumes a pending expiration so the descriptor is no longer readable.
    fn clear(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        let mut ticks = 0u64;
        // SAFETY: reads at most 8 bytes into `ticks`; the descriptor is
        // non-blocking, so EAGAIN (not yet expired) returns at once.
        let _ = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut ticks as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
    }
}

/// Fills `buf` entirely from getrandom(2), retrying on EINTR and partial reads.
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0usize;
    // Bounded: every successful iteration makes progress; EINTR retries are
    // bounded by signal delivery, which is not under the guest's control.
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`,
        // which is a live, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "getrandom returned 0 bytes",
            ));
        }
        done = done.saturating_add(n as usize);
    }
    Ok(())
}

/// The handler of the requestq.
#[derive(Debug)]
pub struct RngQueue {
    stats: Arc<RngStats>,
    limiter: Option<Arc<RateLimiter>>,
    /// Present with a limiter: the wake-up when the budget returns.
    timer: Option<Timer>,
    /// Budget taken from the limiter by `ready()` for the next chain.
    reserved: u64,
    descriptors: Vec<Segment>,
    max_descriptors: usize,
}

impl RngQueue {
    pub(crate) fn new(
        stats: Arc<RngStats>,
        limiter: Option<Arc<RateLimiter>>,
        queue_size: u16,
    ) -> io::Result<Self> {
        let timer = match limiter {
            Some(_) => Some(Timer::new()?),
            None => None,
        };
        Ok(Self {
            stats,
            limiter,
            timer,
            reserved: 0,
            descriptors: Vec::with_capacity(usize::from(queue_size)),
            max_descriptors: usize::from(queue_size),
        })
    }

    /// Hands an unused reservation back to the (possibly shared) limiter.
    fn release(&mut self) {
        if let Some(l) = &self.limiter {
            l.give_back(std::mem::take(&mut self.reserved));
        }
    }

    /// Checks the chain: every descriptor device-writable and inside shared
    /// memory. Returns the total writable length, or why it is malformed.
    fn validate(&self, mem: &DeviceMemory) -> Result<u64, &'static str> {
        let mut total = 0u64;
        for d in &self.descriptors {
            if !d.writable {
                return Err("device-readable descriptor in a requestq chain");
            }
            if !mem.check_range(d.addr, d.len as usize) {
                return Err("buffer outside shared memory");
            }
            total = total.saturating_add(u64::from(d.len));
        }
        Ok(total)
    }

    /// Writes `grant` random bytes into the chain's buffers, in order.
    /// Returns the bytes written (fewer only if getrandom fails).
    fn fill(&self, mem: &DeviceMemory, grant: u64) -> u64 {
        let mut chunk = [0u8; CHUNK];
        let mut written = 0u64;
        for d in &self.descriptors {
            let mut off = 0u64;
            while written < grant && off < u64::from(d.len) {
                let n = (grant - written)
                    .min(u64::from(d.len) - off)
                    .min(CHUNK as u64) as usize;
                let Some(buf) = chunk.get_mut(..n) else {
                    return written;
                };
                if let Err(e) = fill_random(buf) {
                    tracing::warn!(error = %e, "getrandom failed");
                    self.stats.entropy_errors.fetch_add(1, Ordering::Relaxed);
                    return written;
                }
                // Validated by `validate`: the whole descriptor translates.
                let Some(addr) = d.addr.checked_add(off) else {
                    return written;
                };
                if mem.write_slice(buf, addr).is_err() {
                    return written;
                }
                written += n as u64;
                off += n as u64;
            }
            if written >= grant {
                break;
            }
        }
        written
    }
}

impl QueueHandler for RngQueue {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        let head = chain.head_index();
        if let Err(e) = walk_chain(chain, self.max_descriptors, &mut self.descriptors) {
            self.stats.broken.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        let total = match self.validate(mem) {
            Ok(t) => t,
            Err(reason) => {
                // No status byte exists: the answer is "no entropy" (used 0).
                tracing::debug!(head, reason, "malformed virtio-rng request");
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                self.release();
                return Ok(0);
            }
        };
        let want = total.min(REQUEST_CAP);
        let grant = match &self.limiter {
            None => want,
            Some(l) => {
                // Normally `ready()` reserved the budget; a caller that skips
                // it gets whatever is there now.
                if self.reserved == 0 {
                    self.reserved = l.take(want);
                }
                want.min(self.reserved)
            }
        };
        let written = self.fill(mem, grant);
        self.reserved = self.reserved.saturating_sub(written);
        self.release();
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(written, Ordering::Relaxed);
        // `written` <= REQUEST_CAP, which fits in u32.
        Ok(u32::try_from(written).unwrap_or(u32::MAX))
    }

    fn ready(&mut self) -> bool {
        let (Some(limiter), Some(timer)) = (&self.limiter, &mut self.timer) else {
            return true;
        };
        timer.clear();
        if self.reserved > 0 {
            return true;
        }
        match limiter.reserve(REQUEST_CAP) {
            Ok(n) => {
                self.reserved = n;
                true
            }
            Err(wait) => {
                if let Err(e) = timer.arm(wait) {
                    // Without the timer the queue resumes on the next kick only.
                    tracing::warn!(error = %e, "cannot arm the rate-limit timer");
                }
                false
            }
        }
    }

    fn wake_fd(&self) -> Option<RawFd> {
        self.timer.as_ref().map(|t| t.fd.as_raw_fd())
    }

    fn serves_chain_by_chain(&self) -> bool {
        false
    }

    fn process(
        &mut self,
        queue: &mut Queue,
        mem: &DeviceMemory,
        stats: &QueueStats,
    ) -> Result<Processed, QueueFailure> {
        let r = process_queue(queue, mem, self, stats);
        // The last `ready()` may have reserved budget for a chain that never
        // came: give it back so instances sharing the limiter can use it.
        self.release();
        if matches!(&r, Ok(p) if p.starved) {
            // Counted here rather than in `ready()`, which is also asked
            // when the driver has no buffer waiting.
            self.stats.throttled.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl Drop for RngQueue {
    fn drop(&mut self) {
        self.release();
    }
}
