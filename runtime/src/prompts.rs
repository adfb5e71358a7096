//! Prompts from JSONL and the ticket feeder.
//!
//! Each line is a JSON object with a `"prompt"` string (another field with `data.prompt_key`,
//! for example `"question"`); HH-RLHF style text
//! ("\n\nHuman: ... \n\nAssistant:") is used as written. A `"messages"` array of
//! `{"role", "content"}` turns is rendered with the model's chat template and its generation
//! prompt ([`crate::chat`]). Blank lines are skipped; anything
//! else is an error naming the file and line — or, with `data.on_bad_line = "skip"`, skipped,
//! logged with its line number and counted. Prompts are tokenised with the policy's
//! tokenizer and left-truncated to `prompt_max_tokens` (the end of a prompt is what the
//! response continues).
//!
//! The feeder thread turns the prompt set into an endless stream of [`WorkTicket`]s: every
//! epoch is a fresh seeded shuffle, cut into generation batches; ticket t is meant for
//! learner step t / tickets_per_step and samples with a seed derived from (run seed, t). It
//! blocks when the bounded ticket channel is full and exits when the channel closes. A resumed
//! run passes the tickets its checkpoint accounts for, and the feeder skips exactly those.

use std::path::Path;
use std::thread::JoinHandle;

use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use tandem_actors::{Prompt, StageSender, TicketSet, WorkTicket};
use tandem_models::TextTokenizer;

use crate::config::BadLinePolicy;
use crate::error::RuntimeError;

/// A tokenised prompts file.
#[derive(Debug, Clone, Default)]
pub struct PromptSet {
    pub prompts: Vec<Vec<u32>>,
    /// Lines skipped as malformed (with `on_bad_line = "skip"`).
    pub skipped: usize,
}

/// Reads and tokenises a prompts file; each line's prompt is its `key` field.
pub fn load_prompts(
    path: &Path,
    key: &str,
    tokenizer: &TextTokenizer,
    max_tokens: usize,
    on_bad_line: BadLinePolicy,
) -> Result<PromptSet, RuntimeError> {
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut out = Vec::new();
    let mut skipped = 0;
    for (i, line) in lines(&bytes) {
        if line.as_ref().is_ok_and(|l| l.trim().is_empty()) {
            continue;
        }
        match line.and_then(|l| parse_line(l, key, tokenizer, max_tokens)) {
            Ok(ids) => out.push(ids),
            Err(msg) => {
                let e = RuntimeError::Prompts {
                    path: path.into(),
                    line: i,
                    msg,
                };
                if on_bad_line == BadLinePolicy::Error {
                    return Err(e);
                }
                tracing::warn!("skipping a prompt: {e}");
                skipped += 1;
            }
        }
    }
    if skipped > 0 {
        tracing::warn!(skipped, path = %path.display(), "malformed prompt lines skipped (data.on_bad_line = \"skip\")");
        metrics::gauge!("tandem_prompts_skipped").set(skipped as f64);
    }
    if out.is_empty() {
        return Err(RuntimeError::Prompts {
            path: path.into(),
            line: 0,
            msg: "no prompts".into(),
        });
    }
    Ok(PromptSet { prompts: out, skipped })
}

fn parse_line(line: &str, key: &str, tokenizer: &TextTokenizer, max_tokens: usize) -> Result<Vec<u32>, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
    encode_prompt(tokenizer, &prompt_text(&v, key, tokenizer)?, max_tokens)
}

/// The prompt text of a record: its `key` string (`data.prompt_key`), or its `"messages"`
/// rendered with the tokenizer's chat template and generation prompt (a final assistant turn,
/// the reference an SFT record trains on, is left out).
pub fn prompt_text(v: &serde_json::Value, key: &str, tokenizer: &TextTokenizer) -> Result<String, String> {
    if let Some(m) = v.get("messages") {
        return crate::chat::render_prompt(tokenizer, m);
    }
    prompt_field(v, key).map(String::from)
}

/// The `key` string of a prompts line, or an error naming the key and the fields the line has
/// (so a file keyed `"question"` says so, and `data.prompt_key` is the fix).
pub fn prompt_field<'a>(v: &'a serde_json::Value, key: &str) -> Result<&'a str, String> {
    match v.get(key) {
        Some(p) => p.as_str().ok_or_else(|| format!("\"{key}\" must be a string")),
        None => {
            let fields: Vec<&String> = v.as_object().map(|o| o.keys().collect()).unwrap_or_default();
            Err(format!(
                "expected an object with a \"{key}\" string (its fields: {fields:?}; \
                 set data.prompt_key to the field that holds the prompt)"
            ))
        }
    }
}

/// A prompt's token ids as the pipeline feeds them: tokenised, never empty, and left-truncated
/// to `max_tokens` (the end of a prompt is what the response continues).
pub fn encode_prompt(tokenizer: &TextTokenizer, text: &str, max_tokens: usize) -> Result<Vec<u32>, String> {
    let mut ids = tokenizer.encode(text).map_err(|e| e.to_string())?;
    if ids.is_empty() {
        return Err("prompt tokenises to nothing".into());
    }
    if ids.len() > max_tokens {
        ids.drain(..ids.len() - max_tokens);
    }
    Ok(ids)
}

