//! Groups (docs/groups.md): create, change, send, and the frames and ops that arrive. Every
//! control op this device makes is signed with its identity key; every op that arrives is
//! checked against the keys the group state carries and this device's pins.

use std::collections::BTreeMap;

use micromsg_crypto::identity::IdentityPublicKey;
use micromsg_wire::Number;

use crate::account::unix_now;
use crate::groups::{self, Change, Early, Frame, FrameError, Group, GroupEntry, Member, Payload};
use crate::store::{Direction, StoreError};

use super::outbound::Outbound;
use super::{Agent, Answer, CommandError, GroupReport, MemberDelivery, Notice, Output, refused};

/// The first 8 digits of a group id, for messages.
pub(super) fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// A change a member asks for (the `group add|remove|leave|rename` commands); the agent makes
/// the signed op, adding the identity key it pinned for an added member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Edit {
    /// Add this number.
    Add(String),
    /// Remove this number.
    Remove(String),
    /// Leave.
    Leave,
    /// Rename.
    Rename(String),
}

impl Agent {
    // ---- groups (docs/groups.md) ----

    /// The identity key this device pinned for `number`, which a `create` or an `add` by this
    /// device carries into the group state; refused when none is pinned yet or the contact
    /// presented another one since.
    fn pinned_member(&self, number: &str) -> Result<Member, String> {
        let contact = match self.store.contact(number) {
            Ok(c) => c,
            Err(e) => return Err(format!("reading contact {number}: {e}")),
        };
        match contact {
            Some(c) if c.presented.is_some() => Err(format!(
                "{number}'s identity key CHANGED since it was pinned; compare safety numbers \
                 out of band and re-pin before adding {number} to a group"
            )),
            Some(c) => match c.identity {
                Some(key) => Ok(Member {
                    number: number.to_owned(),
                    key,
                }),
                None => Err(self.not_a_contact(number)),
            },
            None => Err(self.not_a_contact(number)),
        }
    }

