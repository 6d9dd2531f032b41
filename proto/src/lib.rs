//! Strata's gRPC API, generated from `strata/v1/*.proto` at build time, and the conversions
//! between its messages and `strata-types` (`convert`).
//!
//! The `.proto` files are the contract for clients in other languages (see the Python client in
//! `tests/`); this crate holds the generated Rust code, the conversions both the server and the
//! client use, and the one message size limit both sides apply.
//!
//! Where this crate sits among the others, and why: `docs/architecture.md` at the repository root.

pub mod convert;

/// Messages larger than this are refused before decoding, whatever the configured limit: the
/// server's hard limit, and what a client accepts in one answer.
pub const HARD_MESSAGE_BYTES_MAX: usize = 64 << 20;

/// Version 1 of the API (`package strata.v1`).
#[allow(missing_docs, unreachable_pub, clippy::all)]
pub mod v1 {
    tonic::include_proto!("strata.v1");

    /// The encoded file descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("strata_descriptor");
}
