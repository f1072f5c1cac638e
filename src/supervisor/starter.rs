//! The starter: one thread that stages a run's code, prepares its cgroup
//! and spawns it, so the actor never waits for a file to be created or a
//! child to exec. The actor hands it a run and goes on; the result comes
//! back as [`Internal::Started`].
//!
//! One thread, so runs start in the order the queue hands them out; a
//! long-lived one, because a leader is a child of the thread that spawned
//! it and must never be handed to the main thread (the orphan reaper, see
//! `proc::OrphanReaper`).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;

use tokio::sync::mpsc;

use super::{Internal, Settings};
use crate::model::ProcessId;
use crate::proc::{self, Scope, SpawnSpec, Spawned};
use crate::store::Store;

/// A run to start: record `id`, as generation `gen` of its runs.
pub(crate) struct Job {
    pub id: ProcessId,
    pub gen: u64,
}

/// What became of a [`Job`].
pub(crate) struct Started {
    pub id: ProcessId,
    pub gen: u64,
    /// The child and how it is tracked, or why it could not start (its
    /// cgroup, if one was made, is already removed).
    pub result: io::Result<(Spawned, Scope)>,
    pub output_path: PathBuf,
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
                    let dir = settings.run_dir.join(job.id.to_string());
                    let output_path = dir.join("output");
                    let result = start(&store, &settings, job.id, &dir, &output_path);
                    let started = Started {
                        id: job.id,
                        gen: job.gen,
                        result,
                        output_path,
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

/// Stages the code and spawns it in its own cgroup when the host offers
/// them (a cgroup that cannot be created degrades the run to process-group
/// tracking).
fn start(
    store: &Store,
    settings: &Settings,
    id: ProcessId,
    dir: &Path,
    output_path: &Path,
) -> io::Result<(Spawned, Scope)> {
    let staged = stage(store, settings, id, dir, output_path);
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
    let spawned = staged.and_then(|(code_path, direct)| {
        let mut env = settings.env.clone();
        env.push(("CYRNEL_PROCESS_ID".into(), id.to_string()));
        env.push(("CYRNEL_OUTPUT".into(), output_path.display().to_string()));
        proc::spawn(&SpawnSpec {
            code_path: &code_path,
            direct,
            shell: &settings.shell,
            env: &env,
            cwd: dir,
            cgroup: joiner.as_ref(),
            rlimits: &settings.rlimits,
            credentials: settings.credentials,
        })
    });
    match spawned {
        Ok(sp) => Ok((sp, scope)),
        Err(e) => {
            if let Scope::Cgroup(cg) = &scope {
                cg.remove();
            }
            Err(e)
        }
    }
}

/// Writes the code to `<dir>/code` (0700) and an empty output file.
/// Returns the code path and whether it runs directly (`#!`).
fn stage(
    store: &Store,
    settings: &Settings,
    id: ProcessId,
    dir: &Path,
    output_path: &Path,
) -> io::Result<(PathBuf, bool)> {
    let code = store
        .code(id)
        .map_err(io::Error::other)?
        .ok_or_else(|| io::Error::other("the stored code is missing"))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let code_path = dir.join("code");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o700)
        .open(&code_path)?;
    f.write_all(&code)?;
    drop(f);
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(output_path)?;
    if let Some((uid, gid)) = settings.credentials {
        // The run's own folder, code and output file belong to the user
        // it runs as; the data dir above stays the daemon's.
        for p in [dir, code_path.as_path(), output_path] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid))?;
        }
    }
    Ok((code_path, code.starts_with(b"#!")))
}
