//! What `Config::load` settles beyond parsing: `${VAR}` references in paths, and
//! `sampling.stop_tokens` / `sampling.stop_strings` (an HF policy stops at its EOS unless the
//! config says otherwise, and stop strings become ids).

use std::path::{Path, PathBuf};

use rand::{rngs::StdRng, SeedableRng};
use tandem_models::{generate, Decoding, LanguageModel};
use tandem_runtime::config::expand_env;
use tandem_runtime::Config;

fn qwen2() -> PathBuf {
    std::env::var_os("TANDEM_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures"))
        .join("hf/qwen2-tiny")
}

/// A config with the qwen2 fixture (`eos_token_id` 0) as policy and `sampling` as given.
fn load(dir: &Path, sampling: &str) -> Result<Config, String> {
    std::fs::write(dir.join("prompts.jsonl"), "{\"prompt\": \"the movie was\"}\n").unwrap();
    let text = format!(
        "steps = 1\n[models.policy]\npath = {:?}\n[models.critic]\ninit = \"policy\"\n\
         [reward]\nkind = \"positive_words\"\n[data]\nprompts = \"prompts.jsonl\"\n\
         prompts_per_step = 1\nprompts_per_ticket = 1\n[sampling]\nmax_new_tokens = 8\n{sampling}\n",
        qwen2().to_str().unwrap()
    );
    let path = dir.join("c.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path, &[]).map_err(|e| e.to_string())
}

#[test]
fn an_hf_policy_stops_at_its_eos_unless_the_config_says_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    // Not given: the model's EOS (config.json and generation_config.json both say 0).
    assert_eq!(load(dir.path(), "").unwrap().sampling.stop_tokens, vec![0]);
    // An explicit empty list: no stop token.
    assert!(load(dir.path(), "stop_tokens = []")
        .unwrap()
        .sampling
        .stop_tokens
        .is_empty());
    // Explicit ids are kept as they are.
    assert_eq!(
        load(dir.path(), "stop_tokens = [5, 7]").unwrap().sampling.stop_tokens,
        vec![5, 7]
    );
    // generation_config.json wins over config.json, and may list several ids.
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for f in std::fs::read_dir(qwen2()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
    }
    std::fs::write(model.join("generation_config.json"), r#"{"eos_token_id": [3, 4]}"#).unwrap();
    assert_eq!(tandem_models::eos_token_ids(&model).unwrap(), vec![3, 4]);
    std::fs::remove_file(model.join("generation_config.json")).unwrap();
    assert_eq!(tandem_models::eos_token_ids(&model).unwrap(), vec![0]);
    std::fs::write(model.join("generation_config.json"), r#"{"eos_token_id": "x"}"#).unwrap();
    let e = tandem_models::eos_token_ids(&model).unwrap_err().to_string();
    assert!(
        e.contains("generation_config.json") && e.contains("eos_token_id"),
        "{e}"
    );
}

#[test]
fn stop_strings_become_ids_and_multi_token_strings_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // The EOS text is one token (id 0), added to an explicit empty list.
    let cfg = load(dir.path(), "stop_tokens = []\nstop_strings = [\"<|endoftext|>\"]").unwrap();
    assert_eq!(cfg.sampling.stop_tokens, vec![0]);
    // Added to the default, once.
    let cfg = load(dir.path(), "stop_strings = [\"<|endoftext|>\"]").unwrap();
    assert_eq!(cfg.sampling.stop_tokens, vec![0]);
    // A word that is one token of the fixture's BPE joins the list.
    let tok = tandem_models::TextTokenizer::from_dir(&qwen2()).unwrap();
    let word = ["the", "movie", "good", "a"]
        .into_iter()
        .find(|w| tok.encode(w).unwrap().len() == 1)
        .expect("a one-token word");
    let id = tok.encode(word).unwrap()[0];
    let cfg = load(dir.path(), &format!("stop_strings = [{word:?}]")).unwrap();
    assert_eq!(cfg.sampling.stop_tokens, vec![0, id]);
    // Several tokens: an error that names the key, the string and its ids.
    let long = "the movie was wonderful and the film was terrible";
    let n = tok.encode(long).unwrap().len();
    assert!(n > 1);
    let e = load(dir.path(), &format!("stop_strings = [{long:?}]")).unwrap_err();
    assert!(
        e.contains("c.toml") && e.contains("sampling.stop_strings") && e.contains(&format!("{n} tokens")),
        "{e}"
    );
}

#[test]
fn generation_with_the_default_stops_at_the_qwen2_eos() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(dir.path(), "temperature = 1.0").unwrap();
    let mut sampling = cfg.sampling.clone();
    sampling.max_new_tokens = 48;
    let model = LanguageModel::load(&qwen2(), &candle_core::Device::Cpu).unwrap();
    // Many sampled rows over the 384-token vocabulary: some emit the EOS (id 0) before 48
    // tokens, and every row that does ends there.
    let prompts: Vec<Vec<u32>> = (0..64).map(|i| vec![84 + (i % 50) as u32, 258]).collect();
    let g = generate(
        &model,
        &prompts,
        &sampling,
        &mut StdRng::seed_from_u64(3),
        Decoding::Cached,
    )
    .unwrap();
    let mut stopped = 0;
    for (r, s) in g.responses.iter().zip(&g.stopped) {
        match r.iter().position(|&t| t == 0) {
            Some(p) => {
                assert_eq!(p + 1, r.len(), "a response went on after the EOS: {r:?}");
                assert!(*s);
                stopped += 1;
            }
            None => assert!(!*s),
        }
    }
    assert!(stopped > 0, "no row emitted the EOS; the test shows nothing");
}

