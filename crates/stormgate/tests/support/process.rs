//! The `stormgate` binary as a child process, judged from outside: its JSON log lines, its
//! exit, its statistics file, its spill files, `/metrics`, and its resident memory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running `stormgate` whose JSON log lines are collected.
pub struct Process {
    pub child: Child,
    logs: mpsc::Receiver<serde_json::Value>,
    pub seen: Vec<serde_json::Value>,
    pub dir: PathBuf,
}

impl Process {
    /// Starts the binary on loopback ports with `env` on top; its spill files and statistics
    /// file go to a directory of its own.
    pub fn spawn(env: &[(&str, &str)]) -> Process {
        let dir = std::env::temp_dir().join(format!("stormgate-process-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_stormgate"));
        cmd.env_remove("KAFKA_BROKERS")
            .env("TCP_LISTEN", "127.0.0.1:0")
            .env("TCP_SHARDS", "2")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("METRICS_ADDR", "127.0.0.1:0")
            .env("SPILL_DIR", dir.join("spill"))
            .env("STATS_FILE", dir.join("stats.json"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn stormgate");
        let stderr = child.stderr.take().unwrap();
        let (tx, logs) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let v = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({"raw": line}));
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        Process {
            child,
            logs,
            seen: Vec::new(),
            dir,
        }
    }

    /// Waits for a log line whose message contains `needle` and returns it.
    pub fn log_line(&mut self, needle: &str) -> serde_json::Value {
        let matches =
            |v: &serde_json::Value| v["message"].as_str().is_some_and(|m| m.contains(needle));
        if let Some(v) = self.seen.iter().find(|v| matches(v)) {
            return v.clone();
        }
        loop {
            let v = self
                .logs
                .recv_timeout(Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("no log line {needle:?}; log: {:#?}", self.seen));
            self.seen.push(v.clone());
            if matches(&v) {
                return v;
            }
        }
    }

    pub fn addr(&mut self) -> SocketAddr {
        self.log_line("listening")["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn metrics_addr(&mut self) -> SocketAddr {
        self.log_line("operations endpoint listening")["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: plain kill(2) on our own child.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                while let Ok(v) = self.logs.recv_timeout(Duration::from_secs(2)) {
                    self.seen.push(v);
                }
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn rss_bytes(&self) -> u64 {
        stormgate_testkit::rss_bytes(self.child.id())
    }

    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("stats.json")).unwrap()).unwrap()
    }

    /// Every line of every spill file.
    pub fn spilled_lines(&self) -> Vec<serde_json::Value> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("spill")) else {
            return Vec::new();
        };
        entries
            .flat_map(|e| {
                let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
                text.lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `GET path` on the operations endpoint: (status, body), or the I/O error.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Every sample of `/metrics`, summed over its labels, by metric name.
pub fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics", Duration::from_secs(10)).unwrap();
    assert_eq!(status, 200);
    let mut m = BTreeMap::new();
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = name.split('{').next().unwrap().to_owned();
        *m.entry(name).or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
    }
    m
}
