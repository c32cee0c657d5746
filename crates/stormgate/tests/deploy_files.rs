//! Facts about the deployment files under `deploy/` that must stay true as they are edited:
//! every YAML file parses; the Kubernetes Services reach exactly the Deployment's container
//! ports; the ConfigMap carries the example config file, which parses as TOML; compose runs
//! Kafka, Stormgate and a Prometheus that scrapes Stormgate's metrics port; the systemd unit
//! lets io_uring through and asks for 1,048,576 open files, which the sysctl file allows.
//!
//! No Docker, cluster or systemd is needed: the files are read and cross-checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use yaml_rust2::{Yaml, YamlLoader};

const IO_URING_CALLS: [&str; 3] = ["io_uring_setup", "io_uring_enter", "io_uring_register"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    let path = repo_root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn parse_yaml(path: &Path) -> Vec<Yaml> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `.yml`/`.yaml` file under `dir`, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yml" | "yaml")
            ) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The documents of every YAML file in `deploy/k8s`.
fn k8s_documents() -> Vec<Yaml> {
    yaml_files(&repo_root().join("deploy/k8s"))
        .iter()
        .flat_map(|p| parse_yaml(p))
        .filter(|d| !d.is_null())
        .collect()
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn the_one<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "deploy/k8s should hold exactly one {kind}");
    found[0]
}

/// A YAML mapping of strings to strings (labels, selectors, environment).
fn string_map(y: &Yaml) -> BTreeMap<String, String> {
    y.as_hash()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            let v = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                _ => return None,
            };
            Some((k.as_str()?.to_owned(), v))
        })
        .collect()
}

fn items(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], Vec::as_slice)
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{addr:?} is not HOST:PORT"))
}

fn example_config() -> toml::Table {
    read("deploy/config/stormgate.toml")
        .parse()
        .expect("deploy/config/stormgate.toml is TOML")
}

fn config_str<'a>(config: &'a toml::Table, path: &[&str]) -> &'a toml::Value {
    let (last, tables) = path.split_last().unwrap();
    let mut table = config;
    for t in tables {
        table = table[*t].as_table().unwrap();
    }
    &table[*last]
}

/// `KEY=VALUE` lines of the systemd unit, in order, without comments.
fn unit_settings() -> Vec<(String, String)> {
    unit_file_settings("deploy/systemd/stormgate.service")
}

/// `KEY=VALUE` lines of a unit file, in order, without comments and section headers.
fn unit_file_settings(rel: &str) -> Vec<(String, String)> {
    read(rel)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';', '[']))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("unit line {l:?}"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

fn unit_value(settings: &[(String, String)], key: &str) -> String {
    let values: Vec<&String> = settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(values.len(), 1, "the unit should set {key} once");
    values[0].clone()
}

/// `key = value` lines of the sysctl file, in order, without comments.
fn sysctl_settings() -> Vec<(String, String)> {
    read("deploy/sysctl/99-stormgate.conf")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with(['#', ';']))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("sysctl line {l:?}"));
            (k.trim().to_owned(), v.trim().to_owned())
        })
        .collect()
}

fn sysctl_number(settings: &[(String, String)], key: &str) -> u64 {
    let (_, v) = settings
        .iter()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("the sysctl file lacks {key}"));
    v.parse()
        .unwrap_or_else(|_| panic!("{key} = {v:?} is not a number"))
}

#[test]
fn every_yaml_file_under_deploy_parses() {
    let files = yaml_files(&repo_root().join("deploy"));
    let names: Vec<String> = files
        .iter()
        .map(|p| p.strip_prefix(repo_root()).unwrap().display().to_string())
        .collect();
    for expected in [
        "deploy/compose/docker-compose.yml",
        "deploy/compose/prometheus.yml",
        "deploy/k8s/configmap.yaml",
        "deploy/k8s/deployment.yaml",
        "deploy/k8s/service.yaml",
    ] {
        assert!(
            names.iter().any(|n| n.ends_with(expected)),
            "{expected} missing: {names:?}"
        );
    }
    for file in &files {
        let docs = parse_yaml(file);
        assert!(
            docs.iter().any(|d| d.as_hash().is_some()),
            "{} holds no mapping",
            file.display()
        );
    }
}

