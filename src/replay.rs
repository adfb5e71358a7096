//! `tandem replay RUN_DIR ...`: inspect, check, export and rescore a run's stored trajectories
//! (`RUN_DIR/trajectories/`, see `tandem_runtime::store`).
//!
//! - no flag: a summary per step (trajectories used and dropped, score mean/min/max) and a last
//!   line with the totals as JSON;
//! - `--show N`: the first N matching trajectories decoded to text, one line per response token
//!   with its log-prob, reference log-prob, KL (= logp − ref_logp), value, reward, advantage
//!   and the policy version that sampled it (tokens of one response span versions when
//!   samplers adopt weights in flight);
//! - `--step K`, `--version V`, `--reward-min X`, `--reward-max Y` filter (the reward is the
//!   reward-model or rule score of the response);
//! - `--export-jsonl FILE`: one JSON object per matching trajectory (with `token_versions`,
//!   one per response token, next to `policy_version`, its first); its parent directory
//!   must exist (exit 2 otherwise, as for every output path of the CLI). While it writes, a
//!   progress line goes to stderr at most once a second and after the last trajectory
//!   (`exported k/N elapsed … eta …`, see `crate::progress`); `--quiet` turns it off;
//! - `--skip-corrupt`: read past damaged records instead of refusing the store: every intact
//!   record is used (exported, shown, summarised) and each skipped byte range is reported on
//!   stderr with its segment, offset, size and damage;
//! - filters that match nothing (`--step 999`) say so on stderr and exit 2;
//! - `--verify`: checks every record; on damage names the segment and byte offset of the first
//!   bad record and exits 1;
//! - `--repair`: cuts off a torn last record (a crash mid-write), as reopening the store does;
//! - `--rescore [--reward-model DIR]`: scores the stored responses again with the run's reward
//!   (or the given reward model) and reports the differences.
//!
//! - `--rerun-step K`: executes learner step K again from `checkpoints/step-K` and the stored
//!   batch, and compares losses, per-token outputs and weights with what the run recorded
//!   (see `crate::rerun`).
//!
//! Reading without `--verify` tolerates a torn last record (it is reported, never read).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use serde_json::json;
use tandem_actors::reward_source::RewardSource;
use tandem_models::TextTokenizer;
use tandem_runtime::reward_sources::{reward_model_source, reward_source};
use tandem_runtime::store::{read_store, store_dir, ReadMode, Record, SegmentWriter, StoredTrajectory};
use tandem_runtime::{builtin, Config};

use crate::error::bad_input;
use crate::progress::Progress;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// The run directory (holding `trajectories/` and `config.toml`).
    run_dir: PathBuf,
    /// Print the first N matching trajectories, decoded, with per-token numbers.
    #[arg(long, value_name = "N")]
    show: Option<usize>,
    /// Only trajectories settled (used or dropped) at this learner step.
    #[arg(long)]
    step: Option<u64>,
    /// Only trajectories sampled by this policy version.
    #[arg(long)]
    version: Option<u64>,
    /// Only trajectories whose score is at least this.
    #[arg(long)]
    reward_min: Option<f32>,
    /// Only trajectories whose score is at most this.
    #[arg(long)]
    reward_max: Option<f32>,
    /// Write one JSON object per matching trajectory to FILE.
    #[arg(long, value_name = "FILE")]
    export_jsonl: Option<PathBuf>,
    /// Check every record; exit 1 naming the segment and offset of the first bad one.
    #[arg(long)]
    verify: bool,
    /// Cut off a torn last record left by a crash.
    #[arg(long)]
    repair: bool,
    /// Read past damaged records, reporting the byte ranges skipped, instead of refusing.
    #[arg(long, conflicts_with_all = ["verify", "repair"])]
    skip_corrupt: bool,
    /// Score the stored responses again and report the differences.
    #[arg(long)]
    rescore: bool,
    /// Reward model to rescore with (default: the run's own reward).
    #[arg(long, value_name = "DIR", requires = "rescore")]
    reward_model: Option<PathBuf>,
    /// Execute learner step K again from its checkpoint and stored batch; compare with the run.
    #[arg(long, value_name = "K")]
    rerun_step: Option<u64>,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
}

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let dir = store_dir(&args.run_dir);
    if !args.run_dir.is_dir() {
        return bad_input!("{}: no such directory (give a run directory)", args.run_dir.display());
    }
    if !dir.is_dir() {
        return bad_input!(
            "{}: no trajectory store (trajectories/) in this run directory",
            args.run_dir.display()
        );
    }
    if args.repair {
        let (_, cut) = SegmentWriter::open(&dir, u64::MAX)?;
        return crate::print_json(&json!({ "repaired": cut.is_some(), "cut_at": cut }));
    }
    if let Some(path) = &args.export_jsonl {
        crate::error::check_output_path(path)?;
    }
    let mode = if args.verify {
        ReadMode::Strict
    } else if args.skip_corrupt {
        ReadMode::SkipCorrupt
    } else {
        ReadMode::Tolerant
    };
    let read = read_store(&dir, mode).map_err(|e| match e {
        tandem_runtime::store::StoreError::Damaged { .. } if !args.verify => {
            anyhow::Error::new(e).context("the store is damaged (read the intact records with --skip-corrupt)")
        }
        e => e.into(),
    })?;
    for s in &read.skipped {
        eprintln!(
            "skipped {} bytes {}..{} ({} bytes, after its record {}): {}",
            s.path.display(),
            s.start,
            s.end,
            s.end - s.start,
            s.after_records,
            s.damage
        );
    }
    if !read.skipped.is_empty() {
        let bytes: u64 = read.skipped.iter().map(|s| s.end - s.start).sum();
        eprintln!(
            "skipped {} damaged range(s), {bytes} bytes in all; {} intact records read",
            read.skipped.len(),
            read.records.len()
        );
    }
    if let Some((path, offset)) = &read.torn_tail {
        tracing::warn!(
            "{} at byte {offset}: torn last record (a crash mid-write); not read",
            path.display()
        );
    }
    let all: Vec<StoredTrajectory> = read
        .records
        .into_iter()
        .map(|(_, _, r)| match r {
            Record::Trajectory(t) => t,
        })
        .collect();
    if args.verify {
        let segments = tandem_runtime::store::list_segments(&dir)?.len();
        return crate::print_json(&json!({
            "ok": true, "segments": segments, "records": all.len(), "bytes": read.bytes,
        }));
    }
    if let Some(k) = args.rerun_step {
        return crate::rerun::rerun_step(&args.run_dir, k, &all);
    }
    let picked: Vec<&StoredTrajectory> = all.iter().filter(|t| args.matches(t)).collect();
    if picked.is_empty() && args.filtered() {
        return bad_input!(
            "no stored trajectory matches the filters ({}); the store holds {} trajectories",
            args.filters(),
            all.len()
        );
    }
    if let Some(path) = &args.export_jsonl {
        export(path, &picked, Progress::new("exported", picked.len(), args.quiet))?;
    }
    if args.rescore {
        return rescore(&args, &picked);
    }
    if let Some(n) = args.show {
        let tok = tokenizer(&args.run_dir)?;
        for t in picked.iter().take(n) {
            show(&tok, t)?;
        }
        return Ok(());
    }
    summary(&picked, read.bytes, all.len())
}

