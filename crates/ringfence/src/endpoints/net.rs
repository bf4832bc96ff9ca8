//! net endpoint (not built yet).

use super::{DeviceLink, EndpointArgs, EndpointError, Report, Stop};

/// Runs the net endpoint until stopped.
pub fn run(_link: DeviceLink, _args: &EndpointArgs, _stop: &Stop) -> Result<Report, EndpointError> {
    Err(EndpointError::Option {
        option: "net",
        detail: "endpoint not built yet".into(),
    })
}
