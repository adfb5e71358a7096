//! Reading a run directory for the report ([`RunData::read`]):
//! - `metrics.jsonl` through the typed [`StepReport`] schema (required);
//! - `actors.jsonl` as each actor's busy fraction over time. Each session of a resumed run
//!   starts its clock at 0 again; a time that goes backwards starts a new session, which is
//!   shifted to begin where the previous one ended, so the time axis runs on;
//! - `sessions.jsonl` for the steps at which resumed sessions began (see `crate::run`);
//! - a few sample completions from the trajectory store, decoded with the run's tokenizer.
//!
//! Errors in the JSONL files name the file and line; an unterminated last line that does not
//! parse (a live run mid-write) is skipped and flagged. The store and the tokenizer are
//! optional: when they cannot be read the completions section says why instead.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};
use tandem_actors::StepReport;
use tandem_runtime::store::{read_store, store_dir, ReadMode, Record, StoredTrajectory};

use crate::error::bad_input;
use crate::run::SessionRecord;

/// At most this many steps get sample completions, spread over the run.
const COMPLETION_STEPS: usize = 10;
/// Completions shown per selected step (the first ones the store holds for it).
const COMPLETIONS_PER_STEP: usize = 2;

/// Everything the report reads from a run directory.
pub(super) struct RunData {
    pub(super) metrics: Metrics,
    pub(super) actors: Option<ActorSamples>,
    pub(super) config: Option<String>,
    /// Steps at which a resumed session began, ascending.
    pub(super) resumed_at: Vec<u64>,
    pub(super) completions: Result<Vec<Completion>, String>,
}

impl RunData {
    pub(super) fn read(run_dir: &Path) -> anyhow::Result<RunData> {
        let metrics_path = run_dir.join("metrics.jsonl");
        let metrics_text = match std::fs::read_to_string(&metrics_path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return bad_input!(
                    "{} not found: is {} a run directory?",
                    metrics_path.display(),
                    run_dir.display()
                )
            }
            Err(e) => return bad_input!("cannot read {}: {e}", metrics_path.display()),
        };
        let metrics = Metrics::parse(&metrics_path, &metrics_text)?;

        let actors_path = run_dir.join("actors.jsonl");
        let actors = match std::fs::read_to_string(&actors_path) {
            Ok(t) => Some(ActorSamples::parse(&actors_path, &t)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return bad_input!("cannot read {}: {e}", actors_path.display()),
        };
        Ok(RunData {
            metrics,
            actors,
            config: std::fs::read_to_string(run_dir.join("config.toml")).ok(),
            resumed_at: resumed_at(run_dir),
            completions: completions(run_dir),
        })
    }
}

/// The steps at which resumed sessions began, from `sessions.jsonl` (none without it).
fn resumed_at(run_dir: &Path) -> Vec<u64> {
    let text = std::fs::read_to_string(run_dir.join(SessionRecord::FILE)).unwrap_or_default();
    let mut steps: Vec<u64> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<SessionRecord>(l).ok())
        .filter_map(|s| s.resumed_from)
        .collect();
    steps.sort_unstable();
    steps.dedup();
    steps
}

/// One sampled response with its prompt, as the learner trained on it.
pub(super) struct Completion {
    pub(super) step: u64,
    pub(super) policy_version: u64,
    /// The reward model's or rule's score.
    pub(super) score: f32,
    /// The score with the KL penalty: the sum of the per-token rewards.
    pub(super) reward: Option<f32>,
    pub(super) prompt: String,
    pub(super) response: String,
}

/// The first [`COMPLETIONS_PER_STEP`] trajectories trained on in each of up to
/// [`COMPLETION_STEPS`] steps spread evenly over the run, or why there are none.
fn completions(run_dir: &Path) -> Result<Vec<Completion>, String> {
    let dir = store_dir(run_dir);
    if !dir.is_dir() {
        return Err("no trajectory store (trajectories/) in this run".into());
    }
    let read = read_store(&dir, ReadMode::Tolerant).map_err(|e| format!("cannot read the trajectory store: {e}"))?;
    let mut by_step: BTreeMap<u64, Vec<StoredTrajectory>> = BTreeMap::new();
    for (_, _, record) in read.records {
        let Record::Trajectory(t) = record;
        if t.outcome.used() {
            let held = by_step.entry(t.outcome.step()).or_default();
            if held.len() < COMPLETIONS_PER_STEP {
                held.push(t);
            }
        }
    }
    if by_step.is_empty() {
        return Err("the trajectory store holds no trained-on trajectories".into());
    }
    let tok = crate::replay::tokenizer(run_dir).map_err(|e| format!("cannot load the run's tokenizer: {e:#}"))?;
    let steps: Vec<u64> = by_step.keys().copied().collect();
    let picked: Vec<u64> = if steps.len() <= COMPLETION_STEPS {
        steps
    } else {
        let mut idx: Vec<usize> = (0..COMPLETION_STEPS)
            .map(|i| i * (steps.len() - 1) / (COMPLETION_STEPS - 1))
            .collect();
        idx.dedup();
        idx.into_iter().map(|i| steps[i]).collect()
    };
    let mut out = Vec::new();
    for step in picked {
        for t in &by_step[&step] {
            let decode = |ids: &[u32]| {
                tok.decode(ids)
                    .map_err(|e| format!("cannot decode a stored trajectory: {e}"))
            };
            out.push(Completion {
                step,
                policy_version: t.policy_version,
                score: t.score,
                reward: (!t.token_rewards.is_empty()).then(|| t.token_rewards.iter().sum()),
                prompt: decode(&t.prompt_ids)?,
                response: decode(&t.response_ids)?,
            });
        }
    }
    Ok(out)
}

