//! The bench's workload: checking the flags, writing the built-in models and prompts, and the
//! run config over them.

use super::*;

pub(super) fn validate(args: &PpoBench) -> anyhow::Result<()> {
    for (name, v) in [
        ("--threads", args.threads),
        ("--prompts-per-step", args.prompts_per_step),
        ("--prompt-len", args.prompt_len),
        ("--new-tokens", args.new_tokens),
        ("--epochs", args.epochs),
        ("--minibatch", args.minibatch),
    ] {
        if v == 0 {
            return bad_input!("{name} must be at least 1");
        }
    }
    if args.steps <= args.warmup {
        return bad_input!(
            "--steps ({}) must exceed --warmup ({}): at least one step must be timed",
            args.steps,
            args.warmup
        );
    }
    if args.minibatch > args.prompts_per_step {
        return bad_input!(
            "--minibatch ({}) must not exceed --prompts-per-step ({})",
            args.minibatch,
            args.prompts_per_step
        );
    }
    if !(args.matmul_secs.is_finite() && args.matmul_secs > 0.0) {
        return bad_input!(
            "--matmul-secs must be a positive number of seconds, not {}",
            args.matmul_secs
        );
    }
    match (&args.model, &args.reward) {
        (Some(_), None) => return bad_input!("--model needs --reward (the reward model the critic starts from)"),
        (None, Some(_)) => return bad_input!("--reward needs --model (the policy checkpoint)"),
        (Some(_), Some(_)) => {
            for (name, v) in [
                ("--layers", args.layers),
                ("--hidden", args.hidden),
                ("--heads", args.heads),
                ("--vocab", args.vocab),
            ] {
                if v.is_some() {
                    return bad_input!("{name} sizes the built-in models; it cannot be used with --model/--reward");
                }
            }
        }
        (None, None) => {
            let (hidden, heads) = (args.hidden.unwrap_or(HIDDEN), args.heads.unwrap_or(HEADS));
            for (name, v) in [
                ("--layers", args.layers),
                ("--hidden", args.hidden),
                ("--heads", args.heads),
            ] {
                if v == Some(0) {
                    return bad_input!("{name} must be at least 1");
                }
            }
            if hidden % heads != 0 {
                return bad_input!("--hidden ({hidden}) must be a multiple of --heads ({heads})");
            }
            if args.vocab.unwrap_or(VOCAB) < 8 {
                return bad_input!("--vocab must be at least 8");
            }
            if args.prompt_len + args.new_tokens > POSITIONS {
                return bad_input!(
                    "--prompt-len + --new-tokens ({}) exceeds the built-in models' {POSITIONS} positions",
                    args.prompt_len + args.new_tokens
                );
            }
        }
    }
    Ok(())
}

/// The word-level `tokenizer.json` of the built-in models: `<|endoftext|>` (id 0: pad and
/// end of text), `<unk>` (1), then the words `w2` .. `w{vocab-1}`, split on whitespace.
pub(super) fn word_tokenizer_json(vocab: usize) -> String {
    let mut map = serde_json::Map::new();
    map.insert("<|endoftext|>".into(), json!(0));
    map.insert("<unk>".into(), json!(1));
    for i in 2..vocab {
        map.insert(format!("w{i}"), json!(i));
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": map, "unk_token": "<unk>"}
    })
    .to_string()
}

