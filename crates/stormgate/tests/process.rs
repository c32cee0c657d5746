//! The `stormgate` binary as users run it: environment configuration, the embedded default,
//! signals and exit status.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use stormgate_station::Station;
use stormgate_testkit::*;
use support::process::Process;
use support::*;

/// Waits up to a minute for `p` to exit (collecting the rest of its log) and returns how.
fn exited(p: &mut Process) -> std::process::ExitStatus {
    p.wait_exit(Duration::from_secs(60))
        .expect("stormgate did not exit within 60 s")
}

fn send_lines(addr: SocketAddr, stations: usize, lines: usize) -> Vec<Station> {
    (0..stations)
        .map(|i| {
            let mut s = Station::connect(addr).unwrap();
            s.identify(&format!("{i:05}"), "Embedded").unwrap();
            for l in 0..lines {
                s.metrics(&[("temperature", l as f64), ("humidity", 50.0)])
                    .unwrap();
            }
            s
        })
        .collect()
}

#[test]
fn embedded_default_serves_records_that_a_kafka_client_can_read() {
    let mut p = Process::spawn(&[]);
    let bootstrap = p.log_line("embedded Kafka mock cluster")["bootstrap"]
        .as_str()
        .unwrap()
        .to_owned();
    let addr = p.addr();
    let _stations = send_lines(addr, 20, 10);
    let records = consume(&bootstrap, "weather.metrics", 200);
    assert_eq!(records.len(), 200);
    assert_eq!(by_key(&records).len(), 20);
    assert!(records.iter().all(|r| r.value["city"] == "Embedded"));
    p.signal(libc::SIGTERM);
    assert!(exited(&mut p).success(), "exit status after SIGTERM");
    let summaries = p
        .seen
        .iter()
        .filter(|v| v["message"] == "shard summary")
        .count();
    assert_eq!(summaries, 2, "one summary per shard");
}

#[test]
fn sigterm_flushes_records_still_lingering_in_the_producer() {
    sigterm_flush(libc::SIGTERM);
}

/// SIGINT (Ctrl-C) drains exactly as SIGTERM does.
#[test]
fn sigint_flushes_records_like_sigterm() {
    sigterm_flush(libc::SIGINT);
}

/// A second signal while the first one's drain waits (here for a broker that never answers)
/// ends the process at once, with status 130, instead of at the shutdown deadline.
#[test]
fn a_second_signal_exits_at_once() {
    let mut p = Process::spawn(&[
        ("KAFKA_BROKERS", "127.0.0.1:1"),
        ("SHUTDOWN_TIMEOUT", "60s"),
    ]);
    let addr = p.addr();
    let mut s = Station::connect(addr).unwrap();
    s.identify("00001", "Twice").unwrap();
    s.send(b"{\"type\":\"metrics\",\"data\":\"t=1\"}\n")
        .unwrap();
    // Answered only after the line before it was read.
    s.send(b"not json\n").unwrap();
    assert!(matches!(
        s.reply().unwrap(),
        stormgate_station::Reply::Error { .. }
    ));
    p.signal(libc::SIGTERM);
    p.log_line("signal received");
    // Draining: the record cannot be delivered, so the process waits for the deadline (60 s
    // away); only the second signal's path exits with 130.
    assert!(p.child.try_wait().unwrap().is_none(), "still draining");
    let second = std::time::Instant::now();
    p.signal(libc::SIGTERM);
    let status = exited(&mut p);
    let took = second.elapsed();
    eprintln!("exit {status} {took:?} after the second signal");
    assert_eq!(status.code(), Some(130), "{status}");
    assert!(
        took < Duration::from_secs(20),
        "{took:?} after the second signal, with a 60 s shutdown timeout"
    );
    assert!(p.seen.iter().any(|v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.contains("second signal"))
    }));
}

