//! The starter: two threads in a row, so the actor never waits for a
//! folder to be made or a child to exec. The actor hands a run to the
//! preparer and goes on; the result comes back as [`Internal::Started`].
//!
//! - The preparer reads the code, prepares the run's folder and isolation
//!   (`proc::sandbox`) and its cgroup.
//! - The spawner clones the child and waits until it has called execve
//!   (`proc::spawn`), then reports.
//!
//! The two steps overlap: while the spawner waits for one child's
//! isolation steps and exec, the preparer readies the next run on the
//! other core. Each is one thread, so runs start in the order the queue
//! hands them out. The spawner is long-lived because a leader is a child
//! of the thread that spawned it and must never be handed to the main
//! thread (the orphan reaper, see `proc::OrphanReaper`); it is also the
//! only thread whose capability bounding set level `full` empties, and
//! the one that carries the seccomp filter's first stage (with
//! `no_new_privs`) for every run (`proc::dedicate_spawner_thread`): it
//! does nothing but spawn, and creates no thread.

use std::io;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;

use tokio::sync::mpsc;

use super::{Internal, Settings};
use crate::model::ProcessId;
use crate::proc::cgroup::{Joiner, RunCgroup};
use crate::proc::sandbox::{Prepared, RunFolder};
use crate::proc::{self, Scope, SpawnSpec, Spawned};
use crate::store::Store;

/// How many readied runs may wait for the spawner (besides the one the
/// preparer is working on). With every run slot's run prepared at once
/// (`max_running`, 32 by default), the daemon held some 200 descriptors
/// during a burst, and each spawn paid for copying and closing all of them
/// (BENCHMARKS.md).
const READY_AHEAD: usize = 1;

/// A run to start: record `id`, as generation `gen` of its runs, as `uid`
/// (a uid of its own at level `full`), with or without network.
pub(crate) struct Job {
    pub id: ProcessId,
    pub gen: u64,
    pub uid: Option<(u32, u32)>,
    pub network: bool,
}

/// What became of a [`Job`].
pub(crate) struct Started {
    pub id: ProcessId,
    pub gen: u64,
    pub uid: Option<(u32, u32)>,
    /// The child and how it is tracked, with its folder, or why it could
    /// not start (its cgroup and folder, if made, are already removed).
    pub result: io::Result<(Spawned, Scope, RunFolder)>,
}

/// A run the preparer has readied for the spawner.
struct Ready {
    /// Whether the code starts with `#!` (executed directly).
    direct: bool,
    prepared: Prepared,
    cgroup: ReadyCgroup,
}

/// The run's cgroup, made and opened (`None`: none, or it could not be
/// made and the run is tracked by its process group). One that is never
/// handed to a spawned run (the daemon is stopping, or the spawn failed)
/// is removed when this is dropped; the run's folder goes with its
/// `Prepared`.
struct ReadyCgroup(Option<(RunCgroup, Joiner)>);

impl Drop for ReadyCgroup {
    fn drop(&mut self) {
        if let Some((cg, _)) = self.0.take() {
            cg.remove();
        }
    }
}

/// The actor's handle on the starter threads. Dropping it ends them and
/// waits for them, so their handle on the store is gone before the daemon
/// closes the database and exits.
pub(crate) struct Starter {
    tx: Option<std_mpsc::Sender<Job>>,
    preparer: Option<JoinHandle<()>>,
    spawner: Option<JoinHandle<()>>,
}

