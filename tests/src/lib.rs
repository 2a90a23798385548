//! trmx-tests.
