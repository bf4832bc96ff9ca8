//! The virtio-blk path of `ringfence bench`, as the frontend VM drives it: one
//! bus connection per wake-up mode, our own split-virtqueue driver, and every
//! memory model over the same connection, so that models differ only in where
//! the I/O buffers live and how the device reaches them.

use std::fmt;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence_bus::DriverBus;
use ringfence_bus_local::{LocalBusConfig, LocalDriverBus};
use ringfence_msg_driver::{
    discover, Adaptive, Bounce, BouncePool, CompletionWaiter, Grant, InShared, IoBuf, Mapped,
    MemoryModel, MsgTransport,
};
use ringfence_virtqueue::{BlkDriver, BlkRequest, DmaRegion};
use virtio_drivers::transport::Transport;

use crate::frontend::fill_pattern;

/// Every byte of the benchmark image (the floor's writes put it back).
pub const IMAGE_BYTE: u8 = 0xA5;
/// Sector size of virtio-blk.
pub const SECTOR: u64 = 512;
/// Deepest queue the suite drives.
pub const MAX_QD: usize = 16;
/// Most requests one cell can keep in flight (the vhost-user peer bench goes to 32).
pub const MAX_SLOTS: usize = 32;
/// Largest request of the suite.
pub const MAX_REQUEST: usize = 1 << 20;
/// Queue size of the driver (room for MAX_QD chains of 3 and more).
const QUEUE_SIZE: u16 = 128;

/// The memory models of the suite, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum ModelKind {
    /// No isolation: the backend reaches all of the frontend's I/O memory.
    FullShare,
    /// Buffers allocated in the shared window from the start.
    InWindow,
    /// Private buffers copied through window slots (the talk's model).
    Bounce,
    /// Private buffers whose pages are granted per request and revoked.
    Grant,
    /// Private buffers granted per request to a broker that copies them to
    /// and from the backend's own memory (the backend never maps them).
    HvCopy,
    /// Per request, bounce or grant by size, from a crossover calibrated at start-up.
    Adaptive,
}

impl ModelKind {
    /// All of them.
    pub const ALL: [ModelKind; 6] = [
        ModelKind::FullShare,
        ModelKind::InWindow,
        ModelKind::Bounce,
        ModelKind::Grant,
        ModelKind::HvCopy,
        ModelKind::Adaptive,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::FullShare => "full-share",
            ModelKind::InWindow => "in-window",
            ModelKind::Bounce => "bounce",
            ModelKind::Grant => "grant",
            ModelKind::HvCopy => "hv-copy",
            ModelKind::Adaptive => "adaptive",
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How the two sides wait for each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Both sides sleep on doorbells.
    Notify,
    /// Both sides spin a bounded time before sleeping.
    Poll,
}

impl Mode {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Notify => "notify",
            Mode::Poll => "poll",
        }
    }
}

/// One measured cell of one round.
#[derive(Debug, Clone, Default)]
pub struct CellResult {
    /// Requests completed.
    pub requests: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// Per-request latency.
    pub latencies_ns: Vec<u64>,
    /// CPU time of the frontend's driving thread.
    pub frontend_cpu_ns: u64,
    /// CPU time of the whole backend process.
    pub backend_cpu_ns: u64,
    /// Requests that failed (status, mapping, submission).
    pub errors: u64,
    /// Reads whose bytes differ from what was written.
    pub mismatches: u64,
    /// Waits of a second with requests in flight and no completion.
    pub stalls: u64,
}

