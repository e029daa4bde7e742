//! Staying up: when the broker link is lost (closed, reset, TLS error, a SHUTDOWN event, no
//! answer, or no broker at start-up), the agent keeps running. Live sessions do not need the
//! broker and go on; the agent logs in again after an exponential backoff with jitter, says so
//! once each way ([`Notice::BrokerLost`], [`Notice::BrokerBack`]), announces itself again and
//! fetches its inbox.
//!
//! It gives up only on what another attempt cannot fix: the profile unreadable, this device
//! refused (revoked), or a broker that cannot prove it is the one the profile registered with.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use rand_core::{OsRng, RngCore};

use crate::account::{self, AccountError};
use crate::link::LinkError;
use micromsg_wire::ErrorCode;

use super::{Agent, AgentError, Notice};

/// Exponential backoff with jitter, capped: the delays before reconnect attempts. Sans-IO (the
/// random draw is passed in), so its sequence and bounds are tested without a clock.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    initial: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    pub(super) fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial: initial.max(Duration::from_millis(1)),
            max: max.max(initial),
            attempts: 0,
        }
    }

    /// The delay before the next attempt: `initial · 2^attempts`, capped at `max`, of which
    /// the upper half is random ("equal jitter": agents that lost the same broker do not all
    /// come back at once, and no delay exceeds the cap).
    pub(super) fn next_delay(&mut self, draw: u64) -> Duration {
        let exp = self.attempts.min(30);
        self.attempts = self.attempts.saturating_add(1);
        let base = self
            .initial
            .saturating_mul(1u32 << exp)
            .min(self.max)
            .as_millis() as u64;
        let half = base / 2;
        Duration::from_millis(base - half + draw % (half + 1))
    }

    /// After a successful login: the next loss starts from `initial` again.
    pub(super) fn reset(&mut self) {
        self.attempts = 0;
    }
}

/// True when `e` means the link itself is gone (as opposed to a refusal of one request).
pub(super) fn is_connection_loss(e: &LinkError) -> bool {
    matches!(
        e,
        LinkError::Io(_)
            | LinkError::Closed
            | LinkError::Timeout(_)
            | LinkError::Connect { .. }
            | LinkError::Tls { .. }
            | LinkError::Offline
    )
}

/// Why logging in again cannot succeed by trying later, or `None` when it may.
pub(super) fn fatal_reason(e: &AccountError) -> Option<String> {
    match e {
        // The refusal says what it means for this device (`account::login_on`): revoked, or
        // unknown to the broker, the clock ruled out or not.
        AccountError::Link(
            LinkError::BrokerNotVerified
            | LinkError::Refused {
                code: ErrorCode::AuthFailed,
                ..
            },
        ) => Some(e.to_string()),
        // A certificate the profile's CA does not vouch for: a different broker, not an outage.
        AccountError::Link(LinkError::Tls { source, .. })
            if source.kind() == ErrorKind::InvalidData =>
        {
            Some(format!(
                "{e} (the broker's certificate does not match the profile's CA)"
            ))
        }
        AccountError::Link(_) => None,
        AccountError::Profile(_)
        | AccountError::Tls(_)
        | AccountError::BrokerInfo(_)
        | AccountError::BadInput(_) => Some(e.to_string()),
    }
}

/// Seconds, rounded up, for people.
fn secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000) as u64
}

impl Agent {
    /// The link is gone: drop it, tell the user once, and schedule the first attempt.
    pub(super) async fn link_lost(&mut self, reason: String) {
        if self.link.take().is_some() {
            self.start_offline(reason).await;
        }
    }

    /// Offline (the link lost, or no broker at start-up): tell the user once, and schedule
    /// the first attempt.
    pub(super) async fn start_offline(&mut self, reason: String) {
        let delay = self.backoff.next_delay(OsRng.next_u64());
        self.reconnect_at = Instant::now() + delay;
        self.down_since = Some(Instant::now());
        self.notify(Notice::BrokerLost {
            reason,
            retry_in_secs: secs(delay),
        })
        .await;
    }