impl Starter {
    /// Starts the threads. Call from within the runtime: the spawner
    /// enters it to register the children's pidfds and pipes.
    pub fn spawn(
        store: Store,
        settings: Settings,
        done: mpsc::UnboundedSender<Internal>,
    ) -> io::Result<Starter> {
        let (tx, jobs) = std_mpsc::channel::<Job>();
        // The preparer runs at most one run ahead of the spawner: every
        // descriptor a readied run holds (its tmpfs, mount clones, Landlock
        // ruleset, cgroup directory) sits in the daemon's descriptor table,
        // which each child copies at clone and closes again at exec.
        let (ready_tx, ready) = std_mpsc::sync_channel::<(Job, io::Result<Ready>)>(READY_AHEAD);
        let runtime = tokio::runtime::Handle::current();
        let prep_settings = settings.clone();
        let preparer = std::thread::Builder::new()
            .name("cyrnel-prepare".into())
            .spawn(move || {
                while let Ok(job) = jobs.recv() {
                    let result = prepare(&store, &prep_settings, &job);
                    if ready_tx.send((job, result)).is_err() {
                        return;
                    }
                }
            })?;
        let spawner = std::thread::Builder::new()
            .name("cyrnel-starter".into())
            .spawn(move || {
                let _entered = runtime.enter();
                proc::prioritize_spawner();
                proc::dedicate_spawner_thread();
                while let Ok((job, result)) = ready.recv() {
                    let result = result.and_then(|r| start(&settings, &job, r));
                    let started = Started {
                        id: job.id,
                        gen: job.gen,
                        uid: job.uid,
                        result,
                    };
                    if done.send(Internal::Started(started)).is_err() {
                        // The actor is gone; dropping the result drops the
                        // child's handles (the daemon is stopping).
                        return;
                    }
                }
            });
        let spawner = match spawner {
            Ok(s) => s,
            Err(e) => {
                drop(tx);
                let _ = preparer.join();
                return Err(e);
            }
        };
        Ok(Starter {
            tx: Some(tx),
            preparer: Some(preparer),
            spawner: Some(spawner),
        })
    }

    /// Hands a run to the threads. Fails only if they have died.
    pub fn submit(&self, job: Job) -> Result<(), Job> {
        match &self.tx {
            Some(tx) => tx.send(job).map_err(|e| e.0),
            None => Err(job),
        }
    }
}

impl Drop for Starter {
    fn drop(&mut self) {
        self.tx = None;
        // The preparer ends first (no more jobs), which ends the spawner
        // once it has spawned what was readied.
        for t in [self.preparer.take(), self.spawner.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }
}

/// Reads the code and readies the run's folder and isolation, as the
/// daemon's sandbox level says, and its cgroup when the host offers them
/// (a cgroup that cannot be created degrades the run to process-group
/// tracking).
fn prepare(store: &Store, settings: &Settings, job: &Job) -> io::Result<Ready> {
    let id = job.id;
    let code = store
        .code(id)
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::other("the stored code is missing"))?;
    let prepared = settings
        .sandbox
        .prepare(id.0, &code, job.uid, job.network)?;
    let cgroup = ReadyCgroup(settings.cgroups.as_ref().and_then(|root| {
        let cg = root.run(id.0);
        match cg.prepare(&settings.cgroup_limits) {
            Ok(joiner) => Some((cg, joiner)),
            Err(e) => {
                tracing::warn!(%id, cgroup = %cg.path().display(), error = %e, "no cgroup for this run; tracking its process group");
                None
            }
        }
    }));
    Ok(Ready {
        direct: code.starts_with(b"#!"),
        prepared,
        cgroup,
    })
}

/// Spawns a readied run (in its cgroup, if it has one).
fn start(settings: &Settings, job: &Job, ready: Ready) -> io::Result<(Spawned, Scope, RunFolder)> {
    let id = job.id;
    let Ready {
        direct,
        prepared,
        mut cgroup,
    } = ready;
    let mut env = settings.env.clone();
    env.extend(prepared.env.iter().cloned());
    env.push(("CYRNEL_PROCESS_ID".into(), id.to_string()));
    env.push((
        "CYRNEL_OUTPUT".into(),
        prepared.output_path.display().to_string(),
    ));
    let code_path = prepared.cwd.join("code");
    let spawned = proc::spawn(&SpawnSpec {
        code_path: &code_path,
        direct,
        shell: &settings.shell,
        env: &env,
        cwd: &prepared.cwd,
        cgroup: cgroup.0.as_ref().map(|(_, joiner)| joiner),
        rlimits: &settings.rlimits,
        credentials: job.uid,
        sandbox: &prepared.steps,
    })?;
    // Spawned: the cgroup is the run's now (a failed spawn leaves it to
    // `ReadyCgroup`'s drop, which removes it).
    let scope = match cgroup.0.take() {
        Some((cg, joiner)) => Scope::Cgroup(cg.opened(&joiner)),
        None => Scope::Group,
    };
    Ok((spawned, scope, prepared.folder))
}
