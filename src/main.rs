//! `cyrneld`: parses the command line (which also produces the cyrneld(8)
//! man page, `--man`), loads the configuration, sets up logging and the
//! daemon's own signals, and hands over to `app::run` on a runtime
//! thread. The main thread stays behind as the reaper of
//! orphans reparented to the daemon (`proc::OrphanReaper`).
//!
//! Signals: SIGTERM and SIGINT stop the daemon gracefully. SIGHUP re-reads
//! the configuration the daemon was started with (same flags, environment
//! and file) and applies what can change under running processes: the API
//! key and the rate limits (through `app`) and the log level (here, since
//! this file owns logging). Everything else keeps its running value until a restart; an
//! invalid new configuration is logged and ignored.
//!
//! SIGUSR2 hands over to the binary on disk (the path the daemon was
//! started from): the daemon re-executes itself under the same pid and
//! every run keeps running (`cyrnel::handover`). SIGHUP does the same after
//! the reload when that binary is no longer the running one (a package
//! upgrade replaced it).
//!
//! It also speaks systemd's notification protocol (`Type=notify`): READY=1
//! once the listener is bound and the supervisor runs, RELOADING=1 … READY=1
//! around a reload, STOPPING=1 when shutdown begins. Without `NOTIFY_SOCKET`
//! (not started by systemd) these are no-ops. The variable never reaches
//! managed processes: they get a clean environment.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use signal_hook_tokio::Signals;
use tokio::sync::{mpsc, watch};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

use cyrnel::app::Hooks;
use cyrnel::config::{self, Config, Flags, Reload};
use cyrnel::service::Notifier;

/// Supervises OS processes behind the Cyrnel Processes HTTP API.
///
/// Every setting can also come from a `CYRNEL_<KEY>` environment variable
/// or the config file; flags win over the environment, which wins over the
/// file.
#[derive(Parser, Debug)]
#[command(
    name = "cyrneld",
    version,
    about,
    after_help = "Signals: SIGTERM or SIGINT stop the daemon gracefully (running processes \
                  are terminated and recorded canceled; queued ones run after the next \
                  start). SIGHUP reloads api_key, the rate limits and log_level from \
                  the configuration without touching running processes, and hands over \
                  when the binary on disk was replaced. SIGUSR2 hands over: the daemon \
                  re-executes itself keeping every run. \
                  More in cyrneld(8): `cyrneld --man | man -l -`."
)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address and port to listen on (default 127.0.0.1:9371).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<String>,
    /// Directory for the database (default ./cyrnel-data).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Read every table and log of the database, print what is readable
    /// and what is not, change nothing, and exit (0: all readable, 1:
    /// damaged). Run it with the daemon stopped.
    #[arg(long, conflicts_with = "salvage")]
    check: bool,
    /// Rebuild a damaged database from what is readable, move the damaged
    /// files aside (never deleting them), raise the id counter above every
    /// id they can have held, and exit. The daemon must be stopped.
    #[arg(long)]
    salvage: bool,
    /// Print this manual page, cyrneld(8), as roff and exit (the packages
    /// install it; `cyrneld --man | man -l -` reads it anywhere).
    #[arg(long, exclusive = true)]
    man: bool,
    /// Print which handover state versions this binary reads and exit 0:
    /// a running daemon asks this of the binary it is about to hand over
    /// to.
    #[arg(long, exclusive = true)]
    handover_check: bool,
}

type LogFilter = reload::Handle<EnvFilter, Registry>;

/// The `CYRNEL_*` variables the daemon was started with. Reloads read these
/// (the environment of a running process does not change from outside),
/// because the API key is scrubbed from the live environment at start.
static START_ENV: std::sync::OnceLock<std::collections::HashMap<String, String>> =
    std::sync::OnceLock::new();

fn start_env(key: &str) -> Option<String> {
    START_ENV.get().and_then(|m| m.get(key).cloned())
}

/// Takes the API key out of the environment, also out of the bytes the
/// kernel shows as `/proc/<pid>/environ` (the start-up copy on the stack,
/// which `unsetenv` leaves in place), so nothing that can read the
/// daemon's environment learns it. Call before any thread exists.
fn scrub_api_key_from_environment() {
    const KEY: &std::ffi::CStr = c"CYRNEL_API_KEY";
    // SAFETY: single-threaded (called first thing in main). getenv returns
    // a pointer to the value inside the environment block; overwriting its
    // bytes in place keeps the string's length and terminator.
    unsafe {
        let value = libc::getenv(KEY.as_ptr());
        if !value.is_null() {
            let len = libc::strlen(value);
            std::ptr::write_bytes(value, b'*', len);
        }
        std::env::remove_var("CYRNEL_API_KEY");
    }
}

