//! Start-up against a data dir the daemon must not use: a database another
//! cyrneld holds, or one it cannot read. The daemon stops with a clear
//! message and never repairs or wipes what it found.

mod common;

use std::fs;

use common::*;

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
