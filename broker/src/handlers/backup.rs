//! The entity's encrypted key backup: BACKUP-PUT (versioned, one writer wins) and BACKUP-GET.

use micromsg_store::{Store, StoreError};
use micromsg_wire::message::request::BackupPutArgs;
use micromsg_wire::message::response::BackupGetData;
use micromsg_wire::{Blob, ErrorCode, ResponseData};

use super::{Handled, Login, Refusal, check_size};
use crate::broker::Broker;
use crate::clock::Now;

/// What the backup handlers use.
#[derive(Debug, Clone, Copy)]
pub struct Cx<'a> {
    /// The backups.
    pub store: &'a Store,
    /// `inbox.max_message_bytes`, which bounds a backup too.
    pub max_bytes: u32,
}

impl<'a> Cx<'a> {
    /// The backup handlers' part of the broker.
    pub fn of(broker: &'a Broker) -> Self {
        Self {
            store: &broker.store,
            max_bytes: broker.config.inbox.max_message_bytes,
        }
    }
}

/// BACKUP-PUT: replaces the backup if VERSION is the stored version + 1.
pub async fn put(cx: Cx<'_>, login: &Login, args: BackupPutArgs, now: Now) -> Handled {
    check_size(cx.max_bytes, "BLOB", args.blob.len())?;
    let version = i64::try_from(args.version)
        .map_err(|_| Refusal::new(ErrorCode::BadArgs, "VERSION too large"))?;
    match cx
        .store
        .put_backup(
            login.number(),
            version - 1,
            version,
            args.blob.as_bytes(),
            now.unix_i64(),
        )
        .await
    {
        Ok(()) => Ok(ResponseData::BackupPut),
        Err(StoreError::Conflict | StoreError::InvalidArgument(_)) => Err(Refusal::new(
            ErrorCode::Conflict,
            "VERSION must be the stored version + 1 (another device updated the backup?)",
        )),
        Err(e) => Err(e.into()),
    }
}

/// BACKUP-GET: the backup and its version (0 and no blob when there is none).
pub async fn get(cx: Cx<'_>, login: &Login) -> Handled {
    let backup = cx.store.get_backup(login.number()).await?;
    Ok(ResponseData::BackupGet(match backup {
        Some(b) => BackupGetData {
            blob: Some(Blob::new(b.blob)),
            version: b.version.max(0) as u64,
        },
        None => BackupGetData {
            blob: None,
            version: 0,
        },
    }))
}
