//! The store: the only module that knows RocksDB.
//!
//! It owns the column families and their key encoding, the on-disk format
//! version, and the group-commit writer. Every write goes through one writer
//! thread in submission order; concurrent batches are merged into one RocksDB
//! write, synced once when any of them asks for durability, so N concurrent
//! transitions cost one fsync instead of N. Reads go straight to RocksDB and
//! therefore see only what a completed write put there. It knows nothing of
//! HTTP, JSON or processes.

mod codec;
mod idempotency;
mod index;
mod logfile;
mod reclaim;
mod repair;

pub use codec::{decode_change, decode_record, encode_change, encode_record, DecodeError};
pub use repair::{check, salvage, CheckReport, SalvageReport};

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use rocksdb::{
    BlockBasedIndexType, BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBRecoveryMode,
    Direction, ErrorKind, IteratorMode, Options, WriteBatch, WriteBufferManager, WriteOptions, DB,
};
use tokio::sync::oneshot;

use crate::model::{Change, ChangeKind, Filter, ProcessId, Record, State, Stream};

use index::CF_INDEX;

/// The on-disk format this build writes and reads. Version 2 added the
/// list index (`index`); a version-1 database is upgraded in place at open.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format this build opens (and upgrades).
const OLDEST_FORMAT_VERSION: u32 = 1;

const CF_META: &str = "meta";
const CF_RECORDS: &str = "records";
const CF_CODE: &str = "code";
const CF_OUTPUT: &str = "output";
const CF_CHUNKS: &str = "chunks";
const CF_EVENTS: &str = "events";
/// Idempotency keys of creates (see `idempotency.rs`).
const CF_IDEMPOTENCY: &str = "idempotency";
const ALL_CFS: [&str; 8] = [
    CF_META,
    CF_RECORDS,
    CF_CODE,
    CF_OUTPUT,
    CF_CHUNKS,
    CF_EVENTS,
    CF_IDEMPOTENCY,
    CF_INDEX,
];

const KEY_FORMAT_VERSION: &[u8] = b"format_version";
const KEY_NEXT_ID: &[u8] = b"next_id";
const KEY_LAST_SEQ: &[u8] = b"last_seq";

/// What an operator does about a damaged database (README, Operations).
const WAY_OUT: &str =
    "`cyrneld --check` lists what is readable and what is not (changing nothing); \
`cyrneld --salvage` keeps what is readable, moves the damaged files aside (never deleting them) \
and never reuses an id";

impl StoreError {
    /// A failed read: damage gets the operator's way out, anything else
    /// stays a read error.
    fn read(e: rocksdb::Error) -> StoreError {
        if e.kind() == ErrorKind::Corruption {
            StoreError::DamagedRead(e.into_string())
        } else {
            StoreError::Read(e)
        }
    }
}

/// The default of `storage_memory_bytes`.
pub const DEFAULT_MEMORY_BYTES: u64 = 32 << 20;

/// RocksDB's one memory budget: a block cache shared by every column
/// family, holding data, index and filter blocks, and charged for the
/// memtables too (a write-buffer manager reserves their memory in it), so
/// the total is chosen once instead of being the sum of per-family
/// defaults.
struct Memory {
    budget: u64,
    cache: Cache,
    write_buffers: WriteBufferManager,
}

impl Memory {
    fn new(budget: u64) -> Memory {
        let budget = budget.max(4 << 20);
        let cache = Cache::new_lru_cache(budget as usize);
        // Memtables may take half the budget before the largest is
        // flushed; their memory is charged to the cache, so the cache's
        // capacity is the whole budget.
        let write_buffers = WriteBufferManager::new_write_buffer_manager_with_cache(
            (budget / 2) as usize,
            false,
            cache.clone(),
        );
        Memory {
            budget,
            cache,
            write_buffers,
        }
    }

    /// One memtable's size: small enough that every family's pair fits
    /// the memtables' half of the budget comfortably.
    fn write_buffer_size(&self) -> usize {
        ((self.budget / 8) as usize).clamp(1 << 20, 8 << 20)
    }

    fn table_options(&self) -> BlockBasedOptions {
        let mut t = BlockBasedOptions::default();
        t.set_block_cache(&self.cache);
        t.set_cache_index_and_filter_blocks(true);
        t.set_pin_l0_filter_and_index_blocks_in_cache(true);
        t
    }
}

/// What a backup holds: the counters as the copy has them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackupInfo {
    pub next_id: u64,
    pub last_seq: u64,
    /// How long the checkpoint took.
    pub took_ms: u64,
}

/// What RocksDB's memory budget holds right now (bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryUsage {
    pub budget: u64,
    /// Everything the shared cache holds, memtable reservations included.
    pub cache: u64,
    pub cache_pinned: u64,
    pub memtables: u64,
}

/// The database options every open of cyrnel's database uses.
fn db_options(mem: &Memory) -> Options {
    // No preallocation of write-ahead logs: each new log would otherwise
    // take a write buffer's size at once, which on a nearly full disk is
    // the difference between a flush that fits in the reserve and one that
    // fails (after which RocksDB refuses writes until reopened).
    let mut opts = Options::default()
        .get_options_from_string("allow_fallocate=false")
        .expect("a valid RocksDB option string");
    opts.set_write_buffer_manager(&mem.write_buffers);
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    // Replay stops only at an incomplete last record (a write that never
    // completed, so was never acknowledged); a damaged record anywhere
    // else fails the open instead of silently dropping everything after
    // it, which RocksDB's default (point-in-time recovery) would do.
    opts.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
    opts.set_paranoid_checks(true);
    opts.set_write_buffer_size(mem.write_buffer_size());
    opts.set_max_write_buffer_number(2);
    opts.set_block_based_table_factory(&mem.table_options());
    opts.set_keep_log_file_num(4);
    // Flush column families once the WAL passes this, so a restart
    // replays at most this much (the default, 0, lets it grow with the
    // memtables of every family).
    opts.set_max_total_wal_size(64 << 20);
    opts
}

/// The options of one column family.
fn cf_options(mem: &Memory, name: &str) -> Options {
    // Each family's memtables are bounded; defaults are sized for much
    // larger write rates than a supervisor produces.
    let mut cf = Options::default();
    cf.set_write_buffer_size(mem.write_buffer_size());
    cf.set_max_write_buffer_number(2);
    let mut table = mem.table_options();
    if name == CF_INDEX {
        // The writer looks up every entry it adds (absent, nearly always)
        // or removes: a whole-key filter answers most of those lookups
        // without reading a block. Partitioned, with a two-level index:
        // one table of a million entries has a filter of over a megabyte,
        // more than a shard of the shared block cache holds (32 MiB make
        // 64 shards of 512 KiB), so a whole filter block would be read
        // and checksummed again on every lookup; partitions are 4 KiB.
        table.set_bloom_filter(10.0, false);
        table.set_partition_filters(true);
        table.set_index_type(BlockBasedIndexType::TwoLevelIndexSearch);
    }
    cf.set_block_based_table_factory(&table);
    cf
}