impl ReplayArgs {
    fn filtered(&self) -> bool {
        self.step.is_some() || self.version.is_some() || self.reward_min.is_some() || self.reward_max.is_some()
    }

    /// The filters given, as on the command line.
    fn filters(&self) -> String {
        let mut f = vec![];
        if let Some(s) = self.step {
            f.push(format!("--step {s}"));
        }
        if let Some(v) = self.version {
            f.push(format!("--version {v}"));
        }
        if let Some(m) = self.reward_min {
            f.push(format!("--reward-min {m}"));
        }
        if let Some(m) = self.reward_max {
            f.push(format!("--reward-max {m}"));
        }
        f.join(" ")
    }

    fn matches(&self, t: &StoredTrajectory) -> bool {
        self.step.is_none_or(|s| t.outcome.step() == s)
            && self.version.is_none_or(|v| t.policy_version == v)
            && self.reward_min.is_none_or(|m| t.score >= m)
            && self.reward_max.is_none_or(|m| t.score <= m)
    }
}

fn summary(picked: &[&StoredTrajectory], bytes: u64, total: usize) -> anyhow::Result<()> {
    let mut steps: std::collections::BTreeMap<u64, Vec<&StoredTrajectory>> = Default::default();
    for t in picked {
        steps.entry(t.outcome.step()).or_default().push(t);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:>6} {:>6} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "step", "used", "dropped", "versions", "score", "min", "max"
    )?;
    for (step, ts) in &steps {
        let used = ts.iter().filter(|t| t.outcome.used()).count();
        let scores: Vec<f32> = ts.iter().map(|t| t.score).collect();
        let mean = scores.iter().map(|&s| s as f64).sum::<f64>() / scores.len().max(1) as f64;
        let (lo, hi) = scores
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &s| (a.min(s), b.max(s)));
        let vmin = ts.iter().map(|t| t.policy_version).min().unwrap_or(0);
        let vmax = ts.iter().map(|t| t.policy_version).max().unwrap_or(0);
        writeln!(
            out,
            "{step:>6} {used:>6} {:>7} {:>9} {mean:>9.4} {lo:>9.4} {hi:>9.4}",
            ts.len() - used,
            format!("{vmin}-{vmax}")
        )?;
    }
    drop(out);
    let used = picked.iter().filter(|t| t.outcome.used()).count();
    crate::print_json(&json!({
        "steps": steps.len(),
        "trajectories": picked.len(),
        "used": used,
        "dropped": picked.len() - used,
        "stored": total,
        "bytes_per_trajectory": bytes as f64 / total.max(1) as f64,
    }))
}

