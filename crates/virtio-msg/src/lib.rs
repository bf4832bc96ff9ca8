//! The virtio-msg wire format ("Virtio Over Messages", draft OASIS transport).
//!
//! Every message is an 8-byte little-endian header followed by a payload. This
//! crate encodes [`Message`]s into caller-provided buffers and decodes received
//! bytes through [`decode`], which rejects sizes that do not match the header
//! or are too short for the message kind, fields out of range and unknown ids,
//! and says which. As the spec asks, it ignores reserved type bits and bytes
//! past a fixed-size payload (a bus may pad messages to its slot size), and
//! accepts the device states reserved for implementations.
//! It is `no_std` and allocation free, so a driver in firmware can use it.
#![cfg_attr(not(feature = "std"), no_std)]
#![deny(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]

pub mod consts;
mod cursor;

use consts::{bus as bus_id, payload, transport as tid, *};
use cursor::{Reader, Writer};

/// Why bytes could not be decoded as a virtio-msg message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer bytes than a header.
    #[error("message of {len} bytes is shorter than the 8-byte header")]
    ShorterThanHeader {
        /// Bytes received.
        len: usize,
    },
    /// msg_size disagrees with the bytes received.
    #[error("header msg_size {msg_size} but {received} bytes were received")]
    SizeMismatch {
        /// msg_size field.
        msg_size: u16,
        /// Bytes received.
        received: usize,
    },
    /// The id is reserved or not defined for this kind of message.
    #[error("unknown {class} message id {msg_id:#04x}")]
    UnknownId {
        /// "transport" or "bus".
        class: &'static str,
        /// The id.
        msg_id: u8,
    },
    /// An event id carried the response bit.
    #[error("event {msg_id:#04x} marked as a response")]
    ResponseToEvent {
        /// The id.
        msg_id: u8,
    },
    /// Payload has the wrong length for this message.
    #[error("message {msg_id:#04x}: payload of {got} bytes, expected {expected}")]
    PayloadLength {
        /// The id.
        msg_id: u8,
        /// Expected payload bytes (computed from the fixed fields and any length field).
        expected: usize,
        /// Payload bytes present.
        got: usize,
    },
    /// A bus message must carry device number 0.
    #[error("bus message {msg_id:#04x} with device number {dev_num}")]
    BusDeviceNumber {
        /// The id.
        msg_id: u8,
        /// The non-zero device number.
        dev_num: u16,
    },
    /// A field holds a value the protocol forbids.
    #[error("message {msg_id:#04x}: invalid {field} {value}")]
    InvalidField {
        /// The id.
        msg_id: u8,
        /// The field name.
        field: &'static str,
        /// The offending value.
        value: u32,
    },
}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The output buffer (the bus's maximum message size) is too small.
    #[error("message needs {needed} bytes, buffer has {available}")]
    TooLarge {
        /// Bytes needed.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// A variable-length field is not a multiple of its unit.
    #[error("{field} is {len} bytes, not a multiple of {unit}")]
    Unaligned {
        /// The field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The unit.
        unit: usize,
    },
}

/// A sequence of little-endian 32-bit words carried in a message (feature blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Words<'a>(&'a [u8]);

impl<'a> Words<'a> {
    /// No words.
    pub const EMPTY: Words<'static> = Words(&[]);

    /// Wraps raw bytes; their length must be a multiple of 4.
    pub fn from_bytes(bytes: &'a [u8]) -> Option<Self> {
        bytes.len().is_multiple_of(4).then_some(Self(bytes))
    }
    /// The raw bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
    /// Number of words.
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }
    /// True when there are no words.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// The words, in order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + 'a {
        self.0
            .chunks_exact(4)
            .filter_map(|c| c.try_into().ok().map(u32::from_le_bytes))
    }
}

