//! Chat templates render as transformers renders them: fixtures/chat/expected.json holds what
//! `apply_chat_template` produced (fixtures/chat/make_chat_fixture.py) for a ChatML template
//! (Python string methods, `raise_exception`, whitespace control) and Zephyr's (trim_blocks,
//! lstrip_blocks, `eos_token`), with and without the generation prompt.

use std::path::{Path, PathBuf};

use tandem_models::{ChatTemplateSource, TextTokenizer};
use tandem_runtime::chat::{parse_messages, ChatTemplate};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

#[test]
fn renderings_match_transformers_apply_chat_template() {
    let text = std::fs::read_to_string(fixtures().join("chat/expected.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let eos = v["eos_token"].as_str().unwrap();
    let mut checked = 0;
    for case in v["cases"].as_array().unwrap() {
        let name = case["template"].as_str().unwrap();
        let t = ChatTemplate::new(&ChatTemplateSource {
            template: v["templates"][name].as_str().unwrap().into(),
            bos_token: None,
            eos_token: Some(eos.into()),
            path: format!("expected.json:{name}").into(),
        })
        .unwrap();
        let msgs = parse_messages(&case["messages"]).unwrap();
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let got = t.render(&msgs, gen).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{name}, generation prompt {gen}");
        checked += 1;
    }
    assert_eq!(checked, 12);
}

#[test]
fn a_tokenizer_directory_brings_its_template() {
    // qwen2-tiny has no template; the chat fixture's tokenizer_config.json adds one.
    let plain = TextTokenizer::from_dir(&fixtures().join("hf/qwen2-tiny")).unwrap();
    assert!(plain.chat_template().is_none());
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixtures().join("hf/qwen2-tiny").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        fixtures().join("chat/tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let src = tok.chat_template().expect("template read from tokenizer_config.json");
    assert_eq!(src.eos_token.as_deref(), Some("<|endoftext|>"));
    let msgs = serde_json::json!([{"role": "user", "content": "What is 12 + 30?"}]);
    let text = tandem_runtime::chat::render_prompt(&tok, &msgs).unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    );
    // An unknown role reaches the template's raise_exception.
    let bad = serde_json::json!([{"role": "tool", "content": "x"}]);
    let e = tandem_runtime::chat::render_prompt(&tok, &bad).unwrap_err();
    assert!(e.contains("Unknown role: tool"), "{e}");
    // Without a template, a messages prompt is refused with the reason.
    let e = tandem_runtime::chat::render_prompt(&plain, &msgs).unwrap_err();
    assert!(e.contains("chat_template"), "{e}");
}

#[test]
fn chat_prompts_feed_runs_and_exact_match_alike() {
    // The prompt loader (run, sample, eval) and the exact-match answers read a chat record the
    // same way: the template with the generation prompt, the final assistant turn left out.
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixtures().join("hf/qwen2-tiny").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        fixtures().join("chat/tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let data = dir.path().join("prompts.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"messages": [{"role": "user", "content": "12+39="}, {"role": "assistant", "content": "51"}], "answer": "51"}"#,
            "\n",
            r#"{"prompt": "1+1=", "answer": "2"}"#,
            "\n"
        ),
    )
    .unwrap();
    let set = tandem_runtime::prompts::load_prompts(&data, "prompt", &tok, 256, Default::default()).unwrap();
    let want = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n12+39=<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(set.prompts[0], tok.encode(want).unwrap());
    assert_eq!(set.prompts[1], tok.encode("1+1=").unwrap());
    let answers = tandem_runtime::reward_sources::load_answers(&data, ("prompt", "answer"), &tok, 256).unwrap();
    assert_eq!(answers[&set.prompts[0]], "51");
    assert_eq!(answers[&set.prompts[1]], "2");
}

#[test]
fn conversational_preferences_train_reward_models_through_the_template() {
    let dir = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixtures().join("hf/qwen2-tiny").join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        fixtures().join("chat/tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let data = dir.path().join("prefs.jsonl");
    let user = r#"{"role": "user", "content": "2+2="}"#;
    std::fs::write(
        &data,
        format!(
            "{{\"chosen\": [{user}, {{\"role\": \"assistant\", \"content\": \"4\"}}], \"rejected\": [{user}, {{\"role\": \"assistant\", \"content\": \"5\"}}]}}\n\
             {{\"prompt\": [{user}], \"chosen\": [{{\"role\": \"assistant\", \"content\": \"4\"}}], \"rejected\": [{{\"role\": \"assistant\", \"content\": \"22\"}}]}}\n"
        ),
    )
    .unwrap();
    let c = tandem_runtime::train_rm::load_comparisons(&data, &tok, 256, 16).unwrap();
    let prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n";
    for (e, rejected) in c.iter().zip(["5<|im_end|>\n", "22<|im_end|>\n"]) {
        assert_eq!(tok.decode(&e.prompt).unwrap(), prompt);
        assert_eq!(tok.decode(&e.responses[0]).unwrap(), "4<|im_end|>\n");
        assert_eq!(tok.decode(&e.responses[1]).unwrap(), rejected);
        assert_eq!(e.ranking, vec![0, 1]);
    }
    // Identical conversations have no response to compare: an error naming the line.
    std::fs::write(&data, format!("{{\"chosen\": [{user}], \"rejected\": [{user}]}}\n")).unwrap();
    let e = tandem_runtime::train_rm::load_comparisons(&data, &tok, 256, 16).unwrap_err();
    assert!(e.to_string().contains("prefs.jsonl:1"), "{e}");
}