fn to_json(t: &StoredTrajectory) -> serde_json::Value {
    let kl: Vec<f32> = t
        .full_logprobs
        .iter()
        .zip(&t.ref_logprobs)
        .map(|(a, b)| a - b)
        .collect();
    json!({
        "step": t.outcome.step(),
        "used": t.outcome.used(),
        "ticket": t.ticket,
        "row": t.row,
        "prompt_index": t.prompt_index,
        "prompt_ids": t.prompt_ids,
        "response_ids": t.response_ids,
        "behaviour_logprobs": t.behaviour_logprobs,
        "logprobs": t.full_logprobs,
        "ref_logprobs": t.ref_logprobs,
        "kl": kl,
        "score": t.score,
        "values": t.values,
        "token_rewards": t.token_rewards,
        "advantages": t.advantages,
        "returns": t.returns,
        "stopped": t.stopped,
        "policy_version": t.policy_version,
        "token_versions": t.versions(),
        "sampler": t.sampler,
        "sampling_seed": t.sampling_seed,
        "sampled_unix_ms": t.sampled_unix_ms,
        "stored_unix_ms": t.stored_unix_ms,
    })
}

fn export(path: &Path, picked: &[&StoredTrajectory], mut progress: Progress) -> anyhow::Result<()> {
    let f = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(f);
    for (i, t) in picked.iter().enumerate() {
        writeln!(w, "{}", to_json(t))?;
        progress.update(i + 1);
    }
    w.flush().with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("wrote {} trajectories to {}", picked.len(), path.display());
    Ok(())
}

/// The run's config, as resolved in `RUN_DIR/config.toml`.
fn run_config(run_dir: &Path) -> anyhow::Result<Config> {
    Ok(Config::load_resolved(&run_dir.join("config.toml"))?)
}

/// The policy's tokenizer: the one saved with the final policy, else the config's.
pub(crate) fn tokenizer(run_dir: &Path) -> anyhow::Result<TextTokenizer> {
    let saved = run_dir.join("policy");
    if saved.join("tokenizer.json").is_file() {
        return Ok(TextTokenizer::from_dir(&saved)?);
    }
    let cfg = run_config(run_dir)?;
    Ok(match &cfg.models.policy.path {
        Some(dir) => TextTokenizer::from_dir(dir)?,
        None => builtin::tokenizer()?,
    })
}

fn show(tok: &TextTokenizer, t: &StoredTrajectory) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let outcome = if t.outcome.used() { "used" } else { "dropped" };
    writeln!(
        out,
        "== step {} ({outcome}) ticket {} row {} version {} sampler {} seed {} score {:.4}{}",
        t.outcome.step(),
        t.ticket,
        t.row,
        t.policy_version,
        t.sampler,
        t.sampling_seed,
        t.score,
        if t.stopped { " stopped" } else { "" }
    )?;
    writeln!(out, "prompt:   {}", tok.decode(&t.prompt_ids)?)?;
    writeln!(out, "response: {}", tok.decode(&t.response_ids)?)?;
    writeln!(
        out,
        "  {:>3} {:>14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}",
        "i", "token", "logp", "ref_logp", "kl", "value", "reward", "adv", "version"
    )?;
    let versions = t.versions();
    let at = |v: &[f32], i: usize| v.get(i).map_or("-".to_string(), |x| format!("{x:.4}"));
    for (i, &id) in t.response_ids.iter().enumerate() {
        let token = tok.id_to_token(id).unwrap_or_else(|| format!("<{id}>"));
        let kl = match (t.full_logprobs.get(i), t.ref_logprobs.get(i)) {
            (Some(a), Some(b)) => format!("{:.4}", a - b),
            _ => "-".into(),
        };
        writeln!(
            out,
            "  {i:>3} {token:>14} {:>9} {:>9} {kl:>9} {:>9} {:>9} {:>9} {:>7}",
            at(&t.full_logprobs, i),
            at(&t.ref_logprobs, i),
            at(&t.values, i),
            at(&t.token_rewards, i),
            at(&t.advantages, i),
            versions[i],
        )?;
    }
    Ok(())
}

fn rescore(args: &ReplayArgs, picked: &[&StoredTrajectory]) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let source: Arc<dyn RewardSource> = match &args.reward_model {
        Some(dir) => {
            let tok = tokenizer(&args.run_dir)?;
            reward_model_source(dir, &tok, tok.vocab_size(), None, &device)?
        }
        None => reward_source(&run_config(&args.run_dir)?, &tokenizer(&args.run_dir)?, &device)?,
    };
    let (mut differing, mut sum, mut max) = (0usize, 0f64, 0f64);
    for chunk in picked.chunks(32) {
        let prompts: Vec<&[u32]> = chunk.iter().map(|t| t.prompt_ids.as_slice()).collect();
        let responses: Vec<&[u32]> = chunk.iter().map(|t| t.response_ids.as_slice()).collect();
        let scores = source.score(&prompts, &responses, &device)?;
        for (t, s) in chunk.iter().zip(scores) {
            let d = (s as f64 - t.score as f64).abs();
            if d > 1e-5 {
                differing += 1;
            }
            sum += d;
            max = max.max(d);
        }
    }
    crate::print_json(&json!({
        "rescored": picked.len(),
        "reward": source.name(),
        "differing": differing,
        "mean_abs_diff": sum / picked.len().max(1) as f64,
        "max_abs_diff": max,
    }))
}