/// Fills `out` with the 32-bit little-endian blocks of `features` starting at
/// block `block_index`, and returns the bytes written.
pub fn feature_blocks(features: u64, block_index: u32, out: &mut [u8]) -> &[u8] {
    let mut written = 0usize;
    for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
        let block = u64::from(block_index).saturating_add(i as u64);
        let word = match block {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        chunk.copy_from_slice(&word.to_le_bytes());
        written = written.saturating_add(4);
    }
    out.get(..written).unwrap_or(&[])
}

/// GET_DEVICE_INFO response fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    /// virtio device id (2 = block...).
    pub device_id: u32,
    /// Vendor id.
    pub vendor_id: u32,
    /// Number of feature bits, a multiple of 32.
    pub num_feature_bits: u32,
    /// Size of the device config space in bytes.
    pub config_size: u32,
    /// Number of virtqueues.
    pub max_virtqueues: u32,
    /// First admin virtqueue.
    pub admin_vq_start: u16,
    /// Number of admin virtqueues.
    pub admin_vq_count: u16,
}

/// SET_VQUEUE request / GET_VQUEUE response fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Vqueue {
    /// Queue index.
    pub index: u32,
    /// Maximum size (GET_VQUEUE response only; 0 in SET_VQUEUE where the field is reserved).
    pub max_size: u32,
    /// Current size (0 = not set up).
    pub size: u32,
    /// Descriptor table address.
    pub desc_addr: u64,
    /// Driver (available) area address.
    pub driver_addr: u64,
    /// Device (used) area address.
    pub device_addr: u64,
}

/// Device state carried by EVENT_DEVICE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// The device can be used.
    Ready,
    /// The device is gone.
    Removed,
    /// A state the spec leaves to implementations (0x8000..=0xFFFF).
    Implementation(u16),
}

