//! `tandem report` from the command line: the page built from a stored run holds every chart with
//! the expected lines and labelled axes and refers to nothing outside itself; malformed input is
//! an error naming the file and line (exit 2); and the page renders in headless Chromium where
//! Chromium is installed.

mod common;
use common::OutputWithin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const STEPS: usize = 12;
const ACTORS: [&str; 3] = ["learner/cpu:1", "reward/cpu:0", "rollout/cpu:0/0"];
const SAMPLES: usize = 5;

const CHARTS: [&str; 8] = [
    "chart-reward",
    "chart-kl",
    "chart-loss",
    "chart-clip",
    "chart-entropy",
    "chart-staleness",
    "chart-phases",
    "chart-actors",
];

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

/// A deterministic 12-step metrics.jsonl in the format `tandem run` writes, plus (optionally) a
/// 3-actor × 5-sample actors.jsonl and a config.toml.
fn write_run(dir: &Path, with_actors: bool) {
    let mut lines = String::new();
    for i in 0..STEPS {
        let x = i as f64;
        let row = serde_json::json!({
            "step": i, "policy_version": i,
            "reward_mean": 0.1 + 0.02 * x, "reward_std": 0.05, "score_mean": 0.12 + 0.02 * x,
            "kl": 0.1 * x, "beta": 0.05 - 0.001 * x,
            "policy_loss": -0.05 + 0.003 * x, "value_loss": 0.01 / (1.0 + x),
            "entropy": 4.7 - 0.02 * x, "clip_frac": 0.2 / (1.0 + x), "approx_kl": 0.01,
            "ratio_mean": 1.0, "explained_var": 0.1, "response_len_mean": 12.0, "skipped_updates": 0,
            "staleness_mean": if i == 0 { 0.0 } else { 0.75 }, "staleness_max": if i == 0 { 0 } else { 1 },
            "dropped_stale": i / 4, "tokens_generated": 384,
            "generate_s": 0.03, "reward_s": 0.015, "value_s": 0.014, "learn_s": 0.5 + 0.01 * x,
            "weight_sync_s": 0.0002, "adopt_latency_s": if i == 0 { None } else { Some(0.08) },
            "replay_buffered": 32, "learner_wait_s": 0.01, "wall_s": 0.6 * (x + 1.0),
        });
        lines.push_str(&row.to_string());
        lines.push('\n');
    }
    std::fs::write(dir.join("metrics.jsonl"), lines).unwrap();
    std::fs::write(dir.join("config.toml"), "seed = 1\nsteps = 12\n").unwrap();
    if with_actors {
        let mut lines = String::new();
        for s in 0..SAMPLES {
            for (a, name) in ACTORS.iter().enumerate() {
                let row = serde_json::json!({
                    "t": 1.0 + s as f64 + 0.01 * a as f64, "actor": name, "kind": name.split('/').next(),
                    "device": "cpu:0", "busy_frac": 0.2 + 0.3 * a as f64, "messages": s * 3,
                    "queue_depth": 1, "queue_capacity": 2, "rate": null, "version_lag": null,
                });
                lines.push_str(&row.to_string());
                lines.push('\n');
            }
        }
        std::fs::write(dir.join("actors.jsonl"), lines).unwrap();
    }
}

/// Runs `tandem report DIR [extra...]`, asserts success, and returns the report's path (the
/// last stdout line) and its text.
fn report(dir: &Path, extra: &[&str]) -> (PathBuf, String) {
    let out = tandem().arg("report").arg(dir).args(extra).output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {stderr}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let path = PathBuf::from(last["report"].as_str().unwrap());
    let html = std::fs::read_to_string(&path).unwrap();
    (path, html)
}

/// The HTML of the `<section>` with id `id`.
fn section<'a>(html: &'a str, id: &str) -> &'a str {
    let start = html.find(&format!(r#"id="{id}""#)).unwrap_or_else(|| panic!("no {id}"));
    let end = start + html[start..].find("</section>").unwrap();
    &html[start..end]
}

fn attr<'a>(tag: &'a str, name: &str) -> &'a str {
    let key = format!(r#" {name}=""#);
    let start = tag.find(&key).unwrap_or_else(|| panic!("no {name} in {tag}")) + key.len();
    &tag[start..start + tag[start..].find('"').unwrap()]
}

