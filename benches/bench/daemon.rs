//! The daemon under test: start, stop, CPU and memory of its process, data dir usage.

use crate::*;

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Settings every daemon of this harness gets: every rate limit off
/// (per-route and global; a daemon without rate limiting ignores them).
pub(crate) const COMMON_ENV: &[(&str, &str)] = &[
    ("CYRNEL_RATE_LIMIT_CREATE_PER_MIN", "0"),
    ("CYRNEL_RATE_LIMIT_RUN_PER_MIN", "0"),
    ("CYRNEL_RATE_LIMIT_KILL_PER_MIN", "0"),
    ("CYRNEL_RATE_LIMIT_MAX", "0"),
];

/// `program` without the harness's own `CYRNEL_*` settings: a daemon
/// gets exactly what the section gives it.
pub(crate) fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CYRNEL_") {
            cmd.env_remove(&k);
        }
    }
    cmd
}

pub(crate) struct Daemon {
    pub(crate) name: String,
    pub(crate) bin: PathBuf,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) data_dir: PathBuf,
    pub(crate) log_dir: PathBuf,
    pub(crate) port: u16,
    pub(crate) child: Option<Child>,
    pub(crate) spawned_at: Instant,
    pub(crate) starts: u32,
}

impl Daemon {
    /// Starts a daemon on a fresh data dir under `root` and waits for
    /// `/health`.
    pub(crate) async fn start(bin: &Path, root: &Path, name: &str, env: &[(&str, &str)]) -> Daemon {
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

    pub(crate) fn spawn(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        self.port = free_port();
        let log_path = self
            .log_dir
            .join(format!("{}-{}.log", self.name, self.starts));
        let log = fs::File::create(&log_path).expect("create daemon log");
        let mut cmd = clean_command(&self.bin);
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

    pub(crate) fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon running").id()
    }

    /// How the daemon says it tracks runs (cgroup v2 or process groups),
    /// from its start-up log.
    pub(crate) fn tracking(&self) -> String {
        let path = self
            .log_dir
            .join(format!("{}-{}.log", self.name, self.starts));
        let text = fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .find(|l| l.contains("cgroup"))
            .map(|l| l.split_once(": ").map_or(l, |(_, m)| m).trim().to_string())
            .unwrap_or_else(|| "process groups (no cgroup support in this build)".to_string())
    }

    pub(crate) fn log_tail(&self) -> String {
        let path = self
            .log_dir
            .join(format!("{}-{}.log", self.name, self.starts));
        let text = fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Polls `/health` (a fresh connection each time, 1 ms apart) and returns
    /// the time since the process was spawned.
    pub(crate) async fn wait_ready(&mut self, limit: Duration) -> Duration {
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
    pub(crate) async fn stop(&mut self) -> Duration {
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

    pub(crate) fn rss_kb(&self) -> u64 {
        proc_status_field(self.pid(), "VmRSS").expect("VmRSS")
    }

    /// User + system CPU seconds of the daemon itself, and of its reaped
    /// children (the supervised runs).
    pub(crate) fn cpu_secs(&self) -> (f64, f64) {
        cpu_secs_of(&format!("/proc/{}/stat", self.pid()))
    }
}

/// Clock ticks per second (`/proc`'s CPU times are in ticks).
pub(crate) fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// (own, reaped children's) CPU seconds of a process, from its stat file.
pub(crate) fn cpu_secs_of(stat_path: &str) -> (f64, f64) {
    let stat = fs::read_to_string(stat_path).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let hz = ticks_per_sec();
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

pub(crate) fn proc_status_field(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

pub(crate) async fn health_ok(addr: SocketAddr) -> bool {
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
pub(crate) fn walk_tree(path: &Path, mut f: impl FnMut(&fs::Metadata)) {
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
pub(crate) fn dir_usage(path: &Path) -> (u64, u64, u64) {
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