/// The body of a message: which message it is and its fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body<'a> {
    /// GET_DEVICE_INFO request.
    GetDeviceInfo,
    /// GET_DEVICE_INFO response.
    DeviceInfo(DeviceInfo),
    /// GET_DEVICE_FEATURES request.
    GetDeviceFeatures {
        /// First 32-bit block.
        block_index: u32,
        /// Number of blocks.
        num_blocks: u32,
    },
    /// GET_DEVICE_FEATURES response.
    DeviceFeatures {
        /// First 32-bit block.
        block_index: u32,
        /// The blocks.
        features: Words<'a>,
    },
    /// SET_DRIVER_FEATURES request.
    SetDriverFeatures {
        /// First 32-bit block.
        block_index: u32,
        /// The blocks.
        features: Words<'a>,
    },
    /// SET_DRIVER_FEATURES (empty) response.
    SetDriverFeaturesDone,
    /// GET_CONFIG request.
    GetConfig {
        /// Byte offset in config space.
        offset: u32,
        /// Bytes to read.
        length: u32,
    },
    /// GET_CONFIG response.
    Config {
        /// Config generation at the time of the read.
        generation: u32,
        /// Byte offset.
        offset: u32,
        /// The bytes (their count is the length field).
        data: &'a [u8],
    },
    /// SET_CONFIG request.
    SetConfig {
        /// Generation the driver last saw.
        generation: u32,
        /// Byte offset.
        offset: u32,
        /// Bytes to write.
        data: &'a [u8],
    },
    /// SET_CONFIG response.
    SetConfigResult {
        /// Current generation.
        generation: u32,
        /// Byte offset.
        offset: u32,
        /// Bytes written; 0 means rejected.
        length: u32,
        /// Optional copy of the config bytes (empty or `length` bytes).
        data: &'a [u8],
    },
    /// GET_DEVICE_STATUS request.
    GetDeviceStatus,
    /// GET_DEVICE_STATUS response.
    DeviceStatus {
        /// Device status.
        status: u32,
    },
    /// SET_DEVICE_STATUS request (0 = reset).
    SetDeviceStatus {
        /// Requested status.
        status: u32,
    },
    /// SET_DEVICE_STATUS response.
    SetDeviceStatusResult {
        /// Resulting status.
        status: u32,
    },
    /// GET_VQUEUE request.
    GetVqueue {
        /// Queue index.
        index: u32,
    },
    /// GET_VQUEUE response.
    VqueueInfo(Vqueue),
    /// SET_VQUEUE request.
    SetVqueue(Vqueue),
    /// SET_VQUEUE (empty) response.
    SetVqueueDone,
    /// RESET_VQUEUE request.
    ResetVqueue {
        /// Queue index.
        index: u32,
    },
    /// RESET_VQUEUE (empty) response.
    ResetVqueueDone,
    /// GET_SHM request.
    GetShm {
        /// Region index.
        index: u32,
    },
    /// GET_SHM response.
    Shm {
        /// Region index.
        index: u32,
        /// Length; 0 = no such region.
        length: u32,
        /// Address (le32 in the current drafts).
        address: u32,
    },
    /// EVENT_CONFIG (device to driver).
    EventConfig {
        /// Device status (DEVICE_NEEDS_RESET asks for a reset).
        device_status: u32,
        /// Config generation.
        generation: u32,
        /// Byte offset of the included data.
        offset: u32,
        /// New config bytes, possibly none.
        data: &'a [u8],
    },
    /// EVENT_AVAIL (driver to device).
    EventAvail {
        /// Queue index.
        vq_index: u32,
        /// next_offset (bits 30..0 offset, bit 31 wrap).
        next_offset: u32,
    },
    /// EVENT_USED (device to driver).
    EventUsed {
        /// Queue index.
        vq_index: u32,
    },
    /// Bus GET_DEVICES request.
    GetDevices {
        /// First device number (multiple of 8).
        offset: u16,
        /// Number of device numbers (multiple of 8).
        count: u16,
    },
    /// Bus GET_DEVICES response.
    Devices {
        /// First device number.
        offset: u16,
        /// Number of device numbers covered by `bitmap`.
        count: u16,
        /// Where to continue; 0 = end.
        next_offset: u16,
        /// One bit per device number, LSB first.
        bitmap: &'a [u8],
    },
    /// Bus PING request.
    Ping {
        /// Data to echo.
        data: u32,
    },
    /// Bus PING response.
    Pong {
        /// Echoed data.
        data: u32,
    },
    /// Bus EVENT_DEVICE.
    EventDevice {
        /// Device number.
        device_number: u16,
        /// New state.
        state: DeviceState,
    },
    /// A bus-specific message (id 0x80 and above), payload left to the bus.
    BusSpecific {
        /// The id.
        msg_id: u8,
        /// Response bit.
        response: bool,
        /// Payload.
        payload: &'a [u8],
    },
}

/// A whole message: routing fields plus body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// Device number (0 for bus messages).
    pub dev_num: u16,
    /// Bus-owned correlation token.
    pub token: u16,
    /// What the message says.
    pub body: Body<'a>,
}

/// The decoded 8-byte header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Response bit.
    pub response: bool,
    /// Bus bit.
    pub bus: bool,
    /// Message id.
    pub msg_id: u8,
    /// Device number.
    pub dev_num: u16,
    /// Token.
    pub token: u16,
    /// Header plus payload size.
    pub msg_size: u16,
}

impl Header {
    /// Decodes and checks a header; `received` is the number of bytes that arrived
    /// (bytes past `msg_size` are bus padding and ignored).
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        let (Some(type_byte), Some(msg_id), Some(dev_num), Some(token), Some(msg_size)) =
            (r.u8(), r.u8(), r.u16(), r.u16(), r.u16())
        else {
            return Err(DecodeError::ShorterThanHeader { len: bytes.len() });
        };
        // Reserved type bits are ignored on receive, as the spec says (a
        // later revision may define them); they are never sent.
        if usize::from(msg_size) < HEADER_SIZE || usize::from(msg_size) > bytes.len() {
            return Err(DecodeError::SizeMismatch {
                msg_size,
                received: bytes.len(),
            });
        }
        Ok(Header {
            response: type_byte & TYPE_RESPONSE != 0,
            bus: type_byte & TYPE_BUS != 0,
            msg_id,
            dev_num,
            token,
            msg_size,
        })
    }

    /// True for ids in an event range (no response expected).
    pub fn is_event(&self) -> bool {
        is_event_id(self.msg_id)
    }
}

