//! Integration tests of trmx-transport: real sockets on 127.0.0.1:0, a federation made
//! in a temp dir, the gRPC health service served behind an identity-recording interceptor.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used)]

mod suite;
