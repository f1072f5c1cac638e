//! The API's handle on the supervisor: commands go to the actor over a
//! bounded channel and each carries the channel its answer comes back on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::actor::Actor;
use super::machine::Reject;
use super::{Adoption, CreateRequest, HandedRun, Settings};
use crate::events::Hub;
use crate::model::{ProcessId, Record};
use crate::store::{Store, StoreError};

/// Capacity of the API command channel: callers wait (backpressure) when
/// the actor is this far behind.
const COMMAND_QUEUE: usize = 1024;

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
    #[error("Idempotency-Key was already used with a different request.")]
    IdempotencyConflict,
}

/// Where a command's answer goes.
pub(super) type Reply<T> = oneshot::Sender<Result<T, SupervisorError>>;

pub(super) enum Command {
    Create(CreateRequest, Reply<ProcessId>),
    Run(ProcessId, bool, Reply<Record>),
    Kill(ProcessId, Reply<Record>),
    Delete(ProcessId, Reply<Record>),
    Shutdown(oneshot::Sender<()>),
    Park(oneshot::Sender<Vec<HandedRun>>),
}

impl Command {
    /// The record the command is about, if any.
    pub(super) fn target(&self) -> Option<ProcessId> {
        match self {
            Command::Run(id, ..) | Command::Kill(id, _) | Command::Delete(id, _) => Some(*id),
            Command::Create(..) | Command::Shutdown(_) | Command::Park(_) => None,
        }
    }
}

/// Handle for the API. Cheap to clone.
#[derive(Clone)]
pub struct Supervisor {
    tx: mpsc::Sender<Command>,
    shutting_down: Arc<AtomicBool>,
}

impl Supervisor {
    /// Recovers unsettled records from the store, re-adopting the runs a
    /// previous image handed over (`adoption`), and starts the actor.
    pub fn start(
        store: Store,
        settings: Settings,
        hub: Arc<Hub>,
        adoption: Adoption,
    ) -> Result<Supervisor, StartError> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let actor = Actor::new(store, settings, hub, adoption)?;
        tokio::spawn(actor.run(rx));
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

    /// For a handover: refuses new runs, starts none of the queued (they
    /// stay queued), lets every start in flight finish, then stops
    /// watching every run without touching it and returns what the next
    /// image needs to re-adopt them, once every transition is durable.
    /// Runs that settle meanwhile are recorded as usual. The supervisor
    /// does nothing more afterwards.
    pub async fn park(&self) -> Result<Vec<HandedRun>, SupervisorError> {
        self.shutting_down.store(true, Ordering::Release);
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::Park(tx))
            .await
            .map_err(|_| SupervisorError::Gone)?;
        rx.await.map_err(|_| SupervisorError::Gone)
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