#[test]
fn the_k8s_services_reach_exactly_the_deployment_ports() {
    let docs = k8s_documents();
    let deployment = the_one(&docs, "Deployment");
    let pod = &deployment["spec"]["template"];
    let pod_labels = string_map(&pod["metadata"]["labels"]);
    let selects_pod = |selector: &Yaml| {
        let s = string_map(selector);
        !s.is_empty() && s.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
    };
    assert!(selects_pod(&deployment["spec"]["selector"]["matchLabels"]));

    let container = &pod["spec"]["containers"][0];
    let ports: BTreeMap<String, i64> = items(&container["ports"])
        .iter()
        .map(|p| {
            let name = p["name"].as_str().expect("every container port is named");
            (name.to_owned(), p["containerPort"].as_i64().unwrap())
        })
        .collect();
    let resolve = |target: &Yaml| -> i64 {
        match target {
            Yaml::String(name) => *ports
                .get(name)
                .unwrap_or_else(|| panic!("no container port named {name}: {ports:?}")),
            Yaml::Integer(n) => {
                assert!(ports.values().any(|p| p == n), "no container port {n}");
                *n
            }
            other => panic!("bad port reference {other:?}"),
        }
    };

    let mut served = BTreeSet::new();
    let services = of_kind(&docs, "Service");
    assert!(!services.is_empty(), "deploy/k8s has no Service");
    for service in services {
        assert!(
            selects_pod(&service["spec"]["selector"]),
            "Service {:?} does not select the Deployment's pods",
            service["metadata"]["name"]
        );
        for port in items(&service["spec"]["ports"]) {
            let target = &port["targetPort"];
            let target = if target.is_badvalue() {
                &port["port"]
            } else {
                target
            };
            served.insert(resolve(target));
        }
    }
    let all: BTreeSet<i64> = ports.values().copied().collect();
    assert_eq!(served, all, "Services and container ports differ");

    // Probes, the scrape annotation and the PodMonitor name ports that exist.
    for probe in ["readinessProbe", "livenessProbe"] {
        resolve(&container[probe]["httpGet"]["port"]);
    }
    let annotations = string_map(&pod["metadata"]["annotations"]);
    let scraped: i64 = annotations["prometheus.io/port"].parse().unwrap();
    assert_eq!(Some(&scraped), ports.get("metrics"));
    for monitor in of_kind(&docs, "PodMonitor") {
        assert!(selects_pod(&monitor["spec"]["selector"]["matchLabels"]));
        for endpoint in items(&monitor["spec"]["podMetricsEndpoints"]) {
            assert_eq!(resolve(&endpoint["port"]), scraped);
        }
    }

    // The example config listens where the container ports say.
    let config = example_config();
    let listen = config_str(&config, &["tcp", "listen"]).as_str().unwrap();
    assert_eq!(Some(&i64::from(port_of(listen))), ports.get("stations"));
    let metrics = config_str(&config, &["metrics_addr"]).as_str().unwrap();
    assert_eq!(i64::from(port_of(metrics)), scraped);
}

