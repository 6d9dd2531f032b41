//! Strata's gRPC API, generated from `strata/v1/*.proto` at build time.
//!
//! The `.proto` files are the contract for clients in other languages (see the Python client in
//! `tests/`); this crate only holds the generated Rust code.

#![allow(missing_docs, unreachable_pub, clippy::all)]

/// Version 1 of the API (`package strata.v1`).
pub mod v1 {
    tonic::include_proto!("strata.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("strata_descriptor");
}
