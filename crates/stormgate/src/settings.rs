//! Where each setting comes from: flags, environment, the TOML config file, defaults — in
//! that order of precedence — and the commands that show it (`check-config`, `config-doc`).
//!
//! # The config file
//!
//! `--config FILE` (or `STORMGATE_CONFIG`) names a TOML file. Its keys follow from each
//! setting's environment variable, so there is one name to learn:
//!
//! | Variable | TOML |
//! |---|---|
//! | `TCP_<X>` | `<x>` in the `[tcp]` table (`TCP_JOB_QUEUE_SIZE` → `[tcp] job_queue_size`) |
//! | `KAFKA_<X>` | `<x>` in the `[kafka]` table (`KAFKA_BROKERS` → `[kafka] brokers`) |
//! | `BUFFER_<X>` | `<x>` in the `[buffer]` table (`BUFFER_MAX_BYTES` → `[buffer] max_bytes`) |
//! | `KAFKA_PROP_<NAME>` | the librdkafka property in `[kafka.properties]` (`"socket.keepalive.enable" = "true"`) |
//! | anything else | a top-level key, lowercase (`SHUTDOWN_TIMEOUT` → `shutdown_timeout`) |
//!
//! Values are TOML strings, integers or booleans, written as on the command line:
//! durations and sizes as strings (`"30s"`, `"64MiB"`). An unknown key or table is an error.
//!
//! # How the layers combine
//!
//! clap resolves flags, environment and defaults. The file slots in below the environment:
//! every setting that clap took from its default and that the file sets is passed to clap
//! again as if it were a flag, and clap parses and validates it like one. Each file value is
//! first checked on its own, so a bad one is reported with its file, table and key.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches};

use crate::cli::{Cli, KAFKA_PROP_ENV_PREFIX};

/// Settings that make no sense in the file (the file's own name).
const NOT_IN_FILE: &[&str] = &["STORMGATE_CONFIG"];
/// The TOML table of librdkafka pass-through properties.
const PROPERTIES_TABLE: &str = "kafka.properties";

/// Where a setting's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// An environment variable.
    Env,
    /// The config file.
    File,
    /// The built-in default.
    Default,
    /// Not set at all (settings without a default).
    Unset,
}

impl Source {
    /// How `check-config` names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Env => "env",
            Source::File => "file",
            Source::Default => "default",
            Source::Unset => "unset",
        }
    }
}

/// The settings after all layers, and where each came from.
#[derive(Debug)]
pub struct Loaded {
    /// The effective settings.
    pub cli: Cli,
    /// The config file, if one was read.
    pub file: Option<PathBuf>,
    /// Per setting (clap's argument id): where its value came from.
    pub sources: BTreeMap<String, Source>,
    /// The final matches, for showing values as given.
    matches: ArgMatches,
}

/// One setting as the documentation and `check-config` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingDoc {
    /// clap's argument id.
    pub id: String,
    /// `--flag`.
    pub flag: String,
    /// The environment variable, if any.
    pub env: Option<String>,
    /// The TOML key (`table.key`), if the file can set it.
    pub toml: Option<String>,
    /// The default, as given on the command line.
    pub default: Option<String>,
    /// The help text.
    pub help: String,
}

/// The TOML key of a setting with environment variable `env` (see the module doc).
pub fn toml_key(env: &str) -> Option<String> {
    if NOT_IN_FILE.contains(&env) || env.starts_with(KAFKA_PROP_ENV_PREFIX) {
        return None;
    }
    let lower = env.to_ascii_lowercase();
    Some(if let Some(k) = lower.strip_prefix("tcp_") {
        format!("tcp.{k}")
    } else if let Some(k) = lower.strip_prefix("kafka_") {
        format!("kafka.{k}")
    } else if let Some(k) = lower.strip_prefix("buffer_") {
        format!("buffer.{k}")
    } else {
        lower
    })
}

/// Every setting of the server, in `--help` order.
pub fn settings() -> Vec<SettingDoc> {
    let cmd = Cli::command();
    cmd.get_arguments()
        .filter_map(|arg| {
            let long = arg.get_long()?;
            if matches!(long, "help" | "version") {
                return None;
            }
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
            let toml = match (long, &env) {
                ("kafka-prop", _) => Some(format!("{PROPERTIES_TABLE}.<name>")),
                (_, Some(env)) => toml_key(env),
                (_, None) => None,
            };
            let default = arg
                .get_default_values()
                .first()
                .map(|d| d.to_string_lossy().into_owned());
            let help = arg
                .get_long_help()
                .or(arg.get_help())
                .map(|h| h.to_string().replace('\n', " "))
                .unwrap_or_default();
            Some(SettingDoc {
                id: arg.get_id().to_string(),
                flag: format!("--{long}"),
                env,
                toml,
                default,
                help,
            })
        })
        .collect()
}