/// One JSONL line: its 1-based number and its object.
pub(super) type Row = (usize, Map<String, Value>);

/// The non-blank lines of a JSONL file as objects with their 1-based line numbers, and whether an
/// unterminated last line that does not parse (a live run mid-write) was skipped.
pub(super) fn jsonl_objects(path: &Path, text: &str) -> anyhow::Result<(Vec<Row>, bool)> {
    let lines: Vec<&str> = text.split('\n').collect();
    let mut out = Vec::new();
    let mut skipped_tail = false;
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(obj)) => out.push((i + 1, obj)),
            Ok(_) => return bad_input!("{}:{}: expected a JSON object", path.display(), i + 1),
            // `split` yields the text after the last '\n' last: it is unterminated.
            Err(_) if i + 1 == lines.len() => skipped_tail = true,
            Err(e) => return bad_input!("{}:{}: not valid JSON: {e}", path.display(), i + 1),
        }
    }
    Ok((out, skipped_tail))
}

/// A numeric field: `None` when missing or null, an error naming the line for any other type.
pub(super) fn number(obj: &Map<String, Value>, key: &str, path: &Path, line: usize) -> anyhow::Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => bad_input!(
            "{}:{line}: \"{key}\" must be a number or null, found {v}",
            path.display()
        ),
    }
}

/// metrics.jsonl, one [`StepReport`] per learner step.
pub(super) struct Metrics {
    pub(super) rows: Vec<StepReport>,
    pub(super) skipped_tail: bool,
}

/// One number of a step's report (NaN when the line lacked it).
pub(super) type Field = fn(&StepReport) -> f64;

impl Metrics {
    pub(super) fn parse(path: &Path, text: &str) -> anyhow::Result<Metrics> {
        let (objects, skipped_tail) = jsonl_objects(path, text)?;
        let mut rows = Vec::with_capacity(objects.len());
        for (line, obj) in objects {
            match StepReport::from_value(Value::Object(obj)) {
                Ok(r) => rows.push(r),
                Err(e) => return bad_input!("{}:{line}: {e}", path.display()),
            }
        }
        Ok(Metrics { rows, skipped_tail })
    }

    /// `(step, value)` pairs of one field; non-finite values are gaps.
    pub(super) fn series(&self, f: Field) -> Vec<(f64, Option<f64>)> {
        self.series_opt(|r| Some(f(r)))
    }

    /// [`Metrics::series`] of an optional field.
    pub(super) fn series_opt(&self, f: impl Fn(&StepReport) -> Option<f64>) -> Vec<(f64, Option<f64>)> {
        self.rows
            .iter()
            .map(|r| (r.step as f64, f(r).filter(|v| v.is_finite())))
            .collect()
    }

    /// The last finite value of a field.
    pub(super) fn last(&self, f: Field) -> Option<f64> {
        self.rows.iter().rev().map(f).find(|v| v.is_finite())
    }

    /// Mean of the finite values among rows `range`.
    pub(super) fn mean(&self, f: Field, range: std::ops::Range<usize>) -> Option<f64> {
        let vals: Vec<f64> = self.rows[range].iter().map(f).filter(|v| v.is_finite()).collect();
        (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
    }
}

/// actors.jsonl: the busy fraction of each actor over time (seconds since the run's first
/// session began, not counting the time between sessions), actors in name order.
pub(super) struct ActorSamples {
    pub(super) busy: BTreeMap<String, Vec<(f64, Option<f64>)>>,
    /// When each session after the first began, on the same time axis.
    pub(super) session_starts: Vec<f64>,
    pub(super) skipped_tail: bool,
}

impl ActorSamples {
    pub(super) fn parse(path: &Path, text: &str) -> anyhow::Result<ActorSamples> {
        let (rows, skipped_tail) = jsonl_objects(path, text)?;
        let mut busy: BTreeMap<String, Vec<(f64, Option<f64>)>> = BTreeMap::new();
        let mut session_starts = Vec::new();
        // The session's clock as written, and what is added to it.
        let (mut last_t, mut offset) = (0f64, 0f64);
        for (line, obj) in &rows {
            let Some(written) = number(obj, "t", path, *line)? else {
                return bad_input!("{}:{line}: missing \"t\"", path.display());
            };
            if written < last_t {
                offset += last_t;
                session_starts.push(offset);
            }
            last_t = written;
            let t = written + offset;
            let actor = match obj.get("actor") {
                Some(Value::String(s)) => s.clone(),
                Some(v) => return bad_input!("{}:{line}: \"actor\" must be a string, found {v}", path.display()),
                None => return bad_input!("{}:{line}: missing \"actor\"", path.display()),
            };
            let b = number(obj, "busy_frac", path, *line)?;
            busy.entry(actor).or_default().push((t, b));
        }
        Ok(ActorSamples {
            busy,
            session_starts,
            skipped_tail,
        })
    }
}
