//! Supervised fine-tuning through the runtime's `sft` path: the loss falls on a small task and
//! the held-out loss with it, the output loads as a causal LM, a resumed run is bit-identical to
//! an uninterrupted one, and chat records train on the assistant tokens only.
//!
//! The task: 2-digit addition (`tandem_runtime::tasks`) on the tiny Qwen2 fixture, whose BPE
//! writes every digit as one token. The untrained model puts near-uniform mass over its 384
//! tokens (NLL ≈ ln 384 ≈ 6); learning that answers are digits followed by EOS alone takes it
//! below 2.5, far beyond noise.

use std::path::{Path, PathBuf};

use tandem_runtime::sft::{load_examples, load_model, sft, SftConfig, SftOptions};
use tandem_runtime::tasks::{write_addition, Addition};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

fn config(dir: &Path, extra: &str) -> SftConfig {
    let task = Addition {
        digits: 2,
        reverse: false,
        chat: false,
    };
    write_addition(task, 192, 1, &Default::default(), &dir.join("train.jsonl")).unwrap();
    write_addition(task, 48, 2, &Default::default(), &dir.join("eval.jsonl")).unwrap();
    let text = format!(
        r#"
seed = 3
[model]
path = "{}"
[data]
train = "train.jsonl"
eval = "eval.jsonl"
max_tokens = 32
prompt_max_tokens = 16
[train]
epochs = 6
batch_size = 16
lr = 3e-3
warmup_steps = 3
eval_every = 6
{extra}
"#,
        fixtures().join("hf/qwen2-tiny").display()
    );
    let path = dir.join("sft.toml");
    std::fs::write(&path, text).unwrap();
    SftConfig::load(&path, &[]).unwrap()
}

