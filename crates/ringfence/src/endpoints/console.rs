//! console → a PTY in raw mode (its path printed, `--console-link` makes a
//! symlink to it): what a program writes to the PTY reaches the backend's
//! console end, and what the backend sends appears on the PTY.
//!
//! `VirtIOConsole` (virtio-drivers 0.13) sends by spinning on the used ring
//! without a bound (a backend whose reader stalls would hang the endpoint
//! with a CPU burning), keeps one receive buffer, and asserts on a
//! zero-length completion (a hostile device could panic us). So the
//! endpoint drives the same driver queues (`VirtQueue`) itself: several
//! buffers each way, sleeping on the PTY and the queues' doorbells.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ringfence_msg_driver::{BounceHal, CompletionWaiter, MsgTransport};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{InterruptStatus, Transport};

use super::{wait_events, DeviceLink, EndpointArgs, EndpointError, Report, Stop, WAIT_SLICE};

/// Port 0's receive queue (device → driver).
const RX_QUEUE: u16 = 0;
/// Port 0's transmit queue (driver → device).
const TX_QUEUE: u16 = 1;
/// Buffers in flight each way (and the size of each queue).
const SLOTS: usize = 4;
/// Bytes per buffer.
const BUF_BYTES: usize = 4096;
/// Received bytes held for a PTY that is not read before receive buffers
/// stop being reposted (back-pressure to the device instead of memory).
const HELD_MAX: usize = 64 * 1024;
/// After this long with a transmit in flight, notify again (see nbd.rs).
const REKICK_AFTER: Duration = Duration::from_millis(2);
bitflags::bitflags! {
    /// The features the endpoint accepts (virtio-drivers' common `Feature`
    /// would truncate the device-specific SIZE bit away).
    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    struct Features: u64 {
        /// VIRTIO_CONSOLE_F_SIZE: the device reports its terminal's size.
        const SIZE = 1 << 0;
        const RING_EVENT_IDX = 1 << 29;
        const VERSION_1 = 1 << 32;
    }
}

/// The device's terminal size (cols, rows), read consistently.
fn device_size(transport: &MsgTransport) -> virtio_drivers::Result<(u16, u16)> {
    transport.read_consistent(|| {
        Ok((
            transport.read_config_space::<u16>(0)?,
            transport.read_config_space::<u16>(2)?,
        ))
    })
}

