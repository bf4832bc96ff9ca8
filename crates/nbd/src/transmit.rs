//! Transmission phase: one request at a time, one simple reply each.

use std::io::{Read, Write};

use crate::negotiate::{read_or_eof, skip};
use crate::wire::*;
use crate::{BlockDevice, BlockError, ConnEnd, ConnStats, NbdConfig, NbdError, SECTOR_SIZE};

const SECTOR: usize = SECTOR_SIZE as usize;

fn round_down(x: u64) -> u64 {
    x & !(SECTOR_SIZE - 1)
}

/// `None` only if `x` is within 511 of `u64::MAX`, which a validated range
/// never is (the export size is itself 512-aligned).
fn round_up(x: u64) -> Option<u64> {
    x.checked_add(SECTOR_SIZE - 1).map(round_down)
}

fn is_aligned(x: u64) -> bool {
    x.is_multiple_of(SECTOR_SIZE)
}

fn to_usize(x: u64) -> Result<usize, BlockError> {
    usize::try_from(x).map_err(|_| BlockError::Invalid)
}

/// A refusal decided before touching the device.
#[derive(Debug, Clone, Copy)]
struct Refused(u32);

/// One connection in the transmission phase.
pub(crate) struct Conn<'a> {
    dev: &'a mut dyn BlockDevice,
    cfg: &'a NbdConfig,
    /// Export size, a multiple of 512.
    size: u64,
    read_only: bool,
    stats: &'a mut ConnStats,
    /// Request buffer, grown on demand up to `max_payload + 1024` and kept
    /// for the connection. Contents beyond what a request fills are stale
    /// but never sent: every byte sent was first read from the device.
    buf: Vec<u8>,
    /// Zeroes for the WRITE_ZEROES fallback, at most `max_device_io` bytes.
    zeros: Vec<u8>,
}

impl<'a> Conn<'a> {
    pub(crate) fn new(
        dev: &'a mut dyn BlockDevice,
        cfg: &'a NbdConfig,
        size: u64,
        read_only: bool,
        stats: &'a mut ConnStats,
    ) -> Self {
        Self {
            dev,
            cfg,
            size,
            read_only,
            stats,
            buf: Vec::new(),
            zeros: Vec::new(),
        }
    }

    pub(crate) fn run<S: Read + Write>(mut self, s: &mut S) -> Result<ConnEnd, NbdError> {
        loop {
            let mut hdr = [0u8; REQUEST_SIZE];
            if !read_or_eof(s, &mut hdr)? {
                return Ok(ConnEnd::Eof);
            }
            let req = Request::decode(&hdr).map_err(|magic| NbdError::BadRequestMagic { magic })?;
            self.stats.requests += 1;
            tracing::trace!(?req, "NBD request");
            let cmd = match Command::try_from(req.kind) {
                Ok(c) => c,
                Err(kind) => {
                    tracing::debug!(kind, "NBD unknown command");
                    // Only WRITE carries a payload, so the stream is still in
                    // sync.
                    self.refuse(s, &req, Refused(EINVAL))?;
                    continue;
                }
            };
            match cmd {
                Command::Disc => return Ok(ConnEnd::Disconnect),
                Command::Read => self.read(s, &req)?,
                Command::Write => self.write(s, &req)?,
                Command::Flush => {
                    // Offset and length "MUST be zero"; some clients are
                    // sloppy and there is nothing to misread, so they are
                    // ignored.
                    let r = self.check_flags(&req, CMD_FLAG_FUA).map(|()| self.flush());
                    self.finish(s, &req, r, |st| st.flushes += 1)?;
                }
                Command::Trim => {
                    let r = self.check_mutation(&req, CMD_FLAG_FUA, EINVAL).map(|()| {
                        self.trim(req.offset, u64::from(req.length))
                            .and_then(|()| self.fua(&req))
                    });
                    self.finish(s, &req, r, |st| st.trims += 1)?;
                }
                Command::WriteZeroes => {
                    let r = self
                        .check_mutation(&req, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, ENOSPC)
                        .map(|()| {
                            // NO_HOLE needs no special care: the device's
                            // write_zeroes, like the fallback, leaves the range
                            // reading as zeroes whether or not it deallocates.
                            self.zero(req.offset, u64::from(req.length))
                                .and_then(|()| self.fua(&req))
                        });
                    self.finish(s, &req, r, |st| st.write_zeroes += 1)?;
                }
            }
        }
    }

