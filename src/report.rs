//! `tandem report RUN_DIR [--out FILE]`: one self-contained HTML page with a run's learning curves.
//!
//! Reads `RUN_DIR/metrics.jsonl` (one object per learner step, required), `RUN_DIR/actors.jsonl`
//! (one object per actor per sample, optional) and `RUN_DIR/config.toml` (optional, shown
//! folded), and writes `RUN_DIR/report.html` (or `--out FILE`). The last line on stdout is
//! `{"report": PATH}`.
//!
//! The page needs no network and no JavaScript: every chart is inline SVG drawn here, with a
//! title, labelled axes (quantity and unit), tick labels and a legend when a panel has more than
//! one series. Each chart is a `<section>` with a stable id — `chart-reward`, `chart-kl`,
//! `chart-loss`, `chart-clip`, `chart-entropy`, `chart-staleness`, `chart-phases`,
//! `chart-actors` — and each line is a `<polyline class="series" data-series=KEY>`. A value
//! that is null or missing leaves a gap in its line; a panel with no values at all says "no
//! data"; a constant series gets a small range around its value. Without actor samples the
//! utilisation chart holds the note "no actor samples in this run".
//!
//! Errors: a missing `metrics.jsonl` names the path it looked for; a line that is not a JSON
//! object, or a field with the wrong type, names the file and line. Both exit with status 2. A
//! last line without its newline that does not parse is taken to be still being written by a
//! live run: it is skipped, and the report says so.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::{json, Map, Value};

use tandem_actors::StepReport;

use crate::error::bad_input;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run directory (holds metrics.jsonl, and possibly actors.jsonl and config.toml).
    run_dir: PathBuf,
    /// Where to write the HTML (default RUN_DIR/report.html).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> anyhow::Result<()> {
    if !args.run_dir.is_dir() {
        return bad_input!("run directory {} does not exist", args.run_dir.display());
    }
    let metrics_path = args.run_dir.join("metrics.jsonl");
    let metrics_text = match std::fs::read_to_string(&metrics_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return bad_input!(
                "{} not found: is {} a run directory?",
                metrics_path.display(),
                args.run_dir.display()
            )
        }
        Err(e) => return bad_input!("cannot read {}: {e}", metrics_path.display()),
    };
    let metrics = Metrics::parse(&metrics_path, &metrics_text)?;

    let actors_path = args.run_dir.join("actors.jsonl");
    let actors = match std::fs::read_to_string(&actors_path) {
        Ok(t) => Some(ActorSamples::parse(&actors_path, &t)?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return bad_input!("cannot read {}: {e}", actors_path.display()),
    };
    let config = std::fs::read_to_string(args.run_dir.join("config.toml")).ok();

    let html = render_page(&args.run_dir, &metrics, actors.as_ref(), config.as_deref());
    let out = args.out.unwrap_or_else(|| args.run_dir.join("report.html"));
    crate::error::check_output_path(&out)?;
    if let Err(e) = std::fs::write(&out, html) {
        return bad_input!("cannot write {}: {e}", out.display());
    }
    crate::print_json(&json!({ "report": out }))
}

// ---------------------------------------------------------------------------------------------
// Reading the JSONL files

/// The non-blank lines of a JSONL file as objects with their 1-based line numbers, and whether an
/// unterminated last line that does not parse (a live run mid-write) was skipped.
/// One JSONL line: its 1-based number and its object.
type Row = (usize, Map<String, Value>);

