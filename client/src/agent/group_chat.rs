//! Groups (docs/groups.md): create, change, send, and the frames and ops that arrive.

use micromsg_crypto::message::{Kind, OfflineEnvelope};
use micromsg_wire::Number;

use crate::account::unix_now;
use crate::groups::{self, Change, Early, Frame, Group, GroupEntry, Payload};
use crate::store::Direction;

use super::queue::Attempt;
use super::{Agent, Notice, Reply};

/// The first 8 digits of a group id, for messages.
pub(super) fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// How a group frame went to one member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum GroupDelivery {
    /// Over the live session.
    Live,
    /// Deposited at the broker.
    Deposited,
    /// In the outbox, waiting for the broker: why.
    Queued(String),
}

impl Agent {
    // ---- groups (docs/groups.md) ----

    /// True when this device can reach `number` end to end: a live session or a stored one.
    pub(super) fn reachable(&self, number: &str) -> bool {
        self.sessions.contains_key(number) || matches!(self.store.load_session(number), Ok(Some(_)))
    }

    /// The short-lived agent of a one-shot command does not watch the inbox: bring the group
    /// state up to date first.
    pub(super) async fn refresh_groups(&mut self) {
        if !self.config.inbox {
            self.fetch_inbox().await;
        }
    }

    /// A group this entity is a member of, by id or prefix, with its state brought up to date.
    async fn my_group(&mut self, query: &str) -> Result<Group, Reply> {
        self.refresh_groups().await;
        let group = self.find_group(query).map_err(Reply::err)?;
        if !group.state.is_member(&self.info.number) {
            return Err(Reply::err(format!(
                "you are not a member of group {:?} ({})",
                group.state.name, group.id
            )));
        }
        Ok(group)
    }

