//! The commit pipeline: a decided transition becomes one store batch (with
//! its numbered event), and what must wait for durability happens when the
//! store answers, in submission order.
//!
//! On success the entry learns its new durable record, the event is
//! published, and the [`AfterDurable`] steps run: enqueue, SIGTERM, reply.
//! On failure a client's request is rolled back to the last durable record
//! and the client hears why; a fact (what processes did) stays decided and
//! is written again until the store takes it.

use std::time::Duration;

use super::actor::Actor;
use super::handle::{Reply, SupervisorError};
use super::Internal;
use crate::model::{Change, ChangeKind, ProcessId, Record, State};
use crate::proc::Signal;
use crate::store::{Batch, StoreError};

/// How long to wait before writing a failed transition again.
const WRITE_RETRY: Duration = Duration::from_millis(500);

/// What a batch does to the record.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Write {
    /// Writes a new record (its first event).
    Create,
    /// Writes the record's next version (an event when its state changed).
    Update,
    /// Removes it with its code and outputs.
    Delete,
}

/// Who waits for a write.
pub(super) enum Waiter {
    /// Nobody: a fact about processes, retried until it is written.
    Nobody,
    /// A create, and the idempotency key it claims (others that sent the
    /// same key meanwhile wait for the same answer).
    Created(Reply<ProcessId>, Option<String>),
    Record(Reply<Record>),
}

/// What to do once a write is durable.
pub(super) struct AfterDurable {
    pub waiter: Waiter,
    /// Put the record in the run queue (if it is still queued).
    pub enqueue: bool,
    /// Send SIGTERM to this generation of the record's run (if it is still
    /// there).
    pub terminate: Option<u64>,
}

impl AfterDurable {
    pub fn new(waiter: Waiter) -> AfterDurable {
        AfterDurable {
            waiter,
            enqueue: false,
            terminate: None,
        }
    }
}

/// A write in flight.
pub(super) struct Pending {
    id: ProcessId,
    /// The record written (`None`: deleted), answered to the waiter.
    written: Option<Record>,
    reply_with: Record,
    after: AfterDurable,
    /// Published once the write is durable.
    change: Option<Change>,
    /// What `announced` was before this write changed it; restored if the
    /// write fails so that its retry announces the transition again.
    announced_before: Option<State>,
}

impl Actor {
    /// Submits `batch` with `write` of `rec`, and numbers the record's
    /// event in the same batch when its state changed (always for a create
    /// or delete).
    pub(super) fn commit(
        &mut self,
        id: ProcessId,
        mut batch: Batch,
        rec: Record,
        write: Write,
        after: AfterDurable,
    ) {
        let mut announced_before = None;
        let kind = match write {
            Write::Delete => {
                batch.delete_process(id);
                Some(ChangeKind::Deleted)
            }
            Write::Create => {
                batch.put_record(&rec);
                Some(ChangeKind::Entered(rec.state))
            }
            Write::Update => {
                batch.put_record(&rec);
                self.table
                    .get_mut(id)
                    .filter(|e| e.announced != rec.state)
                    .map(|e| {
                        announced_before = Some(e.announced);
                        e.announced = rec.state;
                        ChangeKind::Entered(rec.state)
                    })
            }
        };
        let change = kind.map(|kind| {
            let seq = self.next_seq;
            self.next_seq += 1;
            batch.put_change(seq, kind, &rec);
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
        if let Some(e) = self.table.get_mut(id) {
            e.pending += 1;
        }
        self.pending.insert(
            token,
            Pending {
                id,
                written: (write != Write::Delete).then(|| rec.clone()),
                reply_with: rec,
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

    /// The store answered write `token`.
    pub(super) fn on_durable(&mut self, token: u64, result: Result<(), StoreError>) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let id = p.id;
        if let Some(e) = self.table.get_mut(id) {
            e.pending = e.pending.saturating_sub(1);
        }
        match result {
            Ok(()) => self.on_written(p),
            Err(err) => self.on_refused(p, err),
        }
        self.table.gc(id);
    }

    fn on_written(&mut self, p: Pending) {
        let Pending {
            id,
            written,
            reply_with,
            after,
            change,
            ..
        } = p;
        self.table.durable(id, written);
        if let Some(change) = change {
            self.hub.publish(change);
        }
        if after.enqueue {
            self.table.enqueue(id);
        }
        // A run that already settled needs no signal; one that is still
        // there gets SIGTERM now that "terminating" is durable.
        let mut sent = Ok(());
        if let Some(gen) = after.terminate {
            if let Some(run) = self
                .table
                .get_mut(id)
                .and_then(|e| e.run.as_mut())
                .filter(|r| r.gen == gen)
            {
                sent = run.signal(Signal::Term);
            }
            if let Err(e) = &sent {
                tracing::warn!(%id, error = %e, "SIGTERM to the run failed");
            }
        }
        match after.waiter {
            Waiter::Nobody => {}
            Waiter::Created(reply, claim) => {
                let _ = reply.send(Ok(id));
                self.resolve_claim(claim, || Ok(id));
            }
            Waiter::Record(reply) => {
                let _ = reply.send(match sent {
                    Ok(()) => Ok(reply_with),
                    Err(_) => Err(SupervisorError::SignalFailed),
                });
            }
        }
    }

    /// A write the store refused. For a client's request the client hears
    /// so and the record goes back to its last durable version, so memory
    /// and store never diverge. A transition that records what processes
    /// did (started, settled, ...) is a fact, not a request: it stays
    /// decided and is written again until the store takes it.
    fn on_refused(&mut self, p: Pending, err: StoreError) {
        let id = p.id;
        tracing::error!(%id, error = %err, "persisting a transition failed");
        let reply = match p.after.waiter {
            Waiter::Nobody => {
                self.retry_later(id, p.announced_before);
                return;
            }
            waiter => waiter,
        };
        self.table.roll_back(id);
        let err = || match &err {
            StoreError::Full => StoreError::Full,
            other => StoreError::Write(other.to_string()),
        };
        match reply {
            Waiter::Nobody => {}
            Waiter::Created(reply, claim) => {
                let _ = reply.send(Err(SupervisorError::Storage(err())));
                self.resolve_claim(claim, || Err(SupervisorError::Storage(err())));
            }
            Waiter::Record(reply) => {
                let _ = reply.send(Err(SupervisorError::Storage(err())));
            }
        }
    }

    fn retry_later(&mut self, id: ProcessId, announced_before: Option<State>) {
        let Some(e) = self.table.get_mut(id) else {
            return;
        };
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

    /// Writes a record again whose transition failed to persist.
    pub(super) fn on_retry(&mut self, id: ProcessId) {
        let Some(e) = self.table.get_mut(id) else {
            return;
        };
        e.needs_retry = false;
        if e.deleted {
            return;
        }
        let rec = e.rec().clone();
        tracing::info!(%id, "writing a failed transition again");
        self.commit(
            id,
            Batch::durable().essential(),
            rec,
            Write::Update,
            AfterDurable::new(Waiter::Nobody),
        );
    }
}
