//! `tokenizer.json` through the `tokenizers` crate. Text is encoded without adding special
//! tokens (prompts are used as written) and decoded with special tokens skipped.
//!
//! [`TextTokenizer::from_dir`] also reads the directory's chat template, if it has one: the
//! `chat_template` of `tokenizer_config.json` (a string, or a list of named templates of which
//! `default` is taken), else `chat_template.jinja`, with the `bos_token` / `eos_token` strings
//! templates refer to. It is kept as text ([`ChatTemplateSource`]); the runtime renders it.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

#[derive(Clone)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    chat: Option<ChatTemplateSource>,
}

/// A Jinja chat template as a HF tokenizer directory ships it, with the special-token strings
/// it may use.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplateSource {
    pub template: String,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// The file it came from (for errors).
    pub path: PathBuf,
}

impl ChatTemplateSource {
    /// The template of `dir`, if it has one (see the module docs).
    pub fn from_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|source| ModelError::Json {
                path: path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::Value::Null,
            Err(e) => return Err(ModelError::io(&path, e)),
        };
        // A special token is written as a string or as {"content": ...}.
        let token = |key: &str| match config.get(key) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(v) => v.get("content").and_then(|c| c.as_str()).map(String::from),
            None => None,
        };
        let bad = |msg: &str| ModelError::BadConfig {
            path: path.clone(),
            key: "chat_template",
            msg: msg.into(),
        };
        let (template, from) = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => (s.clone(), path.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |n: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(|x| x.as_str()) == Some(n))
                        .and_then(|t| t.get("template")?.as_str())
                };
                let t = named("default").ok_or_else(|| bad("a list of templates needs one named \"default\""))?;
                (t.to_string(), path.clone())
            }
            None | Some(serde_json::Value::Null) => {
                let jinja = dir.join("chat_template.jinja");
                match std::fs::read_to_string(&jinja) {
                    Ok(t) => (t, jinja),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(ModelError::io(&jinja, e)),
                }
            }
            Some(_) => return Err(bad("must be a string or a list of {name, template}")),
        };
        Ok(Some(Self {
            template,
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            path: from,
        }))
    }
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("path", &self.path).finish()
    }
}

impl TextTokenizer {
    /// Loads `DIR/tokenizer.json` and the directory's chat template, if any.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut t = Self::from_file(&dir.join("tokenizer.json"))?;
        t.chat = ChatTemplateSource::from_dir(dir)?;
        Ok(t)
    }

    /// The chat template of the directory this tokenizer was loaded from.
    pub fn chat_template(&self) -> Option<&ChatTemplateSource> {
        self.chat.as_ref()
    }

    /// Replaces the chat template (`None` removes it).
    pub fn set_chat_template(&mut self, chat: Option<ChatTemplateSource>) {
        self.chat = chat;
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
            chat: None,
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
            chat: None,
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
