//! Maps a field path (`outputs.aggregations[0].window.size`) to the line it is written on, so
//! that every configuration error, whichever stage finds it, can name the line.

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// Line numbers (1-based) of every mapping key and sequence item in a YAML document.
#[derive(Debug, Default, Clone)]
pub struct LineIndex {
    lines: HashMap<String, usize>,
}

enum Frame {
    /// In a mapping; `key` is the key whose value comes next (None: a key comes next).
    Map {
        path: String,
        key: Option<String>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

impl LineIndex {
    /// Builds the index; a document that does not parse yields an empty index (the
    /// deserializer reports the syntax error with its own position).
    pub fn build(text: &str) -> Self {
        let mut lines = HashMap::new();
        let mut stack: Vec<Frame> = Vec::new();
        for event in Parser::new_from_str(text) {
            let Ok((event, span)) = event else { break };
            let line = span.start.line();
            match event {
                Event::Scalar(value, ..) => {
                    if let Some(Frame::Map { path, key }) = stack.last_mut()
                        && key.is_none()
                    {
                        let child = join_key(path, &value);
                        lines.insert(child.clone(), line);
                        *key = Some(child);
                        continue;
                    }
                    Self::value_done(&mut stack, &mut lines, line);
                }
                Event::Alias(..) => Self::value_done(&mut stack, &mut lines, line),
                Event::MappingStart(..) | Event::SequenceStart(..) => {
                    let path = Self::value_path(&mut stack, &mut lines, line);
                    if matches!(event, Event::MappingStart(..)) {
                        stack.push(Frame::Map { path, key: None });
                    } else {
                        stack.push(Frame::Seq { path, next: 0 });
                    }
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                    if let Some(Frame::Map { key, .. }) = stack.last_mut() {
                        *key = None;
                    }
                }
                _ => {}
            }
        }
        Self { lines }
    }

    /// The path a value starting here gets, recording sequence items' lines.
    fn value_path(stack: &mut [Frame], lines: &mut HashMap<String, usize>, line: usize) -> String {
        match stack.last_mut() {
            Some(Frame::Map { key, path }) => key.clone().unwrap_or_else(|| path.clone()),
            Some(Frame::Seq { path, next }) => {
                let child = format!("{path}[{next}]");
                *next += 1;
                lines.insert(child.clone(), line);
                child
            }
            None => String::new(),
        }
    }

    fn value_done(stack: &mut [Frame], lines: &mut HashMap<String, usize>, line: usize) {
        match stack.last_mut() {
            Some(Frame::Map { key, .. }) => *key = None,
            Some(Frame::Seq { .. }) => {
                Self::value_path(stack, lines, line);
            }
            None => {}
        }
    }

    /// The line of `path`, or of its nearest ancestor that is written in the file.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut p = path;
        loop {
            if let Some(line) = self.lines.get(p) {
                return Some(*line);
            }
            let cut = p.rfind(['.', '['])?;
            p = &p[..cut];
        }
    }
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_keys_and_sequence_items() {
        let text = "name: x\noutputs:\n  aggregations:\n    - name: a\n      window:\n        size: 1m\n    - name: b\n      sql: |\n        SELECT 1\n";
        let idx = LineIndex::build(text);
        assert_eq!(idx.line_of("name"), Some(1));
        assert_eq!(idx.line_of("outputs.aggregations[0].window.size"), Some(6));
        assert_eq!(idx.line_of("outputs.aggregations[1].name"), Some(7));
        assert_eq!(idx.line_of("outputs.aggregations[1].sql"), Some(8));
        // A missing key falls back to its parent.
        assert_eq!(idx.line_of("outputs.aggregations[1].window"), Some(7));
    }

    #[test]
    fn flow_style_items() {
        let idx =
            LineIndex::build("fields:\n  - {name: a, type: string}\n  - {name: b, type: int64}\n");
        assert_eq!(idx.line_of("fields[1].type"), Some(3));
    }
}
