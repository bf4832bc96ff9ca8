//! Runs one case: the evil device on a thread of this process, the real
//! `ringfence frontend` as a child process, then the checks every case shares.

use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ringfence_bus_local::Listener;

use crate::evil::{self, ChainHook, Params, ReplyHook, Report};

const BIN: &str = env!("CARGO_BIN_EXE_ringfence");

/// A frontend still running after this long hangs; it is killed.
pub const HANG: Duration = Duration::from_secs(40);

/// The workload: 1 MiB of 4 KiB and of 64 KiB requests, written and read back.
pub const WORKLOAD: &[&str] = &["--mib-per-size", "1", "--sizes-kib", "4,64"];
/// The same with notifications carried in-band (EVENT_USED / EVENT_AVAIL).
pub const WORKLOAD_INBAND: &[&str] = &[
    "--mib-per-size",
    "1",
    "--sizes-kib",
    "4,64",
    "--no-doorbells",
];

/// What the frontend must do.
#[derive(Debug, Clone, Copy)]
pub enum Expect {
    /// The attack is harmless: exit 0, every phase verified.
    Verified,
    /// The device is unusable: exit 1 with an error (a `ringfence:` line on
    /// stderr or a FAILED line on stdout) mentioning one of these words, if any.
    Refused(&'static [&'static str]),
    /// As `Refused`, and the driver caught the attack itself: no read was
    /// handed up with wrong data (the workload counted no mismatches).
    Detected,
}

/// The mismatches the workload reported (`FAILED (E errors, M mismatches)`).
fn mismatches(stdout: &str) -> u64 {
    stdout
        .split(" mismatches")
        .filter_map(|s| s.split_whitespace().last()?.parse::<u64>().ok())
        .sum()
}

/// One attack.
pub struct Case {
    /// Test name (also names the temporary directory).
    pub name: &'static str,
    /// What the device reports.
    pub params: Params,
    /// Control-plane behaviour.
    pub reply: ReplyHook,
    /// Data-plane behaviour.
    pub chain: ChainHook,
    /// Frontend options besides the socket and the marker.
    pub args: &'static [&'static str],
    /// The required outcome.
    pub expect: Expect,
    /// The frontend must be done within this time.
    pub within: Duration,
}

impl Case {
    /// An honest device and the standard workload.
    pub fn honest(name: &'static str) -> Self {
        Self {
            name,
            params: evil::HONEST,
            reply: evil::honest_reply,
            chain: evil::honest_chain,
            args: WORKLOAD,
            expect: Expect::Verified,
            within: HANG,
        }
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p =
            std::env::temp_dir().join(format!("ringfence-hostile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temporary directory");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn random_u64() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    h.write_u128(now.map_or(0, |d| d.as_nanos()));
    h.finish()
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    })
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].trim()
}

/// What happened in one run.
struct Run {
    status: ExitStatus,
    hung: bool,
    elapsed: Duration,
    stdout: String,
    stderr: String,
    report: Report,
}

