//! Shared harness for the integration tests: it starts the real `cyrneld`
//! binary on a free loopback port with its own temporary data directory,
//! speaks HTTP/1.1 to it over a plain `TcpStream`, parses the JSON answers with
//! a deliberately tiny parser, and looks at the kernel's view of processes in
//! `/proc`. It knows nothing of the daemon's internals: only the binary, its
//! flags and environment variables, the HTTP contract and `/proc`.
//!
//! Waiting is always a poll with a deadline (`POLL` steps up to `DEADLINE`)
//! that panics with what it was waiting for and what it saw last; nothing here
//! sleeps to synchronise and nothing measures durations.

#![allow(dead_code)]

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long any wait may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How often a wait looks again.
pub const POLL: Duration = Duration::from_millis(10);
/// A single HTTP exchange that takes longer than this is a hang, not a slow
/// answer; it fails the test instead of blocking the suite forever.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// Path of the binary under test, built by cargo for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_cyrneld");

// ---------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Daemon
// ---------------------------------------------------------------------------

/// How to start a daemon. The defaults keep tests quick: a short kill grace.
#[derive(Clone, Debug, Default)]
pub struct DaemonOptions {
    env: Vec<(String, String)>,
    api_key: Option<String>,
    args: Vec<String>,
    data_dir: Option<PathBuf>,
    unprivileged: bool,
}

/// The uid (and gid) an unprivileged daemon runs as: `nobody`.
pub const UNPRIVILEGED: u32 = 65_534;

impl DaemonOptions {
    /// Runs the daemon as `nobody` with no capability at all (through
    /// `setpriv`, from a copy of the binary that uid may execute), the way
    /// an operator without root would: its runs get sandbox level
    /// `landlock`.
    pub fn unprivileged(mut self) -> Self {
        self.unprivileged = true;
        self
    }

    pub fn new() -> Self {
        Self::default()
    }

    /// Sets an environment variable for the daemon (overrides the harness'
    /// own defaults such as `CYRNEL_KILL_GRACE_MS`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// Configures an API key through `CYRNEL_API_KEY`; the `Daemon` helpers
    /// then send `Authorization: Bearer <key>` on every request.
    pub fn api_key(mut self, key: &str) -> Self {
        self.api_key = Some(key.to_string());
        self.env("CYRNEL_API_KEY", key)
    }

