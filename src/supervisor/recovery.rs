//! Start-up recovery: queued records go back in the queue (oldest first);
//! runs a previous image handed over are re-adopted: watched again, their
//! capture continued where it stopped, their timeout and kill deadline
//! re-armed from the record; other records found running or terminating
//! are checked in /proc and their processes put down; what a crash left
//! behind (processes no record accounts for, settled runs' cgroups,
//! folders) is removed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tokio::net::unix::pipe;

use super::actor::Actor;
use super::commit::Waiter;
use super::live::{Run, RunKind};
use super::machine::{Event, StreamStats};
use super::{now_ms, watch, Adoption, HandedRun};
use crate::model::{ProcessId, Record, State, Stream};
use crate::proc::sandbox::RunFolder;
use crate::proc::{self, Leader, Scope, Tracked};
use crate::store::StoreError;

impl Actor {
    pub(super) fn recover(&mut self, adoption: Adoption) -> Result<(), StoreError> {
        let child = adoption.child;
        let mut handed: HashMap<ProcessId, HandedRun> =
            adoption.runs.into_iter().map(|h| (h.id, h)).collect();
        for rec in self.store.unsettled()? {
            let id = rec.id;
            let state = rec.state;
            let identity = rec.identity.clone();
            let run_uid = rec.run_uid;
            self.table.insert(rec.clone(), true);
            if state == State::Queued {
                self.table.enqueue(id);
                continue;
            }
            if let Some(h) = handed.remove(&id) {
                // The record's pid; handed over with its pid, it must match.
                let recorded = identity.as_ref().map(|i| i.pid);
                match recorded.filter(|&p| h.pid.is_none_or(|hp| hp == p)) {
                    Some(pid) => match self.adopt(&rec, h, pid, child) {
                        Ok(()) => continue,
                        Err(e) => {
                            tracing::error!(%id, error = %e, "cannot re-adopt a handed-over run; putting it down")
                        }
                    },
                    None => {
                        tracing::error!(%id, pid = ?h.pid, "a handed-over run does not match its record; putting the record's processes down");
                    }
                }
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
                let ctx = self.run_context(id, gen, folder, StreamStats::default());
                tokio::spawn(watch::watch_orphan(ctx, identity, cgroup));
            } else if let Some(cg) = &cgroup {
                cg.remove();
            }
            self.carry_out(id, rec, effects, Waiter::Nobody);
        }
        for (id, h) in handed {
            // Its record is settled or gone: the run ended before the
            // handover completed and was recorded.
            tracing::info!(%id, pid = ?h.pid, "a handed-over run has no running record; nothing to adopt");
        }
        self.remove_stale_cgroups();
        self.kill_untracked();
        let table = &self.table;
        self.settings
            .sandbox
            .remove_stale_folders(|id| table.get(ProcessId(id)).is_some_and(|e| e.run.is_some()));
        Ok(())
    }

    /// Watches a handed-over run again: its leader through the pidfd, its
    /// processes through its cgroup (or group), its output from where the
    /// capture stopped; its timeout and kill deadline from the record.
    /// `pid`: the record's, which the handed-over pidfd refers to.
    fn adopt(&mut self, rec: &Record, h: HandedRun, pid: i32, child: bool) -> std::io::Result<()> {
        let id = rec.id;
        let leader = Arc::new(Leader::adopt(h.pidfd, pid, child)?);
        // tokio makes them non-blocking.
        let pipe = |fd: Option<std::os::fd::OwnedFd>| -> std::io::Result<Option<pipe::Receiver>> {
            fd.map(pipe::Receiver::from_owned_fd).transpose()
        };
        let (stdout, stderr) = (pipe(h.stdout)?, pipe(h.stderr)?);
        let start = match h.streams {
            Some(s) => s,
            None => StreamStats {
                stdout_len: self
                    .store
                    .stream_len(id, Stream::Stdout)
                    .map_err(std::io::Error::other)?,
                stderr_len: self
                    .store
                    .stream_len(id, Stream::Stderr)
                    .map_err(std::io::Error::other)?,
                stdout_dropped: 0,
                stderr_dropped: 0,
            },
        };
        let scope = match self.settings.cgroups.as_ref().map(|r| r.run(id.0)) {
            Some(cg) if cg.exists() => Scope::Cgroup(cg),
            _ => Scope::Group,
        };
        // Its uid stays held until it has settled.
        let uid = rec
            .run_uid
            .filter(|u| self.uids.as_mut().is_some_and(|p| p.hold(*u)));
        let tracked = Tracked {
            pgid: pid,
            tag: id.to_string(),
            uid,
            scope,
        };
        let gen = self.next_gen;
        self.next_gen += 1;
        let slot = self.table.take_slot();
        let mut run = Run::new(
            gen,
            RunKind::Child {
                leader: leader.clone(),
                tracked: tracked.clone(),
            },
            slot,
            uid,
        );
        run.restore_reached(h.signalled, h.escaped);
        if let Some(e) = self.table.get_mut(id) {
            e.run = Some(run);
        }
        // A folder on a host file system is found again by its path.
        let folder = h
            .folder
            .map(RunFolder::from_handle)
            .or_else(|| self.settings.sandbox.adopt_folder(id.0));
        let mut ctx = self.run_context(id, gen, folder, start);
        ctx.journals = h.journals.map(|fd| {
            fd.and_then(|fd| match crate::proc::journal::Journal::open(fd) {
                Ok(j) => Some(j),
                Err(e) => {
                    tracing::warn!(%id, error = %e, "ignoring a capture journal");
                    None
                }
            })
        });
        tokio::spawn(watch::watch_child(ctx, leader, tracked, stdout, stderr));
        let now = now_ms();
        match rec.state {
            State::Running => {
                if let (Some(limit), Some(started)) = (rec.timeout_ms, rec.started_at) {
                    let left = started.saturating_add(limit).saturating_sub(now);
                    self.arm_timeout(id, left);
                }
            }
            State::Terminating => {
                self.arm_escalation(id, rec.kill_deadline.unwrap_or(now));
            }
            State::Queued | State::Idle => {}
        }
        tracing::info!(%id, pid, child, "re-adopted a run");
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
