//! Section `handover`: with `BENCH_HANDOVER_RUNS` (1000) runs running, the
//! time from a handover's trigger (`POST /handover` sent) to the first
//! request the new image answers, over `BENCH_HANDOVER_ROUNDS` (10)
//! handovers; the daemon's memory per run before and after them. Then
//! crash re-adoption under the service-manager stand-in of the tests
//! (tests/it/support/manager.py): the same number of runs parked in its
//! fd store, the daemon SIGKILLed, and the time from the restarted daemon's
//! start to its READY=1 and to its first answered request.

use crate::*;

/// Sends one request on a new connection; `None` while nothing answers.
async fn try_get(addr: SocketAddr, path: &str) -> Option<(StatusCode, Bytes)> {
    let mut http = Http::connect(addr).await.ok()?;
    http.get(path).await.ok()
}

async fn generation(addr: SocketAddr) -> Option<u64> {
    let (status, body) = try_get(addr, "/handover").await?;
    if status != StatusCode::OK {
        return None;
    }
    serde_json::from_slice::<Value>(&body).ok()?["generation"].as_u64()
}

async fn running(addr: SocketAddr) -> usize {
    match try_get(addr, "/processes?state=running").await {
        Some((StatusCode::OK, body)) => serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["processes"].as_array().map(Vec::len))
            .unwrap_or(0),
        _ => 0,
    }
}

