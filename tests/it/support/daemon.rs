//! The daemon under test: started from the built binary with its own data
//! dir, stopped and signalled; plain process helpers beside it.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::*;

/// How to start a daemon. The defaults keep tests quick: a short kill grace.
#[derive(Clone, Debug, Default)]
pub struct DaemonOptions {
    env: Vec<(String, String)>,
    api_key: Option<String>,
    args: Vec<String>,
    data_dir: Option<PathBuf>,
    unprivileged: bool,
    own_binary: bool,
    /// Install this binary as the daemon's own copy instead of the one
    /// under test (an older release).
    binary_from: Option<PathBuf>,
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

    /// Runs the daemon from its own copy of the binary (`Daemon::binary`),
    /// which a test may replace or remove: a handover executes what is
    /// there.
    pub fn own_binary(mut self) -> Self {
        self.own_binary = true;
        self
    }

    /// `own_binary`, starting from a copy of `bin` (e.g. the previous
    /// release).
    pub fn own_binary_from(mut self, bin: &Path) -> Self {
        self.own_binary = true;
        self.binary_from = Some(bin.to_path_buf());
        self
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
    command_for(Path::new(BIN))
}

/// `base_command` for another copy of the binary.
pub fn command_for(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
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

    fn start_with(opts: DaemonOptions) -> Daemon {
        let mut daemon = Daemon::prepare(opts);
        daemon.spawn_and_wait_ready();
        daemon
    }

    /// A daemon ready to start but not started: the harness' defaults
    /// applied to `opts`, its temp dir and data dir made. `manager.rs`
    /// starts it under the service-manager stand-in instead.
    pub(super) fn prepare(mut opts: DaemonOptions) -> Daemon {
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
        Daemon {
            root,
            data_dir,
            opts,
            child: None,
            port: 0,
            generation: 0,
        }
    }

    /// The command that starts this daemon (binary, arguments and
    /// environment, not its stdio): `--listen 127.0.0.1:0`, its data dir,
    /// the harness' environment.
    pub(super) fn command(&self) -> Command {
        let mut cmd = if self.opts.unprivileged {
            self.unprivileged_command()
        } else if self.opts.own_binary {
            let bin = self.binary();
            if !bin.exists() {
                match &self.opts.binary_from {
                    Some(from) => install_binary_from(from, &bin),
                    None => install_binary(&bin),
                }
            }
            command_for(&bin)
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
            .args(&self.opts.args);
        cmd
    }

    /// For a daemon that another process started (the stand-in): its log
    /// file from now on, counted as a start for `logs()`.
    pub(super) fn next_log_path(&mut self) -> PathBuf {
        self.generation += 1;
        self.log_path(self.generation)
    }

    /// For a daemon that another process started: where it listens now.
    pub(super) fn set_port(&mut self, port: u16) {
        self.port = port;
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
        let mut cmd = self.command();
        cmd.stdout(log.try_clone().expect("clone log handle"))
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
            listening_port(&fs::read_to_string(&log_path).unwrap_or_default())
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
            health(port)
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
            install_binary(&bin);
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

    /// The daemon's own copy of the binary (`DaemonOptions::own_binary`).
    pub fn binary(&self) -> PathBuf {
        self.root.path().join("cyrneld")
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

/// The port in the last line of `log` where the daemon says where it
/// listens (a log may hold several starts).
pub(super) fn listening_port(log: &str) -> Option<u16> {
    const LISTENING: &str = "cyrneld listening addr=127.0.0.1:";
    let at = log.rfind(LISTENING)? + LISTENING.len();
    log[at..].split_whitespace().next()?.parse().ok()
}

/// Whether the daemon on `port` answers `GET /health` with 200 (else why
/// not), for `poll`.
pub(super) fn health(port: u16) -> Result<(), String> {
    match try_http(port, "GET", "/health", &[], None) {
        Ok(r) if r.status == 200 => Ok(()),
        Ok(r) => Err(format!("status {}", r.status)),
        Err(e) => Err(e.to_string()),
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

/// Waits until the daemon's log contains `needle` `n` times or more (each
/// reload logs one line, so this is how a test knows a reload was handled).
#[track_caller]
pub fn wait_log_count(d: &Daemon, needle: &str, n: usize) {
    poll(&format!("{n} × {needle:?} in the daemon's log"), || {
        let logs = d.logs();
        if logs.matches(needle).count() >= n {
            Ok(())
        } else {
            Err(logs)
        }
    })
}

/// Copies the binary under test to `to` (0755, a new file: a running
/// daemon's image is never written to).
pub fn install_binary(to: &Path) {
    install_binary_from(Path::new(BIN), to);
}

/// `install_binary` of another build.
pub fn install_binary_from(from: &Path, to: &Path) {
    // Copied by a child process, not by this one: a copy's write
    // descriptor held here would be inherited by whatever another test
    // thread forks meanwhile, and exec of the copy would then fail with
    // "Text file busy" (seen once under the full suite).
    let st = Command::new("install")
        .args(["-m", "0755"])
        .arg(from)
        .arg(to)
        .status()
        .expect("run install");
    assert!(
        st.success(),
        "install {} {}: {st}",
        from.display(),
        to.display()
    );
}
