//! The profile directory of one device: who it is, which broker it uses, and its secrets.
//!
//! ```text
//! DIR/profile.toml   broker address, TLS name, number, device id, nonce step   (0644)
//! DIR/ca.pem         the CA this device trusts for its broker                   (0644)
//! DIR/secrets.toml   client secret, server secret, identity key seed            (0600)
//! ```
//!
//! Files are replaced atomically (write to a temporary file, fsync, rename), so a crash never
//! leaves a half-written profile; secret files are created 0600 before a byte is written.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use micromsg_crypto::Secret32;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Why a profile could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// The directory holds no profile yet.
    #[error("no profile in {0} (run `micromsg --profile {0} register …` or `device join …` first)")]
    Missing(PathBuf),
    /// The directory already holds a registered profile.
    #[error("{0} already holds a registered profile; use another --profile directory")]
    Exists(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not in the expected format.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A `move` or an `export` of this profile is under way (it holds the move lock, the
    /// path).
    #[error(
        "a `micromsg move` or `export` of this profile is under way (it holds {0}): let it \
         finish, then try again"
    )]
    MoveUnderWay(PathBuf),
}

/// The public part of a profile (`profile.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProfileInfo {
    /// The broker's `HOST:PORT`.
    pub broker: String,
    /// The name checked against the broker's certificate (the host part of `broker`).
    pub tls_name: String,
    /// This entity's number.
    pub number: String,
    /// This device's id within the entity.
    pub device: u32,
    /// The broker's nonce step in seconds.
    pub nonce_step: u32,
    /// The broker's Ed25519 identity key (hex), pinned from BROKER-INFO at registration.
    #[serde(default)]
    pub broker_identity: Option<String>,
}

#[cfg(test)]
impl ProfileInfo {
    /// A device 1 of number 5550001 at `old.example:7000`, for tests.
    pub(crate) fn for_tests() -> Self {
        Self {
            broker: "old.example:7000".into(),
            tls_name: "old.example".into(),
            number: "5550001".into(),
            device: 1,
            nonce_step: 30,
            broker_identity: None,
        }
    }
}

/// The secrets of a device (`secrets.toml`). Zeroized on drop.
#[derive(Debug, Clone)]
pub struct Secrets {
    /// Proves this device to the broker.
    pub client_secret: Secret32,
    /// The broker proves it knows this.
    pub server_secret: Secret32,
    /// Seed of the device's long-term Ed25519 identity key.
    pub identity_seed: Secret32,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsFile {
    client_secret: String,
    server_secret: String,
    identity_seed: String,
}

/// The marker file of [`Profile::awaiting_keys`] (empty).
const AWAITING_KEYS: &str = "awaiting-keys";

/// The file [`Profile::lock`] locks (empty; hidden, so an export leaves it out).
const LOCK: &str = ".profile.lock";

/// The file [`Profile::lock_for_move`] locks (empty; hidden, so an export leaves it out).
const MOVE_LOCK: &str = ".move.lock";

/// A lock of the profile's, from [`Profile::lock`] or [`Profile::lock_for_move`]; released
/// when dropped (or when the process ends, however it ends).
#[derive(Debug)]
#[must_use = "the lock is released when this is dropped"]
pub struct ProfileLock {
    /// `None` where the file system has no locks (see [`Profile::lock`]).
    _file: Option<fs::File>,
}

/// A profile directory.
#[derive(Debug, Clone)]
pub struct Profile {
    dir: PathBuf,
}

impl Profile {
    /// The profile in `dir` (which need not exist yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `micromsg --profile DIR ARGS`: a command line for this profile, for hints that the
    /// user copies and pastes (the directory quoted when it needs to be).
    pub fn command(&self, args: &str) -> String {
        let dir = self.dir.display().to_string();
        let plain = !dir.is_empty()
            && dir
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/._-+,:@%".contains(c));
        if plain {
            format!("micromsg --profile {dir} {args}")
        } else {
            format!("micromsg --profile '{}' {args}", dir.replace('\'', "'\\''"))
        }
    }

