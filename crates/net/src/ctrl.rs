//! The control queue: `class`, `command`, command data (device-readable),
//! then the ack byte (the last byte of the chain, device-writable).

use std::sync::Arc;

use ringfence_device::{
    answer_byte, walk_chain, Chain, ChainError, DeviceMemory, QueueHandler, Segment,
};
use virtio_bindings::virtio_net::*;
use vm_memory::{Address, Bytes};

use crate::{inc, valid_unicast, Shared, MAC_TABLE_ENTRIES};

/// Why a command gets VIRTIO_NET_ERR.
#[derive(Debug, thiserror::Error)]
enum CmdError {
    #[error("malformed chain: {0}")]
    Chain(&'static str),
    #[error("unsupported command {class}/{cmd}")]
    Unsupported { class: u8, cmd: u8 },
    #[error("command {class}/{cmd} needs a feature that was not negotiated")]
    NotNegotiated { class: u8, cmd: u8 },
    #[error("command data of {len} bytes, expected {expected}")]
    Length { len: u64, expected: u64 },
    #[error("invalid value: {0}")]
    Value(&'static str),
}

/// The device-readable bytes of a command, read on demand (each byte at
/// most once per command).
struct Data<'a> {
    segments: &'a [Segment],
    len: u64,
}

impl Data<'_> {
    /// Copies `out.len()` bytes from offset `at`.
    fn read(&self, mem: &DeviceMemory, at: u64, out: &mut [u8]) -> Result<(), CmdError> {
        if at
            .checked_add(out.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(CmdError::Chain("read past the command data"));
        }
        let mut skip = at;
        let mut filled = 0usize;
        for s in self.segments {
            if filled == out.len() {
                break;
            }
            let len = u64::from(s.len);
            if skip >= len {
                skip -= len;
                continue;
            }
            let addr = s
                .addr
                .checked_add(skip)
                .ok_or(CmdError::Chain("address overflow"))?;
            let avail = (len - skip) as usize;
            skip = 0;
            let dst = out.get_mut(filled..).unwrap_or_default();
            let take = dst.len().min(avail);
            mem.read_slice(dst.get_mut(..take).unwrap_or_default(), addr)
                .map_err(|_| CmdError::Chain("command data outside shared memory"))?;
            filled += take;
        }
        Ok(())
    }

    fn u8_at(&self, mem: &DeviceMemory, at: u64) -> Result<u8, CmdError> {
        let mut b = [0u8; 1];
        self.read(mem, at, &mut b)?;
        let [v] = b;
        Ok(v)
    }

    fn exact(&self, expected: u64) -> Result<(), CmdError> {
        if self.len == expected {
            Ok(())
        } else {
            Err(CmdError::Length {
                len: self.len,
                expected,
            })
        }
    }
}

/// The control queue handler.
pub(crate) struct CtrlQueue {
    shared: Arc<Shared>,
    acked: u64,
    descriptors: Vec<Segment>,
    /// The device-readable bytes after class and command.
    data: Vec<Segment>,
    max_descriptors: usize,
}

impl CtrlQueue {
    pub(crate) fn new(shared: Arc<Shared>, acked: u64, queue_size: u16) -> Self {
        Self {
            shared,
            acked,
            descriptors: Vec::with_capacity(usize::from(queue_size)),
            data: Vec::with_capacity(usize::from(queue_size)),
            max_descriptors: usize::from(queue_size),
        }
    }

    fn has(&self, feature: u32) -> bool {
        self.acked & (1u64 << feature) != 0
    }

    /// Splits off class and command; the rest of the readable bytes go to `data`.
    fn parse(&mut self, mem: &DeviceMemory) -> Result<(u8, u8, u64), CmdError> {
        self.data.clear();
        let first_writable = self
            .descriptors
            .iter()
            .position(|d| d.writable)
            .unwrap_or(self.descriptors.len());
        let (readable, writable) = self.descriptors.split_at(first_writable);
        if writable.iter().any(|d| !d.writable) {
            return Err(CmdError::Chain(
                "device-readable descriptor after a device-writable one",
            ));
        }
        let mut head = [0u8; 2];
        let mut filled = 0usize;
        let mut data_len = 0u64;
        for d in readable {
            let dst = head.get_mut(filled..).unwrap_or_default();
            let take = dst.len().min(d.len as usize);
            if take > 0 {
                mem.read_slice(dst.get_mut(..take).unwrap_or_default(), d.addr)
                    .map_err(|_| CmdError::Chain("command outside shared memory"))?;
                filled += take;
            }
            let rest = d.len - take as u32;
            if rest > 0 {
                let addr = d
                    .addr
                    .checked_add(take as u64)
                    .ok_or(CmdError::Chain("address overflow"))?;
                self.data.push(Segment {
                    addr,
                    len: rest,
                    writable: false,
                });
                data_len = data_len.saturating_add(u64::from(rest));
            }
        }
        if filled < head.len() {
            return Err(CmdError::Chain("no class and command"));
        }
        let [class, cmd] = head;
        Ok((class, cmd, data_len))
    }

