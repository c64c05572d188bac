//! The `labelhook` binary: parses the command line and hands it to the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = labelhook::Cli::parse_args();
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(labelhook::run_command_line(cli)),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}
