//! `struct virtio_vsock_hdr`: 44 bytes, little-endian, copied out of shared
//! memory once and decoded from the copy.

/// Size of `struct virtio_vsock_hdr`.
pub const HDR_LEN: usize = 44;

/// `type` of a stream socket (the only type this device serves).
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset (refused or aborted).
pub const OP_RST: u16 = 3;
/// One or both directions shut down ([`SHUTDOWN_RCV`], [`SHUTDOWN_SEND`]).
pub const OP_SHUTDOWN: u16 = 4;
/// Stream data.
pub const OP_RW: u16 = 5;
/// The sender's receive buffer and forwarded count.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Asks the peer for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flag: the sender will receive no more.
pub const SHUTDOWN_RCV: u32 = 1;
/// SHUTDOWN flag: the sender will send no more.
pub const SHUTDOWN_SEND: u32 = 2;

/// A decoded `struct virtio_vsock_hdr`. Plain values: whoever built it
/// (the guest) is not trusted, so every use checks what it needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (SHUTDOWN).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        v.copy_from_slice(s);
    }
    u16::from_le_bytes(v)
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

fn put(b: &mut [u8; HDR_LEN], at: usize, bytes: &[u8]) {
    if let Some(d) = b.get_mut(at..at + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

impl Header {
    /// Decodes the wire layout.
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Self {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            type_: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    /// Encodes the wire layout.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        put(&mut b, 0, &self.src_cid.to_le_bytes());
        put(&mut b, 8, &self.dst_cid.to_le_bytes());
        put(&mut b, 16, &self.src_port.to_le_bytes());
        put(&mut b, 20, &self.dst_port.to_le_bytes());
        put(&mut b, 24, &self.len.to_le_bytes());
        put(&mut b, 28, &self.type_.to_le_bytes());
        put(&mut b, 30, &self.op.to_le_bytes());
        put(&mut b, 32, &self.flags.to_le_bytes());
        put(&mut b, 36, &self.buf_alloc.to_le_bytes());
        put(&mut b, 40, &self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_at_the_spec_offsets() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0x1111_2222,
            dst_port: 52,
            len: 7,
            type_: TYPE_STREAM,
            op: OP_SHUTDOWN,
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x40000,
            fwd_cnt: 0xDEAD_BEEF,
        };
        let b = h.to_bytes();
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 2);
        assert_eq!(&b[20..24], &52u32.to_le_bytes());
        assert_eq!(&b[28..32], &[1, 0, 4, 0]);
        assert_eq!(&b[40..44], &0xDEAD_BEEFu32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }
}
