//! Experiment configuration: the TOML schema, `--set` overrides and validation.

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
    let message = message.trim_end();
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
