//! `cyrnelctl`: the command-line client of `cyrneld`. It owns the command
//! line (clap definitions, which also produce the shell completions and the
//! man page), the human-readable and `--json` output, and the exit codes.
//! Everything it knows of the daemon goes through `cyrnel::client` and the
//! records it returns: it must not build requests or parse responses, and
//! knows nothing of the supervisor, the store or the domain model.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{ArgGroup, CommandFactory, Parser, Subcommand};
use clap_complete::Shell;
use cyrnel::client::{
    signal_number, Client, ClientError, Delivery, ListFilter, NewProcess, Pipe, Process, Timeout,
};

const ABOUT: &str = "Command-line client of cyrneld, the Cyrnel process daemon";

const LONG_ABOUT: &str = "\
Command-line client of cyrneld, the daemon that runs code as real OS \
processes behind the Cyrnel Processes HTTP API. It creates processes, follows \
their output, lists, inspects, signals and deletes them, and follows the \
daemon's state-transition events.";

const AFTER_HELP: &str = "\
Exit status: 0 on success, 1 when the daemon reports an error or cannot be \
reached, 2 for a usage error. `run` exits with the process's own exit code \
(128 + the signal number when a signal ended it). Times are shown in UTC.";

#[derive(Parser, Debug)]
#[command(
    name = "cyrnelctl",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_help = AFTER_HELP
)]
struct Cli {
    /// Base URL of the daemon.
    #[arg(
        long,
        env = "CYRNEL_URL",
        default_value = "http://127.0.0.1:9371",
        global = true,
        value_name = "URL"
    )]
    url: String,

    /// API key, sent as `Authorization: Bearer <KEY>`.
    #[arg(
        long,
        env = "CYRNEL_API_KEY",
        hide_env_values = true,
        global = true,
        value_name = "KEY"
    )]
    api_key: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a process; follow its stdout and stderr and exit with its exit code
    #[command(group(ArgGroup::new("source").required(true).args(["code", "file"])))]
    Run {
        /// Reference that correlates related processes.
        #[arg(long = "ref", value_name = "REF")]
        reference: Option<String>,
        /// Time limit in milliseconds, or `none` for no limit (default: the daemon's).
        #[arg(long, value_name = "MS|none", value_parser = parse_timeout)]
        timeout: Option<Timeout>,
        /// Print the new process's id and exit instead of following it.
        #[arg(long)]
        no_wait: bool,
        /// The code to run (a shell script, or any file starting with `#!`).
        #[arg(short = 'c', long = "code", value_name = "CODE")]
        code: Option<String>,
        /// File holding the code to run; `-` reads it from stdin.
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// List processes, newest first
    Ps {
        /// Only processes in this state.
        #[arg(long, value_parser = ["queued", "running", "terminating", "idle"])]
        state: Option<String>,
        /// Only processes with this exit state (`null`: never settled).
        #[arg(long, value_parser = ["success", "failed", "timeout", "canceled", "null"])]
        status: Option<String>,
        /// Only processes with this reference.
        #[arg(long = "ref", value_name = "REF")]
        reference: Option<String>,
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one process record
    Show {
        #[arg(value_name = "ID", value_parser = parse_id)]
        id: u64,
        /// Print the daemon's JSON instead of key: value lines.
        #[arg(long)]
        json: bool,
    },
    /// Print the captured stdout (or stderr) of a process
    Logs {
        #[arg(value_name = "ID", value_parser = parse_id)]
        id: u64,
        /// Print stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep printing new output until the run settles (any state).
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Print the structured output (a JSON object) of an idle process
    Output {
        #[arg(value_name = "ID", value_parser = parse_id)]
        id: u64,
    },
    /// Kill processes: SIGTERM to the whole group, SIGKILL after the grace period
    Kill {
        #[arg(value_name = "ID", required = true, value_parser = parse_id)]
        ids: Vec<u64>,
    },
    /// Run an idle process again, under the same id
    Rerun {
        #[arg(value_name = "ID", value_parser = parse_id)]
        id: u64,
        /// Discard the outputs of the previous run.
        #[arg(long)]
        force: bool,
    },
    /// Delete idle processes with their code and outputs
    Rm {
        #[arg(value_name = "ID", required = true, value_parser = parse_id)]
        ids: Vec<u64>,
    },
    /// Follow state-transition events, one line each: SEQ EVENT ID STATE EXITSTATE
    Events {
        /// Replay the retained events after this sequence number first.
        #[arg(long, value_name = "SEQ")]
        since: Option<u64>,
        /// Print each event's JSON data line instead.
        #[arg(long)]
        json: bool,
        /// Only the events of this process.
        #[arg(value_name = "ID", value_parser = parse_id)]
        id: Option<u64>,
    },
    /// Wait until every given process is idle; exit 0 if all succeeded
    Wait {
        #[arg(value_name = "ID", required = true, value_parser = parse_id)]
        ids: Vec<u64>,
    },
    /// Write a consistent copy of the daemon's database to DIR while it runs
    ///
    /// DIR must not exist yet; the daemon (on this host) creates it and
    /// writes a data dir a daemon can start from: `cyrneld --data-dir DIR`.
    Backup {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Make the daemon re-execute the binary on disk (an upgrade) keeping
    /// every run; waits until the new image answers
    ///
    /// The daemon first checks that binary (`cyrneld --handover-check`);
    /// if it refuses, nothing changes and this exits 1 with the reason.
    Handover,
    /// Print a shell completion script
    Completions {
        #[arg(value_name = "SHELL")]
        shell: Shell,
    },
    /// Print the man page (roff), or write one page per command into a directory
    Man {
        /// Write cyrnelctl.1 and cyrnelctl-<command>.1 here instead.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

fn parse_timeout(s: &str) -> Result<Timeout, String> {
    if s.eq_ignore_ascii_case("none") {
        return Ok(Timeout::Unlimited);
    }
    match s.parse::<u64>() {
        Ok(ms) if ms > 0 => Ok(Timeout::Ms(ms)),
        _ => Err("expected a positive number of milliseconds or `none`".to_string()),
    }
}

/// Ids as the daemon accepts them: decimal, 1 ≤ id ≤ 2^63−1.
fn parse_id(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(id) if (1..=i64::MAX as u64).contains(&id) && s.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(id)
        }
        _ => Err("expected a process id (a positive integer)".to_string()),
    }
}

/// Why a command stopped early.
#[derive(Debug)]
enum Fail {
    Client(ClientError),
    /// A local problem, shown as is.
    Local(String),
    Io(io::Error),
}

impl From<ClientError> for Fail {
    fn from(e: ClientError) -> Self {
        Fail::Client(e)
    }
}

impl From<io::Error> for Fail {
    fn from(e: io::Error) -> Self {
        Fail::Io(e)
    }
}

type Result<T, E = Fail> = std::result::Result<T, E>;

const START_HINT: &str =
    "is cyrneld running? Start it with \"make run\" or \"systemctl start cyrneld\".";

fn report(e: &ClientError) {
    if e.is_connect() {
        eprintln!("cyrnelctl: {e}; {START_HINT}");
    } else {
        eprintln!("cyrnelctl: {e}");
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli).await {
        Ok(code) => code,
        Err(Fail::Client(e)) => {
            report(&e);
            ExitCode::FAILURE
        }
        Err(Fail::Local(msg)) => {
            eprintln!("cyrnelctl: {msg}");
            ExitCode::FAILURE
        }
        // The reader went away (`cyrnelctl ps | head`): stop quietly, with
        // the status a shell tool killed by SIGPIPE would have.
        Err(Fail::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::from(141),
        Err(Fail::Io(e)) => {
            eprintln!("cyrnelctl: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> Result<ExitCode> {
    let client = || {
        let key = cli.api_key.as_deref().filter(|k| !k.is_empty());
        Client::new(&cli.url, key)
    };
    match cli.command {
        Command::Completions { shell } => {
            let mut out = io::stdout().lock();
            clap_complete::generate(shell, &mut Cli::command(), "cyrnelctl", &mut out);
            out.flush()?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { out_dir } => {
            man(out_dir)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            reference,
            timeout,
            no_wait,
            code,
            file,
        } => {
            let code = read_code(code, file)?;
            let new = NewProcess {
                code,
                r#ref: reference,
                timeout: timeout.unwrap_or(Timeout::Default),
            };
            run(&client()?, new, no_wait).await
        }
        Command::Ps {
            state,
            status,
            reference,
            json,
        } => {
            let filter = ListFilter {
                state,
                status,
                r#ref: reference,
            };
            let client = client()?;
            if json {
                print_raw(&client.list_raw(&filter).await?)?;
            } else {
                print_table(&client.list(&filter).await?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { id, json } => {
            let client = client()?;
            if json {
                print_raw(&client.get_raw(id).await?)?;
            } else {
                print_record(&client.get(id).await?)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { id, stderr, follow } => {
            let pipe = if stderr { Pipe::Stderr } else { Pipe::Stdout };
            let chunks = client()?.stream(id, pipe, follow).await?;
            pump(chunks, io::stdout()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Output { id } => {
            print_raw(&client()?.output(id).await?)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Kill { ids } => {
            let client = client()?;
            for_each_id(&ids, |id| {
                let client = client.clone();
                async move {
                    let p = client.kill(id).await?;
                    line(format_args!("{} {}", p.id, p.state))
                }
            })
            .await
        }
        Command::Rerun { id, force } => {
            let p = client()?.run(id, force).await?;
            line(format_args!("{} {}", p.id, p.state))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { ids } => {
            let client = client()?;
            for_each_id(&ids, |id| {
                let client = client.clone();
                async move {
                    let p = client.delete(id).await?;
                    line(format_args!("{} deleted", p.id))
                }
            })
            .await
        }
        Command::Backup { dir } => {
            // The daemon resolves nothing relative to our working directory.
            let dir = std::path::absolute(&dir).map_err(Fail::Io)?;
            let dir = dir
                .to_str()
                .ok_or_else(|| Fail::Local(format!("{}: not UTF-8", dir.display())))?;
            let b = client()?.backup(dir).await?;
            line(format_args!(
                "{} next id {} last event {} ({} ms)",
                b.dir, b.next_id, b.last_event_id, b.took_ms
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Handover => {
            let client = client()?;
            let before = client.handover_status().await?;
            let started = client.handover().await?;
            // The daemon answers again once the new image listens (the
            // socket is kept, so connections wait meanwhile).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                match client.handover_status().await {
                    Ok(now) if now.last_error.is_some() && now.last_error != before.last_error => {
                        return Err(Fail::Local(format!(
                            "the handover failed: {}",
                            now.last_error.unwrap_or_default()
                        )));
                    }
                    Ok(now) if now.generation > before.generation => {
                        line(format_args!(
                            "handed over to {} (pid {}, handover {})",
                            started.binary, now.pid, now.generation
                        ))?;
                        return Ok(ExitCode::SUCCESS);
                    }
                    _ if std::time::Instant::now() > deadline => {
                        return Err(Fail::Local(
                            "the daemon did not answer as a new image within 60 s".into(),
                        ));
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
                }
            }
        }
        Command::Events { since, json, id } => events(&client()?, since, id, json).await,
        Command::Wait { ids } => wait(&client()?, &ids).await,
    }
}

/// Runs `f` for every id in turn. A daemon error for one id is reported with
/// the id (when there are several) and the others still get their turn;
/// anything else (the daemon is unreachable) stops at once.
async fn for_each_id<F, Fut>(ids: &[u64], f: F) -> Result<ExitCode>
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut failed = false;
    for &id in ids {
        match f(id).await {
            Ok(()) => {}
            Err(Fail::Client(e @ ClientError::Api { .. })) => {
                failed = true;
                if ids.len() > 1 {
                    eprintln!("cyrnelctl: process {id}: {e}");
                } else {
                    report(&e);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn read_code(code: Option<String>, file: Option<PathBuf>) -> Result<String> {
    if let Some(code) = code {
        return Ok(code);
    }
    let file = file.expect("clap requires CODE or FILE");
    let bytes = if file.as_os_str() == "-" {
        let mut buf = Vec::new();
        io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| Fail::Local(format!("cannot read the code from stdin: {e}")))?;
        buf
    } else {
        std::fs::read(&file)
            .map_err(|e| Fail::Local(format!("cannot read {}: {e}", file.display())))?
    };
    String::from_utf8(bytes).map_err(|_| {
        Fail::Local(format!(
            "{}: the code must be UTF-8 text",
            if file.as_os_str() == "-" {
                "stdin".to_string()
            } else {
                file.display().to_string()
            }
        ))
    })
}

async fn run(client: &Client, new: NewProcess, no_wait: bool) -> Result<ExitCode> {
    if no_wait {
        let id = client.create(&new).await?;
        line(format_args!("{id}"))?;
        return Ok(ExitCode::SUCCESS);
    }
    // Taken before the process exists, so that an early Ctrl-C cannot kill
    // this client and leave the process running unwatched.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let id = client.create(&new).await?;
    let settled = async {
        // Both streams replay what is stored, then follow; they end when the
        // run settles, so opening them after the create loses nothing.
        let out = async { pump(client.stream(id, Pipe::Stdout, true).await?, io::stdout()).await };
        let err = async { pump(client.stream(id, Pipe::Stderr, true).await?, io::stderr()).await };
        tokio::try_join!(out, err)?;
        wait_idle(client, id).await
    };
    tokio::pin!(settled);
    let mut canceling = false;
    let settled = loop {
        tokio::select! {
            settled = &mut settled => break settled?,
            _ = interrupt.recv() => {
                // First Ctrl-C: cancel the process and show how it ends, as
                // a local child would; the second one detaches at once.
                if canceling {
                    eprintln!("cyrnelctl: detached; process {id} may still be running");
                    return Ok(ExitCode::from(130));
                }
                canceling = true;
                eprintln!("cyrnelctl: canceling process {id} (Ctrl-C again to detach)");
                match client.kill(id).await {
                    // 409: already settling or idle, which is what we want.
                    Ok(_) | Err(ClientError::Api { status: 409, .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    };
    let Some(p) = settled else {
        return Err(Fail::Local(format!("process {id} was deleted")));
    };
    let (code, note) = exit_status(&p);
    if let Some(note) = note.filter(|_| !canceling) {
        eprintln!("cyrnelctl: process {id}: {note}");
    }
    Ok(ExitCode::from(code))
}

/// The exit status `run` mirrors, like a shell's `$?`: the exit code, or
/// 128 + the signal number. A note explains outcomes the status cannot
/// (a run that never started, a timeout, a failure despite exit code 0).
fn exit_status(p: &Process) -> (u8, Option<String>) {
    let exit_state = p.exit_state.as_deref().unwrap_or("null");
    let code = match (p.exit_code, p.signal.as_deref().and_then(signal_number)) {
        (Some(c), _) => Some((c & 0xff) as u8),
        (None, Some(sig)) => Some((128 + sig).min(255) as u8),
        (None, None) => None,
    };
    let why = || {
        p.error
            .as_deref()
            .map(str::to_string)
            .unwrap_or_else(|| exit_state.to_string())
    };
    match (exit_state, code) {
        ("success", Some(c)) => (c, None),
        ("failed", Some(c)) if c != 0 => (c, None),
        ("timeout", c) => (c.filter(|c| *c != 0).unwrap_or(1), Some("timed out".into())),
        ("canceled", c) => (c.filter(|c| *c != 0).unwrap_or(1), Some("canceled".into())),
        (_, Some(0)) | (_, None) => (1, Some(why())),
        (_, Some(c)) => (c, None),
    }
}

/// Copies a body to `out` chunk by chunk, flushing each so a follower sees
/// output as it comes.
async fn pump(mut chunks: cyrnel::client::Chunks, mut out: impl Write) -> Result<()> {
    while let Some(chunk) = chunks.next().await? {
        out.write_all(&chunk)?;
        out.flush()?;
    }
    Ok(())
}

/// Waits until process `id` is idle: subscribes to its events first, then
/// looks at the record, so a transition in between cannot be missed.
/// `None` if it was deleted meanwhile.
async fn wait_idle(client: &Client, id: u64) -> Result<Option<Process>> {
    let mut sub = client.subscribe(Some(id), None);
    let mut outage = Outage::default();
    loop {
        match sub.next().await? {
            // Also after a reconnect without a sequence number to resume
            // from: whatever happened meanwhile shows in the record.
            Delivery::Opened => {
                outage.over();
                let p = client.get(id).await?;
                if p.state == "idle" {
                    return Ok(Some(p));
                }
            }
            Delivery::Retrying(e) => outage.report(&e),
            Delivery::Event(ev) => match ev.event.as_str() {
                "idle" => return Ok(Some(ev.process()?)),
                "deleted" => return Ok(None),
                // History was trimmed: the record tells where we are.
                "reset" => {
                    let p = client.get(id).await?;
                    if p.state == "idle" {
                        return Ok(Some(p));
                    }
                }
                _ => {}
            },
        }
    }
}

/// Says once per outage that a lost event stream is being reopened.
#[derive(Default)]
struct Outage {
    reported: bool,
}

impl Outage {
    fn report(&mut self, e: &ClientError) {
        if !std::mem::replace(&mut self.reported, true) {
            eprintln!("cyrnelctl: {e}; reconnecting");
        }
    }

    fn over(&mut self) {
        if std::mem::take(&mut self.reported) {
            eprintln!("cyrnelctl: reconnected");
        }
    }
}

async fn wait(client: &Client, ids: &[u64]) -> Result<ExitCode> {
    let waits = ids.iter().map(|&id| async move {
        let result = wait_idle(client, id).await;
        // Report each as it settles, not in argument order at the end.
        let ok = match &result {
            Ok(Some(p)) if p.exit_state.as_deref() == Some("success") => {
                line(format_args!("{id} success"))?;
                true
            }
            Ok(Some(p)) => {
                let exit_state = p.exit_state.as_deref().unwrap_or("-");
                match p.error.as_deref() {
                    Some(err) => line(format_args!("{id} {exit_state}: {err}"))?,
                    None => line(format_args!("{id} {exit_state}"))?,
                }
                false
            }
            Ok(None) => {
                line(format_args!("{id} deleted"))?;
                false
            }
            Err(Fail::Client(e @ ClientError::Api { .. })) => {
                eprintln!("cyrnelctl: process {id}: {e}");
                false
            }
            Err(_) => return result.map(|_| false),
        };
        Ok::<bool, Fail>(ok)
    });
    let results = futures_util::future::join_all(waits).await;
    let mut all_ok = true;
    for r in results {
        all_ok &= r?;
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn events(
    client: &Client,
    since: Option<u64>,
    id: Option<u64>,
    json: bool,
) -> Result<ExitCode> {
    let mut sub = client.subscribe(id, since);
    let mut outage = Outage::default();
    loop {
        let ev = match sub.next().await? {
            Delivery::Event(ev) => ev,
            Delivery::Opened => {
                outage.over();
                continue;
            }
            Delivery::Retrying(e) => {
                outage.report(&e);
                continue;
            }
        };
        let seq = ev.id.map_or_else(|| "-".to_string(), |n| n.to_string());
        if json {
            line(format_args!("{}", ev.data))?;
        } else if ev.event == "reset" {
            line(format_args!("{seq} reset {}", ev.data))?;
        } else {
            let p = ev.process()?;
            line(format_args!(
                "{seq} {} {} {} {}",
                ev.event,
                p.id,
                p.state,
                p.exit_state.as_deref().unwrap_or("-")
            ))?;
        }
    }
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

/// One line on stdout; errors (a closed pipe) are returned, not panicked on.
fn line(args: std::fmt::Arguments<'_>) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// The daemon's JSON as sent, ending in a newline.
fn print_raw(body: &[u8]) -> Result<()> {
    let mut out = io::stdout().lock();
    out.write_all(body)?;
    if !body.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

fn man(out_dir: Option<PathBuf>) -> Result<()> {
    let page = main_man_page()?;
    match out_dir {
        None => {
            let mut out = io::stdout().lock();
            out.write_all(&page)?;
            out.flush()?;
        }
        Some(dir) => {
            let failed = |e: io::Error| {
                Fail::Local(format!("cannot write man pages to {}: {e}", dir.display()))
            };
            clap_mangen::generate_to(Cli::command(), &dir).map_err(failed)?;
            // The generated cyrnelctl.1 lacks the hand-written sections.
            std::fs::write(dir.join("cyrnelctl.1"), page).map_err(failed)?;
        }
    }
    Ok(())
}

/// `cyrnelctl.1`: clap's page with ENVIRONMENT and EXIT STATUS sections
/// in place of the help's closing paragraph, before VERSION.
fn main_man_page() -> Result<Vec<u8>> {
    let cmd = Cli::command().after_help(None::<&str>);
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd).render(&mut page)?;
    let at = page
        .windows(12)
        .position(|w| w == b"\n.SH VERSION")
        .map_or(page.len(), |i| i + 1);
    page.splice(at..at, MAN_SECTIONS.bytes());
    Ok(page)
}

const MAN_SECTIONS: &str = r#".SH ENVIRONMENT
.TP
\fBCYRNEL_URL\fR
Base URL of the daemon (default http://127.0.0.1:9371); \fB\-\-url\fR overrides it.
.TP
\fBCYRNEL_API_KEY\fR
API key sent as a bearer token; \fB\-\-api\-key\fR overrides it.
.SH "EXIT STATUS"
0 on success, 1 when the daemon reports an error or cannot be reached, 2 for a
usage error. \fBrun\fR exits with the process's own exit code, or 128 plus the
signal number when a signal ended it. \fBwait\fR exits 0 only if every process
succeeded.
"#;

fn exit_column(p: &Process) -> String {
    match p.exit_state.as_deref() {
        None => "-".to_string(),
        Some("failed") => match (p.exit_code, p.signal.as_deref()) {
            (Some(c), _) if c != 0 => format!("failed({c})"),
            (_, Some(sig)) => format!("failed({sig})"),
            _ => "failed".to_string(),
        },
        Some(s) => s.to_string(),
    }
}

fn print_table(processes: &[Process]) -> Result<()> {
    let now = now_ms();
    let header = [
        "ID", "REF", "STATE", "EXIT", "STARTED", "DURATION", "CPU", "MEM",
    ]
    .map(str::to_string);
    let rows: Vec<[String; 8]> = processes
        .iter()
        .map(|p| {
            [
                p.id.to_string(),
                p.r#ref.as_deref().unwrap_or("-").to_string(),
                p.state.to_string(),
                exit_column(p),
                p.started_at
                    .as_deref()
                    .map_or_else(|| "-".to_string(), readable_time),
                duration_of(p, now).map_or_else(|| "-".to_string(), format_duration),
                p.resources.as_ref().map_or_else(
                    || "-".to_string(),
                    |r| format_cpu(r.cpu_user_ms + r.cpu_system_ms),
                ),
                p.resources
                    .as_ref()
                    .and_then(|r| r.peak_memory_bytes)
                    .map_or_else(|| "-".to_string(), format_bytes),
            ]
        })
        .collect();
    let mut widths = [0usize; 8];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = io::stdout().lock();
    for row in std::iter::once(&header).chain(&rows) {
        let mut text = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                text.push_str(cell);
            } else {
                text.push_str(cell);
                text.extend(std::iter::repeat_n(' ', w - cell.chars().count() + 2));
            }
        }
        writeln!(out, "{}", text.trim_end())?;
    }
    out.flush()?;
    Ok(())
}

fn print_record(p: &Process) -> Result<()> {
    let dash = |v: Option<&str>| v.unwrap_or("-").to_string();
    let res = p.resources.as_ref();
    let fields: [(&str, String); 19] = [
        ("id", p.id.to_string()),
        ("ref", dash(p.r#ref.as_deref())),
        ("state", p.state.to_string()),
        ("exitState", dash(p.exit_state.as_deref())),
        (
            "exitCode",
            dash(p.exit_code.map(|c| c.to_string()).as_deref()),
        ),
        ("signal", dash(p.signal.as_deref())),
        ("error", dash(p.error.as_deref())),
        ("pid", dash(p.pid.map(|c| c.to_string()).as_deref())),
        ("sandbox", dash(p.sandbox.as_deref())),
        ("createdAt", p.created_at.clone()),
        ("startedAt", dash(p.started_at.as_deref())),
        ("completedAt", dash(p.completed_at.as_deref())),
        (
            "duration",
            duration_of(p, now_ms()).map_or_else(|| "-".to_string(), format_duration),
        ),
        (
            "cpuUser",
            res.map_or_else(|| "-".into(), |r| format_cpu(r.cpu_user_ms)),
        ),
        (
            "cpuSystem",
            res.map_or_else(|| "-".into(), |r| format_cpu(r.cpu_system_ms)),
        ),
        (
            "peakMemory",
            res.and_then(|r| r.peak_memory_bytes)
                .map_or_else(|| "-".into(), format_bytes),
        ),
        (
            "peakProcesses",
            dash(
                res.and_then(|r| r.peak_processes)
                    .map(|n| n.to_string())
                    .as_deref(),
            ),
        ),
        (
            "oomKilled",
            dash(res.map(|r| if r.oom_killed { "yes" } else { "no" })),
        ),
        ("usageSource", dash(res.map(|r| r.source.as_str()))),
    ];
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    let mut out = io::stdout().lock();
    for (key, value) in fields {
        writeln!(out, "{:<width$} {value}", format!("{key}:"))?;
    }
    out.flush()?;
    Ok(())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How long the current run took, or has taken so far if it is running.
fn duration_of(p: &Process, now: u64) -> Option<u64> {
    let started = parse_time(p.started_at.as_deref()?)?;
    let end = match p.completed_at.as_deref() {
        Some(t) => parse_time(t)?,
        None if p.state == "running" || p.state == "terminating" => now,
        None => return None,
    };
    Some(end.saturating_sub(started))
}

/// `2026-11-27T12:00:00.000Z` → milliseconds since the Unix epoch.
fn parse_time(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() != 24 || b[23] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hh, mm, ss, ms) = (num(11..13)?, num(14..16)?, num(17..19)?, num(20..23)?);
    // Days from civil (Howard Hinnant), the inverse of the daemon's format.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let total = ((days * 24 + hh) * 60 + mm) * 60 + ss;
    u64::try_from(total * 1000 + ms).ok()
}

/// `2026-11-27T12:00:00.000Z` → `2026-11-27 12:00:00`.
fn readable_time(s: &str) -> String {
    match (s.get(0..10), s.get(11..19)) {
        (Some(date), Some(time)) if s.len() == 24 => format!("{date} {time}"),
        _ => s.to_string(),
    }
}

/// CPU time: `0.02s`, `1.25s`, then as a duration.
fn format_cpu(ms: u64) -> String {
    if ms < 60_000 {
        format!("{}.{:02}s", ms / 1000, ms % 1000 / 10)
    } else {
        format_duration(ms)
    }
}

/// Bytes in binary units: `512B`, `1.5K`, `64.0M`, `2.0G`.
fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["K", "M", "G", "T"];
    if b < 1024 {
        return format!("{b}B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1}{}", UNITS[unit])
}

fn format_duration(ms: u64) -> String {
    let secs = ms / 1000;
    if secs < 60 {
        format!("{}.{}s", secs, ms % 1000 / 100)
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else if secs < 86_400 {
        format!("{}h{:02}m", secs / 3600, secs % 3600 / 60)
    } else {
        format!("{}d{:02}h", secs / 86_400, secs % 86_400 / 3600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn process(state: &str, exit_state: Option<&str>) -> Process {
        Process {
            id: 7,
            r#ref: None,
            state: Cow::Owned(state.to_string()),
            exit_state: exit_state.map(|s| Cow::Owned(s.to_string())),
            error: None,
            created_at: "2026-11-27T12:00:00.000Z".into(),
            completed_at: None,
            started_at: None,
            pid: None,
            exit_code: None,
            signal: None,
            killed: None,
            escaped: None,
            kill_deadline: None,
            sandbox: None,
            resources: None,
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn times() {
        assert_eq!(parse_time("1970-01-01T00:00:00.000Z"), Some(0));
        assert_eq!(
            parse_time("2000-02-29T00:00:00.000Z"),
            Some(951_782_400_000)
        );
        assert_eq!(
            parse_time("2026-11-27T12:00:00.123Z"),
            Some(1_795_780_800_123)
        );
        assert_eq!(
            parse_time("2099-12-31T23:59:59.999Z"),
            Some(4_102_444_799_999)
        );
        assert_eq!(parse_time("2026-11-27T12:00:00Z"), None);
        assert_eq!(
            readable_time("2026-11-27T12:00:00.123Z"),
            "2026-11-27 12:00:00"
        );
        assert_eq!(format_duration(1250), "1.2s");
        assert_eq!(format_duration(0), "0.0s");
        assert_eq!(format_duration(184_000), "3m04s");
        assert_eq!(format_duration(3_720_000), "1h02m");
        assert_eq!(format_duration(90_000_000), "1d01h");
        assert_eq!(format_cpu(20), "0.02s");
        assert_eq!(format_cpu(1250), "1.25s");
        assert_eq!(format_cpu(184_000), "3m04s");
        assert_eq!(format_bytes(512), "512B");
        assert_eq!(format_bytes(1536), "1.5K");
        assert_eq!(format_bytes(64 << 20), "64.0M");
    }

    #[test]
    fn run_exit_status_is_shell_like() {
        let mut p = process("idle", Some("success"));
        p.exit_code = Some(0);
        assert_eq!(exit_status(&p), (0, None));
        p.exit_state = Some("failed".into());
        p.exit_code = Some(3);
        assert_eq!(exit_status(&p), (3, None));
        p.exit_code = None;
        p.signal = Some("SIGTERM".into());
        assert_eq!(exit_status(&p), (143, None));
        p.signal = None;
        p.error = Some("Failed to start: nope".into());
        assert_eq!(exit_status(&p).0, 1);
        assert_eq!(exit_status(&p).1.as_deref(), Some("Failed to start: nope"));
        // Invalid output fails a run whose leader exited 0: still an error.
        p.exit_code = Some(0);
        assert_eq!(exit_status(&p).0, 1);
        p.exit_state = Some("timeout".into());
        p.exit_code = None;
        p.signal = Some("SIGKILL".into());
        assert_eq!(exit_status(&p), (137, Some("timed out".into())));
    }

    #[test]
    fn ids_and_timeouts() {
        assert_eq!(parse_id("7"), Ok(7));
        for bad in ["0", "-1", "+5", "1.5", "abc", "9223372036854775808"] {
            assert!(parse_id(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_timeout("none"), Ok(Timeout::Unlimited));
        assert_eq!(parse_timeout("250"), Ok(Timeout::Ms(250)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("1.5").is_err());
    }

    #[test]
    fn exit_column_shows_why_it_failed() {
        let mut p = process("idle", Some("failed"));
        p.exit_code = Some(3);
        assert_eq!(exit_column(&p), "failed(3)");
        p.exit_code = None;
        p.signal = Some("SIGSEGV".into());
        assert_eq!(exit_column(&p), "failed(SIGSEGV)");
        assert_eq!(exit_column(&process("queued", None)), "-");
    }
}
