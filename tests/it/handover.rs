//! Handover: the daemon re-executes itself (same pid) and every run keeps
//! running and is recorded exactly: exit codes and signals, every output
//! byte once, events without gap or duplicate, ids continuing. A handover
//! that cannot happen changes nothing.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::events::{open, read_events, Ev};
use crate::support::*;

/// Asks for a handover and waits until the new image answers.
#[track_caller]
fn hand_over(d: &Daemon) {
    hand_over_then(d, || ());
}

/// `hand_over`, doing `accepted` as soon as the handover is accepted.
#[track_caller]
fn hand_over_then(d: &Daemon, accepted: impl FnOnce()) {
    let before = d.get("/handover").json()["generation"].as_u64().unwrap();
    let r = d.post_no_body("/handover");
    assert_eq!(r.status, 202, "POST /handover: {r}");
    accepted();
    assert_eq!(r.json()["pid"].as_u64(), Some(u64::from(d.pid())));
    wait_generation(d, "the new image to answer", before + 1);
}

/// Waits until `GET /handover` answers with `generation` (a new image, or
/// the previous one again, is serving); its answer.
#[track_caller]
fn wait_generation(d: &Daemon, what: &str, generation: u64) -> Json {
    poll(what, || {
        match try_http(d.port(), "GET", "/handover", &[], None) {
            Ok(r) if r.status == 200 && r.json()["generation"] == generation => Ok(r.json()),
            Ok(r) => Err(format!("status {}: {}", r.status, r.text())),
            Err(e) => Err(e.to_string()),
        }
    })
}

/// The image answering on `d`'s port runs as the process the test started
/// (`GET /handover` reports the answering daemon's pid).
#[track_caller]
fn assert_same_process_answers(d: &Daemon, what: &str) {
    let answering = d.get("/handover").json()["pid"].as_u64();
    assert_eq!(answering, Some(u64::from(d.pid())), "{what}");
}

