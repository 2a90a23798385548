//! `trmx-node`: the participant's daemon (`trmx-node run --config FILE`) and
//! the command line that talks to it. Everything is in the library
//! ([`trmx_node::cli`]); this only hands over the arguments and the exit code.

fn main() {
    std::process::exit(trmx_node::cli::main_with_args(std::env::args_os()));
}
