//! The actor: one task that owns every live record, decides each command
//! and event with [`machine::decide`] and carries out the decision's
//! effects in one place ([`Actor::carry_out`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch as watch_channel};
use tokio::task::AbortHandle;

use super::commit::{AfterDurable, Pending, Waiter, Write};
use super::handle::{Command, Reply, StartError, SupervisorError};
use super::live::{Run, RunKind};
use super::machine::StreamStats;
use super::machine::{self, Effect, Event, Priority};
use super::starter::{Job, Started, Starter};
use super::table::{Slot, Table};
use super::uids::UidPool;
use super::watch::{self, Finished, Parked, RunContext};
use super::{now_ms, Adoption, CreateRequest, HandedRun, Internal, Settings, Timeout, TimerKind};
use crate::events::Hub;
use crate::model::{Idempotency, ProcessId, Record, State};
use crate::proc::sandbox::RunFolder;
use crate::proc::{Signal, Tracked};
use crate::store::{Batch, Store};

/// After the SIGKILL deadline, how often SIGKILL is repeated until the run
/// settles.
const ESCALATION_REPEAT: Duration = Duration::from_millis(50);

pub(super) struct Actor {
    pub store: Store,
    pub settings: Settings,
    pub int_tx: mpsc::UnboundedSender<Internal>,
    int_rx: Option<mpsc::UnboundedReceiver<Internal>>,
    pub hub: Arc<Hub>,
    next_id: u64,
    /// Sequence number of the next event.
    pub next_seq: u64,
    pub table: Table,
    pub next_gen: u64,
    pub next_token: u64,
    /// Writes in flight, by token.
    pub pending: HashMap<u64, Pending>,
    /// Stages and spawns runs off the actor.
    starter: Starter,
    /// Level `full`'s per-run uids.
    pub uids: Option<UidPool>,
    shutting_down: bool,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    /// Set when a handover parks every run (watchers hold receivers).
    park: watch_channel::Sender<bool>,
    /// A handover in progress: who waits, and the runs parked so far.
    parking: Option<Parking>,
    /// Idempotency keys whose create is in flight, with the creates that
    /// repeated them meanwhile (answered when the first is).
    pub claims: HashMap<String, Claim>,
}

/// A handover parking the runs.
struct Parking {
    waiters: Vec<oneshot::Sender<Vec<HandedRun>>>,
    runs: Vec<HandedRun>,
}

/// An idempotency key whose create is not yet durable.
pub(super) struct Claim {
    fingerprint: [u8; 32],
    waiters: Vec<Reply<ProcessId>>,
}

