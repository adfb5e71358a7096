//! `tandem bench generate` at tiny sizes: the last line of stdout is a JSON object with
//! positive throughput figures.

mod common;
use common::OutputWithin;

use std::process::Command;

use serde_json::Value;

/// The JSON object on the last line of a successful bench's stdout.
fn last_json_line(out: &std::process::Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("last line not JSON ({e}): {last}"))
}

#[test]
fn bench_generate_prints_positive_figures_as_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "bench",
            "generate",
            "--batch",
            "4",
            "--new-tokens",
            "4",
            "--repeats",
            "1",
        ])
        .output_within();
    let report = last_json_line(&out);
    for key in [
        "cached_tokens_per_s",
        "recompute_tokens_per_s",
        "cache_speedup",
        "train_tokens_per_s",
    ] {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(v > 0.0 && v.is_finite(), "{key} = {v}");
    }
    assert_eq!(report["batch"], 4);
    assert_eq!(report["new_tokens"], 4);
}

#[test]
fn bench_rejects_zero_sizes() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "generate", "--batch", "0"])
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--batch"), "{stderr}");
}

/// The overlap bench at CI size. Timings on a shared machine are noisy, so this checks the
/// machine-independent part: the figures are the medians of the rounds' figures and each
/// round's ratios are its own step times' ratios; in async mode the learner finds its batch
/// ready (its median wait is far below the time either side takes per step).
#[test]
fn bench_overlap_reports_the_ratios_and_async_keeps_the_learner_fed() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "bench",
            "overlap",
            "--steps",
            "8",
            "--warmup",
            "2",
            "--rounds",
            "3",
            "--config",
            config.to_str().unwrap(),
        ])
        .output_within();
    let report = last_json_line(&out);
    let rounds = report["per_round"]
        .as_array()
        .unwrap_or_else(|| panic!("per_round missing: {report}"));
    assert_eq!(rounds.len(), 3, "{report}");
    assert_eq!(report["rounds"], 3, "{report}");
    let keys = [
        "sync_step_s",
        "async_step_s",
        "gen_s",
        "learn_s",
        "ideal_step_s",
        "async_over_ideal",
        "speedup",
        "ideal_speedup",
        "contention",
        "inflight_step_s",
        "inflight_speedup",
        "inflight_over_async",
        "async_gen_tokens_per_s",
        "inflight_gen_tokens_per_s",
        "inflight_gen_tokens_ratio",
    ];
    for round in rounds {
        let get = |k: &str| round[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {round}"));
        for k in keys {
            assert!(get(k) > 0.0 && get(k).is_finite(), "{k}: {round}");
        }
        assert!((get("inflight_speedup") - get("sync_step_s") / get("inflight_step_s")).abs() < 1e-9);
        assert!(
            (get("inflight_gen_tokens_ratio") - get("inflight_gen_tokens_per_s") / get("async_gen_tokens_per_s")).abs()
                < 1e-9
        );
        assert!((get("ideal_step_s") - get("gen_s").max(get("learn_s"))).abs() < 1e-12);
        assert!((get("speedup") - get("sync_step_s") / get("async_step_s")).abs() < 1e-9);
        assert!((get("async_over_ideal") - get("async_step_s") / get("ideal_step_s")).abs() < 1e-9);
    }
    // With samplers one version ahead the learner's batch is waiting for it whenever the
    // learner is the slower side, and at most briefly otherwise. Checked on the medians over
    // the rounds, as the bench reports it: a slow spell of the machine during one round
    // (seen once: that round's learner at 18 ms a step against 12) moves that round alone.
    let median = |k: &str| report[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {report}"));
    assert!(
        median("async_learner_wait_s") < 0.25 * median("gen_s").max(median("learn_s")),
        "learner starved in async mode: {report}"
    );
    for k in keys.into_iter().chain(["async_learner_wait_s"]) {
        let mut v: Vec<f64> = rounds.iter().map(|r| r[k].as_f64().unwrap()).collect();
        v.sort_by(f64::total_cmp);
        assert_eq!(
            report[k].as_f64().unwrap(),
            v[1],
            "{k} is not the median of the rounds: {report}"
        );
    }
}

/// `tandem bench cluster` at a small size (2 versions, 64 KiB chunks) plus `extra`: its JSON report.
fn bench_cluster(extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "cluster", "--hidden", "64", "--layers", "2", "--versions", "2"])
        .args(["--chunk-bytes", "65536"])
        .args(extra)
        .env_remove("TANDEM_CLUSTER_COOKIE")
        .output_within();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap()
}

