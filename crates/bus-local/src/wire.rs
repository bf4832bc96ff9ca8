//! The local bus's own messages (bus-specific ids, 0x80 and up), modelled on
//! the FF-A binding's VERSION / AREA_SHARE / AREA_UNSHARE.
//!
//! | id | name | payload (little-endian) | descriptor |
//! |---|---|---|---|
//! | 0x80 | VERSION | le32 revision, le32 max_msg_size, le32 features (bit 0: doorbells, bit 1: copies by a broker) | — |
//! | 0x81 | AREA_SHARE | le16 area_id, le16 flags (bit 0: copied), le32 grant ref, le64 size, le64 offset | sealed memfd, or none when copied |
//! | 0x82 | AREA_UNSHARE | le16 area_id, le16 reserved | — |
//! | 0xC1 | DOORBELL_ATTACH (event) | le16 dev_num, le16 queue, le32 direction (0 to device, 1 to driver) | eventfd |
//!
//! Responses to AREA_SHARE / AREA_UNSHARE: le16 area_id, le16 reserved, le32 status (0 ok).

use ringfence_bus::{AreaId, DoorbellDirection};
use ringfence_virtio_msg::{decode, Body};

/// VERSION
pub const VERSION: u8 = 0x80;
/// AREA_SHARE
pub const AREA_SHARE: u8 = 0x81;
/// AREA_UNSHARE
pub const AREA_UNSHARE: u8 = 0x82;
/// DOORBELL_ATTACH (event)
pub const DOORBELL_ATTACH: u8 = 0xC1;
/// VERSION feature bit: eventfd doorbells.
pub const FEATURE_DOORBELLS: u32 = 1;
/// VERSION feature bit: a broker copies between granted pages and the
/// device side's staging memory (the device side never maps them).
pub const FEATURE_COPY: u32 = 2;
/// AREA_SHARE flag: a grant for copy, reached only through the broker.
pub const AREA_FLAG_COPIED: u16 = 1;
/// Area operation succeeded.
pub const STATUS_OK: u32 = 0;
/// Area operation refused.
pub const STATUS_REJECTED: u32 = 1;
/// Largest local payload.
pub const MAX_PAYLOAD: usize = 24;

/// A decoded local-bus message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalMsg {
    /// Handshake request.
    Version {
        /// Transport revision.
        revision: u32,
        /// Largest message the sender accepts.
        max_msg_size: u32,
        /// Feature bits.
        features: u32,
    },
    /// Handshake response.
    VersionResult {
        /// Transport revision.
        revision: u32,
        /// Negotiated maximum message size.
        max_msg_size: u32,
        /// Negotiated feature bits.
        features: u32,
    },
    /// Share an area (memfd attached): `size` bytes of the memfd from
    /// `offset` (0 for a whole window; a page range for a grant). Or, with
    /// `copied`, announce a grant for copy that the broker holds under that
    /// grant reference (no memfd; `offset` 0).
    AreaShare {
        /// Its id.
        id: AreaId,
        /// Its size in bytes.
        size: u64,
        /// Where it starts in the memfd.
        offset: u64,
        /// The broker's grant reference of a grant for copy.
        copied: Option<u32>,
    },
    /// Revoke an area.
    AreaUnshare {
        /// Its id.
        id: AreaId,
    },
    /// Answer to AREA_SHARE.
    AreaShareResult {
        /// The area.
        id: AreaId,
        /// STATUS_OK or STATUS_REJECTED.
        status: u32,
    },
    /// Answer to AREA_UNSHARE, sent once the device side no longer uses the area.
    AreaUnshareResult {
        /// The area.
        id: AreaId,
        /// STATUS_OK or STATUS_REJECTED.
        status: u32,
    },
    /// Attach a doorbell (eventfd attached).
    DoorbellAttach {
        /// Device number.
        dev_num: u16,
        /// Queue index.
        queue: u16,
        /// Direction.
        direction: DoorbellDirection,
    },
    /// Placeholder for "no response" (events).
    None,
}

/// A malformed local-bus message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub String);

pub(crate) fn le16(p: &[u8], at: usize) -> u16 {
    p.get(at..at + 2)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u16::from_le_bytes)
}
pub(crate) fn le32(p: &[u8], at: usize) -> u32 {
    p.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}
