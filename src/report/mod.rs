//! `tandem report RUN_DIR [--out FILE]`: one self-contained HTML page with a run's learning curves.
//!
//! Reads `RUN_DIR/metrics.jsonl` (one object per learner step, required), `RUN_DIR/actors.jsonl`
//! (one object per actor per sample, optional), `RUN_DIR/config.toml` (optional, shown
//! folded), `RUN_DIR/sessions.jsonl` (where resumed sessions began, optional) and a few
//! completions from the trajectory store (optional), and writes `RUN_DIR/report.html` (or
//! `--out FILE`). The last line on stdout is `{"report": PATH}`.
//!
//! The page needs no network and no JavaScript: every chart is inline SVG drawn here, with a
//! title, labelled axes (quantity and unit), tick labels and a legend when a panel has more than
//! one series. Each chart is a `<section>` with a stable id — `chart-reward`, `chart-true-score`
//! (mock-labeller runs only), `chart-kl`, `chart-loss`, `chart-clip`, `chart-entropy`,
//! `chart-staleness`, `chart-token-staleness`, `chart-behaviour-ratio`, `chart-mismatch-kl`,
//! `chart-phases`, `chart-approx-kl`, `chart-explained-var`,
//! `chart-throughput`, `chart-actors` — and each line is a `<polyline class="series"
//! data-series=KEY>`. Where a resumed session began, each chart draws a `<line
//! class="resume-marker" data-x=X>` (X the step, or the time on the actor chart, where the
//! sessions' clocks are joined end to end). Sample completions follow the charts in
//! `<section id="completions">`. A value
//! that is null or missing leaves a gap in its line; a panel with no values at all says "no
//! data"; a constant series gets a small range around its value. Without actor samples the
//! utilisation chart holds the note "no actor samples in this run".
//!
//! Errors: a missing `metrics.jsonl` names the path it looked for; a line that is not a JSON
//! object, or a field with the wrong type, names the file and line. Both exit with status 2. A
//! last line without its newline that does not parse is taken to be still being written by a
//! live run: it is skipped, and the report says so.
//!
//! The parts: [`data`] reads the files, [`plot`] draws SVG panels, [`charts`] defines the
//! charts over the data, and [`page`] assembles the HTML.

mod charts;
pub(crate) mod comparison;
mod data;
mod page;
mod plot;

use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use crate::error::bad_input;
use data::RunData;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run directory (holds metrics.jsonl, and possibly actors.jsonl and config.toml).
    run_dir: PathBuf,
    /// Where to write the HTML (default RUN_DIR/report.html).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    let out = args.out.unwrap_or_else(|| args.run_dir.join("report.html"));
    write(&args.run_dir, &out)?;
    crate::print_json(&json!({ "report": out }))
}

/// Writes the report of `run_dir` to `out`.
pub(crate) fn write(run_dir: &Path, out: &Path) -> anyhow::Result<()> {
    if !run_dir.is_dir() {
        return bad_input!("run directory {} does not exist", run_dir.display());
    }
    let data = RunData::read(run_dir)?;
    let html = page::render(run_dir, &data);
    crate::error::check_output_path(out)?;
    if let Err(e) = std::fs::write(out, html) {
        return bad_input!("cannot write {}: {e}", out.display());
    }
    Ok(())
}
