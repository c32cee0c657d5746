//! The fuzz target's seeds, replayed on the stable toolchain in every test run: the driver of
//! `fuzz/fuzz_targets/framing_parsing.rs` (its invariants: outcomes independent of how the
//! stream is read, bounded partial lines, records as documented) runs over every file in
//! `fuzz/seeds/framing_parsing/`, so neither the target nor its seeds can rot while nobody
//! runs `cargo +nightly fuzz`.

#[path = "../../../fuzz/src/framing_parsing.rs"]
mod framing_parsing;

#[test]
fn every_fuzz_seed_holds_the_invariants() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/framing_parsing");
    let mut seeds = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        framing_parsing::check(&data);
        seeds += 1;
    }
    assert!(seeds >= 4, "only {seeds} seeds in {}", dir.display());
}
