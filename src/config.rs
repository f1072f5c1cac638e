//! Configuration: parsed and validated once, at start-up, into typed values.
//!
//! Sources, strongest first: command-line flags, `CYRNEL_<KEY>` environment
//! variables, the TOML file given with `--config`, built-in defaults. Any
//! invalid value stops the daemon with a message naming the key; nothing
//! starts half-configured.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::proc::sandbox::Requested;

/// Every key the daemon understands, with its default as documentation
/// (`platform/cyrneld.toml` lists the same).
pub const KEYS: &[&str] = &[
    "listen",
    "data_dir",
    "api_key",
    "max_running",
    "default_timeout_ms",
    "kill_grace_ms",
    "shell",
    "max_output_bytes",
    "max_body_bytes",
    "env",
    "log_level",
    "event_retention",
    "event_buffer",
    "event_heartbeat_ms",
    "cgroups",
    "storage_reserve_bytes",
    "api_key_file",
    "rate_limit_create_per_min",
    "rate_limit_run_per_min",
    "rate_limit_kill_per_min",
    "rate_limit_max",
    "rate_limit_window_ms",
    "max_connections",
    "header_read_timeout_ms",
    "max_header_bytes",
    "max_uri_bytes",
    "max_queued",
    "user",
    "group",
    "rlimit_nofile",
    "rlimit_nproc",
    "rlimit_core",
    "rlimit_as",
    "rlimit_cpu",
    "memory_max",
    "pids_max",
    "sandbox",
    "sandbox_uid_base",
    "sandbox_uid_count",
    "run_folder_bytes",
    "run_folder_inodes",
    "network",
    "shared_dirs",
    "storage_memory_bytes",
    "retention_max_records",
    "retention_max_age_ms",
];

/// Request limits per client address and one-minute window (0 disables),
/// plus the optional limit over all routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub create_per_min: u64,
    pub run_per_min: u64,
    pub kill_per_min: u64,
    pub global_max: u64,
    pub global_window_ms: u64,
}

/// Resource limits applied to every child before exec (`None`: inherited).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChildLimits {
    pub nofile: Option<u64>,
    pub nproc: Option<u64>,
    pub core: Option<u64>,
    pub address_space: Option<u64>,
    pub cpu_seconds: Option<u64>,
}

/// Keys without a default value (unset means "none"); the shipped file
/// shows each as a commented example instead.
pub const OPTIONAL_KEYS: &[&str] = &[
    "api_key",
    "api_key_file",
    "env",
    "user",
    "group",
    "rlimit_nofile",
    "rlimit_nproc",
    "rlimit_core",
    "rlimit_as",
    "rlimit_cpu",
    "memory_max",
    "pids_max",
    "sandbox_uid_base",
    "shared_dirs",
    "retention_max_records",
    "retention_max_age_ms",
];

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub api_key: Option<String>,
    pub max_running: usize,
    /// `None`: no default time limit (`default_timeout_ms = 0`).
    pub default_timeout_ms: Option<u64>,
    pub kill_grace_ms: u64,
    pub shell: String,
    pub max_output_bytes: u64,
    pub max_body_bytes: u64,
    pub env: Vec<(String, String)>,
    pub log_level: String,
    /// Events kept for resuming clients.
    pub event_retention: u64,
    /// Events a stream client may fall behind before its stream is closed.
    pub event_buffer: usize,
    pub event_heartbeat_ms: u64,
    /// Track each run in its own cgroup v2 when the host allows it
    /// (`cgroups = "auto"`); `"off"` uses process groups only.
    pub cgroups: bool,
    /// Free bytes kept on the data dir's filesystem; below it creates and
    /// reruns get 507 while transitions of running work still persist.
    pub storage_reserve_bytes: u64,
    pub rate_limits: RateLimits,
    /// Concurrent HTTP connections; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A client must send a request's headers within this (slowloris).
    pub header_read_timeout_ms: u64,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    /// Queued processes at most; creates beyond get 429.
    pub max_queued: usize,
    /// Run children as this user/group (names or numbers); only as root.
    pub user: Option<String>,
    pub group: Option<String>,
    pub child_limits: ChildLimits,
    /// Per-run cgroup limits, where the host delegates the controllers.
    pub memory_max: Option<u64>,
    pub pids_max: Option<u64>,
    /// `auto` (the strongest level available), `full`, `landlock` or
    /// `off` (see `proc::sandbox`).
    pub sandbox: Requested,
    /// First uid of the block runs get one of each at level `full`;
    /// `None`: derived from the data dir (`sandbox::default_uid_base`).
    pub sandbox_uid_base: Option<u32>,
    pub sandbox_uid_count: u32,
    /// Size and inode caps of a run's folder and temporary space.
    pub run_folder_bytes: u64,
    pub run_folder_inodes: u64,
    /// `options.network` when a create does not say.
    pub network: bool,
    /// Host directories every run may read and write (absolute paths).
    pub shared_dirs: Vec<PathBuf>,
    /// The files holding secrets (the config file when it sets `api_key`,
    /// and `api_key_file`): masked from runs.
    pub secret_files: Vec<PathBuf>,
    /// RocksDB's one memory budget: the shared block cache, which also
    /// holds index and filter blocks and is charged for the memtables.
    pub storage_memory_bytes: u64,
    /// Retention: idle records beyond this count (oldest first) or idle
    /// for longer than this age are deleted, as DELETE would. Unset: kept.
    pub retention_max_records: Option<u64>,
    pub retention_max_age_ms: Option<u64>,
}