/// Points per line in a chart: `data-series` → number of points (over all its polylines).
fn lines(chart: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for piece in chart.split("<polyline").skip(1) {
        let tag = &piece[..piece.find('>').unwrap()];
        let points = attr(tag, "points").split_whitespace().count();
        *out.entry(attr(tag, "data-series").to_string()).or_default() += points;
    }
    out
}

#[test]
fn report_has_every_chart_with_labelled_axes() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path(), true);
    let (path, html) = report(dir.path(), &[]);
    assert_eq!(path, dir.path().join("report.html"));

    // Self-contained: no network references, no scripts or external resources.
    for bad in ["http://", "https://", "<script", "<link", "<img", "src=", "url(http"] {
        assert!(!html.contains(bad), "the report contains {bad:?}");
    }
    // Header.
    assert!(html.contains("learner steps</th><td>12</td>"), "header: no step count");
    assert!(html.contains("7.2 s"), "header: no wall time");
    assert!(html.contains("config.toml</summary>"), "no config block");

    let expected: [(&str, &[&str], &[&str]); 7] = [
        ("chart-reward", &["reward_mean", "score_mean"], &["reward per response"]),
        (
            "chart-kl",
            &["kl", "beta"],
            &["KL (nats per response)", "β (KL coefficient)"],
        ),
        (
            "chart-loss",
            &["policy_loss", "value_loss"],
            &["policy loss", "value loss"],
        ),
        ("chart-clip", &["clip_frac"], &["clip fraction (of tokens)"]),
        (
            "chart-entropy",
            &["entropy", "response_len_mean"],
            &["entropy (nats/token)", "length (tokens)"],
        ),
        (
            "chart-staleness",
            &["staleness_mean", "staleness_max", "dropped_stale"],
            &["staleness (versions)", "dropped (samples)"],
        ),
        (
            "chart-phases",
            &[
                "generate_s",
                "reward_s",
                "value_s",
                "learn_s",
                "weight_sync_s",
                "learner_wait_s",
                "step_wall_s",
            ],
            &["seconds per step (s)"],
        ),
    ];
    for (id, series, y_labels) in expected {
        let chart = section(&html, id);
        assert!(chart.contains("<svg"), "{id}: no svg");
        assert!(chart.contains("<h2>"), "{id}: no title");
        let got = lines(chart);
        let want: BTreeMap<String, usize> = series.iter().map(|s| (s.to_string(), STEPS)).collect();
        assert_eq!(got, want, "{id}: lines and their point counts");
        assert!(chart.contains(">learner step</text>"), "{id}: no x-axis title");
        for y in y_labels {
            assert!(chart.contains(&format!(">{y}</text>")), "{id}: no y-axis title {y:?}");
        }
        assert!(chart.contains(r#"class="tick""#), "{id}: no tick labels");
        assert!(
            !chart.contains("NaN") && !chart.contains("inf"),
            "{id}: non-finite coordinates"
        );
    }
    // Several series on one set of axes get a legend; the reward's band is in it too.
    assert!(section(&html, "chart-reward").contains(r#"class="legend""#));
    assert!(section(&html, "chart-reward").contains("<polygon class=\"band\""));
    assert!(section(&html, "chart-phases").contains(r#"class="legend""#));

    let actors = section(&html, "chart-actors");
    let want: BTreeMap<String, usize> = ACTORS.iter().map(|a| (a.to_string(), SAMPLES)).collect();
    assert_eq!(lines(actors), want, "actor lines");
    assert!(actors.contains(">seconds since start</text>"));
    assert!(actors.contains(">busy fraction (0–1)</text>"));
    assert!(actors.contains(r#"class="legend""#));
    assert_eq!(html.matches("<section").count(), CHARTS.len());
}

#[test]
fn without_actor_samples_the_utilisation_chart_says_so() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path(), false);
    let out = dir.path().join("elsewhere.html");
    let (path, html) = report(dir.path(), &["--out", out.to_str().unwrap()]);
    assert_eq!(path, out);
    let actors = section(&html, "chart-actors");
    assert!(actors.contains("no actor samples in this run"), "{actors}");
    for id in CHARTS {
        assert!(html.contains(&format!(r#"id="{id}""#)), "no {id}");
    }
}

fn failing(dir: &Path) -> (i32, String) {
    let out = tandem().arg("report").arg(dir).output_within();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (out.status.code().unwrap_or(-1), stderr)
}

#[test]
fn malformed_lines_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path(), true);
    let metrics = dir.path().join("metrics.jsonl");
    let good = std::fs::read_to_string(&metrics).unwrap();

    let mut bad: Vec<&str> = good.lines().collect();
    bad[2] = r#"{"step": 2, "reward_mean": 0.1"#;
    std::fs::write(&metrics, bad.join("\n") + "\n").unwrap();
    let (code, stderr) = failing(dir.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("metrics.jsonl:3:"), "{stderr}");

    bad[2] = r#"{"step": 2, "kl": "high"}"#;
    std::fs::write(&metrics, bad.join("\n") + "\n").unwrap();
    let (code, stderr) = failing(dir.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("metrics.jsonl:3:") && stderr.contains("\"kl\""),
        "{stderr}"
    );

    std::fs::write(&metrics, &good).unwrap();
    let actors = dir.path().join("actors.jsonl");
    let text = std::fs::read_to_string(&actors).unwrap();
    let mut bad: Vec<&str> = text.lines().collect();
    bad[1] = "[1, 2]";
    std::fs::write(&actors, bad.join("\n") + "\n").unwrap();
    let (code, stderr) = failing(dir.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("actors.jsonl:2:"), "{stderr}");

    // A run still writing its last line: that line is skipped, not an error.
    std::fs::write(&actors, &text).unwrap();
    std::fs::write(&metrics, good.clone() + r#"{"step": 12, "rew"#).unwrap();
    let (_, html) = report(dir.path(), &[]);
    assert_eq!(lines(section(&html, "chart-kl"))["kl"], STEPS);
    assert!(html.contains("unterminated last line"));
}

#[test]
fn missing_metrics_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = failing(dir.path());
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains(&dir.path().join("metrics.jsonl").display().to_string()),
        "{stderr}"
    );
    let (code, stderr) = failing(&dir.path().join("absent"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("absent"), "{stderr}");
}

/// Chromium's binary: `/usr/bin/chromium`, or `chromium` / `chromium-browser` on PATH.
fn chromium() -> Option<PathBuf> {
    let fixed = PathBuf::from("/usr/bin/chromium");
    if fixed.is_file() {
        return Some(fixed);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `args`, killing it after two minutes.
fn headless(chromium: &Path, profile: &Path, args: &[String], url: &str) -> Output {
    let mut child = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,2400",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn renders_in_headless_chromium() {
    let Some(chromium) = chromium() else {
        println!("skipped: chromium not installed");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    write_run(dir.path(), true);
    let (path, _) = report(dir.path(), &[]);
    let url = format!("file://{}", path.display());
    let profile = dir.path().join("profile");

    let out = headless(&chromium, &profile, &["--dump-dom".into()], &url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dom = String::from_utf8_lossy(&out.stdout);
    for id in CHARTS {
        let chart = section(&dom, id);
        assert!(
            chart.contains("<svg") && chart.contains("<polyline"),
            "{id} not rendered"
        );
    }

    let shot = dir.path().join("shot.png");
    let out = headless(&chromium, &profile, &[format!("--screenshot={}", shot.display())], &url);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let png = std::fs::read(&shot).unwrap();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    // A blank 1280×2400 page compresses to a few KB; eight charts of lines and text do not.
    assert!(png.len() > 60_000, "screenshot is only {} bytes", png.len());
}
