//! Frontend endpoints: every device the backend offers, exposed to the
//! frontend VM's ordinary programs through `virtio-drivers`' own drivers
//! over the virtio-msg transport and the bounce pool.
//!
//! | device  | endpoint |
//! |---------|----------|
//! | blk     | an NBD server (`--nbd-socket`): qemu-img, qemu-io, nbd-client |
//!
//! net (TAP), console (PTY), rng (FIFO) and vsock (Unix sockets) endpoints
//! are not built yet.

pub mod nbd;

use std::path::PathBuf;

/// An endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// A local descriptor (TAP, PTY, file, socket) failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl EndpointError {
    /// Maps an I/O error while doing `what`.
    pub fn io(what: &'static str) -> impl Fn(std::io::Error) -> EndpointError {
        move |source| EndpointError::Io { what, source }
    }
}

/// What an endpoint did, printed as one line at the end.
#[derive(Debug)]
pub struct Report {
    /// Device kind.
    pub device: &'static str,
    /// Human-readable detail.
    pub detail: String,
}

/// Options of the endpoints (part of `ringfence frontend`).
#[derive(Debug, Clone, clap::Args)]
pub struct EndpointArgs {
    /// Serve the block device as NBD on this Unix socket (instead of the built-in workload).
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// Write the rng device's entropy here (a file or a FIFO).
    #[arg(long)]
    pub rng_out: Option<PathBuf>,
    /// Bytes of entropy to write to --rng-out (0: until stopped).
    #[arg(long, default_value_t = 0)]
    pub rng_bytes: u64,
    /// Run the endpoints this many seconds, then exit (default: until SIGTERM/SIGINT).
    #[arg(long)]
    pub duration_s: Option<u64>,
}
