//! Reading a TOML config file: `--set` overrides, errors that name the override or line,
//! which keys a file sets, and `${NAME}` expansion in paths.

use std::path::Path;

use crate::error::RuntimeError;

/// Whether the config file or an override sets `key` (`section.name`): defaults that depend on
/// other keys (the model's EOS as `sampling.stop_tokens`, `data.prompts_per_ticket`,
/// `models.critic.init`) apply only to keys the user left out.
pub(super) fn key_given(path: &Path, overrides: &[String], key: &str) -> bool {
    let in_file = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        .is_some_and(|t| {
            let mut cur = Some(&t);
            let parts: Vec<&str> = key.split('.').collect();
            for p in &parts[..parts.len() - 1] {
                cur = cur.and_then(|c| c.get(*p)).and_then(|v| v.as_table());
            }
            cur.is_some_and(|c| c.contains_key(parts[parts.len() - 1]))
        });
    in_file
        || overrides
            .iter()
            .any(|o| o.split('=').next().map(str::trim) == Some(key))
}

/// Expands `${NAME}` and `${NAME:-default}` in a config path from the environment. `$` not
/// followed by `{` is kept as it is.
pub fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or_else(|| format!("unclosed `${{` in {s:?}"))?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad variable name {name:?} in {s:?}"));
        }
        match (std::env::var(name).ok().filter(|v| !v.is_empty()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable {name} (named in {s:?}) is not set; set it or write ${{{name}:-default}}"
                ))
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A config error after `--set` overrides, as `--set KEY=VALUE: what is wrong` when the
/// error's line is a key that an override set, else the error with the line it points at.
fn override_error(e: &toml::de::Error, merged: &str, overrides: &[String]) -> String {
    let line = e.span().map(|sp| {
        let start = merged[..sp.start.min(merged.len())].rfind('\n').map_or(0, |i| i + 1);
        merged[start..].lines().next().unwrap_or("").trim().to_string()
    });
    let key = line
        .as_deref()
        .and_then(|l| l.split_once('='))
        .map(|(k, _)| k.trim().trim_matches('"'));
    let culprit = key.and_then(|k| {
        overrides.iter().rev().find(|o| {
            o.split_once('=')
                .and_then(|(ok, _)| ok.trim().rsplit('.').next())
                .is_some_and(|last| last == k)
        })
    });
    match (culprit, line) {
        (Some(o), _) => format!("--set {o}: {}", e.message().trim()),
        (None, Some(l)) => format!("after --set overrides, at `{l}`: {}", e.message().trim()),
        (None, None) => format!("after --set overrides: {}", e.message().trim()),
    }
}

/// Reads a TOML config file into `T` with `--set` overrides applied; errors name the file,
/// and an error in an overridden value names its `--set` (shared by every command's config).
pub(crate) fn read_toml<T: serde::de::DeserializeOwned>(path: &Path, overrides: &[String]) -> Result<T, RuntimeError> {
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::io(path, e))?;
    let bad = |msg: String| RuntimeError::Config {
        path: path.to_path_buf(),
        msg,
    };
    if overrides.is_empty() {
        return toml::from_str(&text).map_err(|e| bad(e.to_string()));
    }
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    for o in overrides {
        apply_override(&mut table, o).map_err(|m| bad(format!("--set {o}: {m}")))?;
    }
    // Parsed again as text, so an error keeps its key and line, and names its --set.
    let merged = toml::to_string(&table).map_err(|e| bad(format!("after --set overrides: {e}")))?;
    toml::from_str(&merged).map_err(|e| bad(override_error(&e, &merged, overrides)))
}

/// Sets `a.b.c = value` in a TOML table; the value is parsed as TOML or kept as a string.
fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), String> {
    let (key, raw) = spec.split_once('=').ok_or("expected section.key=value")?;
    let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        cur = cur
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()))
            .as_table_mut()
            .ok_or_else(|| format!("{p} is not a table"))?;
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}
