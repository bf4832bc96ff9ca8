//! The `ringfence` command: backend, frontend, demo and bench.

mod backend;
mod bench;
mod bench_blk;
mod bench_bus;
mod bench_net;
mod bench_report;
mod bench_vhost;
mod bench_vsock;
mod broker;
mod demo;
mod devices;
mod endpoints;
mod frontend;
mod vhost;
mod vhost_frontend;
mod writer;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

/// Ringfence: virtio devices for VMs that must stay isolated. A backend serves
/// devices over the virtio-msg transport; a frontend uses them while sharing
/// only a small window of its memory.
#[derive(Debug, Parser)]
#[command(name = "ringfence", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve devices on a local-bus endpoint (the service VM).
    Backend(backend::BackendArgs),
    /// Attach to a backend and run a verified block workload (the isolated VM).
    Frontend(frontend::FrontendArgs),
    /// Show it working: a verified disk workload, then every device at once.
    Demo(demo::DemoArgs),
    /// Serve a device over vhost-user to QEMU/KVM guests.
    VhostUser(vhost::VhostUserArgs),
    /// Measure the isolated path against the floor measured in the same run.
    Bench(bench::BenchArgs),
    /// Play the hypervisor of the hypervisor-copy model: hold grants and copy
    /// between a frontend's granted pages and a backend's own memory.
    Broker(broker::BrokerArgs),
    /// Write and verify a disk on our own virtio-blk driver, attaching again
    /// and resubmitting what was in flight when the backend restarts.
    Writer(writer::WriterArgs),
}

pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> std::io::Result<Self> {
        let p = std::env::temp_dir().join(format!("ringfence-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p)?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `ringfence backend --once` on `image` and waits for its socket.
pub(crate) fn spawn_backend(socket: &Path, image: &Path, extra: &[&str]) -> std::io::Result<Child> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["backend", "--once", "--socket-path"])
        .arg(socket)
        .args(extra)
        .args(["blk", "--image"])
        .arg(image)
        .stdin(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            return Err(std::io::Error::other("backend did not start"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Backend(a) => backend::run(a).map(|_| true),
        Cmd::Frontend(a) => frontend::run(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::VhostUser(a) => vhost::run(a),
        Cmd::Broker(a) => broker::run(a).map(|_| true),
        Cmd::Writer(a) => writer::run(a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("ringfence: {msg}");
            ExitCode::FAILURE
        }
    }
}
