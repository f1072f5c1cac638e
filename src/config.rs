//! Configuration: parsed and validated once, at start-up, into typed values.
//!
//! Sources, strongest first: command-line flags, `CYRNEL_<KEY>` environment
//! variables, the TOML file given with `--config`, built-in defaults. Any
//! invalid value stops the daemon with a message naming the key; nothing
//! starts half-configured.
//!
//! Every key is described once, in the table below (`keys!`): its name, its
//! type, its default and lower bound, whether a reload (SIGHUP) applies it or
//! it needs a restart, and whether it is a secret. The `Config` struct, the
//! list of known keys, the redacted `Debug`, the restart list of a reload and
//! the check of README.md and `platform/cyrneld.toml` all come from it.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::proc::sandbox::Requested;

/// What an absent key means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Default {
    Int(u64),
    Text(&'static str),
    Bool(bool),
    /// The `[env]` table with `PATH` = [`DEFAULT_PATH`] only.
    Env,
    /// No value: the feature is off, or the value is derived at start.
    Unset,
}

/// When a changed value takes effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reload {
    /// A reload (SIGHUP) applies it without touching running processes.
    Live,
    /// Kept until the daemon restarts; a reload names it in its log line.
    Restart,
}

/// One configuration key (see `keys!` below for the table).
pub struct Key {
    pub name: &'static str,
    pub default: Default,
    /// The smallest accepted value of an integer key.
    pub min: u64,
    pub reload: Reload,
    /// Its value never reaches a log line: `Debug` shows whether it is set
    /// (the names only, for `env`).
    pub secret: bool,
    /// The value in force, as `Debug` shows it (redacted when secret).
    show: fn(&Config) -> Box<dyn fmt::Debug + '_>,
    /// Whether two configurations differ in this key.
    differs: fn(&Config, &Config) -> bool,
    /// Takes this key's value from the second configuration.
    adopt: fn(&mut Config, &Config),
}

impl Key {
    /// The key named `name`, if there is one.
    pub fn find(name: &str) -> Option<&'static Key> {
        KEYS.iter().find(|k| k.name == name)
    }
}

/// How a secret value is shown.
trait Redact {
    fn redacted(&self) -> Box<dyn fmt::Debug + '_>;
}

impl Redact for Option<String> {
    fn redacted(&self) -> Box<dyn fmt::Debug + '_> {
        Box::new(self.as_ref().map(|_| "<set>"))
    }
}

/// The names without the values.
impl Redact for Vec<(String, String)> {
    fn redacted(&self) -> Box<dyn fmt::Debug + '_> {
        Box::new(self.iter().map(|(k, _)| k).collect::<Vec<_>>())
    }
}

/// Generates the `Config` struct (one field per key, named as the key), a
/// `Key` constant per key in `key::`, and `KEYS`. A row:
///
/// ```text
/// /// doc of the field
/// name: Type = Default::…[, min N], [live|restart[, secret]];
/// ```
macro_rules! keys {
    ($(
        $(#[doc = $doc:literal])*
        $name:ident: $ty:ty = $default:expr $(, min $min:expr)?, [$reload:ident $(, $secret:ident)?];
    )*) => {
        #[derive(Clone, PartialEq, Eq)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $name: $ty, )*
            /// The files holding secrets (the config file when it sets
            /// `api_key`, and `api_key_file`): masked from runs. Not a key:
            /// follows from where the API key came from.
            pub secret_files: Vec<PathBuf>,
        }

        /// One [`Key`] per configuration key, named as the key.
        #[allow(non_upper_case_globals)]
        pub mod key {
            use super::{Default, Key, Redact as _, Reload};
            $(
                pub const $name: Key = Key {
                    name: stringify!($name),
                    default: $default,
                    min: keys!(@min $($min)?),
                    reload: keys!(@reload $reload),
                    secret: keys!(@secret $($secret)?),
                    show: |c| keys!(@show [$($secret)?] c.$name),
                    differs: |a, b| a.$name != b.$name,
                    adopt: |to, from| to.$name.clone_from(&from.$name),
                };
            )*
        }

        /// Every key the daemon understands, in the order of `Debug`.
        pub const KEYS: &[Key] = &[$(key::$name),*];
    };
    (@min) => { 0 };
    (@min $min:expr) => { $min };
    (@reload live) => { Reload::Live };
    (@reload restart) => { Reload::Restart };
    (@secret) => { false };
    (@secret secret) => { true };
    (@show [] $v:expr) => { Box::new(&$v) };
    (@show [secret] $v:expr) => { $v.redacted() };
}

