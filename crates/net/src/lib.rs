//! virtio-net (virtio 1.2 §5.1) backed by a Linux TAP device.
//!
//! # Queues
//!
//! With `N` queue pairs the device has `2N + 1` queues: `rx0, tx0, rx1,
//! tx1, ..., rx(N-1), tx(N-1), ctrl`. Each pair owns one TAP queue
//! (`IFF_MULTI_QUEUE` when `N > 1`). If the driver does not negotiate
//! `VIRTIO_NET_F_MQ` it uses one pair and the control queue sits at index 2,
//! as the specification says; [`Net::activate`](ringfence_device::VirtioDevice::activate)
//! still returns `2N + 1` handlers, those of queues the driver cannot use
//! (and the control queue without `VIRTIO_NET_F_CTRL_VQ`) answering every
//! chain with a used length of 0. Only the pairs enabled by
//! `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` (one after activation) have their TAP
//! queue attached, so the kernel never steers a flow to a queue the driver
//! does not serve, and the receive handler of a disabled pair reads
//! nothing (a packet it held is dropped and counted). Transmit is not
//! policed: the kernel accepts writes on a detached TAP queue.
//!
//! The header in front of every packet is `struct virtio_net_hdr_v1` (12
//! bytes, VERSION_1 is always negotiated), on the virtqueues and on the TAP
//! alike (`TUNSETVNETHDRSZ 12`): a packet crosses unchanged but for the
//! header checks below and `num_buffers`.
//!
//! # Transmit
//!
//! One chain is one packet: all of it device-readable, header plus a frame
//! of 14 to [`MAX_FRAME_LEN`] bytes. The header is copied out and checked
//! (flags, GSO type against the negotiated HOST_* features, non-zero
//! gso_size, checksum field inside the frame); the TAP then gets the
//! checked copy of the header and the frame straight from shared memory
//! (one `writev`, no intermediate copy unless the chain is scattered over
//! more than [`TX_MAX_IOVECS`] pieces).
//!
//! # Receive
//!
//! The receive handler reads one packet from its TAP queue when it holds
//! none, and holds it until the driver offers room: a packet is never
//! dropped for lack of buffers (the TAP's own queue absorbs bursts, and the
//! kernel drops there when it overflows). With `VIRTIO_NET_F_MRG_RXBUF` a
//! packet spans as many chains as it needs, `num_buffers` telling how
//! many; without it one chain must hold the whole packet.
//!
//! # Drop and count policy
//!
//! The driver is not trusted. A chain that cannot be walked (a loop, a
//! `next` outside the table, too many descriptors) breaks the queue
//! ([`ChainError`](ringfence_device::ChainError)), as does a receive
//! buffer that cannot take any answer (a device-readable descriptor,
//! fewer than 12 bytes, memory outside what was shared) and a control
//! chain without a device-writable ack byte. Everything else is answered:
//! a bad transmit packet (header, size, direction, memory, a full TAP) is
//! dropped with used length 0 and counted in [`NetStats`] by reason; a
//! received packet the driver's buffers can never hold is dropped and
//! counted; a bad control command gets `VIRTIO_NET_ERR` in its ack byte.

mod ctrl;
mod header;
mod rx;
mod tap;
mod tx;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ringfence_device::{read_config_bytes, DeviceError, QueueHandler, VirtioDevice};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use vmm_sys_util::eventfd::EventFd;

pub use header::{HeaderError, VnetHeader, HDR_LEN};
pub use tap::{Tap, MAX_NAME_LEN};
pub use tx::TX_MAX_IOVECS;

