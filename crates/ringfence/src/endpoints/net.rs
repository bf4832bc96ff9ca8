//! net → a TAP interface in the frontend's network namespace: every frame
//! the local stack sends on it goes to the device, every frame the device
//! receives comes out of it.
//!
//! virtio-drivers' `VirtIONetRaw` (0.13) negotiates no offload at all, so
//! every TCP segment would cross as its own MTU-sized frame, and the two
//! kernels' per-frame work bounds the link at about a tenth of a veth pair.
//! The endpoint therefore drives virtio-drivers' `VirtQueue`s itself
//! ([`OffloadNet`]) and negotiates what a TAP's vnet header carries:
//! checksum offload and TSO both ways. The TAP has `IFF_VNET_HDR` (12 bytes,
//! `virtio_net_hdr_v1`) and, through `TUNSETOFFLOAD`, exactly the offloads
//! the device accepts; headers pass through unchanged both ways (the
//! kernel checks a header written to a TAP as it checks any user's), and
//! are zeroed when nothing was negotiated that gives them meaning. Without
//! MRG_RXBUF every receive buffer must hold a 64 KiB packet, so a fixed
//! number of large buffers is posted, sized to leave the window room for
//! the other devices.
//!
//! Every receive buffer stays posted; transmits stay in flight up to the
//! ring size. With the transmit ring full the TAP is not read (the kernel
//! queues, or drops by its own policy), never dropped by us; it is polled
//! again once transmits complete. Frames longer than a buffer are dropped
//! and counted.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use ringfence_msg_driver::{BounceHal, CompletionWaiter, MsgTransport};
use ringfence_net::{Tap, HDR_LEN};
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::Transport;

use super::{wait_events, DeviceLink, EndpointArgs, EndpointError, Report, Stop, WAIT_SLICE};

/// Receive queue index.
const RX_Q: u16 = 0;
/// Transmit queue index.
const TX_Q: u16 = 1;

/// Bytes per buffer, header included: the 65562 bytes a driver without
/// MRG_RXBUF owes a device that may send TSO packets, rounded up to whole
/// bounce slots (129 of 512 bytes).
pub const BUF_LEN: usize = 66048;
/// Buffers per direction, whatever the ring size: 2 x 16 x 64.5 KiB of
/// the window (the default window is 8 MiB, shared by every device).
const BUFFERS: usize = 16;
/// Longest frame the device may deliver (without the header); the TAP's
/// frames must be shorter (see the read).
pub const MAX_FRAME: usize = BUF_LEN - HDR_LEN;
/// Shortest frame carried: an Ethernet header.
const MIN_FRAME: usize = 14;

/// A transmit unanswered this long is kicked again (see the lost
/// notification note in endpoints/mod.rs).
const OVERDUE: Duration = Duration::from_millis(2);
/// How long transmits still in flight are waited for when stopping.
const DRAIN: Duration = Duration::from_millis(200);

/// Counters of the endpoint.
#[derive(Debug, Default, Clone, Copy)]
pub struct NetCounters {
    /// Frames read from the TAP and sent to the device.
    pub tx_frames: u64,
    /// Their bytes (frames, without the header).
    pub tx_bytes: u64,
    /// Frames the device delivered and the TAP took.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// TAP frames longer than a buffer (or shorter than an Ethernet header).
    pub tx_dropped: u64,
    /// Device frames with an impossible length.
    pub rx_malformed: u64,
    /// Device frames the TAP refused (interface down, for one).
    pub rx_refused: u64,
    /// Extra kicks (overdue completions, ring index wrap).
    pub rekicks: u64,
}

/// Runs the net endpoint until stopped.
pub fn run(link: DeviceLink, args: &EndpointArgs, stop: &Stop) -> Result<Report, EndpointError> {
    let Some(name) = args.net_tap.as_deref() else {
        return Err(EndpointError::Option {
            option: "--net-tap",
            detail: "not given".into(),
        });
    };
    let DeviceLink {
        mut transport,
        waiter,
        ..
    } = link;
    // The ring size is a const generic: take the largest the device allows.
    let max = transport
        .max_queue_size(RX_Q)
        .min(transport.max_queue_size(TX_Q));
    if let Some(f) = waiter.failure() {
        return Err(EndpointError::Device {
            what: "reading the queue sizes",
            detail: f,
        });
    }
    match max {
        256.. => run_sized::<256>(transport, &waiter, name, stop),
        128..=255 => run_sized::<128>(transport, &waiter, name, stop),
        64..=127 => run_sized::<64>(transport, &waiter, name, stop),
        16..=63 => run_sized::<16>(transport, &waiter, name, stop),
        _ => Err(EndpointError::Device {
            what: "queue size",
            detail: format!("the device allows {max} entries, at least 16 needed"),
        }),
    }
}

