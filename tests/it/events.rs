//! State-transition events: `GET /events` and `GET /processes/{id}/events`
//! as Server-Sent Events, against the real daemon. Every transition arrives
//! once, in order, with strictly increasing ids; resuming with
//! `Last-Event-ID` (or `?since=`) has no gap and no duplicate, also across
//! restarts and after the server closed a slow client's stream; trimmed
//! history yields `reset`; heartbeats; streams end cleanly on shutdown.

use crate::support::*;

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Ev {
    pub id: u64,
    pub event: String,
    pub data: Json,
}

/// Complete events in an SSE body (comments skipped), and the number of
/// `: keep-alive` comments.
pub(crate) fn parse_sse(body: &[u8]) -> (Vec<Ev>, usize) {
    let text = String::from_utf8_lossy(body);
    let mut events = Vec::new();
    let mut keepalives = 0;
    let complete = match text.rfind("\n\n") {
        Some(end) => &text[..end + 2],
        None => return (events, 0),
    };
    for block in complete.split("\n\n").filter(|b| !b.is_empty()) {
        let (mut id, mut event, mut data) = (None, None, None);
        for line in block.lines() {
            if line == ": keep-alive" {
                keepalives += 1;
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.parse::<u64>().expect("numeric id"));
            } else if let Some(v) = line.strip_prefix("event: ") {
                event = Some(v.to_string());
            } else if let Some(v) = line.strip_prefix("data: ") {
                data = Some(parse_json(v).expect("data is one line of JSON"));
            }
        }
        if let (Some(id), Some(event), Some(data)) = (id, event, data) {
            events.push(Ev { id, event, data });
        }
    }
    (events, keepalives)
}

pub(crate) fn open(d: &Daemon, path: &str, headers: &[(&str, &str)]) -> FollowStream {
    let s = FollowStream::open(d.port(), path, headers);
    assert_eq!(s.status, 200, "GET {path}");
    assert_eq!(s.header("content-type"), Some("text/event-stream"));
    s
}

/// Reads until `pred` holds for the events received so far.
#[track_caller]
pub(crate) fn read_events(
    s: &mut FollowStream,
    what: &str,
    pred: impl Fn(&[Ev]) -> bool,
) -> Vec<Ev> {
    s.read_until(what, |body| {
        let (evs, _) = parse_sse(body);
        pred(&evs).then_some(evs)
    })
}

pub(crate) fn has(evs: &[Ev], id: i64, event: &str) -> bool {
    evs.iter()
        .any(|e| e.event == event && e.data["id"].as_i64() == Some(id))
}

fn assert_increasing(evs: &[Ev]) {
    for w in evs.windows(2) {
        assert!(
            w[0].id < w[1].id,
            "ids must strictly increase: {:?} then {:?}",
            w[0].id,
            w[1].id
        );
    }
}

/// Every event id currently retained, via a replay from 0.
fn all_ids(d: &Daemon, expect_at_least: usize) -> Vec<u64> {
    let mut s = open(d, "/events?since=0", &[]);
    let evs = read_events(&mut s, "full replay", |e| e.len() >= expect_at_least);
    evs.iter().map(|e| e.id).collect()
}

#[test]
fn transitions_stream_in_order_with_the_record_after_each() {
    let d = Daemon::start();
    let mut s = open(&d, "/events", &[]);
    let id = d.create_code("sleep 300");
    d.wait_running_pid(id);
    let evs = read_events(&mut s, "queued and running", |e| has(e, id, "running"));
    let names: Vec<&str> = evs.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["queued", "running"]);
    assert!(evs[1].data["pid"].as_i64().is_some(), "{:?}", evs[1]);
    d.kill(id);
    let evs = read_events(&mut s, "terminating and idle", |e| has(e, id, "idle"));
    let names: Vec<&str> = evs.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["queued", "running", "terminating", "idle"]);
    assert_increasing(&evs);
    for e in &evs {
        assert_eq!(
            e.data["state"].as_str(),
            Some(e.event.as_str()),
            "data is the record after: {e:?}"
        );
    }
    let last = &evs[3].data;
    assert_eq!(last["exitState"].as_str(), Some("canceled"));
    assert_eq!(
        last,
        &d.record(id),
        "the idle event carries the stored record"
    );

    d.delete(&format!("/processes/{id}"));
    let evs = read_events(&mut s, "deleted", |e| has(e, id, "deleted"));
    assert_eq!(evs.len(), 5);
}

