//! Section `memory`: idle RSS and RSS per running process.

use crate::*;

pub(crate) async fn bench_memory(k: &Knobs, bin: &Path, root: &Path, rep: &mut Report) {
    let n = k.memory_procs;
    let max_running = (n + 100).to_string();
    let mut d = Daemon::start(
        bin,
        root,
        "memory",
        &[
            ("CYRNEL_MAX_RUNNING", max_running.as_str()),
            ("CYRNEL_DEFAULT_TIMEOUT_MS", "0"),
            ("CYRNEL_EVENT_BUFFER", "8192"),
        ],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kb = d.rss_kb();
    progress!("memory: idle RSS {idle_kb} kB");
    let ev = Events::open(d.addr()).await;
    let after_stream_kb = d.rss_kb();

    progress!("memory: starting {n} × `sleep 1000` from 16 clients");
    let body = Bytes::from_static(br#"{"code":"sleep 1000","options":{"timeout":null}}"#);
    let t0 = Instant::now();
    let ids = create_many(d.addr(), 16, n, body).await;
    ev.wait_count("running", n as u64, Duration::from_secs(300))
        .await;
    let started = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let busy_kb = d.rss_kb();
    let threads = proc_status_field(d.pid(), "Threads").unwrap_or(0);
    let fds = fs::read_dir(format!("/proc/{}/fd", d.pid()))
        .map(|r| r.count())
        .unwrap_or(0);
    let per_proc = (busy_kb as f64 - idle_kb as f64) / n as f64;
    progress!(
        "memory: {n} running after {:.2} s: RSS {busy_kb} kB ({per_proc:.1} kB per process; {threads} threads, {fds} fds)",
        started.as_secs_f64()
    );

    let (busy_procs, busy_scan_ms) = tokio::task::spawn_blocking(proc_scan_cost)
        .await
        .expect("scan");
    progress!("memory: {busy_procs} processes on the host; one /proc stat walk takes {busy_scan_ms:.2} ms");
    progress!("memory: killing the {n} processes from 16 clients");
    let t_kill = Instant::now();
    let idle0 = ev.count("idle");
    let next = Arc::new(AtomicUsize::new(0));
    let ids = Arc::new(ids);
    let mut tasks = Vec::new();
    for mut http in connect_many(d.addr(), 16).await {
        let (next, ids) = (next.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(id) = ids.get(i) else { break };
                http.kill(*id).await.expect("kill");
            }
        }));
    }
    for t in tasks {
        t.await.expect("kill task");
    }
    ev.wait_count("idle", idle0 + n as u64, Duration::from_secs(600))
        .await;
    let killed_all = t_kill.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_kb = d.rss_kb();
    progress!(
        "memory: all idle again after {:.2} s: RSS {after_kb} kB",
        killed_all.as_secs_f64()
    );
    drop(ev);
    d.stop().await;

    let idle_mb = idle_kb as f64 / 1024.0;
    rep.row("Daemon RSS, idle (fresh start)", format!("{idle_mb:.1} MB"))
        .meets(Target::at_most("idle RSS (MB)", idle_mb, 20.0, "MB"));
    rep.row(
        &format!("Daemon RSS per running `sleep` ({n} at once)"),
        format!("{per_proc:.1} KB"),
    )
    .baseline(format!(
        "RSS {:.1} MB with {n} running",
        busy_kb as f64 / 1024.0
    ))
    .meets(Target::at_most(
        "RSS per running process (KB)",
        per_proc,
        30.0,
        "KB",
    ));
    rep.json.insert(
        "memory".into(),
        json!({
            "idle_rss_kb": idle_kb, "rss_with_event_stream_kb": after_stream_kb,
            "processes": n, "rss_running_kb": busy_kb,
            "kb_per_process": r3(per_proc), "rss_after_kill_kb": after_kb,
            "threads_running": threads, "fds_running": fds,
            "start_all_s": r3(started.as_secs_f64()),
            "kill_all_s": r3(killed_all.as_secs_f64()),
            "host_processes_while_running": busy_procs,
            "proc_stat_walk_ms_while_running": r3(busy_scan_ms),
            "idle_target_mb": 20, "idle_met": idle_mb <= 20.0,
            "per_process_target_kb": 30, "per_process_met": per_proc <= 30.0,
        }),
    );
}
