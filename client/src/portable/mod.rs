//! Taking a device to another machine: `micromsg export` writes everything the profile
//! directory holds (identity and device secrets, contacts with names and pinned keys, session
//! keys, groups, history, the inbox state, the outbox, settings) into one passphrase-encrypted
//! file; `micromsg import` restores it into a new profile directory (protocol.md 13.5).
//!
//! - [`format`](mod@format): the file, sans-IO (Argon2id, ChaCha20-Poly1305, the container).
//! - [`files`](mod@files): the profile directory at the edge: snapshot, atomic restore, the
//!   export file.
//!
//! The imported profile IS the exported device (the same client and server secrets, the same
//! session counters): the old copy must not run again, or the two would log in as one device
//! and could send with the same (key, counter) pairs. The command line says so on both ends.
//! An export refuses to run while an agent (`listen`, `chat`) runs for the profile, because
//! the agent writes the store at any moment and the file must be one consistent moment.

pub mod files;
pub mod format;

use std::path::PathBuf;

use zeroize::Zeroizing;

pub use files::Summary;
pub use format::{ExportError, KdfLimits, KdfParams};

use crate::profile::{Profile, ProfileError};
use crate::store::StoreError;

/// Why an export or an import did not happen. Nothing was written in any case.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PortableError {
    /// The file could not be made or opened (wrong passphrase, damaged, newer version, …).
    #[error(transparent)]
    Format(#[from] ExportError),
    /// The profile to export could not be read.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// The store of the profile could not be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The file opened, but the profile in it does not read.
    #[error("the export file holds a profile that cannot be read: {0}")]
    BadProfile(ProfileError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An entry of the profile directory that an export cannot carry.
    #[error("{path} cannot be exported: {why}")]
    Unsupported {
        /// The entry.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The import target already holds a profile.
    #[error(
        "{0} already holds a profile; import into a new directory (an import never merges \
         into or replaces a profile)"
    )]
    Exists(PathBuf),
    /// The import target holds other files.
    #[error("{0} is not empty; import into a new or empty directory")]
    NotEmpty(PathBuf),
    /// The export target exists.
    #[error("{0} exists already; choose another --out (an export never overwrites a file)")]
    OutExists(PathBuf),
    /// The export file would land inside the profile directory it is made from.
    #[error(
        "{0} is inside the profile directory: a later export would carry this one; choose an \
         --out outside it"
    )]
    OutInsideProfile(PathBuf),
    /// An agent runs for the profile being exported.
    #[error(
        "a `listen` or `chat` is running for this profile and may write to it at any moment: \
         stop it (Ctrl-C, or /quit), then export again, so the file is one consistent snapshot"
    )]
    AgentRunning,
}

/// Reads the profile and seals it: the export file's bytes and what they hold. Refuses while
/// an agent runs for the profile.
pub fn export(
    profile: &Profile,
    passphrase: &Zeroizing<String>,
    params: KdfParams,
    now_unix: u64,
) -> Result<(Vec<u8>, Summary), PortableError> {
    if files::agent_running(profile) {
        return Err(PortableError::AgentRunning);
    }
    // Not in the middle of a move, and no move starts while the files are read.
    let _moving = profile.lock_for_move()?;
    let snapshot = files::collect(profile, now_unix)?;
    let summary = files::summarise(profile, &snapshot)?;
    let bytes = format::seal(&snapshot, passphrase.as_bytes(), params)?;
    Ok((bytes, summary))
}

/// Opens an export file in memory and restores it into `target` (see [`files::restore`]).
pub fn import(
    file: &[u8],
    passphrase: &Zeroizing<String>,
    limits: KdfLimits,
    target: &Profile,
) -> Result<Summary, PortableError> {
    let snapshot = format::open(file, passphrase.as_bytes(), limits)?;
    files::restore(&snapshot, target.dir())
}
