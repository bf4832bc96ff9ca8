//! The NBD server against real clients: `qemu-io` and `qemu-img` (package
//! qemu-utils). The served disk is an in-memory `MemDisk` that panics on
//! unaligned access; after each client run its bytes are compared with what
//! the client wrote. Tests are skipped (with a message) when the tools are
//! not installed.

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::atomic::Ordering;

use common::*;
use ringfence_nbd::{Listen, NbdServer};

const K: usize = 1024;
const DISK: usize = 4 << 20;

fn url(sock: &Path, export: &str) -> String {
    format!("nbd+unix:///{export}?socket={}", sock.display())
}

fn qemu_io(url: &str, cmds: &[&str]) -> Output {
    qemu_io_opts(&[], url, cmds)
}

fn qemu_io_opts(opts: &[&str], url: &str, cmds: &[&str]) -> Output {
    let mut args = opts.to_vec();
    args.extend(["-f", "raw", url]);
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    run("qemu-io", &args)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn assert_clean(o: &Output) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "client failed: {text}");
    assert!(
        !text.contains("failed"),
        "client reported a failure: {text}"
    );
}

fn patterned(size: usize) -> MemDisk {
    let mut d = MemDisk::new(size);
    for (i, b) in d.data.iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    d
}

#[test]
fn qemu_io_read_write_discard_zero_flush() {
    if !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("qemu-io");
    let (disk, srv, sock) = serve_unix(&dir, MemDisk::new(DISK), "disk0");
    let u = url(&sock, "");
    let out = qemu_io(
        &u,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -P 0x11 100 1000",
            "read -P 0x11 100 1000",
            "read -P 0xab 0 100",
            "read -P 0xab 1100 64436",
            "write -P 0x5a 1M 256k",
            "discard 1M 64k",
            "write -z 1088k 64k",
            "read -P 0 1088k 64k",
            "read -P 0x5a 1152k 128k",
            "write -P 0x77 4194300 4",
            "read -P 0x77 4194300 4",
            "flush",
        ],
    );
    assert_clean(&out);
    let text = stdout(&out);
    assert!(
        text.contains("wrote 65536/65536 bytes at offset 0"),
        "{text}"
    );
    assert!(
        text.contains("wrote 1000/1000 bytes at offset 100"),
        "{text}"
    );
    assert!(
        text.contains("discard 65536/65536 bytes at offset 1048576"),
        "{text}"
    );

    // The disk holds exactly what was written.
    let data = disk.data();
    let mut model = vec![0u8; DISK];
    model[..64 * K].fill(0xab);
    model[100..1100].fill(0x11);
    model[1024 * K..1280 * K].fill(0x5a);
    model[1024 * K..1088 * K].fill(0xdd); // discarded (MemDisk marks 0xdd)
    model[1088 * K..1152 * K].fill(0);
    model[DISK - 4..].fill(0x77);
    assert!(data == model, "disk content differs from the model");

    let ops = disk.0.lock().unwrap().ops.clone();
    assert!(
        ops.contains(&Op::Discard(1024 * K as u64, 64 * K as u64)),
        "{ops:?}"
    );
    assert!(
        ops.contains(&Op::Zeroes(1088 * K as u64, 64 * K as u64)),
        "{ops:?}"
    );
    assert!(ops.contains(&Op::Flush));
    let st = srv.stats();
    assert_eq!(st.connections.load(Ordering::Relaxed), 1);
    assert_eq!(st.failed_connections.load(Ordering::Relaxed), 0);
    assert_eq!(st.error_replies.load(Ordering::Relaxed), 0);
}

