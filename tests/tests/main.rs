//! End-to-end tests: real brokers and nodes over real mutual TLS on
//! 127.0.0.1. One test binary for the whole crate (each binary links tonic,
//! rustls and sled again).

mod e2e;
mod node;
