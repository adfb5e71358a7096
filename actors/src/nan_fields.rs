//! serde helpers for the measurement fields of [`StepReport`](crate::StepReport) and
//! [`StepStats`](crate::ppo_trainer::StepStats): a measurement missing from a `metrics.jsonl`
//! line, or written as `null` (how JSON writes a non-finite number), reads as NaN.

use serde::{Deserialize, Deserializer};

/// The default of a measurement missing from a line.
pub(crate) fn nan() -> f64 {
    f64::NAN
}

/// A measurement that may be `null`: NaN.
pub(crate) fn nan_if_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}
