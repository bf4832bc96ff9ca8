//! The devices a daemon serves: their command-line options (one clap
//! subcommand per device, shared by `backend` and `vhost-user`), the
//! `--device kind,key=value` short form, the `--config` TOML file, and the
//! templates from which each frontend connection gets its own instances.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::Parser;
use ringfence_blk::{Aio, Blk, BlkOptions, CacheMode};
use ringfence_console::{Console, ConsoleBackend, ConsoleOptions};
use ringfence_device::{DeviceError, QueueHandler, VirtioDevice};
use ringfence_net::{Net, NetOptions, Tap};
use ringfence_rng::{Rng, RngOptions};
use ringfence_vsock::{Vsock, VsockOptions};

/// One device and its options.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeviceArgs {
    /// virtio-blk backed by a raw image.
    Blk {
        /// Raw disk image.
        #[arg(long)]
        image: PathBuf,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Request queues (VIRTIO_BLK_F_MQ when > 1).
        #[arg(long, default_value_t = 1)]
        num_queues: u16,
        /// Queue size offered.
        #[arg(long, default_value_t = 256)]
        queue_size: u16,
        /// Most segments per DISCARD request offered (1..=32; more: UNSUPP).
        #[arg(long, default_value_t = ringfence_blk::MAX_DISCARD_SEG)]
        max_discard_seg: u32,
        /// Most segments per WRITE_ZEROES request offered (1..=32).
        #[arg(long, default_value_t = ringfence_blk::MAX_DISCARD_SEG)]
        max_write_zeroes_seg: u32,
        /// How requests run: `io_uring` keeps many in flight per queue and
        /// completes them out of order; `sync` runs them one at a time on
        /// the queue's thread. io_uring falls back to sync where the kernel
        /// refuses it.
        #[arg(long, default_value = "io_uring", value_parser = clap::value_parser!(Aio))]
        aio: Aio,
        /// Host caching of the image, as QEMU's cache=: `none` (O_DIRECT:
        /// no host page cache, FLUSH is fdatasync), `writeback` (page
        /// cache, FLUSH is fdatasync), `unsafe` (page cache, FLUSH ignored).
        #[arg(long, default_value = "writeback", value_parser = clap::value_parser!(CacheMode), conflicts_with = "direct")]
        cache: CacheMode,
        /// Same as `--cache none`.
        #[arg(long)]
        direct: bool,
    },
    /// virtio-net on a TAP device.
    Net {
        /// TAP interface, created if it does not exist (IFF_VNET_HDR; IFF_MULTI_QUEUE with --queue-pairs > 1).
        #[arg(long)]
        tap: String,
        /// MAC address offered to the driver (default: a random locally administered one).
        #[arg(long)]
        mac: Option<String>,
        /// MTU offered to the driver (VIRTIO_NET_F_MTU) and set on the TAP.
        #[arg(long, default_value_t = 1500)]
        mtu: u16,
        /// Queue pairs (VIRTIO_NET_F_MQ when > 1), one TAP queue each.
        #[arg(long, default_value_t = 1)]
        queue_pairs: u16,
        /// Queue size offered.
        #[arg(long, default_value_t = 256)]
        queue_size: u16,
    },
    /// virtio-console with one port on a PTY (the default), a Unix socket or stdio.
    Console {
        /// Allocate a PTY; its path is logged and printed.
        #[arg(long, conflicts_with_all = ["socket", "stdio"])]
        pty: bool,
        /// Listen on this Unix socket instead (one client at a time).
        #[arg(long, conflicts_with = "stdio")]
        socket: Option<PathBuf>,
        /// Use the daemon's own stdin/stdout.
        #[arg(long)]
        stdio: bool,
    },
    /// virtio-rng fed by getrandom.
    Rng {
        /// Bytes per second shared by every frontend (default: unlimited).
        #[arg(long)]
        rate_limit: Option<u64>,
    },
    /// virtio-vsock on the hybrid Unix-socket model (Firecracker, vhost-device-vsock).
    Vsock {
        /// Context id of the guest (>= 3).
        #[arg(long, default_value_t = 3)]
        guest_cid: u64,
        /// Host socket: host clients connect here and send `CONNECT <port>\n`;
        /// a guest connect to port P reaches `<uds>_<P>`.
        #[arg(long)]
        uds: PathBuf,
    },
}

#[cfg(test)]
impl DeviceArgs {
    /// The device's kind as written on the command line.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceArgs::Blk { .. } => "blk",
            DeviceArgs::Net { .. } => "net",
            DeviceArgs::Console { .. } => "console",
            DeviceArgs::Rng { .. } => "rng",
            DeviceArgs::Vsock { .. } => "vsock",
        }
    }
}

