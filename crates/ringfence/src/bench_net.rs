//! `ringfence bench net` (not built yet).

/// Options of `ringfence bench net`.
#[derive(Debug, clap::Args)]
pub struct NetBenchArgs {}

/// Runs the benchmark.
pub fn run(_args: NetBenchArgs) -> Result<bool, Box<dyn std::error::Error>> {
    Err("not built yet".into())
}
