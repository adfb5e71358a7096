//! Shared helpers for the models crate's integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// the repository's `fixtures/hf`, or `$TANDEM_FIXTURES/hf`.
pub fn fixtures_hf() -> PathBuf {
    let root = std::env::var_os("TANDEM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures"));
    let hf = root.join("hf");
    assert!(
        hf.is_dir(),
        "fixtures not found at {} (set TANDEM_FIXTURES)",
        hf.display()
    );
    hf
}

/// Every checkpoint directory under the fixtures (those with an expected.json).
pub fn checkpoints() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_hf())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("expected.json").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixture checkpoints");
    dirs
}

/// The first fixture checkpoint whose transformers class starts with `kind` (lower case,
/// e.g. "gpt2", "qwen2") and whose head is `head`, with its config.
pub fn fixture(kind: &str, head: tandem_models::HeadKind) -> (PathBuf, tandem_models::ModelConfig) {
    checkpoints()
        .into_iter()
        .map(|d| {
            let c = tandem_models::ModelConfig::from_dir(&d).unwrap();
            (d, c)
        })
        .find(|(_, c)| c.head == head && c.hf_class().to_lowercase().starts_with(kind))
        .unwrap_or_else(|| panic!("no {kind} {head:?} fixture"))
}

/// A fixture checkpoint's directory, config and loaded tensors, to initialise trainable models
/// from (`fixture` picks the checkpoint).
pub struct FixtureWeights {
    pub dir: PathBuf,
    pub cfg: tandem_models::ModelConfig,
    tensors: std::collections::HashMap<String, candle_core::Tensor>,
}

impl FixtureWeights {
    pub fn load(kind: &str, head: tandem_models::HeadKind) -> Self {
        let (dir, cfg) = fixture(kind, head);
        let tensors = tandem_models::load_tensors(&dir, &cfg, &candle_core::Device::Cpu).unwrap();
        Self { dir, cfg, tensors }
    }

    /// Initialisation from these tensors; `seed` draws any head the checkpoint lacks.
    pub fn init(&self, seed: u64) -> tandem_models::WeightInit<'_> {
        tandem_models::WeightInit::Checkpoint {
            tensors: &self.tensors,
            dir: &self.dir,
            seed,
        }
    }
}

/// `seqs` left-padded into (ids, mask) with the config's pad id, on the CPU.
pub fn left_padded(cfg: &tandem_models::ModelConfig, seqs: &[Vec<u32>]) -> (candle_core::Tensor, candle_core::Tensor) {
    use tandem_models::batch::{PadSide, PaddedBatch};
    let dev = candle_core::Device::Cpu;
    let b = PaddedBatch::new(seqs, cfg.pad_id(), PadSide::Left, &dev).unwrap();
    let mask = b.mask_tensor(&dev).unwrap();
    (b.ids, mask)
}

pub fn read_json(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

pub fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

pub fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{name}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{name}[{i}]: got {g}, want {w} (tol {tol})");
    }
}
