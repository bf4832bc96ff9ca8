//! console endpoint (not built yet).

use super::{DeviceLink, EndpointArgs, EndpointError, Report, Stop};

/// Runs the console endpoint until stopped.
pub fn run(_link: DeviceLink, _args: &EndpointArgs, _stop: &Stop) -> Result<Report, EndpointError> {
    Err(EndpointError::Option {
        option: "console",
        detail: "endpoint not built yet".into(),
    })
}
