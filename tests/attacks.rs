//! The hostile-user attacks of issue 13, replayed through the built binary so that they stay
//! fixed: each test does what the attacker did and checks the exit status, the message and what
//! is (or is not) on disk afterwards. Runs are tiny (the built-in quickstart model, 2 to 6
//! steps of 8 prompts) so that the whole file takes seconds, not minutes.

mod common;
use common::OutputWithin;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn config(name: &str) -> String {
    root().join("configs").join(name).to_string_lossy().into_owned()
}

fn fixture(name: &str) -> String {
    root().join("fixtures/hf").join(name).to_string_lossy().into_owned()
}

fn tandem(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .env_remove("TANDEM_CLUSTER_COOKIE")
        .output_within()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `--set` pairs that make the quickstart tiny: `steps` steps of 8 prompts, 4 new tokens.
fn tiny(steps: u64) -> Vec<String> {
    [
        format!("steps={steps}"),
        "data.prompts_per_step=8".into(),
        "data.prompts_per_ticket=8".into(),
        "sampling.max_new_tokens=4".into(),
        "algorithm.ppo_epochs=1".into(),
        "algorithm.minibatch_size=8".into(),
        "metrics.enabled=false".into(),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}

/// `tandem run configs/quickstart.toml --run-dir DIR` made tiny, plus `extra` arguments.
fn quick_run(run_dir: &Path, steps: u64, extra: &[&str]) -> Output {
    let cfg = config("quickstart.toml");
    let mut args: Vec<String> = vec!["run".into(), cfg, "--run-dir".into(), run_dir.to_str().unwrap().into()];
    args.extend(tiny(steps));
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tandem(&args)
}

fn assert_exit(out: &Output, code: i32, needles: &[&str]) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(code), "{err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in:\n{err}");
    }
    assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "{err}");
    err
}

fn last_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().expect("a summary line")).expect("JSON summary")
}

fn lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |s| s.lines().count())
}

fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

// ---- 1. Tokenizer mismatch between the policy and the reward model -------------------------

#[test]
fn a_reward_model_with_another_tokenizer_scores_the_retokenised_text() {
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let rm = fixture("gpt2-tiny-reward");
    let out = quick_run(
        &run_dir,
        2,
        &[
            "--set",
            "reward.kind=\"reward_model\"",
            "--set",
            &format!("reward.model=\"{rm}\""),
        ],
    );
    assert_exit(&out, 0, &["re-tokenised"]);
    // Every stored score is the reward model's on the policy's text encoded with the reward
    // model's own tokenizer, computed here independently of the runtime.
    let export = dir.path().join("t.jsonl");
    let out = tandem(&[
        "replay",
        run_dir.to_str().unwrap(),
        "--export-jsonl",
        export.to_str().unwrap(),
    ]);
    assert_exit(&out, 0, &[]);
    let policy_tok = tandem_runtime::builtin::tokenizer().unwrap();
    let rm_tok = tandem_models::TextTokenizer::from_dir(Path::new(&rm)).unwrap();
    let model = tandem_models::ScalarModel::load(Path::new(&rm), &Device::Cpu).unwrap();
    let rows: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.len() >= 16, "{}", rows.len());
    let ids = |v: &Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let mut differs_from_raw = 0;
    for row in rows.iter().take(8) {
        let (p, r) = (ids(&row["prompt_ids"]), ids(&row["response_ids"]));
        let text = policy_tok.decode(&[p.as_slice(), &r].concat()).unwrap();
        let enc = rm_tok.encode(&text).unwrap();
        let n = enc.len();
        let t = Tensor::from_vec(enc, (1, n), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n), candle_core::DType::F32, &Device::Cpu).unwrap();
        let want = model.scores(&t, &mask).unwrap().to_vec1::<f32>().unwrap()[0];
        let got = row["score"].as_f64().unwrap() as f32;
        assert!((want - got).abs() < 1e-4, "{text:?}: stored {got}, reward model {want}");
        // What the attack used to do: the policy's ids read under the reward model's vocabulary.
        let raw: Vec<u32> = [p.as_slice(), &r].concat();
        let n = raw.len();
        let t = Tensor::from_vec(raw, (1, n), &Device::Cpu).unwrap();
        let mask = Tensor::ones((1, n), candle_core::DType::F32, &Device::Cpu).unwrap();
        let wrong = model.scores(&t, &mask).unwrap().to_vec1::<f32>().unwrap()[0];
        if (wrong - got).abs() > 1e-4 {
            differs_from_raw += 1;
        }
    }
    assert!(differs_from_raw > 0, "re-tokenising changed no score");
}

