//! An NBD server: exposes a [`BlockDevice`] to ordinary programs
//! (`qemu-img`, `qemu-io`, `nbd-client`, libnbd) over a Unix or TCP socket.
//!
//! The frontend VM uses it to publish the remote virtio-blk disk it drives;
//! the server knows nothing about virtio, it only calls [`BlockDevice`].
//!
//! # Protocol subset
//! - Fixed newstyle negotiation only (`NBDMAGIC`, `IHAVEOPT`, handshake flags
//!   `FIXED_NEWSTYLE | NO_ZEROES`). Client flags other than `C_FIXED_NEWSTYLE`
//!   and `C_NO_ZEROES` end the connection, as the protocol requires.
//! - Options: `EXPORT_NAME`, `GO`, `INFO` (answering `NBD_INFO_EXPORT` and
//!   `NBD_INFO_BLOCK_SIZE`: minimum 512, preferred
//!   [`NbdConfig::preferred_block_size`], maximum [`NbdConfig::max_payload`]),
//!   `ABORT`, `LIST`. Anything else, including `STARTTLS`,
//!   `STRUCTURED_REPLY` and `EXTENDED_HEADERS`, gets `NBD_REP_ERR_UNSUP`.
//! - Simple replies only. Commands `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`,
//!   `WRITE_ZEROES`; flag `FUA` (a flush after the operation) on any command
//!   and `NO_HOLE` on `WRITE_ZEROES`. `CAN_MULTI_CONN` is never advertised.
//!
//! # Export names
//! A client may ask for the configured export name or for the empty name
//! (the protocol's "default export", which is what `qemu-io nbd+unix:///` and
//! `nbd-client` without `-N` send). Any other name is refused:
//! `NBD_REP_ERR_UNKNOWN` for `GO`/`INFO`, a closed connection for
//! `EXPORT_NAME` (which has no way to report an error). `LIST` returns the
//! configured name.
//!
//! # Alignment
//! NBD allows byte granularity; the device only ever sees 512-aligned offsets
//! and lengths. Unaligned reads read the covering sectors; unaligned writes
//! and write-zeroes read-modify-write the partial head and tail sectors;
//! unaligned trims shrink to the sectors wholly inside the range (trim is a
//! hint). The export size is [`BlockDevice::size`] rounded down to 512.
//! Read-modify-write is safe because one connection is served at a time.
//!
//! # Hostile clients
//! The client is a local program, but nothing it sends is trusted:
//! - an option longer than [`NbdConfig::max_option_len`] is read and dropped
//!   (up to [`OPTION_DISCARD_MAX`]) and answered `NBD_REP_ERR_TOO_BIG`; a
//!   longer one, or a too-long `EXPORT_NAME`, closes the connection. At most
//!   [`NbdConfig::max_options`] options are accepted per connection.
//! - `READ` longer than [`NbdConfig::max_payload`] gets `EINVAL`. A `WRITE`
//!   longer than that gets `EINVAL` and the connection is closed: skipping up
//!   to 4 GiB of payload to stay in sync is not worth it for a request the
//!   client was told not to send.
//! - Ranges are checked with checked arithmetic: beyond the end (or
//!   overflowing `u64`) gives `ENOSPC` for `WRITE`/`WRITE_ZEROES` (as the
//!   protocol recommends) and `EINVAL` for `READ`/`TRIM`. The payload of a
//!   refused `WRITE` is always read and dropped, so the stream stays in sync.
//! - Unknown commands, and flags not valid for a command, get `EINVAL`.
//!   Writes to a read-only export get `EPERM`.
//! - A bad request or option magic closes the connection (the stream cannot
//!   be resynchronised).
//!
//! Memory per connection is bounded by one buffer of `max_payload + 1024`
//! bytes (grown on demand) plus small fixed buffers.
//!
//! # Serving
//! [`NbdServer::serve_connection`] serves one already-connected stream;
//! [`NbdServer::serve`] accepts clients on a [`Listen`] socket and serves them
//! one after another, never two at once: the device is `&mut`, and NBD
//! without `CAN_MULTI_CONN` gives no cache coherence between connections
//! anyway. A second client waits in the listen backlog until the first
//! disconnects, so a client that stalls (stops sending without closing)
//! blocks the others; there is no idle timeout.

mod negotiate;
mod transmit;
pub mod wire;

