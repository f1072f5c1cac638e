//! The list index: which records are in which state, exit state and ref.
//!
//! It lives in the `index` column family and changes in the same RocksDB
//! write batch as the records it describes: the writer, which alone writes
//! records, derives the entries of each record it writes. Values are
//! empty; a key is
//!
//! - `S` state exit id: every record, by its class (the codec's state tag
//!   and exit tag, 0 for no exit state);
//! - `R` n ref[..n] state exit id: records with a ref, where n is the
//!   ref's length in bytes capped at 255 and ref[..n] its first n bytes.
//!
//! Ids are 8 bytes big-endian, so within one class (and one ref) entries
//! are in id order. A filtered list walks every prefix its filter allows
//! (one class for `state` and `status` together, five exit classes for a
//! `state` alone, four states for a `status` alone, twenty for a `ref`
//! alone) backwards, merging them by id, and reads each id's record; what
//! it costs follows from the matches, not from the records that do not
//! match. Every record found is checked against the filter again: refs
//! longer than 255 bytes share a prefix with those that start alike.
//!
//! Beside the entries, `meta/class_counts` holds how many records each
//! class has (twenty u64, state-major), written in the same batch whenever
//! one moves. A walk reads it first and skips the classes that are empty:
//! `state=running` with nothing running reads that one key (no snapshot,
//! no iterator), and a `ref` alone walks only the classes some record is
//! in.
//!
//! Entries are removed with RocksDB's SingleDelete: an entry is put once
//! when a record enters a class and removed once when it leaves it, so a
//! flush or compaction that sees both drops the pair at once, instead of
//! carrying a tombstone down to the last level as a Delete does. Classes
//! that every run passes through (`queued`, `running`) would otherwise
//! fill with tombstones that every walk of them has to step over.
//! SingleDelete's contract (exactly one put between two removals of a key,
//! no other kind of delete) holds by construction: the writer puts a key
//! only after reading it absent, or for an id no record has had (ids are
//! never handed out twice, so its entries cannot exist: a create reads
//! nothing), removes one only after reading it present, and nothing else
//! writes this family (a rebuild drops and recreates it). An entry found
//! where it should not be, or missing, is logged and left alone.

use std::collections::HashMap;

use rocksdb::{ColumnFamily, IteratorMode, ReadOptions, WriteBatch, WriteOptions, DB};

use super::codec::{decode_record, exit_tag, state_tag};
use super::StoreError;
use crate::model::{ExitState, Filter, Record, State};

pub(super) const CF_INDEX: &str = "index";

const BY_CLASS: u8 = b'S';
const BY_REF: u8 = b'R';
/// The most bytes of a ref that go into its entries.
const MAX_REF_KEY: usize = 255;

/// The index entries of one record (one or two keys).
pub(super) type Keys = Vec<Vec<u8>>;

/// Where the class counts live in `meta`.
pub(super) const KEY_CLASS_COUNTS: &[u8] = b"class_counts";
/// State tags are 1..=4, exit tags 0..=4.
const CLASSES: usize = 4 * 5;

/// How many records each class has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Counts([u64; CLASSES]);

impl Default for Counts {
    fn default() -> Counts {
        Counts([0; CLASSES])
    }
}

/// The slot of a class (the two bytes after `S`, or before the id).
fn slot(class: &[u8]) -> Option<usize> {
    match class {
        [s @ 1..=4, e @ 0..=4] => Some((*s as usize - 1) * 5 + *e as usize),
        _ => None,
    }
}

impl Counts {
    /// Reads the value of `meta/class_counts` (absent: every class empty).
    pub(super) fn decode(v: Option<&[u8]>) -> Counts {
        let mut c = Counts::default();
        if let Some(v) = v.filter(|v| v.len() == CLASSES * 8) {
            for (i, n) in v.chunks_exact(8).enumerate() {
                c.0[i] = u64::from_be_bytes(n.try_into().expect("8 bytes"));
            }
        }
        c
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        self.0.iter().flat_map(|n| n.to_be_bytes()).collect()
    }

    /// A class entry (`S` key) was put (+1) or removed (-1).
    pub(super) fn moved(&mut self, key: &[u8], up: bool) {
        if key.first() != Some(&BY_CLASS) {
            return;
        }
        if let Some(i) = slot(&key[1..3]) {
            self.0[i] = if up {
                self.0[i].saturating_add(1)
            } else {
                self.0[i].saturating_sub(1)
            };
        }
    }

    /// Whether the class a prefix ends with may hold a record.
    pub(super) fn may_hold(&self, prefix: &[u8]) -> bool {
        slot(&prefix[prefix.len() - 2..]).is_none_or(|i| self.0[i] > 0)
    }
}

