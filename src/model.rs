//! Plain domain types: process ids, states, exit states and the stored
//! process record. No serde, no I/O: the store encodes these, the API turns
//! them into JSON, the supervisor decides over them.

use std::fmt;

/// A process id: assigned at creation from a persisted counter, never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProcessId(pub u64);

impl ProcessId {
    /// The largest id the API accepts (2^63 - 1), so ids fit a signed 64-bit
    /// integer in every client language.
    pub const MAX: u64 = i64::MAX as u64;

    /// Strict parser for path ids: ASCII digits only, 1 ..= 2^63-1.
    /// `+5`, `1.5`, `1abc`, `0`, `-1` and the empty string are rejected.
    pub fn parse(s: &str) -> Option<ProcessId> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let v: u64 = s.parse().ok()?;
        (1..=Self::MAX).contains(&v).then_some(ProcessId(v))
    }
}

impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Queued,
    Running,
    Terminating,
    Idle,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Queued,
        State::Running,
        State::Idle,
        State::Terminating,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Terminating => "terminating",
            State::Idle => "idle",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitState {
    Success,
    Failed,
    Timeout,
    Canceled,
}

impl ExitState {
    pub const ALL: [ExitState; 4] = [
        ExitState::Success,
        ExitState::Failed,
        ExitState::Timeout,
        ExitState::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExitState::Success => "success",
            ExitState::Failed => "failed",
            ExitState::Timeout => "timeout",
            ExitState::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<ExitState> {
        ExitState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// `options.timeout` as a client gives it: absent, `null`, or milliseconds.
/// Shared by the API (parsing), the supervisor (resolving the default) and
/// the CLI (sending).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    /// Field absent: the daemon's configured default applies.
    Default,
    /// `null`: no limit.
    Unlimited,
    Ms(u64),
}

/// How strongly a run was isolated from the daemon, its data and other
/// runs (chosen at start-up from what the daemon holds; see
/// `proc::sandbox`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SandboxLevel {
    /// Own uid, mount and IPC namespaces, private `/tmp`, a `/proc` that
    /// shows only its own processes, no capabilities, Landlock, seccomp.
    Full,
    /// An unprivileged daemon: Landlock file, signal and socket rules,
    /// seccomp, `no_new_privs`.
    Landlock,
    /// No isolation (`sandbox = "off"`, or nothing available).
    None,
}

impl SandboxLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxLevel::Full => "full",
            SandboxLevel::Landlock => "landlock",
            SandboxLevel::None => "none",
        }
    }
}

/// Why a run is being terminated; decides the exit state it settles with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TermCause {
    /// A client's kill signal: settles `canceled`.
    Kill,
    /// `options.timeout` expired: settles `timeout`.
    Timeout,
    /// The daemon is stopping: settles `canceled`.
    Shutdown,
    /// Found alive after a daemon restart: settles `failed`
    /// (or `canceled` if it was already terminating).
    Restart,
}

/// Identity of a started process: enough to tell, after a restart, whether
/// the pid still names the process we started (pid numbers are reused).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcIdentity {
    pub pid: i32,
    /// Field 22 of /proc/<pid>/stat: start time in clock ticks since boot.
    pub start_time: u64,
    /// /proc/sys/kernel/random/boot_id at spawn time.
    pub boot_id: String,
}

/// One process record: what the API shows plus what the supervisor needs to
/// resume after a restart. Times are milliseconds since the Unix epoch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub id: ProcessId,
    pub r#ref: Option<String>,
    pub state: State,
    pub exit_state: Option<ExitState>,
    pub error: Option<String>,
    pub created_at: u64,
    pub started_at: Option<u64>,
    pub completed_at: Option<u64>,
    /// The leader's identity while running/terminating.
    pub identity: Option<ProcIdentity>,
    pub exit_code: Option<i32>,
    /// The signal number that ended the leader.
    pub signal: Option<i32>,
    /// Resolved at creation: `None` means no time limit.
    pub timeout_ms: Option<u64>,
    /// Resolved at creation: SIGTERM → SIGKILL grace for this process.
    pub kill_grace_ms: u64,
    /// Set while terminating: why, and when SIGKILL is due (ms since epoch).
    pub term_cause: Option<TermCause>,
    pub kill_deadline: Option<u64>,
    /// Captured bytes kept per stream, and bytes dropped past the cap.
    pub stdout_len: u64,
    pub stderr_len: u64,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    /// Whether the last run produced structured output.
    pub has_output: bool,
    /// Processes our signals reached while terminating the last run, and
    /// how many of them were outside its process group. `None` unless the
    /// run was terminated.
    pub killed: Option<u32>,
    pub escaped: Option<u32>,
    /// `options.network`, resolved at creation: `false` gives the run no
    /// network but loopback.
    pub network: bool,
    /// The isolation the current run got; `None` before it starts.
    pub sandbox: Option<SandboxLevel>,
    /// The uid the current run's processes have while it is running or
    /// terminating (a uid of its own at level `full`): with `identity`, how
    /// its processes are recognised after a restart.
    pub run_uid: Option<u32>,
    /// What the last run used, once it has settled (`None` before, or when
    /// it never started or nothing could be read).
    pub resources: Option<Resources>,
}

