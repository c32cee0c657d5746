//! The `stormgate` command: see `stormgate --help`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = stormgate::cli::Cli::parse();
    stormgate::logging::init(cli.log_format);
    match stormgate::app::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("stormgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
