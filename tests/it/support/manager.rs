//! A service manager for tests on machines without systemd: `manager.py`
//! (its header says what of systemd it implements: the notify socket, the
//! fd store, `Restart=on-failure` with `LISTEN_FDS`, a child subreaper)
//! started here, its events read line by line from its stdout and folded
//! into a [`ManagerState`], its commands (`stop`, `list`, `restart`)
//! written to its stdin.
//!
//! [`Manager`] runs any command under it (the tests of the stand-in itself
//! use small Python daemons); [`ManagedDaemon`] runs `cyrneld` the way
//! [`Daemon`] does (same options, data dir, log files, HTTP helpers through
//! `Deref`), but started, restarted after a crash and stopped by the
//! stand-in.
//!
//! Every wait blocks on the next event with the harness' `DEADLINE` and
//! fails with everything the stand-in reported; nothing sleeps.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use super::*;

/// The stand-in.
pub const MANAGER_PY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/support/manager.py");

/// The packaged unit, whose settings the stand-in takes by default.
pub const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/platform/cyrneld.service");

/// The value of `KEY=` in the packaged unit (the last one), if any.
pub fn unit_setting(key: &str) -> Option<String> {
    let unit = fs::read_to_string(UNIT).expect("read platform/cyrneld.service");
    unit.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .next_back()
        .map(str::to_string)
}

/// How the stand-in runs the daemon.
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    fdstore_max: usize,
    hold_restarts: bool,
    start_limit_burst: u32,
    timeout_stop_sec: f64,
    abstract_socket: bool,
}

impl Default for ManagerOptions {
    /// The unit's `FileDescriptorStoreMax=` and `TimeoutStopSec=`, systemd's
    /// start limit (5 starts in 10 s), no restart delay (the unit's
    /// `RestartSec=` only makes tests slower), and the notify socket at a
    /// path, as systemd's `/run/systemd/notify`.
    fn default() -> Self {
        let fdstore_max = unit_setting("FileDescriptorStoreMax")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout_stop_sec = unit_setting("TimeoutStopSec")
            .and_then(|v| v.trim_end_matches('s').parse().ok())
            .unwrap_or(90.0);
        ManagerOptions {
            fdstore_max,
            hold_restarts: false,
            start_limit_burst: 5,
            timeout_stop_sec,
            abstract_socket: false,
        }
    }
}

impl ManagerOptions {
    pub fn new() -> Self {
        Self::default()
    }

    /// `FileDescriptorStoreMax=`.
    pub fn fdstore_max(mut self, n: usize) -> Self {
        self.fdstore_max = n;
        self
    }

    /// `StartLimitBurst=` within 10 s; 0: no limit (many crashes in a row).
    pub fn start_limit_burst(mut self, n: u32) -> Self {
        self.start_limit_burst = n;
        self
    }

    /// `TimeoutStopSec=`: SIGKILL after this long a stop.
    pub fn timeout_stop_sec(mut self, secs: f64) -> Self {
        self.timeout_stop_sec = secs;
        self
    }

    /// A crashed daemon stays down until [`Manager::kill9_then`] has done
    /// what it does meanwhile (instead of `RestartSec=`, which would only
    /// make that likely).
    pub fn hold_restarts(mut self) -> Self {
        self.hold_restarts = true;
        self
    }

    /// `NOTIFY_SOCKET=@name` (Linux's abstract namespace) instead of a path.
    pub fn abstract_socket(mut self) -> Self {
        self.abstract_socket = true;
        self
    }
}

