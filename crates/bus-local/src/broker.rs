//! The broker: the local bus's stand-in for a hypervisor that copies between
//! VMs (Xen's grant table and GNTTABOP_copy).
//!
//! A broker is a third process both sides trust. A frontend hands it the
//! pages of one request (GRANT, with the memfd the pages live in) naming the
//! process allowed to use them; the broker answers with a grant reference,
//! which the frontend passes to the backend over the bus. The backend never
//! maps those pages: it registers staging memory of its own (STAGING) and
//! asks the broker to COPY between a grant and its staging memory. The
//! broker checks every copy against its grant table: the grant must exist,
//! name the asking process, and cover every byte.
//!
//! Identities are process ids as the kernel reports them (`SO_PEERCRED`), so
//! neither side can claim to be someone else; grant references are per
//! granting process, like Xen's per-domain grant tables.
//!
//! Requests (little-endian; a reply echoes the op with bit 7 set and the
//! sequence number, then le32 status, le32 value):
//!
//! | op | name | payload from byte 8 | descriptor |
//! |---|---|---|---|
//! | 1 | STAGING | — | sealed memfd |
//! | 2 | GRANT | le32 grantee pid, le32 access (bit 0: grantee may read, bit 1: may write), le64 file offset, le64 len | sealed memfd |
//! | 3 | UNGRANT | le32 grant ref | — |
//! | 4 | COPY | le32 granter pid, le32 grant ref, u8 direction (0 grant → staging, 1 staging → grant), u8 count, 6 reserved, count × (le64 grant offset, le64 staging offset, le64 len) | — |
//!
//! Every request starts with u8 op, 3 reserved bytes, le32 sequence number.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ringfence_bus::{AreaRange, BusError, MAX_COPY_RANGES};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory, VolatileSlice};

use crate::sys::{self, Listener, Seqpacket};
use crate::wire::{le32, le64};

const OP_STAGING: u8 = 1;
const OP_GRANT: u8 = 2;
const OP_UNGRANT: u8 = 3;
const OP_COPY: u8 = 4;
const REPLY: u8 = 0x80;

/// Request done.
pub const STATUS_OK: u32 = 0;
/// The grant does not exist, is not the asker's, or does not cover the range.
pub const STATUS_DENIED: u32 = 1;
/// A malformed request.
pub const STATUS_INVALID: u32 = 2;
/// The broker could not do it (mapping failed, grant still in use).
pub const STATUS_FAILED: u32 = 3;

const HEADER: usize = 8;
const COPY_RANGE: usize = 24;
const COPY_FIXED: usize = HEADER + 16;
/// Largest request: a COPY with every range.
pub const MAX_REQUEST: usize = COPY_FIXED + MAX_COPY_RANGES * COPY_RANGE;
const REPLY_LEN: usize = 16;
/// How long a client waits for an answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an UNGRANT waits for copies in flight on that grant (less than
/// a client waits for the answer).
const UNGRANT_WAIT: Duration = Duration::from_secs(2);
/// Grants one connection may hold at once (each holds a descriptor).
pub const MAX_GRANTS_PER_CONNECTION: usize = 1024;
/// GRANT access bit: the grantee may copy from the grant.
pub const ACCESS_READ: u32 = 1;
/// GRANT access bit: the grantee may copy into the grant.
pub const ACCESS_WRITE: u32 = 2;

/// Direction of a COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyDirection {
    /// From the grant into the asker's staging memory.
    GrantToStaging,
    /// From the asker's staging memory into the grant.
    StagingToGrant,
}

