//! Errors of the runtime layer. Each names the file, line or key it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}:{line}: {msg}")]
    Prompts { path: PathBuf, line: usize, msg: String },
    #[error(transparent)]
    Model(#[from] tandem_models::ModelError),
    #[error(transparent)]
    Actor(#[from] tandem_actors::ActorError),
    #[error("actor failed: {0}")]
    ActorFailed(String),
    /// The run stopped because something it must write could not be written (a full disk).
    #[error("{0}")]
    Stopped(String),
    /// A command-line argument or a combination of settings the user can fix (exit 2).
    #[error("{0}")]
    InvalidArgument(String),
    /// The supervision tree could not be started or reached.
    #[error("supervisor: {0}")]
    Supervisor(String),
    /// A lock over shared training state was poisoned by a panic while it was held.
    #[error("{0} poisoned")]
    Poisoned(&'static str),
    /// A checkpoint that cannot be restored into this run.
    #[error("{0}")]
    Checkpoint(String),
    /// The trajectory store failed (see [`crate::store`]).
    #[error("trajectory store: {0}")]
    Store(String),
    /// Worker nodes: the cluster's server, TLS, or a node's link to its head.
    #[error("{0}")]
    Cluster(String),
    /// The metrics endpoint could not be served.
    #[error("{0}")]
    Metrics(String),
    /// Ctrl-C / SIGTERM could not be listened for.
    #[error("{0}")]
    Signals(String),
    /// A run that finished but did not reach what it was asked to (the mock labeller's bar).
    #[error("{0}")]
    Unmet(String),
}

impl RuntimeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<candle_core::Error> for RuntimeError {
    fn from(e: candle_core::Error) -> Self {
        RuntimeError::Model(e.into())
    }
}
