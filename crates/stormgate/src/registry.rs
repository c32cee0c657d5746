//! The station registry: which token may publish for which zipcode (`STATION_AUTH=token`).
//!
//! # The file
//!
//! One JSON object per line, one line per zipcode, sorted by zipcode; blank lines and lines
//! starting with `#` are ignored:
//!
//! ```text
//! {"zipcode":"12345","salt":"<32 hex digits>","hash":"<64 hex digits>","created_at":"2026-11-27T09:30:00Z"}
//! ```
//!
//! `hash` is `hex(SHA-256(salt ‖ token))`: the salt's 16 bytes, then the token's text exactly
//! as the station sends it. A token is 256 bits from the operating system's random source,
//! written as 64 lowercase hex digits. The file never holds a token, so reading it does not
//! let anyone identify as a station, and it holds no other secret.
//!
//! # Why SHA-256 and not a password hash
//!
//! Password hashes (argon2, scrypt, bcrypt) are slow on purpose, because a human's password
//! is guessable and a stolen hash must cost each guess dearly. These tokens are 256-bit random
//! values: there is nothing to guess, so one salted SHA-256 already makes a stolen hash
//! useless. And the check runs on the shard's thread at every identify: one check costs 88 ns
//! (measured on this project's 2-core VM, whose CPU has SHA extensions; a few hundred ns
//! without them), so a reconnect storm of 50,000 stations costs 5–25 ms of CPU; an argon2
//! tuned for passwords (~50 ms per check) would stall the shards for 40 CPU-minutes. The
//! comparison with the stored hash is constant-time (`subtle`), and an unknown zipcode costs
//! the same hash as a known one, so timing tells neither how much of a hash matched nor
//! which zipcodes are registered.
//!
//! # Changing it
//!
//! [`update`] (behind `stormgate station add|remove`) takes an exclusive lock on a sidecar
//! file `<registry>.lock` (never renamed, so every writer locks the same inode), reads the
//! registry, changes it, writes the whole new registry to a temporary file in the same
//! directory, fsyncs it, renames it over the registry and fsyncs the directory. A reader (the
//! server's reload) sees the old file or the new one, never half of one, and two concurrent
//! runs cannot lose each other's change.
//!
//! # Reloading
//!
//! [`LiveRegistry`] is what the shards ask ([`StationAuth`]); [`serve`] loads it and starts a
//! [`Watcher`] that reloads it within [`RELOAD_INTERVAL`](crate::reload::RELOAD_INTERVAL) of
//! a change, or at once on SIGHUP, and publishes it with one atomic pointer swap. A file
//! that fails to load is logged and the previous registry stays.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use data_encoding::{HEXLOWER, HEXLOWER_PERMISSIVE};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use stormgate_shard::{Credentials, StationAuth};
use subtle::ConstantTimeEq;
use tracing::info;

use crate::atomic_file;
use crate::reload::{FileVersion, Watcher};
use crate::tls::certificate_names;

/// Bytes of salt per station.
pub const SALT_BYTES: usize = 16;
/// Random bytes per token: 256 bits.
pub const TOKEN_BYTES: usize = 32;
/// Bytes of a SHA-256 hash.
const HASH_BYTES: usize = 32;

/// The first lines of every registry file the tool writes.
const HEADER: &str = "\
# Stormgate station registry. Edit with `stormgate station add|remove|list`.
# One station per line: hash = hex(SHA-256(salt || token)); tokens are never stored.
";

/// Why the registry could not be read, parsed or changed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done, e.g. `reading the station registry`.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The file is not a valid registry.
    #[error("station registry {}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and why.
        source: ParseRegistryError,
    },
    /// `add` of a zipcode that has an entry.
    #[error("zipcode {0:?} is already registered (remove it first to issue a new token)")]
    Exists(String),
    /// `remove` of a zipcode that has no entry.
    #[error("zipcode {0:?} is not registered")]
    NotRegistered(String),
    /// A zipcode no station could send.
    #[error("invalid zipcode {0:?}: {1}")]
    InvalidZipcode(String, &'static str),
    /// The operating system's random source failed.
    #[error("cannot read random bytes from the operating system: {0}")]
    Random(String),
}