/// One range of a COPY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyRange {
    /// Offset inside the grant.
    pub grant_offset: u64,
    /// Offset inside the asker's staging memory.
    pub staging_offset: u64,
    /// Bytes.
    pub len: u64,
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = buf.get_mut(at..at + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

/// One entry of the grant table.
struct GrantEntry {
    /// The broker connection that made it (only it may revoke it).
    owner: u64,
    /// The process allowed to copy from and to it.
    grantee: u32,
    /// ACCESS_READ | ACCESS_WRITE.
    access: u32,
    /// The granter's memfd. Copies use pread/pwrite on it rather than a
    /// mapping: nothing stays mapped after the grant ends, and a page the
    /// kernel cannot provide is an error, not a SIGBUS in the broker.
    file: File,
    offset: u64,
    len: u64,
}

#[derive(Default)]
struct Table {
    /// (granter pid, grant ref) → entry.
    grants: Mutex<HashMap<(u32, u32), Arc<GrantEntry>>>,
    next_conn: AtomicU64,
    copies: AtomicU64,
    bytes: AtomicU64,
    denied: AtomicU64,
}

/// A running broker.
pub struct Broker {
    table: Arc<Table>,
}

impl Default for Broker {
    fn default() -> Self {
        Self::new()
    }
}

impl Broker {
    /// An empty grant table.
    pub fn new() -> Self {
        Self {
            table: Arc::new(Table::default()),
        }
    }

    /// Serves connections from `listener`, each on its own thread, until
    /// accepting fails for good. Returns the error that stopped it.
    pub fn serve(&self, listener: &Listener) -> std::io::Error {
        loop {
            match listener.accept(None) {
                Ok(Some(sock)) => self.spawn(sock),
                Ok(None) => {}
                // Out of descriptors or a client gone before accept: the
                // broker serves on (every VM depends on it).
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(
                            libc::EMFILE
                                | libc::ENFILE
                                | libc::EINTR
                                | libc::ECONNABORTED
                                | libc::ENOBUFS
                                | libc::ENOMEM
                        )
                    ) =>
                {
                    tracing::warn!(error = %e, "broker: accept failed; retrying");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return e,
            }
        }
    }

    /// Serves one connection on its own thread.
    pub fn spawn(&self, sock: Seqpacket) {
        let table = self.table.clone();
        let spawned = std::thread::Builder::new()
            .name("broker-conn".into())
            .spawn(move || Conn::new(sock, table).map(|mut c| c.run()));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "broker: no thread for a connection");
        }
    }

    /// (copies done, bytes copied, requests denied) so far.
    pub fn counters(&self) -> (u64, u64, u64) {
        (
            self.table.copies.load(Ordering::Relaxed),
            self.table.bytes.load(Ordering::Relaxed),
            self.table.denied.load(Ordering::Relaxed),
        )
    }
}

/// The broker's side of one connection.
struct Conn {
    sock: Seqpacket,
    table: Arc<Table>,
    id: u64,
    pid: u32,
    staging: Option<Arc<MmapRegion>>,
    /// Grants this connection holds.
    grants: usize,
}

/// A refused request: the status to answer and why (for the log).
struct Refused(u32, String);

impl Conn {
    fn new(sock: Seqpacket, table: Arc<Table>) -> Option<Self> {
        let pid = match sock.peer_pid() {
            Ok(pid) => pid,
            Err(e) => {
                tracing::warn!(error = %e, "broker: peer without credentials");
                return None;
            }
        };
        let id = table.next_conn.fetch_add(1, Ordering::Relaxed);
        tracing::info!(pid, conn = id, "broker: peer connected");
        Some(Self {
            sock,
            table,
            id,
            pid,
            staging: None,
            grants: 0,
        })
    }

