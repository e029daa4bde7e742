//! The device export file (`MMDX`, protocol.md 13.5), sans-IO: a profile directory's files in
//! one container, sealed with ChaCha20-Poly1305 under a key stretched from a passphrase by
//! Argon2id. No file, clock or terminal here: the caller reads and writes the bytes, passes
//! the time and the randomness, and prompts for the passphrase.
//!
//! ```text
//! header (80 bytes, the AEAD's associated data)
//!   "MMDX" | u16be version | u8 kdf id | u32be m KiB | u32be t | u32be p | salt(16)
//!   | u8 aead id | nonce(12) | key check(32)
//! ciphertext of the container, then its 16-byte tag
//! SHA-256 of everything before it (32 bytes)
//! ```
//!
//! The trailing digest tells a damaged file (a flipped byte, a truncated copy) from a wrong
//! passphrase, which the key check tells from a file forged with a valid digest: the three
//! are distinct errors. The KDF parameters a file asks for are bounded ([`KdfLimits`]) before
//! any memory is spent on them, so a hostile file cannot exhaust the importer's memory.

use std::collections::BTreeSet;
use std::fmt;

use argon2::{Algorithm, Argon2, Params, Version};
use micromsg_crypto::aead::{self, NONCE_LEN, TAG_LEN};
use micromsg_crypto::{Secret32, kdf};
use rand_core::{OsRng, RngCore};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// The file's magic (`"MMDX"`: MicroMsg device export).
pub const MAGIC: &[u8; 4] = b"MMDX";
/// The format version this code writes and the newest it reads.
pub const VERSION: u16 = 1;
/// KDF id 1: Argon2id, version 0x13 (RFC 9106).
pub const KDF_ARGON2ID: u8 = 1;
/// AEAD id 1: ChaCha20-Poly1305 (RFC 8439).
pub const AEAD_CHACHA20_POLY1305: u8 = 1;
/// Argon2id salt length.
pub const SALT_LEN: usize = 16;
/// Key check length.
pub const CHECK_LEN: usize = 32;
/// Header length: everything before the ciphertext.
pub const HEADER_LEN: usize = 4 + 2 + 1 + 4 + 4 + 4 + SALT_LEN + 1 + NONCE_LEN + CHECK_LEN;
/// Length of the trailing SHA-256 digest.
pub const DIGEST_LEN: usize = 32;
/// The shortest well-formed file: a header, an empty ciphertext's tag, the digest.
pub const MIN_FILE_LEN: usize = HEADER_LEN + TAG_LEN + DIGEST_LEN;
/// The longest path of an entry, in bytes.
pub const MAX_PATH_LEN: usize = 1024;

const KEY_LABEL: &[u8] = b"micromsg/device-export/key/v1";
const CHECK_LABEL: &[u8] = b"micromsg/device-export/check/v1";
/// The container's fixed part: created (8) and the entry count (4).
const CONTAINER_HEAD: usize = 8 + 4;
/// An entry's fixed part: path length (2), mode (4), contents length (8).
const ENTRY_HEAD: usize = 2 + 4 + 8;

/// Why an export file could not be made or opened. Each way a file can fail to open is its
/// own variant, so the user is told which it was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The file does not start with the magic (or is shorter than any export file).
    #[error("not a MicroMsg export file (it does not start with \"MMDX\")")]
    NotAnExport,
    /// The file was written by a newer MicroMsg, in a format version this one cannot read.
    #[error(
        "this export file has format version {found}, and this micromsg reads version \
         {supported} only: import it with a newer micromsg"
    )]
    NewerVersion {
        /// The file's version.
        found: u16,
        /// The newest version this code reads.
        supported: u16,
    },
    /// The file is damaged (its digest does not match, or its contents are malformed).
    #[error("the export file is damaged: {0}")]
    Damaged(String),
    /// The passphrase does not open the file.
    #[error("wrong passphrase: it does not open this export file")]
    WrongPassphrase,
    /// The file asks for more KDF work than the importer allows.
    #[error(
        "the export file asks for Argon2id with {asked} {what}, above this import's limit of \
         {limit} (raise it with {flag} if you trust the file)"
    )]
    KdfTooCostly {
        /// What is too large.
        what: &'static str,
        /// What the file asks for.
        asked: u32,
        /// The limit.
        limit: u32,
        /// The option that raises the limit.
        flag: &'static str,
    },
    /// An empty passphrase.
    #[error("the passphrase is empty")]
    EmptyPassphrase,
    /// KDF parameters Argon2id refuses.
    #[error("Argon2id parameters: {0}")]
    Params(String),
    /// A file of the profile that the container cannot carry (a path it refuses).
    #[error("{0}")]
    Entry(String),
}

