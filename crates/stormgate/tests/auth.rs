//! Station authentication end to end (`STATION_AUTH=token`), against the real broker: only a
//! station with its zipcode's token reaches Kafka; refusals are answered, counted and end the
//! connection at the limit; registry changes apply without a restart; the `stormgate station`
//! command manages the registry file.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use stormgate::registry::{self, Registry};
use stormgate_protocol::ErrorCode;
use stormgate_station::{Reply, Station};
use stormgate_testkit::*;
use support::*;

/// A fresh directory for a registry file.
fn registry_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("stormgate-auth-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The next reply, which must be an error line; returns its code.
fn error_code(s: &mut Station) -> &'static str {
    match s.reply().expect("a reply") {
        Reply::Error { code, .. } => code.as_str(),
        other => panic!("expected an error line, got {other:?}"),
    }
}

/// One attempt at identifying on a new connection: `true` when its metrics line is
/// acknowledged, `false` when the identify is refused.
fn try_identify(app: &stormgate::app::App, zipcode: &str, token: &str) -> bool {
    let mut s = Station::connect(app.local_addr()).unwrap();
    s.send(&identify(zipcode, Some(token))).unwrap();
    s.send(&metrics(1, "probe=1")).unwrap();
    match s.reply().expect("a reply") {
        Reply::Ack { .. } | Reply::AckUpto { .. } => true,
        Reply::Error { code, .. } => {
            assert_eq!(code, ErrorCode::AuthFailed);
            assert_eq!(error_code(&mut s), "metrics_before_identify");
            false
        }
        other => panic!("{other:?}"),
    }
}

/// A token that differs from `token` in its last digit.
fn altered(token: &str) -> String {
    let last = if token.ends_with('0') { "1" } else { "0" };
    format!("{}{last}", &token[..token.len() - 1])
}

fn start_with_registry(
    brokers: &str,
    topic: &str,
    registry: &Path,
    extra: &[&str],
) -> stormgate::app::App {
    let registry = registry.to_str().unwrap();
    let mut args = vec![
        "--kafka-brokers",
        brokers,
        "--kafka-topic",
        topic,
        "--station-auth",
        "token",
        "--station-registry",
        registry,
    ];
    args.extend_from_slice(extra);
    start(&args)
}

