//! Test support for Strata's multi-node, multi-process and fault tests, and the benchmarks.
