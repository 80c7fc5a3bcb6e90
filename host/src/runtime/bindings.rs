//! The host's only `bindgen!`: generated types and traits for the `projection` world in `wit/`.

wasmtime::component::bindgen!({
    world: "projection",
    path: "../wit",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use pupsourcing::projection::{log, read_model, types};

/// The contract version this host implements (the WIT package version).
pub const INTERFACE: &str = "pupsourcing:projection";
pub const INTERFACE_VERSION: &str = "0.1.0";