    /// Adds a command-line argument (e.g. `--config FILE`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Uses this data directory instead of a fresh temporary one (it must
    /// exist).
    pub fn data_dir(mut self, dir: &Path) -> Self {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    pub fn start(self) -> Daemon {
        Daemon::start_with(self)
    }
}

/// A running `cyrneld` owned by one test. Dropping it stops the daemon
/// (SIGTERM, then SIGKILL if it does not exit) and kills any process still
/// running in its data directory, so a failing test leaves nothing behind.
pub struct Daemon {
    /// Holds `data/` and the daemon's log files; removed on drop.
    root: tempfile::TempDir,
    data_dir: PathBuf,
    opts: DaemonOptions,
    child: Option<Child>,
    port: u16,
    /// Counts starts so that each start gets its own log file.
    generation: u32,
}

/// Returns a loopback port that was free a moment ago: the kernel hands out a
/// fresh ephemeral port, which we release for the daemon to bind.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A `Command` for the binary with every inherited `CYRNEL_*` variable
/// removed, so the developer's shell cannot change what a test sees.
pub fn base_command() -> Command {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CYRNEL_") {
            cmd.env_remove(&key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

impl Daemon {
    /// Starts a daemon with default options.
    pub fn start() -> Daemon {
        DaemonOptions::new().start()
    }

    pub fn options() -> DaemonOptions {
        DaemonOptions::new()
    }

    fn start_with(mut opts: DaemonOptions) -> Daemon {
        if !opts.env.iter().any(|(k, _)| k == "CYRNEL_SANDBOX_UID_BASE") {
            // Every daemon of this test binary gets its own block of run
            // uids (level full), so its runs can be told from another
            // daemon's by uid (`alive_of_run`).
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 64;
            let block = (std::process::id() % 60) * 64 + n;
            opts = opts.env(
                "CYRNEL_SANDBOX_UID_BASE",
                &(0x7000_0000u32 + block * 65_536).to_string(),
            );
        }
        if !opts.env.iter().any(|(k, _)| k == "CYRNEL_SHARED_DIRS") {
            fs::create_dir_all(MARKER_ROOT).expect("marker root");
            opts = opts.env("CYRNEL_SHARED_DIRS", MARKER_ROOT);
        }
        let root = tempfile::Builder::new()
            .prefix("cyrneld-test-")
            .tempdir()
            .expect("create temp dir");
        let data_dir = match &opts.data_dir {
            Some(dir) => dir.clone(),
            None => {
                let dir = root.path().join("data");
                fs::create_dir(&dir).expect("create data dir");
                dir
            }
        };
        let mut daemon = Daemon {
            root,
            data_dir,
            opts,
            child: None,
            port: 0,
            generation: 0,
        };
        daemon.spawn_and_wait_ready();
        daemon
    }

    fn log_path(&self, generation: u32) -> PathBuf {
        self.root.path().join(format!("daemon-{generation}.log"))
    }

    /// Everything the daemon wrote to stdout/stderr, over all its starts.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for generation in 1..=self.generation {
            let text = fs::read_to_string(self.log_path(generation)).unwrap_or_default();
            all.push_str(&format!("--- start #{generation} ---\n{text}"));
        }
        all
    }

    fn spawn_and_wait_ready(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.generation += 1;
        // Port 0: the kernel picks a free port at bind time and the daemon
        // logs the address it bound, so parallel tests never race for a
        // port that was free a moment ago.
        self.port = 0;
        let log = fs::File::create(self.log_path(self.generation)).expect("create log file");
        let mut cmd = if self.opts.unprivileged {
            self.unprivileged_command()
        } else {
            base_command()
        };
        cmd.env("CYRNEL_KILL_GRACE_MS", "300");
        // Tests create many processes quickly; rate limits have their own
        // tests, which set these.
        for key in [
            "CYRNEL_RATE_LIMIT_CREATE_PER_MIN",
            "CYRNEL_RATE_LIMIT_RUN_PER_MIN",
            "CYRNEL_RATE_LIMIT_KILL_PER_MIN",
        ] {
            cmd.env(key, "0");
        }
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.opts.args)
            .stdout(log.try_clone().expect("clone log handle"))
            .stderr(log);
        let child = cmd.spawn().expect("spawn cyrneld");
        self.child = Some(child);
        let log_path = self.log_path(self.generation);
        let port = poll("cyrneld to log its listening address", || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!(
                    "cyrneld exited during start-up with {status}; output:\n{}",
                    self.logs()
                );
            }
            let log = fs::read_to_string(&log_path).unwrap_or_default();
            log.split("cyrneld listening addr=127.0.0.1:")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next()?.parse::<u16>().ok())
                .ok_or_else(|| "no listening line yet".to_string())
        });
        self.port = port;
        poll("cyrneld to answer GET /health with 200", || {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().expect("try_wait") {
                panic!(
                    "cyrneld exited during start-up with {status}; output:\n{}",
                    self.logs()
                );
            }
            match try_http(port, "GET", "/health", &[], None) {
                Ok(r) if r.status == 200 => Ok(()),
                Ok(r) => Err(format!("status {}", r.status)),
                Err(e) => Err(e.to_string()),
            }
        });
    }

    /// `setpriv … cyrneld` as `nobody` without capabilities: the binary is
    /// copied where that uid can execute it (the build tree may live under
    /// a 0700 home), and the data dir is handed to it.
    fn unprivileged_command(&self) -> Command {
        use std::os::unix::fs::PermissionsExt;
        let root = self.root.path();
        fs::set_permissions(root, fs::Permissions::from_mode(0o711)).unwrap();
        let bin = root.join("cyrneld");
        if !bin.exists() {
            fs::copy(BIN, &bin).expect("copy cyrneld");
            fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::os::unix::fs::chown(&self.data_dir, Some(UNPRIVILEGED), Some(UNPRIVILEGED))
            .expect("chown data dir");
        let mut cmd = Command::new("setpriv");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("CYRNEL_") {
                cmd.env_remove(&key);
            }
        }
        let id = UNPRIVILEGED.to_string();
        cmd.args([
            &format!("--reuid={id}"),
            &format!("--regid={id}"),
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg(&bin)
        .stdin(Stdio::null());
        cmd
    }

    /// Starts the daemon again on the same data directory (and a new port),
    /// after it was stopped with `kill9` or `sigterm_and_wait`.
    pub fn restart_same_dir(&mut self) {
        if self.child.is_some() {
            self.stop_gracefully();
        }
        self.spawn_and_wait_ready();
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The block of uids this daemon's runs get at sandbox level `full`.
    pub fn uid_block(&self) -> (u32, u32) {
        let base = self
            .opts
            .env
            .iter()
            .find(|(k, _)| k == "CYRNEL_SANDBOX_UID_BASE")
            .and_then(|(_, v)| v.parse().ok())
            .expect("the harness sets a uid base");
        (base, 65_536)
    }

    /// Where this daemon makes run folders at levels `landlock` and `none`,
    /// as its start-up log line says (`runs_base=…`).
    pub fn runs_base(&self) -> Option<PathBuf> {
        let logs = self.logs();
        let at = logs.find("runs_base=")? + "runs_base=".len();
        let end = logs[at..].find([' ', '\n']).map_or(logs.len(), |e| at + e);
        Some(PathBuf::from(&logs[at..end]))
    }

    /// The daemon's OS pid; panics if it is not running.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon not running").id()
    }

    /// SIGKILLs the daemon (a crash) and reaps it.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("daemon not running");
        child.kill().expect("SIGKILL daemon");
        child.wait().expect("wait for daemon");
    }

    /// Sends SIGTERM and waits (with the deadline) for the daemon to exit.
    #[track_caller]
    pub fn sigterm_and_wait(&mut self) -> ExitStatus {
        self.send_sigterm();
        self.wait_exit()
    }

    /// SIGTERM, and asserts that the daemon exits with code 0 (the failure
    /// message carries the daemon's output).
    #[track_caller]
    pub fn stop_gracefully(&mut self) {
        let status = self.sigterm_and_wait();
        self.assert_exit_zero(status);
    }

    #[track_caller]
    pub fn assert_exit_zero(&self, status: ExitStatus) {
        assert_eq!(
            status.code(),
            Some(0),
            "cyrneld must exit 0 after SIGTERM, got {status}; its output:\n{}",
            self.logs()
        );
    }

    /// Sends SIGTERM to the daemon without waiting.
    pub fn send_sigterm(&self) {
        send_signal("TERM", self.pid() as i32);
    }

    /// Waits (with the deadline) for the daemon to exit and reaps it.
    #[track_caller]
    pub fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("daemon not running");
        let status = poll("cyrneld to exit", || {
            match child.try_wait().expect("try_wait") {
                Some(status) => Ok(status),
                None => Err("still running".to_string()),
            }
        });
        self.child = None;
        status
    }

    /// Whether the daemon process has exited (and reaps it if so).
    pub fn has_exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().expect("try_wait");
        if status.is_some() {
            self.child = None;
        }
        status
    }

    // -- HTTP -------------------------------------------------------------

    fn auth_headers(&self) -> Vec<(String, String)> {
        match &self.opts.api_key {
            Some(key) => vec![("Authorization".to_string(), format!("Bearer {key}"))],
            None => Vec::new(),
        }
    }

    /// A raw request: exactly the given headers, no Authorization added.
    #[track_caller]
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Response {
        http(self.port, method, path, headers, body)
    }

    /// A request with the configured API key (if any) added.
    #[track_caller]
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Response {
        let auth = self.auth_headers();
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        http(self.port, method, path, &headers, body)
    }

    /// Like `request`, but returns an I/O error instead of panicking (for
    /// polling a daemon that may be going away).
    pub fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        let auth = self.auth_headers();
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        try_http(self.port, method, path, &headers, body)
    }

    #[track_caller]
    pub fn get(&self, path: &str) -> Response {
        self.request("GET", path, None)
    }

    /// POST with a body; the body is sent as given (it need not be valid JSON).
    #[track_caller]
    pub fn post(&self, path: &str, body: &str) -> Response {
        self.request("POST", path, Some(body.as_bytes()))
    }

    /// POST without any body.
    #[track_caller]
    pub fn post_no_body(&self, path: &str) -> Response {
        self.request("POST", path, None)
    }

    #[track_caller]
    pub fn delete(&self, path: &str) -> Response {
        self.request("DELETE", path, None)
    }

    // -- Processes API helpers ----------------------------------------------

    /// POST /processes with `body`; asserts 201 `{"id": N}` and returns N.
    #[track_caller]
    pub fn create(&self, body: &str) -> i64 {
        let r = self.post("/processes", body);
        assert_eq!(r.status, 201, "create {body}: {r}");
        let j = r.json();
        let obj = j
            .as_object()
            .unwrap_or_else(|| panic!("create answer not an object: {r}"));
        assert_eq!(
            obj.len(),
            1,
            "create answer must be exactly {{\"id\": N}}: {r}"
        );
        let id = j["id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no integer id: {r}"));
        assert!(id >= 1, "id must be >= 1: {r}");
        id
    }

    /// Creates a process running `code` with the default options.
    #[track_caller]
    pub fn create_code(&self, code: &str) -> i64 {
        self.create(&format!(r#"{{"code":{}}}"#, js(code)))
    }

    /// Creates a process running `code`; `extra` is appended to the body
    /// object verbatim, e.g. `"autorun":false,"options":{"timeout":200}`.
    #[track_caller]
    pub fn create_with(&self, code: &str, extra: &str) -> i64 {
        self.create(&format!(r#"{{"code":{},{extra}}}"#, js(code)))
    }

    /// GET /processes/{id}; asserts 200 and returns the record.
    #[track_caller]
    pub fn record(&self, id: i64) -> Json {
        let r = self.get(&format!("/processes/{id}"));
        assert_eq!(r.status, 200, "GET /processes/{id}: {r}");
        r.json()
    }

    /// Polls the record until its `state` is `state`; returns that record.
    #[track_caller]
    pub fn wait_for_state(&self, id: i64, state: &str) -> Json {
        poll(&format!("process {id} to be {state}"), || {
            let rec = self.record(id);
            if rec["state"].as_str() == Some(state) {
                Ok(rec)
            } else {
                Err(rec.to_string())
            }
        })
    }

    #[track_caller]
    pub fn wait_idle(&self, id: i64) -> Json {
        self.wait_for_state(id, "idle")
    }

    /// Waits until the process is running with a pid, and returns the pid.
    #[track_caller]
    pub fn wait_running_pid(&self, id: i64) -> i32 {
        poll(&format!("process {id} to be running with a pid"), || {
            let rec = self.record(id);
            match (rec["state"].as_str(), rec["pid"].as_i64()) {
                (Some("running"), Some(pid)) => Ok(pid as i32),
                _ => Err(rec.to_string()),
            }
        })
    }

    #[track_caller]
    pub fn kill(&self, id: i64) -> Response {
        self.post_no_body(&format!("/processes/{id}/signals/kill"))
    }

    #[track_caller]
    pub fn run(&self, id: i64, body: &str) -> Response {
        self.post(&format!("/processes/{id}/signals/run"), body)
    }

    /// GET /processes/{id}/{what} (stdout, stderr, output, code).
    #[track_caller]
    pub fn sub(&self, id: i64, what: &str) -> Response {
        self.get(&format!("/processes/{id}/{what}"))
    }

    /// GET /processes/{id}/{what}, asserting 200.
    #[track_caller]
    fn sub_ok(&self, id: i64, what: &str) -> Response {
        let r = self.sub(id, what);
        assert_eq!(r.status, 200, "{what} of {id}: {r}");
        r
    }

    /// The stdout of an idle process, asserting 200.
    #[track_caller]
    pub fn stdout_text(&self, id: i64) -> String {
        self.sub_ok(id, "stdout").text()
    }

    #[track_caller]
    pub fn stderr_text(&self, id: i64) -> String {
        self.sub_ok(id, "stderr").text()
    }

    #[track_caller]
    pub fn output_json(&self, id: i64) -> Json {
        self.sub_ok(id, "output").json()
    }

    /// GET /processes?{query}; asserts 200 and returns the whole body.
    #[track_caller]
    pub fn list(&self, query: &str) -> Json {
        let path = if query.is_empty() {
            "/processes".to_string()
        } else {
            format!("/processes?{query}")
        };
        let r = self.get(&path);
        assert_eq!(r.status, 200, "GET {path}: {r}");
        let j = r.json();
        assert!(
            j["processes"].as_array().is_some(),
            "GET {path}: no processes array: {r}"
        );
        j
    }

    /// The ids returned by GET /processes?{query}, in answer order.
    #[track_caller]
    pub fn list_ids(&self, query: &str) -> Vec<i64> {
        ids_of(&self.list(query))
    }

    /// Opens a streaming GET (e.g. `?follow=true`) and reads until the decoded
    /// body contains `needle`; returns the open stream to continue reading.
    #[track_caller]
    pub fn follow_until(&self, path: &str, needle: &str) -> FollowStream {
        let auth = self.auth_headers();
        let headers: Vec<(&str, &str)> =
            auth.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut stream = FollowStream::open(self.port, path, &headers);
        if stream.status != 200 {
            let body = stream.read_to_end();
            panic!(
                "GET {path}: expected a 200 stream, got {} {:?}",
                stream.status,
                String::from_utf8_lossy(&body)
            );
        }
        stream.read_until_contains(needle);
        stream
    }

    fn stop_quietly(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        send_signal("TERM", child.id() as i32);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            sleep(POLL);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills (SIGKILL) every process whose working directory lies in this
    /// daemon's temp dir: the children a crashed or killed daemon left behind.
    fn kill_leftovers(&self) {
        let root = self.root.path().to_string_lossy().to_string();
        let Ok(entries) = fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if let Ok(cwd) = fs::read_link(format!("/proc/{pid}/cwd")) {
                if cwd.to_string_lossy().starts_with(&root) {
                    send_signal("KILL", pid);
                }
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop_quietly();
        self.kill_leftovers();
    }
}

/// Sends `signal` (a name such as `TERM`, `KILL`) to `pid` with kill(1);
/// a negative pid addresses a process group.
pub fn send_signal(signal: &str, pid: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Runs the binary with `args` and `env` (no harness defaults), expecting it to
/// exit by itself; returns its exit status and combined stdout+stderr. A
/// daemon that keeps running past the deadline fails the test.
#[track_caller]
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_path = dir.path().join("out.log");
    let out = fs::File::create(&out_path).expect("create out.log");
    let mut cmd = base_command();
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .args(args)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("spawn cyrneld");
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "cyrneld {args:?} with env {env:?} was expected to exit but was still running \
                 after {DEADLINE:?}; output:\n{}",
                fs::read_to_string(&out_path).unwrap_or_default()
            );
        }
        sleep(POLL);
    };
    (status, fs::read_to_string(&out_path).unwrap_or_default())
}

// ---------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------

/// State letter and process group of `pid` from /proc/N/stat. The command
/// name may contain spaces and parentheses, so fields are read after the
/// last ')': state, ppid, pgrp, ...
pub fn proc_stat(pid: i32) -> Option<(char, i32)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// A process exists and is not a zombie (nor dead-being-reaped).
pub fn is_alive(pid: i32) -> bool {
    matches!(proc_stat(pid), Some((state, _)) if state != 'Z' && state != 'X')
}

/// Zombies whose parent is `pid`.
pub fn zombies_of(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid: u32 = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        if state == "Z" && ppid == pid {
            out.push(p);
        }
    }
    out
}

/// Waits until no zombie is left under `pid` (the daemon reaps orphans
/// reparented to it as they exit, on its main thread).
#[track_caller]
pub fn assert_no_zombies_under(pid: u32) {
    poll(
        &format!("no zombies under the daemon ({pid})"),
        || match zombies_of(pid) {
            z if z.is_empty() => Ok(()),
            z => Err(format!("zombies {z:?}")),
        },
    );
}

/// Live (non-zombie) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    let mut members = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return members;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((state, pgrp)) = proc_stat(pid) {
            if pgrp == pgid && state != 'Z' && state != 'X' {
                members.push(pid);
            }
        }
    }
    members.sort_unstable();
    members
}

