//! virtio-msg over ivshmem between real processes: a Ringfence backend as
//! the ivshmem server (peer 0) and a Ringfence frontend attached as a VM
//! would be, 64-byte messages in the shared memory, the frontend's RAM file
//! shared whole.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, BIN};

fn ram(env: &Env, mib: u64) -> std::path::PathBuf {
    let path = env.dir.join("ram");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    path
}

fn ivshmem_backend(env: &Env, ram: &std::path::Path, devices: &[String]) -> Child {
    let socket = env.dir.join("ivshmem.sock");
    let mut cmd = Command::new(BIN);
    cmd.args(["backend", "--bus", "ivshmem", "--once", "--socket-path"])
        .arg(&socket)
        .arg("--guest-ram")
        .arg(ram);
    for d in devices {
        cmd.args(["--device", d]);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "ivshmem server did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn frontend(env: &Env, ram: &std::path::Path, extra: &[&str]) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["frontend", "--bus", "ivshmem", "--socket-path"])
        .arg(env.dir.join("ivshmem.sock"))
        .arg("--guest-ram")
        .arg(ram)
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn blk_moves_verified_data_over_ivshmem_queues() {
    let env = Env::new("ivshmem-blk");
    let image = env.image(16);
    let ram = ram(&env, 32);
    let be = ivshmem_backend(&env, &ram, &[format!("blk,image={}", image.display())]);
    let (ok, out) = frontend(
        &env,
        &ram,
        &["--mib-per-size", "2", "--sizes-kib", "4,64,128"],
    );
    assert!(ok, "{out}");
    assert!(out.contains("OK: all data verified"), "{out}");
    let stats = common::finish(be);
    // Every message fitted a 64-byte slot; none was dropped.
    assert!(stats.contains("malformed=0"), "{stats}");
    assert!(stats.contains("bus_dropped=0"), "{stats}");
    assert!(stats.contains("queue_failures=0"), "{stats}");
    // The data went through the RAM file, never a window of its own.
    let on_disk = std::fs::read(&image).unwrap();
    assert!(on_disk.iter().any(|&b| b != 0), "nothing reached the image");
}

#[test]
fn rng_entropy_arrives_over_ivshmem() {
    let env = Env::new("ivshmem-rng");
    let ram = ram(&env, 16);
    let be = ivshmem_backend(&env, &ram, &["rng".into()]);
    let out_path = env.dir.join("rng.bin");
    let (ok, out) = frontend(
        &env,
        &ram,
        &[
            "--rng-out",
            out_path.to_str().unwrap(),
            "--rng-bytes",
            "65536",
            "--duration-s",
            "30",
        ],
    );
    assert!(ok, "{out}");
    let bytes = std::fs::read(&out_path).unwrap();
    assert_eq!(bytes.len(), 65536, "{out}");
    let zeros = bytes.iter().filter(|&&b| b == 0).count();
    assert!(zeros < 1024, "{zeros} zero bytes: not entropy");
    let stats = common::finish(be);
    assert!(stats.contains("malformed=0"), "{stats}");
}
