//! The open-files limit.

use std::io;

use rlimit::Resource;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in force
/// (the one it was, if raising it failed). The server raises its own the same way, with the
/// same crate: Linux never lets the hard limit exceed `fs.nr_open` (`setrlimit` refuses), so
/// "up to the hard limit" needs no special case for an unlimited one.
pub fn raise_nofile() -> io::Result<u64> {
    rlimit::utils::increase_nofile_limit(u64::MAX)
        .or_else(|_| Resource::NOFILE.get().map(|(soft, _)| soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let limit = raise_nofile().unwrap();
        let (soft, hard) = Resource::NOFILE.get().unwrap();
        assert_eq!(soft, limit);
        assert_eq!(limit, hard);
    }
}
