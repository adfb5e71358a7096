//! tandem-actors: the pipeline's actors, the bounded data plane and the device executors.
//!
//! ```text
//! tickets ─► Rollout ×N ─► Reward ─► Value ─► Replay ◄─(NextBatch)─ Learner ─► Snapshot
//!              ▲                        ▲                                        │
//!              └────────── policy v_k+1 ┴──────────── critic v_k+1 ◄─────────────┘
//! ```
//!
//! What is ordered, what blocks, what is dropped and counted, and what restarts is written down
//! once, in `docs/semantics.md`: trajectories only travel through bounded [`channel`]s,
//! compute runs on [`device::Executor`] threads, and a failed stage's tickets are reissued
//! ([`reissue`]). Rollout, reward and value (and the runtime's proxies of remote rollouts)
//! run in one [`stage`] skeleton: receive, hold the ticket, compute on the device, send, release.

#![forbid(unsafe_code)]

pub mod channel;
pub mod command_reward;
pub mod device;
pub mod error;
pub mod faults;
pub mod intake;
pub mod learner;
pub mod meter;
pub mod metrics_line;
mod nan_fields;
pub mod ppo_trainer;
pub mod reissue;
pub mod replay;
pub mod reward;
pub mod reward_source;
pub mod rm_trainer;
pub mod rollout;
pub mod rule_reward;
pub mod sft_trainer;
pub mod snapshot;
pub mod stage;
pub mod supervised_learner;
pub mod supervised_trainer;
pub mod trajectory;
pub mod value;

pub use channel::{stage_channel, StageReceiver, StageSender};
pub use device::{DeviceId, Executor};
pub use error::ActorError;
pub use faults::{FaultConfig, Faults};
pub use intake::{Next, TicketIntake};
pub use learner::{HeldOutEval, LearnerEvent, StepReport, TokenStaleness};
pub use meter::{ActorMeter, ActorState, MeterReading};
pub use metrics_line::MetricsLineError;
pub use ppo_trainer::{Advantage, PpoTrainer, TrainerConfig, TrainerState};
pub use reissue::{HeldTickets, ReissueQueue, TicketSet};
pub use replay::StalePolicy;
pub use stage::{Stage, StageActor, StageMsg};
pub use trajectory::{
    Prompt, SharedWeights, StepRecords, TokenOutputs, Trajectory, TrajectoryBatch, WeightsSnapshot, WorkTicket,
};
