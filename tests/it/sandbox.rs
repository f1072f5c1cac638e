//! Isolation of posted code (README "What a run can and cannot do"): every
//! attack from the sandbox issue, as one `POST /processes` each, against
//! the real daemon at level `full` (started as root, as CI runs it) and at
//! level `landlock` (started as `nobody` with no capability through
//! `setpriv`). Each attack is followed by checks that the daemon is the
//! same process and healthy, that the victim run is untouched, that no
//! secret reached the attacker's output, and (where the attack aimed at
//! the data) that every record is still there after a restart. Every test
//! asserts the level that ran: a test that cannot tell would pass on a
//! daemon without a sandbox.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use crate::support::*;

const KEY: &str = "s3cr3t-api-key-0123456789";

fn full() -> Daemon {
    Daemon::options().api_key(KEY).start()
}

fn landlock() -> Daemon {
    Daemon::options().api_key(KEY).unprivileged().start()
}

/// Creates a run and waits until it is idle; returns (record, stdout, stderr).
fn run(d: &Daemon, code: &str) -> (Json, String, String) {
    let id = d.create_code(code);
    let rec = d.wait_idle(id);
    (rec, d.stdout_text(id), d.stderr_text(id))
}

#[track_caller]
fn assert_level(rec: &Json, level: &str) {
    assert_eq!(rec["sandbox"].as_str(), Some(level), "{rec}");
}

/// A run that stays alive, with a file in its folder, one in /tmp (or
/// $TMPDIR) and one in shared memory; returns its id and leader pid.
fn victim(d: &Daemon) -> (i64, i32) {
    let id = d.create_code(
        "echo victim-code-secret > mine; echo victim-tmp-secret > \"${TMPDIR:-/tmp}/victim\"; \
         (echo victim-shm > /dev/shm/victim) 2>/dev/null; echo ready; exec sleep 600",
    );
    d.follow_until(&format!("/processes/{id}/stdout?follow=true"), "ready");
    let pid = d.wait_running_pid(id);
    (id, pid)
}

/// The victim is still running, untouched.
#[track_caller]
fn assert_victim_untouched(d: &Daemon, id: i64, pid: i32) {
    let rec = d.record(id);
    assert_eq!(rec["state"].as_str(), Some("running"), "{rec}");
    assert!(is_alive(pid), "the victim's leader {pid} is gone");
}

/// The daemon is the same process and answers.
#[track_caller]
fn assert_daemon_fine(d: &Daemon, pid: u32) {
    assert_eq!(d.pid(), pid);
    assert!(is_alive(pid as i32));
    assert_eq!(d.get("/health").status, 200);
}

#[track_caller]
fn assert_no_secret(texts: &[&str]) {
    for t in texts {
        assert!(!t.contains(KEY), "the API key leaked: {t}");
        assert!(!t.contains("victim-"), "another run's data leaked: {t}");
    }
}

// ---------------------------------------------------------------------------
// Signals and ptrace
// ---------------------------------------------------------------------------

fn signals_do_not_reach_the_daemon_or_another_run(d: Daemon, level: &str) {
    let daemon = d.pid();
    let (vid, vpid) = victim(&d);
    let code = format!(
        "kill -9 $PPID; echo ppid=$?; kill -9 -{vpid}; echo group=$?; kill -9 {vpid}; echo pid=$?; \
         kill -STOP {daemon}; echo stop=$?; \
         python3 -c 'import ctypes,sys; l=ctypes.CDLL(None, use_errno=True); \
         print(\"ptrace=%d\" % l.ptrace(16, {daemon}, 0, 0))'"
    );
    let (rec, out, err) = run(&d, &code);
    assert_level(&rec, level);
    for line in ["ppid=1", "group=1", "pid=1", "stop=1", "ptrace=-1"] {
        assert!(out.contains(line), "expected {line}: {out} / {err}");
    }
    assert_daemon_fine(&d, daemon);
    assert_victim_untouched(&d, vid, vpid);
}

#[test]
fn full_signals_do_not_reach_the_daemon_or_another_run() {
    signals_do_not_reach_the_daemon_or_another_run(full(), "full");
}