/// A device description that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A `--device` value or config entry the options parser refused.
    #[error("device {spec:?}: {message}")]
    Invalid {
        /// What was given.
        spec: String,
        /// clap's explanation.
        message: String,
    },
    /// The config file could not be read.
    #[error("cannot read config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not the expected TOML.
    #[error("config {path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Parser)]
#[command(name = "--device", no_binary_name = true)]
struct OneDevice {
    #[command(subcommand)]
    device: DeviceArgs,
}

/// Parses `kind[,key=value|,flag]...` with the same options as the
/// subcommand of that kind (`net,tap=rf0,mtu=9000` is `net --tap rf0 --mtu 9000`).
pub fn parse_spec(spec: &str) -> Result<DeviceArgs, SpecError> {
    let mut parts = spec.split(',');
    let kind = parts.next().unwrap_or_default().trim().to_string();
    let mut argv = vec![kind];
    for part in parts.filter(|p| !p.is_empty()) {
        match part.split_once('=') {
            Some((k, v)) => {
                argv.push(format!("--{}", k.trim().replace('_', "-")));
                argv.push(v.to_string());
            }
            None => argv.push(format!("--{}", part.trim().replace('_', "-"))),
        }
    }
    from_argv(spec, argv)
}

fn from_argv(spec: &str, argv: Vec<String>) -> Result<DeviceArgs, SpecError> {
    OneDevice::try_parse_from(argv)
        .map(|d| d.device)
        .map_err(|e| SpecError::Invalid {
            spec: spec.to_string(),
            message: e.kind().to_string() + ": " + e.to_string().lines().next().unwrap_or(""),
        })
}

/// Reads the devices of a TOML config file: one `[[device]]` table per
/// device, `type` naming its kind and every other key one of its options
/// (`true` for a flag).
///
/// ```toml
/// [[device]]
/// type = "blk"
/// image = "disk.img"
///
/// [[device]]
/// type = "rng"
/// rate-limit = 1048576
/// ```
pub fn parse_config(path: &Path) -> Result<Vec<DeviceArgs>, SpecError> {
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.into(),
        source,
    })?;
    let bad = |message: String| SpecError::Config {
        path: path.into(),
        message,
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| bad(e.to_string()))?;
    if let Some(key) = table.keys().find(|k| *k != "device") {
        return Err(bad(format!(
            "unknown top-level key {key:?} (expected [[device]] tables)"
        )));
    }
    let Some(devices) = table.get("device") else {
        return Ok(Vec::new());
    };
    let devices = devices
        .as_array()
        .ok_or_else(|| bad("`device` must be an array of tables ([[device]])".into()))?;
    let mut out = Vec::new();
    for (i, dev) in devices.iter().enumerate() {
        let dev = dev
            .as_table()
            .ok_or_else(|| bad(format!("device {i} is not a table")))?;
        let kind = dev
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| bad(format!("device {i} has no `type`")))?;
        let mut argv = vec![kind.to_string()];
        for (k, v) in dev.iter().filter(|(k, _)| *k != "type") {
            let flag = format!("--{}", k.replace('_', "-"));
            match v {
                toml::Value::Boolean(true) => argv.push(flag),
                toml::Value::Boolean(false) => {}
                toml::Value::String(s) => argv.extend([flag, s.clone()]),
                toml::Value::Integer(n) => argv.extend([flag, n.to_string()]),
                other => {
                    return Err(bad(format!(
                        "device {i}: `{k}` = {other} is not a string, integer or boolean"
                    )))
                }
            }
        }
        out.push(from_argv(&format!("{} device {i}", path.display()), argv)?);
    }
    Ok(out)
}

/// Parses `52:54:00:12:34:56`.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .map_err(|_| format!("MAC address {s:?} is not six hex bytes separated by ':'"))?;
    bytes
        .try_into()
        .map_err(|_| format!("MAC address {s:?} is not six hex bytes separated by ':'"))
}

/// Held by the one live instance of a device whose backend end cannot be
/// shared (a TAP, a PTY, a vsock socket): a second frontend is refused
/// instead of stealing the first one's packets.
struct Exclusive {
    device: Box<dyn VirtioDevice>,
    in_use: Arc<AtomicBool>,
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        self.in_use.store(false, Ordering::SeqCst);
    }
}