    fn run(&mut self) {
        let mut buf = [0u8; MAX_REQUEST];
        loop {
            let (n, files) = match self.sock.recv(&mut buf) {
                Ok(got) => got,
                Err(BusError::Disconnected) => break,
                Err(e) => {
                    tracing::warn!(pid = self.pid, error = %e, "broker: receive failed");
                    break;
                }
            };
            let req = buf.get(..n.min(buf.len())).unwrap_or(&[]);
            let op = req.first().copied().unwrap_or(0);
            let seq = le32(req, 4);
            let (status, value) = match self.handle(req, files) {
                Ok(value) => (STATUS_OK, value),
                Err(Refused(status, why)) => {
                    self.table.denied.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(pid = self.pid, op, "broker refused: {why}");
                    (status, 0)
                }
            };
            let mut reply = [0u8; REPLY_LEN];
            put(&mut reply, 0, &[op | REPLY]);
            put(&mut reply, 4, &seq.to_le_bytes());
            put(&mut reply, 8, &status.to_le_bytes());
            put(&mut reply, 12, &value.to_le_bytes());
            if self.sock.send_bounded(&reply, CALL_TIMEOUT).is_err() {
                break;
            }
        }
        // Grants die with the connection that made them.
        let mut grants = self.table.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants.retain(|_, g| g.owner != self.id);
        tracing::info!(pid = self.pid, conn = self.id, "broker: peer left");
    }

    fn handle(&mut self, req: &[u8], files: Vec<File>) -> Result<u32, Refused> {
        let invalid = |why: &str| Refused(STATUS_INVALID, why.to_string());
        let mut files = files.into_iter();
        match req.first().copied() {
            Some(OP_STAGING) if req.len() == HEADER => {
                let file = files
                    .next()
                    .ok_or_else(|| invalid("STAGING without memfd"))?;
                if self.staging.is_some() {
                    return Err(invalid("staging memory registered twice"));
                }
                self.staging = Some(map_memfd(&file)?);
                Ok(0)
            }
            Some(OP_GRANT) if req.len() == HEADER + 24 => {
                let file = files.next().ok_or_else(|| invalid("GRANT without memfd"))?;
                let (grantee, access) = (le32(req, 8), le32(req, 12));
                let (offset, len) = (le64(req, 16), le64(req, 24));
                if access == 0 || access & !(ACCESS_READ | ACCESS_WRITE) != 0 {
                    return Err(invalid("GRANT access bits"));
                }
                let end = offset
                    .checked_add(len)
                    .filter(|_| len > 0)
                    .ok_or_else(|| invalid("empty or overflowing grant"))?;
                // Sealed against shrinking and shmem: every granted byte
                // stays there for as long as the grant lives.
                sys::check_sealed_memfd(&file, end).map_err(|why| Refused(STATUS_INVALID, why))?;
                if self.grants >= MAX_GRANTS_PER_CONNECTION {
                    return Err(Refused(STATUS_FAILED, "too many grants".into()));
                }
                let entry = Arc::new(GrantEntry {
                    owner: self.id,
                    grantee,
                    access,
                    file,
                    offset,
                    len,
                });
                let mut grants = self.table.grants.lock().unwrap_or_else(|p| p.into_inner());
                // Unguessable, never 0, never one in use.
                let gref = loop {
                    let r = random_u32();
                    if r != 0 && !grants.contains_key(&(self.pid, r)) {
                        break r;
                    }
                };
                grants.insert((self.pid, gref), entry);
                self.grants += 1;
                Ok(gref)
            }
            Some(OP_UNGRANT) if req.len() == HEADER + 4 => {
                let key = (self.pid, le32(req, 8));
                let entry = {
                    let mut grants = self.table.grants.lock().unwrap_or_else(|p| p.into_inner());
                    match grants.get(&key) {
                        Some(g) if g.owner == self.id => grants.remove(&key),
                        _ => None,
                    }
                }
                .ok_or_else(|| Refused(STATUS_DENIED, format!("UNGRANT of unknown {key:?}")))?;
                self.grants = self.grants.saturating_sub(1);
                // A copy in flight holds the entry; the pages are the
                // granter's again only once it is done.
                let started = Instant::now();
                while Arc::strong_count(&entry) > 1 {
                    let waited = started.elapsed();
                    if waited > UNGRANT_WAIT {
                        return Err(Refused(STATUS_FAILED, "grant still in use".into()));
                    }
                    if waited < Duration::from_millis(1) {
                        std::thread::yield_now();
                    } else {
                        std::thread::sleep(Duration::from_micros(50));
                    }
                }
                Ok(0)
            }
            Some(OP_COPY) => self.copy(req),
            _ => Err(invalid("unknown or malformed request")),
        }
    }

