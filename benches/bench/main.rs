//! Benchmark harness for `cyrneld` (`make bench`, i.e. `cargo bench --bench bench`).
//!
//! It starts the release daemon on temporary data directories with rate
//! limits off, drives it over keep-alive HTTP/1.1 connections (hyper's client
//! connection API) and the `/events` stream, measures baselines in the same
//! run (a tight spawn loop, a minimal hyper server, raw `fdatasync`), and
//! prints one Markdown table on stdout plus `target/bench/results.json`.
//! Every step reports progress on stderr.
//!
//! It knows only what an operator knows: the binary, its flags, `CYRNEL_*`
//! settings, the HTTP contract and `/proc`. Latencies are taken from the
//! client's side: the send time of a request and the receive time of the
//! event that shows its effect on an open `/events` stream.
//!
//! Knobs (environment variables, all optional):
//! `BENCH_ONLY` (comma list of `spawn,latency,read,durable,memory,handover,scale,steps,churn,reclaim,soak`;
//! `soak` runs only when named: `make soak`), `BENCH_RECLAIM_RECORDS` (2000),
//! `BENCH_SOAK_SECS` (900), `BENCH_SOAK_CLIENTS` (12), `BENCH_SOAK_MEMORY_BYTES`
//! (the daemon's `storage_memory_bytes`; default: its default),
//! `BENCH_SPAWN_RUNS` (2000), `BENCH_SPAWN_CLIENTS` (16), `BENCH_SPAWN_ROUNDS` (9),
//! `BENCH_LATENCY_SAMPLES` (500), `BENCH_KILL_GRACE_MS` (50),
//! `BENCH_READ_CONNS` (64), `BENCH_READ_SECS` (5),
//! `BENCH_DURABLE_CLIENTS` (64), `BENCH_DURABLE_SECS` (5),
//! `BENCH_MEMORY_PROCS` (1000), `BENCH_SCALE_RECORDS` (see `DEFAULT_SCALE_RECORDS`),
//! `BENCH_SCALE_CLIENTS` (64), `BENCH_SCALE_RAN` (100000: how many of the
//! scale records are runs of `true` that ran), `BENCH_STEP_SPAWNS` (500),
//! `BENCH_CHURN_RUNS` (100000), `BENCH_HANDOVER_RUNS` (1000),
//! `BENCH_HANDOVER_ROUNDS` (10), `CYRNELD_BIN` (daemon binary to use),
//! `BENCH_RESULTS` (path of the JSON file, default `target/bench/results.json`
//! under the package), `BENCH_KEEP` (keep the data dirs and daemon logs),
//! `BENCH_COMMIT` (commit label when not run inside a git checkout).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

use cyrnel::api::wire::{iso8601, Created, ProcessJson};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Records filled into the store by the scale section unless
/// `BENCH_SCALE_RECORDS` says otherwise; chosen so that `make bench` stays
/// within its 15-minute budget on the two-core machines (see BENCHMARKS.md).
const DEFAULT_SCALE_RECORDS: u64 = 1_000_000;

static START: OnceLock<Instant> = OnceLock::new();

macro_rules! progress {
    ($($arg:tt)*) => {{
        let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
        eprintln!("[bench {:7.1}s] {}", t, format_args!($($arg)*));
    }};
}

mod churn;
mod daemon;
mod durable;
mod events;
mod handover;
mod http;
mod knobs;
mod latency;
mod memory;
mod read;
mod reclaim;
mod report;
mod scale;
mod soak;
mod spawn;
mod steps;

use churn::*;
use daemon::*;
use durable::*;
use events::*;
use handover::*;
use http::*;
use knobs::*;
use latency::*;
use memory::*;
use read::*;
use reclaim::*;
use report::*;
use scale::*;
use soak::*;
use spawn::*;
use steps::*;

