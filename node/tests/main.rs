//! Node tests that need no broker: config, the local API socket and error
//! mapping, and the CLI binary. (Tests with a real broker live in the
//! workspace `tests/` crate.)

mod node;
