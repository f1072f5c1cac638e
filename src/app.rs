//! The composition root: prepare the data dir → open the store → bind →
//! recover and start the supervisor → serve → on shutdown, stop the
//! supervisor (which puts down every running group) → stop the server.
//! Shutdown is a future passed in, never a global, so `main` decides when
//! it fires. Nothing here exits the process.

use std::fs;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::api::ratelimit::Limiter;
use crate::api::{self, ApiKey, ApiState, HttpLimits};
use crate::config::Config;
use crate::events::Hub;
use crate::handover::{self, Control, Inherited};
use crate::metrics::{Metrics, RunMetrics};
use crate::model::SandboxLevel;
use crate::proc::sandbox::{self, Policy, Requested};
use crate::proc::{self, cgroup::CgroupRoot, Rlimit};
use crate::store::{Store, StoreError};
use crate::supervisor::{Adoption, Settings, Supervisor};
use std::sync::RwLock;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot prepare the data dir {path}: {source}")]
    DataDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Supervisor(#[from] crate::supervisor::StartError),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("cannot take over the listening socket: {0}")]
    Inherit(io::Error),
    #[error("handover failed and the previous image could not be executed again: {0}")]
    Handover(io::Error),
}

/// Creates `dir` (0700) if missing; tightens an existing one to 0700,
/// since it holds the database or runs' folders.
fn private_dir(dir: &Path, mode: u32) -> Result<(), AppError> {
    let wrap = |source| AppError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(wrap)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(wrap)
}

/// `cyrneld --check`: reads every log and table of the data dir's
/// database and reports what is readable; changes nothing. Returns the
/// report's lines and whether anything is damaged.
pub fn check(config: &Config) -> Result<(Vec<String>, bool), AppError> {
    let report = crate::store::check(&config.data_dir.join("db"))?;
    Ok((report.lines, report.damaged))
}

/// `cyrneld --salvage`: keeps what is readable, moves the damaged
/// database aside whole, raises the id counter and the event sequence
/// above anything it can have held. Returns the report's lines.
pub fn salvage(config: &Config) -> Result<Vec<String>, AppError> {
    let report = crate::store::salvage(&config.data_dir)?;
    match &report.aside {
        Some(aside) => tracing::warn!(
            aside = %aside.display(),
            "salvaged the database; what was kept and lost is in SALVAGE.txt there"
        ),
        None => tracing::info!("salvage: nothing is damaged, nothing changed"),
    }
    Ok(report.lines)
}

/// How the process around the daemon (`main`) takes part while it runs:
/// it hears when the daemon is ready and hands it reloaded configurations.
pub struct Hooks {
    /// Called once the listener is bound and the supervisor has recovered
    /// and started, with the bound address (systemd's READY=1).
    pub ready: Option<Box<dyn FnOnce(SocketAddr) + Send>>,
    /// Reloaded configurations (SIGHUP). Of each new value only the part
    /// that can change under running processes is applied here: the API
    /// key and the rate limits. The log level belongs to `main`, which owns
    /// logging; every other setting needs a restart.
    pub reloads: Option<watch::Receiver<Config>>,
    /// What a previous image handed over (`handover::take`).
    pub inherited: Option<Inherited>,
    /// Runs the service manager kept across a crash (from its fd store).
    pub stored: Option<Adoption>,
    /// Handover triggers from `main` (SIGUSR2, SIGHUP); the API sends its
    /// own requests.
    pub handovers: Option<mpsc::Receiver<handover::Trigger>>,
    /// The binary a handover executes: the path the daemon was started
    /// from (a package upgrade replaces the file there).
    pub binary: PathBuf,
    /// Variables the next image must get back (the API key, scrubbed from
    /// this process's environment at start).
    pub handover_env: Vec<(String, String)>,
    /// The service manager (`NOTIFY_SOCKET`): its fd store keeps runs
    /// across a crash when there is one.
    pub service: Arc<crate::service::Notifier>,
}

