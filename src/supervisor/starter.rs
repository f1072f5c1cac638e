//! The starter: one thread that prepares a run's folder and isolation
//! (`proc::sandbox`), stages its code, prepares its cgroup and spawns it,
//! so the actor never waits for a folder to be made or a child to exec. The actor hands it a run and goes on; the result comes
//! back as [`Internal::Started`].
//!
//! One thread, so runs start in the order the queue hands them out; a
//! long-lived one, because a leader is a child of the thread that spawned
//! it and must never be handed to the main thread (the orphan reaper, see
//! `proc::OrphanReaper`).

use std::io;
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;

use super::{Internal, Settings};
use crate::model::ProcessId;
use crate::proc::sandbox::RunFolder;
use crate::proc::{self, Scope, SpawnSpec, Spawned};
use crate::store::Store;

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

/// The actor's handle on the starter thread. Dropping it ends the thread
/// and waits for it, so its handle on the store is gone before the daemon
/// closes the database and exits.
pub(crate) struct Starter {
    tx: Option<std_mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Starter {
    /// Starts the thread. Call from within the runtime: the thread enters
    /// it to register the children's pidfds and pipes.
    pub fn spawn(
        store: Store,
        settings: Settings,
        done: mpsc::UnboundedSender<Internal>,
    ) -> io::Result<Starter> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let runtime = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new()
            .name("cyrnel-starter".into())
            .spawn(move || {
                let _entered = runtime.enter();
                while let Ok(job) = rx.recv() {
                    let result = start(&store, &settings, &job);
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
            })?;
        Ok(Starter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands a run to the thread. Fails only if the thread has died.
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
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Stages the code in the run's folder and spawns it, isolated as the
/// daemon's sandbox level says, in its own cgroup when the host offers them
/// (a cgroup that cannot be created degrades the run to process-group
/// tracking).
fn start(store: &Store, settings: &Settings, job: &Job) -> io::Result<(Spawned, Scope, RunFolder)> {
    let id = job.id;
    let code = store
        .code(id)
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::other("the stored code is missing"))?;
    let prepared = settings
        .sandbox
        .prepare(id.0, &code, job.uid, job.network)?;
    let cgroup = settings.cgroups.as_ref().map(|root| root.run(id.0));
    let joiner = cgroup.as_ref().and_then(|cg| match cg.prepare(&settings.cgroup_limits) {
        Ok(j) => Some(j),
        Err(e) => {
            tracing::warn!(%id, cgroup = %cg.path().display(), error = %e, "no cgroup for this run; tracking its process group");
            None
        }
    });
    let scope = match (&cgroup, &joiner) {
        (Some(cg), Some(_)) => Scope::Cgroup(cg.clone()),
        _ => Scope::Group,
    };
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
        direct: code.starts_with(b"#!"),
        shell: &settings.shell,
        env: &env,
        cwd: &prepared.cwd,
        cgroup: joiner.as_ref(),
        rlimits: &settings.rlimits,
        credentials: job.uid,
        sandbox: &prepared.steps,
    });
    match spawned {
        Ok(sp) => Ok((sp, scope, prepared.folder)),
        Err(e) => {
            if let Scope::Cgroup(cg) = &scope {
                cg.remove();
            }
            Err(e)
        }
    }
}
