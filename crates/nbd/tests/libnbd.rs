//! The NBD server against libnbd's tools (`nbdinfo`, `nbdcopy`, Debian
//! package libnbd-bin), a strict client independent of qemu. Skipped when the
//! tools are not installed.

mod common;

use std::sync::atomic::Ordering;

use common::*;

const DISK: usize = 2 << 20;

fn url(sock: &std::path::Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn nbdinfo_describes_the_export() {
    if !have("nbdinfo") {
        return;
    }
    let dir = TempDir::new("nbdinfo");
    let (_disk, srv, sock) = serve_unix(&dir, MemDisk::new(DISK), "disk0");

    let out = run("nbdinfo", &["--json", &url(&sock, "disk0")]);
    assert!(out.status.success(), "{}", text(&out));
    let t = text(&out);
    assert!(t.contains(&format!("\"export-size\": {DISK}")), "{t}");
    assert!(t.contains("\"is_read_only\": false"), "{t}");
    assert!(t.contains("\"can_flush\": true"), "{t}");
    assert!(t.contains("\"can_fua\": true"), "{t}");
    assert!(t.contains("\"can_trim\": true"), "{t}");
    assert!(t.contains("\"can_zero\": true"), "{t}");
    assert!(t.contains("\"can_multi_conn\": false"), "{t}");
    assert!(t.contains("\"block_size_minimum\": 512"), "{t}");
    assert!(t.contains("\"block_size_preferred\": 4096"), "{t}");
    assert!(
        t.contains(&format!("\"block_size_maximum\": {}", 32 << 20)),
        "{t}"
    );

    let out = run("nbdinfo", &["--list", &url(&sock, "")]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("export=\"disk0\""), "{}", text(&out));

    assert_eq!(srv.stats().failed_connections.load(Ordering::Relaxed), 0);
}

#[test]
fn nbdcopy_both_ways() {
    if !have("nbdcopy") {
        return;
    }
    let dir = TempDir::new("nbdcopy");
    let (disk, srv, sock) = serve_unix(&dir, MemDisk::new(DISK), "");
    let pattern: Vec<u8> = (0..DISK).map(|i| (i * 31 % 255) as u8).collect();
    let src = dir.path("in.img");
    std::fs::write(&src, &pattern).unwrap();
    let out = run("nbdcopy", &[src.to_str().unwrap(), &url(&sock, "")]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(disk.data() == pattern, "disk differs after nbdcopy in");

    let dst = dir.path("out.img");
    let out = run("nbdcopy", &[&url(&sock, ""), dst.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(std::fs::read(&dst).unwrap() == pattern, "copy out differs");
    assert_eq!(srv.stats().failed_connections.load(Ordering::Relaxed), 0);
    assert_eq!(srv.stats().error_replies.load(Ordering::Relaxed), 0);
}
