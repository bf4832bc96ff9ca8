//! Transmit: one chain is one packet, written to the pair's TAP queue.

use std::io;
use std::sync::Arc;

use ringfence_device::{walk_chain, Chain, ChainError, DeviceMemory, QueueHandler, Segment};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::header::{HeaderError, VnetHeader, ETH_HLEN, HDR_LEN};
use crate::{inc, Shared, MAX_FRAME_LEN};

/// Most pieces (header copy included) a packet is gathered from with one
/// `writev`; a chain scattered wider is copied once into a buffer instead.
/// Linux sends at most MAX_SKB_FRAGS + 2 descriptors (19 by default).
pub const TX_MAX_IOVECS: usize = 64;

// The pointers taken from shared memory outlive their `PtrGuard`s: sound
// only while a guard does not own a mapping (vm-memory's `xen` feature makes
// it own one and unmap on drop). Fail the build if that ever changes.
const _: () = assert!(!std::mem::needs_drop::<vm_memory::volatile_memory::PtrGuard>());

/// Why a transmit chain is dropped.
#[derive(Debug, thiserror::Error)]
enum TxDrop {
    #[error("bad header: {0}")]
    Header(#[from] HeaderError),
    #[error("chain of {0} bytes is shorter than a header and an Ethernet header")]
    Short(u64),
    #[error("frame of {0} bytes is too long")]
    Oversize(u64),
    #[error("bad chain: {0}")]
    Chain(&'static str),
    #[error("TAP queue full")]
    TapFull,
    #[error("TAP write failed")]
    Tap(#[source] io::Error),
}

/// The transmit handler of one queue pair.
pub(crate) struct TxQueue {
    shared: Arc<Shared>,
    pair: usize,
    acked: u64,
    segments: Vec<Segment>,
    max_descriptors: usize,
    /// For chains scattered over more than TX_MAX_IOVECS pieces; grows to
    /// at most a header plus MAX_FRAME_LEN.
    bounce: Vec<u8>,
}

const EMPTY_IOVEC: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

impl TxQueue {
    pub(crate) fn new(shared: Arc<Shared>, pair: usize, acked: u64, queue_size: u16) -> Self {
        Self {
            shared,
            pair,
            acked,
            segments: Vec::with_capacity(usize::from(queue_size)),
            max_descriptors: usize::from(queue_size),
            bounce: Vec::new(),
        }
    }

    /// Checks the walked chain and sends it; returns the frame length.
    fn transmit(&mut self, mem: &DeviceMemory) -> Result<u64, TxDrop> {
        let mut total = 0u64;
        for s in &self.segments {
            if s.writable {
                return Err(TxDrop::Chain("device-writable descriptor"));
            }
            total = total
                .checked_add(u64::from(s.len))
                .ok_or(TxDrop::Chain("length overflow"))?;
        }
        let frame_len = total.saturating_sub(HDR_LEN as u64);
        if total < HDR_LEN as u64 + ETH_HLEN {
            return Err(TxDrop::Short(total));
        }
        if frame_len > MAX_FRAME_LEN {
            return Err(TxDrop::Oversize(frame_len));
        }
        // Copy the header out once; the TAP gets this checked copy, never
        // the bytes in shared memory, which the driver may change meanwhile.
        let mut hdr = [0u8; HDR_LEN];
        let mut filled = 0usize;
        for s in &self.segments {
            let Some(dst) = hdr.get_mut(filled..) else {
                break;
            };
            let take = dst.len().min(s.len as usize);
            let dst = dst.get_mut(..take).unwrap_or_default();
            mem.read_slice(dst, s.addr)
                .map_err(|_| TxDrop::Chain("header outside shared memory"))?;
            filled += take;
            if filled == HDR_LEN {
                break;
            }
        }
        VnetHeader::from_bytes(hdr).check_tx(frame_len, self.acked)?;

        let tap = self
            .shared
            .taps
            .get(self.pair)
            .ok_or(TxDrop::Chain("no TAP queue"))?;
        let mut iov = [EMPTY_IOVEC; TX_MAX_IOVECS];
        let mut n = 0usize;
        if let Some(first) = iov.first_mut() {
            *first = libc::iovec {
                iov_base: hdr.as_mut_ptr().cast(),
                iov_len: HDR_LEN,
            };
            n = 1;
        }
        let mut scattered = false;
        let mut skip = HDR_LEN as u64;
        for s in &self.segments {
            let Some((addr, len)) = after(s, &mut skip)? else {
                continue;
            };
            for slice in mem.get_slices(addr, len) {
                let slice = slice.map_err(|_| TxDrop::Chain("buffer outside shared memory"))?;
                match iov.get_mut(n) {
                    Some(v) => {
                        *v = libc::iovec {
                            iov_base: slice.ptr_guard().as_ptr().cast_mut().cast(),
                            iov_len: slice.len(),
                        };
                        n += 1;
                    }
                    // Keep walking: every piece must translate before anything is sent.
                    None => scattered = true,
                }
            }
        }
        let written = if scattered {
            gather(&mut self.bounce, &self.segments, mem, &hdr, frame_len)?;
            let v = [libc::iovec {
                iov_base: self.bounce.as_mut_ptr().cast(),
                iov_len: self.bounce.len(),
            }];
            // SAFETY: `v` describes `self.bounce`, alive and unchanged during the call.
            unsafe { tap.writev(&v) }
        } else {
            let v = iov.get(..n).unwrap_or_default();
            // SAFETY: the first entry is `hdr`, alive on this stack frame;
            // the others are pieces of `mem`, whose regions stay mapped while
            // `mem` is borrowed (for this whole call), and PtrGuard owns no
            // mapping (asserted above). The driver may change those bytes
            // meanwhile: the kernel copies whatever they are, which only
            // affects the frame the driver itself sends.
            unsafe { tap.writev(v) }
        };
        match written {
            Ok(w) if w as u64 == total => Ok(frame_len),
            Ok(w) => Err(TxDrop::Tap(io::Error::other(format!(
                "short write of {w} of {total} bytes"
            )))),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(TxDrop::TapFull),
            Err(e) => Err(TxDrop::Tap(e)),
        }
    }
}

/// Copies header and frame into `bounce` (the slow path).
fn gather(
    bounce: &mut Vec<u8>,
    segments: &[Segment],
    mem: &DeviceMemory,
    hdr: &[u8; HDR_LEN],
    frame_len: u64,
) -> Result<(), TxDrop> {
    let total = HDR_LEN + frame_len as usize; // <= HDR_LEN + MAX_FRAME_LEN
    bounce.clear();
    bounce.resize(total, 0);
    let (head, mut rest) = bounce.split_at_mut(HDR_LEN);
    head.copy_from_slice(hdr);
    let mut skip = HDR_LEN as u64;
    for s in segments {
        let Some((addr, len)) = after(s, &mut skip)? else {
            continue;
        };
        let (dst, tail) = rest.split_at_mut(len.min(rest.len()));
        mem.read_slice(dst, addr)
            .map_err(|_| TxDrop::Chain("buffer outside shared memory"))?;
        rest = tail;
    }
    Ok(())
}

/// The part of `s` after the first `skip` bytes of the chain (which the
/// call consumes), or `None` if `s` lies wholly in them.
fn after(s: &Segment, skip: &mut u64) -> Result<Option<(GuestAddress, usize)>, TxDrop> {
    let len = u64::from(s.len);
    if *skip >= len {
        *skip -= len;
        return Ok(None);
    }
    let addr = s
        .addr
        .checked_add(*skip)
        .ok_or(TxDrop::Chain("address overflow"))?;
    let rest = len - *skip;
    *skip = 0;
    Ok(Some((addr, rest as usize)))
}

impl QueueHandler for TxQueue {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        if let Err(e) = walk_chain(chain, self.max_descriptors, &mut self.segments) {
            inc(&self.shared.stats.chain_errors);
            return Err(e);
        }
        let result = self.transmit(mem);
        let stats = &self.shared.stats;
        match result {
            Ok(frame_len) => {
                inc(&stats.tx_packets);
                stats
                    .tx_bytes
                    .fetch_add(frame_len, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(pair = self.pair, error = %e, "transmit packet dropped");
                inc(&stats.tx_dropped);
                inc(match e {
                    TxDrop::Header(_) | TxDrop::Short(_) => &stats.tx_dropped_bad_header,
                    TxDrop::Oversize(_) => &stats.tx_dropped_oversize,
                    TxDrop::Chain(_) => &stats.tx_dropped_bad_chain,
                    TxDrop::TapFull => &stats.tx_dropped_tap_full,
                    TxDrop::Tap(_) => &stats.tx_dropped_tap_error,
                });
            }
        }
        // The device writes nothing into a transmit buffer.
        Ok(0)
    }
}