use std::convert::Infallible;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sector size: every device access is a multiple of this, at an offset that
/// is a multiple of this. Also the advertised minimum block size.
pub const SECTOR_SIZE: u64 = 512;
/// Largest option payload that is read and dropped to answer
/// `NBD_REP_ERR_TOO_BIG`; beyond it the connection is closed.
pub const OPTION_DISCARD_MAX: u32 = 1 << 20;
/// The largest request the protocol lets a client send without having been
/// told a maximum: 32 MiB.
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// Why a device operation failed. Each maps to an NBD error value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    /// The device failed the I/O (`NBD_EIO`).
    #[error("device I/O error")]
    Io,
    /// The device refused the arguments (`NBD_EINVAL`).
    #[error("invalid request")]
    Invalid,
    /// Out of space (`NBD_ENOSPC`).
    #[error("no space left on device")]
    NoSpace,
    /// The device is read-only (`NBD_EPERM`).
    #[error("device is read-only")]
    ReadOnly,
    /// The device does not implement this operation (`NBD_ENOTSUP`). For
    /// `discard` the server then ignores the trim; for `write_zeroes` it
    /// writes zero buffers instead; for `flush` it assumes there is no
    /// volatile cache.
    #[error("operation not supported")]
    Unsupported,
}

impl BlockError {
    /// The NBD error value sent to the client.
    pub fn nbd_errno(self) -> u32 {
        match self {
            Self::Io => wire::EIO,
            Self::Invalid => wire::EINVAL,
            Self::NoSpace => wire::ENOSPC,
            Self::ReadOnly => wire::EPERM,
            Self::Unsupported => wire::ENOTSUP,
        }
    }
}

/// The disk the server exports.
///
/// The server guarantees that every `offset` and every length (`buf.len()`
/// or `len`) it passes is a multiple of [`SECTOR_SIZE`], that the range lies
/// within `size()` rounded down to 512, and that `read`/`write` buffers are at
/// most [`NbdConfig::max_device_io`] bytes. `discard` and `write_zeroes`
/// ranges can be up to 4 GiB; split them if the device needs to.
pub trait BlockDevice {
    /// Size in bytes. Read once per connection.
    fn size(&self) -> u64;
    /// Whether writes must be refused (advertised as `NBD_FLAG_READ_ONLY`).
    /// Read once per connection.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `buf` at `offset`.
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> Result<(), BlockError>;
    /// Discards a range (a hint; may return [`BlockError::Unsupported`]).
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Zeroes a range (may return [`BlockError::Unsupported`]: the server
    /// then writes zero buffers).
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError>;
}

/// Server limits and advertised block sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdConfig {
    /// Largest READ / WRITE length accepted, advertised as the maximum block
    /// size. A multiple of 512, at most 256 MiB. Default 32 MiB, the size
    /// clients that never asked for block sizes may assume.
    pub max_payload: u32,
    /// Advertised preferred block size: a power of two, at least 512 and at
    /// most `max_payload`. Default 4096.
    pub preferred_block_size: u32,
    /// Largest device `read`/`write` call; bigger requests are split. A
    /// multiple of 512. Default 1 MiB (the virtio-blk backend's segment
    /// limit).
    pub max_device_io: u32,
    /// Largest option payload processed. At least 4102 (a 4096-byte export
    /// name in `GO`). Default 8 KiB.
    pub max_option_len: u32,
    /// Most options accepted before transmission; more close the connection.
    /// Default 256.
    pub max_options: u32,
}

impl Default for NbdConfig {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
            preferred_block_size: 4096,
            max_device_io: 1 << 20,
            max_option_len: 8 << 10,
            max_options: 256,
        }
    }
}

/// How a connection ended when it ended without error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnEnd {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between two requests.
    #[default]
    Eof,
    /// The client sent `NBD_OPT_ABORT`.
    Abort,
    /// The client closed the connection between two options.
    HandshakeEof,
}

