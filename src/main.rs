//! The `reactor` binary: everything lives in the library; see `reactor --help`.

fn main() -> std::process::ExitCode {
    reactor::cli::main()
}
