//! Running commands in the device's agent: the running `listen` over its control socket, or a
//! short-lived agent; `listen` itself; Ctrl-C and the printing of replies.

use tokio::sync::mpsc;

use super::print;
use crate::agent::{self, AcceptPolicy, AgentConfig, Command as AgentCommand, Notice};
use crate::profile::Profile;

pub(super) async fn listen(
    profile: Profile,
    json: bool,
    config: AgentConfig,
) -> anyhow::Result<()> {
    let (tx, mut rx) = mpsc::channel(256);
    let printer_profile = profile.clone();
    let agent = agent::start(profile, config, tx).await?;
    let printer = tokio::spawn(async move {
        while let Some(notice) = rx.recv().await {
            print::notice(&notice, json, &printer_profile);
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

pub(super) async fn answer(
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
    print_reply(reply, json)
}

/// An agent's refusal: its message is already written for people. `main` prints it once
/// (on stderr, or as the one JSON error object).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Refused(pub(super) String);

/// Prints an agent's reply: on success its message (or the reply as JSON); a refusal becomes
/// the command's error, printed once by `main`.
pub(super) fn print_reply(answer: agent::Answer, json: bool) -> anyhow::Result<()> {
    let output = answer.map_err(|e| Refused(e.to_string()))?;
    if json {
        outln!(
            "{}",
            serde_json::to_string(&agent::Reply::from(Ok(output)))?
        );
    } else {
        outln!("{}", output.message);
    }
    Ok(())
}

/// The short-lived agent of a one-shot command: nobody connects to it, and it leaves the
/// inbox to `listen` and `inbox`.
pub(super) fn one_shot_config() -> AgentConfig {
    AgentConfig {
        accept: AcceptPolicy::Contacts,
        control: false,
        announce: false,
        inbox: false,
        ..AgentConfig::default()
    }
}

/// Runs `command` in the agent of this profile and prints the reply.
pub(super) async fn via_agent(
    profile: &Profile,
    command: AgentCommand,
    json: bool,
    config: AgentConfig,
) -> anyhow::Result<()> {
    let reply = run_in_agent(profile, command, config).await?;
    print_reply(reply, json)
}

/// Runs `command` in the agent of this profile: the running `listen` when there is one,
/// otherwise a short-lived agent with `config`.
pub(super) async fn run_in_agent(
    profile: &Profile,
    command: AgentCommand,
    config: AgentConfig,
) -> anyhow::Result<agent::Answer> {
    // Ctrl-C while the command waits cancels it: the agent is told, and its reply says
    // whether anything had already left.
    let interrupted = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ctrl_c = {
        let interrupted = std::sync::Arc::clone(&interrupted);
        async move {
            let _ = tokio::signal::ctrl_c().await;
            interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let reply = match agent::send_to_running_cancellable(profile, &command, ctrl_c).await {
        Some(reply) => reply,
        None => {
            // Not under a move: it would log in with the account the move is replacing.
            profile.check_no_move()?;
            let (tx, mut rx) = mpsc::channel(64);
            let agent = agent::start(profile.clone(), config, tx).await?;
            let printer = tokio::spawn(async move {
                // Only what needs attention, on stderr: stdout carries the reply.
                while let Some(notice) = rx.recv().await {
                    match &notice {
                        Notice::Warning { message } => errln!("warning: {message}"),
                        Notice::MoveRefused { from, reason } => errln!(
                            "WARNING: a moved notice from {from} was REFUSED, nothing \
                             changed: {reason}"
                        ),
                        Notice::ContactMoved { old, new, .. } => {
                            errln!("{old} moved to the number {new} (notice verified)");
                        }
                        Notice::IdentityChanged { peer, .. } => errln!(
                            "WARNING: the identity key of {peer} CHANGED; the session was \
                             refused. Verify the safety number with {peer} out of band."
                        ),
                        _ => {}
                    }
                }
            });
            let cancel = agent::Cancel::default();
            let reply = {
                let answer = agent.command_cancellable(command, std::sync::Arc::clone(&cancel));
                tokio::pin!(answer);
                tokio::select! {
                    reply = &mut answer => reply,
                    _ = tokio::signal::ctrl_c() => {
                        interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
                        cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                        answer.await
                    }
                }
            };
            agent.stop().await?;
            let _ = printer.await;
            reply
        }
    };
    if reply.is_ok() && interrupted.load(std::sync::atomic::Ordering::Relaxed) {
        errln!("(Ctrl-C came too late to cancel: this had already happened)");
    }
    Ok(reply)
}

/// A message typed or piped into `send NUMBER -`: standard input up to its end, without the
/// final line break.
pub(super) fn read_stdin_text() -> anyhow::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| anyhow::anyhow!("reading the message from standard input: {e}"))?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        anyhow::bail!("the message from standard input is empty; nothing was sent");
    }
    Ok(text)
}