#[test]
fn resuming_has_no_gap_and_no_duplicate() {
    let d = Daemon::start();
    let a = d.create_with("true", r#""autorun":false"#);
    let mut s = open(&d, "/events?since=0", &[]);
    let first = read_events(&mut s, "a's creation", |e| has(e, a, "idle"));
    let seen = first.last().unwrap().id;
    drop(s);

    // Missed while disconnected.
    let b = d.create_with("true", r#""autorun":false"#);
    let c = d.create_with("true", r#""autorun":false"#);
    let header = seen.to_string();
    let mut s = open(&d, "/events", &[("Last-Event-ID", header.as_str())]);
    let evs = read_events(&mut s, "b and c", |e| has(e, c, "idle"));
    let ids: Vec<i64> = evs.iter().map(|e| e.data["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, vec![b, c], "exactly what was missed, in order");
    // Then live, seamlessly.
    let e2 = d.create_with("true", r#""autorun":false"#);
    let evs = read_events(&mut s, "e2 live", |e| has(e, e2, "idle"));
    assert_eq!(evs.len(), 3);
    assert_increasing(&evs);
    assert!(evs[0].id > seen);
    assert_eq!(all_ids(&d, 4).len(), 4);
}

#[test]
fn resuming_works_across_a_restart() {
    let mut d = Daemon::start();
    let a = d.create_code("echo a");
    d.wait_idle(a);
    let before = all_ids(&d, 3);
    let last = *before.last().unwrap();
    d.restart_same_dir();
    let b = d.create_with("true", r#""autorun":false"#);
    let mut s = open(&d, &format!("/events?since={last}"), &[]);
    let evs = read_events(&mut s, "b after restart", |e| has(e, b, "idle"));
    assert_eq!(evs.len(), 1, "{evs:?}");
    assert!(evs[0].id > last, "ids keep increasing across restarts");
    let after = all_ids(&d, 4);
    assert_eq!(&after[..3], &before[..], "history survives the restart");
}

#[test]
fn a_crash_loses_no_shown_transition() {
    let mut d = Daemon::options().env("CYRNEL_MAX_RUNNING", "1").start();
    let mut s = open(&d, "/events", &[]);
    let run = d.create_code("sleep 300");
    let queued = d.create_code("echo q");
    let shown = read_events(&mut s, "running and the second queued", |e| {
        has(e, run, "running") && has(e, queued, "queued")
    });
    drop(s);
    d.kill9();
    d.restart_same_dir();
    d.wait_idle(queued);
    d.wait_idle(run);
    let mut s = open(&d, "/events?since=0", &[]);
    let all = read_events(&mut s, "history", |e| {
        has(e, queued, "idle") && has(e, run, "idle")
    });
    for ev in &shown {
        assert!(
            all.contains(ev),
            "{ev:?} was shown before the crash and must be replayed"
        );
    }
    assert_increasing(&all);
    let run_idle = all
        .iter()
        .find(|e| has(std::slice::from_ref(e), run, "idle"))
        .unwrap();
    assert_eq!(
        run_idle.data["error"].as_str(),
        Some("Supervisor restarted while the process was running.")
    );
}

#[test]
fn trimmed_history_yields_reset() {
    let d = Daemon::options().env("CYRNEL_EVENT_RETENTION", "3").start();
    let mut last = 0;
    for _ in 0..10 {
        last = d.create_with("true", r#""autorun":false"#);
    }
    let mut s = open(&d, "/events?since=1", &[]);
    let evs = s.read_until("reset", |body| {
        let text = String::from_utf8_lossy(body);
        text.contains("\n\n").then(|| text.to_string())
    });
    assert!(evs.starts_with("id: 10\nevent: reset\ndata: {"), "{evs:?}");
    drop(s);
    // Within retention: a plain replay.
    let mut s = open(&d, "/events?since=9", &[]);
    let evs = read_events(&mut s, "event 10", |e| !e.is_empty());
    assert_eq!((evs[0].id, evs[0].event.as_str()), (10, "idle"));
    assert_eq!(evs[0].data["id"].as_i64(), Some(last));
    // From the future (another data dir's ids): reset too.
    let mut s = open(&d, "/events?since=999", &[]);
    s.read_until("reset", |body| {
        String::from_utf8_lossy(body)
            .contains("event: reset")
            .then_some(())
    });
}

#[test]
fn per_process_streams_carry_only_that_process() {
    let d = Daemon::start();
    let a = d.create_code("echo a");
    let b = d.create_code("echo b");
    d.wait_idle(a);
    d.wait_idle(b);
    let mut s = open(&d, &format!("/processes/{a}/events?since=0"), &[]);
    let evs = read_events(&mut s, "a settled", |e| has(e, a, "idle"));
    assert!(
        evs.iter().all(|e| e.data["id"].as_i64() == Some(a)),
        "{evs:?}"
    );
    assert_eq!(evs.len(), 3, "queued, running, idle: {evs:?}");
    d.get("/processes/999/events")
        .assert_error(404, "Process not found.");
    d.get("/processes/0/events")
        .assert_error(400, "Field 'id' must be a positive integer.");
}

#[test]
fn bad_resume_positions_are_400() {
    let d = Daemon::start();
    d.get("/events?since=-1").assert_error(
        400,
        "Invalid value for 'since': must be a non-negative integer.",
    );
    d.get("/events?since=abc").assert_error(
        400,
        "Invalid value for 'since': must be a non-negative integer.",
    );
    let r = d.raw("GET", "/events", &[("Last-Event-ID", "x")], None);
    r.assert_error(
        400,
        "Invalid value for 'Last-Event-ID': must be a non-negative integer.",
    );
    let r = d.post("/events", "{}");
    assert_eq!(r.status, 405);
}

#[test]
fn idle_streams_get_heartbeats() {
    let d = Daemon::options()
        .env("CYRNEL_EVENT_HEARTBEAT_MS", "20")
        .start();
    let mut s = open(&d, "/events", &[]);
    s.read_until("two keep-alive comments", |body| {
        (parse_sse(body).1 >= 2).then_some(())
    });
}

#[test]
fn graceful_shutdown_sends_the_final_transitions_then_ends_streams() {
    let mut d = Daemon::start();
    let mut s = open(&d, "/events", &[]);
    let id = d.create_code("sleep 300");
    read_events(&mut s, "running", |e| has(e, id, "running"));
    d.stop_gracefully();
    let body = s.read_to_end();
    let (evs, _) = parse_sse(&body);
    let tail: Vec<&str> = evs.iter().skip(2).map(|e| e.event.as_str()).collect();
    assert_eq!(tail, ["terminating", "idle"]);
    assert_eq!(evs[3].data["exitState"].as_str(), Some("canceled"));
    let (_, complete) = s.body();
    assert!(complete, "the stream must end with its terminating chunk");
}

#[test]
fn a_slow_client_is_cut_off_without_slowing_the_daemon_and_resumes_without_loss() {
    let d = Daemon::options().env("CYRNEL_EVENT_BUFFER", "2").start();
    // A client that connects and then reads nothing.
    let mut slow = open(&d, "/events?since=0", &[]);
    // Large records fill the socket buffers quickly: each event carries a
    // 256 KiB ref, 10 MiB in all, more than the kernel buffers in between
    // (a 4 MiB send buffer at most here).
    let big_ref = "r".repeat(256 * 1024);
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(d.create(&format!(
            r#"{{"code":"true","autorun":false,"ref":"{big_ref}"}}"#
        )));
    }
    // Every create was answered although the slow client never read: the
    // supervisor was not held up. Its stream was closed early; what it got
    // is a gapless prefix, and resuming from its last id yields the rest.
    let body = slow.read_to_end();
    let (got, _) = parse_sse(&body);
    assert!(
        got.len() < ids.len(),
        "the stream should have been cut off, got all {}",
        got.len()
    );
    let mut seen: Vec<i64> = got.iter().map(|e| e.data["id"].as_i64().unwrap()).collect();
    assert_eq!(seen, ids[..seen.len()].to_vec(), "a gapless prefix");
    let from = got.last().map(|e| e.id).unwrap_or(0).to_string();
    let mut again = open(&d, "/events", &[("Last-Event-ID", from.as_str())]);
    let last = *ids.last().unwrap();
    let rest = read_events(&mut again, "the rest", |e| has(e, last, "idle"));
    seen.extend(rest.iter().map(|e| e.data["id"].as_i64().unwrap()));
    assert_eq!(seen, ids, "nothing lost, nothing twice");
}

#[test]
fn a_client_disconnecting_at_random_points_gets_the_exact_sequence() {
    let mut d = Daemon::options().env("CYRNEL_MAX_RUNNING", "3").start();
    let mut rng = Lcg(42);
    let mut received: Vec<Ev> = Vec::new();
    let mut last = 0u64;
    // Waits for at least one event after `last`, keeps at most 1..=4 of
    // those that arrived, then hangs up. Callers make sure one exists.
    let resume = |d: &Daemon, received: &mut Vec<Ev>, last: &mut u64, rng: &mut Lcg| {
        let want = 1 + rng.next(4) as usize;
        let from = last.to_string();
        let mut s = open(d, "/events", &[("Last-Event-ID", from.as_str())]);
        let evs = read_events(&mut s, "a next event", |e| !e.is_empty());
        for e in evs.into_iter().take(want) {
            *last = e.id;
            received.push(e);
        }
    };
    let mut ids = Vec::new();
    for round in 0..2 {
        for i in 0..8 {
            let code = if i % 3 == 0 {
                "sleep 300"
            } else {
                "echo $CYRNEL_PROCESS_ID"
            };
            ids.push(d.create_code(code));
            resume(&d, &mut received, &mut last, &mut rng);
        }
        for &id in &ids {
            if d.record(id)["state"].as_str() == Some("running") {
                d.kill(id);
            }
        }
        for &id in &ids {
            d.wait_idle(id);
        }
        if round == 0 {
            d.restart_same_dir();
        }
    }
    for &id in &ids {
        let rec = d.wait_idle(id);
        if rec["exitState"].is_null() {
            panic!("{id} did not settle: {rec}");
        }
    }
    // Everything is idle now, so the newest id is fixed; a resume from
    // beyond it answers with a reset carrying that id.
    let mut probe = open(&d, "/events?since=18446744073709551615", &[]);
    let newest = read_events(&mut probe, "the reset", |e| !e.is_empty())[0].id;
    // Catch up on whatever is left, still in small bites.
    while last < newest {
        resume(&d, &mut received, &mut last, &mut rng);
    }
    let mut s = open(&d, "/events?since=0", &[]);
    let full = read_events(&mut s, "full history", |e| {
        e.last().is_some_and(|l| l.id == newest)
    });
    assert_eq!(
        received, full,
        "resumed reads must equal the full ordered history"
    );
    assert_increasing(&received);
    for &id in &ids {
        let last_ev = received
            .iter()
            .rev()
            .find(|e| e.data["id"].as_i64() == Some(id))
            .unwrap();
        assert_eq!(last_ev.event, "idle");
        assert_eq!(
            last_ev.data,
            d.record(id),
            "the last event of {id} is its record"
        );
    }
}

#[test]
fn a_client_that_stops_reading_does_not_delay_kills_elsewhere() {
    let d = Daemon::options().env("CYRNEL_EVENT_BUFFER", "2").start();
    let _stuck = open(&d, "/events?since=0", &[]);
    let big_ref = "r".repeat(256 * 1024);
    for _ in 0..40 {
        d.create(&format!(
            r#"{{"code":"true","autorun":false,"ref":"{big_ref}"}}"#
        ));
    }
    let id = d.create_code("sleep 300");
    let pid = d.wait_running_pid(id);
    let r = d.kill(id);
    assert_eq!(r.status, 200, "{r}");
    assert_outcome_canceled(&d.wait_idle(id));
    assert_group_gone(pid);
}

fn assert_outcome_canceled(rec: &Json) {
    assert_eq!(rec["exitState"].as_str(), Some("canceled"), "{rec}");
}
