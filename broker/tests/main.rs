//! Integration tests of the broker: a real broker on 127.0.0.1:0 with real
//! mutual TLS, clients built from the generated stubs, certificates from a
//! test federation CA, time from a manual clock.

mod harness;

mod abuse;
mod bad_input;
mod crash;
mod exchange;
mod lifecycle;
mod metrics;
mod operator;
mod registry;
mod revocation;
mod startup;
