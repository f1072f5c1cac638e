//! Start-up against a data dir the daemon must not use: a database another
//! cyrneld holds, or one it cannot read. The daemon stops with a clear
//! message and never repairs or wipes what it found. And a full disk: new
//! work is refused with 507, reads and running work go on, and the daemon
//! recovers by itself when space returns (a size-limited tmpfs mounted by
//! the test; CI runs as root).

use std::fs;

use crate::support::*;

fn start_args(dir: &str) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("127.0.0.1:{}", free_port()),
        "--data-dir".into(),
        dir.into(),
    ]
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let d = Daemon::start();
    let id = d.create_code("echo kept");
    d.wait_idle(id);
    let args = start_args(&d.data_dir().display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, out) = run_to_exit(&args, &[]);
    assert!(!status.success(), "a second daemon must not start: {out}");
    assert!(out.contains("cannot open the database"), "{out}");
    // The first daemon and its data are unaffected.
    assert_eq!(d.get("/health").status, 200);
    assert_eq!(d.stdout_text(id), "kept\n");
}

#[test]
fn an_unreadable_database_stops_the_daemon_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db");
    fs::create_dir_all(&db).unwrap();
    let garbage = "MANIFEST-424242\n";
    fs::write(db.join("CURRENT"), garbage).unwrap();
    let args = start_args(&dir.path().display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, out) = run_to_exit(&args, &[]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("cannot open the database"), "{out}");
    assert_eq!(fs::read_to_string(db.join("CURRENT")).unwrap(), garbage);
    // RocksDB's own LOCK and LOG files may appear; nothing else changes.
    for e in fs::read_dir(&db).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        assert!(
            ["CURRENT", "LOCK", "LOG"].contains(&name.as_str()),
            "unexpected file {name}"
        );
    }
}

#[test]
fn a_data_dir_that_is_a_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    fs::write(&file, "x").unwrap();
    let args = start_args(&file.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, out) = run_to_exit(&args, &[]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("cannot prepare the data dir"), "{out}");
    assert_eq!(fs::read_to_string(&file).unwrap(), "x");
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// A tmpfs of `size` with an empty `data/` in it for a daemon.
    fn with_data_dir(size: &str) -> (Tmpfs, std::path::PathBuf) {
        let fs_ = Tmpfs::mount(size);
        let data = fs_.dir.path().join("data");
        fs::create_dir(&data).unwrap();
        (fs_, data)
    }

    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mounting a tmpfs needs root (CI runs as root): {st}"
        );
        Tmpfs { dir }
    }

    fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(self.dir.path()).expect("statvfs");
        st.blocks_available() * st.fragment_size()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn a_full_disk_refuses_new_work_keeps_reads_and_recovers_by_itself() {
    let (fs_, data) = Tmpfs::with_data_dir("64m");
    let reserve: u64 = 8 << 20;
    let mut d = Daemon::options()
        .data_dir(&data)
        .env("CYRNEL_STORAGE_RESERVE_BYTES", &reserve.to_string())
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "0")
        .start();
    let done = d.create_code("echo before");
    d.wait_idle(done);
    let running = d.create_code("sleep 300");
    let pid = d.wait_running_pid(running);
    let mut accepted = vec![done, running];

    // Leave less free space than the reserve: a quarter of it, since the
    // first refusal makes the daemon flush and drop its old write-ahead log
    // (preallocated, about half the reserve here), which gives some back.
    let filler = fs_.dir.path().join("filler");
    let fill = fs_.free_bytes() - reserve / 4;
    fs::write(&filler, vec![0u8; fill as usize]).unwrap();
    assert!(fs_.free_bytes() < reserve);

    // New work is refused, exactly as the contract's extension says...
    d.post("/processes", r#"{"code":"echo no"}"#)
        .assert_error(507, "Storage is full.");
    d.run(done, r#"{"force":true}"#)
        .assert_error(507, "Storage is full.");
    // ...reads keep working...
    assert_eq!(d.record(done)["exitState"].as_str(), Some("success"));
    assert_eq!(d.stdout_text(done), "before\n");
    assert_eq!(d.list_ids(""), vec![running, done]);
    // ...and running work is still put down and recorded.
    let r = d.kill(running);
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(d.wait_idle(running)["exitState"].as_str(), Some("canceled"));
    assert_group_gone(pid);
    assert_eq!(
        d.record(done)["exitState"].as_str(),
        Some("success"),
        "the refused rerun changed nothing"
    );

    // Space returns: writes succeed again without a restart.
    fs::remove_file(&filler).unwrap();
    let after = d.create_code("echo after");
    d.wait_idle(after);
    accepted.push(after);

    // Nothing of the refused requests reached the disk.
    d.restart_same_dir();
    let mut ids = d.list_ids("");
    ids.sort();
    accepted.sort();
    assert_eq!(ids, accepted);
    assert_eq!(d.stdout_text(after), "after\n");
    d.stop_gracefully();
}

// ---------------------------------------------------------------------------
// Damaged files: the daemon refuses to start and names the file; `--check`
// reports and changes nothing; `--salvage` keeps what is readable, moves
// the damaged database aside and never lets an id be handed out twice.
// ---------------------------------------------------------------------------

/// Every file of a RocksDB directory but its own info logs and lock, with
/// its size and a hash of its bytes: what "nothing changed" compares.
fn db_files(db: &std::path::Path) -> std::collections::BTreeMap<String, (usize, u64)> {
    fs::read_dir(db)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| !n.starts_with("LOG") && n != "LOCK")
        .map(|n| {
            let bytes = fs::read(db.join(&n)).unwrap();
            let mut h = std::collections::hash_map::DefaultHasher::new();
            std::hash::Hasher::write(&mut h, &bytes);
            (n, (bytes.len(), std::hash::Hasher::finish(&h)))
        })
        .collect()
}

