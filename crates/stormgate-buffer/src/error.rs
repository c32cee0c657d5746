//! Typed errors: what went wrong is a value, never a string to parse.

use std::io;
use std::path::{Path, PathBuf};

/// Why an append was refused. Nothing was written; the caller decides whether to wait
/// ([`crate::Log::writable`]) or to drop the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AppendError {
    /// The log holds `max_bytes` (segments count at their full size): wait for deliveries
    /// to free a segment, or drop the record.
    #[error("disk buffer full")]
    Full,
    /// Staged bytes reached their bound while the disk is healthy: flushes are behind.
    #[error("disk buffer staging full, the disk is behind")]
    Busy,
    /// Staged bytes reached their bound while storage errors persist (ENOSPC, EIO): the
    /// flush is being retried with backoff.
    #[error("disk buffer storage failing")]
    Failed,
    /// The record is larger than `max_record_bytes` (or its key than 65,535 bytes).
    #[error("record larger than the disk buffer's max_record_bytes")]
    TooLarge,
    /// The log is closed, or was opened to drain.
    #[error("disk buffer closed to appends")]
    Closed,
}

/// Why a log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenLogError {
    /// The configuration is inconsistent (the message names the numbers).
    #[error("invalid disk buffer configuration: {0}")]
    Config(String),
    /// Another process (or shard) has the directory open.
    #[error("disk buffer directory {} is in use by another process", dir.display())]
    Locked {
        /// The directory.
        dir: PathBuf,
    },
    /// A file-system operation failed.
    #[error("disk buffer: {op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl OpenLogError {
    pub(crate) fn io(op: &'static str, path: &Path, source: io::Error) -> OpenLogError {
        OpenLogError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}