/// Runs the daemon until `shutdown` resolves, with `main`'s hooks; returns
/// once every running group is gone and every transition is durable.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()>,
    hooks: Hooks,
) -> Result<(), AppError> {
    let credentials = match &config.user {
        None => None,
        Some(_) if proc::effective_uid() != 0 => {
            return Err(AppError::Config(
                "user: switching users needs cyrneld to run as root".into(),
            ))
        }
        Some(user) => Some(
            proc::resolve_credentials(user, config.group.as_deref())
                .map_err(|e| AppError::Config(format!("user/group: {e}")))?,
        ),
    };
    // 0700; with a configured user, the data dir and run/ are 0711 so that
    // user can reach its own run folder (0700, owned by it) but list or
    // read nothing else; the database stays 0700.
    let dir_mode = if credentials.is_some() { 0o711 } else { 0o700 };
    private_dir(&config.data_dir, dir_mode)?;
    // Absolute, because children run with their own working directory and
    // are handed paths inside the data dir.
    let data_dir = fs::canonicalize(&config.data_dir).map_err(|source| AppError::DataDir {
        path: config.data_dir.clone(),
        source,
    })?;
    private_dir(&data_dir.join("db"), 0o700)?;
    let original_nofile = match proc::raise_nofile_limit() {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            None
        }
    };
    let limits = config.child_limits();
    let rlimits: Vec<(Rlimit, u64)> = [
        // Children get the usual soft limit back unless configured.
        (Rlimit::OpenFiles, limits.nofile.or(original_nofile)),
        (Rlimit::Processes, limits.nproc),
        (Rlimit::CoreSize, limits.core),
        (Rlimit::AddressSpace, limits.address_space),
        (Rlimit::CpuSeconds, limits.cpu_seconds),
    ]
    .into_iter()
    .filter_map(|(r, v)| v.map(|v| (r, v)))
    .collect();
    let store = Store::open_with_budget(
        &data_dir.join("db"),
        config.storage_reserve_bytes,
        config.storage_memory_bytes,
    )?;
    let mut hooks = hooks;
    let inherited = hooks.inherited.take();
    let (listener, adoption, generation, fallback) = match inherited {
        Some(Inherited {
            listener,
            adoption,
            generation,
            fallback,
            ..
        }) => {
            listener.set_nonblocking(true).map_err(AppError::Inherit)?;
            let listener = TcpListener::from_std(listener).map_err(AppError::Inherit)?;
            (listener, adoption, generation, fallback)
        }
        None => {
            let listener =
                TcpListener::bind(config.listen)
                    .await
                    .map_err(|source| AppError::Bind {
                        addr: config.listen,
                        source,
                    })?;
            (listener, hooks.stored.take().unwrap_or_default(), 0, None)
        }
    };
    // A second descriptor of the listening socket, which outlives the
    // server: a handover passes it on.
    let listener_keep = {
        use std::os::fd::AsFd;
        listener.as_fd().try_clone_to_owned()
    };
    let cgroups = if config.cgroups {
        match CgroupRoot::detect(&data_dir) {
            Ok(root) => {
                tracing::info!(root = %root.dir().display(), "cgroup v2: each run gets its own cgroup");
                Some(root)
            }
            Err(why) => {
                tracing::warn!(%why, "cgroup v2 is not usable: tracking runs by process group");
                None
            }
        }
    } else {
        tracing::info!("cgroups = \"off\": tracking runs by process group");
        None
    };
    let mut cgroup_limits = Vec::new();
    for (key, file, controller, value) in [
        ("memory_max", c"memory.max", "memory", config.memory_max),
        ("pids_max", c"pids.max", "pids", config.pids_max),
    ] {
        let Some(value) = value else { continue };
        if cgroups.as_ref().is_some_and(|root| root.has(controller)) {
            cgroup_limits.push((file, value));
        } else {
            tracing::warn!(
                key,
                "not enforced: the {controller} cgroup controller is not delegated to cyrneld here"
            );
        }
    }
    let sandbox = Arc::new(detect_sandbox(&config, &data_dir, dir_mode)?);
    let run_uids = (sandbox.level == SandboxLevel::Full && credentials.is_none()).then(|| {
        (
            config
                .sandbox_uid_base
                .unwrap_or_else(|| sandbox::default_uid_base(&data_dir)),
            config.sandbox_uid_count,
        )
    });
    // Orphaned descendants come to us, not to init, so they can be found,
    // killed and reaped.
    if let Err(e) = proc::become_subreaper() {
        tracing::warn!(error = %e, "cannot become a child subreaper");
    }
    // The run metrics start from the stored records and follow every
    // change the hub publishes from here on; both before the supervisor
    // writes anything.
    let runs = Arc::new(RunMetrics::census(&store)?);
    let hub = Arc::new(Hub::with_observer(
        config.event_buffer,
        Some(runs.clone() as Arc<dyn crate::events::Observer>),
    ));
    let metrics = Metrics::new(store.clone(), sandbox.level, hub.clone(), &runs);
    let supervisor = Supervisor::start(
        store.clone(),
        Settings {
            default_timeout_ms: config.default_timeout_ms,
            kill_grace_ms: config.kill_grace_ms,
            max_running: config.max_running,
            shell: config.shell.clone(),
            env: config.env.clone(),
            max_output_bytes: config.max_output_bytes,
            sandbox: sandbox.clone(),
            run_uids,
            network: config.network,
            event_retention: config.event_retention,
            cgroups: cgroups.clone(),
            max_queued: config.max_queued,
            rlimits,
            credentials,
            cgroup_limits,
            idempotency_retention_ms: config.idempotency_retention_s.saturating_mul(1000),
            service: hooks.service.is_present().then(|| hooks.service.clone()),
        },
        hub.clone(),
        adoption,
    )?;
    let idempotency_sweep = tokio::spawn(crate::retention::expire_idempotency_keys(
        store.clone(),
        config.idempotency_retention_s.saturating_mul(1000),
    ));
    let policy = crate::retention::Policy {
        max_records: config.retention_max_records,
        max_age_ms: config.retention_max_age_ms,
    };
    let retention = policy.is_active().then(|| {
        tokio::spawn(crate::retention::run(
            store.clone(),
            supervisor.clone(),
            policy,
        ))
    });
    let (handover_tx, mut handover_rx) = mpsc::channel::<handover::Request>(4);
    let control = Arc::new(Control::new(
        handover_tx.clone(),
        hooks.binary.clone(),
        generation,
        fallback.clone(),
    ));
    if let Some(why) = &fallback {
        tracing::error!(%why, "a handover failed: this is the previous image again, with every run");
    }
    if let Some(mut signals) = hooks.handovers.take() {
        let control = control.clone();
        let binary = hooks.binary.clone();
        tokio::spawn(async move {
            while let Some(trigger) = signals.recv().await {
                if trigger == handover::Trigger::IfReplaced {
                    match proc::reexec::is_running_image(&binary) {
                        Ok(false) => {
                            tracing::info!(binary = %binary.display(), "SIGHUP: the binary on disk is not the running one; handing over");
                        }
                        Ok(true) => continue,
                        Err(e) => {
                            tracing::warn!(binary = %binary.display(), error = %e, "SIGHUP: cannot look at the binary on disk; no handover");
                            continue;
                        }
                    }
                }
                if let Err(e) = control.request().await {
                    tracing::error!(error = %e, "handover refused");
                }
            }
        });
    }
    drop(handover_tx);
    let state = Arc::new(ApiState {
        store,
        supervisor: supervisor.clone(),
        api_key: ApiKey::new(config.api_key.clone()),
        max_body_bytes: config.max_body_bytes,
        hub: hub.clone(),
        heartbeat: std::time::Duration::from_millis(config.event_heartbeat_ms),
        limiter: Limiter::default(),
        rate_limits: RwLock::new(config.rate_limits()),
        http: HttpLimits {
            max_connections: config.max_connections,
            header_read_timeout: Duration::from_millis(config.header_read_timeout_ms),
            max_header_bytes: config.max_header_bytes,
            max_uri_bytes: config.max_uri_bytes,
        },
        metrics,
        handover: control.clone(),
    });
    let addr = listener.local_addr().unwrap_or(config.listen);
    tracing::info!(%addr, data_dir = %data_dir.display(), auth = config.api_key.is_some(), "cyrneld listening");
    let (stop_server, server_stopped) = oneshot::channel::<()>();
    if let Some(reloads) = hooks.reloads {
        tokio::spawn(apply_reloads(reloads, state.clone()));
    }
    let server = tokio::spawn(api::serve(listener, state, async {
        let _ = server_stopped.await;
    }));
    if let Some(ready) = hooks.ready {
        ready(addr);
    }
    let mut shutdown = std::pin::pin!(shutdown);
    // The running image is opened when a handover begins: what it falls
    // back to if the new one cannot start.
    let image = loop {
        tokio::select! {
            _ = &mut shutdown => break None,
            Some(req) = handover_rx.recv() => {
                let ready = match &listener_keep {
                    Err(e) => Err(handover::Refused::Unavailable(e.to_string())),
                    Ok(_) => proc::reexec::open_running_image()
                        .map_err(|e| handover::Refused::Unavailable(e.to_string())),
                };
                let ready = match ready {
                    Ok(image) => handover::preflight(&hooks.binary).await.map(|()| image),
                    Err(e) => Err(e),
                };
                match ready {
                    Err(e) => {
                        control.failed(e.to_string());
                        let _ = req.reply.send(Err(e));
                    }
                    Ok(image) => {
                        let _ = req.reply.send(Ok(hooks.binary.clone()));
                        break Some(image);
                    }
                }
            }
        }
    };
    if let Some(image) = image {
        tracing::info!(binary = %hooks.binary.display(), "handover: stopping the server and parking every run");
        // Further requests are refused with the reason.
        handover_rx.close();
        if let Some(task) = retention {
            task.abort();
        }
        idempotency_sweep.abort();
        // Live event streams end; their clients resume with Last-Event-ID.
        hub.close();
        let _ = stop_server.send(());
        if tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .is_err()
        {
            tracing::warn!("requests still in flight after 5 s are cut off by the handover");
        }
        let runs = match supervisor.park().await {
            Ok(runs) => runs,
            Err(e) => {
                tracing::error!(error = %e, "the supervisor could not park its runs");
                Vec::new()
            }
        };
        let Ok(listener_keep) = listener_keep else {
            unreachable!("checked before the handover began");
        };
        for (k, v) in &hooks.handover_env {
            // SAFETY: setenv while other threads run is the hazard; every
            // thread that could read the environment concurrently is
            // stopped or parked (server, supervisor, starter), and the
            // process replaces its image right after.
            unsafe { std::env::set_var(k, v) };
        }
        let e = handover::exec(&hooks.binary, &image, listener_keep, generation + 1, runs);
        return Err(AppError::Handover(e));
    }
    tracing::info!("shutting down: terminating running processes");
    if let Some(task) = retention {
        task.abort();
    }
    idempotency_sweep.abort();
    supervisor.shutdown().await;
    if let Some(root) = &cgroups {
        root.remove_if_empty();
    }
    sandbox.remove_runs_base_if_empty();
    // Every final transition has been published: end the live streams so
    // the server's graceful stop does not wait on them.
    hub.close();
    let _ = stop_server.send(());
    let _ = server.await;
    tracing::info!("stopped");
    Ok(())
}

