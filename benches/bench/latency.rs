//! Section `latency`: kill, timeout and event latencies.

use crate::*;

/// Whether `pid` ignores SIGTERM (bit 15 of `SigIgn` in /proc/pid/status).
pub(crate) fn ignores_term(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

/// The state letter of a process from /proc (`None`: gone).
pub(crate) fn proc_state(pid: i32) -> Option<u8> {
    let s = fs::read(format!("/proc/{pid}/stat")).ok()?;
    let close = s.iter().rposition(|&b| b == b')')?;
    s.get(close + 2).copied()
}

pub(crate) fn dead(pid: i32) -> bool {
    matches!(proc_state(pid), None | Some(b'Z') | Some(b'X'))
}

/// What one walk over every process's `/proc/<pid>/stat` costs here (the
/// way a supervisor without cgroup events finds a group's members): the
/// number of processes on the host and the median of 5 walks, in ms.
pub(crate) fn proc_scan_cost() -> (usize, f64) {
    let mut times = Vec::new();
    let mut count = 0;
    for _ in 0..5 {
        let t0 = Instant::now();
        count = 0;
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            if let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                if fs::read(format!("/proc/{pid}/stat")).is_ok() {
                    count += 1;
                }
            }
        }
        times.push(ms(t0.elapsed()));
    }
    (count, summarize(&times).p50)
}

/// When each part of a kill happened, in ms after the kill request was sent.
pub(crate) struct KillParts {
    pub(crate) reply: Vec<f64>,
    pub(crate) leader_dead: Vec<f64>,
    pub(crate) group_dead: Vec<f64>,
    pub(crate) idle_event: Vec<f64>,
}