/// What one connection did. Returned by [`NbdServer::serve_connection`] and
/// added to the server-wide [`NbdStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnStats {
    /// Options received during negotiation.
    pub options: u64,
    /// Options answered with an error reply.
    pub options_refused: u64,
    /// Requests received (including DISC and refused ones).
    pub requests: u64,
    /// Successful READs.
    pub reads: u64,
    /// Successful WRITEs.
    pub writes: u64,
    /// Successful FLUSHes (not counting FUA flushes).
    pub flushes: u64,
    /// Successful TRIMs (including ones ignored as unsupported or too small).
    pub trims: u64,
    /// Successful WRITE_ZEROES.
    pub write_zeroes: u64,
    /// Bytes returned by successful READs.
    pub bytes_read: u64,
    /// Bytes stored by successful WRITEs.
    pub bytes_written: u64,
    /// Requests whose offset or length was not 512-aligned
    /// (read-modify-write or a shrunk trim).
    pub unaligned: u64,
    /// WRITE_ZEROES served by writing zero buffers.
    pub zero_fallbacks: u64,
    /// Replies with a non-zero error.
    pub error_replies: u64,
    /// Of those, requests refused before reaching the device (bad command,
    /// flags, range, length or a write to a read-only export).
    pub invalid_requests: u64,
    /// How the connection ended.
    pub end: ConnEnd,
}

/// Server-wide counters, summed over all connections.
#[derive(Debug, Default)]
pub struct NbdStats {
    /// Connections served (ended with or without error).
    pub connections: AtomicU64,
    /// Connections that ended with an error (I/O or protocol violation).
    pub failed_connections: AtomicU64,
    /// Requests received.
    pub requests: AtomicU64,
    /// Bytes returned by READs.
    pub bytes_read: AtomicU64,
    /// Bytes stored by WRITEs.
    pub bytes_written: AtomicU64,
    /// Replies with a non-zero error.
    pub error_replies: AtomicU64,
    /// Requests refused before reaching the device.
    pub invalid_requests: AtomicU64,
    /// Options answered with an error reply.
    pub options_refused: AtomicU64,
}

impl NbdStats {
    fn add(&self, c: &ConnStats, failed: bool) {
        let add = |a: &AtomicU64, v: u64| {
            a.fetch_add(v, Ordering::Relaxed);
        };
        add(&self.connections, 1);
        add(&self.failed_connections, u64::from(failed));
        add(&self.requests, c.requests);
        add(&self.bytes_read, c.bytes_read);
        add(&self.bytes_written, c.bytes_written);
        add(&self.error_replies, c.error_replies);
        add(&self.invalid_requests, c.invalid_requests);
        add(&self.options_refused, c.options_refused);
    }
}

/// Why a connection (or the server) stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Reading or writing the connection failed (including the client
    /// closing it in the middle of a message).
    #[error("NBD connection I/O failed")]
    Io(#[from] io::Error),
    /// Accepting a connection failed in a way that will not go away.
    #[error("accepting an NBD connection failed")]
    Accept(#[source] io::Error),
    /// The configuration is unusable.
    #[error("invalid NBD configuration: {field} {reason}")]
    Config {
        /// The offending field of [`NbdConfig`].
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The client set client flags this server does not know.
    #[error("client sent unknown client flags {flags:#x}")]
    BadClientFlags {
        /// The flags received.
        flags: u32,
    },
    /// An option did not start with `IHAVEOPT`.
    #[error("client option has bad magic {magic:#x}")]
    BadOptionMagic {
        /// The magic received.
        magic: u64,
    },
    /// An option payload was too large to even skip, or an `EXPORT_NAME`
    /// was too large (it cannot be answered with an error).
    #[error("client option {option} has length {len}, over the limit")]
    OptionTooBig {
        /// The option number.
        option: u32,
        /// Its announced length.
        len: u32,
    },
    /// The client sent more options than [`NbdConfig::max_options`].
    #[error("client sent more than {limit} options")]
    TooManyOptions {
        /// The limit.
        limit: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist; the
    /// protocol only allows closing the connection.
    #[error("client asked for unknown export {name:?}")]
    UnknownExport {
        /// The name asked for (lossily decoded).
        name: String,
    },
    /// A request did not start with the request magic.
    #[error("client request has bad magic {magic:#x}")]
    BadRequestMagic {
        /// The magic received.
        magic: u32,
    },
    /// A WRITE carried more payload than [`NbdConfig::max_payload`]; it was
    /// answered `EINVAL` and the connection closed.
    #[error("client WRITE of {len} bytes exceeds the maximum of {max}")]
    PayloadTooBig {
        /// The announced length.
        len: u32,
        /// The limit.
        max: u32,
    },
}

/// A listening socket for [`NbdServer::serve`].
#[derive(Debug)]
pub enum Listen {
    /// A Unix stream socket (`nbd+unix:///?socket=PATH`).
    Unix(UnixListener),
    /// A TCP socket (`nbd://HOST:PORT/`).
    Tcp(TcpListener),
}

impl Listen {
    /// Binds a Unix socket at `path`, first removing a stale socket left
    /// there (but nothing that is not a socket).
    pub fn bind_unix(path: &Path) -> io::Result<Self> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if meta.file_type().is_socket() {
                std::fs::remove_file(path)?;
            }
        }
        UnixListener::bind(path).map(Self::Unix)
    }

    /// Binds a TCP socket (the IANA port for NBD is 10809).
    pub fn bind_tcp(addr: impl std::net::ToSocketAddrs) -> io::Result<Self> {
        TcpListener::bind(addr).map(Self::Tcp)
    }

    fn accept(&self) -> io::Result<Stream> {
        match self {
            Self::Unix(l) => l.accept().map(|(s, _)| Stream::Unix(s)),
            Self::Tcp(l) => {
                let (s, peer) = l.accept()?;
                // Replies are written as header + data; without NODELAY the
                // second write can wait for the client's delayed ACK.
                if let Err(e) = s.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "TCP_NODELAY failed");
                }
                Ok(Stream::Tcp(s))
            }
        }
    }
}