/// Reads a JSONL file line by line, skipping blank lines, and hands each parsed object to
/// `each`; a line that is not JSON, or that `each` rejects, is an error naming the file and
/// line.
pub fn read_jsonl(
    path: &Path,
    mut each: impl FnMut(&serde_json::Value) -> Result<(), String>,
) -> Result<(), RuntimeError> {
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::io(path, e))?;
    for (i, line) in lines(&bytes) {
        if line.as_ref().is_ok_and(|l| l.trim().is_empty()) {
            continue;
        }
        line.and_then(|l| serde_json::from_str(l).map_err(|e| format!("malformed JSON: {e}")))
            .and_then(|v| each(&v))
            .map_err(|msg| RuntimeError::Prompts {
                path: path.into(),
                line: i,
                msg,
            })?;
    }
    Ok(())
}

/// The most bytes one line of a JSONL input may have.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// The lines of a JSONL file with their 1-based numbers (a `\r` before the `\n` dropped),
/// each as text, or as why it is not: not UTF-8 (naming the byte), or longer than
/// [`MAX_LINE_BYTES`]. A bad line does not stop the others, so `data.on_bad_line = "skip"`
/// can skip it.
pub fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, Result<&str, String>)> {
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    body.split(|&b| b == b'\n').enumerate().map(|(i, raw)| {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let text = if raw.len() > MAX_LINE_BYTES {
            Err(format!(
                "the line is {} bytes; at most {MAX_LINE_BYTES} are read",
                raw.len()
            ))
        } else {
            std::str::from_utf8(raw).map_err(|e| format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1))
        };
        (i + 1, text)
    })
}

/// Settings of the ticket stream.
#[derive(Debug, Clone, Copy)]
pub struct TicketPlan {
    pub seed: u64,
    pub prompts_per_ticket: usize,
    pub tickets_per_step: usize,
    pub samples_per_prompt: usize,
}

/// Ticket `t` of the stream defined by `plan` over `prompts` (pure: the feeder and tests agree).
pub fn tickets(prompts: &[Vec<u32>], plan: TicketPlan) -> impl Iterator<Item = WorkTicket> + '_ {
    let n = prompts.len() as u64;
    let mut epoch = 0u64;
    let mut order: Vec<usize> = Vec::new();
    let mut pos = 0usize;
    let mut id = 0u64;
    std::iter::from_fn(move || {
        let mut batch = Vec::with_capacity(plan.prompts_per_ticket);
        while batch.len() < plan.prompts_per_ticket {
            if pos == order.len() {
                order = (0..prompts.len()).collect();
                order.shuffle(&mut StdRng::seed_from_u64(
                    plan.seed.wrapping_add(epoch.wrapping_mul(0x5851_F42D)),
                ));
                pos = 0;
                epoch += 1;
            }
            let i = order[pos];
            batch.push(Prompt {
                index: (epoch - 1) * n + i as u64,
                ids: prompts[i].clone(),
            });
            pos += 1;
        }
        let t = WorkTicket {
            id,
            step: id / plan.tickets_per_step as u64,
            prompts: batch,
            samples_per_prompt: plan.samples_per_prompt,
            seed: plan.seed ^ (id + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        };
        id += 1;
        Some(t)
    })
}

/// Starts the feeder thread, which issues every ticket not in `skip`; it ends when every
/// ticket receiver is gone and returns how many it issued.
pub fn spawn_feeder(
    prompts: Vec<Vec<u32>>,
    plan: TicketPlan,
    tx: StageSender<WorkTicket>,
    skip: TicketSet,
) -> JoinHandle<u64> {
    std::thread::Builder::new()
        .name("tandem-feeder".into())
        .spawn(move || {
            let mut issued = 0;
            for t in tickets(&prompts, plan).filter(|t| !skip.contains(t.id)) {
                if tx.send_blocking(t).is_err() {
                    break;
                }
                issued += 1;
            }
            issued
        })
        .expect("spawn feeder thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_epoch_issues_every_prompt_once() {
        let prompts: Vec<Vec<u32>> = (0..10).map(|i| vec![i]).collect();
        let plan = TicketPlan {
            seed: 3,
            prompts_per_ticket: 4,
            tickets_per_step: 2,
            samples_per_prompt: 1,
        };
        let ts: Vec<WorkTicket> = tickets(&prompts, plan).take(5).collect();
        let idx: Vec<u64> = ts.iter().flat_map(|t| t.prompts.iter().map(|p| p.index)).collect();
        let mut first: Vec<u64> = idx[..10].to_vec();
        first.sort();
        assert_eq!(first, (0..10).collect::<Vec<_>>());
        let mut second: Vec<u64> = idx[10..20].to_vec();
        second.sort();
        assert_eq!(second, (10..20).collect::<Vec<_>>());
        assert_eq!(ts.iter().map(|t| t.step).collect::<Vec<_>>(), vec![0, 0, 1, 1, 2]);
        let again: Vec<WorkTicket> = tickets(&prompts, plan).take(5).collect();
        assert_eq!(
            ts.iter().map(|t| t.seed).collect::<Vec<_>>(),
            again.iter().map(|t| t.seed).collect::<Vec<_>>()
        );
    }
}
