//! The structured-output protocol of a run: every line a process appends to
//! the file named by `CYRNEL_OUTPUT` is a JSON object, shallow-merged in
//! order (later keys win). This is a protocol between cyrneld and the code
//! it runs, not the HTTP API; it yields the merged object as JSON bytes for
//! the store.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::supervisor::machine::OutputOutcome;

/// Reads and merges the output file. Blank lines are skipped; a missing or
/// empty file means no output. A file larger than `max_bytes` is refused
/// rather than read into memory.
pub fn read_output_file(path: &Path, max_bytes: u64) -> OutputOutcome {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(_) => return OutputOutcome::None,
    };
    match file.metadata() {
        Ok(m) if m.len() > max_bytes => {
            return OutputOutcome::Invalid(format!("Invalid output: more than {max_bytes} bytes."))
        }
        Err(e) => return OutputOutcome::Invalid(format!("Invalid output: {e}.")),
        _ => {}
    }
    // The file may still grow if an escaped process writes to it: never
    // read more than the limit.
    parse_lines(BufReader::new(file.take(max_bytes)))
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
        assert_eq!(
            read_output_file(Path::new("/nonexistent/x"), 10),
            OutputOutcome::None
        );
    }

    #[test]
    fn oversized_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        std::fs::write(&p, "{\"a\":\"0123456789\"}\n").unwrap();
        assert_eq!(
            read_output_file(&p, 5),
            OutputOutcome::Invalid("Invalid output: more than 5 bytes.".into())
        );
        assert!(matches!(
            read_output_file(&p, 1000),
            OutputOutcome::Object(_)
        ));
    }
}