/// Describes pids for failure messages: "pid (comm)".
pub fn describe(pids: &[i32]) -> String {
    pids.iter()
        .map(|p| {
            let comm = fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            format!("{p} ({})", comm.trim())
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Polls until no live process remains in group `pgid`.
#[track_caller]
pub fn wait_group_gone(pgid: i32) {
    poll(&format!("process group {pgid} to be gone"), || {
        let members = group_members(pgid);
        if members.is_empty() {
            Ok(())
        } else {
            Err(describe(&members))
        }
    })
}

/// Asserts, without waiting, that no live process is in group `pgid`.
#[track_caller]
pub fn assert_group_gone(pgid: i32) {
    let members = group_members(pgid);
    assert!(
        members.is_empty(),
        "process group {pgid} still has live members: {}",
        describe(&members)
    );
}

/// Polls until group `pgid` has at least `n` live members; returns them.
#[track_caller]
pub fn wait_group_size(pgid: i32, n: usize) -> Vec<i32> {
    poll(
        &format!("process group {pgid} to have {n} live members"),
        || {
            let members = group_members(pgid);
            if members.len() >= n {
                Ok(members)
            } else {
                Err(describe(&members))
            }
        },
    )
}

// ---------------------------------------------------------------------------
// HTTP/1.1 client
// ---------------------------------------------------------------------------

/// One HTTP response, body already de-chunked.
#[derive(Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    #[track_caller]
    pub fn text(&self) -> String {
        String::from_utf8(self.body.clone())
            .unwrap_or_else(|_| panic!("body is not UTF-8: {:?}", self.body))
    }

    #[track_caller]
    pub fn json(&self) -> Json {
        let text = self.text();
        parse_json(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {self}"))
    }

    /// Asserts `status` and the error body `{"error": message}` served as JSON.
    #[track_caller]
    pub fn assert_error(&self, status: u16, message: &str) {
        assert_eq!(
            self.status, status,
            "expected {status} {message:?}, got: {self}"
        );
        self.assert_json_content_type();
        let j = self.json();
        let expected = serde_json::json!({ "error": message });
        assert_eq!(j, expected, "error body mismatch; response: {self}");
    }

    #[track_caller]
    pub fn assert_json_content_type(&self) {
        let ct = self.header("content-type").unwrap_or("");
        assert!(
            ct.to_ascii_lowercase().starts_with("application/json"),
            "content-type must be application/json: {self}"
        );
    }

    #[track_caller]
    pub fn assert_text_content_type(&self) {
        let ct = self.header("content-type").unwrap_or("");
        assert_eq!(
            ct.to_ascii_lowercase().replace(' ', ""),
            "text/plain;charset=utf-8",
            "content-type must be text/plain; charset=utf-8: {self}"
        );
    }

    /// The `Allow` header as a sorted list of methods.
    pub fn allow(&self) -> Vec<String> {
        let mut methods: Vec<String> = self
            .header("allow")
            .unwrap_or("")
            .split(',')
            .map(|m| m.trim().to_ascii_uppercase())
            .filter(|m| !m.is_empty())
            .collect();
        methods.sort();
        methods
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = String::from_utf8_lossy(&self.body);
        let body: String = if body.chars().count() > 2000 {
            let head: String = body.chars().take(2000).collect();
            format!("{head}… ({} bytes)", self.body.len())
        } else {
            body.to_string()
        };
        write!(f, "HTTP {} {:?} body={body:?}", self.status, self.headers)
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Sends one request and panics on any I/O error.
#[track_caller]
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    try_http(port, method, path, headers, body)
        .unwrap_or_else(|e| panic!("{method} {path} on 127.0.0.1:{port} failed: {e}"))
}

fn build_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    if let Some(b) = body {
        bytes.extend_from_slice(b);
    }
    bytes
}

/// Sends one request on a fresh connection (`Connection: close`) and reads
/// the response: by Content-Length, by chunked framing, or to EOF.
pub fn try_http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> io::Result<Response> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let request = build_request(port, method, path, headers, body);
    // A server may answer (e.g. 413) and close before reading the whole body;
    // the answer is still there to read, so a failed write is not the end.
    if let Err(e) = stream.write_all(&request) {
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ) {
            return Err(e);
        }
    }
    let mut raw = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        if let Some(resp) = parse_response(&raw, false)? {
            return Ok(resp);
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset && !raw.is_empty() => break,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("{e} (after {} bytes of response)", raw.len()),
                ))
            }
        }
    }
    match parse_response(&raw, true)? {
        Some(resp) => Ok(resp),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "connection closed before a complete response; got {:?}",
                String::from_utf8_lossy(&raw)
            ),
        )),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Status, headers, and the offset where the body starts.
