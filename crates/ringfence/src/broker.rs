//! `ringfence broker`: the third process of the hypervisor-copy model.

use std::path::PathBuf;

use ringfence_bus_local::broker::Broker;
use ringfence_bus_local::Listener;

/// Arguments of `ringfence broker`.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Unix socket that frontends and backends connect to.
    #[arg(long)]
    pub socket_path: PathBuf,
}

/// Serves until killed.
pub fn run(args: BrokerArgs) -> Result<(), Box<dyn std::error::Error>> {
    let listener = Listener::bind(&args.socket_path)?;
    tracing::info!(socket = %args.socket_path.display(), pid = std::process::id(), "broker listening");
    let broker = Broker::new();
    Err(broker.serve(&listener).into())
}
