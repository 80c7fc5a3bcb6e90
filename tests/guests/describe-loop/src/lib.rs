//! A projection whose `describe` never returns: the host must skip it at start (its deadline
//! stops the call) and run the others.

use projection_sdk::prelude::*;

struct DescribeLoop;

impl Projection for DescribeLoop {
    fn describe() -> Descriptor {
        let mut n: u64 = 0;
        loop {
            n = n.wrapping_add(1);
            if n == u64::MAX {
                break;
            }
            std::hint::black_box(n);
        }
        Descriptor::new("never_described", "1.0.0")
    }

    fn handle(_event: &Event<'_>) -> Result<(), HandlerError> {
        Ok(())
    }
}

export_projection!(DescribeLoop);