type Head = (u16, Vec<(String, String)>, usize);

/// Parses the status line and headers, once they are all in `raw`.
fn parse_head(raw: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = find(raw, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(bad(format!("bad status line {status_line:?}")));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    Ok(Some((status, headers, end + 4)))
}

fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    header_of(headers, "transfer-encoding")
        .map(|v| v.to_ascii_lowercase().contains("chunked"))
        .unwrap_or(false)
}

/// Returns a complete response if `raw` holds one (or, at `eof`, whatever a
/// close-delimited body holds).
fn parse_response(raw: &[u8], eof: bool) -> io::Result<Option<Response>> {
    let Some((status, headers, start)) = parse_head(raw)? else {
        return Ok(None);
    };
    let rest = &raw[start..];
    let body = if is_chunked(&headers) {
        match decode_chunked(rest)? {
            (body, true) => body,
            (_, false) => return Ok(None),
        }
    } else if let Some(len) = header_of(&headers, "content-length") {
        let len: usize = len
            .parse()
            .map_err(|_| bad(format!("bad content-length {len:?}")))?;
        if rest.len() < len {
            if eof {
                return Err(bad(format!(
                    "body truncated: {} of {len} bytes",
                    rest.len()
                )));
            }
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Response {
        status,
        headers,
        body,
    }))
}

