//! `ringfence bench vhost-user` drives real vhost-user-blk backends (ours and
//! qemu-storage-daemon) from its in-process frontend, with no error.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_ringfence");

#[test]
fn vhost_user_peer_bench_drives_ringfence_and_qemu_storage_daemon() {
    if Command::new("qemu-storage-daemon")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("qemu-storage-daemon is not installed (Debian: qemu-utils)");
    }
    let out = Command::new(BIN)
        .args([
            "bench",
            "vhost-user",
            "--rounds",
            "1",
            "--cell-ms",
            "60",
            "--image-mib",
            "32",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for backend in ["ringfence ", "qemu-storage-daemon "] {
        let rows: Vec<&str> = stdout
            .lines()
            .filter(|l| l.trim_start().starts_with(backend))
            .collect();
        assert_eq!(rows.len(), 3, "{backend}: {stdout}");
        for row in rows {
            assert!(row.contains("errors 0"), "{row}");
            let iops: f64 = row.split_whitespace().nth(1).unwrap().parse().unwrap();
            assert!(iops > 0.0, "{row}");
        }
    }
}
