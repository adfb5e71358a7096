//! Reading preference data: the JSONL record forms of `tandem train-rm` (see [`super`]) and the
//! normalisation reference set, tokenised and truncated.

use std::path::Path;

use tandem_actors::rm_trainer::Comparison;
use tandem_models::TextTokenizer;

use super::RmData;
use crate::error::RuntimeError;
use crate::prompts::{encode_prompt, read_jsonl};

/// Prompt and response ids.
pub type PromptResponse = (Vec<u32>, Vec<u32>);

/// Tokenised preference data from a JSONL file (see the module docs for the forms).
pub fn load_comparisons(
    path: &Path,
    tokenizer: &TextTokenizer,
    prompt_max: usize,
    response_max: usize,
) -> Result<Vec<Comparison>, RuntimeError> {
    let mut out = Vec::new();
    read_jsonl(path, |v| {
        // Conversational records ({"chosen": [messages], ...}) through the chat template.
        let text = crate::chat::preference_as_text(tokenizer, v)?;
        let (prompt, responses, ranking) = parse_record(text.as_ref().unwrap_or(v))?;
        let p = encode_prompt(tokenizer, &prompt, prompt_max)?;
        let mut rs = Vec::with_capacity(responses.len());
        for (j, r) in responses.iter().enumerate() {
            let mut ids = tokenizer.encode(r).map_err(|e| e.to_string())?;
            if ids.is_empty() {
                return Err(format!("response {j} tokenises to nothing"));
            }
            ids.truncate(response_max);
            rs.push(ids);
        }
        out.push(Comparison {
            prompt: p,
            responses: rs,
            ranking,
        });
        Ok(())
    })?;
    if out.is_empty() {
        return Err(RuntimeError::Prompts {
            path: path.into(),
            line: 0,
            msg: "no preference records".into(),
        });
    }
    Ok(out)
}

type Record = (String, Vec<String>, Vec<usize>);

/// The most responses a ranked record may have.
pub const MAX_RANKED_RESPONSES: usize = 64;

fn parse_record(v: &serde_json::Value) -> Result<Record, String> {
    let s = |key: &str| -> Result<Option<String>, String> {
        match v.get(key) {
            None => Ok(None),
            Some(serde_json::Value::String(x)) => Ok(Some(x.clone())),
            Some(_) => Err(format!("\"{key}\" must be a string")),
        }
    };
    if !v.is_object() {
        return Err("expected a JSON object".into());
    }
    if let Some(resp) = v.get("responses") {
        let prompt = s("prompt")?.ok_or("a ranked record needs a \"prompt\" string")?;
        let responses: Vec<String> = resp
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_str().map(String::from)).collect())
            .ok_or("\"responses\" must be an array of strings")?;
        if responses.len() < 2 || responses.len() > MAX_RANKED_RESPONSES {
            return Err(format!(
                "\"responses\" needs 2 to {MAX_RANKED_RESPONSES} entries, got {}",
                responses.len()
            ));
        }
        let ranking: Vec<usize> = v
            .get("ranking")
            .and_then(|r| r.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|u| u as usize)).collect())
            .ok_or("a ranked record needs \"ranking\": response indices from best to worst")?;
        let mut seen = vec![false; responses.len()];
        if ranking.len() != responses.len()
            || ranking
                .iter()
                .any(|&i| i >= responses.len() || std::mem::replace(&mut seen[i], true))
        {
            return Err(format!(
                "\"ranking\" {ranking:?} is not a permutation of 0..{}",
                responses.len()
            ));
        }
        return Ok((prompt, responses, ranking));
    }
    let (Some(chosen), Some(rejected)) = (s("chosen")?, s("rejected")?) else {
        return Err(
            "expected {\"prompt\",\"chosen\",\"rejected\"}, {\"chosen\",\"rejected\"} or {\"prompt\",\"responses\",\"ranking\"}"
                .into(),
        );
    };
    if chosen == rejected {
        return Err("\"chosen\" and \"rejected\" are the same text".into());
    }
    let (prompt, chosen, rejected) = match s("prompt")? {
        Some(p) => (p, chosen, rejected),
        None => {
            let cut = common_prompt_len(&chosen, &rejected);
            if cut == 0 {
                return Err("\"chosen\" and \"rejected\" share no prefix ending in whitespace to use as the prompt (or give \"prompt\")".into());
            }
            (
                chosen[..cut].to_string(),
                chosen[cut..].to_string(),
                rejected[cut..].to_string(),
            )
        }
    };
    Ok((prompt, vec![chosen, rejected], vec![0, 1]))
}

