//! Built-in tiny models and the word tokenizer they use, so the quickstart needs no download.
//!
//! The tokenizer is a word-level `tokenizer.json` made here: `<|endoftext|>` (id 0, also pad
//! and stop), `<unk>`, then a fixed English word list that covers the shipped prompts and the
//! sentiment words of the positive-words reward. Built-in models are randomly initialised from
//! the run seed; `tandem run` saves them in HF layout with this tokenizer.

use std::collections::HashSet;
use std::path::Path;

use serde_json::json;
use tandem_models::{ModelConfig, TextTokenizer};

use super::{BuiltinArch, BuiltinModel};
use crate::error::RuntimeError;

/// Words of the built-in vocabulary besides the sentiment words.
#[rustfmt::skip]
const PLAIN_WORDS: &[&str] = &[
    "the", "a", "of", "to", "and", "in", "is", "it", "that", "was", "for", "on", "with", "as", "he", "be", "at", "by",
    "this", "had", "not", "are", "but", "from", "or", "have", "an", "they", "which", "one", "you", "were", "her", "all",
    "she", "there", "would", "their", "we", "him", "been", "has", "when", "who", "will", "more", "no", "if", "out",
    "so", "said", "what", "up", "its", "about", "into", "than", "them", "can", "only", "other", "new", "some", "could",
    "time", "these", "two", "may", "then", "do", "first", "any", "my", "now", "seemed", "movie", "film", "story",
    "plot", "acting", "his", "very", "really", "just", "too", ".", ",", "!",
];

/// The positive-words reward's default list (part of the built-in vocabulary).
#[rustfmt::skip]
pub const POSITIVE_WORDS: &[&str] =
    &["good", "great", "wonderful", "happy", "love", "best", "nice", "fun", "excellent", "beautiful", "amazing", "enjoy"];

#[rustfmt::skip]
const NEGATIVE_WORDS: &[&str] = &["bad", "terrible", "awful", "sad", "hate", "worst", "boring", "dull", "poor", "ugly"];

/// The built-in vocabulary after the two special tokens.
fn words() -> impl Iterator<Item = &'static str> {
    PLAIN_WORDS.iter().chain(POSITIVE_WORDS).chain(NEGATIVE_WORDS).copied()
}

/// The built-in `tokenizer.json`.
pub fn tokenizer_json() -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), json!(0));
    vocab.insert("<unk>".into(), json!(1));
    for (i, w) in words().enumerate() {
        vocab.insert(w.into(), json!(i + 2));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    })
    .to_string()
}

pub fn tokenizer() -> Result<TextTokenizer, RuntimeError> {
    Ok(TextTokenizer::from_json(
        &tokenizer_json(),
        Path::new("<built-in word tokenizer>"),
    )?)
}

/// The model config of a built-in spec over the built-in vocabulary.
pub fn model_config(spec: &BuiltinModel, max_positions: usize) -> ModelConfig {
    let vocab = words().count() + 2;
    match spec.arch {
        BuiltinArch::Gpt2 => ModelConfig::gpt2(vocab, spec.hidden, spec.layers, spec.heads, max_positions),
        BuiltinArch::Qwen2 => ModelConfig::qwen2(
            vocab,
            spec.hidden,
            spec.layers,
            spec.heads,
            spec.kv_heads.unwrap_or(spec.heads),
            max_positions,
        ),
    }
}

/// Ids of the tokens that spell one of `words` (case-insensitive; a byte-level BPE token's
/// leading space marker `Ġ` is ignored).
pub fn word_token_ids(tokenizer: &TextTokenizer, words: &[String]) -> HashSet<u32> {
    let wanted: HashSet<String> = words.iter().map(|w| w.to_lowercase()).collect();
    (0..tokenizer.vocab_size() as u32)
        .filter(|&id| {
            tokenizer
                .id_to_token(id)
                .map(|t| wanted.contains(&t.trim_start_matches('Ġ').to_lowercase()))
                .unwrap_or(false)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_tokenizer_round_trips_prompts() {
        let t = tokenizer().unwrap();
        let ids = t.encode("The movie was good !").unwrap();
        assert_eq!(ids.len(), 5);
        assert!(!ids.contains(&1), "no unknown words: {ids:?}");
        assert_eq!(t.decode(&ids).unwrap(), "the movie was good !");
        let pos = word_token_ids(&t, &POSITIVE_WORDS.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(pos.len(), POSITIVE_WORDS.len());
    }
}
