//! `struct virtio_net_hdr_v1`, the 12 bytes in front of every packet on
//! the virtqueues and on the TAP, copied out once and checked as a copy.

use virtio_bindings::virtio_net::*;

/// Size of the header (`virtio_net_hdr_v1`: VERSION_1 is always negotiated).
pub const HDR_LEN: usize = 12;

/// Shortest frame worth sending: an Ethernet header.
pub const ETH_HLEN: u64 = 14;

/// `struct virtio_net_hdr_v1`, decoded from its little-endian wire form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, possibly with the ECN bit.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment (a hint).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts, from the start of the frame.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers this packet spans (receive side with MRG_RXBUF).
    pub num_buffers: u16,
}

/// Why a transmit header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Flag bits a driver may not set on transmit.
    #[error("flags {0:#x} hold bits a driver may not set")]
    UnknownFlags(u8),
    /// NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated.
    #[error("NEEDS_CSUM without VIRTIO_NET_F_CSUM")]
    ChecksumNotNegotiated,
    /// The checksum field lies outside the frame.
    #[error("checksum at {start}+{offset} outside a {frame_len}-byte frame")]
    ChecksumOutsideFrame {
        /// csum_start.
        start: u16,
        /// csum_offset.
        offset: u16,
        /// Frame length.
        frame_len: u64,
    },
    /// A GSO type this device does not know.
    #[error("unknown gso_type {0:#x}")]
    UnknownGsoType(u8),
    /// A GSO type whose feature was not negotiated.
    #[error("gso_type {0:#x} not negotiated")]
    GsoNotNegotiated(u8),
    /// A GSO packet without a segment size.
    #[error("gso_type {0:#x} with gso_size 0")]
    GsoSizeZero(u8),
    /// hdr_len larger than the frame.
    #[error("hdr_len {hdr_len} beyond a {frame_len}-byte frame")]
    HdrLenBeyondFrame {
        /// hdr_len.
        hdr_len: u16,
        /// Frame length.
        frame_len: u64,
    },
}

const fn bit(f: u32) -> u64 {
    1 << f
}

impl VnetHeader {
    /// Decodes the wire form.
    pub fn from_bytes(b: [u8; HDR_LEN]) -> Self {
        let [flags, gso_type, h0, h1, g0, g1, s0, s1, o0, o1, n0, n1] = b;
        Self {
            flags,
            gso_type,
            hdr_len: u16::from_le_bytes([h0, h1]),
            gso_size: u16::from_le_bytes([g0, g1]),
            csum_start: u16::from_le_bytes([s0, s1]),
            csum_offset: u16::from_le_bytes([o0, o1]),
            num_buffers: u16::from_le_bytes([n0, n1]),
        }
    }