/// `/proc/loadavg`'s 1, 5 and 15 minute averages: how busy the machine was
/// (other work on the two cores shows up in every number here).
fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts a section: flushes what earlier sections left dirty (thousands
/// of staged files, RocksDB flushes), so that their writeback does not
/// land in this section's latency tails, and notes the load average.
fn load(rep: &mut Report, section: &str) {
    let t0 = Instant::now();
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
    let synced = t0.elapsed();
    let l = loadavg();
    progress!(
        "{section}: sync(2) took {:.0} ms; load average {l}",
        synced.as_secs_f64() * 1e3
    );
    rep.json
        .entry("loadavg_at_start")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .expect("object")
        .insert(section.to_string(), json!(l));
}

fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

fn machine() -> Value {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_kb = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    json!({"cores": cores, "kernel": kernel, "cpu": cpu, "mem_mb": mem_kb / 1024,
           "temp_fs": filesystem(&std::env::temp_dir())})
}

/// The file system holding `path` (from /proc/mounts), and for ext4 whether
/// it has a journal: it decides what an fsync and a file creation cost.
fn filesystem(path: &Path) -> String {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let best = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 4 && path.starts_with(f[1])).then(|| (f[0], f[1], f[2], f[3]))
        })
        .max_by_key(|(_, mnt, _, _)| mnt.len());
    let Some((dev, mnt, fstype, opts)) = best else {
        return "unknown".to_string();
    };
    let mut out = format!("{fstype} on {dev} at {mnt} ({opts})");
    if fstype == "ext4" {
        let name = Path::new(dev)
            .file_name()
            .unwrap_or_default()
            .to_string_lossy();
        let journal =
            fs::read_to_string(format!("/sys/fs/ext4/{name}/journal_task")).unwrap_or_default();
        if journal.trim() == "<none>" {
            out.push_str(", no journal");
        }
    }
    out
}

fn git(args: &[&str]) -> String {
    Command::new("git")
        .args(args)
        .current_dir(MANIFEST_DIR)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--baseline-server") {
        let port = args[i + 1].parse().expect("port");
        baseline_server_main(port, Path::new(&args[i + 2]));
        return;
    }
    START.get_or_init(Instant::now);
    raise_nofile();
    let knobs = Knobs::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(knobs));
}