fn ref_prefix(k: &mut Vec<u8>, r: &str) {
    let b = &r.as_bytes()[..r.len().min(MAX_REF_KEY)];
    k.push(BY_REF);
    k.push(b.len() as u8);
    k.extend_from_slice(b);
}

fn class(k: &mut Vec<u8>, state: State, exit: Option<ExitState>) {
    k.push(state_tag(state));
    k.push(exit.map_or(0, exit_tag));
}

/// The entries of `r`.
pub(super) fn keys_of(r: &Record) -> Keys {
    let mut by_class = Vec::with_capacity(11);
    by_class.push(BY_CLASS);
    class(&mut by_class, r.state, r.exit_state);
    by_class.extend_from_slice(&r.id.0.to_be_bytes());
    let mut out = vec![by_class];
    if let Some(rf) = &r.r#ref {
        let mut k = Vec::with_capacity(12 + rf.len().min(MAX_REF_KEY));
        ref_prefix(&mut k, rf);
        class(&mut k, r.state, r.exit_state);
        k.extend_from_slice(&r.id.0.to_be_bytes());
        out.push(k);
    }
    out
}

/// The prefixes whose entries together are the records `filter` selects
/// (plus, for refs over 255 bytes, others that start alike); `None` when
/// it selects every record.
pub(super) fn prefixes(filter: &Filter) -> Option<Vec<Vec<u8>>> {
    if !filter.is_narrowing() {
        return None;
    }
    let states: Vec<State> = match filter.state {
        Some(s) => vec![s],
        None => State::ALL.to_vec(),
    };
    let exits: Vec<Option<ExitState>> = match filter.status {
        Some(e) => vec![e],
        None => std::iter::once(None)
            .chain(ExitState::ALL.map(Some))
            .collect(),
    };
    let mut out = Vec::with_capacity(states.len() * exits.len());
    for &s in &states {
        for &e in &exits {
            let mut k = Vec::new();
            match &filter.r#ref {
                Some(rf) => ref_prefix(&mut k, rf),
                None => k.push(BY_CLASS),
            }
            class(&mut k, s, e);
            out.push(k);
        }
    }
    Some(out)
}

fn id_of(key: &[u8]) -> u64 {
    let tail: [u8; 8] = key[key.len() - 8..].try_into().expect("8 bytes");
    u64::from_be_bytes(tail)
}

/// Visits the ids under `prefixes`, newest first, below `before` when
/// given, until `visit` returns false. Reads at `snapshot`.
pub(super) fn walk_newest_first(
    snapshot: &rocksdb::Snapshot<'_>,
    index: &ColumnFamily,
    prefixes: &[Vec<u8>],
    before: Option<u64>,
    mut visit: impl FnMut(u64) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut iters = Vec::with_capacity(prefixes.len());
    for p in prefixes {
        let upper = match before {
            Some(id) => [p.as_slice(), &id.to_be_bytes()].concat(),
            None => {
                // The last byte is an exit tag (0..=4): one more is the
                // first key after the prefix.
                let mut u = p.clone();
                *u.last_mut().expect("non-empty prefix") += 1;
                u
            }
        };
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(p.clone());
        ro.set_iterate_upper_bound(upper);
        let mut it = snapshot.raw_iterator_cf_opt(index, ro);
        it.seek_to_last();
        iters.push(it);
    }
    // A record is under one class, so ids do not repeat across prefixes;
    // should a stale entry say otherwise, it is listed once.
    let mut last: Option<u64> = None;
    loop {
        let mut newest: Option<(usize, u64)> = None;
        for (i, it) in iters.iter().enumerate() {
            match it.key() {
                Some(k) => {
                    let id = id_of(k);
                    if newest.is_none_or(|(_, n)| id > n) {
                        newest = Some((i, id));
                    }
                }
                None => it.status().map_err(StoreError::read)?,
            }
        }
        let Some((i, id)) = newest else {
            return Ok(());
        };
        if last != Some(id) && !visit(id)? {
            return Ok(());
        }
        last = Some(id);
        iters[i].prev();
    }
}

/// What the writer keeps from one group to the next.
pub(super) struct Tracked {
    /// What `meta/class_counts` holds.
    pub(super) counts: Counts,
    /// Ids from here on have no record and no entries: above every record
    /// the database held at open and every id written since (ids are never
    /// handed out twice). A create, the bulk of all writes, then needs no
    /// read: nothing is replaced and its entries cannot be there yet.
    pub(super) fresh_from: u64,
}

