//! Which core each shard runs on, and how much io_uring memory it registers.

use glommio::Placement;

/// The cores this process may run on (its affinity mask, so `taskset` and cgroup cpusets are
/// honoured), in ascending order.
pub(crate) fn usable_cores() -> Vec<usize> {
    let mut cores: Vec<usize> = core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect();
    cores.sort_unstable();
    if cores.is_empty() {
        // No mask could be read: fall back to what the OS reports.
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores = (0..n).collect();
    }
    cores
}

/// Shard `shard_id` runs on `cores[shard_id % cores.len()]`: with more shards than cores, shards
/// double up round-robin. Each is still pinned, so a core's shards time-share it under the
/// kernel scheduler; that can help when a shard waits on its producer, and costs context
/// switches and cache sharing when all of them are busy.
pub(crate) fn core_for(shard_id: usize, cores: &[usize]) -> usize {
    cores[shard_id % cores.len()]
}

pub(crate) fn placement_for(core: usize) -> Placement {
    Placement::Fixed(core)
}

/// glommio registers one buffer of `io_memory` bytes with each of its three io_uring rings,
/// and registered buffers count against `RLIMIT_MEMLOCK` (8 MiB on many systems, and here)
/// once per ring. Stormgate does no file I/O through glommio and its network reads do not use
/// those buffers, so each shard takes an equal share of half the limit (the other half stays
/// free for anything else that locks memory), between glommio's 64 KiB floor and 1 MiB.
/// Two shards under 8 MiB get 682 KiB each; 32 shards get the 64 KiB floor.
pub(crate) fn io_memory_per_shard(nr_shards: usize, memlock_limit: Option<u64>) -> usize {
    const FLOOR: usize = 64 << 10;
    const CEILING: usize = 1 << 20;
    const RINGS: usize = 3;
    let Some(limit) = memlock_limit else {
        return CEILING;
    };
    let share = (limit as usize / 2) / (RINGS * nr_shards.max(1));
    (share & !4095).clamp(FLOOR, CEILING)
}

/// The receive buffer (`SO_RCVBUF`) station sockets get: `configured`, lowered so that
/// `max_connections` sockets with full receive queues fit under the host's TCP memory
/// pressure threshold (`tcp_mem`'s second value, in pages); 0 (kernel autotuning) is left
/// as it is.
///
/// The kernel accounts up to twice `SO_RCVBUF` per socket. Past the pressure threshold it
/// trims queues, and at `tcp_mem`'s third value it drops arriving segments: the stations'
/// kernels then retransmit on an exponentially backed-off timer, and the connections stall
/// for tens of seconds after the shard has caught up. That is what made one flat-out run
/// in three at 10,000 connections take 20-100 s to drain (`TCPRcvQDrop`, `TCPTimeouts` in
/// `nstat`; docs/TUNING.md). Stormgate stops reading a connection to push back, so every
/// connection's queue can be full at once, and the bound must hold for all of them.
///
/// Returns the buffer and, when it was lowered, the budget it was lowered to fit (bytes).
pub(crate) fn recv_buffer_for(
    configured: usize,
    max_connections: usize,
    tcp_mem_pressure_pages: Option<u64>,
) -> (usize, Option<u64>) {
    const FLOOR: usize = 4 << 10;
    let Some(pages) = tcp_mem_pressure_pages else {
        return (configured, None);
    };
    if configured == 0 {
        return (0, None);
    }
    let budget = pages.saturating_mul(4096);
    let fits = budget / (2 * max_connections.max(1) as u64);
    if fits >= configured as u64 {
        return (configured, None);
    }
    ((fits as usize & !4095).max(FLOOR), Some(budget))
}

/// `net.ipv4.tcp_mem`'s pressure threshold, in pages (`None` if it cannot be read).
pub(crate) fn tcp_mem_pressure_pages() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// The soft `RLIMIT_MEMLOCK`, or `None` when unlimited.
pub(crate) fn memlock_limit() -> Option<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) };
    if rc != 0 || rl.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(rl.rlim_cur)
}

/// Raises the soft open-files limit to the hard limit (as Go's runtime and most servers do)
/// and returns the resulting soft limit (the one it was, if raising it failed; 1024, the
/// kernel's default, if it cannot be read). The load generator raises its own the same way:
/// Linux never lets the hard limit exceed `fs.nr_open` (`setrlimit` refuses), so "up to the
/// hard limit" needs no special case for an unlimited one.
pub(crate) fn raise_nofile_limit() -> u64 {
    rlimit::utils::increase_nofile_limit(u64::MAX)
        .or_else(|_| rlimit::Resource::NOFILE.get().map(|(soft, _)| soft))
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_open_files_limit_ends_at_the_hard_limit() {
        let limit = raise_nofile_limit();
        assert_eq!(rlimit::Resource::NOFILE.get().unwrap(), (limit, limit));
    }

    #[test]
    fn shards_wrap_around_cores() {
        let cores = [2, 5];
        let got: Vec<usize> = (0..5).map(|s| core_for(s, &cores)).collect();
        assert_eq!(got, [2, 5, 2, 5, 2]);
    }

    #[test]
    fn the_receive_buffer_fits_every_connection_under_tcp_mem() {
        // This VM: tcp_mem's pressure threshold 383,877 pages (1.46 GiB), 20,000 connections.
        assert_eq!(
            recv_buffer_for(256 << 10, 20_000, Some(383_877)),
            (36 << 10, Some(1_572_360_192))
        );
        let (buf, _) = recv_buffer_for(256 << 10, 20_000, Some(383_877));
        assert!(20_000 * 2 * buf as u64 <= 383_877 * 4096);
        // Few connections: the configured size fits.
        assert_eq!(
            recv_buffer_for(256 << 10, 1_000, Some(383_877)),
            (256 << 10, None)
        );
        // Autotuning, or no tcp_mem to go by: left alone.
        assert_eq!(recv_buffer_for(0, 20_000, Some(383_877)), (0, None));
        assert_eq!(recv_buffer_for(256 << 10, 20_000, None), (256 << 10, None));
        // Far too many connections for the host: the floor, not zero.
        assert_eq!(
            recv_buffer_for(256 << 10, 10_000_000, Some(1_000)).0,
            4 << 10
        );
    }

    #[test]
    fn io_memory_fits_half_the_memlock_limit() {
        let eight_mib = Some(8 << 20);
        assert_eq!(io_memory_per_shard(1, eight_mib), 1 << 20);
        assert_eq!(io_memory_per_shard(2, eight_mib), 696_320); // 680 KiB, 4 KiB aligned
        assert_eq!(io_memory_per_shard(32, eight_mib), 64 << 10);
        assert_eq!(io_memory_per_shard(4, None), 1 << 20);
        for n in 1..=8 {
            let total = io_memory_per_shard(n, eight_mib) * 3 * n;
            assert!(total <= 4 << 20, "{n} shards lock {total} bytes");
        }
    }

    #[test]
    fn usable_cores_is_never_empty() {
        assert!(!usable_cores().is_empty());
    }
}
