//! The inbox from the agent's side: fetch, store, then report what arrived.

use crate::account::unix_now;
use crate::inbox::{Arrived, InboxError};
use crate::store::Direction;

use super::{Agent, Notice};

impl Agent {
    /// Fetches the inbox and reports what arrived (errors become warnings).
    pub(super) async fn fetch_inbox(&mut self) -> Vec<Arrived> {
        let Some(link) = self.link.as_mut() else {
            // Fetched again once the link is back.
            self.inbox_due = self.config.inbox;
            return Vec::new();
        };
        let result = self
            .delivery
            .fetch_all(link, &mut self.live, unix_now())
            .await;
        match result {
            Ok(arrived) => {
                for a in &arrived {
                    self.report(a).await;
                }
                self.apply_kept_frames(&arrived).await;
                arrived
            }
            Err(InboxError::Link(e)) if super::reconnect::is_connection_loss(&e) => {
                // Nothing was acknowledged that is not stored; the rest comes after the
                // reconnect.
                self.link_lost(crate::error_text::error_text(&e)).await;
                Vec::new()
            }
            Err(InboxError::Link(e)) => {
                self.warn(format!("fetching the inbox failed: {e}")).await;
                Vec::new()
            }
            Err(InboxError::Store(e)) => {
                self.warn(format!(
                    "storing inbox messages failed (they stay at the broker): {e}"
                ))
                .await;
                Vec::new()
            }
        }
    }

    /// Follows the MOVED notices among `arrived`, then hands the group frames to the group
    /// layer; those it is done with leave the inbox state, where the others wait to be
    /// processed again at the next start.
    pub(super) async fn apply_kept_frames(&mut self, arrived: &[Arrived]) {
        let mut done = Vec::new();
        // Moves first: a group op or message after a notice may name the new number.
        for a in arrived {
            if let Arrived::Moved { id, peer, payload } = a
                && self.on_moved(peer, payload).await
            {
                done.push(id.clone());
            }
        }
        for a in arrived {
            if let Arrived::Group {
                id,
                peer,
                direction,
                payload,
                time,
            } = a
                && self
                    .on_group_frame(peer, *direction, payload, *time, true)
                    .await
            {
                done.push(id.clone());
            }
        }
        if let Err(e) = self.delivery.frames_done(&done, unix_now()).await {
            self.warn(format!("saving the inbox state: {e}")).await;
        }
    }

    /// Group frames and MOVED notices an earlier run took from the inbox but did not finish
    /// with (it stopped or crashed in between): processed now, before anything new.
    pub(super) async fn resume_kept_frames(&mut self) {
        let unfinished = self.delivery.unfinished_frames();
        if !unfinished.is_empty() {
            self.apply_kept_frames(&unfinished).await;
        }
    }

    pub(super) async fn report(&self, arrived: &Arrived) {
        match arrived {
            Arrived::Message {
                peer,
                direction: Direction::In,
                text,
                time,
                ..
            } => {
                self.notify(Notice::Message {
                    from: peer.clone(),
                    text: text.clone(),
                    time: *time,
                    offline: true,
                })
                .await;
            }
            Arrived::Message {
                peer,
                direction: Direction::Out,
                from_device,
                text,
                time,
            } => {
                self.notify(Notice::SentElsewhere {
                    to: peer.clone(),
                    device: *from_device,
                    text: text.clone(),
                    time: *time,
                })
                .await;
            }
            Arrived::KeysSynced { peer, device } => {
                self.notify(Notice::KeysSynced {
                    peer: peer.clone(),
                    device: *device,
                })
                .await;
            }
            Arrived::Dropped { reason } => self.warn(format!("inbox: dropped {reason}")).await,
            Arrived::Linked(_) | Arrived::Group { .. } | Arrived::Moved { .. } => {}
        }
    }
}
