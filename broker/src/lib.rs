//! trmx-broker.