fn cf_descriptors(mem: &Memory) -> Vec<ColumnFamilyDescriptor> {
    ALL_CFS
        .map(|name| ColumnFamilyDescriptor::new(name, cf_options(mem, name)))
        .into()
}

/// Most batches merged into one RocksDB write.
const MAX_GROUP: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database in {path}: {source}")]
    Open {
        path: PathBuf,
        source: rocksdb::Error,
    },
    #[error("the database in {path} has format version {found}; this cyrneld reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION} (refusing to touch it)")]
    FormatVersion { path: PathBuf, found: String },
    #[error("cannot upgrade the database in {path} from format version 1: {reason}. The records were not changed; the next start tries again")]
    Upgrade { path: PathBuf, reason: String },
    #[error("the database in {0} holds data but no format version: it is not a cyrnel data dir or it is damaged (refusing to touch it)")]
    NoVersion(PathBuf),
    #[error("cannot open the database in {path}: it is damaged: {found}. Nothing was changed. {WAY_OUT}")]
    Damaged { path: PathBuf, found: String },
    #[error("storage read failed: the database is damaged: {0}. {WAY_OUT}")]
    DamagedRead(String),
    #[error("{0}")]
    Salvage(String),
    #[error("backup failed: {0}")]
    Backup(String),
    #[error("corrupt record {key}: {source}")]
    Corrupt { key: String, source: DecodeError },
    #[error("storage read failed: {0}")]
    Read(rocksdb::Error),
    #[error("storage write failed: {0}")]
    Write(String),
    #[error("Storage is full.")]
    Full,
    #[error("the store writer has stopped")]
    WriterGone,
}

