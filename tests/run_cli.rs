//! `tandem run` from the command line: Ctrl-C and SIGTERM stop cleanly with a checkpoint, a live
//! run directory is locked, `--overwrite` deletes only run directories, bad input is reported
//! with the file, line and key, and exits 2 without a backtrace.

mod common;
use common::OutputWithin;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn tandem() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
}

fn config(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Starts a long quickstart run into `run_dir` and waits until it has reported `steps` steps.
fn start_long_run(run_dir: &Path, steps: usize) -> std::process::Child {
    let child = tandem()
        .args([
            "run",
            &config("quickstart.toml"),
            "--run-dir",
            run_dir.to_str().unwrap(),
            "--set",
            "steps=100000",
            "--set",
            "metrics.addr=\"127.0.0.1:0\"",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = run_dir.join("metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |s| s.lines().count()) < steps {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(100));
    }
    child
}

/// Sends `signal` to a live run and checks that it stops as Ctrl-C should: exit 0, every
/// reported step on disk, a checkpoint of the last one, the models saved, the summary printed
/// and the `metrics_addr` file removed.
fn stops_cleanly_on(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let child = start_long_run(&run_dir, 3);
    assert!(
        run_dir.join("metrics_addr").is_file(),
        "the endpoint's address was not written"
    );
    let status = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = common::wait_output(child, Duration::from_secs(300));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{signal}: exit {:?}: {stderr}", out.status);
    let summary: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(summary["interrupted"], true);
    // Every reported step is on disk, whole, and numbered without gaps.
    let metrics = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["step"], i as u64);
    }
    assert_eq!(summary["steps"], text.lines().count());
    assert!(run_dir.join("policy/model.safetensors").is_file());
    // The stop came at a step boundary with a checkpoint of it.
    let n = text.lines().count();
    assert_eq!(summary["checkpoints"].as_array().unwrap().last().unwrap(), n);
    assert!(run_dir.join(format!("checkpoints/step-{n}/state.json")).is_file());
    assert!(
        !run_dir.join("metrics_addr").exists(),
        "{signal}: a stale metrics_addr was left behind"
    );
}

#[test]
fn ctrl_c_stops_the_run_cleanly() {
    stops_cleanly_on("-INT");
}

#[test]
fn sigterm_stops_the_run_cleanly_like_ctrl_c() {
    stops_cleanly_on("-TERM");
}

#[test]
fn a_live_run_directory_is_locked_against_overwrite_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let mut child = start_long_run(&run_dir, 1);
    let pid = child.id();
    let before = std::fs::read_dir(&run_dir).unwrap().count();
    let run_dir_s = run_dir.to_str().unwrap();
    let cfg = config("quickstart.toml");
    let attempts: [&[&str]; 3] = [
        &["run", &cfg, "--run-dir", run_dir_s, "--overwrite"],
        &["run", "--resume", run_dir_s],
        &["run", &cfg, "--run-dir", run_dir_s],
    ];
    for args in attempts {
        fails_with(
            args,
            &[run_dir_s, &format!("pid {pid}"), "in use by another tandem run"],
        );
        assert_eq!(
            std::fs::read_dir(&run_dir).unwrap().count(),
            before,
            "{args:?} changed the live run's directory"
        );
        assert!(run_dir.join("config.toml").is_file() && run_dir.join("metrics.jsonl").is_file());
    }
    assert!(child.try_wait().unwrap().is_none(), "the live run stopped");
    // The lock goes with its holder, however it ends: after SIGKILL the directory is free.
    child.kill().unwrap();
    let _ = common::wait_output(child, Duration::from_secs(60));
    let out = tandem()
        .args(["run", &cfg, "--run-dir", run_dir_s, "--overwrite", "--set", "steps=1"])
        .args(["--set", "metrics.enabled=false"])
        .output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        std::fs::read_to_string(run_dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .count(),
        1
    );
}

