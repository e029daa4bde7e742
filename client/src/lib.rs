//! The MicroMsg client library.
//!
//! Layout:
//! - [`profile`]: the profile directory of one device (public info, CA, secrets at 0600).
//! - [`tls`]: TLS 1.3 client configuration trusting the profile's CA.
//! - [`link`]: the broker link: requests, answers, events, the mutual LOGIN.
//! - [`account`]: register, join as a device, log in, verify BROKER-INFO.
//! - [`agent`]: one device online: broker link, peer listener, sessions, control socket.
//! - [`p2p`]: the client-to-client session over TCP: handshake, DATA frames, heartbeats.
//! - [`store`]: the local store: contacts and pinned identities, history, session keys, the
//!   inbox state (ids already taken, envelopes waiting for their keys).
//! - [`keys`]: key sync between the entity's devices: backup (`MMB1`), link transfer
//!   (`MML1`), session sync (`MMK1`).
//! - [`devices`]: key backup and restore, and the key transfer when a device is linked.
//! - [`inbox`]: offline delivery: fetch, open, store, then acknowledge.
//! - [`portable`]: `export` and `import`: the whole profile in one passphrase-encrypted file
//!   (`MMDX`), to take the device to another machine.
//! - [`porting`]: moving to another broker of the network, keeping the number.
//! - [`terminal`]: text from others, made safe to write to a terminal.
#![forbid(unsafe_code)]

pub mod account;
pub mod agent;
pub mod chat;
pub mod cli;
pub mod devices;
pub mod error_text;
pub mod groups;
pub mod inbox;
pub mod keys;
pub mod link;
pub mod move_account;
pub mod moving;
pub mod outbox;
pub mod p2p;
pub mod portable;
pub mod porting;
pub mod profile;
pub mod relay;
pub mod store;
pub mod terminal;
pub mod tls;
pub mod when;
