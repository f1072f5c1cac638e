//! Section `soak`: memory over a long steady load (`make soak`).

use crate::*;

/// Mixed load for `BENCH_SOAK_SECS` (900) from `BENCH_SOAK_CLIENTS` (12)
/// clients: runs printing up to 200 KB whose stdout is followed to the
/// end, `sleep`s killed while running, and deletes of half the settled
/// records; the daemon's RSS is sampled every 10 s, and once more after a
/// list of every record. Target: peak RSS ≤ 64 MB with the default
/// `storage_memory_bytes`.
pub(crate) async fn bench_soak(bin: &Path, root: &Path, rep: &mut Report) {
    let secs: u64 = knob("BENCH_SOAK_SECS", 900);
    let clients: usize = knob("BENCH_SOAK_CLIENTS", 12);
    // Empty: the daemon's default budget.
    let budget: String = knob("BENCH_SOAK_MEMORY_BYTES", String::new());
    let mut env = vec![
        ("CYRNEL_DEFAULT_TIMEOUT_MS", "0"),
        ("CYRNEL_KILL_GRACE_MS", "200"),
    ];
    if !budget.is_empty() {
        env.push(("CYRNEL_STORAGE_MEMORY_BYTES", budget.as_str()));
    }
    let mut d = Daemon::start(bin, root, "soak", &env).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let start_kb = d.rss_kb();
    progress!("soak: {clients} clients for {secs} s; RSS at start {start_kb} kB");
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (stop, runs, addr) = (stop.clone(), runs.clone(), d.addr());
        tasks.push(tokio::spawn(async move {
            let mut http = Http::connect(addr).await.expect("connect");
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (c as u64 + 1));
            while !stop.load(Ordering::Relaxed) {
                let roll = rng.below(10);
                let body = if roll == 0 {
                    Bytes::from_static(br#"{"code":"sleep 30"}"#)
                } else {
                    let n = rng.below(200_000);
                    Bytes::from(format!(
                        r#"{{"code":"head -c {n} /dev/zero | tr '\\0' x"}}"#
                    ))
                };
                let Ok(id) = http.create(body).await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                runs.fetch_add(1, Ordering::Relaxed);
                if roll == 0 {
                    loop {
                        let (_, b) = http.get(&format!("/processes/{id}")).await.expect("get");
                        if find(&b, br#""state":"running""#).is_some() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let _ = http.kill(id).await;
                } else {
                    // Follow stdout to the end: it ends when the run settles.
                    let _ = http
                        .get(&format!("/processes/{id}/stdout?follow=true"))
                        .await;
                }
                loop {
                    let (_, b) = http.get(&format!("/processes/{id}")).await.expect("get");
                    if find(&b, br#""state":"idle""#).is_some() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if rng.below(2) == 0 {
                    let _ = http
                        .call(Method::DELETE, &format!("/processes/{id}"), None)
                        .await;
                }
            }
        }));
    }
    let mut samples: Vec<(u64, u64)> = vec![(0, start_kb)];
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(10).min(Duration::from_secs(secs))).await;
        let kb = d.rss_kb();
        let t = t0.elapsed().as_secs();
        samples.push((t, kb));
        progress!(
            "soak: {t:>4} s RSS {kb} kB, {} runs",
            runs.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let total_runs = runs.load(Ordering::Relaxed);
    let peak_load_kb = samples.iter().map(|s| s.1).max().unwrap_or(0);
    let mut http = Http::connect(d.addr()).await.expect("connect");
    let (_, list) = http.get("/processes").await.expect("list");
    let after_list_kb = d.rss_kb();
    let peak_kb = peak_load_kb.max(after_list_kb);
    progress!(
        "soak: {total_runs} runs; peak RSS {peak_load_kb} kB under load, {after_list_kb} kB after listing every record ({} bytes)",
        list.len()
    );
    d.stop().await;
    let peak_mb = peak_kb as f64 / 1024.0;
    rep.row(
        &format!("Daemon RSS peak, {secs} s mixed load ({total_runs} runs, {clients} clients)"),
        format!("{peak_mb:.1} MB"),
    )
    .baseline(format!("{:.1} MB at start", start_kb as f64 / 1024.0))
    .meets(Target::at_most("soak peak RSS (MB)", peak_mb, 64.0, "MB"));
    let series: Vec<Value> = samples.iter().map(|(t, kb)| json!([t, kb])).collect();
    rep.json.insert(
        "soak".into(),
        json!({
            "secs": secs, "clients": clients, "runs": total_runs,
            "rss_start_kb": start_kb, "rss_peak_under_load_kb": peak_load_kb,
            "rss_after_full_list_kb": after_list_kb, "rss_series_s_kb": series,
        }),
    );
}