#[test]
fn overwrite_deletes_only_tandem_run_directories() {
    let dir = tempfile::tempdir().unwrap();
    // A config with an absolute prompts path, so that it works from any working directory.
    let text = std::fs::read_to_string(config("quickstart.toml")).unwrap();
    let prompts = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/data/prompts.jsonl");
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, text.replace("data/prompts.jsonl", prompts.to_str().unwrap())).unwrap();
    let cfg = cfg.to_str().unwrap();
    let victim = dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious.txt"), "keep me").unwrap();
    fails_with(
        &["run", cfg, "--run-dir", victim.to_str().unwrap(), "--overwrite"],
        &[victim.to_str().unwrap(), "not a tandem run directory"],
    );
    // Neither the working directory nor its parent, even when run from inside a victim.
    for run_dir in [".", ".."] {
        let out = tandem()
            .current_dir(&victim)
            .args(["run", cfg, "--run-dir", run_dir, "--overwrite"])
            .output_within();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{run_dir}: {stderr}");
        assert!(stderr.contains("working directory"), "{run_dir}: {stderr}");
    }
    assert_eq!(std::fs::read_to_string(victim.join("precious.txt")).unwrap(), "keep me");
    assert_eq!(
        std::fs::read_dir(&victim).unwrap().count(),
        1,
        "something was written into the victim"
    );
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = tandem().args(args).output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "{args:?}: {n:?} not in {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The repository's `fixtures/hf`, or `$TANDEM_FIXTURES/hf`.
fn fixtures_hf() -> std::path::PathBuf {
    std::env::var_os("TANDEM_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
        .join("hf")
}

#[test]
fn run_reads_the_fixtures_from_the_repository_unless_tandem_fixtures_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    // Unset: the shipped config finds the in-repo checkpoints (so it gets as far as training;
    // one step is enough to show the models loaded).
    let out = tandem()
        .args(["run", &config("reward_model.toml"), "--set", "steps=1", "--run-dir"])
        .arg(dir.path().join("r"))
        .env_remove("TANDEM_FIXTURES")
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // Set: the checkpoints are read from there, and the error names that directory.
    let elsewhere = dir.path().join("elsewhere");
    let out = tandem()
        .args(["run", &config("reward_model.toml"), "--run-dir"])
        .arg(dir.path().join("r2"))
        .env("TANDEM_FIXTURES", &elsewhere)
        .output_within();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let expected = elsewhere.join("hf/gpt2-tiny");
    assert!(
        stderr.contains("models.policy.path") && stderr.contains(expected.to_str().unwrap()),
        "{stderr}"
    );
}

#[test]
fn progress_is_one_line_per_step_on_stderr_unless_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let run = |run_dir: &str, quiet: bool| {
        let mut c = tandem();
        c.args(["run", &config("quickstart.toml"), "--set", "steps=2", "--run-dir"])
            .arg(dir.path().join(run_dir));
        if quiet {
            c.arg("--quiet");
        }
        let out = c.output_within();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    // stderr is not a terminal here: plain lines, one per step, with every field.
    let stderr = run("a", false);
    for k in 1..=2 {
        let line = stderr
            .lines()
            .find(|l| l.starts_with(&format!("step {k}/2 ")))
            .unwrap_or_else(|| panic!("no line for step {k}: {stderr}"));
        for field in ["score ", "reward ", "kl ", "beta ", "tok/s", "elapsed ", "eta "] {
            assert!(line.contains(field), "{field:?} not in {line:?}");
        }
    }
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("step 2/2 ") && l.ends_with("eta 0s")),
        "{stderr}"
    );
    // --quiet: none.
    let stderr = run("b", true);
    assert!(!stderr.lines().any(|l| l.starts_with("step ")), "{stderr}");
}

