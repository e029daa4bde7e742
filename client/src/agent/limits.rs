//! How long a message may be, known before it is sent. Every text goes through the broker at
//! least once (the copy for the contact's other devices, the SYNC-COPY for this entity's, or
//! the deposit itself), sealed in an offline envelope, base64 in a YAML frame. So the broker's
//! MESSAGE-MAX and MAX-FRAME from BROKER-INFO bound it, as well as the session's frame limit.
//! Too long a text is refused before anything leaves the device: no request that the broker
//! would answer by closing the link.

use micromsg_crypto::aead::TAG_LEN;
use micromsg_crypto::message::{MAX_HEADER_STRING_LEN, OFFLINE_MAGIC, PREFIX_LEN};
use micromsg_wire::DEFAULT_MAX_FRAME_LEN;
use micromsg_wire::message::response::InfoLimits;

use crate::p2p::SessionConfig;

/// An offline envelope's bytes besides the text: magic, session id, the sealed frame's prefix,
/// its longest header string and tag, the kind byte and the body's tag.
pub(super) const ENVELOPE_OVERHEAD: usize =
    OFFLINE_MAGIC.len() + 16 + PREFIX_LEN + MAX_HEADER_STRING_LEN + TAG_LEN + 1 + TAG_LEN;

/// Room for the YAML of a DEPOSIT or SYNC-COPY request around its base64 BODY (the keys, a
/// number, two hex ids; about 150 bytes, with a margin).
pub(super) const REQUEST_YAML_SLACK: usize = 512;

/// What a group message carries besides its text (group id, version, sender, message id and
/// their encoding; docs/groups.md), with a margin.
pub(super) const GROUP_OVERHEAD: usize = 1024;

/// The broker's limits that bound a message, from BROKER-INFO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BrokerLimits {
    /// MAX-FRAME: the largest request frame body.
    pub(super) max_frame: u32,
    /// MESSAGE-MAX: the largest DEPOSIT / SYNC-COPY body.
    pub(super) message_max: u32,
    /// MESSAGE-TTL: how long an inbox item lives, seconds.
    pub(super) message_ttl: u64,
}

impl Default for BrokerLimits {
    /// The broker's defaults, until BROKER-INFO says otherwise (an agent that started offline).
    fn default() -> Self {
        Self {
            max_frame: DEFAULT_MAX_FRAME_LEN,
            message_max: 48_000,
            message_ttl: 30 * 24 * 3600,
        }
    }
}

impl From<&InfoLimits> for BrokerLimits {
    fn from(l: &InfoLimits) -> Self {
        Self {
            max_frame: l.max_frame,
            message_max: l.message_max,
            message_ttl: l.message_ttl,
        }
    }
}

impl BrokerLimits {
    /// The longest text, in bytes, that goes out in every way it may have to: live on a
    /// session with `session`, and sealed through this broker.
    pub(super) fn max_text_len(&self, session: &SessionConfig) -> usize {
        let body_in_frame = (self.max_frame as usize).saturating_sub(REQUEST_YAML_SLACK) / 4 * 3;
        let body = body_in_frame.min(self.message_max as usize);
        body.saturating_sub(ENVELOPE_OVERHEAD)
            .min(session.max_text_len())
    }

    /// `Err` with a message for people when `text` is too long (for a group message when
    /// `group`).
    pub(super) fn check(
        &self,
        text: &str,
        group: bool,
        session: &SessionConfig,
    ) -> Result<(), String> {
        let overhead = if group { GROUP_OVERHEAD } else { 0 };
        let max = self.max_text_len(session).saturating_sub(overhead);
        if text.len() <= max {
            return Ok(());
        }
        Err(format!(
            "message too long: {} bytes, and this broker carries {} of at most {max} bytes \
             (its MESSAGE-MAX is {} bytes and MAX-FRAME {}); nothing was sent",
            text.len(),
            if group { "group texts" } else { "texts" },
            self.message_max,
            self.max_frame
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_broker_carries_a_text_just_under_its_message_max() {
        let max = BrokerLimits::default().max_text_len(&SessionConfig::default());
        assert_eq!(max, 48_000 - ENVELOPE_OVERHEAD);
        // Its envelope in base64 still fits a default frame with the request's YAML.
        assert!((max + ENVELOPE_OVERHEAD).div_ceil(3) * 4 + REQUEST_YAML_SLACK <= 65_536);
    }

    #[test]
    fn a_small_frame_limit_binds_before_message_max() {
        let limits = BrokerLimits {
            max_frame: 4096,
            message_max: 1_000_000,
            ..BrokerLimits::default()
        };
        let max = limits.max_text_len(&SessionConfig::default());
        assert_eq!(max, (4096 - REQUEST_YAML_SLACK) / 4 * 3 - ENVELOPE_OVERHEAD);
    }

    #[test]
    fn a_text_over_the_limit_is_refused_with_the_limit_and_nothing_sent() {
        let limits = BrokerLimits::default();
        let session = SessionConfig::default();
        let max = limits.max_text_len(&session);
        assert!(limits.check(&"x".repeat(max), false, &session).is_ok());
        let err = limits
            .check(&"x".repeat(max + 1), false, &session)
            .expect_err("one byte over");
        assert!(err.contains(&format!("at most {max} bytes")), "{err}");
        assert!(err.contains("nothing was sent"), "{err}");
        let err = limits
            .check(&"x".repeat(max), true, &session)
            .expect_err("a group text has less room");
        assert!(err.contains("group texts"), "{err}");
    }
}