/// The index side of one group write: the entries each record written so
/// far in the group has, and the entries the group put or removed, on top
/// of what the database holds.
pub(super) struct Maintainer<'a> {
    db: &'a DB,
    records: &'a ColumnFamily,
    index: &'a ColumnFamily,
    keys: HashMap<u64, Keys>,
    present: HashMap<Vec<u8>, bool>,
    /// As of the last write, moved by this group (the caller restores
    /// the counts if the group is not written).
    tracked: &'a mut Tracked,
    counts_moved: bool,
}

impl<'a> Maintainer<'a> {
    pub(super) fn new(db: &'a DB, tracked: &'a mut Tracked) -> Maintainer<'a> {
        Maintainer {
            db,
            records: db.cf_handle(super::CF_RECORDS).expect("records cf"),
            index: db.cf_handle(CF_INDEX).expect("index cf"),
            keys: HashMap::new(),
            present: HashMap::new(),
            tracked,
            counts_moved: false,
        }
    }

    /// Adds the new class counts to the batch if any moved. The caller
    /// restores its copy of the counts if the batch is not written.
    pub(super) fn finish(self, wb: &mut WriteBatch) {
        if self.counts_moved {
            let meta = self.db.cf_handle(super::CF_META).expect("meta cf");
            wb.put_cf(meta, KEY_CLASS_COUNTS, self.tracked.counts.encode());
        }
    }

    /// The entries record `id` has now (none if it does not exist).
    fn current(&mut self, id: u64) -> Result<Keys, rocksdb::Error> {
        if let Some(k) = self.keys.get(&id) {
            return Ok(k.clone());
        }
        let Some(v) = self.db.get_pinned_cf(self.records, id.to_be_bytes())? else {
            return Ok(Vec::new());
        };
        match decode_record(&v) {
            Ok(r) => Ok(keys_of(&r)),
            Err(e) => {
                // Its entries, if any, stay: a list checks every record
                // it finds against its filter.
                tracing::warn!(id, error = %e, "list index: the record being replaced does not decode; its old index entries are left");
                Ok(Vec::new())
            }
        }
    }

    fn is_present(&mut self, key: &[u8]) -> Result<bool, rocksdb::Error> {
        if let Some(&p) = self.present.get(key) {
            return Ok(p);
        }
        Ok(self.db.get_pinned_cf(self.index, key)?.is_some())
    }

    fn add(&mut self, wb: &mut WriteBatch, key: &[u8]) -> Result<(), rocksdb::Error> {
        if self.is_present(key)? {
            tracing::warn!(key = ?key, "list index: an entry to add is already there; left as is");
            self.present.insert(key.to_vec(), true);
        } else {
            self.put(wb, key);
        }
        Ok(())
    }

    /// Puts an entry known to be absent.
    fn put(&mut self, wb: &mut WriteBatch, key: &[u8]) {
        wb.put_cf(self.index, key, []);
        self.tracked.counts.moved(key, true);
        self.counts_moved = true;
        self.present.insert(key.to_vec(), true);
    }

    fn remove(&mut self, wb: &mut WriteBatch, key: &[u8]) -> Result<(), rocksdb::Error> {
        if self.is_present(key)? {
            wb.single_delete_cf(self.index, key);
            self.tracked.counts.moved(key, false);
            self.counts_moved = true;
        } else {
            tracing::warn!(key = ?key, "list index: an entry to remove is missing");
        }
        self.present.insert(key.to_vec(), false);
        Ok(())
    }

    /// Record `id` is written with entries `new`.
    pub(super) fn written(
        &mut self,
        wb: &mut WriteBatch,
        id: u64,
        new: Keys,
    ) -> Result<(), rocksdb::Error> {
        if id >= self.tracked.fresh_from {
            for k in &new {
                self.put(wb, k);
            }
        } else {
            let old = self.current(id)?;
            for k in old.iter().filter(|k| !new.contains(k)) {
                self.remove(wb, k)?;
            }
            for k in new.iter().filter(|k| !old.contains(k)) {
                self.add(wb, k)?;
            }
        }
        self.keys.insert(id, new);
        self.tracked.fresh_from = self.tracked.fresh_from.max(id.saturating_add(1));
        Ok(())
    }

    /// Record `id` is deleted.
    pub(super) fn deleted(&mut self, wb: &mut WriteBatch, id: u64) -> Result<(), rocksdb::Error> {
        for k in self.current(id)? {
            self.remove(wb, &k)?;
        }
        self.keys.insert(id, Vec::new());
        self.tracked.fresh_from = self.tracked.fresh_from.max(id.saturating_add(1));
        Ok(())
    }
}

