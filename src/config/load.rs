//! The generic loader: YAML → a JSON value tree with `${VAR}` replaced (in values, never in
//! keys) → a serde type, reporting every unknown key with its line, and redaction so that no
//! problem shows what a variable held. The Pi agent loads `agent.yaml` through it
//! ([`load_file`]), so it stays free of Arrow and DataFusion.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{ConfigError, LineIndex, Problem, Problems};

/// Looks up environment variables for `${VAR}`; tests pass their own.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// A string value that came from `${VAR}`s: where it is, what the file says, what it became,
/// and the variables' own values. Problems never show what a variable held (it may be a
/// secret); they show what the file says instead.
#[derive(Debug, Clone)]
pub(super) struct Substituted {
    path: String,
    written: String,
    value: String,
    vars: Vec<(String, String)>,
}

/// Variable values shorter than this are not replaced in messages about other fields (a
/// value like `8` or `info` would replace ordinary words); a problem about the field itself
/// always hides its value.
const REDACT_ANYWHERE_MIN: usize = 6;

/// Replaces, in every problem, the values that came from the environment by the text the file
/// wrote (`Bearer ${TOKEN}`), or by `${NAME}` for a variable's value found elsewhere.
pub(super) fn redact(problems: &mut [Problem], subs: &[Substituted]) {
    let related = |field: &str, path: &str| {
        field == path
            || path
                .strip_prefix(field)
                .is_some_and(|r| r.starts_with(['.', '[']))
            || field
                .strip_prefix(path)
                .is_some_and(|r| r.starts_with(['.', '[']))
    };
    for problem in problems {
        for text in [&mut problem.message, &mut problem.fix] {
            for s in subs {
                let own = related(&problem.field, &s.path);
                if !s.value.is_empty() && (own || s.value.len() >= REDACT_ANYWHERE_MIN) {
                    *text = text.replace(&s.value, &s.written);
                }
                for (name, value) in &s.vars {
                    if !value.is_empty() && (own || value.len() >= REDACT_ANYWHERE_MIN) {
                        *text = text.replace(value, &format!("${{{name}}}"));
                    }
                }
            }
        }
    }
}

/// Reads `path` as YAML into a value tree with `${VAR}` replaced, plus its line index and
/// what was replaced where.
pub(super) fn read_yaml(
    path: &Path,
    env: Env,
) -> Result<(Value, LineIndex, Vec<Substituted>), ConfigError> {
    let one = |line, field: &str, message: String, fix: &str| ConfigError {
        problems: vec![Problem {
            file: path.to_path_buf(),
            line,
            field: field.to_string(),
            message,
            fix: fix.to_string(),
        }],
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        one(
            None,
            "",
            format!("cannot read the file: {e}"),
            "check the path; it is relative to the current directory",
        )
    })?;
    let lines = LineIndex::build(&text);
    // YAML 1.2 booleans only: `y`, `no`, `on` stay text (a path named `y` is a path).
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    let mut value: Value = serde_saphyr::from_str_with_options(&text, options).map_err(|e| {
        let line = e.location().map(|l| l.line() as usize);
        let msg = e
            .to_string()
            .lines()
            .next()
            .unwrap_or("invalid YAML")
            .to_string();
        one(
            line,
            "",
            format!("not valid YAML: {msg}"),
            "fix the YAML syntax at that line",
        )
    })?;
    let mut problems = Problems::new(path, &lines);
    let mut subs = Vec::new();
    substitute_env(&mut value, "", env, &mut problems, &mut subs);
    if problems.list.is_empty() {
        Ok((value, lines, subs))
    } else {
        Err(ConfigError {
            problems: problems.list,
        })
    }
}

/// Replaces `${VAR}` and `${VAR:-default}` in every string value.
fn substitute_env(
    value: &mut Value,
    path: &str,
    env: Env,
    problems: &mut Problems,
    subs: &mut Vec<Substituted>,
) {
    match value {
        Value::String(s) if s.contains("${") => match expand(s, env) {
            Ok(out) => {
                let vars = variables(s)
                    .filter_map(|name| env(name).map(|v| (name.to_string(), v)))
                    .collect();
                subs.push(Substituted {
                    path: path.to_string(),
                    written: std::mem::replace(s, out.clone()),
                    value: out,
                    vars,
                });
            }
            Err(var) => problems.add(
                path,
                format!("environment variable `{var}` is not set"),
                format!("set {var}, or give a default: ${{{var}:-value}}"),
            ),
        },
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                substitute_env(item, &format!("{path}[{i}]"), env, problems, subs);
            }
        }
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                let child = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                substitute_env(v, &child, env, problems, subs);
            }
        }
        _ => {}
    }
}

