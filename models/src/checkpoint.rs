//! Hugging Face checkpoint directories: `config.json`, `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`) and `tokenizer.json`.
//!
//! Loading reads every tensor into memory as f32 on the requested device. Saving writes the
//! same layout back; with `max_shard_bytes` it splits the weights into
//! `model-0000i-of-0000n.safetensors` files plus the index, as transformers does.
//!
//! Exports keep what they came from: [`save_checkpoint_as`] writes the weights in a given dtype
//! (the input's, from [`checkpoint_dtype`]: bf16 in, bf16 out; `config.json`'s `torch_dtype`
//! says the same), and [`copy_side_files`] carries the files transformers keeps beside the
//! weights (tokenizer settings with any chat template, special tokens, generation settings).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Names of the safetensors files that hold a checkpoint's weights.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        if !dir.is_dir() {
            return Err(ModelError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "model directory not found"),
            ));
        }
        return Err(ModelError::io(
            &single,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {SINGLE_FILE} and no {INDEX_FILE}"),
            ),
        ));
    }
    let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: index.clone(),
        source,
    })?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::BadConfig {
            path: index.clone(),
            key: "weight_map",
            msg: "missing or not an object".into(),
        })?;
    let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_owned)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Reads all weight tensors of the checkpoint in `dir`, converted to f32 on `device`.
///
/// Keys are normalised to the layout tandem's model code uses: a GPT-2 checkpoint saved without
/// the `transformer.` prefix (the original OpenAI export) gets it added; attention-mask buffers
/// (`attn.bias`, `attn.masked_bias`) are dropped.
pub fn load_tensors(dir: &Path, config: &ModelConfig, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in weight_files(dir)? {
        let tensors = candle_core::safetensors::load(&file, device).map_err(|e| match e {
            candle_core::Error::Io(io) => ModelError::io(&file, io),
            other => ModelError::Io {
                path: file.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, other.to_string()),
            },
        })?;
        for (name, t) in tensors {
            let name = match &config.arch {
                Architecture::Gpt2(_) => {
                    if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
                        continue;
                    }
                    if name.starts_with("score.") || name.starts_with("lm_head.") || name.starts_with("transformer.") {
                        name
                    } else {
                        format!("transformer.{name}")
                    }
                }
                _ => name,
            };
            out.insert(name, t.to_dtype(DType::F32)?);
        }
    }
    Ok(out)
}

/// Files beside the weights that [`copy_side_files`] carries from an input checkpoint to an
/// export (`tokenizer.json` is written from the loaded tokenizer instead).
pub const SIDE_FILES: [&str; 3] = [
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Copies those of [`SIDE_FILES`] that `from` has into `to` (created if needed).
pub fn copy_side_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| ModelError::io(to, e))?;
    for name in SIDE_FILES {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name)).map_err(|e| ModelError::io(&src, e))?;
        }
    }
    Ok(())
}

/// The floating-point dtype a checkpoint's weights are stored in, read from the first weight
/// file's safetensors header (the dtype most of its floating tensors have). f32 when it holds
/// no floating tensors.
pub fn checkpoint_dtype(dir: &Path) -> Result<DType> {
    use std::io::Read;
    let path = weight_files(dir)?.remove(0);
    let bad = |msg: String| ModelError::io(&path, std::io::Error::other(msg));
    let mut f = std::fs::File::open(&path).map_err(|e| ModelError::io(&path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| ModelError::io(&path, e))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!(
            "safetensors header of {len} bytes: not a safetensors file"
        )));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header).map_err(|e| ModelError::io(&path, e))?;
    let header: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| bad(format!("safetensors header is not JSON: {e}")))?;
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (name, t) in header.as_object().into_iter().flatten() {
        if name == "__metadata__" {
            continue;
        }
        if let Some(d @ ("F32" | "BF16" | "F16" | "F64")) = t.get("dtype").and_then(|d| d.as_str()) {
            *counts.entry(d).or_default() += 1;
        }
    }
    Ok(match counts.into_iter().max_by_key(|&(_, n)| n).map(|(d, _)| d) {
        Some("BF16") => DType::BF16,
        Some("F16") => DType::F16,
        Some("F64") => DType::F64,
        _ => DType::F32,
    })
}

/// Writes `config.json` and the weights to `dir` (created if needed), in HF layout, as f32.
/// `max_shard_bytes = None` writes a single `model.safetensors`.
pub fn save_checkpoint(
    dir: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    max_shard_bytes: Option<usize>,
) -> Result<()> {
    save_checkpoint_as(dir, config, tensors, max_shard_bytes, DType::F32)
}

/// [`save_checkpoint`] with the weights stored as `dtype` (f32, bf16, f16 or f64); `config.json`
/// records it as `torch_dtype`.
pub fn save_checkpoint_as(
    dir: &Path,
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    max_shard_bytes: Option<usize>,
    dtype: DType,
) -> Result<()> {
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        other => {
            return Err(ModelError::InvalidArgument(format!(
                "checkpoint dtype {other:?}: only f32, bf16, f16 and f64 are written"
            )))
        }
    };
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    let mut cfg_json = config.to_json();
    cfg_json["torch_dtype"] = json!(torch_dtype);
    let cfg_text = serde_json::to_string_pretty(&cfg_json).expect("json value serialises");
    std::fs::write(&cfg_path, cfg_text).map_err(|e| ModelError::io(&cfg_path, e))?;

    // Contiguous host copies, sorted by name so files are byte-identical across runs.
    let mut sorted: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, t) in tensors {
        sorted.insert(k.clone(), t.to_device(&Device::Cpu)?.to_dtype(dtype)?.contiguous()?);
    }
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![vec![]];
    let mut cur = 0usize;
    for (k, t) in sorted {
        let bytes = t.elem_count() * dtype.size_in_bytes();
        if let Some(max) = max_shard_bytes {
            if cur > 0 && cur + bytes > max {
                shards.push(vec![]);
                cur = 0;
            }
        }
        cur += bytes;
        shards.last_mut().expect("at least one shard").push((k, t));
    }
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let write = |path: &Path, items: &[(String, Tensor)]| -> Result<()> {
        let data: Vec<(&str, &Tensor)> = items.iter().map(|(k, t)| (k.as_str(), t)).collect();
        safetensors::serialize_to_file(data, metadata.clone(), path)
            .map_err(|e| ModelError::io(path, std::io::Error::other(e.to_string())))
    };
    // Remove stale weight files from an earlier save with another sharding.
    for stale in [SINGLE_FILE, INDEX_FILE] {
        let _ = std::fs::remove_file(dir.join(stale));
    }
    if shards.len() == 1 && max_shard_bytes.is_none() {
        return write(&dir.join(SINGLE_FILE), &shards[0]);
    }
    let n = shards.len();
    let mut weight_map = BTreeMap::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        write(&dir.join(&name), shard)?;
        for (k, t) in shard {
            total += t.elem_count() * dtype.size_in_bytes();
            weight_map.insert(k.clone(), name.clone());
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let index_path = dir.join(INDEX_FILE);
    std::fs::write(&index_path, serde_json::to_string_pretty(&index).expect("json"))
        .map_err(|e| ModelError::io(&index_path, e))
}
