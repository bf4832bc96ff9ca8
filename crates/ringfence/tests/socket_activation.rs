//! `ringfence vhost-user` on an inherited listening socket: `--socket-fd N`
//! (qemu-storage-daemon's `addr.type=fd`) and systemd socket activation
//! (`LISTEN_FDS`/`LISTEN_PID`, fd 3).

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ringfence");

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("ringfence-sockact-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let img = d.join("disk.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    Dir(d)
}

/// Starts `sh -c SCRIPT` with `listener` as its fd 3.
fn spawn_with_fd3(listener: &UnixListener, script: &str) -> Child {
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: dup2 and fcntl are async-signal-safe. A dup2'ed fd 3 does
    // not inherit FD_CLOEXEC; when the listener already is fd 3, dup2 does
    // nothing and the flag is cleared by hand.
    unsafe {
        cmd.pre_exec(move || {
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

/// VHOST_USER_GET_FEATURES and its reply: the daemon serves the socket.
fn get_features(path: &std::path::Path) -> u64 {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hdr = [0u8; 12];
    hdr[0..4].copy_from_slice(&1u32.to_le_bytes()); // GET_FEATURES
    hdr[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1
    s.write_all(&hdr).unwrap();
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 1);
    assert_ne!(
        u32::from_le_bytes(reply[4..8].try_into().unwrap()) & 0x4,
        0,
        "a reply"
    );
    assert_eq!(u32::from_le_bytes(reply[8..12].try_into().unwrap()), 8);
    u64::from_le_bytes(reply[12..20].try_into().unwrap())
}

fn stop(mut child: Child) {
    // SAFETY: plain kill(2) on a child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "daemon failed: {err}");
}

const VERSION_1: u64 = 1 << 32;

#[test]
fn serves_an_inherited_socket_given_by_number() {
    let d = dir("fd");
    let path = d.0.join("vu.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let child = spawn_with_fd3(
        &listener,
        &format!(
            "exec {BIN} vhost-user --no-sandbox --socket-fd 3 blk --image {}",
            d.0.join("disk.img").display()
        ),
    );
    drop(listener);
    assert_ne!(get_features(&path) & VERSION_1, 0);
    // A second frontend after the first: the socket is kept.
    assert_ne!(get_features(&path) & VERSION_1, 0);
    stop(child);
}

#[test]
fn serves_a_systemd_activated_socket() {
    let d = dir("systemd");
    let path = d.0.join("vu.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let child = spawn_with_fd3(
        &listener,
        &format!(
            "LISTEN_PID=$$ LISTEN_FDS=1 exec {BIN} vhost-user blk --image {}",
            d.0.join("disk.img").display()
        ),
    );
    drop(listener);
    assert_ne!(get_features(&path) & VERSION_1, 0);
    stop(child);
}

#[test]
fn refuses_a_descriptor_that_is_not_a_listening_socket() {
    let d = dir("bad");
    let out = Command::new(BIN)
        .args(["vhost-user", "--socket-fd", "0", "blk", "--image"])
        .arg(d.0.join("disk.img"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a listening Unix socket"), "{err}");
    // And without any socket at all, it says what it needs.
    let out = Command::new(BIN)
        .args(["vhost-user", "blk", "--image"])
        .arg(d.0.join("disk.img"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--socket-fd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
