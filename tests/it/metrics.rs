//! `GET /metrics` against the real daemon: the exposition is validated by
//! Prometheus' own parser and linter (`promtool check metrics`, from
//! Debian's `prometheus` package; `make promtool` unpacks it, `make test`
//! passes its path in `PROMTOOL`), and the counters, gauges and histograms
//! move exactly as runs, kills, rate-limited requests, event streams and a
//! restart happen.

use crate::support::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

const KEY: &str = "metrics-key";
const AUTH: (&str, &str) = ("Authorization", "Bearer metrics-key");
/// What Prometheus 2.x sends when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// `promtool`: `$PROMTOOL` (set by `make test`), else the one on `PATH`,
/// else where `make promtool` unpacks it by default.
fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("PROMTOOL").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let unpacked = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/cyrnel/prometheus-deb/usr/bin/promtool"));
    std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("promtool"))
        .chain(unpacked)
        .find(|p| p.is_file())
        .expect(
            "promtool not found: run `make promtool` (it unpacks promtool from Debian's \
             prometheus package), or set PROMTOOL to a promtool binary",
        )
}

/// `promtool check metrics` must accept `text` without a complaint.
#[track_caller]
fn assert_promtool_accepts(text: &str) {
    let tool = promtool();
    let mut child = Command::new(&tool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", tool.display()));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics: {} {said}\non:\n{text}",
        out.status
    );
}

/// Samples of an exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("sample line");
            let v = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|e| panic!("{l}: {e}")),
            };
            (series.to_string(), v)
        })
        .collect()
}

struct Scrape {
    text: String,
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    #[track_caller]
    fn get(&self, series: &str) -> f64 {
        *self
            .samples
            .get(series)
            .unwrap_or_else(|| panic!("no {series} in:\n{}", self.text))
    }
}

/// `GET /metrics` as curl would ask (no Accept): the Prometheus text format.
#[track_caller]
fn scrape(d: &Daemon) -> Scrape {
    let r = d.get("/metrics");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    let text = r.text();
    Scrape {
        samples: samples(&text),
        text,
    }
}

/// Scrapes until every `(series, value)` of `want` holds; returns that scrape.
/// (A transition is published to the metrics just after its write is
/// durable, so a record read from the store can be a moment ahead.)
#[track_caller]
fn scrape_until(d: &Daemon, want: &[(&str, f64)]) -> Scrape {
    poll("metrics to show the expected values", || {
        let s = scrape(d);
        let wrong: Vec<String> = want
            .iter()
            .filter(|(k, v)| s.samples.get(*k) != Some(v))
            .map(|(k, v)| format!("{k} = {:?} (want {v})", s.samples.get(*k)))
            .collect();
        if wrong.is_empty() {
            Ok(s)
        } else {
            Err(wrong.join(", "))
        }
    })
}

fn states(queued: f64, running: f64, terminating: f64, idle: f64) -> Vec<(&'static str, f64)> {
    vec![
        ("cyrnel_processes{state=\"queued\"}", queued),
        ("cyrnel_processes{state=\"running\"}", running),
        ("cyrnel_processes{state=\"terminating\"}", terminating),
        ("cyrnel_processes{state=\"idle\"}", idle),
    ]
}

fn finished(success: f64, failed: f64, timeout: f64, canceled: f64) -> Vec<(&'static str, f64)> {
    vec![
        (
            "cyrnel_runs_finished_total{exit_state=\"success\"}",
            success,
        ),
        ("cyrnel_runs_finished_total{exit_state=\"failed\"}", failed),
        (
            "cyrnel_runs_finished_total{exit_state=\"timeout\"}",
            timeout,
        ),
        (
            "cyrnel_runs_finished_total{exit_state=\"canceled\"}",
            canceled,
        ),
    ]
}