#[test]
fn landlock_signals_do_not_reach_the_daemon_or_another_run() {
    signals_do_not_reach_the_daemon_or_another_run(landlock(), "landlock");
}

// ---------------------------------------------------------------------------
// The data dir, the config file, the key file
// ---------------------------------------------------------------------------

fn the_data_dir_config_and_key_are_out_of_reach(mut d: Daemon, level: &str, config: &str) {
    let daemon = d.pid();
    let before = run(&d, "echo kept").0;
    let data = fs::canonicalize(d.data_dir()).unwrap();
    let runs_base = d.runs_base().unwrap();
    let code = format!(
        "ls -a {data} 2>&1; echo ls=$?; rm -rf {data}/db 2>&1; echo rm=$?; \
         rm -rf ../../db ../db 2>/dev/null; touch {data}/planted 2>&1; echo touch=$?; \
         cat {config} 2>&1; echo cat=$?; ls {base} 2>&1; echo base=$?; \
         cat {data}/db/CURRENT 2>&1; echo current=$?",
        data = sq(&data),
        config = config,
        base = sq(&runs_base),
    );
    let (rec, out, err) = run(&d, &code);
    assert_level(&rec, level);
    assert_no_secret(&[&out, &err]);
    // At full the masked config reads as empty (`/dev/null`) and the
    // masked data dir is an empty tmpfs; at landlock both are refused.
    for line in ["touch=0", "current=0"] {
        assert!(!out.lines().any(|l| l == line), "{line}: {out}");
    }
    assert!(
        !out.lines().any(|l| l == "db"),
        "the database was listed: {out}"
    );
    assert!(
        data.join("db/CURRENT").exists(),
        "the database is damaged: {out}"
    );
    assert!(!data.join("planted").exists());
    assert_daemon_fine(&d, daemon);
    // Every record is still there after a restart.
    d.restart_same_dir();
    assert_eq!(d.record(before["id"].as_i64().unwrap())["state"], "idle");
    assert_eq!(d.record(rec["id"].as_i64().unwrap())["state"], "idle");
}

/// A config file holding the API key, 0600 (readable by its owner only).
fn config_with_key(dir: &std::path::Path, owner: Option<u32>) -> std::path::PathBuf {
    let path = dir.join("cyrneld.toml");
    fs::write(&path, format!("api_key = \"{KEY}\"\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    if let Some(uid) = owner {
        std::os::unix::fs::chown(&path, Some(uid), Some(uid)).unwrap();
    }
    path
}

#[test]
fn full_the_data_dir_config_and_key_are_out_of_reach() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_key(dir.path(), None);
    let d = Daemon::options()
        .api_key(KEY)
        .arg("--config")
        .arg(config.to_str().unwrap())
        .start();
    let c = sq(&config);
    the_data_dir_config_and_key_are_out_of_reach(d, "full", &c);
}

#[test]
fn landlock_the_data_dir_config_and_key_are_out_of_reach() {
    let dir = tempfile::tempdir().unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o711)).unwrap();
    let config = config_with_key(dir.path(), Some(UNPRIVILEGED));
    let d = Daemon::options()
        .api_key(KEY)
        .unprivileged()
        .arg("--config")
        .arg(config.to_str().unwrap())
        .start();
    let c = sq(&config);
    the_data_dir_config_and_key_are_out_of_reach(d, "landlock", &c);
}