/// A line of the registry file that is not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ParseRegistryError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// One line of the file, as written.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntryLine {
    zipcode: String,
    salt: String,
    hash: String,
    created_at: String,
}

/// One registered station.
#[derive(Clone, PartialEq, Eq)]
struct Entry {
    salt: [u8; SALT_BYTES],
    hash: [u8; HASH_BYTES],
    /// RFC 3339, seconds, UTC.
    created_at: String,
}

/// The registered stations: zipcode → salted token hash.
///
/// Immutable once loaded: a change builds a new one. Shared read-only by every shard through
/// [`LiveRegistry`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Registry {
    stations: HashMap<String, Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("stations", &self.stations.len())
            .finish()
    }
}

impl Registry {
    /// Reads and parses the registry at `path`.
    pub fn load(path: &Path) -> Result<Registry, RegistryError> {
        let text = fs::read_to_string(path).map_err(|source| RegistryError::Io {
            action: "reading the station registry",
            path: path.to_owned(),
            source,
        })?;
        Registry::parse(&text).map_err(|source| RegistryError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Parses a registry file's text (see the module doc for the format).
    pub fn parse(text: &str) -> Result<Registry, ParseRegistryError> {
        let mut stations = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: String| ParseRegistryError {
                line: i + 1,
                reason,
            };
            let entry: EntryLine = serde_json::from_str(line).map_err(|e| err(e.to_string()))?;
            check_zipcode(&entry.zipcode).map_err(|reason| err(reason.to_owned()))?;
            let salt = decode_hex(&entry.salt)
                .ok_or_else(|| err(format!("salt must be {} hex digits", 2 * SALT_BYTES)))?;
            let hash = decode_hex(&entry.hash)
                .ok_or_else(|| err(format!("hash must be {} hex digits", 2 * HASH_BYTES)))?;
            humantime::parse_rfc3339(&entry.created_at)
                .map_err(|e| err(format!("created_at {:?}: {e}", entry.created_at)))?;
            let zipcode = entry.zipcode;
            let entry = Entry {
                salt,
                hash,
                created_at: entry.created_at,
            };
            if stations.insert(zipcode.clone(), entry).is_some() {
                return Err(err(format!("zipcode {zipcode:?} appears twice")));
            }
        }
        Ok(Registry { stations })
    }

    /// The file's text: the header, then one line per station, sorted by zipcode.
    pub fn to_text(&self) -> String {
        let mut out = String::from(HEADER);
        let mut zipcodes: Vec<&String> = self.stations.keys().collect();
        zipcodes.sort();
        for zipcode in zipcodes {
            let entry = &self.stations[zipcode];
            let line = EntryLine {
                zipcode: zipcode.clone(),
                salt: HEXLOWER.encode(&entry.salt),
                hash: HEXLOWER.encode(&entry.hash),
                created_at: entry.created_at.clone(),
            };
            out.push_str(&serde_json::to_string(&line).expect("strings serialize"));
            out.push('\n');
        }
        out
    }

    /// Whether `token` is the one registered for `zipcode`. No token, or an unknown zipcode,
    /// is a no.
    pub fn verify(&self, zipcode: &str, token: Option<&str>) -> bool {
        let Some(token) = token else { return false };
        match self.stations.get(zipcode) {
            Some(entry) => hashes_equal(&hash_token(&entry.salt, token), &entry.hash),
            None => {
                // The same work as for a registered zipcode, so that how long the answer
                // takes does not tell which zipcodes are registered.
                let dummy = hash_token(&[0; SALT_BYTES], token);
                let _ = std::hint::black_box(hashes_equal(&dummy, &[0; HASH_BYTES]));
                false
            }
        }
    }

    /// Registers `zipcode` with a new random token, created at `now`, and returns the token:
    /// the only time it exists outside the station.
    pub fn add(&mut self, zipcode: &str, now: SystemTime) -> Result<String, RegistryError> {
        check_zipcode(zipcode)
            .map_err(|reason| RegistryError::InvalidZipcode(zipcode.to_owned(), reason))?;
        if self.stations.contains_key(zipcode) {
            return Err(RegistryError::Exists(zipcode.to_owned()));
        }
        let mut random = [0u8; TOKEN_BYTES + SALT_BYTES];
        getrandom::fill(&mut random).map_err(|e| RegistryError::Random(e.to_string()))?;
        let token = HEXLOWER.encode(&random[..TOKEN_BYTES]);
        let mut salt = [0u8; SALT_BYTES];
        salt.copy_from_slice(&random[TOKEN_BYTES..]);
        let entry = Entry {
            hash: hash_token(&salt, &token),
            salt,
            created_at: humantime::format_rfc3339_seconds(now).to_string(),
        };
        self.stations.insert(zipcode.to_owned(), entry);
        Ok(token)
    }

    /// Removes `zipcode`'s entry.
    pub fn remove(&mut self, zipcode: &str) -> Result<(), RegistryError> {
        match self.stations.remove(zipcode) {
            Some(_) => Ok(()),
            None => Err(RegistryError::NotRegistered(zipcode.to_owned())),
        }
    }

    /// Every station as (zipcode, created at), sorted by zipcode. Never tokens or hashes.
    pub fn stations(&self) -> Vec<(&str, &str)> {
        let mut out: Vec<(&str, &str)> = self
            .stations
            .iter()
            .map(|(z, e)| (z.as_str(), e.created_at.as_str()))
            .collect();
        out.sort_unstable();
        out
    }

    /// How many stations are registered.
    pub fn len(&self) -> usize {
        self.stations.len()
    }

    /// Whether no station is registered.
    pub fn is_empty(&self) -> bool {
        self.stations.is_empty()
    }
}

/// A zipcode the registry accepts: what a station can send and a list can print.
fn check_zipcode(zipcode: &str) -> Result<(), &'static str> {
    if zipcode.trim().is_empty() {
        return Err("it must not be empty");
    }
    if zipcode.chars().any(char::is_control) {
        return Err("it must not contain control characters");
    }
    Ok(())
}

