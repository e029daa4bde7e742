//! The export and import at the file system's edge: read a profile directory into a
//! [`Snapshot`], write a snapshot into a new profile directory (a temporary directory beside
//! the target, checked with the real profile and store readers, then renamed into place), and
//! write the export file atomically. The format itself is [`super::format`].

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use rand_core::{OsRng, RngCore};
use zeroize::Zeroizing;

use super::PortableError;
use super::format::{Entry, Snapshot, check_path};
use crate::agent::control_path;
use crate::outbox::Outbox;
use crate::profile::Profile;
use crate::store::Store;

/// What a profile holds, counted for the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Summary {
    /// Files in the snapshot.
    pub files: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Contacts.
    pub contacts: usize,
    /// Conversations with a history.
    pub conversations: usize,
    /// Groups.
    pub groups: usize,
    /// Messages waiting in the outbox.
    pub outbox: usize,
}

/// True when an agent (`listen` or `chat`) answers on the profile's control socket.
pub fn agent_running(profile: &Profile) -> bool {
    std::os::unix::net::UnixStream::connect(control_path(profile)).is_ok()
}

/// True when `out` would land inside the profile directory: a later export would then carry
/// this one (and an import would restore a copy of the device inside itself). Compares the
/// canonical directories, so `./DIR/x` and `DIR/../DIR/x` are caught alike.
pub fn inside_profile(profile: &Profile, out: &Path) -> bool {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    match (fs::canonicalize(profile.dir()), fs::canonicalize(parent)) {
        (Ok(dir), Ok(parent)) => parent.starts_with(dir),
        _ => false,
    }
}

/// Reads every file of the profile directory, recursively, in path order. Left out: names
/// starting with `.` (a write's temporary file) and sockets (the control socket of an agent);
/// any other kind of entry (a symbolic link, a device) is refused rather than left out.
pub fn collect(profile: &Profile, now_unix: u64) -> Result<Snapshot, PortableError> {
    if !profile.exists() {
        // The profile's own error says how to make one.
        profile.info()?;
    }
    let mut entries = Vec::new();
    walk(profile.dir(), "", &mut entries)?;
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Snapshot {
        created: now_unix,
        entries,
    })
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<Entry>) -> Result<(), PortableError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| PortableError::Io { path, source }
    };
    for item in fs::read_dir(dir).map_err(io(dir))? {
        let item = item.map_err(io(dir))?;
        let path = item.path();
        let Ok(name) = item.file_name().into_string() else {
            return Err(PortableError::Unsupported {
                path,
                why: "its name is not UTF-8".into(),
            });
        };
        if name.starts_with('.') {
            continue;
        }
        let relative = format!("{prefix}{name}");
        let kind = item.file_type().map_err(io(&path))?;
        if kind.is_dir() {
            walk(&path, &format!("{relative}/"), out)?;
        } else if kind.is_file() {
            check_path(&relative).map_err(|why| PortableError::Unsupported {
                path: path.clone(),
                why,
            })?;
            let contents = Zeroizing::new(fs::read(&path).map_err(io(&path))?);
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                item.metadata().map_err(io(&path))?.permissions().mode() & 0o777
            };
            out.push(Entry {
                path: relative,
                mode,
                contents,
            });
        } else if is_socket(&kind) {
            continue;
        } else {
            return Err(PortableError::Unsupported {
                path,
                why: "not a regular file or directory (a symbolic link?)".into(),
            });
        }
    }
    Ok(())
}

fn is_socket(kind: &fs::FileType) -> bool {
    use std::os::unix::fs::FileTypeExt;
    kind.is_socket()
}

/// Counts what a profile directory holds, with the store's own readers (so a file they cannot
/// read is an error here too).
pub fn summarise(profile: &Profile, snapshot: &Snapshot) -> Result<Summary, PortableError> {
    let store = Store::new(profile);
    Ok(Summary {
        files: snapshot.entries.len(),
        bytes: snapshot
            .entries
            .iter()
            .map(|e| e.contents.len() as u64)
            .sum(),
        contacts: store.contacts()?.len(),
        conversations: snapshot
            .entries
            .iter()
            .filter(|e| {
                e.path
                    .strip_prefix("history/")
                    .is_some_and(|n| !n.contains('/') && n.ends_with(".jsonl"))
            })
            .count(),
        groups: store.group_ids()?.len(),
        outbox: Outbox::new(profile).load()?.len(),
    })
}