/// True for ids in the standard or implementation-defined event ranges.
pub fn is_event_id(msg_id: u8) -> bool {
    (EVENT_RANGE_START..IMPL_REQUEST_START).contains(&msg_id) || msg_id >= IMPL_EVENT_START
}

/// A fixed-size payload: at least `expected` bytes. Bytes past it are
/// ignored, as the spec allows (a bus may pad messages to its slot size).
fn expect_len(msg_id: u8, got: usize, expected: usize) -> Result<(), DecodeError> {
    if got >= expected {
        Ok(())
    } else {
        Err(DecodeError::PayloadLength {
            msg_id,
            expected,
            got,
        })
    }
}

/// Reads the `length` bytes a length field announced; bytes after them are
/// padding and ignored. Fewer than `length` is an error.
fn tail_with_length<'a>(
    msg_id: u8,
    fixed: usize,
    length: u32,
    r: &mut Reader<'a>,
) -> Result<&'a [u8], DecodeError> {
    let got = r.remaining();
    let expected = fixed.saturating_add(length as usize);
    r.take(length as usize).ok_or(DecodeError::PayloadLength {
        msg_id,
        expected,
        got: fixed.saturating_add(got),
    })
}

/// Decodes one message received from a bus.
pub fn decode(bytes: &[u8]) -> Result<Message<'_>, DecodeError> {
    let h = Header::decode(bytes)?;
    let payload_bytes =
        bytes
            .get(HEADER_SIZE..usize::from(h.msg_size))
            .ok_or(DecodeError::SizeMismatch {
                msg_size: h.msg_size,
                received: bytes.len(),
            })?;
    let body = if h.bus {
        if h.dev_num != 0 {
            return Err(DecodeError::BusDeviceNumber {
                msg_id: h.msg_id,
                dev_num: h.dev_num,
            });
        }
        decode_bus(&h, payload_bytes)?
    } else {
        decode_transport(&h, payload_bytes)?
    };
    Ok(Message {
        dev_num: h.dev_num,
        token: h.token,
        body,
    })
}

