//! Shared test doubles: an in-memory disk that insists on 512-aligned I/O,
//! and a raw NBD client that speaks the wire format by hand (with its own
//! copies of the protocol numbers, so the server's constants are checked
//! rather than reused).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ringfence_nbd::{BlockDevice, BlockError, ConnStats, Listen, NbdError, NbdServer};

pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454F5054;
pub const OPT_REPLY_MAGIC: u64 = 0x3e889045565a9;
pub const REQUEST_MAGIC: u32 = 0x25609513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const FUA: u16 = 1;
pub const NO_HOLE: u16 = 2;
pub const DF: u16 = 4;
pub const FAST_ZERO: u16 = 16;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_TRIM | SEND_WRITE_ZEROES.
pub const RW_FLAGS: u16 = 1 | 4 | 8 | 32 | 64;
/// HAS_FLAGS | READ_ONLY | SEND_FLUSH | SEND_FUA.
pub const RO_FLAGS: u16 = 1 | 2 | 4 | 8;

/// A device operation as the disk saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read(u64, u64),
    Write(u64, u64),
    Flush,
    Discard(u64, u64),
    Zeroes(u64, u64),
}

/// A disk in a `Vec`. Panics on any access that is not 512-aligned or not
/// inside the disk: the server promises never to send one.
#[derive(Debug, Default)]
pub struct MemDisk {
    pub data: Vec<u8>,
    pub read_only: bool,
    pub discard_supported: bool,
    pub zeroes_supported: bool,
    /// Any access touching this byte offset fails with `Io`.
    pub fail_at: Option<u64>,
    pub ops: Vec<Op>,
}

