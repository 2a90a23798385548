//! Integration tests of `trmx-proto` (one test binary, one module per area).

mod body;