fn main() -> ExitCode {
    // First, while the process has one thread: what a previous image of
    // the daemon handed over (it falls back to that image if unreadable).
    let mut inherited = cyrnel::handover::take();
    // Its leaders are children of this (main) thread now, the orphan
    // reaper's: it must leave them to the supervisor.
    if let Some(i) = &inherited {
        cyrnel::proc::protect_leaders(i.adoption.runs.iter().filter_map(|r| r.pid));
    }
    // Restarted by a service manager after a crash: the runs parked in its
    // file-descriptor store (not our children any more).
    let stored = match cyrnel::service::take_listen_fds() {
        Ok(fds) if !fds.is_empty() => Some(cyrnel::supervisor::fdstore::adoption(fds)),
        Ok(_) => None,
        Err(e) => {
            eprintln!("cyrneld: ignoring the descriptors the service manager passed: {e}");
            None
        }
    };
    let _ = START_ENV.set(
        std::env::vars()
            .filter(|(k, _)| k.starts_with("CYRNEL_"))
            .collect(),
    );
    scrub_api_key_from_environment();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(i) = inherited.take() {
                // A handover to a binary that rejects this command line:
                // the previous image runs again, with every run.
                let _ = e.print();
                let e2 = i.fall_back(&format!(
                    "the new binary rejected the command line: {}",
                    e.kind()
                ));
                eprintln!("cyrneld: {e2}");
                // Printed above already: only the status is left.
                std::process::exit(e.exit_code());
            }
            e.exit()
        }
    };
    if cli.man {
        return print_man_page();
    }
    if cli.handover_check {
        println!("{}", cyrnel::handover::check_line());
        return ExitCode::SUCCESS;
    }
    let flags = Flags {
        config: cli.config,
        listen: cli.listen,
        data_dir: cli.data_dir,
    };
    let config = match config::load(&flags, start_env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cyrneld: {e}");
            if let Some(i) = inherited.take() {
                // A handover to a binary that rejects the configuration:
                // the previous image runs again, with every run.
                let e2 = i.fall_back(&format!("the new binary rejected the configuration: {e}"));
                eprintln!("cyrneld: {e2}");
            }
            return ExitCode::from(2);
        }
    };
    // From here on this image keeps what it took over.
    if let Some(i) = &mut inherited {
        i.commit();
    }
    // RUST_LOG, when set, wins over log_level, at start and on reload.
    let rust_log = EnvFilter::try_from_default_env().ok();
    let log_level_owned = rust_log.is_none();
    let filter = rust_log.unwrap_or_else(|| EnvFilter::new(&config.log_level));
    let (filter, log_filter) = reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false),
        )
        .init();
    tracing::debug!(?config, "configuration");
    if cli.check {
        return match cyrnel::app::check(&config) {
            Ok((lines, damaged)) => {
                for line in lines {
                    println!("{line}");
                }
                ExitCode::from(u8::from(damaged))
            }
            Err(e) => {
                eprintln!("cyrneld --check: {e}");
                ExitCode::from(2)
            }
        };
    }
    if cli.salvage {
        return match cyrnel::app::salvage(&config) {
            Ok(lines) => {
                for line in lines {
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cyrneld --salvage: {e}");
                ExitCode::FAILURE
            }
        };
    }

    // Before any thread exists: SIGCHLD is blocked everywhere, and the main
    // thread becomes the reaper of orphans reparented to the daemon.
    let reaper = match cyrnel::proc::OrphanReaper::install() {
        Ok(r) => Arc::new(r),
        Err(e) => {
            eprintln!("cyrneld: cannot set up the orphan reaper: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cyrneld: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The runtime runs on its own thread; the main thread reaps orphans
    // until it is done.
    let stopper = StopReaper(reaper.clone());
    let daemon = std::thread::Builder::new()
        .name("cyrneld-rt".into())
        .spawn(move || {
            // Dropped when serve returns or panics: the main thread then
            // stops reaping and reports the outcome.
            let _stop = stopper;
            serve(
                runtime,
                config,
                flags,
                log_level_owned,
                log_filter,
                inherited,
                stored,
            )
        });
    let daemon = match daemon {
        Ok(d) => d,
        Err(e) => {
            eprintln!("cyrneld: cannot start the daemon thread: {e}");
            return ExitCode::FAILURE;
        }
    };
    reaper.run();
    match daemon.join() {
        Ok(Ok(())) => ExitCode::SUCCESS,
        _ => ExitCode::FAILURE,
    }
}

/// Ends the main thread's orphan reaping when dropped.
struct StopReaper(Arc<cyrnel::proc::OrphanReaper>);

impl Drop for StopReaper {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// The daemon: signals, reloads and `app::run`, on the runtime.
fn serve(
    runtime: tokio::runtime::Runtime,
    config: Config,
    flags: Flags,
    log_level_owned: bool,
    log_filter: LogFilter,
    inherited: Option<cyrnel::handover::Inherited>,
    stored: Option<cyrnel::supervisor::Adoption>,
) -> Result<(), ()> {
    // The path the daemon was started from: a handover executes what is
    // there now (`app` tells whether an upgrade replaced it). (After a fallback through the image's descriptor the kernel names a
    // replaced file "<path> (deleted)".)
    let binary = std::env::current_exe()
        .map(
            |p| match p.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
                Some(s) => PathBuf::from(s),
                None => p,
            },
        )
        .unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    runtime.block_on(async {
        let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR2]) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cyrneld: cannot install signal handlers: {e}");
                return Err(());
            }
        };
        let (reloads_tx, reloads) = watch::channel(config.clone());
        let (handover_tx, handovers) = mpsc::channel(4);
        // The service manager (`NOTIFY_SOCKET`), one socket for the
        // daemon's whole life: state changes from here, the fd store from
        // the supervisor.
        let service = Arc::new(Notifier::from_env());
        let (stop_service, ready_service) = (service.clone(), service.clone());
        let mut reloader = Reloader {
            flags,
            running: config.clone(),
            log_filter: log_level_owned.then_some(log_filter),
            apply: reloads_tx,
            service: service.clone(),
        };
        let shutdown = async move {
            while let Some(sig) = signals.next().await {
                if sig == SIGHUP {
                    reloader.reload();
                    // A handover follows if an upgrade replaced the binary.
                    let _ = handover_tx.try_send(cyrnel::handover::Trigger::IfReplaced);
                    continue;
                }
                if sig == SIGUSR2 {
                    tracing::info!("SIGUSR2: handover requested");
                    let _ = handover_tx.try_send(cyrnel::handover::Trigger::Requested);
                    continue;
                }
                tracing::info!(signal = sig, "stop requested");
                notify(
                    &stop_service,
                    "STOPPING=1\nSTATUS=stopping: terminating running processes",
                );
                return;
            }
        };
        let handover_env = start_env("CYRNEL_API_KEY")
            .map(|k| ("CYRNEL_API_KEY".to_string(), k))
            .into_iter()
            .collect();
        let hooks = Hooks {
            ready: Some(Box::new(move |addr| {
                notify(
                    &ready_service,
                    &format!("READY=1\nSTATUS=listening on {addr}"),
                );
            })),
            reloads: Some(reloads),
            inherited,
            stored,
            handovers: Some(handovers),
            binary,
            handover_env,
            service,
        };
        cyrnel::app::run(config, shutdown, hooks)
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cyrneld failed");
                eprintln!("cyrneld: {e}");
            })
    })
}

