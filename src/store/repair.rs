//! What the operator does with a damaged database: `check` (read every
//! table and log, report what is readable and what is not, change nothing)
//! and `salvage` (copy everything readable into a new database, move the
//! old one aside whole, and raise the id counter and the event sequence
//! above anything the damaged parts can have held).
//!
//! Salvage never edits or deletes a damaged file: the old `db/` moves to
//! `damaged-<unix seconds>/db` next to it, with a `SALVAGE.txt` saying what
//! was lost. Readable data comes from RocksDB itself, opened read-only in
//! its skip-corrupted-records mode (every readable write-ahead-log record is
//! replayed, damaged ones dropped); a table block that fails its checksum is
//! skipped by seeking past it. When the MANIFEST itself is unreadable,
//! RocksDB's repairer rebuilds one on a private copy of the files (it
//! recovers column families from their tables; write-ahead-log entries of a
//! family without any table are lost, which the report says).
//!
//! Ids are never reused: the new counters are the highest id and sequence
//! number read anywhere, plus an upper bound on what the unreadable parts
//! can have held (RocksDB sequence-number gaps, or damaged bytes over the
//! smallest size an id or event takes, in logs; entry counts of damaged
//! tables; sizes of tables the repairer set aside): every id and every
//! event took at least one RocksDB operation.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rocksdb::{DBRecoveryMode, LiveFile, Options, WriteBatch, WriteOptions, DB};

use super::index::{self, CF_INDEX};
use super::logfile::{self, LogKind, LogScan};
use super::{
    db_options, StoreError, ALL_CFS, CF_CHUNKS, CF_CODE, CF_EVENTS, CF_META, CF_OUTPUT, CF_RECORDS,
    FORMAT_VERSION, KEY_FORMAT_VERSION, KEY_LAST_SEQ, KEY_NEXT_ID, OLDEST_FORMAT_VERSION,
};

/// The fewest log bytes an id or an event can have taken: every id is a
/// put of `meta/next_id` (tag, column family, key length, 7-byte key, value
/// length, 8-byte value: 19 bytes) and every event a put of an 8-byte
/// sequence key with a non-empty value into `events` (at least 13 bytes).
/// Dividing damaged log bytes by it bounds the ids and events they held.
const MIN_OP_BYTES: u64 = 13;

/// The write-ahead logs (oldest first) and the current MANIFEST of `dir`.
fn log_files(dir: &Path) -> io::Result<(Vec<PathBuf>, Option<PathBuf>)> {
    let mut wals = Vec::new();
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "log") {
            wals.push(path);
        }
    }
    wals.sort();
    let manifest = fs::read_to_string(dir.join("CURRENT"))
        .ok()
        .map(|name| dir.join(name.trim()))
        .filter(|p| p.is_file());
    Ok((wals, manifest))
}

/// Reads every write-ahead log and the MANIFEST with `logfile`.
fn scan_logs(dir: &Path) -> io::Result<Vec<LogScan>> {
    let (wals, manifest) = log_files(dir)?;
    let mut out = Vec::new();
    if let Some(m) = manifest {
        out.push(logfile::scan(&m, LogKind::Manifest)?);
    }
    for w in wals {
        out.push(logfile::scan(&w, LogKind::Wal)?);
    }
    Ok(out)
}

/// The damaged logs of `dir`, one line each, for the start-up refusal.
pub(super) fn damaged_logs(dir: &Path) -> Vec<String> {
    match scan_logs(dir) {
        Ok(scans) => scans
            .iter()
            .filter(|s| s.is_damaged())
            .map(LogScan::describe)
            .collect(),
        Err(e) => vec![format!("cannot read {}: {e}", dir.display())],
    }
}

/// What reading one column family found.
struct CfWalk {
    name: String,
    entries: u64,
    bytes: u64,
    errors: Vec<String>,
    /// Entries the damaged tables can have held (an upper bound).
    lost_bound: u64,
}

/// The highest id and sequence number read, and the meta values.
#[derive(Default)]
struct Seen {
    max_id: u64,
    max_seq: u64,
    next_id: Option<u64>,
    last_seq: Option<u64>,
    format: Option<Vec<u8>>,
}

