//! tandem-actors: the pipeline's actors, the bounded data plane and the device executors.
//!
//! ```text
//! tickets ─► Rollout ×N ─► Reward ─► Value ─► Replay ◄─(NextBatch)─ Learner ─► Snapshot
//!              ▲                        ▲                                        │
//!              └────────── policy v_k+1 ┴──────────── critic v_k+1 ◄─────────────┘
//! ```
//!
//! Semantics (what is ordered, what blocks, what is dropped):
//! - Trajectories only travel through [`channel`]s, bounded by configured capacities; a full
//!   channel makes its producer wait, so memory is bounded by the sum of the capacities plus
//!   the replay buffer's capacity.
//! - Actor messages carry control only (steps, weight hand-off, batch requests). Weights are
//!   shared `Arc`s: one copy per published version, however many receivers.
//! - Versions count learner steps: step k trains the weights of version k, and the weights
//!   published after it are version k + 1 (every `publish_every` steps and after the last).
//!   A rollout actor never samples a ticket meant for step j with a policy older than
//!   `j - max_lag`, `max_lag = max_staleness + publish_every - 1` (the oldest version that
//!   may still be the newest published one, plus the staleness allowed); the replay buffer
//!   drops (and counts) anything older than that when the learner asks for a batch. Data
//!   from an older version than the one trained is off-policy and corrected as such.
//! - Compute runs on [`device::Executor`] threads, never on tokio workers.
//! - Rollout, reward and value (and the runtime's proxies of remote rollouts) run in one
//!   [`stage`] skeleton: receive, hold the ticket, compute on the device, send, release.
//! - A failed rollout, reward or value actor loses no prompts: the tickets it held are
//!   reissued ([`reissue`]); the learner checkpoints at step boundaries only ([`learner`]).

pub mod channel;
pub mod command_reward;
pub mod device;
pub mod error;
pub mod faults;
pub mod intake;
pub mod learner;
pub mod meter;
pub mod metrics_line;
pub mod ppo_trainer;
pub mod reissue;
pub mod replay;
pub mod reward;
pub mod reward_source;
pub mod rm_learner;
pub mod rm_trainer;
pub mod rollout;
pub mod rule_reward;
pub mod sft_learner;
pub mod sft_trainer;
pub mod snapshot;
pub mod stage;
pub mod trajectory;
pub mod value;

pub use channel::{stage_channel, StageReceiver, StageSender};
pub use device::{DeviceId, Executor};
pub use error::ActorError;
pub use faults::{FaultConfig, Faults};
pub use intake::{Next, TicketIntake};
pub use learner::{LearnerEvent, StepReport};
pub use meter::{ActorMeter, ActorState, MeterReading};
pub use metrics_line::MetricsLineError;
pub use ppo_trainer::{Advantage, PpoTrainer, TrainerConfig, TrainerState};
pub use reissue::{HeldTickets, ReissueQueue, TicketSet};
pub use stage::{Stage, StageActor, StageMsg};
pub use trajectory::{
    Prompt, SharedWeights, StepRecords, TokenOutputs, Trajectory, TrajectoryBatch, WeightsSnapshot, WorkTicket,
};
