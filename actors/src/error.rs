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
    #[error("{0}")]
    Other(String),
}