/// The soft open-file limit of `pid`, from `/proc/<pid>/limits`.
fn max_open_files(pid: u32) -> f64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("Max open files line");
    line["Max open files".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn runs_move_the_metrics_exactly_and_promtool_accepts_the_exposition() {
    let d = Daemon::options()
        .api_key(KEY)
        .env("CYRNEL_MAX_OUTPUT_BYTES", "1000")
        .start();
    d.raw("GET", "/metrics", &[], None)
        .assert_error(401, "Unauthorized");

    let first = scrape(&d);
    assert_promtool_accepts(&first.text);
    for (k, v) in states(0.0, 0.0, 0.0, 0.0)
        .into_iter()
        .chain(finished(0.0, 0.0, 0.0, 0.0))
    {
        assert_eq!(first.get(k), v, "{k}");
    }
    for h in [
        "cyrnel_spawn_latency_seconds_count",
        "cyrnel_kill_to_idle_seconds_count",
        "cyrnel_run_duration_seconds_count",
        "cyrnel_output_dropped_bytes_total{stream=\"stdout\"}",
    ] {
        assert_eq!(first.get(h), 0.0, "{h}");
    }
    assert_eq!(first.get("cyrnel_build_info{version=\"0.1.0\"}"), 1.0);
    // The standard process metrics of the daemon itself.
    let pid = d.pid();
    assert_eq!(first.get("process_max_fds"), max_open_files(pid));
    let fds = first.get("process_open_fds");
    assert!(fds >= 3.0 && fds <= first.get("process_max_fds"), "{fds}");
    assert!(first.get("process_resident_memory_bytes") > 0.0);
    assert!(
        first.get("process_virtual_memory_bytes") >= first.get("process_resident_memory_bytes")
    );
    assert!(first.get("process_cpu_seconds_total") >= 0.0);
    assert!(first.get("process_threads") >= 1.0);
    let started = first.get("process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // Started by this test, a moment ago (the boot time behind the value
    // has a one-second resolution).
    assert!(
        started <= now + 1.0 && started > now - DEADLINE.as_secs_f64(),
        "{started} vs {now}"
    );
    let commits_before = first.get("cyrnel_store_commit_duration_seconds_count{synced=\"true\"}");
    let writes_before = first.get("cyrnel_store_commit_writes_sum");

    // Three runs: exit 0 (with output past the cap), exit 3, killed.
    let ok = d.create_code("head -c 5000 /dev/zero");
    let code3 = d.create_code("exit 3");
    let killed = d.create_code("sleep 60");
    d.wait_idle(ok);
    d.wait_idle(code3);
    d.wait_running_pid(killed);
    let mut want = states(0.0, 1.0, 0.0, 2.0);
    want.extend(finished(1.0, 1.0, 0.0, 0.0));
    scrape_until(&d, &want);
    assert_eq!(d.kill(killed).status, 200);
    d.wait_idle(killed);

    let mut want = states(0.0, 0.0, 0.0, 3.0);
    want.extend(finished(1.0, 1.0, 0.0, 1.0));
    want.extend([
        ("cyrnel_spawn_latency_seconds_count", 3.0),
        ("cyrnel_run_duration_seconds_count", 3.0),
        ("cyrnel_kill_to_idle_seconds_count", 1.0),
        ("cyrnel_kill_to_idle_seconds_bucket{le=\"+Inf\"}", 1.0),
        (
            "cyrnel_output_dropped_bytes_total{stream=\"stdout\"}",
            4000.0,
        ),
        ("cyrnel_output_dropped_bytes_total{stream=\"stderr\"}", 0.0),
    ]);
    let after = scrape_until(&d, &want);
    assert_eq!(
        d.sub(ok, "stdout").header("x-cyrnel-dropped-bytes"),
        Some("4000"),
        "the counter agrees with the record"
    );
    // Each of the eleven transitions was at least one synced write; group
    // commit may have put several into one.
    let commits = after.get("cyrnel_store_commit_duration_seconds_count{synced=\"true\"}");
    assert!(commits > commits_before, "{commits} vs {commits_before}");
    let writes = after.get("cyrnel_store_commit_writes_sum");
    assert!(
        writes - writes_before >= 11.0,
        "{writes} vs {writes_before}"
    );
    assert_promtool_accepts(&after.text);

    // A deleted record leaves the counts; the finished counters stay.
    assert_eq!(d.delete(&format!("/processes/{code3}")).status, 200);
    let mut want = states(0.0, 0.0, 0.0, 2.0);
    want.extend(finished(1.0, 1.0, 0.0, 1.0));
    scrape_until(&d, &want);

    // Prometheus asks for OpenMetrics first and gets it, with the same
    // samples (counters named by their family in `# TYPE`).
    let r = d.raw(
        "GET",
        "/metrics",
        &[AUTH, ("Accept", PROMETHEUS_ACCEPT)],
        None,
    );
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let open = r.text();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(
        open.contains("# TYPE cyrnel_runs_finished counter\n"),
        "{open}"
    );
    assert!(
        open.contains("# UNIT cyrnel_run_duration_seconds seconds\n"),
        "{open}"
    );
    let text = scrape(&d);
    for k in [
        "cyrnel_runs_finished_total{exit_state=\"canceled\"}",
        "cyrnel_processes{state=\"idle\"}",
        "cyrnel_kill_to_idle_seconds_count",
    ] {
        assert_eq!(samples(&open).get(k), Some(&text.get(k)), "{k}");
    }
}

#[test]
fn rate_limited_requests_and_event_subscribers_are_counted() {
    let d = Daemon::options()
        .env("CYRNEL_RATE_LIMIT_KILL_PER_MIN", "1")
        .env("CYRNEL_EVENT_HEARTBEAT_MS", "20")
        .start();
    let series = "cyrnel_rate_limited_requests_total{method=\"POST\",route=\"/processes/{id}/signals/kill\"}";
    // One allowed per minute-aligned window: of three requests at least
    // one is refused (at most one window boundary falls between them).
    let refused = (0..3).filter(|_| d.kill(12345).status == 429).count() as f64;
    assert!(refused >= 1.0);
    let s = scrape(&d);
    assert_eq!(s.get(series), refused);
    assert_promtool_accepts(&s.text);

    let subscribers = "cyrnel_event_subscribers";
    assert_eq!(s.get(subscribers), 0.0);
    let a = FollowStream::open(d.port(), "/events", &[]);
    let b = FollowStream::open(d.port(), "/events?since=0", &[]);
    assert_eq!((a.status, b.status), (200, 200));
    scrape_until(&d, &[(subscribers, 2.0)]);
    drop(a);
    scrape_until(&d, &[(subscribers, 1.0)]);
    drop(b);
    scrape_until(&d, &[(subscribers, 0.0)]);
}

#[test]
fn records_by_state_are_right_after_a_crash_and_restart() {
    let mut d = Daemon::start();
    for code in ["true", "exit 1"] {
        let id = d.create_code(code);
        d.wait_idle(id);
    }
    let never_ran = d.create_with("true", r#""autorun":false"#);
    assert_eq!(d.record(never_ran)["state"].as_str(), Some("idle"));
    let survivor = d.create_code("sleep 60");
    d.wait_running_pid(survivor);
    let mut want = states(0.0, 1.0, 0.0, 3.0);
    want.extend(finished(1.0, 1.0, 0.0, 0.0));
    scrape_until(&d, &want);

    // A crash: the run outlives the daemon; the restarted daemon counts
    // the stored records, finds the run alive, and puts it down.
    d.kill9();
    d.restart_same_dir();
    let d = d;
    let record = d.wait_idle(survivor);
    assert_eq!(record["exitState"].as_str(), Some("failed"), "{record}");
    let mut want = states(0.0, 0.0, 0.0, 4.0);
    // Counters start again at zero with the new daemon.
    want.extend(finished(0.0, 1.0, 0.0, 0.0));
    want.extend([
        ("cyrnel_kill_to_idle_seconds_count", 1.0),
        ("cyrnel_run_duration_seconds_count", 1.0),
        ("cyrnel_spawn_latency_seconds_count", 0.0),
    ]);
    let s = scrape_until(&d, &want);
    assert_promtool_accepts(&s.text);

    // A rerun of a record stored before the restart moves it out of idle.
    assert_eq!(d.run(never_ran, "{}").status, 200);
    d.wait_idle(never_ran);
    let mut want = states(0.0, 0.0, 0.0, 4.0);
    want.extend(finished(1.0, 1.0, 0.0, 0.0));
    want.push(("cyrnel_spawn_latency_seconds_count", 1.0));
    scrape_until(&d, &want);
}
