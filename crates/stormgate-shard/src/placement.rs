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
