//! Helpers shared by the fuzz targets.
//!
//! Every target reads its input with [`Input`], a little-endian cursor that
//! yields zeros once the bytes run out. Input formats are hand-written (not
//! `Arbitrary` derives) so that `seeds/` can write meaningful, reproducible
//! seeds byte for byte; each target documents its own format at the top.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use ringfence_virtio_msg::{Body, DeviceInfo, DeviceState, Vqueue, Words};

/// A cursor over the fuzz input.
pub struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    /// Reads `data` from the start.
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    /// True once every byte has been consumed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes left.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.0.split_at(n.min(self.0.len()));
        self.0 = tail;
        head
    }

    /// The next `N` bytes, zero-padded at the end of the input.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    /// A byte (0 at the end).
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A le16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A le32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A le64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
}

/// Sectors of the block image the device targets serve.
pub const IMAGE_SECTORS: u64 = 64;

/// A path that opens the process's block image: 64 sectors, sector `i`
/// filled with byte `i + 1`. The file is created once and unlinked at once,
/// so a fuzzing run leaves nothing behind in the temp dir however it ends;
/// `/proc/self/fd/N` still reopens it (read-write) for every `Blk::open`.
/// Requests may write to it, so its content drifts over a run; no target
/// depends on the content.
pub fn image_path() -> &'static PathBuf {
    static IMAGE: OnceLock<(File, PathBuf)> = OnceLock::new();
    let (_, path) = IMAGE.get_or_init(|| {
        let tmp = std::env::temp_dir().join(format!("ringfence-fuzz-{}.img", std::process::id()));
        let content: Vec<u8> = (0..IMAGE_SECTORS * 512)
            .map(|i| (i / 512) as u8 + 1)
            .collect();
        std::fs::write(&tmp, &content).expect("write the fuzz image");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tmp)
            .expect("open the fuzz image");
        let _ = std::fs::remove_file(&tmp);
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        (file, path)
    });
    path
}

/// Size of the image file now (to check that no request grows it).
pub fn image_len() -> u64 {
    std::fs::metadata(image_path())
        .map(|m| m.len())
        .unwrap_or(0)
}

/// A device-visible address in area 0..=3 (area 0 is never shared).
fn area_addr(input: &mut Input) -> u64 {
    (u64::from(input.u8() % 4) << 48) | u64::from(input.u16())
}

fn vqueue(input: &mut Input) -> Vqueue {
    Vqueue {
        index: input.u8().into(),
        max_size: input.u16().into(),
        size: input.u16().into(),
        desc_addr: area_addr(input),
        driver_addr: area_addr(input),
        device_addr: area_addr(input),
    }
}

/// `u8 n` then up to `n` bytes.
fn data<'a>(input: &mut Input<'a>) -> &'a [u8] {
    let n = input.u8();
    input.bytes(n.into())
}

/// `u8 n` then `4 * (n % 4)` bytes (none if the input ends mid-word).
fn words<'a>(input: &mut Input<'a>) -> Words<'a> {
    let n = 4 * usize::from(input.u8() % 4);
    Words::from_bytes(input.bytes(n)).unwrap_or(Words::EMPTY)
}

/// Number of kinds [`body`] builds.
pub const BODY_KINDS: u8 = 31;

/// Any virtio-msg body, requests, responses and events alike (a hostile
/// peer sends whatever it likes): `u8 kind` (mod [`BODY_KINDS`], in the
/// order of the `Body` enum) then that kind's fields. Small fields are
/// bytes, so that the values that matter (indices, sizes, status bits) are
/// easy to hit; addresses are `u8 area (mod 4), u16 offset`; variable data
/// is `u8 len, bytes`. The message may not fit a bus; encoding then fails.
pub fn body<'a>(input: &mut Input<'a>) -> Body<'a> {
    match input.u8() % BODY_KINDS {
        0 => Body::GetDeviceInfo,
        1 => Body::DeviceInfo(DeviceInfo {
            device_id: input.u8().into(),
            vendor_id: input.u32(),
            num_feature_bits: input.u8().into(),
            config_size: input.u8().into(),
            max_virtqueues: input.u16().into(),
            admin_vq_start: input.u16(),
            admin_vq_count: input.u16(),
        }),
        2 => Body::GetDeviceFeatures {
            block_index: input.u8().into(),
            num_blocks: input.u8().into(),
        },
        3 => Body::DeviceFeatures {
            block_index: input.u8().into(),
            features: words(input),
        },
        4 => Body::SetDriverFeatures {
            block_index: input.u8().into(),
            features: words(input),
        },
        5 => Body::SetDriverFeaturesDone,
        6 => Body::GetConfig {
            offset: input.u8().into(),
            length: input.u8().into(),
        },
        7 => Body::Config {
            generation: input.u32(),
            offset: input.u8().into(),
            data: data(input),
        },
        8 => Body::SetConfig {
            generation: input.u32(),
            offset: input.u8().into(),
            data: data(input),
        },
        9 => Body::SetConfigResult {
            generation: input.u32(),
            offset: input.u8().into(),
            length: input.u8().into(),
            data: data(input),
        },
        10 => Body::GetDeviceStatus,
        11 => Body::DeviceStatus {
            status: input.u8().into(),
        },
        12 => Body::SetDeviceStatus {
            status: input.u8().into(),
        },
        13 => Body::SetDeviceStatusResult {
            status: input.u8().into(),
        },
        14 => Body::GetVqueue {
            index: input.u8().into(),
        },
        15 => Body::VqueueInfo(vqueue(input)),
        16 => Body::SetVqueue(vqueue(input)),
        17 => Body::SetVqueueDone,
        18 => Body::ResetVqueue {
            index: input.u8().into(),
        },
        19 => Body::ResetVqueueDone,
        20 => Body::GetShm {
            index: input.u8().into(),
        },
        21 => Body::Shm {
            index: input.u8().into(),
            length: input.u32(),
            address: input.u32(),
        },
        22 => Body::EventConfig {
            device_status: input.u8().into(),
            generation: input.u32(),
            offset: input.u8().into(),
            data: data(input),
        },
        23 => Body::EventAvail {
            vq_index: input.u8().into(),
            next_offset: input.u32(),
        },
        24 => Body::EventUsed {
            vq_index: input.u8().into(),
        },
        25 => Body::GetDevices {
            offset: input.u16(),
            count: input.u16(),
        },
        26 => Body::Devices {
            offset: input.u16(),
            count: input.u16(),
            next_offset: input.u16(),
            bitmap: data(input),
        },
        27 => Body::Ping { data: input.u32() },
        28 => Body::Pong { data: input.u32() },
        29 => Body::EventDevice {
            device_number: input.u16(),
            state: match input.u8() % 3 {
                0 => DeviceState::Ready,
                1 => DeviceState::Removed,
                _ => DeviceState::Implementation(0x8000 | input.u16()),
            },
        },
        _ => Body::BusSpecific {
            msg_id: 0x80 | input.u8(),
            response: input.u8() & 1 != 0,
            payload: data(input),
        },
    }
}
