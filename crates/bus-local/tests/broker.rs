//! The broker (the local hypervisor of the hypervisor-copy model) copies
//! only what a grant allows, only for the process it was granted to, and
//! only while it exists.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use ringfence_bus::{AreaRange, DeviceBus, DeviceBusEvent, DriverBus, GrantAccess};
use ringfence_bus_local::broker::{
    Broker, BrokerClient, CopyDirection, CopyRange, ACCESS_READ, ACCESS_WRITE,
};
use ringfence_bus_local::{sealed_memfd, LocalBusConfig, LocalDeviceBus, LocalDriverBus};
use ringfence_bus_local::{Listener, Seqpacket};
use vm_memory::VolatileMemory;

const PAGE: u64 = 4096;

fn broker() -> (Arc<Broker>, PathBuf) {
    let dir = std::env::temp_dir().join(format!("rf-broker-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("b{}.sock", rand_tag()));
    let listener = Listener::bind(&path).unwrap();
    let broker = Arc::new(Broker::new());
    let b = broker.clone();
    std::thread::spawn(move || b.serve(&listener));
    (broker, path)
}

fn rand_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn range(grant_offset: u64, staging_offset: u64, len: u64) -> CopyRange {
    CopyRange {
        grant_offset,
        staging_offset,
        len,
    }
}

fn bytes(f: &File, at: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    f.read_exact_at(&mut v, at).unwrap();
    v
}

#[test]
fn copies_follow_the_grant_table() {
    let (broker, path) = broker();
    let me = std::process::id();
    let frontend = BrokerClient::connect(&path).unwrap();
    let backend = BrokerClient::connect(&path).unwrap();
    let private = sealed_memfd("private", 4 * PAGE as usize).unwrap();
    let staging = sealed_memfd("staging", 4 * PAGE as usize).unwrap();
    private
        .write_all_at(&[0xAB; 2 * PAGE as usize], PAGE)
        .unwrap();

    // No staging memory yet: nothing to copy into.
    let gref = frontend.grant(me, 3, &private, PAGE, 2 * PAGE).unwrap();
    let one = [range(0, 0, PAGE)];
    assert!(backend
        .copy(me, gref, CopyDirection::GrantToStaging, &one)
        .is_err());
    backend.register_staging(&staging).unwrap();
    assert!(
        backend.register_staging(&staging).is_err(),
        "staging is registered once"
    );

    // Inside the grant: copied, both ways.
    backend
        .copy(
            me,
            gref,
            CopyDirection::GrantToStaging,
            &[range(0, PAGE, 2 * PAGE)],
        )
        .unwrap();
    assert_eq!(
        bytes(&staging, PAGE, 2 * PAGE as usize),
        vec![0xAB; 2 * PAGE as usize]
    );
    staging.write_all_at(&[0x5C; 100], 0).unwrap();
    backend
        .copy(
            me,
            gref,
            CopyDirection::StagingToGrant,
            &[range(PAGE + 8, 0, 100)],
        )
        .unwrap();
    assert_eq!(bytes(&private, 2 * PAGE + 8, 100), vec![0x5C; 100]);
    // The byte before the grant and after the copied range are untouched.
    assert_eq!(bytes(&private, PAGE - 1, 1), vec![0]);
    assert_eq!(bytes(&private, 2 * PAGE + 108, 1), vec![0xAB]);

    // Outside the grant, outside staging, overflowing, too many ranges: denied.
    for bad in [
        range(PAGE, 0, PAGE + 1),
        range(2 * PAGE, 0, 1),
        range(0, 4 * PAGE - 1, 2),
        range(u64::MAX, 0, 2),
        range(0, u64::MAX - 1, 4),
    ] {
        assert!(
            backend
                .copy(me, gref, CopyDirection::StagingToGrant, &[bad])
                .is_err(),
            "{bad:?}"
        );
    }
    assert!(backend
        .copy(
            me,
            gref,
            CopyDirection::GrantToStaging,
            &[range(0, 0, 1); 17]
        )
        .is_err());
    // Another granter's reference, and an unknown one: denied.
    assert!(backend
        .copy(me + 1, gref, CopyDirection::GrantToStaging, &one)
        .is_err());
    assert!(backend
        .copy(me, gref + 1000, CopyDirection::GrantToStaging, &one)
        .is_err());
    // Only the connection that granted may revoke.
    assert!(backend.ungrant(gref).is_err());
    frontend.ungrant(gref).unwrap();
    assert!(
        backend
            .copy(me, gref, CopyDirection::GrantToStaging, &one)
            .is_err(),
        "a revoked grant copies nothing"
    );
    assert!(frontend.ungrant(gref).is_err(), "revoked once");
    // A grant for one direction refuses the other.
    let read_only = frontend.grant(me, ACCESS_READ, &private, 0, PAGE).unwrap();
    backend
        .copy(me, read_only, CopyDirection::GrantToStaging, &one)
        .unwrap();
    assert!(backend
        .copy(me, read_only, CopyDirection::StagingToGrant, &one)
        .is_err());
    let write_only = frontend.grant(me, ACCESS_WRITE, &private, 0, PAGE).unwrap();
    assert!(backend
        .copy(me, write_only, CopyDirection::GrantToStaging, &one)
        .is_err());
    assert!(
        frontend.grant(me, 0, &private, 0, PAGE).is_err(),
        "no access at all"
    );
    frontend.ungrant(read_only).unwrap();
    frontend.ungrant(write_only).unwrap();
    let (copies, copied, denied) = broker.counters();
    assert_eq!((copies, copied), (3, 3 * PAGE + 100));
    assert!(denied >= 13, "{denied}");
}

#[test]
fn a_grant_names_the_one_process_that_may_use_it() {
    let (_broker, path) = broker();
    let me = std::process::id();
    let frontend = BrokerClient::connect(&path).unwrap();
    let backend = BrokerClient::connect(&path).unwrap();
    let private = sealed_memfd("private", PAGE as usize).unwrap();
    let staging = sealed_memfd("staging", PAGE as usize).unwrap();
    backend.register_staging(&staging).unwrap();
    // Granted to process 1, not to us: our copies are refused.
    let gref = frontend.grant(1, 3, &private, 0, PAGE).unwrap();
    assert!(backend
        .copy(me, gref, CopyDirection::GrantToStaging, &[range(0, 0, 8)])
        .is_err());
    // A memfd that could shrink is refused: the broker would fault.
    let loose = memfd_unsealed();
    assert!(frontend.grant(me, 3, &loose, 0, PAGE).is_err());
    // Grants die with the connection that made them.
    let gref = frontend.grant(me, 3, &private, 0, PAGE).unwrap();
    backend
        .copy(me, gref, CopyDirection::GrantToStaging, &[range(0, 0, 8)])
        .unwrap();
    drop(frontend);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while backend
        .copy(me, gref, CopyDirection::GrantToStaging, &[range(0, 0, 8)])
        .is_ok()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "grant outlived its granter"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn memfd_unsealed() -> File {
    let f = tempfile_memfd();
    f.set_len(PAGE).unwrap();
    f
}

fn tempfile_memfd() -> File {
    // A plain file: not a sealable memfd at all.
    let p = std::env::temp_dir().join(format!("rf-broker-plain-{}", std::process::id()));
    let f = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    let _ = std::fs::remove_file(&p);
    f
}

#[test]
fn a_grant_for_copy_reaches_the_device_side_as_staging_only() {
    let (_broker, path) = broker();
    let (a, b) = Seqpacket::pair().unwrap();
    let cfg = LocalBusConfig::default();
    let dev = LocalDeviceBus::new(a, cfg)
        .unwrap()
        .with_broker(path.clone());
    let drv = std::thread::spawn(move || {
        LocalDriverBus::handshake(b, cfg)
            .unwrap()
            .with_broker(&path)
            .unwrap()
    });
    let mut buf = vec![0u8; 65536];
    assert!(matches!(
        dev.recv(&mut buf).unwrap(),
        DeviceBusEvent::Handled
    ));
    let drv = Arc::new(drv.join().unwrap());
    assert!(drv.limits().can_copy && dev.limits().can_copy);

    let private = drv.alloc_private(4 * PAGE as usize).unwrap();
    private
        .mapping
        .as_volatile_slice()
        .subslice(PAGE as usize, PAGE as usize)
        .unwrap()
        .copy_from(&[0x77u8; PAGE as usize]);
    let d = drv.clone();
    let m = private.clone();
    let both = GrantAccess {
        device_reads: true,
        device_writes: true,
    };
    let granting = std::thread::spawn(move || d.grant_for_copy(&m, PAGE, 2 * PAGE, both).unwrap());
    let area = match dev.recv(&mut buf).unwrap() {
        DeviceBusEvent::AreaShared(area) => area,
        _ => panic!("expected the grant"),
    };
    dev.complete_share(area.id).unwrap();
    let id = granting.join().unwrap();
    assert_eq!(area.id, id);
    assert_eq!(area.mapping.size(), 2 * PAGE as usize);
    // Not the driver's memory: staging of the device side's own, not a
    // file the driver sent.
    assert!(area.mapping.file_offset().is_none());
    let copier = area.copier.clone().expect("a copier");
    let staged = |at: usize, len: usize| {
        let mut v = vec![0u8; len];
        area.mapping
            .as_volatile_slice()
            .subslice(at, len)
            .unwrap()
            .copy_to(&mut v[..]);
        v
    };
    assert_eq!(staged(0, 16), vec![0; 16], "nothing until fetched");
    copier
        .fetch(&[AreaRange {
            offset: 0,
            len: PAGE,
        }])
        .unwrap();
    assert_eq!(staged(0, PAGE as usize), vec![0x77; PAGE as usize]);
    area.mapping
        .as_volatile_slice()
        .subslice(PAGE as usize, 4)
        .unwrap()
        .copy_from(&[1u8, 2, 3, 4]);
    copier
        .store(&[AreaRange {
            offset: PAGE,
            len: 4,
        }])
        .unwrap();
    let mut got = [0u8; 4];
    private
        .mapping
        .as_volatile_slice()
        .subslice(2 * PAGE as usize, 4)
        .unwrap()
        .copy_to(&mut got[..]);
    assert_eq!(got, [1, 2, 3, 4]);
    // Past the grant: refused before the broker is even asked.
    assert!(copier
        .fetch(&[AreaRange {
            offset: PAGE,
            len: PAGE + 1,
        }])
        .is_err());

    // Revoked: the device side answers, then the broker forgets the grant.
    let d = drv.clone();
    let revoking = std::thread::spawn(move || d.unshare_area(id));
    assert!(matches!(
        dev.recv(&mut buf).unwrap(),
        DeviceBusEvent::AreaUnshared(x) if x == id
    ));
    dev.complete_unshare(id, true).unwrap();
    revoking.join().unwrap().unwrap();
    assert!(copier.fetch(&[AreaRange { offset: 0, len: 8 }]).is_err());
}