/// Writes the export file: to a temporary file beside `out` (0600), synced, then renamed, so
/// a crash leaves no half-written export. An existing `out` is never overwritten.
pub fn write_export(out: &Path, bytes: &[u8]) -> Result<(), PortableError> {
    if out.exists() {
        return Err(PortableError::OutExists(out.to_owned()));
    }
    let tmp = beside(out, "tmp");
    let io = |source| PortableError::Io {
        path: out.to_owned(),
        source,
    };
    let written = (|| {
        let mut file = create_file(&tmp, 0o600)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, out)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(io)
}

/// Writes `snapshot` as the profile in `target`, which must not exist or be an empty
/// directory. Everything goes into a temporary directory beside `target` first; the profile
/// and store are read back from it with their own readers; only then is it renamed into
/// place. On any error the temporary directory is removed and `target` is as it was.
pub fn restore(snapshot: &Snapshot, target: &Path) -> Result<Summary, PortableError> {
    check_target(target)?;
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&parent).map_err(|source| PortableError::Io {
        path: parent.clone(),
        source,
    })?;
    let tmp = beside(target, "import");
    let result = write_tree(snapshot, &tmp).and_then(|()| {
        let summary = verify(&tmp, snapshot)?;
        fs::rename(&tmp, target).map_err(|source| PortableError::Io {
            path: target.to_owned(),
            source,
        })?;
        // The rename is durable once the parent directory is.
        if let Ok(dir) = fs::File::open(&parent) {
            let _ = dir.sync_all();
        }
        Ok(summary)
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// The target holds no profile and no other file: a new directory, or an empty one.
pub fn check_target(target: &Path) -> Result<(), PortableError> {
    if Profile::new(target).exists() {
        return Err(PortableError::Exists(target.to_owned()));
    }
    match fs::read_dir(target) {
        Ok(mut items) => {
            if items.next().is_some() {
                return Err(PortableError::NotEmpty(target.to_owned()));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PortableError::Io {
            path: target.to_owned(),
            source,
        }),
    }
}

fn write_tree(snapshot: &Snapshot, root: &Path) -> Result<(), PortableError> {
    private_dir(root)?;
    for e in &snapshot.entries {
        // The format checked every path: relative, no `..`, no `.` names.
        let path = root.join(&e.path);
        if let Some(dir) = path.parent() {
            let mut at = dir;
            let mut missing = Vec::new();
            while at != root && !at.exists() {
                missing.push(at.to_owned());
                at = at.parent().unwrap_or(root);
            }
            for dir in missing.iter().rev() {
                private_dir(dir)?;
            }
        }
        let io = |source| PortableError::Io {
            path: path.clone(),
            source,
        };
        let mut file = create_file(&path, e.mode).map_err(io)?;
        file.write_all(&e.contents).map_err(io)?;
        // The mode exactly as exported, whatever the umask took away at creation.
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(e.mode))
                .map_err(io)?;
        }
        file.sync_all().map_err(io)?;
    }
    Ok(())
}

/// Reads the restored profile back with the client's own readers: a file they refuse stops
/// the import before anything is in place.
fn verify(dir: &Path, snapshot: &Snapshot) -> Result<Summary, PortableError> {
    let profile = Profile::new(dir);
    profile.info().map_err(PortableError::BadProfile)?;
    profile.secrets().map_err(PortableError::BadProfile)?;
    summarise(&profile, snapshot)
}

fn private_dir(dir: &Path) -> Result<(), PortableError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let io = |source| PortableError::Io {
        path: dir.to_owned(),
        source,
    };
    fs::DirBuilder::new().mode(0o700).create(dir).map_err(io)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io)
}

fn create_file(path: &Path, mode: u32) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