/// Largest Ethernet frame (without the vnet header) either way: 64 KiB of
/// GSO packet plus an Ethernet and a VLAN header.
pub const MAX_FRAME_LEN: u64 = 65536 + 18;
/// Size of the config space: mac, status, max_virtqueue_pairs, mtu.
pub const CONFIG_SIZE: usize = 12;
/// Most queue pairs a device accepts.
pub const MAX_QUEUE_PAIRS: u16 = 64;
/// Most entries of each table of `VIRTIO_NET_CTRL_MAC_TABLE_SET` that are
/// recorded; a longer table is accepted and recorded as overflowing (as
/// if the driver had asked for all addresses of that kind).
pub const MAC_TABLE_ENTRIES: usize = 64;

/// Options of a net device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetOptions {
    /// MAC address offered; `None` picks a random locally administered one.
    pub mac: Option<[u8; 6]>,
    /// MTU offered (VIRTIO_NET_F_MTU); the TAP's should match ([`Tap::set_mtu`]).
    pub mtu: u16,
    /// Queue pairs (VIRTIO_NET_F_MQ when > 1); one TAP queue each.
    pub queue_pairs: u16,
    /// Queue size offered.
    pub queue_size: u16,
}

impl Default for NetOptions {
    fn default() -> Self {
        Self {
            mac: None,
            mtu: 1500,
            queue_pairs: 1,
            queue_size: 256,
        }
    }
}