#[test]
fn a_config_file_with_the_key_that_others_can_read_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_key(dir.path(), None);
    fs::set_permissions(&config, fs::Permissions::from_mode(0o644)).unwrap();
    let data = dir.path().join("data");
    let (status, out) = run_to_exit(
        &[
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{out}");
    assert!(out.contains(config.to_str().unwrap()), "{out}");
    assert!(out.contains("chmod o-rwx"), "{out}");
    assert!(!out.contains(KEY), "{out}");
    assert!(!data.exists(), "nothing may be created: {out}");
}

// ---------------------------------------------------------------------------
// Another run's files, /tmp, shared memory, SysV IPC, /proc
// ---------------------------------------------------------------------------

fn another_runs_files_and_processes_are_invisible(d: Daemon, level: &str) {
    let daemon = d.pid();
    let (vid, vpid) = victim(&d);
    let base = d.runs_base().unwrap();
    let code = format!(
        "cat {base}/{vid}/mine {base}/{vid}/code 2>&1; ls {base} 2>&1; \
         cat /tmp/victim /dev/shm/victim 2>&1; ls /tmp /dev/shm 2>&1; \
         cat /proc/{vpid}/environ /proc/{vpid}/cmdline 2>&1; \
         cat /proc/{vpid}/root/tmp/cyrnel/mine 2>&1; echo done",
        base = sq(&base),
    );
    let (rec, out, err) = run(&d, &code);
    assert_level(&rec, level);
    assert!(out.contains("done"), "{out}");
    assert_no_secret(&[&out, &err]);
    assert_daemon_fine(&d, daemon);
    assert_victim_untouched(&d, vid, vpid);
}

#[test]
fn full_another_runs_files_and_processes_are_invisible() {
    another_runs_files_and_processes_are_invisible(full(), "full");
}

#[test]
fn landlock_another_runs_files_and_processes_are_invisible() {
    another_runs_files_and_processes_are_invisible(landlock(), "landlock");
}

#[test]
fn full_proc_shows_only_the_runs_own_processes_and_ipc_is_private() {
    let d = full();
    // The victim holds a SysV shared memory segment.
    let vid = d.create_code("ipcmk -M 4096 >/dev/null && echo ready; exec sleep 600");
    d.follow_until(&format!("/processes/{vid}/stdout?follow=true"), "ready");
    let vpid = d.wait_running_pid(vid);
    let code = "ipcs -m | grep -c '^0x' ; sleep 0.1 & ls /proc | grep -E '^[0-9]+$' | wc -l; \
                echo me=$$";
    let (rec, out, _) = run(&d, code);
    assert_level(&rec, "full");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "0", "another run's shm segment is visible: {out}");
    // The shell, `sleep`, `ls`, `grep`, `wc`: a handful, not the host's.
    let visible: usize = lines[1].parse().unwrap();
    assert!(visible <= 6, "the run sees {visible} processes: {out}");
    assert_victim_untouched(&d, vid, vpid);
}

// ---------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------

fn the_api_key_never_reaches_a_run(d: Daemon, level: &str) {
    let code = "env; tr '\\0' '\\n' < /proc/$PPID/environ 2>&1; \
                tr '\\0' '\\n' < /proc/1/environ 2>&1; cat /proc/$PPID/cmdline 2>&1; echo done";
    let (rec, out, err) = run(&d, code);
    assert_level(&rec, level);
    assert!(out.contains("done"), "{out}");
    assert_no_secret(&[&out, &err]);
    // Nor is it in the daemon's own environment block any more.
    let env = fs::read(format!("/proc/{}/environ", d.pid())).unwrap();
    assert!(
        !String::from_utf8_lossy(&env).contains(KEY),
        "the key is still in the daemon's /proc environ"
    );
}

#[test]
fn full_the_api_key_never_reaches_a_run() {
    the_api_key_never_reaches_a_run(full(), "full");
}

#[test]
fn landlock_the_api_key_never_reaches_a_run() {
    the_api_key_never_reaches_a_run(landlock(), "landlock");
}

// ---------------------------------------------------------------------------
// Privileges
// ---------------------------------------------------------------------------

