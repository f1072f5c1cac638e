//! A live run of a record: the processes the supervisor is responsible
//! for, how they are tracked, their timers, and what they hold (a run slot,
//! a pool uid) until they have settled.

use std::collections::HashSet;
use std::sync::Arc;

use tokio::task::AbortHandle;

use super::table::Slot;
use crate::model::ProcIdentity;
use crate::proc::cgroup::RunCgroup;
use crate::proc::{self, Leader, Signal, Tracked};

pub(super) enum RunKind {
    /// A child we spawned: its unreaped leader and how its processes are
    /// tracked.
    Child {
        leader: Arc<Leader>,
        tracked: Tracked,
    },
    /// Found alive after a restart: no child of ours any more.
    Orphan {
        identity: Option<ProcIdentity>,
        cgroup: Option<RunCgroup>,
    },
}

pub(super) struct Run {
    pub gen: u64,
    pub kind: RunKind,
    /// Its run slot (`max_running`); orphans found at start-up hold none:
    /// they are only being put down. Given back only through
    /// [`super::table::Table::release_slot`].
    pub slot: Option<Slot>,
    pub timeout: Option<AbortHandle>,
    pub escalation: Option<AbortHandle>,
    /// Every process a signal of ours reached, and those of them outside
    /// the leader's process group: reported as `killed` and `escaped`.
    signalled: HashSet<i32>,
    escaped: HashSet<i32>,
    /// The uid it holds from the pool (level `full`), given back when it
    /// has settled.
    pub uid: Option<u32>,
}

impl Run {
    pub fn new(gen: u64, kind: RunKind, slot: Option<Slot>, uid: Option<u32>) -> Run {
        Run {
            gen,
            kind,
            slot,
            uid,
            timeout: None,
            escalation: None,
            signalled: HashSet::new(),
            escaped: HashSet::new(),
        }
    }

    /// Sends `sig` to every process of the run. Only called while the run is
    /// unsettled, i.e. while the leader is unreaped.
    pub fn signal(&mut self, sig: Signal) -> std::io::Result<()> {
        match &self.kind {
            RunKind::Child { tracked, .. } => {
                let reached = tracked.signal(sig)?;
                self.signalled.extend(reached.pids);
                self.escaped.extend(reached.escaped);
            }
            RunKind::Orphan { identity, cgroup } => {
                let reached = proc::signal_orphan_run(identity.as_ref(), cgroup.as_ref(), sig);
                self.signalled.extend(reached);
            }
        }
        Ok(())
    }

    /// `(killed, escaped)` for the record: `None` when we signalled nothing.
    pub fn counts(&self) -> (Option<u32>, Option<u32>) {
        if self.signalled.is_empty() && self.escaped.is_empty() {
            return (None, None);
        }
        (
            Some(self.signalled.len() as u32),
            Some(self.escaped.len() as u32),
        )
    }

    /// The processes our signals reached, and those outside the group, to
    /// hand over.
    pub fn reached(&self) -> (Vec<i32>, Vec<i32>) {
        (
            self.signalled.iter().copied().collect(),
            self.escaped.iter().copied().collect(),
        )
    }

    /// Takes over what an earlier image's signals reached.
    pub fn restore_reached(&mut self, signalled: Vec<i32>, escaped: Vec<i32>) {
        self.signalled.extend(signalled);
        self.escaped.extend(escaped);
    }

    pub fn cancel_timers(&mut self) {
        for t in [self.timeout.take(), self.escalation.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }

    /// The run is empty: releases the leader's pid and the run's cgroup and
    /// tracking. Descendants reparented to us are reaped by the main thread
    /// (`proc::OrphanReaper`), never here.
    pub fn put_away(&mut self, id: crate::model::ProcessId) {
        self.cancel_timers();
        match &self.kind {
            RunKind::Child { leader, tracked } => {
                if let Err(e) = leader.reap() {
                    tracing::warn!(%id, error = %e, "reaping the leader failed");
                }
                tracked.cleanup();
            }
            RunKind::Orphan { cgroup, .. } => {
                if let Some(cg) = cgroup {
                    cg.remove();
                }
            }
        }
    }
}