impl From<UnixListener> for Listen {
    fn from(l: UnixListener) -> Self {
        Self::Unix(l)
    }
}

impl From<TcpListener> for Listen {
    fn from(l: TcpListener) -> Self {
        Self::Tcp(l)
    }
}

/// An accepted connection of either kind.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.flush(),
            Self::Tcp(s) => s.flush(),
        }
    }
}

/// The NBD server: configuration plus server-wide counters. Holds no
/// connection state, so one value can serve any number of connections in
/// turn (and be shared behind an `Arc` to read [`NbdServer::stats`]).
#[derive(Debug, Default)]
pub struct NbdServer {
    config: NbdConfig,
    stats: NbdStats,
}

impl NbdServer {
    /// Checks `config` and builds a server.
    pub fn new(config: NbdConfig) -> Result<Self, NbdError> {
        let bad = |field, reason| Err(NbdError::Config { field, reason });
        let sector = SECTOR_SIZE as u32;
        if config.max_payload < sector
            || !config.max_payload.is_multiple_of(sector)
            || config.max_payload > 256 << 20
        {
            return bad("max_payload", "must be a multiple of 512 in 512..=256 MiB");
        }
        if !config.preferred_block_size.is_power_of_two()
            || config.preferred_block_size < sector
            || config.preferred_block_size > config.max_payload
        {
            return bad(
                "preferred_block_size",
                "must be a power of two in 512..=max_payload",
            );
        }
        if config.max_device_io < sector || !config.max_device_io.is_multiple_of(sector) {
            return bad("max_device_io", "must be a non-zero multiple of 512");
        }
        if config.max_option_len < 4102 || config.max_option_len > OPTION_DISCARD_MAX {
            return bad("max_option_len", "must be in 4102..=1 MiB");
        }
        if config.max_options == 0 {
            return bad("max_options", "must be non-zero");
        }
        Ok(Self {
            config,
            stats: NbdStats::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &NbdConfig {
        &self.config
    }

    /// Server-wide counters.
    pub fn stats(&self) -> &NbdStats {
        &self.stats
    }

    /// Serves one client on `stream` until it sends `NBD_CMD_DISC`,
    /// `NBD_OPT_ABORT` or closes the connection, then returns what it did.
    ///
    /// `export_name` is the name offered by `LIST` and accepted by
    /// `GO`/`INFO`/`EXPORT_NAME` (the empty name is accepted too). An error
    /// means the connection had to be dropped: an I/O failure or a protocol
    /// violation; the device is left consistent in every case (each request
    /// is either done or not started).
    pub fn serve_connection<S: Read + Write>(
        &self,
        mut stream: S,
        dev: &mut dyn BlockDevice,
        export_name: &str,
    ) -> Result<ConnStats, NbdError> {
        let mut stats = ConnStats::default();
        let res = self.run(&mut stream, dev, export_name, &mut stats);
        self.stats.add(&stats, res.is_err());
        match res {
            Ok(end) => {
                stats.end = end;
                tracing::debug!(?stats, "NBD connection finished");
                Ok(stats)
            }
            Err(e) => {
                tracing::debug!(?stats, error = %e, "NBD connection failed");
                Err(e)
            }
        }
    }

    fn run<S: Read + Write>(
        &self,
        s: &mut S,
        dev: &mut dyn BlockDevice,
        export_name: &str,
        stats: &mut ConnStats,
    ) -> Result<ConnEnd, NbdError> {
        let raw_size = dev.size();
        let size = raw_size & !(SECTOR_SIZE - 1);
        if size != raw_size {
            tracing::warn!(
                raw_size,
                size,
                "device size not a multiple of 512; exporting the aligned part"
            );
        }
        let read_only = dev.read_only();
        let export = negotiate::Export {
            name: export_name,
            size,
            flags: transmission_flags(read_only),
        };
        match negotiate::negotiate(s, &self.config, &export, stats)? {
            negotiate::Outcome::Transmission => {}
            negotiate::Outcome::End(end) => return Ok(end),
        }
        tracing::debug!(size, read_only, "NBD transmission phase");
        transmit::Conn::new(dev, &self.config, size, read_only, stats).run(s)
    }

    /// Accepts one client on `listen` and serves it to the end.
    pub fn serve_one(
        &self,
        listen: &Listen,
        dev: &mut dyn BlockDevice,
        export_name: &str,
    ) -> Result<ConnStats, NbdError> {
        let stream = loop {
            match listen.accept() {
                Ok(s) => break s,
                Err(e) => match accept_retry(&e) {
                    Some(pause) => {
                        tracing::warn!(error = %e, "NBD accept failed, retrying");
                        std::thread::sleep(pause);
                    }
                    None => return Err(NbdError::Accept(e)),
                },
            }
        };
        self.serve_connection(stream, dev, export_name)
    }

    /// Serves clients on `listen` one after another, forever. A client's
    /// failure is logged and the next client is served; only a persistent
    /// accept failure returns.
    pub fn serve(
        &self,
        listen: &Listen,
        dev: &mut dyn BlockDevice,
        export_name: &str,
    ) -> Result<Infallible, NbdError> {
        loop {
            match self.serve_one(listen, dev, export_name) {
                Ok(stats) => tracing::info!(
                    requests = stats.requests,
                    bytes_read = stats.bytes_read,
                    bytes_written = stats.bytes_written,
                    end = ?stats.end,
                    "NBD client done"
                ),
                Err(e @ NbdError::Accept(_)) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "NBD client dropped"),
            }
        }
    }
}

/// Whether an accept error is worth retrying, and after how long.
fn accept_retry(e: &io::Error) -> Option<Duration> {
    match e.raw_os_error() {
        Some(libc::EINTR | libc::ECONNABORTED | libc::EPROTO | libc::EPERM) => Some(Duration::ZERO),
        // Out of descriptors or memory: wait for some to be released
        // instead of spinning.
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            Some(Duration::from_millis(100))
        }
        _ if e.kind() == io::ErrorKind::Interrupted => Some(Duration::ZERO),
        _ => None,
    }
}

/// Transmission flags for an export.
fn transmission_flags(read_only: bool) -> u16 {
    use wire::*;
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        assert!(NbdServer::new(NbdConfig::default()).is_ok());
        let bad = |c: NbdConfig| match NbdServer::new(c) {
            Err(NbdError::Config { field, .. }) => field,
            other => panic!("expected a config error, got {other:?}"),
        };
        let d = NbdConfig::default;
        assert_eq!(
            bad(NbdConfig {
                max_payload: 1000,
                ..d()
            }),
            "max_payload"
        );
        assert_eq!(
            bad(NbdConfig {
                preferred_block_size: 3000,
                ..d()
            }),
            "preferred_block_size"
        );
        assert_eq!(
            bad(NbdConfig {
                max_device_io: 0,
                ..d()
            }),
            "max_device_io"
        );
        assert_eq!(
            bad(NbdConfig {
                max_option_len: 100,
                ..d()
            }),
            "max_option_len"
        );
        assert_eq!(
            bad(NbdConfig {
                max_options: 0,
                ..d()
            }),
            "max_options"
        );
    }

    #[test]
    fn flags() {
        use wire::*;
        let rw = transmission_flags(false);
        assert_eq!(
            rw,
            FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
        );
        assert_eq!(rw & FLAG_CAN_MULTI_CONN, 0);
        let ro = transmission_flags(true);
        assert_eq!(ro & FLAG_READ_ONLY, FLAG_READ_ONLY);
        assert_eq!(ro & (FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES), 0);
    }
}
