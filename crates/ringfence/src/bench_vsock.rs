//! `ringfence bench vsock` (not built yet).

/// Options of `ringfence bench vsock`.
#[derive(Debug, clap::Args)]
pub struct VsockBenchArgs {}

/// Runs the benchmark.
pub fn run(_args: VsockBenchArgs) -> Result<bool, Box<dyn std::error::Error>> {
    Err("not built yet".into())
}