/// Everything the stand-in has reported, folded.
#[derive(Clone, Debug, Default)]
pub struct ManagerState {
    /// Every event line, in order.
    pub events: Vec<String>,
    /// The names in the store, in the order a restart passes them
    /// (`LISTEN_FDNAMES`: the most recently stored first).
    pub store: Vec<String>,
    /// The main process (from `started`), until it exits.
    pub main_pid: Option<u32>,
    /// The main process once it sent READY=1, until it exits.
    pub ready: Option<u32>,
    /// Per start: its pid and the names it was passed (`LISTEN_FDNAMES`).
    pub starts: Vec<(u32, Vec<String>)>,
    /// Ends of main processes: pid and how (`exited 0`, `killed SIGKILL`).
    pub exits: Vec<(u32, String)>,
    /// Other processes the stand-in reaped (orphans): pid and how.
    pub reaped: Vec<(u32, String)>,
    /// `STATUS=` texts: sender and text.
    pub statuses: Vec<(u32, String)>,
    /// Processes left once the unit was inactive: pid and name.
    pub leftovers: Vec<(u32, String)>,
    /// Answers to `list`.
    pub lists: Vec<Vec<String>>,
    /// The unit is inactive (the stand-in is exiting).
    pub inactive: bool,
    /// The stand-in closed its stdout (it exited).
    pub gone: bool,
}

fn pid_of(word: Option<&str>) -> u32 {
    word.and_then(|w| w.parse().ok()).unwrap_or(0)
}

fn names_of(joined: &str) -> Vec<String> {
    if joined.is_empty() {
        Vec::new()
    } else {
        joined.split(':').map(str::to_string).collect()
    }
}

impl ManagerState {
    fn apply(&mut self, line: &str) {
        self.events.push(line.to_string());
        let (kind, rest) = line.split_once(' ').unwrap_or((line, ""));
        match kind {
            "started" => {
                let mut w = rest.splitn(3, ' ');
                let pid = pid_of(w.next());
                let _count = w.next();
                self.main_pid = Some(pid);
                self.starts.push((pid, names_of(w.next().unwrap_or(""))));
            }
            "ready" => self.ready = Some(pid_of(Some(rest))),
            "status" => {
                let (pid, text) = rest.split_once(' ').unwrap_or((rest, ""));
                self.statuses.push((pid_of(Some(pid)), text.to_string()));
            }
            "stored" => self.store.insert(0, rest.to_string()),
            "removed" => {
                let name = rest.rsplit_once(' ').map_or(rest, |(n, _)| n);
                self.store.retain(|n| n != name);
            }
            "dropped" => {
                if let Some(at) = self.store.iter().position(|n| n == rest) {
                    self.store.remove(at);
                }
            }
            "released" => self.store.clear(),
            "exited" => {
                let (pid, how) = rest.split_once(' ').unwrap_or((rest, ""));
                let pid = pid_of(Some(pid));
                self.exits.push((pid, how.to_string()));
                if self.main_pid == Some(pid) {
                    self.main_pid = None;
                }
                if self.ready == Some(pid) {
                    self.ready = None;
                }
            }
            "reaped" => {
                let (pid, how) = rest.split_once(' ').unwrap_or((rest, ""));
                self.reaped.push((pid_of(Some(pid)), how.to_string()));
            }
            "leftover" => {
                let (pid, comm) = rest.split_once(' ').unwrap_or((rest, ""));
                self.leftovers.push((pid_of(Some(pid)), comm.to_string()));
            }
            "list" => {
                let names = rest.split_once(' ').map_or("", |(_, n)| n);
                self.lists.push(names_of(names));
            }
            "inactive" => self.inactive = true,
            _ => {}
        }
    }
}

/// The stand-in running one daemon.
pub struct Manager {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    state: ManagerState,
    /// Index into `state.events` after the last `wait_event` match.
    cursor: usize,
    dir: tempfile::TempDir,
    socket: String,
    log: PathBuf,
    /// `ManagerOptions::hold_restarts`.
    hold_restarts: bool,
}

impl Manager {
    /// Runs `command` (program, arguments, environment, working directory
    /// as set on it) under the stand-in; its output goes to a log file of
    /// the manager's ([`Manager::log`]). Returns at once: wait for what you
    /// expect ([`Manager::wait_ready`], …).
    pub fn start(command: &Command, opts: &ManagerOptions) -> Manager {
        Manager::start_logging_to(command, opts, None)
    }

