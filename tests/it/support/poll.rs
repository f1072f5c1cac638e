//! Waiting: a poll with a deadline that says what it saw last.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long any wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How often a wait looks again.
pub const POLL: Duration = Duration::from_millis(10);
/// A single HTTP exchange that takes longer than this is a hang, not a slow
/// answer; it fails the test instead of blocking the suite forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of the binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_cyrneld");

/// Calls `f` every `POLL` until it returns `Ok`, and panics once `DEADLINE`
/// has passed. `Err` carries a description of the last observation so that a
/// timeout says what was actually seen.
#[track_caller]
pub fn poll<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {DEADLINE:?} waiting for {what}; last seen: {last}");
                }
            }
        }
        sleep(POLL);
    }
}

/// Waits until `path` exists (scripts write marker files to say "I am ready").
#[track_caller]
pub fn wait_for_file(path: &Path) {
    poll(&format!("file {}", path.display()), || {
        if path.exists() {
            Ok(())
        } else {
            Err("absent".to_string())
        }
    })
}
