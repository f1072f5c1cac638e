//! Benchmark harness for `cyrneld` (`make bench`, i.e. `cargo bench --bench bench`).
//!
//! It starts the release daemon on temporary data directories with rate
//! limits off, drives it over keep-alive HTTP/1.1 connections (hyper's client
//! connection API) and the `/events` stream, measures baselines in the same
//! run (a tight spawn loop, a minimal hyper server, raw `fdatasync`), and
//! prints one Markdown table on stdout plus `target/bench/results.json`.
//! Every step reports progress on stderr.
//!
//! It knows only what an operator knows: the binary, its flags, `CYRNEL_*`
//! settings, the HTTP contract and `/proc`. Latencies are taken from the
//! client's side: the send time of a request and the receive time of the
//! event that shows its effect on an open `/events` stream.
//!
//! Knobs (environment variables, all optional):
//! `BENCH_ONLY` (comma list of `spawn,latency,read,durable,memory,scale,steps,churn,reclaim,soak`;
//! `soak` runs only when named: `make soak`), `BENCH_RECLAIM_RECORDS` (2000),
//! `BENCH_SOAK_SECS` (900), `BENCH_SOAK_CLIENTS` (12), `BENCH_SOAK_MEMORY_BYTES`
//! (the daemon's `storage_memory_bytes`; default: its default),
//! `BENCH_SPAWN_RUNS` (2000), `BENCH_SPAWN_CLIENTS` (16), `BENCH_SPAWN_ROUNDS` (3),
//! `BENCH_LATENCY_SAMPLES` (500), `BENCH_KILL_GRACE_MS` (50),
//! `BENCH_READ_CONNS` (64), `BENCH_READ_SECS` (5),
//! `BENCH_DURABLE_CLIENTS` (64), `BENCH_DURABLE_SECS` (5),
//! `BENCH_MEMORY_PROCS` (1000), `BENCH_SCALE_RECORDS` (see `DEFAULT_SCALE_RECORDS`),
//! `BENCH_SCALE_CLIENTS` (64), `BENCH_SCALE_RAN` (100000: how many of the
//! scale records are runs of `true` that ran), `BENCH_STEP_SPAWNS` (500),
//! `BENCH_CHURN_RUNS` (100000), `CYRNELD_BIN` (daemon binary to use),
//! `BENCH_RESULTS` (path of the JSON file, default `target/bench/results.json`
//! under the package), `BENCH_KEEP` (keep the data dirs and daemon logs),
//! `BENCH_COMMIT` (commit label when not run inside a git checkout).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use cyrnel::api::wire::{iso8601, Created, ProcessJson};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Records filled into the store by the scale section unless
/// `BENCH_SCALE_RECORDS` says otherwise; chosen so that `make bench` stays
/// within its 15-minute budget on the two-core machines (see BENCHMARKS.md).
const DEFAULT_SCALE_RECORDS: u64 = 1_000_000;

static START: OnceLock<Instant> = OnceLock::new();

macro_rules! progress {
    ($($arg:tt)*) => {{
        let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
        eprintln!("[bench {:7.1}s] {}", t, format_args!($($arg)*));
    }};
}

// ---------------------------------------------------------------------------
// Knobs
// ---------------------------------------------------------------------------

fn knob<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        _ => default,
    }
}

#[derive(Clone, Debug)]
struct Knobs {
    only: Option<Vec<String>>,
    spawn_runs: usize,
    spawn_clients: usize,
    spawn_rounds: usize,
    latency_samples: usize,
    kill_grace_ms: u64,
    read_conns: usize,
    read_secs: f64,
    durable_clients: usize,
    durable_secs: f64,
    memory_procs: usize,
    scale_records: u64,
    scale_clients: usize,
    scale_ran: u64,
    step_spawns: usize,
    churn_runs: u64,
}

impl Knobs {
    fn from_env() -> Knobs {
        let only = std::env::var("BENCH_ONLY")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.split(',').map(|p| p.trim().to_string()).collect());
        Knobs {
            only,
            spawn_runs: knob("BENCH_SPAWN_RUNS", 2000),
            spawn_clients: knob("BENCH_SPAWN_CLIENTS", 16),
            spawn_rounds: knob("BENCH_SPAWN_ROUNDS", 3),
            latency_samples: knob("BENCH_LATENCY_SAMPLES", 500),
            kill_grace_ms: knob("BENCH_KILL_GRACE_MS", 50),
            read_conns: knob("BENCH_READ_CONNS", 64),
            read_secs: knob("BENCH_READ_SECS", 5.0),
            durable_clients: knob("BENCH_DURABLE_CLIENTS", 64),
            durable_secs: knob("BENCH_DURABLE_SECS", 5.0),
            memory_procs: knob("BENCH_MEMORY_PROCS", 1000),
            scale_records: knob("BENCH_SCALE_RECORDS", DEFAULT_SCALE_RECORDS),
            scale_clients: knob("BENCH_SCALE_CLIENTS", 64),
            scale_ran: knob("BENCH_SCALE_RAN", 100_000),
            step_spawns: knob("BENCH_STEP_SPAWNS", 500),
            churn_runs: knob("BENCH_CHURN_RUNS", 100_000),
        }
    }

    fn wants(&self, section: &str) -> bool {
        match &self.only {
            Some(o) => o.iter().any(|s| s == section),
            // The soak takes 15 minutes: only when asked for (`make soak`).
            None => section != "soak",
        }
    }
}

// ---------------------------------------------------------------------------
// Locating the daemon and the output
// ---------------------------------------------------------------------------

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => Path::new(MANIFEST_DIR).join(d),
        None => Path::new(MANIFEST_DIR).join("target"),
    }
}

/// The release `cyrneld`: `CYRNELD_BIN` if set; else the one cargo built for
/// this bench (the bench profile inherits release and shares its directory);
/// else `<target>/release/cyrneld`, built with cargo first when missing.
fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CYRNELD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "CYRNELD_BIN={} does not exist", p.display());
        return p;
    }
    let candidates = [
        PathBuf::from(env!("CARGO_BIN_EXE_cyrneld")),
        target_dir().join("release").join("cyrneld"),
    ];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return p.clone();
    }
    progress!("cyrneld not found; running `cargo build --release --bin cyrneld`");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "cyrneld"])
        .current_dir(MANIFEST_DIR)
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "cargo build --release --bin cyrneld failed"
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .expect("cyrneld still missing after cargo build")
}

fn results_path() -> PathBuf {
    match std::env::var_os("BENCH_RESULTS") {
        Some(p) => PathBuf::from(p),
        None => Path::new(MANIFEST_DIR).join("target/bench/results.json"),
    }
}

// ---------------------------------------------------------------------------
// The daemon under test
// ---------------------------------------------------------------------------

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Settings every daemon of this harness gets: every rate limit off
/// (per-route and global; a daemon without rate limiting ignores them).
const COMMON_ENV: &[(&str, &str)] = &[
    ("CYRNEL_RATE_LIMIT_CREATE_PER_MIN", "0"),
    ("CYRNEL_RATE_LIMIT_RUN_PER_MIN", "0"),
    ("CYRNEL_RATE_LIMIT_KILL_PER_MIN", "0"),
    ("CYRNEL_RATE_LIMIT_MAX", "0"),
];

struct Daemon {
    name: String,
    bin: PathBuf,
    env: Vec<(String, String)>,
    data_dir: PathBuf,
    log_dir: PathBuf,
    port: u16,
    child: Option<Child>,
    spawned_at: Instant,
    starts: u32,
}

impl Daemon {
    /// Starts a daemon on a fresh data dir under `root` and waits for
    /// `/health`.
    async fn start(bin: &Path, root: &Path, name: &str, env: &[(&str, &str)]) -> Daemon {
        let data_dir = root.join(format!("{name}-data"));
        fs::create_dir_all(&data_dir).expect("create data dir");
        let mut all: Vec<(String, String)> = COMMON_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (k, v) in env {
            all.retain(|(ek, _)| ek != k);
            all.push((k.to_string(), v.to_string()));
        }
        let mut d = Daemon {
            name: name.to_string(),
            bin: bin.to_path_buf(),
            env: all,
            data_dir,
            log_dir: root.to_path_buf(),
            port: 0,
            child: None,
            spawned_at: Instant::now(),
            starts: 0,
        };
        d.spawn();
        let ready = d.wait_ready(Duration::from_secs(60)).await;
        progress!(
            "{}: cyrneld pid {} ready on {} after {:.1} ms",
            d.name,
            d.pid(),
            d.addr(),
            ms(ready)
        );
        d
    }

    fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        self.port = free_port();
        let log_path = self
            .log_dir
            .join(format!("{}-{}.log", self.name, self.starts));
        let log = fs::File::create(&log_path).expect("create daemon log");
        let mut cmd = Command::new(&self.bin);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("CYRNEL_") {
                cmd.env_remove(&k);
            }
        }
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log);
        self.spawned_at = Instant::now();
        self.child = Some(cmd.spawn().expect("spawn cyrneld"));
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// How the daemon says it tracks runs (cgroup v2 or process groups),
    /// from its start-up log.
    fn tracking(&self) -> String {
        let path = self
            .log_dir
            .join(format!("{}-{}.log", self.name, self.starts));
        let text = fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("cgroup"))
            .map(|l| l.split_once(": ").map_or(l, |(_, m)| m).trim().to_string())
            .unwrap_or_else(|| "process groups (no cgroup support in this build)".to_string())
    }

    fn log_tail(&self) -> String {
        let path = self
            .log_dir
            .join(format!("{}-{}.log", self.name, self.starts));
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Polls `/health` (a fresh connection each time, 1 ms apart) and returns
    /// the time since the process was spawned.
    async fn wait_ready(&mut self, limit: Duration) -> Duration {
        let addr = self.addr();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{}: cyrneld exited with {status} before it was ready; log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if health_ok(addr).await {
                return self.spawned_at.elapsed();
            }
            assert!(
                self.spawned_at.elapsed() < limit,
                "{}: cyrneld not ready after {limit:?}; log:\n{}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// SIGTERM, then waits for the exit; returns how long the stop took.
    async fn stop(&mut self) -> Duration {
        let Some(mut child) = self.child.take() else {
            return Duration::ZERO;
        };
        let t0 = Instant::now();
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                if !status.success() {
                    progress!("{}: cyrneld exited with {status}", self.name);
                }
                return t0.elapsed();
            }
            if t0.elapsed() > Duration::from_secs(60) {
                progress!("{}: cyrneld did not stop in 60 s; SIGKILL", self.name);
                let _ = child.kill();
                let _ = child.wait();
                return t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn rss_kb(&self) -> u64 {
        proc_status_field(self.pid(), "VmRSS").expect("VmRSS")
    }

    /// User + system CPU seconds of the daemon itself, and of its reaped
    /// children (the supervised runs).
    fn cpu_secs(&self) -> (f64, f64) {
        cpu_secs_of(&format!("/proc/{}/stat", self.pid()))
    }
}

/// (own, reaped children's) CPU seconds of a process, from its stat file.
fn cpu_secs_of(stat_path: &str) -> (f64, f64) {
    let stat = fs::read_to_string(stat_path).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    if f.len() < 15 {
        return (0.0, 0.0);
    }
    // Fields 14..17 of stat(5) are utime, stime, cutime, cstime; `after`
    // starts at field 3.
    ((f[11] + f[12]) / hz, (f[13] + f[14]) / hz)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Graceful stop so that the daemon kills the groups it runs.
            // SAFETY: plain kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn proc_status_field(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

async fn health_ok(addr: SocketAddr) -> bool {
    let probe = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<bool, std::io::Error>(buf.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Ok(true))
    )
}

/// Calls `f` with the metadata of every entry below `path` (not `path`
/// itself), without following symlinks.
fn walk_tree(path: &Path, mut f: impl FnMut(&fs::Metadata)) {
    let mut stack = vec![path.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = fs::symlink_metadata(e.path()) else {
                continue;
            };
            if md.is_dir() {
                stack.push(e.path());
            }
            f(&md);
        }
    }
}

/// Disk usage (allocated blocks) and apparent size of the files of a
/// directory tree, and how many files.
fn dir_usage(path: &Path) -> (u64, u64, u64) {
    let (mut blocks, mut bytes, mut files) = (0, 0, 0);
    walk_tree(path, |md| {
        if !md.is_dir() {
            blocks += md.blocks() * 512;
            bytes += md.len();
            files += 1;
        }
    });
    (blocks, bytes, files)
}

// ---------------------------------------------------------------------------
// HTTP client: one keep-alive HTTP/1.1 connection per client task
// ---------------------------------------------------------------------------

struct Http {
    tx: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl Http {
    async fn connect(addr: SocketAddr) -> Res<Http> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Http { tx })
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Res<Response<hyper::body::Incoming>> {
        self.tx.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, "127.0.0.1");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(body.unwrap_or_default()))?;
        Ok(self.tx.send_request(req).await?)
    }

    async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Res<(StatusCode, Bytes)> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }

    async fn get(&mut self, path: &str) -> Res<(StatusCode, Bytes)> {
        self.call(Method::GET, path, None).await
    }

    async fn expect_ok(&mut self, method: Method, path: &str, body: Option<Bytes>) -> Res<Bytes> {
        let (status, bytes) = self.call(method.clone(), path, body).await?;
        if status != StatusCode::OK {
            return Err(format!(
                "{method} {path}: {status} {}",
                String::from_utf8_lossy(&bytes)
            )
            .into());
        }
        Ok(bytes)
    }

    /// `POST /processes`; the id from the 201.
    async fn create(&mut self, body: Bytes) -> Res<u64> {
        let (status, bytes) = self.call(Method::POST, "/processes", Some(body)).await?;
        if status != StatusCode::CREATED {
            return Err(format!(
                "POST /processes: {status} {}",
                String::from_utf8_lossy(&bytes)
            )
            .into());
        }
        Ok(serde_json::from_slice::<Created>(&bytes)?.id)
    }

    /// `POST /processes` that waits and retries while the daemon answers
    /// 429 because its start queue is full (`max_queued`): how a client
    /// submitting more runs than the daemon starts keeps going.
    async fn create_queued(&mut self, body: Bytes) -> Res<u64> {
        loop {
            let (status, bytes) = self
                .call(Method::POST, "/processes", Some(body.clone()))
                .await?;
            match status {
                StatusCode::CREATED => return Ok(serde_json::from_slice::<Created>(&bytes)?.id),
                StatusCode::TOO_MANY_REQUESTS => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    return Err(format!(
                        "POST /processes: {status} {}",
                        String::from_utf8_lossy(&bytes)
                    )
                    .into())
                }
            }
        }
    }

    async fn kill(&mut self, id: u64) -> Res<()> {
        self.expect_ok(
            Method::POST,
            &format!("/processes/{id}/signals/kill"),
            Some(Bytes::from_static(b"{}")),
        )
        .await
        .map(|_| ())
    }
}

