//! virtio-blk backed by a raw image file.
//!
//! Requests: IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES. Every field of a
//! request is copied out of shared memory once and validated; a bad request
//! gets IOERR (or UNSUPP for an unknown type), never a panic. Data moves
//! between the file and shared memory with `preadv`/`pwritev` straight into
//! the shared pages: no intermediate copy in the backend.

mod request;
mod uring;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ringfence_device::{read_config_bytes, ConfigWatch, DeviceError, QueueHandler, VirtioDevice};
use virtio_bindings::virtio_blk::*;

pub use request::{BlkQueue, RequestStats};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the virtio-blk config space we expose.
pub const CONFIG_SIZE: usize = 60;
/// Largest size of one data segment (SIZE_MAX).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most DISCARD / WRITE_ZEROES segments in one request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors in one DISCARD / WRITE_ZEROES segment.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;
/// virtio device id of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;

/// Options of a block device.
#[derive(Debug, Clone)]
pub struct BlkOptions {
    /// Refuse writes (and offer VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Number of request queues (MQ when > 1).
    pub num_queues: u16,
    /// Queue size offered.
    pub queue_size: u16,
    /// Serial number returned by GET_ID (at most 20 bytes are used).
    pub serial: String,
    /// Most segments in one DISCARD request offered (1..=MAX_DISCARD_SEG);
    /// a request with more is answered UNSUPP.
    pub max_discard_seg: u32,
    /// Most segments in one WRITE_ZEROES request offered (1..=MAX_DISCARD_SEG).
    pub max_write_zeroes_seg: u32,
    /// How requests are executed.
    pub aio: Aio,
    /// How the image is cached on the host.
    pub cache: CacheMode,
}

/// How a queue executes its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aio {
    /// Many requests in flight per queue on an io_uring, completed in the
    /// order the kernel finishes them. Falls back to `Sync` (with a
    /// warning) where io_uring is unavailable.
    #[default]
    IoUring,
    /// One request at a time with blocking preadv/pwritev on the queue's
    /// thread: no in-flight state at all.
    Sync,
}

/// Host caching of the image, as QEMU's `cache=` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// O_DIRECT: the host page cache is bypassed; guest buffers that are
    /// not aligned for it go through an aligned bounce buffer. FLUSH
    /// still reaches the disk's own cache (fdatasync).
    None,
    /// The host page cache; FLUSH is fdatasync.
    #[default]
    Writeback,
    /// The host page cache and FLUSH ignored: fastest, and a host crash
    /// loses what the guest believed flushed. For scratch images only.
    Unsafe,
}

impl std::str::FromStr for Aio {
    type Err = BlkError;

    fn from_str(s: &str) -> Result<Self, BlkError> {
        match s {
            "io_uring" => Ok(Aio::IoUring),
            "sync" => Ok(Aio::Sync),
            other => Err(BlkError::Option(format!(
                "aio {other:?}: expected io_uring or sync"
            ))),
        }
    }
}

impl std::str::FromStr for CacheMode {
    type Err = BlkError;

    fn from_str(s: &str) -> Result<Self, BlkError> {
        match s {
            "none" => Ok(CacheMode::None),
            "writeback" => Ok(CacheMode::Writeback),
            "unsafe" => Ok(CacheMode::Unsafe),
            other => Err(BlkError::Option(format!(
                "cache {other:?}: expected none, writeback or unsafe"
            ))),
        }
    }
}

impl Default for BlkOptions {
    fn default() -> Self {
        Self {
            read_only: false,
            num_queues: 1,
            queue_size: 256,
            serial: "ringfence".into(),
            max_discard_seg: MAX_DISCARD_SEG,
            max_write_zeroes_seg: MAX_DISCARD_SEG,
            aio: Aio::default(),
            cache: CacheMode::default(),
        }
    }
}

/// Errors opening a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image could not be opened.
    #[error("cannot open image {path}")]
    Open {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image size is not usable.
    #[error("image {path} has size {size}, not a non-zero multiple of its {block}-byte block")]
    BadSize {
        /// The path.
        path: String,
        /// Its size.
        size: u64,
        /// The block size (512, or what O_DIRECT needs).
        block: u64,
    },
    /// Bad option.
    #[error("invalid option: {0}")]
    Option(String),
}

