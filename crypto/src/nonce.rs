//! The login nonce, MM-NONCE-1: a full-length HMAC-SHA256 over the TOTP time step, bound to the
//! entity, the device, the direction and the TLS connection.
//!
//! ```text
//! input = "micromsg/login-nonce/v1" || u8 direction || u64be(T) || u8 len(entity) || entity
//!         || u32be(device) || binding(32)
//! nonce = HMAC-SHA256(secret, input)
//! ```
//!
//! The client proves the client secret with direction [`Direction::ClientToBroker`]; the broker
//! answers for the same matched `T` with the server secret and [`Direction::BrokerToClient`].
//! The binding is the TLS exporter value for [`TLS_EXPORTER_LABEL`] with an empty context, so a
//! captured nonce is useless on any other connection. Refusing a second use of the same `T`
//! per device is the broker's job (it is stateful); this module is pure.

use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};
use thiserror::Error;

use crate::kdf;
use crate::secret::Secret32;
use crate::totp::{self, TotpError};

/// TLS exporter label (RFC 8446 §7.5) of the channel binding; the context is empty.
pub const TLS_EXPORTER_LABEL: &[u8] = b"EXPORTER-micromsg-login-v1";
/// Length of the TLS exporter output used as binding.
pub const BINDING_LEN: usize = 32;
/// Length of a login nonce (the full HMAC-SHA256 output).
pub const NONCE_LEN: usize = 32;
/// Default step, in seconds (the broker may set another).
pub const DEFAULT_STEP_SECS: u64 = 6;
/// Default accepted clock skew, in steps on either side.
pub const DEFAULT_SKEW_STEPS: u64 = 1;
/// Largest skew [`verify`] accepts, to keep its work bounded.
pub const MAX_SKEW_STEPS: u64 = 16;

const LABEL: &[u8] = b"micromsg/login-nonce/v1";

/// A login nonce.
pub type LoginNonce = [u8; NONCE_LEN];

/// Who proves to whom; the byte is part of the HMAC input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Direction {
    /// Client to broker, keyed by the client secret.
    ClientToBroker = 0x01,
    /// Broker to client, keyed by the server secret.
    BrokerToClient = 0x02,
}

/// Errors of the login nonce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum NonceError {
    /// The entity is empty, longer than 255 bytes, or not all ASCII digits.
    #[error("entity must be 1..=255 ASCII digits")]
    InvalidEntity,
    /// The time step could not be computed (zero step).
    #[error("time step: {0}")]
    Time(#[from] TotpError),
    /// The skew is larger than [`MAX_SKEW_STEPS`].
    #[error("skew of {0} steps exceeds {MAX_SKEW_STEPS}")]
    SkewTooLarge(u64),
    /// The presented nonce is not [`NONCE_LEN`] bytes long.
    #[error("nonce has {0} bytes, expected {NONCE_LEN}")]
    WrongLength(usize),
    /// No time step in the window gives the presented nonce.
    #[error("login nonce does not match")]
    Mismatch,
}

/// What a nonce is bound to, fixed for one login on one connection.
#[derive(Debug, Clone, Copy)]
pub struct NonceContext<'a> {
    /// The entity number, ASCII digits.
    pub entity: &'a str,
    /// The device id.
    pub device: u32,
    /// The TLS exporter value of the connection ([`TLS_EXPORTER_LABEL`], empty context).
    pub binding: &'a [u8; BINDING_LEN],
}

/// Step length and accepted skew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoncePolicy {
    /// Seconds per step; default [`DEFAULT_STEP_SECS`].
    pub step_secs: u64,
    /// Steps accepted on either side of now; default [`DEFAULT_SKEW_STEPS`].
    pub skew_steps: u64,
}

impl Default for NoncePolicy {
    fn default() -> Self {
        Self {
            step_secs: DEFAULT_STEP_SECS,
            skew_steps: DEFAULT_SKEW_STEPS,
        }
    }
}

pub(crate) fn is_valid_number(number: &str) -> bool {
    !number.is_empty() && number.len() <= 255 && number.bytes().all(|b| b.is_ascii_digit())
}

