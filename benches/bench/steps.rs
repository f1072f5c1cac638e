//! Section `steps`: what each isolation step costs per spawn.

use crate::*;

/// The rows of the step table: each adds one isolation step to the row
/// above it (the last one is level `full` with `network: false`).
pub(crate) const STEP_ROWS: &[&str] = &[
    "raw `/bin/sh -c true` (`std::process::Command`, no folder)",
    "none: level `none` (folder on `/dev/shm` with `code` and `output`, clone + exec `sh code`)",
    "+ private tmpfs folder (`fsopen`/`fsmount`, staged through the mount fd; no namespace: the child reaches it via `/proc/<pid>/fd`)",
    "+ mount and IPC namespaces and the mount view (data dir masked, host read-only, tmpfs on `/tmp` and `/dev/shm`, own `/proc`)",
    "+ per-run uid, bounding set emptied, capabilities cleared, `no_new_privs`",
    "+ Landlock",
    "+ seccomp (= level `full`, `network: true`, the default)",
    "+ network namespace with `lo` up (= level `full`, `network: false`)",
];

/// Per-row samples, in µs: parent-side preparation (folder, staging,
/// ruleset), spawn until the child was reaped, and the folder's removal.
#[derive(Default)]
pub(crate) struct StepSamples {
    pub(crate) prepare: Vec<f64>,
    pub(crate) spawn: Vec<f64>,
    pub(crate) drop: Vec<f64>,
    pub(crate) total: Vec<f64>,
}

/// Times `iterations` children per row, rows interleaved (each iteration
/// runs every row once, so a change in the machine's speed hits all rows).
/// Runs on the calling thread: `Steps` holds raw pointers.
pub(crate) fn step_costs(dir: &Path, iterations: usize) -> Result<Vec<StepSamples>, String> {
    use cyrnel::proc::sandbox::{self, FolderLimits, Paths, Policy, Requested};
    let data_dir = dir.join("steps-data");
    fs::create_dir_all(&data_dir).map_err(|e| e.to_string())?;
    // Level none's folders go where the daemon puts them: a folder of its
    // own on /dev/shm (a tmpfs), else inside the data dir.
    let shm = PathBuf::from(format!(
        "/dev/shm/cyrnel-bench-steps-{}",
        std::process::id()
    ));
    /// Removes the folder base on every way out, an error's too.
    struct RemoveOnDrop(PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let _remove = RemoveOnDrop(shm.clone());
    let runs_base = if fs::create_dir_all(&shm).is_ok() {
        shm.clone()
    } else {
        data_dir.join("run")
    };
    let paths = Paths {
        data_dir: data_dir.clone(),
        secret_files: Vec::new(),
        runs_base,
        shared_dirs: Vec::new(),
    };
    // The daemon's defaults (run_folder_bytes, run_folder_inodes).
    let limits = FolderLimits {
        bytes: 64 << 20,
        inodes: 16_384,
    };
    let shell = "/bin/sh";
    let none = Policy::detect(Requested::Off, paths.clone(), limits, shell)?;
    let full = Policy::detect(Requested::Full, paths, limits, shell)?;
    let base = sandbox::default_uid_base(&data_dir);
    let uid = (base + 1, base + 1);
    let pid = std::process::id();
    // One spawn of `row`: prepare, spawn and wait, drop; µs each and in all.
    let one = |row: usize, i: usize| -> Result<[f64; 4], String> {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let t0 = Instant::now();
        if row == 0 {
            let status = raw_spawn().map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("`sh -c true` exited with {status}"));
            }
            let t = us(t0.elapsed());
            return Ok([0.0, t, 0.0, t]);
        }
        let id = (i * STEP_ROWS.len() + row) as u64;
        let mut prepared = if row == 1 {
            none.prepare(id, b"true\n", None, true)
        } else {
            full.prepare(id, b"true\n", Some(uid), row < 7)
        }
        .map_err(|e| format!("{}: prepare: {e}", STEP_ROWS[row]))?;
        let s = std::mem::take(&mut prepared.steps);
        if row == 2 {
            // The folder exists but no namespace: the child (still
            // root) enters it through this process's mount descriptor.
            let fd = s
                .mounts
                .as_ref()
                .map(|m| m.private_tmp)
                .ok_or("level full prepared no mount")?;
            prepared.cwd = PathBuf::from(format!("/proc/{pid}/fd/{fd}/cyrnel"));
        }
        prepared.steps = sandbox::Steps {
            unshare: if row >= 3 { s.unshare } else { 0 },
            mounts: if row >= 3 { s.mounts } else { None },
            loopback_up: row >= 7 && s.loopback_up,
            drop_bounding: row >= 4 && s.drop_bounding,
            no_new_privs: row >= 4 && s.no_new_privs,
            landlock: if row >= 5 { s.landlock } else { None },
            seccomp: if row >= 6 { s.seccomp } else { None },
        };
        let credentials = (row >= 4).then_some(uid);
        let t1 = Instant::now();
        let exit = cyrnel::proc::probe_spawn(shell, &prepared, credentials)
            .map_err(|e| format!("{}: spawn: {e}", STEP_ROWS[row]))?;
        if exit != Some(0) {
            return Err(format!("{}: the child ended with {exit:?}", STEP_ROWS[row]));
        }
        let t2 = Instant::now();
        drop(prepared);
        let t3 = Instant::now();
        Ok([us(t1 - t0), us(t2 - t1), us(t3 - t2), us(t3 - t0)])
    };
    let mut out: Vec<StepSamples> = STEP_ROWS.iter().map(|_| StepSamples::default()).collect();
    let warmup = 20;
    // Rows with `drop_bounding` empty the spawning thread's bounding set
    // once (`proc::spawn`), as the daemon's starter thread does; a root
    // child of such a thread execs without capabilities. The rows before
    // them (raw, `none`, the root child entering its folder through
    // `/proc/<pid>/fd`) therefore run on a thread of their own, which
    // keeps its bounding set; the timing is taken on that thread.
    // Rows with seccomp (6, 7) run on a third thread, dedicated to
    // spawning as the daemon's starter thread is: it takes the filter's
    // first stage once (`proc::sandbox::Seccomp`), and each child adds
    // only the second.
    std::thread::scope(|scope| {
        let one = &one;
        let worker = |dedicated: bool| {
            let (to, rx) = std::sync::mpsc::channel::<(usize, usize)>();
            let (tx, from) = std::sync::mpsc::channel();
            scope.spawn(move || {
                if dedicated {
                    cyrnel::proc::dedicate_spawner_thread();
                }
                for (row, i) in rx {
                    if tx.send(one(row, i)).is_err() {
                        return;
                    }
                }
            });
            move |row: usize, i: usize| -> Result<[f64; 4], String> {
                to.send((row, i)).map_err(|e| e.to_string())?;
                from.recv().map_err(|e| e.to_string())?
            }
        };
        let (plain, filtered) = (worker(false), worker(true));
        for i in 0..warmup + iterations {
            for (row, samples) in out.iter_mut().enumerate() {
                let [prepare, spawn, drop, total] = match row {
                    0..4 => plain(row, i)?,
                    4 | 5 => one(row, i)?,
                    _ => filtered(row, i)?,
                };
                if i >= warmup {
                    samples.prepare.push(prepare);
                    samples.spawn.push(spawn);
                    samples.drop.push(drop);
                    samples.total.push(total);
                }
            }
        }
        Ok::<(), String>(())
    })?;
    Ok(out)
}