/// Parses `args` (the program name first), reading the config file they name, if any.
///
/// Errors from clap itself (a bad flag or environment value, `--help`) come back as
/// [`clap::Error`] inside the `anyhow::Error`, so the caller can let clap print them.
pub fn load(args: impl IntoIterator<Item = impl Into<OsString>>) -> anyhow::Result<Loaded> {
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let first = Cli::command().try_get_matches_from(&args)?;
    let file = first.get_one::<PathBuf>("config").cloned();
    let Some(path) = file.clone() else {
        return finish(first, None, Vec::new(), &[]);
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let (values, properties) = flatten(&path, &table)?;

    let by_key: BTreeMap<String, SettingDoc> = settings()
        .into_iter()
        .filter_map(|s| Some((s.toml.clone()?, s)))
        .collect();
    let mut extra: Vec<OsString> = Vec::new();
    let mut from_file = Vec::new();
    for (key, value) in values {
        let Some(setting) = by_key.get(&key) else {
            bail!(
                "{}: unknown key `{key}`{}",
                path.display(),
                suggestion(&key, by_key.keys())
            );
        };
        let flag = format!("{}={value}", setting.flag);
        // Checked alone first, so that an error names the file and the key.
        if let Err(e) = Cli::command().try_get_matches_from(["stormgate", flag.as_str()]) {
            bail!(
                "{}: `{key}` = {value:?}: {}",
                path.display(),
                clap_reason(&e)
            );
        }
        if matches!(
            first.value_source(&setting.id),
            None | Some(ValueSource::DefaultValue)
        ) {
            extra.push(flag.into());
            from_file.push(setting.id.clone());
        }
    }
    // Flags after the subcommand belong to it; the file's go before it.
    let at = subcommand_position(&args, &first);
    let mut all = args;
    all.splice(at..at, extra);
    let matches = Cli::command().try_get_matches_from(&all)?;
    finish(matches, Some(path), properties, &from_file)
}

fn finish(
    matches: ArgMatches,
    file: Option<PathBuf>,
    properties: Vec<(String, String)>,
    from_file: &[String],
) -> anyhow::Result<Loaded> {
    let mut cli = Cli::from_arg_matches(&matches)?;
    cli.file_props = properties;
    cli.kafka_idempotence_set = from_file.iter().any(|id| id == "kafka_idempotence")
        || matches!(
            matches.value_source("kafka_idempotence"),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
    let sources = settings()
        .into_iter()
        .map(|s| {
            let source = if from_file.contains(&s.id) {
                Source::File
            } else {
                match matches.value_source(&s.id) {
                    Some(ValueSource::CommandLine) => Source::Flag,
                    Some(ValueSource::EnvVariable) => Source::Env,
                    Some(ValueSource::DefaultValue) => Source::Default,
                    _ => Source::Unset,
                }
            };
            (s.id, source)
        })
        .collect();
    Ok(Loaded {
        cli,
        file,
        sources,
        matches,
    })
}

/// The first line of a clap error, without clap's `error: ` prefix.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_owned()
}

/// Where the subcommand starts in `args` (or their end).
fn subcommand_position(args: &[OsString], matches: &ArgMatches) -> usize {
    let Some(name) = matches.subcommand_name() else {
        return args.len();
    };
    args.iter()
        .enumerate()
        .skip(1)
        .find(|(_, a)| a.to_str() == Some(name))
        .map_or(args.len(), |(i, _)| i)
}

/// The file's settings as (`table.key`, value as a flag value) and its librdkafka properties.
type Flattened = (Vec<(String, String)>, Vec<(String, String)>);

fn flatten(path: &Path, table: &toml::Table) -> anyhow::Result<Flattened> {
    let mut values = Vec::new();
    let mut properties = Vec::new();
    for (key, value) in table {
        match (key.as_str(), value) {
            ("tcp" | "kafka" | "buffer", toml::Value::Table(inner)) => {
                for (k, v) in inner {
                    let full = format!("{key}.{k}");
                    match (full.as_str(), v) {
                        (PROPERTIES_TABLE, toml::Value::Table(props)) => {
                            for (name, v) in props {
                                let v = scalar(path, &format!("{full}.{name}"), v)?;
                                properties.push((name.clone(), v));
                            }
                        }
                        _ => values.push((full.clone(), scalar(path, &full, v)?)),
                    }
                }
            }
            (_, toml::Value::Table(_)) => {
                bail!(
                    "{}: unknown table `[{key}]` (tables: [tcp], [kafka], [buffer], [{PROPERTIES_TABLE}])",
                    path.display()
                )
            }
            _ => values.push((key.clone(), scalar(path, key, value)?)),
        }
    }
    Ok((values, properties))
}

fn scalar(path: &Path, key: &str, value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!(
            "{}: `{key}` must be a string, number or boolean, not {}",
            path.display(),
            other.type_str()
        ),
    })
}

