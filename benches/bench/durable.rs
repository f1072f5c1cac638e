//! Section `durable`: durable transitions against raw fdatasync.

use crate::*;

/// Serial synced appends for `secs`: a 256-byte record (about a create's WAL
/// record) then `fdatasync`, back to back. With `prealloc` the file first
/// gets 64 MiB with `fallocate(FALLOC_FL_KEEP_SIZE)`, as RocksDB does to its
/// WAL; without, every append grows the file. Returns (syncs/s, p50 ms).
pub(crate) fn raw_fsync_rate(dir: &Path, secs: f64, prealloc: bool) -> (f64, f64) {
    use std::os::fd::AsRawFd;
    let path = dir.join("bench-fsync-probe");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .expect("open fsync probe");
    if prealloc {
        // SAFETY: fallocate(2) on a descriptor we own.
        let rc = unsafe { libc::fallocate(f.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 64 << 20) };
        assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
    }
    let rec = [0x5au8; 256];
    let t0 = Instant::now();
    let mut lat = Vec::new();
    while t0.elapsed().as_secs_f64() < secs {
        let t = Instant::now();
        f.write_all(&rec).expect("write");
        f.sync_data().expect("fdatasync");
        lat.push(ms(t.elapsed()));
    }
    let rate = lat.len() as f64 / t0.elapsed().as_secs_f64();
    let _ = fs::remove_file(&path);
    (rate, summarize(&lat).p50)
}

/// The preallocated (WAL-like) probe, then the growing-file one.
pub(crate) async fn fsync_probes(dir: &Path, secs: f64) -> [(f64, f64); 2] {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        [
            raw_fsync_rate(&dir, secs, true),
            raw_fsync_rate(&dir, secs, false),
        ]
    })
    .await
    .expect("fsync probe")
}

pub(crate) async fn bench_durable(k: &Knobs, d: &Daemon, rep: &mut Report) {
    // The probe file sits next to the daemon's RocksDB: same file system.
    let dir = d.data_dir.clone();
    progress!(
        "durable: raw synced appends in {} (1 s each pattern, before and after the load)",
        dir.display()
    );
    let before = fsync_probes(&dir, 1.0).await;

    progress!(
        "durable: creates (autorun:false, one synced transition each) from {} clients for {} s",
        k.durable_clients,
        k.durable_secs
    );
    let warmup = Duration::from_millis(500);
    let window = Duration::from_secs_f64(k.durable_secs);
    let stop = Arc::new(AtomicBool::new(false));
    let counted = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let (from, to) = (t0 + warmup, t0 + warmup + window);
    let body = Bytes::from_static(br#"{"code":"true","autorun":false}"#);
    let mut tasks = Vec::new();
    let cpu0 = d.cpu_secs();
    for mut http in connect_many(d.addr(), k.durable_clients).await {
        let (stop, counted, body) = (stop.clone(), counted.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = 0;
            while !stop.load(Ordering::Relaxed) {
                http.create(body.clone()).await.expect("create");
                let now = Instant::now();
                if now >= from && now < to {
                    local += 1;
                }
            }
            counted.fetch_add(local, Ordering::Relaxed);
        }));
    }
    tokio::time::sleep_until(to.into()).await;
    let cpu1 = d.cpu_secs();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client");
    }
    let rate = counted.load(Ordering::Relaxed) as f64 / k.durable_secs;
    let after = fsync_probes(&dir, 1.0).await;
    let mean = |i: usize| {
        (
            (before[i].0 + after[i].0) / 2.0,
            (before[i].1 + after[i].1) / 2.0,
        )
    };
    let ((wal_rate, wal_p50), (grow_rate, grow_p50)) = (mean(0), mean(1));
    let per_sync = rate / wal_rate;
    progress!(
        "durable: raw fdatasync/s, preallocated like the WAL: {:.0} before, {:.0} after; growing file: {:.0} before, {:.0} after",
        before[0].0,
        after[0].0,
        before[1].0,
        after[1].0
    );
    progress!(
        "durable: {rate:.0} durable transitions/s = {per_sync:.1}× the raw WAL-like fdatasync rate (daemon CPU {:.2} s over {:.1} s)",
        cpu1.0 - cpu0.0,
        (warmup + window).as_secs_f64()
    );
    rep.row(
        &format!(
            "Durable transitions/s (creates from {} clients, synced WAL)",
            k.durable_clients
        ),
        format!("{} /s", fmt_rate(rate)),
    )
    .baseline(format!(
        "{} fdatasync/s serial, preallocated file like RocksDB's WAL (p50 {:.2} ms); {} /s growing a file",
        fmt_rate(wal_rate),
        wal_p50,
        fmt_rate(grow_rate)
    ))
    .ratio(per_sync);
    rep.json.insert(
        "durable".into(),
        json!({
            "clients": k.durable_clients, "seconds": k.durable_secs,
            "transitions_per_s": r3(rate),
            "transition_kind": "create with autorun:false (one synced batch per transition)",
            "raw_fdatasync_per_s": r3(wal_rate), "raw_fdatasync_p50_ms": r3(wal_p50),
            "raw_fdatasync_pattern": "serial 256-byte appends + fdatasync into a file preallocated with fallocate(KEEP_SIZE), as RocksDB does to its WAL",
            "raw_fdatasync_growing_file_per_s": r3(grow_rate),
            "raw_fdatasync_growing_file_p50_ms": r3(grow_p50),
            "raw_probes_before_after": [[before[0].0, before[1].0], [after[0].0, after[1].0]],
            "transitions_per_fsync": r3(per_sync),
            "daemon_cpu_s": r3(cpu1.0 - cpu0.0),
        }),
    );
}