/// One write operation, as the writer applies it.
enum Op {
    /// A record and its list index entries.
    Record(u64, Vec<u8>, index::Keys),
    /// A record's deletion (its index entries go too).
    DeleteRecord(u64),
    Put(&'static str, Vec<u8>, Vec<u8>),
    Delete(&'static str, Vec<u8>),
    DeleteRange(&'static str, Vec<u8>, Vec<u8>),
}

/// An atomic set of changes. Built by the supervisor, applied by the writer
/// in submission order.
#[derive(Default)]
pub struct Batch {
    ops: Vec<Op>,
    sync: bool,
    /// May use the free-space reserve (see [`Store::open`]).
    essential: bool,
    /// Ids whose stored data this batch removes, and the event range it
    /// trims: compacted afterwards so their space comes back.
    deleted_ids: Vec<u64>,
    events_below: Option<u64>,
}

fn id_key(id: ProcessId) -> [u8; 8] {
    id.0.to_be_bytes()
}

fn chunk_key(id: ProcessId, stream: Stream, offset: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.extend_from_slice(&id.0.to_be_bytes());
    k.push(stream.tag());
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

impl Batch {
    /// A batch that is durable (synced WAL) when its completion fires.
    pub fn durable() -> Batch {
        Batch {
            sync: true,
            ..Batch::default()
        }
    }

    /// Marks the batch as one that must not be refused for lack of space
    /// while the reserve lasts: transitions that record what processes did
    /// (started, settled, killed), as opposed to new work.
    pub fn essential(mut self) -> Batch {
        self.essential = true;
        self
    }

    /// A batch written to the WAL without waiting for fsync: it survives a
    /// daemon crash but not a power loss until the next synced batch, which
    /// syncs everything written before it.
    pub fn buffered() -> Batch {
        Batch::default()
    }

    pub fn put_record(&mut self, r: &Record) {
        self.ops
            .push(Op::Record(r.id.0, encode_record(r), index::keys_of(r)));
    }

    pub fn put_next_id(&mut self, next: u64) {
        self.ops.push(Op::Put(
            CF_META,
            KEY_NEXT_ID.to_vec(),
            next.to_be_bytes().to_vec(),
        ));
    }

    /// Records a state-transition event with its sequence number; the
    /// batch also moves the persisted last sequence.
    pub fn put_change(&mut self, seq: u64, kind: ChangeKind, r: &Record) {
        self.ops.push(Op::Put(
            CF_EVENTS,
            seq.to_be_bytes().to_vec(),
            encode_change(kind, r),
        ));
        self.ops.push(Op::Put(
            CF_META,
            KEY_LAST_SEQ.to_vec(),
            seq.to_be_bytes().to_vec(),
        ));
    }

    /// Drops every event numbered below `seq`: one range tombstone, so
    /// trimming costs writers nothing that grows with the history.
    pub fn trim_changes_below(&mut self, seq: u64) {
        self.ops.push(Op::DeleteRange(
            CF_EVENTS,
            0u64.to_be_bytes().to_vec(),
            seq.to_be_bytes().to_vec(),
        ));
        self.events_below = Some(self.events_below.map_or(seq, |s| s.max(seq)));
    }

    pub fn put_code(&mut self, id: ProcessId, code: &[u8]) {
        self.ops
            .push(Op::Put(CF_CODE, id_key(id).to_vec(), code.to_vec()));
    }

    pub fn put_output(&mut self, id: ProcessId, json: Vec<u8>) {
        self.ops.push(Op::Put(CF_OUTPUT, id_key(id).to_vec(), json));
    }

    pub fn put_chunk(&mut self, id: ProcessId, stream: Stream, offset: u64, bytes: Vec<u8>) {
        self.ops
            .push(Op::Put(CF_CHUNKS, chunk_key(id, stream, offset), bytes));
    }

    /// Removes the outputs of the last run: structured output and both
    /// captured streams.
    pub fn clear_outputs(&mut self, id: ProcessId) {
        self.ops.push(Op::Delete(CF_OUTPUT, id_key(id).to_vec()));
        let next = ProcessId(id.0 + 1);
        self.ops.push(Op::DeleteRange(
            CF_CHUNKS,
            id_key(id).to_vec(),
            id_key(next).to_vec(),
        ));
        self.deleted_ids.push(id.0);
    }

    /// Removes everything stored for a process.
    pub fn delete_process(&mut self, id: ProcessId) {
        self.clear_outputs(id);
        self.ops.push(Op::DeleteRecord(id.0));
        self.ops.push(Op::Delete(CF_CODE, id_key(id).to_vec()));
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Resolves when the batch is written (and synced, for durable batches).
pub type Completion = oneshot::Receiver<Result<(), StoreError>>;

/// How the writer reports a finished batch.
enum Done {
    Channel(oneshot::Sender<Result<(), StoreError>>),
    /// Called on the writer thread, in submission order: callers that need
    /// completions in order (the supervisor) use this.
    Callback(Box<dyn FnOnce(Result<(), StoreError>) + Send>),
}

impl Done {
    fn complete(self, r: Result<(), StoreError>) {
        match self {
            Done::Channel(tx) => {
                let _ = tx.send(r);
            }
            Done::Callback(f) => f(r),
        }
    }
}

struct Job {
    batch: Batch,
    done: Done,
}

/// Told about every group commit by the writer thread (the metrics): it
/// must be quick and must not block.
pub trait CommitObserver: Send + Sync {
    /// One RocksDB write applied `writes` queued batches in `elapsed`
    /// (including the log sync when `synced`).
    fn committed(&self, writes: usize, synced: bool, elapsed: Duration);
}

type CommitHook = Arc<OnceLock<Arc<dyn CommitObserver>>>;

/// Handle to the open store. Cheap to clone; the database closes when the
/// last handle is dropped, after the writer has applied everything queued.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<DB>,
    jobs: Option<mpsc::Sender<Job>>,
    writer: Option<thread::JoinHandle<()>>,
    /// Dropped after the writer (which holds the other handle): stops the
    /// reclaim thread before the database closes.
    reclaimer: Option<Arc<reclaim::Reclaimer>>,
    memory: Memory,
    commits: CommitHook,
    /// The writer's reserve, moved by tests.
    #[cfg(test)]
    reserve: Arc<std::sync::atomic::AtomicU64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the writer loop once it has drained the
        // queue; joining it releases its database handle, so the database
        // is closed (and its lock released) when this returns.
        self.jobs.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        self.reclaimer.take();
    }
}

impl Store {
    /// Opens (or creates) the database under `dir`. Never repairs or wipes:
    /// a database it cannot read is an error for the operator.
    ///
    /// `reserve`: free bytes kept on the data dir's filesystem for
    /// essential batches, beyond what the memtables hold. Below it, other
    /// batches fail with [`StoreError::Full`] before RocksDB is touched, so
    /// RocksDB itself never runs out of space (which would leave it
    /// read-only until restart); writes succeed again by themselves once
    /// space returns.
    pub fn open(dir: &Path, reserve: u64) -> Result<Store, StoreError> {
        Store::open_with_budget(dir, reserve, DEFAULT_MEMORY_BYTES)
    }

    /// [`Store::open`] with RocksDB's memory budget (`storage_memory_bytes`).
    pub fn open_with_budget(dir: &Path, reserve: u64, memory: u64) -> Result<Store, StoreError> {
        let memory = Memory::new(memory);
        let mut db = DB::open_cf_descriptors(&db_options(&memory), dir, cf_descriptors(&memory))
            .map_err(|source| {
                if source.kind() != ErrorKind::Corruption {
                    return StoreError::Open {
                        path: dir.to_path_buf(),
                        source,
                    };
                }
                // RocksDB names a damaged table but not a damaged log:
                // read the logs to say which one and where.
                let mut found = repair::damaged_logs(dir);
                found.push(format!("RocksDB says: {source}"));
                StoreError::Damaged {
                    path: dir.to_path_buf(),
                    found: found.join("; "),
                }
            })?;
        if check_format(&db, dir)? == 1 {
            upgrade_from_v1(&mut db, &memory, dir)?;
        }
        let tracked = writer_start(&db)?;
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel();
        let writer_db = db.clone();
        let reserve = Arc::new(std::sync::atomic::AtomicU64::new(reserve));
        let space = Space {
            dir: dir.to_path_buf(),
            reserve: reserve.clone(),
        };
        let reclaimer = Arc::new(reclaim::Reclaimer::start(db.clone(), dir.to_path_buf()));
        let writer_reclaimer = reclaimer.clone();
        let commits = CommitHook::default();
        let writer_commits = commits.clone();
        let writer = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || {
                writer_loop(
                    &writer_db,
                    &space,
                    &writer_reclaimer,
                    &writer_commits,
                    tracked,
                    rx,
                )
            })
            .expect("spawn store writer thread");
        Ok(Store {
            inner: Arc::new(Inner {
                db,
                jobs: Some(tx),
                writer: Some(writer),
                reclaimer: Some(reclaimer),
                memory,
                commits,
                #[cfg(test)]
                reserve,
            }),
        })
    }

    /// Reports every later group commit to `observer` (once; a second
    /// observer is ignored).
    pub fn observe_commits(&self, observer: Arc<dyn CommitObserver>) {
        let _ = self.inner.commits.set(observer);
    }

    /// Queues a batch; the returned completion fires once it is applied.
    pub fn submit(&self, batch: Batch) -> Completion {
        let (tx, rx) = oneshot::channel();
        self.enqueue(Job {
            batch,
            done: Done::Channel(tx),
        });
        rx
    }

    /// Queues a batch; `then` runs on the writer thread once it is applied.
    /// Completions run in submission order.
    pub fn submit_then(
        &self,
        batch: Batch,
        then: impl FnOnce(Result<(), StoreError>) + Send + 'static,
    ) {
        self.enqueue(Job {
            batch,
            done: Done::Callback(Box::new(then)),
        });
    }

    fn enqueue(&self, job: Job) {
        let Some(jobs) = &self.inner.jobs else {
            return job.done.complete(Err(StoreError::WriterGone));
        };
        if let Err(mpsc::SendError(job)) = jobs.send(job) {
            job.done.complete(Err(StoreError::WriterGone));
        }
    }

    fn db(&self) -> &DB {
        &self.inner.db
    }

    /// Moves the free-space reserve (tests fake a full disk with
    /// `u64::MAX`).
    #[cfg(test)]
    pub(crate) fn set_reserve(&self, bytes: u64) {
        self.inner
            .reserve
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Writes a consistent copy of the database to `target` (which must
    /// not exist) while writes go on: a RocksDB checkpoint (memtables
    /// flushed, immutable tables hard-linked, or copied across
    /// filesystems). Everything durable before the call is in it. The copy
    /// is then opened read-only to prove it opens, and its counters are
    /// returned. Blocks: call it off the async runtime.
    pub fn backup(&self, target: &Path) -> Result<BackupInfo, StoreError> {
        let fail = |e: rocksdb::Error| StoreError::Backup(e.into_string());
        let started = std::time::Instant::now();
        rocksdb::checkpoint::Checkpoint::new(self.db())
            .and_then(|c| c.create_checkpoint(target))
            .map_err(fail)?;
        let took_ms = started.elapsed().as_millis() as u64;
        let memory = Memory::new(4 << 20);
        let copy = DB::open_cf_for_read_only(&db_options(&memory), target, ALL_CFS, false)
            .map_err(fail)?;
        let meta = copy.cf_handle(CF_META).expect("meta cf");
        let read = |key: &[u8], default: u64| -> Result<u64, StoreError> {
            Ok(match copy.get_cf(meta, key).map_err(fail)? {
                Some(b) if b.len() == 8 => u64::from_be_bytes(b[..].try_into().expect("8 bytes")),
                _ => default,
            })
        };
        Ok(BackupInfo {
            next_id: read(KEY_NEXT_ID, 1)?,
            last_seq: read(KEY_LAST_SEQ, 0)?,
            took_ms,
        })
    }

    /// What RocksDB's memory budget holds now.
    pub fn memory_usage(&self) -> MemoryUsage {
        let m = &self.inner.memory;
        MemoryUsage {
            budget: m.budget,
            cache: m.cache.get_usage() as u64,
            cache_pinned: m.cache.get_pinned_usage() as u64,
            memtables: m.write_buffers.get_usage() as u64,
        }
    }

    /// Applies a batch and waits for it.
    pub async fn write(&self, batch: Batch) -> Result<(), StoreError> {
        self.submit(batch)
            .await
            .unwrap_or(Err(StoreError::WriterGone))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db().cf_handle(name).expect("column family exists")
    }

    /// A u64 kept in the meta column family, `default` if absent.
    fn meta_u64(&self, key: &[u8], default: u64) -> Result<u64, StoreError> {
        let v = self
            .db()
            .get_cf(self.cf(CF_META), key)
            .map_err(StoreError::read)?;
        Ok(match v {
            Some(b) if b.len() == 8 => u64::from_be_bytes(b[..].try_into().unwrap()),
            _ => default,
        })
    }

    /// The next id to assign (1 on a new store).
    pub fn next_id(&self) -> Result<u64, StoreError> {
        self.meta_u64(KEY_NEXT_ID, 1)
    }

    /// The sequence number of the last persisted event (0 before any).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        self.meta_u64(KEY_LAST_SEQ, 0)
    }

    /// The oldest retained event's sequence number, if any is retained.
    pub fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        match self
            .db()
            .iterator_cf(self.cf(CF_EVENTS), IteratorMode::Start)
            .next()
        {
            None => Ok(None),
            Some(item) => {
                let (k, _) = item.map_err(StoreError::read)?;
                Ok(<[u8; 8]>::try_from(&k[..]).ok().map(u64::from_be_bytes))
            }
        }
    }

    /// Up to `max` retained events numbered above `after`, in order.
    pub fn changes_after(&self, after: u64, max: usize) -> Result<Vec<Change>, StoreError> {
        let start = after.saturating_add(1).to_be_bytes();
        let mut out = Vec::new();
        for item in self
            .db()
            .iterator_cf(
                self.cf(CF_EVENTS),
                IteratorMode::From(&start, Direction::Forward),
            )
            .take(max)
        {
            let (k, v) = item.map_err(StoreError::read)?;
            let seq = <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            let (kind, record) = decode_change(&v).map_err(|source| StoreError::Corrupt {
                key: format!("event {seq}"),
                source,
            })?;
            out.push(Change { seq, kind, record });
        }
        Ok(out)
    }

    pub fn get(&self, id: ProcessId) -> Result<Option<Record>, StoreError> {
        let v = self
            .db()
            .get_pinned_cf(self.cf(CF_RECORDS), id_key(id))
            .map_err(StoreError::read)?;
        v.map(|b| {
            decode_record(&b).map_err(|source| StoreError::Corrupt {
                key: id.to_string(),
                source,
            })
        })
        .transpose()
    }

    pub fn code(&self, id: ProcessId) -> Result<Option<Vec<u8>>, StoreError> {
        self.db()
            .get_cf(self.cf(CF_CODE), id_key(id))
            .map_err(StoreError::read)
    }

    pub fn output(&self, id: ProcessId) -> Result<Option<Vec<u8>>, StoreError> {
        self.db()
            .get_cf(self.cf(CF_OUTPUT), id_key(id))
            .map_err(StoreError::read)
    }

    /// All captured bytes of one stream of the last run, in order.
    pub fn stream(&self, id: ProcessId, stream: Stream) -> Result<Vec<u8>, StoreError> {
        let prefix = chunk_key(id, stream, 0);
        let prefix = &prefix[..9];
        let mut out = Vec::new();
        let iter = self.db().iterator_cf(
            self.cf(CF_CHUNKS),
            IteratorMode::From(prefix, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(StoreError::read)?;
            if !k.starts_with(prefix) {
                break;
            }
            out.extend_from_slice(&v);
        }
        Ok(out)
    }

    /// How many bytes of one stream of the current run are stored: the
    /// offset the next chunk goes to (a run re-adopted after a restart
    /// continues there).
    pub fn stream_len(&self, id: ProcessId, stream: Stream) -> Result<u64, StoreError> {
        let last = chunk_key(id, stream, u64::MAX);
        let prefix = &last[..9];
        let mut iter = self.db().iterator_cf(
            self.cf(CF_CHUNKS),
            IteratorMode::From(&last, Direction::Reverse),
        );
        match iter.next() {
            Some(item) => {
                let (k, v) = item.map_err(StoreError::read)?;
                if !k.starts_with(prefix) || k.len() != 17 {
                    return Ok(0);
                }
                let mut off = [0u8; 8];
                off.copy_from_slice(&k[9..17]);
                Ok(u64::from_be_bytes(off) + v.len() as u64)
            }
            None => Ok(0),
        }
    }

    /// Captured bytes of one stream from `offset` on: whole chunks, at
    /// least one when any exists, about `max` bytes at most.
    pub fn stream_from(
        &self,
        id: ProcessId,
        stream: Stream,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, StoreError> {
        let start = chunk_key(id, stream, offset);
        let prefix = &start[..9];
        let mut out = Vec::new();
        let iter = self.db().iterator_cf(
            self.cf(CF_CHUNKS),
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item.map_err(StoreError::read)?;
            if !k.starts_with(prefix) || (!out.is_empty() && out.len() + v.len() > max) {
                break;
            }
            out.extend_from_slice(&v);
        }
        Ok(out)
    }

    /// Visits records newest first, starting below `before` (exclusive) when
    /// given, until `visit` returns false.
    pub fn scan_newest_first(
        &self,
        before: Option<ProcessId>,
        mut visit: impl FnMut(Record) -> bool,
    ) -> Result<(), StoreError> {
        let start;
        let mode = match before {
            Some(id) if id.0 <= 1 => return Ok(()),
            Some(id) => {
                start = id_key(ProcessId(id.0 - 1));
                IteratorMode::From(&start, Direction::Reverse)
            }
            None => IteratorMode::End,
        };
        for item in self.db().iterator_cf(self.cf(CF_RECORDS), mode) {
            let (k, v) = item.map_err(StoreError::read)?;
            let rec = decode_record(&v).map_err(|source| StoreError::Corrupt {
                key: format!("{k:02x?}"),
                source,
            })?;
            if !visit(rec) {
                break;
            }
        }
        Ok(())
    }

    /// Visits the records `filter` selects, newest first, starting below
    /// `before` (exclusive) when given, until `visit` returns false. A
    /// filter on state, exit state or ref walks the list index, so it reads
    /// only the records it returns: its cost does not grow with the
    /// records that do not match.
    pub fn scan_matching(
        &self,
        filter: &Filter,
        before: Option<ProcessId>,
        mut visit: impl FnMut(Record) -> bool,
    ) -> Result<(), StoreError> {
        match index::prefixes(filter) {
            None => self.scan_newest_first(before, visit),
            Some(prefixes) => self.scan_indexed(&prefixes, before, |r| {
                // Refs longer than the indexed part share entries.
                !filter.matches(&r) || visit(r)
            }),
        }
    }

    /// Visits the records under index `prefixes`, newest first, reading
    /// the index and the records at one snapshot.
    fn scan_indexed(
        &self,
        prefixes: &[Vec<u8>],
        before: Option<ProcessId>,
        mut visit: impl FnMut(Record) -> bool,
    ) -> Result<(), StoreError> {
        // Taking a snapshot locks the database's mutex, which flushes and
        // compactions take too: a filter whose classes are all empty right
        // now (what runs, when nothing does) is answered without one.
        let now = index::Counts::decode(
            self.db()
                .get_pinned_cf(self.cf(CF_META), index::KEY_CLASS_COUNTS)
                .map_err(StoreError::read)?
                .as_deref(),
        );
        if !prefixes.iter().any(|p| now.may_hold(p)) {
            return Ok(());
        }
        let snapshot = self.db().snapshot();
        let records = self.cf(CF_RECORDS);
        let counts = index::Counts::decode(
            snapshot
                .get_pinned_cf(self.cf(CF_META), index::KEY_CLASS_COUNTS)
                .map_err(StoreError::read)?
                .as_deref(),
        );
        let prefixes: Vec<Vec<u8>> = prefixes
            .iter()
            .filter(|p| counts.may_hold(p))
            .cloned()
            .collect();
        index::walk_newest_first(
            &snapshot,
            self.cf(CF_INDEX),
            &prefixes,
            before.map(|b| b.0),
            |id| {
                let v = snapshot
                    .get_pinned_cf(records, id.to_be_bytes())
                    .map_err(StoreError::read)?;
                let Some(v) = v else {
                    tracing::warn!(
                        id,
                        "list index: an entry names a record that does not exist"
                    );
                    return Ok(true);
                };
                let rec = decode_record(&v).map_err(|source| StoreError::Corrupt {
                    key: id.to_string(),
                    source,
                })?;
                Ok(visit(rec))
            },
        )
    }

    /// Every record not idle, oldest first: what recovery must look at.
    /// Reads every record, not the list index: that read is also what
    /// finds a damaged `records` table before the daemon serves.
    pub fn unsettled(&self) -> Result<Vec<Record>, StoreError> {
        let mut out = Vec::new();
        self.scan_newest_first(None, |r| {
            if r.state != State::Idle {
                out.push(r);
            }
            true
        })?;
        out.reverse();
        Ok(out)
    }
}

/// The format version of an opened database (a new one gets today's).
fn check_format(db: &DB, dir: &Path) -> Result<u32, StoreError> {
    let meta = db.cf_handle(CF_META).expect("meta cf");
    let found = db
        .get_cf(meta, KEY_FORMAT_VERSION)
        .map_err(StoreError::read)?;
    let known = |v: &[u8]| {
        <[u8; 4]>::try_from(v)
            .map(u32::from_be_bytes)
            .ok()
            .filter(|n| (OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(n))
    };
    match found {
        Some(v) if known(&v).is_some() => Ok(known(&v).expect("known")),
        Some(v) => Err(StoreError::FormatVersion {
            path: dir.to_path_buf(),
            found: match <[u8; 4]>::try_from(&v[..]) {
                Ok(b) => u32::from_be_bytes(b).to_string(),
                Err(_) => format!("{v:02x?}"),
            },
        }),
        None => {
            let records = db.cf_handle(CF_RECORDS).expect("records cf");
            let empty = db.iterator_cf(meta, IteratorMode::Start).next().is_none()
                && db
                    .iterator_cf(records, IteratorMode::Start)
                    .next()
                    .is_none();
            if !empty {
                return Err(StoreError::NoVersion(dir.to_path_buf()));
            }
            let mut wo = WriteOptions::default();
            wo.set_sync(true);
            db.put_cf_opt(meta, KEY_FORMAT_VERSION, FORMAT_VERSION.to_be_bytes(), &wo)
                .map_err(|e| StoreError::Write(e.to_string()))?;
            Ok(FORMAT_VERSION)
        }
    }
}

/// Format 1 to 2: builds the list index from the records, once. The index
/// family is dropped and created empty first (an upgrade interrupted by a
/// crash left part of one), filled, flushed, and only then is version 2
/// written, synced: until that write, the next start upgrades again.
/// Nothing else touches the database meanwhile (the writer has not started).
fn upgrade_from_v1(db: &mut DB, mem: &Memory, dir: &Path) -> Result<(), StoreError> {
    let fail = |e: rocksdb::Error| StoreError::Upgrade {
        path: dir.to_path_buf(),
        reason: e.into_string(),
    };
    tracing::info!(
        path = %dir.display(),
        "upgrading the data dir from format version 1 to {FORMAT_VERSION}: building the list index from every record (once)"
    );
    let started = std::time::Instant::now();
    if db.cf_handle(CF_INDEX).is_some() {
        db.drop_cf(CF_INDEX).map_err(fail)?;
    }
    db.create_cf(CF_INDEX, &cf_options(mem, CF_INDEX))
        .map_err(fail)?;
    let built = index::build(db).map_err(fail)?;
    for skipped in &built.skipped {
        tracing::warn!(%skipped, "a record that does not decode was left out of the list index");
    }
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    let meta = db.cf_handle(CF_META).expect("meta cf");
    let mut wb = WriteBatch::default();
    wb.put_cf(meta, index::KEY_CLASS_COUNTS, built.counts.encode());
    wb.put_cf(meta, KEY_FORMAT_VERSION, FORMAT_VERSION.to_be_bytes());
    db.write_opt(wb, &wo).map_err(fail)?;
    tracing::info!(
        records = built.records,
        skipped = built.skipped.len(),
        took_ms = started.elapsed().as_millis() as u64,
        "upgraded the data dir to format version {FORMAT_VERSION}"
    );
    Ok(())
}

/// Group commit: takes every job queued right now (up to MAX_GROUP), applies
/// them as one RocksDB write, syncs once if any asked for it, then completes
/// them all. Runs until every Store handle is dropped.
/// The free-space policy of the writer.
struct Space {
    dir: PathBuf,
    /// Shared with [`Inner`] so tests can move it while the writer runs.
    reserve: Arc<std::sync::atomic::AtomicU64>,
}

/// Free bytes on the filesystem of `dir` (`None` if it cannot be asked).
fn free_bytes(dir: &Path) -> Option<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: libc::statvfs is a struct of integers: all-zero bytes are a
    // valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a NUL-terminated CString alive for the whole call,
    // and `st` a live, writable statvfs the call fills.
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl Space {
    /// Whether free space is below the reserve plus what the memtables
    /// hold (checked once per group): new work stops while a flush of
    /// everything in memory still fits beside the reserve, so RocksDB never
    /// runs out of space flushing (which would stop its writes until the
    /// database is reopened).
    fn low(&self, db: &DB) -> bool {
        let reserve = self.reserve.load(std::sync::atomic::Ordering::Relaxed);
        reserve != 0
            && free_bytes(&self.dir)
                .is_some_and(|free| free < reserve.saturating_add(reclaim::memtable_bytes(db)))
    }
}

/// What the writer starts from: the list index's class counts as stored,
/// and the first id that has no record (above the persisted counter and
/// the last record).
fn writer_start(db: &DB) -> Result<index::Tracked, StoreError> {
    let meta = db.cf_handle(CF_META).expect("meta cf");
    let counts = index::Counts::decode(
        db.get_pinned_cf(meta, index::KEY_CLASS_COUNTS)
            .map_err(StoreError::read)?
            .as_deref(),
    );
    let next_id = match db
        .get_pinned_cf(meta, KEY_NEXT_ID)
        .map_err(StoreError::read)?
    {
        Some(b) if b.len() == 8 => u64::from_be_bytes(b[..].try_into().expect("8 bytes")),
        _ => 1,
    };
    let records = db.cf_handle(CF_RECORDS).expect("records cf");
    let after_last = match db.iterator_cf(records, IteratorMode::End).next() {
        Some(item) => {
            let (k, _) = item.map_err(StoreError::read)?;
            <[u8; 8]>::try_from(&k[..])
                .map_or(u64::MAX, |b| u64::from_be_bytes(b).saturating_add(1))
        }
        None => 1,
    };
    Ok(index::Tracked {
        counts,
        fresh_from: next_id.max(after_last),
    })
}

/// `tracked`: from `writer_start`; from here on only this thread changes
/// the class counts.
fn writer_loop(
    db: &DB,
    space: &Space,
    reclaimer: &reclaim::Reclaimer,
    commits: &CommitHook,
    mut tracked: index::Tracked,
    rx: mpsc::Receiver<Job>,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Below the reserve only essential batches are written; the others
        // are refused. Either way every batch completes in submission
        // order: callers (the supervisor) rely on it.
        let low = space.low(db);
        if low {
            // Old logs pinned by rarely flushed families are space too.
            reclaimer.flush();
            let refused = jobs.iter().filter(|j| !j.batch.essential).count();
            if refused > 0 {
                tracing::warn!(refused, "free space below the reserve: refusing new work");
            }
        }
        let written = |j: &Job| !low || j.batch.essential;
        let res = if jobs.iter().any(written) {
            write_group(
                db,
                reclaimer,
                commits,
                &mut tracked,
                jobs.iter_mut().filter(|j| written(j)),
            )
        } else {
            Ok(())
        };
        for job in jobs {
            let r = if !written(&job) {
                Err(StoreError::Full)
            } else {
                res.as_ref()
                    .map(|_| ())
                    .map_err(|e| StoreError::Write(e.to_string()))
            };
            job.done.complete(r);
        }
    }
}

/// Applies the batches of a group as one RocksDB write (one fsync if any
/// of them asks for durability).
/// `tracked`: what the writer keeps for the list index; the class counts
/// the group's writes move are put back if the group is not written.
fn write_group<'a>(
    db: &DB,
    reclaimer: &reclaim::Reclaimer,
    commits: &CommitHook,
    tracked: &mut index::Tracked,
    jobs: impl Iterator<Item = &'a mut Job>,
) -> Result<(), rocksdb::Error> {
    let mut wb = WriteBatch::default();
    let mut count = 0;
    let mut sync = false;
    let mut deleted_ids = Vec::new();
    let mut events_below: Option<u64> = None;
    let records = db.cf_handle(CF_RECORDS).expect("records cf");
    let counts_before = tracked.counts.clone();
    let mut index = index::Maintainer::new(db, tracked);
    // A failed read of the index's current state: nothing is written.
    let mut indexed: Result<(), rocksdb::Error> = Ok(());
    for job in jobs {
        count += 1;
        sync |= job.batch.sync;
        deleted_ids.append(&mut job.batch.deleted_ids);
        if let Some(seq) = job.batch.events_below {
            events_below = Some(events_below.map_or(seq, |s| s.max(seq)));
        }
        for op in job.batch.ops.drain(..) {
            match op {
                Op::Record(id, v, keys) => {
                    wb.put_cf(records, id.to_be_bytes(), v);
                    if indexed.is_ok() {
                        indexed = index.written(&mut wb, id, keys);
                    }
                }
                Op::DeleteRecord(id) => {
                    wb.delete_cf(records, id.to_be_bytes());
                    if indexed.is_ok() {
                        indexed = index.deleted(&mut wb, id);
                    }
                }
                Op::Put(cf, k, v) => wb.put_cf(db.cf_handle(cf).expect("cf"), k, v),
                Op::Delete(cf, k) => wb.delete_cf(db.cf_handle(cf).expect("cf"), k),
                Op::DeleteRange(cf, from, to) => {
                    wb.delete_range_cf(db.cf_handle(cf).expect("cf"), from, to)
                }
            }
        }
    }
    index.finish(&mut wb);
    let mut wo = WriteOptions::default();
    wo.set_sync(sync);
    let started = Instant::now();
    let res = indexed.and_then(|()| db.write_opt(wb, &wo));
    if res.is_err() {
        tracked.counts = counts_before;
    }
    if let (Ok(()), Some(o)) = (&res, commits.get()) {
        o.committed(count, sync, started.elapsed());
    }
    match &res {
        Err(e) => tracing::error!(error = %e, "storage write failed"),
        Ok(()) if !deleted_ids.is_empty() || events_below.is_some() => {
            reclaimer.deleted(&deleted_ids, events_below);
        }
        Ok(()) => {}
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_code_chunks_and_counter_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 0).unwrap();
            assert_eq!(s.next_id().unwrap(), 1);
            let mut b = Batch::durable();
            for i in 1..=3 {
                let mut r = Record::new(ProcessId(i), None, i * 10);
                if i == 2 {
                    r.state = State::Running;
                }
                b.put_record(&r);
                b.put_code(ProcessId(i), b"echo hi");
            }
            b.put_next_id(4);
            b.put_chunk(ProcessId(2), Stream::Stdout, 0, b"hel".to_vec());
            b.put_chunk(ProcessId(2), Stream::Stdout, 3, b"lo".to_vec());
            b.put_chunk(ProcessId(2), Stream::Stderr, 0, b"err".to_vec());
            b.put_chunk(ProcessId(3), Stream::Stdout, 0, b"other".to_vec());
            s.write(b).await.unwrap();
        }
        let s = Store::open(dir.path(), 0).unwrap();
        assert_eq!(s.next_id().unwrap(), 4);
        assert_eq!(s.stream(ProcessId(2), Stream::Stdout).unwrap(), b"hello");
        assert_eq!(s.stream(ProcessId(2), Stream::Stderr).unwrap(), b"err");
        assert_eq!(s.code(ProcessId(1)).unwrap().unwrap(), b"echo hi");
        let mut seen = vec![];
        s.scan_newest_first(None, |r| {
            seen.push(r.id.0);
            true
        })
        .unwrap();
        assert_eq!(seen, vec![3, 2, 1]);
        let mut below = vec![];
        s.scan_newest_first(Some(ProcessId(3)), |r| {
            below.push(r.id.0);
            true
        })
        .unwrap();
        assert_eq!(below, vec![2, 1]);
        let unsettled: Vec<u64> = s.unsettled().unwrap().iter().map(|r| r.id.0).collect();
        assert_eq!(unsettled, vec![2]);

        let mut b = Batch::durable();
        b.clear_outputs(ProcessId(2));
        s.write(b).await.unwrap();
        assert!(s.stream(ProcessId(2), Stream::Stdout).unwrap().is_empty());
        assert_eq!(s.stream(ProcessId(3), Stream::Stdout).unwrap(), b"other");

        let mut b = Batch::durable();
        b.delete_process(ProcessId(3));
        s.write(b).await.unwrap();
        assert!(s.get(ProcessId(3)).unwrap().is_none());
        assert!(s.code(ProcessId(3)).unwrap().is_none());
    }

    #[tokio::test]
    async fn changes_are_numbered_replayed_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 0).unwrap();
        assert_eq!((s.last_seq().unwrap(), s.first_seq().unwrap()), (0, None));
        let r = Record::new(ProcessId(1), None, 0);
        let mut b = Batch::durable();
        for seq in 1..=5 {
            b.put_change(seq, ChangeKind::Entered(State::Queued), &r);
        }
        s.write(b).await.unwrap();
        assert_eq!(s.last_seq().unwrap(), 5);
        let seqs = |v: Vec<Change>| v.into_iter().map(|c| c.seq).collect::<Vec<_>>();
        assert_eq!(seqs(s.changes_after(2, 10).unwrap()), vec![3, 4, 5]);
        assert_eq!(seqs(s.changes_after(0, 2).unwrap()), vec![1, 2]);
        let mut b = Batch::durable();
        b.trim_changes_below(4);
        s.write(b).await.unwrap();
        assert_eq!(s.first_seq().unwrap(), Some(4));
        assert_eq!(seqs(s.changes_after(0, 10).unwrap()), vec![4, 5]);
        assert_eq!(s.last_seq().unwrap(), 5);
    }

