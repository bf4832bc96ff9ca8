//! blk → an NBD server: `qemu-img`, `qemu-io` and `nbd-client` use the
//! remote disk through the isolated path.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfence_msg_driver::CompletionWaiter;
use ringfence_nbd::{BlockDevice, BlockError, Listen, NbdError, NbdServer};
use virtio_drivers::device::blk::{BlkReq, BlkResp, RespStatus, SECTOR_SIZE};

use super::{readable, DeviceLink, EndpointArgs, EndpointError, Report, Stop, WAIT_SLICE};
use crate::frontend::Disk;

/// How long one request may take before the disk is declared gone.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The data of one request.
enum Buf<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

/// The remote virtio-blk disk as an NBD [`BlockDevice`]: one request at a
/// time, completed by notification (not by spinning).
struct RemoteDisk<'a> {
    disk: &'a mut Disk,
    waiter: &'a CompletionWaiter,
    sectors: u64,
    watchdog: Watchdog,
    /// Set when a request was abandoned (no answer in time, or a used id
    /// not in flight): the queue can no longer be trusted, so every later
    /// request fails at once instead of being matched to a stale completion.
    dead: bool,
}

impl RemoteDisk<'_> {
    /// Waits for the request `token`; kicks again when a completion is
    /// overdue by 2 ms (see the workload's note on lost notifications).
    fn wait_used(&mut self, token: u16) -> Result<(), BlockError> {
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            match self.disk.peek_used() {
                Some(t) if t == token => return Ok(()),
                // Only one request is ever in flight: any other id is a lie.
                Some(t) => {
                    tracing::error!(used_id = t, token, "device used a descriptor not in flight");
                    return Err(BlockError::Io);
                }
                None => {}
            }
            if Instant::now() >= deadline {
                tracing::error!("no completion within {REQUEST_TIMEOUT:?}");
                return Err(BlockError::Io);
            }
            match self.waiter.wait(0, Duration::from_millis(2)) {
                Ok(true) => {}
                Ok(false) => {
                    let _ = self.waiter.kick(0);
                }
                Err(e) => {
                    tracing::error!(error = %e, "virtio-msg transport failed");
                    return Err(BlockError::Io);
                }
            }
        }
    }

    fn io(&mut self, offset: u64, mut buf: Buf<'_>) -> Result<(), BlockError> {
        if self.dead {
            return Err(BlockError::Io);
        }
        let write = matches!(buf, Buf::Write(_));
        let sector =
            usize::try_from(offset / SECTOR_SIZE as u64).map_err(|_| BlockError::Invalid)?;
        let mut req = BlkReq::default();
        let mut resp = BlkResp::default();
        // SAFETY: req, buf and resp stay in place and untouched until the
        // matching complete_* call below. If the wait gives up instead, the
        // request is abandoned with the disk marked dead, so its token is
        // never popped and nothing is ever copied back into these buffers
        // (BounceHal has the device work on copies in the window).
        let token = unsafe {
            match &mut buf {
                Buf::Write(b) => self.disk.write_blocks_nb(sector, &mut req, b, &mut resp),
                Buf::Read(b) => self.disk.read_blocks_nb(sector, &mut req, b, &mut resp),
            }
        }
        .map_err(|e| {
            tracing::error!(error = %e, "submission failed");
            BlockError::Io
        })?;
        if let Err(e) = self.wait_used(token) {
            self.dead = true;
            tracing::error!("request abandoned: the disk is unusable from now on");
            return Err(e);
        }
        // SAFETY: the same buffers as passed to the *_nb call that returned `token`.
        let (done, len) = unsafe {
            match buf {
                Buf::Write(b) => (
                    self.disk.complete_write_blocks(token, &req, b, &mut resp),
                    b.len(),
                ),
                Buf::Read(b) => (
                    self.disk.complete_read_blocks(token, &req, b, &mut resp),
                    b.len(),
                ),
            }
        };
        match (done, resp.status()) {
            (Ok(()), RespStatus::OK) => Ok(()),
            (_, status) => {
                tracing::warn!(?status, write, offset, len, "request failed");
                Err(BlockError::Io)
            }
        }
    }
}

