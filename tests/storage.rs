//! Start-up against a data dir the daemon must not use: a database another
//! cyrneld holds, or one it cannot read. The daemon stops with a clear
//! message and never repairs or wipes what it found. And a full disk: new
//! work is refused with 507, reads and running work go on, and the daemon
//! recovers by itself when space returns (a size-limited tmpfs mounted by
//! the test; CI runs as root).

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

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
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
        let path = std::ffi::CString::new(self.dir.path().to_str().unwrap()).unwrap();
        // SAFETY: statvfs on a NUL-terminated path into a zeroed struct.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
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
    let fs_ = Tmpfs::mount("64m");
    let data = fs_.dir.path().join("data");
    fs::create_dir(&data).unwrap();
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

    // Leave less free space than the reserve.
    let filler = fs_.dir.path().join("filler");
    let fill = fs_.free_bytes() - reserve / 2;
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