    /// The keys this device holds for numbers: each contact's pin, and its own key. Ops that
    /// carry another key for one of them are refused (docs/groups.md section 2.2).
    pub(super) fn pins(&self) -> BTreeMap<String, IdentityPublicKey> {
        let mut pins: BTreeMap<String, IdentityPublicKey> = self
            .store
            .contacts()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(number, c)| c.identity.map(|k| (number, k)))
            .collect();
        pins.insert(self.info.number.clone(), self.identity.public_key());
        pins
    }

    /// True when this device can reach `number` end to end: a live session or a stored one
    /// the peer confirmed (12.3).
    pub(super) fn reachable(&self, number: &str) -> bool {
        self.sessions.contains_key(number) || matches!(self.store.send_session(number), Ok(Some(_)))
    }

    /// The short-lived agent of a one-shot command does not watch the inbox: bring the group
    /// state up to date first.
    pub(super) async fn refresh_groups(&mut self) {
        if !self.config.inbox {
            self.fetch_inbox().await;
        }
    }

    /// A group this entity is a member of, by id or prefix, with its state brought up to date.
    async fn my_group(&mut self, query: &str) -> Result<Group, CommandError> {
        self.refresh_groups().await;
        let group = self.find_group(query).map_err(refused)?;
        if !group.state.is_member(&self.info.number) {
            return Err(refused(format!(
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

    /// Sends planned frames, each through the one outbound path; how each member was
    /// reached.
    pub(super) async fn group_send_all(
        &mut self,
        plan: Vec<(String, Frame)>,
    ) -> BTreeMap<String, MemberDelivery> {
        let mut delivered = BTreeMap::new();
        for (member, frame) in plan {
            let how = self.deliver_to(&member, Outbound::Group(&frame)).await;
            if let Err(e) = &how {
                self.warn(format!("group {}: {e}", short(&frame.group)))
                    .await;
            }
            delivered.insert(member, MemberDelivery::from(how));
        }
        delivered
    }

    pub(super) fn group_reply(
        &self,
        message: String,
        group: &Group,
        delivered: BTreeMap<String, MemberDelivery>,
    ) -> Answer {
        Ok(Output::said(message).with(GroupReport {
            group: group.id.clone(),
            name: group.state.name.clone(),
            members: group.state.members.clone(),
            version: group.state.version,
            delivered,
        }))
    }

    pub(super) async fn group_create(&mut self, name: String, members: Vec<String>) -> Answer {
        if name.len() > groups::MAX_NAME_LEN {
            return Err(refused(format!(
                "the name is longer than {} bytes",
                groups::MAX_NAME_LEN
            )));
        }
        let me = self.info.number.clone();
        let mut list = vec![me.clone()];
        for m in members {
            if Number::new(m.clone()).is_err() {
                return Err(refused(crate::store::not_a_number(&m)));
            }
            if m != me && !list.contains(&m) {
                list.push(m);
            }
        }
        let strangers: Vec<&String> = list.iter().skip(1).filter(|m| !self.reachable(m)).collect();
        if !strangers.is_empty() {
            let names: Vec<&str> = strangers.iter().map(|s| s.as_str()).collect();
            return Err(refused(format!(
                "not contacts of yours yet (no session on this device): {}; add each first: {}",
                names.join(", "),
                self.profile.command("contact add NUMBER")
            )));
        }
        let mut keyed = Vec::with_capacity(list.len());
        for m in list.iter().skip(1) {
            keyed.push(self.pinned_member(m).map_err(refused)?);
        }
        let (group, op) = Group::create(&self.identity, &me, name.clone(), keyed);
        let before = group.state.clone();
        let message = format!("created group {name:?} ({})", group.id);
        self.apply_own_op(group, before, op, message).await
    }

    pub(super) async fn group_change(&mut self, query: &str, edit: Edit) -> Answer {
        let me = self.info.number.clone();
        let group = match self.my_group(query).await {
            Ok(g) => g,
            Err(e) => return Err(e),
        };
        let (what, change) = match edit {
            Edit::Add(m) => {
                if Number::new(m.clone()).is_err() {
                    return Err(refused(crate::store::not_a_number(&m)));
                }
                if group.state.is_member(&m) {
                    return Err(refused(format!("{m} is already a member")));
                }
                if group.state.is_member(&m) {
                    return Err(refused(format!("{m} is already a member")));
                }
                if !self.reachable(&m) {
                    return Err(refused(self.not_a_contact(&m)));
                }
                let member = self.pinned_member(&m).map_err(refused)?;
                (format!("added {m} to"), Change::Add(member))
            }
            Edit::Remove(m) => {
                if m == me {
                    return Err(refused("to remove yourself, use `group leave`"));
                }
                if !group.state.is_member(&m) {
                    return Err(refused(format!("{m} is not a member")));
                }
                (format!("removed {m} from"), Change::Remove(m))
            }
            Edit::Leave => ("left".to_owned(), Change::Leave),
            Edit::Rename(name) => {
                if name.len() > groups::MAX_NAME_LEN {
                    return Err(refused(format!(
                        "the name is longer than {} bytes",
                        groups::MAX_NAME_LEN
                    )));
                }
                ("renamed".to_owned(), Change::Rename(name))
            }
        };
        let before = group.state.clone();
        let op = group.new_op(&self.identity, &me, change);
        let message = format!("{what} group {:?} ({})", group.state.name, group.id);
        self.apply_own_op(group, before, op, message).await
    }

    /// The `move` command's part in groups (protocol.md 12.13, docs/groups.md): in every group
    /// this entity is a member of, a signed `move` op puts `moved.new` in its place, sent to
    /// the other members like any change. Returns the groups changed.
    pub(super) async fn announce_move_in_groups(
        &mut self,
        moved: &crate::moving::Moved,
    ) -> Vec<String> {
        let me = self.info.number.clone();
        self.refresh_groups().await;
        let ids = self.store.group_ids().unwrap_or_default();
        let mut changed = Vec::new();
        for id in ids {
            let Ok(Some(mut group)) = self.store.load_group(&id) else {
                continue;
            };
            if !group.state.is_member(&me) || group.state.is_member(&moved.new) {
                continue;
            }
            let before = group.state.clone();
            let op = group.new_op(&self.identity, &me, Change::Move(moved.new.clone()));
            let pins = self.pins();
            let merged = group.merge([op], |n| pins.get(n).copied());
            if let Some(r) = merged.refused.first() {
                self.warn(format!("group {}: the move op: {}", short(&id), r.reason))
                    .await;
                continue;
            }
            let saved = group.clone();
            if let Err(e) = self.on_disk(move |s| s.save_group(&saved)).await {
                self.warn(format!("saving group {}: {e}", short(&id))).await;
                continue;
            }
            // The new number is this entity itself: nothing goes there.
            let plan =
                groups::plan_control(&before, &group, &merged.new, &me, &[moved.new.as_str()]);
            self.group_send_all(plan).await;
            changed.push(id);
        }
        changed
    }

    /// Merges an op this device made, stores the group, and sends the op (or the state) to
    /// the members who need it; the reply names how each was reached.
    async fn apply_own_op(
        &mut self,
        mut group: Group,
        before: groups::GroupState,
        op: groups::Op,
        message: String,
    ) -> Answer {
        let me = self.info.number.clone();
        let pins = self.pins();
        let merged = group.merge([op], |n| pins.get(n).copied());
        if let Some(r) = merged.refused.first() {
            // Only a pin that changed under us can make our own op fail: say so, send nothing.
            return Err(refused(format!("this change cannot be made: {}", r.reason)));
        }
        let new = merged.new;
        let saved = group.clone();
        if let Err(e) = self.on_disk(move |s| s.save_group(&saved)).await {
            return Err(refused(format!("saving the group: {e}")));
        }
        let plan = groups::plan_control(&before, &group, &new, &me, &[]);
        let delivered = self.group_send_all(plan).await;
        self.group_reply(message, &group, delivered)
    }

    pub(super) async fn group_send(&mut self, query: &str, text: String) -> Answer {
        let me = self.info.number.clone();
        let group = match self.my_group(query).await {
            Ok(g) => g,
            Err(e) => return Err(e),
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
            return Err(refused(format!("saving the group history: {e}")));
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
            .iter()
            .filter(|(_, how)| !how.reached())
            .map(|(member, how)| format!("{member} ({how})"))
            .collect();
        if !unreached.is_empty() {
            return Err(CommandError::GroupIncomplete {
                message: format!(
                    "sent to group {:?} ({}), but not yet to: {}; queued copies go out by \
                     themselves (`{}` lists them)",
                    group.state.name,
                    group.id,
                    unreached.join(", "),
                    self.profile.command("outbox")
                ),
                group: group.id.clone(),
                delivered,
            });
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
            Err(e @ FrameError::Unsigned) => {
                self.warn(format!(
                    "dropped a group frame from {peer}: {e} ({peer} runs an older MicroMsg)"
                ))
                .await;
                return true;
            }
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
            // A group id of format 1 is never derived from a create of format 2: nothing that
            // names it can be applied.
            Err(e @ StoreError::UnsignedGroup(_)) => {
                self.warn(format!("dropped a group frame from {peer}: {e}"))
                    .await;
                return true;
            }
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
                self.on_group_ops(peer, direction, &mut group, vec![*op])
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
        let pins = self.pins();
        let merged = group.merge(ops, |n| pins.get(n).copied());
        for r in merged.refused {
            self.notify(Notice::GroupOpRefused {
                group: group.id.clone(),
                name: group.state.name.clone(),
                relayed_by: peer.to_owned(),
                author: r.author,
                op: r.op.to_owned(),
                reason: r.reason.to_string(),
            })
            .await;
        }
        let new = merged.new;
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
                Change::Add(m) => format!("added {}", m.number),
                Change::Remove(m) => format!("removed {m}"),
                Change::Leave => "left".to_owned(),
                Change::Rename(_) => "renamed".to_owned(),
                Change::Move(new) => format!("moved to the number {new}"),
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