impl BlockDevice for RemoteDisk<'_> {
    fn size(&self) -> u64 {
        self.sectors.saturating_mul(SECTOR_SIZE as u64)
    }

    fn read_only(&self) -> bool {
        self.disk.readonly()
    }

    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.io(offset, Buf::Read(buf))
    }

    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.io(offset, Buf::Write(buf))
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.dead {
            return Err(BlockError::Io);
        }
        // VirtIOBlk::flush (virtio-drivers 0.13, no non-blocking form) waits
        // by spinning on the used ring without a bound. A device that never
        // answers cannot be cancelled from here, so a watchdog stops the
        // frontend instead: every endpoint reports and the process ends.
        self.watchdog.set(Some(Instant::now() + REQUEST_TIMEOUT));
        let r = self.disk.flush();
        self.watchdog.set(None);
        r.map_err(|e| {
            tracing::warn!(error = %e, "flush failed");
            BlockError::Io
        })
    }

    fn discard(&mut self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        // VirtIOBlk (virtio-drivers 0.13) has no DISCARD request.
        Err(BlockError::Unsupported)
    }

    fn write_zeroes(&mut self, _offset: u64, _len: u64) -> Result<(), BlockError> {
        // Nor WRITE_ZEROES: the server writes zero buffers instead.
        Err(BlockError::Unsupported)
    }
}

/// Stops the frontend when a FLUSH stays unanswered past its deadline. One
/// thread per endpoint, armed and disarmed per FLUSH (no thread per request).
struct Watchdog {
    /// Deadline of the FLUSH in flight, if any.
    deadline: Arc<Mutex<Option<Instant>>>,
}

impl Watchdog {
    fn spawn(stop: Stop) -> Self {
        let deadline: Arc<Mutex<Option<Instant>>> = Arc::default();
        let watched = deadline.clone();
        std::thread::spawn(move || {
            while !stop.stopped() {
                std::thread::sleep(WAIT_SLICE);
                let due = *watched.lock().unwrap_or_else(|p| p.into_inner());
                if due.is_some_and(|d| Instant::now() >= d) {
                    tracing::error!(
                        "the disk did not answer FLUSH within {REQUEST_TIMEOUT:?}: stopping"
                    );
                    eprintln!("ringfence: blk: no answer to FLUSH within {REQUEST_TIMEOUT:?}; stopping the frontend");
                    stop.stop();
                }
            }
        });
        Self { deadline }
    }

    fn set(&self, deadline: Option<Instant>) {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner()) = deadline;
    }
}

/// Whether `listen` has a client waiting, after at most `timeout`.
fn client_waiting(listen: &Listen, timeout: Duration) -> Result<bool, EndpointError> {
    let fd = match listen {
        Listen::Unix(l) => l.as_raw_fd(),
        Listen::Tcp(l) => l.as_raw_fd(),
    };
    readable(fd, timeout)
}

/// Serves the disk on the Unix socket `--nbd-socket`, one client after
/// another, until stopped.
pub fn run(link: DeviceLink, args: &EndpointArgs, stop: &Stop) -> Result<Report, EndpointError> {
    let Some(path) = args.nbd_socket.as_deref() else {
        return Err(EndpointError::Option {
            option: "--nbd-socket",
            detail: "not given".into(),
        });
    };
    let DeviceLink {
        transport, waiter, ..
    } = link;
    let mut disk =
        Disk::new(transport).map_err(EndpointError::device("VirtIOBlk set-up", &waiter))?;
    if let Some(f) = waiter.failure() {
        return Err(EndpointError::Device {
            what: "VirtIOBlk set-up",
            detail: f,
        });
    }
    let sectors = disk.capacity();
    let started = Instant::now();
    let listen = Listen::bind_unix(path).map_err(EndpointError::io("NBD socket"))?;
    let server = NbdServer::default();
    println!("blk: NBD on nbd+unix:///?socket={}", path.display());
    let mut dev = RemoteDisk {
        disk: &mut disk,
        waiter: &waiter,
        sectors,
        watchdog: Watchdog::spawn(stop.clone()),
        dead: false,
    };
    while !stop.stopped() {
        if !client_waiting(&listen, WAIT_SLICE)? {
            continue;
        }
        match server.serve_one(&listen, &mut dev, "") {
            Ok(stats) => tracing::info!(?stats, "NBD client done"),
            Err(NbdError::Accept(e)) => return Err(EndpointError::io("NBD accept")(e)),
            Err(e) => tracing::warn!(error = %e, "NBD client ended with an error"),
        }
    }
    let _ = std::fs::remove_file(path);
    let s = server.stats();
    let (read, written) = (
        s.bytes_read.load(Ordering::Relaxed),
        s.bytes_written.load(Ordering::Relaxed),
    );
    Ok(Report {
        device: "blk",
        detail: format!(
            "NBD: {:.1} s, {} connections, {} requests, {read} bytes read, {written} written",
            started.elapsed().as_secs_f64(),
            s.connections.load(Ordering::Relaxed),
            s.requests.load(Ordering::Relaxed)
        ),
    })
}