/// Gives the PTY the device's terminal size, so that programs on it see
/// the size of the terminal on the other side (and SIGWINCH on a change).
fn set_pty_size(pty: &std::fs::File, (cols, rows): (u16, u16)) -> Result<(), EndpointError> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize` from `ws`, which outlives the call.
    if unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(EndpointError::io("setting the PTY's size")(
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Buffers and their tokens on one queue.
struct Slots {
    queue: VirtQueue<BounceHal, SLOTS>,
    bufs: Vec<Box<[u8]>>,
    /// Token and length given to the device, per buffer.
    tokens: [Option<(u16, usize)>; SLOTS],
    /// Device-writable buffers (the receive queue).
    rx: bool,
}

impl Slots {
    fn new(queue: VirtQueue<BounceHal, SLOTS>, rx: bool) -> Self {
        Self {
            queue,
            bufs: (0..SLOTS)
                .map(|_| vec![0u8; BUF_BYTES].into_boxed_slice())
                .collect(),
            tokens: [None; SLOTS],
            rx,
        }
    }

    fn in_flight(&self) -> bool {
        self.tokens.iter().any(Option::is_some)
    }

    fn free(&self) -> Option<usize> {
        self.tokens.iter().position(Option::is_none)
    }

    /// Completes the next used buffer: its index and the device's length.
    fn pop(&mut self, waiter: &CompletionWaiter) -> Result<Option<(usize, usize)>, EndpointError> {
        let Some(token) = self.queue.peek_used() else {
            return Ok(None);
        };
        let Some(i) = self
            .tokens
            .iter()
            .position(|t| t.is_some_and(|(tok, _)| tok == token))
        else {
            return Err(EndpointError::Device {
                what: "console completion",
                detail: format!("device used descriptor {token}, which is not in flight"),
            });
        };
        let given = self.tokens[i].map_or(0, |(_, len)| len);
        let buf = self.bufs[i].get_mut(..given).unwrap_or_default();
        // SAFETY: the same buffer (same slice) as was given to `add` for
        // this token; nothing touched it since.
        let len = unsafe {
            if self.rx {
                self.queue.pop_used(token, &[], &mut [buf])
            } else {
                self.queue.pop_used(token, &[&*buf], &mut [])
            }
        }
        .map_err(EndpointError::device("console completion", waiter))?;
        self.tokens[i] = None;
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if self.rx && len > given {
            return Err(EndpointError::Device {
                what: "console receive",
                detail: format!("device wrote {len} bytes into a {given}-byte buffer"),
            });
        }
        Ok(Some((i, len)))
    }
}

/// Everything the loop keeps.
struct Console {
    transport: MsgTransport,
    rx: Slots,
    tx: Slots,
    /// Received, not yet written to the PTY.
    held: VecDeque<u8>,
    to_pty: u64,
    from_pty: u64,
}

impl Drop for Console {
    fn drop(&mut self) {
        // Resets the device (see MsgTransport::queue_unset) before the
        // queues' pages go back to the pool; the buffers go after them.
        self.transport.queue_unset(RX_QUEUE);
    }
}

/// Runs the console endpoint until stopped.
pub fn run(link: DeviceLink, args: &EndpointArgs, stop: &Stop) -> Result<Report, EndpointError> {
    let DeviceLink {
        mut transport,
        waiter,
        ..
    } = link;
    let features = transport.begin_init(Features::all());
    let event_idx = features.contains(Features::RING_EVENT_IDX);
    let sized = features.contains(Features::SIZE);
    let dev_err = |what| EndpointError::device(what, &waiter);
    let rxq = VirtQueue::new(&mut transport, RX_QUEUE, false, event_idx)
        .map_err(dev_err("console receive queue"))?;
    let txq = VirtQueue::new(&mut transport, TX_QUEUE, false, event_idx)
        .map_err(dev_err("console transmit queue"))?;
    transport.finish_init();
    // From here on, every way out resets the device first (Console's drop).
    let mut c = Console {
        transport,
        rx: Slots::new(rxq, true),
        tx: Slots::new(txq, false),
        held: VecDeque::new(),
        to_pty: 0,
        from_pty: 0,
    };
    if let Some(f) = waiter.failure() {
        return Err(EndpointError::Device {
            what: "console set-up",
            detail: f,
        });
    }
    let pty = ringfence_console::open_pty().map_err(EndpointError::io("opening a PTY"))?;
    println!("console: PTY {}", pty.path.display());
    if let Some(link) = &args.console_link {
        let _ = std::fs::remove_file(link);
        std::os::unix::fs::symlink(&pty.path, link)
            .map_err(EndpointError::io("making --console-link"))?;
    }
    let mut master = std::fs::File::from(pty.master);
    let _slave = pty.slave; // held so the master never sees a hang-up
    let mut resizes = 0u64;
    if sized {
        let size = device_size(&c.transport).map_err(dev_err("console size"))?;
        set_pty_size(&master, size)?;
    }
    let started = Instant::now();
    let mut last_kick = Instant::now();
    while !stop.stopped() {
        // The device's terminal was resized (a config interrupt).
        if c.transport
            .ack_interrupt()
            .contains(InterruptStatus::DEVICE_CONFIGURATION_INTERRUPT)
            && sized
        {
            let size = device_size(&c.transport).map_err(dev_err("console size"))?;
            set_pty_size(&master, size)?;
            resizes += 1;
            tracing::info!(cols = size.0, rows = size.1, "console resized");
        }
        // Device → PTY.
        while let Some((i, len)) = c.rx.pop(&waiter)? {
            c.held
                .extend(c.rx.bufs[i].get(..len).unwrap_or_default().iter().copied());
        }
        while !c.held.is_empty() {
            let (front, _) = c.held.as_slices();
            match master.write(front) {
                Ok(n) => {
                    c.held.drain(..n);
                    c.to_pty += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(EndpointError::io("writing the PTY")(e)),
            }
        }
        let mut notify_rx = false;
        while c.held.len() < HELD_MAX {
            let Some(i) = c.rx.free() else { break };
            let buf = &mut c.rx.bufs[i];
            // SAFETY: the buffer lives in `c.rx.bufs` (a heap allocation that
            // never moves) and is not touched until its token is popped; if
            // the loop ends first, the queue is dropped before the buffers.
            let token = unsafe { c.rx.queue.add(&[], &mut [&mut buf[..]]) }
                .map_err(dev_err("console receive"))?;
            c.rx.tokens[i] = Some((token, BUF_BYTES));
            notify_rx = true;
        }
        if notify_rx && c.rx.queue.should_notify() {
            c.transport.notify(RX_QUEUE);
        }
        // PTY → device.
        while let Some((_, _)) = c.tx.pop(&waiter)? {}
        let mut pty_readable = true;
        let mut notify_tx = false;
        while let Some(i) = c.tx.free() {
            let buf = &mut c.tx.bufs[i];
            let n = match master.read(&mut buf[..]) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    pty_readable = false;
                    break;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // EIO: no slave open (cannot happen while we hold it).
                Err(e) => return Err(EndpointError::io("reading the PTY")(e)),
            };
            let data = buf.get(..n).unwrap_or_default();
            // SAFETY: as for the receive buffers above.
            let token =
                unsafe { c.tx.queue.add(&[data], &mut []) }.map_err(dev_err("console transmit"))?;
            c.tx.tokens[i] = Some((token, n));
            c.from_pty += n as u64;
            notify_tx = true;
            last_kick = Instant::now();
        }
        if notify_tx && c.tx.queue.should_notify() {
            c.transport.notify(TX_QUEUE);
        }
        // Sleep on the PTY (readable while a transmit slot is free,
        // writable while bytes are held) and both queues.
        let fd = master.as_raw_fd();
        let mut local = Vec::with_capacity(2);
        if c.tx.free().is_some() && !pty_readable {
            local.push((fd, false));
        }
        if !c.held.is_empty() {
            local.push((fd, true));
        }
        let timeout = if c.tx.in_flight() {
            REKICK_AFTER
        } else if c.tx.free().is_some() && pty_readable {
            Duration::ZERO
        } else {
            WAIT_SLICE
        };
        wait_events(&local, &waiter, &[RX_QUEUE, TX_QUEUE], timeout)?;
        if c.tx.in_flight()
            && c.tx.queue.peek_used().is_none()
            && last_kick.elapsed() >= REKICK_AFTER
        {
            let _ = waiter.kick(TX_QUEUE);
            last_kick = Instant::now();
        }
    }
    let (to_pty, from_pty) = (c.to_pty, c.from_pty);
    drop(c);
    if let Some(link) = &args.console_link {
        let _ = std::fs::remove_file(link);
    }
    Ok(Report {
        device: "console",
        detail: format!(
            "{:.1} s, {} bytes to the PTY, {} bytes from it, {resizes} resizes",
            started.elapsed().as_secs_f64(),
            to_pty,
            from_pty
        ),
    })
}
