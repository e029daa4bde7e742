//! `micromsg`: the MicroMsg command line. Thin: parse arguments, call the library, print the
//! result (for people, or one JSON object with `--json`). The `micromsg` binary is
//! [`main`]; the integration tests run it as a child process through a shim of their own.

use std::process::ExitCode;

use crate::account::{self, AccountError};
use crate::agent::{self, AcceptPolicy, AgentConfig, Command as AgentCommand};
use crate::devices;
use crate::error_text;
use crate::groups;
use crate::link::LinkError;
use crate::p2p::SessionConfig;
use crate::profile::Profile;
use crate::store::{Direction, Store, safety_number_with};
use crate::when::local_time;
use anyhow::Context;
use clap::Parser;
use micromsg_crypto::identity::IdentityKey;
use micromsg_wire::message::request::{AddDeviceArgs, DeviceRevokeArgs};
use micromsg_wire::{DeviceId, DeviceName, Request, ResponseData};
use serde_json::json;

/// Like `println!`, but a closed stdout (a reader such as `head` went away) is not a panic,
/// and what a terminal would act on is escaped ([`crate::terminal::terminal_safe`]; a JSON
/// line stays valid and means the same).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!($($arg)*);
        let _ = writeln!(
            std::io::stdout().lock(),
            "{}",
            $crate::terminal::terminal_safe(&line)
        );
    }};
}

/// A line on stderr (progress, warnings, errors for people), escaped as [`outln!`]'s.
macro_rules! errln {
    ($($arg:tt)*) => {{
        let line = format!($($arg)*);
        eprintln!("{}", $crate::terminal::terminal_safe(&line));
    }};
}

mod args;
mod portable;
mod print;
mod via_agent;

use args::{
    AcceptArg, AccountCommand, Cli, Command, ContactCommand, DeviceCommand, GroupCommand,
    KeysCommand, OutboxCommand,
};
use via_agent::{
    Refused, answer, listen, one_shot_config, print_reply, read_stdin_text, run_in_agent, via_agent,
};

/// Runs the `micromsg` command line with the process's arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = cli.json;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            errln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if json {
                let code = broker_code(&e);
                outln!(
                    "{}",
                    json!({"error": error_text::anyhow_text(&e), "code": code.map(|c| c.as_str())})
                );
            } else {
                errln!("error: {}", error_text::anyhow_text(&e));
            }
            ExitCode::FAILURE
        }
    }
}