    #[tokio::test]
    async fn the_commit_observer_hears_of_every_group_commit() {
        #[derive(Default)]
        struct Heard(std::sync::Mutex<Vec<(usize, bool)>>);
        impl CommitObserver for Heard {
            fn committed(&self, writes: usize, synced: bool, _: Duration) {
                self.0.lock().unwrap().push((writes, synced));
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 0).unwrap();
        let heard = Arc::new(Heard::default());
        s.observe_commits(heard.clone());
        let mut b = Batch::buffered();
        b.put_chunk(ProcessId(1), Stream::Stdout, 0, b"a".to_vec());
        s.write(b).await.unwrap();
        let mut b = Batch::durable();
        b.put_next_id(2);
        s.write(b).await.unwrap();
        // Reported before the completions: nothing to wait for here.
        assert_eq!(*heard.0.lock().unwrap(), vec![(1, false), (1, true)]);
    }

    #[tokio::test]
    async fn stream_from_returns_whole_chunks_from_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 0).unwrap();
        let mut b = Batch::buffered();
        b.put_chunk(ProcessId(1), Stream::Stdout, 0, b"aaa".to_vec());
        b.put_chunk(ProcessId(1), Stream::Stdout, 3, b"bb".to_vec());
        b.put_chunk(ProcessId(1), Stream::Stdout, 5, b"c".to_vec());
        b.put_chunk(ProcessId(2), Stream::Stdout, 0, b"other".to_vec());
        s.write(b).await.unwrap();
        assert_eq!(
            s.stream_from(ProcessId(1), Stream::Stdout, 0, 4).unwrap(),
            b"aaa"
        );
        assert_eq!(
            s.stream_from(ProcessId(1), Stream::Stdout, 3, 100).unwrap(),
            b"bbc"
        );
        assert_eq!(
            s.stream_from(ProcessId(1), Stream::Stdout, 0, 1).unwrap(),
            b"aaa"
        );
        assert!(s
            .stream_from(ProcessId(1), Stream::Stdout, 6, 100)
            .unwrap()
            .is_empty());
        assert!(s
            .stream_from(ProcessId(1), Stream::Stderr, 0, 100)
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn below_the_reserve_only_essential_batches_are_written() {
        let dir = tempfile::tempdir().unwrap();
        // A reserve no filesystem here can satisfy.
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        let r = Record::new(ProcessId(1), None, 0);
        let mut b = Batch::durable();
        b.put_record(&r);
        assert!(matches!(s.write(b).await, Err(StoreError::Full)));
        assert!(
            s.get(ProcessId(1)).unwrap().is_none(),
            "a refused batch changes nothing"
        );
        let mut b = Batch::durable().essential();
        b.put_record(&r);
        s.write(b).await.unwrap();
        assert_eq!(s.get(ProcessId(1)).unwrap(), Some(r));
    }

    /// Below the reserve a group holds refused and kept batches; callers
    /// (the supervisor) rely on completions in submission order, whatever
    /// the outcome of each batch.
    #[tokio::test]
    async fn completions_keep_submission_order_when_some_batches_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), u64::MAX).unwrap();
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        // The first batch's completion holds the writer until every other
        // batch is queued, so they are all taken as one group.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let log = order.clone();
        s.submit_then(Batch::durable().essential(), move |r| {
            release_rx.recv().unwrap();
            log.lock().unwrap().push((0, r.is_ok()));
        });
        let (all_tx, all_rx) = oneshot::channel();
        let mut all_tx = Some(all_tx);
        let n = 8;
        for i in 1..=n {
            let mut b = Batch::durable();
            if i % 2 == 0 {
                b = b.essential();
            }
            b.put_record(&Record::new(ProcessId(i), None, 0));
            let log = order.clone();
            let done = (i == n).then(|| all_tx.take().unwrap());
            s.submit_then(b, move |r| {
                log.lock().unwrap().push((i, r.is_ok()));
                if let Some(done) = done {
                    let _ = done.send(());
                }
            });
        }
        release_tx.send(()).unwrap();
        all_rx.await.unwrap();
        let seen = order.lock().unwrap().clone();
        let expected: Vec<(u64, bool)> = (0..=n).map(|i| (i, i % 2 == 0)).collect();
        assert_eq!(seen, expected, "(batch, written) in completion order");
    }

    /// Every entry of the list index.
    fn index_entries(s: &Store) -> std::collections::BTreeSet<Vec<u8>> {
        s.db()
            .iterator_cf(s.cf(CF_INDEX), IteratorMode::Start)
            .map(|i| i.unwrap().0.to_vec())
            .collect()
    }

    /// The entries every record should have.
    fn expected_entries(s: &Store) -> std::collections::BTreeSet<Vec<u8>> {
        let mut out = std::collections::BTreeSet::new();
        s.scan_newest_first(None, |r| {
            out.extend(index::keys_of(&r));
            true
        })
        .unwrap();
        out
    }

    /// The class counts as stored, and as the records say they should be.
    fn counts_both_ways(s: &Store) -> (index::Counts, index::Counts) {
        let stored = index::Counts::decode(
            s.db()
                .get_cf(s.cf(CF_META), index::KEY_CLASS_COUNTS)
                .unwrap()
                .as_deref(),
        );
        let mut want = index::Counts::default();
        for k in expected_entries(s) {
            want.moved(&k, true);
        }
        (stored, want)
    }

    /// Every filter the list route can be given, over these refs.
    fn all_filters(refs: &[&str]) -> Vec<Filter> {
        let mut out = Vec::new();
        let states = std::iter::once(None).chain(State::ALL.map(Some));
        for state in states {
            let statuses = [None, Some(None)]
                .into_iter()
                .chain(crate::model::ExitState::ALL.map(|e| Some(Some(e))));
            for status in statuses {
                for r in std::iter::once(None).chain(refs.iter().map(|r| Some(r.to_string()))) {
                    out.push(Filter {
                        state,
                        status,
                        r#ref: r,
                    });
                }
            }
        }
        out
    }

    /// The ids `filter` selects below `before`: through the index, and by
    /// reading every record.
    fn both_ways(s: &Store, filter: &Filter, before: Option<ProcessId>) -> (Vec<u64>, Vec<u64>) {
        let mut indexed = Vec::new();
        s.scan_matching(filter, before, |r| {
            indexed.push(r.id.0);
            true
        })
        .unwrap();
        let mut scanned = Vec::new();
        s.scan_newest_first(before, |r| {
            if filter.matches(&r) {
                scanned.push(r.id.0);
            }
            true
        })
        .unwrap();
        (indexed, scanned)
    }

    #[tokio::test]
    async fn the_list_index_follows_every_write_and_answers_like_a_full_scan() {
        use crate::model::ExitState;
        let dir = tempfile::tempdir().unwrap();
        // A long ref: its entries hold only its first 255 bytes, shared
        // with another ref that starts alike.
        let long_a = format!("{}a", "x".repeat(300));
        let long_b = format!("{}b", "x".repeat(300));
        let refs = ["r0", "r1", "", long_a.as_str(), long_b.as_str()];
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut live: std::collections::BTreeMap<u64, Record> = Default::default();
        for round in 0..3 {
            let s = Store::open(dir.path(), 0).unwrap();
            for _ in 0..150 {
                // Several writes per batch and several batches per group:
                // the same record may change more than once in a group.
                let mut pending = Vec::new();
                for _ in 0..1 + next(4) {
                    let mut b = Batch::durable();
                    for _ in 0..1 + next(3) {
                        let id = 1 + next(40);
                        if next(8) == 0 {
                            b.delete_process(ProcessId(id));
                            live.remove(&id);
                            continue;
                        }
                        let r = live.entry(id).or_insert_with(|| {
                            let rf = refs[next(refs.len() as u64) as usize];
                            let rf = (!rf.is_empty()).then(|| rf.to_string());
                            Record::new(ProcessId(id), rf, 0)
                        });
                        r.state = State::ALL[next(4) as usize];
                        r.exit_state = match next(5) {
                            0 => None,
                            n => Some(ExitState::ALL[n as usize - 1]),
                        };
                        r.stdout_len += 1;
                        b.put_record(r);
                    }
                    pending.push(s.submit(b));
                }
                for p in pending {
                    p.await.unwrap().unwrap();
                }
            }
            assert_eq!(index_entries(&s), expected_entries(&s), "round {round}");
            let (stored, want) = counts_both_ways(&s);
            assert_eq!(stored, want, "round {round}");
            for f in all_filters(&refs) {
                for before in [None, Some(ProcessId(20)), Some(ProcessId(1))] {
                    let (indexed, scanned) = both_ways(&s, &f, before);
                    assert_eq!(indexed, scanned, "{f:?} before {before:?}");
                }
            }
            let unsettled: Vec<u64> = s.unsettled().unwrap().iter().map(|r| r.id.0).collect();
            let want: Vec<u64> = live
                .values()
                .filter(|r| r.state != State::Idle)
                .map(|r| r.id.0)
                .collect();
            assert_eq!(unsettled, want);
        }
    }

    /// A database as format 1 left it: records, no index, version 1.
    fn write_v1(dir: &Path, records: &[Record]) {
        let opts = {
            let mut o = Options::default();
            o.create_if_missing(true);
            o.create_missing_column_families(true);
            o
        };
        let db = DB::open_cf(&opts, dir, &ALL_CFS[..6]).unwrap();
        let meta = db.cf_handle(CF_META).unwrap();
        db.put_cf(meta, KEY_FORMAT_VERSION, 1u32.to_be_bytes())
            .unwrap();
        let cf = db.cf_handle(CF_RECORDS).unwrap();
        for r in records {
            db.put_cf(cf, id_key(r.id), encode_record(r)).unwrap();
        }
    }

    #[tokio::test]
    async fn a_format_1_database_is_upgraded_once_also_after_an_interrupted_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let mut records = Vec::new();
        for i in 1..=50u64 {
            let mut r = Record::new(ProcessId(i), (i % 3 == 0).then(|| format!("r{}", i % 2)), 0);
            r.state = State::ALL[(i % 4) as usize];
            records.push(r);
        }
        write_v1(dir.path(), &records);
        {
            // An upgrade that stopped half-way: the index family exists
            // with some entries (one of them stale), the version is still 1.
            let mut opts = Options::default();
            opts.create_missing_column_families(true);
            let db = DB::open_cf(&opts, dir.path(), ALL_CFS).unwrap();
            let index = db.cf_handle(CF_INDEX).unwrap();
            for k in index::keys_of(&records[0]) {
                db.put_cf(index, k, []).unwrap();
            }
            db.put_cf(index, [b'S', 2, 0, 0, 0, 0, 0, 0, 0, 0, 99], [])
                .unwrap();
        }
        let s = Store::open(dir.path(), 0).unwrap();
        assert_eq!(index_entries(&s), expected_entries(&s));
        let (stored, want) = counts_both_ways(&s);
        assert_eq!(stored, want);
        let meta = s.cf(CF_META);
        assert_eq!(
            s.db().get_cf(meta, KEY_FORMAT_VERSION).unwrap().unwrap(),
            FORMAT_VERSION.to_be_bytes()
        );
        // Writes after the upgrade keep it exact (SingleDelete of entries
        // the upgrade put).
        let mut r = records[1].clone();
        r.state = State::Idle;
        r.exit_state = Some(crate::model::ExitState::Success);
        let mut b = Batch::durable();
        b.put_record(&r);
        b.delete_process(ProcessId(3));
        s.write(b).await.unwrap();
        assert_eq!(index_entries(&s), expected_entries(&s));
        let (stored, want) = counts_both_ways(&s);
        assert_eq!(stored, want);
        drop(s);
        let s = Store::open(dir.path(), 0).unwrap();
        assert_eq!(index_entries(&s), expected_entries(&s));
        let (indexed, scanned) = both_ways(
            &s,
            &Filter {
                state: Some(State::Running),
                ..Filter::default()
            },
            None,
        );
        assert_eq!(indexed, scanned);
    }

    #[test]
    fn refuses_unknown_format_version() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path(), 0).unwrap();
            let meta = s.db().cf_handle(CF_META).unwrap();
            s.db()
                .put_cf(meta, KEY_FORMAT_VERSION, 9u32.to_be_bytes())
                .unwrap();
        }
        let err = Store::open(dir.path(), 0).err().expect("must refuse");
        assert!(err.to_string().contains("format version 9"), "{err}");
        assert!(err.to_string().contains("versions 1 to 2"), "{err}");
    }
}
