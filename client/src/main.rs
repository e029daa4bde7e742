//! `micromsg`: the MicroMsg command-line client. Thin: parse arguments, call the library,
//! print the result (for people, or one JSON object with `--json`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use micromsg_client::account::{self, AccountError};
use micromsg_client::agent::{self, AcceptPolicy, AgentConfig, Command as AgentCommand, Notice};
use micromsg_client::link::LinkError;
use micromsg_client::p2p::SessionConfig;
use micromsg_client::profile::Profile;
use micromsg_client::store::{Direction, Store, safety_number};
use micromsg_crypto::identity::IdentityKey;
use micromsg_wire::message::request::{AddDeviceArgs, DeviceRevokeArgs};
use micromsg_wire::{DeviceId, DeviceName, Request, ResponseData};
use serde_json::json;
use tokio::sync::mpsc;

/// The MicroMsg client: register with a broker, add devices, find contacts by number and
/// talk end to end.
///
/// Each device keeps its keys, secrets and history in a profile directory (--profile).
/// Every command that needs the broker logs in first and refuses a broker that cannot prove
/// it knows this device's server secret.
#[derive(Debug, Parser)]
#[command(name = "micromsg", version, about, long_about)]
struct Cli {
    /// Profile directory of this device (keys, secrets, local store).
    #[arg(
        long,
        global = true,
        default_value = "./micromsg-profile",
        env = "MICROMSG_PROFILE"
    )]
    profile: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// arrive (one JSON object per line with --json). Stop with Ctrl-C.
    Listen {
        /// Who may set up a session: any (not blocked), contacts (only known numbers), ask
        /// (print the request; answer with `contact accept|reject`).
        #[arg(long, value_enum, default_value = "ask")]
        accept: AcceptArg,
        /// Where to listen for peers.
        #[arg(long, default_value = "0.0.0.0:0", value_name = "ADDR")]
        peer_listen: std::net::SocketAddr,
        /// The HOST:PORT peers are told to connect to (default: the address the broker sees
        /// for this device, with the listening port).
        #[arg(long, value_name = "HOST:PORT")]
        advertise: Option<String>,
        /// Ask every time, also for existing contacts (default: the broker reconnects existing
        /// contacts without asking).
        #[arg(long)]
        ask_existing: bool,
        /// Seconds between heartbeats on a session (it ends after 3 missed).
        #[arg(long, default_value_t = 10, value_name = "SECS")]
        heartbeat: u64,
    },
    /// Contacts: add, list, block, unblock, answer requests.
    #[command(subcommand)]
    Contact(ContactCommand),
    /// Send a message to a contact (through the running `listen`, or on its own).
    Send {
        /// The contact's number.
        number: String,
        /// The message.
        text: String,
    },
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
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AcceptArg {
    Any,
    Contacts,
    Ask,
}