/// The broker's error code behind `e`, when the broker refused.
fn broker_code(e: &anyhow::Error) -> Option<micromsg_wire::ErrorCode> {
    let account = |a: &AccountError| match a {
        AccountError::Link(l) => l.code(),
        _ => None,
    };
    e.downcast_ref::<AccountError>()
        .and_then(account)
        .or_else(|| e.downcast_ref::<LinkError>().and_then(LinkError::code))
        .or_else(|| {
            e.downcast_ref::<crate::devices::SyncError>()
                .and_then(|s| match s {
                    crate::devices::SyncError::Link(l) => l.code(),
                    crate::devices::SyncError::Account(a) => account(a),
                    _ => None,
                })
        })
        .or_else(|| {
            // The commands that start an agent of their own.
            e.downcast_ref::<crate::agent::AgentError>()
                .and_then(|a| match a {
                    crate::agent::AgentError::Account(a) => account(a),
                    crate::agent::AgentError::Link(l) => l.code(),
                    _ => None,
                })
        })
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
                errln!(
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
            transfer_key,
            wait,
        }) => {
            let transfer_key = transfer_key
                .as_deref()
                .map(parse_transfer_key)
                .transpose()?;
            let mut session = account::join(&profile, &broker, &ca, &number, &secret).await?;
            let (number, device) = (session.info.number.clone(), session.info.device);
            if !json {
                outln!("joined {number} as device {device}");
            }
            let installed = match &transfer_key {
                Some(key) => Some(receive_keys(&mut session, &profile, key, wait, json).await?),
                None => None,
            };
            if json {
                outln!(
                    "{}",
                    json!({"number": number, "device": device,
                           "keys": installed.as_ref().map(|i| json!({
                               "contacts": i.contacts, "sessions": i.sessions}))})
                );
            } else if let Some(i) = installed {
                print_installed(&i);
            } else {
                errln!(
                    "this device has its own identity key until it gets the entity's: run \
                     `{}` with the transfer key `device add` printed, or `{}`",
                    profile.command("device receive-keys --transfer-key KEY"),
                    profile.command("keys restore --recovery SECRET")
                );
            }
        }
        Command::Device(DeviceCommand::ReceiveKeys { transfer_key, wait }) => {
            let transfer_key = parse_transfer_key(&transfer_key)?;
            let mut session = account::connect(&profile).await?;
            let installed = receive_keys(&mut session, &profile, &transfer_key, wait, json).await?;
            if json {
                outln!(
                    "{}",
                    json!({"keys": {"contacts": installed.contacts,
                                    "sessions": installed.sessions}})
                );
            } else {
                print_installed(&installed);
            }
        }
        Command::Device(DeviceCommand::Add {
            name,
            no_transfer,
            wait,
        }) => {
            let name = name
                .map(DeviceName::new)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--name: {e}"))?;
            let mut session = account::connect(&profile).await?;
            let known_highest = devices::highest_device(&mut session).await?;
            let data = match session
                .link
                .call(Request::AddDevice(AddDeviceArgs { name }))
                .await?
            {
                ResponseData::AddDevice(d) => d,
                other => anyhow::bail!("unexpected answer {}", other.kind().as_str()),
            };
            let transfer = (!no_transfer).then(devices::new_transfer_key);
            let transfer_hex = transfer.as_ref().map(|t| t.to_hex().to_string());
            if json {
                outln!(
                    "{}",
                    json!({"secret": data.secret.to_hex(), "expires": data.expires,
                           "number": session.info.number, "transfer_key": transfer_hex})
                );
            } else {
                outln!("{}", data.secret.to_hex());
                if let Some(t) = &transfer_hex {
                    outln!("{t}");
                }
                errln!(
                    "on the new device, within 10 minutes, run:\n  micromsg --profile NEW_DIR device join --broker {} --ca CA_FILE --number {} --secret {}{}",
                    session.info.broker,
                    session.info.number,
                    data.secret.to_hex(),
                    transfer_hex
                        .as_ref()
                        .map(|t| format!(" --transfer-key {t}"))
                        .unwrap_or_default()
                );
            }
            if let Some(transfer) = transfer {
                if !json {
                    errln!("waiting for the new device to join, to send it this device's keys…");
                }
                let device = devices::send_link_transfer(
                    &mut session,
                    &profile,
                    &transfer,
                    known_highest,
                    std::time::Duration::from_secs(wait),
                )
                .await
                .context("sending the keys to the new device")?;
                if json {
                    outln!("{}", json!({"keys_sent_to": device}));
                } else {
                    errln!("sent the keys to device {device}");
                }
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
                        local_time(d.created),
                        d.last_seen.map_or("-".to_owned(), local_time),
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
            ask_group_members,
            heartbeat,
            offline_after,
            reconnect_max,
            reach,
            direct_timeout_ms,
            keep_replaced_keys_days,
        } => {
            let config = AgentConfig {
                accept: match accept {
                    AcceptArg::Any => AcceptPolicy::Any,
                    AcceptArg::Contacts => AcceptPolicy::Contacts,
                    AcceptArg::Ask => AcceptPolicy::Ask,
                },
                peer_listen,
                advertise,
                auto_existing: !ask_existing,
                accept_group_members: !ask_group_members,
                offline_after: std::time::Duration::from_secs(offline_after),
                session: SessionConfig {
                    heartbeat_interval: std::time::Duration::from_secs(heartbeat.max(1)),
                    ..SessionConfig::default()
                },
                wait_for_broker: true,
                reconnect_max: std::time::Duration::from_secs(reconnect_max),
                reach,
                direct_timeout: std::time::Duration::from_millis(direct_timeout_ms),
                keep_replaced_keys: days(keep_replaced_keys_days),
                ..AgentConfig::default()
            };
            listen(profile, json, config).await?;
        }
        Command::Chat {
            accept,
            notify,
            reach,
            keep_replaced_keys_days,
        } => {
            let options = crate::chat::ChatOptions {
                agent: AgentConfig {
                    accept: match accept {
                        AcceptArg::Any => AcceptPolicy::Any,
                        AcceptArg::Contacts => AcceptPolicy::Contacts,
                        AcceptArg::Ask => AcceptPolicy::Ask,
                    },
                    reach,
                    keep_replaced_keys: days(keep_replaced_keys_days),
                    ..AgentConfig::default()
                },
                notify_command: notify,
                colour: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            };
            crate::chat::run(profile, options).await?;
        }
        Command::Contact(ContactCommand::Add { number, wait }) => {
            // Before "asking …": a typo is told at once, not after a login.
            if micromsg_wire::Number::new(number.clone()).is_err() {
                anyhow::bail!(crate::store::not_a_number(&number));
            }
            if profile.info().is_ok_and(|info| info.number == number) {
                anyhow::bail!("that is your own number");
            }
            if !json {
                errln!(
                    "asking {number}; waiting up to {wait} s for the answer (Ctrl-C stops \
                     waiting)…"
                );
            }
            let command = AgentCommand::ContactAdd {
                number,
                wait_secs: Some(wait),
            };
            via_agent(&profile, command, json, one_shot_config()).await?;
        }
        Command::Contact(ContactCommand::Block { number }) => {
            via_agent(
                &profile,
                AgentCommand::Block { number },
                json,
                one_shot_config(),
            )
            .await?;
        }
        Command::Contact(ContactCommand::Unblock { number }) => {
            let command = AgentCommand::Unblock { number };
            via_agent(&profile, command, json, one_shot_config()).await?;
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
                        json!({"number": n, "name": c.name,
                               "identity": c.identity.map(|k| k.to_hex()),
                               "blocked": c.blocked, "added": c.added_at,
                               "identity_changed": c.presented.is_some()})
                    })
                    .collect();
                outln!("{}", json!({ "contacts": list }));
            } else if contacts.is_empty() {
                outln!(
                    "no contacts yet (add one with `{}`)",
                    profile.command("contact add NUMBER")
                );
            } else {
                for (n, c) in &contacts {
                    let state = match (c.blocked, c.presented.is_some()) {
                        (true, _) => "BLOCKED (or rejected)",
                        (false, true) => "IDENTITY CHANGED: verify before sending",
                        (false, false) if c.identity.is_none() => "not met yet",
                        (false, false) => "contact",
                    };
                    outln!(
                        "{:<24} {n:<16} {state:<24} added {}  key {}",
                        c.name.as_deref().unwrap_or("-"),
                        local_time(c.added_at),
                        c.identity.map_or("-".to_owned(), |k| k.to_hex())
                    );
                }
            }
        }
        Command::Contact(ContactCommand::Name {
            number,
            name,
            clear,
        }) => {
            profile.info()?;
            let name = if clear { None } else { name };
            let command = AgentCommand::ContactName {
                number: number.clone(),
                name: name.clone(),
            };
            let reply = match agent::send_to_running(&profile, &command).await {
                Some(reply) => reply,
                None => agent::name_contact(&Store::new(&profile), &number, name.as_deref()),
            };
            print_reply(reply, json)?;
        }
        Command::Contact(ContactCommand::Remove { number }) => {
            profile.info()?;
            let command = AgentCommand::ContactRemove {
                number: number.clone(),
            };
            let reply = match agent::send_to_running(&profile, &command).await {
                Some(reply) => reply,
                None => {
                    let outbox = crate::outbox::Outbox::new(&profile);
                    let mut items = outbox.load()?;
                    items.retain(|q| q.to != number);
                    outbox.save(&items)?;
                    agent::remove_contact(&profile, &Store::new(&profile), &number)
                }
            };
            print_reply(reply, json)?;
        }
        Command::Send { number, text, wait } => {
            let text = if text == "-" {
                read_stdin_text()?
            } else {
                text
            };
            let config = AgentConfig {
                offline_after: std::time::Duration::from_secs(wait),
                // A broker that is down now does not lose the message: it is queued.
                wait_for_broker: true,
                ..one_shot_config()
            };
            via_agent(&profile, AgentCommand::Send { number, text }, json, config).await?;
        }
        Command::Group(command) => group_command(&profile, command, json).await?,
        Command::Outbox { action } => outbox_command(&profile, action, json).await?,
        Command::Status => match agent::send_to_running(&profile, &AgentCommand::Status).await {
            Some(reply) => print_reply(reply, json)?,
            None => {
                let i = profile.info()?;
                if json {
                    outln!(
                        "{}",
                        json!({"ok": true, "message": "no agent is running for this profile",
                               "data": {"number": i.number, "device": i.device,
                                        "broker": "not running", "sessions": []}})
                    );
                } else {
                    outln!(
                        "number {}, device {}; no agent is running for this profile (start \
                         `micromsg listen`); no live sessions",
                        i.number,
                        i.device
                    );
                }
            }
        },
        Command::Inbox => {
            let answer = run_in_agent(&profile, AgentCommand::Inbox, one_shot_config()).await?;
            let output = answer.map_err(|e| Refused(e.to_string()))?;
            if json {
                print_reply(Ok(output), json)?;
            } else {
                if let Some(agent::Detail::Inbox(batch)) = &output.detail {
                    for m in &batch.messages {
                        let (peer, text) = (&m.peer, &m.text);
                        match m.direction {
                            Direction::Out => {
                                outln!("[me → {peer}, from device {}] {text}", m.device);
                            }
                            Direction::In => outln!("[{peer}] {text} (offline)"),
                        }
                    }
                }
                outln!("{}", output.message);
            }
        }
        Command::Keys(KeysCommand::Backup { recovery }) => {
            let mut session = account::connect(&profile).await?;
            let done = devices::backup(&mut session, &profile, recovery.as_deref())
                .await
                .context("key backup")?;
            if json {
                outln!(
                    "{}",
                    json!({"version": done.version, "contacts": done.contacts,
                           "sessions": done.sessions, "left_out": done.left_out,
                           "recovery_secret": done.new_recovery.as_ref().map(|r| r.as_str())})
                );
            } else {
                if let Some(secret) = &done.new_recovery {
                    outln!("{}", secret.as_str());
                    errln!(
                        "this is your NEW RECOVERY SECRET: write it down and keep it safe. It is \
                         the only way to open the backup; the broker never sees it."
                    );
                }
                errln!(
                    "key backup version {} stored at the broker ({} contact(s), {} session(s){})",
                    done.version,
                    done.contacts,
                    done.sessions,
                    if done.left_out > 0 {
                        format!(", {} older session(s) left out for size", done.left_out)
                    } else {
                        String::new()
                    }
                );
            }
        }
        Command::Keys(KeysCommand::Restore { recovery }) => {
            let mut session = account::connect(&profile).await?;
            let installed = devices::restore(&mut session, &profile, &recovery)
                .await
                .context("restoring the key backup")?;
            if json {
                outln!(
                    "{}",
                    json!({"contacts": installed.contacts, "sessions": installed.sessions,
                           "pin_conflicts": installed.conflicts})
                );
            } else {
                outln!(
                    "restored: the entity's identity key, {} contact(s), {} session(s)",
                    installed.contacts,
                    installed.sessions
                );
                for c in &installed.conflicts {
                    errln!(
                        "warning: {c}'s key in the backup differs from the one pinned here; kept this one"
                    );
                }
            }
        }
        Command::History { number } => {
            profile.info()?;
            let entries = Store::new(&profile).read_history(&number)?;
            if json {
                outln!("{}", json!({"number": number, "messages": entries}));
            } else if entries.is_empty() {
                outln!(
                    "no messages with {}",
                    print::Names::of(&profile).show(&number)
                );
            } else {
                let them = print::Names::of(&profile).show(&number);
                for e in &entries {
                    let who = match e.direction {
                        Direction::In => them.as_str(),
                        Direction::Out => "me",
                    };
                    let how = if e.offline { "  (offline)" } else { "" };
                    outln!("{}  [{who}] {}{how}", local_time(e.time), e.text);
                }
            }
        }
        Command::SafetyNumber { number } => {
            let info = profile.info()?;
            let secrets = profile.secrets()?;
            let own = IdentityKey::from_seed(&secrets.identity_seed).public_key();
            let contact = Store::new(&profile).contact(&number)?;
            let Some(peer) = contact.as_ref().and_then(|c| c.identity) else {
                anyhow::bail!("no identity key pinned for {number} yet: set up a session first");
            };
            let value = safety_number_with(&info.number, &own, &number, &peer, contact.as_ref())?;
            if json {
                outln!("{}", json!({"number": number, "safety_number": value}));
            } else {
                outln!("{value}");
                errln!(
                    "compare these digits with {number} in person or by phone; they match only if no one is in the middle"
                );
            }
        }
        Command::Move {
            broker,
            ca,
            keep_number: true,
            ..
        } => {
            let report = crate::porting::port(&profile, &broker, &ca, |step| {
                if !json {
                    errln!("{}/{} {step}…", step.number(), crate::porting::STEPS);
                }
            })
            .await?;
            if json {
                outln!(
                    "{}",
                    json!({"number": report.number, "from": report.from, "to": report.to,
                           "broker": report.broker, "device": report.device,
                           "seq": report.seq, "fetched": report.fetched})
                );
            } else {
                outln!("{}", report.number);
                errln!(
                    "ported: number {} moved from broker {} to broker {} ({}), device {}; \
                     {} waiting messages fetched first",
                    report.number,
                    report.from,
                    report.to,
                    report.broker,
                    report.device,
                    report.fetched
                );
            }
        }
        Command::Move {
            broker,
            ca,
            token,
            delete_old,
            forward,
            keep_number: false,
        } => {
            let options = crate::move_account::MoveOptions {
                forward_days: forward,
                delete_old,
            };
            move_command(&profile, &broker, &ca, token, options, json).await?
        }
        Command::Account(AccountCommand::Delete { yes }) => {
            let info = profile.info()?;
            if !yes {
                confirm_delete(&info.number, &info.broker)?;
            }
            let mut session = account::connect(&profile).await?;
            account::delete(&mut session)
                .await
                .context("deleting the account")?;
            if json {
                outln!("{}", json!({"deleted": info.number, "broker": info.broker}));
            } else {
                outln!(
                    "deleted: {} at {} (its devices, inbox, contacts and backup there are \
                     gone; the number is never given out again)",
                    info.number,
                    info.broker
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
        Command::Export {
            out,
            kdf_memory_mib,
            kdf_iterations,
        } => {
            let params = crate::portable::KdfParams {
                memory_kib: kdf_memory_mib * 1024,
                iterations: kdf_iterations,
                parallelism: 1,
            };
            portable::export(&profile, &out, params, json)?;
        }
        Command::Import {
            file,
            max_kdf_memory_mib,
            max_kdf_iterations,
        } => {
            let limits = crate::portable::KdfLimits {
                max_memory_kib: max_kdf_memory_mib.saturating_mul(1024),
                max_iterations: max_kdf_iterations,
            };
            portable::import(&profile, &file, limits, json)?;
        }
    }
    Ok(())
}

async fn group_command(profile: &Profile, command: GroupCommand, json: bool) -> anyhow::Result<()> {
    let agent_command = match command {
        GroupCommand::Create { name, members } => AgentCommand::GroupCreate { name, members },
        GroupCommand::Add { group, number } => AgentCommand::GroupAdd { group, number },
        GroupCommand::Remove { group, number } => AgentCommand::GroupRemove { group, number },
        GroupCommand::Leave { group } => AgentCommand::GroupLeave { group },
        GroupCommand::Rename { group, name } => AgentCommand::GroupRename { group, name },
        GroupCommand::Send { group, text } => AgentCommand::GroupSend { group, text },
        GroupCommand::List => {
            profile.info()?;
            let store = Store::new(profile);
            let mut list = Vec::new();
            for id in store.group_ids()? {
                let g = match store.load_group(&id) {
                    Ok(Some(g)) => g,
                    Ok(None) => continue,
                    // An unsigned group of an earlier version: say so, list the others.
                    Err(e @ crate::store::StoreError::UnsignedGroup(_)) => {
                        errln!("warning: {e}");
                        continue;
                    }
                    Err(e) => return Err(e.into()),
                };
                if json {
                    list.push(json!({"group": g.id, "name": g.state.name,
                                     "members": g.state.members, "version": g.state.version}));
                } else {
                    outln!(
                        "{}  {}  members {} (version {})",
                        g.id,
                        g.state.name,
                        g.state.members.join(", "),
                        g.state.version
                    );
                }
            }
            if json {
                outln!("{}", json!({ "groups": list }));
            }
            return Ok(());
        }
        GroupCommand::History { group } => {
            let me = profile.info()?.number;
            let store = Store::new(profile);
            let ids = store.group_ids()?;
            let id = groups::resolve(&ids, &group).map_err(|e| anyhow::anyhow!(e))?;
            let entries = store.read_group_history(id)?;
            if json {
                outln!("{}", json!({"group": id, "messages": entries}));
            } else if entries.is_empty() {
                outln!("no messages in group {id}");
            } else {
                // As `history` shows a contact's: the local time (of the sender's clock) and
                // who, by name.
                let names = print::Names::of(profile);
                for e in &entries {
                    let who = if e.from == me {
                        "me".to_owned()
                    } else {
                        names.show(&e.from)
                    };
                    outln!("{}  [{who}] {}", local_time(e.sent), e.text);
                }
            }
            return Ok(());
        }
    };
    let config = AgentConfig {
        offline_after: std::time::Duration::ZERO,
        ..one_shot_config()
    };
    via_agent(profile, agent_command, json, config).await
}

/// `outbox` and `outbox cancel ID`. A running agent cancels (it holds the outbox); otherwise
/// the file is changed here.
async fn outbox_command(
    profile: &Profile,
    action: Option<OutboxCommand>,
    json: bool,
) -> anyhow::Result<()> {
    profile.info()?;
    match action {
        None => {
            let items = crate::outbox::Outbox::new(profile).load()?;
            if json {
                let list: Vec<_> = items
                    .iter()
                    .map(|q| {
                        json!({"id": q.id, "to": q.to, "text": q.text, "queued_at": q.queued_at,
                               "attempts": q.attempts, "last_error": q.last_error,
                               "failed": q.failed, "copy": q.copy})
                    })
                    .collect();
                outln!("{}", json!({ "outbox": list }));
            } else if items.is_empty() {
                outln!("the outbox is empty: nothing waits to go out");
            } else {
                let names = print::Names::of(profile);
                for q in &items {
                    let state = match (&q.failed, &q.last_error) {
                        (Some(why), _) => format!("FAILED, will not be retried: {why}"),
                        (None, Some(why)) => format!("waiting ({} tries; last: {why})", q.attempts),
                        (None, None) => "waiting".to_owned(),
                    };
                    outln!(
                        "{}  to {}  queued {}  {state}\n    {}",
                        &q.id[..q.id.len().min(8)],
                        names.show(&q.to),
                        local_time(q.queued_at),
                        q.text
                    );
                }
            }
            Ok(())
        }
        Some(OutboxCommand::Cancel { id }) => {
            let command = AgentCommand::OutboxCancel { id: id.clone() };
            let reply = match agent::send_to_running(profile, &command).await {
                Some(reply) => reply,
                None => crate::agent::cancel_queued(profile, &id),
            };
            print_reply(reply, json)
        }
    }
}

/// `--transfer-key`: the 64 hex digits `device add` printed.
fn parse_transfer_key(hex: &str) -> anyhow::Result<micromsg_crypto::Secret32> {
    micromsg_crypto::Secret32::from_hex(hex.trim())
        .map_err(|e| anyhow::anyhow!("--transfer-key: {e}"))
}

/// Waits up to `wait_secs` for the old device's link transfer and installs it (`device join
/// --transfer-key`, `device receive-keys`).
async fn receive_keys(
    session: &mut account::Session,
    profile: &Profile,
    transfer_key: &micromsg_crypto::Secret32,
    wait_secs: u64,
    json: bool,
) -> anyhow::Result<devices::Installed> {
    if !json {
        errln!("waiting for the old device's keys…");
    }
    devices::receive_link_transfer(
        session,
        profile,
        transfer_key,
        std::time::Duration::from_secs(wait_secs),
    )
    .await
    .context("receiving the keys from the old device")
}

/// What a link transfer installed, for people.
fn print_installed(installed: &devices::Installed) {
    outln!(
        "received the keys from the old device: identity, {} contact(s), {} session(s)",
        installed.contacts,
        installed.sessions
    );
}

/// Asks the user to type `number` before an account is deleted; refuses without a terminal
/// (scripts pass `--yes`).
fn confirm_delete(number: &str, broker: &str) -> anyhow::Result<()> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "deleting an account cannot be undone: run it on a terminal to confirm, or pass \
             --yes"
        );
    }
    eprint!(
        "This deletes {number} at {broker} for good: every device, the inbox, the contacts and \
         the key backup there. Type the number to confirm: "
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("reading the confirmation")?;
    if line.trim() != number {
        anyhow::bail!("not confirmed (the number typed differs): nothing was deleted");
    }
    Ok(())
}

