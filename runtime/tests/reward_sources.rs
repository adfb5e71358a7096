//! `[reward]` kinds built from a config by `reward_source()`: exact match against the prompts
//! file's answers, regex, and the length / no-stop penalties, with real numbers.

use candle_core::Device;
use tandem_runtime::reward_sources::reward_source;
use tandem_runtime::Config;

fn config(dir: &std::path::Path, reward: &str) -> Config {
    std::fs::write(
        dir.join("prompts.jsonl"),
        "{\"prompt\": \"the movie was\", \"answer\": \"Good !\"}\n{\"prompt\": \"the plot\"}\n",
    )
    .unwrap();
    let text = format!(
        r#"
steps = 1
[models.policy.builtin]
arch = "gpt2"
hidden = 16
layers = 1
heads = 2
[models.critic]
init = "policy"
[reward]
{reward}
[data]
prompts = "prompts.jsonl"
prompts_per_step = 2
prompts_per_ticket = 2
[sampling]
max_new_tokens = 4
stop_tokens = [0]
"#
    );
    let path = dir.join("c.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path, &[]).unwrap()
}

fn ids(t: &tandem_models::TextTokenizer, s: &str) -> Vec<u32> {
    t.encode(s).unwrap()
}

#[test]
fn exact_match_regex_and_penalties_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tandem_runtime::builtin::tokenizer().unwrap();
    let (p1, p2) = (ids(&tok, "the movie was"), ids(&tok, "the plot"));

    let cfg = config(dir.path(), "kind = \"exact_match\"\nmiss_score = -1.0");
    let src = reward_source(&cfg, &tok, &Device::Cpu).unwrap();
    let (good, bad) = (ids(&tok, "good !"), ids(&tok, "good"));
    // "good !" then the stop token (0) matches "Good !"; "good" does not.
    let s = src
        .score(&[&p1, &p1], &[&[good.as_slice(), &[0]].concat(), &bad], &Device::Cpu)
        .unwrap();
    assert_eq!(s, vec![1.0, -1.0]);
    let e = src.score(&[&p2], &[&good], &Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("no reference answer for prompt \"the plot\""), "{e}");

    let cfg = config(
        dir.path(),
        "kind = \"regex\"\npattern = \"^(good|great)\"\nlength_penalty = 0.25\nlength_target = 2\nno_stop_penalty = -1.0\nstop_window = 3",
    );
    let src = reward_source(&cfg, &tok, &Device::Cpu).unwrap();
    let r1 = [ids(&tok, "great"), vec![0]].concat(); // match, 2 tokens, stop inside the window: 1
    let r2 = [ids(&tok, "great fun fun"), vec![0]].concat(); // stop is token 4, outside the window of 3: -1 replaces 1 - 0.25 * 2
    let r3 = [ids(&tok, "fun great fun"), vec![0]].concat(); // stop at position 4 > window: -1
    let r4 = [ids(&tok, "the great"), vec![0]].concat(); // no match, 3 tokens: 0 - 0.25 = -0.25
    let s = src
        .score(&[&p1, &p1, &p1, &p1], &[&r1, &r2, &r3, &r4], &Device::Cpu)
        .unwrap();
    assert_eq!(s, vec![1.0, -1.0, -1.0, -0.25]);
}
