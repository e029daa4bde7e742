//! `micromsg`: the MicroMsg command-line client. Thin: parse arguments, call the library,
//! print the result (for people, or one JSON object with `--json`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use micromsg_client::account::{self, AccountError};
use micromsg_client::link::LinkError;
use micromsg_client::profile::Profile;
use micromsg_wire::message::request::{AddDeviceArgs, DeviceRevokeArgs};
use micromsg_wire::{DeviceId, DeviceName, Request, ResponseData};
use serde_json::json;

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
                println!(
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
                println!(
                    "{}",
                    json!({"number": i.number, "device": i.device, "broker": i.broker})
                );
            } else {
                println!("{}", i.number);
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
                println!(
                    "{}",
                    json!({"number": i.number, "device": i.device, "broker": i.broker,
                           "broker_identity": i.broker_identity})
                );
            } else {
                println!("number:  {}", i.number);
                println!("device:  {}", i.device);
                println!("broker:  {}", i.broker);
                if let Some(id) = &i.broker_identity {
                    println!("broker identity key: {id}");
                }
            }
        }
        Command::BrokerInfo => {
            let data = account::broker_info(&profile).await?;
            let i = &data.info;
            let prefixes: Vec<&str> = i.prefixes.iter().map(|p| p.as_str()).collect();
            if json {
                println!(
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
                println!("broker:         {} (protocol {})", i.broker_id, i.protocol);
                println!("inbox mode:     {}", i.inbox_mode.as_str());
                println!("registration:   {}", i.registration.as_str());
                println!(
                    "login nonce:    {} every {} s, ±{} step(s)",
                    i.nonce_algorithm.as_str(),
                    i.nonce_step,
                    i.nonce_skew
                );
                let storage: Vec<&str> = i.key_storage.iter().map(|k| k.as_str()).collect();
                println!("key storage:    {}", storage.join(", "));
                println!("number prefixes: {}", prefixes.join(", "));
                match &i.network.name {
                    Some(name) => println!(
                        "network:        {name} (peers: {})",
                        i.network
                            .peers
                            .iter()
                            .map(|p| p.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    None => println!("network:        none (standalone broker)"),
                }
                println!(
                    "limits:         frame {} B, {} devices, inbox {} messages of ≤ {} B kept {} s",
                    i.limits.max_frame,
                    i.limits.max_devices,
                    i.limits.inbox_quota,
                    i.limits.message_max,
                    i.limits.message_ttl
                );
                println!(
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
                println!("{}", json!({"number": i.number, "device": i.device}));
            } else {
                println!("joined {} as device {}", i.number, i.device);
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
                println!(
                    "{}",
                    json!({"secret": data.secret.to_hex(), "expires": data.expires,
                           "number": session.info.number})
                );
            } else {
                println!("{}", data.secret.to_hex());
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
                println!("{}", json!({ "devices": devices }));
            } else {
                for d in &data.devices {
                    println!(
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
        Command::Device(DeviceCommand::Revoke { id }) => {
            let device = DeviceId::new(id).map_err(|e| anyhow::anyhow!("device id: {e}"))?;
            let mut session = account::connect(&profile).await?;
            session
                .link
                .call(Request::DeviceRevoke(DeviceRevokeArgs { device }))
                .await
                .context("revoking the device")?;
            if json {
                println!("{}", json!({"revoked": id}));
            } else {
                println!("device {id} revoked");
            }
        }
    }
    Ok(())
}