fn decode_transport<'a>(h: &Header, p: &'a [u8]) -> Result<Body<'a>, DecodeError> {
    let id = h.msg_id;
    let n = p.len();
    let mut r = Reader::new(p);
    let unknown = DecodeError::UnknownId {
        class: "transport",
        msg_id: id,
    };
    if h.is_event() && h.response {
        return Err(DecodeError::ResponseToEvent { msg_id: id });
    }
    // Fixed-size payloads are checked before any field is read.
    macro_rules! fixed {
        ($len:expr) => {
            expect_len(id, n, $len)?
        };
    }
    let body = match (id, h.response) {
        (tid::GET_DEVICE_INFO, false) => {
            fixed!(0);
            Body::GetDeviceInfo
        }
        (tid::GET_DEVICE_INFO, true) => {
            fixed!(payload::DEVICE_INFO);
            let info = DeviceInfo {
                device_id: r.le32(),
                vendor_id: r.le32(),
                num_feature_bits: r.le32(),
                config_size: r.le32(),
                max_virtqueues: r.le32(),
                admin_vq_start: r.le16(),
                admin_vq_count: r.le16(),
            };
            if !info.num_feature_bits.is_multiple_of(32) {
                return Err(DecodeError::InvalidField {
                    msg_id: id,
                    field: "num_feature_bits",
                    value: info.num_feature_bits,
                });
            }
            Body::DeviceInfo(info)
        }
        (tid::GET_DEVICE_FEATURES, false) => {
            fixed!(payload::GET_DEVICE_FEATURES);
            Body::GetDeviceFeatures {
                block_index: r.le32(),
                num_blocks: r.le32(),
            }
        }
        (tid::GET_DEVICE_FEATURES, true) | (tid::SET_DRIVER_FEATURES, false) => {
            let (block_index, num_blocks) = (r.le32(), r.le32());
            if n < 8 {
                return Err(DecodeError::PayloadLength {
                    msg_id: id,
                    expected: 8,
                    got: n,
                });
            }
            let bytes = tail_with_length(id, 8, num_blocks.saturating_mul(4), &mut r)?;
            let features = Words(bytes);
            if h.response {
                Body::DeviceFeatures {
                    block_index,
                    features,
                }
            } else {
                Body::SetDriverFeatures {
                    block_index,
                    features,
                }
            }
        }
        (tid::SET_DRIVER_FEATURES, true) => {
            fixed!(0);
            Body::SetDriverFeaturesDone
        }
        (tid::GET_CONFIG, false) => {
            fixed!(payload::GET_CONFIG);
            Body::GetConfig {
                offset: r.le32(),
                length: r.le32(),
            }
        }
        (tid::GET_CONFIG, true) | (tid::SET_CONFIG, false) => {
            if n < 12 {
                return Err(DecodeError::PayloadLength {
                    msg_id: id,
                    expected: 12,
                    got: n,
                });
            }
            let (generation, offset, length) = (r.le32(), r.le32(), r.le32());
            let data = tail_with_length(id, 12, length, &mut r)?;
            if h.response {
                Body::Config {
                    generation,
                    offset,
                    data,
                }
            } else {
                Body::SetConfig {
                    generation,
                    offset,
                    data,
                }
            }
        }
        (tid::SET_CONFIG, true) => {
            if n < 12 {
                return Err(DecodeError::PayloadLength {
                    msg_id: id,
                    expected: 12,
                    got: n,
                });
            }
            let (generation, offset, length) = (r.le32(), r.le32(), r.le32());
            // The data copy is optional: absent, or `length` bytes (and
            // then perhaps padding). Fewer bytes than that are padding only.
            let data = if r.remaining() < length as usize {
                &[][..]
            } else {
                tail_with_length(id, 12, length, &mut r)?
            };
            Body::SetConfigResult {
                generation,
                offset,
                length,
                data,
            }
        }
        (tid::GET_DEVICE_STATUS, false) => {
            fixed!(0);
            Body::GetDeviceStatus
        }
        (tid::GET_DEVICE_STATUS, true) => {
            fixed!(payload::STATUS);
            Body::DeviceStatus { status: r.le32() }
        }
        (tid::SET_DEVICE_STATUS, false) => {
            fixed!(payload::STATUS);
            Body::SetDeviceStatus { status: r.le32() }
        }
        (tid::SET_DEVICE_STATUS, true) => {
            fixed!(payload::STATUS);
            Body::SetDeviceStatusResult { status: r.le32() }
        }
        (tid::GET_VQUEUE, false) => {
            fixed!(payload::INDEX);
            Body::GetVqueue { index: r.le32() }
        }
        (tid::GET_VQUEUE, true) => {
            fixed!(payload::VQUEUE);
            let index = r.le32();
            let max_size = r.le32();
            let size = r.le32();
            let _reserved = r.le32();
            Body::VqueueInfo(Vqueue {
                index,
                max_size,
                size,
                desc_addr: r.le64(),
                driver_addr: r.le64(),
                device_addr: r.le64(),
            })
        }
        (tid::SET_VQUEUE, false) => {
            fixed!(payload::VQUEUE);
            let index = r.le32();
            let _reserved = r.le32();
            let size = r.le32();
            let _reserved = r.le32();
            Body::SetVqueue(Vqueue {
                index,
                max_size: 0,
                size,
                desc_addr: r.le64(),
                driver_addr: r.le64(),
                device_addr: r.le64(),
            })
        }
        (tid::SET_VQUEUE, true) => {
            fixed!(0);
            Body::SetVqueueDone
        }
        (tid::RESET_VQUEUE, false) => {
            fixed!(payload::INDEX);
            Body::ResetVqueue { index: r.le32() }
        }
        (tid::RESET_VQUEUE, true) => {
            fixed!(0);
            Body::ResetVqueueDone
        }
        (tid::GET_SHM, false) => {
            fixed!(payload::INDEX);
            Body::GetShm { index: r.le32() }
        }
        (tid::GET_SHM, true) => {
            fixed!(payload::SHM);
            Body::Shm {
                index: r.le32(),
                length: r.le32(),
                address: r.le32(),
            }
        }
        (tid::EVENT_CONFIG, false) => {
            if n < 16 {
                return Err(DecodeError::PayloadLength {
                    msg_id: id,
                    expected: 16,
                    got: n,
                });
            }
            let (device_status, generation, offset, length) =
                (r.le32(), r.le32(), r.le32(), r.le32());
            let data = tail_with_length(id, 16, length, &mut r)?;
            Body::EventConfig {
                device_status,
                generation,
                offset,
                data,
            }
        }
        (tid::EVENT_AVAIL, false) => {
            fixed!(payload::EVENT_AVAIL);
            Body::EventAvail {
                vq_index: r.le32(),
                next_offset: r.le32(),
            }
        }
        (tid::EVENT_USED, false) => {
            fixed!(payload::EVENT_USED);
            Body::EventUsed { vq_index: r.le32() }
        }
        _ => return Err(unknown),
    };
    Ok(body)
}