fn sigterm_flush(sig: libc::c_int) {
    let brokers = broker();
    let topic = fresh_topic(&brokers, "sigterm");
    // One directory per signal: the SIGTERM and SIGINT tests run at once, in one process,
    // and each removes its directory at the end.
    let stats_dir =
        std::env::temp_dir().join(format!("stormgate-stats-{}-{sig}", std::process::id()));
    std::fs::create_dir_all(&stats_dir).unwrap();
    let stats_file = stats_dir.join("stats.json");
    let stats_path = stats_file.to_str().unwrap();
    // A 60 s linger keeps records in librdkafka's queue until the flush at shutdown sends them.
    let mut p = Process::spawn(&[
        ("KAFKA_BROKERS", &brokers),
        ("KAFKA_TOPIC", &topic),
        ("KAFKA_BATCH_TIMEOUT", "60s"),
        ("STATS_FILE", stats_path),
    ]);
    let addr = p.addr();
    let mut stations = send_lines(addr, 10, 100);
    // Every station sees the answer to a bad line only after its earlier lines were read.
    for s in &mut stations {
        s.send(b"not json\n").unwrap();
        assert!(matches!(
            s.reply().unwrap(),
            stormgate_station::Reply::Error { .. }
        ));
    }
    // Read, and still lingering: none of them is in the topic yet.
    let marks = stormgate_kafka::verify::watermarks(&brokers, &topic, &[]).unwrap();
    assert!(
        marks.values().all(|&(low, high)| high == low),
        "records reached the topic before SIGTERM: {marks:?}"
    );
    p.signal(sig);
    assert!(exited(&mut p).success(), "exit status after signal {sig}");
    for s in &mut stations {
        assert_eq!(
            s.read_to_close().unwrap(),
            stormgate_protocol::RECONNECT_LINE,
            "told to reconnect, then closed by the server"
        );
    }
    let records = consume(&brokers, &topic, 1000);
    assert_eq!(records.len(), 1000);
    let delivered: u64 = p
        .seen
        .iter()
        .filter(|v| v["message"] == "shard summary")
        .map(|v| v["delivered"].as_u64().unwrap())
        .sum();
    assert_eq!(delivered, 1000);
    // The statistics file the benchmark harness reads says the same.
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_file).unwrap()).unwrap();
    assert_eq!(stats["totals"]["records_delivered"], 1000);
    assert_eq!(stats["totals"]["line_errors"]["malformed_json"], 10);
    assert_eq!(stats["totals"]["delivery_latency_us"]["count"], 1000);
    assert_eq!(stats["shards"].as_array().unwrap().len(), 2);
    std::fs::remove_dir_all(&stats_dir).unwrap();
}

/// SIGHUP reloads the TLS files and the station registry at once — here unchanged, so only
/// the signal can have caused it — and the process goes on serving: the connection opened
/// before keeps working, a new one is served, and SIGTERM still drains (SIGHUP's default
/// action would have ended the process).
#[test]
fn sighup_reloads_certificates_and_registry_and_the_server_goes_on() {
    let dir = pki_dir();
    let ca = Ca::new("Stormgate test CA");
    let (cert, key) = ca.server().write(&dir, "server");
    let registry = dir.join("stations.jsonl");
    let token = stormgate::registry::add(&registry, "12345").unwrap();
    let mut p = Process::spawn(&[
        ("SINK", "null"),
        ("TLS_CERT", cert.to_str().unwrap()),
        ("TLS_KEY", key.to_str().unwrap()),
        ("STATION_AUTH", "token"),
        ("STATION_REGISTRY", registry.to_str().unwrap()),
    ]);
    let addr = p.addr();
    let config = ca.client_config(None);
    let mut before = TlsStation::connect(addr, config.clone()).unwrap();
    before.send(&identify("12345", Some(&token))).unwrap();
    before.send(&metrics(1, "before=1")).unwrap();
    before.wait_for_ack(1);

    p.signal(libc::SIGHUP);
    p.log_line("SIGHUP: reloading");
    p.log_line("TLS certificate reloaded");
    p.log_line("station registry reloaded");
    before.send(&metrics(2, "after=1")).unwrap();
    before.wait_for_ack(2);
    let mut after = TlsStation::connect(addr, config).unwrap();
    after.send(&identify("12345", Some(&token))).unwrap();
    after.send(&metrics(1, "new=1")).unwrap();
    after.wait_for_ack(1);

    p.signal(libc::SIGTERM);
    assert!(exited(&mut p).success(), "exit status after SIGTERM");
    let reloads = p
        .seen
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("TLS certificate reloaded"))
        })
        .count();
    assert_eq!(reloads, 1, "files unchanged: only the signal reloads");
}

#[test]
fn a_taken_port_is_reported_and_exits_non_zero() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut p = Process::spawn(&[("TCP_LISTEN", &addr), ("SINK", "null")]);
    let status = exited(&mut p);
    assert!(!status.success());
    let err = p.log_line("cannot listen");
    assert!(err["message"].as_str().unwrap().contains(&addr), "{err}");
}

