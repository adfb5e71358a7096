//! The snapshot actor: owns the versioned weights and hands them out.
//!
//! The learner publishes version k+1 of the policy (and of the critic) after a step; the
//! snapshot actor keeps the latest [`SharedWeights`] and sends the same `Arc` to every policy
//! receiver (the rollout actors) and to the critic receiver (the value actor) — receivers share
//! the tensors, nothing is copied per receiver. Receivers register a [`WeightsPort`]: a ractor
//! [`DerivedActorRef`] that accepts weights, so the snapshot never names their message types.
//! Receivers report back when they adopt a version ([`adopt`]); the publish-to-adopt latency
//! of each version is recorded as a histogram and kept in [`AdoptLatencies`] for the learner's
//! metrics line. The learner reads that record directly rather than asking this actor: a
//! round trip through the mailbox between two learner steps waits for a control thread to be
//! scheduled, which on a machine whose cores all run compute took 1–2.6 ms in some steps
//! (a tenth of a `tandem bench overlap` step).
//!
//! Receivers in other processes (worker nodes) [`SnapshotMsg::Subscribe`] instead: they get a
//! `watch` receiver that always holds the latest version, so a slow link skips intermediate
//! versions rather than queueing them.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Tensor;
use ractor::{Actor, ActorProcessingErr, ActorRef, DerivedActorRef, RpcReplyPort};

use crate::meter::ActorMeter;
use crate::trajectory::SharedWeights;

/// Where the snapshot sends new weights: any actor whose messages convert from
/// [`SharedWeights`] (`actor_ref.get_derived()`).
pub type WeightsPort = DerivedActorRef<SharedWeights>;

pub enum SnapshotMsg {
    /// A new policy version (and critic, when there is one) from the learner.
    Publish {
        policy: SharedWeights,
        critic: Option<SharedWeights>,
    },
    /// A receiver adopted `version` after `latency`.
    Adopted {
        receiver: String,
        version: u64,
        latency: Duration,
    },
    /// Register a policy receiver (a rollout actor); it gets the latest policy at once.
    AddPolicyReceiver(WeightsPort),
    /// Register the critic receiver (the value actor); it gets the latest critic at once.
    SetCriticReceiver(WeightsPort),
    /// A watch on the latest policy (for receivers that copy weights elsewhere).
    Subscribe(RpcReplyPort<tokio::sync::watch::Receiver<SharedWeights>>),
}

/// The worst publish-to-adopt latency of each recent version (the last 1024), in seconds:
/// written by the snapshot actor as receivers report, read by the learner.
#[derive(Clone, Default)]
pub struct AdoptLatencies(Arc<Mutex<BTreeMap<u64, f64>>>);

impl AdoptLatencies {
    fn record(&self, version: u64, latency: Duration) {
        // Only this and `worst` take the lock, and neither panics while holding it, so a
        // poisoned lock (a panic elsewhere in that thread) still guards a whole map.
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(version).or_insert(0.0);
        *e = e.max(latency.as_secs_f64());
        while m.len() > 1024 {
            m.pop_first();
        }
    }

    /// The worst latency reported so far for `version`; `None` before any receiver adopted it.
    pub fn worst(&self, version: u64) -> Option<f64> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&version).copied()
    }
}

// Local only: never sent to another node.
impl ractor::Message for SnapshotMsg {}

pub struct SnapshotActor;

pub struct SnapshotState {
    policy: SharedWeights,
    critic: Option<SharedWeights>,
    meter: Arc<ActorMeter>,
    policy_receivers: Vec<WeightsPort>,
    critic_receiver: Option<WeightsPort>,
    latency: AdoptLatencies,
    watch: tokio::sync::watch::Sender<SharedWeights>,
}

pub struct SnapshotArgs {
    pub policy: SharedWeights,
    pub critic: Option<SharedWeights>,
    /// This actor's measurements.
    pub meter: Arc<ActorMeter>,
    /// Where adoption latencies are recorded (the learner holds a clone).
    pub latency: AdoptLatencies,
}