impl CellResult {
    /// Latency percentile `p` (0..=1) in microseconds.
    pub fn percentile_us(&self, p: f64) -> f64 {
        percentile_us(&self.latencies_ns, p)
    }
    /// Requests per second.
    pub fn iops(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// MiB per second.
    pub fn mib_s(&self) -> f64 {
        self.bytes as f64 / f64::from(1 << 20) / self.elapsed.as_secs_f64().max(1e-9)
    }
    /// CPU microseconds per request, (frontend, backend).
    pub fn cpu_us_per_request(&self) -> (f64, f64) {
        let n = self.requests.max(1) as f64;
        (
            self.frontend_cpu_ns as f64 / 1e3 / n,
            self.backend_cpu_ns as f64 / 1e3 / n,
        )
    }
}

/// Percentile `p` of nanosecond samples, in microseconds (sorts a copy).
pub fn percentile_us(samples: &[u64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut v = samples.to_vec();
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v.get(i).copied().unwrap_or(0) as f64 / 1e3
}

/// CPU time of the calling thread.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// CPU time of every thread of process `pid`, in nanoseconds, from the
/// scheduler's own accounting (`/proc/PID/task/*/schedstat`, first field).
/// Threads that ended are not counted; the backend's threads live as long as
/// its connection.
pub fn processes_cpu_ns(pids: &[u32]) -> u64 {
    pids.iter().map(|&p| process_cpu_ns(p)).sum()
}

/// CPU time of process `pid` (see [`processes_cpu_ns`]).
pub fn process_cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// A small xorshift generator: request offsets, same sequence every run.
pub struct Rng(u64);

impl Rng {
    /// Seeded (a zero seed is replaced).
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    /// Next value.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

struct ModelSlot {
    kind: ModelKind,
    model: Box<dyn MemoryModel>,
    bufs: Vec<IoBuf>,
}

/// One bus connection to one backend process, with every model set up.
pub struct Link {
    /// Its wake-up mode.
    pub mode: Mode,
    /// Frontend spin budget before sleeping.
    spin: Duration,
    driver: BlkDriver<MsgTransport>,
    waiter: CompletionWaiter,
    /// The backend's process, and the broker's when there is one: the
    /// service side's CPU time is theirs together.
    service_pids: Vec<u32>,
    /// The window; it also keeps the driver's rings mapped for as long as
    /// the driver lives, whichever models use it.
    window: Arc<BouncePool>,
    models: Vec<ModelSlot>,
    /// Device address of a 20-byte buffer in the window for GET_ID (the
    /// round-trip floor).
    id_buf: u64,
    /// Device capacity in sectors.
    pub capacity: u64,
    /// The adaptive model's crossover, in bytes.
    crossover: Arc<AtomicUsize>,
}

/// Errors of setting a link up.
pub type SetupError = Box<dyn std::error::Error>;

/// Our virtio-blk driver on `transport`, its rings allocated (for good) in
/// `window`.
///
/// # Safety
/// `window`'s mapping must outlive the returned driver (keep the Arc next
/// to it).
pub unsafe fn driver_in_window(
    transport: MsgTransport,
    window: &Arc<BouncePool>,
    queue_size: u16,
) -> Result<BlkDriver<MsgTransport>, SetupError> {
    let waiter = transport.waiter();
    let region_len = BlkDriver::<MsgTransport>::region_size(queue_size);
    let (paddr, vaddr) = window.alloc(region_len, 4096)?;
    let region = DmaRegion {
        vaddr: std::ptr::NonNull::new(vaddr).ok_or("null window")?,
        paddr,
        len: region_len,
    };
    // SAFETY: the region was just allocated, zeroed, in the window that the
    // device reaches at `paddr`; the pool never frees it, and the caller
    // keeps the mapping for as long as the driver lives.
    let driver = unsafe { BlkDriver::new(transport, region, queue_size, true) }?;
    if let Some(f) = waiter.failure() {
        return Err(format!("device set-up failed: {f}").into());
    }
    Ok(driver)
}

impl Link {
    /// Connects to the backend at `socket` (process `backend_pid`), with
    /// grants for copy through the broker at `broker` (socket, process).
    pub fn connect(
        socket: &Path,
        backend_pid: u32,
        broker: Option<(&Path, u32)>,
        mode: Mode,
        spin: Duration,
        models: &[ModelKind],
    ) -> Result<Self, SetupError> {
        let mut local = LocalDriverBus::connect(socket, LocalBusConfig::default())?;
        if let Some((path, _)) = broker {
            local = local.with_broker(path)?;
        }
        if models.contains(&ModelKind::HvCopy) && !local.limits().can_copy {
            return Err("hv-copy needs a broker that both sides use".into());
        }
        let bus: Arc<dyn DriverBus> = Arc::new(local);
        let service_pids = std::iter::once(backend_pid)
            .chain(broker.map(|(_, pid)| pid))
            .collect();
        Self::over(bus, service_pids, mode, spin, models)
    }

    /// Sets a link up over `bus`, any bus (the backend's processes are
    /// `service_pids`, for CPU accounting).
    pub fn over(
        bus: Arc<dyn DriverBus>,
        service_pids: Vec<u32>,
        mode: Mode,
        spin: Duration,
        models: &[ModelKind],
    ) -> Result<Self, SetupError> {
        let dev = *discover(bus.as_ref())?
            .first()
            .ok_or("no device on the bus")?;
        let transport = MsgTransport::new(bus.clone(), dev)?;
        let waiter = transport.waiter();
        // The window: rings, bounce slots for MAX_QD of the largest
        // requests, and the in-window model's buffers.
        let window = Arc::new(BouncePool::new(
            bus.share_area(2 * MAX_QD * MAX_REQUEST + (4 << 20))?,
        ));
        // SAFETY: `window` is kept in the link, next to the driver.
        let driver = unsafe { driver_in_window(transport, &window, QUEUE_SIZE) }?;
        let capacity = driver.capacity_sectors();
        let (id_buf, _) = window.alloc(512, 512)?;
        let mut link = Self {
            mode,
            spin,
            driver,
            waiter,
            service_pids,
            window: window.clone(),
            models: Vec::new(),
            id_buf,
            capacity,
            crossover: Arc::new(AtomicUsize::new(usize::MAX)),
        };
        // "All of the frontend's memory": one large area shared whole.
        let ram = models
            .contains(&ModelKind::FullShare)
            .then(|| bus.share_area(MAX_QD * MAX_REQUEST + (16 << 20)))
            .transpose()?
            .map(|a| Arc::new(BouncePool::new(a)));
        for &kind in models {
            let model: Box<dyn MemoryModel> = match kind {
                ModelKind::FullShare => {
                    Box::new(InShared::full_share(ram.clone().ok_or("no RAM area")?))
                }
                ModelKind::InWindow => Box::new(InShared::born_in_window(window.clone())),
                ModelKind::Bounce => Box::new(Bounce::new(window.clone())),
                ModelKind::Grant => Box::new(Grant::new(bus.clone())),
                ModelKind::HvCopy => Box::new(Grant::for_copy(bus.clone())),
                ModelKind::Adaptive => {
                    let adaptive = Adaptive::new(window.clone(), bus.clone());
                    link.crossover = adaptive.crossover();
                    Box::new(adaptive)
                }
            };
            link.add_model(kind, model)?;
        }
        Ok(link)
    }

    fn add_model(
        &mut self,
        kind: ModelKind,
        mut model: Box<dyn MemoryModel>,
    ) -> Result<(), SetupError> {
        let bufs = (0..MAX_QD)
            .map(|_| model.alloc(MAX_REQUEST))
            .collect::<Result<Vec<_>, _>>()?;
        self.models.push(ModelSlot { kind, model, bufs });
        Ok(())
    }

    /// Sets the adaptive model's crossover: requests of at least `bytes` are granted.
    pub fn set_crossover(&mut self, bytes: usize) {
        self.crossover.store(bytes, Ordering::Relaxed);
    }

    /// Median time of the bounce model's own copies for one `len`-byte
    /// request (zeroing and copy-out for a read, copy-in for a write), on
    /// the buffer and window slots the path uses, so as warm as it has them.
    pub fn copy_us(&mut self, len: usize, write: bool, n: usize) -> f64 {
        let Some(slot) = self.models.iter_mut().find(|s| s.kind == ModelKind::Bounce) else {
            return f64::NAN;
        };
        let Some(buf) = slot.bufs.first() else {
            return f64::NAN;
        };
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let Ok(mapped) = slot.model.map(buf, len, write) else {
                return f64::NAN;
            };
            let _ = slot.model.unmap(buf, len, mapped, !write);
            samples.push(t.elapsed().as_nanos() as u64);
        }
        percentile_us(&samples, 0.5)
    }

    /// Median pread (or pwrite) of `len` bytes at random aligned offsets of
    /// the image `file`, into (or from) a buffer in this link's window: the
    /// same page-cache pages, the same kind of destination memory and the
    /// same dirtiness as the path's (writes put back the image's own bytes).
    pub fn file_io_us(
        &self,
        file: &std::fs::File,
        span: u64,
        len: usize,
        write: bool,
        n: usize,
    ) -> f64 {
        let Ok((addr, ptr)) = self.window.alloc(len, 4096) else {
            return f64::NAN;
        };
        // SAFETY: `len` bytes just allocated (and zeroed, so faulted in) in
        // the window, which this link keeps mapped; only this function uses
        // them until it frees them below.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        buf.fill(IMAGE_BYTE);
        let slots = (span / len as u64).max(1);
        let mut rng = Rng::new(7);
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let off = (rng.next() % slots) * len as u64;
            let t = Instant::now();
            let _ = if write {
                file.write_at(buf, off)
            } else {
                file.read_at(buf, off)
            };
            samples.push(t.elapsed().as_nanos() as u64);
        }
        let _ = self.window.free(addr);
        percentile_us(&samples, 0.5)
    }

    /// Bytes the models copied so far.
    pub fn bytes_copied(&self, kind: ModelKind) -> u64 {
        self.models
            .iter()
            .find(|s| s.kind == kind)
            .map_or(0, |s| s.model.bytes_copied())
    }

    fn wait(&mut self) -> bool {
        let waiter = &self.waiter;
        wait_used(
            &mut self.driver,
            self.spin,
            self.mode == Mode::Poll,
            |_, t| matches!(waiter.wait(0, t), Ok(true)),
        )
    }

    /// GET_ID round trips at QD 1: the notification round trip through the
    /// same two processes, the same queue and the same wake-up method, with
    /// no data to read or copy.
    pub fn round_trips(&mut self, duration: Duration) -> CellResult {
        let mut r = CellResult::default();
        let (fe0, be0) = (thread_cpu_ns(), processes_cpu_ns(&self.service_pids));
        let start = Instant::now();
        while start.elapsed() < duration {
            let t = Instant::now();
            let ok = self
                .driver
                .submit(BlkRequest::GetId { data: self.id_buf })
                .is_ok();
            self.driver.kick();
            let mut done = !ok;
            while !done {
                match self.driver.pop() {
                    Ok(Some(c)) => {
                        done = true;
                        if c.status != 0 {
                            r.errors += 1;
                        }
                    }
                    Ok(None) => {
                        if !self.wait() {
                            r.stalls += 1;
                            r.elapsed = start.elapsed();
                            return r;
                        }
                    }
                    Err(_) => {
                        r.errors += 1;
                        r.elapsed = start.elapsed();
                        return r;
                    }
                }
            }
            r.latencies_ns.push(t.elapsed().as_nanos() as u64);
            r.requests += 1;
        }
        r.elapsed = start.elapsed();
        r.frontend_cpu_ns = thread_cpu_ns().saturating_sub(fe0);
        r.backend_cpu_ns = processes_cpu_ns(&self.service_pids).saturating_sub(be0);
        r
    }

    /// Runs one cell: `len`-byte requests at depth `qd` for `duration` (or
    /// `count` requests when given), each buffer lent by `model`; with
    /// `verify_seed`, writes carry a pattern and reads are checked against it.
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &mut self,
        model: ModelKind,
        len: usize,
        qd: usize,
        write: bool,
        duration: Duration,
        count: Option<u64>,
        verify_seed: Option<u64>,
        sector_of: &mut dyn FnMut(u64) -> u64,
    ) -> CellResult {
        let Some(slot) = self.models.iter_mut().find(|s| s.kind == model) else {
            return CellResult {
                errors: 1,
                ..Default::default()
            };
        };
        let mut lender = ModelLender {
            slot,
            mapped: vec![None; MAX_QD],
            verify_seed,
            scratch: Vec::new(),
            mismatches: 0,
        };
        let spec = CellSpec {
            len,
            // One buffer per request in flight.
            qd: qd.min(lender.slot.bufs.len()),
            write,
            duration,
            count,
        };
        let (spin, mode) = (self.spin, self.mode);
        let waiter = &self.waiter;
        let mut wait = |d: &mut BlkDriver<MsgTransport>| {
            wait_used(d, spin, mode == Mode::Poll, |_, t| {
                matches!(waiter.wait(0, t), Ok(true))
            })
        };
        let mut r = drive(
            &mut self.driver,
            &mut wait,
            &mut lender,
            &spec,
            sector_of,
            &self.service_pids,
        );
        r.mismatches += lender.mismatches;
        r
    }
}

