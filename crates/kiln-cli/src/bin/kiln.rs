//! The `kiln` binary. Everything lives in the library so that it can be tested.

fn main() -> std::process::ExitCode {
    kiln_cli::main()
}