pub(crate) fn le64(p: &[u8], at: usize) -> u64 {
    p.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

impl LocalMsg {
    /// Encodes the payload; returns (msg_id, response bit, payload length).
    pub fn encode(&self, out: &mut [u8; MAX_PAYLOAD]) -> (u8, bool, usize) {
        let mut put = |at: usize, b: &[u8]| {
            if let Some(d) = out.get_mut(at..at + b.len()) {
                d.copy_from_slice(b);
            }
        };
        match *self {
            LocalMsg::Version {
                revision,
                max_msg_size,
                features,
            }
            | LocalMsg::VersionResult {
                revision,
                max_msg_size,
                features,
            } => {
                put(0, &revision.to_le_bytes());
                put(4, &max_msg_size.to_le_bytes());
                put(8, &features.to_le_bytes());
                (VERSION, matches!(self, LocalMsg::VersionResult { .. }), 12)
            }
            LocalMsg::AreaShare {
                id,
                size,
                offset,
                copied,
            } => {
                put(0, &id.to_le_bytes());
                if let Some(gref) = copied {
                    put(2, &AREA_FLAG_COPIED.to_le_bytes());
                    put(4, &gref.to_le_bytes());
                }
                put(8, &size.to_le_bytes());
                put(16, &offset.to_le_bytes());
                (AREA_SHARE, false, 24)
            }
            LocalMsg::AreaUnshare { id } => {
                put(0, &id.to_le_bytes());
                (AREA_UNSHARE, false, 4)
            }
            LocalMsg::AreaShareResult { id, status }
            | LocalMsg::AreaUnshareResult { id, status } => {
                put(0, &id.to_le_bytes());
                put(4, &status.to_le_bytes());
                let msg_id = if matches!(self, LocalMsg::AreaShareResult { .. }) {
                    AREA_SHARE
                } else {
                    AREA_UNSHARE
                };
                (msg_id, true, 8)
            }
            LocalMsg::DoorbellAttach {
                dev_num,
                queue,
                direction,
            } => {
                put(0, &dev_num.to_le_bytes());
                put(2, &queue.to_le_bytes());
                let d: u32 = match direction {
                    DoorbellDirection::ToDevice => 0,
                    DoorbellDirection::ToDriver => 1,
                };
                put(4, &d.to_le_bytes());
                (DOORBELL_ATTACH, false, 8)
            }
            LocalMsg::None => (0, false, 0),
        }
    }

    /// Encodes the whole message (virtio-msg header and payload) into `buf`;
    /// returns its length.
    pub fn encode_message(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let mut payload = [0u8; MAX_PAYLOAD];
        let (msg_id, response, n) = self.encode(&mut payload);
        ringfence_virtio_msg::Message {
            dev_num: 0,
            token: 0,
            body: Body::BusSpecific {
                msg_id,
                response,
                payload: payload.get(..n).unwrap_or(&[]),
            },
        }
        .encode(buf)
        .map_err(|e| WireError(e.to_string()))
    }

    /// True for the responses a driver-side control request waits for.
    pub fn is_control_response(&self) -> bool {
        matches!(
            self,
            LocalMsg::VersionResult { .. }
                | LocalMsg::AreaShareResult { .. }
                | LocalMsg::AreaUnshareResult { .. }
        )
    }

    /// True for messages that get no response.
    pub fn is_event(&self) -> bool {
        matches!(self, LocalMsg::DoorbellAttach { .. })
    }

    /// True if `self` is the response to `request`.
    pub fn answers(&self, request: &LocalMsg) -> bool {
        match (self, request) {
            (LocalMsg::VersionResult { .. }, LocalMsg::Version { .. }) => true,
            (LocalMsg::AreaShareResult { id, .. }, LocalMsg::AreaShare { id: rid, .. })
            | (LocalMsg::AreaUnshareResult { id, .. }, LocalMsg::AreaUnshare { id: rid }) => {
                id == rid
            }
            _ => false,
        }
    }
}

/// Decodes `bytes` if it is a local-bus message; `Ok(None)` for any other
/// well-formed-looking message (left to the transport's own decoder).
pub fn classify(bytes: &[u8]) -> Result<Option<LocalMsg>, WireError> {
    // Only bus messages with a bus-specific id are ours; peek at the type and id.
    let (Some(&ty), Some(&id)) = (bytes.first(), bytes.get(1)) else {
        return Ok(None);
    };
    if ty & ringfence_virtio_msg::consts::TYPE_BUS == 0
        || id < ringfence_virtio_msg::consts::bus::SPECIFIC_FIRST
    {
        return Ok(None);
    }
    let msg = decode(bytes).map_err(|e| WireError(e.to_string()))?;
    let Body::BusSpecific {
        msg_id,
        response,
        payload: p,
    } = msg.body
    else {
        return Ok(None);
    };
    let need = |n: usize| {
        if p.len() == n {
            Ok(())
        } else {
            Err(WireError(format!(
                "bus message {msg_id:#04x}: payload {} bytes, expected {n}",
                p.len()
            )))
        }
    };
    Ok(Some(match (msg_id, response) {
        (VERSION, r) => {
            need(12)?;
            let (revision, max_msg_size, features) = (le32(p, 0), le32(p, 4), le32(p, 8));
            if r {
                LocalMsg::VersionResult {
                    revision,
                    max_msg_size,
                    features,
                }
            } else {
                LocalMsg::Version {
                    revision,
                    max_msg_size,
                    features,
                }
            }
        }
        (AREA_SHARE, false) => {
            need(24)?;
            let flags = le16(p, 2);
            if flags & !AREA_FLAG_COPIED != 0 {
                return Err(WireError(format!("AREA_SHARE flags {flags:#x}")));
            }
            LocalMsg::AreaShare {
                id: le16(p, 0),
                size: le64(p, 8),
                offset: le64(p, 16),
                copied: (flags & AREA_FLAG_COPIED != 0).then(|| le32(p, 4)),
            }
        }
        (AREA_UNSHARE, false) => {
            need(4)?;
            LocalMsg::AreaUnshare { id: le16(p, 0) }
        }
        (AREA_SHARE, true) => {
            need(8)?;
            LocalMsg::AreaShareResult {
                id: le16(p, 0),
                status: le32(p, 4),
            }
        }
        (AREA_UNSHARE, true) => {
            need(8)?;
            LocalMsg::AreaUnshareResult {
                id: le16(p, 0),
                status: le32(p, 4),
            }
        }
        (DOORBELL_ATTACH, false) => {
            need(8)?;
            let direction = match le32(p, 4) {
                0 => DoorbellDirection::ToDevice,
                1 => DoorbellDirection::ToDriver,
                d => return Err(WireError(format!("DOORBELL_ATTACH direction {d}"))),
            };
            LocalMsg::DoorbellAttach {
                dev_num: le16(p, 0),
                queue: le16(p, 2),
                direction,
            }
        }
        (id, _) => return Err(WireError(format!("unknown local bus message {id:#04x}"))),
    }))
}
