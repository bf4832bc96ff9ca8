//! Memory models against a real backend process: data moves correctly
//! through every model, and the backend can reach frontend memory only as
//! the model says (checked in its /proc/PID/maps and /proc/PID/fd).

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{backend, Env, BIN};
use ringfence_bus::{split_area_addr, DriverBus};
use ringfence_bus_local::{LocalBusConfig, LocalDriverBus};
use ringfence_msg_driver::{
    discover, Bounce, BouncePool, CompletionWaiter, Grant, InShared, MemoryModel, MsgTransport,
};
use ringfence_virtqueue::{BlkDriver, BlkRequest, DmaRegion};

struct Frontend {
    bus: Arc<dyn DriverBus>,
    driver: BlkDriver<MsgTransport>,
    waiter: CompletionWaiter,
    window: Arc<BouncePool>,
}

fn attach(socket: &std::path::Path) -> Frontend {
    attach_with(socket, None)
}

fn attach_with(socket: &std::path::Path, broker: Option<&std::path::Path>) -> Frontend {
    let mut local = LocalDriverBus::connect(socket, LocalBusConfig::default()).unwrap();
    if let Some(path) = broker {
        local = local.with_broker(path).unwrap();
    }
    let bus: Arc<dyn DriverBus> = Arc::new(local);
    let dev = discover(bus.as_ref()).unwrap()[0];
    let transport = MsgTransport::new(bus.clone(), dev).unwrap();
    let waiter = transport.waiter();
    let window = Arc::new(BouncePool::new(bus.share_area(4 << 20).unwrap()));
    let len = BlkDriver::<MsgTransport>::region_size(64);
    let (paddr, vaddr) = window.alloc(len, 4096).unwrap();
    let region = DmaRegion {
        vaddr: std::ptr::NonNull::new(vaddr).unwrap(),
        paddr,
        len,
    };
    // SAFETY: a fresh zeroed allocation in the window, which `window` keeps
    // mapped for as long as the driver lives (both in `Frontend`).
    let driver = unsafe { BlkDriver::new(transport, region, 64, true) }.unwrap();
    Frontend {
        bus,
        driver,
        waiter,
        window,
    }
}

impl Frontend {
    /// One request, waited for on the used doorbell; its status byte.
    fn request(&mut self, req: BlkRequest) -> u8 {
        self.driver.submit(req).unwrap();
        self.driver.kick();
        loop {
            if let Some(c) = self.driver.pop().unwrap() {
                return c.status;
            }
            if !self.driver.arm() {
                assert!(
                    self.waiter.wait(0, Duration::from_secs(5)).unwrap() || self.driver.has_used(),
                    "no completion within 5 s"
                );
            }
        }
    }
}

/// (name, size) of every memfd the process maps.
fn memfd_maps(pid: u32) -> Vec<(String, u64)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("/memfd:"))
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let size = u64::from_str_radix(b, 16).unwrap() - u64::from_str_radix(a, 16).unwrap();
            let name = l.rsplit('/').next().unwrap().to_string();
            (name, size)
        })
        .collect()
}

fn private_maps(pid: u32) -> Vec<u64> {
    memfd_maps(pid)
        .into_iter()
        .filter(|(n, _)| n.starts_with("memfd:ringfence-private"))
        .map(|(_, s)| s)
        .collect()
}

fn private_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|t| t.to_string_lossy().contains("ringfence-private"))
        .count()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 9) as u8)
        .collect()
}