/// Tells systemd about a state change; a failure only costs the
/// notification, never the daemon.
fn notify(service: &Notifier, text: &str) {
    if let Err(e) = service.notify(text) {
        tracing::warn!(error = %e, "cannot notify the service manager");
    }
}

/// SIGHUP: re-reads the configuration and applies its reloadable part.
struct Reloader {
    /// The command line the daemon was started with: a reload reads the
    /// same file and environment, and flags keep winning.
    flags: Flags,
    /// The settings in force: the start-up configuration with the live
    /// keys (`config::Reload::Live`) of every applied reload.
    running: Config,
    /// `None` when RUST_LOG chose the filter: log_level then has no say.
    log_filter: Option<LogFilter>,
    /// Hands the settings in force to `app`, which applies the API key
    /// and the rate limits.
    apply: watch::Sender<Config>,
    /// RELOADING=1 … READY=1 around a reload.
    service: Arc<Notifier>,
}

impl Reloader {
    fn reload(&mut self) {
        if let Err(e) = self.service.reloading() {
            tracing::warn!(error = %e, "cannot notify the service manager");
        }
        let file = match &self.flags.config {
            Some(path) => path.display().to_string(),
            None => "(no file: environment and defaults)".to_string(),
        };
        tracing::info!(%file, "SIGHUP: reloading the configuration");
        match self.try_reload() {
            Ok(()) => {}
            Err(e) => tracing::error!(
                error = %e,
                "configuration reload failed; the running configuration is unchanged"
            ),
        }
        notify(&self.service, "READY=1");
    }