    /// Encodes the wire form.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let [h0, h1] = self.hdr_len.to_le_bytes();
        let [g0, g1] = self.gso_size.to_le_bytes();
        let [s0, s1] = self.csum_start.to_le_bytes();
        let [o0, o1] = self.csum_offset.to_le_bytes();
        let [n0, n1] = self.num_buffers.to_le_bytes();
        [
            self.flags,
            self.gso_type,
            h0,
            h1,
            g0,
            g1,
            s0,
            s1,
            o0,
            o1,
            n0,
            n1,
        ]
    }

    /// Checks a header the driver sent with a `frame_len`-byte frame
    /// against the features it negotiated (`acked`).
    pub fn check_tx(&self, frame_len: u64, acked: u64) -> Result<(), HeaderError> {
        let needs_csum = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
        // DATA_VALID and RSC_INFO are receive-side only (virtio 1.2 5.1.6.2.1).
        if self.flags & !needs_csum != 0 {
            return Err(HeaderError::UnknownFlags(self.flags));
        }
        if self.flags & needs_csum != 0 {
            if acked & bit(VIRTIO_NET_F_CSUM) == 0 {
                return Err(HeaderError::ChecksumNotNegotiated);
            }
            // The 2-byte checksum field must lie inside the frame.
            let end = u64::from(self.csum_start) + u64::from(self.csum_offset) + 2;
            if end > frame_len {
                return Err(HeaderError::ChecksumOutsideFrame {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    frame_len,
                });
            }
        }
        if u64::from(self.hdr_len) > frame_len {
            return Err(HeaderError::HdrLenBeyondFrame {
                hdr_len: self.hdr_len,
                frame_len,
            });
        }
        let ecn = self.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
        let needed = match u32::from(self.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
            VIRTIO_NET_HDR_GSO_NONE if !ecn => return Ok(()),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP if !ecn => VIRTIO_NET_F_HOST_UFO,
            // UDP_L4 needs HOST_USO, which is not offered; ECN needs TCP.
            _ => return Err(HeaderError::UnknownGsoType(self.gso_type)),
        };
        if acked & bit(needed) == 0 || (ecn && acked & bit(VIRTIO_NET_F_HOST_ECN) == 0) {
            return Err(HeaderError::GsoNotNegotiated(self.gso_type));
        }
        if self.gso_size == 0 {
            return Err(HeaderError::GsoSizeZero(self.gso_type));
        }
        Ok(())
    }

    /// Adapts a header the TAP produced to what the driver negotiated:
    /// `None` if the packet needs an offload the driver did not accept
    /// (only possible for packets queued before the offloads changed).
    pub(crate) fn for_guest(mut self, acked: u64) -> Option<Self> {
        let guest_csum = acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0;
        if self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0 && !guest_csum {
            return None;
        }
        if !guest_csum {
            // DATA_VALID is only a hint, and only meaningful with GUEST_CSUM.
            self.flags = 0;
        }
        self.flags &= (VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID) as u8;
        let ecn = self.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
        let needed = match u32::from(self.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8)) {
            VIRTIO_NET_HDR_GSO_NONE if !ecn => return Some(self),
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_GUEST_TSO6,
            VIRTIO_NET_HDR_GSO_UDP if !ecn => VIRTIO_NET_F_GUEST_UFO,
            _ => return None,
        };
        let ok = acked & bit(needed) != 0 && (!ecn || acked & bit(VIRTIO_NET_F_GUEST_ECN) != 0);
        ok.then_some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: u64 = u64::MAX;

    fn hdr(flags: u8, gso_type: u8, gso_size: u16, start: u16, offset: u16) -> VnetHeader {
        VnetHeader {
            flags,
            gso_type,
            gso_size,
            csum_start: start,
            csum_offset: offset,
            ..Default::default()
        }
    }

    #[test]
    fn wire_form_round_trips_little_endian() {
        let h = VnetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
            num_buffers: 0x090a,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 4, 2, 1, 4, 3, 6, 5, 8, 7, 0x0a, 9]);
        assert_eq!(VnetHeader::from_bytes(b), h);
    }

    #[test]
    fn transmit_headers_are_checked_against_frame_and_features() {
        assert_eq!(hdr(0, 0, 0, 0, 0).check_tx(60, 0), Ok(()));
        assert_eq!(
            hdr(2, 0, 0, 0, 0).check_tx(60, ALL),
            Err(HeaderError::UnknownFlags(2))
        );
        assert_eq!(
            hdr(1, 0, 0, 34, 16).check_tx(60, 0),
            Err(HeaderError::ChecksumNotNegotiated)
        );
        // 34 + 24 + 2 = 60 fits exactly; one more byte does not.
        assert_eq!(hdr(1, 0, 0, 34, 24).check_tx(60, ALL), Ok(()));
        assert!(matches!(
            hdr(1, 0, 0, 34, 25).check_tx(60, ALL),
            Err(HeaderError::ChecksumOutsideFrame { .. })
        ));
        assert!(matches!(
            hdr(1, 0, 0, u16::MAX, u16::MAX).check_tx(60, ALL),
            Err(HeaderError::ChecksumOutsideFrame { .. })
        ));
        assert_eq!(
            hdr(1, 1, 0, 34, 16).check_tx(60, ALL),
            Err(HeaderError::GsoSizeZero(1))
        );
        assert_eq!(hdr(1, 1, 1448, 34, 16).check_tx(60, ALL), Ok(()));
        assert_eq!(
            hdr(1, 1, 1448, 34, 16).check_tx(60, bit(VIRTIO_NET_F_CSUM)),
            Err(HeaderError::GsoNotNegotiated(1))
        );
        for t in [2u8, 5, 6, 0x7f, 0x80, 0x83, 0x85] {
            assert_eq!(
                hdr(1, t, 1448, 34, 16).check_tx(60, ALL),
                Err(HeaderError::UnknownGsoType(t)),
                "gso_type {t:#x}"
            );
        }
        let no_ecn = ALL & !bit(VIRTIO_NET_F_HOST_ECN);
        assert_eq!(
            hdr(1, 0x81, 1448, 34, 16).check_tx(60, no_ecn),
            Err(HeaderError::GsoNotNegotiated(0x81))
        );
        let mut h = hdr(0, 0, 0, 0, 0);
        h.hdr_len = 61;
        assert!(matches!(
            h.check_tx(60, ALL),
            Err(HeaderError::HdrLenBeyondFrame { .. })
        ));
    }

    #[test]
    fn receive_headers_follow_the_guest_offloads() {
        let csum = bit(VIRTIO_NET_F_GUEST_CSUM);
        assert_eq!(hdr(2, 0, 0, 0, 0).for_guest(0), Some(hdr(0, 0, 0, 0, 0)));
        assert_eq!(hdr(1, 0, 0, 34, 16).for_guest(0), None);
        assert!(hdr(1, 0, 0, 34, 16).for_guest(csum).is_some());
        assert_eq!(hdr(1, 1, 1448, 34, 16).for_guest(csum), None);
        assert!(hdr(1, 1, 1448, 34, 16)
            .for_guest(csum | bit(VIRTIO_NET_F_GUEST_TSO4))
            .is_some());
        assert_eq!(hdr(1, 5, 1448, 34, 16).for_guest(ALL), None);
    }
}
