//! A page comparing several runs of one task, as `tandem bench staleness` writes it: a table
//! of each run's final numbers (`<table class="results">`, one `<tr class="run">` per run) and
//! one wide chart per quantity with a line per run (`data-series` = the run's name), drawn with
//! the run report's panels and style. The table links each run to a full report under its
//! directory.

use std::fmt::Write as _;

use tandem_actors::StepReport;

use super::page::CSS;
use super::plot::{escape, panel, Figure, Series, YRange, PALETTE};

/// One compared run: its name (also its directory, relative to the page) and its steps.
pub(crate) struct ComparedRun<'a> {
    pub(crate) name: &'a str,
    pub(crate) reports: &'a [StepReport],
    /// A report to link the name to, relative to `NAME/`.
    pub(crate) report: Option<&'a str>,
}

/// The page: `title`, a caption, the table (`header` over `rows`, one row per run in `runs`'
/// order) and the charts.
pub(crate) fn render(
    title: &str,
    caption: &str,
    header: &[&str],
    rows: &[Vec<String>],
    runs: &[ComparedRun<'_>],
) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{CSS}{TABLE_CSS}</style></head><body><h1>{}</h1><p class=\"caption\">{}</p>",
        escape(title),
        escape(title),
        escape(caption)
    );
    s.push_str(r#"<table class="results"><tr>"#);
    for h in header {
        let _ = write!(s, "<th>{}</th>", escape(h));
    }
    s.push_str("</tr>");
    for (row, run) in rows.iter().zip(runs) {
        let _ = write!(s, r#"<tr class="run" data-run="{}">"#, escape(run.name));
        for (i, cell) in row.iter().enumerate() {
            if let (0, Some(report)) = (i, run.report) {
                let _ = write!(
                    s,
                    r#"<td><a href="{}/{}">{}</a></td>"#,
                    escape(run.name),
                    escape(report),
                    escape(cell)
                );
            } else {
                let _ = write!(s, "<td>{}</td>", escape(cell));
            }
        }
        s.push_str("</tr>");
    }
    s.push_str(r#"</table><div class="grid-charts">"#);
    for fig in figures(runs) {
        s.push_str(&fig.html());
    }
    s.push_str("</div></body></html>\n");
    s
}

const TABLE_CSS: &str = "
table.results{border-collapse:collapse;margin:6px 0 14px;font-size:13px}
table.results th{text-align:left;color:#555;border-bottom:1px solid #ccc;padding:3px 10px}
table.results td{border-bottom:1px solid #eee;padding:3px 10px;font-variant-numeric:tabular-nums}
";

/// One chart per quantity, a line per run.
fn figures(runs: &[ComparedRun<'_>]) -> Vec<Figure> {
    type Field = fn(&StepReport) -> f64;
    let chart = |id: &'static str, title: &'static str, caption: &str, y_label: &str, y: YRange, f: Field| {
        let series = runs
            .iter()
            .enumerate()
            .map(|(i, run)| {
                let points = run
                    .reports
                    .iter()
                    .map(|r| (r.step as f64, Some(f(r)).filter(|v| v.is_finite())))
                    .collect();
                let s = Series::new(run.name, run.name, PALETTE[i % PALETTE.len()], points);
                // Past ten runs the colours repeat: tell the second round apart by dashes.
                if (i / PALETTE.len()) % 2 == 1 {
                    s.dashed()
                } else {
                    s
                }
            })
            .collect();
        Figure {
            id,
            title,
            caption: caption.into(),
            wide: true,
            panels: vec![panel(y_label, y, series)],
            note: None,
        }
    };
    let zero = YRange::Auto { zero: true };
    let auto = YRange::Auto { zero: false };
    vec![
        chart(
            "chart-reward",
            "Reward",
            "Batch mean reward per learner step (score + KL penalty).",
            "reward per response",
            auto,
            |r| r.stats.reward_mean,
        ),
        chart(
            "chart-score",
            "Score",
            "Batch mean score per learner step (the reward model's or rule's, without the KL penalty).",
            "score per response",
            auto,
            |r| r.stats.score_mean,
        ),
        chart(
            "chart-kl",
            "KL to the reference",
            "KL of the sampled responses to the reference model.",
            "KL (nats per response)",
            auto,
            |r| r.stats.kl,
        ),
        chart(
            "chart-token-staleness",
            "Staleness per token",
            "Mean number of versions between the policy that sampled a trained token and the one trained.",
            "token staleness (versions)",
            zero,
            |r| r.token_staleness.token_staleness_mean,
        ),
        chart(
            "chart-mismatch-kl",
            "Behaviour–proximal mismatch KL",
            "KL(π_behaviour ‖ π_prox) per sampled token: how far off-policy the trained data was.",
            "mismatch KL (nats/token)",
            zero,
            |r| r.stats.behaviour_mismatch_kl,
        ),
    ]
}