/// The `key: value` lines of a `/proc/<pid>/status` text.
fn status_fields(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn full_a_run_holds_no_capability_and_cannot_gain_one() {
    let d = full();
    let code = "grep -E '^(Cap|NoNewPrivs|Uid|Gid|Groups)' /proc/self/status; \
                unshare -r true 2>/dev/null; echo userns=$?; \
                python3 -c 'import os; os.setuid(0)' 2>/dev/null; echo setuid=$?";
    let (rec, out, err) = run(&d, code);
    assert_level(&rec, "full");
    let fields = status_fields(&out);
    let get = |k: &str| {
        fields
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{k} missing: {out} {err}"))
    };
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(get(set), "0000000000000000", "{set}: {out}");
    }
    assert_eq!(get("NoNewPrivs"), "1");
    let uid: u32 = get("Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let (base, count) = d.uid_block();
    assert!(
        uid >= base && uid - base < count,
        "uid {uid} is not a run uid"
    );
    assert_eq!(get("Groups"), "");
    assert!(out.contains("userns=1"), "{out}");
    assert!(out.contains("setuid=1"), "{out}");
}

#[test]
fn landlock_a_run_holds_no_capability_and_cannot_gain_one() {
    let d = landlock();
    let code = "grep -E '^(CapEff|CapPrm|CapAmb|CapInh|NoNewPrivs)' /proc/self/status; \
                unshare -r true 2>/dev/null; echo userns=$?";
    let (rec, out, _) = run(&d, code);
    assert_level(&rec, "landlock");
    let fields = status_fields(&out);
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert!(
            fields.contains(&(set.to_string(), "0000000000000000".to_string())),
            "{set}: {out}"
        );
    }
    assert!(fields.contains(&("NoNewPrivs".into(), "1".into())), "{out}");
    assert!(out.contains("userns=1"), "{out}");
}

/// The calls the daemon makes itself to prepare and start runs (seccomp
/// stage one lets them through, stage two denies them:
/// `proc::sandbox::Seccomp`) are denied to the run. Each is made with
/// arguments the kernel itself refuses a process without capabilities
/// for otherwise (EINVAL, EFAULT), so only the filter answers EPERM
/// (ENOSYS for clone3). `fsopen`, `fsmount` and `move_mount` answer an
/// unprivileged caller EPERM either way: the unit tests of the filter
/// speak for them. The run holds both stages (the daemon's starter thread
/// is dedicated to spawning), not the whole list.
fn the_spawners_own_calls_are_denied_to_the_run(d: Daemon, level: &str) {
    let code = r#"python3 - <<'PY'
import ctypes, os
l = ctypes.CDLL(None, use_errno=True)
common = dict(open_tree=428, fsconfig=431, clone3=435, mount_setattr=442)
nr = dict(common, **{"x86_64": dict(unshare=272, mount=165),
                     "aarch64": dict(unshare=97, mount=40)}[os.uname().machine])
def errno(*a):
    ctypes.set_errno(0)
    return 0 if l.syscall(*a) == 0 else ctypes.get_errno()
print("unshare=%d" % errno(nr["unshare"], 1))
print("mount=%d" % errno(nr["mount"], None, None, None, 0, None))
print("open_tree=%d" % errno(nr["open_tree"], -1, None, 0xffffffff))
print("fsconfig=%d" % errno(nr["fsconfig"], -1, 0xffffffff, None, None, 0))
print("mount_setattr=%d" % errno(nr["mount_setattr"], -1, None, 0xffffffff, None, 0))
print("clone3=%d" % errno(nr["clone3"], None, 0))
PY
grep '^Seccomp_filters:' /proc/self/status"#;
    let (rec, out, err) = run(&d, code);
    assert_level(&rec, level);
    // Two filters on top of the daemon's own (none, unless its host adds
    // one): the starter thread's stage one and the run's stage two.
    let filters = |status: &str| -> u32 {
        status_fields(status)
            .into_iter()
            .find_map(|(k, v)| (k == "Seccomp_filters").then(|| v.parse().unwrap()))
            .unwrap_or_else(|| panic!("no Seccomp_filters: {status}"))
    };
    let daemon = fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    assert_eq!(filters(&out), filters(&daemon) + 2, "{out}");
    let (eperm, enosys) = (libc::EPERM, libc::ENOSYS);
    for line in [
        format!("unshare={eperm}"),
        format!("mount={eperm}"),
        format!("open_tree={eperm}"),
        format!("fsconfig={eperm}"),
        format!("mount_setattr={eperm}"),
        format!("clone3={enosys}"),
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "expected {line}: {out} / {err}"
        );
    }
}