impl VirtioDevice for Exclusive {
    fn device_type(&self) -> u32 {
        self.device.device_type()
    }
    fn device_features(&self) -> u64 {
        self.device.device_features()
    }
    fn num_queues(&self) -> u16 {
        self.device.num_queues()
    }
    fn max_queue_size(&self) -> u16 {
        self.device.max_queue_size()
    }
    fn config_size(&self) -> usize {
        self.device.config_size()
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.device.read_config(offset, data)
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.device.write_config(offset, data)
    }
    fn activate(&mut self, acked: u64) -> Result<Vec<Box<dyn QueueHandler>>, DeviceError> {
        self.device.activate(acked)
    }
    fn reset(&mut self) {
        self.device.reset()
    }
    fn config_watch(&mut self) -> Option<Box<dyn ringfence_device::ConfigWatch>> {
        self.device.config_watch()
    }
    fn completes_out_of_order(&self) -> bool {
        self.device.completes_out_of_order()
    }
}

type Factory = Box<dyn Fn() -> std::io::Result<Box<dyn VirtioDevice>> + Send + Sync>;

/// A device opened at start (image, TAP, PTY, sockets: before the sandbox
/// forbids opening anything); each connection gets its own instance.
pub struct DeviceTemplate {
    kind: &'static str,
    make: Factory,
    /// Makes, before the sandbox, what instances would otherwise make
    /// later (io_uring rings for `instances` instances).
    prepare: Option<Box<dyn Fn(usize) -> std::io::Result<usize> + Send + Sync>>,
    /// Set while the one instance of an unshareable device is live.
    in_use: Option<Arc<AtomicBool>>,
}