fn execute(case: &Case, marker: &str) -> Run {
    let dir = TempDir::new(case.name);
    let socket = dir.0.join("evil.sock");
    let listener = Listener::bind(&socket).expect("bind the device socket");
    let stop = Arc::new(AtomicBool::new(false));
    let device = {
        let (p, reply, chain, stop) = (case.params, case.reply, case.chain, stop.clone());
        let marker = marker.as_bytes().to_vec();
        std::thread::spawn(move || evil::serve(listener, p, reply, chain, marker, stop))
    };
    let start = Instant::now();
    let mut child = Command::new(BIN)
        .arg("frontend")
        .arg("--socket-path")
        .arg(&socket)
        .args(["--private-marker", marker])
        .args(case.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the frontend");
    let stdout = drain(child.stdout.take().expect("piped stdout"));
    let stderr = drain(child.stderr.take().expect("piped stderr"));
    let (status, hung) = loop {
        if let Some(s) = child.try_wait().expect("wait for the frontend") {
            break (s, false);
        }
        if start.elapsed() > HANG {
            let _ = child.kill();
            break (child.wait().expect("reap the frontend"), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = start.elapsed();
    stop.store(true, Ordering::SeqCst);
    Run {
        status,
        hung,
        elapsed,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        report: device.join().expect("the evil device panicked"),
    }
}

/// Runs `case` and asserts what every case must satisfy plus its expected outcome.
pub fn run(case: Case) {
    let marker = format!("SECRET-{:016x}", random_u64());
    let r = execute(&case, &marker);
    let mut problems = Vec::new();
    let code = r.status.code();
    if r.hung {
        problems.push(format!("hang: still running after {HANG:?}, killed"));
    } else if let Some(sig) = r.status.signal() {
        problems.push(format!("crash: killed by signal {sig}"));
    } else if code == Some(101) {
        problems.push("crash: panicked (exit 101)".to_string());
    } else if r.elapsed > case.within {
        problems.push(format!(
            "slow: exited after {:.1} s, more than {:?}",
            r.elapsed.as_secs_f64(),
            case.within
        ));
    }
    if r.report.marker_mid_run == Some(true) {
        problems.push("leak: private marker in the shared window mid-run".to_string());
    }
    if let Some(w) = &r.report.window {
        if evil::contains(&evil::window_bytes(w), marker.as_bytes()) {
            problems.push("leak: private marker in the shared window after the run".to_string());
        }
    }
    if r.report.stale_bytes > 0 {
        problems.push(format!(
            "leak: the device saw {} stale bytes in device-writable buffers, most in {}",
            r.report.stale_bytes,
            r.report
                .stale_example
                .as_ref()
                .map_or("?", |e| e.1.as_str())
        ));
    }
    let output = format!("{}\n{}", r.stdout, r.stderr).to_lowercase();
    // The words an error must mention, or `None` when the run must succeed.
    let refusal: Option<&[&str]> = match case.expect {
        Expect::Verified => None,
        Expect::Refused(words) => Some(words),
        Expect::Detected => Some(&[]),
    };
    match refusal {
        None => {
            if code != Some(0) || !r.stdout.contains("verified") || r.stdout.contains("FAILED") {
                problems.push("expected exit 0 with every phase verified".to_string());
            }
        }
        Some(words) => {
            let error_shown = r.stdout.contains("FAILED") || !r.stderr.trim().is_empty();
            if code != Some(1) || !error_shown {
                problems.push("expected exit 1 with an error".to_string());
            } else if !words.is_empty() && !words.iter().any(|w| output.contains(w)) {
                problems.push(format!("expected the error to mention one of {words:?}"));
            }
        }
    }
    let wrong_reads = mismatches(&r.stdout);
    if matches!(case.expect, Expect::Detected) && wrong_reads > 0 {
        problems.push(format!(
            "undetected: {wrong_reads} reads handed up with wrong data before the run failed"
        ));
    }
    let observed = format!(
        concat!(
            "{}: exit {:?} signal {:?}{} after {:.1} s; device saw {} chains, {}{}\n",
            "  stdout: {}\n  stderr: {}"
        ),
        case.name,
        code,
        r.status.signal(),
        if r.hung { " (killed: hang)" } else { "" },
        r.elapsed.as_secs_f64(),
        r.report.chains,
        r.report
            .window
            .as_ref()
            .map_or("no window shared".to_string(), |w| {
                format!("{} KiB window scanned", w.mapping.size() >> 10)
            }),
        r.report
            .error
            .as_deref()
            .map(|e| format!(", stopped: {e}"))
            .unwrap_or_default(),
        tail(&r.stdout, 400).replace('\n', "\n          "),
        tail(&r.stderr, 600).replace('\n', "\n          "),
    );
    assert!(problems.is_empty(), "{}\n{observed}", problems.join("\n"));
    eprintln!("{observed}");
}