/// Opens `n` client connections.
async fn connect_many(addr: SocketAddr, n: usize) -> Vec<Http> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Http::connect(addr).await.expect("connect"));
    }
    out
}

// ---------------------------------------------------------------------------
// The /events stream, with the receive time of every event
// ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Seen {
    at: Instant,
    pid: Option<i32>,
    exit_state: Option<String>,
}

#[derive(Default)]
struct EvState {
    /// First sighting of (process id, event name).
    seen: HashMap<(u64, String), Seen>,
    counts: HashMap<String, u64>,
    last_seq: u64,
    /// Streams that ended and were resumed with `Last-Event-ID`.
    reconnects: u64,
}

struct EvShared {
    st: Mutex<EvState>,
    notify: Notify,
}

/// A subscriber of `GET /events` that resumes with `Last-Event-ID` when the
/// daemon closes the stream (e.g. because it lagged), so nothing is missed.
struct Events {
    shared: Arc<EvShared>,
    task: tokio::task::JoinHandle<()>,
}

impl Events {
    /// Returns once the stream's response headers arrived, i.e. once the
    /// daemon has subscribed this client to live events.
    async fn open(addr: SocketAddr) -> Events {
        let shared = Arc::new(EvShared {
            st: Mutex::new(EvState::default()),
            notify: Notify::new(),
        });
        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(events_task(addr, shared.clone(), ready_tx));
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .expect("event stream did not open in 10 s")
            .expect("event stream task ended");
        Events { shared, task }
    }

    /// Waits until `f` finds what it looks for in the events so far.
    async fn wait<T>(
        &self,
        what: &str,
        limit: Duration,
        mut f: impl FnMut(&EvState) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = f(&self.shared.st.lock().expect("events lock")) {
                return v;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out after {limit:?} waiting for {what}");
            }
        }
    }

    async fn seen(&self, id: u64, event: &str) -> Seen {
        let key = (id, event.to_string());
        self.wait(
            &format!("event `{event}` of process {id}"),
            Duration::from_secs(30),
            |s| s.seen.get(&key).cloned(),
        )
        .await
    }

    fn count(&self, event: &str) -> u64 {
        let st = self.shared.st.lock().expect("events lock");
        st.counts.get(event).copied().unwrap_or(0)
    }

    async fn wait_count(&self, event: &str, n: u64, limit: Duration) -> Instant {
        self.wait(&format!("{n} `{event}` events"), limit, |s| {
            (s.counts.get(event).copied().unwrap_or(0) >= n).then(Instant::now)
        })
        .await
    }

    fn reconnects(&self) -> u64 {
        self.shared.st.lock().expect("events lock").reconnects
    }

    /// How many of `ids` did not settle with `exitState: success` (or were
    /// not seen idle at all).
    fn not_success(&self, ids: &[u64]) -> usize {
        let st = self.shared.st.lock().expect("events lock");
        ids.iter()
            .filter(|id| {
                st.seen
                    .get(&(**id, "idle".to_string()))
                    .is_none_or(|s| s.exit_state.as_deref() != Some("success"))
            })
            .count()
    }

    /// Forgets per-process sightings (keeps memory flat across sections).
    fn clear_seen(&self) {
        self.shared.st.lock().expect("events lock").seen.clear();
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn events_task(addr: SocketAddr, shared: Arc<EvShared>, ready: oneshot::Sender<()>) {
    let mut ready = Some(ready);
    loop {
        let res: Res<()> = async {
            let mut http = Http::connect(addr).await?;
            let last = shared.st.lock().expect("events lock").last_seq;
            http.tx.ready().await?;
            let mut req = Request::get("/events").header(HOST, "127.0.0.1");
            if last > 0 {
                req = req.header("last-event-id", last.to_string());
            }
            let resp = http
                .tx
                .send_request(req.body(Full::new(Bytes::new()))?)
                .await?;
            if resp.status() != StatusCode::OK {
                return Err(format!("GET /events: {}", resp.status()).into());
            }
            if let Some(r) = ready.take() {
                let _ = r.send(());
            }
            let mut body = resp.into_body();
            let mut buf: Vec<u8> = Vec::new();
            while let Some(frame) = body.frame().await {
                let at = Instant::now();
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                let mut start = 0;
                let mut any = false;
                while let Some(pos) = find(&buf[start..], b"\n\n") {
                    any |= record_event(&shared, &buf[start..start + pos], at);
                    start += pos + 2;
                }
                buf.drain(..start);
                if any {
                    shared.notify.notify_waiters();
                }
            }
            Ok(())
        }
        .await;
        shared.st.lock().expect("events lock").reconnects += 1;
        if let Err(e) = res {
            progress!("event stream: {e}; reconnecting");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn record_event(shared: &EvShared, block: &[u8], at: Instant) -> bool {
    let (mut seq, mut name, mut data) = (None, None, None);
    for line in block.split(|&b| b == b'\n') {
        if let Some(v) = line.strip_prefix(b"id: ") {
            seq = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
        } else if let Some(v) = line.strip_prefix(b"event: ") {
            name = Some(String::from_utf8_lossy(v).into_owned());
        } else if let Some(v) = line.strip_prefix(b"data: ") {
            data = Some(v);
        }
    }
    let (Some(seq), Some(name)) = (seq, name) else {
        return false; // a comment (keep-alive)
    };
    let mut st = shared.st.lock().expect("events lock");
    st.last_seq = st.last_seq.max(seq);
    *st.counts.entry(name.clone()).or_default() += 1;
    if let Some(p) = data.and_then(|d| serde_json::from_slice::<ProcessJson>(d).ok()) {
        st.seen.entry((p.id, name)).or_insert(Seen {
            at,
            pid: p.pid,
            exit_state: p.exit_state.map(|e| e.into_owned()),
        });
    }
    true
}

// ---------------------------------------------------------------------------
// Statistics and reporting
// ---------------------------------------------------------------------------

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Clone, Copy, Debug)]
struct Summary {
    n: usize,
    p50: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

/// Nearest-rank percentiles of millisecond samples.
fn summarize(samples: &[f64]) -> Summary {
    assert!(!samples.is_empty(), "no samples");
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    Summary {
        n: s.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        max: s[s.len() - 1],
        mean: s.iter().sum::<f64>() / s.len() as f64,
    }
}

impl Summary {
    fn json(&self) -> Value {
        json!({"n": self.n, "p50_ms": r3(self.p50), "p99_ms": r3(self.p99),
               "max_ms": r3(self.max), "mean_ms": r3(self.mean)})
    }
    fn cell(&self) -> String {
        format!("{} / {} ms", fmt_ms(self.p50), fmt_ms(self.p99))
    }
}

fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn fmt_ms(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn fmt_rate(x: f64) -> String {
    if x >= 100.0 {
        format!("{:.0}", x)
    } else {
        format!("{x:.1}")
    }
}

struct Row {
    metric: String,
    value: String,
    baseline: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    json: serde_json::Map<String, Value>,
    targets: Vec<Value>,
    /// The isolation-step table (section `steps`), printed after the main one.
    steps_table: String,
}

impl Report {
    fn row(&mut self, metric: &str, value: String) -> &mut Row {
        self.rows.push(Row {
            metric: metric.to_string(),
            value,
            baseline: String::new(),
            ratio: String::new(),
            target: String::new(),
            met: None,
        });
        self.rows.last_mut().expect("row")
    }

    fn target(&mut self, name: &str, value: f64, target: &str, met: bool) {
        self.targets
            .push(json!({"name": name, "value": r3(value), "target": target, "met": met}));
    }

    fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("| # | Metric | cyrneld | Baseline (same run) | Ratio | Target | Met |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
        for (i, r) in self.rows.iter().enumerate() {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                i + 1,
                r.metric,
                r.value,
                r.baseline,
                r.ratio,
                r.target,
                met
            );
        }
        out
    }
}

impl Row {
    fn baseline(&mut self, b: String) -> &mut Row {
        self.baseline = b;
        self
    }
    fn ratio(&mut self, r: f64) -> &mut Row {
        self.ratio = format!("{r:.2}");
        self
    }
    fn target(&mut self, t: &str, met: bool) -> &mut Row {
        self.target = t.to_string();
        self.met = Some(met);
        self
    }
}

/// A small deterministic PRNG (xorshift64*), for random ids and cursors.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

// ---------------------------------------------------------------------------
// Section 1: spawn throughput
// ---------------------------------------------------------------------------

/// The baseline: `total` spawns of `/bin/sh -c true` from `workers` threads,
/// each waited for. No HTTP, no database.
fn spawn_baseline(total: usize, workers: usize) -> Duration {
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let status = Command::new("/bin/sh")
                        .args(["-c", "true"])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .expect("spawn /bin/sh");
                    assert!(status.success());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("spawn thread");
    }
    t0.elapsed()
}

/// Creates `total` processes with `body` from `clients` concurrent
/// connections; returns the ids in creation order.
async fn create_many(addr: SocketAddr, clients: usize, total: usize, body: Bytes) -> Vec<u64> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for mut http in connect_many(addr, clients).await {
        let next = next.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                ids.push(http.create(body.clone()).await.expect("create"));
            }
            ids
        }));
    }
    let mut ids = Vec::with_capacity(total);
    for t in tasks {
        ids.extend(t.await.expect("client task"));
    }
    ids.sort_unstable();
    ids
}