/// Argon2id's cost parameters, stored in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB (`m`).
    pub memory_kib: u32,
    /// Passes (`t`).
    pub iterations: u32,
    /// Lanes (`p`).
    pub parallelism: u32,
}

impl Default for KdfParams {
    /// 64 MiB, t = 3, p = 1: as the key backup (13.4).
    fn default() -> Self {
        Self {
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
        }
    }
}

/// The most KDF work an import spends on a file before it knows the passphrase is right.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfLimits {
    /// The most memory, in KiB (default 1 GiB).
    pub max_memory_kib: u32,
    /// The most passes (default 10).
    pub max_iterations: u32,
}

impl Default for KdfLimits {
    fn default() -> Self {
        Self {
            max_memory_kib: 1024 * 1024,
            max_iterations: 10,
        }
    }
}

/// One file of the profile directory.
#[derive(Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path inside the profile, `/`-separated (`history/5551234.jsonl`).
    pub path: String,
    /// Its permission bits (`0o600` for secrets).
    pub mode: u32,
    /// Its bytes. Zeroized on drop: they include the secrets and the history.
    pub contents: Zeroizing<Vec<u8>>,
}

impl fmt::Debug for Entry {
    // The path and size only: the contents are secrets and messages.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("path", &self.path)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("len", &self.contents.len())
            .finish()
    }
}

/// What an export file holds: the profile's files at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// When it was made (Unix seconds; information only).
    pub created: u64,
    /// The files, in ascending byte order of their paths, each once.
    pub entries: Vec<Entry>,
}

/// The header of an export file, as read before any key is derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format version.
    pub version: u16,
    /// The KDF parameters.
    pub kdf: KdfParams,
    /// The Argon2id salt.
    pub salt: [u8; SALT_LEN],
    /// The AEAD nonce.
    pub nonce: [u8; NONCE_LEN],
    /// The key check.
    pub check: [u8; CHECK_LEN],
}

/// Checks a path an entry may have: relative, `/`-separated, no empty, `.` or `..` component,
/// no component starting with `.` (temporary files), no NUL or backslash, at most
/// [`MAX_PATH_LEN`] bytes and 255 per component. Such a path stays inside the directory it
/// is restored into.
pub fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err(format!(
            "a path of {} bytes (1 to {MAX_PATH_LEN})",
            path.len()
        ));
    }
    for part in path.split('/') {
        if part.is_empty()
            || part.starts_with('.')
            || part.len() > 255
            || part.contains(['\0', '\\'])
        {
            return Err(format!("the path {path:?} is not a plain relative path"));
        }
    }
    Ok(())
}

/// The container's bytes (protocol.md 13.5). Entries must be in ascending order of their
/// paths, each once, with valid paths and modes.
pub fn encode_container(snapshot: &Snapshot) -> Result<Zeroizing<Vec<u8>>, ExportError> {
    check_entries(&snapshot.entries).map_err(ExportError::Entry)?;
    let count = u32::try_from(snapshot.entries.len())
        .map_err(|_| ExportError::Entry("more than 2^32 - 1 files".into()))?;
    let size = CONTAINER_HEAD
        + snapshot
            .entries
            .iter()
            .map(|e| ENTRY_HEAD + e.path.len() + e.contents.len())
            .sum::<usize>();
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    out.extend_from_slice(&snapshot.created.to_be_bytes());
    out.extend_from_slice(&count.to_be_bytes());
    for e in &snapshot.entries {
        // check_entries bounded the path to MAX_PATH_LEN, which fits a u16.
        let path_len = u16::try_from(e.path.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&path_len.to_be_bytes());
        out.extend_from_slice(e.path.as_bytes());
        out.extend_from_slice(&e.mode.to_be_bytes());
        out.extend_from_slice(&(e.contents.len() as u64).to_be_bytes());
        out.extend_from_slice(&e.contents);
    }
    Ok(out)
}