    /// As [`Manager::start`], the daemon's output appended to `log`.
    pub fn start_logging_to(
        command: &Command,
        opts: &ManagerOptions,
        log: Option<&Path>,
    ) -> Manager {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("cyrnel-manager-")
            .tempdir()
            .expect("manager temp dir");
        // Searchable by any uid, so that an unprivileged daemon reaches its
        // notify socket (the stand-in makes the socket itself 0777).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).expect("chmod");
        let socket = if opts.abstract_socket {
            format!(
                "@cyrnel-test-manager-{}",
                dir.path().file_name().unwrap().to_string_lossy()
            )
        } else {
            dir.path().join("notify").display().to_string()
        };
        let log = log.map_or_else(|| dir.path().join("daemon.log"), Path::to_path_buf);
        let stderr =
            fs::File::create(dir.path().join("manager.stderr")).expect("create manager.stderr");
        let mut py = Command::new("python3");
        py.arg(MANAGER_PY)
            .arg("--socket")
            .arg(&socket)
            .arg("--fdstore-max")
            .arg(opts.fdstore_max.to_string())
            .arg("--restart-sec")
            .arg("0")
            .arg("--start-limit-burst")
            .arg(opts.start_limit_burst.to_string())
            .arg("--timeout-stop-sec")
            .arg(opts.timeout_stop_sec.to_string())
            .arg("--log")
            .arg(&log)
            .args(opts.hold_restarts.then_some("--hold-restarts"))
            .arg("--")
            .arg(command.get_program())
            .args(command.get_args());
        for (key, value) in command.get_envs() {
            match value {
                Some(v) => py.env(key, v),
                None => py.env_remove(key),
            };
        }
        if let Some(cwd) = command.get_current_dir() {
            py.current_dir(cwd);
        }
        let mut child = py
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn python3 manager.py (the tests need python3)");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Manager {
            stdin: child.stdin.take(),
            child,
            lines,
            state: ManagerState::default(),
            cursor: 0,
            dir,
            socket,
            log,
            hold_restarts: opts.hold_restarts,
        }
    }

    /// What was reported so far (without waiting for more).
    pub fn state(&mut self) -> &ManagerState {
        while let Ok(line) = self.lines.try_recv() {
            self.state.apply(&line);
        }
        &self.state
    }

    /// The `NOTIFY_SOCKET` value the daemon gets.
    pub fn notify_socket(&self) -> &str {
        &self.socket
    }

    /// Everything the daemon wrote to stdout and stderr, over all starts.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// What the stand-in reported and wrote to stderr, and the daemon's log,
    /// for failure messages.
    pub fn report(&self) -> String {
        format!(
            "stand-in events:\n  {}\nstand-in stderr:\n{}\ndaemon log:\n{}",
            self.state.events.join("\n  "),
            fs::read_to_string(self.dir.path().join("manager.stderr")).unwrap_or_default(),
            self.log()
        )
    }

    /// Waits until `f` finds what it wants in the state, re-checked after
    /// every event; fails after `DEADLINE` with the whole report.
    #[track_caller]
    pub fn wait_for<T>(&mut self, what: &str, mut f: impl FnMut(&ManagerState) -> Option<T>) -> T {
        let deadline = Instant::now() + DEADLINE;
        loop {
            self.state();
            if let Some(found) = f(&self.state) {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.state.apply(&line),
                Err(mpsc::RecvTimeoutError::Disconnected) if !self.state.gone => {
                    self.state.gone = true;
                }
                Err(e) => panic!(
                    "waiting for {what}: {}\n{}",
                    if e == mpsc::RecvTimeoutError::Timeout {
                        format!("nothing after {DEADLINE:?}")
                    } else {
                        "the stand-in exited".to_string()
                    },
                    self.report()
                ),
            }
        }
    }

    /// Waits for the first event after the previous `wait_event` match (or
    /// the start) for which `pred` holds; returns it.
    #[track_caller]
    pub fn wait_event(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let from = self.cursor;
        let (at, line) = self.wait_for(what, |s| {
            s.events[from..]
                .iter()
                .position(|e| pred(e))
                .map(|i| (from + i, s.events[from + i].clone()))
        });
        self.cursor = at + 1;
        line
    }

    /// Waits until the main process said READY=1; its pid.
    #[track_caller]
    pub fn wait_ready(&mut self) -> u32 {
        self.wait_for("READY=1 from the main process", |s| s.ready)
    }

    /// The main process' pid; panics if there is none.
    #[track_caller]
    pub fn main_pid(&mut self) -> u32 {
        match self.state().main_pid {
            Some(pid) => pid,
            None => panic!("no main process\n{}", self.report()),
        }
    }

    /// SIGKILLs the main process (a crash) and waits for the stand-in to
    /// see it end; returns its pid.
    #[track_caller]
    pub fn kill9(&mut self) -> u32 {
        let pid = self.main_pid();
        send_signal("KILL", pid as i32);
        self.wait_for(&format!("the end of main process {pid}"), |s| {
            s.exits.iter().any(|(p, _)| *p == pid).then_some(())
        });
        pid
    }

    /// `kill9`, then waits until the restarted main process is ready;
    /// returns the new pid.
    #[track_caller]
    pub fn kill9_and_wait_ready(&mut self) -> u32 {
        self.kill9_then(|_| ())
    }

    /// `kill9_and_wait_ready`, doing `meanwhile` after the main process
    /// ended: before the restart with `ManagerOptions::hold_restarts`,
    /// else while it may already be under way.
    #[track_caller]
    pub fn kill9_then(&mut self, meanwhile: impl FnOnce(&mut Manager)) -> u32 {
        let old = self.kill9();
        meanwhile(self);
        if self.hold_restarts {
            self.command("restart");
        }
        self.wait_for("the restarted main process to say READY=1", |s| {
            s.ready.filter(|p| *p != old)
        })
    }

    /// Waits until the store holds a descriptor named `name`.
    #[track_caller]
    pub fn wait_stored(&mut self, name: &str) {
        self.wait_for(&format!("{name:?} in the store"), |s| {
            s.store.iter().any(|n| n == name).then_some(())
        })
    }

    /// Waits until the store holds nothing named `name` (removed, dropped,
    /// or never stored).
    #[track_caller]
    pub fn wait_not_stored(&mut self, name: &str) {
        self.wait_for(&format!("no {name:?} in the store"), |s| {
            (!s.store.iter().any(|n| n == name)).then_some(())
        })
    }

    /// Waits for the next `removed NAME COUNT` event for `name`; the count.
    #[track_caller]
    pub fn wait_removed(&mut self, name: &str) -> usize {
        let prefix = format!("removed {name} ");
        let line = self.wait_event(&format!("FDSTOREREMOVE of {name:?}"), |e| {
            e.starts_with(&prefix) && !e[prefix.len()..].contains(' ')
        });
        line[prefix.len()..].parse().expect("a count")
    }

    fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the stand-in was stopped");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("write {line:?} to the stand-in: {e}"));
    }

    /// The names in the store as the stand-in lists them (`list`), in the
    /// order a restart would pass them.
    #[track_caller]
    pub fn list(&mut self) -> Vec<String> {
        let before = self.state().lists.len();
        self.command("list");
        self.wait_for("the answer to list", |s| s.lists.get(before).cloned())
    }

    /// Stops the unit (SIGTERM to the main process) and waits until the
    /// stand-in has exited; returns the final state, whose `leftovers` are
    /// the processes that were still there (killed by the stand-in since).
    #[track_caller]
    pub fn stop(&mut self) -> ManagerState {
        if self.stdin.is_some() {
            self.command("stop");
            self.stdin = None;
        }
        self.wait_exit()
    }

    /// Waits until the unit is inactive by itself (a clean exit, a failed
    /// start limit) and the stand-in has exited; the final state.
    #[track_caller]
    pub fn wait_exit(&mut self) -> ManagerState {
        self.wait_for("the stand-in to exit", |s| s.gone.then_some(()));
        let status = self.child.wait().expect("wait for the stand-in");
        assert!(
            status.success(),
            "the stand-in failed: {status}\n{}",
            self.report()
        );
        self.state.clone()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        // EOF on its stdin stops the unit; then it exits.
        self.stdin = None;
        let deadline = Instant::now() + DEADLINE;
        while !self.state.gone {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.state.apply(&line),
                Err(mpsc::RecvTimeoutError::Disconnected) => self.state.gone = true,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(pid) = self.state.main_pid {
                        send_signal("KILL", pid as i32);
                    }
                    let _ = self.child.kill();
                    break;
                }
            }
        }
        let _ = self.child.wait();
    }
}

