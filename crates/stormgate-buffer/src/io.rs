//! Every file operation the running log performs, in one place: direct I/O through the
//! shard's io_uring rings, and the rare metadata operations (create, rename, remove, directory
//! fsync) on glommio's blocking thread, off the reactor. This is also the seam where tests
//! inject storage errors.

use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use glommio::GlommioError;
use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

use crate::recovery;

/// Keeps the errno of glommio's error: its conversion to `io::Error` keeps only the kind,
/// and ENOSPC and EIO must stay apart for the logs.
fn os_error(e: GlommioError<()>) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => e.into(),
    }
}

/// Errors tests can make the next operations of a kind return.
#[cfg(test)]
#[derive(Debug, Default)]
pub(crate) struct Faults {
    /// errno for segment writes.
    pub write: std::cell::Cell<Option<i32>>,
    /// errno for segment and checkpoint fdatasync.
    pub sync: std::cell::Cell<Option<i32>>,
    /// errno for segment file creation.
    pub create: std::cell::Cell<Option<i32>>,
    /// errno for reads.
    pub read: std::cell::Cell<Option<i32>>,
    /// Operations failed so far.
    pub injected: std::cell::Cell<u64>,
}

#[cfg(test)]
impl Faults {
    fn check(&self, which: &std::cell::Cell<Option<i32>>) -> io::Result<()> {
        match which.get() {
            Some(code) => {
                self.injected.set(self.injected.get() + 1);
                Err(io::Error::from_raw_os_error(code))
            }
            None => Ok(()),
        }
    }
}

/// The log's file operations.
#[derive(Debug, Default)]
pub(crate) struct FileIo {
    #[cfg(test)]
    pub faults: Rc<Faults>,
}

macro_rules! fault {
    ($self:ident, $kind:ident) => {
        #[cfg(test)]
        $self.faults.check(&$self.faults.$kind)?;
    };
}

impl FileIo {
    /// Writes a whole buffer at `pos`; a short write is an error.
    pub(crate) async fn write_at(
        &self,
        file: &DmaFile,
        buf: Rc<DmaBuffer>,
        pos: u64,
    ) -> io::Result<()> {
        fault!(self, write);
        let want = buf.len();
        let n = file.write_rc_at(buf, pos).await.map_err(os_error)?;
        if n != want {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {want} bytes"),
            ));
        }
        Ok(())
    }

    pub(crate) async fn fdatasync(&self, file: &DmaFile) -> io::Result<()> {
        fault!(self, sync);
        file.fdatasync().await.map_err(os_error)
    }

    /// Reads `len` bytes at `pos` (both block-aligned); fewer at the end of the file.
    pub(crate) async fn read_at(
        &self,
        file: &DmaFile,
        pos: u64,
        len: usize,
    ) -> io::Result<ReadResult> {
        fault!(self, read);
        file.read_at_aligned(pos, len).await.map_err(os_error)
    }

    /// Opens a segment (or the checkpoint) for direct I/O, reading and writing.
    pub(crate) async fn open(&self, path: &Path, write: bool) -> io::Result<DmaFile> {
        // Always readable: glommio probes io_uring polling with a read, which would fail
        // (and be logged as an error) on a write-only descriptor.
        OpenOptions::new()
            .read(true)
            .write(write)
            .dma_open(path)
            .await
            .map_err(os_error)
    }

    /// Gives a new segment its file: renames the spare if `spare`, else creates and
    /// preallocates one; then makes the directory entry durable.
    pub(crate) async fn create_segment(
        &self,
        dir: &Path,
        path: &Path,
        size: u64,
        spare: bool,
    ) -> io::Result<()> {
        fault!(self, create);
        let (dir, path) = (dir.to_path_buf(), path.to_path_buf());
        blocking(move || {
            if spare {
                std::fs::rename(dir.join(recovery::SPARE_FILE), &path)?;
            } else {
                preallocate(&path, size)?;
            }
            recovery::sync_dir(&dir)
        })
        .await
    }

    /// Creates the spare: a preallocated file of `size` bytes.
    pub(crate) async fn create_spare(&self, dir: &Path, size: u64) -> io::Result<()> {
        fault!(self, create);
        let path = dir.join(recovery::SPARE_FILE);
        blocking(move || preallocate(&path, size)).await
    }

    /// Removes a delivered segment, or moves a damaged one to `quarantine/`; returns the
    /// quarantined files removed to respect the bound.
    pub(crate) async fn retire(
        &self,
        dir: &Path,
        path: &Path,
        quarantine: Option<usize>,
    ) -> io::Result<Vec<PathBuf>> {
        let (dir, path) = (dir.to_path_buf(), path.to_path_buf());
        blocking(move || match quarantine {
            Some(max_files) => {
                recovery::quarantine(&dir, &path)?;
                recovery::trim_quarantine(&dir, max_files)
            }
            None => std::fs::remove_file(&path).map(|()| Vec::new()),
        })
        .await
    }

    /// Removes a drained directory's files and the directory (kept if `quarantine/` holds
    /// files).
    pub(crate) async fn remove_dir(&self, dir: &Path) -> io::Result<bool> {
        let dir = dir.to_path_buf();
        blocking(move || {
            for name in [
                recovery::CHECKPOINT_FILE,
                recovery::SPARE_FILE,
                recovery::LOCK_FILE,
            ] {
                match std::fs::remove_file(dir.join(name)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            let _ = std::fs::remove_dir(dir.join(recovery::QUARANTINE_DIR));
            match std::fs::remove_dir(&dir) {
                Ok(()) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await
    }
}

/// Runs a blocking file operation on the executor's blocking thread.
pub(crate) async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> io::Result<R> + Send + 'static,
) -> io::Result<R> {
    glommio::executor().spawn_blocking(f).await
}

/// Creates `path` with `size` bytes allocated (reads return zeros), durably.
fn preallocate(path: &Path, size: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, size as i64) } != 0 {
        let err = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(err);
    }
    file.sync_all()
}
