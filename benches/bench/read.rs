//! Section `read`: API read throughput against a minimal hyper server.

use crate::*;

/// `conns` keep-alive connections each sending `GET path` back to back;
/// returns the requests completed per second in the measured window (after
/// a one-second warm-up).
pub(crate) async fn read_load(addr: SocketAddr, path: &str, conns: usize, secs: f64) -> f64 {
    let warmup = Duration::from_secs(1);
    let window = Duration::from_secs_f64(secs);
    let stop = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let (from, to) = (t0 + warmup, t0 + warmup + window);
    let mut tasks = Vec::new();
    for mut http in connect_many(addr, conns).await {
        let (stop, counted, errors) = (stop.clone(), counted.clone(), errors.clone());
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut local = 0;
            while !stop.load(Ordering::Relaxed) {
                match http.get(&path).await {
                    Ok((StatusCode::OK, _)) => {
                        let now = Instant::now();
                        if now >= from && now < to {
                            local += 1;
                        }
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            counted.fetch_add(local, Ordering::Relaxed);
        }));
    }
    tokio::time::sleep_until((to).into()).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    let errors = errors.load(Ordering::Relaxed);
    assert_eq!(errors, 0, "GET {path}: {errors} failed requests");
    counted.load(Ordering::Relaxed) as f64 / secs
}

/// The baseline for read throughput: the harness re-executed as a minimal
/// hyper server that answers every request with one constant JSON body.
pub(crate) fn baseline_server_main(port: u16, body_file: &Path) {
    let body = Bytes::from(fs::read(body_file).expect("read body file"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind baseline server");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        let mut r = Response::new(Full::new(body));
                        r.headers_mut().insert(
                            CONTENT_TYPE,
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

pub(crate) async fn bench_read(k: &Knobs, d: &Daemon, root: &Path, id: u64, rep: &mut Report) {
    let path = format!("/processes/{id}");
    let mut http = Http::connect(d.addr()).await.expect("connect");
    let body = http
        .expect_ok(Method::GET, &path, None)
        .await
        .expect("GET record");
    let body_file = root.join("baseline-body.json");
    fs::write(&body_file, &body).expect("write body file");

    progress!(
        "read: GET {path} ({} bytes) from {} connections for {} s",
        body.len(),
        k.read_conns,
        k.read_secs
    );
    let cpu0 = d.cpu_secs();
    let rate = read_load(d.addr(), &path, k.read_conns, k.read_secs).await;
    let cpu1 = d.cpu_secs();
    progress!(
        "read: daemon {rate:.0} req/s (daemon CPU {:.2} s)",
        cpu1.0 - cpu0.0
    );

    let port = free_port();
    let mut server = Command::new(std::env::current_exe().expect("current exe"))
        .arg("--baseline-server")
        .arg(port.to_string())
        .arg(&body_file)
        .stdin(Stdio::null())
        .spawn()
        .expect("start the baseline server");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let t0 = Instant::now();
    while Http::connect(addr).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "baseline server not up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut probe = Http::connect(addr).await.expect("connect baseline");
    let same = probe.get(&path).await.expect("baseline GET").1;
    assert_eq!(same, body, "the baseline answers the same body");
    progress!(
        "read: baseline server (pid {}) for {} s",
        server.id(),
        k.read_secs
    );
    let base = read_load(addr, &path, k.read_conns, k.read_secs).await;
    let _ = server.kill();
    let _ = server.wait();
    let ratio = rate / base;
    progress!("read: baseline {base:.0} req/s; ratio {ratio:.2}");
    rep.row(
        &format!(
            "`GET /processes/{{id}}`, {} keep-alive connections",
            k.read_conns
        ),
        format!("{} req/s", fmt_rate(rate)),
    )
    .baseline(format!(
        "{} req/s (minimal hyper server, same {}-byte body)",
        fmt_rate(base),
        body.len()
    ))
    .ratio(ratio)
    .meets(Target::at_least("read throughput ratio", ratio, 0.7));
    rep.json.insert(
        "read".into(),
        json!({
            "connections": k.read_conns, "seconds": k.read_secs, "body_bytes": body.len(),
            "daemon_req_per_s": r3(rate), "baseline_req_per_s": r3(base),
            "ratio": r3(ratio), "target_ratio": 0.7, "met": ratio >= 0.7,
            "daemon_cpu_s": r3(cpu1.0 - cpu0.0),
        }),
    );
}