fn decode_bus<'a>(h: &Header, p: &'a [u8]) -> Result<Body<'a>, DecodeError> {
    let id = h.msg_id;
    let n = p.len();
    let mut r = Reader::new(p);
    if h.is_event() && h.response {
        return Err(DecodeError::ResponseToEvent { msg_id: id });
    }
    let multiple_of_8 = |field: &'static str, v: u16| {
        if v.is_multiple_of(8) {
            Ok(v)
        } else {
            Err(DecodeError::InvalidField {
                msg_id: id,
                field,
                value: u32::from(v),
            })
        }
    };
    let body = match (id, h.response) {
        (bus_id::GET_DEVICES, false) => {
            expect_len(id, n, payload::GET_DEVICES)?;
            Body::GetDevices {
                offset: multiple_of_8("offset", r.le16())?,
                count: multiple_of_8("count", r.le16())?,
            }
        }
        (bus_id::GET_DEVICES, true) => {
            if n < 6 {
                return Err(DecodeError::PayloadLength {
                    msg_id: id,
                    expected: 6,
                    got: n,
                });
            }
            let offset = multiple_of_8("offset", r.le16())?;
            let count = multiple_of_8("count", r.le16())?;
            let next_offset = r.le16();
            let bitmap = tail_with_length(id, 6, u32::from(count / 8), &mut r)?;
            Body::Devices {
                offset,
                count,
                next_offset,
                bitmap,
            }
        }
        (bus_id::PING, response) => {
            expect_len(id, n, payload::PING)?;
            let data = r.le32();
            if response {
                Body::Pong { data }
            } else {
                Body::Ping { data }
            }
        }
        (bus_id::EVENT_DEVICE, false) => {
            expect_len(id, n, payload::EVENT_DEVICE)?;
            let device_number = r.le16();
            let state = match r.le16() {
                1 => DeviceState::Ready,
                2 => DeviceState::Removed,
                s @ 0x8000..=0xFFFF => DeviceState::Implementation(s),
                other => {
                    return Err(DecodeError::InvalidField {
                        msg_id: id,
                        field: "state",
                        value: u32::from(other),
                    })
                }
            };
            Body::EventDevice {
                device_number,
                state,
            }
        }
        (id, response) if id >= bus_id::SPECIFIC_FIRST => Body::BusSpecific {
            msg_id: id,
            response,
            payload: p,
        },
        _ => {
            return Err(DecodeError::UnknownId {
                class: "bus",
                msg_id: id,
            })
        }
    };
    Ok(body)
}

