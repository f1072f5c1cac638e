//! A crash under a service manager (the stand-in of `support::manager`,
//! which implements systemd's notify socket and fd store): runs keep
//! running, the restarted daemon re-adopts them from the store, exits that
//! happened while it was down are exact (PIDFD_INFO_EXIT), and every byte
//! written before, during and after the crash is captured once.

use std::fs;

use crate::support::*;

#[test]
fn a_crash_loses_no_run_no_exit_status_and_no_byte() {
    let markers = marker_dir();
    let m = markers.path();
    let (go, gap) = (m.join("go"), m.join("gap"));
    let mut d =
        ManagedDaemon::start_with(Daemon::options(), ManagerOptions::default().hold_restarts());
    let first = d.pid();
    // Writes numbered lines to both streams, before, during and after the
    // crash (blocking on the full pipe while nobody reads), until told.
    let writer = d.create_code(&format!(
        "i=0; while [ ! -e {go} ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done; exit 4",
        go = sq(&go)
    ));
    // End while the daemon is down.
    let wait_gap = format!("while [ ! -e {} ]; do sleep 0.01; done", sq(&gap));
    let zero = d.create_code(&format!("echo before; {wait_gap}; echo bye"));
    let three = d.create_code(&format!("{wait_gap}; exit 3"));
    let segv = d.create_code(&format!("{wait_gap}; kill -SEGV $$"));
    // Keeps running across it.
    let sleeper = d.create_code("echo sleeping; sleep 300");
    let mut pids = Vec::new();
    for id in [writer, zero, three, segv, sleeper] {
        pids.push(d.wait_running_pid(id));
        d.manager().wait_stored(&format!("run-{id}-pid"));
    }
    d.manager().wait_stored(&format!("run-{writer}-jout"));
    d.manager().wait_stored(&format!("run-{writer}-jerr"));
    // The journal of `zero`'s "before", so its line is parked too.
    d.manager().wait_stored(&format!("run-{zero}-jout"));
    let gap_pids = [pids[1], pids[2], pids[3]];

    let second = d.kill9_then(|manager| {
        fs::write(&gap, "").unwrap();
        // The stand-in, their subreaper now, reaps them.
        for pid in gap_pids {
            manager.wait_for(&format!("{pid} to be reaped"), |s| {
                s.reaped.iter().any(|(p, _)| *p == pid as u32).then_some(())
            });
        }
    });
    assert_ne!(first, second, "a new daemon process");
    assert!(d.logs().contains("re-adopted a run"), "{}", d.logs());
    assert!(
        is_alive(pids[0]) && is_alive(pids[4]),
        "the writer and the sleeper kept running"
    );
    assert_eq!(d.record(sleeper)["state"], "running");

    let z = d.wait_idle(zero);
    assert_eq!(
        (z["exitState"].as_str(), z["exitCode"].as_i64()),
        (Some("success"), Some(0)),
        "{z}"
    );
    assert_eq!(d.stdout_text(zero), "before\nbye\n");
    let t = d.wait_idle(three);
    assert_eq!(
        (t["exitState"].as_str(), t["exitCode"].as_i64()),
        (Some("failed"), Some(3)),
        "{t}"
    );
    let s = d.wait_idle(segv);
    assert_eq!(s["signal"], "SIGSEGV", "{s}");

    fs::write(&go, "").unwrap();
    let w = d.wait_idle(writer);
    assert_eq!(w["exitCode"], 4, "{w}");
    let out = assert_numbered(&d.stdout_text(writer), "out");
    let err = assert_numbered(&d.stderr_text(writer), "err");
    assert!(out > 0 && out == err, "stdout {out} lines, stderr {err}");

    assert_eq!(d.kill(sleeper).status, 200);
    assert_eq!(d.wait_idle(sleeper)["exitState"], "canceled");
    assert_eq!(d.stdout_text(sleeper), "sleeping\n");
    assert!(!is_alive(pids[4]));
    // Every settled run's descriptors left the store.
    for id in [writer, zero, three, segv, sleeper] {
        d.manager().wait_not_stored(&format!("run-{id}-pid"));
    }
    let end = d.stop();
    assert!(end.leftovers.is_empty(), "{:?}", end.leftovers);
}

#[test]
fn without_a_service_manager_a_crash_still_puts_survivors_down() {
    // The documented policy without a store (e.g. `make run`): a run found
    // alive after a crash is terminated and recorded failed.
    let mut d = Daemon::start();
    let id = d.create_code("sleep 300");
    let pid = d.wait_running_pid(id);
    d.kill9();
    d.restart_same_dir();
    let r = d.wait_idle(id);
    assert_eq!(r["exitState"], "failed");
    assert_eq!(
        r["error"],
        "Supervisor restarted while the process was running."
    );
    assert!(!is_alive(pid));
}
