//! YAML for the CLI: an emitter for any JSON value (what `config show`, `profile show` and
//! `list -f yaml` print, in the block style of `lxc`'s Go YAML), and a reader for the block
//! subset that emitter writes (maps, lists, scalars, `{}` and `[]`), which is what
//! `profile edit` takes on stdin. Flow collections beyond the empty ones, anchors, tags and
//! multi-line block scalars are refused with the line that has them, not guessed at.

use serde_json::{Map, Value};

/// `value` as a YAML document.
pub fn emit(value: &Value) -> String {
    let mut output = String::new();
    match value {
        Value::Object(map) if !map.is_empty() => emit_map(map, 0, &mut output),
        Value::Array(list) if !list.is_empty() => emit_list(list, 0, &mut output),
        scalar => {
            output.push_str(&inline(scalar));
            output.push('\n');
        }
    }
    output
}

fn inline(value: &Value) -> String {
    match value {
        Value::Null => "null".into(),
        Value::Bool(flag) => flag.to_string(),
        Value::Number(number) => number.to_string(),
        Value::String(text) => scalar(text),
        Value::Array(_) => "[]".into(),
        Value::Object(_) => "{}".into(),
    }
}

fn emit_map(map: &Map<String, Value>, indent: usize, output: &mut String) {
    let pad = " ".repeat(indent);
    for (key, value) in map {
        output.push_str(&format!("{pad}{}:", scalar(key)));
        match value {
            Value::Object(inner) if !inner.is_empty() => {
                output.push('\n');
                emit_map(inner, indent + 2, output);
            }
            // Lists sit at their key's indentation, as Go's YAML writes them.
            Value::Array(items) if !items.is_empty() => {
                output.push('\n');
                emit_list(items, indent, output);
            }
            other => output.push_str(&format!(" {}\n", inline(other))),
        }
    }
}

fn emit_list(items: &[Value], indent: usize, output: &mut String) {
    let pad = " ".repeat(indent);
    for item in items {
        match item {
            Value::Object(map) if !map.is_empty() => {
                // The first key shares the dash's line; the others line up under it.
                let mut nested = String::new();
                emit_map(map, indent + 2, &mut nested);
                output.push_str(&format!("{pad}- {}", &nested[indent + 2..]));
            }
            Value::Array(inner) if !inner.is_empty() => {
                output.push_str(&format!("{pad}-\n"));
                emit_list(inner, indent + 2, output);
            }
            other => output.push_str(&format!("{pad}- {}\n", inline(other))),
        }
    }
}

/// A string as a plain scalar when it reads back as the same string, else double-quoted.
fn scalar(text: &str) -> String {
    let reserved = matches!(
        text.to_ascii_lowercase().as_str(),
        "" | "~" | "null" | "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n"
    );
    let numeric = text.parse::<f64>().is_ok()
        || text.starts_with("0x")
        || text.starts_with("0o")
        || text.starts_with('.');
    let special_start = text.starts_with(|c: char| "-?:,[]{}#&*!|>'\"%@`".contains(c));
    let special_inside = text.contains(": ")
        || text.contains(" #")
        || text.ends_with(':')
        || text.contains(|c: char| c.is_control());
    let padded = text.starts_with(' ') || text.ends_with(' ');
    if reserved || numeric || special_start || special_inside || padded {
        serde_json::to_string(text).unwrap_or_else(|_| format!("\"{text}\""))
    } else {
        text.to_string()
    }
}

/// Why a YAML document was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct YamlError {
    pub line: usize,
    pub message: String,
}

struct Line<'a> {
    number: usize,
    indent: usize,
    text: &'a str,
}

/// Reads a YAML document of the block subset [`emit`] writes.
pub fn parse(text: &str) -> Result<Value, YamlError> {
    let mut lines = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start_matches(' ');
        if trimmed.starts_with('\t') {
            return Err(YamlError {
                line: index + 1,
                message: "tabs cannot indent YAML: use spaces".into(),
            });
        }
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed == "---" {
            continue;
        }
        lines.push(Line {
            number: index + 1,
            indent: raw.len() - trimmed.len(),
            text: trimmed.trim_end(),
        });
    }
    if lines.is_empty() {
        return Ok(Value::Null);
    }
    let mut position = 0;
    let indent = lines[0].indent;
    let value = block(&mut lines, &mut position, indent)?;
    if let Some(line) = lines.get(position) {
        return Err(YamlError {
            line: line.number,
            message: "unexpected indentation".into(),
        });
    }
    Ok(value)
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