/// An instance could not be made.
#[derive(Debug, thiserror::Error)]
pub enum InstanceError {
    /// The device's backend end is held by another frontend.
    #[error("{kind} device is in use by another frontend")]
    Busy {
        /// The device kind.
        kind: &'static str,
    },
    /// Duplicating the device's descriptors failed.
    #[error("cannot instantiate the {kind} device")]
    Io {
        /// The device kind.
        kind: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl DeviceTemplate {
    fn shared(kind: &'static str, make: Factory) -> Self {
        Self {
            kind,
            make,
            prepare: None,
            in_use: None,
        }
    }

    fn exclusive(kind: &'static str, make: Factory) -> Self {
        Self {
            kind,
            make,
            prepare: None,
            in_use: Some(Arc::new(AtomicBool::new(false))),
        }
    }

    /// Makes in advance what `instances` instances need and may not make
    /// once the sandbox is installed (io_uring rings); returns how many
    /// such things are ready.
    pub fn prepare(&self, instances: usize) -> std::io::Result<usize> {
        self.prepare.as_ref().map_or(Ok(0), |p| p(instances))
    }

    /// The device kind.
    pub fn kind(&self) -> &'static str {
        self.kind
    }

    /// A fresh device instance for one connection.
    pub fn instance(&self) -> Result<Box<dyn VirtioDevice>, InstanceError> {
        let kind = self.kind;
        match &self.in_use {
            None => (self.make)().map_err(|source| InstanceError::Io { kind, source }),
            Some(in_use) => {
                if in_use.swap(true, Ordering::SeqCst) {
                    return Err(InstanceError::Busy { kind });
                }
                match (self.make)() {
                    Ok(device) => Ok(Box::new(Exclusive {
                        device,
                        in_use: in_use.clone(),
                    })),
                    Err(source) => {
                        in_use.store(false, Ordering::SeqCst);
                        Err(InstanceError::Io { kind, source })
                    }
                }
            }
        }
    }
}

/// Opens what `args` names.
pub fn open(args: &DeviceArgs) -> Result<DeviceTemplate, Box<dyn std::error::Error>> {
    Ok(match args {
        DeviceArgs::Blk {
            image,
            read_only,
            num_queues,
            queue_size,
            max_discard_seg,
            max_write_zeroes_seg,
            aio,
            cache,
            direct,
        } => {
            let blk = Blk::open(
                image,
                BlkOptions {
                    read_only: *read_only,
                    num_queues: *num_queues,
                    queue_size: *queue_size,
                    max_discard_seg: *max_discard_seg,
                    max_write_zeroes_seg: *max_write_zeroes_seg,
                    aio: *aio,
                    cache: if *direct { CacheMode::None } else { *cache },
                    ..Default::default()
                },
            )?;
            // Several frontends may share an image (each its own instance,
            // all drawing on the rings made by `prepare`).
            let preparer = blk.try_clone()?;
            let mut template = DeviceTemplate::shared(
                "blk",
                Box::new(move || Ok(Box::new(blk.try_clone()?) as Box<dyn VirtioDevice>)),
            );
            template.prepare = Some(Box::new(move |n| preparer.prepare_rings(n)));
            template
        }
        DeviceArgs::Rng { rate_limit } => {
            // One budget for every frontend: several connections cannot
            // multiply what the host pool gives away.
            let limiter = rate_limit
                .map(ringfence_rng::RateLimiter::new)
                .transpose()?
                .map(Arc::new);
            let rng = Rng::new(RngOptions {
                rate_limit: limiter,
                ..Default::default()
            })?;
            DeviceTemplate::shared(
                "rng",
                Box::new(move || Ok(Box::new(rng.try_clone()?) as Box<dyn VirtioDevice>)),
            )
        }
        DeviceArgs::Console { socket, stdio, .. } => {
            let end = match (socket, stdio) {
                (Some(path), _) => ConsoleBackend::UnixSocket(path.clone()),
                (None, true) => ConsoleBackend::Stdio,
                (None, false) => ConsoleBackend::Pty,
            };
            let console = Console::new(end, ConsoleOptions::default())?;
            if let Some(pty) = console.pty_path() {
                // Printed as well as logged: scripts and people look for it on stdout.
                println!("console: PTY {}", pty.display());
                tracing::info!(pty = %pty.display(), "console on a PTY");
            }
            DeviceTemplate::exclusive(
                "console",
                Box::new(move || Ok(Box::new(console.try_clone()?) as Box<dyn VirtioDevice>)),
            )
        }
        DeviceArgs::Net {
            tap,
            mac,
            mtu,
            queue_pairs,
            queue_size,
        } => {
            let mac = mac.as_deref().map(parse_mac).transpose()?;
            let taps = Tap::open(tap, *queue_pairs)?;
            if let Some(first) = taps.first() {
                first.set_mtu(*mtu)?;
                first.set_up()?;
            }
            let net = Net::new(
                taps,
                NetOptions {
                    mac,
                    mtu: *mtu,
                    queue_pairs: *queue_pairs,
                    queue_size: *queue_size,
                },
            )?;
            let m = net.mac();
            tracing::info!(
                tap = %tap,
                mac = format_args!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5]),
                mtu,
                queue_pairs,
                "net device on a TAP"
            );
            DeviceTemplate::exclusive(
                "net",
                Box::new(move || Ok(Box::new(net.try_clone()?) as Box<dyn VirtioDevice>)),
            )
        }
        DeviceArgs::Vsock { guest_cid, uds } => {
            let vsock = Vsock::new(VsockOptions::new(*guest_cid, uds.clone()))?;
            tracing::info!(guest_cid, uds = %uds.display(), "vsock device (hybrid Unix-socket model)");
            DeviceTemplate::exclusive(
                "vsock",
                Box::new(move || Ok(Box::new(vsock.try_clone()?) as Box<dyn VirtioDevice>)),
            )
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_uses_the_subcommand_options() {
        match parse_spec("net,tap=rf0,mtu=9000,queue_pairs=2").unwrap() {
            DeviceArgs::Net {
                tap,
                mtu,
                queue_pairs,
                mac,
                ..
            } => assert_eq!(
                (tap.as_str(), mtu, queue_pairs, mac),
                ("rf0", 9000, 2, None)
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_spec("console,pty").unwrap(),
            DeviceArgs::Console { pty: true, .. }
        ));
        assert!(matches!(
            parse_spec("rng").unwrap(),
            DeviceArgs::Rng { rate_limit: None }
        ));
    }

    #[test]
    fn bad_specs_name_the_problem() {
        for bad in [
            "",
            "disk",
            "blk",
            "net,tap=rf0,mtu=big",
            "rng,colour=blue",
            "console,pty,stdio",
        ] {
            let e = parse_spec(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    #[test]
    fn config_file_lists_devices_in_order() {
        let dir = std::env::temp_dir().join(format!("rf-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("devices.toml");
        std::fs::write(
            &path,
            "[[device]]\ntype = \"blk\"\nimage = \"d.img\"\nread-only = true\n\n\
             [[device]]\ntype = \"rng\"\nrate_limit = 4096\n\n\
             [[device]]\ntype = \"console\"\nstdio = true\n",
        )
        .unwrap();
        let list = parse_config(&path).unwrap();
        let kinds: Vec<_> = list.iter().map(DeviceArgs::kind).collect();
        assert_eq!(kinds, ["blk", "rng", "console"]);
        assert!(
            matches!(&list[0], DeviceArgs::Blk { read_only: true, image, .. } if image == Path::new("d.img"))
        );
        assert!(matches!(
            list[1],
            DeviceArgs::Rng {
                rate_limit: Some(4096)
            }
        ));
        std::fs::write(&path, "[[device]]\nimage = \"d.img\"\n").unwrap();
        assert!(parse_config(&path)
            .unwrap_err()
            .to_string()
            .contains("no `type`"));
        std::fs::write(&path, "[[device]]\ntype = \"blk\"\nimage = 3.5\n").unwrap();
        assert!(parse_config(&path).is_err());
        std::fs::write(&path, "socket = \"x\"\n").unwrap();
        assert!(parse_config(&path)
            .unwrap_err()
            .to_string()
            .contains("unknown top-level key"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