#[test]
fn env_references_in_paths_expand_with_defaults_and_fail_clearly_when_unset() {
    assert_eq!(expand_env("a/$b/c").unwrap(), "a/$b/c");
    assert_eq!(
        expand_env("${TANDEM_TEST_SURELY_UNSET_VAR:-../fixtures}/hf/x").unwrap(),
        "../fixtures/hf/x"
    );
    let path = std::env::var("PATH").unwrap();
    assert_eq!(expand_env("${PATH:-nope}/x").unwrap(), format!("{path}/x"));
    let e = expand_env("${TANDEM_TEST_SURELY_UNSET_VAR}/x").unwrap_err();
    assert!(
        e.contains("TANDEM_TEST_SURELY_UNSET_VAR") && e.contains("not set"),
        "{e}"
    );
    assert!(expand_env("${oops").unwrap_err().contains("unclosed"));
    assert!(expand_env("${a b}").unwrap_err().contains("bad variable name"));
    // In a config: the error names the file and the key.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("prompts.jsonl"), "{\"prompt\": \"x\"}\n").unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "steps = 1\n[models.policy]\npath = \"${TANDEM_TEST_SURELY_UNSET_VAR}/m\"\n[reward]\nkind = \"positive_words\"\n[data]\nprompts = \"prompts.jsonl\"\n\
         prompts_per_step = 1\nprompts_per_ticket = 1\n[sampling]\nmax_new_tokens = 8\n",
    )
    .unwrap();
    let e = Config::load(&path, &[]).unwrap_err().to_string();
    assert!(
        e.contains("c.toml") && e.contains("models.policy.path") && e.contains("not set"),
        "{e}"
    );
}

#[test]
fn checkpoints_is_the_section_and_its_older_name_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let d = load(dir.path(), "").unwrap();
    assert_eq!((d.checkpoints.every, d.checkpoints.keep), (10, 3));
    let c = load(dir.path(), "[checkpoints]\nevery = 4\nkeep = 2").unwrap();
    assert_eq!((c.checkpoints.every, c.checkpoints.keep), (4, 2));
    let old = load(dir.path(), "[checkpoint]\nevery = 4\nkeep = 2").unwrap();
    assert_eq!(old.checkpoints, c.checkpoints);
    // The resolved config writes the one name.
    assert!(old.to_toml().contains("[checkpoints]") && !old.to_toml().contains("[checkpoint]\n"));
    let e = load(dir.path(), "[checkpoints]\nkeep = 0").unwrap_err();
    assert!(e.contains("checkpoints.keep"), "{e}");
}