/// The names of the `${VAR}`s in `s`.
fn variables(s: &str) -> impl Iterator<Item = &str> {
    s.split("${").skip(1).filter_map(|part| {
        let inner = &part[..part.find('}')?];
        Some(inner.split_once(":-").map_or(inner, |(name, _)| name))
    })
}

/// Expands `${VAR}` / `${VAR:-default}`; the error is the first unset variable's name.
pub fn expand(s: &str, env: Env) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        match env(name)
            .filter(|v| !v.is_empty())
            .or(default.map(str::to_string))
        {
            Some(v) => out.push_str(&v),
            None => return Err(name.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Deserializes `value` into `T`, reporting every unknown key (each with the keys allowed
/// there) and then the first type error, all with their lines. Unknown keys are left out of
/// the result, so the caller can go on checking it; any problem fails the load.
pub(super) fn typed<T: DeserializeOwned>(mut value: Value, problems: &mut Problems) -> Option<T> {
    loop {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            // Unknown keys were recorded and removed: the rest is still checked, so every
            // problem is reported at once.
            Ok(t) => return Some(t),
            Err(err) => {
                let path = err.path().to_string();
                let path = if path == "." { String::new() } else { path };
                let msg = err.inner().to_string();
                if let Some(key) = unknown_field(&msg)
                    && remove_key(&mut value, &path, &key)
                {
                    let expected = msg.split_once(", expected ").map(|(_, e)| e).unwrap_or("");
                    let field = if path.ends_with(&key) {
                        path.clone()
                    } else {
                        join(&path, &key)
                    };
                    problems.add(
                        &field,
                        format!("unknown key `{key}`"),
                        if expected.is_empty() {
                            "remove it".to_string()
                        } else {
                            format!("remove it; expected {expected}")
                        },
                    );
                    continue;
                }
                let fix = if msg.starts_with("missing field") {
                    "add it (the commented examples in pipelines/ and deploy/pi/agent.yaml show every field)"
                } else if msg.starts_with("unknown variant") {
                    "use one of the values listed"
                } else {
                    "give the type the field expects"
                };
                problems.add(&path, msg, fix);
                return None;
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn unknown_field(msg: &str) -> Option<String> {
    let rest = msg.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_string())
}

/// Removes `key` from the mapping at `path` (or at its parent, when `path` names the key).
fn remove_key(value: &mut Value, path: &str, key: &str) -> bool {
    let parent = path
        .strip_suffix(key)
        .map(|p| p.trim_end_matches('.'))
        .unwrap_or(path);
    let mut node = value;
    for seg in split_path(parent) {
        node = match (seg, node) {
            (Seg::Key(k), Value::Object(m)) => match m.get_mut(k) {
                Some(v) => v,
                None => return false,
            },
            (Seg::Index(i), Value::Array(a)) => match a.get_mut(i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match node {
        Value::Object(m) => m.remove(key).is_some(),
        _ => false,
    }
}

enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Seg<'_>> {
    let mut out = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut p = part;
        if let Some(b) = p.find('[') {
            if b > 0 {
                out.push(Seg::Key(&p[..b]));
            }
            p = &p[b..];
            while let Some(rest) = p.strip_prefix('[') {
                let end = rest.find(']').unwrap_or(rest.len());
                if let Ok(i) = rest[..end].parse() {
                    out.push(Seg::Index(i));
                }
                p = rest.get(end + 1..).unwrap_or("");
            }
        } else {
            out.push(Seg::Key(p));
        }
    }
    out
}

/// Loads any YAML configuration file into the serde type `F` and resolves it with `resolve`,
/// with the same `${VAR}` substitution, unknown-key reports, lines and redaction as a pipeline
/// (the agent's `agent.yaml` uses it).
pub fn load_file<F: DeserializeOwned, T>(
    path: &Path,
    env: Env,
    resolve: impl FnOnce(F, &mut Problems) -> T,
) -> Result<T, ConfigError> {
    let (value, lines, subs) = read_yaml(path, env)?;
    let mut problems = Problems::new(path, &lines);
    let out = typed::<F>(value, &mut problems).map(|f| resolve(f, &mut problems));
    redact(&mut problems.list, &subs);
    match out {
        Some(t) if problems.list.is_empty() => Ok(t),
        _ => Err(ConfigError {
            problems: problems.list,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_variables_with_defaults() {
        let env = |k: &str| (k == "A").then(|| "x".to_string());
        assert_eq!(expand("${A}/b/${B:-c}", &env).unwrap(), "x/b/c");
        assert_eq!(expand("${MISSING}", &env).unwrap_err(), "MISSING");
        assert_eq!(expand("no vars", &env).unwrap(), "no vars");
    }
}
