//! Every number of the wire format in one place, so that a later revision of the
//! draft specification is a small diff.

/// Transport revision implemented here.
pub const TRANSPORT_REVISION: u32 = 1;
/// Size of the common header.
pub const HEADER_SIZE: usize = 8;
/// Smallest maximum message size a bus may advertise (revision 1).
pub const MIN_MAX_MSG_SIZE: usize = 44;
/// Smallest maximum message size that can carry SET_VQUEUE / GET_VQUEUE.
pub const MIN_USABLE_MSG_SIZE: usize = 48;
/// Largest maximum message size a bus should advertise.
pub const RECOMMENDED_MAX_MSG_SIZE: usize = 264;
/// Largest maximum message size allowed by revision 1.
pub const ABSOLUTE_MAX_MSG_SIZE: usize = 65536;

/// `type` bit 0: the message is a response.
pub const TYPE_RESPONSE: u8 = 1 << 0;
/// `type` bit 1: the message is a bus message (not a transport message).
pub const TYPE_BUS: u8 = 1 << 1;
/// `type` bits that must be zero.
pub const TYPE_RESERVED_MASK: u8 = !(TYPE_RESPONSE | TYPE_BUS);

/// Transport message ids.
pub mod transport {
    /// GET_DEVICE_INFO
    pub const GET_DEVICE_INFO: u8 = 0x02;
    /// GET_DEVICE_FEATURES
    pub const GET_DEVICE_FEATURES: u8 = 0x03;
    /// SET_DRIVER_FEATURES
    pub const SET_DRIVER_FEATURES: u8 = 0x04;
    /// GET_CONFIG
    pub const GET_CONFIG: u8 = 0x05;
    /// SET_CONFIG
    pub const SET_CONFIG: u8 = 0x06;
    /// GET_DEVICE_STATUS
    pub const GET_DEVICE_STATUS: u8 = 0x07;
    /// SET_DEVICE_STATUS
    pub const SET_DEVICE_STATUS: u8 = 0x08;
    /// GET_VQUEUE
    pub const GET_VQUEUE: u8 = 0x09;
    /// SET_VQUEUE
    pub const SET_VQUEUE: u8 = 0x0A;
    /// RESET_VQUEUE
    pub const RESET_VQUEUE: u8 = 0x0B;
    /// GET_SHM
    pub const GET_SHM: u8 = 0x0C;
    /// EVENT_CONFIG (device to driver)
    pub const EVENT_CONFIG: u8 = 0x40;
    /// EVENT_AVAIL (driver to device)
    pub const EVENT_AVAIL: u8 = 0x41;
    /// EVENT_USED (device to driver)
    pub const EVENT_USED: u8 = 0x42;
}

/// Bus message ids.
pub mod bus {
    /// GET_DEVICES
    pub const GET_DEVICES: u8 = 0x02;
    /// PING
    pub const PING: u8 = 0x03;
    /// EVENT_DEVICE
    pub const EVENT_DEVICE: u8 = 0x40;
    /// First bus-specific id.
    pub const SPECIFIC_FIRST: u8 = 0x80;
}

/// First id of the event range (0x40..=0x7F); events get no response.
pub const EVENT_RANGE_START: u8 = 0x40;
/// First implementation-defined request id.
pub const IMPL_REQUEST_START: u8 = 0x80;
/// First implementation-defined event id.
pub const IMPL_EVENT_START: u8 = 0xC0;

/// Fixed payload sizes (bytes after the header).
pub mod payload {
    /// GET_DEVICE_INFO response.
    pub const DEVICE_INFO: usize = 24;
    /// GET_DEVICE_FEATURES request.
    pub const GET_DEVICE_FEATURES: usize = 8;
    /// GET_CONFIG request.
    pub const GET_CONFIG: usize = 8;
    /// SET_DEVICE_STATUS request and both status responses.
    pub const STATUS: usize = 4;
    /// GET_VQUEUE / RESET_VQUEUE / GET_SHM request.
    pub const INDEX: usize = 4;
    /// GET_VQUEUE response and SET_VQUEUE request.
    pub const VQUEUE: usize = 40;
    /// GET_SHM response.
    pub const SHM: usize = 12;
    /// EVENT_AVAIL.
    pub const EVENT_AVAIL: usize = 8;
    /// EVENT_USED.
    pub const EVENT_USED: usize = 4;
    /// GET_DEVICES request.
    pub const GET_DEVICES: usize = 4;
    /// PING request and response.
    pub const PING: usize = 4;
    /// EVENT_DEVICE.
    pub const EVENT_DEVICE: usize = 4;
}

/// EVENT_AVAIL next_offset: bit 31 is the wrap counter.
pub const NEXT_OFFSET_WRAP: u32 = 1 << 31;
