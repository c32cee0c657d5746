//! A connection's policy, as pure state ([`Policy`]): when the station must next show it is
//! alive, how many lines it may still send before it waits, and when its bad lines or
//! refused identifies close it. Every decision takes the time as an input and returns what to do;
//! nothing here reads a clock, a socket or the shard, so the tests below drive it with
//! made-up instants and no sleeps. `connection` owns one of each and carries the decisions
//! out.

use std::time::{Duration, Instant};

/// `at` plus `timeout`; `None` for no timeout (`None` or zero) or one too long to add to a
/// clock reading (years).
pub(crate) fn after(at: Instant, timeout: Option<Duration>) -> Option<Instant> {
    timeout
        .filter(|d| !d.is_zero())
        .and_then(|d| at.checked_add(d))
}

/// The earlier of two deadlines, `None` meaning none.
pub(crate) fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A connection's read timeouts (`TCP_IDLE_TIMEOUT`, `TCP_LINE_TIMEOUT`; `None` or zero: no
/// limit).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) idle: Option<Duration>,
    pub(crate) line: Option<Duration>,
}

/// Why the server decided to close a connection while handling its lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Closing {
    /// `TCP_MAX_ERRORS_PER_CONN` rejected lines in a row.
    TooManyErrors,
    /// `STATION_AUTH_MAX_FAILURES` refused identifies over the connection's life.
    AuthFailures,
    /// The shard's sink stopped taking records: the connection ends without a farewell.
    SinkStopped,
}

/// One connection's policy state. One struct rather than one per concern: every connection
/// carries it, and separate structs would each round up to their alignment (8 bytes more
/// per connection, measured by `connection::tests::a_connection_stays_small`).
#[derive(Debug)]
pub(crate) struct Policy {
    /// When the station must next show it is alive, or be closed: the idle timeout after its
    /// last complete, non-blank line (handled or rejected), the connection's start or the end
    /// of a wait the shard imposed; earlier, the line timeout after a partial line began.
    /// Bytes of a partial line, blank lines and the tail of an oversized line never move it:
    /// only the line timeout bounds those.
    deadline: Option<Instant>,
    /// The line rate limit (`TCP_MAX_LINES_PER_SEC`) as a token bucket of at most one
    /// second's lines: refilled for the time between reads, spent by the lines each read
    /// completes. A read may overdraw it (negative); the connection then waits the overdraft
    /// out before reading again.
    lines: f64,
    /// Rejected lines since the last accepted one.
    consecutive_errors: u32,
    /// Refused identifies over the connection's life (`STATION_AUTH=token`).
    auth_failures: u32,
    /// A partial line is held, or the rest of an oversized one is being skipped.
    partial: bool,
    /// The bytes handled since the last [`Policy::after_read`] completed a line.
    completed_line: bool,
    /// The server decided to close the connection: handle no more lines.
    closing: Option<Closing>,
    /// New lines with a seq get acknowledged (the last identify asked, or the default).
    acks: bool,
}

impl Policy {
    /// A connection that opened at `now`, with `rate` lines per second (0: no limit).
    pub(crate) fn new(now: Instant, timeouts: Timeouts, rate: u32) -> Policy {
        Policy {
            deadline: after(now, timeouts.idle),
            lines: f64::from(rate),
            consecutive_errors: 0,
            auth_failures: 0,
            partial: false,
            completed_line: false,
            closing: None,
            acks: false,
        }
    }

    // Liveness: the read deadline.

    /// The deadline now in force.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the station has a partial line pending: the end of its stream at the
    /// deadline cuts a line (`line_timeout`) rather than ending an idle one.
    pub(crate) fn partial(&self) -> bool {
        self.partial
    }

    /// A complete line (or the end of an oversized one) was handled.
    #[inline]
    pub(crate) fn line_completed(&mut self) {
        self.completed_line = true;
    }