/// `n` days (`--keep-replaced-keys-days`).
fn days(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n * 24 * 3600)
}

/// `move --broker HOST:PORT --ca FILE [--token T]` (protocol.md 12.13).
async fn move_command(
    profile: &Profile,
    broker: &str,
    ca: &std::path::Path,
    token: Option<String>,
    options: crate::move_account::MoveOptions,
    json: bool,
) -> anyhow::Result<()> {
    use crate::move_account::{Step, move_to};
    let done = move_to(profile, broker, ca, token, options, |step| {
        if json {
            return;
        }
        match step {
            Step::FetchingInbox => errln!("1/4 fetching what waits in the old inbox…"),
            Step::Registering => errln!("2/4 registering at {broker}…"),
            Step::Resuming { number } => {
                errln!("2/4 using the account {number} an interrupted move registered");
            }
            Step::Announcing { number } => {
                errln!("3/4 telling contacts and groups about the new number {number}…");
            }
            Step::Switching => errln!("4/4 switching this profile to {broker}…"),
            Step::Forwarding { days } => {
                errln!("leaving the notice at the old broker for {days} day(s)…");
            }
            Step::DeletingOld { number } => {
                errln!("deleting the old account {number} at the old broker…");
            }
        }
    })
    .await?;
    if json {
        outln!(
            "{}",
            json!({"old_number": done.old_number, "number": done.new_number,
                   "broker": done.broker, "fetched": done.fetched,
                   "notified": done.report.notified, "groups": done.report.groups,
                   "old_deleted": done.old_deleted, "forward_expires": done.forward_expires,
                   "warnings": done.warnings})
        );
        return Ok(());
    }
    for w in &done.warnings {
        errln!("warning: {w}");
    }
    outln!("{}", done.new_number);
    let names = print::Names::of(profile);
    for (number, how) in &done.report.notified {
        errln!("  told {}: {how}", names.show(number));
    }
    errln!(
        "moved: {} is now {} at {} ({} message(s) fetched from the old inbox first, {} \
         group(s) told); contacts follow the signed notice and keep your safety number",
        done.old_number,
        done.new_number,
        done.broker,
        done.fetched,
        done.report.groups.len()
    );
    if let Some(expires) = done.forward_expires {
        errln!(
            "whoever asks for {} at the old broker learns {} until {}",
            done.old_number,
            done.new_number,
            local_time(expires)
        );
    }
    if done.old_deleted {
        errln!(
            "the old account {} is deleted at the old broker",
            done.old_number
        );
    }
    Ok(())
}