/// Byte length of the HH-RLHF prompt: the longest common prefix of `a` and `b`, cut back to
/// just after its last whitespace character.
pub fn common_prompt_len(a: &str, b: &str) -> usize {
    let mut lcp = 0;
    for ((i, ca), cb) in a.char_indices().zip(b.chars()) {
        if ca != cb {
            break;
        }
        lcp = i + ca.len_utf8();
    }
    a[..lcp]
        .char_indices()
        .rfind(|(_, c)| c.is_whitespace())
        .map(|(i, c)| i + c.len_utf8())
        .unwrap_or(0)
}

/// `{"prompt", "response"}` lines for the normalisation reference set.
pub(super) fn load_reference(
    path: &Path,
    tokenizer: &TextTokenizer,
    data: &RmData,
) -> Result<Vec<PromptResponse>, RuntimeError> {
    let mut out = Vec::new();
    read_jsonl(path, |v| {
        let get = |k: &str| {
            v.get(k)
                .and_then(|x| x.as_str())
                .ok_or_else(|| format!("expected {{\"prompt\", \"response\"}} strings; no \"{k}\""))
        };
        let (prompt, response) = (get("prompt")?, get("response")?);
        let p = encode_prompt(tokenizer, prompt, data.prompt_max_tokens)?;
        let mut r = tokenizer.encode(response).map_err(|e| e.to_string())?;
        r.truncate(data.response_max_tokens);
        out.push((p, r));
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hh_prompt_is_the_common_prefix_up_to_whitespace() {
        let a = "\n\nHuman: hi\n\nAssistant: good day";
        let b = "\n\nHuman: hi\n\nAssistant: great day";
        let n = common_prompt_len(a, b);
        assert_eq!(&a[..n], "\n\nHuman: hi\n\nAssistant: ");
        assert_eq!(common_prompt_len("abc", "xyz"), 0);
    }

    #[test]
    fn records_of_every_form_parse_and_bad_ones_say_why() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let (p, r, k) = parse_record(&v(r#"{"prompt":"q","chosen":"a","rejected":"b"}"#)).unwrap();
        assert_eq!(
            (p.as_str(), r, k),
            ("q", vec!["a".to_string(), "b".to_string()], vec![0, 1])
        );
        let (p, r, _) = parse_record(&v(r#"{"chosen":"the movie was good","rejected":"the movie was bad"}"#)).unwrap();
        assert_eq!(
            (p.as_str(), r[0].as_str(), r[1].as_str()),
            ("the movie was ", "good", "bad")
        );
        let (_, r, k) = parse_record(&v(r#"{"prompt":"q","responses":["a","b","c"],"ranking":[2,0,1]}"#)).unwrap();
        assert_eq!((r.len(), k), (3, vec![2, 0, 1]));
        for (line, want) in [
            (
                r#"{"prompt":"q","responses":["a","b"],"ranking":[0,0]}"#,
                "not a permutation",
            ),
            (r#"{"prompt":"q","chosen":"a"}"#, "expected {"),
            (r#"{"chosen":"x a","rejected":"x a"}"#, "same text"),
            (r#"{"chosen":"abc","rejected":"abd"}"#, "share no prefix"),
            (
                r#"{"prompt":1,"chosen":"a","rejected":"b"}"#,
                "\"prompt\" must be a string",
            ),
        ] {
            let e = parse_record(&v(line)).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