    fn try_reload(&mut self) -> Result<(), String> {
        let new = config::load(&self.flags, start_env).map_err(|e| e.to_string())?;
        // The listener stays where it is, so the rule "non-loopback needs a
        // key" applies to the running address, not to the file's.
        if new.api_key.is_none() && !self.running.listen.ip().is_loopback() {
            return Err(format!(
                "api_key: cannot be removed while listening on the non-loopback address {}",
                self.running.listen
            ));
        }
        let mut new_filter = if new.log_level != self.running.log_level {
            Some(EnvFilter::try_new(&new.log_level).map_err(|e| format!("log_level: {e}"))?)
        } else {
            None
        };

        // The live keys: applied here (log_level) or in `app` (the rest);
        // the table in `config` says which these are.
        let mut applied = Vec::new();
        for key in self.running.changed(&new, Reload::Live) {
            applied.push(match key {
                "api_key" => match (&self.running.api_key, &new.api_key) {
                    (None, _) => "api_key (set)",
                    (_, None) => "api_key (removed)",
                    _ => "api_key (changed)",
                },
                "log_level" => match (&self.log_filter, new_filter.take()) {
                    (Some(handle), Some(filter)) => {
                        handle
                            .reload(filter)
                            .map_err(|e| format!("log_level: {e}"))?;
                        "log_level"
                    }
                    _ => {
                        tracing::warn!("log_level changed, but RUST_LOG is set and wins over it");
                        continue;
                    }
                },
                other => other,
            });
        }
        let mut restart_needed = self.running.changed(&new, Reload::Restart);
        if new.secret_files != self.running.secret_files {
            // Runs are denied the files that held the key at start only.
            restart_needed.push("secret_files (the files masked from runs)");
        }

        self.running.adopt_live(&new);
        self.apply.send_replace(self.running.clone());
        tracing::info!(
            applied = ?applied,
            restart_needed = ?restart_needed,
            log_level = %self.running.log_level,
            auth = self.running.api_key.is_some(),
            "configuration reloaded"
        );
        Ok(())
    }
}

/// `cyrneld --man`: cyrneld(8) on stdout.
fn print_man_page() -> ExitCode {
    use std::io::Write;
    let written = man_page().and_then(|page| {
        let mut out = std::io::stdout().lock();
        out.write_all(&page)?;
        out.flush()
    });
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cyrneld --man: {e}");
            ExitCode::FAILURE
        }
    }
}

/// cyrneld(8), generated like cyrnelctl(1): clap's page of the command line
/// (in section 8, system daemons), with the hand-written sections below in
/// place of the help's closing paragraph, before VERSION.
fn man_page() -> std::io::Result<Vec<u8>> {
    use clap::CommandFactory;
    let cmd = Cli::command().after_help(None::<&str>);
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).section("8").render(&mut page)?;
    let at = page
        .windows(12)
        .position(|w| w == b"\n.SH VERSION")
        .map_or(page.len(), |i| i + 1);
    page.splice(at..at, MAN_SECTIONS.bytes());
    Ok(page)
}

