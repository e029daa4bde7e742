//! `export` and `import` on the command line: the passphrase (from `MICROMSG_PASSPHRASE`, or
//! asked on the terminal without echo) and what is printed. The work is [`crate::portable`].

use std::path::Path;

use anyhow::Context;
use serde_json::json;
use zeroize::Zeroizing;

use crate::portable::{self, KdfLimits, KdfParams, PortableError, Summary, files, format};
use crate::profile::Profile;

/// The environment variable scripts set instead of typing the passphrase.
pub(super) const PASSPHRASE_ENV: &str = "MICROMSG_PASSPHRASE";
/// The shortest passphrase `export` takes, in characters. Argon2id makes each guess cost
/// 64 MiB and a fraction of a second; it cannot save a passphrase that is guessed in a few
/// thousand tries.
const MIN_PASSPHRASE_CHARS: usize = 8;

/// `micromsg export --out FILE`.
pub(super) fn export(
    profile: &Profile,
    out: &Path,
    params: KdfParams,
    json: bool,
) -> anyhow::Result<()> {
    let info = profile.info()?;
    // Refusals that need no passphrase come before the prompt.
    if files::agent_running(profile) {
        return Err(PortableError::AgentRunning.into());
    }
    profile.check_no_move()?;
    if out.exists() {
        return Err(PortableError::OutExists(out.to_owned()).into());
    }
    if files::inside_profile(profile, out) {
        return Err(PortableError::OutInsideProfile(out.to_owned()).into());
    }
    let passphrase = passphrase(true)?;
    if passphrase.chars().count() < MIN_PASSPHRASE_CHARS {
        anyhow::bail!(
            "the passphrase is shorter than {MIN_PASSPHRASE_CHARS} characters; choose a longer \
             one (a few words are best); nothing was written"
        );
    }
    if !json {
        errln!(
            "encrypting the profile (Argon2id, {} MiB, {} passes)…",
            params.memory_kib / 1024,
            params.iterations
        );
    }
    let (bytes, summary) = portable::export(profile, &passphrase, params, now_unix())?;
    files::write_export(out, &bytes)?;
    if json {
        outln!(
            "{}",
            with_summary(
                json!({"file": out.display().to_string(), "number": info.number,
                       "device": info.device}),
                &summary
            )
        );
    } else {
        outln!(
            "exported number {} (device {}) to {}: {}",
            info.number,
            info.device,
            out.display(),
            describe(&summary)
        );
        errln!(
            "the file IS this device, with its secrets: keep it and its passphrase apart. Once \
             it is imported elsewhere (`micromsg --profile NEW_DIR import {}`), do not use this \
             profile again: both copies would log in as the same device.",
            out.display()
        );
    }
    Ok(())
}

/// `micromsg import FILE`.
pub(super) fn import(
    profile: &Profile,
    file: &Path,
    limits: KdfLimits,
    json: bool,
) -> anyhow::Result<()> {
    files::check_target(profile.dir())?;
    let bytes =
        Zeroizing::new(std::fs::read(file).with_context(|| format!("reading {}", file.display()))?);
    // A file that is not an export, is damaged or is of a newer version is told before the
    // passphrase is asked.
    format::read_header(&bytes).map_err(nothing_written)?;
    let passphrase = passphrase(false)?;
    if !json {
        errln!("decrypting {}…", file.display());
    }
    let summary =
        portable::import(&bytes, &passphrase, limits, profile).map_err(nothing_written)?;
    let info = profile.info()?;
    if json {
        outln!(
            "{}",
            with_summary(
                json!({"profile": profile.dir().display().to_string(), "number": info.number,
                       "device": info.device}),
                &summary
            )
        );
    } else {
        outln!(
            "imported number {} (device {}) into {}: {}",
            info.number,
            info.device,
            profile.dir().display(),
            describe(&summary)
        );
        errln!(
            "this profile is the same device as the exported one: do not use the old copy any \
             more (both would log in as device {} of {}). Start this one with `{}`.",
            info.device,
            info.number,
            profile.command("listen")
        );
    }
    Ok(())
}

/// A refused import's error, saying that the target was left as it was.
fn nothing_written(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("{e}; nothing was written")
}

/// The passphrase: `MICROMSG_PASSPHRASE` when set, else asked on the terminal without echo
/// (twice when `confirm`).
fn passphrase(confirm: bool) -> anyhow::Result<Zeroizing<String>> {
    if let Some(value) = std::env::var_os(PASSPHRASE_ENV) {
        let value = value
            .into_string()
            .map_err(|_| anyhow::anyhow!("{PASSPHRASE_ENV} is not valid UTF-8"))?;
        return Ok(Zeroizing::new(value));
    }
    let ask = |prompt: &str| {
        rpassword::prompt_password(prompt)
            .map(Zeroizing::new)
            .map_err(|e| {
                anyhow::anyhow!(
                    "no passphrase: run in a terminal to be asked, or set {PASSPHRASE_ENV} \
                     ({e})"
                )
            })
    };
    let first = ask("passphrase for the export file: ")?;
    if confirm {
        let again = ask("the same passphrase again: ")?;
        if *first != *again {
            anyhow::bail!("the two passphrases differ; nothing was written");
        }
    }
    Ok(first)
}

fn with_summary(mut value: serde_json::Value, s: &Summary) -> serde_json::Value {
    if let Some(object) = value.as_object_mut() {
        for (key, n) in [
            ("files", s.files as u64),
            ("bytes", s.bytes),
            ("contacts", s.contacts as u64),
            ("conversations", s.conversations as u64),
            ("groups", s.groups as u64),
            ("outbox", s.outbox as u64),
        ] {
            object.insert(key.to_owned(), n.into());
        }
    }
    value
}

fn describe(s: &Summary) -> String {
    format!(
        "{} contact(s), {} conversation(s), {} group(s), {} queued message(s) ({} files, {} bytes)",
        s.contacts, s.conversations, s.groups, s.outbox, s.files, s.bytes
    )
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
