//! Chat prompts: `{"messages": [{"role", "content"}, ...]}` rendered with the model's own chat
//! template.
//!
//! The template is the Jinja text a HF tokenizer directory ships (`chat_template` in
//! `tokenizer_config.json`, or `chat_template.jinja`; see
//! [`tandem_models::ChatTemplateSource`]). It is rendered with `minijinja` set up as
//! transformers sets up Jinja2 for `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on,
//! the variables `messages`, `add_generation_prompt`, `bos_token` and `eos_token`, the
//! function `raise_exception(msg)` (an error carrying `msg`), `tojson`, loop controls, and
//! Python's string methods (`.strip()`, `.startswith()`, ...). A record with `messages` for a
//! model without a template is an error: tandem does not invent a chat format.
//!
//! Stop tokens of responses to chat prompts are the model's EOS ids (`generation_config.json`,
//! else `config.json`), as for any prompt (see `config::Config::resolve_stops`).

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;
use tandem_models::{ChatTemplateSource, TextTokenizer};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// Reads `"messages"`: a non-empty array of `{"role": string, "content": string}`.
pub fn parse_messages(v: &serde_json::Value) -> Result<Vec<Message>, String> {
    let list = v
        .as_array()
        .ok_or("\"messages\" must be an array of {\"role\", \"content\"} objects")?;
    if list.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = |k: &str| {
                m.get(k)
                    .and_then(|x| x.as_str())
                    .map(String::from)
                    .ok_or_else(|| format!("messages[{i}] needs a \"{k}\" string"))
            };
            Ok(Message {
                role: field("role")?,
                content: field("content")?,
            })
        })
        .collect()
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: ChatTemplateSource,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("path", &self.source.path).finish()
    }
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error names its file.
    pub fn new(source: &ChatTemplateSource) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned("chat", source.template.clone())
            .map_err(|e| format!("{}: chat_template: {e}", source.path.display()))?;
        Ok(Self {
            env,
            source: source.clone(),
        })
    }

    /// The template of `tokenizer`'s directory, if it has one.
    pub fn of(tokenizer: &TextTokenizer) -> Result<Option<Self>, String> {
        tokenizer.chat_template().map(Self::new).transpose()
    }

    /// The conversation as text; with `add_generation_prompt`, followed by the opening of an
    /// assistant turn (what a response continues).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String, String> {
        let tmpl = self.env.get_template("chat").expect("added in new()");
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.source.bos_token.clone().unwrap_or_default(),
            eos_token => self.source.eos_token.clone().unwrap_or_default(),
        };
        tmpl.render(ctx).map_err(|e| {
            let mut msg = format!("{}: chat_template: {e}", self.source.path.display());
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                msg.push_str(&format!(": {c}"));
                cause = c.source();
            }
            msg
        })
    }
}

/// A `{"messages": ...}` prompt rendered with `tokenizer`'s chat template and the generation
/// prompt: the text a response continues. A final assistant turn (the reference answer of an
/// SFT record) is left out, so one file serves SFT, RL and evaluation.
pub fn render_prompt(tokenizer: &TextTokenizer, messages: &serde_json::Value) -> Result<String, String> {
    let mut msgs = parse_messages(messages)?;
    if msgs.len() > 1 && msgs.last().is_some_and(|m| m.role == "assistant") {
        msgs.pop();
    }
    let t = ChatTemplate::of(tokenizer)?
        .ok_or("a {\"messages\": ...} record needs a model whose tokenizer_config.json has a chat_template")?;
    t.render(&msgs, true)
}

/// Segments of a conversation for supervised training: `(text, is_assistant)` in order, so
/// that their concatenation is the rendered conversation and exactly the assistant turns'
/// rendered text is marked. Each assistant turn is what rendering up to and including it adds
/// after rendering the turns before it with the generation prompt; a template for which one
/// rendering is not a prefix of the next is an error.
pub fn assistant_segments(template: &ChatTemplate, messages: &[Message]) -> Result<Vec<(String, bool)>, String> {
    if !messages.iter().any(|m| m.role == "assistant") {
        return Err("the conversation has no \"assistant\" message to train on".into());
    }
    let mut out = Vec::new();
    let mut done = String::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        let after = template.render(&messages[..=i], false)?;
        let (Some(ctx), Some(turn)) = (before.strip_prefix(&done), after.strip_prefix(&before)) else {
            return Err(format!(
                "the chat template does not render messages[..={i}] as an extension of the turns before it, so the assistant tokens cannot be told apart"
            ));
        };
        if !ctx.is_empty() {
            out.push((ctx.to_string(), false));
        }
        out.push((turn.to_string(), true));
        done = after;
    }
    let full = template.render(messages, false)?;
    if let Some(rest) = full.strip_prefix(&done) {
        if !rest.is_empty() {
            out.push((rest.to_string(), false));
        }
    }
    Ok(out)
}

