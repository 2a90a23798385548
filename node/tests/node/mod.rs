mod api;
mod cli;
mod config;
mod harness;
mod probes;