#[test]
fn the_configmap_carries_the_example_config_where_the_deployment_reads_it() {
    let docs = k8s_documents();
    let config_map = the_one(&docs, "ConfigMap");
    let text = config_map["data"]["stormgate.toml"]
        .as_str()
        .expect("the ConfigMap has a stormgate.toml");
    let parsed: toml::Table = text
        .parse()
        .expect("the ConfigMap's stormgate.toml is TOML");
    assert!(parsed["tcp"].is_table() && parsed["kafka"].is_table());
    assert_eq!(
        text,
        read("deploy/config/stormgate.toml"),
        "deploy/k8s/configmap.yaml must carry deploy/config/stormgate.toml verbatim"
    );

    // `--config DIR/stormgate.toml` where DIR is the ConfigMap's mount.
    let pod = &the_one(&docs, "Deployment")["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let args: Vec<&str> = items(&container["args"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("--config");
    let config_path = Path::new(args[at + 1]);
    let volume = items(&pod["volumes"])
        .iter()
        .find(|v| v["configMap"]["name"].as_str() == config_map["metadata"]["name"].as_str())
        .expect("a volume of the ConfigMap");
    let mount = items(&container["volumeMounts"])
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("the ConfigMap volume is mounted");
    assert_eq!(
        Some(config_path.parent().unwrap()),
        mount["mountPath"].as_str().map(Path::new)
    );
    assert_eq!(
        config_path.file_name().and_then(|f| f.to_str()),
        Some("stormgate.toml")
    );
}

#[test]
fn compose_runs_kafka_stormgate_and_a_prometheus_that_scrapes_stormgate() {
    let compose = &parse_yaml(&repo_root().join("deploy/compose/docker-compose.yml"))[0];
    let services = &compose["services"];
    for name in ["kafka", "stormgate", "prometheus"] {
        assert!(
            services[name].as_hash().is_some(),
            "compose lacks service {name}"
        );
    }
    let kafka = &services["kafka"];
    assert!(
        kafka["image"]
            .as_str()
            .is_some_and(|i| i.starts_with("apache/kafka:")),
        "kafka runs the apache/kafka image"
    );
    let roles = &string_map(&kafka["environment"])["KAFKA_PROCESS_ROLES"];
    assert!(roles.contains("controller"), "KRaft: {roles}");

    // Stormgate's metrics port: METRICS_ADDR if compose sets it, else the mounted config.
    let stormgate = &services["stormgate"];
    let env = string_map(&stormgate["environment"]);
    let volumes: Vec<&str> = items(&stormgate["volumes"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        volumes
            .iter()
            .any(|v| v.starts_with("../config/stormgate.toml:")),
        "stormgate mounts the example config: {volumes:?}"
    );
    let config = example_config();
    let metrics_addr = env.get("METRICS_ADDR").map_or_else(
        || {
            config_str(&config, &["metrics_addr"])
                .as_str()
                .unwrap()
                .to_owned()
        },
        Clone::clone,
    );
    let metrics_port = port_of(&metrics_addr);

    // io_uring under Docker: a seccomp choice and a memlock limit are made explicitly.
    assert!(
        items(&stormgate["security_opt"])
            .iter()
            .filter_map(Yaml::as_str)
            .any(|o| o.starts_with("seccomp")),
        "Docker's default seccomp profile blocks io_uring: stormgate must name one"
    );
    assert!(!stormgate["ulimits"]["memlock"].is_badvalue());

    let prometheus_volumes: Vec<&str> = items(&services["prometheus"]["volumes"])
        .iter()
        .filter_map(Yaml::as_str)
        .collect();
    assert!(
        prometheus_volumes
            .iter()
            .any(|v| v.starts_with("./prometheus.yml:")),
        "{prometheus_volumes:?}"
    );
    let prometheus = &parse_yaml(&repo_root().join("deploy/compose/prometheus.yml"))[0];
    let scrapes_stormgate = items(&prometheus["scrape_configs"]).iter().any(|job| {
        let path = job["metrics_path"].as_str().unwrap_or("/metrics");
        path == "/metrics"
            && items(&job["static_configs"]).iter().any(|sc| {
                items(&sc["targets"])
                    .iter()
                    .filter_map(Yaml::as_str)
                    .any(|t| t == format!("stormgate:{metrics_port}"))
            })
    });
    assert!(
        scrapes_stormgate,
        "prometheus.yml does not scrape stormgate:{metrics_port}/metrics"
    );
}

#[test]
fn the_systemd_unit_lets_io_uring_through_and_outlasts_the_drain() {
    let unit = unit_settings();
    assert_eq!(unit_value(&unit, "LimitNOFILE"), "1048576");

    let filters: Vec<&String> = unit
        .iter()
        .filter(|(k, _)| k == "SystemCallFilter")
        .map(|(_, v)| v)
        .collect();
    let (deny, allow): (Vec<&String>, Vec<&String>) =
        filters.iter().partition(|v| v.starts_with('~'));
    for line in &deny {
        for word in line.trim_start_matches('~').split_whitespace() {
            assert!(
                !word.contains("io_uring") && word != "@aio",
                "SystemCallFilter={line} blocks io_uring"
            );
        }
    }
    if !allow.is_empty() {
        let allowed: BTreeSet<&str> = allow.iter().flat_map(|l| l.split_whitespace()).collect();
        for call in IO_URING_CALLS {
            assert!(
                allowed.contains(call),
                "an allow-list SystemCallFilter must name {call}"
            );
        }
    }
    let families = unit_value(&unit, "RestrictAddressFamilies");
    for family in ["AF_INET", "AF_INET6"] {
        assert!(families.split_whitespace().any(|f| f == family));
    }

    // SIGTERM, then the drain must finish before systemd's SIGKILL.
    assert_eq!(unit_value(&unit, "KillSignal"), "SIGTERM");
    let stop = humantime::parse_duration(&unit_value(&unit, "TimeoutStopSec")).unwrap();
    let config = example_config();
    let drain = config_str(&config, &["shutdown_timeout"])
        .as_str()
        .map_or(Duration::from_secs(30), |s| {
            humantime::parse_duration(s).unwrap()
        });
    assert!(
        stop > drain,
        "TimeoutStopSec {stop:?} <= SHUTDOWN_TIMEOUT {drain:?}"
    );
    // The watchdog fires for a stalled shard, not a busy one: its period is longer than
    // the liveness rule's bound, with room for a ping every half period on top.
    for settings in [
        &unit,
        &unit_file_settings("deploy/systemd/stormgate@.service"),
    ] {
        let watchdog = humantime::parse_duration(&unit_value(settings, "WatchdogSec")).unwrap();
        assert!(
            watchdog >= 2 * stormgate::ops::HEARTBEAT_STALE,
            "WatchdogSec {watchdog:?} < 2 x {:?}",
            stormgate::ops::HEARTBEAT_STALE
        );
        assert!(
            unit_value(settings, "Restart") == "on-failure",
            "a watchdog timeout must restart"
        );
    }
    // Spill files go to the state directory, the one place ProtectSystem=strict leaves writable.
    assert_eq!(unit_value(&unit, "StateDirectory"), "stormgate");
    assert!(
        unit.iter().any(|(k, v)| k == "Environment"
            && v.split_whitespace()
                .any(|a| a == "SPILL_DIR=/var/lib/stormgate/spill")),
        "the unit should set SPILL_DIR=/var/lib/stormgate/spill"
    );
}

#[test]
fn the_instance_template_keeps_the_units_limits_and_separates_each_instances_state() {
    let single = unit_settings();
    let template = unit_file_settings("deploy/systemd/stormgate@.service");
    // From `Restart=` on (restart policy, stop, limits, hardening) the two units are the same
    // lines: a change to one that is not made to the other fails here.
    let tail = |unit: &[(String, String)]| -> Vec<(String, String)> {
        let start = unit.iter().position(|(k, _)| k == "Restart").unwrap();
        unit[start..].to_vec()
    };
    assert_eq!(
        tail(&template),
        tail(&single),
        "stormgate@.service's limits and hardening differ from stormgate.service's"
    );

    // Each instance has its own state, spill files, disk buffer and overrides.
    assert_eq!(unit_value(&template, "StateDirectory"), "stormgate/%i");
    assert_eq!(
        unit_value(&template, "WorkingDirectory"),
        "/var/lib/stormgate/%i"
    );
    let env: BTreeMap<String, String> = template
        .iter()
        .filter(|(k, _)| k == "Environment")
        .filter_map(|(_, v)| v.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(env["SPILL_DIR"], "/var/lib/stormgate/%i/spill");
    assert_eq!(env["BUFFER_DIR"], "/var/lib/stormgate/%i/buffer");
    let files: Vec<&String> = template
        .iter()
        .filter(|(k, _)| k == "EnvironmentFile")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(
        files,
        [
            "-/etc/stormgate/stormgate.env",
            "/etc/stormgate/stormgate-%i.env"
        ],
        "shared overrides first, then the instance's own (required: its METRICS_ADDR)"
    );

    // The spread of reconnections fits in the drain, and the drain before systemd's SIGKILL.
    let period = humantime::parse_duration(&env["TCP_DRAIN_PERIOD"]).unwrap();
    let config = example_config();
    let drain = config_str(&config, &["shutdown_timeout"])
        .as_str()
        .map_or(Duration::from_secs(30), |s| {
            humantime::parse_duration(s).unwrap()
        });
    let stop = humantime::parse_duration(&unit_value(&template, "TimeoutStopSec")).unwrap();
    assert!(
        period < drain && drain < stop,
        "TCP_DRAIN_PERIOD {period:?} < SHUTDOWN_TIMEOUT {drain:?} < TimeoutStopSec {stop:?}"
    );
}

#[test]
fn the_sysctl_file_has_unique_keys_and_room_for_the_unit_and_the_config() {
    let sysctl = sysctl_settings();
    let mut seen = BTreeSet::new();
    for (k, _) in &sysctl {
        assert!(seen.insert(k.as_str()), "{k} is set twice");
    }

    let nofile: u64 = unit_value(&unit_settings(), "LimitNOFILE").parse().unwrap();
    assert!(sysctl_number(&sysctl, "fs.nr_open") >= nofile);
    assert!(sysctl_number(&sysctl, "fs.file-max") >= nofile);

    let config = example_config();
    let backlog = config_str(&config, &["tcp", "backlog"])
        .as_integer()
        .unwrap();
    assert!(sysctl_number(&sysctl, "net.core.somaxconn") >= u64::try_from(backlog).unwrap());
    let recv_buffer = config_str(&config, &["tcp", "recv_buffer"])
        .as_integer()
        .unwrap();
    assert!(
        sysctl_number(&sysctl, "net.core.rmem_max") >= u64::try_from(recv_buffer).unwrap(),
        "SO_RCVBUF is clamped to net.core.rmem_max"
    );

    let (_, tcp_mem) = sysctl
        .iter()
        .find(|(k, _)| k == "net.ipv4.tcp_mem")
        .unwrap();
    let pages: Vec<u64> = tcp_mem
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        pages.len() == 3 && pages.is_sorted(),
        "tcp_mem is three ascending page counts: {tcp_mem}"
    );
}

#[test]
fn the_image_exposes_the_configured_ports_and_checks_healthz() {
    let dockerfile = read("deploy/docker/Dockerfile");
    let config = example_config();
    let listen = port_of(config_str(&config, &["tcp", "listen"]).as_str().unwrap());
    let metrics = port_of(config_str(&config, &["metrics_addr"]).as_str().unwrap());
    let expose = dockerfile
        .lines()
        .find(|l| l.starts_with("EXPOSE "))
        .expect("EXPOSE");
    let exposed: BTreeSet<u16> = expose[7..]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(exposed, BTreeSet::from([listen, metrics]));
    assert!(dockerfile.contains(&format!("ENV METRICS_ADDR=0.0.0.0:{metrics}")));
    let healthcheck = dockerfile.split("HEALTHCHECK").nth(1).expect("HEALTHCHECK");
    assert!(healthcheck.contains("/healthz") && healthcheck.contains(&format!("/{metrics}")));
}
