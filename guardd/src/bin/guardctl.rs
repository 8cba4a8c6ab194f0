//! guardctl: the soffid-otp admin and self-service command line.
fn main() -> std::process::ExitCode {
    guardd::cli::main()
}
