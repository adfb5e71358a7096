//! Typed errors of the models crate. Every error that comes from user input names the file,
//! key or tensor it is about.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("{path}: unsupported model_type {model_type:?} (supported: gpt2, qwen2, llama)")]
    UnsupportedArchitecture { path: PathBuf, model_type: String },
    #[error("{path}: config key {key:?}: {msg}")]
    BadConfig {
        path: PathBuf,
        key: &'static str,
        msg: String,
    },
    #[error("checkpoint {dir}: missing tensor {name:?}")]
    MissingTensor { dir: PathBuf, name: String },
    #[error("checkpoint {dir}: tensor {name:?} has shape {found:?}, the config implies {expected:?}")]
    ShapeMismatch {
        dir: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tokenizer: {msg}")]
    Tokenizer { path: PathBuf, msg: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.into(),
            source,
        }
    }
}
