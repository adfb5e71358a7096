//! Fault injection, so supervision, restarts and the non-finite guard can be tested on real runs.
//!
//! Config form (`[faults]`, all off by default):
//!
//! ```toml
//! [faults]
//! rollout_panic_every = 7        # every 7th generation batch (over all samplers) panics
//! rollout_stall_every = 5        # every 5th generation batch is handed on only after ...
//! rollout_stall_s = 1.0          # ... this many seconds: a straggler
//! reward_panic_every = 0         # the same for reward batches
//! value_panic_every = 0          # ... and value batches
//! learner_fail_at_step = 5       # the learner fails once, at the start of step 5
//! nonfinite_loss_steps = [3, 4]  # every minibatch loss of these steps is NaN
//! disk_full_checkpoint_at_step = 2  # writing a checkpoint of step 2 or later fails (ENOSPC)
//! disk_full_store_at_step = 3       # storing the trajectories of step 3 or later fails
//! disk_full_metrics_at_step = 3     # appending the metrics line of step 3 or later fails
//! ```
//!
//! The `disk_full_*` faults make the write fail with the operating system's "No space left on
//! device" error ([`disk_full`]) at the point where the real write would, so what a full disk
//! does to a run can be tested without filling one.
//!
//! Counters live in one shared [`Faults`], so they keep counting across restarts: with
//! `rollout_panic_every = 7` batches 7, 14, 21, ... fail whichever sampler (or restarted
//! sampler) takes them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultConfig {
    pub rollout_panic_every: u64,
    pub rollout_stall_every: u64,
    pub rollout_stall_s: f64,
    pub reward_panic_every: u64,
    pub value_panic_every: u64,
    pub learner_fail_at_step: Option<u64>,
    pub nonfinite_loss_steps: Vec<u64>,
    pub disk_full_checkpoint_at_step: Option<u64>,
    pub disk_full_store_at_step: Option<u64>,
    pub disk_full_metrics_at_step: Option<u64>,
}

/// The error a write gets on a full disk (ENOSPC), for the `disk_full_*` faults.
pub fn disk_full() -> std::io::Error {
    std::io::Error::from_raw_os_error(28)
}

/// Whether a `disk_full_*` fault set to `at` fails the write for `step`.
pub fn disk_full_at(at: Option<u64>, step: u64) -> bool {
    at.is_some_and(|k| step >= k)
}

impl FaultConfig {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The run's fault plan and its counters.
#[derive(Debug, Default)]
pub struct Faults {
    cfg: FaultConfig,
    rollout: AtomicU64,
    rollout_stalls: AtomicU64,
    reward: AtomicU64,
    value: AtomicU64,
    learner_failed: AtomicBool,
}

impl Faults {
    pub fn new(cfg: FaultConfig) -> Self {
        Self {
            cfg,
            ..Default::default()
        }
    }

    fn every(counter: &AtomicU64, every: u64, what: &str) {
        if every == 0 {
            return;
        }
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(every) {
            panic!("injected fault: {what} batch {n} (faults.{what}_panic_every = {every})");
        }
    }

    /// Counts a generation batch; panics when it is one the plan fails.
    pub fn rollout_batch(&self) {
        Self::every(&self.rollout, self.cfg.rollout_panic_every, "rollout");
    }

    /// Counts a generation batch for the stall plan: how long to hold it before handing it on.
    pub fn rollout_stall(&self) -> Option<std::time::Duration> {
        let every = self.cfg.rollout_stall_every;
        if every == 0 {
            return None;
        }
        let n = self.rollout_stalls.fetch_add(1, Ordering::Relaxed) + 1;
        n.is_multiple_of(every)
            .then(|| std::time::Duration::from_secs_f64(self.cfg.rollout_stall_s.max(0.0)))
    }

    /// Counts a reward batch; panics when it is one the plan fails.
    pub fn reward_batch(&self) {
        Self::every(&self.reward, self.cfg.reward_panic_every, "reward");
    }

    /// Counts a value batch; panics when it is one the plan fails.
    pub fn value_batch(&self) {
        Self::every(&self.value, self.cfg.value_panic_every, "value");
    }

    /// The error the learner fails with at `step`, once.
    pub fn learner_failure(&self, step: u64) -> Option<String> {
        (self.cfg.learner_fail_at_step == Some(step) && !self.learner_failed.swap(true, Ordering::Relaxed))
            .then(|| format!("injected fault: learner failure at step {step} (faults.learner_fail_at_step)"))
    }

    /// Whether every loss of `step` is to be made NaN.
    pub fn nonfinite_loss(&self, step: u64) -> bool {
        self.cfg.nonfinite_loss_steps.contains(&step)
    }
}
