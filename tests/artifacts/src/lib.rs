//! Paths of the example plugins and test guests, built for wasm32-wasip2 by this crate's build
//! script. Tests use real components, never stand-ins.

include!(concat!(env!("OUT_DIR"), "/artifacts.rs"));
