//! Checkpoints: everything needed to continue a run exactly where it was.
//!
//! How this fits the runtime's ordering, blocking, dropping and restart rules: `docs/semantics.md`.
//!
//! `RUN_DIR/checkpoints/step-K/` holds the state *before* learner step K (after K steps):
//!
//! | file | what |
//! |---|---|
//! | `policy/`, `critic/` | the weights in Hugging Face layout with the tokenizer (loadable by transformers and `tandem inspect`) |
//! | `optimizer.safetensors` | AdamW moments, `policy/m/NAME`, `policy/v/NAME`, `critic/...`; the policy's EMA as `ema/NAME` (with `algorithm.ema_decay`); running score statistics as `score_norm` (with `reward.normalize = "running"`) |
//! | `replay.bin` | the replay buffer's unconsumed trajectories (bincode, with length and CRC32) |
//! | `state.json` | step, policy version, optimiser step counts, KL beta (exact bits), tickets accounted for, stale-drop count, wall seconds |
//! | `config.toml` | the run's resolved config |
//! | `manifest.json` | the size and CRC32 of every other file above ([`verify`]) |
//!
//! RNG state needs no file: the learner's minibatch shuffle is seeded from (seed, step) and
//! every work ticket carries its own sampling seed, so the counters are the RNG state. The data
//! position is the set of tickets whose trajectories arrived at the replay buffer
//! ([`TicketSet`]): a resumed feeder issues every other ticket, in order, so no prompt is
//! skipped and none repeated beyond those in flight (lost with the process) at the checkpoint.
//!
//! Atomicity: a checkpoint is written to `checkpoints/.tmp-step-K`, fsynced and renamed to
//! `step-K`, so a crash never leaves a half checkpoint under a `step-*` name; leftover `.tmp-*`
//! directories are removed when a run starts. Only the last `checkpoints.keep` are kept.
//!
//! Integrity: `manifest.json` is written last, before the fsync and rename, and [`read`]
//! checks every file against it, so a flipped bit in the weights or the optimizer state is an
//! error naming the file instead of a silently different model. A resumed run that finds its
//! latest checkpoint damaged sets it aside as `checkpoints/damaged-step-K` and falls back to the
//! previous intact one, with a warning saying so (see `pipeline::checkpoints::resume_point`);
//! with none intact it fails naming each damaged file. Checkpoints written before manifests
//! existed have none and are read unchecked.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tandem_actors::{TicketSet, TrainerState, Trajectory};
use tandem_models::{load_tensors, save_checkpoint, ModelConfig, TextTokenizer};

use crate::error::RuntimeError;

/// Version of the checkpoint layout.
pub const FORMAT: u32 = 1;

/// `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub format: u32,
    /// Learner steps completed; the next step to run.
    pub step: u64,
    /// Version of the learner's weights (= `step`); a resumed run publishes them as this version.
    pub version: u64,
    pub policy_optimizer_steps: usize,
    pub critic_optimizer_steps: Option<usize>,
    /// The KL coefficient, for reading.
    pub beta: f64,
    /// Its exact bits (JSON numbers need not round-trip).
    pub beta_bits: u64,
    /// Tickets whose trajectories reached the replay buffer.
    pub tickets: TicketSet,
    pub dropped_stale: u64,
    pub replay_trajectories: usize,
    pub wall_s: f64,
    pub seed: u64,
    pub written_unix_ms: u64,
}

/// A checkpoint in memory.
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub trainer: TrainerState,
    pub replay: Vec<Trajectory>,
}

/// Model configs and tokenizer the weights are saved with.
pub struct ModelLayout<'a> {
    pub policy: &'a ModelConfig,
    pub critic: Option<&'a ModelConfig>,
    pub tokenizer: &'a TextTokenizer,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    checkpoints_dir(run_dir).join(format!("step-{step}"))
}