keys! {
    /// Address and port of the HTTP API; non-loopback requires `api_key`.
    listen: SocketAddr = Default::Text("127.0.0.1:9371"), [restart];
    /// The database (`db/`) and, as a fallback, run folders (`run/`).
    data_dir: PathBuf = Default::Text("cyrnel-data"), [restart];
    /// Bearer token for every route but /health; `None`: no auth.
    api_key: Option<String> = Default::Unset, [live, secret];
    /// The file `api_key` was read from (a reload reads it again).
    api_key_file: Option<PathBuf> = Default::Unset, [live];
    max_running: usize = Default::Int(32), min 1, [restart];
    /// `None`: no default time limit (`default_timeout_ms = 0`).
    default_timeout_ms: Option<u64> = Default::Int(30_000), [restart];
    kill_grace_ms: u64 = Default::Int(5_000), [restart];
    shell: String = Default::Text("/bin/sh"), [restart];
    max_output_bytes: u64 = Default::Int(8 << 20), [restart];
    max_body_bytes: u64 = Default::Int(1 << 20), min 1024, [restart];
    /// The complete environment of every run (values may be credentials).
    env: Vec<(String, String)> = Default::Env, [restart, secret];
    log_level: String = Default::Text("info"), [live];
    /// Events kept for resuming clients.
    event_retention: u64 = Default::Int(100_000), min 1, [restart];
    /// Events a stream client may fall behind before its stream is closed.
    event_buffer: usize = Default::Int(1024), min 1, [restart];
    event_heartbeat_ms: u64 = Default::Int(15_000), min 10, [restart];
    /// Track each run in its own cgroup v2 when the host allows it
    /// (`cgroups = "auto"`); `"off"` uses process groups only.
    cgroups: bool = Default::Text("auto"), [restart];
    /// Free bytes kept on the data dir's filesystem; below it creates and
    /// reruns get 507 while transitions of running work still persist.
    storage_reserve_bytes: u64 = Default::Int(64 << 20), [restart];
    /// Request limits per client address and one-minute window (0
    /// disables), plus the optional limit over all routes.
    rate_limit_create_per_min: u64 = Default::Int(20), [live];
    rate_limit_run_per_min: u64 = Default::Int(20), [live];
    rate_limit_kill_per_min: u64 = Default::Int(10), [live];
    rate_limit_max: u64 = Default::Int(0), [live];
    rate_limit_window_ms: u64 = Default::Int(60_000), min 1, [live];
    /// Concurrent HTTP connections; further ones wait in the listen backlog.
    max_connections: usize = Default::Int(1024), min 1, [restart];
    /// A client must send a request's headers within this (slowloris).
    header_read_timeout_ms: u64 = Default::Int(10_000), min 1, [restart];
    /// hyper's read buffer cannot be smaller than 8 KiB.
    max_header_bytes: usize = Default::Int(16 * 1024), min 8192, [restart];
    max_uri_bytes: usize = Default::Int(8 * 1024), min 64, [restart];
    /// Queued processes at most; creates beyond get 429.
    max_queued: usize = Default::Int(10_000), min 1, [restart];
    /// Run children as this user/group (names or numbers); only as root.
    user: Option<String> = Default::Unset, [restart];
    group: Option<String> = Default::Unset, [restart];
    /// Resource limits applied to every child before exec (`None`:
    /// inherited).
    rlimit_nofile: Option<u64> = Default::Unset, [restart];
    rlimit_nproc: Option<u64> = Default::Unset, [restart];
    rlimit_core: Option<u64> = Default::Unset, [restart];
    rlimit_as: Option<u64> = Default::Unset, [restart];
    rlimit_cpu: Option<u64> = Default::Unset, [restart];
    /// Per-run cgroup limits, where the host delegates the controllers.
    memory_max: Option<u64> = Default::Unset, [restart];
    pids_max: Option<u64> = Default::Unset, [restart];
    /// `auto` (the strongest level available), `full`, `landlock` or
    /// `off` (see `proc::sandbox`).
    sandbox: Requested = Default::Text("auto"), [restart];
    /// First uid of the block runs get one of each at level `full`;
    /// `None`: derived from the data dir (`sandbox::default_uid_base`).
    sandbox_uid_base: Option<u32> = Default::Unset, [restart];
    sandbox_uid_count: u32 = Default::Int(65_536), min 1, [restart];
    /// Size and inode caps of a run's folder and temporary space.
    run_folder_bytes: u64 = Default::Int(64 << 20), min 64 << 10, [restart];
    run_folder_inodes: u64 = Default::Int(16_384), min 16, [restart];
    /// `options.network` when a create does not say.
    network: bool = Default::Bool(true), [restart];
    /// Host directories every run may read and write (absolute paths).
    shared_dirs: Vec<PathBuf> = Default::Unset, [restart];
    /// RocksDB's one memory budget: the shared block cache, which also
    /// holds index and filter blocks and is charged for the memtables.
    storage_memory_bytes: u64 = Default::Int(32 << 20), min 4 << 20, [restart];
    /// Retention: idle records beyond this count (oldest first) or idle
    /// for longer than this age are deleted, as DELETE would. Unset: kept.
    retention_max_records: Option<u64> = Default::Unset, [restart];
    retention_max_age_ms: Option<u64> = Default::Unset, [restart];
    /// How long an `Idempotency-Key` answers with its first create.
    idempotency_retention_s: u64 = Default::Int(86_400), min 1, [restart];
}

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

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Config {
    /// The `rate_limit_*` keys.
    pub fn rate_limits(&self) -> RateLimits {
        RateLimits {
            create_per_min: self.rate_limit_create_per_min,
            run_per_min: self.rate_limit_run_per_min,
            kill_per_min: self.rate_limit_kill_per_min,
            global_max: self.rate_limit_max,
            global_window_ms: self.rate_limit_window_ms,
        }
    }

    /// The `rlimit_*` keys.
    pub fn child_limits(&self) -> ChildLimits {
        ChildLimits {
            nofile: self.rlimit_nofile,
            nproc: self.rlimit_nproc,
            core: self.rlimit_core,
            address_space: self.rlimit_as,
            cpu_seconds: self.rlimit_cpu,
        }
    }

    /// The keys of class `reload` whose value differs in `new`, in table
    /// order.
    pub fn changed(&self, new: &Config, reload: Reload) -> Vec<&'static str> {
        KEYS.iter()
            .filter(|k| k.reload == reload && (k.differs)(self, new))
            .map(|k| k.name)
            .collect()
    }

    /// Takes the value of every key a reload applies from `new`; the
    /// others keep theirs until a restart.
    pub fn adopt_live(&mut self, new: &Config) {
        for key in KEYS.iter().filter(|k| k.reload == Reload::Live) {
            (key.adopt)(self, new);
        }
    }
}

