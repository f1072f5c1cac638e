//! The run table: the records the actor holds in memory, the run queue and
//! the run slots, with their invariants kept in one place.
//!
//! - An entry exists for every record that is not idle, or has a write in
//!   flight, a run, a start under way or a failed write to retry; anything
//!   else is read from the store when needed and forgotten again ([`Table::gc`]).
//! - `queued` counts the entries whose record is `queued`: every change of
//!   a record goes through [`Table::set_record`], so admission control is a
//!   comparison, not a scan.
//! - A run slot is a [`Slot`] token: only [`Table::take_slot`] makes one
//!   and only [`Table::release_slot`] consumes it, so the count of running
//!   runs cannot drift from the slots actually held.
//! - Each entry keeps its last durable record: a refused write rolls back
//!   to it without reading the store.

use std::collections::{HashMap, VecDeque};

use super::handle::{Command, SupervisorError};
use super::live::Run;
use crate::model::{ProcessId, Record, State};
use crate::store::Store;

/// A held run slot (one of `max_running`). Not `Clone`: it is given back
/// exactly once.
#[derive(Debug)]
pub(super) struct Slot(());

pub(super) struct Entry {
    /// The latest decided record (durable once `pending` is 0).
    rec: Record,
    /// What the store holds for this record as far as the actor knows:
    /// the last record whose write completed (`None`: none yet, the create
    /// is in flight).
    durable: Option<Record>,
    /// The state the last event reported, so a write that changes no state
    /// (a moved deadline) emits no event.
    pub announced: State,
    pub run: Option<Run>,
    /// Writes of this record still in flight.
    pub pending: u32,
    /// A transition of this record failed to persist and is retried.
    pub needs_retry: bool,
    pub deleted: bool,
    /// Handed to the starter, with the slot it will run in; the record
    /// stays `queued` until the starter answers.
    pub starting: Option<Slot>,
    /// Commands for this record that arrived while it was starting,
    /// replayed in order once it has started (or failed to).
    pub deferred: Vec<Command>,
}

impl Entry {
    fn new(rec: Record, durable: bool) -> Entry {
        Entry {
            announced: rec.state,
            durable: durable.then(|| rec.clone()),
            rec,
            run: None,
            pending: 0,
            needs_retry: false,
            deleted: false,
            starting: None,
            deferred: Vec::new(),
        }
    }

    pub fn rec(&self) -> &Record {
        &self.rec
    }

    /// Whether the record is still there (not deleted) and in `state`.
    pub fn is(&self, state: State) -> bool {
        !self.deleted && self.rec.state == state
    }

    fn counts_as_queued(&self) -> bool {
        self.is(State::Queued)
    }
}

pub(super) struct Table {
    entries: HashMap<ProcessId, Entry>,
    /// Runs waiting for a slot, oldest first. May hold ids that are no
    /// longer queued (killed meanwhile); [`Table::next_queued`] skips them.
    queue: VecDeque<ProcessId>,
    /// Entries whose record is `queued` (see the module doc).
    queued: usize,
    free_slots: usize,
}

impl Table {
    pub fn new(max_running: usize) -> Table {
        Table {
            entries: HashMap::new(),
            queue: VecDeque::new(),
            queued: 0,
            free_slots: max_running,
        }
    }

    pub fn get(&self, id: ProcessId) -> Option<&Entry> {
        self.entries.get(&id)
    }

    pub fn get_mut(&mut self, id: ProcessId) -> Option<&mut Entry> {
        self.entries.get_mut(&id)
    }

    pub fn entries(&self) -> impl Iterator<Item = (ProcessId, &Entry)> {
        self.entries.iter().map(|(id, e)| (*id, e))
    }

    /// The entry of a record that exists: in memory if active, else loaded
    /// from the store.
    pub fn load(&mut self, id: ProcessId, store: &Store) -> Result<&mut Entry, SupervisorError> {
        if !self.entries.contains_key(&id) {
            let rec = store
                .get(id)
                .map_err(SupervisorError::Storage)?
                .ok_or(SupervisorError::NotFound)?;
            self.insert(rec, true);
        }
        let e = self.entries.get_mut(&id).expect("just inserted");
        if e.deleted {
            return Err(SupervisorError::NotFound);
        }
        Ok(e)
    }

    /// Adds a record: one the store holds (`durable`), or one whose create
    /// is in flight.
    pub fn insert(&mut self, rec: Record, durable: bool) -> &mut Entry {
        let id = rec.id;
        let entry = Entry::new(rec, durable);
        self.queued += usize::from(entry.counts_as_queued());
        if let Some(old) = self.entries.insert(id, entry) {
            self.queued -= usize::from(old.counts_as_queued());
        }
        self.entries.get_mut(&id).expect("just inserted")
    }