/// Open files and resident memory of a process.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap();
    (fds, rss_kib * 1024)
}

/// `n` short-lived stations from `threads` client threads, each thread on its own source
/// address (127.0.0.2, .3, ...) so that the ephemeral ports of one address are not exhausted:
/// connect, identify, one metrics line, close the sending side, wait for the server to close.
fn churn(addr: SocketAddr, n: usize, threads: usize) {
    use std::io::{Read, Write};
    let per_thread = n / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            std::thread::spawn(move || {
                let source = std::net::Ipv4Addr::new(127, 0, 0, 2 + t as u8);
                for i in 0..per_thread {
                    let mut s = std::net::TcpStream::from(
                        connect_from(addr, Some(source.into()), |_| Ok(())).unwrap(),
                    );
                    let line = format!(
                        "{{\"type\":\"identify\",\"zipcode\":\"{t}{i:06}\"}}\n{{\"type\":\"metrics\",\"data\":\"t=1\"}}\n"
                    );
                    s.write_all(line.as_bytes()).unwrap();
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).unwrap();
                    assert!(rest.is_empty(), "unexpected reply {rest:?}");
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// 100,000 connections opened and closed: the server's open files and resident memory come
/// back to where they were after a warm-up, and every line was handled.
#[test]
fn connection_churn_returns_fds_and_memory_to_baseline() {
    const WARMUP: usize = 4_000;
    const CHURN: usize = 100_000;
    let dir = std::env::temp_dir().join(format!("stormgate-churn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stats_file = dir.join("stats.json");
    let mut p = Process::spawn(&[
        ("SINK", "null"),
        ("STATS_FILE", stats_file.to_str().unwrap()),
    ]);
    let addr = p.addr();
    let pid = p.child.id();
    churn(addr, WARMUP, 4);
    std::thread::sleep(Duration::from_millis(500));
    let (fds0, rss0) = fds_and_rss(pid);
    churn(addr, CHURN, 4);
    // Every client saw its connection closed; wait (generously) for the last descriptors,
    // rather than sleeping a fixed time that a busy machine may not honour.
    let wait_fds = std::time::Instant::now();
    while fds_and_rss(pid).0 > fds0 && wait_fds.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (fds1, rss1) = fds_and_rss(pid);
    println!(
        "churn: {CHURN} connections; open files {fds0} -> {fds1}; RSS {:.1} -> {:.1} MiB",
        rss0 as f64 / 1048576.0,
        rss1 as f64 / 1048576.0
    );
    assert_eq!(fds1, fds0, "open files after churn");
    assert!(
        rss1 <= rss0 + (4 << 20),
        "RSS grew from {rss0} to {rss1} bytes over {CHURN} connections"
    );
    p.signal(libc::SIGTERM);
    assert!(exited(&mut p).success());
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_file).unwrap()).unwrap();
    let total = (WARMUP + CHURN) as u64;
    assert_eq!(stats["totals"]["connections_accepted"], total);
    assert_eq!(stats["totals"]["connections_closed"], total);
    assert_eq!(stats["totals"]["records_delivered"], total);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// SIGTERM while lines are still arriving and a 60 s linger holds them in the producer, with
/// only 15 ms to deliver: every accepted line ends up in the topic or in the spill file; in
/// both only if the spill file says it was possibly delivered (a request purged in flight);
/// each station's accepted lines are a gapless prefix of what it sent.
#[test]
fn sigterm_under_load_delivers_or_spills_every_accepted_line() {
    let (spilled, maybe) = sigterm_under_load();
    // The deadline must have cut something short, or the spill path is not exercised.
    assert!(
        spilled > 0,
        "nothing was left at the 15 ms deadline to spill"
    );
    // Whether requests are in flight when the deadline purges them depends on timing: under
    // load most runs have some (22,000 of 28,000 spilled in one), on a quiet machine none
    // (0 in three runs in a row). When there are, they are checked above; not required.
    eprintln!("{maybe} of {spilled} spilled records were possibly delivered");
}

/// One run of the scenario, every invariant checked; returns (spilled, spilled as possibly
/// delivered).
fn sigterm_under_load() -> (usize, usize) {
    const STATIONS: usize = 20;
    const LINES: usize = 2_000;
    let brokers = broker();
    let topic = fresh_topic(&brokers, "sigterm-load");
    let dir = std::env::temp_dir().join(format!("stormgate-sigterm-{}", uuid::Uuid::now_v7()));
    let spill_dir = dir.join("spill");
    let stats_file = dir.join("stats.json");
    std::fs::create_dir_all(&dir).unwrap();
    let mut p = Process::spawn(&[
        ("KAFKA_BROKERS", &brokers),
        ("KAFKA_TOPIC", &topic),
        ("KAFKA_BATCH_TIMEOUT", "60s"),
        ("SHUTDOWN_TIMEOUT", "15ms"),
        ("SPILL_DIR", spill_dir.to_str().unwrap()),
        ("STATS_FILE", stats_file.to_str().unwrap()),
    ]);
    let addr = p.addr();
    // A fresh idempotent producer waits about a second for its producer id; after that the
    // 15 ms deadline usually lets part of the load through, so both outcomes are exercised.
    std::thread::sleep(Duration::from_millis(1500));
    let stations: Vec<Station> = (0..STATIONS)
        .map(|i| {
            let mut s = Station::connect(addr).unwrap();
            s.identify(&format!("{i:05}"), "Load").unwrap();
            s
        })
        .collect();
    let writers: Vec<_> = stations
        .iter()
        .map(|s| s.stream().try_clone().unwrap())
        .enumerate()
        .map(|(i, mut stream)| {
            std::thread::spawn(move || {
                use std::io::Write;
                for n in 0..LINES {
                    let line =
                        format!("{{\"type\":\"metrics\",\"seq\":{n},\"data\":\"t={i}.{n}\"}}\n");
                    if stream.write_all(line.as_bytes()).is_err() {
                        return n;
                    }
                }
                LINES
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(30));
    p.signal(libc::SIGTERM);
    let status = exited(&mut p);
    assert!(
        status.success(),
        "exit status after SIGTERM: {status}; log: {:#?}",
        &p.seen
    );
    for w in writers {
        w.join().unwrap();
    }

    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_file).unwrap()).unwrap();
    let t = &stats["totals"];
    let accepted = t["records_enqueued"].as_u64().unwrap() as usize;
    let delivered = t["records_delivered"].as_u64().unwrap() as usize;
    let spilled = t["records_spilled"].as_u64().unwrap() as usize;
    assert!(accepted > 0, "some lines were read before the signal");
    assert_eq!(t["records_failed"].as_u64().unwrap() as usize, spilled);
    assert_eq!(t["spill_failures"], 0);
    assert_eq!(delivered + spilled, accepted, "every accepted line settled");
    eprintln!("accepted {accepted}: delivered {delivered}, spilled {spilled}");

    // (zipcode, seq) → possibly delivered, for every spilled record.
    let mut in_spill: BTreeMap<(String, u64), bool> = BTreeMap::new();
    let spill_files = match std::fs::read_dir(&spill_dir) {
        Ok(entries) => entries.collect::<Vec<_>>(),
        // Created with the first spilled record.
        Err(_) if spilled == 0 => Vec::new(),
        Err(e) => panic!("{}: {e}", spill_dir.display()),
    };
    for entry in spill_files {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let l: stormgate_kafka::spill::SpillLine = serde_json::from_str(line).unwrap();
            let v: serde_json::Value =
                serde_json::from_slice(&l.value_bytes().unwrap().unwrap()).unwrap();
            let id = (l.key.unwrap(), v["seq"].as_u64().unwrap());
            assert!(
                in_spill.insert(id, l.possibly_delivered).is_none(),
                "spilled twice"
            );
        }
    }
    assert_eq!(
        in_spill.len(),
        spilled,
        "the spill file holds exactly the rest"
    );
    let maybe = in_spill.values().filter(|&&m| m).count();
    // The flush sends the lingering batches at SIGTERM, so requests are usually in flight
    // when the 15 ms deadline purges them (measured: 22,000 of 28,000 spilled; 144 of 30,249
    // in an earlier run; none in one CI run): the caller requires that path to run.
    // Purged in-flight records the broker did store are read on top of the delivered ones.
    let records = consume_all(&brokers, &topic, delivered);
    let mut in_topic: BTreeSet<(String, u64)> = BTreeSet::new();
    for r in &records {
        let id = (r.key.clone(), r.value["seq"].as_u64().unwrap());
        if in_spill.get(&id) == Some(&false) {
            panic!("{id:?} is in the topic but was spilled as not delivered");
        }
        assert!(in_topic.insert(id), "duplicate in the topic");
    }
    assert!(
        records.len() <= delivered + maybe,
        "{} records read; {delivered} delivered, {maybe} possibly",
        records.len()
    );
    eprintln!(
        "{} in the topic, {maybe} spilled as possibly delivered",
        records.len()
    );
    let mut seqs: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for (zip, seq) in in_spill.into_keys().chain(in_topic) {
        seqs.entry(zip).or_default().insert(seq);
    }
    for (zip, seqs) in seqs {
        let n = seqs.len() as u64;
        assert!(
            seqs.into_iter().eq(0..n),
            "{zip}: a gap among the accepted lines"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
    (spilled, maybe)
}

/// `stormgate check-config`: flags beat variables, variables beat the file, the file beats
/// defaults, each value reported with its source; a bad value, whether clap's or librdkafka's
/// to judge, fails it.
#[test]
fn check_config_reports_each_source_and_fails_on_invalid_settings() {
    let dir = std::env::temp_dir().join(format!("stormgate-check-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.toml");
    std::fs::write(&good, "[tcp]\njob_queue_size = 512\nbacklog = 100\n").unwrap();
    let run = |config: &Path, env: &[(&str, &str)], args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stormgate"));
        cmd.env_remove("KAFKA_BROKERS")
            .arg("--config")
            .arg(config)
            .args(args)
            .arg("check-config");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    let (ok, report, err) = run(
        &good,
        &[("TCP_BACKLOG", "300")],
        &["--max-line-bytes", "1000"],
    );
    assert!(ok, "{err}");
    let line = |key: &str| {
        report
            .lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .unwrap_or_else(|| panic!("no {key} in {report}"))
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(line("tcp.job_queue_size"), "512 (file)");
    assert_eq!(line("tcp.backlog"), "300 (env)");
    assert_eq!(line("tcp.max_line_bytes"), "1000 (flag)");
    assert_eq!(line("tcp.recv_buffer"), "262144 (default)");
    assert!(report.contains("configuration is valid"));

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[kafka]\ncompression = \"brotli\"\n").unwrap();
    let (ok, _, err) = run(&bad, &[], &[]);
    assert!(!ok);
    assert!(err.contains("`kafka.compression` = \"brotli\""), "{err}");

    let (ok, _, err) = run(&good, &[("KAFKA_PROP_NO_SUCH_PROPERTY", "1")], &[]);
    assert!(!ok);
    assert!(err.contains("no.such.property"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Under systemd (`NOTIFY_SOCKET`, `WatchdogSec=`): the watchdog is pinged from the start,
/// `READY=1` comes once the server listens, pings go on while it runs, and `STOPPING=1`
/// comes at SIGTERM. Each message is a datagram to the socket systemd would listen on.
#[test]
fn systemd_hears_ready_the_watchdog_and_stopping() {
    let dir = std::env::temp_dir().join(format!("stormgate-notify-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut p = Process::spawn(&[
        ("SINK", "null"),
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        // 200 ms: a ping every 100 ms.
        ("WATCHDOG_USEC", "200000"),
    ]);
    let mut heard: Vec<String> = Vec::new();
    let until = |heard: &mut Vec<String>, done: &dyn Fn(&[String]) -> bool| {
        let mut buf = [0u8; 512];
        while !done(heard) {
            let n = socket
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("{e}; heard so far: {heard:?}"));
            heard.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    let ready_at = |h: &[String]| h.iter().position(|m| m.lines().any(|l| l == "READY=1"));
    // Three pings after READY=1: the watchdog judges the running server and finds it alive.
    until(&mut heard, &|h| {
        ready_at(h).is_some_and(|r| h[r..].iter().filter(|m| *m == "WATCHDOG=1\n").count() >= 3)
    });
    let ready = ready_at(&heard).unwrap();
    assert!(
        heard[ready].contains("STATUS=listening"),
        "{:?}",
        heard[ready]
    );
    assert!(
        heard[..ready].iter().all(|m| m == "WATCHDOG=1\n"),
        "only pings before READY=1: {heard:?}"
    );
    p.signal(libc::SIGTERM);
    until(&mut heard, &|h| {
        h.last()
            .is_some_and(|m| m.lines().any(|l| l == "STOPPING=1"))
    });
    assert!(exited(&mut p).success());
    std::fs::remove_dir_all(&dir).unwrap();
}
