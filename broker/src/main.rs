//! `trmx-broker --config FILE`: everything is in the library
//! ([`trmx_broker::cli`]); this only hands it the process arguments.

/// mimalloc instead of glibc's malloc. The broker allocates and frees a
/// few small buffers per key sled writes, on several threads at once; with
/// glibc about a fifth of the store writer's time went to `malloc`/`free`.
/// `trmx-bench` (4 KiB messages, end to end) measured about 20% more
/// messages per second and 20% less broker CPU. `no_thp` keeps mimalloc off
/// transparent huge pages, which otherwise raised the resident set by about
/// 60 MiB for nothing. (Libraries and the test binaries keep the system
/// allocator; the store's glibc tuning in `store::sled` then applies.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    trmx_broker::cli::main(std::env::args_os())
}