/// Decodes as many complete chunks as `raw` holds. Returns the decoded bytes
/// and whether the terminating zero-size chunk (and trailers) was seen.
fn decode_chunked(raw: &[u8]) -> io::Result<(Vec<u8>, bool)> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_end) = find(&raw[pos..], b"\r\n") else {
            return Ok((body, false));
        };
        let size_line = String::from_utf8_lossy(&raw[pos..pos + line_end]).to_string();
        let size_hex = size_line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_hex, 16)
            .map_err(|_| bad(format!("bad chunk size line {size_line:?}")))?;
        pos += line_end + 2;
        if size == 0 {
            // Trailers, each ending in CRLF, then an empty line.
            loop {
                let Some(end) = find(&raw[pos..], b"\r\n") else {
                    return Ok((body, false));
                };
                pos += end + 2;
                if end == 0 {
                    return Ok((body, true));
                }
            }
        }
        if raw.len() < pos + size + 2 {
            return Ok((body, false));
        }
        body.extend_from_slice(&raw[pos..pos + size]);
        if &raw[pos + size..pos + size + 2] != b"\r\n" {
            return Err(bad("chunk not followed by CRLF".to_string()));
        }
        pos += size + 2;
    }
}

/// A streaming response (e.g. `/stdout?follow=true`) read incrementally.
pub struct FollowStream {
    stream: TcpStream,
    raw: Vec<u8>,
    pub status: u16,
    pub headers: Vec<(String, String)>,
}