#[test]
fn a_smaller_reward_vocabulary_under_the_same_tokenizer_is_refused_at_load() {
    use tandem_models::{HeadKind, ModelConfig, ScalarModel, WeightInit};
    let dir = tempfile::tempdir().unwrap();
    // A reward model over the built-in tokenizer whose embedding table has only 50 rows.
    let rm = dir.path().join("rm");
    let cfg = ModelConfig::gpt2(50, 16, 1, 2, 64).with_head(HeadKind::Scalar);
    let (_, vars) = ScalarModel::trainable(&cfg, WeightInit::Random { seed: 3 }, &candle_core::Device::Cpu).unwrap();
    tandem_models::save_checkpoint(&rm, &cfg, &tandem_models::snapshot(&vars).unwrap(), None).unwrap();
    std::fs::write(rm.join("tokenizer.json"), tandem_runtime::builtin::tokenizer_json()).unwrap();
    let run_dir = dir.path().join("run");
    let started = Instant::now();
    let out = quick_run(
        &run_dir,
        2,
        &[
            "--set",
            "reward.kind=\"reward_model\"",
            "--set",
            &format!("reward.model=\"{}\"", rm.display()),
        ],
    );
    let err = assert_exit(&out, 2, &["vocab_size is 50", "config.json"]);
    assert!(!err.contains("restart"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert_eq!(lines(&run_dir.join("metrics.jsonl")), 0, "it trained before refusing");
    // A critic initialised from it is refused the same way.
    let out = quick_run(
        &run_dir,
        2,
        &[
            "--overwrite",
            "--set",
            "models.critic.init=\"path\"",
            "--set",
            &format!("models.critic.path=\"{}\"", rm.display()),
        ],
    );
    assert_exit(&out, 2, &["models.critic.path", "vocab_size is 50"]);
}

// ---- 2. A full disk ---------------------------------------------------------------------

#[test]
fn a_full_disk_at_the_first_checkpoint_exits_1_without_advising_resume() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let out = quick_run(&run_dir, 3, &["--set", "faults.disk_full_checkpoint_at_step=0"]);
    let err = assert_exit(
        &out,
        1,
        &["No space left on device", "no complete checkpoint was written"],
    );
    assert!(!err.contains("--resume"), "{err}");
}

#[test]
fn a_full_disk_under_the_trajectory_store_stops_the_run_and_resume_continues_it() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let out = quick_run(
        &run_dir,
        6,
        &[
            "--set",
            "faults.disk_full_store_at_step=2",
            "--set",
            "checkpoints.every=1",
        ],
    );
    let err = assert_exit(
        &out,
        1,
        &[
            "trajectory store",
            "No space left on device",
            "latest checkpoint:",
            "--resume",
        ],
    );
    let reported = lines(&run_dir.join("metrics.jsonl"));
    assert!(reported < 6, "the run went on: {reported} steps\n{err}");
    // What the message advises works: the run continues from its latest complete checkpoint.
    let out = tandem(&["run", "--resume", run_dir.to_str().unwrap()]);
    assert_exit(&out, 0, &[]);
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (0..6).collect::<Vec<_>>());
    let out = tandem(&["replay", run_dir.to_str().unwrap(), "--verify"]);
    assert_exit(&out, 0, &[]);
}

#[cfg(target_os = "linux")]
#[test]
fn metrics_on_a_full_device_stop_the_run_with_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    // Every write to /dev/full fails with ENOSPC: a real full disk under metrics.jsonl.
    std::os::unix::fs::symlink("/dev/full", run_dir.join("metrics.jsonl")).unwrap();
    let out = quick_run(&run_dir, 3, &[]);
    assert_exit(&out, 1, &["metrics.jsonl", "No space left on device", "the run stops"]);
}

// ---- 3. Exporting around a corrupt record, and replay's input errors ---------------------