impl MemDisk {
    pub fn new(size: usize) -> Self {
        Self {
            data: vec![0; size],
            discard_supported: true,
            zeroes_supported: true,
            ..Self::default()
        }
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        assert_eq!(offset % 512, 0, "unaligned device offset {offset}");
        assert_eq!(len % 512, 0, "unaligned device length {len}");
        let end = offset.checked_add(len).expect("overflow");
        assert!(
            end <= self.data.len() as u64 / 512 * 512,
            "device access {offset}+{len} beyond the aligned size"
        );
        if let Some(f) = self.fail_at {
            if f >= offset && f < end {
                return Err(BlockError::Io);
            }
        }
        Ok(())
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.ops.push(Op::Read(offset, buf.len() as u64));
        self.check(offset, buf.len() as u64)?;
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.ops.push(Op::Write(offset, buf.len() as u64));
        assert!(!self.read_only, "write reached a read-only device");
        self.check(offset, buf.len() as u64)?;
        let o = offset as usize;
        self.data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.ops.push(Op::Flush);
        Ok(())
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.ops.push(Op::Discard(offset, len));
        self.check(offset, len)?;
        if !self.discard_supported {
            return Err(BlockError::Unsupported);
        }
        // Discarded data reads back as 0xdd, so tests see exactly which
        // sectors were discarded.
        self.data[offset as usize..(offset + len) as usize].fill(0xdd);
        Ok(())
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.ops.push(Op::Zeroes(offset, len));
        self.check(offset, len)?;
        if !self.zeroes_supported {
            return Err(BlockError::Unsupported);
        }
        self.data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
}

/// A `MemDisk` shared between a serving thread and the test.
#[derive(Debug, Clone)]
pub struct SharedDisk(pub Arc<Mutex<MemDisk>>);

impl SharedDisk {
    pub fn new(disk: MemDisk) -> Self {
        Self(Arc::new(Mutex::new(disk)))
    }
    pub fn data(&self) -> Vec<u8> {
        self.0.lock().unwrap().data.clone()
    }
}

impl BlockDevice for SharedDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().size()
    }
    fn read_only(&self) -> bool {
        self.0.lock().unwrap().read_only
    }
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        self.0.lock().unwrap().read(offset, buf)
    }
    fn write(&mut self, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
        self.0.lock().unwrap().write(offset, buf)
    }
    fn flush(&mut self) -> Result<(), BlockError> {
        self.0.lock().unwrap().flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.0.lock().unwrap().discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.0.lock().unwrap().write_zeroes(offset, len)
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("ringfence-nbd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub type Served = JoinHandle<(Result<ConnStats, NbdError>, MemDisk)>;

/// Serves `disk` on one end of a socket pair in a thread; the other end is
/// returned as a raw client.
pub fn start(server: Arc<NbdServer>, mut disk: MemDisk, name: &'static str) -> (Client, Served) {
    let (a, b) = UnixStream::pair().unwrap();
    let h = std::thread::spawn(move || {
        let r = server.serve_connection(b, &mut disk, name);
        (r, disk)
    });
    a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    (Client { s: a }, h)
}

/// A hand-written NBD client.
pub struct Client {
    pub s: UnixStream,
}

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl Client {
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// True if the server closed the connection (nothing more to read).
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }

    /// Reads the greeting, checks it, sends `client_flags`.
    pub fn hello(&mut self, client_flags: u32) {
        let g = self.take(18);
        assert_eq!(be64(&g), NBDMAGIC);
        assert_eq!(be64(&g[8..]), IHAVEOPT);
        assert_eq!(be16(&g[16..]), 3, "FIXED_NEWSTYLE | NO_ZEROES");
        self.s.write_all(&client_flags.to_be_bytes()).unwrap();
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        self.option_len(opt, data.len() as u32, data);
    }

    /// Sends an option header announcing `len` bytes, then `data`.
    pub fn option_len(&mut self, opt: u32, len: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.s.write_all(&m).unwrap();
    }

    /// Reads one option reply, checking magic and echoed option.
    pub fn opt_reply(&mut self, opt: u32) -> (u32, Vec<u8>) {
        let h = self.take(20);
        assert_eq!(be64(&h), OPT_REPLY_MAGIC);
        assert_eq!(be32(&h[8..]), opt);
        let kind = be32(&h[12..]);
        let len = be32(&h[16..]) as usize;
        (kind, self.take(len))
    }

    pub fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Sends GO (asking for BLOCK_SIZE) and returns (size, flags, block
    /// sizes) from the INFO replies.
    pub fn go(&mut self, name: &str) -> (u64, u16, Option<(u32, u32, u32)>) {
        self.option(OPT_GO, &Self::info_data(name, &[3]));
        self.read_infos(OPT_GO)
    }

    pub fn read_infos(&mut self, opt: u32) -> (u64, u16, Option<(u32, u32, u32)>) {
        let mut export = None;
        let mut bs = None;
        loop {
            let (kind, d) = self.opt_reply(opt);
            match kind {
                REP_INFO => match be16(&d) {
                    0 => {
                        assert_eq!(d.len(), 12);
                        export = Some((be64(&d[2..]), be16(&d[10..])));
                    }
                    3 => {
                        assert_eq!(d.len(), 14);
                        bs = Some((be32(&d[2..]), be32(&d[6..]), be32(&d[10..])));
                    }
                    t => panic!("unexpected info type {t}"),
                },
                REP_ACK => break,
                k => panic!("unexpected reply {k:#x}: {:?}", String::from_utf8_lossy(&d)),
            }
        }
        let (size, flags) = export.expect("NBD_INFO_EXPORT is mandatory");
        (size, flags, bs)
    }

    /// Greeting, flags, GO on the default export.
    pub fn connect(&mut self) -> (u64, u16) {
        self.hello(3);
        let (size, flags, _) = self.go("");
        (size, flags)
    }

    pub fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) {
        let mut m = Vec::new();
        m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        self.s.write_all(&m).unwrap();
    }

    /// Reads a simple reply header for `cookie`; returns the error.
    pub fn reply(&mut self, cookie: u64) -> u32 {
        let r = self.take(16);
        assert_eq!(be32(&r), SIMPLE_REPLY_MAGIC);
        assert_eq!(be64(&r[8..]), cookie, "reply for another request");
        be32(&r[4..])
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, 0x7ead, offset, len);
        match self.reply(0x7ead) {
            0 => Ok(self.take(len as usize)),
            e => Err(e),
        }
    }

    pub fn write_flags(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.request(flags, CMD_WRITE, 0x3717e, offset, data.len() as u32);
        self.s.write_all(data).unwrap();
        self.reply(0x3717e)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.write_flags(0, offset, data)
    }

    /// A command without payload or reply data.
    pub fn cmd(&mut self, flags: u16, kind: u16, offset: u64, len: u32) -> u32 {
        self.request(flags, kind, 0xc0de, offset, len);
        self.reply(0xc0de)
    }

    pub fn disc(&mut self) {
        self.request(0, CMD_DISC, 0xd15c, 0, 0);
    }
}

/// Serves `disk` forever on a Unix socket in `dir`, one client at a time,
/// with `NbdServer::serve`.
pub fn serve_unix(
    dir: &TempDir,
    disk: MemDisk,
    name: &'static str,
) -> (SharedDisk, Arc<NbdServer>, PathBuf) {
    let path = dir.path("nbd.sock");
    let listen = Listen::bind_unix(&path).unwrap();
    let shared = SharedDisk::new(disk);
    let srv = Arc::new(NbdServer::default());
    let (mut dev, s) = (shared.clone(), srv.clone());
    std::thread::spawn(move || s.serve(&listen, &mut dev, name));
    (shared, srv, path)
}

/// Whether an external client is installed (says so when it is not).
pub fn have(tool: &str) -> bool {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("{tool} not installed: skipping");
    }
    ok
}

/// Runs a command, echoing its output for failing tests.
pub fn run(tool: &str, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(tool)
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "$ {tool} {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
