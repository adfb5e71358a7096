//! SVG drawing for the report: panels of lines over shared axes with round-number ticks,
//! gaps where values are missing, shaded bands and legends, and titled figures holding panels.
//! No JavaScript and no external resources: everything is inline SVG and HTML.

use std::fmt::Write as _;

/// matplotlib's tab10: distinguishable on white, and for the common kinds of colour blindness
/// mostly by lightness as well as hue.
pub(super) const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];

pub(super) struct Series {
    /// Stable key, written as `data-series`.
    pub(super) key: String,
    pub(super) label: String,
    pub(super) color: &'static str,
    pub(super) dashed: bool,
    pub(super) points: Vec<(f64, Option<f64>)>,
    /// A shaded band `(x, lo, hi)` drawn under the line, with its legend label.
    pub(super) band: Option<Band>,
}

impl Series {
    pub(super) fn new(key: &str, label: &str, color: &'static str, points: Vec<(f64, Option<f64>)>) -> Series {
        Series {
            key: key.into(),
            label: label.into(),
            color,
            dashed: false,
            points,
            band: None,
        }
    }

    pub(super) fn dashed(mut self) -> Series {
        self.dashed = true;
        self
    }
}

/// A legend label and `(x, lo, hi)` triples.
pub(super) type Band = (String, Vec<(f64, f64, f64)>);

#[derive(Clone, Copy)]
pub(super) enum YRange {
    /// From the data, widened to round numbers; `zero` keeps 0 in view.
    Auto {
        zero: bool,
    },
    Fixed(f64, f64),
}

/// One set of axes.
pub(super) struct Panel {
    pub(super) x_label: &'static str,
    pub(super) y_label: String,
    /// The x values are step numbers: ticks on whole numbers only.
    pub(super) x_integer: bool,
    pub(super) y: YRange,
    pub(super) series: Vec<Series>,
    /// Where a resumed session began: a dashed vertical line at each x, titled.
    pub(super) markers: Vec<(f64, String)>,
}

/// One chart: a titled `<section>` with one or more panels stacked, sharing nothing but the title.
pub(super) struct Figure {
    pub(super) id: &'static str,
    pub(super) title: &'static str,
    pub(super) caption: String,
    /// Spans both columns of the page grid.
    pub(super) wide: bool,
    pub(super) panels: Vec<Panel>,
    pub(super) note: Option<String>,
}

pub(super) const LEFT: f64 = 78.0;
pub(super) const RIGHT: f64 = 18.0;
pub(super) const TOP: f64 = 12.0;
pub(super) const BOTTOM: f64 = 46.0;

/// "Nice" tick spacing (1, 2 or 5 × 10^k) for about `target` intervals over `span`.
pub(super) fn nice_step(span: f64, target: f64) -> f64 {
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
pub(super) fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
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
pub(super) fn tick_label(v: f64, step: f64, max_abs: f64) -> String {
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

pub(super) fn escape(s: &str) -> String {
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
    pub(super) fn y_extent(&self) -> Option<(f64, f64)> {
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

    pub(super) fn x_extent(&self) -> Option<(f64, f64)> {
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
    pub(super) fn svg(&self, clip_id: &str, width: f64, height: f64) -> String {
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
        for (x, title) in self.markers.iter().filter(|m| (x0..=x1).contains(&m.0)) {
            let _ = write!(
                s,
                r##"<line class="resume-marker" data-x="{x}" x1="{:.1}" x2="{:.1}" y1="{TOP}" y2="{:.1}" stroke="#a05a00" stroke-width="1.5" stroke-dasharray="4 3"><title>{}</title></line>"##,
                px(*x),
                px(*x),
                TOP + ph,
                escape(title)
            );
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
    pub(super) fn legend(&self) -> String {
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
    pub(super) fn html(&self) -> String {
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

/// The x axis of a chart over learner steps.
pub(super) const STEP: &str = "learner step";
/// The x axis of a chart over time.
pub(super) const SECONDS: &str = "seconds since start";

/// A panel over learner steps.
pub(super) fn panel(y_label: &str, y: YRange, series: Vec<Series>) -> Panel {
    Panel {
        x_label: STEP,
        y_label: y_label.into(),
        x_integer: true,
        y,
        series,
        markers: vec![],
    }
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
