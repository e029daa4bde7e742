//! Records passed to and returned by the [`Store`](super::Store).

use std::fmt;

use zeroize::Zeroize;

pub use micromsg_wire::{DeviceId, Number};

/// A client-chosen 128-bit message id (the idempotency key of a deposit).
pub type MessageId = [u8; 16];

/// The secrets and name of a device being created. Secrets are wiped on drop and redacted in
/// `Debug`.
pub struct NewDevice {
    /// The secret the client proves at LOGIN (chosen by the broker).
    pub client_secret: [u8; 32],
    /// The secret the broker proves back (chosen by the client).
    pub server_secret: [u8; 32],
    /// A human label; when `None` at redeem time, the registration secret's name is used.
    pub name: Option<String>,
}

impl fmt::Debug for NewDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewDevice")
            .field("client_secret", &"<redacted>")
            .field("server_secret", &"<redacted>")
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for NewDevice {
    fn drop(&mut self) {
        self.client_secret.zeroize();
        self.server_secret.zeroize();
    }
}

/// A stored device, with its secrets (for LOGIN). Secrets are wiped on drop and redacted in
/// `Debug`.
pub struct DeviceRecord {
    /// The entity number.
    pub number: Number,
    /// The device id.
    pub device_id: DeviceId,
    /// Human label.
    pub name: Option<String>,
    /// The secret the client proves at LOGIN.
    pub client_secret: [u8; 32],
    /// The secret the broker proves back.
    pub server_secret: [u8; 32],
    /// When the device was registered.
    pub created_at: i64,
    /// Last successful login or activity, if any.
    pub last_seen: Option<i64>,
    /// When the device was revoked; a revoked device cannot log in.
    pub revoked_at: Option<i64>,
}

impl DeviceRecord {
    /// Whether the device has been revoked.
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

impl fmt::Debug for DeviceRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceRecord")
            .field("number", &self.number)
            .field("device_id", &self.device_id)
            .field("name", &self.name)
            .field("client_secret", &"<redacted>")
            .field("server_secret", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("last_seen", &self.last_seen)
            .field("revoked_at", &self.revoked_at)
            .finish()
    }
}

impl Drop for DeviceRecord {
    fn drop(&mut self) {
        self.client_secret.zeroize();
        self.server_secret.zeroize();
    }
}

/// A device as listed to its entity (no secrets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device id.
    pub device_id: DeviceId,
    /// Human label.
    pub name: Option<String>,
    /// When the device was registered.
    pub created_at: i64,
    /// Last activity, if any.
    pub last_seen: Option<i64>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<i64>,
}

/// What a DEPOSIT from `sender` to `target` needs to know, read in one query
/// ([`super::Store::deposit_routes`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DepositRoute {
    /// `sender` has a contact pair with `target`.
    pub contact: bool,
    /// `target` has blocked `sender`.
    pub blocked: bool,
    /// `target`'s active devices on this broker, ascending.
    pub devices: Vec<DeviceId>,
}

/// The relationship `owner` keeps with `peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRecord {
    /// The owning entity.
    pub owner: Number,
    /// The contact's number (possibly at another broker).
    pub peer: Number,
    /// Hand the owner's address to this contact without asking.
    pub auto_existing: bool,
    /// The owner agrees to the broker holding offline messages between the two.
    pub brokered: bool,
    /// When the contact was added.
    pub created_at: i64,
}

/// One offline message to deposit.
///
/// Entity mode: one item per target device (`recipient_device = Some(id)`), all with the same
/// `id`. Number mode: one item with `recipient_device = None`, shared by all devices.
#[derive(Clone, PartialEq, Eq)]
pub struct NewInboxItem {
    /// Client-chosen message id: the idempotency key (per recipient inbox).
    pub id: MessageId,
    /// The recipient entity.
    pub recipient_number: Number,
    /// The recipient device, or `None` for the number's shared inbox.
    pub recipient_device: Option<DeviceId>,
    /// The sending entity (possibly at another broker).
    pub sender_number: Number,
    /// The sending device.
    pub sender_device: DeviceId,
    /// Deposit time.
    pub created_at: i64,
    /// After this time the item is neither returned nor kept.
    pub expires_at: i64,
    /// Opaque ciphertext.
    pub body: Vec<u8>,
}

