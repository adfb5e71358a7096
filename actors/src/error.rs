//! Errors of the actor layer.

#[derive(Debug, thiserror::Error)]
pub enum ActorError {
    #[error("device: {0}")]
    Device(String),
    #[error("compute panicked: {0}")]
    Panicked(String),
    #[error(transparent)]
    Model(#[from] tandem_models::ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Rl(#[from] tandem_models::rl::RlError),
    /// A batch the trainer cannot train on (empty, mismatched lengths, nothing to predict).
    #[error("{0}")]
    InvalidBatch(String),
    /// A checkpoint that does not fit the model it is restored into.
    #[error("{0}")]
    Checkpoint(String),
    /// Settings that cannot work together, or a value the component cannot use.
    #[error("{0}")]
    InvalidConfig(String),
    /// An external reward command could not be run.
    #[error("{0}")]
    RewardCommand(String),
    /// A lock over shared state was poisoned by a panic while it was held.
    #[error("{0} poisoned")]
    Poisoned(&'static str),
    /// An actor or thread this one depends on is gone or did not answer.
    #[error("{0}")]
    PeerGone(String),
    /// A failure that restarting the actor cannot mend (a reward command out of restarts): the
    /// supervisor stops the run with it instead of restarting the actor.
    #[error("{0}")]
    Fatal(String),
}

impl ActorError {
    /// Whether an actor's failure is [`ActorError::Fatal`].
    pub fn is_fatal(err: &(dyn std::error::Error + 'static)) -> bool {
        matches!(err.downcast_ref::<ActorError>(), Some(ActorError::Fatal(_)))
    }
}
