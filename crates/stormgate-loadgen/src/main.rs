//! `stormgate-loadgen`: the load generator's command line. Everything else lives in the
//! library (`src/lib.rs` maps it): `send` drives station connections at the server,
//! `consume` checks the topic, `produce` measures the plain-producer ceiling.

use std::process::ExitCode;

use clap::Parser;
use stormgate_loadgen::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match stormgate_loadgen::run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stormgate-loadgen: {e}");
            ExitCode::from(2)
        }
    }
}