fn opts(run_dir: &Path, resume: bool) -> SftOptions {
    SftOptions {
        run_dir: run_dir.into(),
        resume,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_falls_and_the_output_is_a_causal_lm() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let run = dir.path().join("run");
    let s = sft(&cfg, opts(&run, false)).await.unwrap();
    assert_eq!(s.total_steps, 72);
    assert_eq!(s.reports.len(), 72);
    let (first, last) = (s.first_eval_loss.unwrap(), s.eval_loss.unwrap());
    let train_first = s.reports[0].loss;
    println!(
        "train loss {train_first:.3} -> {:.3}, held-out {first:.3} (step 6) -> {last:.3} after {} steps",
        s.reports.last().unwrap().loss,
        s.reports.len()
    );
    assert!(train_first > 5.0, "untrained loss {train_first}");
    assert!(last < 2.5 && last < first, "held-out loss {first} -> {last}");
    // Warm-up then cosine decay to 0.
    let lr: Vec<f64> = s.reports.iter().map(|r| r.lr).collect();
    assert!((lr[0] - 1e-3).abs() < 1e-12 && (lr[2] - 3e-3).abs() < 1e-12, "{lr:?}");
    assert!(lr[71] < lr[36] && lr[36] < lr[3], "{lr:?}");
    // Every report counts only completion tokens: 1 to 3 answer digits + EOS per record.
    for r in &s.reports {
        assert!(r.tokens >= 2 * r.examples && r.tokens <= 4 * r.examples, "{r:?}");
        assert!(r.tokens < r.examples * 6, "prompt tokens counted: {r:?}");
        assert!(r.fill > 0.0 && r.fill <= 1.0);
    }
    let lines = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 72);
    assert_eq!(lines.lines().filter(|l| l.contains("\"eval_loss\"")).count(), 12);
    // HF layout with the input's side files; loads as a causal LM and differs from the input.
    let out = &s.model_dir;
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "tokenizer_config.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let dev = candle_core::Device::Cpu;
    tandem_models::LanguageModel::load(out, &dev).unwrap();
    assert_ne!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(fixtures().join("hf/qwen2-tiny/model.safetensors")).unwrap()
    );
    // A second fresh run into the same directory is refused.
    let e = sft(&cfg, opts(&run, false)).await.unwrap_err();
    assert!(e.to_string().contains("--resume"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "[checkpoints]\nevery = 5\nkeep = 20");
    let full = dir.path().join("full");
    let a = sft(&cfg, opts(&full, false)).await.unwrap();
    assert_eq!(a.checkpoints, 14, "every 5 steps of 72");
    // A run that stopped after step 10: its directory as the checkpoint left it.
    let cut = dir.path().join("cut");
    std::fs::create_dir_all(cut.join("checkpoints")).unwrap();
    std::fs::copy(full.join("config.toml"), cut.join("config.toml")).unwrap();
    copy_dir(&full.join("checkpoints/step-10"), &cut.join("checkpoints/step-10"));
    let lines: Vec<String> = std::fs::read_to_string(full.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    std::fs::write(cut.join("metrics.jsonl"), lines[..10].join("\n") + "\n").unwrap();
    let cfg_b = SftConfig::load(&cut.join("config.toml"), &[]).unwrap();
    let b = sft(&cfg_b, opts(&cut, true)).await.unwrap();
    assert_eq!(b.resumed_from, Some(10));
    assert_eq!(b.reports.len(), 62);
    // Same losses, learning rates and gradient norms, bit for bit, and the same weights.
    for (x, y) in a.reports[10..].iter().zip(&b.reports) {
        assert_eq!(x.step, y.step);
        assert_eq!(
            (x.loss.to_bits(), x.lr.to_bits(), x.grad_norm.to_bits()),
            (y.loss.to_bits(), y.lr.to_bits(), y.grad_norm.to_bits()),
            "step {}",
            x.step
        );
        assert_eq!(x.eval_loss.map(f64::to_bits), y.eval_loss.map(f64::to_bits));
    }
    let w = |d: &Path| std::fs::read(d.join("policy/model.safetensors")).unwrap();
    assert_eq!(w(&full), w(&cut), "final weights differ after resume");
    let o = |d: &Path| std::fs::read(d.join("checkpoints/step-20/optimizer.safetensors")).unwrap();
    assert_eq!(o(&full), o(&cut), "optimizer state at step 20 differs after resume");
    // The metrics file holds every step once.
    let m = std::fs::read_to_string(cut.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = m
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (0..72).collect::<Vec<_>>());
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// A copy of the qwen2-tiny fixture whose tokenizer_config.json carries the ChatML template.
pub fn chat_model(dir: &Path) -> PathBuf {
    let m = dir.join("qwen2-chat");
    copy_dir(&fixtures().join("hf/qwen2-tiny"), &m);
    std::fs::copy(
        fixtures().join("chat/tokenizer_config.json"),
        m.join("tokenizer_config.json"),
    )
    .unwrap();
    m
}

#[test]
fn chat_records_train_on_the_assistant_turns_only() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = chat_model(dir.path());
    let data = dir.path().join("chat.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"messages": [{"role": "user", "content": "7+8="}, {"role": "assistant", "content": "15"}, {"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}"#,
            "\n",
            r#"{"prompt": "3+4=", "completion": "7"}"#,
            "\n"
        ),
    )
    .unwrap();
    let text = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"chat.jsonl\"\n",
        model_dir.display()
    );
    std::fs::write(dir.path().join("c.toml"), text).unwrap();
    let cfg = SftConfig::load(&dir.path().join("c.toml"), &[]).unwrap();
    let model = load_model(&cfg).unwrap();
    let ex = load_examples(&data, &model, &cfg.data).unwrap();
    let tok = &model.tokenizer;
    let targets = |e: &tandem_actors::sft_trainer::SftExample| -> String {
        let ids: Vec<u32> = e
            .ids
            .iter()
            .zip(&e.target)
            .filter(|(_, t)| **t)
            .map(|(i, _)| *i)
            .collect();
        tok.decode(&ids).unwrap()
    };
    // The whole conversation as the template renders it; the targets are the assistant turns
    // with their end-of-turn marker.
    assert_eq!(
        tok.decode(&ex[0].ids).unwrap(),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n7+8=<|im_end|>\n<|im_start|>assistant\n15<|im_end|>\n<|im_start|>user\n1+1=<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    );
    assert_eq!(targets(&ex[0]), "15<|im_end|>\n2<|im_end|>\n");
    // prompt/completion: the completion and EOS (id 0, skipped when decoding).
    assert_eq!(targets(&ex[1]), "7");
    assert_eq!(*ex[1].ids.last().unwrap(), 0);
    assert!(*ex[1].target.last().unwrap());
    // Without a template, a chat record is an error naming the line.
    let plain = format!(
        "[model]\npath = \"{}\"\n[data]\ntrain = \"chat.jsonl\"\n",
        fixtures().join("hf/qwen2-tiny").display()
    );
    std::fs::write(dir.path().join("p.toml"), plain).unwrap();
    let cfg = SftConfig::load(&dir.path().join("p.toml"), &[]).unwrap();
    let e = load_examples(&data, &load_model(&cfg).unwrap(), &cfg.data).unwrap_err();
    assert!(
        e.to_string().contains("chat.jsonl:1") && e.to_string().contains("chat_template"),
        "{e}"
    );
}
