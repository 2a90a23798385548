//! trmx-broker: the store-and-forward broker (module map maintained by the service helper).

pub mod clock;
pub mod store;
