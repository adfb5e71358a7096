//! `tandem run`'s exported `policy/` and `critic/` keep what their input checkpoints had: the
//! weights' dtype (bf16 in, bf16 out) and the files transformers keeps beside the weights.

mod common;
use common::OutputWithin;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device};
use tandem_models::{checkpoint_dtype, load_tensors, save_checkpoint_as, LanguageModel, ModelConfig};

fn fixtures_hf() -> PathBuf {
    std::env::var_os("TANDEM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"))
        .join("hf")
}

const SIDE: [&str; 3] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

#[test]
fn exports_keep_the_input_dtype_and_side_files() {
    let dir = tempfile::tempdir().unwrap();
    // A bf16 copy of the GPT-2 fixture, with its tokenizer and side files.
    let src = fixtures_hf().join("gpt2-tiny");
    let bf16 = dir.path().join("gpt2-bf16");
    let cfg = ModelConfig::from_dir(&src).unwrap();
    let w = load_tensors(&src, &cfg, &Device::Cpu).unwrap();
    save_checkpoint_as(&bf16, &cfg, &w, None, DType::BF16).unwrap();
    for f in ["tokenizer.json"].into_iter().chain(SIDE) {
        std::fs::copy(src.join(f), bf16.join(f)).unwrap();
    }
    assert_eq!(checkpoint_dtype(&bf16).unwrap(), DType::BF16);
    assert_eq!(checkpoint_dtype(&src).unwrap(), DType::F32);

    let run_dir = dir.path().join("run");
    let policy = format!("models.policy.path={:?}", bf16.to_str().unwrap());
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/reward_model.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .arg("run")
        .arg(&config)
        .args(["--set", "steps=1", "--set", &policy, "--run-dir"])
        .arg(&run_dir)
        .output_within();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // policy/: bf16 like its input, about half the f32 size, side files byte for byte.
    let exported = run_dir.join("policy");
    assert_eq!(checkpoint_dtype(&exported).unwrap(), DType::BF16);
    let size = |d: &Path| std::fs::metadata(d.join("model.safetensors")).unwrap().len();
    assert!(
        size(&exported) * 10 < size(&src) * 6,
        "{} vs f32 {}",
        size(&exported),
        size(&src)
    );
    let cfg_json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(exported.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["torch_dtype"], "bfloat16");
    for f in SIDE {
        assert_eq!(
            std::fs::read(exported.join(f)).unwrap(),
            std::fs::read(bf16.join(f)).unwrap(),
            "policy/{f}"
        );
    }
    // It loads back, and its tokenizer encodes what the input's did.
    LanguageModel::load(&exported, &Device::Cpu).unwrap();
    let tok = |d: &Path| {
        tandem_models::TextTokenizer::from_dir(d)
            .unwrap()
            .encode("the movie was good")
            .unwrap()
    };
    assert_eq!(tok(&exported), tok(&src));

    // critic/ (initialised from the f32 reward model): f32, with the side files the reward
    // model has (it has no generation_config.json, so none is made up).
    let rm = fixtures_hf().join("gpt2-tiny-reward");
    let critic = run_dir.join("critic");
    assert_eq!(checkpoint_dtype(&critic).unwrap(), DType::F32);
    for f in SIDE {
        assert_eq!(critic.join(f).is_file(), rm.join(f).is_file(), "critic/{f}");
    }
    assert!(critic.join("tokenizer_config.json").is_file());
}