/// The files of `db` whose names end with `suffix` (or start with it, for
/// `MANIFEST`), oldest first.
fn files_named(db: &std::path::Path, suffix: &str) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.ends_with(suffix) || n.starts_with(suffix)
        })
        .collect();
    v.sort();
    v
}

fn flip(path: &std::path::Path, range: std::ops::Range<usize>) {
    let mut bytes = fs::read(path).unwrap();
    assert!(
        bytes.len() >= range.end,
        "{} has {} bytes, fewer than {}",
        path.display(),
        bytes.len(),
        range.end
    );
    for b in &mut bytes[range] {
        *b ^= 0xff;
    }
    fs::write(path, bytes).unwrap();
}

fn cyrneld_on(data: &std::path::Path, extra: &[&str]) -> (std::process::ExitStatus, String) {
    let mut args = start_args(&data.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_to_exit(&args, &[])
}

/// Three processes, each printing 40 KB (so the write-ahead log spans
/// several 32 KiB blocks), all settled; the daemon is stopped.
fn three_settled_processes(restart_between: bool) -> (Daemon, Vec<i64>) {
    let mut d = Daemon::start();
    let mut ids = Vec::new();
    for i in 0..3 {
        let id = d.create_code(&format!("head -c 40000 /dev/zero | tr '\\0' {i}"));
        d.wait_idle(id);
        ids.push(id);
    }
    if restart_between {
        // A start flushes the recovered log into tables.
        d.restart_same_dir();
    }
    d.stop_gracefully();
    (d, ids)
}

/// Start refuses with a message naming `needle` (a refusal at open changes
/// nothing; one at the first read of a damaged table comes after RocksDB
/// opened, which replays and flushes the log, but leaves the damaged file as
/// it was); `--check` reports the damage and changes nothing; `--salvage`
/// succeeds and moves the old database aside unchanged. Returns the
/// salvage's output.
fn refuse_check_salvage(d: &Daemon, needle: &str, refused_at_open: bool) -> String {
    let data = d.data_dir().to_path_buf();
    let db = data.join("db");
    let before = db_files(&db);

    let (status, out) = cyrneld_on(&data, &[]);
    assert_eq!(
        status.code(),
        Some(1),
        "a damaged database must stop the daemon: {out}"
    );
    assert!(out.contains(needle), "the refusal names {needle}: {out}");
    assert!(out.contains("damaged"), "{out}");
    assert!(
        out.contains("cyrneld --check") && out.contains("cyrneld --salvage"),
        "{out}"
    );
    let damaged = db_files(&db);
    if refused_at_open {
        assert_eq!(damaged, before, "a refused start changes nothing");
    } else {
        assert_eq!(
            damaged.get(needle),
            before.get(needle),
            "the damaged file is untouched"
        );
    }

    let (status, out) = cyrneld_on(&data, &["--check"]);
    assert_eq!(status.code(), Some(1), "--check exits 1 on damage: {out}");
    assert!(out.contains(needle) && out.contains("DAMAGED"), "{out}");
    assert_eq!(db_files(&db), damaged, "--check changes nothing");

    let (status, out) = cyrneld_on(&data, &["--salvage"]);
    assert_eq!(status.code(), Some(0), "--salvage: {out}");
    let aside: Vec<_> = fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert_eq!(
        db_files(&aside[0].join("db")),
        damaged,
        "the damaged files are kept, byte for byte"
    );
    assert!(aside[0].join("SALVAGE.txt").is_file());

    let (status, out2) = cyrneld_on(&data, &["--check"]);
    assert_eq!(
        status.code(),
        Some(0),
        "the salvaged database reads whole: {out2}"
    );
    out
}

/// After a salvage: every listed record is one of `ids` and a new create
/// gets an id above all of them.
fn ids_continue_above(d: &mut Daemon, ids: &[i64]) -> Vec<i64> {
    d.restart_same_dir();
    let listed = d.list_ids("");
    for id in &listed {
        assert!(
            ids.contains(id),
            "record {id} was never created: {listed:?}"
        );
    }
    let new = d.create_code("echo new");
    assert!(
        new > *ids.iter().max().unwrap(),
        "id {new} handed out again (old ids {ids:?})"
    );
    d.wait_idle(new);
    assert_eq!(d.stdout_text(new), "new\n");
    d.stop_gracefully();
    listed
}

#[test]
fn a_log_damaged_in_the_middle_refuses_start_and_salvage_keeps_the_rest() {
    let (mut d, ids) = three_settled_processes(false);
    let db = d.data_dir().join("db");
    let wal = files_named(&db, ".log").pop().expect("a write-ahead log");
    flip(&wal, 100..400);
    let name = wal.file_name().unwrap().to_str().unwrap().to_string();
    let out = refuse_check_salvage(&d, &name, true);
    assert!(out.contains("checksum mismatch"), "{out}");
    let listed = ids_continue_above(&mut d, &ids);
    // What followed the damaged block was replayed.
    assert!(listed.contains(&ids[2]), "{listed:?}\n{out}");
}

#[test]
fn a_torn_log_tail_is_dropped_and_the_daemon_starts() {
    let (mut d, ids) = three_settled_processes(false);
    let db = d.data_dir().join("db");
    let wal = files_named(&db, ".log").pop().expect("a write-ahead log");
    let len = fs::metadata(&wal).unwrap().len();
    // The last write never completed: its record is cut short.
    fs::OpenOptions::new()
        .write(true)
        .open(&wal)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    d.restart_same_dir();
    let listed = d.list_ids("");
    assert!(
        listed.contains(&ids[0]) && listed.contains(&ids[1]),
        "{listed:?}"
    );
    let new = d.create_code("echo new");
    assert!(new > ids[2], "id {new} reused");
    d.stop_gracefully();
}

#[test]
fn a_damaged_table_refuses_start_and_salvage_never_reuses_an_id() {
    let (mut d, ids) = three_settled_processes(true);
    let db = d.data_dir().join("db");
    // The records table: the one whose properties name that column family.
    let table = files_named(&db, ".sst")
        .into_iter()
        .find(|p| {
            let b = fs::read(p).unwrap();
            b.windows(7).any(|w| w == b"records")
        })
        .expect("a table of the records column family");
    flip(&table, 10..30);
    let name = table.file_name().unwrap().to_str().unwrap().to_string();
    refuse_check_salvage(&d, &name, false);
    ids_continue_above(&mut d, &ids);
}

#[test]
fn a_damaged_manifest_refuses_start_and_salvage_rebuilds_from_the_tables() {
    let (mut d, ids) = three_settled_processes(true);
    let db = d.data_dir().join("db");
    let current = fs::read_to_string(db.join("CURRENT")).unwrap();
    let manifest = db.join(current.trim());
    flip(&manifest, 20..60);
    refuse_check_salvage(&d, current.trim(), true);
    let listed = ids_continue_above(&mut d, &ids);
    assert_eq!(listed.len(), 3, "the tables held every record: {listed:?}");
}

// ---------------------------------------------------------------------------
// Space comes back: deletes reclaim disk without a restart.
// ---------------------------------------------------------------------------

/// Bytes of the files under `dir`. The daemon runs while this walks:
/// RocksDB removes obsolete files at any time, so an entry that is gone by
/// the time it is looked at counts as nothing.
fn du(dir: &std::path::Path) -> u64 {
    let gone = |e: &std::io::Error| e.kind() == std::io::ErrorKind::NotFound;
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if gone(&e) => return 0,
        Err(e) => panic!("{}: {e}", dir.display()),
    };
    let mut total = 0;
    for e in entries.flatten() {
        let m = match e.metadata() {
            Ok(m) => m,
            Err(err) if gone(&err) => continue,
            Err(err) => panic!("{}: {err}", e.path().display()),
        };
        total += if m.is_dir() { du(&e.path()) } else { m.len() };
    }
    total
}