    /// After the bytes read at `read_at` were handled and nothing blocks: `partial` says
    /// whether a partial line is left. A completed line restarts the clocks from the read; a
    /// partial line that began in this read brings the line timeout in, within the idle one.
    pub(crate) fn after_read(&mut self, read_at: Instant, partial: bool, timeouts: Timeouts) {
        if self.completed_line {
            self.deadline = deadline_from(read_at, partial, timeouts);
        } else if partial && !self.partial {
            self.deadline = earliest(self.deadline, after(read_at, timeouts.line));
        }
        self.partial = partial;
        self.completed_line = false;
    }

    /// The shard held the connection back (a block, a throttle) until `now`: the station's
    /// clocks start again.
    pub(crate) fn restart(&mut self, now: Instant, timeouts: Timeouts) {
        self.deadline = deadline_from(now, self.partial, timeouts);
    }

    // The line rate limit.

    /// Tops the bucket up for `since` at `rate` lines per second, to at most `rate`.
    #[inline]
    pub(crate) fn refill(&mut self, since: Duration, rate: u32) {
        if rate > 0 {
            let rate = f64::from(rate);
            self.lines = (self.lines + since.as_secs_f64() * rate).min(rate);
        }
    }

    /// `lines` lines were handled.
    #[inline]
    pub(crate) fn spend(&mut self, lines: u64) {
        self.lines -= lines as f64;
    }

    /// How long to wait before reading again, if the lines read overdrew the bucket.
    #[inline]
    pub(crate) fn overdraft(&self, rate: u32) -> Option<Duration> {
        let rate = f64::from(rate);
        (rate > 0.0 && self.lines < 0.0).then(|| Duration::from_secs_f64(-self.lines / rate))
    }

    // Strikes: bad lines and refused identifies.

    /// Whether the server decided to close the connection.
    #[inline]
    pub(crate) fn closing(&self) -> Option<Closing> {
        self.closing
    }

    /// A line was accepted (a record or an identify): the count of bad lines in a row ends.
    #[inline]
    pub(crate) fn accepted(&mut self) {
        self.consecutive_errors = 0;
    }

    /// A line was rejected; at `max` in a row (0: no limit) the connection closes. True when
    /// this line decided it: the station is then told `too_many_errors`.
    pub(crate) fn rejected(&mut self, max: u32) -> bool {
        self.consecutive_errors = self.consecutive_errors.saturating_add(1);
        self.close_if(
            max > 0 && self.consecutive_errors >= max,
            Closing::TooManyErrors,
        )
    }

    /// An identify was refused; at `max` refusals over the connection's life (0: no limit)
    /// it closes. Returns the refusals so far, and true when this one decided the close (the
    /// station is then told `too_many_errors`, as for bad lines). The line also counts as
    /// rejected: call [`Policy::rejected`] after it.
    pub(crate) fn auth_failed(&mut self, max: u32) -> (u32, bool) {
        self.auth_failures = self.auth_failures.saturating_add(1);
        let limit = max > 0 && self.auth_failures >= max;
        (self.auth_failures, limit)
    }

    /// The shard's sink is gone: the connection ends, whatever else was decided.
    pub(crate) fn sink_stopped(&mut self) {
        self.closing = Some(Closing::SinkStopped);
    }

    /// Whether the shard's sink is gone ([`Policy::sink_stopped`]).
    #[inline]
    pub(crate) fn sink_gone(&self) -> bool {
        self.closing == Some(Closing::SinkStopped)
    }

    /// Closes for `why` if `limit` and not closing already; true if it did.
    pub(crate) fn close_if(&mut self, limit: bool, why: Closing) -> bool {
        let close = limit && self.closing.is_none();
        if close {
            self.closing = Some(why);
        }
        close
    }
}

impl Policy {
    // Acknowledgements.

    /// The station identified; `asked` is what its identify said of acks (`None`: nothing),
    /// `default` the server's `TCP_ACKS` default.
    pub(crate) fn identified(&mut self, asked: Option<bool>, default: bool) {
        self.acks = asked.unwrap_or(default);
    }

    /// Whether the connection's new lines with a seq get acknowledged.
    #[inline]
    pub(crate) fn acks_on(&self) -> bool {
        self.acks
    }
}

