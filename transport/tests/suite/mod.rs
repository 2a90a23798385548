mod harness;
mod identity;
mod limits;
mod load;
mod refusals;
mod revocation;
mod rollover;