/// The nonce for time step `t`.
pub fn compute(
    secret: &Secret32,
    direction: Direction,
    ctx: &NonceContext<'_>,
    t: u64,
) -> Result<LoginNonce, NonceError> {
    if !is_valid_number(ctx.entity) {
        return Err(NonceError::InvalidEntity);
    }
    let entity_len = [ctx.entity.len() as u8]; // checked <= 255 above
    Ok(kdf::hmac_sha256(
        secret.expose(),
        &[
            LABEL,
            &[direction as u8],
            &t.to_be_bytes(),
            &entity_len,
            ctx.entity.as_bytes(),
            &ctx.device.to_be_bytes(),
            ctx.binding,
        ],
    ))
}

/// The current step and its nonce: what a client sends at `now_unix`.
pub fn compute_now(
    secret: &Secret32,
    direction: Direction,
    ctx: &NonceContext<'_>,
    now_unix: u64,
    step_secs: u64,
) -> Result<(u64, LoginNonce), NonceError> {
    let t = totp::time_step(now_unix, 0, step_secs)?;
    Ok((t, compute(secret, direction, ctx, t)?))
}

/// Checks `presented` against every step in `T - skew ..= T + skew` (T from `now_unix`), in
/// constant time and without stopping at a match. Returns the matched step, which the broker
/// must record to refuse a replay and use for its answer.
pub fn verify(
    secret: &Secret32,
    direction: Direction,
    ctx: &NonceContext<'_>,
    policy: &NoncePolicy,
    now_unix: u64,
    presented: &[u8],
) -> Result<u64, NonceError> {
    if policy.skew_steps > MAX_SKEW_STEPS {
        return Err(NonceError::SkewTooLarge(policy.skew_steps));
    }
    let now_t = totp::time_step(now_unix, 0, policy.step_secs)?;
    if presented.len() != NONCE_LEN {
        return Err(NonceError::WrongLength(presented.len()));
    }
    let first = now_t.saturating_sub(policy.skew_steps);
    let last = now_t.saturating_add(policy.skew_steps);
    let mut found = Choice::from(0);
    let mut matched_t = 0u64;
    for t in first..=last {
        let candidate = compute(secret, direction, ctx, t)?;
        let hit = candidate.ct_eq(presented);
        matched_t.conditional_assign(&t, hit);
        found |= hit;
    }
    if bool::from(found) {
        Ok(matched_t)
    } else {
        Err(NonceError::Mismatch)
    }
}

/// Checks `presented` against the single step `t`, in constant time: how a client checks the
/// broker's answer, which must be for the step the client itself used.
pub fn verify_step(
    secret: &Secret32,
    direction: Direction,
    ctx: &NonceContext<'_>,
    t: u64,
    presented: &[u8],
) -> Result<(), NonceError> {
    if presented.len() != NONCE_LEN {
        return Err(NonceError::WrongLength(presented.len()));
    }
    let expected = compute(secret, direction, ctx, t)?;
    if bool::from(expected.ct_eq(presented)) {
        Ok(())
    } else {
        Err(NonceError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_window() {
        let secret = Secret32::from_bytes([5; 32]);
        let binding = [7u8; 32];
        let ctx = NonceContext {
            entity: "5550001234",
            device: 1,
            binding: &binding,
        };
        let policy = NoncePolicy::default();
        let now = 1_700_000_000;
        let (t, n) =
            compute_now(&secret, Direction::ClientToBroker, &ctx, now, 6).unwrap_or_default();
        assert_eq!(t, 283_333_333);
        assert_eq!(
            verify(
                &secret,
                Direction::ClientToBroker,
                &ctx,
                &policy,
                now + 6,
                &n
            ),
            Ok(t)
        );
        assert_eq!(
            verify(
                &secret,
                Direction::ClientToBroker,
                &ctx,
                &policy,
                now + 12,
                &n
            ),
            Err(NonceError::Mismatch)
        );
        assert_eq!(
            verify(
                &secret,
                Direction::ClientToBroker,
                &ctx,
                &policy,
                now,
                &n[..31]
            ),
            Err(NonceError::WrongLength(31))
        );
        let answer = compute(&secret, Direction::BrokerToClient, &ctx, t);
        let Ok(answer) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(
            verify_step(&secret, Direction::BrokerToClient, &ctx, t, &answer),
            Ok(())
        );
        assert_eq!(
            verify_step(&secret, Direction::BrokerToClient, &ctx, t + 1, &answer),
            Err(NonceError::Mismatch)
        );
        let bad = NonceContext {
            entity: "55a",
            ..ctx
        };
        assert_eq!(
            compute(&secret, Direction::ClientToBroker, &bad, 0),
            Err(NonceError::InvalidEntity)
        );
    }
}