impl fmt::Debug for NewInboxItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewInboxItem")
            .field("id", &Hex(&self.id))
            .field("recipient_number", &self.recipient_number)
            .field("recipient_device", &self.recipient_device)
            .field("sender_number", &self.sender_number)
            .field("sender_device", &self.sender_device)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// How a deposit ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DepositOutcome {
    /// Newly stored.
    Stored,
    /// The same message (id, sender and body) was already stored: nothing changed (an
    /// idempotent retry). It expires when the stored one does.
    AlreadyStored {
        /// The stored item's expiry (Unix seconds).
        expires_at: i64,
    },
    /// Acknowledged and not kept (the recipient blocked the sender), after a durable commit
    /// like any other deposit's ([`crate::DepositBatcher::discard`]).
    Discarded,
}

/// A stored offline message, as fetched.
#[derive(Clone, PartialEq, Eq)]
pub struct InboxItem {
    /// Storage order: strictly increasing in insertion order (the paging key).
    pub seq: i64,
    /// The message id.
    pub id: MessageId,
    /// The device it was addressed to, or `None` for a number-mode item.
    pub recipient_device: Option<DeviceId>,
    /// The sending entity.
    pub sender_number: Number,
    /// The sending device.
    pub sender_device: DeviceId,
    /// Deposit time.
    pub created_at: i64,
    /// Expiry time.
    pub expires_at: i64,
    /// Opaque ciphertext.
    pub body: Vec<u8>,
}

impl fmt::Debug for InboxItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboxItem")
            .field("seq", &self.seq)
            .field("id", &Hex(&self.id))
            .field("recipient_device", &self.recipient_device)
            .field("sender_number", &self.sender_number)
            .field("sender_device", &self.sender_device)
            .field("created_at", &self.created_at)
            .field("expires_at", &self.expires_at)
            .field("body_len", &self.body.len())
            .finish()
    }
}

/// A client-encrypted key backup.
#[derive(Clone, PartialEq, Eq)]
pub struct Backup {
    /// Version, starting at 1 and raised by one per put.
    pub version: i64,
    /// Opaque blob.
    pub blob: Vec<u8>,
    /// When it was last written.
    pub updated_at: i64,
}

impl fmt::Debug for Backup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backup")
            .field("version", &self.version)
            .field("blob_len", &self.blob.len())
            .field("updated_at", &self.updated_at)
            .finish()
    }
}

/// A pending cross-broker delivery.
#[derive(Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Idempotency key, sent to the peer so a retry is not applied twice.
    pub idempotency_key: [u8; 16],
    /// The peer broker's id.
    pub peer_broker: String,
    /// Opaque payload (an encoded federation request).
    pub payload: Vec<u8>,
    /// Failed attempts so far.
    pub attempts: i64,
    /// Earliest time of the next attempt.
    pub next_attempt_at: i64,
    /// When it was enqueued.
    pub created_at: i64,
}

impl fmt::Debug for OutboxItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboxItem")
            .field("idempotency_key", &Hex(&self.idempotency_key))
            .field("peer_broker", &self.peer_broker)
            .field("payload_len", &self.payload.len())
            .field("attempts", &self.attempts)
            .field("next_attempt_at", &self.next_attempt_at)
            .field("created_at", &self.created_at)
            .finish()
    }
}

/// What one [`Store::sweep`](super::Store::sweep) removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Expired inbox items (their number-mode acks go with them).
    pub inbox_items: u64,
    /// Used or expired registration secrets older than a day.
    pub registration_secrets: u64,
    /// Expired broker-held client pubkeys.
    pub peer_pubkeys: u64,
    /// Kept idempotency keys of expired deliveries from peer brokers.
    pub received_deliveries: u64,
    /// Expired PORT-OUT tokens.
    pub port_tokens: u64,
    /// Expired forwards (FORWARD), with the block lists kept for them.
    pub forwards: u64,
    /// `true` when a bound was hit and more may be left: call again.
    pub more: bool,
}

/// Lowercase hex in `Debug` (for ids, which are not secret).
struct Hex<'a>(&'a [u8]);

impl fmt::Debug for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}