/// One TAP, opened non-blocking with a 12-byte vnet header and no offloads.
fn open_tap(name: &str) -> Result<Tap, EndpointError> {
    let bad = |what: &'static str| {
        move |e: ringfence_net::NetError| EndpointError::Io {
            what,
            source: io::Error::other(e),
        }
    };
    let tap = Tap::open(name, 1)
        .map_err(bad("creating the TAP"))?
        .pop()
        .ok_or_else(|| EndpointError::Io {
            what: "creating the TAP",
            source: io::Error::other("no queue"),
        })?;
    tap.set_up().map_err(bad("bringing the TAP up"))?;
    Ok(tap)
}

/// Reads one frame (header room first) into `buf`; `None` when the TAP
/// holds nothing.
fn tap_read(tap: &Tap, buf: &mut [u8]) -> Result<Option<usize>, EndpointError> {
    // SAFETY: `buf` is a live, writable buffer of `buf.len()` bytes.
    let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    match usize::try_from(n) {
        Ok(n) => Ok(Some(n)),
        Err(_) => {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(None),
                _ => Err(EndpointError::io("reading the TAP")(e)),
            }
        }
    }
}

/// Writes one frame (header first) to the TAP; `false` if it refused it.
fn tap_write(tap: &Tap, buf: &[u8]) -> bool {
    // SAFETY: `buf` is a live buffer of `buf.len()` bytes, only read.
    let n = unsafe { libc::write(tap.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
    usize::try_from(n).is_ok_and(|n| n == buf.len())
}

/// A used id the driver did not hand out, or handed out for nothing.
fn bogus_id(queue: &'static str, id: u16) -> EndpointError {
    EndpointError::Device {
        what: "used ring",
        detail: format!("{queue} used descriptor {id}, which is not in flight"),
    }
}

bitflags::bitflags! {
    /// virtio-net features the endpoint accepts.
    #[derive(Copy, Clone, Debug, PartialEq, Eq)]
    struct Features: u64 {
        /// The device completes partial checksums we send.
        const CSUM = 1 << 0;
        /// We accept packets with partial checksums.
        const GUEST_CSUM = 1 << 1;
        const MAC = 1 << 5;
        const GUEST_TSO4 = 1 << 7;
        const GUEST_TSO6 = 1 << 8;
        const GUEST_ECN = 1 << 9;
        const HOST_TSO4 = 1 << 11;
        const HOST_TSO6 = 1 << 12;
        const HOST_ECN = 1 << 13;
        const STATUS = 1 << 16;
        const RING_EVENT_IDX = 1 << 29;
        const VERSION_1 = 1 << 32;
    }
}

impl Features {
    /// `TUN_F_*` for the frontend's TAP: it may hand us exactly what the
    /// device accepts from us (TSO only with checksum offload).
    fn tap_offloads(self) -> libc::c_uint {
        if !self.contains(Features::CSUM) {
            return 0;
        }
        let mut o = libc::TUN_F_CSUM;
        if self.contains(Features::HOST_TSO4) {
            o |= libc::TUN_F_TSO4;
        }
        if self.contains(Features::HOST_TSO6) {
            o |= libc::TUN_F_TSO6;
        }
        if self.contains(Features::HOST_ECN) && o & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            o |= libc::TUN_F_TSO_ECN;
        }
        o
    }
}

/// A virtio-net driver over virtio-drivers' `VirtQueue`s, with offloads
/// (the API of `VirtIONetRaw`'s non-blocking half).
struct OffloadNet<const QS: usize> {
    transport: MsgTransport,
    rx: VirtQueue<BounceHal, QS>,
    tx: VirtQueue<BounceHal, QS>,
    features: Features,
    mac: [u8; 6],
}

impl<const QS: usize> OffloadNet<QS> {
    fn new(mut transport: MsgTransport) -> virtio_drivers::Result<Self> {
        let features = transport.begin_init(Features::all());
        let event_idx = features.contains(Features::RING_EVENT_IDX);
        let rx = VirtQueue::new(&mut transport, RX_Q, false, event_idx)?;
        let tx = VirtQueue::new(&mut transport, TX_Q, false, event_idx)?;
        let mut mac = [0u8; 6];
        if features.contains(Features::MAC) {
            for (i, b) in mac.iter_mut().enumerate() {
                *b = transport.read_config_space::<u8>(i)?;
            }
        }
        transport.finish_init();
        Ok(Self {
            transport,
            rx,
            tx,
            features,
            mac,
        })
    }

    /// Posts a receive buffer.
    ///
    /// # Safety
    /// `buf` must stay alive and untouched until `receive_complete` with
    /// the returned token.
    unsafe fn receive_begin(&mut self, buf: &mut [u8]) -> virtio_drivers::Result<u16> {
        // SAFETY: the caller keeps `buf` as `add` requires.
        let token = unsafe { self.rx.add(&[], &mut [buf]) }?;
        if self.rx.should_notify() {
            self.transport.notify(RX_Q);
        }
        Ok(token)
    }

    fn poll_receive(&self) -> Option<u16> {
        self.rx.peek_used()
    }

    /// Completes a receive: (header length, packet length).
    ///
    /// # Safety
    /// `buf` must be the buffer posted with `token`.
    unsafe fn receive_complete(
        &mut self,
        token: u16,
        buf: &mut [u8],
    ) -> virtio_drivers::Result<(usize, usize)> {
        // SAFETY: the caller passes the buffer posted with `token`.
        let len = unsafe { self.rx.pop_used(token, &[], &mut [buf]) }?;
        let len = usize::try_from(len).map_err(|_| virtio_drivers::Error::IoError)?;
        let packet = len
            .checked_sub(HDR_LEN)
            .ok_or(virtio_drivers::Error::IoError)?;
        Ok((HDR_LEN, packet))
    }

    /// Sends `buf` (header and packet).
    ///
    /// # Safety
    /// `buf` must stay alive and untouched until `transmit_complete` with
    /// the returned token.
    unsafe fn transmit_begin(&mut self, buf: &[u8]) -> virtio_drivers::Result<u16> {
        // SAFETY: the caller keeps `buf` as `add` requires.
        let token = unsafe { self.tx.add(&[buf], &mut []) }?;
        if self.tx.should_notify() {
            self.transport.notify(TX_Q);
        }
        Ok(token)
    }

    fn poll_transmit(&self) -> Option<u16> {
        self.tx.peek_used()
    }

    /// Completes a transmit.
    ///
    /// # Safety
    /// `buf` must be the buffer sent with `token`.
    unsafe fn transmit_complete(&mut self, token: u16, buf: &[u8]) -> virtio_drivers::Result<()> {
        // SAFETY: the caller passes the buffer sent with `token`.
        unsafe { self.tx.pop_used(token, &[buf], &mut []) }.map(|_| ())
    }
}

impl<const QS: usize> Drop for OffloadNet<QS> {
    fn drop(&mut self) {
        self.transport.queue_unset(RX_Q);
        self.transport.queue_unset(TX_Q);
    }
}

/// Completes every finished transmit, freeing its buffer; true if any.
fn complete_transmits<const QS: usize>(
    net: &mut OffloadNet<QS>,
    tx_of_token: &mut [Option<(usize, usize)>],
    tx_bufs: &[Vec<u8>],
    tx_free: &mut Vec<usize>,
    waiter: &CompletionWaiter,
) -> Result<bool, EndpointError> {
    let mut any = false;
    while let Some(token) = net.poll_transmit() {
        let (i, len) = tx_of_token
            .get_mut(usize::from(token))
            .and_then(Option::take)
            .ok_or(bogus_id("tx", token))?;
        let buf = tx_bufs.get(i).and_then(|b| b.get(..len)).unwrap_or(&[]);
        // SAFETY: the same buffer (and length) as passed to transmit_begin.
        unsafe { net.transmit_complete(token, buf) }
            .map_err(EndpointError::device("completing transmit", waiter))?;
        tx_free.push(i);
        any = true;
    }
    Ok(any)
}

/// The endpoint with rings of `QS` entries.
fn run_sized<const QS: usize>(
    transport: MsgTransport,
    waiter: &CompletionWaiter,
    name: &str,
    stop: &Stop,
) -> Result<Report, EndpointError> {
    // The buffers are declared before the driver so they outlive it: its
    // drop takes the queues away from the device first.
    let nbuf = BUFFERS.min(QS);
    let mut rx_bufs = vec![vec![0u8; BUF_LEN]; nbuf];
    let mut tx_bufs = vec![vec![0u8; BUF_LEN]; nbuf];
    // Per descriptor id (the token): which buffer, and for transmits how long.
    let mut rx_of_token: Vec<Option<usize>> = vec![None; QS];
    let mut tx_of_token: Vec<Option<(usize, usize)>> = vec![None; QS];
    let mut tx_free: Vec<usize> = (0..nbuf).rev().collect();

    let mut net = OffloadNet::<QS>::new(transport)
        .map_err(EndpointError::device("virtio-net set-up", waiter))?;
    if let Some(f) = waiter.failure() {
        return Err(EndpointError::Device {
            what: "virtio-net set-up",
            detail: f,
        });
    }
    let tap = open_tap(name)?;
    tap.set_offload(net.features.tap_offloads())
        .map_err(EndpointError::io("TUNSETOFFLOAD on the TAP"))?;
    // Headers mean something only with checksum offload negotiated.
    let keep_tx_hdr = net.features.contains(Features::CSUM);
    let keep_rx_hdr = net.features.contains(Features::GUEST_CSUM);
    let tap_fd = tap.as_raw_fd();
    let mac = net.mac;
    println!(
        "net: TAP {name} up (device MAC {}, {QS}-entry rings, offloads {:?})",
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
        net.features
    );

    let started = Instant::now();
    let mut c = NetCounters::default();
    // Adds so far per queue, as the driver's avail index (mod 2^16): see
    // `kick_near_wrap`.
    let mut rx_added: u16 = 0;
    let mut tx_added: u16 = 0;
    // virtio-drivers 0.13 compares avail_idx >= avail_event + 1 without
    // wrapping: just after the index wraps it can skip a notification the
    // device is waiting for, and with every receive buffer posted nothing
    // else would wake it. Near the wrap, kick ourselves.
    let kick_near_wrap = |added: u16, q: u16, rekicks: &mut u64| -> Result<(), EndpointError> {
        if usize::from(added) < 2 * QS {
            waiter.kick(q).map_err(|e| EndpointError::Device {
                what: "kick",
                detail: e.to_string(),
            })?;
            *rekicks += 1;
        }
        Ok(())
    };

    // Post every receive buffer.
    for (i, buf) in rx_bufs.iter_mut().enumerate() {
        // SAFETY: `buf` is not touched again until receive_complete with
        // the same token, and outlives `net`.
        let token = unsafe { net.receive_begin(buf) }
            .map_err(EndpointError::device("posting receive", waiter))?;
        let slot = rx_of_token
            .get_mut(usize::from(token))
            .ok_or(bogus_id("rx", token))?;
        *slot = Some(i);
        rx_added = rx_added.wrapping_add(1);
    }
    kick_near_wrap(rx_added, RX_Q, &mut c.rekicks)?;

    let mut tap_ready = true; // unknown: try it
    let mut last_tx_progress = Instant::now();
    let mut repost: Vec<usize> = Vec::with_capacity(QS);
    loop {
        let stopping = stop.stopped();
        // Our used_event stores (in pop_used) must be visible before we
        // look at the used rings again, or a completion could slip between
        // the look and the sleep unannounced.
        fence(Ordering::SeqCst);
        let mut progress = false;

        // Transmits done: their buffers are free again.
        if complete_transmits(&mut net, &mut tx_of_token, &tx_bufs, &mut tx_free, waiter)? {
            progress = true;
            last_tx_progress = Instant::now();
        }

        // Frames received: out to the TAP, then the buffers go back.
        while let Some(token) = net.poll_receive() {
            let i = rx_of_token
                .get_mut(usize::from(token))
                .and_then(Option::take)
                .ok_or(bogus_id("rx", token))?;
            let buf = rx_bufs.get_mut(i).ok_or(bogus_id("rx", token))?;
            // SAFETY: the same buffer as passed to receive_begin.
            match unsafe { net.receive_complete(token, buf) } {
                Ok((hdr, len)) if hdr == HDR_LEN && (MIN_FRAME..=MAX_FRAME).contains(&len) => {
                    if !keep_rx_hdr {
                        buf[..HDR_LEN].fill(0);
                    }
                    if tap_write(&tap, &buf[..HDR_LEN + len]) {
                        c.rx_frames += 1;
                        c.rx_bytes += len as u64;
                    } else {
                        c.rx_refused += 1;
                    }
                }
                // Shorter than a header (IoError after the pop) or longer
                // than the buffer: the buffer is ours again either way.
                Ok(_) | Err(virtio_drivers::Error::IoError) => c.rx_malformed += 1,
                Err(e) => return Err(EndpointError::device("completing receive", waiter)(e)),
            }
            repost.push(i);
            progress = true;
        }
        for i in repost.drain(..) {
            let buf = rx_bufs.get_mut(i).ok_or(bogus_id("rx", 0))?;
            // SAFETY: as for the first posting.
            let token = unsafe { net.receive_begin(buf) }
                .map_err(EndpointError::device("posting receive", waiter))?;
            *rx_of_token
                .get_mut(usize::from(token))
                .ok_or(bogus_id("rx", token))? = Some(i);
            rx_added = rx_added.wrapping_add(1);
            kick_near_wrap(rx_added, RX_Q, &mut c.rekicks)?;
        }

        if stopping {
            break;
        }

        // Frames to send, while there is room in the ring.
        while tap_ready {
            let Some(i) = tx_free.pop() else { break };
            let buf = tx_bufs.get_mut(i).ok_or(bogus_id("tx", 0))?;
            let Some(n) = tap_read(&tap, buf)? else {
                tx_free.push(i);
                tap_ready = false;
                break;
            };
            progress = true;
            // A frame longer than the buffer is cut to it (the kernel
            // truncates the copy): one that fills the buffer exactly may
            // have been cut, so the buffer is one byte longer than any
            // frame taken.
            let Some(frame) = n
                .checked_sub(HDR_LEN)
                .filter(|f| (MIN_FRAME..MAX_FRAME).contains(f))
            else {
                c.tx_dropped += 1;
                tx_free.push(i);
                continue;
            };
            if !keep_tx_hdr {
                buf[..HDR_LEN].fill(0);
            }
            let was_idle = tx_free.len() + 1 == nbuf;
            // SAFETY: `buf[..n]` is not touched until transmit_complete with
            // the same token, and outlives `net`.
            let token = unsafe { net.transmit_begin(&buf[..n]) }
                .map_err(EndpointError::device("transmit", waiter))?;
            *tx_of_token
                .get_mut(usize::from(token))
                .ok_or(bogus_id("tx", token))? = Some((i, n));
            tx_added = tx_added.wrapping_add(1);
            kick_near_wrap(tx_added, TX_Q, &mut c.rekicks)?;
            if was_idle {
                last_tx_progress = Instant::now();
            }
            c.tx_frames += 1;
            c.tx_bytes += frame as u64;
        }

        if progress {
            continue;
        }
        let in_flight = tx_free.len() < nbuf;
        if in_flight && last_tx_progress.elapsed() >= OVERDUE {
            waiter.kick(TX_Q).map_err(|e| EndpointError::Device {
                what: "kick",
                detail: e.to_string(),
            })?;
            c.rekicks += 1;
            last_tx_progress = Instant::now();
        }
        // With the ring full, the TAP is left alone until a transmit
        // completes (its doorbell wakes us).
        let watch_tap = !tx_free.is_empty();
        let local: &[(i32, bool)] = if watch_tap { &[(tap_fd, false)] } else { &[] };
        let timeout = if in_flight { OVERDUE } else { WAIT_SLICE };
        let ready = wait_events(local, waiter, &[RX_Q, TX_Q], timeout)?;
        if ready.first().copied().unwrap_or(false) {
            tap_ready = true;
        }
        if let Some(f) = waiter.failure() {
            return Err(EndpointError::Device {
                what: "transport",
                detail: f,
            });
        }
    }

    // Let the transmits in flight finish, briefly.
    let deadline = Instant::now() + DRAIN;
    while tx_free.len() < nbuf && Instant::now() < deadline {
        complete_transmits(&mut net, &mut tx_of_token, &tx_bufs, &mut tx_free, waiter)?;
        if tx_free.len() < nbuf {
            wait_events(&[], waiter, &[TX_Q], OVERDUE)?;
        }
    }
    drop(net);
    Ok(Report {
        device: "net",
        detail: format_report(name, started.elapsed(), &c),
    })
}

/// The report line (tests parse it: keep the wording).
fn format_report(name: &str, elapsed: Duration, c: &NetCounters) -> String {
    format!(
        "TAP {name}, {:.1} s: sent {} frames ({} bytes), received {} frames ({} bytes), dropped {} too long, {} malformed, {} refused by the TAP, {} extra kicks",
        elapsed.as_secs_f64(),
        c.tx_frames,
        c.tx_bytes,
        c.rx_frames,
        c.rx_bytes,
        c.tx_dropped,
        c.rx_malformed,
        c.rx_refused,
        c.rekicks
    )
}