/// Diagnostic pass (not part of the headline numbers): kills runs whose
/// group is `sh` + `sleep` while a thread watches both pids in /proc every
/// ~50 µs, to split kill → idle into: the 200 reply (terminating is
/// durable), the leader's death, the whole group's death, and the `idle`
/// event. Whatever comes after the group's death is the daemon noticing and
/// persisting it.
pub(crate) async fn kill_breakdown(
    http: &mut Http,
    ev: &Events,
    samples: usize,
    body: Bytes,
    wait_term_ignored: bool,
) -> KillParts {
    let mut parts = KillParts {
        reply: Vec::new(),
        leader_dead: Vec::new(),
        group_dead: Vec::new(),
        idle_event: Vec::new(),
    };
    for _ in 0..samples {
        let id = http.create(body.clone()).await.expect("create");
        let leader = ev.seen(id, "running").await.pid.expect("pid");
        // The shell's child (`sleep`), once it is forked.
        let t_wait = Instant::now();
        let child = loop {
            let kids = fs::read_to_string(format!("/proc/{leader}/task/{leader}/children"))
                .unwrap_or_default();
            if let Some(c) = kids
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<i32>().ok())
            {
                if !wait_term_ignored || (ignores_term(leader) && ignores_term(c)) {
                    break c;
                }
            }
            assert!(
                t_wait.elapsed() < Duration::from_secs(10),
                "process {id}: no child"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        let t1 = Instant::now();
        let watcher = std::thread::spawn(move || {
            let (mut leader_at, mut child_at) = (None, None);
            while t1.elapsed() < Duration::from_secs(10) {
                if leader_at.is_none() && dead(leader) {
                    leader_at = Some(Instant::now());
                }
                if child_at.is_none() && dead(child) {
                    child_at = Some(Instant::now());
                }
                if let (Some(l), Some(c)) = (leader_at, child_at) {
                    return (l, c);
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            panic!("group of {leader} still alive 10 s after the kill");
        });
        http.kill(id).await.expect("kill");
        let t_reply = Instant::now();
        let idle = ev.seen(id, "idle").await;
        let (leader_at, child_at) = tokio::task::spawn_blocking(move || watcher.join())
            .await
            .expect("join")
            .expect("watcher");
        parts.reply.push(ms(t_reply - t1));
        parts.leader_dead.push(ms(leader_at - t1));
        parts.group_dead.push(ms(leader_at.max(child_at) - t1));
        parts.idle_event.push(ms(idle.at - t1));
    }
    parts
}

/// Per kill: from the group's death to the `idle` event.
pub(crate) fn group_dead_to_event(p: &KillParts) -> Vec<f64> {
    p.idle_event
        .iter()
        .zip(&p.group_dead)
        .map(|(i, g)| i - g)
        .collect()
}

pub(crate) fn parts_json(p: &KillParts) -> Value {
    let after = group_dead_to_event(p);
    json!({
        "samples": p.reply.len(),
        "kill_sent_to_200": summarize(&p.reply).json(),
        "kill_sent_to_leader_dead": summarize(&p.leader_dead).json(),
        "kill_sent_to_group_dead": summarize(&p.group_dead).json(),
        "kill_sent_to_idle_event": summarize(&p.idle_event).json(),
        "group_dead_to_idle_event": summarize(&after).json(),
    })
}

pub(crate) fn parts_line(p: &KillParts) -> String {
    let after = group_dead_to_event(p);
    let (r, l, g, i, a) = (
        summarize(&p.reply),
        summarize(&p.leader_dead),
        summarize(&p.group_dead),
        summarize(&p.idle_event),
        summarize(&after),
    );
    format!(
        "200 reply {} / {}, leader dead {} / {}, group dead {} / {}, idle event {} / {} ms (group dead → idle event {} / {} ms)",
        fmt_ms(r.p50),
        fmt_ms(r.p99),
        fmt_ms(l.p50),
        fmt_ms(l.p99),
        fmt_ms(g.p50),
        fmt_ms(g.p99),
        fmt_ms(i.p50),
        fmt_ms(i.p99),
        fmt_ms(a.p50),
        fmt_ms(a.p99)
    )
}

pub(crate) async fn bench_latency(k: &Knobs, d: &Daemon, ev: &Events, rep: &mut Report) {
    let n = k.latency_samples;
    let mut http = Http::connect(d.addr()).await.expect("connect");

    progress!("latency: {n} × create `sleep 1000` → running, kill → idle (one at a time)");
    let body = Bytes::from_static(br#"{"code":"sleep 1000","options":{"timeout":null}}"#);
    let (mut to_running, mut to_created, mut to_idle) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 10 {
        let t0 = Instant::now();
        let id = http.create(body.clone()).await.expect("create");
        let t_created = Instant::now();
        let running = ev.seen(id, "running").await;
        let t1 = Instant::now();
        http.kill(id).await.expect("kill");
        let idle = ev.seen(id, "idle").await;
        assert_eq!(idle.exit_state.as_deref(), Some("canceled"), "process {id}");
        if i >= 10 {
            // The first few warm up connections, caches and the allocator.
            to_running.push(ms(running.at - t0));
            to_created.push(ms(t_created - t0));
            to_idle.push(ms(idle.at - t1));
        }
        if (i + 1) % 100 == 0 {
            progress!("latency: {} cooperative samples", i + 1);
        }
    }
    let to_running = summarize(&to_running);
    let to_created = summarize(&to_created);
    let to_idle = summarize(&to_idle);
    progress!(
        "latency: create → running p50 {:.2} ms p99 {:.2} ms; kill → idle p50 {:.2} ms p99 {:.2} ms",
        to_running.p50,
        to_running.p99,
        to_idle.p50,
        to_idle.p99
    );
    ev.clear_seen();

    let grace = k.kill_grace_ms as f64;
    progress!("latency: {n} × TERM-ignoring process, kill → idle minus the {grace} ms grace");
    let body =
        Bytes::from_static(br#"{"code":"trap '' TERM; sleep 1000","options":{"timeout":null}}"#);
    let mut overshoot = Vec::new();
    for i in 0..n + 5 {
        let id = http.create(body.clone()).await.expect("create");
        let running = ev.seen(id, "running").await;
        let pid = running.pid.expect("running record has a pid");
        // Kill only once the shell has installed its trap; until then a
        // SIGTERM would end it at once.
        let t_wait = Instant::now();
        while !ignores_term(pid) {
            assert!(
                t_wait.elapsed() < Duration::from_secs(10),
                "pid {pid} never ignored SIGTERM"
            );
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let t1 = Instant::now();
        http.kill(id).await.expect("kill");
        let idle = ev.seen(id, "idle").await;
        assert_eq!(idle.exit_state.as_deref(), Some("canceled"), "process {id}");
        if i >= 5 {
            overshoot.push(ms(idle.at - t1) - grace);
        }
        if (i + 1) % 100 == 0 {
            progress!("latency: {} escalation samples", i + 1);
        }
    }
    let overshoot = summarize(&overshoot);
    progress!(
        "latency: escalation overshoot p50 {:.2} ms p99 {:.2} ms",
        overshoot.p50,
        overshoot.p99
    );
    ev.clear_seen();

    progress!("events: {n} × create (autorun:false) → its event on /events");
    let body = Bytes::from_static(br#"{"code":"true","autorun":false}"#);
    let (mut to_event, mut to_reply, mut reply_to_event) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 10 {
        let t0 = Instant::now();
        let id = http.create(body.clone()).await.expect("create");
        let t1 = Instant::now();
        let seen = ev.seen(id, "idle").await;
        if i >= 10 {
            to_event.push(ms(seen.at - t0));
            to_reply.push(ms(t1 - t0));
            reply_to_event.push(if seen.at >= t1 {
                ms(seen.at - t1)
            } else {
                -ms(t1 - seen.at)
            });
        }
    }
    let to_event = summarize(&to_event);
    let to_reply = summarize(&to_reply);
    let reply_to_event = summarize(&reply_to_event);
    progress!(
        "events: create sent → event received p50 {:.2} ms p99 {:.2} ms (→ 201: p50 {:.2} p99 {:.2}; 201 → event p50 {:.2} p99 {:.2})",
        to_event.p50,
        to_event.p99,
        to_reply.p50,
        to_reply.p99,
        reply_to_event.p50,
        reply_to_event.p99
    );
    ev.clear_seen();

    let (procs, scan_ms) = tokio::task::spawn_blocking(proc_scan_cost)
        .await
        .expect("scan");
    progress!("latency: {procs} processes on the host; one /proc stat walk takes {scan_ms:.2} ms");
    let diag = k.latency_samples.min(100);
    progress!("latency: diagnostic pass, {diag} cooperative kills with /proc watched (not in the headline numbers)");
    let coop_parts = kill_breakdown(
        &mut http,
        ev,
        diag,
        Bytes::from_static(br#"{"code":"sleep 1000","options":{"timeout":null}}"#),
        false,
    )
    .await;
    progress!(
        "latency: cooperative kill, p50 / p99 after the request: {}",
        parts_line(&coop_parts)
    );
    progress!("latency: diagnostic pass, {diag} escalated kills with /proc watched");
    let esc_parts = kill_breakdown(
        &mut http,
        ev,
        diag,
        Bytes::from_static(br#"{"code":"trap '' TERM; sleep 1000","options":{"timeout":null}}"#),
        true,
    )
    .await;
    progress!(
        "latency: escalated kill, p50 / p99 after the request: {}",
        parts_line(&esc_parts)
    );
    ev.clear_seen();

    rep.row("create → `running` (`sleep`), p50 / p99", to_running.cell())
        .baseline(format!("its 201 reply: {}", to_created.cell()));
    rep.row(
        "kill → `idle` (cooperative `sleep`), p50 / p99",
        to_idle.cell(),
    )
    .meets(Target::at_most(
        "kill -> idle p99 (ms)",
        to_idle.p99,
        10.0,
        "ms",
    ));
    rep.row(
        &format!(
            "kill → `idle` minus {} ms grace (TERM ignored), p50 / p99",
            k.kill_grace_ms
        ),
        overshoot.cell(),
    )
    .meets(Target::at_most(
        "escalation overshoot p99 (ms)",
        overshoot.p99,
        20.0,
        "ms",
    ));
    rep.row(
        "create sent → its event on `/events`, p50 / p99",
        to_event.cell(),
    )
    .baseline(format!("201 reply: {}", to_reply.cell()));
    rep.json.insert(
        "latency".into(),
        json!({
            "create_to_running": to_running.json(),
            "create_to_201": to_created.json(),
            "kill_breakdown_cooperative": parts_json(&coop_parts),
            "kill_breakdown_escalated": parts_json(&esc_parts),
            "host_processes": procs,
            "proc_stat_walk_ms": r3(scan_ms),
            "kill_to_idle": to_idle.json(),
            "kill_to_idle_target_p99_ms": 10.0,
            "kill_to_idle_met": to_idle.p99 <= 10.0,
            "kill_grace_ms": k.kill_grace_ms,
            "escalation_overshoot": overshoot.json(),
            "escalation_overshoot_target_p99_ms": 20.0,
            "escalation_overshoot_met": overshoot.p99 <= 20.0,
        }),
    );
    rep.json.insert(
        "events".into(),
        json!({
            "create_sent_to_event": to_event.json(),
            "create_sent_to_201": to_reply.json(),
            "reply_to_event": reply_to_event.json(),
            "stream_reconnects": ev.reconnects(),
        }),
    );
}