/// Jiffies of the whole machine from /proc/stat: (busy, total). Busy is
/// everything but idle and iowait.
fn machine_jiffies() -> (u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU seconds used by this harness process so far.
fn harness_cpu_secs() -> f64 {
    cpu_secs_of("/proc/self/stat").0
}

/// One round of the daemon side: `runs` creates of `true` with autorun
/// from `clients` connections, timed until the last `idle` event.
struct SpawnRound {
    base_rate: f64,
    rate: f64,
    created_s: f64,
    elapsed_s: f64,
    not_success: usize,
    daemon_cpu_s: f64,
    children_cpu_s: f64,
    /// The harness's own CPU (HTTP clients and the event stream).
    harness_cpu_s: f64,
    /// Share of both cores busy (not idle, not iowait) during the daemon side.
    machine_busy: f64,
    first_id: u64,
}

async fn spawn_round(runs: usize, clients: usize, d: &Daemon, ev: &Events) -> SpawnRound {
    let base = tokio::task::spawn_blocking(move || spawn_baseline(runs, clients))
        .await
        .expect("baseline");
    let base_rate = runs as f64 / base.as_secs_f64();
    let body = Bytes::from_static(br#"{"code":"true"}"#);
    let idle0 = ev.count("idle");
    let cpu0 = d.cpu_secs();
    let (h0, m0) = (harness_cpu_secs(), machine_jiffies());
    let t0 = Instant::now();
    let ids = create_many(d.addr(), clients, runs, body).await;
    let created = t0.elapsed();
    let done = ev
        .wait_count("idle", idle0 + runs as u64, Duration::from_secs(600))
        .await;
    let elapsed = done - t0;
    let cpu1 = d.cpu_secs();
    let (h1, m1) = (harness_cpu_secs(), machine_jiffies());
    let not_success = ev.not_success(&ids);
    SpawnRound {
        base_rate,
        rate: runs as f64 / elapsed.as_secs_f64(),
        created_s: created.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        not_success,
        daemon_cpu_s: cpu1.0 - cpu0.0,
        children_cpu_s: cpu1.1 - cpu0.1,
        harness_cpu_s: h1 - h0,
        machine_busy: (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64,
        first_id: ids[0],
    }
}

/// The median of a few values (the upper one of the middle two).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn bench_spawn(k: &Knobs, d: &Daemon, ev: &Events, rep: &mut Report) -> u64 {
    let (runs, clients, rounds) = (k.spawn_runs, k.spawn_clients, k.spawn_rounds.max(1));
    progress!("spawn: warm-up, 64 × `/bin/sh -c true` and 64 runs through the daemon");
    spawn_baseline(64, clients);
    let idle0 = ev.count("idle");
    create_many(
        d.addr(),
        clients,
        64,
        Bytes::from_static(br#"{"code":"true"}"#),
    )
    .await;
    ev.wait_count("idle", idle0 + 64, Duration::from_secs(60))
        .await;
    // Baseline and daemon alternate, so that a change in the machine's
    // speed during the section (shared, noisy hosts) hits both sides.
    let mut all = Vec::new();
    for round in 1..=rounds {
        progress!(
            "spawn: round {round}/{rounds}: baseline {runs} × `/bin/sh -c true` from {clients} threads, then {runs} runs of `true` (autorun) from {clients} HTTP clients until all are idle"
        );
        let r = spawn_round(runs, clients, d, ev).await;
        progress!(
            "spawn: round {round}: baseline {:.0} spawns/s; daemon {:.0} runs/s ({:.2} s; all 201s after {:.2} s; {} not success); ratio {:.2}; CPU: daemon {:.2} s, children {:.2} s, harness {:.2} s, machine {:.0} % busy",
            r.base_rate,
            r.rate,
            r.elapsed_s,
            r.created_s,
            r.not_success,
            r.rate / r.base_rate,
            r.daemon_cpu_s,
            r.children_cpu_s,
            r.harness_cpu_s,
            r.machine_busy * 100.0
        );
        all.push(r);
    }
    let rate = median(all.iter().map(|r| r.rate).collect());
    let base_rate = median(all.iter().map(|r| r.base_rate).collect());
    let ratio = median(all.iter().map(|r| r.rate / r.base_rate).collect());
    let not_success: usize = all.iter().map(|r| r.not_success).sum();
    let level = sandbox_level(d.addr(), all[0].first_id).await;
    progress!(
        "spawn: median of {rounds} rounds: daemon {rate:.0} runs/s, baseline {base_rate:.0} spawns/s, ratio {ratio:.2}; {not_success} not success; sandbox level of the runs: {level}"
    );
    require_full("spawn", &level);
    rep.row(
        &format!(
            "Spawn throughput: runs of `true`, level `{level}`, {clients} clients, until idle"
        ),
        format!("{} runs/s", fmt_rate(rate)),
    )
    .baseline(format!(
        "{} spawns/s (`/bin/sh -c true`, {clients} threads)",
        fmt_rate(base_rate)
    ))
    .ratio(ratio)
    .target("ratio ≥ 0.5", ratio >= 0.5);
    rep.target("spawn throughput ratio", ratio, ">= 0.5", ratio >= 0.5);
    let per_round: Vec<_> = all
        .iter()
        .map(|r| {
            json!({
                "baseline_spawns_per_s": r3(r.base_rate),
                "daemon_runs_per_s": r3(r.rate),
                "ratio": r3(r.rate / r.base_rate),
                "daemon_elapsed_s": r3(r.elapsed_s),
                "all_created_after_s": r3(r.created_s),
                "not_success": r.not_success,
                "daemon_cpu_s": r3(r.daemon_cpu_s),
                "children_cpu_s": r3(r.children_cpu_s),
                "harness_cpu_s": r3(r.harness_cpu_s),
                "machine_busy": r3(r.machine_busy),
            })
        })
        .collect();
    rep.json.insert(
        "spawn".into(),
        json!({
            "runs": runs, "clients": clients, "rounds": rounds, "sandbox": level,
            "daemon_runs_per_s": r3(rate), "baseline_spawns_per_s": r3(base_rate),
            "ratio": r3(ratio), "ratio_is": "median of the per-round ratios",
            "not_success": not_success,
            "target_ratio": 0.5, "met": ratio >= 0.5,
            "per_round": per_round,
        }),
    );
    all[0].first_id
}

// ---------------------------------------------------------------------------
// Section 2: latency (and event latency)
// ---------------------------------------------------------------------------

/// Whether `pid` ignores SIGTERM (bit 15 of `SigIgn` in /proc/pid/status).
fn ignores_term(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

/// The state letter of a process from /proc (`None`: gone).
fn proc_state(pid: i32) -> Option<u8> {
    let s = fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = s.iter().rposition(|&b| b == b')')?;
    s.get(close + 2).copied()
}

fn dead(pid: i32) -> bool {
    matches!(proc_state(pid), None | Some(b'Z') | Some(b'X'))
}

/// What one walk over every process's `/proc/<pid>/stat` costs here (the
/// way a supervisor without cgroup events finds a group's members): the
/// number of processes on the host and the median of 5 walks, in ms.
fn proc_scan_cost() -> (usize, f64) {
    let mut times = Vec::new();
    let mut count = 0;
    for _ in 0..5 {
        let t0 = Instant::now();
        count = 0;
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                if fs::read(format!("/proc/{pid}/stat")).is_ok() {
                    count += 1;
                }
            }
        }
        times.push(ms(t0.elapsed()));
    }
    (count, summarize(&times).p50)
}

/// When each part of a kill happened, in ms after the kill request was sent.
struct KillParts {
    reply: Vec<f64>,
    leader_dead: Vec<f64>,
    group_dead: Vec<f64>,
    idle_event: Vec<f64>,
}

/// Diagnostic pass (not part of the headline numbers): kills runs whose
/// group is `sh` + `sleep` while a thread watches both pids in /proc every
/// ~50 µs, to split kill → idle into: the 200 reply (terminating is
/// durable), the leader's death, the whole group's death, and the `idle`
/// event. Whatever comes after the group's death is the daemon noticing and
/// persisting it.
async fn kill_breakdown(
    http: &mut Http,
    ev: &Events,
    samples: usize,
    body: Bytes,
    wait_term_ignored: bool,
) -> KillParts {
    let mut parts = KillParts {
        reply: Vec::new(),
        leader_dead: Vec::new(),
        group_dead: Vec::new(),
        idle_event: Vec::new(),
    };
    for _ in 0..samples {
        let id = http.create(body.clone()).await.expect("create");
        let leader = ev.seen(id, "running").await.pid.expect("pid");
        // The shell's child (`sleep`), once it is forked.
        let t_wait = Instant::now();
        let child = loop {
            let kids = fs::read_to_string(format!("/proc/{leader}/task/{leader}/children"))
                .unwrap_or_default();
            if let Some(c) = kids
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<i32>().ok())
            {
                if !wait_term_ignored || (ignores_term(leader) && ignores_term(c)) {
                    break c;
                }
            }
            assert!(
                t_wait.elapsed() < Duration::from_secs(10),
                "process {id}: no child"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let t1 = Instant::now();
        let watcher = std::thread::spawn(move || {
            let (mut leader_at, mut child_at) = (None, None);
            while t1.elapsed() < Duration::from_secs(10) {
                if leader_at.is_none() && dead(leader) {
                    leader_at = Some(Instant::now());
                }
                if child_at.is_none() && dead(child) {
                    child_at = Some(Instant::now());
                }
                if let (Some(l), Some(c)) = (leader_at, child_at) {
                    return (l, c);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            panic!("group of {leader} still alive 10 s after the kill");
        });
        http.kill(id).await.expect("kill");
        let t_reply = Instant::now();
        let idle = ev.seen(id, "idle").await;
        let (leader_at, child_at) = tokio::task::spawn_blocking(move || watcher.join())
            .await
            .expect("join")
            .expect("watcher");
        parts.reply.push(ms(t_reply - t1));
        parts.leader_dead.push(ms(leader_at - t1));
        parts.group_dead.push(ms(leader_at.max(child_at) - t1));
        parts.idle_event.push(ms(idle.at - t1));
    }
    parts
}

/// Per kill: from the group's death to the `idle` event.
fn group_dead_to_event(p: &KillParts) -> Vec<f64> {
    p.idle_event
        .iter()
        .zip(&p.group_dead)
        .map(|(i, g)| i - g)
        .collect()
}

fn parts_json(p: &KillParts) -> Value {
    let after = group_dead_to_event(p);
    json!({
        "samples": p.reply.len(),
        "kill_sent_to_200": summarize(&p.reply).json(),
        "kill_sent_to_leader_dead": summarize(&p.leader_dead).json(),
        "kill_sent_to_group_dead": summarize(&p.group_dead).json(),
        "kill_sent_to_idle_event": summarize(&p.idle_event).json(),
        "group_dead_to_idle_event": summarize(&after).json(),
    })
}

fn parts_line(p: &KillParts) -> String {
    let after = group_dead_to_event(p);
    let (r, l, g, i, a) = (
        summarize(&p.reply),
        summarize(&p.leader_dead),
        summarize(&p.group_dead),
        summarize(&p.idle_event),
        summarize(&after),
    );
    format!(
        "200 reply {} / {}, leader dead {} / {}, group dead {} / {}, idle event {} / {} ms (group dead → idle event {} / {} ms)",
        fmt_ms(r.p50),
        fmt_ms(r.p99),
        fmt_ms(l.p50),
        fmt_ms(l.p99),
        fmt_ms(g.p50),
        fmt_ms(g.p99),
        fmt_ms(i.p50),
        fmt_ms(i.p99),
        fmt_ms(a.p50),
        fmt_ms(a.p99)
    )
}

async fn bench_latency(k: &Knobs, d: &Daemon, ev: &Events, rep: &mut Report) {
    let n = k.latency_samples;
    let mut http = Http::connect(d.addr()).await.expect("connect");

    progress!("latency: {n} × create `sleep 1000` → running, kill → idle (one at a time)");
    let body = Bytes::from_static(br#"{"code":"sleep 1000","options":{"timeout":null}}"#);
    let (mut to_running, mut to_created, mut to_idle) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 10 {
        let t0 = Instant::now();
        let id = http.create(body.clone()).await.expect("create");
        let t_created = Instant::now();
        let running = ev.seen(id, "running").await;
        let t1 = Instant::now();
        http.kill(id).await.expect("kill");
        let idle = ev.seen(id, "idle").await;
        assert_eq!(idle.exit_state.as_deref(), Some("canceled"), "process {id}");
        if i >= 10 {
            // The first few warm up connections, caches and the allocator.
            to_running.push(ms(running.at - t0));
            to_created.push(ms(t_created - t0));
            to_idle.push(ms(idle.at - t1));
        }
        if (i + 1) % 100 == 0 {
            progress!("latency: {} cooperative samples", i + 1);
        }
    }
    let to_running = summarize(&to_running);
    let to_created = summarize(&to_created);
    let to_idle = summarize(&to_idle);
    progress!(
        "latency: create → running p50 {:.2} ms p99 {:.2} ms; kill → idle p50 {:.2} ms p99 {:.2} ms",
        to_running.p50,
        to_running.p99,
        to_idle.p50,
        to_idle.p99
    );
    ev.clear_seen();

    let grace = k.kill_grace_ms as f64;
    progress!("latency: {n} × TERM-ignoring process, kill → idle minus the {grace} ms grace");
    let body =
        Bytes::from_static(br#"{"code":"trap '' TERM; sleep 1000","options":{"timeout":null}}"#);
    let mut overshoot = Vec::new();
    for i in 0..n + 5 {
        let id = http.create(body.clone()).await.expect("create");
        let running = ev.seen(id, "running").await;
        let pid = running.pid.expect("running record has a pid");
        // Kill only once the shell has installed its trap; until then a
        // SIGTERM would end it at once.
        let t_wait = Instant::now();
        while !ignores_term(pid) {
            assert!(
                t_wait.elapsed() < Duration::from_secs(10),
                "pid {pid} never ignored SIGTERM"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let t1 = Instant::now();
        http.kill(id).await.expect("kill");
        let idle = ev.seen(id, "idle").await;
        assert_eq!(idle.exit_state.as_deref(), Some("canceled"), "process {id}");
        if i >= 5 {
            overshoot.push(ms(idle.at - t1) - grace);
        }
        if (i + 1) % 100 == 0 {
            progress!("latency: {} escalation samples", i + 1);
        }
    }
    let overshoot = summarize(&overshoot);
    progress!(
        "latency: escalation overshoot p50 {:.2} ms p99 {:.2} ms",
        overshoot.p50,
        overshoot.p99
    );
    ev.clear_seen();

    progress!("events: {n} × create (autorun:false) → its event on /events");
    let body = Bytes::from_static(br#"{"code":"true","autorun":false}"#);
    let (mut to_event, mut to_reply, mut reply_to_event) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 10 {
        let t0 = Instant::now();
        let id = http.create(body.clone()).await.expect("create");
        let t1 = Instant::now();
        let seen = ev.seen(id, "idle").await;
        if i >= 10 {
            to_event.push(ms(seen.at - t0));
            to_reply.push(ms(t1 - t0));
            reply_to_event.push(if seen.at >= t1 {
                ms(seen.at - t1)
            } else {
                -ms(t1 - seen.at)
            });
        }
    }
    let to_event = summarize(&to_event);
    let to_reply = summarize(&to_reply);
    let reply_to_event = summarize(&reply_to_event);
    progress!(
        "events: create sent → event received p50 {:.2} ms p99 {:.2} ms (→ 201: p50 {:.2} p99 {:.2}; 201 → event p50 {:.2} p99 {:.2})",
        to_event.p50,
        to_event.p99,
        to_reply.p50,
        to_reply.p99,
        reply_to_event.p50,
        reply_to_event.p99
    );
    ev.clear_seen();

    let (procs, scan_ms) = tokio::task::spawn_blocking(proc_scan_cost)
        .await
        .expect("scan");
    progress!("latency: {procs} processes on the host; one /proc stat walk takes {scan_ms:.2} ms");
    let diag = k.latency_samples.min(100);
    progress!("latency: diagnostic pass, {diag} cooperative kills with /proc watched (not in the headline numbers)");
    let coop_parts = kill_breakdown(
        &mut http,
        ev,
        diag,
        Bytes::from_static(br#"{"code":"sleep 1000","options":{"timeout":null}}"#),
        false,
    )
    .await;
    progress!(
        "latency: cooperative kill, p50 / p99 after the request: {}",
        parts_line(&coop_parts)
    );
    progress!("latency: diagnostic pass, {diag} escalated kills with /proc watched");
    let esc_parts = kill_breakdown(
        &mut http,
        ev,
        diag,
        Bytes::from_static(br#"{"code":"trap '' TERM; sleep 1000","options":{"timeout":null}}"#),
        true,
    )
    .await;
    progress!(
        "latency: escalated kill, p50 / p99 after the request: {}",
        parts_line(&esc_parts)
    );
    ev.clear_seen();

    rep.row("create → `running` (`sleep`), p50 / p99", to_running.cell())
        .baseline(format!("its 201 reply: {}", to_created.cell()));
    rep.row(
        "kill → `idle` (cooperative `sleep`), p50 / p99",
        to_idle.cell(),
    )
    .target("p99 ≤ 10 ms", to_idle.p99 <= 10.0);
    rep.row(
        &format!(
            "kill → `idle` minus {} ms grace (TERM ignored), p50 / p99",
            k.kill_grace_ms
        ),
        overshoot.cell(),
    )
    .target("p99 ≤ 20 ms", overshoot.p99 <= 20.0);
    rep.row(
        "create sent → its event on `/events`, p50 / p99",
        to_event.cell(),
    )
    .baseline(format!("201 reply: {}", to_reply.cell()));
    rep.target(
        "kill -> idle p99 (ms)",
        to_idle.p99,
        "<= 10",
        to_idle.p99 <= 10.0,
    );
    rep.target(
        "escalation overshoot p99 (ms)",
        overshoot.p99,
        "<= 20",
        overshoot.p99 <= 20.0,
    );
    rep.json.insert(
        "latency".into(),
        json!({
            "create_to_running": to_running.json(),
            "create_to_201": to_created.json(),
            "kill_breakdown_cooperative": parts_json(&coop_parts),
            "kill_breakdown_escalated": parts_json(&esc_parts),
            "host_processes": procs,
            "proc_stat_walk_ms": r3(scan_ms),
            "kill_to_idle": to_idle.json(),
            "kill_to_idle_target_p99_ms": 10.0,
            "kill_to_idle_met": to_idle.p99 <= 10.0,
            "kill_grace_ms": k.kill_grace_ms,
            "escalation_overshoot": overshoot.json(),
            "escalation_overshoot_target_p99_ms": 20.0,
            "escalation_overshoot_met": overshoot.p99 <= 20.0,
        }),
    );
    rep.json.insert(
        "events".into(),
        json!({
            "create_sent_to_event": to_event.json(),
            "create_sent_to_201": to_reply.json(),
            "reply_to_event": reply_to_event.json(),
            "stream_reconnects": ev.reconnects(),
        }),
    );
}

// ---------------------------------------------------------------------------
// Section 3: API read throughput
// ---------------------------------------------------------------------------

/// `conns` keep-alive connections each sending `GET path` back to back;
/// returns the requests completed per second in the measured window (after
/// a one-second warm-up).
async fn read_load(addr: SocketAddr, path: &str, conns: usize, secs: f64) -> f64 {
    let warmup = Duration::from_secs(1);
    let window = Duration::from_secs_f64(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let (from, to) = (t0 + warmup, t0 + warmup + window);
    let mut tasks = Vec::new();
    for mut http in connect_many(addr, conns).await {
        let (stop, counted, errors) = (stop.clone(), counted.clone(), errors.clone());
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut local = 0;
            while !stop.load(Ordering::Relaxed) {
                match http.get(&path).await {
                    Ok((StatusCode::OK, _)) => {
                        let now = Instant::now();
                        if now >= from && now < to {
                            local += 1;
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            counted.fetch_add(local, Ordering::Relaxed);
        }));
    }
    tokio::time::sleep_until((to).into()).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    let errors = errors.load(Ordering::Relaxed);
    assert_eq!(errors, 0, "GET {path}: {errors} failed requests");
    counted.load(Ordering::Relaxed) as f64 / secs
}

/// The baseline for read throughput: the harness re-executed as a minimal
/// hyper server that answers every request with one constant JSON body.
fn baseline_server_main(port: u16, body_file: &Path) {
    let body = Bytes::from(fs::read(body_file).expect("read body file"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind baseline server");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        let mut r = Response::new(Full::new(body));
                        r.headers_mut().insert(
                            CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

async fn bench_read(k: &Knobs, d: &Daemon, root: &Path, id: u64, rep: &mut Report) {
    let path = format!("/processes/{id}");
    let mut http = Http::connect(d.addr()).await.expect("connect");
    let body = http
        .expect_ok(Method::GET, &path, None)
        .await
        .expect("GET record");
    let body_file = root.join("baseline-body.json");
    fs::write(&body_file, &body).expect("write body file");

    progress!(
        "read: GET {path} ({} bytes) from {} connections for {} s",
        body.len(),
        k.read_conns,
        k.read_secs
    );
    let cpu0 = d.cpu_secs();
    let rate = read_load(d.addr(), &path, k.read_conns, k.read_secs).await;
    let cpu1 = d.cpu_secs();
    progress!(
        "read: daemon {rate:.0} req/s (daemon CPU {:.2} s)",
        cpu1.0 - cpu0.0
    );

    let port = free_port();
    let mut server = Command::new(std::env::current_exe().expect("current exe"))
        .arg("--baseline-server")
        .arg(port.to_string())
        .arg(&body_file)
        .stdin(Stdio::null())
        .spawn()
        .expect("start the baseline server");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t0 = Instant::now();
    while Http::connect(addr).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "baseline server not up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut probe = Http::connect(addr).await.expect("connect baseline");
    let same = probe.get(&path).await.expect("baseline GET").1;
    assert_eq!(same, body, "the baseline answers the same body");
    progress!(
        "read: baseline server (pid {}) for {} s",
        server.id(),
        k.read_secs
    );
    let base = read_load(addr, &path, k.read_conns, k.read_secs).await;
    let _ = server.kill();
    let _ = server.wait();
    let ratio = rate / base;
    progress!("read: baseline {base:.0} req/s; ratio {ratio:.2}");
    rep.row(
        &format!(
            "`GET /processes/{{id}}`, {} keep-alive connections",
            k.read_conns
        ),
        format!("{} req/s", fmt_rate(rate)),
    )
    .baseline(format!(
        "{} req/s (minimal hyper server, same {}-byte body)",
        fmt_rate(base),
        body.len()
    ))
    .ratio(ratio)
    .target("ratio ≥ 0.7", ratio >= 0.7);
    rep.target("read throughput ratio", ratio, ">= 0.7", ratio >= 0.7);
    rep.json.insert(
        "read".into(),
        json!({
            "connections": k.read_conns, "seconds": k.read_secs, "body_bytes": body.len(),
            "daemon_req_per_s": r3(rate), "baseline_req_per_s": r3(base),
            "ratio": r3(ratio), "target_ratio": 0.7, "met": ratio >= 0.7,
            "daemon_cpu_s": r3(cpu1.0 - cpu0.0),
        }),
    );
}

// ---------------------------------------------------------------------------
// Section 6: durable transitions
// ---------------------------------------------------------------------------

/// Serial synced appends for `secs`: a 256-byte record (about a create's WAL
/// record) then `fdatasync`, back to back. With `prealloc` the file first
/// gets 64 MiB with `fallocate(FALLOC_FL_KEEP_SIZE)`, as RocksDB does to its
/// WAL; without, every append grows the file. Returns (syncs/s, p50 ms).
fn raw_fsync_rate(dir: &Path, secs: f64, prealloc: bool) -> (f64, f64) {
    use std::os::fd::AsRawFd;
    let path = dir.join("bench-fsync-probe");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .expect("open fsync probe");
    if prealloc {
        // SAFETY: fallocate(2) on a descriptor we own.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 64 << 20) };
        assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    }
    let rec = [0x5au8; 256];
    let t0 = Instant::now();
    let mut lat = Vec::new();
    while t0.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        f.write_all(&rec).expect("write");
        f.sync_data().expect("fdatasync");
        lat.push(ms(t.elapsed()));
    }
    let rate = lat.len() as f64 / t0.elapsed().as_secs_f64();
    let _ = fs::remove_file(&path);
    (rate, summarize(&lat).p50)
}

/// The preallocated (WAL-like) probe, then the growing-file one.
async fn fsync_probes(dir: &Path, secs: f64) -> [(f64, f64); 2] {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        [
            raw_fsync_rate(&dir, secs, true),
            raw_fsync_rate(&dir, secs, false),
        ]
    })
    .await
    .expect("fsync probe")
}

async fn bench_durable(k: &Knobs, d: &Daemon, rep: &mut Report) {
    // The probe file sits next to the daemon's RocksDB: same file system.
    let dir = d.data_dir.clone();
    progress!(
        "durable: raw synced appends in {} (1 s each pattern, before and after the load)",
        dir.display()
    );
    let before = fsync_probes(&dir, 1.0).await;

    progress!(
        "durable: creates (autorun:false, one synced transition each) from {} clients for {} s",
        k.durable_clients,
        k.durable_secs
    );
    let warmup = Duration::from_millis(500);
    let window = Duration::from_secs_f64(k.durable_secs);
    let stop = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let (from, to) = (t0 + warmup, t0 + warmup + window);
    let body = Bytes::from_static(br#"{"code":"true","autorun":false}"#);
    let mut tasks = Vec::new();
    let cpu0 = d.cpu_secs();
    for mut http in connect_many(d.addr(), k.durable_clients).await {
        let (stop, counted, body) = (stop.clone(), counted.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = 0;
            while !stop.load(Ordering::Relaxed) {
                http.create(body.clone()).await.expect("create");
                let now = Instant::now();
                if now >= from && now < to {
                    local += 1;
                }
            }
            counted.fetch_add(local, Ordering::Relaxed);
        }));
    }
    tokio::time::sleep_until(to.into()).await;
    let cpu1 = d.cpu_secs();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client");
    }
    let rate = counted.load(Ordering::Relaxed) as f64 / k.durable_secs;
    let after = fsync_probes(&dir, 1.0).await;
    let mean = |i: usize| {
        (
            (before[i].0 + after[i].0) / 2.0,
            (before[i].1 + after[i].1) / 2.0,
        )
    };
    let ((wal_rate, wal_p50), (grow_rate, grow_p50)) = (mean(0), mean(1));
    let per_sync = rate / wal_rate;
    progress!(
        "durable: raw fdatasync/s, preallocated like the WAL: {:.0} before, {:.0} after; growing file: {:.0} before, {:.0} after",
        before[0].0,
        after[0].0,
        before[1].0,
        after[1].0
    );
    progress!(
        "durable: {rate:.0} durable transitions/s = {per_sync:.1}× the raw WAL-like fdatasync rate (daemon CPU {:.2} s over {:.1} s)",
        cpu1.0 - cpu0.0,
        (warmup + window).as_secs_f64()
    );
    rep.row(
        &format!(
            "Durable transitions/s (creates from {} clients, synced WAL)",
            k.durable_clients
        ),
        format!("{} /s", fmt_rate(rate)),
    )
    .baseline(format!(
        "{} fdatasync/s serial, preallocated file like RocksDB's WAL (p50 {:.2} ms); {} /s growing a file",
        fmt_rate(wal_rate),
        wal_p50,
        fmt_rate(grow_rate)
    ))
    .ratio(per_sync);
    rep.json.insert(
        "durable".into(),
        json!({
            "clients": k.durable_clients, "seconds": k.durable_secs,
            "transitions_per_s": r3(rate),
            "transition_kind": "create with autorun:false (one synced batch per transition)",
            "raw_fdatasync_per_s": r3(wal_rate), "raw_fdatasync_p50_ms": r3(wal_p50),
            "raw_fdatasync_pattern": "serial 256-byte appends + fdatasync into a file preallocated with fallocate(KEEP_SIZE), as RocksDB does to its WAL",
            "raw_fdatasync_growing_file_per_s": r3(grow_rate),
            "raw_fdatasync_growing_file_p50_ms": r3(grow_p50),
            "raw_probes_before_after": [[before[0].0, before[1].0], [after[0].0, after[1].0]],
            "transitions_per_fsync": r3(per_sync),
            "daemon_cpu_s": r3(cpu1.0 - cpu0.0),
        }),
    );
}

// ---------------------------------------------------------------------------
// Section 5: memory
// ---------------------------------------------------------------------------

async fn bench_memory(k: &Knobs, bin: &Path, root: &Path, rep: &mut Report) {
    let n = k.memory_procs;
    let max_running = (n + 100).to_string();
    let mut d = Daemon::start(
        bin,
        root,
        "memory",
        &[
            ("CYRNEL_MAX_RUNNING", max_running.as_str()),
            ("CYRNEL_DEFAULT_TIMEOUT_MS", "0"),
            ("CYRNEL_EVENT_BUFFER", "8192"),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kb = d.rss_kb();
    progress!("memory: idle RSS {idle_kb} kB");
    let ev = Events::open(d.addr()).await;
    let after_stream_kb = d.rss_kb();

    progress!("memory: starting {n} × `sleep 1000` from 16 clients");
    let body = Bytes::from_static(br#"{"code":"sleep 1000","options":{"timeout":null}}"#);
    let t0 = Instant::now();
    let ids = create_many(d.addr(), 16, n, body).await;
    ev.wait_count("running", n as u64, Duration::from_secs(300))
        .await;
    let started = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy_kb = d.rss_kb();
    let threads = proc_status_field(d.pid(), "Threads").unwrap_or(0);
    let fds = fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .map(|r| r.count())
        .unwrap_or(0);
    let per_proc = (busy_kb as f64 - idle_kb as f64) / n as f64;
    progress!(
        "memory: {n} running after {:.2} s: RSS {busy_kb} kB ({per_proc:.1} kB per process; {threads} threads, {fds} fds)",
        started.as_secs_f64()
    );

    let (busy_procs, busy_scan_ms) = tokio::task::spawn_blocking(proc_scan_cost)
        .await
        .expect("scan");
    progress!("memory: {busy_procs} processes on the host; one /proc stat walk takes {busy_scan_ms:.2} ms");
    progress!("memory: killing the {n} processes from 16 clients");
    let t_kill = Instant::now();
    let idle0 = ev.count("idle");
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for mut http in connect_many(d.addr(), 16).await {
        let (next, ids) = (next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                http.kill(*id).await.expect("kill");
            }
        }));
    }
    for t in tasks {
        t.await.expect("kill task");
    }
    ev.wait_count("idle", idle0 + n as u64, Duration::from_secs(600))
        .await;
    let killed_all = t_kill.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_kb = d.rss_kb();
    progress!(
        "memory: all idle again after {:.2} s: RSS {after_kb} kB",
        killed_all.as_secs_f64()
    );
    drop(ev);
    d.stop().await;

    let idle_mb = idle_kb as f64 / 1024.0;
    rep.row("Daemon RSS, idle (fresh start)", format!("{idle_mb:.1} MB"))
        .target("≤ 20 MB", idle_mb <= 20.0);
    rep.row(
        &format!("Daemon RSS per running `sleep` ({n} at once)"),
        format!("{per_proc:.1} KB"),
    )
    .baseline(format!(
        "RSS {:.1} MB with {n} running",
        busy_kb as f64 / 1024.0
    ))
    .target("≤ 30 KB", per_proc <= 30.0);
    rep.target("idle RSS (MB)", idle_mb, "<= 20", idle_mb <= 20.0);
    rep.target(
        "RSS per running process (KB)",
        per_proc,
        "<= 30",
        per_proc <= 30.0,
    );
    rep.json.insert(
        "memory".into(),
        json!({
            "idle_rss_kb": idle_kb, "rss_with_event_stream_kb": after_stream_kb,
            "processes": n, "rss_running_kb": busy_kb,
            "kb_per_process": r3(per_proc), "rss_after_kill_kb": after_kb,
            "threads_running": threads, "fds_running": fds,
            "start_all_s": r3(started.as_secs_f64()),
            "kill_all_s": r3(killed_all.as_secs_f64()),
            "host_processes_while_running": busy_procs,
            "proc_stat_walk_ms_while_running": r3(busy_scan_ms),
            "idle_target_mb": 20, "idle_met": idle_mb <= 20.0,
            "per_process_target_kb": 30, "per_process_met": per_proc <= 30.0,
        }),
    );
}

// ---------------------------------------------------------------------------
// Section 4: scale
// ---------------------------------------------------------------------------

/// A scale record that runs: `true` with autorun, `ref` as in `scale_body`.
fn scale_run_body(i: u64) -> Bytes {
    Bytes::from(format!(r#"{{"code":"true","ref":"r{}"}}"#, i % 100))
}

fn scale_body(i: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"code":"true","autorun":false,"ref":"r{}"}}"#,
        i % 100
    ))
}

/// Creates (autorun:false) one at a time, alternating between two daemons so
/// that both see the same disk and CPU conditions; the latency of each 201.
async fn create_latency_pair(a: &mut Http, b: &mut Http, n: usize) -> (Summary, Summary) {
    let (mut la, mut lb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n as u64 {
        for (http, lat) in [(&mut *a, &mut la), (&mut *b, &mut lb)] {
            let body = scale_body(i);
            let t0 = Instant::now();
            http.create(body).await.expect("create");
            lat.push(ms(t0.elapsed()));
        }
    }
    (summarize(&la), summarize(&lb))
}

/// Latencies of `GET path` for each path `paths` yields, one at a time.
async fn get_latency(http: &mut Http, n: usize, mut path: impl FnMut() -> String) -> Summary {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let p = path();
        let t0 = Instant::now();
        let (status, _) = http.get(&p).await.expect("GET");
        lat.push(ms(t0.elapsed()));
        assert_eq!(status, StatusCode::OK, "GET {p}");
    }
    summarize(&lat)
}

struct ReadLatencies {
    get: Summary,
    filtered: Summary,
    page: Summary,
    /// `state=running&limit=100` when nothing runs: the whole store is read.
    running: Summary,
}

async fn read_latencies(http: &mut Http, max_id: u64, rng: &mut Rng) -> ReadLatencies {
    let get = {
        let mut r = Rng(rng.below(u64::MAX) | 1);
        get_latency(http, 2000, move || {
            format!("/processes/{}", 1 + r.below(max_id))
        })
        .await
    };
    let filtered = {
        let mut r = Rng(rng.below(u64::MAX) | 1);
        get_latency(http, 200, move || {
            format!(
                "/processes?state=idle&ref=r{}&limit=100&cursor={}",
                r.below(100),
                1 + r.below(max_id)
            )
        })
        .await
    };
    let page = {
        let mut r = Rng(rng.below(u64::MAX) | 1);
        get_latency(http, 200, move || {
            format!("/processes?limit=100&cursor={}", 1 + r.below(max_id))
        })
        .await
    };
    let running = get_latency(http, 3, || "/processes?state=running&limit=100".to_string()).await;
    ReadLatencies {
        get,
        filtered,
        page,
        running,
    }
}

async fn bench_scale(k: &Knobs, bin: &Path, root: &Path, rep: &mut Report) {
    let n = k.scale_records;
    let mut d = Daemon::start(bin, root, "scale", &[]).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // First the records of runs that really ran (their folders made and
    // removed), then the rest as plain records.
    let ran = k.scale_ran.min(n);
    let empty_footprint = Footprint::of(&d.data_dir);
    // A level-full folder is a detached tmpfs held by a descriptor of the
    // daemon: its open descriptors tell whether any is left.
    let fds_empty = fd_count(d.pid());
    let mut fds_settled = fds_empty;
    let (mut ran_s, mut ran_not_success, mut ran_level) = (0.0, 0, String::new());
    let mut settled_footprint = empty_footprint;
    if ran > 0 {
        let ev = Events::open(d.addr()).await;
        progress!(
            "scale: {ran} runs of `true` (autorun, ref r0..r99) from {} clients until all are idle",
            k.spawn_clients
        );
        let t0 = Instant::now();
        let (ids, not_success) =
            run_many("scale", &d, &ev, k.spawn_clients, ran, scale_run_body).await;
        ran_s = t0.elapsed().as_secs_f64();
        ran_not_success = not_success;
        drop(ev);
        ran_level = sandbox_level(d.addr(), ids[0]).await;
        require_full("scale", &ran_level);
        settled_footprint = Footprint::of(&d.data_dir);
        fds_settled = fd_count(d.pid());
        progress!(
            "scale: {ran} runs idle after {ran_s:.1} s ({not_success} not success, level {ran_level}); before {empty_footprint:?}, daemon fds (all, linking to `/` or `/tmp`) {fds_empty:?}; after {settled_footprint:?}, daemon fds {fds_settled:?}"
        );
    }
    let per_run = |f: fn(&Footprint) -> u64| {
        (f(&settled_footprint) as f64 - f(&empty_footprint) as f64) / ran.max(1) as f64
    };
    let inodes_per_run = per_run(Footprint::inodes);
    let bytes_per_run = per_run(Footprint::allocated);
    let apparent_per_run = per_run(Footprint::apparent);

    progress!(
        "scale: filling the store up to {n} records (autorun:false, ref r0..r99) from {} clients",
        k.scale_clients
    );
    let next = Arc::new(AtomicU64::new(ran));
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let cpu0 = d.cpu_secs();
    let mut tasks = Vec::new();
    for mut http in connect_many(d.addr(), k.scale_clients).await {
        let (next, done) = (next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                http.create(scale_body(i)).await.expect("create");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let reporter = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let now = (Instant::now(), done.load(Ordering::Relaxed));
                let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
                let eta = (n - ran).saturating_sub(now.1) as f64 / rate.max(1.0);
                progress!(
                    "scale: {} / {n} records ({rate:.0} creates/s over the last 10 s, ETA {eta:.0} s)",
                    ran + now.1
                );
                last = now;
            }
        })
    };
    for t in tasks {
        t.await.expect("fill task");
    }
    reporter.abort();
    let fill_time = t0.elapsed();
    let cpu1 = d.cpu_secs();
    let fill_rate = (n - ran) as f64 / fill_time.as_secs_f64();
    let rss_filled_kb = d.rss_kb();
    progress!(
        "scale: filled {n} in {:.1} s ({fill_rate:.0} creates/s; daemon CPU {:.1} s; RSS {rss_filled_kb} kB)",
        fill_time.as_secs_f64(),
        cpu1.0 - cpu0.0
    );
    let (blocks_live, bytes_live, files_live) = dir_usage(&d.data_dir);

    progress!("scale: restart (SIGTERM, wait for exit, start, poll /health every 1 ms)");
    let stop = d.stop().await;
    d.spawn();
    let ready = d.wait_ready(Duration::from_secs(600)).await;
    progress!(
        "scale: stopped in {:.1} ms; restarted and ready in {:.1} ms",
        ms(stop),
        ms(ready)
    );
    let (blocks, bytes, files) = dir_usage(&d.data_dir);
    let per_record = blocks as f64 / n as f64;
    progress!(
        "scale: data dir {:.1} MB on disk ({:.1} MB apparent, {files} files) = {per_record:.0} bytes per record; before the restart {:.1} MB on disk ({:.1} MB apparent, {files_live} files)",
        blocks as f64 / 1e6,
        bytes as f64 / 1e6,
        blocks_live as f64 / 1e6,
        bytes_live as f64 / 1e6
    );

    // The comparison store: a fresh daemon, measured alternately with the
    // full one so that disk and CPU noise hits both alike.
    let mut e = Daemon::start(bin, root, "scale-empty", &[]).await;
    let mut full = Http::connect(d.addr()).await.expect("connect");
    let mut empty = Http::connect(e.addr()).await.expect("connect");
    progress!("scale: 500 creates one at a time, alternating between the full and an empty store");
    create_latency_pair(&mut full, &mut empty, 50).await; // warm-up
    let (create_full, create_empty) = create_latency_pair(&mut full, &mut empty, 500).await;
    let create_ratio_p50 = create_full.p50 / create_empty.p50;
    let create_ratio_p99 = create_full.p99 / create_empty.p99;
    progress!(
        "scale: create p50 {:.2} p99 {:.2} ms at {n}; p50 {:.2} p99 {:.2} ms empty (×{create_ratio_p50:.2} / ×{create_ratio_p99:.2})",
        create_full.p50,
        create_full.p99,
        create_empty.p50,
        create_empty.p99
    );
    progress!("scale: reads (GET by random id, filtered and unfiltered pages at random cursors)");
    let reads_full = read_latencies(&mut full, n, &mut rng).await;
    let reads_empty = read_latencies(&mut empty, 550, &mut rng).await;
    progress!(
        "scale: at {n}: GET p50 {:.2} p99 {:.2} ms; filtered page p50 {:.2} p99 {:.2} ms; page p50 {:.2} p99 {:.2} ms; state=running page {:.1} ms",
        reads_full.get.p50,
        reads_full.get.p99,
        reads_full.filtered.p50,
        reads_full.filtered.p99,
        reads_full.page.p50,
        reads_full.page.p99,
        reads_full.running.p50
    );
    progress!(
        "scale: empty: GET p50 {:.2} p99 {:.2} ms; filtered page p50 {:.2} p99 {:.2} ms; page p50 {:.2} p99 {:.2} ms; state=running page {:.1} ms",
        reads_empty.get.p50,
        reads_empty.get.p99,
        reads_empty.filtered.p50,
        reads_empty.filtered.p99,
        reads_empty.page.p50,
        reads_empty.page.p99,
        reads_empty.running.p50
    );
    let rss_kb = d.rss_kb();
    drop((full, empty));
    d.stop().await;
    e.stop().await;

    let label = if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else {
        n.to_string()
    };
    if ran > 0 {
        rep.row(
            &format!(
                "Scale: {ran} of the {label} records ran `true` (level `{ran_level}`); host footprint per run once settled"
            ),
            format!(
                "{bytes_per_run:.0} bytes on disk ({apparent_per_run:.0} apparent), {inodes_per_run:.4} inodes"
            ),
        )
        .baseline(format!(
            "data dir + `/dev/shm` base: {} inodes, {:.1} MB on disk ({:.2} MB apparent) empty; {} inodes, {:.1} MB ({:.2} MB) after",
            empty_footprint.inodes(),
            empty_footprint.allocated() as f64 / 1e6,
            empty_footprint.apparent() as f64 / 1e6,
            settled_footprint.inodes(),
            settled_footprint.allocated() as f64 / 1e6,
            settled_footprint.apparent() as f64 / 1e6,
        ));
    }
    rep.row(
        &format!(
            "Scale: fill {label} records via the API ({} clients; the {} autorun:false ones)",
            k.scale_clients,
            n - ran
        ),
        format!(
            "{} creates/s ({:.0} s)",
            fmt_rate(fill_rate),
            fill_time.as_secs_f64()
        ),
    );
    rep.row(
        &format!("Scale: restart → `/health` ready at {label}"),
        format!("{:.0} ms", ms(ready)),
    )
    .baseline(format!("graceful stop took {:.0} ms", ms(stop)));
    rep.row(
        &format!("Scale: `GET /processes/{{id}}` at {label}, p50 / p99"),
        reads_full.get.cell(),
    )
    .baseline(format!("empty store: {}", reads_empty.get.cell()));
    rep.row(
        &format!(
            "Scale: filtered page `state=idle&ref=rK&limit=100` (1 in 100 match) at {label}, p50 / p99"
        ),
        reads_full.filtered.cell(),
    )
    .baseline(format!("empty store: {}", reads_empty.filtered.cell()));
    rep.row(
        &format!(
            "Scale: `state=running&limit=100` with nothing running at {label}, p50 / max of 3"
        ),
        format!(
            "{} / {} ms",
            fmt_ms(reads_full.running.p50),
            fmt_ms(reads_full.running.max)
        ),
    )
    .baseline(format!(
        "empty store: {} / {} ms",
        fmt_ms(reads_empty.running.p50),
        fmt_ms(reads_empty.running.max)
    ));
    rep.row(
        &format!("Scale: unfiltered page `limit=100` at {label}, p50 / p99"),
        reads_full.page.cell(),
    )
    .baseline(format!("empty store: {}", reads_empty.page.cell()));
    rep.row(
        &format!("Scale: create latency at {label}, p50 / p99"),
        create_full.cell(),
    )
    .baseline(format!("empty store: {}", create_empty.cell()))
    .ratio(create_ratio_p50)
    .target("p50 ratio near 1 (≤ 1.5)", create_ratio_p50 <= 1.5);
    rep.row(
        "Scale: data dir size per record",
        format!("{per_record:.0} bytes"),
    )
    .baseline(format!(
        "{:.1} MB on disk for {label} after restart",
        blocks as f64 / 1e6
    ));
    rep.target(
        "create latency ratio at scale (p50)",
        create_ratio_p50,
        "<= 1.5",
        create_ratio_p50 <= 1.5,
    );
    let ran_json = json!({
        "records_that_ran": ran, "ran_s": r3(ran_s), "ran_not_success": ran_not_success,
        "ran_sandbox": ran_level, "ran_clients": k.spawn_clients,
        "footprint_empty": empty_footprint.json(),
        "footprint_after_runs_settled": settled_footprint.json(),
        "inodes_per_run": inodes_per_run, "bytes_on_disk_per_run": r3(bytes_per_run),
        "bytes_apparent_per_run": r3(apparent_per_run),
        "daemon_open_fds_empty": fds_empty.0, "daemon_open_fds_after_runs_settled": fds_settled.0,
        "daemon_fds_root_or_tmp_empty": fds_empty.1,
        "daemon_fds_root_or_tmp_after_runs_settled": fds_settled.1,
    });
    rep.json.insert(
        "scale".into(),
        json!({
            "records": n, "fill_clients": k.scale_clients,
            "runs_that_ran": ran_json,
            "fill_s": r3(fill_time.as_secs_f64()), "fill_creates_per_s": r3(fill_rate),
            "fill_daemon_cpu_s": r3(cpu1.0 - cpu0.0), "rss_after_fill_kb": rss_filled_kb,
            "stop_ms": r3(ms(stop)), "restart_to_ready_ms": r3(ms(ready)),
            "get_by_id": reads_full.get.json(), "get_by_id_empty": reads_empty.get.json(),
            "filtered_page": reads_full.filtered.json(), "filtered_page_empty": reads_empty.filtered.json(),
            "filtered_page_query": "state=idle&ref=rK&limit=100&cursor=<random id> (each ref matches 1 in 100 records)",
            "page": reads_full.page.json(), "page_empty": reads_empty.page.json(),
            "page_query": "limit=100&cursor=<random id>",
            "running_page": reads_full.running.json(), "running_page_empty": reads_empty.running.json(),
            "running_page_query": "state=running&limit=100 while nothing runs (3 samples)",
            "create": create_full.json(), "create_empty": create_empty.json(),
            "create_ratio_p50": r3(create_ratio_p50), "create_ratio_p99": r3(create_ratio_p99),
            "create_method": "500 one at a time, alternating with a fresh daemon (the empty store)",
            "data_dir_bytes_on_disk": blocks, "data_dir_bytes_apparent": bytes, "data_dir_files": files,
            "data_dir_bytes_on_disk_before_restart": blocks_live,
            "data_dir_bytes_apparent_before_restart": bytes_live,
            "bytes_per_record": r3(per_record),
            "rss_after_restart_and_reads_kb": rss_kb,
        }),
    );
}

// ---------------------------------------------------------------------------
// Section 7: what each isolation step costs per spawn
// ---------------------------------------------------------------------------

/// The rows of the step table: each adds one isolation step to the row
/// above it (the last one is level `full` with `network: false`).
const STEP_ROWS: &[&str] = &[
    "raw `/bin/sh -c true` (`std::process::Command`, no folder)",
    "none: level `none` (folder on `/dev/shm` with `code` and `output`, clone + exec `sh code`)",
    "+ private tmpfs folder (`fsopen`/`fsmount`, staged through the mount fd; no namespace: the child reaches it via `/proc/<pid>/fd`)",
    "+ mount and IPC namespaces and the mount view (data dir masked, host read-only, tmpfs on `/tmp` and `/dev/shm`, own `/proc`)",
    "+ per-run uid, bounding set emptied, capabilities cleared, `no_new_privs`",
    "+ Landlock",
    "+ seccomp (= level `full`, `network: true`, the default)",
    "+ network namespace with `lo` up (= level `full`, `network: false`)",
];

/// Per-row samples, in µs: parent-side preparation (folder, staging,
/// ruleset), spawn until the child was reaped, and the folder's removal.
#[derive(Default)]
struct StepSamples {
    prepare: Vec<f64>,
    spawn: Vec<f64>,
    drop: Vec<f64>,
    total: Vec<f64>,
}

/// Times `iterations` children per row, rows interleaved (each iteration
/// runs every row once, so a change in the machine's speed hits all rows).
/// Runs on the calling thread: `Steps` holds raw pointers.
fn step_costs(dir: &Path, iterations: usize) -> Result<Vec<StepSamples>, String> {
    use cyrnel::proc::sandbox::{self, FolderLimits, Paths, Policy, Requested};
    let data_dir = dir.join("steps-data");
    fs::create_dir_all(&data_dir).map_err(|e| e.to_string())?;
    // Level none's folders go where the daemon puts them: a folder of its
    // own on /dev/shm (a tmpfs), else inside the data dir.
    let shm = PathBuf::from(format!(
        "/dev/shm/cyrnel-bench-steps-{}",
        std::process::id()
    ));
    let runs_base = if fs::create_dir_all(&shm).is_ok() {
        shm.clone()
    } else {
        data_dir.join("run")
    };
    let paths = Paths {
        data_dir: data_dir.clone(),
        secret_files: Vec::new(),
        runs_base,
        shared_dirs: Vec::new(),
    };
    // The daemon's defaults (run_folder_bytes, run_folder_inodes).
    let limits = FolderLimits {
        bytes: 64 << 20,
        inodes: 16_384,
    };
    let shell = "/bin/sh";
    let none = Policy::detect(Requested::Off, paths.clone(), limits, shell)?;
    let full = Policy::detect(Requested::Full, paths, limits, shell)?;
    let base = sandbox::default_uid_base(&data_dir);
    let uid = (base + 1, base + 1);
    let pid = std::process::id();
    // One spawn of `row`: prepare, spawn and wait, drop; µs each and in all.
    let one = |row: usize, i: usize| -> Result<[f64; 4], String> {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let t0 = Instant::now();
        if row == 0 {
            let status = Command::new("/bin/sh")
                .args(["-c", "true"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("`sh -c true` exited with {status}"));
            }
            let t = us(t0.elapsed());
            return Ok([0.0, t, 0.0, t]);
        }
        let id = (i * STEP_ROWS.len() + row) as u64;
        let mut prepared = if row == 1 {
            none.prepare(id, b"true\n", None, true)
        } else {
            full.prepare(id, b"true\n", Some(uid), row < 7)
        }
        .map_err(|e| format!("{}: prepare: {e}", STEP_ROWS[row]))?;
        let s = std::mem::take(&mut prepared.steps);
        if row == 2 {
            // The folder exists but no namespace: the child (still
            // root) enters it through this process's mount descriptor.
            let fd = s
                .mounts
                .as_ref()
                .map(|m| m.private_tmp)
                .ok_or("level full prepared no mount")?;
            prepared.cwd = PathBuf::from(format!("/proc/{pid}/fd/{fd}/cyrnel"));
        }
        prepared.steps = sandbox::Steps {
            unshare: if row >= 3 { s.unshare } else { 0 },
            mounts: if row >= 3 { s.mounts } else { None },
            loopback_up: row >= 7 && s.loopback_up,
            drop_bounding: row >= 4 && s.drop_bounding,
            no_new_privs: row >= 4 && s.no_new_privs,
            landlock: if row >= 5 { s.landlock } else { None },
            seccomp: if row >= 6 { s.seccomp } else { None },
        };
        let credentials = (row >= 4).then_some(uid);
        let t1 = Instant::now();
        let exit = cyrnel::proc::probe_spawn(shell, &prepared, credentials)
            .map_err(|e| format!("{}: spawn: {e}", STEP_ROWS[row]))?;
        if exit != Some(0) {
            return Err(format!("{}: the child ended with {exit:?}", STEP_ROWS[row]));
        }
        let t2 = Instant::now();
        drop(prepared);
        let t3 = Instant::now();
        Ok([us(t1 - t0), us(t2 - t1), us(t3 - t2), us(t3 - t0)])
    };
    let mut out: Vec<StepSamples> = STEP_ROWS.iter().map(|_| StepSamples::default()).collect();
    let warmup = 20;
    // Rows with `drop_bounding` empty the spawning thread's bounding set
    // once (`proc::spawn`), as the daemon's starter thread does; a root
    // child of such a thread execs without capabilities. The rows before
    // them (raw, `none`, the root child entering its folder through
    // `/proc/<pid>/fd`) therefore run on a thread of their own, which
    // keeps its bounding set; the timing is taken on that thread.
    std::thread::scope(|scope| {
        let (to_plain, plain_rx) = std::sync::mpsc::channel::<(usize, usize)>();
        let (plain_tx, from_plain) = std::sync::mpsc::channel();
        let one = &one;
        scope.spawn(move || {
            for (row, i) in plain_rx {
                if plain_tx.send(one(row, i)).is_err() {
                    return;
                }
            }
        });
        for i in 0..warmup + iterations {
            for (row, samples) in out.iter_mut().enumerate() {
                let [prepare, spawn, drop, total] = if row < 4 {
                    to_plain.send((row, i)).map_err(|e| e.to_string())?;
                    from_plain.recv().map_err(|e| e.to_string())??
                } else {
                    one(row, i)?
                };
                if i >= warmup {
                    samples.prepare.push(prepare);
                    samples.spawn.push(spawn);
                    samples.drop.push(drop);
                    samples.total.push(total);
                }
            }
        }
        Ok::<(), String>(())
    })?;
    let _ = fs::remove_dir_all(&shm);
    Ok(out)
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

async fn bench_steps(k: &Knobs, root: &Path, rep: &mut Report) {
    let n = k.step_spawns;
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    progress!(
        "steps: {n} children per row after 20 warm-ups, {} rows interleaved, one thread",
        STEP_ROWS.len()
    );
    let dir = root.to_path_buf();
    // A thread of its own, which ends with the section: level `full`
    // empties the spawning thread's capability bounding set.
    let res = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || step_costs(&dir, n))
            .join()
            .expect("step thread")
    })
    .await
    .expect("step thread");
    let rows = match res {
        Ok(rows) => rows,
        Err(e) if !is_root => {
            progress!("steps: level full is not available without root ({e}); no step table");
            rep.json
                .insert("isolation_steps".into(), json!({"skipped": e}));
            return;
        }
        Err(e) => panic!("steps: {e}"),
    };
    let mut table = String::new();
    table.push_str(
        "| Step (cumulative) | per spawn p50 µs | mean µs | step's cost (p50 Δ) µs | prepare p50 µs | spawn + wait p50 µs | folder removal p50 µs |\n",
    );
    table.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    let mut json_rows = Vec::new();
    let mut prev: Option<f64> = None;
    for (name, s) in STEP_ROWS.iter().zip(&rows) {
        let p50 = |v: &[f64]| summarize(v).p50;
        let total = summarize(&s.total);
        let delta = prev.map(|p| total.p50 - p);
        let _ = writeln!(
            table,
            "| {name} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} |",
            total.p50,
            total.mean,
            delta.map_or("–".to_string(), |d| format!("{d:+.0}")),
            p50(&s.prepare),
            p50(&s.spawn),
            p50(&s.drop),
        );
        progress!(
            "steps: {name}: p50 {:.0} µs, mean {:.0} µs, p99 {:.0} µs",
            total.p50,
            total.mean,
            total.p99
        );
        json_rows.push(json!({
            "step": name, "n": total.n,
            "total_us": {"p50": r3(total.p50), "mean": r3(total.mean), "p99": r3(total.p99), "max": r3(total.max)},
            "delta_p50_us": delta.map(r3),
            "prepare_us": {"p50": r3(p50(&s.prepare)), "mean": r3(mean(&s.prepare))},
            "spawn_wait_us": {"p50": r3(p50(&s.spawn)), "mean": r3(mean(&s.spawn))},
            "folder_drop_us": {"p50": r3(p50(&s.drop)), "mean": r3(mean(&s.drop))},
        }));
        prev = Some(total.p50);
    }
    rep.steps_table = table;
    rep.json.insert(
        "isolation_steps".into(),
        json!({
            "children_per_row": n, "warmup_per_row": 20,
            "method": "one thread; every iteration runs each row once (interleaved); a row is Policy::prepare + probe_spawn (clone, the steps, exec `/bin/sh <cwd>/code` with `true`, waitid) + dropping the Prepared (the folder); the steps of level full are switched off one by one in the Prepared's Steps",
            "rows": json_rows,
        }),
    );
}

// ---------------------------------------------------------------------------
// Section 8: spawn throughput after many runs were created, ran and deleted
// ---------------------------------------------------------------------------

/// `GET /processes/{id}`'s `sandbox` field: the isolation level the run got.
async fn sandbox_level(addr: SocketAddr, id: u64) -> String {
    let mut http = Http::connect(addr).await.expect("connect");
    let body = http
        .expect_ok(Method::GET, &format!("/processes/{id}"), None)
        .await
        .expect("GET a record");
    let v: Value = serde_json::from_slice(&body).expect("record JSON");
    v["sandbox"].as_str().unwrap_or("(absent)").to_string()
}

/// Fails loudly when a root harness measured runs that were not at level
/// `full`: the figures would not be those of the isolated daemon.
fn require_full(section: &str, level: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && level != "full" {
        panic!(
            "{section}: the runs measured got sandbox level {level:?}, not \"full\", although the harness runs as root"
        );
    }
}

/// What a directory tree holds: inodes (every entry, directories and the
/// top one included), allocated bytes (on disk) and apparent bytes.
#[derive(Clone, Copy, Default, Debug)]
struct Usage {
    inodes: u64,
    allocated: u64,
    apparent: u64,
}

impl Usage {
    fn of(path: &Path) -> Usage {
        let Ok(md) = fs::symlink_metadata(path) else {
            return Usage::default();
        };
        let mut u = Usage::default();
        u.add(&md);
        walk_tree(path, |md| u.add(md));
        u
    }

    fn add(&mut self, md: &fs::Metadata) {
        self.inodes += 1;
        self.allocated += md.blocks() * 512;
        self.apparent += md.len();
    }

    fn json(&self) -> Value {
        json!({"inodes": self.inodes, "bytes_on_disk": self.allocated, "bytes_apparent": self.apparent})
    }
}

/// Open descriptors of a process (its `/proc/<pid>/fd` entries): all of
/// them, and those whose link reads `/` or `/tmp`: the daemon's `O_PATH`
/// descriptor on the root (level `full`'s Landlock rule) and every
/// level-`full` run folder it holds (a tmpfs that reads `/` while
/// detached and `/tmp` once the run mounted it there).
fn fd_count(pid: u32) -> (usize, usize) {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let (mut all, mut root) = (0, 0);
    for e in dir.flatten() {
        all += 1;
        if fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/") || l == Path::new("/tmp")) {
            root += 1;
        }
    }
    (all, root)
}

/// The run folder base a daemon on `data_dir` uses on `/dev/shm` (levels
/// `landlock` and `none`; created at every level): `/dev/shm/cyrnel-<tag>`.
fn shm_runs_base(data_dir: &Path) -> PathBuf {
    let data_dir = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    let tag = format!(
        "{:08x}",
        cyrnel::proc::sandbox::default_uid_base(&data_dir) >> 16
    );
    Path::new("/dev/shm").join(format!("cyrnel-{tag}"))
}

/// What a daemon leaves on the host: its data dir, and its `/dev/shm` run
/// folder base.
#[derive(Clone, Copy, Debug)]
struct Footprint {
    data: Usage,
    shm: Usage,
}

impl Footprint {
    fn of(data_dir: &Path) -> Footprint {
        Footprint {
            data: Usage::of(data_dir),
            shm: Usage::of(&shm_runs_base(data_dir)),
        }
    }

    fn inodes(&self) -> u64 {
        self.data.inodes + self.shm.inodes
    }

    fn allocated(&self) -> u64 {
        self.data.allocated + self.shm.allocated
    }

    fn apparent(&self) -> u64 {
        self.data.apparent + self.shm.apparent
    }

    fn json(&self) -> Value {
        json!({"data_dir": self.data.json(), "shm_runs_base": self.shm.json()})
    }
}

/// Creates `total` runs (autorun; `body(i)` for the i-th) from `clients` connections,
/// waits until every one is idle; returns the ids and how many did not end
/// in `success`. Progress every 10 s.
async fn run_many(
    section: &'static str,
    d: &Daemon,
    ev: &Events,
    clients: usize,
    total: u64,
    body: fn(u64) -> Bytes,
) -> (Vec<u64>, usize) {
    let idle0 = ev.count("idle");
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mut http in connect_many(d.addr(), clients).await {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                ids.push(http.create_queued(body(i)).await.expect("create"));
            }
            ids
        }));
    }
    let reporter = {
        let shared = ev.shared.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let idle = {
                    let st = shared.st.lock().expect("events lock");
                    st.counts.get("idle").copied().unwrap_or(0) - idle0
                };
                progress!(
                    "{section}: {idle} / {total} runs idle after {:.0} s",
                    t0.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut ids = Vec::with_capacity(total as usize);
    for t in tasks {
        ids.extend(t.await.expect("client task"));
    }
    ev.wait_count("idle", idle0 + total, Duration::from_secs(3600))
        .await;
    reporter.abort();
    let not_success = ev.not_success(&ids);
    ev.clear_seen();
    ids.sort_unstable();
    (ids, not_success)
}

async fn bench_churn(k: &Knobs, bin: &Path, root: &Path, rep: &mut Report) {
    let n = k.churn_runs;
    let clients = k.spawn_clients;
    let grace = k.kill_grace_ms.to_string();
    let mut d = Daemon::start(
        bin,
        root,
        "churn",
        &[
            ("CYRNEL_KILL_GRACE_MS", grace.as_str()),
            ("CYRNEL_EVENT_BUFFER", "8192"),
        ],
    )
    .await;
    let ev = Events::open(d.addr()).await;
    let before = Footprint::of(&d.data_dir);
    progress!(
        "churn: {n} runs of `true` (autorun) from {clients} clients until all are idle, then DELETE each"
    );
    let t0 = Instant::now();
    let (ids, not_success) = run_many("churn", &d, &ev, clients, n, |_| {
        Bytes::from_static(br#"{"code":"true"}"#)
    })
    .await;
    let ran_s = t0.elapsed().as_secs_f64();
    let level = sandbox_level(d.addr(), ids[0]).await;
    require_full("churn", &level);
    progress!(
        "churn: {n} runs idle after {ran_s:.1} s ({:.0}/s; {not_success} not success; level {level})",
        n as f64 / ran_s
    );
    let t1 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for mut http in connect_many(d.addr(), clients).await {
        let (next, ids) = (next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                http.expect_ok(Method::DELETE, &format!("/processes/{id}"), None)
                    .await
                    .expect("DELETE");
            }
        }));
    }
    for t in tasks {
        t.await.expect("delete task");
    }
    let deleted_s = t1.elapsed().as_secs_f64();
    ev.clear_seen();
    let after = Footprint::of(&d.data_dir);
    progress!(
        "churn: deleted {n} in {deleted_s:.1} s; data dir {} → {} inodes, /dev/shm base {} → {} inodes",
        before.data.inodes,
        after.data.inodes,
        before.shm.inodes,
        after.shm.inodes
    );
    let rounds = k.spawn_rounds.max(1);
    let runs = k.spawn_runs;
    let mut all = Vec::new();
    for round in 1..=rounds {
        let r = spawn_round(runs, clients, &d, &ev).await;
        progress!(
            "churn: round {round}/{rounds}: baseline {:.0} spawns/s; daemon {:.0} runs/s ({} not success); ratio {:.2}; machine {:.0} % busy",
            r.base_rate,
            r.rate,
            r.not_success,
            r.rate / r.base_rate,
            r.machine_busy * 100.0
        );
        all.push(r);
    }
    let level_after = sandbox_level(d.addr(), all[0].first_id).await;
    require_full("churn", &level_after);
    drop(ev);
    d.stop().await;
    let rate = median(all.iter().map(|r| r.rate).collect());
    let base_rate = median(all.iter().map(|r| r.base_rate).collect());
    let ratio = median(all.iter().map(|r| r.rate / r.base_rate).collect());
    let label = if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    };
    rep.row(
        &format!(
            "Spawn throughput right after {label} runs were created, ran and deleted, level `{level_after}`, {clients} clients"
        ),
        format!("{} runs/s", fmt_rate(rate)),
    )
    .baseline(format!(
        "{} spawns/s (`/bin/sh -c true`, {clients} threads)",
        fmt_rate(base_rate)
    ))
    .ratio(ratio)
    .target("ratio ≥ 0.5", ratio >= 0.5);
    rep.target(
        &format!("spawn throughput ratio after {label} deleted runs"),
        ratio,
        ">= 0.5",
        ratio >= 0.5,
    );
    rep.json.insert(
        "churn".into(),
        json!({
            "runs_created_ran_deleted": n, "clients": clients, "sandbox": level_after,
            "ran_s": r3(ran_s), "ran_not_success": not_success, "delete_s": r3(deleted_s),
            "footprint_before": before.json(), "footprint_after_delete": after.json(),
            "daemon_runs_per_s": r3(rate), "baseline_spawns_per_s": r3(base_rate),
            "ratio": r3(ratio), "ratio_is": "median of the per-round ratios",
            "per_round": all.iter().map(|r| json!({
                "baseline_spawns_per_s": r3(r.base_rate), "daemon_runs_per_s": r3(r.rate),
                "ratio": r3(r.rate / r.base_rate), "not_success": r.not_success,
                "daemon_cpu_s": r3(r.daemon_cpu_s), "machine_busy": r3(r.machine_busy),
            })).collect::<Vec<_>>(),
        }),
    );
}

// ---------------------------------------------------------------------------
// Main
// ---------------------------------------------------------------------------

/// `/proc/loadavg`'s 1, 5 and 15 minute averages: how busy the machine was
/// (other work on the two cores shows up in every number here).
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts a section: flushes what earlier sections left dirty (thousands
/// of staged files, RocksDB flushes), so that their writeback does not
/// land in this section's latency tails, and notes the load average.
fn load(rep: &mut Report, section: &str) {
    let t0 = Instant::now();
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    let synced = t0.elapsed();
    let l = loadavg();
    progress!(
        "{section}: sync(2) took {:.0} ms; load average {l}",
        synced.as_secs_f64() * 1e3
    );
    rep.json
        .entry("loadavg_at_start")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("object")
        .insert(section.to_string(), json!(l));
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn machine() -> Value {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_kb = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({"cores": cores, "kernel": kernel, "cpu": cpu, "mem_mb": mem_kb / 1024,
           "temp_fs": filesystem(&std::env::temp_dir())})
}

/// The file system holding `path` (from /proc/mounts), and for ext4 whether
/// it has a journal: it decides what an fsync and a file creation cost.
fn filesystem(path: &Path) -> String {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let best = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && path.starts_with(f[1])).then(|| (f[0], f[1], f[2], f[3]))
        })
        .max_by_key(|(_, mnt, _, _)| mnt.len());
    let Some((dev, mnt, fstype, opts)) = best else {
        return "unknown".to_string();
    };
    let mut out = format!("{fstype} on {dev} at {mnt} ({opts})");
    if fstype == "ext4" {
        let name = Path::new(dev)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let journal =
            fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task")).unwrap_or_default();
        if journal.trim() == "<none>" {
            out.push_str(", no journal");
        }
    }
    out
}