#[test]
fn full_the_spawners_own_calls_are_denied_to_the_run() {
    the_spawners_own_calls_are_denied_to_the_run(full(), "full");
}

#[test]
fn landlock_the_spawners_own_calls_are_denied_to_the_run() {
    the_spawners_own_calls_are_denied_to_the_run(landlock(), "landlock");
}

// ---------------------------------------------------------------------------
// Nothing left behind; bounded folder
// ---------------------------------------------------------------------------

#[test]
fn full_a_run_leaves_nothing_behind() {
    let d = full();
    let mounts_before = fs::read_to_string(format!("/proc/{}/mountinfo", d.pid())).unwrap();
    let (rec, out, _) = run(
        &d,
        "id -u; echo x > /tmp/left; echo y > /dev/shm/left; mkdir -p deep/er; echo z > deep/er/f",
    );
    assert_level(&rec, "full");
    let uid: u32 = out.trim().parse().unwrap();
    // No process of that uid, no mount in the daemon's namespace, nothing
    // in the data dir but the database.
    let left: Vec<i32> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| fs::metadata(format!("/proc/{p}")).is_ok_and(|m| m.uid() == uid))
        .collect();
    assert_eq!(left, Vec::<i32>::new(), "processes of uid {uid} remain");
    let mounts_after = fs::read_to_string(format!("/proc/{}/mountinfo", d.pid())).unwrap();
    assert_eq!(mounts_before.lines().count(), mounts_after.lines().count());
    let entries: Vec<String> = fs::read_dir(d.data_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        entries,
        vec!["db".to_string()],
        "data dir holds {entries:?}"
    );
    assert!(!std::path::Path::new("/tmp/left").exists());
}

#[test]
fn landlock_a_run_folder_is_removed_when_it_settles() {
    let d = landlock();
    let (rec, _, _) = run(
        &d,
        "echo x > kept; echo y > \"$TMPDIR/t\"; touch /tmp/outside; echo $?",
    );
    assert_level(&rec, "landlock");
    let id = rec["id"].as_i64().unwrap();
    assert!(!d.runs_base().unwrap().join(id.to_string()).exists());
    assert!(!std::path::Path::new("/tmp/outside").exists());
}

/// The folder base on /dev/shm belongs to this data dir alone (named after
/// its whole path, not after one of 4094 uid blocks, which let two daemons
/// share it, or sent one to `<data_dir>/run` when another user's was
/// there), and a graceful stop removes it.
#[test]
fn landlock_the_run_folder_base_is_this_data_dirs_and_goes_at_a_graceful_stop() {
    let mut d = landlock();
    let (rec, _, _) = run(&d, "echo x > kept");
    assert_level(&rec, "landlock");
    let base = d.runs_base().expect("runs_base in the start-up log");
    let data_dir = fs::canonicalize(d.data_dir()).unwrap();
    assert_eq!(base, cyrnel::proc::sandbox::shm_runs_base(&data_dir));
    assert!(base.is_dir(), "{}", base.display());
    assert!(!d.data_dir().join("run").exists());
    d.stop_gracefully();
    assert!(!base.exists(), "{} is left after the stop", base.display());
}

#[test]
fn full_a_full_run_folder_fails_the_run_not_the_daemon() {
    let d = Daemon::options()
        .env("CYRNEL_RUN_FOLDER_BYTES", "1048576")
        .start();
    let daemon = d.pid();
    let (rec, out, err) = run(
        &d,
        "dd if=/dev/zero of=big bs=65536 count=64 2>&1; echo folder=$?; \
         dd if=/dev/zero of=/tmp/big2 bs=65536 count=64 2>&1; echo tmp=$?",
    );
    assert_level(&rec, "full");
    assert!(out.contains("No space left on device"), "{out} {err}");
    assert!(out.contains("folder=1") && out.contains("tmp=1"), "{out}");
    assert_daemon_fine(&d, daemon);
    let (after, out, _) = run(&d, "echo fine");
    assert_eq!(after["exitState"], "success");
    assert_eq!(out, "fine\n");
}