#[test]
fn qemu_img_info_and_convert() {
    if !have("qemu-img") {
        return;
    }
    let dir = TempDir::new("qemu-img");
    let (disk, srv, sock) = serve_unix(&dir, patterned(DISK), "disk0");
    let u = url(&sock, "disk0");

    let info = run("qemu-img", &["info", "--output=json", &u]);
    assert_clean(&info);
    let text = stdout(&info);
    assert!(
        text.contains(&format!("\"virtual-size\": {DISK}")),
        "qemu-img info: {text}"
    );

    let out = dir.path("out.img");
    let conv = run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &u,
            out.to_str().unwrap(),
        ],
    );
    assert_clean(&conv);
    let copied = std::fs::read(&out).unwrap();
    assert_eq!(copied.len(), DISK);
    assert!(
        copied == disk.data(),
        "converted image differs from the disk"
    );

    // And back: convert a file into the export.
    let src = dir.path("in.img");
    let pattern: Vec<u8> = (0..DISK).map(|i| (i * 13 % 256) as u8).collect();
    std::fs::write(&src, &pattern).unwrap();
    let back = run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            src.to_str().unwrap(),
            &u,
        ],
    );
    assert_clean(&back);
    assert!(
        disk.data() == pattern,
        "disk differs from the converted-in image"
    );

    let st = srv.stats();
    assert_eq!(st.connections.load(Ordering::Relaxed), 3);
    assert_eq!(st.failed_connections.load(Ordering::Relaxed), 0);
    // info probes a few sectors, convert reads everything once.
    assert!(st.bytes_read.load(Ordering::Relaxed) >= DISK as u64);
    assert_eq!(st.bytes_written.load(Ordering::Relaxed), DISK as u64);
}

#[test]
fn export_names() {
    if !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("names");
    let (_disk, srv, sock) = serve_unix(&dir, patterned(DISK), "disk0");
    // The configured name and the default (empty) name work.
    assert_clean(&qemu_io(&url(&sock, "disk0"), &["read -P 0 0 1"]));
    assert_clean(&qemu_io(&url(&sock, ""), &["read -P 1 1 1"]));
    // Any other name is refused.
    let out = qemu_io(&url(&sock, "other"), &["read 0 1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown export name"),
        "server's message reaches the user"
    );
    let st = srv.stats();
    assert_eq!(st.connections.load(Ordering::Relaxed), 3);
    assert!(st.options_refused.load(Ordering::Relaxed) >= 1);
}

#[test]
fn qemu_io_read_only_export() {
    if !have("qemu-io") {
        return;
    }
    let dir = TempDir::new("ro");
    let mut d = patterned(DISK);
    d.read_only = true;
    let (disk, _srv, sock) = serve_unix(&dir, d, "");
    let u = url(&sock, "");
    assert_clean(&qemu_io_opts(&["-r"], &u, &["read -P 5 5 1"]));
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open read-write.
    let out = qemu_io(&u, &["write 0 512"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "read-write open of a read-only export must fail"
    );
    assert!(disk.data() == patterned(DISK).data);
    assert!(!disk
        .0
        .lock()
        .unwrap()
        .ops
        .iter()
        .any(|o| matches!(o, Op::Write(..))));
}

#[test]
fn qemu_io_over_tcp() {
    if !have("qemu-io") {
        return;
    }
    let listen = Listen::bind_tcp("127.0.0.1:0").unwrap();
    let port = match &listen {
        Listen::Tcp(l) => l.local_addr().unwrap().port(),
        Listen::Unix(_) => unreachable!(),
    };
    let shared = SharedDisk::new(MemDisk::new(DISK));
    let mut dev = shared.clone();
    std::thread::spawn(move || NbdServer::default().serve(&listen, &mut dev, "tcpdisk"));
    let u = format!("nbd://127.0.0.1:{port}/tcpdisk");
    assert_clean(&qemu_io(
        &u,
        &["write -P 0x42 512 1M", "read -P 0x42 512 1M", "flush"],
    ));
    let data = shared.data();
    assert!(data[..512].iter().all(|&b| b == 0));
    assert!(data[512..512 + (1 << 20)].iter().all(|&b| b == 0x42));
    assert!(data[512 + (1 << 20)..].iter().all(|&b| b == 0));
}
