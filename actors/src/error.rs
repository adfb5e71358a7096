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
    #[error("{0}")]
    Other(String),
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