/// `SHA-256(salt ‖ token)`.
pub fn hash_token(salt: &[u8], token: &str) -> [u8; HASH_BYTES] {
    let digest = Sha256::new()
        .chain_update(salt)
        .chain_update(token.as_bytes())
        .finalize();
    let mut out = [0u8; HASH_BYTES];
    out.copy_from_slice(&digest);
    out
}

/// Compares two hashes in time that does not depend on where they differ.
pub fn hashes_equal(a: &[u8; HASH_BYTES], b: &[u8; HASH_BYTES]) -> bool {
    a[..].ct_eq(&b[..]).into()
}

/// Exactly `2 * N` hex digits (either case) into `N` bytes.
fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    HEXLOWER_PERMISSIVE
        .decode(text.as_bytes())
        .ok()?
        .try_into()
        .ok()
}

/// Changes the registry at `path` (an absent file is an empty registry) under an exclusive
/// lock, and replaces the file atomically with the result. Nothing is written when `change`
/// fails.
pub fn update<T>(
    path: &Path,
    change: impl FnOnce(&mut Registry) -> Result<T, RegistryError>,
) -> Result<T, RegistryError> {
    let lock_path = sidecar(path, ".lock")?;
    let io_err = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source: io::Error| RegistryError::Io {
            action,
            path,
            source,
        }
    };
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("opening the lock file", &lock_path))?;
    // Released when `lock` closes, after the rename.
    lock.lock().map_err(io_err("locking", &lock_path))?;
    let mut registry = match Registry::load(path) {
        Ok(registry) => registry,
        Err(RegistryError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Registry::default()
        }
        Err(e) => return Err(e),
    };
    let out = change(&mut registry)?;
    atomic_file::replace(path, registry.to_text().as_bytes()).map_err(io_err("replacing", path))?;
    Ok(out)
}

/// `stormgate station add`: registers `zipcode` in the file at `path` and returns its token.
pub fn add(path: &Path, zipcode: &str) -> Result<String, RegistryError> {
    update(path, |registry| registry.add(zipcode, SystemTime::now()))
}

/// `stormgate station remove`: removes `zipcode` from the file at `path`.
pub fn remove(path: &Path, zipcode: &str) -> Result<(), RegistryError> {
    update(path, |registry| registry.remove(zipcode))
}