impl fmt::Debug for Config {
    // Hand-written so the API key never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .field("max_running", &self.max_running)
            .field("default_timeout_ms", &self.default_timeout_ms)
            .field("kill_grace_ms", &self.kill_grace_ms)
            .field("shell", &self.shell)
            .field("max_output_bytes", &self.max_output_bytes)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("log_level", &self.log_level)
            .field("event_retention", &self.event_retention)
            .field("event_buffer", &self.event_buffer)
            .field("event_heartbeat_ms", &self.event_heartbeat_ms)
            .field("cgroups", &self.cgroups)
            .field("storage_reserve_bytes", &self.storage_reserve_bytes)
            .field("rate_limits", &self.rate_limits)
            .field("max_connections", &self.max_connections)
            .field("header_read_timeout_ms", &self.header_read_timeout_ms)
            .field("max_header_bytes", &self.max_header_bytes)
            .field("max_uri_bytes", &self.max_uri_bytes)
            .field("max_queued", &self.max_queued)
            .field("user", &self.user)
            .field("group", &self.group)
            .field("child_limits", &self.child_limits)
            .field("memory_max", &self.memory_max)
            .field("pids_max", &self.pids_max)
            .field("sandbox", &self.sandbox)
            .field("sandbox_uid_base", &self.sandbox_uid_base)
            .field("sandbox_uid_count", &self.sandbox_uid_count)
            .field("run_folder_bytes", &self.run_folder_bytes)
            .field("run_folder_inodes", &self.run_folder_inodes)
            .field("network", &self.network)
            .field("shared_dirs", &self.shared_dirs)
            .field("secret_files", &self.secret_files)
            .field("storage_memory_bytes", &self.storage_memory_bytes)
            .field("retention_max_records", &self.retention_max_records)
            .field("retention_max_age_ms", &self.retention_max_age_ms)
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

fn err(key: &str, msg: impl fmt::Display) -> ConfigError {
    ConfigError(format!("{key}: {msg}"))
}

/// What the command line says.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

/// A value before typing: from TOML, or text from a flag or variable.
enum Raw {
    Toml(toml::Value),
    Text(String),
}

impl Raw {
    fn show(&self) -> String {
        match self {
            Raw::Toml(v) => v.to_string(),
            Raw::Text(s) => format!("{s:?}"),
        }
    }
}

/// Loads the configuration. `env` looks up environment variables (a
/// parameter so tests need not touch the process environment).
pub fn load(flags: &Flags, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
    let mut raw: BTreeMap<&'static str, Raw> = BTreeMap::new();
    let mut secret_files = Vec::new();
    if let Some(path) = &flags.config {
        let table = read_file(path)?;
        if table.contains_key("api_key") {
            private_file(path, "holds api_key")?;
            secret_files.push(path.clone());
        }
        for (k, v) in table {
            let key = KEYS
                .iter()
                .find(|known| **known == k)
                .ok_or_else(|| ConfigError(format!("{}: unknown key '{k}'", path.display())))?;
            raw.insert(key, Raw::Toml(v));
        }
    }
    for key in KEYS {
        if let Some(v) = env(&format!("CYRNEL_{}", key.to_ascii_uppercase())) {
            raw.insert(key, Raw::Text(v));
        }
    }
    if let Some(v) = &flags.listen {
        raw.insert("listen", Raw::Text(v.clone()));
    }
    if let Some(v) = &flags.data_dir {
        raw.insert("data_dir", Raw::Text(v.display().to_string()));
    }
    let mut config = build(&raw)?;
    if let Some(path) = string("api_key_file", raw.get("api_key_file"))? {
        let path = PathBuf::from(path);
        private_file(&path, "holds the API key (api_key_file)")?;
        secret_files.push(path);
    }
    // Absolute, since runs have their own working directory.
    config.secret_files = secret_files
        .into_iter()
        .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
        .collect();
    Ok(config)
}

/// A file holding the API key must be readable by its owner (and group)
/// only, as OpenSSH insists for private keys: anyone else could read the
/// key and with it every run.
fn private_file(path: &Path, what: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(()); // reading it reports the error
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(ConfigError(format!(
            "{}: {what} and is accessible to others (mode {mode:04o}); \
             run `chmod o-rwx {}` (or move the key to api_key_file with mode 0600)",
            path.display(),
            path.display()
        )));
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
    text.parse::<toml::Table>()
        .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))
}

