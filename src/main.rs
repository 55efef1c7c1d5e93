//! The `reactor` binary: everything lives in the library; see `reactor --help`.

/// mimalloc for small blocks, glibc's malloc for large ones, counted per thread (see
/// `reactor::allocator`). Without the default `mimalloc` feature, glibc's malloc alone.
#[global_allocator]
static ALLOCATOR: reactor::allocator::Allocator = reactor::allocator::Allocator;

fn main() -> std::process::ExitCode {
    reactor::cli::main()
}
