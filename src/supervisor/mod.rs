//! The supervisor: the one owner of process state.
//!
//! A single actor task ([`actor`]) receives API commands (bounded channel,
//! through the [`handle`]) and internal events (run finished, timers, write
//! completions). For each it asks the pure state machine
//! ([`machine::decide`]) for the next record and the complete list of
//! effects, and carries them out in one place. The record goes to the store
//! through the commit pipeline ([`commit`]); what must wait for durability
//! (replies, SIGTERM, starting queued runs) happens only when the store
//! reports the write synced. The actor never waits for a write itself, so
//! concurrent transitions share one fsync (group commit) while each is
//! still durable before anything shows it.
//!
//! The run table ([`table`]) keeps in memory only the records that are not
//! idle or still have a write in flight, with the run queue and the run
//! slots; everything else is read from the store. Start-up recovery is in
//! [`recovery`], the starter thread in [`starter`], the per-run watchers in
//! [`watch`]. It knows nothing of HTTP or JSON.
//!
//! Runs outlive an image of the daemon: [`Supervisor::park`] stops watching
//! every run (for a handover) and gives back what the kernel holds of each
//! as a [`HandedRun`]; the next image passes them to [`Supervisor::start`],
//! which re-adopts them instead of putting them down.

mod actor;
mod commit;
pub mod fdstore;
mod handle;
mod live;
pub mod machine;
mod recovery;
mod starter;
mod table;
mod uids;
mod watch;

use std::ffi::CStr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub use crate::model::Timeout;
use crate::model::{Idempotency, ProcessId};
use crate::proc::cgroup::CgroupRoot;
use crate::proc::sandbox::Policy;
use crate::proc::Rlimit;
use crate::store::StoreError;
pub use handle::{StartError, Supervisor, SupervisorError};
pub use machine::StreamStats;
use starter::Started;
use watch::{Finished, Parked};

/// Everything the supervisor needs from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// `None`: runs have no time limit unless they ask for one.
    pub default_timeout_ms: Option<u64>,
    pub kill_grace_ms: u64,
    pub max_running: usize,
    pub shell: String,
    pub env: Vec<(String, String)>,
    pub max_output_bytes: u64,
    /// How runs are isolated, and where their folders are made.
    pub sandbox: Arc<Policy>,
    /// Level `full` without a configured user: the block of uids runs get
    /// one of each, `(base, count)`.
    pub run_uids: Option<(u32, u32)>,
    /// `options.network` when a create does not say.
    pub network: bool,
    /// Events kept in the store for resuming clients (at least this many).
    pub event_retention: u64,
    /// Where runs get their own cgroups; `None`: process groups only.
    pub cgroups: Option<CgroupRoot>,
    /// Queued processes at most.
    pub max_queued: usize,
    /// Resource limits set in every child before exec.
    pub rlimits: Vec<(Rlimit, u64)>,
    /// Run children as this uid/gid; their run folder is handed to them.
    pub credentials: Option<(u32, u32)>,
    /// Controller limits written into each run cgroup (`memory.max`,
    /// `pids.max`), only those the host delegates.
    pub cgroup_limits: Vec<(&'static CStr, u64)>,
    /// How long an `Idempotency-Key` answers with its first create.
    pub idempotency_retention_ms: u64,
    /// The service manager, whose file-descriptor store keeps runs across
    /// a crash of the daemon (`None`: no manager, crashes keep the old
    /// policy: survivors are put down).
    pub service: Option<Arc<crate::service::Notifier>>,
}

#[derive(Clone, Debug)]
pub struct CreateRequest {
    pub code: String,
    pub r#ref: Option<String>,
    pub timeout: Timeout,
    pub kill_grace_ms: Option<u64>,
    /// `options.network`; `None`: the configured default.
    pub network: Option<bool>,
    pub autorun: bool,
    /// The `Idempotency-Key` of the request, if it had one.
    pub idempotency: Option<Idempotency>,
}

/// A run that outlives this image of the daemon: what the kernel holds
/// of it, handed to the next image (or parked in the service manager's
/// file-descriptor store across a crash).
#[derive(Debug)]
pub struct HandedRun {
    pub id: ProcessId,
    /// Its leader's pid, checked against the record (`None`: not known,
    /// as after a crash; the record's is used), and pidfd.
    pub pid: Option<i32>,
    pub pidfd: OwnedFd,
    /// The read ends of its output pipes (`None`: the stream had ended).
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    pub folder: Option<crate::proc::sandbox::FolderHandle>,
    /// What was captured so far; `None`: what the store holds (after a
    /// crash, when bytes past the cap are no longer counted).
    pub streams: Option<StreamStats>,
    /// Processes our signals reached, and those of them outside the group.
    pub signalled: Vec<i32>,
    pub escaped: Vec<i32>,
    /// Its capture journals (stdout, stderr), if it had any.
    pub journals: [Option<OwnedFd>; 2],
}

/// Runs a previous image of the daemon left running, for
/// [`Supervisor::start`] to re-adopt.
#[derive(Debug, Default)]
pub struct Adoption {
    pub runs: Vec<HandedRun>,
    /// Whether the daemon is still their parent (a handover by `execve`:
    /// the same process); after a crash it is not.
    pub child: bool,
}

/// Events the actor sends itself (through tasks, timers and the store).
pub(crate) enum Internal {
    /// The store answered write `token`.
    Durable(u64, Result<(), StoreError>),
    Finished(Finished),
    /// A handover stopped watching a run.
    Parked(Parked),
    /// The starter thread started (or failed to start) a run.
    Started(Started),
    Timer(ProcessId, u64, TimerKind),
    /// Write a record again whose transition failed to persist.
    Retry(ProcessId),
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum TimerKind {
    Timeout,
    Escalate,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
