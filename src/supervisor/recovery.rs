//! Start-up recovery: queued records go back in the queue (oldest first);
//! records found running or terminating are checked in /proc and their
//! processes put down; what a crash left behind (processes no record
//! accounts for, settled runs' cgroups, folders) is removed.

use std::collections::HashSet;

use super::actor::Actor;
use super::commit::Waiter;
use super::live::{Run, RunKind};
use super::machine::Event;
use super::{now_ms, watch};
use crate::model::{ProcessId, State};
use crate::proc;
use crate::store::StoreError;

impl Actor {
    pub(super) fn recover(&mut self) -> Result<(), StoreError> {
        for rec in self.store.unsettled()? {
            let id = rec.id;
            let state = rec.state;
            let identity = rec.identity.clone();
            let run_uid = rec.run_uid;
            self.table.insert(rec, true);
            if state == State::Queued {
                self.table.enqueue(id);
                continue;
            }
            let cgroup = self.settings.cgroups.as_ref().map(|r| r.run(id.0));
            let alive = proc::orphan_alive(identity.as_ref(), cgroup.as_ref());
            tracing::info!(%id, alive, "recovering a run from before the restart");
            let event = Event::Recovered {
                alive,
                now: now_ms(),
            };
            let Ok((rec, effects)) = self.decide(id, event) else {
                continue;
            };
            if alive {
                let gen = self.next_gen;
                self.next_gen += 1;
                let kind = RunKind::Orphan {
                    identity: identity.clone(),
                    cgroup: cgroup.clone(),
                };
                // Its uid stays held until it has settled.
                let uid = run_uid.filter(|u| self.uids.as_mut().is_some_and(|p| p.hold(*u)));
                if let Some(e) = self.table.get_mut(id) {
                    e.run = Some(Run::new(gen, kind, None, uid));
                }
                let folder = self.settings.sandbox.adopt_folder(id.0);
                let ctx = self.run_context(id, gen, folder);
                tokio::spawn(watch::watch_orphan(ctx, identity, cgroup));
            } else if let Some(cg) = &cgroup {
                cg.remove();
            }
            self.carry_out(id, rec, effects, Waiter::Nobody);
        }
        self.remove_stale_cgroups();
        self.kill_untracked();
        let table = &self.table;
        self.settings
            .sandbox
            .remove_stale_folders(|id| table.get(ProcessId(id)).is_some_and(|e| e.run.is_some()));
        Ok(())
    }

    /// Kills processes of this data dir that no record accounts for: a run
    /// spawned just before a crash whose `running` transition never became
    /// durable (its record says queued, and it will run again). Runs being
    /// put down as orphans are left to their own termination.
    fn kill_untracked(&self) {
        let has_run = |id: u64| {
            self.table
                .get(ProcessId(id))
                .is_some_and(|e| e.run.is_some())
        };
        if let Some(pool) = &self.uids {
            // Level full: every process with a uid of this daemon's block
            // is a run's; those of runs no record tracks are killed.
            let (base, count) = pool.range();
            let tracked: HashSet<u32> = self
                .table
                .entries()
                .filter(|(_, e)| e.run.is_some())
                .filter_map(|(_, e)| e.rec().run_uid)
                .collect();
            for pid in proc::kill_uid_range(base, count, &tracked) {
                tracing::warn!(
                    pid,
                    "killed a process left from a run that never became durable"
                );
            }
        }
        let run_dir = self.settings.sandbox.runs_base();
        for (pid, id) in proc::processes_of_run_dir(run_dir) {
            if !has_run(id) && proc::kill_untracked(pid, run_dir, id) {
                tracing::warn!(
                    id,
                    pid,
                    "killed a process left from a run that never became durable"
                );
            }
        }
    }

    /// Removes run cgroups left by a crash whose records are settled (a
    /// crash between persisting `idle` and removing the cgroup). Anything
    /// still inside one is killed first.
    fn remove_stale_cgroups(&self) {
        let Some(root) = &self.settings.cgroups else {
            return;
        };
        for id in root.existing_runs() {
            if self
                .table
                .get(ProcessId(id))
                .is_some_and(|e| e.run.is_some())
            {
                continue;
            }
            let cg = root.run(id);
            if cg.populated() {
                tracing::warn!(cgroup = %cg.path().display(), "killing processes left in a settled run's cgroup");
                let _ = cg.kill();
            }
            cg.remove();
        }
    }
}
