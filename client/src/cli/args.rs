//! The command line's arguments: every command and option, with the help text `--help` shows.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The MicroMsg client: register with a broker, add devices, find contacts by number and
/// talk end to end.
///
/// Each device keeps its keys, secrets and history in a profile directory (--profile).
/// Every command that needs the broker logs in first and refuses a broker that cannot prove
/// it knows this device's server secret.
#[derive(Debug, Parser)]
#[command(name = "micromsg", version, about, long_about)]
pub(super) struct Cli {
    /// Profile directory of this device (keys, secrets, local store).
    #[arg(
        long,
        global = true,
        default_value = "./micromsg-profile",
        env = "MICROMSG_PROFILE"
    )]
    pub(super) profile: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub(super) json: bool,
    #[command(subcommand)]
    pub(super) command: Command,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
    /// Register a new entity (number) with a broker and create this profile.
    Register {
        /// The broker's HOST:PORT.
        #[arg(long)]
        broker: String,
        /// CA certificate to trust for the broker (the broker's DATA_DIR/tls/ca.pem).
        #[arg(long)]
        ca: PathBuf,
        /// Registration token, if the broker requires one.
        #[arg(long)]
        token: Option<String>,
    },
    /// Show this profile's number, device and broker.
    Whoami,
    /// Show what the broker does (inbox mode, registration policy, limits), signature checked.
    BrokerInfo,
    /// Manage this entity's devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Stay online: keep the broker link, accept peers, print requests and messages as they
    /// arrive (one JSON object per line with --json). Stop with Ctrl-C. When the broker goes
    /// away (or is not up yet), live sessions go on and it logs in again by itself, with a
    /// backoff up to --reconnect-max.
    Listen {
        /// Who may set up a session: any (not blocked), contacts (only known numbers), ask
        /// (print the request; answer with `contact accept|reject`).
        #[arg(long, value_enum, default_value = "ask")]
        accept: AcceptArg,
        /// Where to listen for peers.
        #[arg(long, default_value = "0.0.0.0:0", value_name = "ADDR")]
        peer_listen: std::net::SocketAddr,
        /// The HOST:PORT peers are told to connect to (default: the listening port at the
        /// address the broker sees for this device; for a contact on another broker, which
        /// gets the address sealed, the local address of the broker connection).
        #[arg(long, value_name = "HOST:PORT")]
        advertise: Option<String>,
        /// Ask every time, also for existing contacts (default: the broker reconnects existing
        /// contacts without asking).
        #[arg(long)]
        ask_existing: bool,
        /// Treat contact requests from members of your groups like any other (--accept
        /// decides); by default they are accepted when the group carries the requester's
        /// identity key and its handshake presents that key (docs/groups.md 3).
        #[arg(long)]
        ask_group_members: bool,
        /// Seconds between heartbeats on a session (it ends after 3 missed).
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        heartbeat: u64,
        /// Seconds `send` waits for a contact to come online before depositing the message
        /// at the broker (0: deposit at once when no session is live).
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        offline_after: u64,
        /// The longest wait, in seconds, between two attempts to reach the broker again (the
        /// wait starts at 1 s and doubles, with jitter).
        #[arg(long, default_value_t = 30, value_name = "SECS",
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        reconnect_max: u64,
        /// Whether peers can connect to this device directly: auto (ask for the broker relay
        /// from the start when the broker sees this device behind a NAT), direct, or relay
        /// (never reachable; always the relay). A failed direct connection falls back to the
        /// relay whatever this says.
        #[arg(long, default_value = "auto", value_name = "auto|direct|relay")]
        reach: crate::relay::Reach,
        /// Milliseconds a direct connection to a contact may take before the relay is used.
        #[arg(long, default_value_t = 3000, value_name = "MS",
              value_parser = clap::value_parser!(u64).range(100..=60_000))]
        direct_timeout_ms: u64,
        /// Days to keep the keys of a session replaced by a newer one, after it was last used
        /// or replaced, for messages sealed with them still on their way (never less than the
        /// broker's message lifetime); then they are deleted from the profile, so it no longer
        /// opens old messages recorded on the way.
        #[arg(long, default_value_t = 90, value_name = "DAYS",
              value_parser = clap::value_parser!(u64).range(1..=36_500))]
        keep_replaced_keys_days: u64,
    },
    /// A full-screen chat: contacts and groups on the left, the conversation on the right, an
    /// input line below, the broker's state at the bottom. It runs the device's agent, like
    /// `listen`, or attaches to the `listen` already running for the profile (leaving the
    /// screen then keeps that `listen` running). Press ? inside for the keys; Ctrl-C or /quit
    /// leaves (queued messages stay in the outbox). Colours follow NO_COLOR.
    Chat {
        /// Who may set up a session (as for `listen`); contact requests are shown as a prompt
        /// with ask.
        #[arg(long, value_enum, default_value = "ask")]
        accept: AcceptArg,
        /// A command run (by sh -c) for a message in a conversation that is not in view, with
        /// MICROMSG_FROM set to the sender's number; for example a desktop notification.
        #[arg(long, value_name = "COMMAND")]
        notify: Option<String>,
        /// Whether peers can connect to this device directly (as for `listen`).
        #[arg(long, default_value = "auto", value_name = "auto|direct|relay")]
        reach: crate::relay::Reach,
        /// Days to keep the keys of a replaced session (as for `listen`).
        #[arg(long, default_value_t = 90, value_name = "DAYS",
              value_parser = clap::value_parser!(u64).range(1..=36_500))]
        keep_replaced_keys_days: u64,
    },
    /// Contacts: add, list, block, unblock, answer requests.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Send a message to a contact (through the running `listen`, or on its own). It says
    /// which of three things happened: delivered live (a session is up), deposited at the
    /// broker (sealed with this device's last session with the contact), or queued on this
    /// device (the broker cannot take it now; it goes out by itself later, in order, once).
    Send {
        /// The contact's number.
        number: String,
        /// The message; `-` reads it from standard input.
        text: String,
        /// For a contact this device has never had a session with: seconds to wait for it to
        /// connect (when no `listen` runs; a running `listen` uses its own --offline-after).
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        wait: u64,
    },
    /// Messages queued on this device because the broker could not take them yet: list them,
    /// or cancel one (`outbox cancel ID`).
    Outbox {
        #[command(subcommand)]
        action: Option<OutboxCommand>,
    },
    /// Fetch offline messages now (through the running `listen`, or on its own) and print
    /// what arrived; they are stored in the history, then removed from the broker.
    Inbox,
    /// Show the running `listen`: the broker link, the outbox and each live session with its
    /// path (`direct`, or `relay` through the brokers).
    Status,
    /// Key backup at the broker, encrypted with a recovery secret only you hold.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Show the conversation with a contact from the local history.
    History {
        /// The contact's number.
        number: String,
    },
    /// Show the safety number for a contact, to compare out of band (in person, by phone).
    SafetyNumber {
        /// The contact's number.
        number: String,
    },
    /// Group chats, kept by the members' clients (the broker knows nothing of them). GROUP
    /// is a group id or an unambiguous prefix of one (see `group list`).
    #[command(subcommand)]
    Group(GroupCommand),
    /// Write everything this device holds into one file, to take it to another machine:
    /// identity and device secrets, contacts with their names and pinned keys, session keys,
    /// groups, history, the inbox state, the outbox and settings. The file is encrypted under a
    /// passphrase (Argon2id, ChaCha20-Poly1305), asked twice without echo, or read from
    /// MICROMSG_PASSPHRASE. Stop a running `listen` or `chat` first. The file IS this device:
    /// once it is imported elsewhere, do not use this profile again.
    Export {
        /// The file to write (an existing file is never overwritten).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Argon2id memory in MiB: what each guess of the passphrase costs an attacker.
        #[arg(long, default_value_t = 64, value_name = "MIB",
              value_parser = clap::value_parser!(u32).range(8..=4096))]
        kdf_memory_mib: u32,
        /// Argon2id passes.
        #[arg(long, default_value_t = 3, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..=100))]
        kdf_iterations: u32,
    },
    /// Restore a file made by `export` into --profile, a new or empty directory: the same
    /// device, with all it held. The passphrase is asked without echo, or read from
    /// MICROMSG_PASSPHRASE. A wrong passphrase, a damaged file or a newer format each get their
    /// own error, and nothing is written. Afterwards, do not use the old copy any more.
    Import {
        /// The export file.
        file: PathBuf,
        /// The most Argon2id memory, in MiB, a file may ask for (a hostile file could ask for
        /// more than the machine has).
        #[arg(long, default_value_t = 1024, value_name = "MIB",
              value_parser = clap::value_parser!(u32).range(1..=4_194_303))]
        max_kdf_memory_mib: u32,
        /// The most Argon2id passes a file may ask for.
        #[arg(long, default_value_t = 10, value_name = "N",
              value_parser = clap::value_parser!(u32).range(1..))]
        max_kdf_iterations: u32,
    },
    /// Move this entity to another broker, with a new number there, keeping the identity key
    /// (so contacts keep the same pinned key and safety number). In order: fetches what waits
    /// in the old inbox; registers at the new broker; tells every contact (live, or through
    /// its inbox at the old broker) with a notice signed by the identity key, and every group
    /// with a signed op; then switches this profile to the new broker. Contacts follow by
    /// themselves; the broker-level contact pair is set up again automatically the next time
    /// both are online. Stop a running `listen` or `chat` first. Interrupted, run it again:
    /// it picks up the account it registered, or finishes switching the profile.
    ///
    /// With --keep-number (inside one network), the number itself moves instead: see that
    /// flag.
    Move {
        /// The new broker's HOST:PORT.
        #[arg(long)]
        broker: String,
        /// CA certificate to trust for the new broker (its DATA_DIR/tls/ca.pem).
        #[arg(long)]
        ca: PathBuf,
        /// Registration token, if the new broker requires one.
        #[arg(long)]
        token: Option<String>,
        /// Once the profile is switched, delete the account at the OLD broker (as `account
        /// delete` would): its devices, inbox and contacts there go, and its number is never
        /// given out again. Contacts that were offline and have not yet fetched the notice
        /// from their own inboxes still get it.
        #[arg(long)]
        delete_old: bool,
        /// Leave the signed notice at the OLD broker for DAYS days (default 30; the old broker
        /// may allow fewer, its `contacts.forward_max_days`): whoever asks for the old number
        /// meanwhile learns the new one, verified by contacts against the key they pinned.
        /// Numbers you blocked learn nothing. It stays after --delete-old until it expires.
        #[arg(long, value_name = "DAYS", num_args = 0..=1, default_missing_value = "30",
              value_parser = clap::value_parser!(u64).range(1..=3650))]
        forward: Option<u64>,
        /// Keep your number instead (brokers of one network only): the current broker lets
        /// the number go (PORT-OUT) and the new one takes it over (PORT-IN) with your identity
        /// key's signature; every broker of the network routes the number there, and what
        /// waited at the current broker follows. Contacts need no notice. Devices other than
        /// this one stay behind (their logins are refused with PORTED): add them again with
        /// `device add` at the new broker. Not with --token, --forward or --delete-old (the
        /// number, not an account, moves).
        #[arg(long, conflicts_with_all = ["token", "forward", "delete_old"])]
        keep_number: bool,
    },
    /// This entity's account at its broker.
    #[command(subcommand)]
    Account(AccountCommand),
}