#[test]
fn bad_configs_name_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(config("quickstart.toml")).unwrap();
    let bad = dir.path().join("bad.toml");
    // An unknown key in a section: the file, its line and the key.
    std::fs::write(&bad, text.replace("[mode]\n", "[mode]\nmax_stalenes = 2\n")).unwrap();
    let line = text.lines().position(|l| l == "[mode]").unwrap() + 2;
    fails_with(
        &["run", bad.to_str().unwrap()],
        &["bad.toml", &format!("line {line}"), "max_stalenes"],
    );
    // A wrong type.
    std::fs::write(&bad, text.replace("steps = 60", "steps = \"sixty\"")).unwrap();
    let line = text.lines().position(|l| l == "steps = 60").unwrap() + 1;
    fails_with(
        &["run", bad.to_str().unwrap()],
        &["bad.toml", &format!("line {line}"), "invalid type"],
    );
    // A missing file named in the config.
    std::fs::write(&bad, text.replace("data/prompts.jsonl", "data/nope.jsonl")).unwrap();
    fails_with(&["run", bad.to_str().unwrap()], &["data.prompts", "nope.jsonl"]);
    // A missing model directory.
    let rm = std::fs::read_to_string(config("reward_model.toml")).unwrap();
    std::fs::write(&bad, rm.replace("hf/gpt2-tiny\"", "hf/no-such-model\"")).unwrap();
    fails_with(
        &["run", bad.to_str().unwrap()],
        &["models.policy.path", "no-such-model"],
    );
    // A model directory that does not match its config: a missing tensor, a missing key.
    let fixture = fixtures_hf().join("gpt2-tiny");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
    }
    let fixture_cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap()).unwrap();
    let write_cfg = |edit: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut c = fixture_cfg.as_object().unwrap().clone();
        edit(&mut c);
        std::fs::write(model.join("config.json"), serde_json::to_string(&c).unwrap()).unwrap();
    };
    let layers = fixture_cfg["n_layer"].as_u64().unwrap();
    write_cfg(&|c| {
        c.insert("n_layer".into(), (layers + 1).into());
    });
    let policy = format!("models.policy.path=\"{}\"", model.display());
    let run_dir = dir.path().join("r");
    let args = [
        "run",
        &config("reward_model.toml"),
        "--set",
        &policy,
        "--run-dir",
        run_dir.to_str().unwrap(),
    ];
    fails_with(&args, &[model.to_str().unwrap(), &format!("transformer.h.{layers}.")]);
    write_cfg(&|c| {
        c.remove("n_embd");
    });
    fails_with(&args, &["config.json", "n_embd"]);
    // A bad --set.
    fails_with(
        &["run", &config("quickstart.toml"), "--set", "mode.nope=1"],
        &["quickstart.toml", "nope"],
    );
    // A missing config file.
    fails_with(&["run", "/no/such/config.toml"], &["/no/such/config.toml"]);
}

#[test]
fn a_malformed_prompt_line_is_reported_with_its_number() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"the movie was\"}\n\n{\"prompt\": \"the film\"\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(config("quickstart.toml")).unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, text.replace("data/prompts.jsonl", prompts.to_str().unwrap())).unwrap();
    fails_with(
        &[
            "run",
            cfg.to_str().unwrap(),
            "--run-dir",
            dir.path().join("r").to_str().unwrap(),
        ],
        &["prompts.jsonl:3", "malformed JSON"],
    );
}

#[test]
fn bad_sampling_and_algorithm_settings_exit_2_naming_the_key_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("sampling.temperature=-0.5", "sampling.temperature"),
        ("sampling.temperature=nan", "sampling.temperature"),
        ("sampling.top_p=0.0", "sampling.top_p"),
        ("sampling.top_p=1.5", "sampling.top_p"),
        ("data.prompt_max_tokens=0", "data.prompt_max_tokens"),
        ("algorithm.ppo_epochs=0", "algorithm.ppo_epochs"),
        ("algorithm.policy_lr=-1e-4", "algorithm.policy_lr"),
        ("algorithm.critic_lr=-1e-4", "algorithm.critic_lr"),
        ("algorithm.minibatch_size=0", "algorithm.minibatch_size"),
        ("mode.publish_every=0", "mode.publish_every"),
        ("algorithm.gae={ gamma = 1.0, lambda = 1.5 }", "algorithm.gae.lambda"),
        ("algorithm.gae={ gamma = 1.0, lambda = -0.1 }", "algorithm.gae.lambda"),
        ("algorithm.loss={ clip_eps = -0.2 }", "algorithm.loss.clip_eps"),
        (
            "algorithm.kl={ kind = \"adaptive\", init_beta = -0.1, target = 4.0 }",
            "algorithm.kl.init_beta",
        ),
        ("algorithm.kl={ kind = \"fixed\", beta = -1.0 }", "algorithm.kl.beta"),
        ("algorithm.ema_decay=1.0", "algorithm.ema_decay"),
        ("algorithm.ptx_coef=1.0", "data.pretrain"),
        (
            "algorithm.loss={ behaviour_weight_cap = 0.5 }",
            "algorithm.loss.behaviour_weight_cap",
        ),
    ];
    for (i, (set, key)) in cases.iter().enumerate() {
        let run_dir = dir.path().join(format!("r{i}"));
        fails_with(
            &[
                "run",
                &config("quickstart.toml"),
                "--set",
                set,
                "--run-dir",
                run_dir.to_str().unwrap(),
            ],
            &[key],
        );
        assert!(!run_dir.exists(), "{set}: the run directory was written");
    }
}
