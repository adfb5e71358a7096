//! Losing no prompts when a stage actor fails.
//!
//! Every rollout, reward and value actor records the work tickets it holds (taken and not yet
//! handed downstream) in its [`HeldTickets`]. When such an actor fails, its supervisor moves
//! them to the run's [`ReissueQueue`]; rollout actors take tickets from that queue before new
//! ones from the feeder, so the prompts are sampled again — with the ticket's own seed, so in
//! sync mode the retried samples equal the lost ones.
//!
//! [`TicketSet`] is how the replay buffer and checkpoints account for tickets: every id below
//! a watermark plus a sparse set above it.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::trajectory::WorkTicket;

/// Tickets one actor holds now.
#[derive(Clone, Default, Debug)]
pub struct HeldTickets(Arc<Mutex<Vec<WorkTicket>>>);

impl HeldTickets {
    pub fn hold(&self, t: &WorkTicket) {
        let mut v = self.0.lock().expect("held tickets lock");
        if !v.iter().any(|h| h.id == t.id) {
            v.push(t.clone());
        }
    }

    pub fn release(&self, id: u64) {
        self.0.lock().expect("held tickets lock").retain(|t| t.id != id);
    }

    pub fn take_all(&self) -> Vec<WorkTicket> {
        std::mem::take(&mut *self.0.lock().expect("held tickets lock"))
    }
}

/// Tickets to sample again, lowest id first.
#[derive(Clone, Default, Debug)]
pub struct ReissueQueue(Arc<Mutex<VecDeque<WorkTicket>>>);

impl ReissueQueue {
    pub fn push(&self, tickets: Vec<WorkTicket>) {
        let mut q = self.0.lock().expect("reissue lock");
        q.extend(tickets);
        q.make_contiguous().sort_by_key(|t| t.id);
    }

    /// The lowest-id ticket meant for a step `<= max_step`, if any.
    pub fn pop_ready(&self, max_step: u64) -> Option<WorkTicket> {
        let mut q = self.0.lock().expect("reissue lock");
        let i = q.iter().position(|t| t.step <= max_step)?;
        q.remove(i)
    }

    pub fn len(&self) -> usize {
        self.0.lock().expect("reissue lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A set of ticket ids: every id below `below`, plus `above`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketSet {
    pub below: u64,
    pub above: BTreeSet<u64>,
}

impl TicketSet {
    /// Adds `id`; false if it was already there.
    pub fn insert(&mut self, id: u64) -> bool {
        if self.contains(id) {
            return false;
        }
        if id == self.below {
            self.below += 1;
            while self.above.remove(&self.below) {
                self.below += 1;
            }
        } else {
            self.above.insert(id);
        }
        true
    }

    pub fn contains(&self, id: u64) -> bool {
        id < self.below || self.above.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticket_sets_keep_a_watermark() {
        let mut s = TicketSet::default();
        for id in [0, 2, 3, 1, 5] {
            assert!(s.insert(id));
        }
        assert!(!s.insert(2));
        assert_eq!(s.below, 4);
        assert_eq!(s.above, BTreeSet::from([5]));
        assert!(s.contains(3) && s.contains(5) && !s.contains(4));
        assert!(s.insert(4));
        assert_eq!((s.below, s.above.len()), (6, 0));
    }

    #[test]
    fn reissued_tickets_come_back_lowest_first_and_only_when_ready() {
        let t = |id, step| WorkTicket {
            id,
            step,
            prompts: vec![],
            samples_per_prompt: 1,
            seed: id,
        };
        let q = ReissueQueue::default();
        q.push(vec![t(5, 2), t(3, 1)]);
        assert_eq!(q.pop_ready(0).map(|t| t.id), None);
        assert_eq!(q.pop_ready(2).map(|t| t.id), Some(3));
        assert_eq!(q.pop_ready(2).map(|t| t.id), Some(5));
        assert!(q.is_empty());
        let h = HeldTickets::default();
        h.hold(&t(1, 0));
        h.hold(&t(1, 0));
        h.hold(&t(2, 0));
        h.release(1);
        assert_eq!(h.take_all().iter().map(|t| t.id).collect::<Vec<_>>(), vec![2]);
    }
}