    /// Sends a reply for a request that did not move data to the client.
    fn finish<S: Write>(
        &mut self,
        s: &mut S,
        req: &Request,
        r: Result<Result<(), BlockError>, Refused>,
        count: impl FnOnce(&mut ConnStats),
    ) -> Result<(), NbdError> {
        match r {
            Err(refused) => self.refuse(s, req, refused),
            Ok(Err(e)) => self.fail(s, req, e),
            Ok(Ok(())) => {
                count(&mut *self.stats);
                self.reply(s, req, 0)
            }
        }
    }

    fn reply<S: Write>(&mut self, s: &mut S, req: &Request, err: u32) -> Result<(), NbdError> {
        if err != 0 {
            self.stats.error_replies += 1;
        }
        s.write_all(&simple_reply(err, req.cookie))?;
        s.flush()?;
        Ok(())
    }

    fn refuse<S: Write>(&mut self, s: &mut S, req: &Request, r: Refused) -> Result<(), NbdError> {
        tracing::debug!(?req, errno = r.0, "NBD request refused");
        self.stats.invalid_requests += 1;
        self.reply(s, req, r.0)
    }

    fn fail<S: Write>(&mut self, s: &mut S, req: &Request, e: BlockError) -> Result<(), NbdError> {
        tracing::debug!(?req, error = %e, "NBD request failed on the device");
        self.reply(s, req, e.nbd_errno())
    }

    fn check_flags(&self, req: &Request, allowed: u16) -> Result<(), Refused> {
        if req.flags & !allowed != 0 {
            return Err(Refused(EINVAL));
        }
        Ok(())
    }

