//! Architecture invariants that the compiler does not check, checked by reading the sources
//! (as rust-analyzer's "tidy" tests do): which crate may depend on what, that
//! docs/ARCHITECTURE.md's code map names every module and every test file, and that every
//! crate's modules use only the modules of lower layers that the code map lists.

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
fn the_bottom_crates_depend_on_no_other_stormgate_crate() {
    // Telemetry's instruments and the protocol's pure functions sit under everything else:
    // telemetry counts rejected lines by number, not by the protocol's `ErrorCode`.
    for krate in ["stormgate-telemetry", "stormgate-protocol"] {
        let deps = dependencies(&root().join("crates").join(krate));
        let ours: Vec<_> = deps.iter().filter(|d| d.starts_with("stormgate")).collect();
        assert!(ours.is_empty(), "{krate} depends on {ours:?}");
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

/// The modules a crate's `lib.rs` declares (`mod x;`, `pub mod x;`, `pub(crate) mod x;`), each
/// with whether it is declared under `#[cfg(test)]`.
fn declared_modules(lib: &Path) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut test_only = false;
    for line in read(lib).lines().map(str::trim) {
        if line == "#[cfg(test)]" {
            test_only = true;
            continue;
        }
        let declared = line
            .strip_prefix("pub mod ")
            .or_else(|| line.strip_prefix("pub(crate) mod "))
            .or_else(|| line.strip_prefix("mod "))
            .and_then(|l| l.strip_suffix(';'));
        if let Some(module) = declared {
            out.push((module.to_owned(), test_only));
        }
        if !line.starts_with("#[") {
            test_only = false;
        }
    }
    out
}

/// Every module a crate's `lib.rs` declares, test-only ones included.
fn modules(lib: &Path) -> Vec<String> {
    declared_modules(lib).into_iter().map(|(m, _)| m).collect()
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

/// The modules a crate's `lib.rs` declares for every build (not `#[cfg(test)]` ones).
fn built_modules(lib: &Path) -> Vec<String> {
    declared_modules(lib)
        .into_iter()
        .filter_map(|(m, test_only)| (!test_only).then_some(m))
        .collect()
}

/// Which module each name `lib.rs` re-exports comes from (`pub use m::{A, B};` → A: m).
fn reexports(lib: &Path) -> Vec<(String, String)> {
    let text = read(lib);
    let mut out = Vec::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("pub use ") {
        rest = &rest[at + "pub use ".len()..];
        let end = rest.find(';').unwrap_or(rest.len());
        let item = &rest[..end];
        if let Some((module, names)) = item.split_once("::") {
            let names = names.trim_matches(|c: char| c == '{' || c == '}' || c.is_whitespace());
            for name in names.split(',') {
                let name = name.trim().rsplit("::").next().unwrap_or("").trim();
                if !name.is_empty() {
                    out.push((name.to_owned(), module.trim().to_owned()));
                }
            }
        }
        rest = &rest[end..];
    }
    out
}

/// The first path segments of every `crate::` path in `code`: `crate::a::B` and
/// `crate::{a, b::C}` give `a` and `b`.
fn crate_paths(code: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        // `$crate::` in a macro, or `somecrate::`: not this crate's path.
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.push(ident(group[start..i].trim()));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(ident(group[start..i].trim()));
                        start = i + 1;
                    }
                    _ => {}
                }
            }
        } else {
            out.push(ident(rest));
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// A source file's code as built: comments and the trailing `#[cfg(test)] mod tests { .. }`
/// left out (tests may use any module).
fn built_code(path: &Path) -> String {
    let text = read(path);
    let mut code = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().contains("mod ") && next.ends_with('{'))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        code.push_str(line);
        code.push('\n');
    }
    code
}

/// A crate's layers from its code map entry: the paragraph that starts with "Layers, bottom
/// up", after its colon, split at `→`, each layer's modules in backquotes.
fn layers(section: &str) -> Option<Vec<Vec<String>>> {
    let start = section.find("Layers, bottom up")?;
    let paragraph = &section[start..];
    let paragraph = &paragraph[..paragraph.find("\n\n").unwrap_or(paragraph.len())];
    let spec = &paragraph[paragraph.find(':')? + 1..];
    Some(
        spec.split('→')
            .map(|layer| {
                layer
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect()
            })
            .collect(),
    )
}

#[test]
fn crate_paths_are_read_from_groups_and_plain_paths() {
    let code = "use crate::a::B;\nuse crate::{c, d::{E, F}, g::H};\nlet x = crate::i::j();\n\
                $crate::k::l!(); othercrate::m::n();";
    assert_eq!(crate_paths(code), ["a", "c", "d", "g", "i"]);
}

