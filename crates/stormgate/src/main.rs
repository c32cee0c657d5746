//! The `stormgate` command: see `stormgate --help`.

use clap::Parser;
use stormgate::app;
use stormgate::cli::Command;

fn main() -> std::process::ExitCode {
    let cli = stormgate::cli::Cli::parse();
    stormgate::logging::init(cli.log_format);
    let result = match cli.command.clone() {
        Some(Command::Replay { file, topic }) => app::replay(&cli, &file, topic).map(drop),
        None => app::run(cli),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("stormgate: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
