//! Reading a run's JSONL files: `metrics.jsonl` through the typed [`StepReport`] schema, and
//! `actors.jsonl` as each actor's busy fraction over time. Errors name the file and line; an
//! unterminated last line that does not parse (a live run mid-write) is skipped and flagged.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};
use tandem_actors::StepReport;

use crate::error::bad_input;

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

/// actors.jsonl: the busy fraction of each actor over time, actors in name order.
pub(super) struct ActorSamples {
    pub(super) busy: BTreeMap<String, Vec<(f64, Option<f64>)>>,
    pub(super) skipped_tail: bool,
}

impl ActorSamples {
    pub(super) fn parse(path: &Path, text: &str) -> anyhow::Result<ActorSamples> {
        let (rows, skipped_tail) = jsonl_objects(path, text)?;
        let mut busy: BTreeMap<String, Vec<(f64, Option<f64>)>> = BTreeMap::new();
        for (line, obj) in &rows {
            let Some(t) = number(obj, "t", path, *line)? else {
                return bad_input!("{}:{line}: missing \"t\"", path.display());
            };
            let actor = match obj.get("actor") {
                Some(Value::String(s)) => s.clone(),
                Some(v) => return bad_input!("{}:{line}: \"actor\" must be a string, found {v}", path.display()),
                None => return bad_input!("{}:{line}: missing \"actor\"", path.display()),
            };
            let b = number(obj, "busy_frac", path, *line)?;
            busy.entry(actor).or_default().push((t, b));
        }
        Ok(ActorSamples { busy, skipped_tail })
    }
}