/// `path` with `suffix` appended to its file name, in the same directory.
fn sidecar(path: &Path, suffix: &str) -> Result<PathBuf, RegistryError> {
    let Some(name) = path.file_name() else {
        return Err(RegistryError::Io {
            action: "using as the station registry",
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        });
    };
    let mut name = name.to_owned();
    name.push(suffix);
    Ok(path.with_file_name(name))
}

/// The registry every shard asks, replaced whole when the file changes.
///
/// Shared by all shards. Reading is lock-free (`arc-swap`): an identify loads the current
/// `Arc<Registry>` with a few atomic operations and never waits for the reload thread, which
/// builds the new registry aside and publishes it with one atomic swap. (A `Mutex` read only
/// at identify would be cheap enough too, identify being per connection and not per line;
/// arc-swap keeps the rule that no shard takes a lock another thread holds without an
/// argument about how long the reload holds it.)
#[derive(Debug)]
pub struct LiveRegistry {
    current: ArcSwap<Registry>,
}

impl LiveRegistry {
    /// Starts with `registry`.
    pub fn new(registry: Registry) -> LiveRegistry {
        LiveRegistry {
            current: ArcSwap::from_pointee(registry),
        }
    }

    /// Publishes `registry`: identifies from now on are checked against it.
    pub fn replace(&self, registry: Registry) {
        self.current.store(Arc::new(registry));
    }

    /// The registry identifies are checked against now.
    pub fn current(&self) -> Arc<Registry> {
        self.current.load_full()
    }
}

/// A token from the registry, or under mutual TLS a client certificate whose subject names
/// the zipcode (see [`certificate_names`]), proves a zipcode.
impl StationAuth for LiveRegistry {
    fn verify(&self, credentials: &Credentials<'_>) -> bool {
        certificate_names(credentials.certificate, credentials.zipcode)
            || self
                .current
                .load()
                .verify(credentials.zipcode, credentials.token)
    }
}