async fn run(k: Knobs) {
    let bin = daemon_binary();
    let machine = machine();
    let date = iso8601(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_millis() as u64,
    );
    let commit = Some(git(&["rev-parse", "--short", "HEAD"]))
        .filter(|c| !c.is_empty())
        .or_else(|| std::env::var("BENCH_COMMIT").ok())
        .unwrap_or_default();
    let dirty = !git(&[
        "status",
        "--porcelain",
        "--",
        "src",
        "Cargo.toml",
        "Cargo.lock",
    ])
    .is_empty();
    progress!(
        "cyrneld benchmarks: {} ({}{}), machine {machine}, knobs {k:?}",
        bin.display(),
        commit,
        if dirty { ", src modified" } else { "" }
    );
    // Kept when the harness fails (for the daemon logs), removed at the end
    // of a complete run unless BENCH_KEEP is set.
    let root = tempfile::Builder::new()
        .prefix("cyrnel-bench-")
        .tempdir()
        .expect("temp dir")
        .keep();
    progress!("data dirs and daemon logs under {}", root.display());
    let load_1m: f64 = loadavg()
        .split_whitespace()
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(0.0);
    if load_1m > 1.0 {
        progress!(
            "WARNING: load average {} at start: other work shares the cores, expect noisy numbers",
            loadavg()
        );
    }
    let mut rep = Report::default();
    let t_all = Instant::now();

    if ["spawn", "latency", "read", "durable"]
        .iter()
        .any(|s| k.wants(s))
    {
        let grace = k.kill_grace_ms.to_string();
        let d = Daemon::start(
            &bin,
            &root,
            "main",
            &[
                ("CYRNEL_KILL_GRACE_MS", grace.as_str()),
                ("CYRNEL_EVENT_BUFFER", "8192"),
            ],
        )
        .await;
        let tracking = d.tracking();
        progress!("main: run tracking: {tracking}");
        rep.json.insert("run_tracking".into(), json!(tracking));
        let ev = Events::open(d.addr()).await;
        let mut some_id = None;
        if k.wants("spawn") {
            load(&mut rep, "spawn");
            some_id = Some(bench_spawn(&k, &d, &ev, &mut rep).await);
            ev.clear_seen();
        }
        if k.wants("latency") {
            load(&mut rep, "latency");
            bench_latency(&k, &d, &ev, &mut rep).await;
        }
        drop(ev);
        if k.wants("read") {
            load(&mut rep, "read");
            let id = match some_id {
                Some(id) => id,
                None => {
                    let mut http = Http::connect(d.addr()).await.expect("connect");
                    http.create(Bytes::from_static(br#"{"code":"true"}"#))
                        .await
                        .expect("create")
                }
            };
            bench_read(&k, &d, &root, id, &mut rep).await;
        }
        if k.wants("durable") {
            load(&mut rep, "durable");
            bench_durable(&k, &d, &mut rep).await;
        }
        let mut d = d;
        d.stop().await;
    }
    if k.wants("memory") {
        load(&mut rep, "memory");
        bench_memory(&k, &bin, &root, &mut rep).await;
    }
    if k.wants("handover") {
        load(&mut rep, "handover");
        bench_handover(&k, &bin, &root, &mut rep).await;
    }
    if k.wants("steps") {
        load(&mut rep, "steps");
        bench_steps(&k, &root, &mut rep).await;
    }
    if k.wants("churn") {
        load(&mut rep, "churn");
        bench_churn(&k, &bin, &root, &mut rep).await;
    }
    if k.wants("scale") {
        load(&mut rep, "scale");
        bench_scale(&k, &bin, &root, &mut rep).await;
    }
    if k.wants("reclaim") {
        load(&mut rep, "reclaim");
        bench_reclaim(&bin, &root, &mut rep).await;
    }
    if k.wants("soak") {
        load(&mut rep, "soak");
        bench_soak(&bin, &root, &mut rep).await;
    }

    let total = t_all.elapsed();
    let table = rep.table();
    let targets = rep.targets();
    let met = targets.iter().filter(|t| t["met"] == true).count();
    let mut out = rep.json;
    out.insert("date".into(), json!(date));
    out.insert("machine".into(), machine.clone());
    out.insert("commit".into(), json!(commit));
    out.insert("src_modified".into(), json!(dirty));
    out.insert("daemon_binary".into(), json!(bin.display().to_string()));
    out.insert(
        "daemon_binary_from_env".into(),
        json!(std::env::var_os("CYRNELD_BIN").is_some()),
    );
    out.insert("loadavg_end".into(), json!(loadavg()));
    out.insert("duration_s".into(), json!(r3(total.as_secs_f64())));
    out.insert("targets".into(), Value::Array(targets.clone()));
    out.insert("table_markdown".into(), json!(table));
    if !rep.steps_table.is_empty() {
        out.insert("steps_table_markdown".into(), json!(rep.steps_table));
    }
    let path = results_path();
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).expect("create results dir");
    }
    fs::write(
        &path,
        serde_json::to_vec_pretty(&Value::Object(out)).expect("json"),
    )
    .expect("write results");

    if std::env::var_os("BENCH_KEEP").is_none() {
        let _ = fs::remove_dir_all(&root);
    }
    println!();
    println!(
        "cyrneld benchmarks, {date}, {} cores, Linux {}, commit {commit}{}",
        machine["cores"],
        machine["kernel"].as_str().unwrap_or(""),
        if dirty { " (src modified)" } else { "" }
    );
    println!();
    print!("{table}");
    println!();
    if !rep.steps_table.is_empty() {
        println!("Isolation steps, cost per spawn (one thread, rows interleaved):");
        println!();
        print!("{}", rep.steps_table);
        println!();
    }
    println!(
        "Targets met: {met} of {}. Total {:.0} s. Results: {}",
        targets.len(),
        total.as_secs_f64(),
        path.display()
    );
}