#[test]
fn deleting_records_below_the_reserve_gives_space_back_and_creates_succeed_again() {
    let (fs_, data) = Tmpfs::with_data_dir("48m");
    let reserve: u64 = 8 << 20;
    let mut d = Daemon::options()
        .data_dir(&data)
        .env("CYRNEL_STORAGE_RESERVE_BYTES", &reserve.to_string())
        .start();
    // Runs printing 4 MB each until the disk is below the reserve.
    let mut ids: Vec<i64> = Vec::new();
    poll("creates to be refused with 507", || {
        let r = d.post("/processes", r#"{"code":"head -c 4000000 /dev/zero"}"#);
        match r.status {
            201 => {
                let id = r.json()["id"].as_i64().unwrap();
                d.wait_idle(id);
                ids.push(id);
                Err(format!(
                    "{} runs accepted, {} bytes free",
                    ids.len(),
                    fs_.free_bytes()
                ))
            }
            507 => Ok(()),
            _ => panic!("unexpected answer {r}"),
        }
    });
    assert!(ids.len() >= 3, "{ids:?}");
    let full = du(&data);

    // Delete every record through the API: no restart.
    for id in &ids {
        let r = d.delete(&format!("/processes/{id}"));
        assert_eq!(r.status, 200, "{r}");
    }
    let again = poll("a create to succeed after the deletes", || {
        let r = d.post("/processes", r#"{"code":"echo again"}"#);
        match r.status {
            201 => Ok(r.json()["id"].as_i64().unwrap()),
            507 => Err(format!(
                "507; {} bytes free, data dir {} bytes",
                fs_.free_bytes(),
                du(&data)
            )),
            _ => panic!("unexpected answer {r}"),
        }
    });
    assert!(again > *ids.iter().max().unwrap(), "ids are never reused");
    d.wait_idle(again);
    assert_eq!(d.stdout_text(again), "again\n");
    // The deleted records' tables are compacted away in the background.
    let after = poll("the data dir to shrink to a tenth", || {
        let now = du(&data);
        if now * 10 < full {
            Ok(now)
        } else {
            Err(format!("{full} bytes full, {now} now"))
        }
    });
    eprintln!(
        "{} runs of 4 MB filled the disk to {full} bytes; {after} bytes after deleting them",
        ids.len()
    );
    d.restart_same_dir();
    assert_eq!(d.list_ids(""), vec![again]);
    d.stop_gracefully();
}

// ---------------------------------------------------------------------------
// Retention: idle records beyond a count go, oldest first, through DELETE's
// own path (a `deleted` event each).
// ---------------------------------------------------------------------------

#[test]
fn retention_deletes_the_oldest_idle_records_beyond_the_count() {
    let d = Daemon::options()
        .env("CYRNEL_RETENTION_MAX_RECORDS", "2")
        .start();
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = d.create_code(&format!("echo {i}"));
        d.wait_idle(id);
        ids.push(id);
    }
    let kept = poll("retention to keep the two newest", || {
        let listed = d.list_ids("");
        if listed.len() == 2 {
            Ok(listed)
        } else {
            Err(format!("{listed:?}"))
        }
    });
    assert_eq!(kept, vec![ids[4], ids[3]]);
    assert_eq!(d.stdout_text(ids[4]), "4\n");
    let r = d.get(&format!("/processes/{}", ids[0]));
    assert_eq!(r.status, 404, "{r}");
}

#[test]
fn retention_deletes_idle_records_past_the_age_and_keeps_running_ones() {
    // 1 ms: every record is past the age as soon as it is idle.
    let d = Daemon::options()
        .env("CYRNEL_RETENTION_MAX_AGE_MS", "1")
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "0")
        .start();
    let running = d.create_code("exec sleep 600");
    let pid = d.wait_running_pid(running);
    let quick: Vec<i64> = (0..3)
        .map(|i| d.create_code(&format!("echo {i}")))
        .collect();
    for id in &quick {
        poll(&format!("retention to delete idle record {id}"), || match d
            .get(&format!("/processes/{id}"))
            .status
        {
            404 => Ok(()),
            s => Err(format!("status {s}")),
        });
    }
    // The running record is never a victim, however old.
    assert_eq!(d.record(running)["state"].as_str(), Some("running"));
    assert!(is_alive(pid));
    assert_eq!(d.kill(running).status, 200);
    poll(
        "retention to delete the killed record once idle",
        || match d.get(&format!("/processes/{running}")).status {
            404 => Ok(()),
            s => Err(format!("status {s}")),
        },
    );
    assert_group_gone(pid);
}

