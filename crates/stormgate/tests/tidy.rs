//! Architecture invariants that the compiler does not check, checked by reading the sources
//! (as rust-analyzer's "tidy" tests do): which crate may depend on what, and that
//! docs/ARCHITECTURE.md's code map names every module and every test file.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every crate directory under crates/.
fn crates() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root().join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("Cargo.toml").exists())
        .collect();
    dirs.sort();
    dirs
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// The names of a manifest's `[dependencies]` (not dev- or build-dependencies).
fn dependencies(dir: &Path) -> Vec<String> {
    let manifest: toml::Table = read(&dir.join("Cargo.toml")).parse().unwrap();
    manifest
        .get("dependencies")
        .and_then(|d| d.as_table())
        .map(|t| t.keys().cloned().collect())
        .unwrap_or_default()
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

#[test]
fn only_stormgate_kafka_links_rdkafka() {
    for dir in crates() {
        let links = dependencies(&dir).iter().any(|d| d.starts_with("rdkafka"));
        assert_eq!(
            links,
            name(&dir) == "stormgate-kafka",
            "{}: rdkafka belongs to stormgate-kafka alone",
            name(&dir)
        );
    }
}

#[test]
fn anyhow_is_for_binaries_only() {
    // Libraries return typed errors a caller can match; the binaries (`stormgate`, the load
    // generator) turn them into messages.
    for dir in crates() {
        let uses = dependencies(&dir).iter().any(|d| d == "anyhow");
        let binary = ["stormgate", "stormgate-loadgen"].contains(&name(&dir).as_str());
        assert!(!uses || binary, "{}: anyhow in a library crate", name(&dir));
    }
}

#[test]
fn the_protocol_crate_does_no_io() {
    let dir = root().join("crates/stormgate-protocol");
    for dep in dependencies(&dir) {
        assert!(
            !["glommio", "rdkafka", "tokio", "socket2", "libc"].contains(&dep.as_str()),
            "stormgate-protocol depends on {dep}"
        );
    }
    for file in rust_files(&dir.join("src")) {
        let text = read(&file);
        for io in [
            "std::fs",
            "std::net",
            "TcpStream",
            "File::",
            "std::process",
            "std::thread",
        ] {
            assert!(
                !text.contains(io),
                "{}: {io} in the protocol crate",
                file.display()
            );
        }
    }
}

/// The modules a crate's `lib.rs` declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`).
fn modules(lib: &Path) -> Vec<String> {
    read(lib)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l
                .strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("pub(crate) mod "))
                .or_else(|| l.strip_prefix("mod "))?;
            l.strip_suffix(';').map(str::to_owned)
        })
        .collect()
}

/// The part of docs/ARCHITECTURE.md's code map about one crate: from its heading to the next.
fn code_map_section(doc: &str, krate: &str) -> String {
    let heading = format!("### `crates/{krate}`");
    let start = doc
        .find(&heading)
        .unwrap_or_else(|| panic!("docs/ARCHITECTURE.md has no code map entry {heading}"));
    let rest = &doc[start + heading.len()..];
    let end = rest
        .find("\n### ")
        .or_else(|| rest.find("\n## "))
        .unwrap_or(rest.len());
    rest[..end].to_owned()
}

#[test]
fn the_code_map_names_every_module_and_test_file() {
    let doc = read(&root().join("docs/ARCHITECTURE.md"));
    let mut missing = Vec::new();
    for dir in crates() {
        let krate = name(&dir);
        let section = code_map_section(&doc, &krate);
        let lib = dir.join("src/lib.rs");
        if lib.exists() {
            for module in modules(&lib) {
                if module.ends_with("tests") {
                    continue;
                }
                if !section.contains(&format!("`{module}`"))
                    && !section.contains(&format!("`{module} "))
                    && !section.contains(&format!("`{module}("))
                {
                    missing.push(format!("{krate}: module `{module}`"));
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(dir.join("tests")) {
            for entry in entries {
                let file = entry.unwrap().file_name().to_string_lossy().into_owned();
                if file.ends_with(".rs") && !doc.contains(&format!("tests/{file}")) {
                    missing.push(format!("{krate}: tests/{file}"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md's code map does not name: {missing:#?}"
    );
}