fn git(args: &[&str]) -> String {
    Command::new("git")
        .args(args)
        .current_dir(MANIFEST_DIR)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline-server") {
        let port = args[i + 1].parse().expect("port");
        baseline_server_main(port, Path::new(&args[i + 2]));
        return;
    }
    START.get_or_init(Instant::now);
    raise_nofile();
    let knobs = Knobs::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(knobs));
}

async fn run(k: Knobs) {
    let bin = daemon_binary();
    let machine = machine();
    let date = iso8601(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64,
    );
    let commit = Some(git(&["rev-parse", "--short", "HEAD"]))
        .filter(|c| !c.is_empty())
        .or_else(|| std::env::var("BENCH_COMMIT").ok())
        .unwrap_or_default();
    let dirty = !git(&[
        "status",
        "--porcelain",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
    ])
    .is_empty();
    progress!(
        "cyrneld benchmarks: {} ({}{}), machine {machine}, knobs {k:?}",
        bin.display(),
        commit,
        if dirty { ", src modified" } else { "" }
    );
    // Kept when the harness fails (for the daemon logs), removed at the end
    // of a complete run unless BENCH_KEEP is set.
    let root = tempfile::Builder::new()
        .prefix("cyrnel-bench-")
        .tempdir()
        .expect("temp dir")
        .keep();
    progress!("data dirs and daemon logs under {}", root.display());
    let load_1m: f64 = loadavg()
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load_1m > 1.0 {
        progress!(
            "WARNING: load average {} at start: other work shares the cores, expect noisy numbers",
            loadavg()
        );
    }
    let mut rep = Report::default();
    let t_all = Instant::now();

    if ["spawn", "latency", "read", "durable"]
        .iter()
        .any(|s| k.wants(s))
    {
        let grace = k.kill_grace_ms.to_string();
        let d = Daemon::start(
            &bin,
            &root,
            "main",
            &[
                ("CYRNEL_KILL_GRACE_MS", grace.as_str()),
                ("CYRNEL_EVENT_BUFFER", "8192"),
            ],
        )
        .await;
        let tracking = d.tracking();
        progress!("main: run tracking: {tracking}");
        rep.json.insert("run_tracking".into(), json!(tracking));
        let ev = Events::open(d.addr()).await;
        let mut some_id = None;
        if k.wants("spawn") {
            load(&mut rep, "spawn");
            some_id = Some(bench_spawn(&k, &d, &ev, &mut rep).await);
            ev.clear_seen();
        }
        if k.wants("latency") {
            load(&mut rep, "latency");
            bench_latency(&k, &d, &ev, &mut rep).await;
        }
        drop(ev);
        if k.wants("read") {
            load(&mut rep, "read");
            let id = match some_id {
                Some(id) => id,
                None => {
                    let mut http = Http::connect(d.addr()).await.expect("connect");
                    http.create(Bytes::from_static(br#"{"code":"true"}"#))
                        .await
                        .expect("create")
                }
            };
            bench_read(&k, &d, &root, id, &mut rep).await;
        }
        if k.wants("durable") {
            load(&mut rep, "durable");
            bench_durable(&k, &d, &mut rep).await;
        }
        let mut d = d;
        d.stop().await;
    }
    if k.wants("memory") {
        load(&mut rep, "memory");
        bench_memory(&k, &bin, &root, &mut rep).await;
    }
    if k.wants("steps") {
        load(&mut rep, "steps");
        bench_steps(&k, &root, &mut rep).await;
    }
    if k.wants("churn") {
        load(&mut rep, "churn");
        bench_churn(&k, &bin, &root, &mut rep).await;
    }
    if k.wants("scale") {
        load(&mut rep, "scale");
        bench_scale(&k, &bin, &root, &mut rep).await;
    }
    if k.wants("reclaim") {
        load(&mut rep, "reclaim");
        bench_reclaim(&bin, &root, &mut rep).await;
    }
    if k.wants("soak") {
        load(&mut rep, "soak");
        bench_soak(&bin, &root, &mut rep).await;
    }

    let total = t_all.elapsed();
    let table = rep.table();
    let met = rep.targets.iter().filter(|t| t["met"] == true).count();
    let mut out = rep.json;
    out.insert("date".into(), json!(date));
    out.insert("machine".into(), machine.clone());
    out.insert("commit".into(), json!(commit));
    out.insert("src_modified".into(), json!(dirty));
    out.insert("daemon_binary".into(), json!(bin.display().to_string()));
    out.insert(
        "daemon_binary_from_env".into(),
        json!(std::env::var_os("CYRNELD_BIN").is_some()),
    );
    out.insert("loadavg_end".into(), json!(loadavg()));
    out.insert("duration_s".into(), json!(r3(total.as_secs_f64())));
    out.insert("targets".into(), Value::Array(rep.targets.clone()));
    out.insert("table_markdown".into(), json!(table));
    if !rep.steps_table.is_empty() {
        out.insert("steps_table_markdown".into(), json!(rep.steps_table));
    }
    let path = results_path();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).expect("create results dir");
    }
    fs::write(
        &path,
        serde_json::to_vec_pretty(&Value::Object(out)).expect("json"),
    )
    .expect("write results");

    if std::env::var_os("BENCH_KEEP").is_none() {
        let _ = fs::remove_dir_all(&root);
    }
    println!();
    println!(
        "cyrneld benchmarks, {date}, {} cores, Linux {}, commit {commit}{}",
        machine["cores"],
        machine["kernel"].as_str().unwrap_or(""),
        if dirty { " (src modified)" } else { "" }
    );
    println!();
    print!("{table}");
    println!();
    if !rep.steps_table.is_empty() {
        println!("Isolation steps, cost per spawn (one thread, rows interleaved):");
        println!();
        print!("{}", rep.steps_table);
        println!();
    }
    println!(
        "Targets met: {met} of {}. Total {:.0} s. Results: {}",
        rep.targets.len(),
        total.as_secs_f64(),
        path.display()
    );
}