impl Actor for SnapshotActor {
    type Msg = SnapshotMsg;
    type State = SnapshotState;
    type Arguments = SnapshotArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<SnapshotMsg>,
        args: SnapshotArgs,
    ) -> Result<SnapshotState, ActorProcessingErr> {
        Ok(SnapshotState {
            watch: tokio::sync::watch::Sender::new(args.policy.clone()),
            policy: args.policy,
            critic: args.critic,
            meter: args.meter,
            policy_receivers: vec![],
            critic_receiver: None,
            latency: args.latency,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<SnapshotMsg>,
        msg: SnapshotMsg,
        st: &mut SnapshotState,
    ) -> Result<(), ActorProcessingErr> {
        let _timer = st.meter.time_handle();
        match msg {
            SnapshotMsg::Publish { policy, critic } => {
                metrics::gauge!("tandem_policy_version").set(policy.version as f64);
                metrics::histogram!("tandem_weight_publish_seconds")
                    .record(policy.published_at.elapsed().as_secs_f64());
                // Critic first: the value stage must never see data newer than its critic.
                if let (Some(c), Some(v)) = (&critic, &st.critic_receiver) {
                    let _ = v.send_message(c.clone());
                }
                for r in &st.policy_receivers {
                    let _ = r.send_message(policy.clone());
                }
                st.watch.send_replace(policy.clone());
                st.policy = policy;
                if critic.is_some() {
                    st.critic = critic;
                }
            }
            SnapshotMsg::Adopted {
                receiver,
                version,
                latency,
            } => {
                metrics::histogram!("tandem_weight_adopt_seconds", "receiver" => receiver)
                    .record(latency.as_secs_f64());
                st.latency.record(version, latency);
            }
            SnapshotMsg::AddPolicyReceiver(r) => {
                let _ = r.send_message(st.policy.clone());
                st.policy_receivers.push(r);
            }
            SnapshotMsg::SetCriticReceiver(v) => {
                if let Some(c) = &st.critic {
                    let _ = v.send_message(c.clone());
                }
                st.critic_receiver = Some(v);
            }
            SnapshotMsg::Subscribe(reply) => {
                let _ = reply.send(st.watch.subscribe());
            }
        }
        Ok(())
    }
}

/// A receiver's side of the hand-off: swaps `current` to a model built over `w` (sharing its
/// tensors) unless `current` is already as new, and reports the publish-to-adopt latency.
/// Returns `None` when nothing changed, else whether this was the receiver's first model.
pub fn adopt<M>(
    current: &mut Option<(u64, Arc<M>)>,
    w: &SharedWeights,
    receiver: &str,
    snapshot: &ActorRef<SnapshotMsg>,
    build: impl FnOnce(HashMap<String, Tensor>) -> Result<M, tandem_models::ModelError>,
) -> Result<Option<bool>, ActorProcessingErr> {
    if current.as_ref().is_some_and(|(v, _)| *v >= w.version) {
        return Ok(None);
    }
    let first = current.is_none();
    *current = Some((w.version, Arc::new(build(w.tensors.clone())?)));
    snapshot.cast(SnapshotMsg::Adopted {
        receiver: receiver.to_string(),
        version: w.version,
        latency: w.published_at.elapsed(),
    })?;
    Ok(Some(first))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use crate::trajectory::WeightsSnapshot;

    #[tokio::test]
    async fn the_learner_reads_the_worst_adoption_of_each_version_without_a_message() {
        let weights = |version| {
            Arc::new(WeightsSnapshot {
                version,
                tensors: HashMap::new(),
                published_at: Instant::now(),
            })
        };
        let latency = AdoptLatencies::default();
        let args = SnapshotArgs {
            policy: weights(0),
            critic: None,
            meter: Arc::new(ActorMeter::new("snapshot", "snapshot", "-")),
            latency: latency.clone(),
        };
        let (snap, handle) = Actor::spawn(None, SnapshotActor, args).await.unwrap();
        for (receiver, ms) in [("rollout/0", 5), ("rollout/1", 9), ("value", 2)] {
            let latency = Duration::from_millis(ms);
            let receiver = receiver.to_string();
            snap.cast(SnapshotMsg::Adopted {
                receiver,
                version: 3,
                latency,
            })
            .unwrap();
        }
        // Messages are handled in order: once a later call is answered, the casts are recorded.
        ractor::call!(snap, SnapshotMsg::Subscribe).unwrap();
        assert_eq!(latency.worst(3), Some(0.009));
        assert_eq!(latency.worst(4), None);
        snap.stop(None);
        handle.await.unwrap();

        // The record keeps the last 1024 versions.
        for v in 0..1100 {
            latency.record(v, Duration::from_millis(1));
        }
        assert_eq!(latency.worst(1100 - 1024 - 1), None);
        assert_eq!(latency.worst(1100 - 1024), Some(0.001));
    }
}
