//! Shared helpers for the runtime's end-to-end tests.
#![allow(dead_code)]

use std::path::PathBuf;

use tandem_actors::StepReport;
use tandem_runtime::{run, Config, RunOptions, RunSummary};

pub fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../configs")
}

pub fn load(name: &str, overrides: &[&str]) -> Config {
    // Tests run in parallel: every run gets a free port for its metrics endpoint.
    let o: Vec<String> = std::iter::once("metrics.addr=\"127.0.0.1:0\"")
        .chain(overrides.iter().copied())
        .map(String::from)
        .collect();
    Config::load(&configs_dir().join(name), &o).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub async fn run_in(cfg: &Config, dir: &std::path::Path) -> RunSummary {
    run(
        cfg,
        RunOptions {
            run_dir: dir.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

pub fn mean(xs: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Mean of `f` over the first and the last quarter of the steps.
pub fn first_last(reports: &[StepReport], f: impl Fn(&StepReport) -> f64) -> (f64, f64) {
    let q = (reports.len() / 4).max(1);
    (
        mean(reports[..q].iter().map(&f)),
        mean(reports[reports.len() - q..].iter().map(&f)),
    )
}
