//! Kill that always works, checked in /proc: a zoo of misbehaving code
//! (TERM-ignorers, double-fork daemonizers, fork loops, grandchildren that
//! outlive their leader holding stdout, processes that leave their process
//! group) put down through kill, timeout and daemon shutdown, with cgroup v2
//! tracking and with the process-group fallback (`cgroups = "off"`); and a
//! crash-consistency workload with `kill -9` of the daemon at deterministic
//! "random" moments.

use std::collections::BTreeSet;
use std::fs;

use crate::support::*;

struct Case {
    name: &'static str,
    /// Code; `{m}` is replaced by a marker file written once it is set up.
    code: &'static str,
    /// Whether processes outside the leader's group are expected.
    escapes: bool,
}

const ZOO: &[Case] = &[
    Case {
        name: "TERM-ignorer",
        code: "trap '' TERM; : > {m}; sleep 300",
        escapes: false,
    },
    Case {
        name: "double-fork daemonizer",
        // The escaped process writes the marker itself, once it escaped.
        code: "setsid sh -c ': > {raw}; sleep 300' & wait",
        escapes: true,
    },
    Case {
        name: "fork loop",
        code: "i=0; : > {m}; while [ $i -lt 300 ]; do sleep 300 & i=$((i+1)); done; wait",
        escapes: false,
    },
    Case {
        name: "grandchild holding stdout after the leader exits",
        code: "(trap '' TERM; sleep 300; echo late) & : > {m}; exit 0",
        escapes: false,
    },
    Case {
        name: "process that leaves its group",
        code: "python3 -c \"import os,time; os.setpgid(0,0); open('{raw}','w').close(); time.sleep(300)\" & wait",
        escapes: true,
    },
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum How {
    Kill,
    Timeout,
    Shutdown,
}

fn zoo(cgroups: &str, how: How) {
    let mut d = Daemon::options()
        .env("CYRNEL_CGROUPS", cgroups)
        .env("CYRNEL_KILL_GRACE_MS", "300")
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "0")
        .start();
    assert_tracking(&d, cgroups);
    let markers = marker_dir();
    let mut runs = Vec::new();
    for (i, case) in ZOO.iter().enumerate() {
        let marker = markers.path().join(format!("m{i}"));
        let code = case
            .code
            .replace("{m}", &sq(&marker))
            .replace("{raw}", marker.to_str().unwrap());
        let opts = match how {
            // Long enough for the marker, so the trap is really set.
            How::Timeout => r#""options":{"timeout":1500}"#,
            _ => r#""options":{"timeout":null}"#,
        };
        let id = d.create_with(&code, opts);
        runs.push((case, id, marker));
    }
    for (case, id, marker) in &runs {
        wait_for_file(marker);
        assert!(
            !alive_of_run(&d, *id).is_empty(),
            "{}: nothing running",
            case.name
        );
    }
    let daemon_pid = d.pid();
    match how {
        How::Kill => {
            for (_, id, _) in &runs {
                let r = d.kill(*id);
                assert_eq!(r.status, 200, "{r}");
            }
        }
        How::Timeout => {}
        How::Shutdown => {
            d.stop_gracefully();
            // Everything was put down before the daemon exited.
            for (case, id, _) in &runs {
                assert_eq!(
                    alive_of_run(&d, *id),
                    Vec::<i32>::new(),
                    "{} survived the shutdown",
                    case.name
                );
            }
            d.restart_same_dir();
        }
    }
    for (case, id, _) in &runs {
        let rec = d.wait_idle(*id);
        let expected = match how {
            How::Timeout => "timeout",
            _ => "canceled",
        };
        assert_eq!(
            rec["exitState"].as_str(),
            Some(expected),
            "{}: {rec}",
            case.name
        );
        // Settled means gone: nothing of the run may be alive now.
        assert_eq!(
            alive_of_run(&d, *id),
            Vec::<i32>::new(),
            "{} ({cgroups}, {how:?}) left processes: {rec}",
            case.name
        );
        let killed = rec["killed"].as_i64().unwrap_or(0);
        assert!(
            killed >= 1,
            "{}: killed must count the processes reached: {rec}",
            case.name
        );
        if case.escapes && how == How::Kill {
            assert!(
                rec["escaped"].as_i64().unwrap_or(0) >= 1,
                "{}: escaped must be counted: {rec}",
                case.name
            );
        }
    }
    // Orphans reparented to the daemon are reaped by its main thread as
    // they exit, so any left now are reaped shortly or never.
    if how != How::Shutdown {
        assert_no_zombies_under(daemon_pid);
    }
    assert_no_zombies_under(d.pid());
}

