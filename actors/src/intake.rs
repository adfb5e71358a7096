//! The order in which a sampler takes its tickets, shared by the local rollout actor and the
//! head's proxy for a remote one.
//!
//! [`TicketIntake::next`] takes, in this order: the lowest reissued ticket that the sampler's
//! policy version may sample ([`ReissueQueue::pop_ready`]); the ticket it put aside earlier
//! because its policy was too old; a new ticket from the feeder's bounded channel (waiting for
//! one). The ticket is recorded in the sampler's [`HeldTickets`] as soon as it is taken, so a
//! failure from then on reissues it. A ticket meant for a step beyond `version +
//! max_lag` is put aside ([`Next::Wait`]) until a newer policy arrives; a reissued ticket
//! is only taken when ready, so it never waits behind one meant for a later step.

use crate::channel::StageReceiver;
use crate::reissue::{HeldTickets, ReissueQueue};
use crate::trajectory::WorkTicket;

/// What a sampler does next.
#[derive(Debug)]
pub enum Next {
    /// Sample this ticket now.
    Sample(WorkTicket),
    /// The ticket in hand is meant for a newer policy: wait for one, then ask again.
    Wait,
    /// The feeder is done and nothing is left to sample.
    Closed,
}

/// One sampler's view of the tickets: the feeder's channel, the run's reissue queue and the
/// tickets it holds.
pub struct TicketIntake {
    name: String,
    tickets: StageReceiver<WorkTicket>,
    reissued: ReissueQueue,
    held: HeldTickets,
    max_lag: u64,
    put_aside: Option<WorkTicket>,
}

impl TicketIntake {
    pub fn new(
        name: &str,
        tickets: StageReceiver<WorkTicket>,
        reissued: ReissueQueue,
        held: HeldTickets,
        max_lag: u64,
    ) -> Self {
        Self {
            name: name.to_string(),
            tickets,
            reissued,
            held,
            max_lag,
            put_aside: None,
        }
    }

    /// The next ticket a sampler holding policy `version` may sample.
    pub async fn next(&mut self, version: u64) -> Next {
        let limit = version + self.max_lag;
        let ticket = match self.reissued.pop_ready(limit) {
            Some(t) => {
                tracing::info!(actor = %self.name, ticket = t.id, "sampling a reissued ticket");
                t
            }
            None => match self.put_aside.take() {
                Some(t) => t,
                None => match self.tickets.recv().await {
                    Some(t) => t,
                    None => return Next::Closed,
                },
            },
        };
        self.held.hold(&ticket);
        if ticket.step > limit {
            self.put_aside = Some(ticket);
            return Next::Wait;
        }
        Next::Sample(ticket)
    }

    /// Whether a ticket waits for a newer policy (a reissued ticket may be ready before it).
    pub fn waiting(&self) -> bool {
        self.put_aside.is_some()
    }

    /// Gives back the ticket put aside, for other samplers (this one cannot sample for now).
    pub fn give_back(&mut self) {
        if let Some(t) = self.put_aside.take() {
            self.held.release(t.id);
            self.reissued.push(vec![t]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::stage_channel;

    fn ticket(id: u64, step: u64) -> WorkTicket {
        WorkTicket {
            id,
            step,
            prompts: vec![],
            samples_per_prompt: 1,
            seed: id,
        }
    }

    fn id(n: Next) -> u64 {
        match n {
            Next::Sample(t) => t.id,
            other => panic!("expected a ticket, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn reissued_first_then_put_aside_then_new_with_the_staleness_gate() {
        let (tx, rx) = stage_channel("tickets", 8);
        let (held, reissued) = (HeldTickets::default(), ReissueQueue::default());
        let mut intake = TicketIntake::new("r0", rx, reissued.clone(), held.clone(), 0);
        tx.send(ticket(10, 0)).await.unwrap();
        tx.send(ticket(11, 1)).await.unwrap();
        tx.send(ticket(12, 1)).await.unwrap();
        assert_eq!(id(intake.next(0).await), 10);
        // Meant for step 1: put aside (and held) while the policy is at version 0.
        assert!(matches!(intake.next(0).await, Next::Wait));
        assert!(intake.waiting());
        assert_eq!(held.take_all().iter().map(|t| t.id).collect::<Vec<_>>(), vec![10, 11]);
        // A reissued ticket for step 0 jumps ahead of the one put aside; one for step 2 waits.
        reissued.push(vec![ticket(3, 2), ticket(2, 0)]);
        assert_eq!(id(intake.next(0).await), 2);
        assert!(matches!(intake.next(0).await, Next::Wait));
        // A newer policy: the put-aside ticket, then the queue's (now ready) one, then new ones.
        assert_eq!(id(intake.next(1).await), 11);
        assert_eq!(id(intake.next(2).await), 3);
        assert_eq!(id(intake.next(2).await), 12);
        drop(tx);
        assert!(matches!(intake.next(2).await, Next::Closed));
    }

    #[tokio::test]
    async fn give_back_moves_the_put_aside_ticket_to_the_reissue_queue() {
        let (tx, rx) = stage_channel("tickets", 2);
        let (held, reissued) = (HeldTickets::default(), ReissueQueue::default());
        let mut intake = TicketIntake::new("r0", rx, reissued.clone(), held.clone(), 1);
        tx.send(ticket(5, 3)).await.unwrap();
        assert!(matches!(intake.next(0).await, Next::Wait));
        intake.give_back();
        assert!(!intake.waiting());
        assert!(held.take_all().is_empty());
        assert_eq!(reissued.pop_ready(3).map(|t| t.id), Some(5));
    }
}