/// A script that stands in for a binary on disk.
fn put_script(path: &Path, body: &str) {
    let tmp = path.with_extension("new");
    fs::write(&tmp, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    // A new file, renamed over the old one, as a package manager does.
    fs::rename(&tmp, path).unwrap();
}

/// Puts the binary `from` at `path` as a new file (a running daemon's
/// image is never written to), as a package upgrade does.
fn replace_binary(path: &Path, from: &Path) {
    fs::remove_file(path).unwrap();
    install_binary_from(from, path);
}

/// A daemon on its own copy of the binary, with one run that prints
/// `before`, waits for its marker `go`, prints `after` and exits `code`:
/// for handovers that must change nothing, then one that works.
struct WaitingRun {
    _markers: tempfile::TempDir,
    go: std::path::PathBuf,
    d: Daemon,
    run: i64,
    run_pid: i32,
    bin: std::path::PathBuf,
    code: i32,
}

impl WaitingRun {
    fn start(code: i32) -> WaitingRun {
        let markers = marker_dir();
        let go = markers.path().join("go");
        let d = Daemon::options().own_binary().start();
        let run = d.create_code(&format!(
            "echo before; while [ ! -e {} ]; do sleep 0.01; done; echo after; exit {code}",
            sq(&go)
        ));
        let run_pid = d.wait_running_pid(run);
        let bin = d.binary();
        WaitingRun {
            _markers: markers,
            go,
            d,
            run,
            run_pid,
            bin,
            code,
        }
    }

    /// Nothing changed: the daemon process started answers, the run alive
    /// and `running`.
    #[track_caller]
    fn assert_untouched(&self, what: &str) {
        assert_same_process_answers(&self.d, what);
        assert!(is_alive(self.run_pid), "{what}: the run is alive");
        assert_eq!(self.d.record(self.run)["state"], "running", "{what}");
    }

    /// The real binary again (a new file): a handover that works, and the
    /// run ends as it would have.
    #[track_caller]
    fn finish_with_the_real_binary(self) {
        replace_binary(&self.bin, Path::new(BIN));
        hand_over(&self.d);
        fs::write(&self.go, "").unwrap();
        let r = self.d.wait_idle(self.run);
        assert_eq!(r["exitCode"], self.code, "{r}");
        assert_eq!(self.d.stdout_text(self.run), "before\nafter\n");
    }
}

/// Every event from the start, until `done` holds; their ids have no gap.
#[track_caller]
fn all_events(d: &Daemon, done: impl Fn(&[Ev]) -> bool) -> Vec<Ev> {
    let mut s = open(d, "/events?since=0", &[]);
    let evs = read_events(&mut s, "every event", done);
    for w in evs.windows(2) {
        assert_eq!(w[1].id, w[0].id + 1, "no gap, no duplicate: {evs:?}");
    }
    evs
}

/// The states each process went through, from the events.
fn states_by_process(evs: &[Ev]) -> BTreeMap<i64, Vec<String>> {
    let mut m: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for e in evs {
        if let Some(id) = e.data["id"].as_i64() {
            m.entry(id).or_default().push(e.event.clone());
        }
    }
    m
}

#[test]
fn a_handover_keeps_runs_in_every_state_exact() {
    let markers = marker_dir();
    let m = markers.path();
    let go = m.join("go");
    let termed = m.join("termed");
    let release = m.join("release");
    let d = Daemon::options()
        .own_binary()
        .env("CYRNEL_MAX_RUNNING", "5")
        .start();
    // Writes numbered lines to both streams until told to stop.
    let writer = d.create_code(&format!(
        "i=0; while [ ! -e {go} ]; do echo \"out $i\"; echo \"err $i\" >&2; i=$((i+1)); done; \
         echo \"{{\\\"lines\\\": $i}}\" > \"$CYRNEL_OUTPUT\"; exit 3",
        go = sq(&go)
    ));
    // Killed before the handover; still inside its (long) grace period.
    let terminating = d.create(&format!(
        r#"{{"code": {}, "options": {{"killGrace": 600000}}}}"#,
        js(&format!(
            "trap 'echo got-term; touch {t}; while [ ! -e {r} ]; do sleep 0.01; done; exit 0' TERM; \
             while :; do sleep 0.01; done",
            t = sq(&termed),
            r = sq(&release)
        ))
    ));
    // Times out after the handover, in the new image.
    let timing_out = d.create(&format!(
        r#"{{"code": {}, "options": {{"timeout": 3000}}}}"#,
        js(&format!(
            "while [ ! -e {go} ]; do sleep 0.01; done; sleep 300",
            go = sq(&go)
        ))
    ));
    // End on their own during the handover: told to as soon as it is
    // accepted, while the old image parks, executes and the new one adopts.
    let during = m.join("during");
    let wait_during = format!("while [ ! -e {} ]; do sleep 0.001; done", sq(&during));
    let exits = d.create_code(&format!("{wait_during}; exit 7"));
    let segv = d.create_code(&format!("{wait_during}; kill -SEGV $$"));
    for id in [writer, terminating, timing_out, exits, segv] {
        d.wait_running_pid(id);
    }
    // Five slots taken: this one waits in the queue.
    let queued = d.create_code("echo queued-ran");
    assert_eq!(d.record(queued)["state"], "queued");
    assert_eq!(d.kill(terminating).status, 200);
    wait_for_file(&termed);
    assert_eq!(d.record(terminating)["state"], "terminating");
    let writer_pid = d.record(writer)["pid"].as_i64().unwrap() as i32;

    hand_over_then(&d, || fs::write(&during, "").unwrap());

    assert_same_process_answers(&d, "the same daemon process");
    assert!(is_alive(writer_pid), "the writer kept running");
    assert_eq!(d.record(writer)["state"], "running");
    assert_eq!(d.record(terminating)["state"], "terminating");
    fs::write(&go, "").unwrap();
    fs::write(&release, "").unwrap();

    let w = d.wait_idle(writer);
    assert_eq!(
        (w["exitState"].as_str(), w["exitCode"].as_i64()),
        (Some("failed"), Some(3))
    );
    let lines = d.output_json(writer)["lines"].as_u64().unwrap() as usize;
    assert!(lines > 0);
    assert_eq!(
        assert_numbered(&d.stdout_text(writer), "out"),
        lines,
        "stdout complete"
    );
    assert_eq!(
        assert_numbered(&d.stderr_text(writer), "err"),
        lines,
        "stderr complete"
    );
    let t = d.wait_idle(terminating);
    assert_eq!(t["exitState"], "canceled", "{t}");
    assert_eq!(d.stdout_text(terminating), "got-term\n");
    assert_eq!(d.wait_idle(timing_out)["exitState"], "timeout");
    let e = d.wait_idle(exits);
    assert_eq!(
        (e["exitState"].as_str(), e["exitCode"].as_i64()),
        (Some("failed"), Some(7))
    );
    let s = d.wait_idle(segv);
    assert_eq!(s["signal"], "SIGSEGV", "{s}");
    let q = d.wait_idle(queued);
    assert_eq!(q["exitState"], "success");
    assert_eq!(d.stdout_text(queued), "queued-ran\n");

    let next = d.create_code("true");
    assert!(next > queued, "ids continue above the old ones");
    d.wait_idle(next);
    let evs = all_events(&d, |e| {
        e.iter().any(|e| {
            e.event == "idle"
                && e.data["id"].as_i64() == Some(next)
                && e.data["exitState"] == "success"
        })
    });
    let states = states_by_process(&evs);
    let ran =
        |s: &[String]| -> Vec<String> { s.iter().filter(|x| *x != "queued").cloned().collect() };
    assert_eq!(ran(&states[&writer]), ["running", "idle"]);
    assert_eq!(
        ran(&states[&terminating]),
        ["running", "terminating", "idle"]
    );
    assert_eq!(
        ran(&states[&timing_out]),
        ["running", "terminating", "idle"]
    );
    assert_eq!(ran(&states[&exits]), ["running", "idle"]);
    assert_eq!(ran(&states[&queued]), ["running", "idle"]);
    assert!(d.logs().contains("re-adopted a run"), "{}", d.logs());
}

#[test]
fn twenty_handovers_under_load_lose_nothing() {
    let d = Daemon::options().own_binary().start();
    let port = d.port();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Creates (each with an Idempotency-Key, so a retry after a connection
    // cut by a handover never makes a second run) and kills, until told.
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut made: Vec<(i64, bool)> = Vec::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let long = n.is_multiple_of(3);
                let code = if long {
                    "sleep 300".to_string()
                } else {
                    format!("echo {n}")
                };
                let body = format!(r#"{{"code": {}}}"#, js(&code));
                let key = format!("load-{n}");
                let id = poll("a create to get through", || {
                    match try_http(
                        port,
                        "POST",
                        "/processes",
                        &[("Idempotency-Key", key.as_str())],
                        Some(body.as_bytes()),
                    ) {
                        Ok(r) if r.status == 201 => Ok(r.json()["id"].as_i64().unwrap()),
                        Ok(r) => Err(format!("status {}: {}", r.status, r.text())),
                        Err(e) => Err(e.to_string()),
                    }
                });
                made.push((id, long));
                if long {
                    poll("a kill to get through", || {
                        match try_http(
                            port,
                            "POST",
                            &format!("/processes/{id}/signals/kill"),
                            &[],
                            None,
                        ) {
                            // 409: the kill got through before a cut connection.
                            Ok(r) if r.status == 200 || r.status == 409 => Ok(()),
                            Ok(r) => Err(format!("status {}", r.status)),
                            Err(e) => Err(e.to_string()),
                        }
                    });
                }
            }
            made
        })
    };
    for _ in 0..20 {
        hand_over(&d);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let made = load.join().expect("load thread");
    assert!(made.len() > 20, "the load ran: {}", made.len());
    for (i, (id, long)) in made.iter().enumerate() {
        let r = d.wait_idle(*id);
        if *long {
            assert_eq!(r["exitState"], "canceled", "{r}");
        } else {
            assert_eq!(r["exitState"], "success", "{r}");
            assert_eq!(d.stdout_text(*id), format!("{}\n", i + 1), "run {id}");
        }
    }
    let ids: Vec<i64> = made.iter().map(|(id, _)| *id).collect();
    let mut sorted = ids.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "no run made twice");
    assert_eq!(
        d.list_ids("limit=1000").len(),
        ids.len(),
        "exactly the runs made"
    );
    assert_eq!(d.get("/handover").json()["generation"], 20);
}