/// Writes the built-in policy, reward model and prompts under `dir` (see the module docs).
pub(super) fn write_builtin(args: &PpoBench, dir: &Path) -> anyhow::Result<Workload> {
    let vocab = args.vocab.unwrap_or(VOCAB);
    let config = ModelConfig::gpt2(
        vocab,
        args.hidden.unwrap_or(HIDDEN),
        args.layers.unwrap_or(LAYERS),
        args.heads.unwrap_or(HEADS),
        POSITIONS,
    );
    let tokenizer = TextTokenizer::from_json(&word_tokenizer_json(vocab), Path::new("<bench word tokenizer>"))?;
    let dev = Device::Cpu;
    let policy = dir.join("policy");
    let (_, vars) = LanguageModel::trainable(&config, WeightInit::Random { seed: args.seed }, &dev)?;
    save_checkpoint(&policy, &config, &snapshot(&vars)?, None)?;
    tokenizer.save_to_dir(&policy)?;
    let reward = dir.join("reward");
    let rm_config = config.with_head(tandem_models::HeadKind::Scalar);
    let (_, vars) = ScalarModel::trainable(&rm_config, WeightInit::Random { seed: args.seed + 1 }, &dev)?;
    save_checkpoint(&reward, &rm_config, &snapshot(&vars)?, None)?;
    tokenizer.save_to_dir(&reward)?;

    let mut rng = StdRng::seed_from_u64(args.seed);
    let mut text = String::new();
    for _ in 0..(4 * args.prompts_per_step).max(256) {
        let words: Vec<String> = (0..args.prompt_len)
            .map(|_| format!("w{}", rng.random_range(2..vocab)))
            .collect();
        writeln!(text, "{}", json!({ "prompt": words.join(" ") }))?;
    }
    let prompts = dir.join("prompts.jsonl");
    std::fs::write(&prompts, text).with_context(|| format!("writing {}", prompts.display()))?;
    Ok(Workload {
        policy,
        reward,
        prompts,
        builtin: true,
    })
}

/// The absolute form of a path the user named with the argument `name`.
pub(super) fn canonical(p: &Path, name: &str) -> anyhow::Result<PathBuf> {
    std::fs::canonicalize(p).map_err(|e| anyhow::Error::new(BadInput(format!("{name} {}: {e}", p.display()))))
}

pub(super) fn toml_path(p: &Path) -> anyhow::Result<String> {
    let s = p
        .to_str()
        .with_context(|| format!("{} is not valid UTF-8", p.display()))?;
    // A TOML literal string holds any path without escapes except one with a single quote.
    if s.contains('\'') || s.contains('\n') {
        return bad_input!("path {s:?} contains a quote or newline, which the bench cannot pass on");
    }
    Ok(format!("'{s}'"))
}

/// The peer workload's config (the workshop's `peers/trl_match.toml`) at the bench's sizes.
pub(super) fn config_text(args: &PpoBench, w: &Workload) -> anyhow::Result<String> {
    Ok(format!(
        r#"seed = {seed}
steps = {steps}

[mode]
max_staleness = 0

[models.policy]
path = {policy}

[models.critic]
init = "reward_model"

[reward]
kind = "reward_model"
model = {reward}

[data]
prompts = {prompts}
prompt_max_tokens = {prompt_len}
prompts_per_step = {pps}
prompts_per_ticket = {pps}

[sampling]
max_new_tokens = {new_tokens}
temperature = 1.0

[algorithm]
ppo_epochs = {epochs}
minibatch_size = {minibatch}
policy_lr = 1e-5
critic_lr = 1e-5
kl = {{ kind = "fixed", beta = 0.05 }}

[placement]
rollout_devices = ["cpu:0"]
rollouts_per_device = 1
reward_device = "cpu:0"
value_device = "cpu:0"
learner_device = "cpu:0"
threads_per_device = {threads}

[metrics]
enabled = false

[checkpoints]
every = 0
keep = 1

[store]
retention = "none"
"#,
        seed = args.seed,
        steps = args.steps,
        policy = toml_path(&w.policy)?,
        reward = toml_path(&w.reward)?,
        prompts = toml_path(&w.prompts)?,
        prompt_len = args.prompt_len,
        pps = args.prompts_per_step,
        new_tokens = args.new_tokens,
        epochs = args.epochs,
        minibatch = args.minibatch,
        threads = args.threads,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_tokenizer_has_the_requested_vocabulary() {
        let t = TextTokenizer::from_json(&word_tokenizer_json(64), Path::new("<test>")).unwrap();
        assert_eq!(t.vocab_size(), 64);
        assert_eq!(t.encode("w2 w63 w10").unwrap(), vec![2, 63, 10]);
        assert_eq!(t.token_to_id("<|endoftext|>"), Some(0));
    }
}