/// The backing image shared by all queues.
#[derive(Debug)]
pub(crate) struct Disk {
    pub(crate) file: File,
    /// Capacity; follows the image file when it is resized (see
    /// [`CapacityWatch`]), so requests are checked against the current size.
    pub(crate) sectors: AtomicU64,
    pub(crate) read_only: bool,
    pub(crate) id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    pub(crate) stats: RequestStats,
    pub(crate) max_discard_seg: u32,
    pub(crate) max_write_zeroes_seg: u32,
    /// Opened with O_DIRECT: buffers, lengths and offsets must be aligned.
    pub(crate) direct: Option<DirectAlign>,
    /// FLUSH reaches the disk (every cache mode but `unsafe`).
    pub(crate) flush: bool,
}

/// What O_DIRECT asks of a transfer on this image (statx STATX_DIOALIGN).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DirectAlign {
    /// Alignment of buffer addresses and lengths in memory.
    pub(crate) mem: u64,
    /// Alignment of file offsets and lengths.
    pub(crate) offset: u64,
}

impl DirectAlign {
    /// Whether O_DIRECT takes a buffer of `len` bytes at `addr` as it is.
    pub(crate) fn fits(&self, addr: u64, len: u64) -> bool {
        addr.is_multiple_of(self.mem) && len.is_multiple_of(self.mem)
    }

    /// Asks the kernel; where it cannot tell (before Linux 6.1, or a file
    /// system that does not say), a whole page for both, which every
    /// O_DIRECT implementation accepts.
    fn of(file: &File) -> Self {
        use std::os::fd::AsRawFd;
        const PAGE: u64 = 4096;
        // SAFETY: statx is plain old data; all-zero is a valid value.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: an empty path with AT_EMPTY_PATH names the descriptor we
        // own; the kernel writes at most one struct statx into `stx`.
        let r = unsafe {
            libc::statx(
                file.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH,
                libc::STATX_DIOALIGN,
                &mut stx,
            )
        };
        let told = r == 0
            && stx.stx_mask & libc::STATX_DIOALIGN != 0
            && stx.stx_dio_mem_align != 0
            && stx.stx_dio_offset_align != 0;
        if told {
            let pow2 = |v: u32| u64::from(v).next_power_of_two().clamp(1, PAGE);
            DirectAlign {
                mem: pow2(stx.stx_dio_mem_align),
                offset: pow2(stx.stx_dio_offset_align).max(SECTOR_SIZE),
            }
        } else {
            DirectAlign {
                mem: PAGE,
                offset: PAGE,
            }
        }
    }
}

/// A virtio-blk device.
#[derive(Debug)]
pub struct Blk {
    disk: Arc<Disk>,
    /// io_uring rings made in advance (see [`Blk::prepare_rings`]), shared
    /// with every instance cloned from this one.
    rings: Arc<uring::RingPool>,
    opts: BlkOptions,
    config: [u8; CONFIG_SIZE],
    writeback: bool,
}

