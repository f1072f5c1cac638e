//! Lists by state, exit state and ref come from an index the store keeps
//! beside the records (format version 2). These tests compare every
//! filtered list with the same filter applied by hand to the full list,
//! after each kind of write the daemon makes (create, run, kill, delete,
//! retention, recovery after a crash, salvage), and start the daemon on a
//! data dir written by the previous release (format version 1, kept as a
//! fixture), which it upgrades in place once.

use std::fs;
use std::path::Path;

use crate::support::*;

const STATES: [&str; 4] = ["queued", "running", "terminating", "idle"];
const STATUSES: [&str; 5] = ["null", "success", "failed", "timeout", "canceled"];

/// One record as a list shows it: (id, state, exitState, ref).
type Row = (i64, String, Option<String>, Option<String>);

fn rows(list: &Json) -> Vec<Row> {
    list["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| {
            (
                p["id"].as_i64().expect("id"),
                p["state"].as_str().expect("state").to_string(),
                p["exitState"].as_str().map(str::to_string),
                p["ref"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn pct(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every filter combination (state × status × ref, each possibly absent)
/// answers exactly the records of the full list it matches, in the same
/// order, whole and in pages. The daemon must be still (nothing changing)
/// while this runs.
#[track_caller]
fn assert_lists_agree(d: &Daemon, refs: &[&str]) {
    let all = rows(&d.list(""));
    let states = std::iter::once(None).chain(STATES.map(Some));
    let mut checked = 0;
    for state in states {
        let statuses = std::iter::once(None).chain(STATUSES.map(Some));
        for status in statuses {
            let with_refs = std::iter::once(None)
                .chain(refs.iter().copied().map(Some))
                .chain([Some("no-such-ref")]);
            for rf in with_refs {
                let mut q = Vec::new();
                if let Some(s) = state {
                    q.push(format!("state={s}"));
                }
                if let Some(s) = status {
                    q.push(format!("status={s}"));
                }
                if let Some(r) = rf {
                    q.push(format!("ref={}", pct(r)));
                }
                let want: Vec<i64> = all
                    .iter()
                    .filter(|(_, st, ex, r)| {
                        state.is_none_or(|s| st == s)
                            && status.is_none_or(|s| ex.as_deref() == (s != "null").then_some(s))
                            && rf.is_none_or(|f| r.as_deref() == Some(f))
                    })
                    .map(|r| r.0)
                    .collect();
                let q = q.join("&");
                assert_eq!(d.list_ids(&q), want, "GET /processes?{q}; all: {all:?}");
                // The same in pages of two, following the cursor.
                let mut paged = Vec::new();
                let mut cursor: Option<String> = None;
                loop {
                    let mut pq = format!("{q}&limit=2");
                    if let Some(c) = &cursor {
                        pq.push_str(&format!("&cursor={c}"));
                    }
                    let page = d.list(&pq);
                    paged.extend(ids_of(&page));
                    match page["nextCursor"].as_str() {
                        Some(c) => cursor = Some(c.to_string()),
                        None => break,
                    }
                }
                assert_eq!(paged, want, "pages of GET /processes?{q}");
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
    assert!(
        !d.logs().contains("list index:"),
        "the index found an inconsistency: {}",
        d.logs()
    );
}

fn ref_field(i: usize) -> &'static str {
    match i % 3 {
        0 => r#","ref":"a""#,
        1 => r#","ref":"b b""#,
        _ => "",
    }
}

const REFS: [&str; 2] = ["a", "b b"];

/// A script that waits for `release`, saying it is ready first.
fn hold(ready: &Path, release: &Path) -> String {
    format!(
        ": > {}\nwhile [ ! -f {} ]; do sleep 0.01; done\n",
        sq(ready),
        sq(release)
    )
}

#[test]
fn filtered_lists_match_a_full_scan_through_every_kind_of_write() {
    let m = marker_dir();
    let mut d = Daemon::options()
        .env("CYRNEL_MAX_RUNNING", "2")
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "0")
        .start();

    // Idle records that never ran, two of them deleted.
    let never: Vec<i64> = (0..6)
        .map(|i| {
            d.create(&format!(
                r#"{{"code":"true","autorun":false{}}}"#,
                ref_field(i)
            ))
        })
        .collect();
    for id in &never[..2] {
        assert_eq!(d.delete(&format!("/processes/{id}")).status, 200);
    }
    // Finished runs: success, failed, timeout.
    let mut done = Vec::new();
    for i in 0..4 {
        let code = format!(r#"{{"code":"exit {}"{}}}"#, i % 2, ref_field(i));
        done.push(d.create(&code));
    }
    done.push(d.create(r#"{"code":"sleep 30","options":{"timeout":50},"ref":"a"}"#));
    for id in &done {
        d.wait_idle(*id);
    }
    assert_eq!(
        d.record(done[4])["exitState"].as_str(),
        Some("timeout"),
        "{}",
        d.record(done[4])
    );

    // Both slots held: one running, one terminating (its TERM handler
    // waits for a release file; the long grace keeps SIGKILL away).
    let (ready1, release1) = (m.path().join("ready1"), m.path().join("release1"));
    let running = d.create(&format!(
        r#"{{"code":{},"ref":"a"}}"#,
        js(&hold(&ready1, &release1))
    ));
    let (ready2, release2) = (m.path().join("ready2"), m.path().join("release2"));
    let term_code = format!(
        "trap 'while [ ! -f {rel} ]; do sleep 0.01; done; exit 0' TERM\n: > {rdy}\nsleep 300\n",
        rel = sq(&release2),
        rdy = sq(&ready2)
    );
    let terminating = d.create(&format!(
        r#"{{"code":{},"ref":"b b","options":{{"killGrace":600000}}}}"#,
        js(&term_code)
    ));
    d.wait_running_pid(running);
    d.wait_running_pid(terminating);
    wait_for_file(&ready1);
    wait_for_file(&ready2);
    assert_eq!(d.kill(terminating).status, 200);
    d.wait_for_state(terminating, "terminating");

    // Queued behind them; one canceled while queued; an idle record run
    // again (it queues too: its old exit state's entry must go).
    let queued: Vec<i64> = (0..3)
        .map(|i| d.create(&format!(r#"{{"code":"echo q"{}}}"#, ref_field(i))))
        .collect();
    assert_eq!(d.kill(queued[0]).status, 200);
    assert_eq!(d.record(queued[0])["exitState"].as_str(), Some("canceled"));
    let rerun = done[0];
    assert_eq!(d.run(rerun, r#"{"force":true}"#).status, 200);
    assert_eq!(d.record(rerun)["state"].as_str(), Some("queued"));
    assert_lists_agree(&d, &REFS);

    // Everything settles.
    fs::write(&release1, "").unwrap();
    fs::write(&release2, "").unwrap();
    for id in [running, terminating, queued[1], queued[2], rerun] {
        d.wait_idle(id);
    }
    assert_lists_agree(&d, &REFS);

    // A crash with runs in flight and one queued: recovery settles them.
    // (Each run its own ready file: a run has a uid of its own and may not
    // write another's file.)
    let release3 = m.path().join("release3");
    let (ready_a, ready_b) = (m.path().join("ready_a"), m.path().join("ready_b"));
    let a = d.create(&format!(
        r#"{{"code":{},"ref":"a"}}"#,
        js(&hold(&ready_a, &release3))
    ));
    let b = d.create(&format!(r#"{{"code":{}}}"#, js(&hold(&ready_b, &release3))));
    let c = d.create(r#"{"code":"echo after","ref":"b b"}"#);
    d.wait_running_pid(a);
    d.wait_running_pid(b);
    wait_for_file(&ready_a);
    wait_for_file(&ready_b);
    assert_eq!(d.record(c)["state"].as_str(), Some("queued"));
    d.kill9();
    d.restart_same_dir();
    for id in [a, b, c] {
        d.wait_idle(id);
    }
    assert_eq!(d.stdout_text(c), "after\n");
    assert_lists_agree(&d, &REFS);
    d.stop_gracefully();

    // Retention deletes the oldest idle records beyond the newest 8.
    let data = d.data_dir().to_path_buf();
    let keep = 8;
    let mut r = Daemon::options()
        .data_dir(&data)
        .env("CYRNEL_RETENTION_MAX_RECORDS", &keep.to_string())
        .start();
    poll("retention to keep the newest records", || {
        let n = r.list_ids("").len();
        if n == keep {
            Ok(())
        } else {
            Err(format!("{n} records"))
        }
    });
    assert_lists_agree(&r, &REFS);
    r.stop_gracefully();

    // Salvage after damage in the write-ahead log: the index is built anew
    // from the records that were kept.
    let db = data.join("db");
    let mut wals: Vec<_> = fs::read_dir(&db)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    wals.sort();
    let wal = wals.pop().expect("a write-ahead log");
    let mut bytes = fs::read(&wal).unwrap();
    assert!(bytes.len() > 400, "{} bytes", bytes.len());
    for b in &mut bytes[100..400] {
        *b ^= 0xff;
    }
    fs::write(&wal, bytes).unwrap();
    let (status, out) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.display().to_string(),
            "--salvage",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(0), "--salvage: {out}");
    assert!(out.contains("list index built from the"), "{out}");
    let s = Daemon::options().data_dir(&data).start();
    // (A delete in the damaged range may be lost, its record back.)
    assert!(!s.list_ids("").is_empty());
    assert_lists_agree(&s, &REFS);
    // And it keeps up with new writes.
    let id = s.create(r#"{"code":"exit 1","ref":"a"}"#);
    s.wait_idle(id);
    assert_eq!(
        s.list_ids("state=idle&status=failed&ref=a&limit=1"),
        vec![id]
    );
    assert_lists_agree(&s, &REFS);
    // Keep the first daemon's root (it holds the data dir) until the end.
    drop(s);
    drop(r);
    drop(d);
}

/// The fixture: a data dir of format version 1 written by the release
/// before the index (`tests/fixtures/make-format-v1.sh` says what it holds).
fn unpack_fixture(into: &Path) -> std::path::PathBuf {
    let tarball = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-v1.tar.gz");
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(&tarball)
        .arg("-C")
        .arg(into)
        .status()
        .expect("run tar");
    assert!(status.success(), "unpacking {}", tarball.display());
    into.join("data")
}

#[test]
fn a_data_dir_of_the_previous_release_is_upgraded_in_place_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = unpack_fixture(tmp.path());
    let mut d = Daemon::options().data_dir(&data).start();
    let logs = d.logs();
    assert!(
        logs.contains("upgrading the data dir from format version 1 to 2")
            && logs.contains("upgraded the data dir to format version 2")
            && logs.contains("records=9"),
        "{logs}"
    );

    // What format 1 left unsettled is recovered as after any crash.
    for id in [7, 8, 9, 10] {
        d.wait_idle(id);
    }
    let want: Vec<Row> = [
        (10, "success", None),
        (9, "success", Some("gamma")),
        (8, "canceled", Some("gamma")),
        (7, "failed", None),
        (5, "canceled", Some("beta")),
        (4, "timeout", None),
        (3, "failed", Some("beta")),
        (2, "success", Some("alpha")),
        (1, "", Some("alpha")),
    ]
    .into_iter()
    .map(|(id, exit, rf)| {
        (
            id,
            "idle".to_string(),
            (!exit.is_empty()).then(|| exit.to_string()),
            rf.map(str::to_string),
        )
    })
    .collect();
    assert_eq!(rows(&d.list("")), want);
    assert_eq!(
        d.record(7)["error"].as_str(),
        Some("Supervisor restarted while the process was running.")
    );
    assert_eq!(d.stdout_text(2), "out\n");
    assert_eq!(d.stderr_text(2), "err\n");
    assert_eq!(d.output_json(2), json(r#"{"k":1}"#));
    assert_eq!(d.stdout_text(9), "queued\n");
    assert_eq!(d.get("/processes/6").status, 404);
    assert_eq!(d.list_ids("ref=beta&status=failed"), vec![3]);
    assert_lists_agree(&d, &["alpha", "beta", "gamma"]);

    // Ids go on from the old counter; a second start does not upgrade.
    let id = d.create(r#"{"code":"echo new","ref":"alpha"}"#);
    assert_eq!(id, 11);
    d.wait_idle(id);
    d.restart_same_dir();
    let second = d.logs();
    let second = &second[second.rfind("--- start #2 ---").expect("second start")..];
    assert!(!second.contains("upgrading"), "{second}");
    assert_eq!(d.list_ids("ref=alpha&status=success"), vec![11, 2]);
    assert_lists_agree(&d, &["alpha", "beta", "gamma"]);
    d.stop_gracefully();

    // `--check` reads the upgraded database whole.
    let (status, out) = run_to_exit(
        &[
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data.display().to_string(),
            "--check",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(0), "--check: {out}");
    assert!(out.contains("column family index:"), "{out}");
}