/// Reads a container, refusing anything [`encode_container`] would not write.
pub fn decode_container(bytes: &[u8]) -> Result<Snapshot, ExportError> {
    let damaged = |why: &str| ExportError::Damaged(why.to_owned());
    let mut r = Reader { bytes, at: 0 };
    let created = r.u64().ok_or_else(|| damaged("no container header"))?;
    let count = r.u32().ok_or_else(|| damaged("no entry count"))?;
    // Every entry takes at least ENTRY_HEAD + 1 bytes: a count beyond that is a lie, and is
    // refused before anything is allocated for it.
    if (count as usize) > bytes.len() / (ENTRY_HEAD + 1) {
        return Err(damaged("more entries than the container has bytes for"));
    }
    let mut entries = Vec::with_capacity(count as usize);
    for i in 0..count {
        let truncated = || ExportError::Damaged(format!("entry {i} is cut short"));
        let path_len = r.u16().ok_or_else(truncated)?;
        let path = r.take(path_len as usize).ok_or_else(truncated)?;
        let path = std::str::from_utf8(path)
            .map_err(|_| ExportError::Damaged(format!("entry {i}: a path that is not UTF-8")))?;
        let mode = r.u32().ok_or_else(truncated)?;
        let len = r.u64().ok_or_else(truncated)?;
        let len = usize::try_from(len).map_err(|_| truncated())?;
        let contents = r.take(len).ok_or_else(truncated)?;
        entries.push(Entry {
            path: path.to_owned(),
            mode,
            contents: Zeroizing::new(contents.to_vec()),
        });
    }
    if r.at != bytes.len() {
        return Err(damaged("bytes after the last entry"));
    }
    check_entries(&entries).map_err(ExportError::Damaged)?;
    Ok(Snapshot { created, entries })
}

/// Paths valid and strictly ascending (so each once), no path both a file and a directory,
/// modes only permission bits, and the two files without which there is no profile.
fn check_entries(entries: &[Entry]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for (i, e) in entries.iter().enumerate() {
        check_path(&e.path)?;
        if e.mode > 0o777 {
            return Err(format!(
                "{}: mode {:o} is not permission bits",
                e.path, e.mode
            ));
        }
        if i > 0 && entries[i - 1].path.as_bytes() >= e.path.as_bytes() {
            return Err(format!("{}: out of order or repeated", e.path));
        }
        seen.insert(e.path.as_str());
    }
    for path in &seen {
        let dir = format!("{path}/");
        if seen
            .range(dir.as_str()..)
            .next()
            .is_some_and(|p| p.starts_with(&dir))
        {
            return Err(format!("{path} is both a file and a directory"));
        }
    }
    for required in ["profile.toml", "secrets.toml"] {
        if !seen.contains(required) {
            return Err(format!("no {required}: not a profile"));
        }
    }
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let out = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(out)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_be_bytes)
    }
}

/// The AEAD key and the key check, from the passphrase: `k = Argon2id(passphrase, salt, m, t,
/// p, 32)`, then `HKDF-Expand(HKDF-Extract(empty, k), label, 32)` with the key and the check
/// labels.
fn derive(
    passphrase: &[u8],
    salt: &[u8; SALT_LEN],
    kdf_params: KdfParams,
) -> Result<(Secret32, Secret32), ExportError> {
    if passphrase.is_empty() {
        return Err(ExportError::EmptyPassphrase);
    }
    let params = Params::new(
        kdf_params.memory_kib,
        kdf_params.iterations,
        kdf_params.parallelism,
        Some(32),
    )
    .map_err(|e| ExportError::Params(e.to_string()))?;
    let mut stretched = Zeroizing::new([0u8; 32]);
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into(passphrase, salt, &mut stretched[..])
        .map_err(|e| ExportError::Params(e.to_string()))?;
    let prk = kdf::extract(&[], &stretched[..]);
    Ok((
        kdf::expand_secret(&prk, KEY_LABEL),
        kdf::expand_secret(&prk, CHECK_LABEL),
    ))
}