/// ", did you mean `x`?" for the known key closest to `key`, if any is close.
fn suggestion<'a>(key: &str, known: impl Iterator<Item = &'a String>) -> String {
    let best = known
        .map(|k| (strsim::levenshtein(key, k), k))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((d, k)) if d <= 3 => format!(", did you mean `{k}`?"),
        _ => " (see docs/CONFIGURATION.md)".to_owned(),
    }
}

impl Loaded {
    /// `check-config`'s report: each setting's effective value and where it came from.
    pub fn report(&self) -> String {
        let mut out = String::new();
        match &self.file {
            Some(f) => writeln!(out, "config file: {}", f.display()),
            None => writeln!(out, "config file: none (--config FILE or STORMGATE_CONFIG)"),
        }
        .expect("writing to a String");
        let rows: Vec<(String, String, &str)> = settings()
            .into_iter()
            .filter(|s| s.id != "config")
            .map(|s| {
                let name = s.toml.clone().unwrap_or_else(|| s.flag.clone());
                let value = self
                    .matches
                    .get_raw(&s.id)
                    .map(|v| {
                        v.map(|v| v.to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_else(|| "(unset)".to_owned());
                let source = self.sources.get(&s.id).copied().unwrap_or(Source::Unset);
                (name, value, source.as_str())
            })
            .collect();
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        for (name, value, source) in rows {
            writeln!(out, "{name:<width$}  {value}  ({source})").expect("writing to a String");
        }
        let props = self
            .cli
            .all_kafka_props()
            .unwrap_or_else(|e| vec![("(error)".into(), e.to_string())]);
        for (name, value) in props {
            let value = if is_secret_property(&name) {
                "(secret, not shown)"
            } else {
                &value
            };
            writeln!(out, "{PROPERTIES_TABLE}.{name}  {value}").expect("writing to a String");
        }
        out
    }
}

/// librdkafka properties whose value is a secret (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, a private key given inline): `check-config` shows that
/// they are set, never their value, so its output can be pasted into a ticket.
fn is_secret_property(name: &str) -> bool {
    name.contains("password")
        || name.contains("secret")
        || matches!(name, "ssl.key.pem" | "sasl.oauthbearer.config")
}

/// `docs/CONFIGURATION.md`, generated from the settings themselves (`stormgate config-doc`).
pub fn config_doc() -> String {
    let mut out = String::from(
        "# Configuration\n\n\
         <!-- Generated by `cargo run -q -p stormgate -- config-doc > docs/CONFIGURATION.md`; \
         a test fails when it is stale. -->\n\n\
         Every setting is a flag, an environment variable and a key of the TOML config file \
         (`--config FILE` or `STORMGATE_CONFIG`). When a setting is given in more than one \
         place, the flag wins over the variable, the variable over the file, the file over \
         the default. `stormgate check-config` prints the effective value of every setting \
         and where it came from, and exits non-zero if any is invalid.\n\n\
         TOML keys follow the variable names: `TCP_<X>` is `<x>` in the `[tcp]` table, \
         `KAFKA_<X>` is `<x>` in `[kafka]`, `KAFKA_PROP_<NAME>` is the librdkafka property \
         in `[kafka.properties]`, and any other variable is a top-level key in lowercase. \
         Durations and sizes are strings (`\"30s\"`, `\"64MiB\"`); unknown keys are errors. \
         An example: `deploy/config/stormgate.toml`.\n\n\
         | TOML key | Variable | Flag | Default | Meaning |\n|---|---|---|---|---|\n",
    );
    for s in settings() {
        let code = |v: &Option<String>| {
            v.as_ref()
                .map_or_else(|| "—".to_owned(), |v| format!("`{v}`"))
        };
        let env = match s.flag.as_str() {
            "--kafka-prop" => Some(format!("{KAFKA_PROP_ENV_PREFIX}<NAME>")),
            _ => s.env.clone(),
        };
        writeln!(
            out,
            "| {} | {} | `{}` | {} | {} |",
            code(&s.toml),
            code(&env),
            s.flag,
            code(&s.default),
            s.help.replace('|', "\\|")
        )
        .expect("writing to a String");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("stormgate-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn toml_keys_follow_the_variable_names() {
        assert_eq!(
            toml_key("TCP_JOB_QUEUE_SIZE").unwrap(),
            "tcp.job_queue_size"
        );
        assert_eq!(toml_key("KAFKA_DLQ_TOPIC").unwrap(), "kafka.dlq_topic");
        assert_eq!(toml_key("SHUTDOWN_TIMEOUT").unwrap(), "shutdown_timeout");
        assert_eq!(toml_key("BUFFER_MAX_BYTES").unwrap(), "buffer.max_bytes");
        assert_eq!(toml_key("STORMGATE_CONFIG"), None);
        // Every setting with a variable has a key, and no two share one.
        let keys: Vec<String> = settings().into_iter().filter_map(|s| s.toml).collect();
        let mut unique = keys.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(keys.len(), unique.len());
    }

    /// The replaced server's `KAFKA_REQUIRED_ACKS=1` alone starts, without idempotence;
    /// asking for both is refused in words that name both settings.
    #[test]
    fn acks_other_than_all_without_kafka_idempotence_turn_it_off() {
        let idempotent = |args: &[&str]| -> anyhow::Result<bool> {
            let cli = load(["stormgate"].iter().chain(args)).unwrap().cli;
            cli.validate()?;
            Ok(cli.kafka_settings("b:9092")?.idempotence)
        };
        assert!(idempotent(&[]).unwrap());
        assert!(!idempotent(&["--kafka-required-acks", "1"]).unwrap());
        assert!(!idempotent(&["--kafka-required-acks", "0"]).unwrap());
        assert!(idempotent(&["--kafka-required-acks", "all"]).unwrap());
        let both = ["--kafka-required-acks", "1", "--kafka-idempotence", "false"];
        assert!(!idempotent(&both).unwrap());
        let err = idempotent(&["--kafka-required-acks", "1", "--kafka-idempotence", "true"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("KAFKA_REQUIRED_ACKS=1") && err.contains("KAFKA_IDEMPOTENCE=true"),
            "{err}"
        );
        // Set in the config file counts as set.
        let path = write(
            "acks-idempotence.toml",
            "[kafka]\nrequired_acks = \"1\"\nidempotence = true\n",
        );
        let err = idempotent(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(err.to_string().contains("KAFKA_IDEMPOTENCE=true"), "{err}");
    }

    #[test]
    fn the_buffer_table_holds_the_disk_buffer_settings() {
        let path = write(
            "buffer.toml",
            r#"
            [buffer]
            type = "disk"
            dir = "/data/stormgate"
            max_bytes = "2GiB"
            when_full = "drop_newest"
            "#,
        );
        let loaded = load(["stormgate", "--config", path.to_str().unwrap()]).unwrap();
        let buffer = loaded.cli.disk_buffer().expect("type = disk");
        assert_eq!(buffer.dir, PathBuf::from("/data/stormgate"));
        assert_eq!(buffer.max_bytes, 2 << 30);
        assert_eq!(buffer.when_full, stormgate_shard::WhenFull::DropNewest);
        assert_eq!(loaded.sources["buffer_type"], Source::File);
    }

    #[test]
    fn file_values_sit_between_the_environment_and_the_defaults() {
        let path = write(
            "layers.toml",
            r#"
            shutdown_timeout = "7s"
            [tcp]
            job_queue_size = 512
            backlog = 100
            [kafka]
            brokers = "file:9092"
            idempotence = false
            [kafka.properties]
            "socket.keepalive.enable" = "true"
            "#,
        );
        let loaded = load([
            "stormgate",
            "--config",
            path.to_str().unwrap(),
            "--backlog",
            "200",
        ])
        .unwrap();
        let cli = &loaded.cli;
        assert_eq!(cli.backlog, 200, "a flag beats the file");
        assert_eq!(cli.queue_size, 512);
        assert_eq!(cli.shutdown_timeout, std::time::Duration::from_secs(7));
        assert_eq!(cli.kafka_brokers.as_deref(), Some("file:9092"));
        assert!(!cli.kafka_idempotence);
        assert_eq!(cli.max_line_bytes, 65536, "default where nothing sets it");
        assert_eq!(loaded.sources["backlog"], Source::Flag);
        assert_eq!(loaded.sources["queue_size"], Source::File);
        assert_eq!(loaded.sources["max_line_bytes"], Source::Default);
        let props = cli.all_kafka_props().unwrap();
        assert!(props.contains(&("socket.keepalive.enable".into(), "true".into())));
        let report = loaded.report();
        assert!(report.contains("tcp.job_queue_size"), "{report}");
        assert!(report.contains("512  (file)"), "{report}");
        assert!(report.contains("200  (flag)"), "{report}");
    }

    #[test]
    fn kafka_tls_and_sasl_settings_are_accepted_and_their_secrets_not_shown() {
        // A CA file librdkafka can load (it reads it when the producer is created).
        let key = rcgen::KeyPair::generate().unwrap();
        let ca = rcgen::CertificateParams::new(vec!["kafka.example".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let ca = write("kafka-ca.pem", &ca.pem());
        let path = write(
            "kafka-tls.toml",
            &format!(
                r#"
                [kafka]
                brokers = "broker-1.example:9093"
                [kafka.properties]
                "security.protocol" = "SASL_SSL"
                "sasl.mechanism" = "SCRAM-SHA-512"
                "sasl.username" = "stormgate"
                "sasl.password" = "hunter2-do-not-print"
                "ssl.ca.location" = "{}"
                "ssl.endpoint.identification.algorithm" = "https"
                "#,
                ca.display()
            ),
        );
        let loaded = load(["stormgate", "--config", path.to_str().unwrap()]).unwrap();
        // librdkafka was built with OpenSSL and SCRAM: it takes these and loads the CA.
        loaded.cli.validate().unwrap();
        let report = loaded.report();
        assert!(!report.contains("hunter2"), "{report}");
        assert!(
            report.contains("kafka.properties.sasl.password  (secret, not shown)"),
            "{report}"
        );
        assert!(
            report.contains("kafka.properties.sasl.username  stormgate"),
            "{report}"
        );
    }

    /// Every secret-looking property, from the file or the environment's `KAFKA_PROP_*`, is
    /// reported as set and never shown, whatever its spelling in librdkafka's list.
    #[test]
    fn check_config_hides_every_secret_property() {
        let secrets = [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
            "ssl.key.pem",
        ];
        let body: String = secrets
            .iter()
            .enumerate()
            .map(|(i, name)| format!("\"{name}\" = \"do-not-print-{i}\"\n"))
            .collect();
        let path = write(
            "kafka-secrets.toml",
            &format!("[kafka]\nbrokers = \"b:9092\"\n[kafka.properties]\n{body}"),
        );
        let loaded = load(["stormgate", "--config", path.to_str().unwrap()]).unwrap();
        let report = loaded.report();
        assert!(!report.contains("do-not-print"), "{report}");
        for name in secrets {
            assert!(
                report.contains(&format!("kafka.properties.{name}  (secret, not shown)")),
                "{name}: {report}"
            );
        }
    }

    #[test]
    fn bad_files_are_rejected_naming_the_key() {
        let cases = [
            (
                "[tcp]\njob_queue_sise = 5\n",
                "did you mean `tcp.job_queue_size`",
            ),
            (
                "[kafka]\ncompression = \"brotli\"\n",
                "`kafka.compression` = \"brotli\"",
            ),
            ("[tcpp]\nx = 1\n", "unknown table `[tcpp]`"),
            ("listen = [1, 2]\n", "must be a string, number or boolean"),
            (
                "stormgate_config = \"x\"\n",
                "unknown key `stormgate_config`",
            ),
            ("[tcp\n", "TOML parse error"),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let path = write(&format!("bad-{i}.toml"), text);
            let err = load(["stormgate", "--config", path.to_str().unwrap()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(err.contains(path.to_str().unwrap()), "{err}");
        }
        let err = load(["stormgate", "--config", "/nonexistent/stormgate.toml"]).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/stormgate.toml"));
    }

    #[test]
    fn file_values_go_before_a_subcommand() {
        let path = write("sub.toml", "[kafka]\nbrokers = \"file:9092\"\n");
        let loaded = load([
            "stormgate",
            "--config",
            path.to_str().unwrap(),
            "check-config",
        ])
        .unwrap();
        assert_eq!(loaded.cli.kafka_brokers.as_deref(), Some("file:9092"));
        assert!(loaded.cli.command.is_some());
    }

    #[test]
    fn the_example_config_file_is_valid() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../deploy/config/stormgate.toml"
        );
        if !Path::new(path).exists() {
            return;
        }
        let loaded = load(["stormgate", "--config", path]).expect("deploy/config/stormgate.toml");
        assert!(
            loaded.sources.values().any(|s| *s == Source::File),
            "the example sets something"
        );
    }

    #[test]
    fn configuration_md_is_generated_from_the_settings() {
        let doc = include_str!("../../../docs/CONFIGURATION.md");
        assert!(
            doc == config_doc(),
            "docs/CONFIGURATION.md is stale: run `cargo run -q -p stormgate -- config-doc > docs/CONFIGURATION.md`"
        );
    }
}
