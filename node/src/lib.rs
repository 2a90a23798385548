//! trmx-node.