impl Seen {
    fn note(&mut self, cf: &str, k: &[u8], v: &[u8]) {
        let be8 = |b: &[u8]| -> Option<u64> { b.get(..8)?.try_into().ok().map(u64::from_be_bytes) };
        match cf {
            CF_RECORDS | CF_CODE | CF_OUTPUT | CF_CHUNKS => {
                if let Some(id) = be8(k) {
                    self.max_id = self.max_id.max(id);
                }
            }
            CF_EVENTS => {
                if let Some(seq) = be8(k) {
                    self.max_seq = self.max_seq.max(seq);
                }
            }
            CF_META if k == KEY_NEXT_ID => self.next_id = be8(v),
            CF_META if k == KEY_LAST_SEQ => self.last_seq = be8(v),
            CF_META if k == KEY_FORMAT_VERSION => self.format = Some(v.to_vec()),
            _ => {}
        }
    }
}

/// Options for reading a damaged database: read-only, every readable
/// log record replayed, RocksDB's own info log kept out of `dir`.
fn read_options(log_dir: &Path) -> Options {
    let mut opts = Options::default();
    opts.set_wal_recovery_mode(DBRecoveryMode::SkipAnyCorruptedRecord);
    opts.set_db_log_dir(log_dir);
    opts
}

fn open_read_only(dir: &Path, log_dir: &Path) -> Result<DB, rocksdb::Error> {
    let opts = read_options(log_dir);
    let names = DB::list_cf(&opts, dir)?;
    DB::open_cf_for_read_only(&opts, dir, names, false)
}

/// The file numbers (`000123.sst`) an error message names.
fn tables_named(msg: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in msg.match_indices(".sst") {
        let start = msg[..i]
            .rfind(|c: char| !c.is_ascii_digit())
            .map_or(0, |p| p + 1);
        if start < i {
            out.push(format!("{}.sst", &msg[start..i]));
        }
    }
    out
}

/// Key bytes as a number for bisection: the first 16 bytes, big-endian.
fn key_num(k: &[u8]) -> u128 {
    let mut b = [0u8; 16];
    let n = k.len().min(16);
    b[..n].copy_from_slice(&k[..n]);
    u128::from_be_bytes(b)
}

/// Whether a fresh iterator can be positioned at `key` without an error.
fn seekable(db: &DB, cf: &rocksdb::ColumnFamily, key: &[u8]) -> bool {
    let mut it = db.raw_iterator_cf(cf);
    it.seek(key);
    it.status().is_ok()
}

/// The smallest key above `after` (about: bisected on 16 bytes) at which
/// reading works again, or `None` when nothing after it is readable.
fn resume_point(
    db: &DB,
    cf: &rocksdb::ColumnFamily,
    files: &[&LiveFile],
    after: Option<&[u8]>,
) -> Option<Vec<u8>> {
    // Candidates: just past the end of each table of this family.
    let mut candidates: Vec<Vec<u8>> = files
        .iter()
        .filter_map(|f| f.end_key.clone())
        .map(|mut k| {
            k.push(0);
            k
        })
        .filter(|k| after.is_none_or(|a| k.as_slice() > a))
        .collect();
    candidates.sort();
    let hi = candidates.into_iter().find(|k| seekable(db, cf, k))?;
    let (mut lo_n, mut hi_n) = (after.map_or(0, key_num), key_num(&hi));
    while hi_n > lo_n + 1 {
        let mid = lo_n + (hi_n - lo_n) / 2;
        if seekable(db, cf, &mid.to_be_bytes()) {
            hi_n = mid;
        } else {
            lo_n = mid;
        }
    }
    let bisected = hi_n.to_be_bytes().to_vec();
    if after.is_none_or(|a| bisected.as_slice() > a) && seekable(db, cf, &bisected) {
        Some(bisected)
    } else {
        Some(hi)
    }
}