#[test]
fn a_refused_handover_leaves_every_run_alive() {
    let w = WaitingRun::start(5);
    let (d, bin) = (&w.d, &w.bin);
    type Case<'a> = (&'a str, Box<dyn Fn() + 'a>, &'a str);
    let cases: [Case; 4] = [
        (
            "missing",
            Box::new(|| fs::remove_file(bin).unwrap()),
            "cannot run it",
        ),
        (
            "exits at once",
            Box::new(|| put_script(bin, "exit 1")),
            "--handover-check failed",
        ),
        (
            "from a future state version",
            Box::new(|| put_script(bin, "echo 'cyrneld handover reads 99-99'")),
            "reads handover state versions 99-99",
        ),
        (
            "says nothing",
            Box::new(|| put_script(bin, "true")),
            "did not say which state versions",
        ),
    ];
    for (what, make, why) in cases {
        make();
        let r = d.post_no_body("/handover");
        assert_eq!(r.status, 409, "{what}: {r}");
        let msg = r.json()["error"].as_str().unwrap().to_string();
        assert!(
            msg.starts_with("Handover refused: ") && msg.contains(why),
            "{what}: {msg}"
        );
        let status = d.get("/handover").json();
        assert_eq!(status["generation"], 0, "{what}");
        assert!(
            status["lastError"].as_str().unwrap().contains(why),
            "{what}: {status}"
        );
        w.assert_untouched(what);
    }
    w.finish_with_the_real_binary();
}

