//! trmx-certs.
