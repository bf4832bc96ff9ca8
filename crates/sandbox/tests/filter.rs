//! The filter as a daemon gets it, in a child process (seccomp cannot be
//! removed once installed): calls a compromised device model would make are
//! refused, the calls the daemons use still work.
#![allow(clippy::undocumented_unsafe_blocks)]

use std::ffi::CString;
use std::process::Command;

use ringfence_sandbox::{install_with, Profile};

const PROBE: &str = "RINGFENCE_SANDBOX_PROBE";

fn errno_of(r: libc::c_long) -> i32 {
    if r >= 0 {
        0
    } else {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    }
}

/// Runs only as the child of the test below: installs the filter, tries a
/// list of calls, prints `name=errno` for each.
#[test]
fn probe() {
    let Ok(which) = std::env::var(PROBE) else {
        return;
    };
    let profile = if which == "vhost-user" {
        Profile::VhostUser
    } else {
        Profile::Backend
    };
    let extras = ringfence_sandbox::Extras {
        io_uring: which == "backend-io_uring",
        ..Default::default()
    };
    let allowed = install_with(profile, extras).unwrap();
    let tmp = CString::new(format!("/tmp/ringfence-sandbox-{}", std::process::id())).unwrap();
    let status = CString::new("/proc/self/status").unwrap();
    let sh = CString::new("/bin/true").unwrap();
    let argv = [sh.as_ptr(), std::ptr::null()];
    let results = [
        (
            "eventfd",
            errno_of(unsafe { libc::eventfd(0, 0) } as libc::c_long),
        ),
        (
            "open_ro",
            errno_of(unsafe { libc::open(status.as_ptr(), libc::O_RDONLY) } as libc::c_long),
        ),
        (
            "open_write",
            errno_of(
                unsafe { libc::open(tmp.as_ptr(), libc::O_WRONLY | libc::O_CREAT, 0o600) }
                    as libc::c_long,
            ),
        ),
        (
            "socket_inet",
            errno_of(unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) } as libc::c_long),
        ),
        (
            "socket_unix",
            errno_of(
                unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0) } as libc::c_long,
            ),
        ),
        (
            "execve",
            errno_of(
                unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), std::ptr::null()) }
                    as libc::c_long,
            ),
        ),
        (
            "kill",
            errno_of(unsafe { libc::kill(1, 0) } as libc::c_long),
        ),
        (
            "ptrace",
            errno_of(unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) }),
        ),
        (
            // A ring made now would be unrestricted: refused even with
            // io_uring allowed (rings are made before the filter).
            "io_uring_setup",
            errno_of(unsafe {
                let mut params = [0u8; 120];
                libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr())
            }),
        ),
        (
            // On a descriptor that is no ring: EBADF where it is allowed.
            "io_uring_enter",
            errno_of(unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    -1,
                    0,
                    0,
                    0,
                    std::ptr::null::<u8>(),
                    0,
                )
            }),
        ),
        (
            "thread",
            if std::thread::spawn(|| 7).join().ok() == Some(7) {
                0
            } else {
                -1
            },
        ),
    ];
    let line: Vec<String> = results.iter().map(|(n, e)| format!("{n}={e}")).collect();
    println!("PROBE allowed={allowed} {}", line.join(" "));
}

fn run_probe(profile: &str) -> String {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "probe", "--nocapture", "--test-threads=1"])
        .env(PROBE, profile)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{profile}: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.find("PROBE").map(|i| l[i..].to_string()))
        .unwrap_or_else(|| panic!("{profile}: no probe line in {stdout}"))
}

#[test]
fn forbidden_calls_are_refused_and_the_daemons_calls_still_work() {
    let eperm = libc::EPERM;
    let backend = run_probe("backend");
    for expect in [
        "eventfd=0".to_string(),
        "open_ro=0".to_string(),
        "thread=0".to_string(),
        format!("open_write={eperm}"),
        format!("socket_inet={eperm}"),
        format!("socket_unix={eperm}"),
        format!("execve={eperm}"),
        format!("kill={eperm}"),
        format!("ptrace={eperm}"),
    ] {
        assert!(
            backend.contains(&format!(" {expect}")),
            "backend: {expect} in {backend}"
        );
    }
    assert!(
        backend.contains(&format!(" io_uring_setup={eperm}")),
        "{backend}"
    );
    assert!(
        backend.contains(&format!(" io_uring_enter={eperm}")),
        "{backend}"
    );
    let uring = run_probe("backend-io_uring");
    assert!(
        uring.contains(&format!(" io_uring_setup={eperm}")),
        "{uring}"
    );
    assert!(
        uring.contains(&format!(" io_uring_enter={}", libc::EBADF)),
        "io_uring_enter allowed for io_uring blk: {uring}"
    );
    let vhost = run_probe("vhost-user");
    for expect in [
        "socket_unix=0".to_string(),
        format!("socket_inet={eperm}"),
        format!("execve={eperm}"),
        format!("open_write={eperm}"),
    ] {
        assert!(
            vhost.contains(&format!(" {expect}")),
            "vhost-user: {expect} in {vhost}"
        );
    }
}
