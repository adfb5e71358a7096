//! `tandem report` from the command line: the page built from a stored run holds every chart with
//! the expected lines and labelled axes and refers to nothing outside itself; malformed input is
//! an error naming the file and line (exit 2); a real resumed run gets a resume marker, an actor
//! chart whose time runs on across sessions, and sample completions from its store; and the
//! page renders in headless Chromium where Chromium is installed.

mod common;
use common::OutputWithin;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tandem_actors::ppo_trainer::StepStats;
use tandem_actors::{HeldOutEval, StepReport, TokenStaleness};

const STEPS: usize = 12;
const ACTORS: [&str; 3] = ["learner/cpu:1", "reward/cpu:0", "rollout/cpu:0/0"];
const SAMPLES: usize = 5;

const CHARTS: [&str; 16] = [
    "chart-reward",
    "chart-eval",
    "chart-true-score",
    "chart-kl",
    "chart-loss",
    "chart-clip",
    "chart-entropy",
    "chart-staleness",
    "chart-token-staleness",
    "chart-behaviour-ratio",
    "chart-mismatch-kl",
    "chart-phases",
    "chart-approx-kl",
    "chart-explained-var",
    "chart-throughput",
    "chart-actors",
];

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

/// A deterministic 12-step metrics.jsonl as `tandem run` writes it (with the mock labeller's
/// true score), plus (optionally) a 3-actor × 5-sample actors.jsonl and a config.toml.
fn write_run(dir: &Path, with_actors: bool) {
    let mut lines = String::new();
    for i in 0..STEPS {
        let x = i as f64;
        let row = StepReport {
            step: i as u64,
            policy_version: i as u64,
            stats: StepStats {
                on_policy: false,
                reward_mean: 0.1 + 0.02 * x,
                reward_std: 0.05,
                score_mean: 0.12 + 0.02 * x,
                kl: 0.1 * x,
                beta: 0.05 - 0.001 * x,
                policy_loss: -0.05 + 0.003 * x,
                value_loss: 0.01 / (1.0 + x),
                entropy: 4.7 - 0.02 * x,
                clip_frac: 0.2 / (1.0 + x),
                approx_kl: 0.01 + 0.001 * x,
                ratio_mean: 1.0,
                kl_loss: 0.0,
                behaviour_weight_mean: 1.0,
                behaviour_ratio_mean: 1.0 + 0.01 * x,
                behaviour_ratio_min: 0.5,
                behaviour_ratio_max: 1.5 + 0.1 * x,
                behaviour_ratio_trunc_frac: 0.01 * x,
                behaviour_mismatch_kl: 0.002 * x,
                ptx_logprob: 0.0,
                explained_var: 0.1 + 0.05 * x,
                response_len_mean: 12.0,
                skipped_updates: 0,
            },
            staleness_mean: if i == 0 { 0.0 } else { 0.75 },
            staleness_max: if i == 0 { 0 } else { 1 },
            token_staleness: TokenStaleness {
                token_staleness_mean: if i == 0 { 0.0 } else { 0.6 },
                token_staleness_max: if i == 0 { 0 } else { 2 },
                off_policy_token_frac: if i == 0 { 0.0 } else { 0.4 },
            },
            dropped_stale: i as u64 / 4,
            tokens_generated: 384,
            generate_s: 0.03,
            reward_s: 0.015,
            value_s: 0.014,
            learn_s: 0.5 + 0.01 * x,
            weight_sync_s: 0.0002,
            adopt_latency_s: if i == 0 { None } else { Some(0.08) },
            replay_buffered: 32,
            learner_wait_s: 0.01,
            nonfinite_streak: 0,
            checkpoint_s: 0.0,
            wall_s: 0.6 * (x + 1.0),
            true_score_mean: Some(0.1 + 0.01 * x),
            eval: HeldOutEval {
                eval_accuracy: (i % 4 == 3).then_some(0.1 + 0.03 * x),
                ..Default::default()
            },
        };
        lines.push_str(&serde_json::to_string(&row).unwrap());
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

    let expected: [(&str, &[&str], &[&str]); 14] = [
        ("chart-reward", &["reward_mean", "score_mean"], &["reward per response"]),
        (
            "chart-true-score",
            &["true_score_mean", "score_mean"],
            &["score per response"],
        ),
        ("chart-approx-kl", &["approx_kl"], &["approx KL (nats/token)"]),
        ("chart-explained-var", &["explained_var"], &["explained variance"]),
        ("chart-throughput", &["tokens_per_s"], &["tokens per second"]),
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
            "chart-token-staleness",
            &["token_staleness_mean", "token_staleness_max", "off_policy_token_frac"],
            &["token staleness (versions)", "off-policy tokens (fraction)"],
        ),
        (
            "chart-behaviour-ratio",
            &[
                "behaviour_ratio_mean",
                "behaviour_ratio_min",
                "behaviour_ratio_max",
                "behaviour_ratio_trunc_frac",
            ],
            &["ratio π_prox / π_behaviour", "truncated (fraction of tokens)"],
        ),
        (
            "chart-mismatch-kl",
            &["behaviour_mismatch_kl"],
            &["mismatch KL (nats/token)"],
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
    // The held-out accuracy: one point per evaluated step (3, 7 and 11), joined.
    let eval = section(&html, "chart-eval");
    assert_eq!(lines(eval), BTreeMap::from([("eval_accuracy".to_string(), 3)]));
    assert!(eval.contains(">accuracy (0–1)</text>"), "chart-eval: no y-axis title");
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
    // The charts and the completions, which say why there are none here.
    assert_eq!(html.matches("<section").count(), CHARTS.len() + 1);
    assert!(section(&html, "completions").contains("no trajectory store"));
    assert!(
        !html.contains("resume-marker"),
        "a run of one session has no resume marker"
    );
}

/// `s` as the report escapes text.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The x coordinates of each line's points, in drawing order, by `data-series`.
fn xs(chart: &str) -> BTreeMap<String, Vec<f64>> {
    let mut out: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for piece in chart.split("<polyline").skip(1) {
        let tag = &piece[..piece.find('>').unwrap()];
        let pts = attr(tag, "points").split_whitespace();
        let x = pts.map(|p| p.split(',').next().unwrap().parse::<f64>().unwrap());
        out.entry(attr(tag, "data-series").to_string()).or_default().extend(x);
    }
    out
}

#[test]
fn a_resumed_run_has_a_resume_marker_one_time_axis_and_completions_from_its_store() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let run_s = run.to_str().unwrap();
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/sync.toml");
    let settings = [
        "--set",
        "metrics.addr=\"127.0.0.1:0\"",
        "--set",
        "metrics.sample_interval_s=0.2",
        "--set",
        "checkpoints.every=2",
    ];
    let out = tandem()
        .args(["run", config.to_str().unwrap(), "--run-dir", run_s, "--set", "steps=2"])
        .args(settings)
        .output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tandem()
        .args(["run", "--resume", run_s, "--set", "steps=4"])
        .output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let (_, html) = report(&run, &[]);
    assert!(html.contains("resumed at steps</th><td>2</td>"), "header: no resume");
    // One marker, at step 2, on each panel over steps.
    for id in ["chart-reward", "chart-clip", "chart-approx-kl", "chart-throughput"] {
        let chart = section(&html, id);
        assert_eq!(chart.matches(r#"class="resume-marker""#).count(), 1, "{id}");
        assert!(chart.contains(r#"class="resume-marker" data-x="2""#), "{id}");
    }
    assert!(
        !html.contains("chart-true-score"),
        "no true score without the mock labeller"
    );
    assert!(!html.contains("chart-eval"), "no held-out chart without [eval]");
    // The new charts hold a finite value for every step.
    for (id, key) in [
        ("chart-approx-kl", "approx_kl"),
        ("chart-explained-var", "explained_var"),
        ("chart-throughput", "tokens_per_s"),
    ] {
        assert_eq!(lines(section(&html, id)).get(key), Some(&4), "{id}");
    }
    // The actor chart's time runs on across the two sessions, with a marker where they meet.
    let actors = section(&html, "chart-actors");
    assert_eq!(actors.matches(r#"class="resume-marker""#).count(), 1);
    let xs = xs(actors);
    assert!(!xs.is_empty(), "no actor lines");
    for (actor, x) in xs {
        assert!(
            x.windows(2).all(|w| w[0] <= w[1]),
            "{actor}: time goes backwards: {x:?}"
        );
    }
    // Completions: two for each of the four steps, the first of step 0 as `replay --show` has it.
    let completions = section(&html, "completions");
    assert_eq!(completions.matches(r#"<tr class="completion">"#).count(), 8);
    let shown = tandem()
        .args(["replay", run_s, "--show", "1", "--step", "0"])
        .output_within();
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    // `replay --show` writes "prompt:   TEXT" and "response: TEXT" (the first line of each).
    let field = |prefix: &str| {
        let line = shown
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{shown}"));
        line[prefix.len()..].to_string()
    };
    for (name, class) in [("prompt:   ", "prompt"), ("response: ", "response")] {
        let text = escape(&field(name));
        assert!(!text.trim().is_empty(), "{name} is empty: {shown}");
        assert!(
            completions.contains(&format!(r#"<td class="{class}">{text}"#)),
            "{name} {text:?} is not in the report's completions"
        );
    }
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
    // Drain both pipes while waiting: a DOM larger than the pipe's buffer would otherwise
    // block chromium on its write and never let it exit.
    let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).unwrap();
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            panic!("chromium did not finish in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
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