/// Errors setting up a net device or its TAP.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// `/dev/net/tun` could not be opened or the interface not created.
    #[error("cannot open TAP {name}")]
    TapOpen {
        /// The interface name asked for.
        name: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An interface name the kernel cannot take.
    #[error("bad interface name {name:?} (1 to 15 bytes, no NUL)")]
    BadName {
        /// The name.
        name: String,
    },
    /// A descriptor that is not a TAP queue in the mode this device needs.
    #[error("descriptor is not an IFF_TAP | IFF_NO_PI | IFF_VNET_HDR queue (flags {flags:#x})")]
    NotATap {
        /// The flags TUNGETIFF reported.
        flags: u32,
    },
    /// A system call on the TAP failed.
    #[error("{op} failed")]
    Ioctl {
        /// Which operation.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An option out of range.
    #[error("invalid {option}: {reason}")]
    InvalidOption {
        /// Which option.
        option: &'static str,
        /// Why.
        reason: String,
    },
}

/// Packet and command counters of a net device (shared by all its queues).
#[derive(Debug, Default)]
pub struct NetStats {
    /// Packets written to the TAP.
    pub tx_packets: AtomicU64,
    /// Frame bytes written to the TAP (headers not counted).
    pub tx_bytes: AtomicU64,
    /// Transmit chains dropped, all reasons (the sum of the `tx_dropped_*`).
    pub tx_dropped: AtomicU64,
    /// Dropped: header refused, chain shorter than a header plus an
    /// Ethernet header.
    pub tx_dropped_bad_header: AtomicU64,
    /// Dropped: frame longer than [`MAX_FRAME_LEN`].
    pub tx_dropped_oversize: AtomicU64,
    /// Dropped: a device-writable descriptor, or memory that was not shared.
    pub tx_dropped_bad_chain: AtomicU64,
    /// Dropped: the TAP queue was full (the write would have blocked).
    pub tx_dropped_tap_full: AtomicU64,
    /// Dropped: the TAP refused the packet otherwise.
    pub tx_dropped_tap_error: AtomicU64,
    /// Packets delivered to the driver.
    pub rx_packets: AtomicU64,
    /// Frame bytes delivered to the driver (headers not counted).
    pub rx_bytes: AtomicU64,
    /// Received packets dropped because the driver's buffers can never
    /// hold them, or because the TAP handed over a frame shorter than an
    /// Ethernet header or longer than [`MAX_FRAME_LEN`].
    pub rx_dropped_oversize: AtomicU64,
    /// Received packets dropped because they need an offload the driver
    /// did not negotiate (queued before the offloads changed).
    pub rx_dropped_offload: AtomicU64,
    /// Received packets dropped because their queue pair was disabled.
    pub rx_dropped_inactive: AtomicU64,
    /// Reads from the TAP that failed (other than "nothing to read").
    pub rx_tap_errors: AtomicU64,
    /// Control commands answered.
    pub ctrl_commands: AtomicU64,
    /// Control commands answered with VIRTIO_NET_ERR.
    pub ctrl_errors: AtomicU64,
    /// Chains that broke their queue (unparsable, or a receive buffer or
    /// control chain with no place for an answer).
    pub chain_errors: AtomicU64,
    /// Chains put on queues the negotiated features leave unused.
    pub unused_queue_chains: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The receive filter the driver asked for through the control queue. It
/// is recorded, not enforced: which frames reach the TAP is the host's
/// business (bridge, routes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RxFilter {
    /// VIRTIO_NET_CTRL_RX_PROMISC.
    pub promisc: bool,
    /// VIRTIO_NET_CTRL_RX_ALLMULTI.
    pub allmulti: bool,
    /// Unicast table of the last MAC_TABLE_SET (at most [`MAC_TABLE_ENTRIES`]).
    pub unicast: Vec<[u8; 6]>,
    /// The unicast table had more than [`MAC_TABLE_ENTRIES`] entries.
    pub unicast_overflow: bool,
    /// Multicast table of the last MAC_TABLE_SET (at most [`MAC_TABLE_ENTRIES`]).
    pub multicast: Vec<[u8; 6]>,
    /// The multicast table had more than [`MAC_TABLE_ENTRIES`] entries.
    pub multicast_overflow: bool,
}

impl Default for RxFilter {
    /// Promiscuous until the driver says otherwise, like QEMU.
    fn default() -> Self {
        Self {
            promisc: true,
            allmulti: false,
            unicast: Vec::new(),
            unicast_overflow: false,
            multicast: Vec::new(),
            multicast_overflow: false,
        }
    }
}

/// What the control queue changes.
#[derive(Debug)]
pub(crate) struct CtrlState {
    pub(crate) mac: [u8; 6],
    pub(crate) filter: RxFilter,
    pub(crate) active_pairs: u16,
}

/// One queue pair's activation state, shared by the control handler (which
/// changes it) and the receive handler (which follows it).
#[derive(Debug)]
pub(crate) struct PairState {
    /// The pair may be used (its TAP queue is attached).
    pub(crate) active: AtomicBool,
    /// Bumped after every change of `active`, once `wake` was written.
    pub(crate) generation: AtomicU64,
    /// Wakes the receive handler of the pair so it follows a change.
    pub(crate) wake: EventFd,
}

/// What the device and its handlers share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) taps: Vec<Tap>,
    pub(crate) pairs: Vec<PairState>,
    pub(crate) stats: NetStats,
    pub(crate) state: Mutex<CtrlState>,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, CtrlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Enables pairs `0..n` and disables the others: their TAP queues are
    /// attached or detached, and their receive handlers told. `state` is
    /// the locked control state (one change at a time). `force` applies
    /// the state to every TAP queue even where it seems unchanged: on
    /// activation and reset, as the queues' files may be shared with an
    /// earlier instance that left them otherwise.
    pub(crate) fn set_active_pairs(
        &self,
        state: &mut CtrlState,
        n: u16,
        force: bool,
    ) -> io::Result<()> {
        let mut result = Ok(());
        for (i, (pair, tap)) in self.pairs.iter().zip(&self.taps).enumerate() {
            let want = i < usize::from(n);
            if !force && pair.active.load(Ordering::Acquire) == want {
                continue;
            }
            let single = self.taps.len() == 1;
            if want {
                // Attach first: the handler reads once it sees `active`.
                if !single {
                    if let Err(e) = tap.set_queue_attached(true) {
                        tracing::warn!(pair = i, error = %e, "cannot attach TAP queue");
                        result = Err(e);
                        continue;
                    }
                }
                pair.active.store(true, Ordering::Release);
                Self::tell(pair);
            } else {
                // Stop the handler reading before the queue goes away.
                pair.active.store(false, Ordering::Release);
                Self::tell(pair);
                if !single {
                    if let Err(e) = tap.set_queue_attached(false) {
                        tracing::warn!(pair = i, error = %e, "cannot detach TAP queue");
                        result = Err(e);
                    }
                }
            }
        }
        state.active_pairs = self
            .pairs
            .iter()
            .take_while(|p| p.active.load(Ordering::Acquire))
            .count() as u16;
        result
    }

    /// Wakes the pair's receive handler: the eventfd first, then the
    /// generation, so a handler that saw the generation also drains the
    /// eventfd write (see `RxQueue::follow_activation`).
    fn tell(pair: &PairState) {
        if let Err(e) = pair.wake.write(1) {
            tracing::warn!(error = %e, "cannot wake a receive handler");
        }
        pair.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// The TAP queue that carries device-wide settings (offloads): pair
    /// 0's, which is never detached.
    fn first_tap(&self) -> Option<&Tap> {
        self.taps.first()
    }
}

/// A virtio-net device.
#[derive(Debug)]
pub struct Net {
    shared: Arc<Shared>,
    opts: NetOptions,
    /// The MAC address offered at reset.
    mac: [u8; 6],
}

fn random_mac() -> io::Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    // SAFETY: getrandom writes at most `mac.len()` bytes into `mac`.
    let n = unsafe { libc::getrandom(mac.as_mut_ptr().cast(), mac.len(), 0) };
    if n != mac.len() as isize {
        return Err(io::Error::last_os_error());
    }
    // Unicast, locally administered.
    mac[0] = (mac[0] & 0xfe) | 0x02;
    Ok(mac)
}