/// Where a run's resource figures come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UsageSource {
    /// The run's own cgroup: every process of the run.
    Cgroup,
    /// The leader's `wait` accounting: the leader and the children it
    /// waited for.
    Rusage,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Cgroup => "cgroup",
            UsageSource::Rusage => "rusage",
        }
    }
}

/// What a run used, read when it settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resources {
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    /// Peak memory: the cgroup's `memory.peak` (all its processes
    /// together), else the largest resident set of the leader and the
    /// children it waited for.
    pub peak_memory_bytes: Option<u64>,
    /// The kernel's OOM killer ended a process of the run (known only with
    /// the cgroup memory controller; false otherwise).
    pub oom_killed: bool,
    /// Most processes alive at once (`pids.peak`; `None` without the pids
    /// controller).
    pub peak_processes: Option<u64>,
    /// Where the CPU times come from.
    pub source: UsageSource,
}

impl Record {
    pub fn new(id: ProcessId, r#ref: Option<String>, created_at: u64) -> Record {
        Record {
            id,
            r#ref,
            state: State::Idle,
            exit_state: None,
            error: None,
            created_at,
            started_at: None,
            completed_at: None,
            identity: None,
            exit_code: None,
            signal: None,
            timeout_ms: None,
            kill_grace_ms: 0,
            term_cause: None,
            kill_deadline: None,
            stdout_len: 0,
            stderr_len: 0,
            stdout_dropped: 0,
            stderr_dropped: 0,
            has_output: false,
            killed: None,
            escaped: None,
            network: true,
            sandbox: None,
            run_uid: None,
            resources: None,
        }
    }

    pub fn pid(&self) -> Option<i32> {
        self.identity.as_ref().map(|i| i.pid)
    }

    /// "has outputs" in the contract's sense for the run signal.
    pub fn has_outputs(&self) -> bool {
        self.exit_state.is_some() || self.has_output || self.stdout_len > 0 || self.stderr_len > 0
    }
}

/// Which records a list asks for: every field that is set must match.
/// The store answers it from its index, so a filter costs what its matches
/// cost, however many other records there are.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub state: Option<State>,
    /// `Some(None)`: records without an exit state.
    pub status: Option<Option<ExitState>>,
    /// Exact match.
    pub r#ref: Option<String>,
}

impl Filter {
    /// Whether it selects anything narrower than every record.
    pub fn is_narrowing(&self) -> bool {
        self.state.is_some() || self.status.is_some() || self.r#ref.is_some()
    }

    pub fn matches(&self, r: &Record) -> bool {
        self.state.is_none_or(|s| r.state == s)
            && self.status.is_none_or(|s| r.exit_state == s)
            && self
                .r#ref
                .as_deref()
                .is_none_or(|f| r.r#ref.as_deref() == Some(f))
    }
}

/// What a state-transition event reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// The record entered this state (also at creation).
    Entered(State),
    /// The record was deleted; the event carries it as it was.
    Deleted,
}

impl ChangeKind {
    /// The SSE `event:` name.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Entered(s) => s.as_str(),
            ChangeKind::Deleted => "deleted",
        }
    }
}

/// One persisted state transition, numbered by a global, strictly
/// increasing sequence written in the same synced batch as the transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    pub kind: ChangeKind,
    pub record: Record,
}

/// A create's `Idempotency-Key` and the fingerprint of its request
/// (method, path and normalised body), computed by the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub fingerprint: [u8; 32],
}

/// Which captured stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn tag(self) -> u8 {
        match self {
            Stream::Stdout => 1,
            Stream::Stderr => 2,
        }
    }
}

/// Signal names as the API shows them (`SIGKILL`), for the common signals.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        16 => "SIGSTKFLT",
        17 => "SIGCHLD",
        18 => "SIGCONT",
        19 => "SIGSTOP",
        20 => "SIGTSTP",
        21 => "SIGTTIN",
        22 => "SIGTTOU",
        23 => "SIGURG",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        26 => "SIGVTALRM",
        27 => "SIGPROF",
        28 => "SIGWINCH",
        29 => "SIGIO",
        30 => "SIGPWR",
        31 => "SIGSYS",
        _ => return format!("SIG{sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_parser_is_strict() {
        for bad in [
            "",
            "0",
            "-1",
            "+5",
            "1.5",
            "1abc",
            "abc",
            " 1",
            "9223372036854775808",
            "99999999999999999999",
        ] {
            assert_eq!(ProcessId::parse(bad), None, "{bad:?}");
        }
        assert_eq!(ProcessId::parse("1"), Some(ProcessId(1)));
        assert_eq!(ProcessId::parse("007"), Some(ProcessId(7)));
        assert_eq!(
            ProcessId::parse("9223372036854775807"),
            Some(ProcessId(i64::MAX as u64))
        );
    }

    #[test]
    fn states_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        for s in ExitState::ALL {
            assert_eq!(ExitState::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("done"), None);
    }
}