fn string(key: &str, v: Option<&Raw>) -> Result<Option<String>, ConfigError> {
    match v {
        None => Ok(None),
        Some(Raw::Text(s)) => Ok(Some(s.clone())),
        Some(Raw::Toml(toml::Value::String(s))) => Ok(Some(s.clone())),
        Some(other) => Err(err(key, format!("must be a string (got {})", other.show()))),
    }
}

fn integer(key: &str, v: Option<&Raw>, default: u64, min: u64) -> Result<u64, ConfigError> {
    let n = match v {
        None => return Ok(default),
        Some(Raw::Text(s)) => s.trim().parse::<u64>().ok(),
        Some(Raw::Toml(toml::Value::Integer(i))) => u64::try_from(*i).ok(),
        Some(_) => None,
    };
    match n {
        Some(n) if n >= min => Ok(n),
        _ => Err(err(
            key,
            format!(
                "must be an integer >= {min} (got {})",
                v.map(Raw::show).unwrap_or_default()
            ),
        )),
    }
}

fn env_table(v: Option<&Raw>) -> Result<Vec<(String, String)>, ConfigError> {
    let key = "env";
    let map: BTreeMap<String, String> = match v {
        None => return Ok(vec![("PATH".into(), DEFAULT_PATH.into())]),
        Some(Raw::Text(s)) => serde_json::from_str(s).map_err(|e| {
            err(
                key,
                format!(
                    "must be a JSON object of strings, e.g. {{\"PATH\":\"/usr/bin:/bin\"}} ({e})"
                ),
            )
        })?,
        Some(Raw::Toml(toml::Value::Table(t))) => t
            .iter()
            .map(|(k, v)| match v {
                toml::Value::String(s) => Ok((k.clone(), s.clone())),
                other => Err(err(
                    key,
                    format!("value of {k} must be a string (got {other})"),
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(err(
                key,
                format!("must be a table of strings (got {})", other.show()),
            ))
        }
    };
    for name in map.keys() {
        if name.is_empty() || name.contains('=') || name.contains('\0') {
            return Err(err(key, format!("invalid variable name {name:?}")));
        }
    }
    if map.values().any(|v| v.contains('\0')) {
        return Err(err(key, "values must not contain NUL bytes"));
    }
    Ok(map.into_iter().collect())
}

fn build(raw: &BTreeMap<&'static str, Raw>) -> Result<Config, ConfigError> {
    let listen_text =
        string("listen", raw.get("listen"))?.unwrap_or_else(|| "127.0.0.1:9371".into());
    let listen: SocketAddr = listen_text.parse().map_err(|_| {
        err(
            "listen",
            format!("must be ADDRESS:PORT, e.g. 127.0.0.1:9371 (got {listen_text:?})"),
        )
    })?;
    let data_dir = PathBuf::from(
        string("data_dir", raw.get("data_dir"))?.unwrap_or_else(|| "cyrnel-data".into()),
    );
    if data_dir.as_os_str().is_empty() {
        return Err(err("data_dir", "must not be empty"));
    }
    let mut api_key = string("api_key", raw.get("api_key"))?;
    if let Some(path) = string("api_key_file", raw.get("api_key_file"))? {
        if api_key.is_some() {
            return Err(err("api_key_file", "set api_key or api_key_file, not both"));
        }
        // A systemd credential or secrets file: its content, without the
        // trailing newline.
        let text = std::fs::read_to_string(&path)
            .map_err(|e| err("api_key_file", format!("cannot read {path}: {e}")))?;
        api_key = Some(text.trim_end_matches(['\n', '\r']).to_string());
    }
    if api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        return Err(err(
            "api_key",
            "must not be empty (leave it unset to disable authentication)",
        ));
    }
    if api_key.is_none() && !listen.ip().is_loopback() {
        return Err(err(
            "listen",
            format!("refusing to listen on non-loopback address {listen} without an api_key"),
        ));
    }
    let max_running = integer("max_running", raw.get("max_running"), 32, 1)?;
    let default_timeout_ms = integer(
        "default_timeout_ms",
        raw.get("default_timeout_ms"),
        30_000,
        0,
    )?;
    let kill_grace_ms = integer("kill_grace_ms", raw.get("kill_grace_ms"), 5_000, 0)?;
    let max_output_bytes = integer("max_output_bytes", raw.get("max_output_bytes"), 8 << 20, 0)?;
    let max_body_bytes = integer("max_body_bytes", raw.get("max_body_bytes"), 1 << 20, 1024)?;
    let shell = string("shell", raw.get("shell"))?.unwrap_or_else(|| "/bin/sh".into());
    if !Path::new(&shell).is_absolute() {
        return Err(err(
            "shell",
            format!("must be an absolute path (got {shell:?})"),
        ));
    }
    if !Path::new(&shell).is_file() {
        return Err(err("shell", format!("{shell} does not exist")));
    }
    let env = env_table(raw.get("env"))?;
    let event_retention = integer("event_retention", raw.get("event_retention"), 100_000, 1)?;
    let event_buffer = integer("event_buffer", raw.get("event_buffer"), 1024, 1)?;
    let event_heartbeat_ms = integer(
        "event_heartbeat_ms",
        raw.get("event_heartbeat_ms"),
        15_000,
        10,
    )?;
    let cgroups = match string("cgroups", raw.get("cgroups"))?.as_deref() {
        None | Some("auto") => true,
        Some("off") => false,
        Some(other) => {
            return Err(err(
                "cgroups",
                format!("must be \"auto\" or \"off\" (got {other:?})"),
            ))
        }
    };
    let log_level = string("log_level", raw.get("log_level"))?.unwrap_or_else(|| "info".into());
    if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
        return Err(err(
            "log_level",
            format!("not a valid filter (got {log_level:?}); try info or debug"),
        ));
    }
    Ok(Config {
        listen,
        data_dir,
        api_key,
        max_running: usize::try_from(max_running).map_err(|_| err("max_running", "too large"))?,
        default_timeout_ms: (default_timeout_ms > 0).then_some(default_timeout_ms),
        kill_grace_ms,
        shell,
        max_output_bytes,
        max_body_bytes,
        env,
        log_level,
        event_retention,
        event_buffer: usize::try_from(event_buffer)
            .map_err(|_| err("event_buffer", "too large"))?,
        event_heartbeat_ms,
        cgroups,
        storage_reserve_bytes: integer(
            "storage_reserve_bytes",
            raw.get("storage_reserve_bytes"),
            64 << 20,
            0,
        )?,
        rate_limits: RateLimits {
            create_per_min: integer(
                "rate_limit_create_per_min",
                raw.get("rate_limit_create_per_min"),
                20,
                0,
            )?,
            run_per_min: integer(
                "rate_limit_run_per_min",
                raw.get("rate_limit_run_per_min"),
                20,
                0,
            )?,
            kill_per_min: integer(
                "rate_limit_kill_per_min",
                raw.get("rate_limit_kill_per_min"),
                10,
                0,
            )?,
            global_max: integer("rate_limit_max", raw.get("rate_limit_max"), 0, 0)?,
            global_window_ms: integer(
                "rate_limit_window_ms",
                raw.get("rate_limit_window_ms"),
                60_000,
                1,
            )?,
        },
        max_connections: usize_key(raw, "max_connections", 1024, 1)?,
        header_read_timeout_ms: integer(
            "header_read_timeout_ms",
            raw.get("header_read_timeout_ms"),
            10_000,
            1,
        )?,
        // hyper's read buffer cannot be smaller than 8 KiB.
        max_header_bytes: usize_key(raw, "max_header_bytes", 16 * 1024, 8192)?,
        max_uri_bytes: usize_key(raw, "max_uri_bytes", 8 * 1024, 64)?,
        max_queued: usize_key(raw, "max_queued", 10_000, 1)?,
        user: non_empty(raw, "user")?,
        group: non_empty(raw, "group")?,
        child_limits: ChildLimits {
            nofile: optional_integer(raw, "rlimit_nofile")?,
            nproc: optional_integer(raw, "rlimit_nproc")?,
            core: optional_integer(raw, "rlimit_core")?,
            address_space: optional_integer(raw, "rlimit_as")?,
            cpu_seconds: optional_integer(raw, "rlimit_cpu")?,
        },
        memory_max: optional_integer(raw, "memory_max")?,
        pids_max: optional_integer(raw, "pids_max")?,
        sandbox: match string("sandbox", raw.get("sandbox"))?.as_deref() {
            None | Some("auto") => Requested::Auto,
            Some("full") => Requested::Full,
            Some("landlock") => Requested::Landlock,
            Some("off") => Requested::Off,
            Some(other) => {
                return Err(err(
                    "sandbox",
                    format!("must be \"auto\", \"full\", \"landlock\" or \"off\" (got {other:?})"),
                ))
            }
        },
        sandbox_uid_base: match optional_integer(raw, "sandbox_uid_base")? {
            None => None,
            Some(b) if (65_536..=u64::from(u32::MAX) - 65_536).contains(&b) => Some(b as u32),
            Some(b) => {
                return Err(err(
                    "sandbox_uid_base",
                    format!("must be between 65536 and {} (got {b})", u32::MAX - 65_536),
                ))
            }
        },
        sandbox_uid_count: {
            let n = integer("sandbox_uid_count", raw.get("sandbox_uid_count"), 65_536, 1)?;
            if n < max_running || n > 65_536 {
                return Err(err(
                    "sandbox_uid_count",
                    format!("must be between max_running ({max_running}) and 65536 (got {n})"),
                ));
            }
            n as u32
        },
        run_folder_bytes: integer(
            "run_folder_bytes",
            raw.get("run_folder_bytes"),
            64 << 20,
            64 << 10,
        )?,
        run_folder_inodes: integer(
            "run_folder_inodes",
            raw.get("run_folder_inodes"),
            16_384,
            16,
        )?,
        network: match raw.get("network") {
            None => true,
            Some(Raw::Toml(toml::Value::Boolean(b))) => *b,
            Some(Raw::Text(t)) if t == "true" || t == "false" => t == "true",
            Some(other) => {
                return Err(err(
                    "network",
                    format!("must be true or false (got {})", other.show()),
                ))
            }
        },
        shared_dirs: shared_dirs(raw.get("shared_dirs"))?,
        secret_files: Vec::new(),
        storage_memory_bytes: integer(
            "storage_memory_bytes",
            raw.get("storage_memory_bytes"),
            32 << 20,
            4 << 20,
        )?,
        retention_max_records: optional_integer(raw, "retention_max_records")?,
        retention_max_age_ms: optional_integer(raw, "retention_max_age_ms")?,
    })
}

/// `shared_dirs`: a TOML array of paths, or `:`-separated in
/// `CYRNEL_SHARED_DIRS`. Each must be an absolute path to a directory that
/// is not private to a run (`/tmp`, `/dev/shm`).
fn shared_dirs(v: Option<&Raw>) -> Result<Vec<PathBuf>, ConfigError> {
    let key = "shared_dirs";
    let list: Vec<String> = match v {
        None => return Ok(Vec::new()),
        Some(Raw::Text(t)) => t
            .split(':')
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect(),
        Some(Raw::Toml(toml::Value::Array(a))) => a
            .iter()
            .map(|v| match v {
                toml::Value::String(s) => Ok(s.clone()),
                other => Err(err(key, format!("entries must be strings (got {other})"))),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => {
            return Err(err(
                key,
                format!("must be an array of paths (got {})", other.show()),
            ))
        }
    };
    let mut out = Vec::new();
    for p in list {
        let path = Path::new(&p);
        if !path.is_absolute() || !path.is_dir() {
            return Err(err(
                key,
                format!("{p} is not an absolute path to a directory"),
            ));
        }
        let path = std::fs::canonicalize(path).map_err(|e| err(key, format!("{p}: {e}")))?;
        if path == Path::new("/")
            || path.starts_with("/tmp")
            || path.starts_with("/dev/shm")
            || path.starts_with("/proc")
        {
            return Err(err(
                key,
                format!("{p} cannot be shared: runs get their own /tmp, /dev/shm and /proc"),
            ));
        }
        out.push(path);
    }
    Ok(out)
}

fn usize_key(
    raw: &BTreeMap<&'static str, Raw>,
    key: &str,
    default: u64,
    min: u64,
) -> Result<usize, ConfigError> {
    usize::try_from(integer(key, raw.get(key), default, min)?).map_err(|_| err(key, "too large"))
}

fn optional_integer(
    raw: &BTreeMap<&'static str, Raw>,
    key: &str,
) -> Result<Option<u64>, ConfigError> {
    match raw.get(key) {
        None => Ok(None),
        Some(v) => integer(key, Some(v), 0, 0).map(Some),
    }
}

fn non_empty(raw: &BTreeMap<&'static str, Raw>, key: &str) -> Result<Option<String>, ConfigError> {
    match string(key, raw.get(key))? {
        Some(s) if s.trim().is_empty() => Err(err(key, "must not be empty")),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load_with(flags: &Flags, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        load(flags, |k| vars.get(k).cloned())
    }

    #[test]
    fn defaults() {
        let c = load_with(&Flags::default(), &[]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9371");
        assert_eq!(c.data_dir, PathBuf::from("cyrnel-data"));
        assert_eq!(
            (c.max_running, c.default_timeout_ms, c.kill_grace_ms),
            (32, Some(30_000), 5_000)
        );
        assert_eq!(c.max_output_bytes, 8 << 20);
        assert_eq!(c.shell, "/bin/sh");
        assert_eq!(c.env, vec![("PATH".to_string(), DEFAULT_PATH.to_string())]);
        assert_eq!(c.api_key, None);
    }

    #[test]
    fn precedence_flag_env_file_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:1000\"\nkill_grace_ms = 10\nmax_running = 3\n[env]\nA = \"b\"\n",
        )
        .unwrap();
        let flags = Flags {
            config: Some(file),
            listen: Some("127.0.0.1:3000".into()),
            data_dir: None,
        };
        let c = load_with(
            &flags,
            &[
                ("CYRNEL_LISTEN", "127.0.0.1:2000"),
                ("CYRNEL_KILL_GRACE_MS", "20"),
            ],
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:3000"); // flag beats env and file
        assert_eq!(c.kill_grace_ms, 20); // env beats file
        assert_eq!(c.max_running, 3); // file beats default
        assert_eq!(c.env, vec![("A".to_string(), "b".to_string())]);
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("CYRNEL_KILL_GRACE_MS", "abc")], "kill_grace_ms"),
            (&[("CYRNEL_MAX_RUNNING", "0")], "max_running"),
            (&[("CYRNEL_LISTEN", "nonsense")], "listen"),
            (&[("CYRNEL_LISTEN", "0.0.0.0:9371")], "non-loopback"),
            (&[("CYRNEL_SHELL", "/no/such/shell")], "shell"),
            (&[("CYRNEL_ENV", "[1]")], "env"),
            (&[("CYRNEL_API_KEY", " ")], "api_key"),
            (&[("CYRNEL_LOG_LEVEL", "=[")], "log_level"),
            (&[("CYRNEL_CGROUPS", "maybe")], "cgroups"),
        ];
        for (vars, needle) in cases {
            let e = load_with(&Flags::default(), vars).unwrap_err();
            assert!(e.to_string().contains(needle), "{vars:?}: {e}");
        }
        let ok = load_with(
            &Flags::default(),
            &[("CYRNEL_LISTEN", "0.0.0.0:9371"), ("CYRNEL_API_KEY", "k")],
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn file_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "kill_grace = 10\n").unwrap();
        let flags = Flags {
            config: Some(file.clone()),
            ..Flags::default()
        };
        assert!(load_with(&flags, &[])
            .unwrap_err()
            .to_string()
            .contains("unknown key 'kill_grace'"));
        std::fs::write(&file, "kill_grace_ms = \"soon\"\n").unwrap();
        assert!(load_with(&flags, &[])
            .unwrap_err()
            .to_string()
            .contains("kill_grace_ms"));
        std::fs::write(&file, "kill_grace_ms = -1\n").unwrap();
        assert!(load_with(&flags, &[])
            .unwrap_err()
            .to_string()
            .contains("kill_grace_ms"));
    }

    /// `platform/cyrneld.toml` documents every key with its default: with
    /// each setting uncommented it must parse to exactly the defaults.
    #[test]
    fn shipped_config_documents_the_defaults() {
        let shipped = include_str!("../platform/cyrneld.toml");
        let uncommented: String = shipped
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter(|l| {
                let key = l.split(" = ").next().unwrap_or("");
                l.starts_with('[')
                    || (l.contains(" = ") && !l.starts_with(' ') && !OPTIONAL_KEYS.contains(&key))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let documented: Vec<&str> = uncommented
            .lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
            .collect();
        for key in KEYS.iter().filter(|k| !OPTIONAL_KEYS.contains(k)) {
            assert!(
                documented.contains(key),
                "{key} is not documented in platform/cyrneld.toml"
            );
        }
        for key in OPTIONAL_KEYS.iter().filter(|k| **k != "env") {
            assert!(
                shipped.contains(&format!("\n#{key} = ")),
                "{key} is not shown in platform/cyrneld.toml"
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, &uncommented).unwrap();
        let flags = Flags {
            config: Some(file),
            ..Flags::default()
        };
        assert_eq!(
            load_with(&flags, &[]).unwrap(),
            load_with(&Flags::default(), &[]).unwrap()
        );
    }

    #[test]
    fn api_key_is_not_debug_printed() {
        let c = load_with(&Flags::default(), &[("CYRNEL_API_KEY", "sekrit")]).unwrap();
        assert!(!format!("{c:?}").contains("sekrit"));
    }
}
