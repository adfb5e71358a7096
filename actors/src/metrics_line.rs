//! Reading a `metrics.jsonl` line back into the [`StepReport`] that wrote it.
//!
//! [`StepReport`] (with its flattened [`StepStats`](crate::ppo_trainer::StepStats)) is the one
//! schema of `metrics.jsonl`: the learner serialises it, and the report, `--rerun-step` and the
//! tests deserialise it; nothing else spells the field names. Reading is lenient in the ways a
//! run directory needs:
//! - a measurement missing from a line (a run from before the field existed) reads as NaN, so
//!   a chart leaves a gap rather than drawing a false zero; a missing count reads as 0;
//! - `null`, which is how JSON writes a non-finite number, reads as NaN;
//! - fields the schema does not name (those of a future version, say) are ignored;
//! - only `step` is required.
//!
//! A line that does not fit says which field is wrong ([`MetricsLineError::Field`]).

use serde::Deserialize;

use crate::learner::StepReport;

/// Why a line is not a [`StepReport`].
#[derive(Debug, thiserror::Error)]
pub enum MetricsLineError {
    #[error("not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("expected a JSON object")]
    NotObject,
    #[error("missing \"step\"")]
    MissingStep,
    #[error("\"{field}\": {message}")]
    Field { field: String, message: String },
}

impl StepReport {
    /// Parses one line of `metrics.jsonl` (see the module docs for what it accepts).
    pub fn from_line(line: &str) -> Result<StepReport, MetricsLineError> {
        let value: serde_json::Value = serde_json::from_str(line).map_err(MetricsLineError::Json)?;
        StepReport::from_value(value)
    }

    /// [`StepReport::from_line`] for a line already parsed as JSON.
    pub fn from_value(value: serde_json::Value) -> Result<StepReport, MetricsLineError> {
        let serde_json::Value::Object(obj) = value else {
            return Err(MetricsLineError::NotObject);
        };
        match StepReport::deserialize(&serde_json::Value::Object(obj.clone())) {
            Ok(r) => Ok(r),
            Err(e) => {
                // serde's message does not name the field: find it by reading each field alone.
                for (k, v) in &obj {
                    let alone = serde_json::json!({ "step": 0, k.as_str(): v });
                    if let Err(e) = StepReport::deserialize(&alone) {
                        return Err(MetricsLineError::Field {
                            field: k.clone(),
                            message: e.to_string(),
                        });
                    }
                }
                if obj.get("step").is_none() {
                    return Err(MetricsLineError::MissingStep);
                }
                Err(MetricsLineError::Field {
                    field: "?".into(),
                    message: e.to_string(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_line_reads_back_equal() {
        let mut r = StepReport {
            step: 3,
            policy_version: 2,
            staleness_mean: 0.5,
            wall_s: 1.25,
            adopt_latency_s: Some(0.1),
            ..StepReport::default()
        };
        r.stats.kl = 0.125;
        r.stats.skipped_updates = 1;
        let back = StepReport::from_line(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(serde_json::to_value(&back).unwrap(), serde_json::to_value(&r).unwrap());
        assert_eq!(back.true_score_mean, None);
    }

    #[test]
    fn missing_and_null_measurements_are_nan_and_bad_fields_are_named() {
        let r = StepReport::from_line(r#"{"step": 4, "kl": null, "true_score_mean": 0.5, "future": [1]}"#).unwrap();
        assert_eq!(r.step, 4);
        assert!(r.stats.kl.is_nan() && r.stats.entropy.is_nan() && r.wall_s.is_nan());
        assert_eq!((r.tokens_generated, r.stats.skipped_updates), (0, 0));
        assert_eq!(r.true_score_mean, Some(0.5));
        let e = StepReport::from_line(r#"{"step": 2, "kl": "high"}"#).unwrap_err();
        assert!(
            matches!(&e, MetricsLineError::Field { field, .. } if field == "kl"),
            "{e}"
        );
        assert!(matches!(
            StepReport::from_line(r#"{"kl": 1.0}"#),
            Err(MetricsLineError::MissingStep)
        ));
        assert!(matches!(StepReport::from_line("[1]"), Err(MetricsLineError::NotObject)));
    }
}