/// `DIR/.NAME.WHAT-RANDOM` beside `path`: hidden, and never the name of anything else.
fn beside(path: &Path, what: &str) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "micromsg".into(), |n| n.to_string_lossy().into_owned());
    let mut random = [0u8; 6];
    OsRng.fill_bytes(&mut random);
    path.with_file_name(format!(
        ".{name}.{what}-{}",
        micromsg_crypto::hex::encode(&random)
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn an_export_inside_the_profile_is_caught() {
        let root = tempfile::tempdir().unwrap();
        let profile = profile_dir(root.path());
        assert!(inside_profile(&profile, &profile.dir().join("x.mmdx")));
        assert!(inside_profile(
            &profile,
            &profile.dir().join("history").join("..").join("x.mmdx")
        ));
        assert!(!inside_profile(&profile, &root.path().join("x.mmdx")));
        assert!(!inside_profile(&profile, Path::new("no-such-dir/x.mmdx")));
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A profile directory as the client leaves it, with a control socket and a write's
    /// temporary file that are not data.
    fn profile_dir(root: &Path) -> Profile {
        let profile = Profile::new(root.join("alice"));
        profile
            .write_info(&crate::profile::ProfileInfo {
                broker: "127.0.0.1:7400".into(),
                tls_name: "127.0.0.1".into(),
                number: "5550001".into(),
                device: 1,
                nonce_step: 6,
                broker_identity: None,
            })
            .unwrap();
        let secret = |b| micromsg_crypto::Secret32::from_bytes([b; 32]);
        profile
            .write_secrets(&crate::profile::Secrets {
                client_secret: secret(1),
                server_secret: secret(2),
                identity_seed: secret(3),
            })
            .unwrap();
        let store = Store::new(&profile);
        store.add_contact("5550002", 1).unwrap();
        store.set_name("5550002", Some("Bob"), 2).unwrap();
        fs::create_dir_all(profile.path("history")).unwrap();
        fs::write(profile.path("history/5550002.jsonl"), "{}\n").unwrap();
        fs::write(profile.path(".contacts.json.tmp"), "half").unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(profile.path("control.sock")).unwrap();
        profile
    }

    #[test]
    fn a_restored_profile_has_the_same_files_and_modes_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let profile = profile_dir(root.path());
        let snapshot = collect(&profile, 5).unwrap();
        let paths: Vec<&str> = snapshot.entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "contacts.json",
                "history/5550002.jsonl",
                "profile.toml",
                "secrets.toml"
            ]
        );
        let target = root.path().join("new");
        let summary = restore(&snapshot, &target).unwrap();
        assert_eq!((summary.contacts, summary.conversations), (1, 1));
        for e in &snapshot.entries {
            let path = target.join(&e.path);
            assert_eq!(fs::read(&path).unwrap(), *e.contents, "{}", e.path);
            assert_eq!(mode(&path), mode(&profile.path(&e.path)), "{}", e.path);
        }
        assert_eq!(mode(&target.join("secrets.toml")), 0o600);
        assert_eq!(mode(&target), 0o700);
        assert_eq!(
            Store::new(&Profile::new(&target))
                .contact("5550002")
                .unwrap()
                .unwrap()
                .name
                .as_deref(),
            Some("Bob")
        );
        // Only the target is new beside the source: no temporary directory is left.
        let mut names: Vec<_> = fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["alice", "new"]);
    }

    #[test]
    fn an_import_into_a_profile_or_a_busy_directory_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let profile = profile_dir(root.path());
        let snapshot = collect(&profile, 5).unwrap();
        assert!(matches!(
            restore(&snapshot, profile.dir()),
            Err(PortableError::Exists(_))
        ));
        let busy = root.path().join("busy");
        fs::create_dir(&busy).unwrap();
        fs::write(busy.join("notes.txt"), "mine").unwrap();
        assert!(matches!(
            restore(&snapshot, &busy),
            Err(PortableError::NotEmpty(_))
        ));
        assert_eq!(fs::read_to_string(busy.join("notes.txt")).unwrap(), "mine");
        // An empty directory is fine.
        let empty = root.path().join("empty");
        fs::create_dir(&empty).unwrap();
        restore(&snapshot, &empty).unwrap();
        assert!(Profile::new(&empty).exists());
    }

    #[test]
    fn a_profile_the_client_cannot_read_is_not_put_in_place() {
        let root = tempfile::tempdir().unwrap();
        let profile = profile_dir(root.path());
        let mut snapshot = collect(&profile, 5).unwrap();
        let secrets = snapshot
            .entries
            .iter_mut()
            .find(|e| e.path == "secrets.toml")
            .unwrap();
        secrets.contents = Zeroizing::new(b"client_secret = 1".to_vec());
        let target = root.path().join("new");
        assert!(matches!(
            restore(&snapshot, &target),
            Err(PortableError::BadProfile(_))
        ));
        assert!(!target.exists());
        assert_eq!(fs::read_dir(root.path()).unwrap().count(), 1, "only alice");
    }

    #[test]
    fn a_symbolic_link_is_refused_rather_than_left_out() {
        let root = tempfile::tempdir().unwrap();
        let profile = profile_dir(root.path());
        std::os::unix::fs::symlink("/etc/hostname", profile.path("link")).unwrap();
        assert!(matches!(
            collect(&profile, 5),
            Err(PortableError::Unsupported { .. })
        ));
    }

    #[test]
    fn the_export_file_is_private_and_never_overwritten() {
        let root = tempfile::tempdir().unwrap();
        let out = root.path().join("alice.mmdx");
        write_export(&out, b"first").unwrap();
        assert_eq!(mode(&out), 0o600);
        assert!(matches!(
            write_export(&out, b"second"),
            Err(PortableError::OutExists(_))
        ));
        assert_eq!(fs::read(&out).unwrap(), b"first");
    }
}