#[test]
fn zoo_through_kill_with_cgroups() {
    zoo("auto", How::Kill);
}

#[test]
fn zoo_through_timeout_with_cgroups() {
    zoo("auto", How::Timeout);
}

#[test]
fn zoo_through_shutdown_with_cgroups() {
    zoo("auto", How::Shutdown);
}

#[test]
fn zoo_through_kill_without_cgroups() {
    zoo("off", How::Kill);
}

#[test]
fn zoo_through_timeout_without_cgroups() {
    zoo("off", How::Timeout);
}

#[test]
fn zoo_through_shutdown_without_cgroups() {
    zoo("off", How::Shutdown);
}

/// The daemonizer escapes its group but not its cgroup: even a run whose
/// leader exits 0 stays running until the escaped process is gone.
#[test]
fn a_daemonized_descendant_keeps_the_run_open_under_cgroups() {
    let d = Daemon::options()
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "0")
        .start();
    let m = marker_dir();
    let pidfile = m.path().join("pid");
    let code = format!(
        "setsid sh -c 'echo $$ > {}; exec sleep 300' & exit 0",
        sq(&pidfile)
    );
    let id = d.create_code(&code);
    let escaped = poll("escaped pid", || {
        fs::read_to_string(&pidfile)
            .map_err(|e| e.to_string())?
            .trim()
            .parse::<i32>()
            .map_err(|e| e.to_string())
    });
    assert!(is_alive(escaped));
    // The leader has exited (or will), yet the run stays open.
    d.wait_for_state(id, "running");
    assert!(is_alive(escaped));
    assert_eq!(d.record(id)["state"].as_str(), Some("running"));
    d.kill(id);
    let rec = d.wait_idle(id);
    assert!(
        !is_alive(escaped),
        "the escaped daemon must be gone once the run is idle: {rec}"
    );
    assert_eq!(rec["escaped"].as_i64(), Some(1), "{rec}");
}

#[test]
fn crash_consistency_under_kill_9_with_cgroups() {
    crash_consistency("auto", 7);
}

#[test]
fn crash_consistency_under_kill_9_without_cgroups() {
    crash_consistency("off", 11);
}

