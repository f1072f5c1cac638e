//! Section `reclaim`: disk given back by deletes.

use crate::*;

/// Writes `BENCH_RECLAIM_RECORDS` records (each printing 10 KB), deletes
/// them all through the API and reports the data dir's bytes per record
/// after writing and once the reclaim has settled (no restart).
pub(crate) async fn bench_reclaim(bin: &Path, root: &Path, rep: &mut Report) {
    let n: usize = knob("BENCH_RECLAIM_RECORDS", 2000);
    let mut d = Daemon::start(bin, root, "reclaim", &[]).await;
    let body = Bytes::from_static(br#"{"code":"head -c 10000 /dev/zero | tr '\\0' x"}"#);
    progress!("reclaim: writing {n} records of 10 KB output from 8 clients");
    let ids = create_many(d.addr(), 8, n, body).await;
    let mut http = Http::connect(d.addr()).await.expect("connect");
    for id in &ids {
        loop {
            let (_, b) = http.get(&format!("/processes/{id}")).await.expect("get");
            if find(&b, br#""state":"idle""#).is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let db = d.data_dir.join("db");
    let written = dir_usage(&db).0;
    progress!("reclaim: {n} idle, db {written} bytes; deleting them all");
    for id in &ids {
        http.expect_ok(Method::DELETE, &format!("/processes/{id}"), None)
            .await
            .expect("delete");
    }
    // Settled: the size has not dropped for 3 s (at most 120 s).
    let t0 = Instant::now();
    let (mut last, mut since) = (dir_usage(&db).0, Instant::now());
    while since.elapsed() < Duration::from_secs(3) && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = dir_usage(&db).0;
        if now < last {
            (last, since) = (now, Instant::now());
        }
    }
    let settled_s = since.duration_since(t0).as_secs_f64();
    progress!("reclaim: db {last} bytes {settled_s:.1} s after the deletes");
    d.stop().await;
    let per_written = written as f64 / n as f64;
    let per_deleted = last as f64 / n as f64;
    rep.row(
        &format!("Disk per record after {n} written and deleted (10 KB output each)"),
        format!("{per_deleted:.0} B"),
    )
    .baseline(format!("{per_written:.0} B per record while they existed"))
    .ratio(per_deleted / per_written);
    rep.json.insert(
        "reclaim".into(),
        json!({
            "records": n, "db_bytes_written": written, "db_bytes_after_delete": last,
            "bytes_per_record_written": r3(per_written),
            "bytes_per_record_after_delete": r3(per_deleted),
            "settled_after_s": r3(settled_s),
        }),
    );
}