impl Actor {
    /// Starts the starter thread and recovers the unsettled records.
    pub fn new(
        store: Store,
        settings: Settings,
        hub: Arc<Hub>,
        adoption: Adoption,
    ) -> Result<Actor, StartError> {
        let (int_tx, int_rx) = mpsc::unbounded_channel();
        let starter = Starter::spawn(store.clone(), settings.clone(), int_tx.clone())
            .map_err(StartError::Thread)?;
        let mut actor = Actor {
            starter,
            uids: settings
                .run_uids
                .map(|(base, count)| UidPool::new(base, count)),
            next_id: store.next_id()?,
            next_seq: store.last_seq()? + 1,
            hub,
            store,
            table: Table::new(settings.max_running),
            settings,
            int_tx,
            int_rx: Some(int_rx),
            next_gen: 1,
            next_token: 1,
            pending: HashMap::new(),
            shutting_down: false,
            shutdown_waiters: Vec::new(),
            park: watch_channel::channel(false).0,
            parking: None,
            claims: HashMap::new(),
        };
        actor.recover(adoption)?;
        Ok(actor)
    }

    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut internal = self.int_rx.take().expect("run once");
        // Recovered queued records start without waiting for a first event.
        self.try_start();
        loop {
            tokio::select! {
                biased;
                Some(ev) = internal.recv() => self.on_internal(ev),
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
            }
            self.try_start();
            self.check_shutdown();
            self.check_parked();
        }
    }

    fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Durable(token, result) => self.on_durable(token, result),
            Internal::Finished(f) => self.on_finished(f),
            Internal::Parked(p) => self.on_parked(p),
            Internal::Started(st) => self.on_started(st),
            Internal::Timer(id, gen, kind) => self.on_timer(id, gen, kind),
            Internal::Retry(id) => self.on_retry(id),
        }
    }

    fn on_command(&mut self, cmd: Command) {
        if let Some(e) = cmd.target().and_then(|id| self.table.get_mut(id)) {
            if e.starting.is_some() {
                tracing::debug!(id = ?cmd.target(), "command waits for the run to start");
                e.deferred.push(cmd);
                return;
            }
        }
        match cmd {
            Command::Create(req, reply) => self.create(req, reply),
            Command::Run(id, force, reply) => {
                if self.shutting_down {
                    let _ = reply.send(Err(SupervisorError::ShuttingDown));
                } else if self.queue_full() {
                    let _ = reply.send(Err(SupervisorError::TooManyQueued));
                } else {
                    self.request(id, Event::Run { force }, reply);
                }
            }
            Command::Kill(id, reply) => self.request(id, Event::Kill { now: now_ms() }, reply),
            Command::Delete(id, reply) => self.request(id, Event::Delete, reply),
            Command::Shutdown(done) => self.begin_shutdown(done),
            Command::Park(done) => self.begin_parking(done),
        }
    }

    /// A client's request about a record: answered with the record once
    /// the transition is durable, or with why it was refused.
    fn request(&mut self, id: ProcessId, event: Event, reply: Reply<Record>) {
        match self.decide(id, event) {
            Ok((rec, effects)) => self.carry_out(id, rec, effects, Waiter::Record(reply)),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Decides `event` for `id`; the decided record is the entry's from now
    /// on (durable once its write completes).
    pub(super) fn decide(
        &mut self,
        id: ProcessId,
        event: Event,
    ) -> Result<(Record, Vec<Effect>), SupervisorError> {
        let entry = self.table.load(id, &self.store)?;
        match machine::decide(entry.rec(), event) {
            Ok((next, effects)) => {
                let deleted = effects.contains(&Effect::DeleteAll);
                self.table.set_record(id, next.clone(), deleted);
                Ok((next, effects))
            }
            Err(reject) => {
                self.table.gc(id);
                Err(reject.into())
            }
        }
    }

    /// Carries out a decision: every effect, in order, then the write.
    pub(super) fn carry_out(
        &mut self,
        id: ProcessId,
        rec: Record,
        effects: Vec<Effect>,
        waiter: Waiter,
    ) {
        let mut batch = Batch::durable();
        let mut write = Write::Update;
        let mut after = AfterDurable::new(waiter);
        for effect in effects {
            match effect {
                // New work may be refused when space runs low; what records
                // facts about processes (and kills, deletes) may use the
                // reserve.
                Effect::Persist(Priority::Fact) => batch = batch.essential(),
                Effect::Persist(Priority::NewWork) => {}
                Effect::Dequeue => self.table.dequeue(id),
                Effect::Enqueue => after.enqueue = true,
                Effect::ClearOutputs => batch.clear_outputs(id),
                Effect::DeleteAll => write = Write::Delete,
                Effect::Terminate { deadline } => {
                    after.terminate = self.arm_escalation(id, deadline);
                }
                Effect::Hasten { deadline } => {
                    self.arm_escalation(id, deadline);
                }
                Effect::ArmTimeout { after_ms } => self.arm_timeout(id, after_ms),
                Effect::Finish { output } => {
                    if let Some(json) = output {
                        batch.put_output(id, json);
                    }
                    self.put_away(id);
                }
            }
        }
        self.commit(id, batch, rec, write, after);
    }

    /// Admission control: whether one more queued process is allowed.
    fn queue_full(&self) -> bool {
        self.table.queued() >= self.settings.max_queued
    }

    /// Answers a create whose idempotency key is already claimed (in
    /// flight or durable); gives the reply back when the key is free.
    fn answer_claimed(
        &mut self,
        key: &Idempotency,
        reply: Reply<ProcessId>,
    ) -> Option<Reply<ProcessId>> {
        if let Some(claim) = self.claims.get_mut(&key.key) {
            if claim.fingerprint == key.fingerprint {
                claim.waiters.push(reply);
            } else {
                let _ = reply.send(Err(SupervisorError::IdempotencyConflict));
            }
            return None;
        }
        let since = now_ms().saturating_sub(self.settings.idempotency_retention_ms);
        match self.store.idempotency(&key.key, since) {
            Ok(None) => Some(reply),
            Ok(Some(claim)) => {
                let _ = reply.send(if claim.fingerprint == key.fingerprint {
                    Ok(claim.id)
                } else {
                    Err(SupervisorError::IdempotencyConflict)
                });
                None
            }
            Err(e) => {
                let _ = reply.send(Err(SupervisorError::Storage(e)));
                None
            }
        }
    }

    /// The create that claimed `key` is answered: those that repeated it
    /// meanwhile get the same answer.
    pub(super) fn resolve_claim(
        &mut self,
        key: Option<String>,
        answer: impl Fn() -> Result<ProcessId, SupervisorError>,
    ) {
        if let Some(claim) = key.and_then(|k| self.claims.remove(&k)) {
            for w in claim.waiters {
                let _ = w.send(answer());
            }
        }
    }

    fn create(&mut self, req: CreateRequest, reply: Reply<ProcessId>) {
        // A repeated key answers what its first create answered, before
        // any admission check: it starts nothing.
        let reply = match &req.idempotency {
            Some(key) => match self.answer_claimed(key, reply) {
                Some(reply) => reply,
                None => return,
            },
            None => reply,
        };
        if self.shutting_down {
            let _ = reply.send(Err(SupervisorError::ShuttingDown));
            return;
        }
        if req.autorun && self.queue_full() {
            let _ = reply.send(Err(SupervisorError::TooManyQueued));
            return;
        }
        let id = ProcessId(self.next_id);
        self.next_id += 1;
        let mut rec = Record::new(id, req.r#ref, now_ms());
        rec.timeout_ms = match req.timeout {
            Timeout::Default => self.settings.default_timeout_ms,
            Timeout::Unlimited => None,
            Timeout::Ms(ms) => Some(ms),
        };
        rec.kill_grace_ms = req.kill_grace_ms.unwrap_or(self.settings.kill_grace_ms);
        rec.network = req.network.unwrap_or(self.settings.network);
        rec.state = if req.autorun {
            State::Queued
        } else {
            State::Idle
        };
        let mut batch = Batch::durable();
        batch.put_code(id, req.code.as_bytes());
        batch.put_next_id(self.next_id);
        // The key is claimed in the same synced batch as the record.
        let claim = req.idempotency.map(|key| {
            batch.put_idempotency(&key, id, rec.created_at);
            self.claims.insert(
                key.key.clone(),
                Claim {
                    fingerprint: key.fingerprint,
                    waiters: Vec::new(),
                },
            );
            key.key
        });
        self.table.insert(rec.clone(), false);
        let mut after = AfterDurable::new(Waiter::Created(reply, claim));
        after.enqueue = req.autorun;
        self.commit(id, batch, rec, Write::Create, after);
    }

    /// Arms (or moves) the SIGKILL deadline of the record's run; returns
    /// the run's generation (`None`: it has no run).
    pub(super) fn arm_escalation(&mut self, id: ProcessId, deadline: u64) -> Option<u64> {
        let gen = self.table.get(id)?.run.as_ref()?.gen;
        let delay = Duration::from_millis(deadline.saturating_sub(now_ms()));
        let handle = self.timer(id, gen, TimerKind::Escalate, delay);
        let run = self.table.get_mut(id)?.run.as_mut()?;
        if let Some(old) = run.escalation.replace(handle) {
            old.abort();
        }
        Some(gen)
    }

    pub(super) fn arm_timeout(&mut self, id: ProcessId, after_ms: u64) {
        let Some(gen) = self
            .table
            .get(id)
            .and_then(|e| e.run.as_ref())
            .map(|r| r.gen)
        else {
            return;
        };
        let handle = self.timer(id, gen, TimerKind::Timeout, Duration::from_millis(after_ms));
        if let Some(run) = self.table.get_mut(id).and_then(|e| e.run.as_mut()) {
            if let Some(old) = run.timeout.replace(handle) {
                old.abort();
            }
        }
    }

    fn timer(&self, id: ProcessId, gen: u64, kind: TimerKind, delay: Duration) -> AbortHandle {
        let tx = self.int_tx.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(Internal::Timer(id, gen, kind));
        })
        .abort_handle()
    }

    /// The run is over: releases what it held (timers, leader, tracking,
    /// slot, uid). Nothing of it is alive and its folder is gone, so its
    /// uid may go to another run.
    fn put_away(&mut self, id: ProcessId) {
        let Some(mut run) = self.table.get_mut(id).and_then(|e| e.run.take()) else {
            return;
        };
        run.put_away(id);
        if let Some(service) = &self.settings.service {
            super::fdstore::unpark(service, id);
        }
        if let Some(slot) = run.slot.take() {
            self.table.release_slot(slot);
        }
        self.release_uid(run.uid);
    }

    fn begin_shutdown(&mut self, done: oneshot::Sender<()>) {
        self.shutting_down = true;
        self.shutdown_waiters.push(done);
        let live: Vec<ProcessId> = self
            .table
            .entries()
            .filter(|(_, e)| e.run.is_some())
            .map(|(id, _)| id)
            .collect();
        for id in live {
            self.terminate_for_shutdown(id);
        }
    }

    fn terminate_for_shutdown(&mut self, id: ProcessId) {
        let event = Event::Shutdown {
            now: now_ms(),
            grace: self.settings.kill_grace_ms,
        };
        // Refused: already terminating with an earlier deadline.
        if let Ok((rec, effects)) = self.decide(id, event) {
            self.carry_out(id, rec, effects, Waiter::Nobody);
        }
    }

    fn check_shutdown(&mut self) {
        if self.shutting_down
            && !self.shutdown_waiters.is_empty()
            && self.pending.is_empty()
            && self.table.quiet()
        {
            for w in self.shutdown_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn try_start(&mut self) {
        while !self.shutting_down && self.parking.is_none() {
            let Some((id, slot)) = self.table.next_queued() else {
                return;
            };
            self.start(id, slot);
        }
    }

    /// Hands a queued run to the starter, in `slot`.
    fn start(&mut self, id: ProcessId, slot: Slot) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let uid = match &mut self.uids {
            None => self.settings.credentials,
            Some(pool) => match pool.take() {
                Some(uid) => Some((uid, uid)),
                None => {
                    self.table.release_slot(slot);
                    self.start_failed(
                        id,
                        "no free run uid (every uid of the block is held)".into(),
                    );
                    return;
                }
            },
        };
        let network = self
            .table
            .get(id)
            .map_or(self.settings.network, |e| e.rec().network);
        if let Err(job) = self.starter.submit(Job {
            id,
            gen,
            uid,
            network,
        }) {
            tracing::error!(%id, "the starter thread has stopped");
            self.table.release_slot(slot);
            self.release_uid(job.uid.map(|u| u.0));
            self.start_failed(id, "the daemon's starter thread has stopped".into());
            return;
        }
        match self.table.get_mut(id) {
            Some(e) => e.starting = Some(slot),
            None => self.table.release_slot(slot),
        }
    }

    /// Gives a pool uid back (a run has settled or never started).
    fn release_uid(&mut self, uid: Option<u32>) {
        if let (Some(pool), Some(uid)) = (&mut self.uids, uid) {
            pool.release(uid);
        }
    }

    /// Records that a queued run could not be started (`failed`).
    fn start_failed(&mut self, id: ProcessId, error: String) {
        let event = Event::StartFailed {
            error,
            now: now_ms(),
        };
        if let Ok((rec, effects)) = self.decide(id, event) {
            self.carry_out(id, rec, effects, Waiter::Nobody);
        }
    }

    /// The starter's answer: the run is recorded `running` (or `failed`),
    /// then the commands that waited for it are replayed.
    fn on_started(&mut self, st: Started) {
        let Started {
            id,
            gen,
            uid,
            result,
        } = st;
        let pool_uid = uid.map(|u| u.0).filter(|_| self.uids.is_some());
        let (slot, deferred) = match self.table.get_mut(id) {
            Some(e) => (e.starting.take(), std::mem::take(&mut e.deferred)),
            None => (None, Vec::new()),
        };
        match result {
            Ok((sp, scope, folder)) => {
                let leader = Arc::new(sp.leader);
                let tracked = Tracked {
                    pgid: leader.pid(),
                    tag: id.to_string(),
                    uid: pool_uid,
                    scope,
                };
                let event = Event::Started {
                    identity: sp.identity.clone(),
                    sandbox: self.settings.sandbox.level,
                    uid: uid.map(|u| u.0),
                    now: now_ms(),
                };
                match self.decide(id, event) {
                    Ok((rec, effects)) => {
                        let kind = RunKind::Child {
                            leader: leader.clone(),
                            tracked: tracked.clone(),
                        };
                        if let Some(e) = self.table.get_mut(id) {
                            e.run = Some(Run::new(gen, kind, slot, pool_uid));
                        }
                        tracing::debug!(%id, pid = leader.pid(), "started");
                        if let Some(service) = &self.settings.service {
                            super::fdstore::park(
                                service,
                                id,
                                &leader,
                                [&sp.stdout, &sp.stderr],
                                &folder,
                            );
                        }
                        let ctx = self.run_context(id, gen, Some(folder), StreamStats::default());
                        tokio::spawn(watch::watch_child(
                            ctx,
                            leader,
                            tracked,
                            Some(sp.stdout),
                            Some(sp.stderr),
                        ));
                        self.carry_out(id, rec, effects, Waiter::Nobody);
                        if self.shutting_down && self.parking.is_none() {
                            // The stop began while it was starting.
                            self.terminate_for_shutdown(id);
                        }
                    }
                    Err(_) => {
                        // Cannot happen (commands for a starting record
                        // wait), but a child must never be left behind.
                        tracing::error!(%id, "a started run's record was no longer queued; killing it");
                        if let Some(slot) = slot {
                            self.table.release_slot(slot);
                        }
                        // Its uid stays held: nothing tells the actor when
                        // the run is gone, and a uid must not be shared.
                        tokio::spawn(async move {
                            let _ = tracked.signal(Signal::Kill);
                            let _ = leader.exited().await;
                            tracked.wait_only_leader_left().await;
                            let _ = leader.reap();
                            tracked.cleanup();
                            drop(folder);
                        });
                    }
                }
            }
            Err(e) => {
                if let Some(slot) = slot {
                    self.table.release_slot(slot);
                }
                self.release_uid(pool_uid);
                tracing::warn!(%id, error = %e, "failed to start");
                self.start_failed(id, e.to_string());
            }
        }
        for cmd in deferred {
            self.on_command(cmd);
        }
    }

    pub(super) fn run_context(
        &self,
        id: ProcessId,
        gen: u64,
        folder: Option<RunFolder>,
        start: StreamStats,
    ) -> RunContext {
        RunContext {
            id,
            gen,
            store: self.store.clone(),
            max_output_bytes: self.settings.max_output_bytes,
            folder,
            tx: self.int_tx.clone(),
            hub: self.hub.clone(),
            park: self.park.subscribe(),
            start,
            service: self.settings.service.clone(),
            journals: [None, None],
        }
    }

    fn on_finished(&mut self, f: Finished) {
        let id = f.id;
        let Some(run) = self
            .table
            .get(id)
            .and_then(|e| e.run.as_ref())
            .filter(|r| r.gen == f.gen)
        else {
            return;
        };
        let (killed, escaped) = run.counts();
        let event = Event::Settled {
            status: f.status,
            status_lost: f.status_lost,
            output: f.output,
            streams: f.streams,
            killed,
            escaped,
            resources: f.resources,
            now: now_ms(),
        };
        if let Ok((rec, effects)) = self.decide(id, event) {
            tracing::debug!(%id, exit_state = ?rec.exit_state, "settled");
            self.carry_out(id, rec, effects, Waiter::Nobody);
        }
    }

    fn on_timer(&mut self, id: ProcessId, gen: u64, kind: TimerKind) {
        let Some(entry) = self.table.get_mut(id) else {
            return;
        };
        let terminating = entry.rec().state == State::Terminating;
        let Some(run) = entry.run.as_mut().filter(|r| r.gen == gen) else {
            return;
        };
        match kind {
            TimerKind::Escalate => {
                if terminating {
                    tracing::info!(%id, "grace period over: SIGKILL to the run");
                    if let Err(e) = run.signal(Signal::Kill) {
                        tracing::warn!(%id, error = %e, "SIGKILL to the run failed");
                    }
                    // Until the run settles, SIGKILL again now and then:
                    // a descendant reparented to us after this pass (its
                    // parent was just killed) must not survive.
                    let again = self.timer(id, gen, TimerKind::Escalate, ESCALATION_REPEAT);
                    if let Some(old) = self
                        .table
                        .get_mut(id)
                        .and_then(|e| e.run.as_mut())
                        .and_then(|r| r.escalation.replace(again))
                    {
                        old.abort();
                    }
                }
            }
            TimerKind::Timeout => {
                if let Ok((rec, effects)) = self.decide(id, Event::TimedOut { now: now_ms() }) {
                    tracing::info!(%id, "timed out");
                    self.carry_out(id, rec, effects, Waiter::Nobody);
                }
            }
        }
    }

    /// A handover: no run starts from now on; every watcher is told to
    /// park. The answer comes from [`Actor::check_parked`].
    fn begin_parking(&mut self, done: oneshot::Sender<Vec<HandedRun>>) {
        self.shutting_down = true;
        match &mut self.parking {
            Some(p) => p.waiters.push(done),
            None => {
                self.parking = Some(Parking {
                    waiters: vec![done],
                    runs: Vec::new(),
                });
                self.park.send_replace(true);
            }
        }
    }

    /// A watcher stopped for the handover: the run leaves the table's
    /// care untouched (no signal, no reap, its cgroup kept), and what the
    /// next image needs is kept for it.
    fn on_parked(&mut self, p: Parked) {
        let Some(entry) = self.table.get_mut(p.id) else {
            return;
        };
        if entry.run.as_ref().is_none_or(|r| r.gen != p.gen) {
            return;
        }
        let Some(mut run) = entry.run.take() else {
            return;
        };
        run.cancel_timers();
        if let Some(slot) = run.slot.take() {
            self.table.release_slot(slot);
        }
        let (signalled, escaped) = run.reached();
        let RunKind::Child { leader, .. } = run.kind else {
            // A run found alive at start-up and being put down: the next
            // image finds it again and goes on putting it down.
            return;
        };
        let leader = match Arc::try_unwrap(leader) {
            Ok(l) => l,
            Err(_) => {
                tracing::error!(id = %p.id, "a parked run's leader is still shared; it is not handed over");
                return;
            }
        };
        let into_fd = |pipe: Option<tokio::net::unix::pipe::Receiver>| {
            pipe.and_then(|r| match r.into_nonblocking_fd() {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::error!(id = %p.id, error = %e, "cannot hand over an output pipe");
                    None
                }
            })
        };
        let handed = HandedRun {
            id: p.id,
            pid: Some(leader.pid()),
            pidfd: leader.into_pidfd(),
            stdout: into_fd(p.stdout),
            stderr: into_fd(p.stderr),
            folder: p.folder.map(RunFolder::into_handle),
            streams: Some(p.streams),
            signalled,
            escaped,
            journals: p
                .journals
                .map(|j| j.map(crate::proc::journal::Journal::into_fd)),
        };
        if let Some(parking) = &mut self.parking {
            parking.runs.push(handed);
        }
    }

    /// Answers the handover once nothing starts, runs or waits for a write.
    fn check_parked(&mut self) {
        let Some(parking) = &mut self.parking else {
            return;
        };
        if parking.waiters.is_empty() || !self.pending.is_empty() || !self.table.quiet() {
            return;
        }
        let runs = std::mem::take(&mut parking.runs);
        let mut waiters = parking.waiters.drain(..);
        if let Some(first) = waiters.next() {
            let _ = first.send(runs);
        }
        // A second request gets nothing: the runs went to the first.
        for w in waiters {
            let _ = w.send(Vec::new());
        }
    }
}
