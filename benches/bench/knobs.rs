//! Knobs, and where the daemon and the results are.

use crate::*;

pub(crate) fn knob<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        _ => default,
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Knobs {
    pub(crate) only: Option<Vec<String>>,
    pub(crate) spawn_runs: usize,
    pub(crate) spawn_clients: usize,
    pub(crate) spawn_rounds: usize,
    pub(crate) spawn_idle: usize,
    pub(crate) latency_samples: usize,
    pub(crate) kill_grace_ms: u64,
    pub(crate) read_conns: usize,
    pub(crate) read_secs: f64,
    pub(crate) durable_clients: usize,
    pub(crate) durable_secs: f64,
    pub(crate) memory_procs: usize,
    pub(crate) scale_records: u64,
    pub(crate) scale_clients: usize,
    pub(crate) scale_ran: u64,
    pub(crate) step_spawns: usize,
    pub(crate) churn_runs: u64,
    pub(crate) handover_runs: usize,
    pub(crate) handover_rounds: usize,
}

impl Knobs {
    pub(crate) fn from_env() -> Knobs {
        let only = std::env::var("BENCH_ONLY")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.split(',').map(|p| p.trim().to_string()).collect());
        Knobs {
            only,
            spawn_runs: knob("BENCH_SPAWN_RUNS", 2000),
            spawn_clients: knob("BENCH_SPAWN_CLIENTS", 16),
            spawn_rounds: knob("BENCH_SPAWN_ROUNDS", 9),
            spawn_idle: knob("BENCH_SPAWN_IDLE", 0),
            latency_samples: knob("BENCH_LATENCY_SAMPLES", 500),
            kill_grace_ms: knob("BENCH_KILL_GRACE_MS", 50),
            read_conns: knob("BENCH_READ_CONNS", 64),
            read_secs: knob("BENCH_READ_SECS", 5.0),
            durable_clients: knob("BENCH_DURABLE_CLIENTS", 64),
            durable_secs: knob("BENCH_DURABLE_SECS", 5.0),
            memory_procs: knob("BENCH_MEMORY_PROCS", 1000),
            scale_records: knob("BENCH_SCALE_RECORDS", DEFAULT_SCALE_RECORDS),
            scale_clients: knob("BENCH_SCALE_CLIENTS", 64),
            scale_ran: knob("BENCH_SCALE_RAN", 100_000),
            step_spawns: knob("BENCH_STEP_SPAWNS", 500),
            churn_runs: knob("BENCH_CHURN_RUNS", 100_000),
            handover_runs: knob("BENCH_HANDOVER_RUNS", 1000),
            handover_rounds: knob("BENCH_HANDOVER_ROUNDS", 10),
        }
    }

    pub(crate) fn wants(&self, section: &str) -> bool {
        match &self.only {
            Some(o) => o.iter().any(|s| s == section),
            // The soak takes 15 minutes: only when asked for (`make soak`).
            None => section != "soak",
        }
    }
}

// ---------------------------------------------------------------------------
// Locating the daemon and the output
// ---------------------------------------------------------------------------

pub(crate) const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

pub(crate) fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        Some(d) => Path::new(MANIFEST_DIR).join(d),
        None => Path::new(MANIFEST_DIR).join("target"),
    }
}

/// The release `cyrneld`: `CYRNELD_BIN` if set; else the one cargo built for
/// this bench (the bench profile inherits release and shares its directory);
/// else `<target>/release/cyrneld`, built with cargo first when missing.
pub(crate) fn daemon_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("CYRNELD_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "CYRNELD_BIN={} does not exist", p.display());
        return p;
    }
    let candidates = [
        PathBuf::from(env!("CARGO_BIN_EXE_cyrneld")),
        target_dir().join("release").join("cyrneld"),
    ];
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return p.clone();
    }
    progress!("cyrneld not found; running `cargo build --release --bin cyrneld`");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "cyrneld"])
        .current_dir(MANIFEST_DIR)
        .status()
        .expect("run cargo");
    assert!(
        status.success(),
        "cargo build --release --bin cyrneld failed"
    );
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .expect("cyrneld still missing after cargo build")
}

pub(crate) fn results_path() -> PathBuf {
    match std::env::var_os("BENCH_RESULTS") {
        Some(p) => PathBuf::from(p),
        None => Path::new(MANIFEST_DIR).join("target/bench/results.json"),
    }
}
