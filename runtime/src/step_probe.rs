//! Extra per-step measurements over the trajectories a learner step trained on, written into
//! that step's `metrics.jsonl` line (the mock-labeller experiment records the programmatic
//! "true" score this way, beside the learned reward model's `score_mean`).
//!
//! The learner already hands each step's [`StepRecords`] to the trajectory store over a bounded
//! channel. With a probe, [`tap`] puts a thread in the middle of that channel: it computes the
//! probe's fields for the step, passes the records on to the store (if any), and sends the
//! fields to the run loop, which merges them into the step's line ([`merge`]). The learner
//! sends a step's records before its report, so the fields are ready when the line is written.

use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use tandem_actors::{StepRecords, StepReport};

/// Named values computed from one step's trained-on trajectories.
pub type ProbeFn = dyn Fn(&StepRecords) -> Vec<(String, f64)> + Send + Sync;

#[derive(Clone)]
pub struct StepProbe(pub Arc<ProbeFn>);

impl std::fmt::Debug for StepProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepProbe")
    }
}

/// Fields per step from the probe thread.
pub type ProbeResults = Receiver<(u64, Vec<(String, f64)>)>;

/// With a probe, returns the sender the learner should use and the receiver of the fields.
pub fn tap(
    store: Option<Sender<StepRecords>>,
    probe: Option<StepProbe>,
    capacity: usize,
) -> (Option<Sender<StepRecords>>, Option<ProbeResults>) {
    let Some(probe) = probe else { return (store, None) };
    let (tx, rx) = crossbeam_channel::bounded::<StepRecords>(capacity.max(1));
    let (res_tx, res_rx) = crossbeam_channel::unbounded();
    std::thread::Builder::new()
        .name("tandem-step-probe".into())
        .spawn(move || {
            for rec in rx {
                let _ = res_tx.send((rec.step, (probe.0)(&rec)));
                if let Some(s) = &store {
                    if s.send(rec).is_err() {
                        // Dropping our receiver tells the learner that the store is gone.
                        break;
                    }
                }
            }
        })
        .expect("spawn step probe thread");
    (Some(tx), Some(res_rx))
}

/// The report as a JSON line, with the probe's fields for its step when there is a probe.
pub fn merge(report: &StepReport, probe: Option<&ProbeResults>) -> String {
    let mut v = serde_json::to_value(report).expect("report serialises");
    if let (Some(rx), Some(obj)) = (probe, v.as_object_mut()) {
        while let Ok((step, fields)) = rx.recv_timeout(Duration::from_secs(30)) {
            if step < report.step {
                continue;
            }
            for (k, x) in fields {
                obj.insert(k, serde_json::json!(x));
            }
            break;
        }
    }
    v.to_string()
}