/// Reads every entry of one column family, skipping blocks that fail
/// their checksums; `visit` gets each readable entry in key order.
fn walk(db: &DB, name: &str, files: &[LiveFile], mut visit: impl FnMut(&[u8], &[u8])) -> CfWalk {
    let mut out = CfWalk {
        name: name.to_string(),
        entries: 0,
        bytes: 0,
        errors: Vec::new(),
        lost_bound: 0,
    };
    let Some(cf) = db.cf_handle(name) else {
        return out;
    };
    let mine: Vec<&LiveFile> = files
        .iter()
        .filter(|f| f.column_family_name == name)
        .collect();
    let mut damaged_tables: Vec<String> = Vec::new();
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_first();
    let mut last: Option<Vec<u8>> = None;
    loop {
        if let (Some(k), Some(v)) = (it.key(), it.value()) {
            out.entries += 1;
            out.bytes += (k.len() + v.len()) as u64;
            visit(k, v);
            last = Some(k.to_vec());
            it.next();
            continue;
        }
        let Err(e) = it.status() else { break };
        let msg = e.to_string();
        let named = tables_named(&msg);
        if named.is_empty() {
            // Unknown file: every table of this family may be the one.
            damaged_tables.extend(mine.iter().map(|f| f.name.clone()));
        }
        damaged_tables.extend(named);
        out.errors.push(msg);
        if out.errors.len() >= 1000 {
            out.errors
                .push("too many errors; stopped reading this column family".into());
            break;
        }
        match resume_point(db, cf, &mine, last.as_deref()) {
            Some(k) => {
                it = db.raw_iterator_cf(cf);
                it.seek(&k);
                // Never go back over what was already read.
                if let (Some(at), Some(prev)) = (it.key(), last.as_deref()) {
                    if at <= prev {
                        it.next();
                    }
                }
            }
            None => break,
        }
    }
    damaged_tables.sort();
    damaged_tables.dedup();
    for t in &damaged_tables {
        let base = t.trim_start_matches('/');
        out.lost_bound += mine
            .iter()
            .filter(|f| f.name.trim_start_matches('/') == base)
            .map(|f| f.num_entries + f.num_deletions)
            .sum::<u64>();
    }
    out
}

/// The outcome of `check`: lines for the operator, and whether anything
/// is damaged.
pub struct CheckReport {
    pub lines: Vec<String>,
    pub damaged: bool,
}

/// Reads every log and every table of the database in `dir` and reports
/// what is readable and what is not. Changes nothing in `dir` (RocksDB's
/// info log goes to a temporary folder).
pub fn check(dir: &Path) -> Result<CheckReport, StoreError> {
    let io = |e: io::Error| StoreError::Salvage(format!("{}: {e}", dir.display()));
    if !dir.join("CURRENT").exists() {
        return Err(StoreError::Salvage(format!(
            "{} holds no database (no CURRENT file)",
            dir.display()
        )));
    }
    let mut lines = Vec::new();
    let mut damaged = false;
    for s in scan_logs(dir).map_err(io)? {
        damaged |= s.is_damaged();
        lines.push(s.describe());
    }
    let log_dir = tempfile_dir()?;
    match open_read_only(dir, &log_dir) {
        Err(e) => {
            damaged = true;
            lines.push(format!(
                "RocksDB cannot open it even skipping damaged log records: {e}"
            ));
        }
        Ok(db) => {
            let files = db.live_files().unwrap_or_default();
            for f in &files {
                lines.push(format!(
                    "table {} ({}, level {}): {} bytes, {} entries",
                    f.name, f.column_family_name, f.level, f.size, f.num_entries
                ));
            }
            let mut seen = Seen::default();
            for name in ALL_CFS {
                let w = walk(&db, name, &files, |k, v| seen.note(name, k, v));
                damaged |= !w.errors.is_empty();
                lines.push(describe_walk(&w));
            }
            lines.push(describe_seen(&seen));
        }
    }
    let _ = fs::remove_dir_all(&log_dir);
    lines.push(if damaged {
        "result: DAMAGED. `cyrneld --salvage` keeps what is readable and moves the damaged files aside.".into()
    } else {
        "result: every log and table is readable.".into()
    });
    Ok(CheckReport { lines, damaged })
}

fn describe_walk(w: &CfWalk) -> String {
    let mut s = format!(
        "column family {}: {} entries readable ({} bytes)",
        w.name, w.entries, w.bytes
    );
    for e in &w.errors {
        s.push_str(&format!("; UNREADABLE: {e}"));
    }
    s
}

fn describe_seen(seen: &Seen) -> String {
    format!(
        "highest id read {}, next_id {}, highest event read {}, last_seq {}",
        seen.max_id,
        seen.next_id.map_or("absent".into(), |n| n.to_string()),
        seen.max_seq,
        seen.last_seq.map_or("absent".into(), |n| n.to_string()),
    )
}