impl Body<'_> {
    /// (msg_id, response bit, bus bit) of this body.
    pub fn kind(&self) -> (u8, bool, bool) {
        use Body::*;
        match *self {
            GetDeviceInfo => (tid::GET_DEVICE_INFO, false, false),
            DeviceInfo(_) => (tid::GET_DEVICE_INFO, true, false),
            GetDeviceFeatures { .. } => (tid::GET_DEVICE_FEATURES, false, false),
            DeviceFeatures { .. } => (tid::GET_DEVICE_FEATURES, true, false),
            SetDriverFeatures { .. } => (tid::SET_DRIVER_FEATURES, false, false),
            SetDriverFeaturesDone => (tid::SET_DRIVER_FEATURES, true, false),
            GetConfig { .. } => (tid::GET_CONFIG, false, false),
            Config { .. } => (tid::GET_CONFIG, true, false),
            SetConfig { .. } => (tid::SET_CONFIG, false, false),
            SetConfigResult { .. } => (tid::SET_CONFIG, true, false),
            GetDeviceStatus => (tid::GET_DEVICE_STATUS, false, false),
            DeviceStatus { .. } => (tid::GET_DEVICE_STATUS, true, false),
            SetDeviceStatus { .. } => (tid::SET_DEVICE_STATUS, false, false),
            SetDeviceStatusResult { .. } => (tid::SET_DEVICE_STATUS, true, false),
            GetVqueue { .. } => (tid::GET_VQUEUE, false, false),
            VqueueInfo(_) => (tid::GET_VQUEUE, true, false),
            SetVqueue(_) => (tid::SET_VQUEUE, false, false),
            SetVqueueDone => (tid::SET_VQUEUE, true, false),
            ResetVqueue { .. } => (tid::RESET_VQUEUE, false, false),
            ResetVqueueDone => (tid::RESET_VQUEUE, true, false),
            GetShm { .. } => (tid::GET_SHM, false, false),
            Shm { .. } => (tid::GET_SHM, true, false),
            EventConfig { .. } => (tid::EVENT_CONFIG, false, false),
            EventAvail { .. } => (tid::EVENT_AVAIL, false, false),
            EventUsed { .. } => (tid::EVENT_USED, false, false),
            GetDevices { .. } => (bus_id::GET_DEVICES, false, true),
            Devices { .. } => (bus_id::GET_DEVICES, true, true),
            Ping { .. } => (bus_id::PING, false, true),
            Pong { .. } => (bus_id::PING, true, true),
            EventDevice { .. } => (bus_id::EVENT_DEVICE, false, true),
            BusSpecific {
                msg_id, response, ..
            } => (msg_id, response, true),
        }
    }
}

fn data_len_u32(data: &[u8]) -> Result<u32, EncodeError> {
    u32::try_from(data.len()).map_err(|_| EncodeError::TooLarge {
        needed: data.len(),
        available: ABSOLUTE_MAX_MSG_SIZE,
    })
}