/// A MAC address usable as a station address: not multicast, not zero.
pub(crate) fn valid_unicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 == 0 && mac.iter().any(|&b| b != 0)
}

fn make_shared(taps: Vec<Tap>, mac: [u8; 6]) -> io::Result<Shared> {
    let pairs = taps
        .iter()
        .enumerate()
        .map(|(i, _)| {
            Ok(PairState {
                active: AtomicBool::new(i == 0),
                generation: AtomicU64::new(0),
                wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            })
        })
        .collect::<io::Result<Vec<_>>>()?;
    Ok(Shared {
        taps,
        pairs,
        stats: NetStats::default(),
        state: Mutex::new(CtrlState {
            mac,
            filter: RxFilter::default(),
            active_pairs: 1,
        }),
    })
}

impl Net {
    /// A device on `taps`, one TAP queue per queue pair (see [`Tap::open`]
    /// and [`Tap::from_fd`]).
    pub fn new(taps: Vec<Tap>, opts: NetOptions) -> Result<Net, NetError> {
        let invalid = |option, reason: String| NetError::InvalidOption { option, reason };
        if opts.queue_pairs == 0 || opts.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(invalid(
                "queue_pairs",
                format!("{} not in 1..={MAX_QUEUE_PAIRS}", opts.queue_pairs),
            ));
        }
        if taps.len() != usize::from(opts.queue_pairs) {
            return Err(invalid(
                "queue_pairs",
                format!(
                    "{} queue pairs but {} TAP queues",
                    opts.queue_pairs,
                    taps.len()
                ),
            ));
        }
        if !opts.queue_size.is_power_of_two() || opts.queue_size < 2 {
            return Err(invalid(
                "queue_size",
                format!("{} not a power of two >= 2", opts.queue_size),
            ));
        }
        if opts.mtu < 68 {
            return Err(invalid("mtu", format!("{} below 68", opts.mtu)));
        }
        let mac = match opts.mac {
            Some(m) if valid_unicast(&m) => m,
            Some(m) => return Err(invalid("mac", format!("{m:02x?} is not a unicast address"))),
            None => random_mac().map_err(|source| NetError::Ioctl {
                op: "getrandom",
                source,
            })?,
        };
        if taps.len() > 1 {
            let first = taps.first().map(Tap::name).transpose()?;
            for tap in &taps {
                if !tap.is_multi_queue()? {
                    return Err(invalid(
                        "taps",
                        "several queue pairs need an IFF_MULTI_QUEUE TAP".into(),
                    ));
                }
                if Some(tap.name()?) != first {
                    return Err(invalid("taps", "TAP queues of different interfaces".into()));
                }
            }
        }
        let shared = make_shared(taps, mac).map_err(|source| NetError::Ioctl {
            op: "eventfd",
            source,
        })?;
        Ok(Net {
            shared: Arc::new(shared),
            opts: NetOptions {
                mac: Some(mac),
                ..opts
            },
            mac,
        })
    }

    /// Another device instance on the same TAP queues (duplicated
    /// descriptors, fresh counters and control state) with the same MAC
    /// address: one per frontend connection.
    pub fn try_clone(&self) -> io::Result<Net> {
        let taps = self
            .shared
            .taps
            .iter()
            .map(Tap::try_clone)
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Net {
            shared: Arc::new(make_shared(taps, self.mac)?),
            opts: self.opts.clone(),
            mac: self.mac,
        })
    }

    /// Counters, shared by all queues.
    pub fn stats(&self) -> &NetStats {
        &self.shared.stats
    }

    /// The TAP queues, one per pair.
    pub fn taps(&self) -> &[Tap] {
        &self.shared.taps
    }

    /// The MAC address in the config space now (the driver may change it
    /// with VIRTIO_NET_CTRL_MAC_ADDR_SET).
    pub fn mac(&self) -> [u8; 6] {
        self.shared.lock().mac
    }

    /// The receive filter the driver asked for.
    pub fn rx_filter(&self) -> RxFilter {
        self.shared.lock().filter.clone()
    }

    /// Queue pairs in use (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET).
    pub fn active_queue_pairs(&self) -> u16 {
        self.shared.lock().active_pairs
    }

    /// The options, with the MAC address actually used.
    pub fn options(&self) -> &NetOptions {
        &self.opts
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let mac = self.mac();
        let status = (VIRTIO_NET_S_LINK_UP as u16).to_le_bytes();
        let pairs = self.opts.queue_pairs.to_le_bytes();
        let mtu = self.opts.mtu.to_le_bytes();
        for (d, s) in c
            .iter_mut()
            .zip(mac.iter().chain(&status).chain(&pairs).chain(&mtu))
        {
            *d = *s;
        }
        c
    }

    /// `TUN_F_*` for what the driver accepts on receive. TSO and UFO are
    /// only valid with checksum offload (the kernel refuses them alone).
    fn tap_offloads(acked: u64) -> libc::c_uint {
        let has = |f: u32| acked & (1u64 << f) != 0;
        if !has(VIRTIO_NET_F_GUEST_CSUM) {
            return 0;
        }
        let mut o = libc::TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            o |= libc::TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            o |= libc::TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_ECN) && o & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
            o |= libc::TUN_F_TSO_ECN;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            o |= libc::TUN_F_UFO;
        }
        o
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn device_features(&self) -> u64 {
        let mut f = [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_MAC,
            VIRTIO_NET_F_MTU,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_F_GUEST_ECN,
            VIRTIO_NET_F_GUEST_UFO,
            VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_F_HOST_ECN,
            VIRTIO_NET_F_HOST_UFO,
            VIRTIO_NET_F_MRG_RXBUF,
            VIRTIO_NET_F_STATUS,
            VIRTIO_NET_F_CTRL_VQ,
            VIRTIO_NET_F_CTRL_RX,
            VIRTIO_NET_F_CTRL_MAC_ADDR,
        ]
        .iter()
        .fold(0u64, |f, &b| f | (1 << b));
        if self.opts.queue_pairs > 1 {
            f |= 1 << VIRTIO_NET_F_MQ;
        }
        f
    }

    fn num_queues(&self) -> u16 {
        // queue_pairs <= MAX_QUEUE_PAIRS: no overflow.
        self.opts.queue_pairs * 2 + 1
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        read_config_bytes(&self.config(), offset, data)
    }

    /// The config space is read-only. A legacy driver would write `mac`
    /// here; VERSION_1 is always negotiated, and a modern driver changes
    /// the address with VIRTIO_NET_CTRL_MAC_ADDR_SET (Linux refuses to
    /// change it otherwise), so that write is refused as well.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let _ = data;
        Err(DeviceError::ConfigReadOnly { offset })
    }

    fn activate(&mut self, acked_features: u64) -> Result<Vec<Box<dyn QueueHandler>>, DeviceError> {
        let acked = acked_features;
        let has = |f: u32| acked & (1u64 << f) != 0;
        let shared = &self.shared;
        if let Some(tap) = shared.first_tap() {
            let offloads = Self::tap_offloads(acked);
            tap.set_offload(offloads)
                .map_err(|e| DeviceError::Activate {
                    reason: format!("TUNSETOFFLOAD {offloads:#x}: {e}"),
                })?;
        }
        // One pair until the driver enables more (virtio 1.2 5.1.6.5.5).
        if let Err(e) = shared.set_active_pairs(&mut shared.lock(), 1, true) {
            return Err(DeviceError::Activate {
                reason: format!("cannot detach the TAP queues of unused pairs: {e}"),
            });
        }
        let pairs = if has(VIRTIO_NET_F_MQ) {
            self.opts.queue_pairs
        } else {
            1
        };
        let queue_size = self.opts.queue_size;
        let mut handlers: Vec<Box<dyn QueueHandler>> = Vec::new();
        for pair in 0..usize::from(pairs) {
            let rx = rx::RxQueue::new(shared.clone(), pair, acked, queue_size).map_err(|e| {
                DeviceError::Activate {
                    reason: format!("receive queue {pair}: {e}"),
                }
            })?;
            handlers.push(Box::new(rx));
            handlers.push(Box::new(tx::TxQueue::new(
                shared.clone(),
                pair,
                acked,
                queue_size,
            )));
        }
        if has(VIRTIO_NET_F_CTRL_VQ) {
            handlers.push(Box::new(ctrl::CtrlQueue::new(
                shared.clone(),
                acked,
                queue_size,
            )));
        }
        while handlers.len() < usize::from(self.num_queues()) {
            handlers.push(Box::new(Unused {
                shared: shared.clone(),
            }));
        }
        tracing::info!(
            pairs,
            mrg_rxbuf = has(VIRTIO_NET_F_MRG_RXBUF),
            ctrl_vq = has(VIRTIO_NET_F_CTRL_VQ),
            features = format_args!("{acked:#x}"),
            "virtio-net activated"
        );
        Ok(handlers)
    }

    fn reset(&mut self) {
        let shared = &self.shared;
        if let Some(tap) = shared.first_tap() {
            if let Err(e) = tap.set_offload(0) {
                tracing::warn!(error = %e, "TUNSETOFFLOAD 0 on reset");
            }
        }
        let mut state = shared.lock();
        let _ = shared.set_active_pairs(&mut state, 1, true);
        state.mac = self.mac;
        state.filter = RxFilter::default();
    }
}

/// The handler of a queue the negotiated features leave unused: every
/// chain is put back with used length 0, nothing read or written.
struct Unused {
    shared: Arc<Shared>,
}

impl QueueHandler for Unused {
    fn handle_chain(
        &mut self,
        _chain: ringfence_device::Chain<'_>,
        _mem: &ringfence_device::DeviceMemory,
    ) -> Result<u32, ringfence_device::ChainError> {
        inc(&self.shared.stats.unused_queue_chains);
        Ok(0)
    }
}