/// What a cell asks for.
#[derive(Debug, Clone, Copy)]
pub struct CellSpec {
    /// Request size in bytes.
    pub len: usize,
    /// Requests in flight.
    pub qd: usize,
    /// Writes (else reads).
    pub write: bool,
    /// How long, unless `count` is given.
    pub duration: Duration,
    /// How many requests.
    pub count: Option<u64>,
}

/// Lends buffer slots to requests: where the data of request slot `i` is.
pub trait Lender {
    /// Device address of slot `i`'s buffer for a `len`-byte request at `sector`.
    fn lend(&mut self, i: usize, len: usize, write: bool, sector: u64) -> Option<u64>;
    /// The request in slot `i` completed (`ok`: with status OK); false if
    /// giving the buffer back failed.
    fn give_back(&mut self, i: usize, len: usize, write: bool, sector: u64, ok: bool) -> bool;
}

struct ModelLender<'a> {
    slot: &'a mut ModelSlot,
    mapped: Vec<Option<Mapped>>,
    verify_seed: Option<u64>,
    scratch: Vec<u8>,
    mismatches: u64,
}

impl Lender for ModelLender<'_> {
    fn lend(&mut self, i: usize, len: usize, write: bool, sector: u64) -> Option<u64> {
        let buf = self.slot.bufs.get(i)?;
        if let (Some(seed), true) = (self.verify_seed, write) {
            self.scratch.resize(len, 0);
            fill_pattern(seed, sector * SECTOR, &mut self.scratch);
            buf.slice().subslice(0, len).ok()?.copy_from(&self.scratch);
        }
        match self.slot.model.map(buf, len, write) {
            Ok(m) => {
                *self.mapped.get_mut(i)? = Some(m);
                Some(m.addr)
            }
            Err(e) => {
                tracing::warn!(error = %e, "mapping failed");
                None
            }
        }
    }

    fn give_back(&mut self, i: usize, len: usize, write: bool, sector: u64, ok: bool) -> bool {
        let (Some(buf), Some(Some(m))) = (
            self.slot.bufs.get(i),
            self.mapped.get_mut(i).map(Option::take),
        ) else {
            return false;
        };
        if self.slot.model.unmap(buf, len, m, !write && ok).is_err() {
            return false;
        }
        if let (Some(seed), false, true) = (self.verify_seed, write, ok) {
            self.scratch.resize(len, 0);
            fill_pattern(seed, sector * SECTOR, &mut self.scratch);
            let mut got = vec![0u8; len];
            if let Ok(view) = buf.slice().subslice(0, len) {
                view.copy_to(&mut got);
            }
            if got != self.scratch {
                self.mismatches += 1;
            }
        }
        true
    }
}