// ---------------------------------------------------------------------------
// Section 5: disk given back by deletes (bytes on disk per record)
// ---------------------------------------------------------------------------

/// Writes `BENCH_RECLAIM_RECORDS` records (each printing 10 KB), deletes
/// them all through the API and reports the data dir's bytes per record
/// after writing and once the reclaim has settled (no restart).
async fn bench_reclaim(bin: &Path, root: &Path, rep: &mut Report) {
    let n: usize = knob("BENCH_RECLAIM_RECORDS", 2000);
    let mut d = Daemon::start(bin, root, "reclaim", &[]).await;
    let body = Bytes::from_static(br#"{"code":"head -c 10000 /dev/zero | tr '\\0' x"}"#);
    progress!("reclaim: writing {n} records of 10 KB output from 8 clients");
    let ids = create_many(d.addr(), 8, n, body).await;
    let mut http = Http::connect(d.addr()).await.expect("connect");
    for id in &ids {
        loop {
            let (_, b) = http.get(&format!("/processes/{id}")).await.expect("get");
            if find(&b, br#""state":"idle""#).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let db = d.data_dir.join("db");
    let written = dir_usage(&db).0;
    progress!("reclaim: {n} idle, db {written} bytes; deleting them all");
    for id in &ids {
        http.expect_ok(Method::DELETE, &format!("/processes/{id}"), None)
            .await
            .expect("delete");
    }
    // Settled: the size has not dropped for 3 s (at most 120 s).
    let t0 = Instant::now();
    let (mut last, mut since) = (dir_usage(&db).0, Instant::now());
    while since.elapsed() < Duration::from_secs(3) && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = dir_usage(&db).0;
        if now < last {
            (last, since) = (now, Instant::now());
        }
    }
    let settled_s = since.duration_since(t0).as_secs_f64();
    progress!("reclaim: db {last} bytes {settled_s:.1} s after the deletes");
    d.stop().await;
    let per_written = written as f64 / n as f64;
    let per_deleted = last as f64 / n as f64;
    rep.row(
        &format!("Disk per record after {n} written and deleted (10 KB output each)"),
        format!("{per_deleted:.0} B"),
    )
    .baseline(format!("{per_written:.0} B per record while they existed"))
    .ratio(per_deleted / per_written);
    rep.json.insert(
        "reclaim".into(),
        json!({
            "records": n, "db_bytes_written": written, "db_bytes_after_delete": last,
            "bytes_per_record_written": r3(per_written),
            "bytes_per_record_after_delete": r3(per_deleted),
            "settled_after_s": r3(settled_s),
        }),
    );
}

// ---------------------------------------------------------------------------
// Section 6: soak (`make soak`; only when BENCH_ONLY names it)
// ---------------------------------------------------------------------------

/// Mixed load for `BENCH_SOAK_SECS` (900) from `BENCH_SOAK_CLIENTS` (12)
/// clients: runs printing up to 200 KB whose stdout is followed to the
/// end, `sleep`s killed while running, and deletes of half the settled
/// records; the daemon's RSS is sampled every 10 s, and once more after a
/// list of every record. Target: peak RSS ≤ 64 MB with the default
/// `storage_memory_bytes`.
async fn bench_soak(bin: &Path, root: &Path, rep: &mut Report) {
    let secs: u64 = knob("BENCH_SOAK_SECS", 900);
    let clients: usize = knob("BENCH_SOAK_CLIENTS", 12);
    // Empty: the daemon's default budget.
    let budget: String = knob("BENCH_SOAK_MEMORY_BYTES", String::new());
    let mut env = vec![
        ("CYRNEL_DEFAULT_TIMEOUT_MS", "0"),
        ("CYRNEL_KILL_GRACE_MS", "200"),
    ];
    if !budget.is_empty() {
        env.push(("CYRNEL_STORAGE_MEMORY_BYTES", budget.as_str()));
    }
    let mut d = Daemon::start(bin, root, "soak", &env).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_kb = d.rss_kb();
    progress!("soak: {clients} clients for {secs} s; RSS at start {start_kb} kB");
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (stop, runs, addr) = (stop.clone(), runs.clone(), d.addr());
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(addr).await.expect("connect");
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
            while !stop.load(Ordering::Relaxed) {
                let roll = rng.below(10);
                let body = if roll == 0 {
                    Bytes::from_static(br#"{"code":"sleep 30"}"#)
                } else {
                    let n = rng.below(200_000);
                    Bytes::from(format!(
                        r#"{{"code":"head -c {n} /dev/zero | tr '\\0' x"}}"#
                    ))
                };
                let Ok(id) = http.create(body).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                runs.fetch_add(1, Ordering::Relaxed);
                if roll == 0 {
                    loop {
                        let (_, b) = http.get(&format!("/processes/{id}")).await.expect("get");
                        if find(&b, br#""state":"running""#).is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let _ = http.kill(id).await;
                } else {
                    // Follow stdout to the end: it ends when the run settles.
                    let _ = http
                        .get(&format!("/processes/{id}/stdout?follow=true"))
                        .await;
                }
                loop {
                    let (_, b) = http.get(&format!("/processes/{id}")).await.expect("get");
                    if find(&b, br#""state":"idle""#).is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if rng.below(2) == 0 {
                    let _ = http
                        .call(Method::DELETE, &format!("/processes/{id}"), None)
                        .await;
                }
            }
        }));
    }
    let mut samples: Vec<(u64, u64)> = vec![(0, start_kb)];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(10).min(Duration::from_secs(secs))).await;
        let kb = d.rss_kb();
        let t = t0.elapsed().as_secs();
        samples.push((t, kb));
        progress!(
            "soak: {t:>4} s RSS {kb} kB, {} runs",
            runs.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let total_runs = runs.load(Ordering::Relaxed);
    let peak_load_kb = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let mut http = Http::connect(d.addr()).await.expect("connect");
    let (_, list) = http.get("/processes").await.expect("list");
    let after_list_kb = d.rss_kb();
    let peak_kb = peak_load_kb.max(after_list_kb);
    progress!(
        "soak: {total_runs} runs; peak RSS {peak_load_kb} kB under load, {after_list_kb} kB after listing every record ({} bytes)",
        list.len()
    );
    d.stop().await;
    let peak_mb = peak_kb as f64 / 1024.0;
    rep.row(
        &format!("Daemon RSS peak, {secs} s mixed load ({total_runs} runs, {clients} clients)"),
        format!("{peak_mb:.1} MB"),
    )
    .baseline(format!("{:.1} MB at start", start_kb as f64 / 1024.0))
    .target("≤ 64 MB", peak_mb <= 64.0);
    rep.target("soak peak RSS (MB)", peak_mb, "<= 64", peak_mb <= 64.0);
    let series: Vec<Value> = samples.iter().map(|(t, kb)| json!([t, kb])).collect();
    rep.json.insert(
        "soak".into(),
        json!({
            "secs": secs, "clients": clients, "runs": total_runs,
            "rss_start_kb": start_kb, "rss_peak_under_load_kb": peak_load_kb,
            "rss_after_full_list_kb": after_list_kb, "rss_series_s_kb": series,
        }),
    );
}