/// Decides how runs are isolated (logged) and where their folders live:
/// at level `full` on a private tmpfs each; otherwise in a folder of this
/// data dir's on `/dev/shm` (a tmpfs: no disk inode per run) when the
/// daemon may write there, else in `<data_dir>/run`.
fn detect_sandbox(config: &Config, data_dir: &Path, dir_mode: u32) -> Result<Policy, AppError> {
    let shm = sandbox::shm_runs_base(data_dir);
    let runs_base = match private_dir(&shm, 0o700) {
        Ok(()) if owned_by_me(&shm) => shm,
        _ => {
            let dir = data_dir.join("run");
            private_dir(&dir, dir_mode)?;
            dir
        }
    };
    let paths = sandbox::Paths {
        data_dir: data_dir.to_path_buf(),
        secret_files: config.secret_files.clone(),
        runs_base,
        shared_dirs: config.shared_dirs.clone(),
    };
    for shared in &paths.shared_dirs {
        let clash = std::iter::once(data_dir)
            .chain(paths.secret_files.iter().map(PathBuf::as_path))
            .find(|p| p.starts_with(shared) || shared.starts_with(p));
        if let Some(p) = clash {
            return Err(AppError::Config(format!(
                "shared_dirs: {} would give runs access to {}",
                shared.display(),
                p.display()
            )));
        }
    }
    let limits = sandbox::FolderLimits {
        bytes: config.run_folder_bytes,
        inodes: config.run_folder_inodes,
    };
    let policy = Policy::detect(config.sandbox, paths, limits, &config.shell)
        .map_err(|why| AppError::Config(format!("sandbox: no usable level ({why})")))?;
    match policy.level {
        SandboxLevel::None if config.sandbox != Requested::Off => tracing::warn!(
            runs_base = %policy.runs_base().display(),
            "sandbox level none: runs are NOT isolated from the daemon, its data or each other \
             (give cyrneld root or the capabilities of level full, or a kernel with Landlock)"
        ),
        level => tracing::info!(
            level = level.as_str(),
            degraded = ?policy.degraded,
            runs_base = %policy.runs_base().display(),
            "sandbox: runs are isolated"
        ),
    }
    Ok(policy)
}

fn owned_by_me(p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    fs::symlink_metadata(p).is_ok_and(|m| m.is_dir() && m.uid() == proc::effective_uid())
}

/// Applies the reloadable part of each new configuration until the sender
/// goes away. Only the latest value matters, hence a watch channel.
async fn apply_reloads(mut reloads: watch::Receiver<Config>, state: Arc<ApiState>) {
    while reloads.changed().await.is_ok() {
        let (api_key, rate_limits) = {
            let config = reloads.borrow_and_update();
            (config.api_key.clone(), config.rate_limits())
        };
        state.api_key.set(api_key);
        // Counters already running keep counting; the new limits apply
        // from the next request.
        *state
            .rate_limits
            .write()
            .unwrap_or_else(PoisonError::into_inner) = rate_limits;
    }
}
