//! Per-run resource accounting (`resources` on idle records), against the
//! real daemon: from the run's cgroup (`cgroups = "auto"`, this host has
//! cgroup v2) and from the leader's `wait` accounting (`cgroups = "off"`).

use std::fs;

use crate::support::*;

/// Python allocating and touching 64 MiB, then burning some CPU: both
/// figures are well above zero whatever the machine.
const WORK: &str =
    "exec python3 -c 'b = bytearray(64 << 20); b[::4096] = b\"x\" * len(b[::4096]); sum(range(3000000))'";

/// The cgroup under which this daemon makes run cgroups (from its log).
fn instance_cgroup(d: &Daemon) -> String {
    let logs = d.logs();
    let line = logs
        .lines()
        .find(|l| l.contains("each run gets its own cgroup"))
        .unwrap_or_else(|| panic!("no cgroup tracking: {logs}"));
    let at = line.find("root=").expect("root=") + 5;
    line[at..].split_whitespace().next().unwrap().to_string()
}

fn check_work(rec: &Json, source: &str) {
    let r = &rec["resources"];
    assert_eq!(r["source"], source, "{rec}");
    let cpu = r["cpuUserMs"].as_u64().unwrap() + r["cpuSystemMs"].as_u64().unwrap();
    assert!(cpu > 0, "some CPU time: {rec}");
    let peak = r["peakMemoryBytes"].as_u64().unwrap_or(0);
    assert!(peak >= 64 << 20, "the 64 MiB were resident: {rec}");
    assert_eq!(r["oomKilled"], false, "{rec}");
}

#[test]
fn a_run_in_its_own_cgroup_reports_what_the_cgroup_counted() {
    let d = Daemon::options().env("CYRNEL_CGROUPS", "auto").start();
    let controllers = fs::read_to_string(format!("{}/cgroup.subtree_control", instance_cgroup(&d)))
        .unwrap_or_default();
    let mut events = FollowStream::open(d.port(), "/events", &[]);
    assert_eq!(events.status, 200);
    let id = d.create_code(WORK);
    let rec = d.wait_idle(id);
    assert_eq!(rec["exitState"], "success", "{rec}");
    check_work(&rec, "cgroup");
    // The `idle` event carries the same figures (one transition).
    let idle = events.read_until("the idle event", |body| {
        String::from_utf8_lossy(body)
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(json)
            .find(|e| e["state"] == "idle")
    });
    assert_eq!(idle["resources"], rec["resources"], "{idle}");
    // pids.peak exists only with the pids controller enabled for runs.
    let procs = &rec["resources"]["peakProcesses"];
    if controllers.split_whitespace().any(|c| c == "pids") {
        assert!(procs.as_u64().unwrap() >= 1, "{rec}");
    } else {
        assert!(
            procs.is_null(),
            "no pids controller ({controllers:?}): {rec}"
        );
    }
}

#[test]
fn without_cgroups_the_leaders_wait_accounting_is_used() {
    let d = Daemon::options().env("CYRNEL_CGROUPS", "off").start();
    let id = d.create_code(WORK);
    let rec = d.wait_idle(id);
    assert_eq!(rec["exitState"], "success", "{rec}");
    check_work(&rec, "rusage");
    assert!(rec["resources"]["peakProcesses"].is_null(), "{rec}");
}

#[test]
fn resources_are_null_until_a_run_settles_and_kept_for_killed_runs() {
    let mut d = Daemon::start();
    let never = d.create("{\"code\":\"true\",\"autorun\":false}");
    assert!(d.record(never)["resources"].is_null());
    let id = d.create_code("exec sleep 600");
    d.wait_running_pid(id);
    assert!(
        d.record(id)["resources"].is_null(),
        "running: no figures yet"
    );
    assert_eq!(d.kill(id).status, 200);
    let rec = d.wait_idle(id);
    assert_eq!(rec["exitState"], "canceled", "{rec}");
    let r = &rec["resources"];
    assert!(r.is_object(), "a killed run has figures too: {rec}");
    assert!(r["peakMemoryBytes"].as_u64().unwrap() > 0, "{rec}");
    // Durable: the same after a restart.
    d.stop_gracefully();
    d.restart_same_dir();
    assert_eq!(d.record(id)["resources"], *r);
}