    /// Path of a file inside the profile.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// True when the profile is registered (has `profile.toml`).
    pub fn exists(&self) -> bool {
        self.path("profile.toml").exists()
    }

    /// Fails with [`ProfileError::Exists`] when the profile is already registered.
    pub fn ensure_unregistered(&self) -> Result<(), ProfileError> {
        if self.exists() {
            Err(ProfileError::Exists(self.dir.clone()))
        } else {
            Ok(())
        }
    }

    /// Reads `profile.toml`.
    pub fn info(&self) -> Result<ProfileInfo, ProfileError> {
        let path = self.path("profile.toml");
        if !path.exists() {
            return Err(ProfileError::Missing(self.dir.clone()));
        }
        let text = read(&path)?;
        toml::from_str(&text).map_err(|e| ProfileError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    /// Reads `secrets.toml`.
    pub fn secrets(&self) -> Result<Secrets, ProfileError> {
        let path = self.path("secrets.toml");
        if !path.exists() {
            return Err(ProfileError::Missing(self.dir.clone()));
        }
        let text = Zeroizing::new(read(&path)?);
        let file: SecretsFile = toml::from_str(&text).map_err(|e| ProfileError::Corrupt {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let parse = |name: &str, hex: &str| {
            Secret32::from_hex(hex).map_err(|e| ProfileError::Corrupt {
                path: path.clone(),
                reason: format!("{name}: {e}"),
            })
        };
        Ok(Secrets {
            client_secret: parse("client_secret", &file.client_secret)?,
            server_secret: parse("server_secret", &file.server_secret)?,
            identity_seed: parse("identity_seed", &file.identity_seed)?,
        })
    }

    /// Writes the secrets (0600). Done before `profile.toml`, which marks the profile complete.
    pub fn write_secrets(&self, secrets: &Secrets) -> Result<(), ProfileError> {
        let file = SecretsFile {
            client_secret: secrets.client_secret.to_hex().to_string(),
            server_secret: secrets.server_secret.to_hex().to_string(),
            identity_seed: secrets.identity_seed.to_hex().to_string(),
        };
        let text = Zeroizing::new(toml::to_string(&file).map_err(|e| ProfileError::Corrupt {
            path: self.path("secrets.toml"),
            reason: e.to_string(),
        })?);
        self.write_atomic("secrets.toml", text.as_bytes(), true)
    }

    /// Waits for, then takes, the profile's exclusive lock (an advisory `flock` on
    /// `.profile.lock`, shared by every process of the profile).
    ///
    /// Held by whatever reads `profile.toml`, decides on what it read and writes it back, and
    /// by whatever switches the profile to another broker or device (`move`, `port`): without
    /// it, a write decided on a profile read before a switch would put the old account back
    /// over the new one. Held for a switch's file writes at most, so the wait is short.
    ///
    /// Fails with [`ProfileError::Missing`] when the directory is gone (it is not created
    /// again). On a file system without locks the profile is used unlocked, as before there
    /// was a lock. Blocking: called on the blocking pool, or where a command does its file work.
    pub fn lock(&self) -> Result<ProfileLock, ProfileError> {
        self.flock(LOCK, true)
    }

    /// Takes the profile's move lock (`.move.lock`) without waiting, for the whole of a
    /// `move` or a port: two at once would register twice, or stage into one directory
    /// together; an `export` holds it too, so that it never reads a profile half switched.
    /// An agent (`listen`, `chat`, a one-shot command's) takes it for a moment as it starts,
    /// so that it does not start under a move either.
    ///
    /// Fails with [`ProfileError::MoveUnderWay`] while another process holds it, and with
    /// [`ProfileError::Missing`] when the directory holds no profile (then nothing is made
    /// there: an empty directory stays empty, for an import). Independent of
    /// [`Profile::lock`], which a move takes for its switch while holding this one.
    pub fn lock_for_move(&self) -> Result<ProfileLock, ProfileError> {
        if !self.path("profile.toml").exists() {
            return Err(ProfileError::Missing(self.dir.clone()));
        }
        self.flock(MOVE_LOCK, false)
    }

    /// Fails as [`Profile::lock_for_move`] does while a move (or an export) holds the move
    /// lock, and holds nothing itself: for what must not start under a move.
    pub fn check_no_move(&self) -> Result<(), ProfileError> {
        self.lock_for_move().map(drop)
    }

    /// An exclusive `flock` on the (hidden, empty) file `name`, waited for or only tried.
    fn flock(&self, name: &str, wait: bool) -> Result<ProfileLock, ProfileError> {
        let path = self.path(name);
        let file = match fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ProfileError::Missing(self.dir.clone()));
            }
            Err(source) => return Err(ProfileError::Io { path, source }),
        };
        let locked = if wait {
            file.lock()
        } else {
            match file.try_lock() {
                Ok(()) => Ok(()),
                Err(fs::TryLockError::WouldBlock) => return Err(ProfileError::MoveUnderWay(path)),
                Err(fs::TryLockError::Error(e)) => Err(e),
            }
        };
        match locked {
            Ok(()) => Ok(ProfileLock { _file: Some(file) }),
            Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
                Ok(ProfileLock { _file: None })
            }
            Err(source) => Err(ProfileError::Io { path, source }),
        }
    }