impl fmt::Debug for Config {
    /// Every key in table order, secrets redacted: the API key never
    /// reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = f.debug_struct("Config");
        for key in KEYS {
            s.field(key.name, &(key.show)(self));
        }
        s.field("secret_files", &self.secret_files).finish()
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

/// Raw values by key: what the file, the environment and the flags say.
struct Values(BTreeMap<&'static str, Raw>);

impl Values {
    fn get(&self, key: &Key) -> Option<&Raw> {
        self.0.get(key.name)
    }

    fn string(&self, key: &Key) -> Result<Option<String>, ConfigError> {
        string(key.name, self.get(key))
    }

    /// A string key with a default (`Default::Text`).
    fn text(&self, key: &Key) -> Result<String, ConfigError> {
        let Default::Text(default) = key.default else {
            panic!("{}: the table gives no text default", key.name)
        };
        Ok(self.string(key)?.unwrap_or_else(|| default.into()))
    }

    /// An integer key with a default (`Default::Int`) and its minimum.
    fn int(&self, key: &Key) -> Result<u64, ConfigError> {
        let Default::Int(default) = key.default else {
            panic!("{}: the table gives no integer default", key.name)
        };
        integer(key.name, self.get(key), default, key.min)
    }

    fn usize(&self, key: &Key) -> Result<usize, ConfigError> {
        usize::try_from(self.int(key)?).map_err(|_| err(key.name, "too large"))
    }

    /// An integer key without a default (`Default::Unset`).
    fn optional_int(&self, key: &Key) -> Result<Option<u64>, ConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => integer(key.name, Some(v), 0, key.min).map(Some),
        }
    }

