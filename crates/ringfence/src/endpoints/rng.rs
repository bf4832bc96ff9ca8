//! rng → a file or a FIFO filled with the device's entropy (`--rng-out`).
//!
//! `VirtIORng::request_entropy` (virtio-drivers 0.13) waits by spinning on
//! the used ring without a bound, which burns a CPU for as long as a
//! rate-limited device holds the request and hangs for ever on a device
//! that never answers. So the endpoint drives the same driver queue
//! (`VirtQueue`, the features `VirtIORng` negotiates) and sleeps on the
//! queue's doorbell instead.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ringfence_msg_driver::{BounceHal, CompletionWaiter, MsgTransport};
use virtio_drivers::device::common::Feature;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;

use super::{wait_events, DeviceLink, EndpointArgs, EndpointError, Report, Stop, WAIT_SLICE};

/// The request queue.
const QUEUE: u16 = 0;
/// Its size (as `VirtIORng`'s).
const QUEUE_SIZE: usize = 8;
/// Bytes asked for per request.
const REQUEST_BYTES: usize = 4096;
/// After this long without a completion, notify again (see nbd.rs).
const REKICK_AFTER: Duration = Duration::from_millis(2);

/// Opens `path` for writing without blocking on a FIFO that has no reader
/// yet: waits for one in slices, until stopped.
fn open_out(path: &Path, stop: &Stop) -> Result<Option<File>, EndpointError> {
    loop {
        match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Ok(f) => return Ok(Some(f)),
            // A FIFO without a reader.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                if stop.stopped() {
                    return Ok(None);
                }
                std::thread::sleep(WAIT_SLICE);
            }
            Err(e) => return Err(EndpointError::io("opening --rng-out")(e)),
        }
    }
}

/// Writes all of `data` to the non-blocking `out`, waiting while it is
/// full. `Ok(false)` when stopped or when the reader of a FIFO went away.
fn write_out(out: &mut File, mut data: &[u8], stop: &Stop) -> Result<bool, EndpointError> {
    while !data.is_empty() {
        match out.write(data) {
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if stop.stopped() {
                    return Ok(false);
                }
                let mut p = [libc::pollfd {
                    fd: out.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                }];
                super::poll_fds(&mut p, WAIT_SLICE)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(EndpointError::io("writing --rng-out")(e)),
        }
    }
    Ok(true)
}

/// The driver: its queue, and the transport it resets when dropped.
struct RngDevice {
    transport: MsgTransport,
    queue: VirtQueue<BounceHal, QUEUE_SIZE>,
}

impl Drop for RngDevice {
    fn drop(&mut self) {
        // Resets the device (see MsgTransport::queue_unset) before the
        // queue's pages go back to the pool.
        self.transport.queue_unset(QUEUE);
    }
}

/// Asks the device for entropy into `buf`; `Ok(None)` when stopped first.
fn request(
    dev: &mut RngDevice,
    waiter: &CompletionWaiter,
    buf: &mut [u8],
    stop: &Stop,
) -> Result<Option<usize>, EndpointError> {
    let dev_err = |what| EndpointError::device(what, waiter);
    let RngDevice { transport, queue } = dev;
    // SAFETY: `buf` is neither read nor written until the token is popped
    // below; if we return early (stopped, or the device failed) the device
    // is reset and the queue dropped by the caller before `buf` is, and
    // never touches it again.
    let token = unsafe { queue.add(&[], &mut [&mut *buf]) }.map_err(dev_err("rng request"))?;
    if queue.should_notify() {
        transport.notify(QUEUE);
    }
    let mut last_kick = Instant::now();
    loop {
        match queue.peek_used() {
            Some(t) if t == token => break,
            Some(t) => {
                return Err(EndpointError::Device {
                    what: "rng request",
                    detail: format!("device used descriptor {t}, not the one in flight ({token})"),
                })
            }
            None => {}
        }
        if stop.stopped() {
            return Ok(None);
        }
        wait_events(&[], waiter, &[QUEUE], REKICK_AFTER)?;
        if queue.peek_used().is_none() && last_kick.elapsed() >= REKICK_AFTER {
            // Harmless when spurious; rescues a lost notification, and a
            // rate-limited device simply keeps holding the request.
            let _ = waiter.kick(QUEUE);
            last_kick = Instant::now();
        }
    }
    // SAFETY: the same buffers as passed to `add` for this token.
    let len = unsafe { queue.pop_used(token, &[], &mut [&mut *buf]) }
        .map_err(dev_err("rng completion"))?;
    // pop_used checks the length against the buffer; check again rather
    // than trust that.
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len > buf.len() {
        return Err(EndpointError::Device {
            what: "rng completion",
            detail: format!("device wrote {len} bytes into a {}-byte buffer", buf.len()),
        });
    }
    Ok(Some(len))
}

/// Fills `--rng-out` with `--rng-bytes` of entropy (or until stopped).
pub fn run(link: DeviceLink, args: &EndpointArgs, stop: &Stop) -> Result<Report, EndpointError> {
    let Some(path) = args.rng_out.as_deref() else {
        return Err(EndpointError::Option {
            option: "--rng-out",
            detail: "not given".into(),
        });
    };
    let DeviceLink {
        mut transport,
        waiter,
        ..
    } = link;
    let started = Instant::now();
    // Declared before the device so that it outlives it (see `request`).
    let mut buf = vec![0u8; REQUEST_BYTES];
    let features = transport.begin_init(Feature::RING_EVENT_IDX | Feature::VERSION_1);
    let queue = VirtQueue::<BounceHal, QUEUE_SIZE>::new(
        &mut transport,
        QUEUE,
        false,
        features.contains(Feature::RING_EVENT_IDX),
    )
    .map_err(EndpointError::device("rng queue set-up", &waiter))?;
    transport.finish_init();
    let mut dev = RngDevice { transport, queue };
    if let Some(f) = waiter.failure() {
        return Err(EndpointError::Device {
            what: "rng set-up",
            detail: f,
        });
    }
    println!("rng: entropy to {}", path.display());
    let Some(mut out) = open_out(path, stop)? else {
        return Ok(Report {
            device: "rng",
            detail: "stopped before a reader opened the FIFO".into(),
        });
    };
    let (target, mut written, mut requests) = (args.rng_bytes, 0u64, 0u64);
    let mut ended = "stopped";
    while target == 0 || written < target {
        let want = match target {
            0 => REQUEST_BYTES,
            t => usize::try_from(t - written).map_or(REQUEST_BYTES, |l| l.min(REQUEST_BYTES)),
        };
        let Some(got) = request(
            &mut dev,
            &waiter,
            buf.get_mut(..want).unwrap_or_default(),
            stop,
        )?
        else {
            ended = "stopped";
            break;
        };
        requests += 1;
        if !write_out(&mut out, buf.get(..got).unwrap_or_default(), stop)? {
            ended = if stop.stopped() {
                "stopped"
            } else {
                "reader closed"
            };
            break;
        }
        written += got as u64;
        ended = "done";
    }
    drop(dev);
    let secs = started.elapsed().as_secs_f64();
    Ok(Report {
        device: "rng",
        detail: format!(
            "{written} bytes in {requests} requests to {} ({:.1} KiB/s, {ended})",
            path.display(),
            written as f64 / 1024.0 / secs.max(1e-9)
        ),
    })
}