    /// Writes `profile.toml`.
    pub fn write_info(&self, info: &ProfileInfo) -> Result<(), ProfileError> {
        let text = toml::to_string(info).map_err(|e| ProfileError::Corrupt {
            path: self.path("profile.toml"),
            reason: e.to_string(),
        })?;
        self.write_atomic("profile.toml", text.as_bytes(), false)
    }

    /// Whether this device joined its entity (`device join`) and has not installed the
    /// entity's keys yet (from the old device's link transfer, or `keys restore`). While it
    /// has not, a link transfer it cannot open may be its own, waiting for the transfer key:
    /// `listen` leaves such items in the inbox for `device receive-keys` instead of dropping
    /// them.
    pub fn awaiting_keys(&self) -> bool {
        self.path(AWAITING_KEYS).exists()
    }

    /// Sets or clears [`Profile::awaiting_keys`].
    pub fn set_awaiting_keys(&self, awaiting: bool) -> Result<(), ProfileError> {
        if awaiting {
            return self.write_atomic(AWAITING_KEYS, b"", false);
        }
        match fs::remove_file(self.path(AWAITING_KEYS)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(ProfileError::Io {
                path: self.path(AWAITING_KEYS),
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// Writes any file of the profile atomically: readers see the old contents or the new,
    /// never a mix, and so does a crash.
    ///
    /// Each write goes through a temporary file of its own (`.mm-RANDOM.tmp`, created new):
    /// two processes of one profile (a `listen` and a one-shot command) may write the same
    /// file at once, and with one shared temporary name each truncated and renamed the
    /// other's half-written file.
    pub fn write_atomic(
        &self,
        name: &str,
        contents: &[u8],
        secret: bool,
    ) -> Result<(), ProfileError> {
        create_dir(&self.dir)?;
        let path = self.path(name);
        let tmp = path.with_file_name(temporary_name());
        let io = |source| ProfileError::Io {
            path: path.clone(),
            source,
        };
        let mut options = fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(if secret { 0o600 } else { 0o644 });
        }
        // Removed on failure only once it is this call's own (`create_new` succeeded).
        let mut file = options.open(&tmp).map_err(io)?;
        let written = file
            .write_all(contents)
            .and_then(|()| file.sync_all())
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(io(e));
        }
        // The rename is durable once the directory is: without this a crash could bring the
        // old file back after the caller went on as if the new one were kept.
        if let Some(dir) = path.parent() {
            let _ = fs::File::open(dir).and_then(|dir| dir.sync_all());
        }
        Ok(())
    }
}

impl Drop for SecretsFile {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.client_secret.zeroize();
        self.server_secret.zeroize();
        self.identity_seed.zeroize();
    }
}

/// Temporaries of [`Profile::write_atomic`] older than this are left from a crash: no write
/// takes that long.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(600);

impl Profile {
    /// Removes what [`Profile::write_atomic`] leaves behind when the process dies between
    /// creating its temporary and renaming it (`.mm-RANDOM.tmp`, and `.NAME.tmp` of earlier
    /// versions, in the profile directory and the directories in it): a temporary of a secret
    /// file holds key material that must not outlive the file. Only those older than a write
    /// can take (or dated that far ahead: a clock set back); best effort.
    pub fn sweep_temporaries(&self) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(inner) = fs::read_dir(&path) {
                    inner.flatten().for_each(|e| remove_if_stale(&e));
                }
            } else {
                remove_if_stale(&entry);
            }
        }
    }
}

