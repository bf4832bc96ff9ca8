//! Fixed newstyle negotiation: greeting, client flags, option haggling.

use std::io::{self, Read, Write};

use crate::wire::*;
use crate::{ConnEnd, ConnStats, NbdConfig, NbdError, OPTION_DISCARD_MAX, SECTOR_SIZE};

/// What the client may connect to.
pub(crate) struct Export<'a> {
    pub(crate) name: &'a str,
    pub(crate) size: u64,
    pub(crate) flags: u16,
}

impl Export<'_> {
    /// The configured name, or the empty "default export" name.
    fn accepts(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// How the negotiation ended.
pub(crate) enum Outcome {
    /// Enter the transmission phase.
    Transmission,
    /// The client left before transmission.
    End(ConnEnd),
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` if the peer closed the
/// connection before the first byte (a clean end), an error if it closed it
/// in the middle.
pub(crate) fn read_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let rest = buf.get_mut(got..).unwrap_or_default();
        match r.read(rest) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and drops `len` bytes in bounded chunks.
pub(crate) fn skip<R: Read>(r: &mut R, len: u64) -> io::Result<()> {
    let mut left = len;
    let mut scratch = [0u8; 4096];
    while left > 0 {
        let n = usize::try_from(left.min(scratch.len() as u64)).unwrap_or(scratch.len());
        let chunk = scratch.get_mut(..n).unwrap_or_default();
        r.read_exact(chunk)?;
        left -= n as u64;
    }
    Ok(())
}

fn opt_reply<W: Write>(w: &mut W, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    // Replies are built from server-side data only; the largest is an export
    // name of at most a few KiB.
    let len = u32::try_from(data.len()).map_err(|_| io::ErrorKind::InvalidInput)?;
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&kind.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg)
}

/// Error reply with a message for the user.
fn opt_error<W: Write>(
    w: &mut W,
    stats: &mut ConnStats,
    option: u32,
    kind: u32,
    msg: &str,
) -> io::Result<()> {
    stats.options_refused += 1;
    tracing::debug!(
        option,
        kind = format_args!("{kind:#x}"),
        msg,
        "NBD option refused"
    );
    opt_reply(w, option, kind, msg.as_bytes())
}

/// Runs the handshake. Returns once the client enters transmission or
/// leaves; protocol violations that leave no way to answer are errors.
pub(crate) fn negotiate<S: Read + Write>(
    s: &mut S,
    cfg: &NbdConfig,
    export: &Export<'_>,
    stats: &mut ConnStats,
) -> Result<Outcome, NbdError> {
    let mut greeting = [0u8; 18];
    greeting[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    greeting[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&greeting)?;
    s.flush()?;

    let mut cf = [0u8; 4];
    if !read_or_eof(s, &mut cf)? {
        return Ok(Outcome::End(ConnEnd::HandshakeEof));
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::BadClientFlags {
            flags: client_flags,
        });
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    // A client without C_FIXED_NEWSTYLE can only send EXPORT_NAME, which is
    // handled the same way either way, so fixed newstyle is honoured for
    // everyone (the protocol allows that).

    let mut data = Vec::new();
    loop {
        let mut hdr = [0u8; 16];
        if !read_or_eof(s, &mut hdr)? {
            return Ok(Outcome::End(ConnEnd::HandshakeEof));
        }
        let mut r = Be(&hdr);
        let magic = r.u64().unwrap_or(0);
        let option = r.u32().unwrap_or(0);
        let len = r.u32().unwrap_or(0);
        if magic != IHAVEOPT {
            return Err(NbdError::BadOptionMagic { magic });
        }
        stats.options += 1;
        if stats.options > u64::from(cfg.max_options) {
            return Err(NbdError::TooManyOptions {
                limit: cfg.max_options,
            });
        }
        if len > cfg.max_option_len {
            // EXPORT_NAME cannot be answered with an error; anything too big
            // to skip cheaply is treated as an attack.
            if option == OPT_EXPORT_NAME || len > OPTION_DISCARD_MAX {
                return Err(NbdError::OptionTooBig { option, len });
            }
            skip(s, u64::from(len))?;
            opt_error(s, stats, option, REP_ERR_TOO_BIG, "option too long")?;
            s.flush()?;
            continue;
        }
        // Bounded by max_option_len above.
        data.resize(len as usize, 0);
        s.read_exact(&mut data)?;

        match option {
            OPT_EXPORT_NAME => {
                if !export.accepts(&data) {
                    return Err(NbdError::UnknownExport {
                        name: String::from_utf8_lossy(&data).into_owned(),
                    });
                }
                let mut msg = Vec::with_capacity(10 + 124);
                msg.extend_from_slice(&export.size.to_be_bytes());
                msg.extend_from_slice(&export.flags.to_be_bytes());
                if !no_zeroes {
                    msg.resize(10 + 124, 0);
                }
                s.write_all(&msg)?;
                s.flush()?;
                return Ok(Outcome::Transmission);
            }
            OPT_ABORT => {
                // The client may already have closed; the ACK is a courtesy.
                let _ = opt_reply(s, option, REP_ACK, &[]).and_then(|()| s.flush());
                return Ok(Outcome::End(ConnEnd::Abort));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_error(s, stats, option, REP_ERR_INVALID, "LIST takes no data")?;
                } else {
                    let name = export.name.as_bytes();
                    let mut d = Vec::with_capacity(4 + name.len());
                    let nlen = u32::try_from(name.len()).unwrap_or(0);
                    d.extend_from_slice(&nlen.to_be_bytes());
                    d.extend_from_slice(name.get(..nlen as usize).unwrap_or_default());
                    opt_reply(s, option, REP_SERVER, &d)?;
                    opt_reply(s, option, REP_ACK, &[])?;
                }
            }
            OPT_INFO | OPT_GO => {
                if info_or_go(s, cfg, export, stats, option, &data)? && option == OPT_GO {
                    s.flush()?;
                    return Ok(Outcome::Transmission);
                }
            }
            _ => {
                // STARTTLS, STRUCTURED_REPLY, EXTENDED_HEADERS, meta
                // contexts and anything unknown.
                opt_error(s, stats, option, REP_ERR_UNSUP, "option not supported")?;
            }
        }
        s.flush()?;
    }
}

/// Answers INFO / GO. `Ok(true)` when the export was described (GO then
/// enters transmission).
fn info_or_go<W: Write>(
    w: &mut W,
    cfg: &NbdConfig,
    export: &Export<'_>,
    stats: &mut ConnStats,
    option: u32,
    data: &[u8],
) -> io::Result<bool> {
    // Data: u32 name length, name, u16 count, count x u16 info types.
    let mut r = Be(data);
    let parsed = (|| {
        let nlen = usize::try_from(r.u32()?).ok()?;
        let name = r.take(nlen)?;
        let count = r.u16()?;
        for _ in 0..count {
            // Every info type is answered the same way (EXPORT and
            // BLOCK_SIZE always, nothing else), so requests are only parsed.
            r.u16()?;
        }
        r.is_empty().then_some(name)
    })();
    let Some(name) = parsed else {
        opt_error(
            w,
            stats,
            option,
            REP_ERR_INVALID,
            "malformed INFO/GO request",
        )?;
        return Ok(false);
    };
    if !export.accepts(name) {
        opt_error(w, stats, option, REP_ERR_UNKNOWN, "unknown export name")?;
        return Ok(false);
    }
    let mut info = Vec::with_capacity(14);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size.to_be_bytes());
    info.extend_from_slice(&export.flags.to_be_bytes());
    opt_reply(w, option, REP_INFO, &info)?;
    // Sent even if not requested (the protocol allows it): the server copes
    // with any alignment, the minimum only saves clients a slow path.
    info.clear();
    info.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    info.extend_from_slice(&(SECTOR_SIZE as u32).to_be_bytes());
    info.extend_from_slice(&cfg.preferred_block_size.to_be_bytes());
    info.extend_from_slice(&cfg.max_payload.to_be_bytes());
    opt_reply(w, option, REP_INFO, &info)?;
    opt_reply(w, option, REP_ACK, &[])?;
    Ok(true)
}