#[derive(Debug, Subcommand)]
pub(super) enum AccountCommand {
    /// Delete this entity at its broker, for good: every device, the inbox, the contacts,
    /// blocks, settings and key backup there. The number is never given out again; every
    /// device of the entity is logged out and can no longer log in. This profile keeps its
    /// local history, but cannot talk through that broker any more. Asks you to type the
    /// number to confirm (on a terminal), or pass --yes in scripts.
    Delete {
        /// Do not ask; delete at once.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum GroupCommand {
    /// Create a group with these members (they must be contacts already).
    Create {
        /// The group's name.
        name: String,
        /// The other members' numbers.
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Add a member (a contact).
    Add {
        /// The group.
        group: String,
        /// The new member's number.
        number: String,
    },
    /// Remove a member.
    Remove {
        /// The group.
        group: String,
        /// The member's number.
        number: String,
    },
    /// Leave a group.
    Leave {
        /// The group.
        group: String,
    },
    /// Rename a group.
    Rename {
        /// The group.
        group: String,
        /// The new name.
        name: String,
    },
    /// Send a message to every member.
    Send {
        /// The group.
        group: String,
        /// The message.
        text: String,
    },
    /// List the groups this device knows.
    List,
    /// Show a group's messages from the local history.
    History {
        /// The group.
        group: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum AcceptArg {
    Any,
    Contacts,
    Ask,
}

/// `micromsg outbox …`
#[derive(Debug, Subcommand)]
pub(super) enum OutboxCommand {
    /// Take a queued message out of the outbox before it goes (it is never sent).
    Cancel {
        /// Its id, as `outbox` lists it (the first 8 digits are enough).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum ContactCommand {
    /// Ask a number to become a contact; returns once the end-to-end session is up. A
    /// number that does not answer may not exist, may be offline, or may have declined: the
    /// broker never says which. Ctrl-C stops waiting.
    Add {
        /// The number.
        number: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 60, value_name = "SECS",
              value_parser = clap::value_parser!(u64).range(1..=3600))]
        wait: u64,
    },
    /// List contacts: name, number, state (blocked, rejected, identity changed) and the
    /// pinned identity key.
    List,
    /// Give a contact a name, shown with its number wherever the number is shown.
    Name {
        /// The contact's number.
        number: String,
        /// The name (1 to 64 characters); leave it out with --clear.
        #[arg(required_unless_present = "clear")]
        name: Option<String>,
        /// Remove the name.
        #[arg(long, conflicts_with = "name")]
        clear: bool,
    },
    /// Remove a contact from this device: its name, pinned key and every session key held
    /// for it go (a message from it still on its way is not opened here), a live session
    /// ends, queued messages to it are dropped; the history stays.
    Remove {
        /// The contact's number.
        number: String,
    },
    /// Block a number (its requests are dropped silently).
    Block {
        /// The number.
        number: String,
    },
    /// Unblock a number.
    Unblock {
        /// The number.
        number: String,
    },
    /// Accept a pending contact request (listen --accept ask).
    Accept {
        /// The request id from the notice.
        request: String,
    },
    /// Reject a pending contact request; the caller is blocked.
    Reject {
        /// The request id from the notice.
        request: String,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum KeysCommand {
    /// Encrypt this device's keys (identity, contacts with pins, session keys) with the
    /// recovery secret and store them at the broker. The first backup creates the recovery
    /// secret and prints it once: write it down.
    Backup {
        /// Use this recovery secret (and keep it for later backups) instead of the saved or a
        /// new one.
        #[arg(long, value_name = "SECRET")]
        recovery: Option<String>,
    },
    /// On a newly joined device: read the backup from the broker and install its keys, so
    /// this device reads the entity's messages and keeps its contacts.
    Restore {
        /// The recovery secret printed by `keys backup`.
        #[arg(long, value_name = "SECRET")]
        recovery: String,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum DeviceCommand {
    /// Create a one-time registration secret (valid 10 minutes) for a new device, then wait
    /// for it to join and send it this device's keys (sealed with a transfer key that is
    /// printed here and never sent to the broker).
    Add {
        /// A label for the new device.
        #[arg(long)]
        name: Option<String>,
        /// Only print the secret; send no keys (use `keys backup` / `keys restore`).
        #[arg(long)]
        no_transfer: bool,
        /// Seconds to wait for the new device to join.
        #[arg(long, default_value_t = 600, value_name = "SECS")]
        wait: u64,
    },
    /// Join an existing entity as a new device, using a secret from `device add`.
    Join {
        /// The broker's HOST:PORT.
        #[arg(long)]
        broker: String,
        /// CA certificate to trust for the broker.
        #[arg(long)]
        ca: PathBuf,
        /// The entity's number.
        #[arg(long)]
        number: String,
        /// The registration secret printed by `device add`.
        #[arg(long)]
        secret: String,
        /// The transfer key printed by `device add`: receive the old device's keys.
        #[arg(long, value_name = "KEY")]
        transfer_key: Option<String>,
        /// Seconds to wait for the old device's keys.
        #[arg(long, default_value_t = 120, value_name = "SECS")]
        wait: u64,
    },
    /// Receive the entity's keys from the old device on a device that joined without
    /// them: after `device join` without --transfer-key, or when its wait ran out. The
    /// old device's `device add` sends them once this device has joined; until they are
    /// installed, `listen` leaves them in the inbox for this command.
    ReceiveKeys {
        /// The transfer key printed by `device add`.
        #[arg(long, value_name = "KEY")]
        transfer_key: String,
        /// Seconds to wait for the old device's keys.
        #[arg(long, default_value_t = 120, value_name = "SECS")]
        wait: u64,
    },
    /// List the entity's active devices.
    List,
    /// Revoke another device of this entity.
    Revoke {
        /// The device id (see `device list`).
        id: u32,
    },
}