fn tempfile_dir() -> Result<PathBuf, StoreError> {
    let dir = std::env::temp_dir().join(format!("cyrneld-check-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|e| StoreError::Salvage(format!("{}: {e}", dir.display())))?;
    Ok(dir)
}

/// Holds RocksDB's lock file of a database, so no daemon can open it
/// while a salvage runs (and a running daemon makes the salvage refuse).
struct DbLock {
    /// Held open: closing it releases the lock.
    _file: fs::File,
}

fn lock(dir: &Path) -> Result<Option<DbLock>, StoreError> {
    let path = dir.join("LOCK");
    let file = match fs::OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StoreError::Salvage(format!("{}: {e}", path.display()))),
    };
    // The same kind of lock RocksDB takes (fcntl, whole file, write).
    // SAFETY: libc::flock is a struct of integers: all-zero bytes are a
    // valid value (l_start 0 and l_len 0: the whole file).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as _;
    fl.l_whence = libc::SEEK_SET as _;
    // SAFETY: `file` is open for the whole call (borrowed here), and
    // F_SETLK reads one struct flock through the pointer, to `fl`, a live
    // local of this frame.
    let rc = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_SETLK, &fl) };
    if rc != 0 {
        return Err(StoreError::Salvage(format!(
            "{} is locked: a cyrneld is running on this data dir; stop it first",
            dir.display()
        )));
    }
    Ok(Some(DbLock { _file: file }))
}

/// The outcome of `salvage`.
pub struct SalvageReport {
    pub lines: Vec<String>,
    /// Where the damaged database was moved; `None` when nothing was
    /// damaged and nothing changed.
    pub aside: Option<PathBuf>,
}

