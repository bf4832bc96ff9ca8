//! A token bucket shared by every queue (and, if the caller wishes, every
//! device instance) that draws from it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::RngError;

/// Tokens are kept in nano-bytes (bytes × 10⁹) so that refilling at
/// `bytes_per_sec` for `n` nanoseconds adds exactly `n × bytes_per_sec`:
/// no rounding drift, whatever the call frequency.
const NANOS: u128 = 1_000_000_000;

/// Largest grant that makes a throttled queue ready again. Waking for every
/// single byte would cost the driver a buffer (and both sides a round trip)
/// per byte; 64 bytes is what a Linux guest asks for at a time. A limit
/// below 64 B/s wakes for its whole (smaller) burst instead.
pub const WAKE_GRANT: u64 = 64;

/// A token bucket limiting entropy to `bytes_per_sec`, with a burst of one
/// second's worth. Share one `Arc<RateLimiter>` between device instances so
/// that several frontends cannot multiply the budget.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: u64,
    burst: u64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Available budget in nano-bytes, at most `burst × NANOS`.
    nanobytes: u128,
    /// When `nanobytes` was last brought up to date.
    last: Instant,
}

impl RateLimiter {
    /// A limiter granting `bytes_per_sec` bytes per second on average,
    /// starting full (one second's worth may be taken at once).
    pub fn new(bytes_per_sec: u64) -> Result<Self, RngError> {
        if bytes_per_sec == 0 {
            return Err(RngError::Option {
                reason: "rate limit of 0 bytes per second would never give entropy".into(),
            });
        }
        let burst = bytes_per_sec;
        Ok(Self {
            bytes_per_sec,
            burst,
            bucket: Mutex::new(Bucket {
                nanobytes: u128::from(burst).saturating_mul(NANOS),
                last: Instant::now(),
            }),
        })
    }

    /// The average rate in bytes per second.
    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// The most that can be taken at once (one second's worth).
    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// The budget a throttled queue waits for before it is ready again.
    pub fn wake_grant(&self) -> u64 {
        WAKE_GRANT.min(self.burst)
    }

    fn capacity(&self) -> u128 {
        u128::from(self.burst).saturating_mul(NANOS)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Bucket> {
        // A panic while holding the lock cannot leave the bucket
        // inconsistent (every update is a single assignment).
        self.bucket.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refill(&self, b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.last).as_nanos();
        let added = elapsed.saturating_mul(u128::from(self.bytes_per_sec));
        b.nanobytes = b.nanobytes.saturating_add(added).min(self.capacity());
        b.last = now;
    }

    /// Whole bytes available right now.
    pub fn available(&self) -> u64 {
        let mut b = self.lock();
        self.refill(&mut b, Instant::now());
        u64::try_from(b.nanobytes / NANOS).unwrap_or(u64::MAX)
    }

    /// Takes up to `max` bytes if at least [`wake_grant`](Self::wake_grant)
    /// bytes (or `max`, if smaller and non-zero) are available; otherwise
    /// takes nothing and says how long until they are.
    pub fn reserve(&self, max: u64) -> Result<u64, Duration> {
        let need = self.wake_grant().min(max.max(1));
        let mut b = self.lock();
        self.refill(&mut b, Instant::now());
        let have = u64::try_from(b.nanobytes / NANOS).unwrap_or(u64::MAX);
        if have >= need {
            let take = have.min(max);
            b.nanobytes = b
                .nanobytes
                .saturating_sub(u128::from(take).saturating_mul(NANOS));
            return Ok(take);
        }
        let missing = u128::from(need)
            .saturating_mul(NANOS)
            .saturating_sub(b.nanobytes);
        // Round up: waking a nanosecond early would find the budget short.
        let nanos = missing.div_ceil(u128::from(self.bytes_per_sec));
        Err(Duration::from_nanos(
            u64::try_from(nanos).unwrap_or(u64::MAX).max(1),
        ))
    }

    /// Takes up to `max` bytes, whatever is available (possibly 0).
    pub fn take(&self, max: u64) -> u64 {
        let mut b = self.lock();
        self.refill(&mut b, Instant::now());
        let have = u64::try_from(b.nanobytes / NANOS).unwrap_or(u64::MAX);
        let take = have.min(max);
        b.nanobytes = b
            .nanobytes
            .saturating_sub(u128::from(take).saturating_mul(NANOS));
        take
    }

    /// Returns bytes taken but not used (capped at the burst).
    pub fn give_back(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let mut b = self.lock();
        b.nanobytes = b
            .nanobytes
            .saturating_add(u128::from(bytes).saturating_mul(NANOS))
            .min(self.capacity());
    }
}
