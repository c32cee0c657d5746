//! The service manager's notifications: systemd's `sd_notify` protocol, through the sd-notify
//! crate (a datagram to `NOTIFY_SOCKET`; nothing at all without it).
//!
//! - `READY=1` once every shard listens, so that a `Type=notify` unit is started only then
//!   (after the disk buffer's recovery); `STOPPING=1` when the drain begins.
//! - With `WatchdogSec=` in the unit (`WATCHDOG_USEC` in the environment), `WATCHDOG=1`
//!   every half period from a thread of its own — unconditionally while the server starts
//!   (the disk buffer's recovery may take longer than the period, and is progress of its
//!   own), then only while [`OpsState::liveness`] holds: a shard that stopped making
//!   progress stops the pings, and systemd restarts the process, as a kubelet does when
//!   `/healthz` fails. The status line (`systemctl status`) says why.

use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use stormgate_telemetry::LogLimiter;
use tracing::{info, warn};

use super::OpsState;

/// What the watchdog thread is told.
enum Message {
    /// The server runs: from now on, ping only while it is alive.
    Watch(Arc<OpsState>),
}

/// The process's link to its service manager (see the module's doc). Dropping it stops the
/// watchdog thread.
pub struct ServiceManager {
    watchdog: Option<(mpsc::Sender<Message>, JoinHandle<()>)>,
}

impl ServiceManager {
    /// Starts the watchdog thread when the service manager asked for one (`WATCHDOG_USEC`,
    /// and `WATCHDOG_PID` unset or this process); call it first thing, before the shards
    /// start.
    pub fn start() -> ServiceManager {
        // A zero period (set by hand; systemd unsets the variable instead) would ping in a
        // loop: taken as no watchdog.
        let period = sd_notify::watchdog_enabled().filter(|p| !p.is_zero());
        let watchdog = period.and_then(|period| {
            let interval = period / 2;
            let (tx, rx) = mpsc::channel();
            match std::thread::Builder::new()
                .name("watchdog".into())
                .spawn(move || watchdog(interval, &rx))
            {
                Ok(thread) => {
                    info!(
                        period = ?period,
                        "systemd watchdog: pinging every half period while every shard makes progress"
                    );
                    Some((tx, thread))
                }
                Err(error) => {
                    warn!(%error, "systemd watchdog: cannot start its thread; not pinging");
                    None
                }
            }
        });
        ServiceManager { watchdog }
    }

    /// Every shard listens: tells the service manager, and lets the watchdog judge `state`.
    pub fn ready(&self, state: Arc<OpsState>) {
        if let Some((tx, _)) = &self.watchdog {
            let _ = tx.send(Message::Watch(state));
        }
        notify(&[NotifyState::Ready, NotifyState::Status("listening")]);
    }

    /// The drain begins.
    pub fn stopping(&self) {
        notify(&[
            NotifyState::Stopping,
            NotifyState::Status("draining: delivering what was read"),
        ]);
    }
}

impl Drop for ServiceManager {
    fn drop(&mut self) {
        if let Some((tx, thread)) = self.watchdog.take() {
            drop(tx);
            let _ = thread.join();
        }
    }
}

/// Sends `states`; a failure is logged, never fatal (the service manager judges silence).
fn notify(states: &[NotifyState<'_>]) {
    if let Err(error) = sd_notify::notify(states) {
        warn!(%error, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// The watchdog thread: a ping at once and every `interval`, while [`ping`] says so, until
/// its sender is dropped.
fn watchdog(interval: Duration, rx: &mpsc::Receiver<Message>) {
    let mut state: Option<Arc<OpsState>> = None;
    let stalled_log = LogLimiter::new(Duration::from_secs(10));
    let mut was_alive = true;
    loop {
        match ping(state.as_deref(), Instant::now()) {
            Ok(()) => {
                if !was_alive {
                    info!("systemd watchdog: every shard makes progress again; pinging");
                    notify(&[NotifyState::Status("listening")]);
                }
                was_alive = true;
                notify(&[NotifyState::Watchdog]);
            }
            Err(reasons) => {
                if was_alive {
                    notify(&[NotifyState::Status(&format!("not alive: {reasons}"))]);
                }
                was_alive = false;
                if let Some(suppressed) = stalled_log.allow(Instant::now()) {
                    warn!(%reasons, suppressed, "systemd watchdog: not pinging");
                }
            }
        }
        match rx.recv_timeout(interval) {
            Ok(Message::Watch(s)) => state = Some(s),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Whether to ping at `now`: always while the server starts (`None`), then while every
/// shard makes progress ([`OpsState::liveness`]; `Err` lists those that do not).
fn ping(state: Option<&OpsState>, now: Instant) -> Result<(), String> {
    state.map_or(Ok(()), |s| s.liveness(now))
}

#[cfg(test)]
mod tests {
    use super::super::tests::state;
    use super::*;

    #[test]
    fn the_watchdog_is_pinged_while_starting_and_then_while_alive() {
        let (s, metrics) = state(Vec::new());
        let now = Instant::now();
        assert_eq!(ping(None, now), Ok(()), "starting");
        metrics[0].heartbeat.beat_at(now);
        metrics[1].heartbeat.beat_at(now);
        assert_eq!(ping(Some(&s), now + Duration::from_secs(1)), Ok(()));
        let stalled = ping(Some(&s), now + Duration::from_secs(11)).unwrap_err();
        assert!(
            stalled.starts_with("shard 0: no progress for 11.0 s"),
            "{stalled}"
        );
    }
}
