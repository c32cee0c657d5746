//! A send run split over child processes.
//!
//! Each child is this binary re-executed as `send --child` with its share of the connections
//! and the zipcodes that go with them. A child writes a `{"progress":{…}}` line per second and
//! its summary as its last line on stdout; stderr is shared with the parent, so a child's
//! errors show as they happen. The parent prints the sum of the latest progress of every
//! child, and adds up the summaries.

use std::io::{BufRead, BufReader};
use std::ops::Range;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::PROGRESS_INTERVAL;
use super::report::{Progress, ProgressPrinter, SendSummary};
use crate::LoadgenError;
use crate::cli::SendArgs;

/// What a child last said.
#[derive(Debug, Default)]
struct Heard {
    progress: Progress,
    summary: Option<SendSummary>,
    /// A line that was neither.
    garbled: Option<String>,
}

/// One stdout line of a child.
#[derive(Deserialize)]
#[serde(untagged)]
enum ChildLine {
    Progress { progress: Progress },
    Summary(Box<SendSummary>),
}

/// Runs one child per share and adds up their summaries.
pub fn run(args: &SendArgs, shares: &[Range<usize>]) -> Result<SendSummary, LoadgenError> {
    let exe = std::env::current_exe().map_err(|e| LoadgenError::io("find this executable", e))?;
    let start = Instant::now();
    let mut children: Vec<(Child, Arc<Mutex<Heard>>)> = Vec::with_capacity(shares.len());
    for share in shares {
        let spawned = Command::new(&exe)
            .args(args.child_args(share.len(), share.start))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                for (mut c, _) in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(LoadgenError::io("start a child process", e));
            }
        };
        let heard = Arc::new(Mutex::new(Heard::default()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let sink = Arc::clone(&heard);
        std::thread::spawn(move || listen(BufReader::new(stdout), &sink));
        children.push((child, heard));
    }

    let mut printer = ProgressPrinter::new(start);
    // A little after the children's own ticks, so that each sample has their latest line.
    let mut next = start + PROGRESS_INTERVAL + Duration::from_millis(200);
    let mut statuses = vec![None; children.len()];
    while statuses.iter().any(Option::is_none) {
        std::thread::sleep(Duration::from_millis(20));
        for ((child, _), status) in children.iter_mut().zip(&mut statuses) {
            if status.is_none() {
                *status = child
                    .try_wait()
                    .map_err(|e| LoadgenError::io("wait for a child process", e))?;
            }
        }
        let now = Instant::now();
        if now >= next {
            next += PROGRESS_INTERVAL;
            if !args.quiet_progress {
                let p = children
                    .iter()
                    .map(|(_, h)| h.lock().expect("poisoned").progress)
                    .fold(Progress::default(), |a, b| a + b);
                eprintln!("{}", printer.line(now, p));
            }
        }
    }

    let mut summaries = Vec::with_capacity(children.len());
    for (i, ((child, heard), status)) in children.into_iter().zip(statuses).enumerate() {
        drop(child);
        // The reader thread may still be taking the last line after the exit.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let h = heard.lock().expect("poisoned");
            if let Some(s) = &h.summary {
                summaries.push(s.clone());
                break;
            }
            if Instant::now() >= deadline {
                let status = status.expect("every child exited");
                return Err(LoadgenError::Child(format!(
                    "child {i} exited ({status}) without a summary{}",
                    h.garbled
                        .as_ref()
                        .map(|g| format!("; it printed {g:?}"))
                        .unwrap_or_default()
                )));
            }
            drop(h);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(SendSummary::merge(&summaries))
}

/// Reads a child's stdout into `heard` until it closes.
fn listen(stdout: impl BufRead, heard: &Mutex<Heard>) {
    for line in stdout.lines() {
        let Ok(line) = line else { break };
        let mut h = heard.lock().expect("poisoned");
        match serde_json::from_str::<ChildLine>(&line) {
            Ok(ChildLine::Progress { progress }) => h.progress = progress,
            Ok(ChildLine::Summary(s)) => h.summary = Some(*s),
            Err(_) => h.garbled = Some(line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::send::worker::Counts;

    #[test]
    fn progress_and_summary_lines_are_told_apart() {
        let heard = Mutex::new(Heard::default());
        let summary = SendSummary {
            mode: "send".into(),
            counts: Counts {
                lines_sent: 42,
                ..Counts::default()
            },
            ..SendSummary::default()
        };
        // The counts are top-level keys of the JSON, as the harness reads them.
        let json: serde_json::Value = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["lines_sent"], 42, "{json}");
        let out = format!(
            "{}\n{}\n",
            serde_json::json!({"progress": Progress { lines: 7, open: 3, ..Progress::default() }}),
            serde_json::to_string(&summary).unwrap()
        );
        listen(out.as_bytes(), &heard);
        let h = heard.into_inner().unwrap();
        assert_eq!((h.progress.lines, h.progress.open), (7, 3));
        assert_eq!(h.summary, Some(summary));
        assert_eq!(h.garbled, None);

        let heard = Mutex::new(Heard::default());
        listen(&b"oops\n"[..], &heard);
        assert_eq!(heard.into_inner().unwrap().garbled.as_deref(), Some("oops"));
    }
}
