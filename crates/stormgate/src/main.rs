//! The `stormgate` command: see `stormgate --help`.

use std::process::ExitCode;

use stormgate::app;
use stormgate::cli::{BufferCommand, Cli, Command, StationCommand};
use stormgate::registry::{self, Registry};
use stormgate::settings::{self, Loaded};

/// Holds SIGHUP, SIGINT and SIGTERM pending from the process's first instruction of its own
/// (an ELF constructor: after the dynamic loader, before the Rust runtime and `main`) until
/// `main` has installed its handlers ([`app::install_signal_handlers`] unblocks them). A
/// SIGHUP sent while the process starts is then a reload once it runs, never the default
/// action that ends it. Only the dynamic loader's own milliseconds stay uncovered.
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array")]
static HOLD_SIGNALS_UNTIL_MAIN: extern "C" fn() = hold_signals;

#[cfg(target_os = "linux")]
extern "C" fn hold_signals() {
    stormgate::app::block_server_signals();
}

fn main() -> ExitCode {
    // First, before settings, logging or anything else that takes time: a SIGHUP (a reload
    // request) or a SIGTERM in the process's first milliseconds must not find the default
    // actions (end the process at once, SIGTERM without draining) still in place.
    let signals = match app::install_signal_handlers() {
        Ok(signals) => signals,
        Err(e) => return fail(&e),
    };
    let loaded = match settings::load(std::env::args_os()) {
        Ok(loaded) => loaded,
        Err(e) => match e.downcast::<clap::Error>() {
            Ok(clap_error) => clap_error.exit(),
            Err(e) => return fail(&e),
        },
    };
    let Some(command) = loaded.cli.command.clone() else {
        let cli = loaded.cli;
        stormgate::logging::init(cli.log_format);
        if let Err(e) = cli.validate() {
            return outcome(Err(e));
        }
        return outcome(app::run(cli, signals));
    };
    // A command, not the server: the signals do what they would have done.
    app::default_signal_actions(signals);
    match command {
        Command::ConfigDoc => {
            print!("{}", settings::config_doc());
            ExitCode::SUCCESS
        }
        Command::CheckConfig => check_config(&loaded),
        Command::Station { command } => outcome(station(&loaded.cli, command)),
        Command::Buffer { command } => buffer(command),
        Command::Replay { file, topic } => {
            stormgate::logging::init(loaded.cli.log_format);
            outcome(app::replay(&loaded.cli, &file, topic).map(drop))
        }
    }
}

/// `stormgate check-config`: the report on stdout; problems on stderr and a failing status.
fn check_config(loaded: &Loaded) -> ExitCode {
    print!("{}", loaded.report());
    match loaded.cli.validate() {
        Ok(()) => {
            println!("configuration is valid");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// `stormgate station add|remove|list`: results on stdout (a token, the list), notes on
/// stderr, so that `TOKEN=$(stormgate station add 12345)` captures just the token.
fn station(cli: &Cli, command: StationCommand) -> anyhow::Result<()> {
    let path = cli.registry_path()?;
    match command {
        StationCommand::Add { zipcode } => {
            let token = registry::add(path, &zipcode)?;
            println!("{token}");
            eprintln!(
                "stormgate: station {zipcode:?} added to {}. Its token (above) is shown only \
                 this once; configure the station to send it in identify as \"token\".",
                path.display()
            );
        }
        StationCommand::Remove { zipcode } => {
            registry::remove(path, &zipcode)?;
            eprintln!(
                "stormgate: station {zipcode:?} removed from {}; open connections keep \
                 their station until they identify again.",
                path.display()
            );
        }
        StationCommand::List => {
            let registry = Registry::load(path)?;
            for (zipcode, created_at) in registry.stations() {
                println!("{zipcode}\t{created_at}");
            }
        }
    }
    Ok(())
}

/// `stormgate buffer inspect|verify DIR`: the report on stdout; `verify` fails on damage.
fn buffer(command: BufferCommand) -> ExitCode {
    use stormgate_buffer::config::DEFAULT_MAX_RECORD_BYTES;
    use stormgate_buffer::offline::{Render, inspect};
    let (dir, verify) = match command {
        BufferCommand::Inspect { dir } => (dir, false),
        BufferCommand::Verify { dir } => (dir, true),
    };
    let logs = match inspect(&dir, DEFAULT_MAX_RECORD_BYTES) {
        Ok(logs) => logs,
        Err(e) => return fail(&anyhow::anyhow!("{}: {e}", dir.display())),
    };
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for log in &logs {
        print!("{}", Render { log, now_ms });
    }
    let damaged = logs.iter().filter(|l| l.has_damage()).count();
    if verify && damaged > 0 {
        eprintln!(
            "stormgate: {damaged} of {} buffer directories damaged",
            logs.len()
        );
        return ExitCode::FAILURE;
    }
    if verify {
        println!("verified: {} buffer directories, no damage", logs.len());
    }
    ExitCode::SUCCESS
}

fn outcome(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            fail(&e)
        }
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("stormgate: {e:#}");
    ExitCode::FAILURE
}
