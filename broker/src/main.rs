//! `trmx-broker --config FILE`: everything is in the library
//! ([`trmx_broker::cli`]); this only hands it the process arguments.

fn main() -> std::process::ExitCode {
    trmx_broker::cli::main(std::env::args_os())
}