/// `cyrneld` under the stand-in: started, restarted after a crash and
/// stopped by it, with [`Daemon`]'s options, data dir, logs and HTTP
/// helpers (through `Deref`; its `pid`, `kill9` and stop helpers are for
/// daemons it started itself: use this type's).
pub struct ManagedDaemon {
    manager: Manager,
    daemon: Daemon,
}

impl ManagedDaemon {
    /// Starts the daemon under the stand-in with its default options (the
    /// unit's settings) and waits until it is ready and answers.
    #[track_caller]
    pub fn start(opts: DaemonOptions) -> ManagedDaemon {
        ManagedDaemon::start_with(opts, ManagerOptions::default())
    }

    #[track_caller]
    pub fn start_with(opts: DaemonOptions, manager: ManagerOptions) -> ManagedDaemon {
        let mut daemon = Daemon::prepare(opts);
        let log = daemon.next_log_path();
        let manager = Manager::start_logging_to(&daemon.command(), &manager, Some(&log));
        let mut managed = ManagedDaemon { manager, daemon };
        managed.wait_ready();
        managed
    }

    /// The stand-in: its state, waits on the store, `list`.
    pub fn manager(&mut self) -> &mut Manager {
        &mut self.manager
    }

    /// The daemon's pid.
    #[track_caller]
    pub fn pid(&mut self) -> u32 {
        self.manager.main_pid()
    }