/// Seals `snapshot` into an export file with the given salt and nonce (tests and the
/// protocol's vector); [`seal`] draws them at random.
pub fn seal_with(
    snapshot: &Snapshot,
    passphrase: &[u8],
    kdf_params: KdfParams,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>, ExportError> {
    let container = encode_container(snapshot)?;
    let (key, check) = derive(passphrase, &salt, kdf_params)?;
    let mut file = Vec::with_capacity(HEADER_LEN + container.len() + TAG_LEN + DIGEST_LEN);
    file.extend_from_slice(MAGIC);
    file.extend_from_slice(&VERSION.to_be_bytes());
    file.push(KDF_ARGON2ID);
    file.extend_from_slice(&kdf_params.memory_kib.to_be_bytes());
    file.extend_from_slice(&kdf_params.iterations.to_be_bytes());
    file.extend_from_slice(&kdf_params.parallelism.to_be_bytes());
    file.extend_from_slice(&salt);
    file.push(AEAD_CHACHA20_POLY1305);
    file.extend_from_slice(&nonce);
    file.extend_from_slice(check.expose());
    let header = file.clone();
    aead::seal_into(key.expose(), &nonce, &header, &container, &mut file)
        .map_err(|e| ExportError::Entry(format!("sealing: {e}")))?;
    let digest = kdf::sha256(&[&file]);
    file.extend_from_slice(&digest);
    Ok(file)
}

/// Seals `snapshot` with a fresh random salt and nonce (the key is new for every file, as the
/// salt is).
pub fn seal(
    snapshot: &Snapshot,
    passphrase: &[u8],
    kdf_params: KdfParams,
) -> Result<Vec<u8>, ExportError> {
    let mut salt = [0u8; SALT_LEN];
    let mut nonce = [0u8; NONCE_LEN];
    OsRng.fill_bytes(&mut salt);
    OsRng.fill_bytes(&mut nonce);
    seal_with(snapshot, passphrase, kdf_params, salt, nonce)
}

/// Reads the header, checking, in this order: the magic, the version, the digest over the
/// whole file, the algorithm ids. No key is derived.
pub fn read_header(file: &[u8]) -> Result<Header, ExportError> {
    if file.len() < 6 || &file[..4] != MAGIC {
        return Err(ExportError::NotAnExport);
    }
    let mut r = Reader { bytes: file, at: 4 };
    let version = r.u16().ok_or(ExportError::NotAnExport)?;
    if version > VERSION {
        return Err(ExportError::NewerVersion {
            found: version,
            supported: VERSION,
        });
    }
    if version == 0 {
        return Err(ExportError::Damaged("format version 0".into()));
    }
    if file.len() < MIN_FILE_LEN {
        return Err(ExportError::Damaged(format!(
            "{} bytes, shorter than any export file ({MIN_FILE_LEN})",
            file.len()
        )));
    }
    let (body, digest) = file.split_at(file.len() - DIGEST_LEN);
    if kdf::sha256(&[body]).ct_eq(digest).unwrap_u8() != 1 {
        return Err(ExportError::Damaged(
            "its SHA-256 digest does not match (a changed or cut-short copy)".into(),
        ));
    }
    let bad = |why: &str| ExportError::Damaged(why.to_owned());
    let kdf_id = r.array::<1>().ok_or_else(|| bad("short header"))?[0];
    if kdf_id != KDF_ARGON2ID {
        return Err(ExportError::Damaged(format!("unknown KDF id {kdf_id}")));
    }
    let kdf = KdfParams {
        memory_kib: r.u32().ok_or_else(|| bad("short header"))?,
        iterations: r.u32().ok_or_else(|| bad("short header"))?,
        parallelism: r.u32().ok_or_else(|| bad("short header"))?,
    };
    let salt = r.array().ok_or_else(|| bad("short header"))?;
    let aead_id = r.array::<1>().ok_or_else(|| bad("short header"))?[0];
    if aead_id != AEAD_CHACHA20_POLY1305 {
        return Err(ExportError::Damaged(format!("unknown AEAD id {aead_id}")));
    }
    let nonce = r.array().ok_or_else(|| bad("short header"))?;
    let check = r.array().ok_or_else(|| bad("short header"))?;
    Ok(Header {
        version,
        kdf,
        salt,
        nonce,
        check,
    })
}

/// Opens an export file entirely in memory: header, limits, key, key check, AEAD, container.
pub fn open(file: &[u8], passphrase: &[u8], limits: KdfLimits) -> Result<Snapshot, ExportError> {
    let header = read_header(file)?;
    if header.kdf.memory_kib > limits.max_memory_kib {
        return Err(ExportError::KdfTooCostly {
            what: "KiB of memory",
            asked: header.kdf.memory_kib,
            limit: limits.max_memory_kib,
            flag: "--max-kdf-memory-mib",
        });
    }
    if header.kdf.iterations > limits.max_iterations {
        return Err(ExportError::KdfTooCostly {
            what: "passes",
            asked: header.kdf.iterations,
            limit: limits.max_iterations,
            flag: "--max-kdf-iterations",
        });
    }
    // Parameters Argon2id itself refuses cannot come from a genuine file.
    let (key, check) = derive(passphrase, &header.salt, header.kdf).map_err(|e| match e {
        ExportError::Params(why) => ExportError::Damaged(format!("Argon2id parameters: {why}")),
        other => other,
    })?;
    if check.expose().ct_eq(&header.check).unwrap_u8() != 1 {
        return Err(ExportError::WrongPassphrase);
    }
    let sealed = &file[HEADER_LEN..file.len() - DIGEST_LEN];
    let mut plain = Zeroizing::new(Vec::with_capacity(sealed.len()));
    aead::open_into(
        key.expose(),
        &header.nonce,
        &file[..HEADER_LEN],
        sealed,
        &mut plain,
    )
    .map_err(|_| {
        ExportError::Damaged(
            "the passphrase is right but the contents do not authenticate (altered on purpose, \
             with a digest made to match)"
                .into(),
        )
    })?;
    decode_container(&plain)
}

#[cfg(test)]
#[path = "format_tests.rs"]
mod tests;