/// A conversational preference record as text, for reward-model training: TRL's
/// `{"prompt": [messages], "chosen": [messages], "rejected": [messages]}`, or with the prompt
/// implicit, `{"chosen": [conversation], "rejected": [conversation]}` whose shared leading turns
/// are the prompt. Returns `{"prompt", "chosen", "rejected"}` strings: the prompt rendered with
/// the generation prompt, each response as what rendering the whole conversation adds to it.
/// `Ok(None)` when `chosen` is not a list of messages (a plain-text record).
pub fn preference_as_text(
    tokenizer: &TextTokenizer,
    v: &serde_json::Value,
) -> Result<Option<serde_json::Value>, String> {
    let (Some(chosen), Some(rejected)) = (v.get("chosen"), v.get("rejected")) else {
        return Ok(None);
    };
    if !chosen.is_array() {
        return Ok(None);
    }
    let t = ChatTemplate::of(tokenizer)?
        .ok_or("a conversational preference record needs a model whose tokenizer_config.json has a chat_template")?;
    let chosen = parse_messages(chosen).map_err(|e| format!("chosen: {e}"))?;
    let rejected = parse_messages(rejected).map_err(|e| format!("rejected: {e}"))?;
    let (prompt, c, r) = match v.get("prompt") {
        Some(p) => (parse_messages(p).map_err(|e| format!("prompt: {e}"))?, chosen, rejected),
        None => {
            let n = chosen.iter().zip(&rejected).take_while(|(a, b)| a == b).count();
            if n == 0 || n == chosen.len() || n == rejected.len() {
                return Err(
                    "\"chosen\" and \"rejected\" need shared leading turns (the prompt) and then differ".into(),
                );
            }
            (chosen[..n].to_vec(), chosen[n..].to_vec(), rejected[n..].to_vec())
        }
    };
    let p = t.render(&prompt, true)?;
    let response = |rest: Vec<Message>| -> Result<String, String> {
        let all: Vec<Message> = prompt.iter().cloned().chain(rest).collect();
        let full = t.render(&all, false)?;
        full.strip_prefix(&p).map(String::from).ok_or_else(|| {
            "the chat template does not render the conversation as an extension of its prompt".to_string()
        })
    };
    Ok(Some(
        serde_json::json!({"prompt": p, "chosen": response(c)?, "rejected": response(r)?}),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(t: &str) -> ChatTemplate {
        ChatTemplate::new(&ChatTemplateSource {
            template: t.into(),
            bos_token: Some("<s>".into()),
            eos_token: Some("</s>".into()),
            path: "test.json".into(),
        })
        .unwrap()
    }

    const SIMPLE: &str = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content | trim }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(r, c)| Message {
                role: r.to_string(),
                content: c.to_string(),
            })
            .collect()
    }

    #[test]
    fn renders_with_generation_prompt_and_python_methods() {
        let t = template(SIMPLE);
        let m = msgs(&[("user", " hi ")]);
        assert_eq!(t.render(&m, true).unwrap(), "<|user|>\nhi</s>\n<|assistant|>\n");
        assert_eq!(t.render(&m, false).unwrap(), "<|user|>\nhi</s>\n");
        let py =
            template("{{ messages[0].content.strip().upper() }}{% if messages[0].role.startswith('us') %}!{% endif %}");
        assert_eq!(py.render(&m, false).unwrap(), "HI!");
        let e = template("{{ raise_exception('roles must alternate') }}")
            .render(&m, false)
            .unwrap_err();
        assert!(e.contains("roles must alternate") && e.contains("test.json"), "{e}");
    }

    #[test]
    fn assistant_segments_cover_exactly_the_assistant_turns() {
        let t = template(SIMPLE);
        let m = msgs(&[("user", "2+2"), ("assistant", "4"), ("user", "3+3"), ("assistant", "6")]);
        let s = assistant_segments(&t, &m).unwrap();
        let joined: String = s.iter().map(|(x, _)| x.as_str()).collect();
        assert_eq!(joined, t.render(&m, false).unwrap());
        let marked: Vec<&str> = s.iter().filter(|(_, a)| *a).map(|(x, _)| x.as_str()).collect();
        assert_eq!(marked, vec!["4</s>\n", "6</s>\n"]);
        assert!(assistant_segments(&t, &msgs(&[("user", "x")])).is_err());
    }

    #[test]
    fn bad_messages_say_why() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        assert!(parse_messages(&v("[]")).unwrap_err().contains("empty"));
        assert!(parse_messages(&v(r#"[{"role":"user"}]"#))
            .unwrap_err()
            .contains("messages[0] needs a \"content\""));
        assert!(parse_messages(&v(r#"{"role":"user"}"#)).unwrap_err().contains("array"));
    }
}
