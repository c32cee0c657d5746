//! Pure arithmetic of a send run: which source address a connection binds, how connections
//! split across processes and threads.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Range;

/// Descriptors a process keeps free beyond its connections (stdio, epoll, pipes).
pub const FD_HEADROOM: u64 = 64;

/// The source address connection `index` binds before connecting: `127.0.0.(1 + index % sources)`,
/// when the target is an IPv4 loopback address and `sources` > 0; otherwise none (the kernel
/// picks).
///
/// Each source address has its own ~28K ephemeral ports (`ip_local_port_range`), so K sources
/// allow K times as many connections to one server address.
pub fn source_addr(target: SocketAddr, index: usize, sources: usize) -> Option<SocketAddr> {
    match target {
        SocketAddr::V4(t) if t.ip().is_loopback() && sources > 0 => {
            let host = 1 + (index % sources.min(254)) as u8;
            Some(SocketAddr::from((Ipv4Addr::new(127, 0, 0, host), 0)))
        }
        _ => None,
    }
}

/// `total` items in `parts` contiguous ranges whose sizes differ by at most one, larger ones
/// first. Empty ranges are kept, so `result.len() == parts`.
pub fn split(total: usize, parts: usize) -> Vec<Range<usize>> {
    let parts = parts.max(1);
    let (base, extra) = (total / parts, total % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = base + usize::from(i < extra);
            let range = start..start + len;
            start += len;
            range
        })
        .collect()
}

/// Why connections cannot be split as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanProcessesError {
    /// The per-process allowance is zero.
    #[error("no connections fit in one process (open-files limit {fd_limit})")]
    NoRoom {
        /// The limit that applied.
        fd_limit: u64,
    },
    /// `--processes` is too few for the limit.
    #[error(
        "{processes} process(es) cannot hold {connections} connections at {per_process} per process; use --processes {needed} or 0"
    )]
    TooFewProcesses {
        /// Connections asked for.
        connections: usize,
        /// Processes asked for.
        processes: usize,
        /// Most connections per process.
        per_process: usize,
        /// Processes needed.
        needed: usize,
    },
}

/// Most connections one process may open under open-files limit `fd_limit`, unless
/// `override_max` says otherwise.
pub fn per_process_max(fd_limit: u64, override_max: Option<usize>) -> usize {
    override_max.unwrap_or_else(|| {
        usize::try_from(fd_limit.saturating_sub(FD_HEADROOM)).unwrap_or(usize::MAX)
    })
}

/// Splits `connections` over processes of at most `per_process` connections each:
/// `requested` processes, or as few as fit when `requested` is 0. Each range is a process's
/// connection indices (its length is `--connections`, its start the zipcode offset).
pub fn processes(
    connections: usize,
    requested: usize,
    per_process: usize,
    fd_limit: u64,
) -> Result<Vec<Range<usize>>, PlanProcessesError> {
    if per_process == 0 {
        return Err(PlanProcessesError::NoRoom { fd_limit });
    }
    let needed = connections.div_ceil(per_process).max(1);
    let count = match requested {
        0 => needed,
        n if n >= needed => n,
        n => {
            return Err(PlanProcessesError::TooFewProcesses {
                connections,
                processes: n,
                per_process,
                needed,
            });
        }
    };
    Ok(split(connections, count))
}

#[cfg(test)]
// A one-range result is the expected answer in several cases, not a mistaken `0..n` vector.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn sources_cycle_over_loopback_addresses() {
        let t = addr("127.0.0.1:8080");
        let hosts: Vec<String> = (0..6)
            .map(|i| source_addr(t, i, 4).unwrap().ip().to_string())
            .collect();
        assert_eq!(
            hosts,
            [
                "127.0.0.1",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.4",
                "127.0.0.1",
                "127.0.0.2"
            ]
        );
        assert_eq!(source_addr(t, 5, 4).unwrap().port(), 0);
        assert_eq!(
            source_addr(t, 300, 1000).unwrap().ip().to_string(),
            "127.0.0.47"
        );
        assert_eq!(source_addr(t, 3, 0), None);
        assert_eq!(source_addr(addr("10.0.0.5:8080"), 3, 4), None);
        assert_eq!(source_addr(addr("[::1]:8080"), 3, 4), None);
    }

    #[test]
    fn split_is_contiguous_and_balanced() {
        assert_eq!(split(20, 3), [0..7, 7..14, 14..20]);
        assert_eq!(split(10, 5), [0..2, 2..4, 4..6, 6..8, 8..10]);
        assert_eq!(split(2, 4), [0..1, 1..2, 2..2, 2..2]);
        assert_eq!(split(5, 0), [0..5]);
        for (total, parts) in [(0, 1), (1, 1), (99_999, 7), (19_937, 3)] {
            let r = split(total, parts);
            assert_eq!(r.len(), parts);
            assert_eq!(r.iter().map(|r| r.len()).sum::<usize>(), total);
            let sizes: Vec<usize> = r.iter().map(|r| r.len()).collect();
            assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1);
        }
    }

    #[test]
    fn processes_fit_the_fd_limit() {
        assert_eq!(per_process_max(20_000, None), 19_936);
        assert_eq!(per_process_max(20_000, Some(8)), 8);
        assert_eq!(per_process_max(10, None), 0);
        assert_eq!(processes(100, 0, 19_936, 20_000).unwrap(), [0..100]);
        assert_eq!(processes(20, 0, 8, 0).unwrap(), [0..7, 7..14, 14..20]);
        assert_eq!(processes(16, 0, 8, 0).unwrap(), [0..8, 8..16]);
        assert_eq!(processes(17, 0, 8, 0).unwrap().len(), 3);
        assert_eq!(processes(50_000, 0, 19_936, 20_000).unwrap().len(), 3);
        assert_eq!(processes(0, 0, 8, 0).unwrap(), [0..0]);
        // More processes than needed is allowed; fewer is not.
        assert_eq!(
            processes(20, 4, 8, 0).unwrap(),
            [0..5, 5..10, 10..15, 15..20]
        );
        assert!(matches!(
            processes(20, 2, 8, 0),
            Err(PlanProcessesError::TooFewProcesses { needed: 3, .. })
        ));
        assert_eq!(
            processes(1, 0, 0, 50),
            Err(PlanProcessesError::NoRoom { fd_limit: 50 })
        );
    }
}
