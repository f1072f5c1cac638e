//! Section `churn`: spawn throughput after many runs were created, ran and deleted.

use crate::*;

/// `GET /processes/{id}`'s `sandbox` field: the isolation level the run got.
pub(crate) async fn sandbox_level(addr: SocketAddr, id: u64) -> String {
    let mut http = Http::connect(addr).await.expect("connect");
    let body = http
        .expect_ok(Method::GET, &format!("/processes/{id}"), None)
        .await
        .expect("GET a record");
    let v: Value = serde_json::from_slice(&body).expect("record JSON");
    v["sandbox"].as_str().unwrap_or("(absent)").to_string()
}

/// Fails loudly when a root harness measured runs that were not at level
/// `full`: the figures would not be those of the isolated daemon.
pub(crate) fn require_full(section: &str, level: &str) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && level != "full" {
        panic!(
            "{section}: the runs measured got sandbox level {level:?}, not \"full\", although the harness runs as root"
        );
    }
}

/// What a directory tree holds: inodes (every entry, directories and the
/// top one included), allocated bytes (on disk) and apparent bytes.
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Usage {
    pub(crate) inodes: u64,
    pub(crate) allocated: u64,
    pub(crate) apparent: u64,
}

impl Usage {
    pub(crate) fn of(path: &Path) -> Usage {
        let Ok(md) = fs::symlink_metadata(path) else {
            return Usage::default();
        };
        let mut u = Usage::default();
        u.add(&md);
        walk_tree(path, |md| u.add(md));
        u
    }

    pub(crate) fn add(&mut self, md: &fs::Metadata) {
        self.inodes += 1;
        self.allocated += md.blocks() * 512;
        self.apparent += md.len();
    }

    pub(crate) fn json(&self) -> Value {
        json!({"inodes": self.inodes, "bytes_on_disk": self.allocated, "bytes_apparent": self.apparent})
    }
}

/// Open descriptors of a process (its `/proc/<pid>/fd` entries): all of
/// them, and those whose link reads `/` or `/tmp`: the daemon's `O_PATH`
/// descriptor on the root (level `full`'s Landlock rule) and every
/// level-`full` run folder it holds (a tmpfs that reads `/` while
/// detached and `/tmp` once the run mounted it there).
pub(crate) fn fd_count(pid: u32) -> (usize, usize) {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let (mut all, mut root) = (0, 0);
    for e in dir.flatten() {
        all += 1;
        if fs::read_link(e.path()).is_ok_and(|l| l == Path::new("/") || l == Path::new("/tmp")) {
            root += 1;
        }
    }
    (all, root)
}

/// The run folder base a daemon on `data_dir` uses on `/dev/shm` (levels
/// `landlock` and `none`; created at every level): `/dev/shm/cyrnel-<hash>`.
pub(crate) fn shm_runs_base(data_dir: &Path) -> PathBuf {
    let data_dir = fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_path_buf());
    cyrnel::proc::sandbox::shm_runs_base(&data_dir)
}

/// What a daemon leaves on the host: its data dir, and its `/dev/shm` run
/// folder base.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Footprint {
    pub(crate) data: Usage,
    pub(crate) shm: Usage,
}

impl Footprint {
    pub(crate) fn of(data_dir: &Path) -> Footprint {
        Footprint {
            data: Usage::of(data_dir),
            shm: Usage::of(&shm_runs_base(data_dir)),
        }
    }

    pub(crate) fn inodes(&self) -> u64 {
        self.data.inodes + self.shm.inodes
    }

    pub(crate) fn allocated(&self) -> u64 {
        self.data.allocated + self.shm.allocated
    }

    pub(crate) fn apparent(&self) -> u64 {
        self.data.apparent + self.shm.apparent
    }

    pub(crate) fn json(&self) -> Value {
        json!({"data_dir": self.data.json(), "shm_runs_base": self.shm.json()})
    }
}