#[derive(Debug, Subcommand)]
enum ContactCommand {
    /// Ask a number to become a contact; returns once the end-to-end session is up.
    Add {
        /// The number.
        number: String,
    },
    /// List contacts with their pinned identity keys.
    List,
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
enum DeviceCommand {
    /// Create a one-time registration secret (valid 10 minutes) for a new device.
    Add {
        /// A label for the new device.
        #[arg(long)]
        name: Option<String>,
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
    },
    /// List the entity's active devices.
    List,
    /// Revoke another device of this entity.
    Revoke {
        /// The device id (see `device list`).
        id: u32,
    },
}

/// Like `println!`, but a closed stdout (a reader such as `head` went away) is not a panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                let code = e
                    .downcast_ref::<AccountError>()
                    .and_then(|a| match a {
                        AccountError::Link(l) => l.code(),
                        _ => None,
                    })
                    .or_else(|| e.downcast_ref::<LinkError>().and_then(LinkError::code));
                outln!(
                    "{}",
                    json!({"error": format!("{e:#}"), "code": code.map(|c| c.as_str())})
                );
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let profile = Profile::new(&cli.profile);
    let json = cli.json;
    match cli.command {
        Command::Register { broker, ca, token } => {
            let session = account::register(&profile, &broker, &ca, token).await?;
            let i = &session.info;
            if json {
                outln!(
                    "{}",
                    json!({"number": i.number, "device": i.device, "broker": i.broker})
                );
            } else {
                outln!("{}", i.number);
                eprintln!(
                    "registered: number {} (device {}) at {}; profile in {}",
                    i.number,
                    i.device,
                    i.broker,
                    profile.dir().display()
                );
            }
        }
        Command::Whoami => {
            let i = profile.info()?;
            if json {
                outln!(
                    "{}",
                    json!({"number": i.number, "device": i.device, "broker": i.broker,
                           "broker_identity": i.broker_identity})
                );
            } else {
                outln!("number:  {}", i.number);
                outln!("device:  {}", i.device);
                outln!("broker:  {}", i.broker);
                if let Some(id) = &i.broker_identity {
                    outln!("broker identity key: {id}");
                }
            }
        }
        Command::BrokerInfo => {
            let data = account::broker_info(&profile).await?;
            let i = &data.info;
            let prefixes: Vec<&str> = i.prefixes.iter().map(|p| p.as_str()).collect();
            if json {
                outln!(
                    "{}",
                    json!({
                        "protocol": i.protocol,
                        "broker_id": i.broker_id,
                        "inbox_mode": i.inbox_mode.as_str(),
                        "registration": i.registration.as_str(),
                        "nonce_step": i.nonce_step,
                        "nonce_skew": i.nonce_skew,
                        "nonce_algorithm": i.nonce_algorithm.as_str(),
                        "key_storage": i.key_storage.iter().map(|k| k.as_str()).collect::<Vec<_>>(),
                        "network": i.network.name,
                        "peers": i.network.peers.iter().map(|p| p.id.clone()).collect::<Vec<_>>(),
                        "prefixes": prefixes,
                        "limits": {
                            "max_frame": i.limits.max_frame,
                            "max_devices": i.limits.max_devices,
                            "inbox_quota": i.limits.inbox_quota,
                            "message_max": i.limits.message_max,
                            "message_ttl": i.limits.message_ttl,
                        },
                        "time": i.time,
                        "identity_key": data.identity_key.to_hex(),
                        "signature_verified": true,
                    })
                );
            } else {
                outln!("broker:         {} (protocol {})", i.broker_id, i.protocol);
                outln!("inbox mode:     {}", i.inbox_mode.as_str());
                outln!("registration:   {}", i.registration.as_str());
                outln!(
                    "login nonce:    {} every {} s, ±{} step(s)",
                    i.nonce_algorithm.as_str(),
                    i.nonce_step,
                    i.nonce_skew
                );
                let storage: Vec<&str> = i.key_storage.iter().map(|k| k.as_str()).collect();
                outln!("key storage:    {}", storage.join(", "));
                outln!("number prefixes: {}", prefixes.join(", "));
                match &i.network.name {
                    Some(name) => outln!(
                        "network:        {name} (peers: {})",
                        i.network
                            .peers
                            .iter()
                            .map(|p| p.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => outln!("network:        none (standalone broker)"),
                }
                outln!(
                    "limits:         frame {} B, {} devices, inbox {} messages of ≤ {} B kept {} s",
                    i.limits.max_frame,
                    i.limits.max_devices,
                    i.limits.inbox_quota,
                    i.limits.message_max,
                    i.limits.message_ttl
                );
                outln!(
                    "identity key:   {} (signature verified)",
                    data.identity_key.to_hex()
                );
            }
        }
        Command::Device(DeviceCommand::Join {
            broker,
            ca,
            number,
            secret,
        }) => {
            let session = account::join(&profile, &broker, &ca, &number, &secret).await?;
            let i = &session.info;
            if json {
                outln!("{}", json!({"number": i.number, "device": i.device}));
            } else {
                outln!("joined {} as device {}", i.number, i.device);
            }
        }
        Command::Device(DeviceCommand::Add { name }) => {
            let name = name
                .map(DeviceName::new)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--name: {e}"))?;
            let mut session = account::connect(&profile).await?;
            let data = match session
                .link
                .call(Request::AddDevice(AddDeviceArgs { name }))
                .await?
            {
                ResponseData::AddDevice(d) => d,
                other => anyhow::bail!("unexpected answer {}", other.kind().as_str()),
            };
            if json {
                outln!(
                    "{}",
                    json!({"secret": data.secret.to_hex(), "expires": data.expires,
                           "number": session.info.number})
                );
            } else {
                outln!("{}", data.secret.to_hex());
                eprintln!(
                    "on the new device, within 10 minutes, run:\n  micromsg --profile NEW_DIR device join --broker {} --ca CA_FILE --number {} --secret {}",
                    session.info.broker,
                    session.info.number,
                    data.secret.to_hex()
                );
            }
        }
        Command::Device(DeviceCommand::List) => {
            let mut session = account::connect(&profile).await?;
            let data = match session.link.call(Request::DeviceList).await? {
                ResponseData::DeviceList(d) => d,
                other => anyhow::bail!("unexpected answer {}", other.kind().as_str()),
            };
            if json {
                let devices: Vec<_> = data
                    .devices
                    .iter()
                    .map(|d| {
                        json!({"id": d.id.get(), "name": d.name.as_ref().map(|n| n.as_str()),
                               "created": d.created, "last_seen": d.last_seen, "current": d.current})
                    })
                    .collect();
                outln!("{}", json!({ "devices": devices }));
            } else {
                for d in &data.devices {
                    outln!(
                        "{:>3}  {:<20} created {}  last seen {}{}",
                        d.id.get(),
                        d.name.as_ref().map_or("-", |n| n.as_str()),
                        d.created,
                        d.last_seen.map_or("-".to_owned(), |t| t.to_string()),
                        if d.current { "  (this device)" } else { "" }
                    );
                }
            }
        }
        Command::Listen {
            accept,
            peer_listen,
            advertise,
            ask_existing,
            heartbeat,
        } => {
            listen(
                profile,
                json,
                accept,
                peer_listen,
                advertise,
                ask_existing,
                heartbeat,
            )
            .await?;
        }
        Command::Contact(ContactCommand::Add { number }) => {
            via_agent(&profile, AgentCommand::ContactAdd { number }, json).await?;
        }
        Command::Contact(ContactCommand::Block { number }) => {
            via_agent(&profile, AgentCommand::Block { number }, json).await?;
        }
        Command::Contact(ContactCommand::Unblock { number }) => {
            via_agent(&profile, AgentCommand::Unblock { number }, json).await?;
        }
        Command::Contact(ContactCommand::Accept { request }) => {
            answer(&profile, request, true, json).await?;
        }
        Command::Contact(ContactCommand::Reject { request }) => {
            answer(&profile, request, false, json).await?;
        }
        Command::Contact(ContactCommand::List) => {
            profile.info()?;
            let contacts = Store::new(&profile).contacts()?;
            if json {
                let list: Vec<_> = contacts
                    .iter()
                    .map(|(n, c)| {
                        json!({"number": n, "identity": c.identity.map(|k| k.to_hex()),
                                         "blocked": c.blocked, "added": c.added_at})
                    })
                    .collect();
                outln!("{}", json!({ "contacts": list }));
            } else if contacts.is_empty() {
                outln!("no contacts yet (add one with `micromsg contact add NUMBER`)");
            } else {
                for (n, c) in &contacts {
                    outln!(
                        "{n}  {}{}",
                        c.identity
                            .map_or("(identity not yet seen)".to_owned(), |k| k.to_hex()),
                        if c.blocked { "  BLOCKED" } else { "" }
                    );
                }
            }
        }
        Command::Send { number, text } => {
            via_agent(&profile, AgentCommand::Send { number, text }, json).await?;
        }
        Command::History { number } => {
            profile.info()?;
            let entries = Store::new(&profile).read_history(&number)?;
            if json {
                for e in &entries {
                    outln!("{}", serde_json::to_string(e)?);
                }
            } else if entries.is_empty() {
                outln!("no messages with {number}");
            } else {
                for e in &entries {
                    let who = match e.direction {
                        Direction::In => number.as_str(),
                        Direction::Out => "me",
                    };
                    outln!("{}  [{who}] {}", e.time, e.text);
                }
            }
        }
        Command::SafetyNumber { number } => {
            let info = profile.info()?;
            let secrets = profile.secrets()?;
            let own = IdentityKey::from_seed(&secrets.identity_seed).public_key();
            let contact = Store::new(&profile).contact(&number)?;
            let Some(peer) = contact.and_then(|c| c.identity) else {
                anyhow::bail!("no identity key pinned for {number} yet: set up a session first");
            };
            let value = safety_number(&info.number, &own, &number, &peer)?;
            if json {
                outln!("{}", json!({"number": number, "safety_number": value}));
            } else {
                outln!("{value}");
                eprintln!(
                    "compare these digits with {number} in person or by phone; they match only if no one is in the middle"
                );
            }
        }
        Command::Device(DeviceCommand::Revoke { id }) => {
            let device = DeviceId::new(id).map_err(|e| anyhow::anyhow!("device id: {e}"))?;
            let mut session = account::connect(&profile).await?;
            session
                .link
                .call(Request::DeviceRevoke(DeviceRevokeArgs { device }))
                .await
                .context("revoking the device")?;
            if json {
                outln!("{}", json!({"revoked": id}));
            } else {
                outln!("device {id} revoked");
            }
        }
    }
    Ok(())
}

async fn listen(
    profile: Profile,
    json: bool,
    accept: AcceptArg,
    peer_listen: std::net::SocketAddr,
    advertise: Option<String>,
    ask_existing: bool,
    heartbeat: u64,
) -> anyhow::Result<()> {
    let config = AgentConfig {
        accept: match accept {
            AcceptArg::Any => AcceptPolicy::Any,
            AcceptArg::Contacts => AcceptPolicy::Contacts,
            AcceptArg::Ask => AcceptPolicy::Ask,
        },
        peer_listen,
        advertise,
        auto_existing: !ask_existing,
        session: SessionConfig {
            heartbeat_interval: std::time::Duration::from_secs(heartbeat.max(1)),
            ..SessionConfig::default()
        },
        ..AgentConfig::default()
    };
    let (tx, mut rx) = mpsc::channel(256);
    let agent = agent::start(profile, config, tx).await?;
    let printer = tokio::spawn(async move {
        while let Some(notice) = rx.recv().await {
            print_notice(&notice, json);
        }
    });
    tokio::select! {
        () = wait_for_signal() => {}
        _ = printer_done(&printer) => {}
    }
    let result = agent.stop().await;
    let _ = printer.await;
    result.map_err(Into::into)
}

async fn printer_done(printer: &tokio::task::JoinHandle<()>) {
    while !printer.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn print_notice(notice: &Notice, json: bool) {
    use std::io::Write;
    let line = if json {
        serde_json::to_string(notice).unwrap_or_default()
    } else {
        match notice {
            Notice::Listening {
                number,
                device,
                peer_address,
            } => {
                format!("listening as {number} (device {device}); peers connect to {peer_address}")
            }
            Notice::ContactRequest {
                from,
                request,
                kind,
            } => format!(
                "contact request ({kind}) from {from}: answer with `micromsg contact accept {request}` or `micromsg contact reject {request}`"
            ),
            Notice::ContactRefused { from } => format!("refused a contact request from {from}"),
            Notice::SessionStarted {
                peer,
                first_contact,
                safety_number,
            } => {
                if *first_contact {
                    format!(
                        "session with {peer} started (new contact; identity key pinned; safety number {safety_number})"
                    )
                } else {
                    format!("session with {peer} started")
                }
            }
            Notice::IdentityChanged {
                peer,
                pinned,
                presented,
            } => format!(
                "WARNING: the identity key of {peer} CHANGED (pinned {pinned}, presented {presented}). \
                 The session was refused. Verify the safety number with {peer} out of band."
            ),
            Notice::Message { from, text, .. } => format!("[{from}] {text}"),
            Notice::SessionEnded { peer, reason } => format!("session with {peer} ended: {reason}"),
            Notice::Warning { message } => format!("warning: {message}"),
            other => format!("{other:?}"),
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

async fn answer(
    profile: &Profile,
    request: String,
    accept: bool,
    json: bool,
) -> anyhow::Result<()> {
    let command = AgentCommand::Answer { request, accept };
    let Some(reply) = agent::send_to_running(profile, &command).await else {
        anyhow::bail!(
            "no `micromsg listen` is running for this profile; requests are answered by it"
        );
    };
    if json {
        outln!("{}", serde_json::to_string(&reply)?);
    } else {
        outln!("{}", reply.message);
    }
    if reply.ok {
        Ok(())
    } else {
        Err(anyhow::anyhow!("{}", reply.message))
    }
}

/// Runs `command` in the agent of this profile: the running `listen` when there is one,
/// otherwise a short-lived agent of its own.
async fn via_agent(profile: &Profile, command: AgentCommand, json: bool) -> anyhow::Result<()> {
    let reply = match agent::send_to_running(profile, &command).await {
        Some(reply) => reply,
        None => {
            let config = AgentConfig {
                accept: AcceptPolicy::Contacts,
                control: false,
                announce: false,
                ..AgentConfig::default()
            };
            let (tx, mut rx) = mpsc::channel(64);
            let agent = agent::start(profile.clone(), config, tx).await?;
            let printer = tokio::spawn(async move {
                while let Some(notice) = rx.recv().await {
                    if matches!(
                        notice,
                        Notice::Warning { .. } | Notice::IdentityChanged { .. }
                    ) || json
                    {
                        print_notice(&notice, json);
                    }
                }
            });
            let reply = agent.command(command).await;
            agent.stop().await?;
            let _ = printer.await;
            reply
        }
    };
    if json {
        outln!("{}", serde_json::to_string(&reply)?);
    } else {
        outln!("{}", reply.message);
    }
    if reply.ok {
        Ok(())
    } else {
        Err(anyhow::anyhow!("{}", reply.message))
    }
}