#[test]
fn replay_skip_corrupt_exports_the_intact_records_and_input_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    assert_exit(&quick_run(&run_dir, 3, &[]), 0, &[]);
    let rd = run_dir.to_str().unwrap();
    let stored = last_json(&tandem(&["replay", rd, "--verify"]))["records"]
        .as_u64()
        .unwrap();
    assert!(stored >= 24, "{stored}");
    // Input errors: a missing output directory, and filters that match nothing.
    let out = tandem(&["replay", rd, "--export-jsonl", "/no/such/dir/x.jsonl"]);
    assert_exit(&out, 2, &["/no/such/dir", "does not exist"]);
    let out = tandem(&["replay", rd, "--step", "999"]);
    assert_exit(&out, 2, &["no stored trajectory matches", "--step 999"]);
    // One damaged byte in the middle of the log.
    let seg = run_dir.join("trajectories/seg-000001.log");
    let len = std::fs::metadata(&seg).unwrap().len() as usize;
    flip_byte(&seg, len / 2);
    let export = dir.path().join("out.jsonl");
    let e = export.to_str().unwrap();
    let out = tandem(&["replay", rd, "--export-jsonl", e]);
    assert_exit(&out, 1, &["--skip-corrupt", "seg-000001.log"]);
    let out = tandem(&["replay", rd, "--export-jsonl", e, "--skip-corrupt"]);
    let err = assert_exit(&out, 0, &["skipped", "seg-000001.log", "bytes"]);
    assert_eq!(lines(&export) as u64, stored - 1, "{err}");
}

// ---- 4. train-rm --------------------------------------------------------------------------

#[test]
fn train_rm_locks_and_refuses_to_replace_a_previous_run_without_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("rm");
    let rd = run_dir.to_str().unwrap();
    let cfg = config("rm/preferences.toml");
    let args = ["train-rm", &cfg, "--run-dir", rd, "--set", "train.epochs=1"];
    assert_exit(&tandem(&args), 0, &[]);
    let model = std::fs::read(run_dir.join("reward_model/model.safetensors")).unwrap();
    let out = tandem(&args);
    assert_exit(&out, 2, &[rd, "holds another run", "--overwrite"]);
    assert_eq!(
        std::fs::read(run_dir.join("reward_model/model.safetensors")).unwrap(),
        model
    );
    let with_overwrite: Vec<&str> = args.iter().copied().chain(["--overwrite"]).collect();
    assert_exit(&tandem(&with_overwrite), 0, &[]);
    // --overwrite deletes only a tandem run directory.
    let victim = dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious.txt"), "keep me").unwrap();
    let out = tandem(&["train-rm", &cfg, "--run-dir", victim.to_str().unwrap(), "--overwrite"]);
    assert_exit(&out, 2, &["not a tandem run directory"]);
    assert_eq!(std::fs::read_to_string(victim.join("precious.txt")).unwrap(), "keep me");
}

#[test]
fn train_rm_checks_the_held_out_set_and_ranked_lines_before_training() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("rm/preferences.toml");
    let two = dir.path().join("two.jsonl");
    std::fs::write(
        &two,
        "{\"prompt\":\"the film\",\"chosen\":\"good\",\"rejected\":\"bad\"}\n\
         {\"prompt\":\"the plot\",\"chosen\":\"great\",\"rejected\":\"dull\"}\n",
    )
    .unwrap();
    let ranked = dir.path().join("ranked.jsonl");
    let responses: Vec<String> = (0..65).map(|i| format!("\"good {i}\"")).collect();
    let ranking: Vec<String> = (0..65).map(|i| i.to_string()).collect();
    std::fs::write(
        &ranked,
        format!(
            "{{\"prompt\":\"the film\",\"responses\":[{}],\"ranking\":[{}]}}\n",
            responses.join(","),
            ranking.join(",")
        ),
    )
    .unwrap();
    let cases: [(Vec<String>, &[&str]); 3] = [
        (
            vec![format!("data.train=\"{}\"", two.display())],
            &["no held-out comparisons", "2 records"],
        ),
        (vec!["data.eval_fraction=0".into()], &["no held-out comparisons"]),
        (
            vec![format!("data.train=\"{}\"", ranked.display())],
            &["ranked.jsonl:1", "2 to 64 entries, got 65"],
        ),
    ];
    for (sets, needles) in cases {
        let run_dir = dir.path().join("rm");
        let mut args = vec![
            "train-rm".to_string(),
            cfg.clone(),
            "--run-dir".into(),
            run_dir.to_str().unwrap().into(),
        ];
        for s in &sets {
            args.extend(["--set".to_string(), s.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let started = Instant::now();
        assert_exit(&tandem(&args), 2, needles);
        assert!(started.elapsed() < Duration::from_secs(30), "{sets:?}: trained first");
        assert!(!run_dir.exists(), "{sets:?}: the run directory was written");
    }
}

// ---- 5. Exit codes and messages -------------------------------------------------------------

#[test]
fn output_files_in_missing_directories_exit_2_for_every_command() {
    let out = tandem(&["sample", &config("quickstart.toml"), "--out", "/no/such/dir/best.jsonl"]);
    assert_exit(&out, 2, &["/no/such/dir", "does not exist"]);
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    assert_exit(&quick_run(&run_dir, 1, &[]), 0, &[]);
    let out = tandem(&["report", run_dir.to_str().unwrap(), "--out", "/no/such/dir/r.html"]);
    assert_exit(&out, 2, &["/no/such/dir", "does not exist"]);
}

#[test]
fn top_against_a_server_that_is_not_tandem_names_the_address() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(2) {
            // As an SSH server does: its banner first, then it reads and hangs up.
            let Ok(mut s) = stream else { continue };
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.6\r\n");
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
        }
    });
    let out = tandem(&["top", "--addr", &addr, "--once"]);
    assert_exit(&out, 2, &[&addr, "not a tandem metrics endpoint", "SSH-2.0"]);
}

