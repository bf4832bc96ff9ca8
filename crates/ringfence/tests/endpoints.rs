//! The frontend's endpoints over virtio-msg, with separate backend and
//! frontend processes and clients nobody here wrote (qemu-io): blk → NBD,
//! console → PTY, rng → file, all on one bus connection.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Env, BIN};

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "process exited before {} appeared",
            path.display()
        );
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_backend(socket: &Path, devices: &[String]) -> Child {
    let mut cmd = Command::new(BIN);
    cmd.args(["backend", "--once", "--socket-path"]).arg(socket);
    for d in devices {
        cmd.args(["--device", d]);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(socket, &mut child);
    child
}

/// Waits for `child` and returns whether it succeeded and its stdout.
fn output_of(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The number before `word` in `line`.
fn number_before(line: &str, word: &str) -> u64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| w.trim_end_matches(',') == word)
        .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
    words[i - 1].parse().unwrap()
}

fn qemu_io(nbd: &Path, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    let out = c
        .arg(format!("nbd+unix:///?socket={}", nbd.display()))
        .output()
        .expect("qemu-io (qemu-utils) is needed");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io failed: {text}");
    assert!(
        !text.contains("fail") && !text.contains("error"),
        "qemu-io reported: {text}"
    );
    text
}

#[test]
fn blk_console_and_rng_endpoints_on_one_bus() {
    let env = Env::new("endpoints");
    let image = env.image(16);
    let socket = env.socket();
    let (con_sock, nbd, pty_link, rng_out) = (
        env.dir.join("console.sock"),
        env.dir.join("disk.nbd"),
        env.dir.join("pty"),
        env.dir.join("rng.bin"),
    );
    let backend = spawn_backend(
        &socket,
        &[
            format!("blk,image={}", image.display()),
            format!("console,socket={}", con_sock.display()),
            "rng".into(),
        ],
    );
    let mut frontend = Command::new(BIN)
        .args(["frontend", "--socket-path"])
        .arg(&socket)
        .arg("--nbd-socket")
        .arg(&nbd)
        .args(["--console-pty", "--console-link"])
        .arg(&pty_link)
        .arg("--rng-out")
        .arg(&rng_out)
        .args(["--rng-bytes", "65536", "--duration-s", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&nbd, &mut frontend);
    wait_for(&pty_link, &mut frontend);

    // blk: a pattern written through NBD lands in the backend's image file,
    // and WRITE_ZEROES (which the endpoint serves with zero writes) too.
    qemu_io(
        &nbd,
        &[
            "write -P 0x5a 4096 1M",
            "write -P 0xc3 2M 128k",
            "write -z 2M 64k",
            "flush",
            "read -P 0x5a 4096 1M",
            "read -P 0 2M 64k",
            "read -P 0xc3 2112k 64k",
        ],
    );
    let bytes = std::fs::read(&image).unwrap();
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    assert!(bytes[4096..4096 + (1 << 20)].iter().all(|&b| b == 0x5a));
    assert!(bytes[(1 << 20) + 4096..2 << 20].iter().all(|&b| b == 0));
    assert!(bytes[2 << 20..(2 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0));
    assert!(bytes[(2 << 20) + (64 << 10)..(2 << 20) + (128 << 10)]
        .iter()
        .all(|&b| b == 0xc3));

    // console: bytes each way between the backend's socket and our PTY.
    let mut host = UnixStream::connect(&con_sock).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut pty = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty_link)
        .unwrap();
    let to_frontend: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let to_backend: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 241) as u8).collect();
    // Give the backend a moment to take the socket client as its console end.
    std::thread::sleep(Duration::from_millis(200));
    host.write_all(&to_frontend).unwrap();
    let mut got = vec![0u8; to_frontend.len()];
    pty.read_exact(&mut got).unwrap();
    assert_eq!(got, to_frontend, "backend → PTY");
    pty.write_all(&to_backend).unwrap();
    let mut got = vec![0u8; to_backend.len()];
    host.read_exact(&mut got).unwrap();
    assert_eq!(got, to_backend, "PTY → backend");

    // rng: the file fills with 64 KiB that look random.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&rng_out).map_or(0, |m| m.len()) < 65536 {
        assert!(Instant::now() < deadline, "rng endpoint wrote too little");
        std::thread::sleep(Duration::from_millis(20));
    }
    let entropy = std::fs::read(&rng_out).unwrap();
    assert_eq!(entropy.len(), 65536);
    let mut seen = [0u32; 256];
    for &b in &entropy {
        seen[usize::from(b)] += 1;
    }
    assert!(
        seen.iter().all(|&n| n > 128 && n < 384),
        "byte histogram of the entropy is far from uniform"
    );

    // SIGTERM ends the endpoints; each reports what it carried.
    // SAFETY: plain kill(2) on a child we started.
    unsafe { libc::kill(frontend.id() as i32, libc::SIGTERM) };
    let (ok, out) = output_of(frontend);
    assert!(ok, "frontend failed: {out}");
    // Each endpoint's report is its last line (after its start-up line).
    let line = |dev: &str| {
        out.lines()
            .rfind(|l| l.starts_with(&format!("{dev}: ")))
            .unwrap_or_else(|| panic!("no {dev} report in {out}"))
            .to_string()
    };
    let rng = line("rng");
    assert_eq!(number_before(&rng, "bytes"), 65536, "{rng}");
    let console = line("console");
    assert!(console.contains("20000 bytes to the PTY"), "{console}");
    assert!(console.contains("30000 bytes from it"), "{console}");
    let blk = line("blk");
    assert!(
        number_before(&blk, "written") >= (1 << 20) + (128 << 10),
        "{blk}"
    );
    assert!(
        backend.wait_with_output().unwrap().status.success(),
        "backend failed"
    );
}

