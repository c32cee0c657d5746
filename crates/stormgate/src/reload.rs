//! Reloading files a running server depends on (the station registry, TLS certificates)
//! without a restart.
//!
//! A [`Watcher`] is a std thread that looks at its files' metadata every interval and, when
//! one changed, loads them all and publishes the result; [`Watcher::look_now`] (on SIGHUP)
//! makes it load at once, changed or not. What it publishes goes to the shards with one
//! atomic pointer swap (`arc-swap`), so no shard ever waits for a reload. A load that fails
//! is logged and the previous version stays in force: a half-written certificate or a
//! registry with a typo never takes a running server down.

use std::fmt::Display;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tracing::warn;

/// How often a watcher looks at its files for a change.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// What tells one version of a file from the next: a replacement (rename) changes the inode,
/// an edit in place the modification time or the size. `None` when the file cannot be
/// looked at (e.g. it is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileVersion(Option<(u64, u64, u64, Option<SystemTime>)>);

impl FileVersion {
    /// The versions of `paths` now.
    pub fn of_all(paths: &[PathBuf]) -> Vec<FileVersion> {
        paths
            .iter()
            .map(|path| {
                FileVersion(
                    fs::metadata(path)
                        .ok()
                        .map(|m| (m.dev(), m.ino(), m.len(), m.modified().ok())),
                )
            })
            .collect()
    }
}

/// What a watcher asks of its thread.
enum Look {
    /// Load now, even if no file changed (SIGHUP).
    Now,
}

/// The reload thread of one set of files. Stops (and is joined) when dropped.
#[derive(Debug)]
pub struct Watcher {
    look: Option<mpsc::Sender<Look>>,
    thread: Option<JoinHandle<()>>,
}

impl Watcher {
    /// Starts a thread named `name` that, every `every` or when asked, loads `paths` with
    /// `load` and hands the result to `publish`. `versions` are the files' versions as they
    /// were looked at before the caller's own first load (so that a change during that load
    /// is seen as a change). `what` names the files in the log.
    pub fn start<T, E: Display>(
        name: &str,
        what: &'static str,
        paths: Vec<PathBuf>,
        mut versions: Vec<FileVersion>,
        every: Duration,
        mut load: impl FnMut() -> Result<T, E> + Send + 'static,
        mut publish: impl FnMut(T) + Send + 'static,
    ) -> std::io::Result<Watcher> {
        let (look, looks) = mpsc::channel::<Look>();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                loop {
                    let forced = match looks.recv_timeout(every) {
                        Ok(Look::Now) => true,
                        Err(mpsc::RecvTimeoutError::Timeout) => false,
                        // The watcher was dropped.
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    };
                    let now = FileVersion::of_all(&paths);
                    if now == versions && !forced {
                        continue;
                    }
                    let loaded = load();
                    if FileVersion::of_all(&paths) != now {
                        // Changed again while being read (an editor writing in place, a
                        // certificate and its key replaced one after the other): read them
                        // at the next look, once they have settled.
                        continue;
                    }
                    versions = now;
                    match loaded {
                        Ok(value) => publish(value),
                        Err(e) => warn!(
                            files = ?paths,
                            error = %e,
                            "{what} not reloaded; the previous version stays in force"
                        ),
                    }
                }
            })?;
        Ok(Watcher {
            look: Some(look),
            thread: Some(thread),
        })
    }

    /// Makes the thread load its files now, changed or not (the answer to SIGHUP).
    pub fn look_now(&self) {
        if let Some(look) = &self.look {
            let _ = look.send(Look::Now);
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        drop(self.look.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// An unchanged file is loaded only when asked; a changed one at the next look. The
    /// watcher looks every 20 ms, so by the time the file changes it has looked at the
    /// unchanged file many times: a load it should not have done comes out first.
    #[test]
    fn a_look_now_loads_even_an_unchanged_file() {
        let path = std::env::temp_dir().join(format!("stormgate-reload-{}", std::process::id()));
        fs::write(&path, "one").unwrap();
        let paths = vec![path.clone()];
        let versions = FileVersion::of_all(&paths);
        let (loaded, loads) = mpsc::channel();
        let file = path.clone();
        let watcher = Watcher::start(
            "test-reload",
            "test file",
            paths,
            versions,
            Duration::from_millis(20),
            move || fs::read_to_string(&file),
            move |text| loaded.send(text).unwrap(),
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        // Replaced whole, as an operator's tools do, so no look sees it half written.
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, "two, longer").unwrap();
        fs::rename(&tmp, &path).unwrap();
        let first = loads.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(first, "two, longer", "the unchanged file was not loaded");
        watcher.look_now();
        let text = loads.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(text, "two, longer");
        drop(watcher);
        assert!(
            loads.try_iter().next().is_none(),
            "one load per change or ask"
        );
        fs::remove_file(&path).unwrap();
    }
}

/// What unit tests of reloading files read from the log: a refused reload shows only there.
#[cfg(test)]
pub(crate) mod test_log {
    use std::sync::{Mutex, Once};

    use tracing_subscriber::layer::SubscriberExt;

    static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

    /// Whether an event logged in this process since the first call contains every one of
    /// `parts` (its message, then ` field=value` pairs). The first call installs a global
    /// subscriber that keeps every event.
    pub(crate) fn logged(parts: &[&str]) -> bool {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            let subscriber = tracing_subscriber::registry().with(Capture);
            tracing::subscriber::set_global_default(subscriber).expect("no other subscriber");
        });
        LINES
            .lock()
            .unwrap()
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }

    struct Capture;

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
        fn on_event(
            &self,
            event: &tracing::Event<'_>,
            _: tracing_subscriber::layer::Context<'_, S>,
        ) {
            struct Text(String);
            impl tracing::field::Visit for Text {
                fn record_debug(
                    &mut self,
                    field: &tracing::field::Field,
                    value: &dyn std::fmt::Debug,
                ) {
                    use std::fmt::Write;
                    let _ = write!(self.0, " {}={value:?}", field.name());
                }
            }
            let mut text = Text(String::new());
            event.record(&mut text);
            LINES.lock().unwrap().push(text.0);
        }
    }
}