#[test]
fn metrics_show_the_storage_memory_and_need_the_key() {
    let d = Daemon::options().api_key("metrics-key").start();
    for i in 0..3 {
        let id = d.create_code(&format!("echo {i}"));
        d.wait_idle(id);
    }
    d.raw("GET", "/metrics", &[], None)
        .assert_error(401, "Unauthorized");
    let r = d.get("/metrics");
    assert_eq!(r.status, 200, "{r}");
    let text = r.text();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .parse()
            .unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    assert_eq!(
        value("cyrnel_storage_memory_budget_bytes"),
        (32u64 << 20) as f64
    );
    assert!(value("cyrnel_storage_memtable_bytes") > 0.0, "{text}");
    assert!(value("cyrnel_storage_block_cache_bytes") >= 0.0, "{text}");
    assert_eq!(value("cyrnel_sandbox_level{level=\"full\"}"), 1.0, "{text}");
}

// ---------------------------------------------------------------------------
// Online backup: a consistent copy while runs go on, that a daemon starts
// from with every record that was durable, and ids continuing above them.
// ---------------------------------------------------------------------------

const CTL: &str = env!("CARGO_BIN_EXE_cyrnelctl");

#[test]
fn an_online_backup_holds_every_durable_record_and_ids_continue_above_them() {
    let key = "backup-test-key";
    let mut d = Daemon::options().api_key(key).start();
    let mut done = Vec::new();
    for i in 0..3 {
        let id = d.create_code(&format!("echo kept-{i}"));
        d.wait_idle(id);
        done.push(id);
    }
    // Runs go on while the backup is taken.
    let running = d.create_code("while :; do echo tick; sleep 0.01; done");
    d.wait_running_pid(running);

    let parent = tempfile::tempdir().unwrap();
    fs::set_permissions(
        parent.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let target = parent.path().join("copy");
    // Authenticated like every route.
    let r = d.raw(
        "POST",
        "/backup",
        &[("Content-Type", "application/json")],
        Some(format!(r#"{{"dir":{}}}"#, js(target.to_str().unwrap())).as_bytes()),
    );
    assert_eq!(r.status, 401, "{r}");
    // A shared parent is refused.
    let r = d.post("/backup", r#"{"dir":"/tmp/cyrnel-backup-refused"}"#);
    assert_eq!(r.status, 400, "{r}");

    let out = std::process::Command::new(CTL)
        .env("CYRNEL_URL", format!("http://127.0.0.1:{}", d.port()))
        .env("CYRNEL_API_KEY", key)
        .arg("backup")
        .arg(&target)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let next_id: i64 = stdout
        .split_whitespace()
        .skip_while(|w| *w != "id")
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("next id in {stdout:?}"));
    assert_eq!(next_id, running + 1, "{stdout}");
    // The same dir twice is refused: a backup never overwrites.
    let r = d.post(
        "/backup",
        &format!(r#"{{"dir":{}}}"#, js(target.to_str().unwrap())),
    );
    assert_eq!(r.status, 400, "{r}");

    // Work after the backup is not in it.
    let later = d.create_code("echo later");
    d.wait_idle(later);
    d.kill(running);
    d.wait_idle(running);
    d.stop_gracefully();

    let mut b = Daemon::options().api_key(key).data_dir(&target).start();
    let listed = b.list_ids("");
    let mut expected = done.clone();
    expected.push(running);
    expected.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(
        got, expected,
        "every record durable at the backup, nothing later"
    );
    for (i, id) in done.iter().enumerate() {
        assert_eq!(b.stdout_text(*id), format!("kept-{i}\n"));
    }
    // The run that was going on settles (its process is not the copy's).
    let rec = b.wait_idle(running);
    assert!(rec["exitState"].as_str().is_some(), "{rec}");
    let new = b.create_code("echo on-the-copy");
    assert_eq!(new, next_id, "ids continue above the copy's");
    b.wait_idle(new);
    b.stop_gracefully();
}