/// Removes `entry` if it is a temporary of [`Profile::write_atomic`] older than
/// [`STALE_TEMPORARY`].
fn remove_if_stale(entry: &fs::DirEntry) {
    let name = entry.file_name();
    let name = name.to_string_lossy();
    if !(name.starts_with('.') && name.ends_with(".tmp")) {
        return;
    }
    let Ok(meta) = entry.metadata() else {
        return;
    };
    let now = std::time::SystemTime::now();
    let stale = meta.is_file()
        && meta
            .modified()
            .is_ok_and(|at| match now.duration_since(at) {
                Ok(age) => age > STALE_TEMPORARY,
                Err(ahead) => ahead.duration() > STALE_TEMPORARY,
            });
    if stale {
        let _ = fs::remove_file(entry.path());
    }
}

/// `.mm-RANDOM.tmp`: hidden (exports and listings skip it), never another writer's, and short
/// (a file name near the file system's limit still has a temporary).
fn temporary_name() -> String {
    use rand_core::{OsRng, RngCore};
    let mut random = [0u8; 6];
    OsRng.fill_bytes(&mut random);
    format!(".mm-{}.tmp", micromsg_crypto::hex::encode(&random))
}

fn read(path: &Path) -> Result<String, ProfileError> {
    fs::read_to_string(path).map_err(|source| ProfileError::Io {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), ProfileError> {
    let io = |source| ProfileError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::create_dir_all(dir).map_err(io)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lock_of_a_profile_that_is_gone_is_refused_and_makes_nothing() {
        #![allow(clippy::unwrap_used)]
        let root = tempfile::tempdir().unwrap();
        let gone = Profile::new(root.path().join("gone"));
        assert!(matches!(gone.lock(), Err(ProfileError::Missing(_))));
        assert!(!gone.dir().exists(), "the lock made the directory again");
        // A profile that is there: locked, and the lock file is hidden from exports.
        let here = Profile::new(root.path());
        let lock = here.lock().unwrap();
        assert!(here.path(LOCK).exists() && LOCK.starts_with('.'));
        drop(lock);
    }

    #[test]
    fn a_second_move_lock_is_refused_at_once_until_the_first_is_dropped() {
        #![allow(clippy::unwrap_used)]
        let root = tempfile::tempdir().unwrap();
        let profile = Profile::new(root.path());
        // No profile yet: refused, and the directory stays empty (an import wants it so).
        assert!(matches!(
            profile.lock_for_move(),
            Err(ProfileError::Missing(_))
        ));
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 0);
        profile.write_info(&ProfileInfo::for_tests()).unwrap();
        let first = profile.lock_for_move().unwrap();
        // flock conflicts between open files, in one process as between two.
        match profile.lock_for_move() {
            Err(ProfileError::MoveUnderWay(path)) => assert_eq!(path, profile.path(MOVE_LOCK)),
            other => panic!("a second move lock was not refused: {other:?}"),
        }
        // The profile lock is another file: a move's switch takes it under the move lock.
        drop(profile.lock().unwrap());
        drop(first);
        drop(profile.lock_for_move().unwrap());
        assert!(
            MOVE_LOCK.starts_with('.'),
            "an export would carry the move lock"
        );
        let gone = Profile::new(root.path().join("gone"));
        assert!(matches!(
            gone.lock_for_move(),
            Err(ProfileError::Missing(_))
        ));
    }

    #[test]
    fn hints_name_the_profile_quoted_only_when_a_shell_needs_it() {
        assert_eq!(
            Profile::new("alice").command("outbox"),
            "micromsg --profile alice outbox"
        );
        assert_eq!(
            Profile::new("/home/a/.micromsg/work-1").command("contact add 5550001"),
            "micromsg --profile /home/a/.micromsg/work-1 contact add 5550001"
        );
        assert_eq!(
            Profile::new("my profile").command("listen"),
            "micromsg --profile 'my profile' listen"
        );
        assert_eq!(
            Profile::new("it's").command("listen"),
            "micromsg --profile 'it'\\''s' listen"
        );
    }

    /// Two writers of one file at once (a `listen` and a one-shot command): every write
    /// succeeds, the file is always one writer's whole contents, and no temporary is left.
    #[test]
    fn writers_of_one_file_at_once_never_mix_or_fail() {
        #![allow(clippy::unwrap_used)]
        let root = tempfile::tempdir().unwrap();
        let profile = Profile::new(root.path().join("p"));
        let contents = [vec![b'a'; 64 << 10], vec![b'b'; 96 << 10]];
        std::thread::scope(|scope| {
            let (profile, contents) = (&profile, &contents);
            for body in contents {
                scope.spawn(move || {
                    for _ in 0..100 {
                        profile.write_atomic("shared.json", body, false).unwrap();
                        let read = fs::read(profile.path("shared.json")).unwrap();
                        assert!(
                            contents.contains(&read),
                            "a reader saw a mix of {} bytes",
                            read.len()
                        );
                    }
                });
            }
        });
        let left: Vec<_> = fs::read_dir(profile.path(""))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["shared.json"]);
    }

    /// A crash between a temporary's creation and its rename leaves it: the sweep removes
    /// those older than any write, in the profile and the directories in it, and nothing else.
    #[test]
    fn the_sweep_removes_only_stale_temporaries() {
        #![allow(clippy::unwrap_used)]
        let root = tempfile::tempdir().unwrap();
        let profile = Profile::new(root.path().join("p"));
        profile.write_atomic("contacts.json", b"{}", true).unwrap();
        fs::create_dir_all(profile.path("keys")).unwrap();
        let old = std::time::SystemTime::now() - STALE_TEMPORARY * 2;
        let ahead = std::time::SystemTime::now() + STALE_TEMPORARY * 2;
        let files = [
            (".mm-0a1b2c3d4e5f.tmp", Some(old)),
            ("keys/.mm-3d4e5f6a7b8c.tmp", Some(old)),
            ("keys/.mm-6a7b8c9d0e1f.tmp", None),
            (".mm-9d0e1f2a3b4c.tmp", None),
            (".contacts.json.tmp", Some(old)),
            (".outbox.json.tmp", Some(ahead)),
            ("keys/ab.json", Some(old)),
            ("keys/old.tmp", Some(old)),
        ];
        for (name, modified) in files {
            let file = fs::File::create(profile.path(name)).unwrap();
            if let Some(at) = modified {
                file.set_modified(at).unwrap();
            }
        }
        fs::create_dir(profile.path(".mm-dir.tmp")).unwrap();
        profile.sweep_temporaries();
        let exists = |name: &str| profile.path(name).exists();
        assert!(!exists(".mm-0a1b2c3d4e5f.tmp"));
        assert!(!exists("keys/.mm-3d4e5f6a7b8c.tmp"));
        assert!(!exists(".contacts.json.tmp"), "an earlier version's");
        assert!(!exists(".outbox.json.tmp"), "dated ahead: a clock set back");
        assert!(
            exists("keys/.mm-6a7b8c9d0e1f.tmp"),
            "a write in progress stays"
        );
        assert!(exists(".mm-9d0e1f2a3b4c.tmp"), "a write in progress stays");
        assert!(exists(".mm-dir.tmp"), "only files go");
        assert!(exists("keys/ab.json") && exists("keys/old.tmp") && exists("contacts.json"));
    }
}