#[test]
fn only_the_station_with_its_zipcodes_token_reaches_kafka() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "auth");
    let dlq = fresh_topic(&brokers, "auth-dlq");
    let path = registry_dir().join("stations.jsonl");
    let token = registry::add(&path, "12345").unwrap();
    let other = registry::add(&path, "99999").unwrap();
    let app = start_with_registry(
        &brokers,
        &topic,
        &path,
        &[
            "--station-auth-max-failures",
            "0",
            "--kafka-dlq-topic",
            &dlq,
        ],
    );
    // Three intruders claim 12345: with a wrong token, with none, and with 99999's valid
    // token. Each is refused, and its metrics line finds no station.
    let wrong = altered(&token);
    for intruder in [Some(wrong.as_str()), None, Some(other.as_str())] {
        let mut s = Station::connect(app.local_addr()).unwrap();
        s.send(&identify("12345", intruder)).unwrap();
        assert_eq!(error_code(&mut s), "auth_failed", "{intruder:?}");
        s.send(&metrics(1, "intruder=1")).unwrap();
        assert_eq!(error_code(&mut s), "metrics_before_identify");
    }
    // The right token in an identify that is malformed for another reason.
    let mut buggy = Station::connect(app.local_addr()).unwrap();
    let line =
        serde_json::json!({"type": "identify", "zipcode": "12345", "city": 5, "token": token});
    buggy.send(format!("{line}\n").as_bytes()).unwrap();
    assert_eq!(error_code(&mut buggy), "wrong_field_type");
    let mut good = Station::connect(app.local_addr()).unwrap();
    good.send(&identify("12345", Some(&token))).unwrap();
    for seq in 1..=10 {
        good.send(&metrics(seq, &format!("good={seq}"))).unwrap();
    }
    wait_for_ack(|| good.reply(), 10);
    let t = app.server().totals();
    assert_eq!(t.line_error(ErrorCode::AuthFailed as usize), 3);
    assert_eq!(t.line_error(ErrorCode::MetricsBeforeIdentify as usize), 3);
    assert_eq!(
        t.records_enqueued, 10,
        "nothing of the intruders was queued"
    );
    let records = consume(&brokers, &topic, 10);
    let ids: std::collections::BTreeSet<&str> = records
        .iter()
        .map(|r| r.value["connection_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 1, "all from the one good connection");
    for r in &records {
        assert_eq!(r.key, "12345");
        assert!(r.value["metrics"]["good"].is_f64(), "{}", r.value);
        assert!(r.value["metrics"].get("intruder").is_none(), "{}", r.value);
    }
    // Every refusal is dead-lettered, and no token, good or bad, reaches Kafka.
    let dead = consume(&brokers, &dlq, 7);
    let codes: Vec<&str> = dead
        .iter()
        .map(|r| r.value["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes.iter().filter(|c| **c == "auth_failed").count(), 3);
    for r in &dead {
        let text = r.value.to_string();
        for secret in [&token, &wrong, &other] {
            assert!(!text.contains(secret.as_str()), "{text}");
        }
        if r.value["code"] != "metrics_before_identify" {
            assert!(r.value.get("raw").is_none(), "{text}");
        }
    }
    app.stop().unwrap();
}

#[test]
fn a_connection_is_closed_after_the_configured_refusals() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "auth-close");
    let path = registry_dir().join("stations.jsonl");
    let token = registry::add(&path, "12345").unwrap();
    let app = start_with_registry(
        &brokers,
        &topic,
        &path,
        &["--station-auth-max-failures", "2"],
    );
    let mut s = Station::connect(app.local_addr()).unwrap();
    s.send(&identify("12345", Some(&altered(&token)))).unwrap();
    assert_eq!(error_code(&mut s), "auth_failed");
    s.send(&identify("12345", None)).unwrap();
    assert_eq!(error_code(&mut s), "auth_failed");
    assert_eq!(error_code(&mut s), "too_many_errors");
    assert_eq!(
        s.read_to_close().unwrap(),
        "",
        "the server closed the connection"
    );
    // Other connections are not affected.
    assert!(try_identify(&app, "12345", &token));
    wait_for("the closed connection", Duration::from_secs(10), || {
        app.server().totals().connections_closed >= 1
    });
    let t = app.server().totals();
    assert_eq!(t.line_error(ErrorCode::AuthFailed as usize), 2);
    assert_eq!(t.line_error(ErrorCode::TooManyErrors as usize), 1);
    app.stop().unwrap();
}

/// Retries `attempt` for up to 15 s (the server looks at the registry every 2 s).
fn eventually(what: &str, mut attempt: impl FnMut() -> bool) {
    let start = Instant::now();
    while !attempt() {
        assert!(start.elapsed() < Duration::from_secs(15), "{what}");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("{what}: after {:?}", start.elapsed());
}

#[test]
fn registry_changes_apply_without_a_restart_or_dropping_open_connections() {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "auth-reload");
    let path = registry_dir().join("stations.jsonl");
    let first = registry::add(&path, "11111").unwrap();
    let app = start_with_registry(&brokers, &topic, &path, &[]);
    let mut open = Station::connect(app.local_addr()).unwrap();
    open.send(&identify("11111", Some(&first))).unwrap();
    open.send(&metrics(1, "t=1")).unwrap();
    wait_for_ack(|| open.reply(), 1);

    // Not registered yet: refused.
    let mut early = Station::connect(app.local_addr()).unwrap();
    early.send(&identify("22222", Some(&first))).unwrap();
    assert_eq!(error_code(&mut early), "auth_failed");
    // Registered the way `stormgate station add` does it, while the server runs.
    let second = registry::add(&path, "22222").unwrap();
    eventually("22222 accepted", || try_identify(&app, "22222", &second));
    // The open connection was not dropped by the reload.
    open.send(&metrics(2, "t=2")).unwrap();
    wait_for_ack(|| open.reply(), 2);

    // A removed station's token is refused at its next identify; a connection that
    // identified before keeps its station.
    registry::remove(&path, "11111").unwrap();
    eventually("11111 refused", || !try_identify(&app, "11111", &first));
    open.send(&metrics(3, "t=3")).unwrap();
    wait_for_ack(|| open.reply(), 3);

    let delivered = app.server().totals().records_delivered as usize;
    let records = consume(&brokers, &topic, delivered);
    let by_key = by_key(&records);
    assert_eq!(by_key["22222"].len(), 1, "one accepted probe");
    let opened: Vec<&serde_json::Value> = by_key["11111"]
        .iter()
        .map(|r| &r.value)
        .filter(|v| v["metrics"].get("t").is_some())
        .collect();
    assert_eq!(opened.len(), 3, "{opened:?}");
    assert!(
        opened
            .iter()
            .all(|v| v["connection_id"] == opened[0]["connection_id"]),
        "the same connection throughout: {opened:?}"
    );
    app.stop().unwrap();
}

/// Runs the `stormgate` binary with `args` and `env`, without a registry from the caller's
/// environment.
fn stormgate(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_stormgate"));
    cmd.env_remove("STATION_REGISTRY")
        .env_remove("STATION_AUTH")
        .env_remove("STORMGATE_CONFIG")
        .args(args)
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run stormgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_station_command_adds_lists_and_removes_stations() {
    let path = registry_dir().join("stations.jsonl");
    let file = path.to_str().unwrap();
    let with_file = |args: &[&str]| {
        let mut all = vec!["--station-registry", file];
        all.extend_from_slice(args);
        stormgate(&all, &[])
    };
    let out = with_file(&["station", "add", "12345"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let token = text(&out.stdout).trim_end().to_owned();
    assert_eq!(
        text(&out.stdout),
        format!("{token}\n"),
        "only the token on stdout"
    );
    assert_eq!(token.len(), 64);
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(text(&out.stderr).contains("only"), "{}", text(&out.stderr));
    // The variable works as well as the flag.
    let out = stormgate(&["station", "add", "23456"], &[("STATION_REGISTRY", file)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let other = text(&out.stdout).trim_end().to_owned();

    let out = with_file(&["station", "add", "12345"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("already registered"),
        "{}",
        text(&out.stderr)
    );

    let stored = std::fs::read_to_string(&path).unwrap();
    assert!(
        !stored.contains(&token) && !stored.contains(&other),
        "{stored}"
    );
    let registry = Registry::load(&path).unwrap();
    assert!(registry.verify("12345", Some(&token)));
    assert!(registry.verify("23456", Some(&other)));

    let out = with_file(&["station", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = text(&out.stdout);
    let zipcodes: Vec<&str> = list
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(zipcodes, ["12345", "23456"], "{list}");
    for line in list.lines() {
        let created_at = line.split('\t').nth(1).unwrap();
        humantime::parse_rfc3339(created_at).unwrap();
    }
    // Never a token or a hash.
    for secretish in [&token, &other] {
        assert!(!list.contains(secretish.as_str()), "{list}");
    }
    for line in stored.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(!list.contains(v["hash"].as_str().unwrap()), "{list}");
        assert!(!list.contains(v["salt"].as_str().unwrap()), "{list}");
    }

    let out = with_file(&["station", "remove", "12345"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&with_file(&["station", "list"]).stdout)
            .lines()
            .count(),
        1
    );
    assert!(!Registry::load(&path).unwrap().verify("12345", Some(&token)));
    let out = with_file(&["station", "remove", "12345"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("not registered"),
        "{}",
        text(&out.stderr)
    );

    let out = stormgate(&["station", "list"], &[]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("STATION_REGISTRY"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn token_mode_does_not_start_without_a_readable_registry() {
    let dir = registry_dir();
    let broken = dir.join("broken.jsonl");
    std::fs::write(&broken, "{\"zipcode\":\"1\"}\n").unwrap();
    let missing = dir.join("missing.jsonl");
    let cases = [
        (None, "STATION_REGISTRY"),
        (Some(missing.to_str().unwrap()), "missing.jsonl"),
        (Some(broken.to_str().unwrap()), "line 1"),
    ];
    for (registry, want) in cases {
        let mut env = vec![
            ("STATION_AUTH", "token"),
            ("SINK", "null"),
            ("TCP_LISTEN", "127.0.0.1:0"),
            ("METRICS_ADDR", "off"),
        ];
        if let Some(registry) = registry {
            env.push(("STATION_REGISTRY", registry));
        }
        // Fails before it listens, so `output()` returns.
        let out = stormgate(&[], &env);
        assert!(!out.status.success(), "{registry:?}");
        let stderr = text(&out.stderr);
        assert!(stderr.contains(want), "{registry:?}: {stderr}");
        assert!(
            stderr.contains("STATION_AUTH=token"),
            "{registry:?}: {stderr}"
        );
    }
    // The library entry point refuses too (it does not rely on the binary's checks).
    let cli = <stormgate::cli::Cli as clap::Parser>::try_parse_from([
        "stormgate",
        "--sink",
        "null",
        "--listen",
        "127.0.0.1:0",
        "--metrics-addr",
        "off",
        "--station-auth",
        "token",
        "--station-registry",
        missing.to_str().unwrap(),
    ])
    .unwrap();
    let err = format!("{:#}", stormgate::app::start(&cli).err().expect("no start"));
    assert!(err.contains("missing.jsonl"), "{err}");
}