impl FollowStream {
    /// Opens a streamed GET and waits (with the deadline) for its head.
    #[track_caller]
    pub fn open(port: u16, path: &str, headers: &[(&str, &str)]) -> FollowStream {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        stream
            .set_read_timeout(Some(POLL))
            .expect("set_read_timeout");
        stream
            .write_all(&build_request(port, "GET", path, headers, None))
            .expect("write request");
        let mut s = FollowStream {
            stream,
            raw: Vec::new(),
            status: 0,
            headers: Vec::new(),
        };
        let what = format!("response head of GET {path}");
        let (status, headers) = poll(&what, || {
            s.read_some();
            match parse_head(&s.raw).expect("parse head") {
                Some((status, headers, _)) => Ok((status, headers)),
                None => Err(String::from_utf8_lossy(&s.raw).to_string()),
            }
        });
        s.status = status;
        s.headers = headers;
        s
    }

    /// Reads whatever is available now (up to 1 MiB); returns false at
    /// EOF.
    fn read_some(&mut self) -> bool {
        let mut buf = [0u8; 65536];
        for _ in 0..16 {
            match self.stream.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.raw.extend_from_slice(&buf[..n]),
                Err(e) => return self.read_error(e),
            }
        }
        true
    }

    /// A read that found nothing yet (timeout) keeps the stream open; any
    /// other error fails the test.
    fn read_error(&self, e: io::Error) -> bool {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => {
                true
            }
            _ => panic!("reading streamed response: {e}"),
        }
    }

    /// The body decoded so far, and whether it is complete.
    pub fn body(&self) -> (Vec<u8>, bool) {
        let (_, headers, start) = parse_head(&self.raw)
            .expect("parse head")
            .expect("head complete");
        let rest = &self.raw[start..];
        if is_chunked(&headers) {
            decode_chunked(rest).expect("decode chunked")
        } else {
            (rest.to_vec(), false)
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header_of(&self.headers, name)
    }

    #[track_caller]
    pub fn read_until_contains(&mut self, needle: &str) {
        self.read_until(&format!("streamed body to contain {needle:?}"), |body| {
            find(body, needle.as_bytes()).map(|_| ())
        })
    }

    /// Reads until `f` finds what it wants in the body decoded so far
    /// (panics if the stream ends first).
    #[track_caller]
    pub fn read_until<T>(&mut self, what: &str, mut f: impl FnMut(&[u8]) -> Option<T>) -> T {
        poll(what, || {
            let open = self.read_some();
            let (body, done) = self.body();
            if let Some(t) = f(&body) {
                Ok(t)
            } else if done || !open {
                panic!(
                    "stream ended before {what}; body: {:?}",
                    String::from_utf8_lossy(&body)
                )
            } else {
                Err(String::from_utf8_lossy(&body).to_string())
            }
        })
    }

    /// Reads until the response is complete (terminating chunk or EOF);
    /// returns the whole decoded body.
    #[track_caller]
    pub fn read_to_end(&mut self) -> Vec<u8> {
        poll("streamed response to end", || {
            let open = self.read_some();
            let (body, done) = self.body();
            if done || !open {
                Ok(body)
            } else {
                Err(String::from_utf8_lossy(&body).to_string())
            }
        })
    }
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// Small helpers for tests
// ---------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------
// A run's processes, wherever they went
// ---------------------------------------------------------------------------

/// Every live process of run `id` of daemon `d`: its environment carries
/// `CYRNEL_PROCESS_ID=<id>` (a process may change its group, session or
/// parent, not its inherited environment), and it is this daemon's: at
/// sandbox level `full` its uid is in the daemon's block; otherwise its
/// `CYRNEL_OUTPUT` lies in the daemon's run folder base.
pub fn alive_of_run(d: &Daemon, id: i64) -> Vec<i32> {
    use std::os::unix::fs::MetadataExt;
    let tag = format!("CYRNEL_PROCESS_ID={id}");
    let (base, count) = d.uid_block();
    let output = d
        .runs_base()
        .map(|b| format!("CYRNEL_OUTPUT={}/{id}/output", b.display()));
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let (Ok(env), Ok(meta)) = (
            fs::read(format!("/proc/{pid}/environ")),
            fs::metadata(format!("/proc/{pid}")),
        ) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let ours = (meta.uid() >= base && meta.uid() - base < count)
            || output
                .as_ref()
                .is_some_and(|o| vars.contains(&o.as_bytes()));
        if ours
            && vars.contains(&tag.as_bytes())
            && proc_stat(pid).is_some_and(|(state, _)| state != 'Z')
        {
            out.push(pid);
        }
    }
    out
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