fn put(config: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = config.get_mut(at..at + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

impl Blk {
    /// Opens `path` as the backing image.
    pub fn open(path: &Path, opts: BlkOptions) -> Result<Self, BlkError> {
        if opts.num_queues == 0 || opts.num_queues > 64 {
            return Err(BlkError::Option(format!(
                "num_queues {} not in 1..=64",
                opts.num_queues
            )));
        }
        for (name, n) in [
            ("max_discard_seg", opts.max_discard_seg),
            ("max_write_zeroes_seg", opts.max_write_zeroes_seg),
        ] {
            if !(1..=MAX_DISCARD_SEG).contains(&n) {
                return Err(BlkError::Option(format!(
                    "{name} {n} not in 1..={MAX_DISCARD_SEG}"
                )));
            }
        }
        if !opts.queue_size.is_power_of_two() || opts.queue_size < 4 {
            return Err(BlkError::Option(format!(
                "queue_size {} not a power of two >= 4",
                opts.queue_size
            )));
        }
        let direct_flag = if opts.cache == CacheMode::None {
            libc::O_DIRECT
        } else {
            0
        };
        let file = {
            use std::os::unix::fs::OpenOptionsExt;
            OpenOptions::new()
                .read(true)
                .write(!opts.read_only)
                .custom_flags(direct_flag)
                .open(path)
        }
        .map_err(|source| BlkError::Open {
            path: path.display().to_string(),
            source: if source.raw_os_error() == Some(libc::EINVAL) && direct_flag != 0 {
                io::Error::new(
                    source.kind(),
                    "the file system refuses O_DIRECT (--cache none); use --cache writeback",
                )
            } else {
                source
            },
        })?;
        let direct = (direct_flag != 0).then(|| DirectAlign::of(&file));
        let meta = file.metadata().map_err(|source| BlkError::Open {
            path: path.display().to_string(),
            source,
        })?;
        let size = if meta.file_type().is_block_device() {
            use std::io::Seek;
            (&file)
                .seek(io::SeekFrom::End(0))
                .map_err(|source| BlkError::Open {
                    path: path.display().to_string(),
                    source,
                })?
        } else {
            meta.len()
        };
        let block = direct.map_or(SECTOR_SIZE, |d| d.offset);
        if size == 0 || size % block != 0 {
            return Err(BlkError::BadSize {
                path: path.display().to_string(),
                size,
                block,
            });
        }
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        for (d, s) in id.iter_mut().zip(opts.serial.bytes()) {
            *d = s;
        }
        let disk = Arc::new(Disk {
            file,
            sectors: AtomicU64::new(size / SECTOR_SIZE),
            read_only: opts.read_only,
            id,
            stats: RequestStats::default(),
            max_discard_seg: opts.max_discard_seg,
            max_write_zeroes_seg: opts.max_write_zeroes_seg,
            direct,
            flush: opts.cache != CacheMode::Unsafe,
        });
        if let Some(d) = direct {
            tracing::info!(
                mem_align = d.mem,
                offset_align = d.offset,
                "image opened with O_DIRECT"
            );
        }
        let mut blk = Blk {
            disk,
            rings: Arc::default(),
            config: [0; CONFIG_SIZE],
            opts,
            writeback: true,
        };
        blk.build_config();
        Ok(blk)
    }

    fn build_config(&mut self) {
        let c = &mut self.config;
        put(
            c,
            0,
            &self.disk.sectors.load(Ordering::Relaxed).to_le_bytes(),
        ); // capacity
        put(c, 8, &SIZE_MAX.to_le_bytes()); // size_max
        put(c, 12, &u32::from(self.opts.queue_size - 2).to_le_bytes()); // seg_max
                                                                        // With O_DIRECT the guest must not write less than the image's
                                                                        // block: it learns the block size here (logical block size).
        let block = self.disk.block_size();
        put(c, 20, &(block as u32).to_le_bytes()); // blk_size
        put(c, 32, &[u8::from(self.writeback)]); // writeback
        put(c, 34, &self.opts.num_queues.to_le_bytes()); // num_queues
        put(c, 36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(c, 40, &self.disk.max_discard_seg.to_le_bytes());
        put(c, 44, &((block / SECTOR_SIZE) as u32).to_le_bytes()); // discard_sector_alignment
        put(c, 48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(c, 52, &self.disk.max_write_zeroes_seg.to_le_bytes());
        put(c, 56, &[1]); // write_zeroes_may_unmap
    }

    /// Another device instance on the same image (a duplicated descriptor,
    /// fresh counters): a backend serving several frontends, or running
    /// sandboxed where it may no longer open files, makes them from one
    /// image opened at start.
    pub fn try_clone(&self) -> io::Result<Self> {
        let disk = &self.disk;
        Ok(Blk {
            disk: Arc::new(Disk {
                file: disk.file.try_clone()?,
                sectors: AtomicU64::new(disk.sectors.load(Ordering::Relaxed)),
                read_only: disk.read_only,
                id: disk.id,
                stats: RequestStats::default(),
                max_discard_seg: disk.max_discard_seg,
                max_write_zeroes_seg: disk.max_write_zeroes_seg,
                direct: disk.direct,
                flush: disk.flush,
            }),
            rings: self.rings.clone(),
            opts: self.opts.clone(),
            config: self.config,
            writeback: self.writeback,
        })
    }

    /// Makes io_uring rings in advance, one per queue for `instances`
    /// instances of this image (this one and its clones), so that a daemon
    /// can forbid `io_uring_setup` in its sandbox: a new ring is then made
    /// only while none is free, and where that is refused the queue runs
    /// `aio sync`. Returns how many rings are ready; none for `aio sync`.
    pub fn prepare_rings(&self, instances: usize) -> io::Result<usize> {
        if self.opts.aio != Aio::IoUring {
            return Ok(0);
        }
        use std::os::fd::AsRawFd;
        let want = instances.saturating_mul(usize::from(self.opts.num_queues));
        while self.rings.len() < want {
            let ring = uring::Uring::new(self.disk.file.as_raw_fd(), self.opts.queue_size)?;
            self.rings.put(ring);
        }
        Ok(self.rings.len())
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.sectors.load(Ordering::Relaxed)
    }

    /// Request counters (shared by all queues).
    pub fn stats(&self) -> &RequestStats {
        &self.disk.stats
    }
}

impl Disk {
    /// The logical block size the guest is told (blk_size).
    pub(crate) fn block_size(&self) -> u64 {
        self.direct
            .map_or(SECTOR_SIZE, |d| d.offset.max(SECTOR_SIZE))
    }
}

impl VirtioDevice for Blk {
    fn device_type(&self) -> u32 {
        DEVICE_ID_BLOCK
    }

    fn device_features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        if self.opts.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        if self.opts.num_queues > 1 {
            f |= 1 << VIRTIO_BLK_F_MQ;
        }
        f
    }

    fn num_queues(&self) -> u16 {
        self.opts.num_queues
    }

    fn max_queue_size(&self) -> u16 {
        self.opts.queue_size
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        let mut config = self.config;
        put(&mut config, 0, &self.sectors().to_le_bytes()); // capacity, as it is now
        read_config_bytes(&config, offset, data)
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        // Only `writeback` (offset 32, CONFIG_WCE) is writable, and we do not
        // offer CONFIG_WCE: the config space is read-only to the driver.
        let _ = data;
        Err(DeviceError::ConfigReadOnly { offset })
    }

    fn activate(&mut self, acked_features: u64) -> Result<Vec<Box<dyn QueueHandler>>, DeviceError> {
        // The image may have changed size while no device was live.
        if self.disk.file.metadata().is_ok_and(|m| m.is_file()) {
            CapacityWatch(self.disk.clone()).poll();
        }
        let queues = if acked_features & (1 << VIRTIO_BLK_F_MQ) != 0 {
            self.opts.num_queues
        } else {
            1
        };
        tracing::info!(
            sectors = self.sectors(),
            queues,
            read_only = self.disk.read_only,
            features = format_args!("{acked_features:#x}"),
            "virtio-blk activated"
        );
        let mut aio = self.opts.aio;
        let mut handlers = Vec::with_capacity(usize::from(queues));
        for _ in 0..queues {
            let mut queue = BlkQueue::new(self.disk.clone(), self.opts.queue_size);
            if aio == Aio::IoUring {
                if let Err(e) = queue.start_uring(&self.rings) {
                    tracing::warn!(error = %e, "io_uring unavailable: requests run one at a time (aio sync)");
                    aio = Aio::Sync;
                }
            }
            handlers.push(Box::new(queue) as Box<dyn QueueHandler>);
        }
        tracing::info!(?aio, cache = ?self.opts.cache, "virtio-blk queues started");
        Ok(handlers)
    }

    fn reset(&mut self) {}

    fn completes_out_of_order(&self) -> bool {
        self.opts.aio == Aio::IoUring
    }

    fn config_watch(&mut self) -> Option<Box<dyn ConfigWatch>> {
        // A block device's size does not change under us the same way; an
        // image file is grown (or shrunk) with truncate or qemu-img resize.
        let regular = self.disk.file.metadata().is_ok_and(|m| m.is_file());
        regular.then(|| Box::new(CapacityWatch(self.disk.clone())) as Box<dyn ConfigWatch>)
    }
}

/// How often a live device looks at its image's size.
pub const CAPACITY_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

/// Follows the image file's size: the capacity in the config space (and
/// the bound requests are checked against) changes with it, and the
/// transport tells the driver.
struct CapacityWatch(Arc<Disk>);

impl ConfigWatch for CapacityWatch {
    fn interval(&self) -> std::time::Duration {
        CAPACITY_POLL_INTERVAL
    }

    fn poll(&mut self) -> bool {
        let Ok(meta) = self.0.file.metadata() else {
            return false;
        };
        let sectors = meta.len() / SECTOR_SIZE;
        let old = self.0.sectors.swap(sectors, Ordering::Relaxed);
        if old != sectors {
            tracing::info!(old, new = sectors, "image resized: capacity follows");
        }
        old != sectors
    }
}
