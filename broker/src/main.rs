//! `trmx-broker --config FILE`: everything is in the library
//! ([`trmx_broker::cli`]); this only hands it the process arguments.

/// mimalloc instead of glibc's malloc. The broker allocates and frees a
/// few small buffers per key sled writes, on several threads at once; with
/// glibc about a fifth of the store writer's time went to `malloc`/`free`.
/// `trmx-bench` (4 KiB messages, end to end) measured about 20% more
/// messages per second and 20% less broker CPU. The features keep the
/// resident set in check: `no_thp` keeps mimalloc off transparent huge pages
/// (about 60 MiB more otherwise), and `v2` is the version that returns freed
/// memory after 10 ms where v3 waits a second (peak RSS with the 100,000
/// message backlog: 134 MiB with v2, 188 MiB with v3, same throughput).
/// (Libraries and the test binaries keep the system allocator; the store's
/// glibc tuning in `store::sled` then applies.)
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    trmx_broker::cli::main(std::env::args_os())
}