    fn execute(&self, mem: &DeviceMemory, class: u8, cmd: u8, len: u64) -> Result<(), CmdError> {
        let data = Data {
            segments: &self.data,
            len,
        };
        let unsupported = CmdError::Unsupported { class, cmd };
        let not_negotiated = CmdError::NotNegotiated { class, cmd };
        match (u32::from(class), u32::from(cmd)) {
            (
                VIRTIO_NET_CTRL_RX,
                c @ (VIRTIO_NET_CTRL_RX_PROMISC | VIRTIO_NET_CTRL_RX_ALLMULTI),
            ) => {
                if !self.has(VIRTIO_NET_F_CTRL_RX) {
                    return Err(not_negotiated);
                }
                data.exact(1)?;
                let on = match data.u8_at(mem, 0)? {
                    0 => false,
                    1 => true,
                    _ => return Err(CmdError::Value("on/off byte not 0 or 1")),
                };
                let mut state = self.shared.lock();
                if c == VIRTIO_NET_CTRL_RX_PROMISC {
                    state.filter.promisc = on;
                } else {
                    state.filter.allmulti = on;
                }
                Ok(())
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => {
                if !self.has(VIRTIO_NET_F_CTRL_RX) {
                    return Err(not_negotiated);
                }
                self.mac_table_set(mem, &data)
            }
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => {
                if !self.has(VIRTIO_NET_F_CTRL_MAC_ADDR) {
                    return Err(not_negotiated);
                }
                data.exact(6)?;
                let mut mac = [0u8; 6];
                data.read(mem, 0, &mut mac)?;
                if !valid_unicast(&mac) {
                    return Err(CmdError::Value("MAC address not unicast"));
                }
                self.shared.lock().mac = mac;
                Ok(())
            }
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) => {
                if !self.has(VIRTIO_NET_F_MQ) {
                    return Err(not_negotiated);
                }
                data.exact(2)?;
                let mut b = [0u8; 2];
                data.read(mem, 0, &mut b)?;
                let n = u16::from_le_bytes(b);
                let max = self.shared.taps.len();
                if n == 0 || usize::from(n) > max {
                    return Err(CmdError::Value("virtqueue_pairs out of range"));
                }
                let mut state = self.shared.lock();
                self.shared
                    .set_active_pairs(&mut state, n, false)
                    .map_err(|_| CmdError::Value("TAP queues could not follow"))
            }
            _ => Err(unsupported),
        }
    }

    /// Two tables, unicast then multicast, each a le32 count and that many
    /// addresses; the data must be exactly that long.
    fn mac_table_set(&self, mem: &DeviceMemory, data: &Data<'_>) -> Result<(), CmdError> {
        let table_at = |at: u64| -> Result<(u64, u64), CmdError> {
            let mut b = [0u8; 4];
            data.read(mem, at, &mut b)?;
            let n = u64::from(u32::from_le_bytes(b));
            // n < 2^32: no overflow in u64.
            let end = at + 4 + n * 6;
            if end > data.len {
                return Err(CmdError::Length {
                    len: data.len,
                    expected: end,
                });
            }
            Ok((n, end))
        };
        let (uni_n, uni_end) = table_at(0)?;
        let (multi_n, multi_end) = table_at(uni_end)?;
        data.exact(multi_end)?;
        let read_table = |at: u64, n: u64| -> Result<(Vec<[u8; 6]>, bool), CmdError> {
            let keep = n.min(MAC_TABLE_ENTRIES as u64);
            let mut table = Vec::with_capacity(keep as usize);
            for i in 0..keep {
                let mut mac = [0u8; 6];
                data.read(mem, at + 4 + i * 6, &mut mac)?;
                table.push(mac);
            }
            Ok((table, n > keep))
        };
        let (unicast, unicast_overflow) = read_table(0, uni_n)?;
        let (multicast, multicast_overflow) = read_table(uni_end, multi_n)?;
        let mut state = self.shared.lock();
        state.filter.unicast = unicast;
        state.filter.unicast_overflow = unicast_overflow;
        state.filter.multicast = multicast;
        state.filter.multicast_overflow = multicast_overflow;
        Ok(())
    }
}

impl QueueHandler for CtrlQueue {
    fn handle_chain(&mut self, chain: Chain<'_>, mem: &DeviceMemory) -> Result<u32, ChainError> {
        let head = chain.head_index();
        let walked = walk_chain(chain, self.max_descriptors, &mut self.descriptors)
            .and_then(|()| answer_byte(&self.descriptors, head, mem));
        let ack_addr = match walked {
            Ok(a) => a,
            Err(e) => {
                inc(&self.shared.stats.chain_errors);
                return Err(e);
            }
        };
        let result = self
            .parse(mem)
            .and_then(|(class, cmd, len)| self.execute(mem, class, cmd, len));
        let stats = &self.shared.stats;
        inc(&stats.ctrl_commands);
        let ack = match result {
            Ok(()) => VIRTIO_NET_OK,
            Err(e) => {
                tracing::debug!(error = %e, "control command refused");
                inc(&stats.ctrl_errors);
                VIRTIO_NET_ERR
            }
        };
        if mem.write_obj(ack as u8, ack_addr).is_err() {
            inc(&stats.chain_errors);
            return Err(ChainError::Unanswerable {
                head,
                reason: "ack byte not writable",
            });
        }
        Ok(1)
    }
}
