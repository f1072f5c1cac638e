//! The structured-output protocol of a run: every line a process appends to
//! the file named by `CYRNEL_OUTPUT` is a JSON object, shallow-merged in
//! order (later keys win). This is a protocol between cyrneld and the code
//! it runs, not the HTTP API; it yields the merged object as JSON bytes for
//! the store.

use std::io::BufRead;

use crate::supervisor::machine::OutputOutcome;

/// Merges the output file's bytes (`None`: no file). Blank lines are
/// skipped; an empty file means no output. More than `max_bytes` (the
/// reader takes at most one byte more) is refused.
pub fn parse_output(bytes: Option<&[u8]>, max_bytes: u64) -> OutputOutcome {
    match bytes {
        None => OutputOutcome::None,
        Some(b) if b.len() as u64 > max_bytes => {
            OutputOutcome::Invalid(format!("Invalid output: more than {max_bytes} bytes."))
        }
        Some(b) => parse_lines(b),
    }
}

fn parse_lines(reader: impl BufRead) -> OutputOutcome {
    let mut merged = serde_json::Map::new();
    let mut any = false;
    for (n, line) in reader.split(b'\n').enumerate() {
        let line = match line {
            Ok(l) => l,
            Err(e) => return OutputOutcome::Invalid(format!("Invalid output: {e}.")),
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(&line) {
            Ok(serde_json::Value::Object(obj)) => {
                any = true;
                merged.extend(obj);
            }
            _ => {
                return OutputOutcome::Invalid(format!(
                    "Invalid output: line {} is not a JSON object.",
                    n + 1
                ))
            }
        }
    }
    if !any {
        return OutputOutcome::None;
    }
    OutputOutcome::Object(serde_json::to_vec(&merged).expect("a JSON map serialises"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> OutputOutcome {
        parse_lines(s.as_bytes())
    }

    #[test]
    fn merges_shallowly_later_keys_win() {
        assert_eq!(
            parse("{\"a\":1,\"b\":{\"x\":1}}\n\n{\"b\":{\"y\":2},\"c\":null}\n"),
            OutputOutcome::Object(br#"{"a":1,"b":{"y":2},"c":null}"#.to_vec())
        );
    }

    #[test]
    fn non_objects_fail_with_their_line_number() {
        assert_eq!(
            parse("{\"a\":1}\n\n[1]\n"),
            OutputOutcome::Invalid("Invalid output: line 3 is not a JSON object.".into())
        );
        assert_eq!(
            parse("not json"),
            OutputOutcome::Invalid("Invalid output: line 1 is not a JSON object.".into())
        );
    }

    #[test]
    fn nothing_emitted_is_no_output() {
        assert_eq!(parse(""), OutputOutcome::None);
        assert_eq!(parse("\n  \n"), OutputOutcome::None);
        assert_eq!(parse_output(None, 10), OutputOutcome::None);
    }

    #[test]
    fn oversized_file_is_refused() {
        let bytes = b"{\"a\":\"0123456789\"}\n";
        assert_eq!(
            parse_output(Some(bytes), 5),
            OutputOutcome::Invalid("Invalid output: more than 5 bytes.".into())
        );
        assert!(matches!(
            parse_output(Some(bytes), 1000),
            OutputOutcome::Object(_)
        ));
    }
}