    /// Checks `offset + length <= size` without overflow; `beyond` is the
    /// error for a range past the end.
    fn check_range(&self, req: &Request, beyond: u32) -> Result<(), Refused> {
        match req.offset.checked_add(u64::from(req.length)) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Refused(beyond)),
        }
    }

    fn check_mutation(&self, req: &Request, allowed: u16, beyond: u32) -> Result<(), Refused> {
        self.check_flags(req, allowed)?;
        if self.read_only {
            return Err(Refused(EPERM));
        }
        self.check_range(req, beyond)
    }

    fn note_alignment(&mut self, offset: u64, len: u64) {
        if !is_aligned(offset) || !is_aligned(len) {
            self.stats.unaligned += 1;
        }
    }

    fn read<S: Write>(&mut self, s: &mut S, req: &Request) -> Result<(), NbdError> {
        let checked = self.check_flags(req, CMD_FLAG_FUA).and_then(|()| {
            if req.length > self.cfg.max_payload {
                return Err(Refused(EINVAL));
            }
            self.check_range(req, EINVAL)
        });
        if let Err(r) = checked {
            // Simple replies carry no payload after an error.
            return self.refuse(s, req, r);
        }
        let (offset, len) = (req.offset, u64::from(req.length));
        if len == 0 {
            self.stats.reads += 1;
            return self.reply(s, req, 0);
        }
        self.note_alignment(offset, len);
        match self.read_span(offset, len) {
            Ok(range) => {
                let data = self.buf.get(range).unwrap_or_default();
                s.write_all(&simple_reply(0, req.cookie))?;
                s.write_all(data)?;
                s.flush()?;
                self.stats.reads += 1;
                self.stats.bytes_read += len;
                Ok(())
            }
            Err(e) => self.fail(s, req, e),
        }
    }

    /// Reads the sectors covering `[offset, offset + len)` into `buf` and
    /// returns where the requested bytes are in it.
    fn read_span(&mut self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BlockError> {
        let start = round_down(offset);
        let end = offset
            .checked_add(len)
            .and_then(round_up)
            .ok_or(BlockError::Invalid)?;
        let span = to_usize(end - start)?;
        self.grow_buf(span);
        let buf = self.buf.get_mut(..span).ok_or(BlockError::Invalid)?;
        dev_read(self.dev, self.cfg.max_device_io, start, buf)?;
        let head = to_usize(offset - start)?;
        Ok(head..head + to_usize(len)?)
    }

    fn grow_buf(&mut self, n: usize) {
        if self.buf.len() < n {
            self.buf.resize(n, 0);
        }
    }

    fn write<S: Read + Write>(&mut self, s: &mut S, req: &Request) -> Result<(), NbdError> {
        if req.length > self.cfg.max_payload {
            // Skipping up to 4 GiB to stay in sync is not worth it for a
            // request the client was told not to send: answer and hang up.
            self.refuse(s, req, Refused(EINVAL))?;
            return Err(NbdError::PayloadTooBig {
                len: req.length,
                max: self.cfg.max_payload,
            });
        }
        let (offset, len) = (req.offset, u64::from(req.length));
        if let Err(r) = self.check_mutation(req, CMD_FLAG_FUA, ENOSPC) {
            skip(s, len)?;
            return self.refuse(s, req, r);
        }
        if len == 0 {
            let r = self.fua(req);
            return self.finish(s, req, Ok(r), |st| st.writes += 1);
        }
        self.note_alignment(offset, len);
        // Span of whole sectors, and where the payload goes in it. The range
        // was checked against the aligned size, so none of this overflows.
        let start = round_down(offset);
        let end_off = offset + len;
        let end = round_up(end_off).unwrap_or(end_off);
        let (span, head, plen) = match (
            to_usize(end - start),
            to_usize(offset - start),
            to_usize(len),
        ) {
            (Ok(a), Ok(b), Ok(c)) => (a, b, c),
            _ => {
                skip(s, len)?;
                return self.refuse(s, req, Refused(EINVAL));
            }
        };
        self.grow_buf(span);
        // The payload is consumed before any device access, so a device
        // error never leaves the stream out of sync.
        let Some(dst) = self.buf.get_mut(head..head + plen) else {
            skip(s, len)?;
            return self.refuse(s, req, Refused(EINVAL));
        };
        s.read_exact(dst)?;
        let r = self
            .merge_edges(start, offset, end_off, end)
            .and_then(|()| {
                let buf = self.buf.get(..span).ok_or(BlockError::Invalid)?;
                dev_write(self.dev, self.cfg.max_device_io, start, buf)
            })
            .and_then(|()| self.fua(req));
        self.finish(s, req, Ok(r), |st| {
            st.writes += 1;
            st.bytes_written += len;
        })
    }

    /// Read-modify-write support: fills the parts of the head and tail
    /// sectors of `buf` (covering `[start, end)`) that lie outside the
    /// payload `[offset, end_off)` with what the device holds.
    fn merge_edges(
        &mut self,
        start: u64,
        offset: u64,
        end_off: u64,
        end: u64,
    ) -> Result<(), BlockError> {
        let mut sector = [0u8; SECTOR];
        let mut have = None;
        if offset != start {
            self.dev.read(start, &mut sector)?;
            have = Some(start);
            let keep = to_usize(offset - start)?;
            copy(&mut self.buf, 0, sector.get(..keep))?;
        }
        if end_off != end {
            let tail = end - SECTOR_SIZE;
            if have != Some(tail) {
                self.dev.read(tail, &mut sector)?;
            }
            let from = to_usize(end_off - tail)?;
            let at = to_usize(end_off - start)?;
            copy(&mut self.buf, at, sector.get(from..))?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        match self.dev.flush() {
            // No flush means no volatile cache to flush.
            Err(BlockError::Unsupported) => Ok(()),
            r => r,
        }
    }

    fn fua(&mut self, req: &Request) -> Result<(), BlockError> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.flush()
        } else {
            Ok(())
        }
    }

    /// Trim is a hint: only whole sectors inside the range are discarded,
    /// and a device without discard ignores it.
    fn trim(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.note_alignment(offset, len);
        let start = round_up(offset).ok_or(BlockError::Invalid)?;
        let end = round_down(offset.checked_add(len).ok_or(BlockError::Invalid)?);
        if start >= end {
            return Ok(());
        }
        match self.dev.discard(start, end - start) {
            Err(BlockError::Unsupported) => Ok(()),
            r => r,
        }
    }

    /// Zeroes `[offset, offset + len)`: partial sectors by read-modify-write,
    /// whole sectors by `write_zeroes` or, failing that, zero buffers.
    fn zero(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        if len == 0 {
            return Ok(());
        }
        self.note_alignment(offset, len);
        let end = offset.checked_add(len).ok_or(BlockError::Invalid)?;
        let first = round_down(offset);
        let last = round_down(end - 1);
        if first == last && !(is_aligned(offset) && is_aligned(end)) {
            return self.zero_partial(offset, end);
        }
        let mut mid_start = offset;
        let mut mid_end = end;
        if !is_aligned(offset) {
            mid_start = round_up(offset).ok_or(BlockError::Invalid)?;
            self.zero_partial(offset, mid_start)?;
        }
        if !is_aligned(end) {
            mid_end = round_down(end);
            self.zero_partial(mid_end, end)?;
        }
        if mid_start >= mid_end {
            return Ok(());
        }
        match self.dev.write_zeroes(mid_start, mid_end - mid_start) {
            Err(BlockError::Unsupported) => {
                self.stats.zero_fallbacks += 1;
                self.write_zero_buffers(mid_start, mid_end)
            }
            r => r,
        }
    }

    /// Zeroes `[from, to)`, which lies within one sector.
    fn zero_partial(&mut self, from: u64, to: u64) -> Result<(), BlockError> {
        let sector_start = round_down(from);
        let mut sector = [0u8; SECTOR];
        self.dev.read(sector_start, &mut sector)?;
        let a = to_usize(from - sector_start)?;
        let b = to_usize(to - sector_start)?;
        sector.get_mut(a..b).ok_or(BlockError::Invalid)?.fill(0);
        self.dev.write(sector_start, &sector)
    }

    fn write_zero_buffers(&mut self, mut from: u64, to: u64) -> Result<(), BlockError> {
        let chunk_max = self.cfg.max_device_io as usize;
        // Iterations are bounded by length / max_device_io (<= 4 GiB / 512).
        while from < to {
            let n = to_usize((to - from).min(chunk_max as u64))?;
            if self.zeros.len() < n {
                self.zeros.resize(n, 0);
            }
            let z = self.zeros.get(..n).ok_or(BlockError::Invalid)?;
            self.dev.write(from, z)?;
            from += n as u64;
        }
        Ok(())
    }
}

