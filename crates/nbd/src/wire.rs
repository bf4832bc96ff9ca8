//! NBD wire format: magic numbers, flag and type values, and the fixed-size
//! request header. Every integer on the wire is big-endian.
//!
//! Values follow the NBD protocol document (`doc/proto.md` of
//! NetworkBlockDevice/nbd). Only what this server speaks or rejects by name is
//! listed.

/// `NBDMAGIC`, first word the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, second server word and the prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every fixed-newstyle option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of every simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: NBD_CMD_FLUSH is accepted.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: NBD_CMD_FLAG_FUA is accepted.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: NBD_CMD_TRIM is accepted.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: NBD_CMD_WRITE_ZEROES is accepted.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: several connections share one cache (never set here).
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: pick an export and enter transmission (no option reply).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: end the negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list the exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS (unsupported here).
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies (unsupported here).
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a LIST.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of information for INFO / GO.
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option error: refused by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option error: malformed option.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option error: request too large.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// NBD_REP_INFO type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// NBD_REP_INFO type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// NBD error: operation not permitted (write to a read-only export).
pub const EPERM: u32 = 1;
/// NBD error: input/output error.
pub const EIO: u32 = 5;
/// NBD error: invalid argument.
pub const EINVAL: u32 = 22;
/// NBD error: no space (write beyond the end).
pub const ENOSPC: u32 = 28;
/// NBD error: operation not supported.
pub const ENOTSUP: u32 = 95;

/// Size of a request header on the wire.
pub const REQUEST_SIZE: usize = 28;

/// A transmission command this server implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// NBD_CMD_READ (0).
    Read,
    /// NBD_CMD_WRITE (1): a payload of `length` bytes follows the header.
    Write,
    /// NBD_CMD_DISC (2): no reply.
    Disc,
    /// NBD_CMD_FLUSH (3).
    Flush,
    /// NBD_CMD_TRIM (4).
    Trim,
    /// NBD_CMD_WRITE_ZEROES (6).
    WriteZeroes,
}

impl TryFrom<u16> for Command {
    /// The unknown type, returned as is.
    type Error = u16;

    fn try_from(v: u16) -> Result<Self, u16> {
        Ok(match v {
            0 => Self::Read,
            1 => Self::Write,
            2 => Self::Disc,
            3 => Self::Flush,
            4 => Self::Trim,
            6 => Self::WriteZeroes,
            // CACHE (5), BLOCK_STATUS (7), RESIZE (8) and anything newer are
            // not advertised, so they are as unknown as any other number.
            other => return Err(other),
        })
    }
}

/// A request header, copied off the wire and magic-checked; nothing else is
/// validated yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type (see [`Command`]).
    pub kind: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Decodes a header; `Err(magic)` when the magic is wrong, after which
    /// the stream cannot be resynchronised.
    pub fn decode(b: &[u8; REQUEST_SIZE]) -> Result<Self, u32> {
        let mut r = Be(b);
        // The array is exactly REQUEST_SIZE bytes, so the reads cannot run
        // short; `unwrap_or(0)` only satisfies the types.
        let magic = r.u32().unwrap_or(0);
        if magic != REQUEST_MAGIC {
            return Err(magic);
        }
        Ok(Self {
            flags: r.u16().unwrap_or(0),
            kind: r.u16().unwrap_or(0),
            cookie: r.u64().unwrap_or(0),
            offset: r.u64().unwrap_or(0),
            length: r.u32().unwrap_or(0),
        })
    }
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    let (m, rest) = b.split_at_mut(4);
    m.copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    let (e, c) = rest.split_at_mut(4);
    e.copy_from_slice(&error.to_be_bytes());
    c.copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A big-endian reader over a byte slice that never panics: every read
/// returns `None` when the bytes run out.
#[derive(Debug)]
pub(crate) struct Be<'a>(pub(crate) &'a [u8]);

impl<'a> Be<'a> {
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_bad_magic() {
        let mut b = [0u8; REQUEST_SIZE];
        b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&1u16.to_be_bytes());
        b[6..8].copy_from_slice(&6u16.to_be_bytes());
        b[8..16].copy_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        b[16..24].copy_from_slice(&4096u64.to_be_bytes());
        b[24..28].copy_from_slice(&512u32.to_be_bytes());
        let r = Request::decode(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: CMD_FLAG_FUA,
                kind: 6,
                cookie: 0x1122_3344_5566_7788,
                offset: 4096,
                length: 512
            }
        );
        assert_eq!(Command::try_from(r.kind), Ok(Command::WriteZeroes));
        assert_eq!(Command::try_from(5), Err(5));
        assert_eq!(Command::try_from(7), Err(7));
        b[0] = 0;
        assert_eq!(Request::decode(&b), Err(0x0060_9513));
    }

    #[test]
    fn be_reader_never_overruns() {
        let mut r = Be(&[0, 1, 2]);
        assert_eq!(r.u16(), Some(1));
        assert_eq!(r.u16(), None);
        assert_eq!(r.take(2), None);
        assert_eq!(r.take(1), Some(&[2u8][..]));
        assert!(r.is_empty());
        assert_eq!(r.u64(), None);
    }
}