#[test]
fn a_prompt_line_that_is_not_utf8_is_named_and_skippable() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let mut bytes = b"{\"prompt\": \"the movie was\"}\n".to_vec();
    bytes.extend(b"{\"prompt\": \"the \xff\xfe plot\"}\n");
    bytes.extend(b"{\"prompt\": \"the film is\"}\n");
    std::fs::write(&prompts, bytes).unwrap();
    let set = format!("data.prompts=\"{}\"", prompts.display());
    let run_dir = dir.path().join("run");
    let out = quick_run(&run_dir, 1, &["--set", &set]);
    assert_exit(&out, 2, &["prompts.jsonl:2", "not valid UTF-8"]);
    let out = quick_run(
        &run_dir,
        1,
        &["--overwrite", "--set", &set, "--set", "data.on_bad_line=\"skip\""],
    );
    assert_exit(&out, 0, &["prompts.jsonl:2"]);
    assert_eq!(last_json(&out)["prompts_skipped"], 1);
}

#[test]
fn set_errors_name_the_override_and_counts_that_size_allocations_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let cases: [(&str, &[&str]); 4] = [
        (
            "algorithm.ppo_epochs=\"four\"",
            &["--set algorithm.ppo_epochs=\"four\"", "invalid type"],
        ),
        (
            "data.prompts_per_stepp=3",
            &["--set data.prompts_per_stepp=3", "unknown field"],
        ),
        (
            "data.prompt_max_tokens=1000000000",
            &["data.prompt_max_tokens", "between 1 and 131072"],
        ),
        (
            "sampling.max_new_tokens=1000000000",
            &["sampling.max_new_tokens", "between 1 and 131072"],
        ),
    ];
    for (set, needles) in cases {
        let out = quick_run(&run_dir, 1, &["--set", set]);
        assert_exit(&out, 2, needles);
    }
    // A prompt and response longer than the HF policy's position table: at load, not mid-run.
    let out = tandem(&[
        "run",
        &config("reward_model.toml"),
        "--run-dir",
        run_dir.to_str().unwrap(),
        "--set",
        "data.prompt_max_tokens=200",
    ]);
    assert_exit(&out, 2, &["reads at most 128 positions", "config.json"]);
    // best-of-N counts (earlier fix): refused before any allocation.
    let out = tandem(&[
        "sample",
        &config("quickstart.toml"),
        "--best-of",
        "1000000",
        "--out",
        dir.path().join("b.jsonl").to_str().unwrap(),
    ]);
    assert_exit(&out, 2, &["--best-of must be between 1 and 1024"]);
    // Every sampler on a worker node: best-of-N has no local device to sample on.
    let out = tandem(&[
        "sample",
        &config("quickstart.toml"),
        "--best-of",
        "2",
        "--out",
        dir.path().join("c.jsonl").to_str().unwrap(),
        "--set",
        "placement.rollout_devices=[]",
        "--set",
        "placement.nodes=[{name=\"w1\", rollouts=1}]",
        "--set",
        "cluster.listen=\"127.0.0.1:0\"",
    ]);
    assert_exit(&out, 2, &["placement.rollout_devices is empty"]);
}