/// Creates `total` runs (autorun; `body(i)` for the i-th) from `clients` connections,
/// waits until every one is idle; returns the ids and how many did not end
/// in `success`. Progress every 10 s.
pub(crate) async fn run_many(
    section: &'static str,
    d: &Daemon,
    ev: &Events,
    clients: usize,
    total: u64,
    body: fn(u64) -> Bytes,
) -> (Vec<u64>, usize) {
    let idle0 = ev.count("idle");
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for mut http in connect_many(d.addr(), clients).await {
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                ids.push(http.create_queued(body(i)).await.expect("create"));
            }
            ids
        }));
    }
    let reporter = {
        let shared = ev.shared.clone();
        tokio::spawn(async move {
            let t0 = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let idle = {
                    let st = shared.st.lock().expect("events lock");
                    st.counts.get("idle").copied().unwrap_or(0) - idle0
                };
                progress!(
                    "{section}: {idle} / {total} runs idle after {:.0} s",
                    t0.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut ids = Vec::with_capacity(total as usize);
    for t in tasks {
        ids.extend(t.await.expect("client task"));
    }
    ev.wait_count("idle", idle0 + total, Duration::from_secs(3600))
        .await;
    reporter.abort();
    let not_success = ev.not_success(&ids);
    ev.clear_seen();
    ids.sort_unstable();
    (ids, not_success)
}

pub(crate) async fn bench_churn(k: &Knobs, bin: &Path, root: &Path, rep: &mut Report) {
    let n = k.churn_runs;
    let clients = k.spawn_clients;
    let grace = k.kill_grace_ms.to_string();
    let mut d = Daemon::start(
        bin,
        root,
        "churn",
        &[
            ("CYRNEL_KILL_GRACE_MS", grace.as_str()),
            ("CYRNEL_EVENT_BUFFER", "8192"),
        ],
    )
    .await;
    let ev = Events::open(d.addr()).await;
    let before = Footprint::of(&d.data_dir);
    progress!(
        "churn: {n} runs of `true` (autorun) from {clients} clients until all are idle, then DELETE each"
    );
    let t0 = Instant::now();
    let (ids, not_success) = run_many("churn", &d, &ev, clients, n, |_| {
        Bytes::from_static(br#"{"code":"true"}"#)
    })
    .await;
    let ran_s = t0.elapsed().as_secs_f64();
    let level = sandbox_level(d.addr(), ids[0]).await;
    require_full("churn", &level);
    progress!(
        "churn: {n} runs idle after {ran_s:.1} s ({:.0}/s; {not_success} not success; level {level})",
        n as f64 / ran_s
    );
    let t1 = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for mut http in connect_many(d.addr(), clients).await {
        let (next, ids) = (next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                http.expect_ok(Method::DELETE, &format!("/processes/{id}"), None)
                    .await
                    .expect("DELETE");
            }
        }));
    }
    for t in tasks {
        t.await.expect("delete task");
    }
    let deleted_s = t1.elapsed().as_secs_f64();
    ev.clear_seen();
    let after = Footprint::of(&d.data_dir);
    progress!(
        "churn: deleted {n} in {deleted_s:.1} s; data dir {} → {} inodes, /dev/shm base {} → {} inodes",
        before.data.inodes,
        after.data.inodes,
        before.shm.inodes,
        after.shm.inodes
    );
    let rounds = k.spawn_rounds.max(1);
    let runs = k.spawn_runs;
    let mut all = Vec::new();
    for round in 1..=rounds {
        let r = spawn_round(runs, clients, &d, &ev).await;
        progress!(
            "churn: round {round}/{rounds}: baseline {:.0} spawns/s; daemon {:.0} runs/s ({} not success); ratio {:.2} (in machine CPU {:.2}); machine {:.0} % busy ({:.0} % stolen)",
            r.base_rate,
            r.rate,
            r.not_success,
            r.ratio(),
            r.cpu_ratio(),
            r.machine_busy * 100.0,
            r.machine_steal * 100.0
        );
        all.push(r);
    }
    let level_after = sandbox_level(d.addr(), all[0].first_id).await;
    require_full("churn", &level_after);
    drop(ev);
    d.stop().await;
    let rate = median(all.iter().map(|r| r.rate).collect());
    let base_rate = median(all.iter().map(|r| r.base_rate).collect());
    let ratio = median(all.iter().map(SpawnRound::ratio).collect());
    let label = if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    };
    rep.row(
        &format!(
            "Spawn throughput right after {label} runs were created, ran and deleted, level `{level_after}`, {clients} clients"
        ),
        format!("{} runs/s", fmt_rate(rate)),
    )
    .baseline(format!(
        "{} spawns/s (`/bin/sh -c true`, {clients} threads)",
        fmt_rate(base_rate)
    ))
    .ratio(ratio)
    .meets(Target::at_least(
        &format!("spawn throughput ratio after {label} deleted runs"),
        ratio,
        0.5,
    ));
    rep.json.insert(
        "churn".into(),
        json!({
            "runs_created_ran_deleted": n, "clients": clients, "sandbox": level_after,
            "ran_s": r3(ran_s), "ran_not_success": not_success, "delete_s": r3(deleted_s),
            "footprint_before": before.json(), "footprint_after_delete": after.json(),
            "daemon_runs_per_s": r3(rate), "baseline_spawns_per_s": r3(base_rate),
            "ratio": r3(ratio), "ratio_is": "median of the per-round ratios",
            "cpu_ratio": r3(median(all.iter().map(SpawnRound::cpu_ratio).collect())),
            "per_round": all.iter().map(|r| json!({
                "baseline_spawns_per_s": r3(r.base_rate), "daemon_runs_per_s": r3(r.rate),
                "ratio": r3(r.ratio()), "cpu_ratio": r3(r.cpu_ratio()),
                "machine_cpu_ms_per_raw_spawn": r3(r.base_cpu_ms),
                "machine_cpu_ms_per_run": r3(r.run_cpu_ms),
                "not_success": r.not_success,
                "daemon_cpu_s": r3(r.daemon_cpu_s), "machine_busy": r3(r.machine_busy),
                "machine_steal": r3(r.machine_steal),
            })).collect::<Vec<_>>(),
        }),
    );
}
