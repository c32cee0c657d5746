//! Sends COUNT metrics lines with at-least-once delivery and prints the station's counters.
//!
//! ```sh
//! cargo run -p stormgate-station --example reliable_station -- 127.0.0.1:8080 12345 1000
//! ```
//!
//! Prints one JSON object (`sent`, `resent`, `acked`, `nacked`, `rejected`, `reconnects`, …)
//! and exits 0 once every line is answered, or 1 if some are still unanswered after a minute.

use std::process::ExitCode;
use std::time::Duration;

use stormgate_station::ReliableStation;

/// How long the end of the run waits for the last answers.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, zipcode, count] = args.as_slice() else {
        eprintln!("usage: reliable_station ADDR ZIPCODE COUNT");
        return ExitCode::from(2);
    };
    let Ok(count) = count.parse::<u64>() else {
        eprintln!("COUNT must be an unsigned integer, not {count:?}");
        return ExitCode::from(2);
    };
    let mut station = match ReliableStation::connect(addr, zipcode, "ReliableStation") {
        Ok(station) => station,
        Err(e) => {
            eprintln!("cannot connect to {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    for i in 0..count {
        let temperature = 15.0 + (i % 200) as f64 / 10.0;
        station.send(&[("temperature", temperature), ("humidity", 60.0)]);
    }
    let flushed = station.flush(FLUSH_TIMEOUT);
    println!(
        "{}",
        serde_json::to_string(&station.stats()).expect("counters serialize")
    );
    match flushed {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("after {FLUSH_TIMEOUT:?}: {e}");
            ExitCode::FAILURE
        }
    }
}
