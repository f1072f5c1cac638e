//! Shared harness for the integration tests: it starts the real `cyrneld`
//! binary on a loopback port the daemon picks (port 0; the harness reads the
//! bound address from its log) with its own temporary data directory,
//! speaks HTTP/1.1 to it over a plain `TcpStream`, parses the JSON answers
//! with serde_json, and looks at the kernel's view of processes in `/proc`. It knows nothing of the daemon's internals: only the binary, its
//! flags and environment variables, the HTTP contract and `/proc`.
//!
//! `manager` runs a daemon under `manager.py`, a stand-in for systemd's
//! service manager (notify socket, fd store, restarts), for the tests of
//! what the daemon does under systemd.
//!
//! Waiting is always a poll with a deadline (`POLL` steps up to `DEADLINE`)
//! that panics with what it was waiting for and what it saw last; nothing here
//! sleeps to synchronise and nothing measures durations.

mod daemon;
mod http;
mod manager;
mod misc;
mod poll;
mod procs;

pub use daemon::*;
pub use http::*;
pub use manager::*;
pub use misc::*;
pub use poll::*;
pub use procs::*;