    /// Finds a group by id or prefix.
    pub(super) fn find_group(&self, query: &str) -> Result<Group, String> {
        let ids = self.store.group_ids().map_err(|e| e.to_string())?;
        let id = groups::resolve(&ids, query)?;
        match self.store.load_group(id) {
            Ok(Some(g)) => Ok(g),
            Ok(None) => Err(format!("no group {query:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Sends one group frame to `member`: over the live session when there is one (with the
    /// copies of 13.3), else sealed with this device's latest session through the outbox
    /// (deposited now, or queued until the broker takes it). `Ok` with how it went, `Err` with
    /// why it did not go at all.
    pub(super) async fn group_deliver(
        &mut self,
        member: &str,
        frame: &Frame,
    ) -> Result<GroupDelivery, String> {
        let bytes = frame.encode();
        if let Some((sender, session_id)) = self.sessions.get(member).cloned() {
            // A session that ended just now falls through to the outbox; any other failure
            // is final (the stored keys are the live session's while it runs, and must not
            // seal offline).
            let sealed = match sender.send_group(bytes.clone()).await {
                Ok(rx) => rx.await.ok(),
                Err(crate::p2p::SendError::Closed) => None,
                Err(e) => return Err(format!("sending to {member}: {e}")),
            };
            let Some(sealed) = sealed else {
                // The session ended: its keys are free for sealing offline now.
                if self
                    .sessions
                    .get(member)
                    .is_some_and(|(_, id)| *id == session_id)
                {
                    self.sessions.remove(member);
                }
                return self.group_deliver_offline(member, frame, &bytes).await;
            };
            if self.config.copies {
                let envelope = OfflineEnvelope {
                    session_id,
                    frame: &sealed.frame,
                }
                .encode();
                self.deposit_copy(member, envelope.clone()).await;
                self.sync_copy(member, envelope).await;
            }
            return Ok(GroupDelivery::Live);
        }
        self.group_deliver_offline(member, frame, &bytes).await
    }

    /// A group frame for `member` without a live session: sealed with the stored session
    /// through the outbox.
    async fn group_deliver_offline(
        &mut self,
        member: &str,
        frame: &Frame,
        bytes: &[u8],
    ) -> Result<GroupDelivery, String> {
        if !matches!(self.store.load_session(member), Ok(Some(_))) {
            return Err(self.not_a_contact(member));
        }
        let what = match &frame.payload {
            Payload::Message { text, .. } => text.clone(),
            Payload::Op(_) | Payload::State(_) => "(a change to the group)".to_owned(),
        };
        let id = self
            .queue_sealed(member, Kind::Group, bytes, &what, Some(&frame.group))
            .await?;
        match self.flush_outbox(Some((member, &id))).await.remove(&id) {
            Some(Attempt::Deposited { .. }) => Ok(GroupDelivery::Deposited),
            Some(Attempt::Failed { reason }) => Err(reason),
            Some(Attempt::Waiting { reason }) => Ok(GroupDelivery::Queued(reason)),
            None if self.link.is_none() => Ok(GroupDelivery::Queued(
                "the broker cannot be reached now".into(),
            )),
            None => Ok(GroupDelivery::Queued(
                "messages queued before it go first".into(),
            )),
        }
    }

    /// Sends planned frames; returns how each member was reached (`live`, `deposited`,
    /// `queued: why` or `failed: why`).
    pub(super) async fn group_send_all(&mut self, plan: Vec<(String, Frame)>) -> serde_json::Value {
        let mut delivered = serde_json::Map::new();
        for (member, frame) in plan {
            let how = match self.group_deliver(&member, &frame).await {
                Ok(GroupDelivery::Live) => "live".to_owned(),
                Ok(GroupDelivery::Deposited) => "deposited".to_owned(),
                Ok(GroupDelivery::Queued(why)) => format!("queued: {why}"),
                Err(e) => {
                    self.warn(format!("group {}: {e}", short(&frame.group)))
                        .await;
                    format!("failed: {e}")
                }
            };
            delivered.insert(member, serde_json::Value::String(how));
        }
        serde_json::Value::Object(delivered)
    }

    pub(super) fn group_reply(
        &self,
        message: String,
        group: &Group,
        delivered: serde_json::Value,
    ) -> Reply {
        Reply::ok(message).with(serde_json::json!({
            "group": group.id,
            "name": group.state.name,
            "members": group.state.members,
            "version": group.state.version,
            "delivered": delivered,
        }))
    }

    pub(super) async fn group_create(&mut self, name: String, members: Vec<String>) -> Reply {
        if name.len() > groups::MAX_NAME_LEN {
            return Reply::err(format!(
                "the name is longer than {} bytes",
                groups::MAX_NAME_LEN
            ));
        }
        let me = self.info.number.clone();
        let mut list = vec![me.clone()];
        for m in members {
            if Number::new(m.clone()).is_err() {
                return Reply::err(format!("{m:?} is not a number"));
            }
            if m != me && !list.contains(&m) {
                list.push(m);
            }
        }
        let strangers: Vec<&String> = list.iter().skip(1).filter(|m| !self.reachable(m)).collect();
        if !strangers.is_empty() {
            let names: Vec<&str> = strangers.iter().map(|s| s.as_str()).collect();
            return Reply::err(format!(
                "not contacts of yours yet (no session on this device): {}; add each first: {}",
                names.join(", "),
                self.profile.command("contact add NUMBER")
            ));
        }
        let group = Group::new(&groups::new_id());
        let before = group.state.clone();
        let op = group.new_op(
            &me,
            Change::Create {
                name: name.clone(),
                members: list,
            },
        );
        let message = format!("created group {name:?} ({})", group.id);
        self.apply_own_op(group, before, op, message).await
    }

    pub(super) async fn group_change(&mut self, query: &str, change: Change) -> Reply {
        let me = self.info.number.clone();
        let group = match self.my_group(query).await {
            Ok(g) => g,
            Err(reply) => return reply,
        };
        let what = match &change {
            Change::Add(m) => {
                if Number::new(m.clone()).is_err() {
                    return Reply::err(format!("{m:?} is not a number"));
                }
                if group.state.is_member(m) {
                    return Reply::err(format!("{m} is already a member"));
                }
                if !self.reachable(m) {
                    return Reply::err(self.not_a_contact(m));
                }
                format!("added {m} to")
            }
            Change::Remove(m) => {
                if *m == me {
                    return Reply::err("to remove yourself, use `group leave`");
                }
                if !group.state.is_member(m) {
                    return Reply::err(format!("{m} is not a member"));
                }
                format!("removed {m} from")
            }
            Change::Leave => "left".to_owned(),
            Change::Rename(name) => {
                if name.len() > groups::MAX_NAME_LEN {
                    return Reply::err(format!(
                        "the name is longer than {} bytes",
                        groups::MAX_NAME_LEN
                    ));
                }
                "renamed".to_owned()
            }
            Change::Create { .. } => return Reply::err("a group is created only once"),
        };
        let before = group.state.clone();
        let op = group.new_op(&me, change);
        let message = format!("{what} group {:?} ({})", group.state.name, group.id);
        self.apply_own_op(group, before, op, message).await
    }

    /// Merges an op this device made, stores the group, and sends the op (or the state) to
    /// the members who need it; the reply names how each was reached.
    async fn apply_own_op(
        &mut self,
        mut group: Group,
        before: groups::GroupState,
        op: groups::Op,
        message: String,
    ) -> Reply {
        let me = self.info.number.clone();
        let new = group.merge([op]);
        let saved = group.clone();
        if let Err(e) = self.on_disk(move |s| s.save_group(&saved)).await {
            return Reply::err(format!("saving the group: {e}"));
        }
        let plan = groups::plan_control(&before, &group, &new, &me, &[]);
        let delivered = self.group_send_all(plan).await;
        self.group_reply(message, &group, delivered)
    }

    pub(super) async fn group_send(&mut self, query: &str, text: String) -> Reply {
        let me = self.info.number.clone();
        let group = match self.my_group(query).await {
            Ok(g) => g,
            Err(reply) => return reply,
        };
        let now = unix_now();
        let entry = GroupEntry {
            id: groups::new_id(),
            from: me.clone(),
            text: text.clone(),
            sent: now,
            received: now,
        };
        let (id, saved) = (group.id.clone(), entry.clone());
        if let Err(e) = self
            .on_disk(move |s| s.append_group_message(&id, &saved))
            .await
        {
            return Reply::err(format!("saving the group history: {e}"));
        }
        let frame = Frame {
            group: group.id.clone(),
            payload: Payload::Message {
                id: entry.id.clone(),
                text,
                sent: now,
            },
        };
        let plan = groups::message_recipients(&group.state, &me)
            .into_iter()
            .map(|m| (m, frame.clone()))
            .collect();
        let delivered = self.group_send_all(plan).await;
        // Members the message has not reached (queued on this device, or not sent at all):
        // the command says who, and fails, so a script knows; queued copies still go out.
        let unreached: Vec<String> = delivered
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(member, how)| {
                let how = how.as_str().unwrap_or_default();
                (how != "live" && how != "deposited").then(|| format!("{member} ({how})"))
            })
            .collect();
        if !unreached.is_empty() {
            return Reply::err(format!(
                "sent to group {:?} ({}), but not yet to: {}; queued copies go out by \
                 themselves (`{}` lists them)",
                group.state.name,
                group.id,
                unreached.join(", "),
                self.profile.command("outbox")
            ))
            .with(serde_json::json!({"group": group.id, "delivered": delivered}));
        }
        self.group_reply(
            format!("sent to group {:?} ({})", group.state.name, group.id),
            &group,
            delivered,
        )
    }

    /// A GROUP frame from `peer` (`In`), or a copy of one another device of this entity sent
    /// to `peer` (`Out`). Bad or unwelcome frames are dropped (docs/groups.md section 3).
    /// Applies a group frame. True when the group layer is done with it (stored, a repeat,
    /// or dropped for good), false when it must be processed again: a write failed, or it
    /// is held until the change that makes it acceptable arrives.
    pub(super) async fn on_group_frame(
        &mut self,
        peer: &str,
        direction: Direction,
        payload: &[u8],
        time: u64,
        offline: bool,
    ) -> bool {
        let frame = match Frame::decode(payload) {
            Ok(f) => f,
            Err(e) => {
                self.warn(format!("dropped a group frame from {peer}: {e}"))
                    .await;
                return true;
            }
        };
        let me = self.info.number.clone();
        let mut group = match self.store.load_group(&frame.group) {
            Ok(Some(g)) => g,
            Ok(None) => Group::new(&frame.group),
            Err(e) => {
                self.warn(format!("reading group {}: {e}", short(&frame.group)))
                    .await;
                return false;
            }
        };
        match frame.payload {
            Payload::Message { id, text, sent } => {
                let from = match direction {
                    Direction::In => peer.to_owned(),
                    Direction::Out => me.clone(),
                };
                let entry = GroupEntry {
                    id,
                    from: from.clone(),
                    text,
                    sent: if sent == 0 { time } else { sent },
                    received: unix_now(),
                };
                if direction == Direction::In && !groups::accepts_message(&group.state, peer, &me) {
                    if group.may_be_early(peer, &me) {
                        let early = Early {
                            group: group.id.clone(),
                            from,
                            entry,
                            held_at: unix_now(),
                            offline,
                        };
                        self.hold_early(early).await;
                        return false;
                    }
                    return true;
                }
                self.show_group_message(&group, entry, offline).await
            }
            Payload::Op(op) => {
                self.on_group_ops(peer, direction, &mut group, vec![op])
                    .await
            }
            Payload::State(ops) => self.on_group_ops(peer, direction, &mut group, ops).await,
        }
    }

    /// Stores a group message in the history and shows it (once: duplicates are skipped).
    /// False when the history could not be written.
    pub(super) async fn show_group_message(
        &mut self,
        group: &Group,
        entry: GroupEntry,
        offline: bool,
    ) -> bool {
        let (id, saved) = (group.id.clone(), entry.clone());
        match self
            .on_disk(move |s| s.append_group_message(&id, &saved))
            .await
        {
            Ok(true) => {
                self.notify(Notice::GroupMessage {
                    group: group.id.clone(),
                    name: group.state.name.clone(),
                    from: entry.from,
                    text: entry.text,
                    time: entry.sent,
                    offline,
                })
                .await;
            }
            Ok(false) => {}
            Err(e) => {
                self.warn(format!("saving the group history: {e}")).await;
                return false;
            }
        }
        true
    }

    pub(super) async fn hold_early(&mut self, early: Early) {
        for gone in self.early.hold(early, unix_now()) {
            self.warn(format!(
                "dropped a message from {} for group {}: it came before the change that \
                 made it acceptable, and that change did not come in time",
                gone.from,
                short(&gone.group)
            ))
            .await;
        }
    }

    /// Merges ops into the group and stores it. False when it could not be stored.
    pub(super) async fn on_group_ops(
        &mut self,
        peer: &str,
        direction: Direction,
        group: &mut Group,
        ops: Vec<groups::Op>,
    ) -> bool {
        if direction == Direction::In && !group.accepts_from(peer, &ops) {
            return true;
        }
        let me = self.info.number.clone();
        let known = !group.log.is_empty();
        let before = group.state.clone();
        let new = group.merge(ops);
        if new.is_empty() {
            return true;
        }
        let saved = group.clone();
        if let Err(e) = self.on_disk(move |s| s.save_group(&saved)).await {
            self.warn(format!("saving group {}: {e}", short(&group.id)))
                .await;
            return false;
        }
        for op in &new {
            let change = match &op.change {
                Change::Create { .. } => "created".to_owned(),
                Change::Add(m) => format!("added {m}"),
                Change::Remove(m) => format!("removed {m}"),
                Change::Leave => "left".to_owned(),
                Change::Rename(_) => "renamed".to_owned(),
            };
            self.notify(Notice::GroupChanged {
                group: group.id.clone(),
                name: group.state.name.clone(),
                by: op.author.clone(),
                change,
                members: group.state.members.clone(),
                version: group.state.version,
            })
            .await;
        }
        // Messages that overtook these ops may be acceptable now.
        for early in self.early.take(&group.id, unix_now()) {
            if groups::accepts_message(&group.state, &early.from, &me) {
                self.show_group_message(group, early.entry, early.offline)
                    .await;
            } else if group.may_be_early(&early.from, &me) {
                self.hold_early(early).await;
            }
        }
        // Relay what was new to the members this device knows (docs/groups.md section 3):
        // a member the author did not know of yet still hears of it. A device that just
        // learned of the group relays nothing (its sender knew all it knows); copies from
        // another device of this entity were relayed by that device.
        if direction == Direction::In && known && before.is_member(&me) {
            let plan = groups::plan_control(&before, group, &new, &me, &[peer])
                .into_iter()
                .filter(|(m, _)| self.reachable(m))
                .collect();
            self.group_send_all(plan).await;
        }
        true
    }
}