fn block(lines: &mut [Line<'_>], position: &mut usize, indent: usize) -> Result<Value, YamlError> {
    if is_item(lines[*position].text) {
        list(lines, position, indent)
    } else {
        map(lines, position, indent)
    }
}

fn list(lines: &mut [Line<'_>], position: &mut usize, indent: usize) -> Result<Value, YamlError> {
    let mut items = Vec::new();
    while let Some(line) = lines.get(*position) {
        if line.indent != indent || !is_item(line.text) {
            break;
        }
        let rest = line.text[1..].trim_start();
        let rest_indent = indent + (line.text.len() - rest.len());
        if rest.is_empty() {
            *position += 1;
            match lines.get(*position) {
                Some(next) if next.indent > indent => {
                    let inner = next.indent;
                    items.push(block(lines, position, inner)?);
                }
                _ => items.push(Value::Null),
            }
        } else if split_key(rest).is_some() || is_item(rest) {
            // `- key: value`: a map (or list) starting on the dash's line.
            let text = &lines[*position].text[line.text.len() - rest.len()..];
            lines[*position].text = text;
            lines[*position].indent = rest_indent;
            items.push(block(lines, position, rest_indent)?);
        } else {
            items.push(plain(rest, line.number)?);
            *position += 1;
        }
    }
    Ok(Value::Array(items))
}

fn map(lines: &mut [Line<'_>], position: &mut usize, indent: usize) -> Result<Value, YamlError> {
    let mut entries = Map::new();
    while let Some(line) = lines.get(*position) {
        if line.indent != indent || is_item(line.text) {
            break;
        }
        let number = line.number;
        let (key, rest) = split_key(line.text).ok_or_else(|| YamlError {
            line: number,
            message: format!("expected \"key: value\", found \"{}\"", line.text),
        })?;
        let key = match plain(key, number)? {
            Value::String(text) => text,
            other => other.to_string(),
        };
        *position += 1;
        let value = if rest.is_empty() {
            match lines.get(*position) {
                Some(next) if next.indent > indent => {
                    let inner = next.indent;
                    block(lines, position, inner)?
                }
                Some(next) if next.indent == indent && is_item(next.text) => {
                    list(lines, position, indent)?
                }
                _ => Value::Null,
            }
        } else {
            plain(rest, number)?
        };
        entries.insert(key, value);
    }
    Ok(Value::Object(entries))
}

/// Splits `key: value` (or `key:`) at the colon outside quotes.
fn split_key(text: &str) -> Option<(&str, &str)> {
    let bytes = text.as_bytes();
    let mut quote = None;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        match quote {
            Some(b'"') if byte == b'\\' => index += 1,
            Some(open) if byte == open => quote = None,
            Some(_) => {}
            None if (byte == b'"' || byte == b'\'') && index == 0 => quote = Some(byte),
            None if byte == b':' && (index + 1 == bytes.len() || bytes[index + 1] == b' ') => {
                return Some((text[..index].trim_end(), text[index + 1..].trim()));
            }
            None => {}
        }
        index += 1;
    }
    None
}

/// A scalar on one line: quoted, `{}`, `[]`, a boolean, null, a number or a plain string.
fn plain(text: &str, line: usize) -> Result<Value, YamlError> {
    let refuse = |message: &str| YamlError {
        line,
        message: message.to_string(),
    };
    if text.starts_with('"') {
        return serde_json::from_str::<String>(text)
            .map(Value::String)
            .map_err(|_| refuse("malformed double-quoted string"));
    }
    if let Some(inner) = text.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .ok_or_else(|| refuse("malformed single-quoted string"))?;
        return Ok(Value::String(inner.replace("''", "'")));
    }
    let text = match text.find(" #") {
        Some(index) => text[..index].trim_end(),
        None => text,
    };
    match text {
        "{}" => return Ok(Value::Object(Map::new())),
        "[]" => return Ok(Value::Array(Vec::new())),
        "~" | "null" => return Ok(Value::Null),
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    if text.starts_with(['[', '{', '&', '*', '!', '|', '>']) {
        return Err(refuse(
            "flow collections, anchors, tags and block scalars are not supported: write the \
             value in block style or quote it",
        ));
    }
    if let Ok(number) = text.parse::<i64>() {
        return Ok(Value::from(number));
    }
    Ok(Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn emits_block_style() {
        let value = json!({
            "name": "small",
            "description": "",
            "config": {"limits.memory": "64MiB", "user.flag": "true", "user.n": "3"},
            "devices": {"root": {"path": "/", "pool": "default", "type": "disk"}},
            "used_by": ["/1.0/instances/web"],
            "empty": {},
            "list": [{"a": 1, "b": [true, null]}],
        });
        assert_eq!(
            emit(&value),
            "\
config:
  limits.memory: 64MiB
  user.flag: \"true\"
  user.n: \"3\"
description: \"\"
devices:
  root:
    path: /
    pool: default
    type: disk
empty: {}
list:
- a: 1
  b:
  - true
  - null
name: small
used_by:
- /1.0/instances/web
"
        );
    }

    #[test]
    fn quotes_what_would_read_back_differently() {
        for text in [
            "", "yes", "12", "1.5", "- x", "a: b", "a #b", " x", "x\ny", "{x}",
        ] {
            assert!(scalar(text).starts_with('"'), "{text:?} should be quoted");
        }
        for text in ["web", "/1.0/instances/web", "64MiB", "a-b", "x86_64"] {
            assert_eq!(scalar(text), text);
        }
    }

    #[test]
    fn reads_back_what_it_writes() {
        let value = json!({
            "config": {"user.a": "yes", "user.b": "x: y", "limits.cpu": "2"},
            "description": "a profile # with a hash",
            "devices": {"root": {"path": "/", "type": "disk"}},
            "used_by": ["/1.0/instances/a", "/1.0/instances/b"],
            "list": [{"a": "1", "b": ["x"]}, "plain"],
            "none": {},
        });
        assert_eq!(parse(&emit(&value)).unwrap(), value);
    }

    #[test]
    fn reads_hand_written_profiles() {
        let text = "\
# a comment
description: 'it''s small'
config:
    limits.memory: 64MiB   # inline comment
    limits.cpu: 2
devices:
    root:
        path: /
        type: disk
";
        assert_eq!(
            parse(text).unwrap(),
            json!({
                "description": "it's small",
                "config": {"limits.memory": "64MiB", "limits.cpu": 2},
                "devices": {"root": {"path": "/", "type": "disk"}},
            })
        );
    }

    #[test]
    fn refuses_what_it_does_not_read() {
        assert_eq!(parse("config: [a, b]").unwrap_err().line, 1);
        assert!(parse("a: 1\n\tb: 2").is_err());
        assert!(parse("a: 1\n    b: 2").is_err());
        assert!(parse("just words").is_err());
        assert!(parse("a: \"open").is_err());
    }
}
