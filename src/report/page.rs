//! The HTML page: a header table summarising the run, the resolved config folded away, the
//! charts in a two-column grid, and a table of sample completions (`<section
//! id="completions">`, one `<tr class="completion">` per response, every text escaped).

use std::fmt::Write as _;
use std::path::Path;

use super::charts::figures;
use super::data::{Completion, RunData};
use super::plot::escape;

/// Short human form of a number for the header.
fn short(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e6) => format!("{v:.3e}"),
        Some(v) => format!("{v:.4}"),
    }
}

/// A count for the header.
fn whole(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.0}"))
}

fn duration(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1} s")
    } else if s < 3600.0 {
        format!("{} min {:.0} s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{} h {:.0} min", (s / 3600.0).floor(), (s % 3600.0) / 60.0)
    }
}

/// The style of every page the report writes.
pub(super) const CSS: &str = "
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:#222;margin:16px;background:#fff}
h1{font-size:22px;margin:0 0 8px}
h2{font-size:16px;margin:0 0 2px}
table.summary{border-collapse:collapse;margin:4px 0 10px}
table.summary th{text-align:left;font-weight:600;padding:2px 14px 2px 0;color:#555}
table.summary td{padding:2px 14px 2px 0;font-variant-numeric:tabular-nums}
.grid-charts{display:grid;grid-template-columns:1fr 1fr;gap:14px;align-items:start}
section.chart{border:1px solid #ddd;border-radius:6px;padding:10px 12px}
section.chart.wide{grid-column:1 / span 2}
.caption{margin:0 0 6px;color:#555;font-size:13px}
.panel svg{display:block;width:100%;height:auto}
.legend{display:flex;flex-wrap:wrap;gap:4px 16px;font-size:13px;margin:2px 0 6px 70px}
.key{display:inline-flex;align-items:center;gap:6px}
.swatch{display:inline-block;width:22px;height:0}
.swatch.band{height:10px;opacity:.3}
.note{color:#a05a00;font-style:italic}
svg text{font-family:inherit;fill:#333}
svg .tick{font-size:12px}
svg .axis-label{font-size:13px;font-weight:600}
svg .grid{stroke:#e6e6e6;stroke-width:1}
svg .axis{stroke:#444;stroke-width:1.2;fill:none}
svg .nodata{font-size:14px;fill:#999}
details{margin:12px 0}
pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}
table.completions{border-collapse:collapse;width:100%;font-size:13px}
table.completions th{text-align:left;color:#555;border-bottom:1px solid #ccc;padding:3px 8px}
table.completions td{vertical-align:top;border-bottom:1px solid #eee;padding:3px 8px;white-space:pre-wrap}
table.completions td.num{font-variant-numeric:tabular-nums;white-space:nowrap}
";

/// The sample completions as a table, or the reason there are none.
fn completions(c: &Result<Vec<Completion>, String>) -> String {
    let mut s = String::from(
        r#"<section class="chart wide" id="completions"><h2>Sample completions</h2><p class="caption">The first responses the learner trained on in steps spread over the run, as the run's tokenizer decodes them. The score is the reward model's or rule's; the reward adds the KL penalty.</p>"#,
    );
    match c {
        Err(why) => {
            let _ = write!(s, r#"<p class="note">{}</p>"#, escape(why));
        }
        Ok(rows) => {
            s.push_str(
                "<table class=\"completions\"><tr><th>step</th><th>version</th><th>score</th><th>reward</th>\
                 <th>prompt</th><th>response</th></tr>",
            );
            for c in rows {
                let _ = write!(
                    s,
                    r#"<tr class="completion"><td class="num">{}</td><td class="num">{}</td><td class="num">{:.4}</td><td class="num">{}</td><td class="prompt">{}</td><td class="response">{}</td></tr>"#,
                    c.step,
                    c.policy_version,
                    c.score,
                    c.reward.map_or("–".into(), |r| format!("{r:.4}")),
                    escape(&c.prompt),
                    escape(&c.response)
                );
            }
            s.push_str("</table>");
        }
    }
    s.push_str("</section>");
    s
}

pub(super) fn render(run_dir: &Path, d: &RunData) -> String {
    let (m, actors) = (&d.metrics, d.actors.as_ref());
    let n = m.rows.len();
    let q = (n / 4).max(1);
    let (first_q, last_q) = if n == 0 {
        (None, None)
    } else {
        (
            m.mean(|r| r.stats.reward_mean, 0..q.min(n)),
            m.mean(|r| r.stats.reward_mean, n.saturating_sub(q)..n),
        )
    };
    let tokens: usize = m.rows.iter().map(|r| r.tokens_generated).sum();
    let name = run_dir
        .canonicalize()
        .unwrap_or_else(|_| run_dir.to_path_buf())
        .display()
        .to_string();

    let mut rows: Vec<(&str, String)> = vec![
        ("run directory", name.clone()),
        ("learner steps", n.to_string()),
        ("wall time", m.last(|r| r.wall_s).map_or("–".into(), duration)),
        ("last policy version", whole(m.last(|r| r.policy_version as f64))),
        ("tokens generated", tokens.to_string()),
        (
            "reward mean, first quarter → last quarter",
            format!("{} → {}", short(first_q), short(last_q)),
        ),
        ("dropped stale samples", whole(m.last(|r| r.dropped_stale as f64))),
        (
            "actors sampled",
            actors.map_or("none (no actors.jsonl)".into(), |a| a.busy.len().to_string()),
        ),
    ];
    if !d.resumed_at.is_empty() {
        let at: Vec<String> = d.resumed_at.iter().map(u64::to_string).collect();
        rows.push(("resumed at steps", at.join(", ")));
    }
    if m.skipped_tail || actors.is_some_and(|a| a.skipped_tail) {
        rows.push((
            "note",
            "an unterminated last line (a run still writing?) was skipped".into(),
        ));
    }

    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>tandem report: {}</title><style>{CSS}</style></head><body>",
        escape(&name)
    );
    let _ = write!(s, "<h1>tandem report</h1><table class=\"summary\">");
    for (k, v) in rows {
        let _ = write!(s, "<tr><th>{}</th><td>{}</td></tr>", escape(k), escape(&v));
    }
    s.push_str("</table>");
    if let Some(cfg) = &d.config {
        let _ = write!(
            s,
            "<details><summary>config.toml</summary><pre>{}</pre></details>",
            escape(cfg)
        );
    }
    s.push_str(r#"<div class="grid-charts">"#);
    for fig in figures(d) {
        s.push_str(&fig.html());
    }
    s.push_str(&completions(&d.completions));
    s.push_str("</div></body></html>\n");
    s
}