fn deadline_from(at: Instant, partial: bool, timeouts: Timeouts) -> Option<Instant> {
    let line = after(at, timeouts.line).filter(|_| partial);
    earliest(after(at, timeouts.idle), line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(60);
    const LINE: Duration = Duration::from_secs(10);
    const BOTH: Timeouts = Timeouts {
        idle: Some(IDLE),
        line: Some(LINE),
    };

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn an_idle_station_has_the_idle_timeout_from_its_start() {
        let t0 = Instant::now();
        let p = Policy::new(t0, BOTH, 0);
        assert_eq!(p.deadline(), Some(t0 + IDLE));
        assert!(!p.partial());
    }

    #[test]
    fn no_timeout_means_no_deadline_and_zero_means_none() {
        let t0 = Instant::now();
        let none = Timeouts {
            idle: None,
            line: Some(Duration::ZERO),
        };
        let mut p = Policy::new(t0, none, 0);
        assert_eq!(p.deadline(), None);
        p.after_read(t0 + secs(5), true, none);
        assert_eq!(p.deadline(), None);
        // A timeout too long to add to a clock reading is no deadline, not a panic.
        let forever = Timeouts {
            idle: Some(Duration::MAX),
            line: None,
        };
        assert_eq!(Policy::new(t0, forever, 0).deadline(), None);
    }

    #[test]
    fn a_complete_line_restarts_the_idle_clock_from_its_read() {
        let t0 = Instant::now();
        let mut p = Policy::new(t0, BOTH, 0);
        p.line_completed();
        p.after_read(t0 + secs(30), false, BOTH);
        assert_eq!(p.deadline(), Some(t0 + secs(30) + IDLE));
    }

    #[test]
    fn a_partial_line_brings_the_line_timeout_in_and_its_bytes_do_not_move_it() {
        let t0 = Instant::now();
        let mut p = Policy::new(t0, BOTH, 0);
        // A partial line begins at 5 s: it must complete by 15 s.
        p.after_read(t0 + secs(5), true, BOTH);
        assert_eq!(p.deadline(), Some(t0 + secs(15)));
        assert!(p.partial());
        // More bytes of the same line at 9 s (a slowloris) do not extend it.
        p.after_read(t0 + secs(9), true, BOTH);
        assert_eq!(p.deadline(), Some(t0 + secs(15)));
        // The line completes at 12 s with nothing left over: the idle timeout from then.
        p.line_completed();
        p.after_read(t0 + secs(12), false, BOTH);
        assert_eq!(p.deadline(), Some(t0 + secs(12) + IDLE));
        assert!(!p.partial());
    }

    #[test]
    fn a_partial_line_never_extends_an_earlier_idle_deadline() {
        let t0 = Instant::now();
        let short_idle = Timeouts {
            idle: Some(secs(3)),
            line: Some(LINE),
        };
        let mut p = Policy::new(t0, short_idle, 0);
        p.after_read(t0 + secs(1), true, short_idle);
        assert_eq!(p.deadline(), Some(t0 + secs(3)));
    }

    #[test]
    fn a_line_completed_with_a_new_partial_one_behind_it_times_the_new_one() {
        let t0 = Instant::now();
        let mut p = Policy::new(t0, BOTH, 0);
        p.after_read(t0 + secs(5), true, BOTH);
        p.line_completed();
        // The read at 20 s completed the old line and began another.
        p.after_read(t0 + secs(20), true, BOTH);
        assert_eq!(p.deadline(), Some(t0 + secs(30)));
    }

    #[test]
    fn a_wait_the_shard_imposed_restarts_the_clocks() {
        let t0 = Instant::now();
        let mut p = Policy::new(t0, BOTH, 0);
        p.after_read(t0 + secs(5), true, BOTH);
        p.restart(t0 + secs(40), BOTH);
        assert_eq!(p.deadline(), Some(t0 + secs(50)));
        let mut idle = Policy::new(t0, BOTH, 0);
        idle.restart(t0 + secs(40), BOTH);
        assert_eq!(idle.deadline(), Some(t0 + secs(40) + IDLE));
    }

    #[test]
    fn the_line_budget_holds_one_seconds_lines_and_refills_with_time() {
        let mut p = Policy::new(Instant::now(), BOTH, 100);
        p.spend(100);
        assert_eq!(p.overdraft(100), None);
        p.spend(50);
        assert_eq!(p.overdraft(100), Some(Duration::from_millis(500)));
        // Half a second later the overdraft is paid.
        p.refill(Duration::from_millis(500), 100);
        assert_eq!(p.overdraft(100), None);
        // A long pause fills the bucket only to one second's worth.
        p.refill(secs(3600), 100);
        p.spend(101);
        assert_eq!(p.overdraft(100), Some(Duration::from_millis(10)));
    }

    #[test]
    fn no_line_rate_means_no_wait() {
        let mut p = Policy::new(Instant::now(), BOTH, 0);
        p.refill(secs(1), 0);
        p.spend(1_000_000);
        assert_eq!(p.overdraft(0), None);
    }

    #[test]
    fn bad_lines_close_at_the_limit_in_a_row_and_a_good_line_resets_them() {
        let mut p = Policy::new(Instant::now(), BOTH, 0);
        assert!(!p.rejected(3));
        assert!(!p.rejected(3));
        p.accepted();
        assert!(!p.rejected(3));
        assert!(!p.rejected(3));
        assert_eq!(p.closing(), None);
        assert!(p.rejected(3));
        assert_eq!(p.closing(), Some(Closing::TooManyErrors));
        // Decided once: a later line does not decide (nor tell the station) again.
        assert!(!p.rejected(3));
        let mut unlimited = Policy::new(Instant::now(), BOTH, 0);
        assert!((0..10_000).all(|_| !unlimited.rejected(0)));
        assert_eq!(unlimited.closing(), None);
    }

    #[test]
    fn refused_identifies_close_over_the_connections_life() {
        let mut p = Policy::new(Instant::now(), BOTH, 0);
        let (failures, limit) = p.auth_failed(2);
        assert_eq!(
            (failures, p.close_if(limit, Closing::AuthFailures)),
            (1, false)
        );
        // An accepted line in between does not forgive a refused identify.
        p.accepted();
        let (failures, limit) = p.auth_failed(2);
        assert_eq!(
            (failures, p.close_if(limit, Closing::AuthFailures)),
            (2, true)
        );
        assert_eq!(p.closing(), Some(Closing::AuthFailures));
        let mut unlimited = Policy::new(Instant::now(), BOTH, 0);
        assert_eq!(unlimited.auth_failed(0), (1, false));
    }

    #[test]
    fn a_stopped_sink_ends_the_connection_whatever_was_decided_before() {
        let mut p = Policy::new(Instant::now(), BOTH, 0);
        assert!(p.rejected(1));
        assert!(!p.sink_gone());
        p.sink_stopped();
        assert!(p.sink_gone());
        assert_eq!(p.closing(), Some(Closing::SinkStopped));
        // Nothing decides after it.
        assert!(!p.close_if(true, Closing::AuthFailures));
        assert!(p.sink_gone());
    }

    #[test]
    fn acks_follow_the_last_identify_or_the_default() {
        let mut p = Policy::new(Instant::now(), BOTH, 0);
        assert!(!p.acks_on());
        p.identified(None, true);
        assert!(p.acks_on());
        p.identified(Some(false), true);
        assert!(!p.acks_on());
        p.identified(Some(true), false);
        assert!(p.acks_on());
        p.identified(None, false);
        assert!(!p.acks_on());
    }

    #[test]
    fn a_close_for_bad_lines_is_not_decided_again_for_refused_identifies() {
        // A refused identify that is also the last bad line in a row closes the connection
        // once, for the bad lines: the station is told `too_many_errors` once.
        let mut p = Policy::new(Instant::now(), BOTH, 0);
        let (_, limit) = p.auth_failed(1);
        assert!(p.rejected(1));
        assert!(!p.close_if(limit, Closing::AuthFailures));
        assert_eq!(p.closing(), Some(Closing::TooManyErrors));
    }
}
