//! The supervisor: the one owner of process state.
//!
//! A single actor task receives API commands (bounded channel) and internal
//! events (run finished, timers, write completions). For each it asks the
//! pure state machine ([`machine::decide`]) for the next record and effects,
//! submits the new record to the store, and carries out the effects that
//! must wait for durability (replies, SIGTERM, starting queued runs) only
//! when the store reports the write synced. The actor never waits for a
//! write itself, so concurrent transitions share one fsync (group commit)
//! while each is still durable before anything shows it.
//!
//! It keeps in memory only the records that are not idle or still have a
//! write in flight; everything else is read from the store. It knows
//! nothing of HTTP or JSON.

pub mod machine;
mod run;
mod starter;
mod uids;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::events::Hub;
pub use crate::model::Timeout;
use crate::model::{Change, ChangeKind, ProcIdentity, ProcessId, Record, State};
use crate::proc::cgroup::{CgroupRoot, RunCgroup};
use crate::proc::sandbox::{Policy, RunFolder};
use crate::proc::{self, Leader, Rlimit, Signal, Tracked};
use crate::store::{Batch, Store, StoreError};
use machine::{decide, Effect, Event, Reject};
use run::{Finished, RunContext};
use starter::{Job, Started, Starter};
use uids::UidPool;

/// Capacity of the API command channel: callers wait (backpressure) when
/// the actor is this far behind.
const COMMAND_QUEUE: usize = 1024;

/// How long to wait before writing a failed transition again.
const WRITE_RETRY: Duration = Duration::from_millis(500);

/// After the SIGKILL deadline, how often SIGKILL is repeated until the run
/// settles.
const ESCALATION_REPEAT: Duration = Duration::from_millis(50);

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
    pub cgroup_limits: Vec<(&'static str, u64)>,
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
}

/// Why the supervisor could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the starter thread: {0}")]
    Thread(std::io::Error),
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("Process not found.")]
    NotFound,
    #[error(transparent)]
    Rejected(#[from] Reject),
    #[error("Service is shutting down.")]
    ShuttingDown,
    #[error("Process could not be terminated.")]
    SignalFailed,
    #[error("{0}")]
    Storage(StoreError),
    #[error("The supervisor has stopped.")]
    Gone,
    #[error("Too many queued processes.")]
    TooManyQueued,
}

type Reply<T> = oneshot::Sender<Result<T, SupervisorError>>;

enum Command {
    Create(CreateRequest, Reply<ProcessId>),
    Run(ProcessId, bool, Reply<Record>),
    Kill(ProcessId, Reply<Record>),
    Delete(ProcessId, Reply<Record>),
    Shutdown(oneshot::Sender<()>),
}

/// Events the actor sends itself (through tasks, timers and the store).
pub(crate) enum Internal {
    Durable(u64, Result<(), StoreError>),
    Finished(Finished),
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

/// Handle for the API. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Command>,
    shutting_down: Arc<AtomicBool>,
}

