//! JSON and small helpers for tests.

use std::fs;
use std::path::Path;

/// A parsed JSON value: serde_json's, as the daemon's own wire types use.
pub type Json = serde_json::Value;

/// Parses JSON text.
pub fn parse_json(text: &str) -> Result<Json, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// Parses a JSON literal written in a test.
pub fn json(text: &str) -> Json {
    parse_json(text).unwrap_or_else(|e| panic!("bad JSON literal {text:?}: {e}"))
}

/// Encodes `s` as a JSON string literal (with quotes).
pub fn js(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// The ids of a `{"processes": [...]}` answer, in order.
#[track_caller]
pub fn ids_of(list: &Json) -> Vec<i64> {
    list["processes"]
        .as_array()
        .unwrap_or_else(|| panic!("no processes array in {list}"))
        .iter()
        .map(|p| {
            p["id"]
                .as_i64()
                .unwrap_or_else(|| panic!("record without id: {p}"))
        })
        .collect()
}

/// Asserts that `ts` looks like `2026-11-27T12:00:00.000Z`.
#[track_caller]
pub fn assert_timestamp(ts: &Json, what: &str) {
    let s = ts
        .as_str()
        .unwrap_or_else(|| panic!("{what} must be a timestamp string, got {ts}"));
    let b = s.as_bytes();
    let shape_ok = b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        });
    assert!(
        shape_ok,
        "{what} is not ISO-8601 UTC with milliseconds: {s:?}"
    );
}

/// A directory the test owns for marker files its scripts write or wait for.
pub fn marker_dir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(MARKER_ROOT).expect("marker root");
    fs::set_permissions(MARKER_ROOT, fs::Permissions::from_mode(0o1777)).expect("chmod");
    let dir = tempfile::Builder::new()
        .prefix("cyrneld-markers-")
        .tempdir_in(MARKER_ROOT)
        .expect("marker dir");
    // Runs have uids of their own (level full) or nobody's (landlock).
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777)).expect("chmod");
    dir
}

/// Where marker files live: a directory every test daemon shares with its
/// runs (`shared_dirs`), since a sandboxed run can write nowhere else on
/// the host. Not under /tmp: runs get a /tmp of their own.
pub const MARKER_ROOT: &str = "/var/tmp/cyrneld-test-markers";

/// Shell-quotes a path for embedding in a script.
pub fn sq(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// A tiny deterministic generator, so "random" choices (crash points,
/// disconnect points) are the same on every run.
pub struct Lcg(pub u64);

impl Lcg {
    /// A number in `0..n`.
    pub fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// `out 0` … `out n-1`, each line exactly once and in order; how many.
#[track_caller]
pub fn assert_numbered(text: &str, prefix: &str) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(*l, format!("{prefix} {i}"), "line {i} of {text:?}");
    }
    lines.len()
}
