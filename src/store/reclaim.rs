//! Giving disk space back: a background thread that compacts the key
//! ranges deletes removed and flushes memtables that pin old write-ahead
//! logs.
//!
//! A RocksDB delete only writes a tombstone: the deleted bytes stay in
//! table files until a compaction meets them with it, and a write-ahead log
//! stays on disk until every column family with data in it has flushed.
//! With a supervisor's write pattern (one busy family, `chunks`, and small
//! ones that flush rarely) neither happens soon by itself, so DELETE gave
//! nothing back until a restart. Here, deleted ids are held and compacted
//! together (one covering id range per id-keyed family; a manual
//! compaction flushes the family's memtable first when it overlaps the
//! range) once deletes pause for `QUIET`, once `MAX_HELD_BYTES` of table
//! data or `MAX_IDS_PER_ROUND` ids are held, or at once when free space is
//! below the reserve: a covering range also rewrites the live records
//! between the deleted ones, so compacting after every delete under steady
//! load would multiply the writes. Such a round first flushes every family,
//! which releases the old logs the rarely flushed ones pin (they hold the
//! deleted bytes too); below the reserve the writer asks for that flush on
//! its own (otherwise `max_total_wal_size` bounds old logs). Trimmed event ranges are compacted at
//! once. Rounds are at least `MIN_ROUND` apart and never on the writer's
//! thread, so writers never wait for them.
//!
//! Neither step may itself run the disk out of space (RocksDB stops
//! writing after a failed flush until it is reopened): a flush waits until
//! free space exceeds what the memtables hold, and a compaction until it
//! exceeds what the compaction can write (the family's memtable, plus the
//! tables overlapping the range minus the deleted bytes in them); deferred
//! work is retried every `RETRY` until it fits.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use rocksdb::{CompactOptions, Range, DB};

use super::{CF_CHUNKS, CF_CODE, CF_EVENTS, CF_OUTPUT, CF_RECORDS};

/// Least time between two rounds of flushing and compacting.
const MIN_ROUND: Duration = Duration::from_millis(500);
/// How soon work deferred for lack of space is tried again.
const RETRY: Duration = Duration::from_secs(2);
/// Free space kept beyond any estimate, for RocksDB's own small files.
const MARGIN: u64 = 1 << 20;
/// Most deleted ids measured one by one per round; beyond, the rest
/// waits for the next round. Also the most ids held back.
const MAX_IDS_PER_ROUND: usize = 4096;
/// Held deletes are compacted once no delete came for this long...
const QUIET: Duration = Duration::from_secs(2);
/// ...or once the tables hold this much of their data.
const MAX_HELD_BYTES: u64 = 256 << 20;

/// Work waiting for the next round.
#[derive(Default)]
struct Pending {
    ids: BTreeSet<u64>,
    events_below: Option<u64>,
    flush: bool,
    stop: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.events_below.is_none() && !self.flush
    }
}

struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

/// Handle to the reclaim thread; stopping it (drop) waits for the round
/// in progress.
pub(super) struct Reclaimer {
    shared: Arc<Shared>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Reclaimer {
    pub(super) fn start(db: Arc<DB>, dir: PathBuf) -> Reclaimer {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
        });
        let s = shared.clone();
        let thread = thread::Builder::new()
            .name("store-reclaim".into())
            .spawn(move || run(&db, &dir, &s))
            .expect("spawn store reclaim thread");
        Reclaimer {
            shared,
            thread: Some(thread),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Pending)) {
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut p);
        self.shared.wake.notify_one();
    }

    /// Everything stored under these ids was deleted.
    pub(super) fn deleted(&self, ids: &[u64], events_below: Option<u64>) {
        self.with(|p| {
            p.ids.extend(ids);
            if let Some(seq) = events_below {
                p.events_below = Some(p.events_below.map_or(seq, |s| s.max(seq)));
            }
        });
    }

    /// Flush every column family (free space is low: release old logs).
    pub(super) fn flush(&self) {
        self.with(|p| p.flush = true);
    }
}