    /// Replaces an entry's decided record (`deleted`: the decision removes
    /// it).
    pub fn set_record(&mut self, id: ProcessId, rec: Record, deleted: bool) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let before = e.counts_as_queued();
        if deleted {
            e.deleted = true;
        } else {
            e.rec = rec;
        }
        let after = e.counts_as_queued();
        self.queued = self.queued + usize::from(after) - usize::from(before);
    }

    /// A write of this record completed: the store now holds `written`
    /// (`None`: the record is deleted).
    pub fn durable(&mut self, id: ProcessId, written: Option<Record>) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.durable = written;
        }
    }

    /// A client's write was refused: the entry goes back to what the store
    /// holds, so memory and store never diverge.
    pub fn roll_back(&mut self, id: ProcessId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        let before = e.counts_as_queued();
        match e.durable.clone() {
            Some(rec) => {
                e.announced = rec.state;
                e.rec = rec;
                e.deleted = false;
            }
            // Never durable (a create that failed): it does not exist.
            None if e.run.is_none() => e.deleted = true,
            None => {}
        }
        let after = e.counts_as_queued();
        self.queued = self.queued + usize::from(after) - usize::from(before);
    }

    /// Forgets an entry once it is idle (or deleted), durable and has no
    /// run, start or retry.
    pub fn gc(&mut self, id: ProcessId) {
        if let Some(e) = self.entries.get(&id) {
            if e.pending == 0
                && e.run.is_none()
                && e.starting.is_none()
                && !e.needs_retry
                && (e.deleted || e.rec.state == State::Idle)
            {
                let e = self.entries.remove(&id).expect("present");
                self.queued -= usize::from(e.counts_as_queued());
            }
        }
    }

    /// How many records are queued.
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// Puts a queued record at the end of the run queue.
    pub fn enqueue(&mut self, id: ProcessId) {
        if self.entries.get(&id).is_some_and(Entry::counts_as_queued) {
            self.queue.push_back(id);
        }
    }

    /// Takes a record out of the run queue (it will not start).
    pub fn dequeue(&mut self, id: ProcessId) {
        self.queue.retain(|q| *q != id);
    }

    /// The next record to start with a free slot, if there is one of each.
    pub fn next_queued(&mut self) -> Option<(ProcessId, Slot)> {
        while self.free_slots > 0 {
            let id = self.queue.pop_front()?;
            if self.entries.get(&id).is_some_and(Entry::counts_as_queued) {
                self.free_slots -= 1;
                return Some((id, Slot(())));
            }
        }
        None
    }

    /// A slot for a run re-adopted after a restart, if one is free (a run
    /// adopted beyond `max_running`, lowered meanwhile, holds none).
    pub fn take_slot(&mut self) -> Option<Slot> {
        if self.free_slots == 0 {
            return None;
        }
        self.free_slots -= 1;
        Some(Slot(()))
    }

    /// Gives a slot back.
    pub fn release_slot(&mut self, slot: Slot) {
        let Slot(()) = slot;
        self.free_slots += 1;
    }

    /// Whether nothing runs or starts any more.
    pub fn quiet(&self) -> bool {
        self.entries
            .values()
            .all(|e| e.run.is_none() && e.starting.is_none())
    }

    /// Checks the counters against a scan (tests).
    #[cfg(test)]
    pub fn check(&self, max_running: usize) {
        let queued = self
            .entries
            .values()
            .filter(|e| e.counts_as_queued())
            .count();
        assert_eq!(self.queued, queued, "queued counter");
        let held = self
            .entries
            .values()
            .filter(|e| e.starting.is_some() || e.run.as_ref().is_some_and(|r| r.slot.is_some()))
            .count();
        assert_eq!(self.free_slots + held, max_running, "slots");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, state: State) -> Record {
        let mut r = Record::new(ProcessId(id), None, 0);
        r.state = state;
        r
    }

    #[test]
    fn queued_counter_follows_every_change() {
        let mut t = Table::new(2);
        t.insert(rec(1, State::Queued), false);
        t.insert(rec(2, State::Idle), true);
        assert_eq!(t.queued(), 1);
        t.set_record(ProcessId(2), rec(2, State::Queued), false);
        assert_eq!(t.queued(), 2);
        t.set_record(ProcessId(1), rec(1, State::Running), false);
        assert_eq!(t.queued(), 1);
        // A refused rerun goes back to the durable idle record.
        t.roll_back(ProcessId(2));
        assert_eq!(t.get(ProcessId(2)).unwrap().rec().state, State::Idle);
        assert_eq!(t.queued(), 0);
        // A create that never became durable is gone.
        t.roll_back(ProcessId(1));
        assert!(t.get(ProcessId(1)).unwrap().deleted);
        t.gc(ProcessId(1));
        t.gc(ProcessId(2));
        assert!(t.get(ProcessId(1)).is_none() && t.get(ProcessId(2)).is_none());
        t.check(2);
    }

    #[test]
    fn roll_back_uses_the_last_durable_record() {
        let mut t = Table::new(1);
        t.insert(rec(1, State::Running), true);
        // Settled (durable), then rerun (refused).
        t.set_record(ProcessId(1), rec(1, State::Idle), false);
        t.durable(ProcessId(1), Some(rec(1, State::Idle)));
        t.set_record(ProcessId(1), rec(1, State::Queued), false);
        t.roll_back(ProcessId(1));
        let e = t.get(ProcessId(1)).unwrap();
        assert_eq!((e.rec().state, e.announced), (State::Idle, State::Idle));
        t.check(1);
    }

    #[test]
    fn slots_are_tokens_and_the_queue_skips_what_is_no_longer_queued() {
        let mut t = Table::new(1);
        for id in 1..=3 {
            t.insert(rec(id, State::Queued), true);
            t.enqueue(ProcessId(id));
        }
        // Killed while queued: no longer startable.
        t.set_record(ProcessId(1), rec(1, State::Idle), false);
        let (id, slot) = t.next_queued().unwrap();
        assert_eq!(id, ProcessId(2));
        assert!(t.next_queued().is_none(), "one slot only");
        t.release_slot(slot);
        let (id, slot) = t.next_queued().unwrap();
        assert_eq!(id, ProcessId(3));
        t.get_mut(ProcessId(3)).unwrap().starting = Some(slot);
        t.check(1);
    }
}
