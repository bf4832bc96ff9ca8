//! A vhost-user frontend in this process, presenting itself as a
//! `virtio-drivers` `Transport`, so the same virtio-blk driver that runs
//! over virtio-msg drives any vhost-user-blk backend without a guest: guest
//! RAM is a memfd this process maps and shares whole (as QEMU does).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{Error as VirtioError, PhysAddr};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Guest-physical address of guest RAM's first byte.
pub const GPA: u64 = 0x4000_0000;

/// `VHOST_USER_F_PROTOCOL_FEATURES`: must stay set in SET_FEATURES once offered.
const PROTOCOL_FEATURES: u64 = 1 << 30;

/// Errors of setting up a vhost-user session.
#[derive(Debug, thiserror::Error)]
pub enum VhostFrontendError {
    /// A system call failed.
    #[error("{what} failed")]
    Io {
        /// What.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The backend refused or broke a vhost-user request.
    #[error("vhost-user {what} failed")]
    Protocol {
        /// Which request.
        what: &'static str,
        /// The cause.
        #[source]
        source: vhost::Error,
    },
}

fn proto(what: &'static str) -> impl FnOnce(vhost::Error) -> VhostFrontendError {
    move |source| VhostFrontendError::Protocol { what, source }
}

/// Guest RAM: a sealed memfd mapped here, shared whole with the backend.
pub struct GuestRam {
    file: File,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and unmapped only on drop; the
// pointer is used only to compute addresses and by the driver that owns it.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// `len` bytes of zeroed guest RAM.
    pub fn new(len: usize) -> Result<Self, VhostFrontendError> {
        let io = |what| move |source| VhostFrontendError::Io { what, source };
        let name = c"ringfence-guest-ram";
        // SAFETY: a valid NUL-terminated name.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(io("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(io("ftruncate"))?;
        // Backends refuse RAM that the frontend could still shrink under them.
        // SAFETY: fcntl with an integer argument on our descriptor.
        if unsafe {
            libc::fcntl(
                fd,
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        } < 0
        {
            return Err(io("F_ADD_SEALS")(std::io::Error::last_os_error()));
        }
        // SAFETY: mapping our own memfd of `len` bytes, shared.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io("mmap")(std::io::Error::last_os_error()));
        }
        Ok(Self {
            file,
            ptr: ptr.cast(),
            len,
        })
    }

    /// This process's pointer to guest-physical `gpa`, if inside.
    pub fn host_ptr(&self, gpa: u64) -> Option<*mut u8> {
        let off = usize::try_from(gpa.checked_sub(GPA)?).ok()?;
        // SAFETY: off < len, inside the mapping.
        (off < self.len).then(|| unsafe { self.ptr.add(off) })
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `new`, which nothing uses any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A vhost-user-blk session as a `Transport` for queue 0.
pub struct VhostTransport {
    fe: Frontend,
    ram_va: u64,
    features: u64,
    status: DeviceStatus,
    kick: EventFd,
    call: EventFd,
}

impl VhostTransport {
    /// Connects to the backend listening at `socket` (retrying for up to
    /// 10 s while it starts) and shares `ram` with it.
    pub fn connect(socket: &Path, ram: &GuestRam) -> Result<Self, VhostFrontendError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut fe, features) = loop {
            let attempt = Frontend::connect(socket, 1).and_then(|f| {
                f.set_owner()?;
                let features = f.get_features()?;
                Ok((f, features))
            });
            match attempt {
                Ok(v) => break v,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(proto("connect")(e)),
            }
        };
        if features & PROTOCOL_FEATURES != 0 {
            let offered = fe
                .get_protocol_features()
                .map_err(proto("GET_PROTOCOL_FEATURES"))?;
            fe.set_protocol_features(offered & VhostUserProtocolFeatures::CONFIG)
                .map_err(proto("SET_PROTOCOL_FEATURES"))?;
        }
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: GPA,
            memory_size: ram.len as u64,
            userspace_addr: ram.ptr as u64,
            mmap_offset: 0,
            mmap_handle: ram.file.as_raw_fd(),
        }])
        .map_err(proto("SET_MEM_TABLE"))?;
        let eventfd = || {
            EventFd::new(EFD_NONBLOCK).map_err(|source| VhostFrontendError::Io {
                what: "eventfd",
                source,
            })
        };
        Ok(Self {
            fe,
            ram_va: ram.ptr as u64,
            features,
            status: DeviceStatus::empty(),
            kick: eventfd()?,
            call: eventfd()?,
        })
    }

    /// Waits for a used notification; false on timeout.
    pub fn wait(&self, timeout: Duration) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.call.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            let _ = self.call.read();
            true
        } else {
            false
        }
    }

    fn va(&self, gpa: PhysAddr) -> u64 {
        self.ram_va + gpa.wrapping_sub(GPA)
    }
}

impl Transport for VhostTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Block
    }

    fn read_device_features(&mut self) -> u64 {
        self.features & !PROTOCOL_FEATURES
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        let keep = self.features & PROTOCOL_FEATURES;
        if let Err(e) = self.fe.set_features(driver_features | keep) {
            tracing::error!(error = %e, "SET_FEATURES failed");
        }
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        256
    }

    fn notify(&mut self, _queue: u16) {
        let _ = self.kick.write(1);
    }

    fn get_status(&self) -> DeviceStatus {
        self.status
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.status = status;
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        let q = usize::from(queue);
        let size = size as u16;
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: self.va(descriptors),
            used_ring_addr: self.va(device_area),
            avail_ring_addr: self.va(driver_area),
            log_addr: None,
        };
        let steps = self
            .fe
            .set_vring_num(q, size)
            .and_then(|()| self.fe.set_vring_addr(q, &config))
            .and_then(|()| self.fe.set_vring_base(q, 0))
            .and_then(|()| self.fe.set_vring_call(q, &self.call))
            .and_then(|()| self.fe.set_vring_kick(q, &self.kick))
            .and_then(|()| self.fe.set_vring_enable(q, true));
        if let Err(e) = steps {
            tracing::error!(error = %e, "vring set-up failed");
            self.status |= DeviceStatus::FAILED;
        }
    }

    fn queue_unset(&mut self, queue: u16) {
        // GET_VRING_BASE stops the ring.
        let _ = self.fe.get_vring_base(usize::from(queue));
    }

    fn queue_used(&mut self, _queue: u16) -> bool {
        false
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        InterruptStatus::empty()
    }

    fn read_config_generation(&self) -> u32 {
        0
    }

    fn read_config_space<T: FromBytes + IntoBytes>(
        &self,
        offset: usize,
    ) -> virtio_drivers::Result<T> {
        let len = std::mem::size_of::<T>();
        let mut fe = self.fe.clone();
        let buf = vec![0u8; len];
        let (_, data) = fe
            .get_config(
                offset as u32,
                len as u32,
                VhostUserConfigFlags::empty(),
                &buf,
            )
            .map_err(|_| VirtioError::IoError)?;
        T::read_from_bytes(&data).map_err(|_| VirtioError::IoError)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> virtio_drivers::Result<()> {
        Err(VirtioError::Unsupported)
    }
}