fn crash_consistency(cgroups: &str, seed: u64) {
    let rounds = 8;
    let mut rng = Lcg(seed);
    let mut d = Daemon::options()
        .env("CYRNEL_CGROUPS", cgroups)
        .env("CYRNEL_KILL_GRACE_MS", "400")
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "0")
        .start();
    assert_tracking(&d, cgroups);
    let markers = marker_dir();
    let mut issued: Vec<i64> = Vec::new();
    let mut crashes = 0;
    // How many kill deadlines were issued, found kept after a restart, and
    // checked against the settle time: a check that never ran proves nothing.
    let (mut deadlines_issued, mut kept_checked, mut settle_checked) = (0, 0, 0);
    for round in 0..rounds {
        // A workload: quick runs, timeouts, TERM-ignorers being killed
        // (kills in progress at the crash), long runs left running.
        let ops = 6 + rng.next(6);
        let crash_after = rng.next(ops);
        let mut deadlines: Vec<(i64, Json)> = Vec::new();
        for op in 0..ops {
            let id = match rng.next(4) {
                0 => d.create_code("echo quick"),
                1 => d.create_with("sleep 300", r#""options":{"timeout":150}"#),
                2 => {
                    let marker = markers.path().join(format!("t{op}-{round}"));
                    let code = format!("trap '' TERM; : > {}; sleep 300", sq(&marker));
                    let id = d.create_with(&code, r#""options":{"killGrace":1500}"#);
                    // The trap is set: only SIGKILL can end it.
                    wait_for_file(&marker);
                    let r = d.kill(id);
                    assert_eq!(r.status, 200, "{r}");
                    let rec = r.json();
                    deadlines.push((id, rec["killDeadline"].clone()));
                    deadlines_issued += 1;
                    id
                }
                _ => {
                    // Running for sure at the crash (a queued one would
                    // rightly run again after the restart).
                    let id = d.create_code("sleep 300");
                    d.wait_running_pid(id);
                    id
                }
            };
            issued.push(id);
            if op == crash_after {
                break;
            }
        }
        d.kill9();
        crashes += 1;
        d.restart_same_dir();
        // Kills that were in progress keep their original SIGKILL deadline.
        for (id, deadline) in &deadlines {
            let rec = d.record(*id);
            if rec["state"].as_str() == Some("terminating") {
                assert_eq!(
                    &rec["killDeadline"], deadline,
                    "round {round}: {id} lost its deadline: {rec}"
                );
                kept_checked += 1;
            }
        }
        // Every id that got a 201 exists; none was issued twice.
        let unique: BTreeSet<i64> = issued.iter().copied().collect();
        assert_eq!(
            unique.len(),
            issued.len(),
            "an id was issued twice: {issued:?}"
        );
        let listed: BTreeSet<i64> = d.list_ids("").into_iter().collect();
        assert_eq!(listed, unique, "round {round}: records lost or invented");
        // Recovery finishes: everything settles (long runs from before the
        // crash are put down), and nothing of a settled record is alive.
        for &id in &issued {
            let rec = d.wait_idle(id);
            assert_eq!(
                alive_of_run(&d, id),
                Vec::<i32>::new(),
                "round {round}: {id} still has processes: {rec}"
            );
            if let Some((_, deadline)) = deadlines.iter().find(|(k, _)| *k == id) {
                // A TERM-ignorer can only have died by the SIGKILL at (or
                // after) its deadline.
                if let (Some(done), Some(due)) = (rec["completedAt"].as_str(), deadline.as_str()) {
                    assert!(
                        done >= due,
                        "round {round}: {id} settled at {done}, before its deadline {due}"
                    );
                    settle_checked += 1;
                }
            }
        }
    }
    println!(
        "crash consistency: {rounds} rounds, {crashes} crashes survived, {} processes, \
         {deadlines_issued} kill deadlines ({kept_checked} found kept after a restart)",
        issued.len()
    );
    assert!(deadlines_issued > 0, "the seed issued no kill in progress");
    assert_eq!(
        settle_checked, deadlines_issued,
        "every kill in progress is checked against its settle time"
    );
    assert!(
        kept_checked > 0,
        "no kill was still in progress after any restart: the deadline check never ran"
    );
}

/// A run that trapped SIGTERM and then stopped itself: it can act on the
/// SIGTERM only once continued, so every SIGTERM is followed by SIGCONT.
/// The grace is ten minutes: without SIGCONT the run would stay
/// `terminating` until SIGKILL, far past the test's deadline, and its
/// handler would never run.
fn a_stopped_run_gets_sigcont_after_sigterm(cgroups: &str, by_timeout: bool) {
    let d = Daemon::options()
        .env("CYRNEL_CGROUPS", cgroups)
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "0")
        .start();
    let code =
        "trap 'echo handled; exit 0' TERM; echo ready; kill -STOP $$; echo resumed-without-term";
    let timeout = if by_timeout { "5000" } else { "null" };
    let id = d.create_with(
        code,
        &format!(r#""options":{{"killGrace":600000,"timeout":{timeout}}}"#),
    );
    let pid = d.wait_running_pid(id);
    d.follow_until(&format!("/processes/{id}/stdout?follow=true"), "ready");
    poll("the run to stop itself", || match proc_stat(pid) {
        Some(('T', _)) => Ok(()),
        other => Err(format!("{other:?}")),
    });
    if !by_timeout {
        assert_eq!(d.kill(id).status, 200);
    }
    let rec = d.wait_idle(id);
    let want = if by_timeout { "timeout" } else { "canceled" };
    assert_eq!(rec["exitState"].as_str(), Some(want), "{rec}");
    assert_eq!(d.stdout_text(id), "ready\nhandled\n", "{rec}");
    assert!(
        rec["signal"].is_null(),
        "ended by its handler, not SIGKILL: {rec}"
    );
    assert_group_gone(pid);
    assert_tracking(&d, cgroups);
}

/// Asserts which kill-tracking path the daemon took: its own cgroup per
/// run (`cgroups = "auto"` on this host, root with cgroup v2) or process
/// groups (`"off"`), so a test of one path never passes on the other.
fn assert_tracking(d: &Daemon, cgroups: &str) {
    let logs = d.logs();
    assert_eq!(
        logs.contains("each run gets its own cgroup"),
        cgroups == "auto",
        "tracking path for cgroups = {cgroups}: {logs}"
    );
}

#[test]
fn a_stopped_run_gets_sigcont_after_a_kill_with_cgroups() {
    a_stopped_run_gets_sigcont_after_sigterm("auto", false);
}

#[test]
fn a_stopped_run_gets_sigcont_after_a_timeout_with_cgroups() {
    a_stopped_run_gets_sigcont_after_sigterm("auto", true);
}

#[test]
fn a_stopped_run_gets_sigcont_after_a_kill_without_cgroups() {
    a_stopped_run_gets_sigcont_after_sigterm("off", false);
}

#[test]
fn a_stopped_run_gets_sigcont_after_a_timeout_without_cgroups() {
    a_stopped_run_gets_sigcont_after_sigterm("off", true);
}
