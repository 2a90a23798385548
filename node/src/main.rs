//! `trmx-node`: the participant's daemon (`trmx-node run --config FILE`) and
//! the command line that talks to it. Everything is in the library
//! (`trmx_node::cli`); this only parses the flags and sets the exit code.

use clap::Parser;
use trmx_node::cli::{Cli, EXIT_FAILURE, execute};

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("trmx-node: cannot start the async runtime: {e}");
            std::process::exit(EXIT_FAILURE);
        }
    };
    if let Err(e) = runtime.block_on(execute(cli)) {
        eprintln!("{e}");
        std::process::exit(EXIT_FAILURE);
    }
}