#[test]
fn a_grant_is_mapped_by_the_backend_only_while_it_is_granted() {
    let env = Env::new("grant-maps");
    let image = env.image(8);
    let on_disk = pattern(0x5A, 64 << 10);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all_at(&on_disk, 1 << 20)
        .unwrap();
    let mut be = backend(&env.socket(), &image, &[]);
    let pid = be.id();
    let mut fe = attach(&env.socket());
    let mut grant = Grant::new(fe.bus.clone());
    let buf = grant.alloc(64 << 10).unwrap();
    assert!(
        private_maps(pid).is_empty(),
        "private memory mapped before any grant"
    );

    // Read 64 KiB into a granted private buffer.
    let mapped = grant.map(&buf, 64 << 10, false).unwrap();
    assert_eq!(
        private_maps(pid),
        vec![64 << 10],
        "while granted: exactly the request's pages"
    );
    let status = fe.request(BlkRequest::Read {
        sector: (1 << 20) / 512,
        data: mapped.addr,
        len: 64 << 10,
    });
    assert_eq!(status, 0);
    assert_eq!(private_maps(pid), vec![64 << 10], "granted until revoked");
    grant.unmap(&buf, 64 << 10, mapped, true).unwrap();
    assert!(private_maps(pid).is_empty(), "a revoked grant is unmapped");
    assert_eq!(private_fds(pid), 0, "nor is its descriptor kept");
    let mut got = vec![0u8; 64 << 10];
    buf.slice().copy_to(&mut got);
    assert_eq!(got, on_disk);

    // The revoked address no longer reaches anything: an error status,
    // and the buffer is untouched.
    let status = fe.request(BlkRequest::Read {
        sector: 0,
        data: mapped.addr,
        len: 4096,
    });
    assert_ne!(status, 0, "a read into a revoked grant must fail");
    let mut again = vec![0u8; 64 << 10];
    buf.slice().copy_to(&mut again);
    assert_eq!(again, on_disk);

    // A write through a grant of 8 KiB of a 64 KiB buffer: only 2 pages
    // are mapped, and they reach the image.
    let data = pattern(0xC3, 8192);
    buf.slice().subslice(0, 8192).unwrap().copy_from(&data);
    let mapped = grant.map(&buf, 8192, true).unwrap();
    assert_eq!(private_maps(pid), vec![8192]);
    let (area, offset) = split_area_addr(mapped.addr);
    assert_ne!(
        area,
        split_area_addr(fe.window.alloc(512, 512).unwrap().0).0
    );
    assert_eq!(offset, 0);
    let status = fe.request(BlkRequest::Write {
        sector: 8,
        data: mapped.addr,
        len: 8192,
    });
    assert_eq!(status, 0);
    grant.unmap(&buf, 8192, mapped, false).unwrap();
    assert!(private_maps(pid).is_empty());
    let mut written = vec![0u8; 8192];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut written, 4096)
        .unwrap();
    assert_eq!(written, data);
    assert_eq!(grant.grants(), 2);
    drop(fe);
    let _ = be.kill();
    let _ = be.wait();
}