/// The cluster bench at a small size: a real worker process adopts every version, and the
/// figures (cluster and plain-TCP MB/s, their ratio, publish-to-adopt latency) are positive.
#[test]
fn bench_cluster_prints_transfer_rates_and_their_ratio() {
    let report = bench_cluster(&[]);
    for key in ["cluster_mb_per_s", "tcp_mb_per_s", "ratio", "publish_to_adopt_s"] {
        let v = report[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {report}"));
        assert!(v > 0.0 && v.is_finite(), "{key} = {v}");
    }
    let ratio = report["cluster_mb_per_s"].as_f64().unwrap() / report["tcp_mb_per_s"].as_f64().unwrap();
    assert!((report["ratio"].as_f64().unwrap() - ratio).abs() < 1e-9);
    assert_eq!(report["per_version"].as_array().unwrap().len(), 2);
    // More than one chunk per version at this chunk size.
    assert!(report["bytes"].as_u64().unwrap() > 65536);
    assert_eq!(report["tls"], false);
}

/// The same over TLS, with a self-signed certificate for 127.0.0.1 made here.
#[test]
fn bench_cluster_runs_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("head.pem"), dir.path().join("head.key"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    let report = bench_cluster(&["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()]);
    assert_eq!(report["tls"], true);
    assert!(report["cluster_mb_per_s"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["per_version"].as_array().unwrap().len(), 2);
}

/// `tandem bench ppo` on a tiny built-in shape: the JSON line has every figure, finite and
/// positive, and the figures agree with each other.
#[test]
fn bench_ppo_reports_consistent_figures() {
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args([
            "bench",
            "ppo",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--heads",
            "2",
            "--vocab",
            "64",
            "--prompts-per-step",
            "8",
            "--prompt-len",
            "4",
            "--new-tokens",
            "4",
            "--epochs",
            "2",
            "--minibatch",
            "4",
            "--threads",
            "1",
            "--steps",
            "4",
            "--matmul-secs",
            "0.05",
        ])
        .output_within();
    let r = last_json_line(&out);
    let num = |key: &str| -> f64 {
        let v = r[key].as_f64().unwrap_or_else(|| panic!("{key} missing: {r}"));
        assert!(v.is_finite() && v > 0.0, "{key} = {v}");
        v
    };
    for key in [
        "episodes_per_s",
        "learner_tokens_per_s",
        "learner_gflops",
        "matmul_gflops",
        "learner_fraction_of_matmul",
        "peak_rss_mb",
        "learner_s_per_step",
        "step_s",
        "learner_gflop_per_step",
    ] {
        num(key);
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
    assert!(close(
        num("learner_fraction_of_matmul"),
        num("learner_gflops") / num("matmul_gflops")
    ));
    assert!(close(num("episodes_per_s"), 8.0 / num("step_s")));
    assert!(close(
        num("learner_gflops"),
        num("learner_gflop_per_step") / num("learner_s_per_step")
    ));
    // 2 epochs × 8 episodes × (4 prompt + 4 response) tokens a step.
    assert!(close(num("learner_tokens_per_s"), 128.0 / num("learner_s_per_step")));
    assert!(num("learner_s_per_step") <= num("step_s"), "{r}");
    for (key, want) in [
        ("layers", 1),
        ("hidden", 32),
        ("vocab", 64),
        ("prompt_tokens", 4),
        ("seq_len", 8),
        ("ppo_epochs", 2),
        ("minibatch_size", 4),
        ("threads", 1),
        ("timed_steps", 3),
    ] {
        assert_eq!(r[key], want, "{key}: {r}");
    }
    assert_eq!(r["workload"], "builtin");
    // Each figure is a median: the learner's over its timed steps, each GEMM shape's over its
    // three rounds before the run and three after it.
    let floats = |v: &serde_json::Value| -> Vec<f64> {
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let median = |mut xs: Vec<f64>| {
        xs.sort_by(f64::total_cmp);
        let n = xs.len();
        (xs[(n - 1) / 2] + xs[n / 2]) / 2.0
    };
    let steps = floats(&r["learner_s_steps"]);
    assert_eq!(steps.len(), 3, "{r}");
    assert!(close(num("learner_s_per_step"), median(steps)));
    let shapes = r["matmul_shapes"].as_array().unwrap();
    assert_eq!(shapes.len(), 3, "{r}");
    for shape in shapes {
        let rounds = floats(&shape["rounds"]);
        assert_eq!(rounds.len(), 6, "{shape}");
        assert!(rounds.iter().all(|g| g.is_finite() && *g > 0.0), "{shape}");
        assert!(close(shape["gflops"].as_f64().unwrap(), median(rounds)), "{shape}");
    }
    // The rates over all rounds and over the rounds on either side of the run: one product of
    // each shape, FLOPs over summed times at the shape's median rate.
    let combined = |rounds: &dyn Fn(Vec<f64>) -> Vec<f64>| {
        let (mut flops, mut secs) = (0.0, 0.0);
        for shape in shapes {
            let f = 2.0
                * ["m", "k", "n"]
                    .iter()
                    .map(|d| shape[*d].as_f64().unwrap())
                    .product::<f64>();
            flops += f;
            secs += f / median(rounds(floats(&shape["rounds"])));
        }
        flops / secs
    };
    assert!(close(num("matmul_gflops"), combined(&|r| r)));
    assert!(close(num("matmul_gflops_before"), combined(&|r| r[..3].to_vec())));
    assert!(close(num("matmul_gflops_after"), combined(&|r| r[3..].to_vec())));
}

#[test]
fn bench_ppo_rejects_bad_arguments_naming_them() {
    for (args, named) in [
        (&["--steps", "1"][..], "--steps"),
        (&["--model", "/nonexistent"][..], "--reward"),
        (&["--reward", "/nonexistent"][..], "--model"),
        (&["--hidden", "30", "--heads", "4"][..], "--hidden"),
        (&["--minibatch", "0"][..], "--minibatch"),
        (
            &[
                "--model",
                "/nonexistent/p",
                "--reward",
                "/nonexistent/r",
                "--vocab",
                "64",
            ][..],
            "--vocab",
        ),
        (
            &[
                "--model",
                "/nonexistent/p",
                "--reward",
                "/nonexistent/r",
                "--prompts",
                "/nonexistent/x",
            ][..],
            "--model",
        ),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["bench", "ppo"])
            .args(args)
            .output_within();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(named), "{args:?} should name {named}: {stderr}");
    }
}

/// The staleness ablation at tiny size with two seeds: one row per variant (sync, then each
/// correction without and with in-flight updates), finite final numbers, the async runs ran
/// stale, and a comparison page with a line per variant beside each seed's own report.
#[test]
fn bench_staleness_prints_a_finite_table_and_a_comparison_report() {
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/quickstart.toml");
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "staleness", "--steps", "4", "--staleness", "2", "--seeds", "2"])
        .args(["--config", config.to_str().unwrap()])
        .arg("--out")
        .arg(out_dir.path())
        .args([
            "--set",
            "data.prompts_per_step=8",
            "--set",
            "data.prompts_per_ticket=4",
            "--set",
            "sampling.max_new_tokens=6",
            "--set",
            "algorithm.ppo_epochs=1",
        ])
        .output_within();
    let report = last_json_line(&out);
    let runs = report["runs"].as_array().unwrap_or_else(|| panic!("no runs: {report}"));
    let names: Vec<&str> = runs.iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "sync",
            "k2-none",
            "k2-none-inflight",
            "k2-tis",
            "k2-tis-inflight",
            "k2-decoupled",
            "k2-decoupled-inflight"
        ]
    );
    for r in runs {
        for k in [
            "final_reward",
            "final_score",
            "final_kl",
            "token_staleness_mean",
            "wall_s",
        ] {
            let v = r[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {r}"));
            assert!(v.is_finite(), "{k}: {r}");
        }
    }
    assert_eq!(runs[0]["token_staleness_mean"].as_f64(), Some(0.0), "sync is on-policy");
    assert!(
        runs[1..]
            .iter()
            .any(|r| r["token_staleness_mean"].as_f64().unwrap() > 0.0),
        "no async run trained on stale tokens: {report}"
    );
    // The printed table: a header and one line per run.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let table: Vec<&str> = stdout.lines().filter(|l| !l.starts_with('{')).collect();
    assert_eq!(table.len(), 1 + names.len(), "{stdout}");
    assert!(table[0].starts_with("run") && table[0].contains("final reward") && table[0].contains("final KL"));

    let page = std::fs::read_to_string(report["report"].as_str().unwrap()).unwrap();
    assert_eq!(page.matches(r#"<tr class="run""#).count(), names.len());
    let reward = &page[page.find(r#"id="chart-reward""#).unwrap()..];
    let reward = &reward[..reward.find("</section>").unwrap()];
    for name in &names {
        assert!(reward.contains(&format!(r#"data-series="{name}""#)), "no {name} line");
        for seed in [1, 2] {
            let run = out_dir.path().join(name).join(format!("seed-{seed}"));
            assert!(run.join("report.html").is_file(), "no report for {name} seed {seed}");
            assert!(run.join("metrics.jsonl").is_file());
            let config = std::fs::read_to_string(run.join("config.toml")).unwrap();
            assert!(
                config.lines().any(|l| l == format!("seed = {seed}")),
                "{name}: not seed {seed}"
            );
        }
    }
}