/// Waits for a used element: spins up to `spin`, then arms the used
/// notification and sleeps in `sleep` (one second at most). False on a stall.
pub fn wait_used<T: Transport>(
    driver: &mut BlkDriver<T>,
    spin: Duration,
    polling: bool,
    sleep: impl FnOnce(&BlkDriver<T>, Duration) -> bool,
) -> bool {
    if !spin.is_zero() {
        let until = Instant::now() + spin;
        while Instant::now() < until {
            if driver.has_used() {
                return true;
            }
            std::hint::spin_loop();
        }
    }
    if driver.arm() {
        if polling {
            driver.disarm();
        }
        return true;
    }
    let woken = sleep(driver, Duration::from_secs(1));
    if polling {
        driver.disarm();
    }
    woken || driver.has_used()
}

/// Drives one cell through `driver`: keeps `spec.qd` requests in flight,
/// measures each from lending its buffer to getting it back.
pub fn drive<T: Transport>(
    driver: &mut BlkDriver<T>,
    wait: &mut dyn FnMut(&mut BlkDriver<T>) -> bool,
    lender: &mut dyn Lender,
    spec: &CellSpec,
    sector_of: &mut dyn FnMut(u64) -> u64,
    backend_pids: &[u32],
) -> CellResult {
    let mut r = CellResult {
        latencies_ns: Vec::with_capacity(65536),
        ..Default::default()
    };
    let qd = spec.qd.clamp(1, MAX_SLOTS);
    let len = spec.len.clamp(SECTOR as usize, MAX_REQUEST) / SECTOR as usize * SECTOR as usize;
    let write = spec.write;
    // Per slot: (token, start time, sector).
    let mut inflight: Vec<Option<(u16, Instant, u64)>> = vec![None; qd];
    let (fe0, be0) = (thread_cpu_ns(), processes_cpu_ns(backend_pids));
    let start = Instant::now();
    let mut issued = 0u64;
    let more = |issued: u64| match spec.count {
        Some(c) => issued < c,
        None => start.elapsed() < spec.duration,
    };
    // Lends slot `i`'s buffer to the next request and submits it.
    let mut submit = |driver: &mut BlkDriver<T>,
                      lender: &mut dyn Lender,
                      r: &mut CellResult,
                      i: usize,
                      issued: &mut u64|
     -> Option<(u16, Instant, u64)> {
        let sector = sector_of(*issued);
        *issued += 1;
        let t = Instant::now();
        let Some(data) = lender.lend(i, len, write, sector) else {
            r.errors += 1;
            return None;
        };
        let len32 = len as u32;
        let req = if write {
            BlkRequest::Write {
                sector,
                data,
                len: len32,
            }
        } else {
            BlkRequest::Read {
                sector,
                data,
                len: len32,
            }
        };
        match driver.submit(req) {
            Ok(token) => Some((token, t, sector)),
            Err(e) => {
                tracing::warn!(error = %e, "submission failed");
                lender.give_back(i, len, write, sector, false);
                r.errors += 1;
                None
            }
        }
    };
    loop {
        let mut submitted = false;
        for i in 0..qd {
            if inflight.get(i).is_some_and(Option::is_some) || !more(issued) {
                continue;
            }
            let sub = submit(driver, lender, &mut r, i, &mut issued);
            submitted |= sub.is_some();
            if let Some(slot) = inflight.get_mut(i) {
                *slot = sub;
            }
        }
        if submitted {
            driver.kick();
        }
        if inflight.iter().all(Option::is_none) {
            if !more(issued) {
                break;
            }
            continue;
        }
        let mut progressed = false;
        loop {
            let c = match driver.pop() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "device broke the used ring");
                    r.errors += 1;
                    r.elapsed = start.elapsed();
                    return r;
                }
            };
            progressed = true;
            let Some(i) = inflight
                .iter()
                .position(|s| s.is_some_and(|(tok, ..)| tok == c.token))
            else {
                r.errors += 1;
                continue;
            };
            let Some((_, t, sector)) = inflight.get_mut(i).and_then(Option::take) else {
                continue;
            };
            let ok = c.status == 0;
            let returned = lender.give_back(i, len, write, sector, ok);
            r.latencies_ns.push(t.elapsed().as_nanos() as u64);
            if !ok || !returned {
                r.errors += 1;
            }
            r.requests += 1;
            r.bytes += len as u64;
            // Refill the slot at once, before taking the next completion:
            // the device works on it while this side copies the others.
            if more(issued) {
                let sub = submit(driver, lender, &mut r, i, &mut issued);
                if sub.is_some() {
                    driver.kick();
                }
                if let Some(slot) = inflight.get_mut(i) {
                    *slot = sub;
                }
            }
        }
        if !progressed && !wait(driver) {
            tracing::error!("no completion within 1 s");
            r.stalls += 1;
            break;
        }
    }
    r.elapsed = start.elapsed();
    r.frontend_cpu_ns = thread_cpu_ns().saturating_sub(fe0);
    r.backend_cpu_ns = processes_cpu_ns(backend_pids).saturating_sub(be0);
    r
}
