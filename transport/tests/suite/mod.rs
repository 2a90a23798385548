mod harness;
mod identity;
mod limits;
mod refusals;
mod revocation;