    fn copy(&self, req: &[u8]) -> Result<u32, Refused> {
        let invalid = |why: &str| Refused(STATUS_INVALID, why.to_string());
        let (granter, gref) = (le32(req, 8), le32(req, 12));
        let direction = match req.get(16) {
            Some(0) => CopyDirection::GrantToStaging,
            Some(1) => CopyDirection::StagingToGrant,
            _ => return Err(invalid("COPY direction")),
        };
        let count = usize::from(req.get(17).copied().unwrap_or(0));
        if count == 0 || count > MAX_COPY_RANGES || req.len() != COPY_FIXED + count * COPY_RANGE {
            return Err(invalid("COPY range count"));
        }
        let staging = self
            .staging
            .as_ref()
            .ok_or_else(|| invalid("COPY before STAGING"))?;
        let entry = self
            .table
            .grants
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(granter, gref))
            .cloned()
            .filter(|g| g.grantee == self.pid)
            .ok_or_else(|| {
                Refused(
                    STATUS_DENIED,
                    format!("no grant {gref} of process {granter} for this process"),
                )
            })?;
        let needed = match direction {
            CopyDirection::GrantToStaging => ACCESS_READ,
            CopyDirection::StagingToGrant => ACCESS_WRITE,
        };
        if entry.access & needed == 0 {
            return Err(Refused(
                STATUS_DENIED,
                format!("grant {gref} does not allow {direction:?}"),
            ));
        }
        let mut bytes = 0u64;
        for i in 0..count {
            let at = COPY_FIXED + i * COPY_RANGE;
            let range = CopyRange {
                grant_offset: le64(req, at),
                staging_offset: le64(req, at + 8),
                len: le64(req, at + 16),
            };
            let file_at = range
                .grant_offset
                .checked_add(range.len)
                .filter(|&end| end <= entry.len)
                .and_then(|_| entry.offset.checked_add(range.grant_offset));
            let staged = region_slice(staging, range.staging_offset, range.len);
            let (Some(file_at), Some(staged)) = (file_at, staged) else {
                return Err(Refused(
                    STATUS_DENIED,
                    format!("{range:?} outside the grant or staging"),
                ));
            };
            let done = match direction {
                CopyDirection::GrantToStaging => file_to_slice(&entry.file, file_at, &staged),
                CopyDirection::StagingToGrant => slice_to_file(&staged, &entry.file, file_at),
            };
            done.map_err(|e| Refused(STATUS_FAILED, format!("{direction:?}: {e}")))?;
            bytes = bytes.saturating_add(range.len);
        }
        self.table.copies.fetch_add(1, Ordering::Relaxed);
        self.table.bytes.fetch_add(bytes, Ordering::Relaxed);
        Ok(0)
    }
}

/// A random number from the kernel (grant references must not be guessable).
fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most 4 bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 4 {
        // Only before the pool is initialised at boot; the time then.
        return Instant::now().elapsed().subsec_nanos() ^ std::process::id();
    }
    u32::from_le_bytes(b)
}

