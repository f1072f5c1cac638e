//! Section `spawn`: spawn throughput through the API against raw fork/exec.

use crate::*;

/// One raw, unsandboxed `/bin/sh -c true` (no stdio), waited for: the
/// baseline's unit.
pub(crate) fn raw_spawn() -> std::io::Result<std::process::ExitStatus> {
    Command::new("/bin/sh")
        .args(["-c", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
}

/// The baseline: `total` spawns of `/bin/sh -c true` from `workers` threads,
/// each waited for. No HTTP, no database.
pub(crate) fn spawn_baseline(total: usize, workers: usize) -> Duration {
    let next = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let threads: Vec<_> = (0..workers)
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < total {
                    let status = raw_spawn().expect("spawn /bin/sh");
                    assert!(status.success());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("spawn thread");
    }
    t0.elapsed()
}

/// Creates `total` processes with `body` from `clients` concurrent
/// connections; returns the ids in creation order.
pub(crate) async fn create_many(
    addr: SocketAddr,
    clients: usize,
    total: usize,
    body: Bytes,
) -> Vec<u64> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for mut http in connect_many(addr, clients).await {
        let next = next.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                ids.push(http.create(body.clone()).await.expect("create"));
            }
            ids
        }));
    }
    let mut ids = Vec::with_capacity(total);
    for t in tasks {
        ids.extend(t.await.expect("client task"));
    }
    ids.sort_unstable();
    ids
}

/// Jiffies of the whole machine from /proc/stat: (busy, total, steal).
/// Busy is everything but idle and iowait; steal is the time the
/// hypervisor gave to other guests.
pub(crate) fn machine_jiffies() -> (u64, u64, u64) {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0, 0);
    };
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let total: u64 = f.iter().take(8).sum();
    let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
    // Time the hypervisor ran something else while this machine wanted
    // to run (counted as busy above): on a shared host it moves both
    // sides of a ratio, round by round.
    let steal = f.get(7).copied().unwrap_or(0);
    (total - idle, total, steal)
}

/// CPU seconds used by this harness process so far.
pub(crate) fn harness_cpu_secs() -> f64 {
    cpu_secs_of("/proc/self/stat").0
}

/// One round of the daemon side: `runs` creates of `true` with autorun
/// from `clients` connections, timed until the last `idle` event.
pub(crate) struct SpawnRound {
    pub(crate) base_rate: f64,
    pub(crate) rate: f64,
    pub(crate) created_s: f64,
    pub(crate) elapsed_s: f64,
    pub(crate) not_success: usize,
    pub(crate) daemon_cpu_s: f64,
    pub(crate) children_cpu_s: f64,
    /// The harness's own CPU (HTTP clients and the event stream).
    pub(crate) harness_cpu_s: f64,
    /// Share of both cores busy (not idle, not iowait) during the daemon side.
    pub(crate) machine_busy: f64,
    /// Of the machine's time in the round, the share the hypervisor gave
    /// to other guests (`steal` in /proc/stat).
    pub(crate) machine_steal: f64,
    /// Machine CPU (both cores, busy jiffies: everything that ran) per
    /// raw spawn in the baseline, and per run on the daemon side, in ms.
    /// Their quotient is what the ratio would be if neither side ever
    /// waited; both move with the host (VM exits).
    pub(crate) base_cpu_ms: f64,
    pub(crate) run_cpu_ms: f64,
    pub(crate) first_id: u64,
}

impl SpawnRound {
    pub(crate) fn ratio(&self) -> f64 {
        self.rate / self.base_rate
    }

    /// Raw spawn's machine CPU over a run's: the ratio in CPU terms.
    pub(crate) fn cpu_ratio(&self) -> f64 {
        self.base_cpu_ms / self.run_cpu_ms
    }
}

/// Busy jiffies between two readings of [`machine_jiffies`], in ms.
fn busy_ms(from: (u64, u64, u64), to: (u64, u64, u64)) -> f64 {
    to.0.saturating_sub(from.0) as f64 * 1000.0 / ticks_per_sec()
}

