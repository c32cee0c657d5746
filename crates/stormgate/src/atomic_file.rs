//! Replacing a file whole: the station registry's changes and the `STATS_FILE` report.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Writes `contents` to a temporary file beside `path`, fsyncs it, renames it over `path`
/// and fsyncs the directory: afterwards `path` is the old file or the new one, whole, even
/// across a crash. The new file keeps the old one's permissions; a failed replace leaves no
/// temporary behind.
///
/// The temporary's name is per process, so two threads of one process must not replace the
/// same file at once (the registry's writers hold its lock; the report is written once).
pub(crate) fn replace(path: &Path, contents: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_and_rename(&tmp, path, dir, contents);
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn write_and_rename(tmp: &Path, path: &Path, dir: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = File::create(tmp)?;
    if let Ok(old) = fs::metadata(path) {
        file.set_permissions(old.permissions())?;
    }
    file.write_all(contents)?;
    file.sync_all()?;
    drop(file);
    fs::rename(tmp, path)?;
    // The rename itself reaches the disk only with its directory.
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "stormgate-atomic-file-{name}-{}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_replace_is_a_new_file_with_the_old_permissions() {
        let dir = temp_dir("replace");
        let path = dir.join("stats.json");
        replace(&path, b"first").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"first");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let ino = fs::metadata(&path).unwrap().ino();

        replace(&path, b"second").unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        assert_ne!(meta.ino(), ino, "renamed into place, not rewritten");
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(names(&dir), ["stats.json"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_replace_leaves_what_was_there_and_no_temporary() {
        let dir = temp_dir("failed");
        // The temporary is written, but a file cannot be renamed over a directory.
        let path = dir.join("stats.json");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), b"old").unwrap();
        assert!(replace(&path, b"new").is_err());
        assert_eq!(fs::read(path.join("inside")).unwrap(), b"old");
        assert_eq!(names(&dir), ["stats.json"]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