fn jsonl_objects(path: &Path, text: &str) -> anyhow::Result<(Vec<Row>, bool)> {
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
fn number(obj: &Map<String, Value>, key: &str, path: &Path, line: usize) -> anyhow::Result<Option<f64>> {
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
struct Metrics {
    rows: Vec<StepReport>,
    skipped_tail: bool,
}

/// One number of a step's report (NaN when the line lacked it).
type Field = fn(&StepReport) -> f64;

impl Metrics {
    fn parse(path: &Path, text: &str) -> anyhow::Result<Metrics> {
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
    fn series(&self, f: Field) -> Vec<(f64, Option<f64>)> {
        self.series_opt(|r| Some(f(r)))
    }

    /// [`Metrics::series`] of an optional field.
    fn series_opt(&self, f: impl Fn(&StepReport) -> Option<f64>) -> Vec<(f64, Option<f64>)> {
        self.rows
            .iter()
            .map(|r| (r.step as f64, f(r).filter(|v| v.is_finite())))
            .collect()
    }

    /// The last finite value of a field.
    fn last(&self, f: Field) -> Option<f64> {
        self.rows.iter().rev().map(f).find(|v| v.is_finite())
    }

    /// Mean of the finite values among rows `range`.
    fn mean(&self, f: Field, range: std::ops::Range<usize>) -> Option<f64> {
        let vals: Vec<f64> = self.rows[range].iter().map(f).filter(|v| v.is_finite()).collect();
        (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
    }
}

/// actors.jsonl: the busy fraction of each actor over time, actors in name order.
struct ActorSamples {
    busy: BTreeMap<String, Vec<(f64, Option<f64>)>>,
    skipped_tail: bool,
}

impl ActorSamples {
    fn parse(path: &Path, text: &str) -> anyhow::Result<ActorSamples> {
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

// ---------------------------------------------------------------------------------------------
// Charts

/// matplotlib's tab10: distinguishable on white, and for the common kinds of colour blindness
/// mostly by lightness as well as hue.
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];

struct Series {
    /// Stable key, written as `data-series`.
    key: String,
    label: String,
    color: &'static str,
    dashed: bool,
    points: Vec<(f64, Option<f64>)>,
    /// A shaded band `(x, lo, hi)` drawn under the line, with its legend label.
    band: Option<Band>,
}

impl Series {
    fn new(key: &str, label: &str, color: &'static str, points: Vec<(f64, Option<f64>)>) -> Series {
        Series {
            key: key.into(),
            label: label.into(),
            color,
            dashed: false,
            points,
            band: None,
        }
    }

    fn dashed(mut self) -> Series {
        self.dashed = true;
        self
    }
}

/// A legend label and `(x, lo, hi)` triples.
type Band = (String, Vec<(f64, f64, f64)>);

#[derive(Clone, Copy)]
enum YRange {
    /// From the data, widened to round numbers; `zero` keeps 0 in view.
    Auto {
        zero: bool,
    },
    Fixed(f64, f64),
}

/// One set of axes.
struct Panel {
    x_label: &'static str,
    y_label: String,
    /// The x values are step numbers: ticks on whole numbers only.
    x_integer: bool,
    y: YRange,
    series: Vec<Series>,
}

/// One chart: a titled `<section>` with one or more panels stacked, sharing nothing but the title.
struct Figure {
    id: &'static str,
    title: &'static str,
    caption: String,
    /// Spans both columns of the page grid.
    wide: bool,
    panels: Vec<Panel>,
    note: Option<String>,
}

const LEFT: f64 = 78.0;
const RIGHT: f64 = 18.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 46.0;

/// "Nice" tick spacing (1, 2 or 5 × 10^k) for about `target` intervals over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = span / target;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f < 1.5 {
        1.0
    } else if f < 3.0 {
        2.0
    } else if f < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Tick values: the multiples of `step` in `[lo, hi]` (with a little slack for rounding).
fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last)
        .map(|i| {
            let t = i as f64 * step;
            if t == 0.0 {
                0.0
            } else {
                t
            }
        })
        .collect()
}

/// Formats tick labels so neighbours differ: enough decimals for `step`, scientific notation
/// for very small or very large magnitudes.
fn tick_label(v: f64, step: f64, max_abs: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e6).contains(&max_abs) {
        let digits = (max_abs.log10().floor() - step.log10().floor()).max(0.0) as usize;
        return format!("{v:.digits$e}");
    }
    let decimals = (-(step.log10() + 1e-9).floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

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

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

impl Panel {
    /// The data's y extent over lines and bands, if it has any finite value.
    fn y_extent(&self) -> Option<(f64, f64)> {
        let mut ys: Vec<f64> = Vec::new();
        for s in &self.series {
            ys.extend(s.points.iter().filter(|p| p.0.is_finite()).filter_map(|p| p.1));
            if let Some((_, band)) = &s.band {
                ys.extend(band.iter().flat_map(|b| [b.1, b.2]));
            }
        }
        let ys = ys.into_iter().filter(|y| y.is_finite());
        ys.fold(None, |acc, y| match acc {
            None => Some((y, y)),
            Some((lo, hi)) => Some((lo.min(y), hi.max(y))),
        })
    }

    fn x_extent(&self) -> Option<(f64, f64)> {
        let xs = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .filter(|x| x.is_finite());
        xs.fold(None, |acc, x| match acc {
            None => Some((x, x)),
            Some((lo, hi)) => Some((lo.min(x), hi.max(x))),
        })
    }

    /// Inline SVG of the panel, `width` × `height` user units.
    fn svg(&self, clip_id: &str, width: f64, height: f64) -> String {
        let pw = width - LEFT - RIGHT;
        let ph = height - TOP - BOTTOM;
        let extent = self.y_extent();
        let has_data = extent.is_some();

        // y: round the data's range out to tick multiples.
        let (mut y0, mut y1) = match (&self.y, extent) {
            (YRange::Fixed(lo, hi), _) => (*lo, *hi),
            (YRange::Auto { .. }, None) => (0.0, 1.0),
            (YRange::Auto { zero }, Some((lo, hi))) => {
                let (lo, hi) = if *zero { (lo.min(0.0), hi.max(0.0)) } else { (lo, hi) };
                if lo == hi {
                    let pad = if lo == 0.0 { 1.0 } else { lo.abs() * 0.1 };
                    if *zero && lo == 0.0 {
                        (0.0, 1.0)
                    } else {
                        (lo - pad, hi + pad)
                    }
                } else {
                    // 5% headroom, except past a pinned zero, so no line runs along the frame.
                    let pad = (hi - lo) * 0.05;
                    let lo = if *zero && lo == 0.0 { lo } else { lo - pad };
                    let hi = if *zero && hi == 0.0 { hi } else { hi + pad };
                    (lo, hi)
                }
            }
        };
        let y_step = nice_step(y1 - y0, 5.0);
        if matches!(self.y, YRange::Auto { .. }) {
            y0 = (y0 / y_step + 1e-9).floor() * y_step;
            y1 = (y1 / y_step - 1e-9).ceil() * y_step;
        }
        // x: the data's range as it is; whole-number ticks for steps.
        let (x0, x1) = match self.x_extent() {
            None => (0.0, 1.0),
            Some((lo, hi)) if lo == hi => (lo - 1.0, hi + 1.0),
            Some(e) => e,
        };
        let mut x_step = nice_step(x1 - x0, (pw / 70.0).floor().max(2.0));
        if self.x_integer {
            x_step = x_step.max(1.0);
        }
        let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let py = |y: f64| TOP + (1.0 - (y - y0) / (y1 - y0)) * ph;

        let mut s = String::new();
        let _ = write!(
            s,
            r#"<svg viewBox="0 0 {width} {height}" role="img" aria-label="{}">"#,
            escape(&self.y_label)
        );
        let _ = write!(
            s,
            r#"<defs><clipPath id="{clip_id}"><rect x="{}" y="{}" width="{}" height="{}"/></clipPath></defs>"#,
            // A little wider than the plot, so a line along an edge is drawn whole.
            LEFT - 3.0,
            TOP - 3.0,
            pw + 6.0,
            ph + 6.0
        );
        // Grid and tick labels.
        let y_ticks = ticks(y0, y1, y_step);
        let y_max_abs = y_ticks.iter().fold(0f64, |m, t| m.max(t.abs()));
        for &t in &y_ticks {
            let y = py(t);
            let _ = write!(
                s,
                r#"<line class="grid" x1="{LEFT}" x2="{:.1}" y1="{y:.1}" y2="{y:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                tick_label(t, y_step, y_max_abs)
            );
        }
        let x_ticks = ticks(x0, x1, x_step);
        let x_max_abs = x_ticks.iter().fold(0f64, |m, t| m.max(t.abs()));
        for &t in &x_ticks {
            let x = px(t);
            let _ = write!(
                s,
                r#"<line class="grid" x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{:.1}"/><text class="tick" x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                TOP + ph,
                TOP + ph + 16.0,
                tick_label(t, x_step, x_max_abs)
            );
        }
        // Axes and their titles.
        let _ = write!(
            s,
            r#"<path class="axis" d="M{LEFT} {TOP}V{:.1}H{:.1}"/>"#,
            TOP + ph,
            LEFT + pw
        );
        let _ = write!(
            s,
            r#"<text class="axis-label x-label" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            LEFT + pw / 2.0,
            height - 8.0,
            escape(self.x_label)
        );
        // A y title longer than the axis (about 7.5 units a character at 13px bold) is squeezed to fit.
        let fit = if self.y_label.chars().count() as f64 * 7.5 > ph {
            format!(r#" textLength="{:.0}" lengthAdjust="spacingAndGlyphs""#, ph - 4.0)
        } else {
            String::new()
        };
        let _ = write!(
            s,
            r#"<text class="axis-label y-label" transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle"{fit}>{}</text>"#,
            TOP + ph / 2.0,
            escape(&self.y_label)
        );
        // Data, clipped to the plot area.
        let _ = write!(s, r#"<g clip-path="url(#{clip_id})">"#);
        for series in &self.series {
            if let Some((_, band)) = &series.band {
                for seg in band
                    .split(|b| !(b.0.is_finite() && b.1.is_finite() && b.2.is_finite()))
                    .filter(|seg| seg.len() > 1)
                {
                    let mut pts: Vec<String> = seg.iter().map(|b| format!("{:.1},{:.1}", px(b.0), py(b.2))).collect();
                    pts.extend(seg.iter().rev().map(|b| format!("{:.1},{:.1}", px(b.0), py(b.1))));
                    let _ = write!(
                        s,
                        r#"<polygon class="band" fill="{}" fill-opacity="0.18" stroke="none" points="{}"/>"#,
                        series.color,
                        pts.join(" ")
                    );
                }
            }
        }
        for series in &self.series {
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let finite = |p: &(f64, Option<f64>)| p.0.is_finite() && p.1.is_some_and(f64::is_finite);
            for seg in series.points.split(|p| !finite(p)).filter(|seg| !seg.is_empty()) {
                if seg.len() == 1 {
                    // A lone value between gaps: a dot, since a one-point line is invisible.
                    let _ = write!(
                        s,
                        r#"<circle class="point" data-series="{}" cx="{:.1}" cy="{:.1}" r="3" fill="{}"><title>{}</title></circle>"#,
                        escape(&series.key),
                        px(seg[0].0),
                        py(seg[0].1.unwrap_or_default()),
                        series.color,
                        escape(&series.label)
                    );
                    continue;
                }
                let pts: Vec<String> = seg
                    .iter()
                    .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1.unwrap_or_default())))
                    .collect();
                let _ = write!(
                    s,
                    r#"<polyline class="series" data-series="{}" fill="none" stroke="{}" stroke-width="2" stroke-linejoin="round"{dash} points="{}"><title>{}</title></polyline>"#,
                    escape(&series.key),
                    series.color,
                    pts.join(" "),
                    escape(&series.label)
                );
            }
        }
        s.push_str("</g>");
        if !has_data {
            let _ = write!(
                s,
                r#"<text class="nodata" x="{:.1}" y="{:.1}" text-anchor="middle">no data</text>"#,
                LEFT + pw / 2.0,
                TOP + ph / 2.0
            );
        }
        s.push_str("</svg>");
        s
    }

    /// HTML legend: one key per line (and band) when the panel has more than one.
    fn legend(&self) -> String {
        let mut keys = Vec::new();
        for s in &self.series {
            let style = if s.dashed { "dashed" } else { "solid" };
            keys.push(format!(
                r#"<span class="key"><span class="swatch" style="border-top:3px {style} {}"></span>{}</span>"#,
                s.color,
                escape(&s.label)
            ));
            if let Some((label, _)) = &s.band {
                keys.push(format!(
                    r#"<span class="key"><span class="swatch band" style="background:{}"></span>{}</span>"#,
                    s.color,
                    escape(label)
                ));
            }
        }
        if keys.len() < 2 {
            return String::new();
        }
        format!(r#"<div class="legend">{}</div>"#, keys.concat())
    }
}

impl Figure {
    fn html(&self) -> String {
        let width = if self.wide { 1220.0 } else { 600.0 };
        let height = match (self.wide, self.panels.len()) {
            (true, _) => 300.0,
            (false, 1) => 280.0,
            _ => 220.0,
        };
        let mut s = format!(
            r#"<section class="chart{}" id="{}"><h2>{}</h2><p class="caption">{}</p>"#,
            if self.wide { " wide" } else { "" },
            self.id,
            escape(self.title),
            escape(&self.caption)
        );
        for (i, panel) in self.panels.iter().enumerate() {
            s.push_str(r#"<div class="panel">"#);
            s.push_str(&panel.svg(&format!("clip-{}-{i}", self.id), width, height));
            s.push_str(&panel.legend());
            s.push_str("</div>");
        }
        if let Some(note) = &self.note {
            let _ = write!(s, r#"<p class="note">{}</p>"#, escape(note));
        }
        s.push_str("</section>");
        s
    }
}

const STEP: &str = "learner step";
const SECONDS: &str = "seconds since start";

fn panel(y_label: &str, y: YRange, series: Vec<Series>) -> Panel {
    Panel {
        x_label: STEP,
        y_label: y_label.into(),
        x_integer: true,
        y,
        series,
    }
}

fn figures(m: &Metrics, actors: Option<&ActorSamples>) -> Vec<Figure> {
    let c = PALETTE;
    let auto = YRange::Auto { zero: false };
    let zero = || YRange::Auto { zero: true };

    let band: Vec<(f64, f64, f64)> = m
        .rows
        .iter()
        .map(|r| {
            (
                r.step as f64,
                r.stats.reward_mean - r.stats.reward_std,
                r.stats.reward_mean + r.stats.reward_std,
            )
        })
        .collect();
    let mut reward = Series::new(
        "reward_mean",
        "reward mean (score + KL penalty)",
        c[0],
        m.series(|r| r.stats.reward_mean),
    );
    reward.band = Some(("reward ± 1 std over the batch".into(), band));

    let wall = m.series(|r| r.wall_s);
    let step_wall: Vec<(f64, Option<f64>)> = wall
        .iter()
        .enumerate()
        .map(|(i, &(x, w))| {
            let prev = if i == 0 { Some(0.0) } else { wall[i - 1].1 };
            (x, w.zip(prev).map(|(w, p)| w - p))
        })
        .collect();

    let actor_fig = match actors {
        Some(a) if !a.busy.is_empty() => {
            let series = a
                .busy
                .iter()
                .enumerate()
                .map(|(i, (name, pts))| {
                    let s = Series::new(name, name, c[i % c.len()], pts.clone());
                    // Past ten actors the colours repeat: tell the second round apart by dashes.
                    if (i / c.len()) % 2 == 1 {
                        s.dashed()
                    } else {
                        s
                    }
                })
                .collect();
            Figure {
                id: "chart-actors",
                title: "Actor utilisation",
                caption: "Fraction of each sampling interval the actor spent computing (from actors.jsonl).".into(),
                wide: true,
                panels: vec![Panel {
                    x_label: SECONDS,
                    y_label: "busy fraction (0–1)".into(),
                    x_integer: false,
                    y: YRange::Fixed(0.0, 1.0),
                    series,
                }],
                note: None,
            }
        }
        _ => Figure {
            id: "chart-actors",
            title: "Actor utilisation",
            caption: "Fraction of each sampling interval the actor spent computing (from actors.jsonl).".into(),
            wide: true,
            panels: vec![],
            note: Some("no actor samples in this run".into()),
        },
    };

    vec![
        Figure {
            id: "chart-reward",
            title: "Reward and score",
            caption: "Batch means per learner step. The reward adds the KL penalty to the score.".into(),
            wide: false,
            panels: vec![panel(
                "reward per response",
                auto,
                vec![
                    reward,
                    Series::new(
                        "score_mean",
                        "score mean (reward model / rule)",
                        c[1],
                        m.series(|r| r.stats.score_mean),
                    ),
                ],
            )],
            note: None,
        },
        Figure {
            id: "chart-clip",
            title: "PPO clip fraction",
            caption: "Fraction of response tokens whose probability ratio was clipped, averaged over minibatches."
                .into(),
            wide: false,
            panels: vec![panel(
                "clip fraction (of tokens)",
                zero(),
                vec![Series::new(
                    "clip_frac",
                    "clip fraction",
                    c[4],
                    m.series(|r| r.stats.clip_frac),
                )],
            )],
            note: None,
        },
        Figure {
            id: "chart-kl",
            title: "KL to the reference and β",
            caption: "KL of the sampled responses to the reference model, and the KL-penalty coefficient β.".into(),
            wide: false,
            panels: vec![
                panel(
                    "KL (nats per response)",
                    auto,
                    vec![Series::new("kl", "KL", c[3], m.series(|r| r.stats.kl))],
                ),
                panel(
                    "β (KL coefficient)",
                    auto,
                    vec![Series::new("beta", "β", c[9], m.series(|r| r.stats.beta))],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-loss",
            title: "Policy and value loss",
            caption: "Mean over the step's PPO epochs and minibatches.".into(),
            wide: false,
            panels: vec![
                panel(
                    "policy loss",
                    auto,
                    vec![Series::new(
                        "policy_loss",
                        "policy loss",
                        c[0],
                        m.series(|r| r.stats.policy_loss),
                    )],
                ),
                panel(
                    "value loss",
                    zero(),
                    vec![Series::new(
                        "value_loss",
                        "value loss",
                        c[2],
                        m.series(|r| r.stats.value_loss),
                    )],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-entropy",
            title: "Entropy and response length",
            caption: "Policy entropy over response tokens, and the mean response length.".into(),
            wide: false,
            panels: vec![
                panel(
                    "entropy (nats/token)",
                    auto,
                    vec![Series::new("entropy", "entropy", c[5], m.series(|r| r.stats.entropy))],
                ),
                panel(
                    "length (tokens)",
                    zero(),
                    vec![Series::new(
                        "response_len_mean",
                        "response length",
                        c[7],
                        m.series(|r| r.stats.response_len_mean),
                    )],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-staleness",
            title: "Staleness",
            caption: "How many policy versions behind the learner the trained samples were, and how many samples \
                      were dropped for exceeding the bound."
                .into(),
            wide: false,
            panels: vec![
                panel(
                    "staleness (versions)",
                    zero(),
                    vec![
                        Series::new("staleness_mean", "mean", c[0], m.series(|r| r.staleness_mean)),
                        Series::new("staleness_max", "max", c[3], m.series(|r| r.staleness_max as f64)).dashed(),
                    ],
                ),
                panel(
                    "dropped (samples)",
                    zero(),
                    vec![Series::new(
                        "dropped_stale",
                        "dropped stale samples, cumulative",
                        c[7],
                        m.series(|r| r.dropped_stale as f64),
                    )],
                ),
            ],
            note: None,
        },
        Figure {
            id: "chart-phases",
            title: "Seconds per step, by phase",
            caption: "Generate, reward and value are summed over the step's batch; in async mode phases overlap, \
                      so they need not add up to the step's wall time (dashed)."
                .into(),
            wide: true,
            panels: vec![panel(
                "seconds per step (s)",
                zero(),
                vec![
                    Series::new("generate_s", "generate", c[0], m.series(|r| r.generate_s)),
                    Series::new("reward_s", "reward", c[1], m.series(|r| r.reward_s)),
                    Series::new("value_s", "value", c[2], m.series(|r| r.value_s)),
                    Series::new("learn_s", "learn", c[3], m.series(|r| r.learn_s)),
                    Series::new("weight_sync_s", "weight sync", c[4], m.series(|r| r.weight_sync_s)),
                    Series::new("learner_wait_s", "learner wait", c[5], m.series(|r| r.learner_wait_s)),
                    Series::new("step_wall_s", "step wall time", "#333333", step_wall).dashed(),
                ],
            )],
            note: None,
        },
        actor_fig,
    ]
}

// ---------------------------------------------------------------------------------------------
// The page

const CSS: &str = "
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
";

fn render_page(run_dir: &Path, m: &Metrics, actors: Option<&ActorSamples>, config: Option<&str>) -> String {
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
    if let Some(cfg) = config {
        let _ = write!(
            s,
            "<details><summary>config.toml</summary><pre>{}</pre></details>",
            escape(cfg)
        );
    }
    s.push_str(r#"<div class="grid-charts">"#);
    for fig in figures(m, actors) {
        s.push_str(&fig.html());
    }
    s.push_str("</div></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_labels_distinct() {
        let step = nice_step(0.049 - 0.0481, 5.0);
        let t = ticks(0.0481, 0.049, step);
        let labels: Vec<String> = t.iter().map(|&v| tick_label(v, step, 0.049)).collect();
        let mut dedup = labels.clone();
        dedup.dedup();
        assert_eq!(labels, dedup, "{labels:?}");
        assert_eq!(tick_label(0.0, 0.5, 2.0), "0");
        assert_eq!(tick_label(-0.5, 0.5, 2.0), "-0.5");
        assert_eq!(tick_label(2e-7, 1e-7, 4e-7), "2e-7");
        assert_eq!(ticks(0.0, 10.0, 2.0), vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
    }

    #[test]
    fn constant_and_empty_series_still_draw() {
        let p = panel(
            "y",
            YRange::Auto { zero: false },
            vec![Series::new(
                "a",
                "a",
                PALETTE[0],
                vec![(0.0, Some(3.0)), (1.0, Some(3.0))],
            )],
        );
        let svg = p.svg("c", 600.0, 280.0);
        assert!(svg.contains("<polyline") && !svg.contains("NaN"), "{svg}");
        let p = panel(
            "y",
            YRange::Auto { zero: false },
            vec![Series::new("a", "a", PALETTE[0], vec![(0.0, None)])],
        );
        let svg = p.svg("c", 600.0, 280.0);
        assert!(svg.contains("no data") && !svg.contains("NaN"), "{svg}");
    }

    #[test]
    fn gaps_split_lines() {
        let pts = vec![
            (0.0, Some(1.0)),
            (1.0, Some(2.0)),
            (2.0, None),
            (3.0, Some(1.0)),
            (4.0, None),
            (5.0, Some(0.0)),
            (6.0, Some(1.5)),
        ];
        let p = panel(
            "y",
            YRange::Auto { zero: false },
            vec![Series::new("a", "a", PALETTE[0], pts)],
        );
        let svg = p.svg("c", 600.0, 280.0);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 1);
    }
}
