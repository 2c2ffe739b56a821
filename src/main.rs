#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    wsgate::cli::main()
}
