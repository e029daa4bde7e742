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
                for a in &arrived {
                    if let Arrived::Group {
                        peer,
                        direction,
                        payload,
                        time,
                    } = a
                    {
                        self.on_group_frame(peer, *direction, payload, *time, true)
                            .await;
                    }
                }
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
            Arrived::Linked(_) | Arrived::Group { .. } => {}
        }
    }
}