impl Drop for Reclaimer {
    fn drop(&mut self) {
        self.with(|p| p.stop = true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(db: &DB, dir: &Path, shared: &Shared) {
    let mut last_round: Option<Instant> = None;
    let mut spacing = MIN_ROUND;
    // Deleted ids held back, the bytes their tables hold (RocksDB's
    // approximate sizes), and when the last delete came.
    let mut held: BTreeSet<u64> = BTreeSet::new();
    let mut held_bytes: u64 = 0;
    let mut last_delete = Instant::now();
    loop {
        let mut work = {
            let mut p = shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            loop {
                if p.stop {
                    return;
                }
                if !p.is_empty() {
                    // Rounds are spaced: gather what arrives meanwhile.
                    match last_round.map(|t| t.elapsed()) {
                        Some(since) if since < spacing => {
                            p = shared
                                .wake
                                .wait_timeout(p, spacing - since)
                                .unwrap_or_else(PoisonError::into_inner)
                                .0;
                            continue;
                        }
                        _ => break std::mem::take(&mut *p),
                    }
                }
                if held.is_empty() {
                    p = shared.wake.wait(p).unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
                // Held deletes wait for quiet; look again when it comes.
                let quiet_in = QUIET.saturating_sub(last_delete.elapsed());
                if quiet_in.is_zero() {
                    break Pending::default();
                }
                p = shared
                    .wake
                    .wait_timeout(p, quiet_in)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        };
        if !work.ids.is_empty() {
            last_delete = Instant::now();
            held_bytes = held_bytes.saturating_add(table_bytes(db, &work.ids));
            held.append(&mut work.ids);
        }
        // Compacting a covering range rewrites the live records between
        // the deleted ones, so deletes are compacted together: when space
        // is short, once they pause, or once enough of them are held.
        let now = work.flush
            || last_delete.elapsed() >= QUIET
            || held.len() >= MAX_IDS_PER_ROUND
            || held_bytes >= MAX_HELD_BYTES;
        if now && !held.is_empty() {
            work.ids = std::mem::take(&mut held);
            held_bytes = 0;
            // Also release the old logs that the rarely flushed families
            // pin: they hold the deleted bytes too.
            work.flush = true;
        }
        if work.is_empty() {
            continue;
        }
        last_round = Some(Instant::now());
        let deferred = round(db, dir, work);
        spacing = if deferred.is_empty() {
            MIN_ROUND
        } else {
            RETRY
        };
        if !deferred.is_empty() {
            let mut p = shared
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            p.ids.extend(deferred.ids);
            if let Some(seq) = deferred.events_below {
                p.events_below = Some(p.events_below.map_or(seq, |s| s.max(seq)));
            }
            p.flush |= deferred.flush;
        }
    }
}

/// The bytes the tables of `chunks` hold under these ids (what deleting
/// them can give back; memtable data is not counted).
fn table_bytes(db: &DB, ids: &BTreeSet<u64>) -> u64 {
    let Some(cf) = db.cf_handle(CF_CHUNKS) else {
        return 0;
    };
    let keys: Vec<([u8; 8], [u8; 8])> = ids
        .iter()
        .map(|id| (id.to_be_bytes(), id.saturating_add(1).to_be_bytes()))
        .collect();
    let ranges: Vec<Range> = keys.iter().map(|(a, b)| Range::new(a, b)).collect();
    db.get_approximate_sizes_cf(cf, &ranges).iter().sum()
}

/// Bytes the memtables of every family hold.
pub(super) fn memtable_bytes(db: &DB) -> u64 {
    super::ALL_CFS
        .iter()
        .map(|name| cf_memtable_bytes(db, name))
        .sum()
}

/// Bytes the memtables of one family hold.
fn cf_memtable_bytes(db: &DB, name: &str) -> u64 {
    db.cf_handle(name)
        .and_then(|cf| {
            db.property_int_value_cf(cf, "rocksdb.cur-size-all-mem-tables")
                .ok()
                .flatten()
        })
        .unwrap_or(0)
}

/// What compacting `[from, to)` of a family can write: the tables that
/// overlap it, less the deleted bytes in `deleted` ranges.
fn compaction_output(
    db: &DB,
    files: &[rocksdb::LiveFile],
    cf_name: &str,
    from: &[u8],
    to: &[u8],
    deleted: &[(Vec<u8>, Vec<u8>)],
) -> u64 {
    let input: u64 = files
        .iter()
        .filter(|f| f.column_family_name == cf_name)
        .filter(|f| {
            let starts_before_end = f.start_key.as_deref().is_none_or(|s| s < to);
            let ends_after_start = f.end_key.as_deref().is_none_or(|e| e >= from);
            starts_before_end && ends_after_start
        })
        .map(|f| f.size as u64)
        .sum();
    let Some(cf) = db.cf_handle(cf_name) else {
        return input;
    };
    let ranges: Vec<Range> = deleted.iter().map(|(a, b)| Range::new(a, b)).collect();
    let gone: u64 = db.get_approximate_sizes_cf(cf, &ranges).iter().sum();
    input.saturating_sub(gone)
}

/// Flushes every family when asked to, then compacts the deleted ranges,
/// each only if the disk has room for what it writes. Returns the work
/// deferred.
fn round(db: &DB, dir: &Path, mut work: Pending) -> Pending {
    let mut deferred = Pending::default();
    let free = || super::free_bytes(dir).unwrap_or(u64::MAX);
    if work.flush {
        if free() > memtable_bytes(db).saturating_add(MARGIN) {
            for name in super::ALL_CFS {
                if let Some(cf) = db.cf_handle(name) {
                    if let Err(e) = db.flush_cf(cf) {
                        tracing::warn!(error = %e, cf = name, "flushing to release old logs failed");
                    }
                }
            }
        } else {
            tracing::debug!("too little free space to flush the memtables now");
            deferred.flush = true;
            deferred.ids = std::mem::take(&mut work.ids);
            deferred.events_below = work.events_below.take();
            return deferred;
        }
    }
    if work.ids.len() > MAX_IDS_PER_ROUND {
        let cut = work
            .ids
            .iter()
            .nth(MAX_IDS_PER_ROUND)
            .copied()
            .expect("more ids than the limit");
        let rest = work.ids.split_off(&cut);
        deferred.ids = rest;
    }
    let files = db.live_files().unwrap_or_default();
    let mut opts = CompactOptions::default();
    // Automatic compactions keep running beside this one.
    opts.set_exclusive_manual_compaction(false);
    let compact = |cf_name: &str, from: Vec<u8>, to: Vec<u8>, deleted: &[(Vec<u8>, Vec<u8>)]| {
        // A manual compaction first flushes the family's memtable if it
        // overlaps the range.
        let need = compaction_output(db, &files, cf_name, &from, &to, deleted)
            .saturating_add(cf_memtable_bytes(db, cf_name));
        if free() <= need.saturating_add(MARGIN) {
            tracing::debug!(cf = cf_name, need, "too little free space to compact now");
            return false;
        }
        if let Some(cf) = db.cf_handle(cf_name) {
            db.compact_range_cf_opt(cf, Some(from), Some(to), &opts);
        }
        true
    };
    if let (Some(first), Some(last)) = (work.ids.first(), work.ids.last()) {
        let (from, to) = (
            first.to_be_bytes().to_vec(),
            last.saturating_add(1).to_be_bytes().to_vec(),
        );
        let deleted: Vec<(Vec<u8>, Vec<u8>)> = work
            .ids
            .iter()
            .map(|id| {
                (
                    id.to_be_bytes().to_vec(),
                    id.saturating_add(1).to_be_bytes().to_vec(),
                )
            })
            .collect();
        let mut all = true;
        for cf in [CF_CHUNKS, CF_RECORDS, CF_CODE, CF_OUTPUT] {
            all &= compact(cf, from.clone(), to.clone(), &deleted);
        }
        if !all {
            deferred.ids.extend(work.ids.iter().copied());
        }
    }
    if let Some(seq) = work.events_below {
        let range = (0u64.to_be_bytes().to_vec(), seq.to_be_bytes().to_vec());
        if !compact(CF_EVENTS, range.0.clone(), range.1.clone(), &[range]) {
            deferred.events_below = Some(seq);
        }
    }
    tracing::debug!(
        ids = work.ids.len(),
        events_below = ?work.events_below,
        deferred = deferred.ids.len(),
        "reclaimed deleted ranges"
    );
    deferred
}