    fn non_empty(&self, key: &Key) -> Result<Option<String>, ConfigError> {
        match self.string(key)? {
            Some(s) if s.trim().is_empty() => Err(err(key.name, "must not be empty")),
            other => Ok(other),
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
        if table.contains_key(key::api_key.name) {
            private_file(path, "holds api_key")?;
            secret_files.push(path.clone());
        }
        for (k, v) in table {
            let key = Key::find(&k)
                .ok_or_else(|| ConfigError(format!("{}: unknown key '{k}'", path.display())))?;
            raw.insert(key.name, Raw::Toml(v));
        }
    }
    for key in KEYS {
        if let Some(v) = env(&format!("CYRNEL_{}", key.name.to_ascii_uppercase())) {
            raw.insert(key.name, Raw::Text(v));
        }
    }
    if let Some(v) = &flags.listen {
        raw.insert(key::listen.name, Raw::Text(v.clone()));
    }
    if let Some(v) = &flags.data_dir {
        raw.insert(key::data_dir.name, Raw::Text(v.display().to_string()));
    }
    let mut config = build(&Values(raw))?;
    if let Some(path) = &config.api_key_file {
        private_file(path, "holds the API key (api_key_file)")?;
        secret_files.push(path.clone());
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
    let key = key::env.name;
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

/// Types and checks every key. Defaults and minimums come from the table;
/// the checks that are not a lower bound are written out here.
fn build(raw: &Values) -> Result<Config, ConfigError> {
    let listen_text = raw.text(&key::listen)?;
    let listen: SocketAddr = listen_text.parse().map_err(|_| {
        err(
            "listen",
            format!("must be ADDRESS:PORT, e.g. 127.0.0.1:9371 (got {listen_text:?})"),
        )
    })?;
    let data_dir = PathBuf::from(raw.text(&key::data_dir)?);
    if data_dir.as_os_str().is_empty() {
        return Err(err("data_dir", "must not be empty"));
    }
    let mut api_key = raw.string(&key::api_key)?;
    let api_key_file = raw.string(&key::api_key_file)?;
    if let Some(path) = &api_key_file {
        if api_key.is_some() {
            return Err(err("api_key_file", "set api_key or api_key_file, not both"));
        }
        // A systemd credential or secrets file: its content, without the
        // trailing newline.
        let text = std::fs::read_to_string(path)
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
    let max_running = raw.int(&key::max_running)?;
    let default_timeout_ms = raw.int(&key::default_timeout_ms)?;
    let kill_grace_ms = raw.int(&key::kill_grace_ms)?;
    let max_output_bytes = raw.int(&key::max_output_bytes)?;
    let max_body_bytes = raw.int(&key::max_body_bytes)?;
    let shell = raw.text(&key::shell)?;
    if !Path::new(&shell).is_absolute() {
        return Err(err(
            "shell",
            format!("must be an absolute path (got {shell:?})"),
        ));
    }
    if !Path::new(&shell).is_file() {
        return Err(err("shell", format!("{shell} does not exist")));
    }
    let env = env_table(raw.get(&key::env))?;
    let event_retention = raw.int(&key::event_retention)?;
    let event_buffer = raw.int(&key::event_buffer)?;
    let event_heartbeat_ms = raw.int(&key::event_heartbeat_ms)?;
    let cgroups = match raw.text(&key::cgroups)?.as_str() {
        "auto" => true,
        "off" => false,
        other => {
            return Err(err(
                "cgroups",
                format!("must be \"auto\" or \"off\" (got {other:?})"),
            ))
        }
    };
    let log_level = raw.text(&key::log_level)?;
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
        api_key_file: api_key_file.map(PathBuf::from),
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
        storage_reserve_bytes: raw.int(&key::storage_reserve_bytes)?,
        rate_limit_create_per_min: raw.int(&key::rate_limit_create_per_min)?,
        rate_limit_run_per_min: raw.int(&key::rate_limit_run_per_min)?,
        rate_limit_kill_per_min: raw.int(&key::rate_limit_kill_per_min)?,
        rate_limit_max: raw.int(&key::rate_limit_max)?,
        rate_limit_window_ms: raw.int(&key::rate_limit_window_ms)?,
        max_connections: raw.usize(&key::max_connections)?,
        header_read_timeout_ms: raw.int(&key::header_read_timeout_ms)?,
        max_header_bytes: raw.usize(&key::max_header_bytes)?,
        max_uri_bytes: raw.usize(&key::max_uri_bytes)?,
        max_queued: raw.usize(&key::max_queued)?,
        user: raw.non_empty(&key::user)?,
        group: raw.non_empty(&key::group)?,
        rlimit_nofile: raw.optional_int(&key::rlimit_nofile)?,
        rlimit_nproc: raw.optional_int(&key::rlimit_nproc)?,
        rlimit_core: raw.optional_int(&key::rlimit_core)?,
        rlimit_as: raw.optional_int(&key::rlimit_as)?,
        rlimit_cpu: raw.optional_int(&key::rlimit_cpu)?,
        memory_max: raw.optional_int(&key::memory_max)?,
        pids_max: raw.optional_int(&key::pids_max)?,
        sandbox: match raw.text(&key::sandbox)?.as_str() {
            "auto" => Requested::Auto,
            "full" => Requested::Full,
            "landlock" => Requested::Landlock,
            "off" => Requested::Off,
            other => {
                return Err(err(
                    "sandbox",
                    format!("must be \"auto\", \"full\", \"landlock\" or \"off\" (got {other:?})"),
                ))
            }
        },
        sandbox_uid_base: match raw.optional_int(&key::sandbox_uid_base)? {
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
            let n = raw.int(&key::sandbox_uid_count)?;
            if n < max_running || n > 65_536 {
                return Err(err(
                    "sandbox_uid_count",
                    format!("must be between max_running ({max_running}) and 65536 (got {n})"),
                ));
            }
            n as u32
        },
        run_folder_bytes: raw.int(&key::run_folder_bytes)?,
        run_folder_inodes: raw.int(&key::run_folder_inodes)?,
        network: match raw.get(&key::network) {
            None => {
                let Default::Bool(default) = key::network.default else {
                    panic!("network: the table gives no boolean default")
                };
                default
            }
            Some(Raw::Toml(toml::Value::Boolean(b))) => *b,
            Some(Raw::Text(t)) if t == "true" || t == "false" => t == "true",
            Some(other) => {
                return Err(err(
                    "network",
                    format!("must be true or false (got {})", other.show()),
                ))
            }
        },
        shared_dirs: shared_dirs(raw.get(&key::shared_dirs))?,
        secret_files: Vec::new(),
        storage_memory_bytes: raw.int(&key::storage_memory_bytes)?,
        retention_max_records: raw.optional_int(&key::retention_max_records)?,
        retention_max_age_ms: raw.optional_int(&key::retention_max_age_ms)?,
        idempotency_retention_s: raw.int(&key::idempotency_retention_s)?,
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

    /// `platform/cyrneld.toml` shows every key of the table and nothing
    /// else: a key with a default as `#key = <default>`, an unset key as a
    /// commented example, `env` as its `#[env]` table. With each default
    /// uncommented it must parse to exactly the defaults.
    #[test]
    fn shipped_config_documents_every_key_and_its_default() {
        let shipped = include_str!("../platform/cyrneld.toml");
        let (settings, env) = shipped
            .split_once("\n#[env]\n")
            .expect("platform/cyrneld.toml shows the [env] table last");
        // (key, the line without its '#'), for every `#key = value` line.
        let shown: Vec<(&str, &str)> = settings
            .lines()
            .filter_map(|l| l.strip_prefix('#'))
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| (k, l)))
            .filter(|(k, _)| !k.starts_with(' '))
            .collect();
        for (name, _) in &shown {
            assert!(
                Key::find(name).is_some(),
                "platform/cyrneld.toml shows {name}, which is not a key"
            );
        }
        for key in KEYS.iter().filter(|k| k.default != Default::Env) {
            let n = shown.iter().filter(|(name, _)| *name == key.name).count();
            assert_eq!(n, 1, "platform/cyrneld.toml shows {} {n} times", key.name);
        }
        let uncommented: String = shown
            .iter()
            .filter(|(name, _)| Key::find(name).is_some_and(|k| k.default != Default::Unset))
            .map(|(_, line)| format!("{line}\n"))
            .chain(["[env]\n".to_string()])
            .chain(
                env.lines()
                    .filter_map(|l| l.strip_prefix('#'))
                    .map(|l| format!("{l}\n")),
            )
            .collect();
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

    /// README.md's configuration table has a row for every key and for
    /// keys only, with the key's default and whether a reload applies it.
    #[test]
    fn readme_documents_every_key() {
        let readme = include_str!("../README.md");
        let section = readme
            .split_once("\n## Configuration\n")
            .and_then(|(_, rest)| rest.split_once("\n## "))
            .expect("README.md has a Configuration section")
            .0;
        let mut documented = Vec::new();
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row
                .trim_matches('|')
                .splitn(4, " | ")
                .map(str::trim)
                .collect();
            let [names, default, reload, _meaning] = cells[..] else {
                panic!("README.md: a configuration row without 4 cells: {row}")
            };
            // The names are the back-quoted words of the first cell.
            for name in names.split('`').skip(1).step_by(2) {
                let key = Key::find(name)
                    .unwrap_or_else(|| panic!("README.md documents {name}, which is not a key"));
                documented.push(name);
                let shown = match key.default {
                    Default::Int(n) => Some(n.to_string()),
                    Default::Text(t) => Some(t.to_string()),
                    Default::Bool(b) => Some(b.to_string()),
                    Default::Env | Default::Unset => None,
                };
                match shown {
                    Some(v) => assert!(
                        default.contains(&format!("`{v}`")),
                        "README.md: the default of {name} is `{v}`, not {default}"
                    ),
                    None if key.default == Default::Unset => assert!(
                        default.contains("unset") || default.contains("derived"),
                        "README.md: {name} has no default, not {default}"
                    ),
                    None => {}
                }
                let expected = match key.reload {
                    Reload::Live => "live",
                    Reload::Restart => "restart",
                };
                assert_eq!(reload, expected, "README.md: reload column of {name}");
            }
        }
        for key in KEYS {
            let n = documented.iter().filter(|d| **d == key.name).count();
            assert_eq!(n, 1, "README.md documents {} {n} times", key.name);
        }
    }

    /// A reload applies the live keys and names the others.
    #[test]
    fn reload_classes() {
        let running = load_with(&Flags::default(), &[]).unwrap();
        let new = load_with(
            &Flags::default(),
            &[
                ("CYRNEL_MAX_RUNNING", "3"),
                ("CYRNEL_RLIMIT_CPU", "10"),
                ("CYRNEL_API_KEY", "k"),
                ("CYRNEL_RATE_LIMIT_MAX", "5"),
            ],
        )
        .unwrap();
        assert_eq!(
            running.changed(&new, Reload::Restart),
            ["max_running", "rlimit_cpu"]
        );
        assert_eq!(
            running.changed(&new, Reload::Live),
            ["api_key", "rate_limit_max"]
        );
        let mut applied = running.clone();
        applied.adopt_live(&new);
        assert_eq!(applied.api_key.as_deref(), Some("k"));
        assert_eq!(applied.rate_limits().global_max, 5);
        assert_eq!(applied.max_running, running.max_running);
        assert_eq!(applied.child_limits(), running.child_limits());
        assert!(applied.changed(&new, Reload::Live).is_empty());
    }

    #[test]
    fn secrets_are_not_debug_printed() {
        let c = load_with(
            &Flags::default(),
            &[
                ("CYRNEL_API_KEY", "sekrit"),
                ("CYRNEL_ENV", r#"{"TOKEN":"hidden-value"}"#),
            ],
        )
        .unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("sekrit"), "{shown}");
        assert!(!shown.contains("hidden-value"), "{shown}");
        assert!(shown.contains("TOKEN"), "{shown}");
        for key in KEYS {
            assert!(shown.contains(&format!("{}: ", key.name)), "{shown}");
        }
    }
}