/// Complete checkpoints of a run, by step.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>, RuntimeError> {
    let dir = checkpoints_dir(run_dir);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(RuntimeError::io(&dir, e)),
    };
    let mut out = vec![];
    for e in entries {
        let e = e.map_err(|e| RuntimeError::io(&dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(k) = name.strip_prefix("step-").and_then(|s| s.parse::<u64>().ok()) {
            if e.path().join("state.json").is_file() {
                out.push((k, e.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Removes `.tmp-*` directories a crash left behind.
pub fn remove_partial(run_dir: &Path) -> Result<(), RuntimeError> {
    let dir = checkpoints_dir(run_dir);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(".tmp-") {
            tracing::warn!(dir = %e.path().display(), "removing a checkpoint that was never completed");
            std::fs::remove_dir_all(e.path()).map_err(|err| RuntimeError::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// Writes `ckpt` as `step-K` ([`write_atomically`]) and keeps the last `keep`.
pub fn write(
    run_dir: &Path,
    ckpt: &Checkpoint,
    layout: &ModelLayout,
    config_toml: &str,
    keep: usize,
) -> Result<PathBuf, RuntimeError> {
    write_atomically(run_dir, ckpt.meta.step, keep, |tmp| {
        save_checkpoint(&tmp.join("policy"), layout.policy, &ckpt.trainer.policy, None)?;
        layout.tokenizer.save_to_dir(&tmp.join("policy"))?;
        if let (Some(w), Some(cfg)) = (&ckpt.trainer.critic, layout.critic) {
            save_checkpoint(&tmp.join("critic"), cfg, w, None)?;
            layout.tokenizer.save_to_dir(&tmp.join("critic"))?;
        }
        let opt_cpu: HashMap<String, Tensor> = ckpt
            .trainer
            .optimizer
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
            .collect::<Result<_, candle_core::Error>>()?;
        candle_core::safetensors::save(&opt_cpu, tmp.join("optimizer.safetensors"))?;
        write_synced(&tmp.join("replay.bin"), &encode_trajectories(&ckpt.replay))?;
        let meta = serde_json::to_string_pretty(&ckpt.meta).expect("meta serialises");
        write_synced(&tmp.join("state.json"), meta.as_bytes())?;
        write_synced(&tmp.join("config.toml"), config_toml.as_bytes())
    })
}

/// Writes `RUN_DIR/checkpoints/step-K` so that a crash never leaves half of it: `fill` writes
/// into `.tmp-step-K`, every file is fsynced, the directory is renamed into place, and only
/// the last `keep` (at least 1) `step-*` directories are kept. PPO runs and `train-rm` both
/// write their checkpoints through this.
pub fn write_atomically(
    run_dir: &Path,
    step: u64,
    keep: usize,
    fill: impl FnOnce(&Path) -> Result<(), RuntimeError>,
) -> Result<PathBuf, RuntimeError> {
    let root = checkpoints_dir(run_dir);
    let tmp = root.join(format!(".tmp-step-{step}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| RuntimeError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| RuntimeError::io(&tmp, e))?;
    fill(&tmp)?;
    let manifest = serde_json::to_string_pretty(&manifest_of(&tmp)?).expect("manifest serialises");
    write_synced(&tmp.join(MANIFEST), manifest.as_bytes())?;
    sync_tree(&tmp)?;
    let dest = step_dir(run_dir, step);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| RuntimeError::io(&dest, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| RuntimeError::io(&dest, e))?;
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    let mut steps: Vec<u64> = std::fs::read_dir(&root)
        .map_err(|e| RuntimeError::io(&root, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .collect();
    steps.sort_unstable();
    for old in steps.iter().take(steps.len().saturating_sub(keep.max(1))) {
        if *old != step {
            let dir = step_dir(run_dir, *old);
            std::fs::remove_dir_all(&dir).map_err(|e| RuntimeError::io(&dir, e))?;
        }
    }
    Ok(dest)
}

/// The checksum file of a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";

/// `manifest.json`: every file of a checkpoint (paths relative to it, `/`-separated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, FileSum>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct FileSum {
    bytes: u64,
    crc32: u32,
}

/// Size and CRC32 of `path`, read in blocks.
fn file_sum(path: &Path) -> Result<FileSum, RuntimeError> {
    let mut f = std::fs::File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| RuntimeError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum {
        bytes,
        crc32: hasher.finalize(),
    })
}

/// The manifest of every file under `dir` (but a manifest itself).
fn manifest_of(dir: &Path) -> Result<Manifest, RuntimeError> {
    fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<String, FileSum>) -> Result<(), RuntimeError> {
        for e in std::fs::read_dir(dir).map_err(|e| RuntimeError::io(dir, e))? {
            let p = e.map_err(|e| RuntimeError::io(dir, e))?.path();
            if p.is_dir() {
                walk(root, &p, files)?;
            } else {
                let rel = p.strip_prefix(root).expect("under the root");
                let key = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy())
                    .collect::<Vec<_>>()
                    .join("/");
                if key != MANIFEST {
                    files.insert(key, file_sum(&p)?);
                }
            }
        }
        Ok(())
    }
    let mut files = BTreeMap::new();
    walk(dir, dir, &mut files)?;
    Ok(Manifest { files })
}

/// Checks every file of the checkpoint `dir` against its `manifest.json`. `Ok(true)` when all
/// match, `Ok(false)` for a checkpoint without a manifest (written before they existed), and a
/// [`RuntimeError::Config`] naming the first file that is missing or differs.
pub fn verify(dir: &Path) -> Result<bool, RuntimeError> {
    let path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(RuntimeError::io(&path, e)),
    };
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| RuntimeError::Config {
        path: path.clone(),
        msg: format!("unreadable checkpoint manifest: {e}"),
    })?;
    for (name, want) in &manifest.files {
        let file = dir.join(name);
        if !file.is_file() {
            return Err(RuntimeError::Config {
                path: file,
                msg: format!("missing: {MANIFEST} lists it"),
            });
        }
        let got = file_sum(&file)?;
        if got != *want {
            return Err(RuntimeError::Config {
                path: file,
                msg: format!(
                    "damaged: {MANIFEST} records {} bytes with CRC32 {:08x}, the file has {} bytes with CRC32 {:08x}",
                    want.bytes, want.crc32, got.bytes, got.crc32
                ),
            });
        }
    }
    Ok(true)
}

/// Reads a checkpoint directory after checking it against its manifest ([`verify`]); the
/// models are loaded with the configs saved in it.
pub fn read(dir: &Path, device: &Device) -> Result<Checkpoint, RuntimeError> {
    verify(dir)?;
    let state = dir.join("state.json");
    let text = std::fs::read_to_string(&state).map_err(|e| RuntimeError::io(&state, e))?;
    let meta: CheckpointMeta = serde_json::from_str(&text).map_err(|e| RuntimeError::Config {
        path: state.clone(),
        msg: e.to_string(),
    })?;
    if meta.format != FORMAT {
        return Err(RuntimeError::Config {
            path: state,
            msg: format!("checkpoint format {} (this tandem reads {FORMAT})", meta.format),
        });
    }
    let load = |sub: &str| -> Result<HashMap<String, Tensor>, RuntimeError> {
        let d = dir.join(sub);
        let cfg = ModelConfig::from_dir(&d)?;
        Ok(load_tensors(&d, &cfg, device)?)
    };
    let policy = load("policy")?;
    let critic = if meta.critic_optimizer_steps.is_some() {
        Some(load("critic")?)
    } else {
        None
    };
    let opt = dir.join("optimizer.safetensors");
    let optimizer = candle_core::safetensors::load(&opt, device).map_err(|e| RuntimeError::Config {
        path: opt.clone(),
        msg: e.to_string(),
    })?;
    let replay_path = dir.join("replay.bin");
    let bytes = std::fs::read(&replay_path).map_err(|e| RuntimeError::io(&replay_path, e))?;
    let replay = decode_trajectories(&bytes).map_err(|msg| RuntimeError::Config { path: replay_path, msg })?;
    let trainer = TrainerState {
        policy,
        critic,
        optimizer,
        policy_optimizer_steps: meta.policy_optimizer_steps,
        critic_optimizer_steps: meta.critic_optimizer_steps,
        beta: f64::from_bits(meta.beta_bits),
        completed_steps: meta.step,
    };
    Ok(Checkpoint { meta, trainer, replay })
}

const MAGIC: &[u8; 4] = b"TDRB";

/// `TDRB`, u32 LE payload length, u32 LE CRC32, bincode payload.
fn encode_trajectories(t: &[Trajectory]) -> Vec<u8> {
    let payload = bincode::serde::encode_to_vec(t, bincode::config::standard()).expect("trajectories encode");
    let mut out = Vec::with_capacity(payload.len() + 12);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn decode_trajectories(b: &[u8]) -> Result<Vec<Trajectory>, String> {
    if b.len() < 12 || &b[..4] != MAGIC {
        return Err("not a replay buffer file".into());
    }
    let len = u32::from_le_bytes(b[4..8].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    let payload = &b[12..];
    if payload.len() != len {
        return Err(format!("{} payload bytes, the header says {len}", payload.len()));
    }
    if crc32fast::hash(payload) != crc {
        return Err("checksum mismatch".into());
    }
    let (t, _) = bincode::serde::decode_from_slice(payload, bincode::config::standard()).map_err(|e| e.to_string())?;
    Ok(t)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    let mut f = std::fs::File::create(path).map_err(|e| RuntimeError::io(path, e))?;
    f.write_all(bytes).map_err(|e| RuntimeError::io(path, e))?;
    f.sync_all().map_err(|e| RuntimeError::io(path, e))
}

/// fsyncs every file under `dir` (the model files are written by other code).
fn sync_tree(dir: &Path) -> Result<(), RuntimeError> {
    for e in std::fs::read_dir(dir).map_err(|e| RuntimeError::io(dir, e))? {
        let p = e.map_err(|e| RuntimeError::io(dir, e))?.path();
        if p.is_dir() {
            sync_tree(&p)?;
        } else {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(|e| RuntimeError::io(&p, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_files_round_trip_and_catch_damage() {
        let t = Trajectory {
            ticket: 3,
            row: 1,
            prompt_index: 7,
            prompt_ids: vec![1, 2],
            response_ids: vec![3],
            behaviour_logprobs: vec![-0.5],
            full_logprobs: vec![-0.25],
            stopped: true,
            policy_version: 2,
            token_versions: vec![],
            sampler: "rollout/cpu:0/0".into(),
            sampling_seed: 9,
            ref_logprobs: vec![-0.75],
            score: 0.5,
            values: vec![0.125],
            sampled_unix_ms: 11,
        };
        let mut b = encode_trajectories(std::slice::from_ref(&t));
        assert_eq!(decode_trajectories(&b).unwrap(), vec![t]);
        let last = b.len() - 1;
        b[last] ^= 1;
        assert_eq!(decode_trajectories(&b).unwrap_err(), "checksum mismatch");
        b.truncate(20);
        assert!(decode_trajectories(&b).unwrap_err().contains("the header says"));
    }

    #[test]
    fn the_manifest_catches_a_flipped_byte_and_a_missing_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = write_atomically(tmp.path(), 3, 2, |d| {
            std::fs::create_dir_all(d.join("policy")).unwrap();
            write_synced(&d.join("policy/model.safetensors"), &[7u8; 3000])?;
            write_synced(&d.join("state.json"), b"{}")
        })
        .unwrap();
        assert!(verify(&dir).unwrap());
        let weights = dir.join("policy/model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        bytes[1234] ^= 0x10;
        std::fs::write(&weights, &bytes).unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(
            err.contains("policy/model.safetensors") && err.contains("damaged"),
            "{err}"
        );
        std::fs::remove_file(&weights).unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        // Without a manifest (an older checkpoint) there is nothing to check.
        std::fs::remove_file(dir.join(MANIFEST)).unwrap();
        assert!(!verify(&dir).unwrap());
    }
}
