//! The `ringfence` command: backend, frontend, demo and bench.

mod backend;
mod bench;
mod bench_net;
mod bench_vsock;
mod devices;
mod endpoints;
mod frontend;
mod vhost;

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
    /// Start a backend and a frontend process on a temporary image and show it working.
    Demo(DemoArgs),
    /// Serve a device over vhost-user to QEMU/KVM guests.
    VhostUser(vhost::VhostUserArgs),
    /// Measure the isolated path against the floor measured in the same run.
    Bench(bench::BenchArgs),
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// MiB written and read back per request size.
    #[arg(long, default_value_t = 96)]
    mib_per_size: u64,
    /// Request sizes in KiB.
    #[arg(long, default_value = "4,16,64,128", value_delimiter = ',')]
    sizes_kib: Vec<u64>,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    queue_depth: usize,
}

/// A temporary directory removed on drop.
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

fn demo(args: DemoArgs) -> Result<bool, Box<dyn std::error::Error>> {
    let dir = TempDir::new("demo")?;
    let image = dir.0.join("disk.img");
    let socket = dir.0.join("blk.sock");
    let size = (args.mib_per_size * args.sizes_kib.len() as u64 + 16) << 20;
    std::fs::File::create(&image)?.set_len(size)?;
    println!("image   {} ({} MiB, sparse)", image.display(), size >> 20);
    let mut backend = spawn_backend(&socket, &image, &[])?;
    println!(
        "backend pid {} serving virtio-blk on {}",
        backend.id(),
        socket.display()
    );
    let sizes: Vec<String> = args.sizes_kib.iter().map(|s| s.to_string()).collect();
    let status = Command::new(std::env::current_exe()?)
        .args(["frontend", "--socket-path"])
        .arg(&socket)
        .args(["--mib-per-size", &args.mib_per_size.to_string()])
        .args(["--sizes-kib", &sizes.join(",")])
        .args(["--queue-depth", &args.queue_depth.to_string()])
        .status()?;
    let backend_ok = backend.wait()?.success();
    Ok(status.success() && backend_ok)
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
        Cmd::Demo(a) => demo(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::VhostUser(a) => vhost::run(a),
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
