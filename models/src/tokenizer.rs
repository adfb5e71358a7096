//! `tokenizer.json` through the `tokenizers` crate. Text is encoded without adding special
//! tokens (prompts are used as written) and decoded with special tokens skipped.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("path", &self.path).finish()
    }
}

impl TextTokenizer {
    /// Loads `DIR/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "tokenizer.json not found"),
            ));
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::Tokenizer {
            path: path.into(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            inner,
            path: path.into(),
        })
    }

    /// Builds a tokenizer from `tokenizer.json` text; `label` names it in errors.
    pub fn from_json(json: &str, label: &Path) -> Result<Self> {
        let inner: tokenizers::Tokenizer = json.parse().map_err(|e: tokenizers::Error| ModelError::Tokenizer {
            path: label.into(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            inner,
            path: label.into(),
        })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| self.err(e))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// Decodes each id on its own (for per-token displays).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `other` maps every token to the same id, so that ids mean the same text under
    /// both (the test for scoring one model's ids with another model).
    pub fn same_vocabulary(&self, other: &TextTokenizer) -> bool {
        self.inner.get_vocab(true) == other.inner.get_vocab(true)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Writes `DIR/tokenizer.json`.
    pub fn save_to_dir(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.inner.save(&path, false).map_err(|e| ModelError::Tokenizer {
            path,
            msg: e.to_string(),
        })
    }

    fn err(&self, e: tokenizers::Error) -> ModelError {
        ModelError::Tokenizer {
            path: self.path.clone(),
            msg: e.to_string(),
        }
    }
}
