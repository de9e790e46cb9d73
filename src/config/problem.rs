//! Problem reporting: every check adds a [`Problem`] (file, line, field, message, fix) to one
//! [`Problems`] list instead of stopping, so a load reports everything wrong at once.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::LineIndex;

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    /// The field's path, e.g. `outputs.aggregations[0].window.size`.
    pub field: String,
    pub message: String,
    /// What to write instead.
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)?;
        if !self.fix.is_empty() {
            write!(f, "\n    fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        writeln!(
            f,
            "{n} problem{} in the configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            writeln!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// Collects problems for one file.
pub struct Problems<'a> {
    file: &'a Path,
    lines: &'a LineIndex,
    pub list: Vec<Problem>,
}

impl<'a> Problems<'a> {
    pub fn new(file: &'a Path, lines: &'a LineIndex) -> Self {
        Self {
            file,
            lines,
            list: Vec::new(),
        }
    }

    pub fn add(&mut self, field: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.list.push(Problem {
            file: self.file.to_path_buf(),
            line: self.lines.line_of(field),
            field: field.to_string(),
            message: message.into(),
            fix: fix.into(),
        });
    }

    pub fn duration(&mut self, field: &str, text: &str) -> Duration {
        humantime::parse_duration(text.trim()).unwrap_or_else(|e| {
            self.add(
                field,
                format!("`{text}` is not a duration ({e})"),
                "write e.g. 500ms, 30s, 5m or 1h",
            );
            Duration::ZERO
        })
    }

    pub fn bytes(&mut self, field: &str, text: &str) -> u64 {
        parse_bytes(text).unwrap_or_else(|| {
            self.add(
                field,
                format!("`{text}` is not a size"),
                "write e.g. 512KiB, 64MiB or 1GiB",
            );
            0
        })
    }

    pub fn ident(&mut self, field: &str, name: &str) {
        if !is_ident(name) {
            self.add(
                field,
                format!("`{name}` is not a valid name"),
                "use lowercase letters, digits and `_`, starting with a letter or `_` (Athena and SQL need that)",
            );
        }
    }
}

pub fn is_ident(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// `128MiB`, `64 KiB`, `1GB`, `1000`.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" => 1 << 10,
        "mb" => 1_000_000,
        "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("128MiB"), Some(128 << 20));
        assert_eq!(parse_bytes("64 KiB"), Some(64 << 10));
        assert_eq!(parse_bytes("1000"), Some(1000));
        assert_eq!(parse_bytes("12 parsecs"), None);
    }

    #[test]
    fn identifiers() {
        assert!(is_ident("well_1m"));
        assert!(!is_ident("Well"));
        assert!(!is_ident("1m"));
        assert!(!is_ident("a-b"));
    }
}