pub(crate) async fn spawn_round(
    runs: usize,
    clients: usize,
    d: &Daemon,
    ev: &Events,
) -> SpawnRound {
    let b0 = machine_jiffies();
    let base = tokio::task::spawn_blocking(move || spawn_baseline(runs, clients))
        .await
        .expect("baseline");
    let b1 = machine_jiffies();
    let base_rate = runs as f64 / base.as_secs_f64();
    let body = Bytes::from_static(br#"{"code":"true"}"#);
    let idle0 = ev.count("idle");
    let cpu0 = d.cpu_secs();
    let (h0, m0) = (harness_cpu_secs(), machine_jiffies());
    let t0 = Instant::now();
    let ids = create_many(d.addr(), clients, runs, body).await;
    let created = t0.elapsed();
    let done = ev
        .wait_count("idle", idle0 + runs as u64, Duration::from_secs(600))
        .await;
    let elapsed = done - t0;
    let cpu1 = d.cpu_secs();
    let (h1, m1) = (harness_cpu_secs(), machine_jiffies());
    let not_success = ev.not_success(&ids);
    SpawnRound {
        base_rate,
        rate: runs as f64 / elapsed.as_secs_f64(),
        created_s: created.as_secs_f64(),
        elapsed_s: elapsed.as_secs_f64(),
        not_success,
        daemon_cpu_s: cpu1.0 - cpu0.0,
        children_cpu_s: cpu1.1 - cpu0.1,
        harness_cpu_s: h1 - h0,
        machine_busy: (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64,
        machine_steal: (m1.2 - m0.2) as f64 / (m1.1 - m0.1).max(1) as f64,
        base_cpu_ms: busy_ms(b0, b1) / runs as f64,
        run_cpu_ms: busy_ms(m0, m1) / runs as f64,
        first_id: ids[0],
    }
}

/// The median of a few values (the upper one of the middle two).
pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) async fn bench_spawn(k: &Knobs, d: &Daemon, ev: &Events, rep: &mut Report) -> u64 {
    let (runs, clients, rounds) = (k.spawn_runs, k.spawn_clients, k.spawn_rounds.max(1));
    progress!("spawn: warm-up, 64 × `/bin/sh -c true` and 64 runs through the daemon");
    spawn_baseline(64, clients);
    let idle0 = ev.count("idle");
    create_many(
        d.addr(),
        clients,
        64,
        Bytes::from_static(br#"{"code":"true"}"#),
    )
    .await;
    ev.wait_count("idle", idle0 + 64, Duration::from_secs(60))
        .await;
    // Idle clients, as a daemon that serves many has: each one a
    // descriptor the daemon holds while it spawns.
    let idle = k.spawn_idle;
    let idle_clients = connect_many(d.addr(), idle).await;
    if idle > 0 {
        progress!("spawn: {idle} idle keep-alive connections held open during the rounds");
    }
    // Baseline and daemon alternate, so that a change in the machine's
    // speed during the section (shared, noisy hosts) hits both sides.
    let mut all = Vec::new();
    for round in 1..=rounds {
        progress!(
            "spawn: round {round}/{rounds}: baseline {runs} × `/bin/sh -c true` from {clients} threads, then {runs} runs of `true` (autorun) from {clients} HTTP clients until all are idle"
        );
        let r = spawn_round(runs, clients, d, ev).await;
        progress!(
            "spawn: round {round}: baseline {:.0} spawns/s; daemon {:.0} runs/s ({:.2} s; all 201s after {:.2} s; {} not success); ratio {:.2}; machine CPU {:.3} ms per raw spawn, {:.3} ms per run (ratio {:.2}); CPU: daemon {:.2} s, children {:.2} s, harness {:.2} s, machine {:.0} % busy ({:.0} % stolen)",
            r.base_rate,
            r.rate,
            r.elapsed_s,
            r.created_s,
            r.not_success,
            r.ratio(),
            r.base_cpu_ms,
            r.run_cpu_ms,
            r.cpu_ratio(),
            r.daemon_cpu_s,
            r.children_cpu_s,
            r.harness_cpu_s,
            r.machine_busy * 100.0,
            r.machine_steal * 100.0
        );
        all.push(r);
    }
    drop(idle_clients);
    let rate = median(all.iter().map(|r| r.rate).collect());
    let base_rate = median(all.iter().map(|r| r.base_rate).collect());
    let ratio = median(all.iter().map(SpawnRound::ratio).collect());
    let cpu_ratio = median(all.iter().map(SpawnRound::cpu_ratio).collect());
    let not_success: usize = all.iter().map(|r| r.not_success).sum();
    let level = sandbox_level(d.addr(), all[0].first_id).await;
    progress!(
        "spawn: median of {rounds} rounds: daemon {rate:.0} runs/s, baseline {base_rate:.0} spawns/s, ratio {ratio:.2} (in machine CPU {cpu_ratio:.2}); {not_success} not success; sandbox level of the runs: {level}"
    );
    require_full("spawn", &level);
    rep.row(
        &format!(
            "Spawn throughput: runs of `true`, level `{level}`, {clients} clients{}, until idle",
            if idle > 0 {
                format!(" ({idle} more idle)")
            } else {
                String::new()
            }
        ),
        format!("{} runs/s", fmt_rate(rate)),
    )
    .baseline(format!(
        "{} spawns/s (`/bin/sh -c true`, {clients} threads)",
        fmt_rate(base_rate)
    ))
    .ratio(ratio)
    .meets(Target::at_least("spawn throughput ratio", ratio, 0.5));
    let per_round: Vec<_> = all
        .iter()
        .map(|r| {
            json!({
                "baseline_spawns_per_s": r3(r.base_rate),
                "daemon_runs_per_s": r3(r.rate),
                "ratio": r3(r.ratio()),
                "machine_cpu_ms_per_raw_spawn": r3(r.base_cpu_ms),
                "machine_cpu_ms_per_run": r3(r.run_cpu_ms),
                "cpu_ratio": r3(r.cpu_ratio()),
                "daemon_elapsed_s": r3(r.elapsed_s),
                "all_created_after_s": r3(r.created_s),
                "not_success": r.not_success,
                "daemon_cpu_s": r3(r.daemon_cpu_s),
                "children_cpu_s": r3(r.children_cpu_s),
                "harness_cpu_s": r3(r.harness_cpu_s),
                "machine_busy": r3(r.machine_busy),
                "machine_steal": r3(r.machine_steal),
            })
        })
        .collect();
    rep.json.insert(
        "spawn".into(),
        json!({
            "runs": runs, "clients": clients, "rounds": rounds, "sandbox": level,
            "idle_connections": idle,
            "daemon_runs_per_s": r3(rate), "baseline_spawns_per_s": r3(base_rate),
            "ratio": r3(ratio), "ratio_is": "median of the per-round ratios",
            "cpu_ratio": r3(cpu_ratio),
            "cpu_ratio_is": "median per round of machine CPU per raw spawn over machine CPU per run (busy jiffies of /proc/stat, both cores, everything that ran)",
            "not_success": not_success,
            "target_ratio": 0.5, "met": ratio >= 0.5,
            "per_round": per_round,
        }),
    );
    all[0].first_id
}