/// Copies `src` into `buf` at `at`, failing instead of panicking if it does
/// not fit.
fn copy(buf: &mut [u8], at: usize, src: Option<&[u8]>) -> Result<(), BlockError> {
    let src = src.ok_or(BlockError::Invalid)?;
    buf.get_mut(at..)
        .and_then(|b| b.get_mut(..src.len()))
        .ok_or(BlockError::Invalid)?
        .copy_from_slice(src);
    Ok(())
}

/// Reads `buf` (a multiple of 512 bytes) from `offset`, at most `max` bytes
/// per device call.
fn dev_read(
    dev: &mut dyn BlockDevice,
    max: u32,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), BlockError> {
    let mut at = offset;
    for chunk in buf.chunks_mut(max as usize) {
        dev.read(at, chunk)?;
        at += chunk.len() as u64;
    }
    Ok(())
}

/// Writes `buf` (a multiple of 512 bytes) at `offset`, at most `max` bytes
/// per device call.
fn dev_write(
    dev: &mut dyn BlockDevice,
    max: u32,
    offset: u64,
    buf: &[u8],
) -> Result<(), BlockError> {
    let mut at = offset;
    for chunk in buf.chunks(max as usize) {
        dev.write(at, chunk)?;
        at += chunk.len() as u64;
    }
    Ok(())
}