#[test]
fn sighup_hands_over_only_when_the_binary_was_replaced() {
    let d = Daemon::options().own_binary().start();
    let run = d.create_code("sleep 300");
    let run_pid = d.wait_running_pid(run);
    // Same binary: a reload, no handover.
    send_signal("HUP", d.pid() as i32);
    wait_log_count(&d, "SIGHUP: reloading", 1);
    assert_eq!(d.get("/handover").json()["generation"], 0);
    // Replaced (as by a package upgrade): the reload hands over.
    replace_binary(&d.binary(), Path::new(BIN));
    send_signal("HUP", d.pid() as i32);
    wait_generation(&d, "the handover after SIGHUP", 1);
    assert!(is_alive(run_pid));
    assert_eq!(d.record(run)["state"], "running");
    // SIGUSR2: the operator's trigger, binary replaced or not.
    send_signal("USR2", d.pid() as i32);
    wait_generation(&d, "the handover after SIGUSR2", 2);
    assert_eq!(d.kill(run).status, 200);
    assert_eq!(d.wait_idle(run)["exitState"], "canceled");
    assert!(!is_alive(run_pid));
}

/// The earlier build's binary (`make previous` builds it; `make test`
/// passes its path).
fn earlier_build() -> std::path::PathBuf {
    let path = std::env::var_os("CYRNEL_TEST_PREVIOUS_CYRNELD").expect(
        "CYRNEL_TEST_PREVIOUS_CYRNELD is not set: run the tests through `make test`, \
         which builds the earlier build (`make previous`) and passes its path",
    );
    let path = std::path::PathBuf::from(path);
    assert!(
        path.is_file(),
        "{}: missing (run `make previous`)",
        path.display()
    );
    path
}