impl Supervisor {
    /// Recovers unsettled records from the store and starts the actor.
    pub fn start(
        store: Store,
        settings: Settings,
        hub: Arc<Hub>,
    ) -> Result<Supervisor, StartError> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
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
            settings,
            int_tx,
            entries: HashMap::new(),
            queue: VecDeque::new(),
            active: 0,
            next_gen: 1,
            next_token: 1,
            pending: HashMap::new(),
            shutting_down: false,
            shutdown_waiters: Vec::new(),
        };
        actor.recover()?;
        tokio::spawn(actor.run(rx, int_rx));
        Ok(Supervisor {
            tx,
            shutting_down: Arc::new(AtomicBool::new(false)),
        })
    }

    async fn call<T>(&self, cmd: impl FnOnce(Reply<T>) -> Command) -> Result<T, SupervisorError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(cmd(tx))
            .await
            .map_err(|_| SupervisorError::Gone)?;
        rx.await.map_err(|_| SupervisorError::Gone)?
    }

    /// Whether a graceful stop has begun (new runs are refused).
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    fn refuse_if_stopping(&self) -> Result<(), SupervisorError> {
        if self.is_shutting_down() {
            Err(SupervisorError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Creates a process; returns once the record is durable.
    pub async fn create(&self, req: CreateRequest) -> Result<ProcessId, SupervisorError> {
        self.refuse_if_stopping()?;
        self.call(|r| Command::Create(req, r)).await
    }

    pub async fn run(&self, id: ProcessId, force: bool) -> Result<Record, SupervisorError> {
        self.refuse_if_stopping()?;
        self.call(|r| Command::Run(id, force, r)).await
    }

    pub async fn kill(&self, id: ProcessId) -> Result<Record, SupervisorError> {
        self.call(|r| Command::Kill(id, r)).await
    }

    pub async fn delete(&self, id: ProcessId) -> Result<Record, SupervisorError> {
        self.call(|r| Command::Delete(id, r)).await
    }

    /// Refuses new runs from now on, terminates every running group (SIGTERM,
    /// then SIGKILL after at most `kill_grace_ms`) and returns once all have
    /// settled and every transition is durable. Queued runs stay queued.
    pub async fn shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

enum RunKind {
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

/// A live run of a record: the processes we are responsible for.
struct Run {
    gen: u64,
    kind: RunKind,
    /// Whether it counts against `max_running` (orphans found at start-up
    /// do not: they are only being put down).
    holds_slot: bool,
    timeout: Option<AbortHandle>,
    escalation: Option<AbortHandle>,
    /// Every process a signal of ours reached, and those of them outside
    /// the leader's process group: reported as `killed` and `escaped`.
    signalled: HashSet<i32>,
    escaped: HashSet<i32>,
    /// The uid it holds from the pool (level `full`), given back when it
    /// has settled.
    uid: Option<u32>,
}

impl Run {
    fn new(gen: u64, kind: RunKind, holds_slot: bool, uid: Option<u32>) -> Run {
        Run {
            gen,
            kind,
            holds_slot,
            uid,
            timeout: None,
            escalation: None,
            signalled: HashSet::new(),
            escaped: HashSet::new(),
        }
    }

    /// Sends `sig` to every process of the run. Only called while the run is
    /// unsettled, i.e. while the leader is unreaped.
    fn signal(&mut self, sig: Signal) -> std::io::Result<()> {
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
    fn counts(&self) -> (Option<u32>, Option<u32>) {
        if self.signalled.is_empty() && self.escaped.is_empty() {
            return (None, None);
        }
        (
            Some(self.signalled.len() as u32),
            Some(self.escaped.len() as u32),
        )
    }

    fn cancel_timers(&mut self) {
        for t in [self.timeout.take(), self.escalation.take()]
            .into_iter()
            .flatten()
        {
            t.abort();
        }
    }
}

struct Entry {
    /// The latest decided record (durable once `pending` is 0).
    rec: Record,
    /// The state the last event reported, so a write that changes no state
    /// (a moved deadline) emits no event.
    announced: State,
    run: Option<Run>,
    /// Writes of this record still in flight.
    pending: u32,
    /// A transition of this record failed to persist and is retried.
    needs_retry: bool,
    deleted: bool,
    /// Handed to the starter; the record stays `queued` until it answers.
    starting: bool,
    /// Commands for this record that arrived while it was starting,
    /// replayed in order once it has started (or failed to).
    deferred: Vec<Command>,
}

impl Entry {
    /// An entry for a record as the store has it (nothing in flight).
    fn new(rec: Record) -> Entry {
        Entry {
            announced: rec.state,
            rec,
            run: None,
            pending: 0,
            needs_retry: false,
            deleted: false,
            starting: false,
            deferred: Vec::new(),
        }
    }
}

/// What to do once a write is durable.
enum After {
    Nothing,
    Created {
        reply: Reply<ProcessId>,
        id: ProcessId,
        enqueue: bool,
    },
    Reply {
        reply: Reply<Record>,
        rec: Record,
        enqueue: bool,
    },
    /// Send SIGTERM to the run (generation `gen`) if asked, then answer.
    Terminate {
        reply: Option<Reply<Record>>,
        gen: u64,
        rec: Record,
        send_term: bool,
    },
}

struct Pending {
    id: ProcessId,
    after: After,
    /// Published once the write is durable.
    change: Option<Change>,
    /// What `announced` was before this write changed it; restored if the
    /// write fails so that its retry announces the transition again.
    announced_before: Option<State>,
}

struct Actor {
    store: Store,
    settings: Settings,
    int_tx: mpsc::UnboundedSender<Internal>,
    hub: Arc<Hub>,
    next_id: u64,
    /// Sequence number of the next event.
    next_seq: u64,
    entries: HashMap<ProcessId, Entry>,
    queue: VecDeque<ProcessId>,
    /// Runs holding a slot.
    active: usize,
    next_gen: u64,
    next_token: u64,
    pending: HashMap<u64, Pending>,
    /// Stages and spawns runs off the actor.
    starter: Starter,
    /// Level `full`'s per-run uids.
    uids: Option<UidPool>,
    shutting_down: bool,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
}

impl Actor {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut internal: mpsc::UnboundedReceiver<Internal>,
    ) {
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
        }
    }

    /// Finds the record: in memory if active, else in the store.
    fn entry(&mut self, id: ProcessId) -> Result<&mut Entry, SupervisorError> {
        if !self.entries.contains_key(&id) {
            let rec = self
                .store
                .get(id)
                .map_err(SupervisorError::Storage)?
                .ok_or(SupervisorError::NotFound)?;
            self.entries.insert(id, Entry::new(rec));
        }
        let e = self.entries.get_mut(&id).expect("just inserted");
        if e.deleted {
            return Err(SupervisorError::NotFound);
        }
        Ok(e)
    }

    /// Decides `event` for `id` and records the new record in memory.
    fn apply(
        &mut self,
        id: ProcessId,
        event: Event,
    ) -> Result<(Record, Vec<Effect>), SupervisorError> {
        let entry = self.entry(id)?;
        let result = decide(&entry.rec, event);
        match result {
            Ok((next, effects)) => {
                if effects.contains(&Effect::DeleteAll) {
                    entry.deleted = true;
                } else {
                    entry.rec = next.clone();
                }
                Ok((next, effects))
            }
            Err(reject) => {
                self.gc(id);
                Err(reject.into())
            }
        }
    }

    /// Submits the write for a decided transition. `after` runs once it is
    /// durable.
    fn persist(&mut self, id: ProcessId, rec: &Record, effects: &[Effect], after: After) {
        // New work (a rerun) may be refused when space runs low; what
        // records facts about processes (and kills, deletes) may use the
        // reserve.
        let mut batch = if matches!(after, After::Reply { enqueue: true, .. }) {
            Batch::durable()
        } else {
            Batch::durable().essential()
        };
        for fx in effects {
            match fx {
                Effect::ClearOutputs => batch.clear_outputs(id),
                Effect::Finish { output: Some(json) } => batch.put_output(id, json.clone()),
                _ => {}
            }
        }
        let mut announced_before = None;
        let kind = if effects.contains(&Effect::DeleteAll) {
            batch.delete_process(id);
            Some(ChangeKind::Deleted)
        } else {
            batch.put_record(rec);
            self.entries
                .get_mut(&id)
                .filter(|e| e.announced != rec.state)
                .map(|e| {
                    announced_before = Some(e.announced);
                    e.announced = rec.state;
                    ChangeKind::Entered(rec.state)
                })
        };
        self.submit(id, batch, after, kind.map(|k| (k, rec)), announced_before);
    }

    /// Queues a write; numbers its event, if any, in the same batch.
    fn submit(
        &mut self,
        id: ProcessId,
        mut batch: Batch,
        after: After,
        change: Option<(ChangeKind, &Record)>,
        announced_before: Option<State>,
    ) {
        let change = change.map(|(kind, rec)| {
            let seq = self.next_seq;
            self.next_seq += 1;
            batch.put_change(seq, kind, rec);
            let retention = self.settings.event_retention.max(1);
            // One range tombstone now and then, not one per event.
            let every = (retention / 8).clamp(1, 1024);
            if seq.is_multiple_of(every) && seq > retention {
                batch.trim_changes_below(seq - retention + 1);
            }
            Change {
                seq,
                kind,
                record: rec.clone(),
            }
        });
        let token = self.next_token;
        self.next_token += 1;
        if let Some(e) = self.entries.get_mut(&id) {
            e.pending += 1;
        }
        self.pending.insert(
            token,
            Pending {
                id,
                after,
                change,
                announced_before,
            },
        );
        let tx = self.int_tx.clone();
        self.store.submit_then(batch, move |r| {
            let _ = tx.send(Internal::Durable(token, r));
        });
    }

    /// Forgets an in-memory entry once it is idle (or deleted), durable and
    /// has no run.
    fn gc(&mut self, id: ProcessId) {
        if let Some(e) = self.entries.get(&id) {
            if e.pending == 0
                && e.run.is_none()
                && !e.starting
                && !e.needs_retry
                && (e.deleted || e.rec.state == State::Idle)
            {
                self.entries.remove(&id);
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        let target = match &cmd {
            Command::Run(id, ..) | Command::Kill(id, _) | Command::Delete(id, _) => Some(*id),
            Command::Create(..) | Command::Shutdown(_) => None,
        };
        if let Some(e) = target.and_then(|id| self.entries.get_mut(&id)) {
            if e.starting {
                tracing::debug!(id = ?target, "command waits for the run to start");
                e.deferred.push(cmd);
                return;
            }
        }
        match cmd {
            Command::Create(req, reply) => self.create(req, reply),
            Command::Run(id, force, reply) => {
                if self.shutting_down {
                    let _ = reply.send(Err(SupervisorError::ShuttingDown));
                    return;
                }
                if self.queue_full() {
                    let _ = reply.send(Err(SupervisorError::TooManyQueued));
                    return;
                }
                self.decide_and_reply(id, Event::Run { force }, reply, true);
            }
            Command::Kill(id, reply) => self.kill(id, reply),
            Command::Delete(id, reply) => self.decide_and_reply(id, Event::Delete, reply, false),
            Command::Shutdown(done) => self.begin_shutdown(done),
        }
    }

    /// A client's request that answers with the record once the
    /// transition is durable (then enqueues it).
    fn decide_and_reply(
        &mut self,
        id: ProcessId,
        event: Event,
        reply: Reply<Record>,
        enqueue: bool,
    ) {
        match self.apply(id, event) {
            Ok((rec, fx)) => {
                let after = After::Reply {
                    reply,
                    rec: rec.clone(),
                    enqueue,
                };
                self.persist(id, &rec, &fx, after);
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Admission control: whether one more queued process is allowed.
    fn queue_full(&self) -> bool {
        let queued = self
            .entries
            .values()
            .filter(|e| e.rec.state == State::Queued && !e.deleted)
            .count();
        queued >= self.settings.max_queued
    }

    fn create(&mut self, req: CreateRequest, reply: Reply<ProcessId>) {
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
        batch.put_record(&rec);
        batch.put_code(id, req.code.as_bytes());
        batch.put_next_id(self.next_id);
        let after = After::Created {
            reply,
            id,
            enqueue: req.autorun,
        };
        self.submit(
            id,
            batch,
            after,
            Some((ChangeKind::Entered(rec.state), &rec)),
            None,
        );
        // The create's write is in flight.
        let mut entry = Entry::new(rec);
        entry.pending = 1;
        self.entries.insert(id, entry);
    }

    fn kill(&mut self, id: ProcessId, reply: Reply<Record>) {
        match self.apply(id, Event::Kill { now: now_ms() }) {
            Ok((rec, fx)) => {
                if fx.contains(&Effect::Dequeue) {
                    self.queue.retain(|q| *q != id);
                    let after = After::Reply {
                        reply,
                        rec: rec.clone(),
                        enqueue: false,
                    };
                    self.persist(id, &rec, &fx, after);
                } else {
                    self.terminate(id, rec, fx, Some(reply));
                }
            }
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Persists a transition that terminates a run (or moves its SIGKILL
    /// deadline): arms the deadline now, and sends SIGTERM once the
    /// transition is durable.
    fn terminate(
        &mut self,
        id: ProcessId,
        rec: Record,
        fx: Vec<Effect>,
        reply: Option<Reply<Record>>,
    ) {
        let Some(gen) = self
            .entries
            .get(&id)
            .and_then(|e| e.run.as_ref())
            .map(|r| r.gen)
        else {
            // Cannot happen: only records with a run terminate. Answer anyway.
            if let Some(reply) = reply {
                let _ = reply.send(Ok(rec));
            }
            return;
        };
        let mut send_term = false;
        for f in &fx {
            match f {
                Effect::Terminate { deadline } => {
                    send_term = true;
                    self.arm_escalation(id, gen, *deadline);
                }
                Effect::Hasten { deadline } => self.arm_escalation(id, gen, *deadline),
                _ => {}
            }
        }
        let after = if send_term || reply.is_some() {
            After::Terminate {
                reply,
                gen,
                rec: rec.clone(),
                send_term,
            }
        } else {
            After::Nothing
        };
        self.persist(id, &rec, &fx, after);
    }

    fn arm_escalation(&mut self, id: ProcessId, gen: u64, deadline: u64) {
        let delay = Duration::from_millis(deadline.saturating_sub(now_ms()));
        let handle = self.timer(id, gen, TimerKind::Escalate, delay);
        if let Some(run) = self.entries.get_mut(&id).and_then(|e| e.run.as_mut()) {
            if let Some(old) = run.escalation.replace(handle) {
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

    fn begin_shutdown(&mut self, done: oneshot::Sender<()>) {
        self.shutting_down = true;
        self.shutdown_waiters.push(done);
        let live: Vec<ProcessId> = self
            .entries
            .iter()
            .filter(|(_, e)| e.run.is_some())
            .map(|(id, _)| *id)
            .collect();
        let grace = self.settings.kill_grace_ms;
        for id in live {
            let event = Event::Shutdown {
                now: now_ms(),
                grace,
            };
            // Refused: already terminating with an earlier deadline.
            if let Ok((rec, fx)) = self.apply(id, event) {
                self.terminate(id, rec, fx, None);
            }
        }
    }

    fn check_shutdown(&mut self) {
        if self.shutting_down
            && !self.shutdown_waiters.is_empty()
            && self.pending.is_empty()
            && self
                .entries
                .values()
                .all(|e| e.run.is_none() && !e.starting)
        {
            for w in self.shutdown_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn on_internal(&mut self, ev: Internal) {
        match ev {
            Internal::Durable(token, result) => self.on_durable(token, result),
            Internal::Finished(f) => self.on_finished(f),
            Internal::Started(st) => self.on_started(st),
            Internal::Timer(id, gen, kind) => self.on_timer(id, gen, kind),
            Internal::Retry(id) => {
                let Some(e) = self.entries.get_mut(&id) else {
                    return;
                };
                e.needs_retry = false;
                if e.deleted {
                    return;
                }
                let rec = e.rec.clone();
                tracing::info!(%id, "writing a failed transition again");
                self.persist(id, &rec, &[], After::Nothing);
            }
        }
    }

    fn on_durable(&mut self, token: u64, result: Result<(), StoreError>) {
        let Some(Pending {
            id,
            after,
            change,
            announced_before,
        }) = self.pending.remove(&token)
        else {
            return;
        };
        if let Some(e) = self.entries.get_mut(&id) {
            e.pending = e.pending.saturating_sub(1);
        }
        if let Err(err) = result {
            self.on_write_failed(id, after, err, announced_before);
            self.gc(id);
            return;
        }
        if let Some(change) = change {
            self.hub.publish(change);
        }
        match after {
            After::Nothing => {}
            After::Created { reply, id, enqueue } => {
                self.enqueue_if_queued(id, enqueue);
                let _ = reply.send(Ok(id));
            }
            After::Reply {
                reply,
                rec,
                enqueue,
            } => {
                self.enqueue_if_queued(id, enqueue);
                let _ = reply.send(Ok(rec));
            }
            After::Terminate {
                reply,
                gen,
                rec,
                send_term,
            } => {
                let run = self
                    .entries
                    .get_mut(&id)
                    .and_then(|e| e.run.as_mut())
                    .filter(|r| send_term && r.gen == gen);
                // A run that already settled needs no signal; one that is
                // still there gets SIGTERM now that "terminating" is durable.
                let sent = run.map(|r| r.signal(Signal::Term)).unwrap_or(Ok(()));
                if let Err(e) = &sent {
                    tracing::warn!(%id, error = %e, "SIGTERM to the process group failed");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(match sent {
                        Ok(()) => Ok(rec),
                        Err(_) => Err(SupervisorError::SignalFailed),
                    });
                }
            }
        }
        self.gc(id);
    }

    /// The store refused a write: the client hears so, and the in-memory
    /// record goes back to what the store holds so the two never diverge.
    /// A write the store refused. For a client's request the client hears
    /// so and the in-memory record goes back to what the store holds, so
    /// the two never diverge. A transition that records what processes did
    /// (started, settled, ...) is a fact, not a request: it stays decided
    /// and is written again until the store takes it.
    fn on_write_failed(
        &mut self,
        id: ProcessId,
        after: After,
        err: StoreError,
        announced_before: Option<State>,
    ) {
        tracing::error!(%id, error = %err, "persisting a transition failed");
        let client_facing = match &after {
            After::Nothing => false,
            After::Terminate { reply, .. } => reply.is_some(),
            After::Created { .. } | After::Reply { .. } => true,
        };
        if !client_facing {
            if let Some(e) = self.entries.get_mut(&id) {
                if let Some(prev) = announced_before {
                    e.announced = prev;
                }
                if !e.needs_retry {
                    e.needs_retry = true;
                    let tx = self.int_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(WRITE_RETRY).await;
                        let _ = tx.send(Internal::Retry(id));
                    });
                }
            }
            return;
        }
        let stored = self.store.get(id).ok().flatten();
        if let Some(e) = self.entries.get_mut(&id) {
            match stored {
                Some(rec) => {
                    e.announced = rec.state;
                    e.rec = rec;
                    e.deleted = false;
                }
                None if e.run.is_none() => e.deleted = true,
                None => {}
            }
        }
        let msg = || {
            SupervisorError::Storage(match &err {
                StoreError::Full => StoreError::Full,
                other => StoreError::Write(other.to_string()),
            })
        };
        match after {
            After::Nothing => {}
            After::Created { reply, .. } => {
                let _ = reply.send(Err(msg()));
            }
            After::Reply { reply, .. } => {
                let _ = reply.send(Err(msg()));
            }
            After::Terminate { reply, .. } => {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(msg()));
                }
            }
        }
    }

    fn enqueue_if_queued(&mut self, id: ProcessId, enqueue: bool) {
        if enqueue
            && self
                .entries
                .get(&id)
                .is_some_and(|e| e.rec.state == State::Queued && !e.deleted)
        {
            self.queue.push_back(id);
        }
    }

    fn try_start(&mut self) {
        while !self.shutting_down && self.active < self.settings.max_running {
            let Some(id) = self.queue.pop_front() else {
                return;
            };
            if self
                .entries
                .get(&id)
                .is_some_and(|e| e.rec.state == State::Queued)
            {
                self.start(id);
            }
        }
    }

    /// Hands a queued run to the starter; it holds a slot from now on.
    fn start(&mut self, id: ProcessId) {
        let gen = self.next_gen;
        self.next_gen += 1;
        let uid = match &mut self.uids {
            None => self.settings.credentials,
            Some(pool) => match pool.take() {
                Some(uid) => Some((uid, uid)),
                None => {
                    self.start_failed(
                        id,
                        "no free run uid (every uid of the block is held)".into(),
                    );
                    return;
                }
            },
        };
        let network = self
            .entries
            .get(&id)
            .map_or(self.settings.network, |e| e.rec.network);
        if let Err(job) = self.starter.submit(Job {
            id,
            gen,
            uid,
            network,
        }) {
            tracing::error!(%id, "the starter thread has stopped");
            self.release_uid(job.uid.map(|u| u.0));
            self.start_failed(id, "the daemon's starter thread has stopped".into());
            return;
        }
        self.active += 1;
        if let Some(e) = self.entries.get_mut(&id) {
            e.starting = true;
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
        if let Ok((rec, fx)) = self.apply(id, event) {
            self.persist(id, &rec, &fx, After::Nothing);
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
        let deferred = match self.entries.get_mut(&id) {
            Some(e) => {
                e.starting = false;
                std::mem::take(&mut e.deferred)
            }
            None => Vec::new(),
        };
        let now = now_ms();
        match result {
            Ok((sp, scope, folder)) => {
                let started = self.apply(
                    id,
                    Event::Started {
                        identity: sp.identity.clone(),
                        sandbox: self.settings.sandbox.level,
                        uid: uid.map(|u| u.0),
                        now,
                    },
                );
                let leader = Arc::new(sp.leader);
                let tracked = Tracked {
                    pgid: leader.pid(),
                    tag: id.to_string(),
                    uid: pool_uid,
                    scope,
                };
                let Ok((rec, fx)) = started else {
                    // Cannot happen (commands for a starting record wait),
                    // but a child must never be left behind: put it down.
                    tracing::error!(%id, "a started run's record was no longer queued; killing it");
                    self.active -= 1;
                    // Its uid stays held: nothing tells the actor when the
                    // run is gone, and a uid must not be shared.
                    tokio::spawn(async move {
                        let _ = tracked.signal(Signal::Kill);
                        let _ = leader.exited().await;
                        tracked.wait_only_leader_left().await;
                        let _ = leader.reap();
                        tracked.cleanup();
                        drop(folder);
                    });
                    return;
                };
                let mut run = Run::new(
                    gen,
                    RunKind::Child {
                        leader: leader.clone(),
                        tracked: tracked.clone(),
                    },
                    true,
                    pool_uid,
                );
                for f in &fx {
                    if let Effect::ArmTimeout { after_ms } = f {
                        run.timeout = Some(self.timer(
                            id,
                            gen,
                            TimerKind::Timeout,
                            Duration::from_millis(*after_ms),
                        ));
                    }
                }
                self.entries.get_mut(&id).expect("started entry").run = Some(run);
                tracing::info!(%id, pid = leader.pid(), "started");
                let ctx = self.run_context(id, gen, Some(folder));
                tokio::spawn(run::watch_child(ctx, leader, tracked, sp.stdout, sp.stderr));
                self.persist(id, &rec, &fx, After::Nothing);
                if self.shutting_down {
                    // The stop began while it was starting.
                    let event = Event::Shutdown {
                        now: now_ms(),
                        grace: self.settings.kill_grace_ms,
                    };
                    if let Ok((rec, fx)) = self.apply(id, event) {
                        self.terminate(id, rec, fx, None);
                    }
                }
            }
            Err(e) => {
                self.active -= 1;
                self.release_uid(pool_uid);
                tracing::warn!(%id, error = %e, "failed to start");
                self.start_failed(id, e.to_string());
            }
        }
        for cmd in deferred {
            self.on_command(cmd);
        }
    }

    fn run_context(&self, id: ProcessId, gen: u64, folder: Option<RunFolder>) -> RunContext {
        RunContext {
            id,
            gen,
            store: self.store.clone(),
            max_output_bytes: self.settings.max_output_bytes,
            folder,
            tx: self.int_tx.clone(),
            hub: self.hub.clone(),
        }
    }

    fn on_finished(&mut self, f: Finished) {
        let id = f.id;
        let current = self
            .entries
            .get(&id)
            .and_then(|e| e.run.as_ref())
            .map(|r| r.gen);
        if current != Some(f.gen) {
            return;
        }
        let (killed, escaped) = self
            .entries
            .get(&id)
            .and_then(|e| e.run.as_ref())
            .map(Run::counts)
            .unwrap_or((None, None));
        let event = Event::Settled {
            status: f.status,
            output: f.output,
            streams: f.streams,
            killed,
            escaped,
            now: now_ms(),
        };
        let Ok((rec, fx)) = self.apply(id, event) else {
            return;
        };
        let mut run = self
            .entries
            .get_mut(&id)
            .and_then(|e| e.run.take())
            .expect("run present");
        run.cancel_timers();
        match &run.kind {
            RunKind::Child { leader, tracked } => {
                // The run is empty: the leader's pid may be released now.
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
        // Descendants reparented to us are reaped by the main thread
        // (proc::OrphanReaper), never here.
        if run.holds_slot {
            self.active -= 1;
        }
        // Nothing of the run is alive and its folder is gone: its uid may
        // go to another run.
        self.release_uid(run.uid);
        tracing::info!(%id, exit_state = ?rec.exit_state, "settled");
        self.persist(id, &rec, &fx, After::Nothing);
    }

    fn on_timer(&mut self, id: ProcessId, gen: u64, kind: TimerKind) {
        let Some(entry) = self.entries.get_mut(&id) else {
            return;
        };
        let terminating = entry.rec.state == State::Terminating;
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
                        .entries
                        .get_mut(&id)
                        .and_then(|e| e.run.as_mut())
                        .and_then(|r| r.escalation.replace(again))
                    {
                        old.abort();
                    }
                }
            }
            TimerKind::Timeout => {
                if let Ok((rec, fx)) = self.apply(id, Event::TimedOut { now: now_ms() }) {
                    tracing::info!(%id, "timed out");
                    self.terminate(id, rec, fx, None);
                }
            }
        }
    }

    /// Start-up: queued records go back in the queue (oldest first); records
    /// found running or terminating are checked in /proc and their groups
    /// put down.
    fn recover(&mut self) -> Result<(), StoreError> {
        for rec in self.store.unsettled()? {
            let id = rec.id;
            let state = rec.state;
            let identity = rec.identity.clone();
            let run_uid = rec.run_uid;
            self.entries.insert(id, Entry::new(rec));
            if state == State::Queued {
                self.queue.push_back(id);
                continue;
            }
            let cgroup = self.settings.cgroups.as_ref().map(|r| r.run(id.0));
            let alive = proc::orphan_alive(identity.as_ref(), cgroup.as_ref());
            tracing::info!(%id, alive, "recovering a run from before the restart");
            let Ok((rec, fx)) = self.apply(
                id,
                Event::Recovered {
                    alive,
                    now: now_ms(),
                },
            ) else {
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
                self.entries.get_mut(&id).expect("entry").run =
                    Some(Run::new(gen, kind, false, uid));
                let folder = self.settings.sandbox.adopt_folder(id.0);
                let ctx = self.run_context(id, gen, folder);
                tokio::spawn(run::watch_orphan(ctx, identity, cgroup));
                self.terminate(id, rec, fx, None);
            } else {
                if let Some(cg) = &cgroup {
                    cg.remove();
                }
                self.persist(id, &rec, &fx, After::Nothing);
            }
        }
        self.remove_stale_cgroups();
        self.kill_untracked();
        self.settings.sandbox.remove_stale_folders(|id| {
            self.entries
                .get(&ProcessId(id))
                .is_some_and(|e| e.run.is_some())
        });
        Ok(())
    }

    /// Kills processes of this data dir that no record accounts for: a run
    /// spawned just before a crash whose `running` transition never became
    /// durable (its record says queued, and it will run again). Runs being
    /// put down as orphans are left to their own termination.
    fn kill_untracked(&self) {
        if let Some(pool) = &self.uids {
            // Level full: every process with a uid of this daemon's block
            // is a run's; those of runs no record tracks are killed.
            let (base, count) = pool.range();
            let tracked: HashSet<u32> = self
                .entries
                .values()
                .filter(|e| e.run.is_some())
                .filter_map(|e| e.rec.run_uid)
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
            if self
                .entries
                .get(&ProcessId(id))
                .is_some_and(|e| e.run.is_some())
            {
                continue;
            }
            if proc::kill_untracked(pid, run_dir, id) {
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
                .entries
                .get(&ProcessId(id))
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
