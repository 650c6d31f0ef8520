//! TOML tables and serde messages: typed reading with errors that name the dotted key and
//! suggest the nearest valid name, `key=value` overrides, and the first difference of two
//! tables. Generic: used by the config, the loss registry and the data set checks.

use anyhow::{anyhow, bail, Result};
use serde::de::DeserializeOwned;

/// Deserializes a TOML table into `T`; errors name the dotted key (below `prefix`) and suggest
/// the nearest valid key or value.
pub fn from_table<T: DeserializeOwned>(table: toml::Table, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let path = e.path().to_string();
        let message = explain_de_error(&e.inner().to_string(), &[]);
        let key = match (prefix, path.as_str()) {
            (p, ".") => p.to_string(),
            ("", p) => p.to_string(),
            (p, q) => format!("{p}.{q}"),
        };
        if key.is_empty() {
            anyhow!("{message}")
        } else {
            anyhow!("{key}: {message}")
        }
    })
}

/// Applies one `key=value` override: the key is a dotted path of table keys and array
/// indices (`train.epochs`, `loss.1.gamma`); the value is TOML (`3`, `1e-3`, `true`,
/// `"x"`, `[1, 2]`) or else a bare string.
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, raw) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {assignment}: expected key=value"))?;
    let (key, raw) = (key.trim(), raw.trim());
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {assignment}: malformed key `{key}`");
    }
    let value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").expect("the parsed key"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut root = toml::Value::Table(std::mem::take(table));
    let result = set_path(&mut root, &parts, value, "");
    if let toml::Value::Table(t) = root {
        *table = t;
    }
    result.map_err(|e| anyhow!("--set {assignment}: {e}"))
}

fn set_path(
    node: &mut toml::Value,
    parts: &[&str],
    value: toml::Value,
    parent: &str,
) -> std::result::Result<(), String> {
    let (first, rest) = parts.split_first().expect("a non-empty path");
    let here = if parent.is_empty() {
        first.to_string()
    } else {
        format!("{parent}.{first}")
    };
    let slot = match node {
        toml::Value::Table(t) => {
            if rest.is_empty() {
                t.insert(first.to_string(), value);
                return Ok(());
            }
            t.entry(first.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        }
        toml::Value::Array(items) => {
            let i: usize = first
                .parse()
                .map_err(|_| format!("`{parent}` is a list: index it with a number"))?;
            let len = items.len();
            let slot = items
                .get_mut(i)
                .ok_or_else(|| format!("`{parent}` has {len} entries, no index {i}"))?;
            if rest.is_empty() {
                *slot = value;
                return Ok(());
            }
            slot
        }
        _ => return Err(format!("`{parent}` is a value, not a table")),
    };
    set_path(slot, rest, value, &here)
}

/// The first key (dotted path) whose value differs between two tables, with both values.
pub fn first_difference(
    a: &toml::Table,
    b: &toml::Table,
    prefix: &str,
) -> Option<(String, String)> {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for key in keys {
        let path = format!("{prefix}{key}");
        match (a.get(key), b.get(key)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                if let Some(d) = first_difference(x, y, &format!("{path}.")) {
                    return Some(d);
                }
            }
            (x, y) if x != y => {
                let show = |v: Option<&toml::Value>| v.map_or("absent".into(), |v| v.to_string());
                return Some((path, format!("{} vs {}", show(x), show(y))));
            }
            _ => {}
        }
    }
    None
}

/// `" (did you mean `x`?)"` when a candidate is close to `given`, else `""`.
pub fn suggest(given: &str, candidates: &[&str]) -> String {
    candidates
        .iter()
        .map(|c| (strsim::jaro_winkler(given, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!(" (did you mean `{c}`?)"))
        .unwrap_or_default()
}

/// Rewrites a serde message about an unknown field or variant so it suggests the nearest
/// valid name; `extra` are further valid names the message does not list.
pub fn explain_de_error(message: &str, extra: &[&str]) -> String {
    // toml appends "\nin `key`" lines: the caller names the key itself
    let message = message.lines().next().unwrap_or_default().trim_end();
    let Some(rest) = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))
    else {
        return message.to_string();
    };
    let Some((given, expected)) = rest.split_once('`') else {
        return message.to_string();
    };
    let mut valid: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
    let field = message.starts_with("unknown field");
    if field {
        for e in extra {
            if !valid.contains(e) {
                valid.push(e);
            }
        }
    }
    let what = if field { "key" } else { "value" };
    let list = if valid.is_empty() {
        "none".to_string()
    } else {
        valid.join(", ")
    };
    format!(
        "unknown {what} `{given}`{}; valid: {list}",
        suggest(given, &valid)
    )
}
