//! trmx-node (module map maintained by the node API/CLI helper).

pub mod core;