/// Removes, when dropped, the folder base the earlier build logged
/// (`runs_base=`) if it is empty: it named the base after the data dir's
/// uid block and left it at a stop, while this build names it after the
/// whole path and removes only its own. One was left in `/dev/shm` by every
/// run of the upgrade test before.
struct EarlierBuildBase(std::path::PathBuf);

impl Drop for EarlierBuildBase {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

#[test]
fn an_upgrade_from_an_earlier_build_keeps_every_run() {
    let markers = marker_dir();
    let go = markers.path().join("go");
    // Declared before the daemon, so it is dropped after the daemon stops.
    let _old_base;
    let d = Daemon::options().own_binary_from(&earlier_build()).start();
    _old_base = EarlierBuildBase(d.runs_base().expect("the earlier build logs runs_base="));
    let old = d.get("/handover").json();
    assert_eq!(
        old["stateVersion"], 1,
        "the earlier build writes version 1: {old}"
    );
    let writer = d.create_code(&format!(
        "i=0; while [ ! -e {go} ]; do echo \"out $i\"; i=$((i+1)); done; exit 6",
        go = sq(&go)
    ));
    let sleeper = d.create_code("sleep 300");
    let sleeper_pid = d.wait_running_pid(sleeper);
    d.wait_running_pid(writer);
    // The package manager puts the new binary in place; the old daemon
    // hands over to it (it reads version 1).
    let bin = d.binary();
    replace_binary(&bin, Path::new(BIN));
    hand_over(&d);
    let new = d.get("/handover").json();
    assert_eq!(new["stateVersion"], 2, "{new}");
    assert!(is_alive(sleeper_pid));
    fs::write(&go, "").unwrap();
    let w = d.wait_idle(writer);
    assert_eq!(w["exitCode"], 6, "{w}");
    let lines = assert_numbered(&d.stdout_text(writer), "out");
    assert!(lines > 0);
    assert_eq!(d.kill(sleeper).status, 200);
    assert_eq!(d.wait_idle(sleeper)["exitState"], "canceled");
    // Back to the earlier build: it cannot read version 2, so the
    // handover is refused and nothing changes.
    replace_binary(&bin, &earlier_build());
    let r = d.post_no_body("/handover");
    assert_eq!(r.status, 409, "{r}");
    assert!(
        r.text()
            .contains("reads handover state versions 1-1, this daemon writes version 2"),
        "{r}"
    );
    assert_eq!(d.get("/handover").json()["generation"], 1);
}

#[test]
fn a_new_image_that_cannot_start_gives_every_run_back_to_the_previous_one() {
    let w = WaitingRun::start(9);
    let d = &w.d;
    // Binaries that pass the check, then reject what they are started
    // with: a flag they do not know, a configuration they refuse.
    let cases = [
        (
            "--no-such-flag",
            "",
            "the new binary rejected the command line",
        ),
        (
            "",
            "CYRNEL_MAX_RUNNING=0",
            "the new binary rejected the configuration",
        ),
    ];
    for (generation, (flag, env, why)) in (1u64..).zip(cases) {
        put_script(
            &w.bin,
            &format!(
                "if [ \"$1\" = --handover-check ]; then exec {real} --handover-check; fi\n\
                 {env} exec {real} {flag} \"$@\"",
                real = sq(Path::new(BIN))
            ),
        );
        let r = d.post_no_body("/handover");
        assert_eq!(r.status, 202, "{r}");
        let status = wait_generation(d, "the previous image to answer again", generation);
        let last = status["lastError"].as_str().unwrap_or_default().to_string();
        assert!(last.contains(why), "{status}");
        w.assert_untouched(why);
    }
    w.finish_with_the_real_binary();
}
