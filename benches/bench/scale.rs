//! Section `scale`: creates, reads and lists at a million records.

use crate::*;

/// A scale record that runs: `true` with autorun, `ref` as in `scale_body`.
pub(crate) fn scale_run_body(i: u64) -> Bytes {
    Bytes::from(format!(r#"{{"code":"true","ref":"r{}"}}"#, i % 100))
}

pub(crate) fn scale_body(i: u64) -> Bytes {
    Bytes::from(format!(
        r#"{{"code":"true","autorun":false,"ref":"r{}"}}"#,
        i % 100
    ))
}

/// Creates (autorun:false) one at a time, alternating between two daemons so
/// that both see the same disk and CPU conditions; the latency of each 201.
pub(crate) async fn create_latency_pair(
    a: &mut Http,
    b: &mut Http,
    n: usize,
) -> (Summary, Summary) {
    let (mut la, mut lb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n as u64 {
        for (http, lat) in [(&mut *a, &mut la), (&mut *b, &mut lb)] {
            let body = scale_body(i);
            let t0 = Instant::now();
            http.create(body).await.expect("create");
            lat.push(ms(t0.elapsed()));
        }
    }
    (summarize(&la), summarize(&lb))
}

/// Latencies of `GET path` for each path `paths` yields, one at a time.
pub(crate) async fn get_latency(
    http: &mut Http,
    n: usize,
    mut path: impl FnMut() -> String,
) -> Summary {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let p = path();
        let t0 = Instant::now();
        let (status, _) = http.get(&p).await.expect("GET");
        lat.push(ms(t0.elapsed()));
        assert_eq!(status, StatusCode::OK, "GET {p}");
    }
    summarize(&lat)
}

pub(crate) struct ReadLatencies {
    pub(crate) get: Summary,
    pub(crate) filtered: Summary,
    pub(crate) page: Summary,
}

/// The filtered page the list index is for: a state nothing is in.
pub(crate) const RUNNING_PAGE: &str = "/processes?state=running&limit=100";
/// Samples of it per store: a page costs about 0.1 ms, so its 1 % tail
/// is a handful of requests; 2000 keep one stall of a loaded machine from
/// being the p99.
const RUNNING_SAMPLES: usize = 2000;

/// Latencies of `GET path` one at a time, alternating between two daemons
/// (the full and the empty store) so that disk and CPU noise hits both
/// alike; 20 warm-ups each first.
pub(crate) async fn get_latency_pair(
    a: &mut Http,
    b: &mut Http,
    n: usize,
    path: &str,
) -> (Summary, Summary) {
    let (mut la, mut lb) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + 20 {
        for (http, lat) in [(&mut *a, &mut la), (&mut *b, &mut lb)] {
            let t0 = Instant::now();
            let (status, _) = http.get(path).await.expect("GET");
            let took = ms(t0.elapsed());
            assert_eq!(status, StatusCode::OK, "GET {path}");
            if i >= 20 {
                lat.push(took);
            }
        }
    }
    (summarize(&la), summarize(&lb))
}

pub(crate) async fn read_latencies(http: &mut Http, max_id: u64, rng: &mut Rng) -> ReadLatencies {
    let get = {
        let mut r = Rng(rng.below(u64::MAX) | 1);
        get_latency(http, 2000, move || {
            format!("/processes/{}", 1 + r.below(max_id))
        })
        .await
    };
    let filtered = {
        let mut r = Rng(rng.below(u64::MAX) | 1);
        get_latency(http, 200, move || {
            format!(
                "/processes?state=idle&ref=r{}&limit=100&cursor={}",
                r.below(100),
                1 + r.below(max_id)
            )
        })
        .await
    };
    let page = {
        let mut r = Rng(rng.below(u64::MAX) | 1);
        get_latency(http, 200, move || {
            format!("/processes?limit=100&cursor={}", 1 + r.below(max_id))
        })
        .await
    };
    ReadLatencies {
        get,
        filtered,
        page,
    }
}

pub(crate) async fn bench_scale(k: &Knobs, bin: &Path, root: &Path, rep: &mut Report) {
    let n = k.scale_records;
    let mut d = Daemon::start(bin, root, "scale", &[]).await;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // First the records of runs that really ran (their folders made and
    // removed), then the rest as plain records.
    let ran = k.scale_ran.min(n);
    let empty_footprint = Footprint::of(&d.data_dir);
    // A level-full folder is a detached tmpfs held by a descriptor of the
    // daemon: its open descriptors tell whether any is left.
    let fds_empty = fd_count(d.pid());
    let mut fds_settled = fds_empty;
    let (mut ran_s, mut ran_not_success, mut ran_level) = (0.0, 0, String::new());
    let mut settled_footprint = empty_footprint;
    if ran > 0 {
        let ev = Events::open(d.addr()).await;
        progress!(
            "scale: {ran} runs of `true` (autorun, ref r0..r99) from {} clients until all are idle",
            k.spawn_clients
        );
        let t0 = Instant::now();
        let (ids, not_success) =
            run_many("scale", &d, &ev, k.spawn_clients, ran, scale_run_body).await;
        ran_s = t0.elapsed().as_secs_f64();
        ran_not_success = not_success;
        drop(ev);
        ran_level = sandbox_level(d.addr(), ids[0]).await;
        require_full("scale", &ran_level);
        settled_footprint = Footprint::of(&d.data_dir);
        fds_settled = fd_count(d.pid());
        progress!(
            "scale: {ran} runs idle after {ran_s:.1} s ({not_success} not success, level {ran_level}); before {empty_footprint:?}, daemon fds (all, linking to `/` or `/tmp`) {fds_empty:?}; after {settled_footprint:?}, daemon fds {fds_settled:?}"
        );
    }
    let per_run = |f: fn(&Footprint) -> u64| {
        (f(&settled_footprint) as f64 - f(&empty_footprint) as f64) / ran.max(1) as f64
    };
    let inodes_per_run = per_run(Footprint::inodes);
    let bytes_per_run = per_run(Footprint::allocated);
    let apparent_per_run = per_run(Footprint::apparent);

    progress!(
        "scale: filling the store up to {n} records (autorun:false, ref r0..r99) from {} clients",
        k.scale_clients
    );
    let next = Arc::new(AtomicU64::new(ran));
    let done = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let cpu0 = d.cpu_secs();
    let mut tasks = Vec::new();
    for mut http in connect_many(d.addr(), k.scale_clients).await {
        let (next, done) = (next.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                http.create(scale_body(i)).await.expect("create");
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let reporter = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = (Instant::now(), 0u64);
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let now = (Instant::now(), done.load(Ordering::Relaxed));
                let rate = (now.1 - last.1) as f64 / (now.0 - last.0).as_secs_f64();
                let eta = (n - ran).saturating_sub(now.1) as f64 / rate.max(1.0);
                progress!(
                    "scale: {} / {n} records ({rate:.0} creates/s over the last 10 s, ETA {eta:.0} s)",
                    ran + now.1
                );
                last = now;
            }
        })
    };
    for t in tasks {
        t.await.expect("fill task");
    }
    reporter.abort();
    let fill_time = t0.elapsed();
    let cpu1 = d.cpu_secs();
    let fill_rate = (n - ran) as f64 / fill_time.as_secs_f64();
    let rss_filled_kb = d.rss_kb();
    progress!(
        "scale: filled {n} in {:.1} s ({fill_rate:.0} creates/s; daemon CPU {:.1} s; RSS {rss_filled_kb} kB)",
        fill_time.as_secs_f64(),
        cpu1.0 - cpu0.0
    );
    let (blocks_live, bytes_live, files_live) = dir_usage(&d.data_dir);

    progress!("scale: restart (SIGTERM, wait for exit, start, poll /health every 1 ms)");
    let stop = d.stop().await;
    d.spawn();
    let ready = d.wait_ready(Duration::from_secs(600)).await;
    progress!(
        "scale: stopped in {:.1} ms; restarted and ready in {:.1} ms",
        ms(stop),
        ms(ready)
    );
    let (blocks, bytes, files) = dir_usage(&d.data_dir);
    let per_record = blocks as f64 / n as f64;
    progress!(
        "scale: data dir {:.1} MB on disk ({:.1} MB apparent, {files} files) = {per_record:.0} bytes per record; before the restart {:.1} MB on disk ({:.1} MB apparent, {files_live} files)",
        blocks as f64 / 1e6,
        bytes as f64 / 1e6,
        blocks_live as f64 / 1e6,
        bytes_live as f64 / 1e6
    );

    // The comparison store: a fresh daemon, measured alternately with the
    // full one so that disk and CPU noise hits both alike.
    let mut e = Daemon::start(bin, root, "scale-empty", &[]).await;
    let mut full = Http::connect(d.addr()).await.expect("connect");
    let mut empty = Http::connect(e.addr()).await.expect("connect");
    progress!("scale: 500 creates one at a time, alternating between the full and an empty store");
    create_latency_pair(&mut full, &mut empty, 50).await; // warm-up
    let (create_full, create_empty) = create_latency_pair(&mut full, &mut empty, 500).await;
    let create_ratio_p50 = create_full.p50 / create_empty.p50;
    let create_ratio_p99 = create_full.p99 / create_empty.p99;
    progress!(
        "scale: create p50 {:.2} p99 {:.2} ms at {n}; p50 {:.2} p99 {:.2} ms empty (×{create_ratio_p50:.2} / ×{create_ratio_p99:.2})",
        create_full.p50,
        create_full.p99,
        create_empty.p50,
        create_empty.p99
    );
    progress!("scale: reads (GET by random id, filtered and unfiltered pages at random cursors)");
    let reads_full = read_latencies(&mut full, n, &mut rng).await;
    let reads_empty = read_latencies(&mut empty, 550, &mut rng).await;
    progress!(
        "scale: at {n}: GET p50 {:.2} p99 {:.2} ms; filtered page p50 {:.2} p99 {:.2} ms; page p50 {:.2} p99 {:.2} ms",
        reads_full.get.p50,
        reads_full.get.p99,
        reads_full.filtered.p50,
        reads_full.filtered.p99,
        reads_full.page.p50,
        reads_full.page.p99,
    );
    progress!(
        "scale: empty: GET p50 {:.2} p99 {:.2} ms; filtered page p50 {:.2} p99 {:.2} ms; page p50 {:.2} p99 {:.2} ms",
        reads_empty.get.p50,
        reads_empty.get.p99,
        reads_empty.filtered.p50,
        reads_empty.filtered.p99,
        reads_empty.page.p50,
        reads_empty.page.p99,
    );
    progress!("scale: {RUNNING_PAGE} (nothing runs) {RUNNING_SAMPLES} times, alternating between the full and the empty store");
    let (running_full, running_empty) =
        get_latency_pair(&mut full, &mut empty, RUNNING_SAMPLES, RUNNING_PAGE).await;
    let running_ratio = running_full.p99 / running_empty.p99;
    progress!(
        "scale: state=running page p50 {:.2} p99 {:.2} ms at {n}; p50 {:.2} p99 {:.2} ms empty (p99 ×{running_ratio:.2})",
        running_full.p50,
        running_full.p99,
        running_empty.p50,
        running_empty.p99
    );
    let rss_kb = d.rss_kb();
    drop((full, empty));
    d.stop().await;
    e.stop().await;

    let label = if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else {
        n.to_string()
    };
    if ran > 0 {
        rep.row(
            &format!(
                "Scale: {ran} of the {label} records ran `true` (level `{ran_level}`); host footprint per run once settled"
            ),
            format!(
                "{bytes_per_run:.0} bytes on disk ({apparent_per_run:.0} apparent), {inodes_per_run:.4} inodes"
            ),
        )
        .baseline(format!(
            "data dir + `/dev/shm` base: {} inodes, {:.1} MB on disk ({:.2} MB apparent) empty; {} inodes, {:.1} MB ({:.2} MB) after",
            empty_footprint.inodes(),
            empty_footprint.allocated() as f64 / 1e6,
            empty_footprint.apparent() as f64 / 1e6,
            settled_footprint.inodes(),
            settled_footprint.allocated() as f64 / 1e6,
            settled_footprint.apparent() as f64 / 1e6,
        ));
    }
    rep.row(
        &format!(
            "Scale: fill {label} records via the API ({} clients; the {} autorun:false ones)",
            k.scale_clients,
            n - ran
        ),
        format!(
            "{} creates/s ({:.0} s)",
            fmt_rate(fill_rate),
            fill_time.as_secs_f64()
        ),
    );
    rep.row(
        &format!("Scale: restart → `/health` ready at {label}"),
        format!("{:.0} ms", ms(ready)),
    )
    .baseline(format!("graceful stop took {:.0} ms", ms(stop)));
    rep.row(
        &format!("Scale: `GET /processes/{{id}}` at {label}, p50 / p99"),
        reads_full.get.cell(),
    )
    .baseline(format!("empty store: {}", reads_empty.get.cell()));
    rep.row(
        &format!(
            "Scale: filtered page `state=idle&ref=rK&limit=100` (1 in 100 match) at {label}, p50 / p99"
        ),
        reads_full.filtered.cell(),
    )
    .baseline(format!("empty store: {}", reads_empty.filtered.cell()));
    rep.row(
        &format!(
            "Scale: filtered page `state=running&limit=100` with nothing running at {label}, p50 / p99 ({RUNNING_SAMPLES}, alternating with the empty store)"
        ),
        running_full.cell(),
    )
    .baseline(format!("empty store: {}", running_empty.cell()))
    .ratio(running_ratio)
    .meets(
        Target::at_most(
            "filtered page `state=running&limit=100` at scale, p99 (ms)",
            running_full.p99,
            10.0,
            "ms",
        )
        .and(Target::at_most(
            "p99 ratio to the empty store",
            running_ratio,
            1.5,
            "",
        )),
    );
    rep.row(
        &format!("Scale: unfiltered page `limit=100` at {label}, p50 / p99"),
        reads_full.page.cell(),
    )
    .baseline(format!("empty store: {}", reads_empty.page.cell()));
    rep.row(
        &format!("Scale: create latency at {label}, p50 / p99"),
        create_full.cell(),
    )
    .baseline(format!("empty store: {}", create_empty.cell()))
    .ratio(create_ratio_p50)
    .meets(Target::at_most(
        "create latency ratio at scale (p50)",
        create_ratio_p50,
        1.5,
        "",
    ));
    rep.row(
        "Scale: data dir size per record",
        format!("{per_record:.0} bytes"),
    )
    .baseline(format!(
        "{:.1} MB on disk for {label} after restart",
        blocks as f64 / 1e6
    ));
    let ran_json = json!({
        "records_that_ran": ran, "ran_s": r3(ran_s), "ran_not_success": ran_not_success,
        "ran_sandbox": ran_level, "ran_clients": k.spawn_clients,
        "footprint_empty": empty_footprint.json(),
        "footprint_after_runs_settled": settled_footprint.json(),
        "inodes_per_run": inodes_per_run, "bytes_on_disk_per_run": r3(bytes_per_run),
        "bytes_apparent_per_run": r3(apparent_per_run),
        "daemon_open_fds_empty": fds_empty.0, "daemon_open_fds_after_runs_settled": fds_settled.0,
        "daemon_fds_root_or_tmp_empty": fds_empty.1,
        "daemon_fds_root_or_tmp_after_runs_settled": fds_settled.1,
    });
    rep.json.insert(
        "scale".into(),
        json!({
            "records": n, "fill_clients": k.scale_clients,
            "runs_that_ran": ran_json,
            "fill_s": r3(fill_time.as_secs_f64()), "fill_creates_per_s": r3(fill_rate),
            "fill_daemon_cpu_s": r3(cpu1.0 - cpu0.0), "rss_after_fill_kb": rss_filled_kb,
            "stop_ms": r3(ms(stop)), "restart_to_ready_ms": r3(ms(ready)),
            "get_by_id": reads_full.get.json(), "get_by_id_empty": reads_empty.get.json(),
            "filtered_page": reads_full.filtered.json(), "filtered_page_empty": reads_empty.filtered.json(),
            "filtered_page_query": "state=idle&ref=rK&limit=100&cursor=<random id> (each ref matches 1 in 100 records)",
            "page": reads_full.page.json(), "page_empty": reads_empty.page.json(),
            "page_query": "limit=100&cursor=<random id>",
            "running_page": running_full.json(), "running_page_empty": running_empty.json(),
            "running_page_ratio_p99": r3(running_ratio),
            "running_page_query": format!("state=running&limit=100 while nothing runs ({RUNNING_SAMPLES}, alternating with the empty store)"),
            "create": create_full.json(), "create_empty": create_empty.json(),
            "create_ratio_p50": r3(create_ratio_p50), "create_ratio_p99": r3(create_ratio_p99),
            "create_method": "500 one at a time, alternating with a fresh daemon (the empty store)",
            "data_dir_bytes_on_disk": blocks, "data_dir_bytes_apparent": bytes, "data_dir_files": files,
            "data_dir_bytes_on_disk_before_restart": blocks_live,
            "data_dir_bytes_apparent_before_restart": bytes_live,
            "bytes_per_record": r3(per_record),
            "rss_after_restart_and_reads_kb": rss_kb,
        }),
    );
}
