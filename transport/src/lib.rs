//! trmx-transport.