/// pread of `dst.len()` bytes at `at` of `file` into `dst`.
fn file_to_slice(file: &File, mut at: u64, dst: &VolatileSlice<'_>) -> std::io::Result<()> {
    let guard = dst.ptr_guard_mut();
    let mut done = 0usize;
    while done < dst.len() {
        let left = dst.len() - done;
        let off = libc::off64_t::try_from(at).map_err(std::io::Error::other)?;
        // SAFETY: `guard` points at `dst.len()` bytes of a live mapping
        // (the VolatileSlice's), and `done + left` never exceeds that.
        let n =
            unsafe { libc::pread64(file.as_raw_fd(), guard.as_ptr().add(done).cast(), left, off) };
        match n {
            n if n > 0 => {
                done += n as usize;
                at = at.saturating_add(n as u64);
            }
            0 => return Err(std::io::Error::other("memfd ended early")),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// pwrite of `src` to `file` at `at`.
fn slice_to_file(src: &VolatileSlice<'_>, file: &File, mut at: u64) -> std::io::Result<()> {
    let guard = src.ptr_guard();
    let mut done = 0usize;
    while done < src.len() {
        let left = src.len() - done;
        let off = libc::off64_t::try_from(at).map_err(std::io::Error::other)?;
        // SAFETY: `guard` points at `src.len()` readable bytes of a live
        // mapping, and `done + left` never exceeds that.
        let n =
            unsafe { libc::pwrite64(file.as_raw_fd(), guard.as_ptr().add(done).cast(), left, off) };
        match n {
            n if n > 0 => {
                done += n as usize;
                at = at.saturating_add(n as u64);
            }
            0 => return Err(std::io::Error::other("memfd write made no progress")),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

fn region_slice(m: &MmapRegion, offset: u64, len: u64) -> Option<vm_memory::VolatileSlice<'_>> {
    let offset = usize::try_from(offset).ok()?;
    let len = usize::try_from(len).ok()?;
    m.get_slice(offset, len).ok()
}

fn map_memfd(file: &File) -> Result<Arc<MmapRegion>, Refused> {
    let failed = |why: String| Refused(STATUS_FAILED, why);
    let size = file
        .metadata()
        .map_err(|e| failed(format!("fstat: {e}")))?
        .len();
    // Sealed against shrinking: the broker never faults on a page the
    // peer took away.
    sys::check_sealed_memfd(file, size).map_err(|why| Refused(STATUS_INVALID, why))?;
    let size = usize::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .ok_or_else(|| failed("empty memfd".into()))?;
    let dup = file.try_clone().map_err(|e| failed(format!("dup: {e}")))?;
    MmapRegion::build(
        Some(FileOffset::new(dup, 0)),
        size,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_NORESERVE,
    )
    .map(Arc::new)
    .map_err(|e| failed(format!("mmap: {e}")))
}

/// A connection to a broker, as a frontend or a backend uses it.
pub struct BrokerClient {
    sock: Seqpacket,
    /// One request at a time; holds the next sequence number.
    seq: Mutex<u32>,
    /// Set after a request timed out: the broker may still act on it late
    /// (a copy into a staging slot since reused), so nothing more is sent.
    broken: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for BrokerClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerClient").finish_non_exhaustive()
    }
}

impl BrokerClient {
    /// Connects to the broker listening at `path`.
    pub fn connect(path: &Path) -> Result<Self, BusError> {
        let sock = Seqpacket::connect(path).map_err(|e| BusError::io("connect to broker", e))?;
        Ok(Self::over(sock))
    }

    /// Uses an already connected socket.
    pub fn over(sock: Seqpacket) -> Self {
        Self {
            sock,
            seq: Mutex::new(1),
            broken: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn call(&self, req: &mut [u8], fd: Option<&File>) -> Result<u32, BusError> {
        let mut seq_guard = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        let seq = *seq_guard;
        *seq_guard = seq.wrapping_add(1);
        put(req, 4, &seq.to_le_bytes());
        let op = req.first().copied().unwrap_or(0);
        if self.broken.load(Ordering::SeqCst) {
            return Err(BusError::Protocol {
                reason: "broker connection unusable after a timeout".into(),
            });
        }
        let deadline = Instant::now() + CALL_TIMEOUT;
        // A broker that stops reading cannot block the caller for good.
        if !self.sock.wait_writable(Some(CALL_TIMEOUT))? {
            self.broken.store(true, Ordering::SeqCst);
            return Err(BusError::Timeout(CALL_TIMEOUT));
        }
        let fds: Vec<_> = fd.iter().map(|f| f.as_raw_fd()).collect();
        self.sock.send(req, &fds)?;
        let mut reply = [0u8; REPLY_LEN];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.sock.wait_readable(Some(left))? {
                self.broken.store(true, Ordering::SeqCst);
                return Err(BusError::Timeout(CALL_TIMEOUT));
            }
            let Some((n, _)) = self.sock.recv_nowait(&mut reply)? else {
                continue;
            };
            // A late answer to a request that timed out is skipped.
            if n != REPLY_LEN || reply[0] != op | REPLY || le32(&reply, 4) != seq {
                continue;
            }
            return match le32(&reply, 8) {
                STATUS_OK => Ok(le32(&reply, 12)),
                status => Err(BusError::Protocol {
                    reason: format!("broker refused op {op} (status {status})"),
                }),
            };
        }
    }

    /// Registers `file` (a sealed memfd) as this connection's staging memory.
    pub fn register_staging(&self, file: &File) -> Result<(), BusError> {
        let mut req = [0u8; HEADER];
        req[0] = OP_STAGING;
        self.call(&mut req, Some(file)).map(|_| ())
    }

    /// Grants process `grantee` copies from (`ACCESS_READ`) and/or to
    /// (`ACCESS_WRITE`) `len` bytes of `file` at `offset`; returns the
    /// grant reference.
    pub fn grant(
        &self,
        grantee: u32,
        access: u32,
        file: &File,
        offset: u64,
        len: u64,
    ) -> Result<u32, BusError> {
        let mut req = [0u8; HEADER + 24];
        req[0] = OP_GRANT;
        put(&mut req, 8, &grantee.to_le_bytes());
        put(&mut req, 12, &access.to_le_bytes());
        put(&mut req, 16, &offset.to_le_bytes());
        put(&mut req, 24, &len.to_le_bytes());
        self.call(&mut req, Some(file))
    }

    /// Ends grant `gref`; returns once no copy uses it.
    pub fn ungrant(&self, gref: u32) -> Result<(), BusError> {
        let mut req = [0u8; HEADER + 4];
        req[0] = OP_UNGRANT;
        put(&mut req, 8, &gref.to_le_bytes());
        self.call(&mut req, None).map(|_| ())
    }

    /// Copies `ranges` between grant `gref` of process `granter` and this
    /// connection's staging memory.
    pub fn copy(
        &self,
        granter: u32,
        gref: u32,
        direction: CopyDirection,
        ranges: &[CopyRange],
    ) -> Result<(), BusError> {
        if ranges.is_empty() || ranges.len() > MAX_COPY_RANGES {
            return Err(BusError::Protocol {
                reason: format!("{} ranges in one copy", ranges.len()),
            });
        }
        let mut req = [0u8; MAX_REQUEST];
        req[0] = OP_COPY;
        put(&mut req, 8, &granter.to_le_bytes());
        put(&mut req, 12, &gref.to_le_bytes());
        req[16] = match direction {
            CopyDirection::GrantToStaging => 0,
            CopyDirection::StagingToGrant => 1,
        };
        req[17] = ranges.len() as u8;
        for (i, r) in ranges.iter().enumerate() {
            let at = COPY_FIXED + i * COPY_RANGE;
            put(&mut req, at, &r.grant_offset.to_le_bytes());
            put(&mut req, at + 8, &r.staging_offset.to_le_bytes());
            put(&mut req, at + 16, &r.len.to_le_bytes());
        }
        let len = COPY_FIXED + ranges.len() * COPY_RANGE;
        self.call(req.get_mut(..len).unwrap_or(&mut []), None)
            .map(|_| ())
    }
}

/// Converts a bus-level range of an area into the broker's terms.
pub(crate) fn to_copy_range(r: &AreaRange, staging_base: u64) -> Option<CopyRange> {
    Some(CopyRange {
        grant_offset: r.offset,
        staging_offset: staging_base.checked_add(r.offset)?,
        len: r.len,
    })
}