// ---------------------------------------------------------------------------
// What a run can still do
// ---------------------------------------------------------------------------

fn normal_work_still_works(d: Daemon, level: &str) {
    let script = "#!/usr/bin/env python3\n\
                  import os, json, tempfile\n\
                  open('here.txt', 'w').write('cwd ok')\n\
                  with tempfile.NamedTemporaryFile(mode='w', delete=False) as t: t.write('tmp ok')\n\
                  print(open('here.txt').read(), open(t.name).read())\n\
                  with open(os.environ['CYRNEL_OUTPUT'], 'a') as o: o.write(json.dumps({'py': 1}) + '\\n')\n";
    let id = d.create_code(script);
    let rec = d.wait_idle(id);
    assert_level(&rec, level);
    assert_eq!(
        rec["exitState"].as_str(),
        Some("success"),
        "{rec}: {}",
        d.stderr_text(id)
    );
    assert_eq!(d.stdout_text(id), "cwd ok tmp ok\n");
    assert_eq!(d.output_json(id), json(r#"{"py":1}"#));
}

#[test]
fn full_normal_work_still_works() {
    normal_work_still_works(full(), "full");
}

#[test]
fn landlock_normal_work_still_works() {
    normal_work_still_works(landlock(), "landlock");
}

/// Connects to `port` on loopback from inside a run; prints ok or fail.
fn connect_code(port: u16) -> String {
    format!(
        "python3 -c 'import socket\ntry:\n socket.create_connection((\"127.0.0.1\", {port}), 5); print(\"connect=ok\")\nexcept OSError as e: print(\"connect=fail\", e)'\n\
         python3 -c 'import socket\ntry:\n s=socket.socket(); s.bind((\"127.0.0.1\", 0)); s.listen(); socket.create_connection(s.getsockname(), 5); print(\"loopback=ok\")\nexcept OSError as e: print(\"loopback=fail\", e)'\n"
    )
}

#[test]
fn full_network_off_leaves_loopback_only() {
    let d = full();
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let code = connect_code(port);
    let (rec, out, _) = run(&d, &code);
    assert_level(&rec, "full");
    assert!(out.contains("connect=ok"), "network on: {out}");
    let body = serde_json::json!({"code": code, "options": {"network": false}}).to_string();
    let id = d.create(&body);
    let rec = d.wait_idle(id);
    assert_level(&rec, "full");
    let out = d.stdout_text(id);
    assert!(out.contains("connect=fail"), "network off: {out}");
    assert!(
        out.contains("loopback=ok"),
        "network off keeps loopback: {out}"
    );
    d.post(
        "/processes",
        r#"{"code":"true","options":{"network":"no"}}"#,
    )
    .assert_error(400, "Field 'options.network' must be a boolean.");
}

#[test]
fn landlock_network_off_denies_ip_sockets() {
    let d = landlock();
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    let code = connect_code(port);
    let (rec, out, _) = run(&d, &code);
    assert_level(&rec, "landlock");
    assert!(out.contains("connect=ok"), "network on: {out}");
    let body = serde_json::json!({"code": code, "options": {"network": false}}).to_string();
    let id = d.create(&body);
    assert_level(&d.wait_idle(id), "landlock");
    assert!(
        d.stdout_text(id).contains("connect=fail"),
        "{}",
        d.stdout_text(id)
    );
}

#[test]
fn sandbox_off_is_reported_as_none() {
    let d = Daemon::options().env("CYRNEL_SANDBOX", "off").start();
    let (rec, out, _) = run(&d, "id -u");
    assert_level(&rec, "none");
    assert_eq!(out, "0\n");
    assert!(rec["sandbox"].is_string());
}

#[test]
fn the_level_is_null_before_the_first_run() {
    let d = full();
    let id = d.create(r#"{"code":"true","autorun":false}"#);
    assert!(d.record(id)["sandbox"].is_null());
    assert_eq!(d.run(id, "{}").status, 200);
    assert_level(&d.wait_idle(id), "full");
}
