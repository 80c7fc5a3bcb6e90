//! A projection that describes itself with an 8 MiB version string (it would become a metric
//! label and part of every log line): the host must refuse it with a clear error.

use projection_sdk::prelude::*;

struct HugeVersion;

impl Projection for HugeVersion {
    fn describe() -> Descriptor {
        Descriptor::new("huge_version", "1".repeat(8 << 20))
    }

    fn handle(_event: &Event<'_>) -> Result<(), HandlerError> {
        Ok(())
    }
}

export_projection!(HugeVersion);