    /// Waits for READY=1, reads the port the daemon logged, waits for
    /// `/health`.
    #[track_caller]
    fn wait_ready(&mut self) {
        self.manager.wait_ready();
        // The daemon logs where it listens before it says READY=1; the
        // last such line is the running daemon's.
        let port = listening_port(&self.manager.log())
            .unwrap_or_else(|| panic!("no listening address logged\n{}", self.manager.report()));
        self.daemon.set_port(port);
        poll(
            "cyrneld under the stand-in to answer GET /health with 200",
            || health(port),
        );
    }

    /// SIGKILLs the daemon (a crash); the stand-in restarts it with the
    /// store. Waits until the new daemon is ready and answers; returns
    /// its pid.
    #[track_caller]
    pub fn kill9_and_wait_ready(&mut self) -> u32 {
        self.kill9_then(|_| ())
    }

    /// `kill9_and_wait_ready`, doing `meanwhile` after the daemon ended
    /// (see [`Manager::kill9_then`]).
    #[track_caller]
    pub fn kill9_then(&mut self, meanwhile: impl FnOnce(&mut Manager)) -> u32 {
        let new = self.manager.kill9_then(meanwhile);
        self.wait_ready();
        new
    }

    /// A real stop (SIGTERM, as `systemctl stop`): asserts that the daemon
    /// exited 0; returns the stand-in's final state (`leftovers`: what the
    /// daemon left running, killed since by the stand-in).
    #[track_caller]
    pub fn stop(&mut self) -> ManagerState {
        let pid = self.manager.main_pid();
        let state = self.manager.stop();
        let how = state
            .exits
            .iter()
            .rev()
            .find(|(p, _)| *p == pid)
            .map(|(_, h)| h.as_str());
        assert_eq!(
            how,
            Some("exited 0"),
            "cyrneld must exit 0 on SIGTERM\n{}",
            self.manager.report()
        );
        state
    }
}

impl Deref for ManagedDaemon {
    type Target = Daemon;

    fn deref(&self) -> &Daemon {
        &self.daemon
    }
}