impl Message<'_> {
    /// Encodes into `out` and returns the message size. `out`'s length is the
    /// largest message the bus carries.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let (msg_id, response, bus) = self.body.kind();
        let available = out.len();
        let mut w = Writer::new(out);
        let mut type_byte = 0u8;
        if response {
            type_byte |= TYPE_RESPONSE;
        }
        if bus {
            type_byte |= TYPE_BUS;
        }
        w.u8(type_byte);
        w.u8(msg_id);
        w.le16(if bus { 0 } else { self.dev_num });
        w.le16(self.token);
        w.le16(0); // msg_size, patched below
        use Body::*;
        match self.body {
            GetDeviceInfo
            | SetDriverFeaturesDone
            | GetDeviceStatus
            | SetVqueueDone
            | ResetVqueueDone => {}
            DeviceInfo(i) => {
                w.le32(i.device_id);
                w.le32(i.vendor_id);
                w.le32(i.num_feature_bits);
                w.le32(i.config_size);
                w.le32(i.max_virtqueues);
                w.le16(i.admin_vq_start);
                w.le16(i.admin_vq_count);
            }
            GetDeviceFeatures {
                block_index,
                num_blocks,
            } => {
                w.le32(block_index);
                w.le32(num_blocks);
            }
            DeviceFeatures {
                block_index,
                features,
            }
            | SetDriverFeatures {
                block_index,
                features,
            } => {
                w.le32(block_index);
                w.le32(features.len() as u32);
                w.bytes(features.as_bytes());
            }
            GetConfig { offset, length } => {
                w.le32(offset);
                w.le32(length);
            }
            Config {
                generation,
                offset,
                data,
            }
            | SetConfig {
                generation,
                offset,
                data,
            } => {
                w.le32(generation);
                w.le32(offset);
                w.le32(data_len_u32(data)?);
                w.bytes(data);
            }
            SetConfigResult {
                generation,
                offset,
                length,
                data,
            } => {
                w.le32(generation);
                w.le32(offset);
                w.le32(length);
                w.bytes(data);
            }
            DeviceStatus { status }
            | SetDeviceStatus { status }
            | SetDeviceStatusResult { status } => w.le32(status),
            GetVqueue { index } | ResetVqueue { index } | GetShm { index } => w.le32(index),
            VqueueInfo(q) => {
                w.le32(q.index);
                w.le32(q.max_size);
                w.le32(q.size);
                w.le32(0);
                w.le64(q.desc_addr);
                w.le64(q.driver_addr);
                w.le64(q.device_addr);
            }
            SetVqueue(q) => {
                w.le32(q.index);
                w.le32(0);
                w.le32(q.size);
                w.le32(0);
                w.le64(q.desc_addr);
                w.le64(q.driver_addr);
                w.le64(q.device_addr);
            }
            Shm {
                index,
                length,
                address,
            } => {
                w.le32(index);
                w.le32(length);
                w.le32(address);
            }
            EventConfig {
                device_status,
                generation,
                offset,
                data,
            } => {
                w.le32(device_status);
                w.le32(generation);
                w.le32(offset);
                w.le32(data_len_u32(data)?);
                w.bytes(data);
            }
            EventAvail {
                vq_index,
                next_offset,
            } => {
                w.le32(vq_index);
                w.le32(next_offset);
            }
            EventUsed { vq_index } => w.le32(vq_index),
            GetDevices { offset, count } => {
                w.le16(offset);
                w.le16(count);
            }
            Devices {
                offset,
                count,
                next_offset,
                bitmap,
            } => {
                if usize::from(count / 8) != bitmap.len() || !count.is_multiple_of(8) {
                    return Err(EncodeError::Unaligned {
                        field: "bitmap",
                        len: bitmap.len(),
                        unit: 8,
                    });
                }
                w.le16(offset);
                w.le16(count);
                w.le16(next_offset);
                w.bytes(bitmap);
            }
            Ping { data } | Pong { data } => w.le32(data),
            EventDevice {
                device_number,
                state,
            } => {
                w.le16(device_number);
                w.le16(match state {
                    DeviceState::Ready => 1,
                    DeviceState::Removed => 2,
                    DeviceState::Implementation(s) => s,
                });
            }
            BusSpecific { payload, .. } => w.bytes(payload),
        }
        let needed = w.position();
        if w.overflowed() || needed > ABSOLUTE_MAX_MSG_SIZE || needed > usize::from(u16::MAX) {
            return Err(EncodeError::TooLarge { needed, available });
        }
        w.patch_le16(6, needed as u16);
        Ok(needed)
    }
}

#[cfg(test)]
mod tests;
