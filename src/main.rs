//! The `reactor` binary: everything lives in the library; see `reactor --help`.

/// With `--features jemalloc`: jemalloc instead of glibc's malloc. Under an alert storm it takes
/// 15-20% more alerts per second here (glibc's arena locks and free lists are ~15% of the CPU),
/// but start-up leaves ~17 MiB more resident, above the 30 MB idle budget; hence opt-in.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    reactor::cli::main()
}