/// Loads the registry at `path` for the server and starts watching it for changes.
pub fn serve(path: &Path, every: Duration) -> Result<(Arc<LiveRegistry>, Watcher), RegistryError> {
    let paths = vec![path.to_owned()];
    // Looked at before reading, so that a change while reading is seen as a change.
    let versions = FileVersion::of_all(&paths);
    let live = Arc::new(LiveRegistry::new(Registry::load(path)?));
    let published = Arc::clone(&live);
    let file = path.to_owned();
    let watcher = Watcher::start(
        "registry-reload",
        "station registry",
        paths,
        versions,
        every,
        move || Registry::load(&file),
        move |registry: Registry| {
            info!(stations = registry.len(), "station registry reloaded");
            published.replace(registry);
        },
    )
    .map_err(|source| RegistryError::Io {
        action: "starting the reload thread for",
        path: path.to_owned(),
        source,
    })?;
    Ok((live, watcher))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// Whether the live registry accepts `token` for `zipcode`, asked as a shard asks it.
    fn proves(live: &LiveRegistry, zipcode: &str, token: Option<&str>) -> bool {
        live.verify(&Credentials {
            zipcode,
            token,
            certificate: None,
        })
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "stormgate-registry-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn the_hash_is_sha256_of_salt_then_token() {
        // SHA-256("abc"), the FIPS 180-2 example: salt "ab", token "c".
        assert_eq!(
            HEXLOWER.encode(&hash_token(b"ab", "c")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn hex_is_read_in_either_case_and_at_exactly_its_length() {
        assert_eq!(decode_hex::<2>("0aF1"), Some([0x0a, 0xf1]));
        for bad in ["0af", "0af1f2", "0ag1", " 0af1", ""] {
            assert_eq!(decode_hex::<2>(bad), None, "{bad:?}");
        }
        assert_eq!(HEXLOWER.encode(&[0x0a, 0xf1]), "0af1");
    }

    #[test]
    fn a_token_verifies_only_for_its_own_zipcode() {
        let mut registry = Registry::default();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_736_882);
        let token = registry.add("12345", now).unwrap();
        let other = registry.add("99999", now).unwrap();
        assert_eq!(token.len(), 2 * TOKEN_BYTES);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(token, other, "tokens are random");
        let mut wrong = token.clone();
        wrong.replace_range(63.., if token.ends_with('0') { "1" } else { "0" });
        for (zipcode, token_sent, ok) in [
            ("12345", Some(token.as_str()), true),
            ("99999", Some(other.as_str()), true),
            ("12345", Some(wrong.as_str()), false),
            ("12345", Some(other.as_str()), false),
            ("99999", Some(token.as_str()), false),
            ("12345", None, false),
            ("12345", Some(""), false),
            ("00000", Some(token.as_str()), false),
            (" 12345", Some(token.as_str()), false),
        ] {
            assert_eq!(
                registry.verify(zipcode, token_sent),
                ok,
                "{zipcode:?} {token_sent:?}"
            );
        }
        // The file holds neither token.
        let text = registry.to_text();
        assert!(!text.contains(&token) && !text.contains(&other), "{text}");
        assert!(
            text.contains("\"created_at\":\"2026-11-26T23:48:02Z\""),
            "{text}"
        );
    }

    #[test]
    fn hashes_compare_in_full() {
        let a = hash_token(b"salt", "token");
        assert!(hashes_equal(&a, &a.clone()));
        for i in [0, 15, 31] {
            let mut b = a;
            b[i] ^= 1;
            assert!(!hashes_equal(&a, &b), "differs at byte {i}");
        }
        // An unknown zipcode takes the dummy path and says no, even for the dummy's hash.
        let registry = Registry::default();
        assert!(!registry.verify("12345", Some("token")));
    }

    #[test]
    fn the_text_form_round_trips() {
        let mut registry = Registry::default();
        for zipcode in ["3", "1", "São Paulo \"centro\"", "2"] {
            registry.add(zipcode, SystemTime::now()).unwrap();
        }
        let text = registry.to_text();
        assert!(text.starts_with(HEADER));
        let zipcodes: Vec<&str> = registry.stations().iter().map(|s| s.0).collect();
        assert_eq!(zipcodes, ["1", "2", "3", "São Paulo \"centro\""]);
        assert_eq!(Registry::parse(&text).unwrap(), registry);
        assert_eq!(
            Registry::parse("\n# a comment\n\n").unwrap(),
            Registry::default()
        );
    }

    /// One bad line per case, after a good one: the error names line 2 and the problem.
    fn check_parse_error(bad: &str, want: &str) {
        let good = r#"{"zipcode":"1","salt":"00112233445566778899aabbccddeeff","hash":"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad","created_at":"2026-11-27T09:30:00Z"}"#;
        let err = Registry::parse(&format!("{good}\n{bad}\n")).unwrap_err();
        assert_eq!(err.line, 2, "{bad}");
        assert!(err.reason.contains(want), "{bad}: {err}");
    }

    #[test]
    fn bad_lines_are_rejected_with_their_number_and_reason() {
        let salt = "00112233445566778899aabbccddeeff";
        let hash = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let line = |zipcode: &str, salt: &str, hash: &str, at: &str| {
            format!(
                r#"{{"zipcode":{zipcode:?},"salt":"{salt}","hash":"{hash}","created_at":"{at}"}}"#
            )
        };
        let at = "2026-11-27T09:30:00Z";
        check_parse_error("not json", "expected");
        check_parse_error(&line("1", salt, hash, at), "appears twice");
        check_parse_error(&line(" ", salt, hash, at), "must not be empty");
        check_parse_error(&line("1\t2", salt, hash, at), "control characters");
        check_parse_error(&line("2", "0011", hash, at), "salt must be 32 hex digits");
        check_parse_error(&line("2", &salt.replace('0', "g"), hash, at), "salt");
        check_parse_error(
            &line("2", salt, &hash[1..], at),
            "hash must be 64 hex digits",
        );
        check_parse_error(&line("2", salt, hash, "yesterday"), "created_at");
        check_parse_error(
            &line("2", salt, hash, at).replace('}', r#","token":"abc"}"#),
            "unknown field `token`",
        );
        check_parse_error(r#"{"zipcode":"2","salt":"00"}"#, "missing field");
    }

    #[test]
    fn an_update_replaces_the_file_atomically_or_not_at_all() {
        let dir = temp_dir("atomic");
        let path = dir.join("stations.jsonl");
        let token = add(&path, "12345").unwrap();
        let first = fs::read_to_string(&path).unwrap();
        let ino = fs::metadata(&path).unwrap().ino();
        // A change that fails writes nothing.
        let err = add(&path, "12345").unwrap_err();
        assert!(matches!(err, RegistryError::Exists(_)), "{err}");
        assert!(matches!(
            remove(&path, "00000").unwrap_err(),
            RegistryError::NotRegistered(_)
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), first);
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
        // A change that succeeds is a new file renamed into place, and leaves no temporary.
        add(&path, "23456").unwrap();
        assert_ne!(
            fs::metadata(&path).unwrap().ino(),
            ino,
            "replaced, not rewritten"
        );
        let mut names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["stations.jsonl", "stations.jsonl.lock"]);
        let registry = Registry::load(&path).unwrap();
        assert!(registry.verify("12345", Some(&token)));
        assert_eq!(registry.len(), 2);
        remove(&path, "12345").unwrap();
        assert_eq!(Registry::load(&path).unwrap().stations().len(), 1);
        // A file that is not a registry is not overwritten.
        fs::write(&path, "garbage\n").unwrap();
        assert!(matches!(
            add(&path, "34567").unwrap_err(),
            RegistryError::Parse { .. }
        ));
        assert_eq!(fs::read_to_string(&path).unwrap(), "garbage\n");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reader_sees_whole_files_only_while_a_writer_replaces_them() {
        let dir = temp_dir("reader");
        let path = dir.join("stations.jsonl");
        add(&path, "0").unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, done) = (path.clone(), Arc::clone(&done));
            std::thread::spawn(move || {
                let mut reads = 0;
                let mut last = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = Registry::load(&path).expect("a whole file").len();
                    assert!(n >= last, "went back from {last} to {n} stations");
                    last = n;
                    reads += 1;
                }
                reads
            })
        };
        for i in 1..50 {
            add(&path, &i.to_string()).unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
        assert_eq!(Registry::load(&path).unwrap().len(), 50);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_adds_lose_no_update() {
        let dir = temp_dir("concurrent");
        let path = dir.join("stations.jsonl");
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let path = path.clone();
                std::thread::spawn(move || {
                    (0..5)
                        .map(|i| {
                            let zipcode = format!("{t}-{i}");
                            let token = add(&path, &zipcode).unwrap();
                            (zipcode, token)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let added: Vec<(String, String)> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let registry = Registry::load(&path).unwrap();
        assert_eq!(registry.len(), 40);
        for (zipcode, token) in &added {
            assert!(registry.verify(zipcode, Some(token)), "{zipcode}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_watcher_publishes_changes_and_keeps_the_last_good_registry() {
        let dir = temp_dir("watch");
        let path = dir.join("stations.jsonl");
        let first = add(&path, "1").unwrap();
        let every = Duration::from_millis(20);
        let (live, watcher) = serve(&path, every).unwrap();
        assert!(proves(&live, "1", Some(&first)));
        let second = add(&path, "2").unwrap();
        let wait = |what: &str, cond: &dyn Fn() -> bool| {
            let start = std::time::Instant::now();
            while !cond() {
                assert!(start.elapsed() < Duration::from_secs(10), "{what}");
                std::thread::sleep(every);
            }
        };
        wait("the added station", &|| proves(&live, "2", Some(&second)));
        // A broken file is refused (the watcher says so) and not published: both stations
        // still verify.
        let where_ = format!("{path:?}");
        crate::reload::test_log::logged(&[]);
        fs::write(&path, "{broken\n").unwrap();
        wait("the broken file refused", &|| {
            crate::reload::test_log::logged(&["station registry not reloaded", &where_])
        });
        assert!(proves(&live, "1", Some(&first)) && proves(&live, "2", Some(&second)));
        // Neither is a missing one.
        fs::remove_file(&path).unwrap();
        wait("the missing file refused", &|| {
            crate::reload::test_log::logged(&["No such file", &where_])
        });
        assert_eq!(live.current().len(), 2);
        let third = add(&path, "3").unwrap();
        wait("the new file", &|| proves(&live, "3", Some(&third)));
        assert!(!proves(&live, "1", Some(&first)), "the new file has only 3");
        drop(watcher);
        fs::remove_dir_all(&dir).unwrap();
    }
}
