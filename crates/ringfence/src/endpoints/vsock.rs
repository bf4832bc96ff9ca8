//! vsock endpoint (not built yet).

use super::{DeviceLink, EndpointArgs, EndpointError, Report, Stop};

/// Runs the vsock endpoint until stopped.
pub fn run(_link: DeviceLink, _args: &EndpointArgs, _stop: &Stop) -> Result<Report, EndpointError> {
    Err(EndpointError::Option {
        option: "vsock",
        detail: "endpoint not built yet".into(),
    })
}
