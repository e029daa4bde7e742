//! Sessions between members of a group who are not each other's contacts (docs/groups.md
//! section 3, "Sessions between members"). A group frame for such a member waits in the outbox,
//! unsealed, while this device asks the member for a session (INITIATE-NEW); the member's
//! device accepts a request from a fellow member by itself
//! ([`AgentConfig::accept_group_members`](super::AgentConfig)); each side checks, before it
//! pins anything, that the identity key presented in the P2P handshake is the one the group
//! state carries for that number; once the session is up, the waiting frames go out over it.

use micromsg_crypto::identity::IdentityPublicKey;

use crate::account::unix_now;
use crate::groups::Frame;
use crate::inbox::new_message_id;
use crate::outbox::Queued;

use super::group_chat::short;
use super::outbound::Outbound;
use super::{Agent, Delivered};

/// What the groups this device is a member of say about a number's identity key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MemberKey {
    /// The number is a member of none of them.
    NotAMember,
    /// Every group that has it as a member carries this key (group id of one of them).
    Carried(Box<IdentityPublicKey>, String),
    /// Two groups carry different keys for it: trust neither.
    Conflicting,
}

impl Agent {
    /// The identity key the groups this device is a member of carry for `number`.
    pub(super) fn member_key(&self, number: &str) -> MemberKey {
        let me = &self.info.number;
        let mut found: Option<(IdentityPublicKey, String)> = None;
        for id in self.store.group_ids().unwrap_or_default() {
            let Ok(Some(group)) = self.store.load_group(&id) else {
                continue;
            };
            if !group.state.is_member(me) {
                continue;
            }
            let Some(key) = group.state.key_of(number) else {
                continue;
            };
            match &found {
                Some((k, _)) if k != key => return MemberKey::Conflicting,
                Some(_) => {}
                None => found = Some((*key, group.id.clone())),
            }
        }
        match found {
            Some((key, group)) => MemberKey::Carried(Box::new(key), group),
            None => MemberKey::NotAMember,
        }
    }

    /// Whether a contact request from `from`, who is not a contact, is accepted because it is a
    /// fellow member: the setting is on and a group this device is a member of carries a key
    /// for it (the handshake must then present that key, [`Self::check_member_key`]).
    pub(super) fn accepts_as_member(&self, from: &str) -> bool {
        self.config.accept_group_members && matches!(self.member_key(from), MemberKey::Carried(..))
    }

    /// Before a first pin of `peer`'s key: when a group carries a key for `peer`, the handshake
    /// must have presented that one (the broker that routed the request authenticated only
    /// the number). `Err` says why the session is refused.
    pub(super) fn check_member_key(
        &self,
        peer: &str,
        presented: &IdentityPublicKey,
    ) -> Result<(), String> {
        let pinned = matches!(self.store.contact(peer), Ok(Some(c)) if c.identity.is_some());
        if pinned {
            // The pin decides (and an op carrying another key was refused at merge).
            return Ok(());
        }
        match self.member_key(peer) {
            MemberKey::NotAMember => Ok(()),
            MemberKey::Carried(key, _) if *key == *presented => Ok(()),
            MemberKey::Carried(key, group) => Err(format!(
                "{peer} presented identity key {} but group {} carries {} for {peer}: refusing \
                 the session (someone may be impersonating {peer}); compare safety numbers \
                 with {peer} out of band",
                presented.to_hex(),
                short(&group),
                key.to_hex()
            )),
            MemberKey::Conflicting => Err(format!(
                "groups you are in carry different identity keys for {peer}: refusing the \
                 session; compare safety numbers with {peer} out of band"
            )),
        }
    }

    /// A group frame for a member this device has no session with: kept in the outbox,
    /// unsealed, until one is up; a running agent asks the member for one now.
    pub(super) async fn queue_for_session(
        &mut self,
        peer: &str,
        frame: &Frame,
        shown: &str,
    ) -> Result<Delivered, String> {
        let payload = String::from_utf8(frame.encode())
            .map_err(|e| format!("encoding the group frame: {e}"))?;
        let id = new_message_id().to_hex();
        self.outbox.push(Queued {
            id: id.clone(),
            to: peer.to_owned(),
            text: shown.to_owned(),
            queued_at: unix_now(),
            session: String::new(),
            counter: 0,
            envelope: String::new(),
            attempts: 0,
            next_attempt: 0,
            last_error: None,
            failed: None,
            group: Some(frame.group.clone()),
            unsealed: Some(payload),
            moved: false,
            copy: None,
        });
        if let Err(e) = self.persist_outbox().await {
            self.outbox.retain(|q| q.id != id);
            return Err(e);
        }
        self.ask_for_session(peer).await;
        let when = if self.config.announce {
            "asked for one; it goes out once the session is up"
        } else {
            "it goes out once `listen` has set one up"
        };
        Ok(Delivered::Queued {
            id,
            reason: format!("no session with {peer} yet (not a contact of yours); {when}"),
        })
    }

    /// A session with `peer` is up: the group frames that waited for it go out over it, in
    /// order.
    pub(super) async fn send_awaiting(&mut self, peer: &str) {
        let waiting: Vec<Queued> = self
            .outbox
            .iter()
            .filter(|q| q.to == peer && q.awaits_session())
            .cloned()
            .collect();
        if waiting.is_empty() {
            return;
        }
        for item in waiting {
            let Some(frame) = item
                .unsealed
                .as_deref()
                .and_then(|p| Frame::decode(p.as_bytes()).ok())
            else {
                self.outbox.retain(|q| q.id != item.id);
                continue;
            };
            match self.deliver_to(peer, Outbound::Group(&frame)).await {
                Ok(_) => self.outbox.retain(|q| q.id != item.id),
                Err(e) => {
                    self.warn(format!("group {}: {e}", short(&frame.group)))
                        .await;
                    break;
                }
            }
        }
        if let Err(e) = self.persist_outbox().await {
            self.warn(e).await;
        }
    }

    /// At start, after a reconnect and every `member_retry`: ask every member that group
    /// frames wait for for a session (one that was offline the last time may be back).
    pub(super) async fn ask_awaited_members(&mut self) {
        let mut peers: Vec<String> = self
            .outbox
            .iter()
            .filter(|q| q.awaits_session())
            .map(|q| q.to.clone())
            .collect();
        peers.sort();
        peers.dedup();
        for peer in peers {
            self.ask_for_session(&peer).await;
        }
    }
}
