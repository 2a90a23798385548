//! End-to-end tests: real brokers and nodes over real mutual TLS on
//! 127.0.0.1. One test binary for the whole crate (each binary links tonic,
//! rustls and sled again), besides `leaks.rs`, which needs a process of its own.

// Test code: a broken fixture should fail the test loudly, wherever it is.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod ack_parts;
mod bad_input;
mod bounds;
mod certs;
mod chaos;
mod e2e;
mod network;
mod node;
mod node_disk;
mod settle;
mod storage;
