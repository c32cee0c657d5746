//! cargo-fuzz target: the station protocol end to end. The driver and the invariants it
//! checks are in `../src/framing_parsing.rs`, shared with the stable test that replays the
//! seeds (`crates/stormgate-protocol/tests/fuzz_seeds.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../src/framing_parsing.rs"]
mod framing_parsing;

fuzz_target!(|data: &[u8]| framing_parsing::check(data));