/// Every module of every crate sits in a layer of docs/ARCHITECTURE.md's code map and uses
/// (`crate::` paths) only modules of lower layers: no cycle, and no edge the document does
/// not show. Re-exported names count as the module they come from; items `lib.rs` defines
/// itself belong to no layer.
#[test]
fn modules_use_only_lower_layers() {
    let doc = read(&root().join("docs/ARCHITECTURE.md"));
    let mut problems = Vec::new();
    for dir in crates() {
        let krate = name(&dir);
        let lib = dir.join("src/lib.rs");
        if !lib.exists() {
            continue;
        }
        let modules = built_modules(&lib);
        if modules.len() < 2 {
            continue;
        }
        let Some(layers) = layers(&code_map_section(&doc, &krate)) else {
            problems.push(format!(
                "{krate}: its code map entry has no \"Layers, bottom up: ...\" paragraph"
            ));
            continue;
        };
        let layer_of = |m: &str| layers.iter().position(|l| l.iter().any(|x| x == m));
        for module in &modules {
            if layer_of(module).is_none() {
                problems.push(format!("{krate}: module `{module}` is in no layer"));
            }
        }
        for layer in &layers {
            for m in layer {
                if !modules.contains(m) {
                    problems.push(format!("{krate}: layer names `{m}`, which is no module"));
                }
            }
        }
        let reexported = reexports(&lib);
        for module in &modules {
            let file = dir.join(format!("src/{module}.rs"));
            let files = if file.exists() {
                vec![file]
            } else {
                rust_files(&dir.join(format!("src/{module}")))
            };
            let Some(own) = layer_of(module) else {
                continue;
            };
            for file in files {
                for used in crate_paths(&built_code(&file)) {
                    let target = if modules.contains(&used) {
                        used
                    } else if let Some((_, m)) = reexported.iter().find(|(n, _)| *n == used) {
                        m.clone()
                    } else {
                        continue;
                    };
                    if target == *module {
                        continue;
                    }
                    match layer_of(&target) {
                        Some(layer) if layer < own => {}
                        _ => problems.push(format!(
                            "{krate}: `{module}` ({}) uses `{target}`, which is not in a lower \
                             layer",
                            file.strip_prefix(&dir).unwrap().display()
                        )),
                    }
                }
            }
        }
    }
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "module layers (docs/ARCHITECTURE.md's code map): {problems:#?}"
    );
}

/// A setting has one name: the shard runtime's `RuntimeConfig` field is called what the
/// command line's field (its flag, and its variable without `TCP_`) is called. Read from
/// `Cli::runtime_config`, where each field is set from the flags: a field set from a flag of
/// another name fails, unless it is derived from several (listed here, with why).
#[test]
fn runtime_settings_are_named_as_their_flags() {
    // Derived, not one flag each: dead letters are on with the Kafka sink and a DLQ topic.
    const DERIVED: &[&str] = &["dead_letters"];
    let cli = read(&root().join("crates/stormgate/src/cli.rs"));
    let start = cli
        .find("pub fn runtime_config(&self) -> RuntimeConfig {")
        .expect("cli.rs has Cli::runtime_config");
    let body = &cli[start..];
    let body = &body[..body
        .find("..RuntimeConfig::default()")
        .expect("ends with defaults")];
    let mut wrong = Vec::new();
    let mut fields = 0;
    // `field: expression,` at the struct literal's indentation, the expression possibly
    // spanning lines.
    let mut current: Option<(String, String)> = None;
    for line in body.lines().skip(2) {
        let field_line = line
            .strip_prefix("            ")
            .filter(|l| !l.starts_with(' '));
        match field_line.and_then(|l| l.split_once(": ")) {
            Some((field, expr)) if field.chars().all(|c| c.is_ascii_lowercase() || c == '_') => {
                if let Some(done) = current.take() {
                    wrong.extend(check_setting(done, DERIVED));
                    fields += 1;
                }
                current = Some((field.to_owned(), expr.to_owned()));
            }
            _ => {
                if let Some((_, expr)) = &mut current {
                    expr.push_str(line);
                }
            }
        }
    }
    if let Some(done) = current.take() {
        wrong.extend(check_setting(done, DERIVED));
        fields += 1;
    }
    assert!(
        fields > 20,
        "read only {fields} fields of Cli::runtime_config"
    );
    assert!(
        wrong.is_empty(),
        "settings named apart from their flags: {wrong:#?}"
    );
}

/// `field` is set from `self.field` (or `self.field()`), or is a known derived one.
fn check_setting((field, expr): (String, String), derived: &[&str]) -> Option<String> {
    let from_own_flag = expr.split("self.").skip(1).any(|rest| {
        rest.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .next()
            == Some(&field)
    });
    (!from_own_flag && !derived.contains(&field.as_str()))
        .then(|| format!("RuntimeConfig::{field} = {}", expr.trim()))
}