async fn wait_running(addr: SocketAddr, n: usize, what: &str) {
    let t0 = Instant::now();
    while running(addr).await < n {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "{what}: {n} runs not running after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn bench_handover(k: &Knobs, bin: &Path, root: &Path, rep: &mut Report) {
    let n = k.handover_runs;
    let rounds = k.handover_rounds;
    let max_running = (n + 10).to_string();
    let env = [
        ("CYRNEL_MAX_RUNNING", max_running.as_str()),
        ("CYRNEL_MAX_QUEUED", max_running.as_str()),
        ("CYRNEL_DEFAULT_TIMEOUT_MS", "0"),
    ];
    let mut d = Daemon::start(bin, root, "handover", &env).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle_kb = d.rss_kb();
    progress!("handover: starting {n} × `sleep 3600`");
    let body = Bytes::from_static(br#"{"code":"sleep 3600"}"#);
    create_many(d.addr(), 16, n, body).await;
    wait_running(d.addr(), n, "handover").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before_kb = d.rss_kb();
    let mut samples = Vec::new();
    for round in 1..=rounds as u64 {
        let mut http = Http::connect(d.addr()).await.expect("connect");
        let t0 = Instant::now();
        let (status, body) = http
            .call(Method::POST, "/handover", None)
            .await
            .expect("POST /handover");
        assert_eq!(status, StatusCode::ACCEPTED, "{body:?}");
        drop(http);
        // The first answer of the new image: its generation.
        loop {
            if generation(d.addr()).await == Some(round) {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "handover {round} did not complete"
            );
        }
        let took = t0.elapsed();
        samples.push(ms(took));
        progress!(
            "handover: {round}/{rounds}: {:.1} ms to the first answer of the new image",
            ms(took)
        );
    }
    assert_eq!(running(d.addr()).await, n, "every run still running");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after_kb = d.rss_kb();
    let per_before = (before_kb as f64 - idle_kb as f64) / n as f64;
    let per_after = (after_kb as f64 - idle_kb as f64) / n as f64;
    progress!(
        "handover: RSS idle {idle_kb} kB; with {n} runs {before_kb} kB before, {after_kb} kB after {rounds} handovers ({per_before:.1} → {per_after:.1} kB per run)"
    );
    d.stop().await;
    let s = summarize(&samples);
    rep.row(
        &format!("Handover with {n} running: trigger → first answer of the new image ({rounds}×)"),
        s.cell(),
    )
    .meets(Target::at_most("handover p99 (ms)", s.p99, 1000.0, "ms"));
    rep.row(
        &format!("Daemon RSS per running run, before → after {rounds} handovers"),
        format!("{per_before:.1} → {per_after:.1} KB"),
    )
    .baseline(format!("idle {:.1} MB", idle_kb as f64 / 1024.0))
    .meets(Target::at_most(
        "RSS per run after handovers (KB)",
        per_after,
        30.0,
        "KB",
    ));

    let crash = bench_crash(k, bin, root, &env).await;
    let c = summarize(&crash.iter().map(|c| c.0).collect::<Vec<_>>());
    let f = summarize(&crash.iter().map(|c| c.1).collect::<Vec<_>>());
    rep.row(
        &format!(
            "Crash re-adoption of {n} running: restart → READY=1 ({}×)",
            crash.len()
        ),
        c.cell(),
    )
    .baseline(format!("→ first answer {}", f.cell()))
    .meets(Target::at_most(
        "re-adoption restart to ready, max (ms)",
        c.max,
        1000.0,
        "ms",
    ));
    rep.json.insert(
        "handover".into(),
        json!({
            "runs": n, "rounds": rounds, "trigger_to_answer_ms": s.json(),
            "idle_rss_kb": idle_kb, "rss_before_kb": before_kb, "rss_after_kb": after_kb,
            "kb_per_run_before": r3(per_before), "kb_per_run_after": r3(per_after),
            "crash_restart_to_ready_ms": c.json(), "crash_restart_to_answer_ms": f.json(),
        }),
    );
}

/// Crash rounds under the stand-in: (start → READY=1, start → first
/// answer) in ms per round.
async fn bench_crash(k: &Knobs, bin: &Path, root: &Path, env: &[(&str, &str)]) -> Vec<(f64, f64)> {
    use std::io::BufRead;
    let n = k.handover_runs;
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let data = root.join("crash-data");
    fs::create_dir_all(&data).expect("data dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/support/manager.py");
    let mut cmd = clean_command("python3");
    cmd.arg(&script)
        .arg("--socket")
        .arg(root.join("notify"))
        .arg("--fdstore-max")
        .arg((6 * n + 64).to_string())
        .arg("--restart-sec")
        .arg("0")
        .arg("--start-limit-burst")
        .arg("0")
        .arg("--log")
        .arg(root.join("crash-daemon.log"))
        .arg("--")
        .arg(bin)
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd.envs(COMMON_ENV.iter().copied())
        .envs(env.iter().copied());
    let mut manager = cmd.spawn().expect("start the service-manager stand-in");
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, String)>();
    let out = manager.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                return;
            }
        }
    });
    let next = |want: &str| -> (Instant, String) {
        loop {
            let (at, line) = rx
                .recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|_| panic!("stand-in: no `{want}` line"));
            if line.starts_with(want) {
                return (at, line);
            }
        }
    };
    // `ready <pid>`: the main process that said READY=1.
    let pid_of = |line: &str| -> i32 {
        line.split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("pid")
    };
    let mut pid = pid_of(&next("ready ").1);
    progress!("handover: crash: starting {n} × `sleep 3600` under the stand-in");
    create_many(addr, 16, n, Bytes::from_static(br#"{"code":"sleep 3600"}"#)).await;
    wait_running(addr, n, "crash").await;
    let mut out = Vec::new();
    for round in 1..=3 {
        // SAFETY: kill(2) touches no memory of ours.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let (started, _) = next("started ");
        let (ready_at, line) = next("ready ");
        pid = pid_of(&line);
        while try_get(addr, "/health").await.is_none() {}
        let answered = Instant::now();
        let to_ready = ms(ready_at - started);
        let to_answer = ms(answered.max(ready_at) - started);
        progress!("handover: crash {round}/3: restart → READY=1 {to_ready:.1} ms, → first answer {to_answer:.1} ms");
        assert_eq!(running(addr).await, n, "every run re-adopted and running");
        out.push((to_ready, to_answer));
    }
    if let Some(stdin) = manager.stdin.as_mut() {
        use std::io::Write;
        let _ = stdin.write_all(b"stop\n");
    }
    let _ = manager.wait();
    out
}