/// A `ringfence broker` process, killed when dropped (a failing test too).
struct BrokerProcess(std::process::Child);

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ringfence broker` at `path`.
fn broker(path: &std::path::Path) -> BrokerProcess {
    let child = Command::new(BIN)
        .args(["broker", "--socket-path"])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for_socket(path);
    BrokerProcess(child)
}

#[test]
fn with_hypervisor_copy_the_backend_never_maps_frontend_memory() {
    let env = Env::new("hv-copy");
    let image = env.image(8);
    let on_disk = pattern(0xA5, 64 << 10);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .write_all_at(&on_disk, 1 << 20)
        .unwrap();
    let broker_path = env.dir.join("broker.sock");
    let _broker = broker(&broker_path);
    // The backend runs sandboxed, as it does in production.
    let be = backend(
        &env.socket(),
        &image,
        &["--broker", broker_path.to_str().unwrap()],
    );
    let pid = be.id();
    let mut fe = attach_with(&env.socket(), Some(&broker_path));
    assert!(fe.bus.limits().can_copy);
    let mut copy = Grant::for_copy(fe.bus.clone());
    assert_eq!(copy.name(), "hv-copy");
    let buf = copy.alloc(64 << 10).unwrap();

    // Read 64 KiB into private memory: the broker copies it there.
    let mapped = copy.map(&buf, 64 << 10, false).unwrap();
    let status = fe.request(BlkRequest::Read {
        sector: (1 << 20) / 512,
        data: mapped.addr,
        len: 64 << 10,
    });
    assert_eq!(status, 0);
    // While granted: no frontend memory in the backend, only its own staging.
    assert!(private_maps(pid).is_empty(), "{:?}", memfd_maps(pid));
    assert_eq!(private_fds(pid), 0);
    assert!(
        memfd_maps(pid)
            .iter()
            .any(|(n, _)| n.starts_with("memfd:ringfence-staging")),
        "{:?}",
        memfd_maps(pid)
    );
    copy.unmap(&buf, 64 << 10, mapped, true).unwrap();
    let mut got = vec![0u8; 64 << 10];
    buf.slice().copy_to(&mut got);
    assert!(got == on_disk, "read through the broker differs");

    // A write of 8 KiB of the buffer reaches the image.
    let data = pattern(0x3C, 8192);
    buf.slice().subslice(0, 8192).unwrap().copy_from(&data);
    let mapped = copy.map(&buf, 8192, true).unwrap();
    let status = fe.request(BlkRequest::Write {
        sector: 8,
        data: mapped.addr,
        len: 8192,
    });
    assert_eq!(status, 0);
    copy.unmap(&buf, 8192, mapped, false).unwrap();
    let mut written = vec![0u8; 8192];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut written, 4096)
        .unwrap();
    assert!(written == data, "write through the broker differs");

    // The revoked address reaches nothing, and the buffer is untouched.
    let status = fe.request(BlkRequest::Read {
        sector: 0,
        data: mapped.addr,
        len: 4096,
    });
    assert_ne!(status, 0, "a read into a revoked grant must fail");
    let mut again = vec![0u8; 8192];
    buf.slice().subslice(0, 8192).unwrap().copy_to(&mut again);
    assert!(again == data);
    assert!(private_maps(pid).is_empty());
    // The model holds the bus too: both go, so the backend sees the end.
    drop(copy);
    drop(fe);
    let stats = common::finish(be);
    // One fetch for the write, one store for the read; none failed.
    assert!(stats.contains(" copies=2 copies_failed=0"), "{stats}");
}

#[test]
fn bounce_and_shared_models_move_data_and_never_expose_private_memory() {
    let env = Env::new("models");
    let image = env.image(8);
    let mut be = backend(&env.socket(), &image, &[]);
    let pid = be.id();
    let mut fe = attach(&env.socket());
    let ram = Arc::new(BouncePool::new(fe.bus.share_area(8 << 20).unwrap()));
    let mut models: Vec<Box<dyn MemoryModel>> = vec![
        Box::new(Bounce::new(fe.window.clone())),
        Box::new(InShared::born_in_window(fe.window.clone())),
        Box::new(InShared::full_share(ram)),
    ];
    let shared_before = memfd_maps(pid);
    for (i, model) in models.iter_mut().enumerate() {
        for (n, len) in [(0u64, 4096usize), (1, 256 << 10)] {
            let sector = (i as u64 * 2 + n) * 2048;
            let data = pattern(i as u8 * 16 + n as u8, len);
            let buf = model.alloc(len).unwrap();
            buf.slice().copy_from(&data);
            let m = model.map(&buf, len, true).unwrap();
            let status = fe.request(BlkRequest::Write {
                sector,
                data: m.addr,
                len: len as u32,
            });
            model.unmap(&buf, len, m, false).unwrap();
            assert_eq!(status, 0, "{} write", model.name());
            buf.slice().copy_from(&vec![0u8; len]);
            let m = model.map(&buf, len, false).unwrap();
            let status = fe.request(BlkRequest::Read {
                sector,
                data: m.addr,
                len: len as u32,
            });
            model.unmap(&buf, len, m, true).unwrap();
            assert_eq!(status, 0, "{} read", model.name());
            let mut got = vec![0u8; len];
            buf.slice().copy_to(&mut got);
            assert!(got == data, "{} {len}: bytes differ", model.name());
            let mut on_disk = vec![0u8; len];
            std::fs::File::open(&image)
                .unwrap()
                .read_exact_at(&mut on_disk, sector * 512)
                .unwrap();
            assert!(on_disk == data, "{} {len}: image differs", model.name());
            model.free(buf);
        }
        // Only the areas shared at attach are mapped: no private memory.
        assert_eq!(memfd_maps(pid), shared_before, "{}", model.name());
        assert!(private_maps(pid).is_empty());
    }
    // The bounce model copied every byte once each way.
    assert_eq!(models[0].bytes_copied(), 2 * (4096 + (256 << 10)));
    drop(fe);
    let _ = be.kill();
    let _ = be.wait();
}

#[test]
fn bench_quick_verifies_every_model() {
    let out = Command::new(BIN)
        .args(["bench", "--quick", "--image-mib", "64"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench --quick failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for model in [
        "full-share",
        "in-window",
        "bounce",
        "grant",
        "hv-copy",
        "adaptive",
    ] {
        let verified = stdout
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some(model) && l.ends_with("verified"))
            .count();
        assert_eq!(
            verified, 8,
            "{model}: 4 cells in each wake-up mode: {stdout}"
        );
    }
    assert!(stdout.contains("every model moved correct data"));
}

#[test]
fn grants_under_load_never_fail_a_request() {
    // QD16 grants in both wake-up modes: a grant must be visible to a worker
    // already in the middle of a batch (it once was not: requests failed).
    let out_dir = Env::new("grant-load");
    let out = Command::new(BIN)
        .args([
            "bench",
            "--rounds",
            "1",
            "--cell-ms",
            "150",
            "--models",
            "grant",
            "--sizes",
            "4096,16384,65536,262144",
            "--image-mib",
            "64",
            "--out",
        ])
        .arg(&out_dir.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("errors 0, stalls 0"), "{stdout}");
    let report = std::fs::read_to_string(out_dir.dir.join("report.md")).unwrap();
    assert!(report.contains("| poll | write | 16 | 256 KiB | grant |"));
}