    /// Starts one attempt to log in again, as its own task: the loop goes on serving the
    /// sessions, the peer listener and the CLI while it connects.
    pub(super) fn start_attempt(&mut self) {
        let profile = self.profile.clone();
        self.attempt = Some(tokio::spawn(
            async move { account::connect(&profile).await },
        ));
    }

    /// What an attempt came to. `Err` only for what trying again cannot fix.
    pub(super) async fn attempt_done(
        &mut self,
        result: Result<account::Session, AccountError>,
    ) -> Result<(), AgentError> {
        match result {
            Ok(session) => {
                let clock = account::clock_warning(session.clock_offset, session.info.nonce_step);
                self.link = Some(session.link);
                self.backoff.reset();
                let offline_secs = self.down_since.take().map_or(0, |t| secs(t.elapsed()));
                self.read_broker_limits().await;
                if self.config.announce
                    && let Err(e) = self.announce().await
                {
                    self.warn(format!("announcing this device to the broker: {e}"))
                        .await;
                }
                if self.link.is_some() {
                    self.notify(Notice::BrokerBack { offline_secs }).await;
                    if let Some(warning) = clock {
                        self.warn(warning).await;
                    }
                    if self.config.inbox {
                        self.inbox_due = true;
                        // Started offline: the check at start waited for the broker's limits.
                        if !self.keys_checked {
                            self.forget_old_keys().await;
                        }
                    }
                    self.flush_outbox(None).await;
                    if self.config.announce {
                        self.ask_awaited_members().await;
                    }
                }
                Ok(())
            }
            Err(e) => {
                if let Some(reason) = fatal_reason(&e) {
                    return Err(AgentError::Fatal(reason));
                }
                let delay = self.backoff.next_delay(OsRng.next_u64());
                self.reconnect_at = Instant::now() + delay;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_it() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        // The smallest draw gives the lower bound (half the base), the largest the base.
        let lows: Vec<u64> = (0..7).map(|_| b.next_delay(0).as_millis() as u64).collect();
        assert_eq!(lows, vec![500, 1000, 2000, 4000, 8000, 15000, 15000]);
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        let highs: Vec<u64> = (0..7)
            .map(|i| {
                let base = [1000u64, 2000, 4000, 8000, 16000, 30000, 30000][i];
                b.next_delay(base / 2).as_millis() as u64
            })
            .collect();
        assert_eq!(highs, vec![1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        for draw in [0, 1, 7, u64::MAX] {
            let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
            for _ in 0..64 {
                let d = b.next_delay(draw);
                assert!(d <= Duration::from_secs(5), "{d:?} over the cap");
                assert!(
                    d >= Duration::from_millis(125),
                    "{d:?} under half the first delay"
                );
            }
        }
    }

    #[test]
    fn a_login_resets_the_sequence() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
        for _ in 0..5 {
            b.next_delay(0);
        }
        b.reset();
        assert_eq!(b.next_delay(0), Duration::from_millis(500));
    }

    #[test]
    fn outages_are_retried_and_a_changed_identity_or_a_revoked_device_is_not() {
        let io = || std::io::Error::new(ErrorKind::ConnectionRefused, "refused");
        let retry = [
            LinkError::Connect {
                addr: "b:1".into(),
                source: io(),
            },
            LinkError::Closed,
            LinkError::Io(io()),
            LinkError::Refused {
                code: ErrorCode::Locked,
                message: "locked".into(),
                retry_after: Some(5),
            },
            LinkError::Tls {
                addr: "b:1".into(),
                source: std::io::Error::new(ErrorKind::ConnectionReset, "reset"),
            },
        ];
        for e in retry {
            let e = AccountError::Link(e);
            assert_eq!(fatal_reason(&e), None, "{e}");
        }
        let fatal = [
            LinkError::BrokerNotVerified,
            LinkError::Refused {
                code: ErrorCode::AuthFailed,
                message: "no".into(),
                retry_after: None,
            },
            LinkError::Tls {
                addr: "b:1".into(),
                source: std::io::Error::new(ErrorKind::InvalidData, "unknown issuer"),
            },
        ];
        for e in fatal {
            let e = AccountError::Link(e);
            assert!(fatal_reason(&e).is_some(), "{e}");
        }
    }
}