/// What building the index found.
pub(super) struct Built {
    pub records: u64,
    /// To be written as `meta/class_counts` with the version.
    pub counts: Counts,
    /// Records that do not decode: not indexed.
    pub skipped: Vec<String>,
}

/// Fills an empty index family from every record of `db`, then flushes it
/// (so it is durable before the caller records that it exists; the writes
/// skip the write-ahead log, which the flush makes unnecessary).
pub(super) fn build(db: &DB) -> Result<Built, rocksdb::Error> {
    let records = db.cf_handle(super::CF_RECORDS).expect("records cf");
    let index = db.cf_handle(CF_INDEX).expect("index cf");
    let mut built = Built {
        records: 0,
        counts: Counts::default(),
        skipped: Vec::new(),
    };
    let mut wo = WriteOptions::default();
    wo.disable_wal(true);
    let mut wb = WriteBatch::default();
    for item in db.iterator_cf(records, IteratorMode::Start) {
        let (k, v) = item?;
        match decode_record(&v) {
            Ok(r) => {
                for key in keys_of(&r) {
                    built.counts.moved(&key, true);
                    wb.put_cf(index, key, []);
                }
                built.records += 1;
            }
            Err(e) => built.skipped.push(format!("record {k:02x?}: {e}")),
        }
        if wb.len() >= 4096 {
            db.write_opt(std::mem::take(&mut wb), &wo)?;
        }
    }
    db.write_opt(wb, &wo)?;
    db.flush_cf(index)?;
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProcessId;

    #[test]
    fn keys_sort_by_class_then_id_and_refs_are_capped() {
        let mut r = Record::new(ProcessId(258), Some("ab".into()), 0);
        r.state = State::Idle;
        r.exit_state = Some(ExitState::Failed);
        assert_eq!(
            keys_of(&r),
            vec![
                vec![b'S', 4, 2, 0, 0, 0, 0, 0, 0, 1, 2],
                vec![b'R', 2, b'a', b'b', 4, 2, 0, 0, 0, 0, 0, 0, 1, 2],
            ]
        );
        r.r#ref = Some("x".repeat(300));
        let k = &keys_of(&r)[1];
        assert_eq!((k[1], k.len()), (255, 2 + 255 + 2 + 8));
        r.r#ref = None;
        assert_eq!(keys_of(&r).len(), 1);
    }

    #[test]
    fn class_counts_round_trip_and_prune_empty_classes() {
        let mut r = Record::new(ProcessId(7), Some("r".into()), 0);
        r.state = State::Running;
        let mut c = Counts::default();
        for k in keys_of(&r) {
            c.moved(&k, true);
        }
        assert_eq!(Counts::decode(Some(&c.encode())), c);
        assert_eq!(Counts::decode(None), Counts::default());
        let running = prefixes(&Filter {
            state: Some(State::Running),
            ..Filter::default()
        })
        .unwrap();
        let held: Vec<_> = running.iter().filter(|p| c.may_hold(p)).collect();
        assert_eq!(held, vec![&vec![b'S', 2, 0]]);
        let by_ref = prefixes(&Filter {
            r#ref: Some("r".into()),
            ..Filter::default()
        })
        .unwrap();
        assert_eq!(by_ref.iter().filter(|p| c.may_hold(p)).count(), 1);
        // The ref entry does not count twice.
        assert_eq!(c.0.iter().sum::<u64>(), 1);
        c.moved(&keys_of(&r)[0], false);
        assert!(!c.may_hold(&running[0]));
    }

    #[test]
    fn prefixes_cover_exactly_the_classes_a_filter_allows() {
        assert!(prefixes(&Filter::default()).is_none());
        let running = prefixes(&Filter {
            state: Some(State::Running),
            ..Filter::default()
        })
        .unwrap();
        assert_eq!(running.len(), 5);
        assert!(running.iter().all(|p| p[..2] == [b'S', 2]));
        let failed = prefixes(&Filter {
            status: Some(Some(ExitState::Failed)),
            ..Filter::default()
        })
        .unwrap();
        assert_eq!(failed.len(), 4);
        assert!(failed.iter().all(|p| p[0] == b'S' && p[2] == 2));
        let both = prefixes(&Filter {
            state: Some(State::Idle),
            status: Some(None),
            r#ref: Some("r".into()),
        })
        .unwrap();
        assert_eq!(both, vec![vec![b'R', 1, b'r', 4, 0]]);
        let by_ref = prefixes(&Filter {
            r#ref: Some("r".into()),
            ..Filter::default()
        })
        .unwrap();
        assert_eq!(by_ref.len(), 20);
    }
}