#[test]
fn an_endpoint_for_a_device_the_backend_lacks_fails_the_frontend() {
    let env = Env::new("endpoints-missing");
    let socket = env.socket();
    let backend = spawn_backend(&socket, &["rng".into()]);
    let out = Command::new(BIN)
        .args(["frontend", "--socket-path"])
        .arg(&socket)
        .arg("--nbd-socket")
        .arg(env.dir.join("disk.nbd"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "frontend succeeded: {text}");
    assert!(
        text.contains("blk: FAILED: the backend offers no usable blk device"),
        "{text}"
    );
    drop(backend.wait_with_output());
}

fn winsize(fd: i32) -> (u16, u16) {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`.
    assert_eq!(unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) }, 0);
    (ws.ws_col, ws.ws_row)
}

#[test]
fn a_resize_of_the_backend_terminal_reaches_the_frontend_pty() {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    let env = Env::new("endpoints-resize");
    let socket = env.socket();
    let mut backend = Command::new(BIN)
        .args(["backend", "--once", "--socket-path"])
        .arg(&socket)
        .args(["--device", "console,pty"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut backend_out = std::io::BufReader::new(backend.stdout.take().unwrap());
    backend_out.read_line(&mut first).unwrap();
    let backend_pty = first
        .trim()
        .strip_prefix("console: PTY ")
        .unwrap_or_else(|| panic!("backend printed {first:?}"))
        .to_string();
    let terminal = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&backend_pty)
        .unwrap();
    let set = |cols: u16, rows: u16| {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from `ws`.
        let r = unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0);
    };
    set(90, 30);
    wait_for(&socket, &mut backend);
    let link = env.dir.join("pty");
    let mut frontend = Command::new(BIN)
        .args(["frontend", "--socket-path"])
        .arg(&socket)
        .args(["--console-pty", "--console-link"])
        .arg(&link)
        .args(["--duration-s", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&link, &mut frontend);
    let pty = std::fs::File::open(&link).unwrap();
    let until = |want: (u16, u16)| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while winsize(pty.as_raw_fd()) != want {
            assert!(
                Instant::now() < deadline,
                "frontend PTY is {:?}, not {want:?}",
                winsize(pty.as_raw_fd())
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    until((90, 30));
    set(132, 43);
    until((132, 43));
    // SAFETY: plain kill(2) on a child we started.
    unsafe { libc::kill(frontend.id() as i32, libc::SIGTERM) };
    let (ok, out) = output_of(frontend);
    assert!(ok, "{out}");
    let report = out.lines().rfind(|l| l.starts_with("console: ")).unwrap();
    assert!(!report.contains(" 0 resizes"), "{report}");
    let mut rest = String::new();
    backend_out.read_to_string(&mut rest).unwrap();
    assert!(backend.wait().unwrap().success(), "{rest}");
}