/// What the command line does not say. Every signal named in `--help` is
/// described under SIGNALS (tests/cli.rs checks it).
const MAN_SECTIONS: &str = r#".SH CONFIGURATION
Every key of the configuration file can also be given as a \fBCYRNEL_\fR\fIKEY\fR
environment variable (upper case, e.g. \fBCYRNEL_MAX_RUNNING\fR); \fB\-\-listen\fR
and \fB\-\-data\-dir\fR override \fBlisten\fR and \fBdata_dir\fR. Flags win over
the environment, which wins over the file, which wins over the built\-in
defaults. The packaged file lists every key with its default and meaning. An
invalid value stops the daemon at start with a message naming the key.
.SH SIGNALS
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop gracefully: creating and running answer 503, every running process
group is terminated (SIGTERM, then SIGKILL after \fBkill_grace_ms\fR) and
recorded \fBcanceled\fR, then the daemon exits 0. Queued runs stay queued and
start after the next start.
.TP
\fBSIGHUP\fR
Re\-read the configuration the daemon was started with (same flags,
environment and file) and apply \fBapi_key\fR (or \fBapi_key_file\fR), the
\fBrate_limit_*\fR keys and \fBlog_level\fR without touching running processes.
Every other key keeps its running value until a restart; an invalid file is
logged and the running configuration kept. \fBsystemctl reload cyrneld\fR
sends it. When the binary at the path the daemon was started from is no longer
the running one (a package upgrade replaced it), a handover follows (see
SIGUSR2).
.TP
\fBSIGUSR2\fR
Hand over: re\-execute the binary at the path the daemon was started from,
under the same pid, keeping every run, its output pipes and the listening
socket (\fBcyrnelctl handover\fR and \fBPOST /handover\fR do the same). The
binary must first answer \fB\-\-handover\-check\fR with a handover state
version it reads; otherwise nothing changes and the reason is logged and shown
by \fBGET /handover\fR.
.SH ENVIRONMENT
.TP
\fBCYRNEL_\fR\fIKEY\fR
A configuration key (see CONFIGURATION). \fBCYRNEL_API_KEY\fR is removed from
the daemon's environment at start, so nothing that can read it learns the key.
.TP
\fBRUST_LOG\fR
A log filter (tracing's \fIEnvFilter\fR syntax) that wins over \fBlog_level\fR,
at start and on reload.
.TP
\fBNOTIFY_SOCKET\fR
Set by systemd for \fBType=notify\fR: the daemon sends READY=1 once it
listens, RELOADING=1 and READY=1 around a reload, STOPPING=1 when a stop
begins. Managed processes never see it: they get a clean environment. With it,
each run's pidfd, output pipes, folder and capture journals are parked in the
service manager's file\-descriptor store (\fBFDSTORE=1\fR, \fBFDPOLL=0\fR,
names \fBrun\-\fR\fIid\fR\fB\-pid\fR, \fB\-out\fR, \fB\-err\fR, \fB\-dir\fR,
\fB\-jout\fR, \fB\-jerr\fR) while it runs.
.TP
\fBLISTEN_FDS\fR, \fBLISTEN_FDNAMES\fR, \fBLISTEN_PID\fR
Set by systemd when it restarts the daemon after a crash: the descriptors
parked in its store come back, and the daemon re\-adopts those runs (they kept
running). Removed from the environment at start.
.TP
\fBCYRNEL_HANDOVER\fR, \fBCYRNEL_HANDOVER_FALLBACK\fR
Set by a handing\-over daemon for its next image (the state's descriptors);
never set them yourself.
.SH FILES
.TP
\fI/etc/cyrnel/cyrneld.toml\fR
The configuration file of packaged installs (\fB\-\-config\fR), 0640
root:cyrnel because it may hold the API key.
.TP
\fI/var/lib/cyrnel\fR
The data directory of packaged installs: the database (runs' folders live on a
tmpfs), 0700 cyrnel:cyrnel. Without a configuration it is
\fIcyrnel\-data\fR in the working directory.
.TP
\fI/usr/lib/systemd/system/cyrneld.service\fR
The packaged unit: runs the daemon as \fBcyrnel\fR with the capabilities that
isolate every run; each setting is explained inside.
.SH "EXIT STATUS"
0 after a graceful stop; 1 when the daemon cannot run (the address is in use,
the database cannot be opened, ...); 2 for an invalid command line or
configuration. \fB\-\-check\fR exits 0 when everything is readable, 1 when the
database is damaged, 2 when it cannot check. \fB\-\-salvage\fR exits 0 once the
database is rebuilt, 1 when it cannot be.
.SH "SEE ALSO"
\fBcyrnelctl\fR(1), \fBsystemctl\fR(1), \fI/usr/share/doc/cyrnel/README.md\fR
"#;