pub(crate) fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

pub(crate) async fn bench_steps(k: &Knobs, root: &Path, rep: &mut Report) {
    let n = k.step_spawns;
    // SAFETY: geteuid has no preconditions.
    let is_root = unsafe { libc::geteuid() } == 0;
    progress!(
        "steps: {n} children per row after 20 warm-ups, {} rows interleaved, one child at a time",
        STEP_ROWS.len()
    );
    let dir = root.to_path_buf();
    // A thread of its own, which ends with the section: level `full`
    // empties the spawning thread's capability bounding set.
    let res = tokio::task::spawn_blocking(move || {
        std::thread::spawn(move || step_costs(&dir, n))
            .join()
            .expect("step thread")
    })
    .await
    .expect("step thread");
    let rows = match res {
        Ok(rows) => rows,
        Err(e) if !is_root => {
            progress!("steps: level full is not available without root ({e}); no step table");
            rep.json
                .insert("isolation_steps".into(), json!({"skipped": e}));
            return;
        }
        Err(e) => panic!("steps: {e}"),
    };
    let mut table = String::new();
    table.push_str(
        "| Step (cumulative) | per spawn p50 µs | mean µs | step's cost (p50 Δ) µs | prepare p50 µs | spawn + wait p50 µs | folder removal p50 µs |\n",
    );
    table.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
    let mut json_rows = Vec::new();
    let mut prev: Option<f64> = None;
    for (name, s) in STEP_ROWS.iter().zip(&rows) {
        let p50 = |v: &[f64]| summarize(v).p50;
        let total = summarize(&s.total);
        let delta = prev.map(|p| total.p50 - p);
        let _ = writeln!(
            table,
            "| {name} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} |",
            total.p50,
            total.mean,
            delta.map_or("–".to_string(), |d| format!("{d:+.0}")),
            p50(&s.prepare),
            p50(&s.spawn),
            p50(&s.drop),
        );
        progress!(
            "steps: {name}: p50 {:.0} µs, mean {:.0} µs, p99 {:.0} µs",
            total.p50,
            total.mean,
            total.p99
        );
        json_rows.push(json!({
            "step": name, "n": total.n,
            "total_us": {"p50": r3(total.p50), "mean": r3(total.mean), "p99": r3(total.p99), "max": r3(total.max)},
            "delta_p50_us": delta.map(r3),
            "prepare_us": {"p50": r3(p50(&s.prepare)), "mean": r3(mean(&s.prepare))},
            "spawn_wait_us": {"p50": r3(p50(&s.spawn)), "mean": r3(mean(&s.spawn))},
            "folder_drop_us": {"p50": r3(p50(&s.drop)), "mean": r3(mean(&s.drop))},
        }));
        prev = Some(total.p50);
    }
    rep.steps_table = table;
    rep.json.insert(
        "isolation_steps".into(),
        json!({
            "children_per_row": n, "warmup_per_row": 20,
            "method": "one child at a time (rows 0-3 on one thread, 4-5 on another, 6-7 on a third dedicated to spawning, as the daemon's starter is); every iteration runs each row once (interleaved); a row is Policy::prepare + probe_spawn (clone, the steps, exec `/bin/sh <cwd>/code` with `true`, waitid) + dropping the Prepared (the folder); the steps of level full are switched off one by one in the Prepared's Steps",
            "rows": json_rows,
        }),
    );
}