#[test]
fn cluster_cookies_and_join_addresses_are_checked_at_once() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["node", "--join", "garbage", "--name", "w1"])
        .env("TANDEM_CLUSTER_COOKIE", "0123456789abcdef0123")
        .output_within();
    assert_exit(&out, 2, &["--join \"garbage\"", "HOST:PORT"]);
    assert!(started.elapsed() < Duration::from_secs(10), "it retried");
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["node", "--join", "127.0.0.1:1", "--name", "w1"])
        .env("TANDEM_CLUSTER_COOKIE", "x")
        .output_within();
    assert_exit(&out, 2, &["1 bytes", "at least 16"]);
    // The head checks its cookie before it writes or starts anything.
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("head");
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["run", &config("cluster.toml"), "--run-dir", run_dir.to_str().unwrap()])
        .args([
            "--set",
            "cluster.listen=\"127.0.0.1:0\"",
            "--set",
            "metrics.enabled=false",
        ])
        .env("TANDEM_CLUSTER_COOKIE", "short")
        .output_within();
    assert_exit(&out, 2, &["TANDEM_CLUSTER_COOKIE", "5 bytes", "at least 16"]);
    assert!(!run_dir.join("config.toml").exists());
}

// ---- 6. The earlier attacks, kept fixed --------------------------------------------------------

/// A long quickstart run into `run_dir`, once it has reported `steps` steps.
fn start_long_run(run_dir: &Path, steps: usize) -> std::process::Child {
    let mut args: Vec<String> = vec![
        "run".into(),
        config("quickstart.toml"),
        "--run-dir".into(),
        run_dir.to_str().unwrap().into(),
    ];
    args.extend(tiny(100_000));
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while lines(&run_dir.join("metrics.jsonl")) < steps {
        assert!(started.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

#[test]
fn overwrite_of_a_live_run_is_refused_and_sigterm_stops_it_with_a_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    let child = start_long_run(&run_dir, 1);
    let pid = child.id();
    let out = quick_run(&run_dir, 1, &["--overwrite"]);
    assert_exit(&out, 2, &["in use by another tandem run", &format!("pid {pid}")]);
    assert!(run_dir.join("metrics.jsonl").is_file());
    let status = Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    let out = common::wait_output(child, Duration::from_secs(120));
    assert_exit(&out, 0, &[]);
    assert_eq!(last_json(&out)["interrupted"], true);
    assert!(run_dir.join("checkpoints").read_dir().unwrap().count() > 0);
    assert!(run_dir.join("policy/model.safetensors").is_file());
}

#[test]
fn overwrite_of_a_directory_that_is_not_a_run_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(victim.join("precious.txt"), "keep me").unwrap();
    let out = quick_run(&victim, 1, &["--overwrite"]);
    assert_exit(&out, 2, &["not a tandem run directory"]);
    assert_eq!(std::fs::read_to_string(victim.join("precious.txt")).unwrap(), "keep me");
}

#[test]
fn a_flipped_checkpoint_byte_falls_back_to_the_previous_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let run_dir = dir.path().join("run");
    assert_exit(&quick_run(&run_dir, 3, &["--set", "checkpoints.every=1"]), 0, &[]);
    let ckpts = run_dir.join("checkpoints");
    let mut steps: Vec<(u64, PathBuf)> = std::fs::read_dir(&ckpts)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let k = p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()?;
            Some((k, p))
        })
        .collect();
    steps.sort();
    assert!(steps.len() >= 2, "{steps:?}");
    let (latest, dir_latest) = steps.last().unwrap().clone();
    let (previous, _) = steps[steps.len() - 2].clone();
    let weights = dir_latest.join("policy/model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len() as usize;
    flip_byte(&weights, len - 5);
    let out = tandem(&["run", "--resume", run_dir.to_str().unwrap(), "--set", "steps=4"]);
    let err = assert_exit(&out, 0, &["damaged", &format!("step-{previous}")]);
    assert_eq!(last_json(&out)["resumed_from"], previous, "{err}");
    assert!(ckpts.join(format!("damaged-step-{latest}")).is_dir());
}