/// Rebuilds `data_dir/db` from what is readable (see the module doc).
pub fn salvage(data_dir: &Path) -> Result<SalvageReport, StoreError> {
    let dir = data_dir.join("db");
    let err = |what: &str, e: &dyn std::fmt::Display| StoreError::Salvage(format!("{what}: {e}"));
    let lock_guard = lock(&dir)?;
    let before = check(&dir)?;
    if !before.damaged {
        let mut lines = before.lines;
        lines.push("nothing is damaged: nothing changed".into());
        return Ok(SalvageReport { lines, aside: None });
    }
    let mut lines = vec!["before the salvage:".to_string()];
    lines.extend(before.lines.iter().map(|l| format!("  {l}")));
    let wal_lost: u64 = scan_logs(&dir)
        .map_err(|e| err("reading the logs", &e))?
        .iter()
        .filter(|s| s.kind == LogKind::Wal)
        .map(|s| s.lost_ops_bound(MIN_OP_BYTES))
        .sum();

    let log_dir = tempfile_dir()?;
    let work = data_dir.join("db.repair-work");
    let (old, mut lost, repaired) = match open_read_only(&dir, &log_dir) {
        Ok(db) => (db, wal_lost, false),
        Err(e) => {
            lines.push(format!(
                "RocksDB cannot open the database ({e}); rebuilding its MANIFEST from the table files on a copy"
            ));
            let _ = fs::remove_dir_all(&work);
            copy_dir(&dir, &work).map_err(|e| err("copying the database for repair", &e))?;
            let mut opts = read_options(&log_dir);
            opts.create_if_missing(false);
            DB::repair(&opts, &work).map_err(|e| err("RocksDB repair", &e))?;
            let set_aside: u64 = fs::read_dir(work.join("lost"))
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "sst"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum();
            if set_aside > 0 {
                lines.push(format!(
                    "the repairer set aside unreadable tables ({set_aside} bytes)"
                ));
            }
            let db = open_read_only(&work, &log_dir)
                .map_err(|e| err("opening the repaired copy", &e))?;
            (db, wal_lost + set_aside, true)
        }
    };

    // Copy every readable entry into a new database beside the old one.
    let fresh = data_dir.join("db.salvage");
    let _ = fs::remove_dir_all(&fresh);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&fresh)
        .map_err(|e| err("creating the new database", &e))?;
    let memory = super::Memory::new(super::DEFAULT_MEMORY_BYTES);
    let new = DB::open_cf_descriptors(&db_options(&memory), &fresh, super::cf_descriptors(&memory))
        .map_err(|e| err("creating the new database", &e))?;
    let files = old.live_files().unwrap_or_default();
    let mut seen = Seen::default();
    let mut failure: Option<rocksdb::Error> = None;
    // Everything but the list index, which is built anew from the records
    // kept (it may describe records that were lost).
    for name in ALL_CFS.into_iter().filter(|n| *n != CF_INDEX) {
        let cf_new = new.cf_handle(name).expect("column family exists");
        let mut wb = WriteBatch::default();
        let w = walk(&old, name, &files, |k, v| {
            seen.note(name, k, v);
            wb.put_cf(cf_new, k, v);
            if wb.len() >= 1024 {
                if let Err(e) = new.write(std::mem::take(&mut wb)) {
                    failure.get_or_insert(e);
                }
            }
        });
        if let Err(e) = new.write(wb) {
            failure.get_or_insert(e);
        }
        lost += w.lost_bound;
        lines.push(format!("kept: {}", describe_walk(&w)));
    }
    drop(old);
    if let Some(e) = failure {
        return Err(err("writing the new database", &e));
    }
    if let Some(f) = &seen.format {
        let version = <[u8; 4]>::try_from(&f[..]).map(u32::from_be_bytes);
        if !version.is_ok_and(|v| (OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&v)) {
            return Err(StoreError::Salvage(format!(
                "the readable part says format version {f:02x?}; this cyrneld salvages versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}"
            )));
        }
    }
    let built = index::build(&new).map_err(|e| err("building the list index", &e))?;
    lines.push(format!(
        "list index built from the {} records kept",
        built.records
    ));
    for skipped in &built.skipped {
        lines.push(format!(
            "not in the list index (does not decode): {skipped}"
        ));
    }
    let next_id = seen
        .next_id
        .unwrap_or(1)
        .max(seen.max_id + 1)
        .saturating_add(lost);
    let last_seq = seen
        .last_seq
        .unwrap_or(0)
        .max(seen.max_seq)
        .saturating_add(lost);
    lines.push(describe_seen(&seen));
    lines.push(format!(
        "unreadable parts can have held at most {lost} operations: next id {next_id}, last event sequence {last_seq} (ids and events are never reused)"
    ));
    let meta = new.cf_handle(CF_META).expect("meta cf");
    let mut wb = WriteBatch::default();
    wb.put_cf(meta, index::KEY_CLASS_COUNTS, built.counts.encode());
    wb.put_cf(meta, KEY_FORMAT_VERSION, FORMAT_VERSION.to_be_bytes());
    wb.put_cf(meta, KEY_NEXT_ID, next_id.to_be_bytes());
    wb.put_cf(meta, KEY_LAST_SEQ, last_seq.to_be_bytes());
    let mut wo = WriteOptions::default();
    wo.set_sync(true);
    new.write_opt(wb, &wo)
        .map_err(|e| err("writing the new counters", &e))?;
    for name in ALL_CFS {
        new.flush_cf(new.cf_handle(name).expect("cf"))
            .map_err(|e| err("flushing the new database", &e))?;
    }
    drop(new);

    // Swap: the old database moves aside whole, the new one takes its place.
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let aside = data_dir.join(format!("damaged-{stamp}"));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&aside)
        .map_err(|e| err("creating the folder for the damaged files", &e))?;
    drop(lock_guard);
    fs::rename(&dir, aside.join("db")).map_err(|e| err("moving the damaged database aside", &e))?;
    fs::rename(&fresh, &dir).map_err(|e| err("putting the new database in place", &e))?;
    if repaired {
        let _ = fs::remove_dir_all(&work);
    }
    let _ = fs::remove_dir_all(&log_dir);
    fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| err("syncing the data dir", &e))?;
    lines.push(format!(
        "the damaged database was moved, unchanged, to {}",
        aside.join("db").display()
    ));
    let _ = fs::write(aside.join("SALVAGE.txt"), lines.join("\n") + "\n");
    Ok(SalvageReport {
        lines,
        aside: Some(aside),
    })
}

/// Copies the regular files of `from` into a new folder `to`.
fn copy_dir(from: &Path, to: &Path) -> io::Result<()> {
    fs::DirBuilder::new().mode(0o700).create(to)?;
    for e in fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_file() && e.file_name() != "LOCK" {
            fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_found_in_rocksdb_messages() {
        assert_eq!(
            tables_named("Corruption: block checksum mismatch: stored = 1, computed = 2, type = 1  in /x/db/000012.sst offset 0 size 90"),
            vec!["000012.sst"]
        );
        assert!(tables_named("Corruption: checksum mismatch").is_empty());
    }
}
