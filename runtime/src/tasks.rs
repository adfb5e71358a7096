//! Verifiable tasks whose data tandem makes itself (`tandem gen-task`), in the spirit of the
//! arithmetic recipes of tinker-cookbook and prime-rl: the answer of every prompt is known, so
//! a response is scored by exact match, with no reward model and nothing to download.
//!
//! **Addition.** `a+b=` with `a`, `b` uniform in `[0, 10^digits)`; the completion is the sum in
//! decimal. With `reverse`, the sum is written least-significant digit first (`12+39=15` for
//! 51), the order in which carries are computed, which small models learn far more easily. A
//! record is `{"prompt", "completion", "answer"}` (`answer` = `completion`), or with `chat`,
//! `{"messages": [user, assistant], "answer"}`: SFT reads the first two forms, `tandem run` and
//! `tandem eval` read the prompt or the messages minus the last one, and the exact-match reward
//! compares a response with `answer`.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

use crate::error::RuntimeError;

/// Settings of the addition generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addition {
    pub digits: u32,
    pub reverse: bool,
    pub chat: bool,
}

impl Addition {
    /// The prompt and the answer of `a + b`.
    pub fn problem(&self, a: u64, b: u64) -> (String, String) {
        let sum = (a + b).to_string();
        let answer = if self.reverse { sum.chars().rev().collect() } else { sum };
        (format!("{a}+{b}="), answer)
    }

    /// One JSONL record.
    pub fn record(&self, a: u64, b: u64) -> serde_json::Value {
        let (prompt, answer) = self.problem(a, b);
        if self.chat {
            json!({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "answer": answer})
        } else {
            json!({"prompt": prompt, "completion": answer, "answer": answer})
        }
    }
}

/// The prompts of a task file (`prompt`, or the first message's content), for
/// [`write_addition`]'s `exclude`.
pub fn task_prompts(path: &Path) -> Result<HashSet<String>, RuntimeError> {
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut out = HashSet::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| RuntimeError::Config {
            path: path.into(),
            msg: format!("line {}: {e}", i + 1),
        })?;
        let prompt = v["prompt"].as_str().or_else(|| v["messages"][0]["content"].as_str());
        out.insert(prompt.unwrap_or_default().to_string());
    }
    Ok(out)
}

/// Writes `count` seeded addition records to `out`, leaving out those whose prompt is in
/// `exclude` (a held-out set, say); returns how many were written.
pub fn write_addition(
    task: Addition,
    count: usize,
    seed: u64,
    exclude: &HashSet<String>,
    out: &Path,
) -> Result<usize, RuntimeError> {
    if !(1..=18).contains(&task.digits) {
        return Err(RuntimeError::Config {
            path: out.into(),
            msg: format!("--digits must lie in 1..=18, not {}", task.digits),
        });
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| RuntimeError::io(parent, e))?;
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(out).map_err(|e| RuntimeError::io(out, e))?);
    let mut rng = StdRng::seed_from_u64(seed);
    let max = 10u64.pow(task.digits);
    let mut written = 0;
    for _ in 0..count {
        let (a, b) = (rng.random_range(0..max), rng.random_range(0..max));
        if exclude.contains(&task.problem(a, b).0) {
            continue;
        }
        writeln!(f, "{}", task.record(a, b)).map_err(|e| RuntimeError::io(out, e))?;
        written += 1;
    }
    f.flush().map_err(|e| RuntimeError::io(out, e))?;
    Ok(written)
}

/// Exact match of a response with an answer, ignoring surrounding whitespace.
pub fn exact_match(response: &str, answer: &str) -> bool {
    response.trim() == answer.trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_and_records() {
        let t = Addition {
            digits: 2,
            reverse: false,
            chat: false,
        };
        assert_eq!(t.problem(12, 39), ("12+39=".into(), "51".into()));
        let r = Addition { reverse: true, ..t };
        assert_eq!(r.problem(12, 39).1, "15");
        assert_eq!(r.problem(99, 1).1, "001");
        let c = Addition { chat: true, ..t }.record(1, 2);
        assert_eq!(c["messages"][1]["content"], "3");
        assert_eq!(c["answer"], "3");
        assert!(exact_match(" 51\n", "51") && !exact_match("510", "51"));
    }

    #[test]
    fn generation_is_seeded() {
        let dir = std::env::temp_dir().join(format!("tandem-addition-{}", std::process::id()));
        let t = Addition {
            digits: 3,
            reverse: false,
            chat: false,
        };
        let none = HashSet::new();
        write_addition(t, 20, 5, &none, &dir.join("a.jsonl")).unwrap();
        write_addition(t, 20, 5, &none, &dir.join("b.jsonl")).unwrap();
        write_addition(t, 20, 6, &none, &dir.join("c.jsonl")).unwrap();
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap();
        assert_eq!(read("a.jsonl"), read("b.jsonl"));
        assert_ne!(read("a.jsonl"), read("c.jsonl"));
        for line in read("a.jsonl").lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let p = v["prompt"].as_str().unwrap().trim_end_matches('=');
            let (a, b) = p.split_once('+').unwrap();
            let sum: u64 = a.parse::<u64>().unwrap() + b.parse::<u64>().unwrap();
            assert_eq!(v["answer"].as_str().unwrap(), sum.to_string());
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
