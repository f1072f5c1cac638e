//! The handover: one image of the daemon passes its runs and its listening
//! socket to the next through `execve`, under the same pid, so every run
//! stays its child and no client sees a refused connection.
//!
//! Protocol (state version [`STATE_VERSION`]):
//!
//! 1. Preflight: the target binary runs as `<binary> --handover-check` and
//!    must print `cyrneld handover reads <min>-<max>` with this image's
//!    version inside the range, and exit 0. A binary that is missing, not
//!    executable, exits otherwise or reads other versions is refused, and
//!    nothing changes.
//! 2. The server stops accepting (the socket stays open: connections wait
//!    in its backlog), live event streams end (clients resume with
//!    `Last-Event-ID`), requests in flight finish; the supervisor parks
//!    every run (see `Supervisor::park`).
//! 3. The state goes into a sealed memfd as JSON: the version, the handover
//!    generation, the descriptor numbers of the listener and of the running
//!    image, this image's command line and environment, and per run its
//!    id, leader pid, pidfd, output pipes, folder, capture counts and
//!    journals. Exactly those descriptors lose `FD_CLOEXEC`.
//! 4. `execve(binary)` with the original arguments and environment plus
//!    `CYRNEL_HANDOVER=<state fd>:<image fd>`.
//! 5. The new image reads the state before anything else (`take`). If it
//!    cannot (a newer version, damaged), or then rejects its command line
//!    or configuration (`Inherited::fall_back`, before it starts anything),
//!    it executes the previous image again, from the descriptor, with the
//!    same state and the previous image's own command line and environment
//!    (in the state), adding `CYRNEL_HANDOVER_FALLBACK=<why>`; so does the
//!    old image when its `execve` fails. Once its configuration is valid
//!    it commits (`Inherited::commit`): the descriptors close on exec again.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::model::ProcessId;
use crate::proc::reexec;
use crate::proc::sandbox::FolderHandle;
use crate::supervisor::{Adoption, HandedRun, StreamStats};

/// The version of the handed-over state this image writes: 2 adds the
/// capture journals of each run (`journals`).
pub const STATE_VERSION: u32 = 2;
/// The versions this image reads.
pub const READS: (u32, u32) = (1, STATE_VERSION);

/// Where the state and the previous image are: `<state fd>:<image fd>`.
const ENV_STATE: &str = "CYRNEL_HANDOVER";
/// Why this image runs again after a failed handover.
const ENV_FALLBACK: &str = "CYRNEL_HANDOVER_FALLBACK";
/// The largest state read (a run takes about 300 bytes).
const MAX_STATE_BYTES: u64 = 64 << 20;
/// How long the preflight may take.
const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
struct Wire {
    version: u32,
    /// How many handovers this daemon's pid has seen.
    generation: u64,
    listener: RawFd,
    image: RawFd,
    runs: Vec<WireRun>,
    /// The previous image's command line and environment, to start it
    /// again as it was if this one cannot run (empty in version 1).
    #[serde(default)]
    args: Vec<Vec<u8>>,
    #[serde(default)]
    env: Vec<Vec<u8>>,
}

#[derive(Serialize, Deserialize)]
struct WireRun {
    id: u64,
    pid: i32,
    pidfd: RawFd,
    stdout: Option<RawFd>,
    stderr: Option<RawFd>,
    folder: Option<WireFolder>,
    /// stdout kept, stdout dropped, stderr kept, stderr dropped.
    streams: [u64; 4],
    signalled: Vec<i32>,
    escaped: Vec<i32>,
    /// Version 2: the capture journals (stdout, stderr).
    #[serde(default)]
    journals: [Option<RawFd>; 2],
}

#[derive(Serialize, Deserialize)]
enum WireFolder {
    Private(RawFd),
    Host(RawFd, PathBuf),
}

impl WireRun {
    /// Every descriptor of the run the state names.
    fn fds(&self) -> impl Iterator<Item = RawFd> + '_ {
        let folder = self.folder.as_ref().map(|f| match f {
            WireFolder::Private(fd) | WireFolder::Host(fd, _) => *fd,
        });
        [
            Some(self.pidfd),
            self.stdout,
            self.stderr,
            self.journals[0],
            self.journals[1],
            folder,
        ]
        .into_iter()
        .flatten()
    }
}

/// Byte strings of the state as `OsString`s (`None`: absent, as in a
/// version-1 state).
fn os_strings(items: Vec<Vec<u8>>) -> Option<Vec<OsString>> {
    (!items.is_empty()).then(|| items.into_iter().map(OsString::from_vec).collect())
}

/// What an image started by a handover took over. Until
/// [`Inherited::commit`] every descriptor stays as it was handed over
/// (without `FD_CLOEXEC`), so [`Inherited::fall_back`] can still give all
/// of it back to the previous image.
pub struct Inherited {
    pub listener: std::net::TcpListener,
    pub adoption: Adoption,
    pub generation: u64,
    /// Set when this image runs again because a handover failed.
    pub fallback: Option<String>,
    /// Until `commit`: the way back.
    back: Option<Back>,
}

/// What going back to the previous image takes.
struct Back {
    /// `<state fd>:<image fd>`, as handed over.
    spec: String,
    /// The state's memfd, held open until this image commits or goes back
    /// (the previous image reads it again).
    _state: OwnedFd,
    image: OwnedFd,
    /// Every descriptor taken over, to close on exec once committed.
    taken: Vec<RawFd>,
    /// The previous image's command line and environment (`None`: from a
    /// version-1 state, which lacks them: this image's).
    args: Option<Vec<OsString>>,
    env: Option<Vec<OsString>>,
}

impl Inherited {
    /// This image takes over for good (call before it starts any thread
    /// that may fork): the descriptors are closed on exec again, and the
    /// state and the previous image's descriptor are closed.
    pub fn commit(&mut self) {
        if let Some(back) = self.back.take() {
            for fd in back.taken {
                // SAFETY: every number in `taken` belongs to a descriptor
                // this `Inherited` owns (the listener or a run's), open
                // while it lives.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                let _ = reexec::close_on_exec(fd);
            }
        }
    }

    /// This image cannot run (an invalid command line or configuration,
    /// before anything was started): executes the previous image again
    /// with everything handed over, and says why. Returns only when that
    /// is impossible (this image is itself the fallback, or it was already
    /// committed, or `execveat` failed).
    pub fn fall_back(self, why: &str) -> io::Error {
        let Some(back) = self.back.filter(|_| self.fallback.is_none()) else {
            return io::Error::other("no previous image to go back to");
        };
        exec_previous(&back.image, &back.spec, why, back.args, back.env)
    }
}

fn current_env() -> Vec<OsString> {
    std::env::vars_os()
        .filter(|(k, _)| k != ENV_STATE && k != ENV_FALLBACK)
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            kv
        })
        .collect()
}

/// Executes the previous image (its descriptor `image`, without
/// `FD_CLOEXEC`) with the handed-over state `spec` and the reason, with
/// its own command line and environment where the state has them.
fn exec_previous(
    image: &OwnedFd,
    spec: &str,
    why: &str,
    args: Option<Vec<OsString>>,
    env: Option<Vec<OsString>>,
) -> io::Error {
    let mut env = env.unwrap_or_else(current_env);
    env.push(format!("{ENV_STATE}={spec}").into());
    env.push(format!("{ENV_FALLBACK}={}", why.replace('\n', " ")).into());
    let args = args.unwrap_or_else(|| std::env::args_os().collect());
    reexec::exec(None, image, args, env)
}

/// Why a handover did not happen.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("a handover is already in progress, or the daemon is stopping")]
    Busy,
    #[error("this daemon cannot hand over: {0}")]
    Unavailable(String),
    #[error("{}: {why}", binary.display())]
    Preflight { binary: PathBuf, why: String },
}

/// Why a handover is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// An operator's request (SIGUSR2): always.
    Requested,
    /// A reload (SIGHUP): only when the binary at the daemon's path is no
    /// longer the running image (a package upgrade replaced it).
    IfReplaced,
}

/// A request for a handover; answered once the preflight is done (with
/// the binary that takes over), before the handover itself.
pub struct Request {
    pub reply: oneshot::Sender<Result<PathBuf, Refused>>,
}

/// The API's side of handovers: ask for one, and what happened so far.
pub struct Control {
    tx: mpsc::Sender<Request>,
    binary: PathBuf,
    generation: u64,
    last_error: Mutex<Option<String>>,
}

/// What `GET /handover` reports.
#[derive(Clone, Debug)]
pub struct Status {
    /// Handovers this daemon (its pid) has been through.
    pub generation: u64,
    /// The binary a handover executes.
    pub binary: PathBuf,
    /// Why the last handover was refused or failed (`None`: none did, in
    /// this image).
    pub last_error: Option<String>,
}

impl Control {
    pub fn new(
        tx: mpsc::Sender<Request>,
        binary: PathBuf,
        generation: u64,
        fallback: Option<String>,
    ) -> Control {
        Control {
            tx,
            binary,
            generation,
            last_error: Mutex::new(fallback),
        }
    }

    /// Asks for a handover; returns once the target binary passed the
    /// preflight (the handover then begins) or was refused.
    pub async fn request(&self) -> Result<PathBuf, Refused> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Request { reply })
            .await
            .map_err(|_| Refused::Busy)?;
        answer.await.map_err(|_| Refused::Busy)?
    }

    /// Records why a handover was refused.
    pub fn failed(&self, why: String) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(why);
    }

    pub fn status(&self) -> Status {
        Status {
            generation: self.generation,
            binary: self.binary.clone(),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }
}

/// Checks that `binary` can take over from this image (step 1).
pub async fn preflight(binary: &Path) -> Result<(), Refused> {
    let refused = |why: String| Refused::Preflight {
        binary: binary.to_path_buf(),
        why,
    };
    let output = reexec::ask(binary, "--handover-check", PREFLIGHT_TIMEOUT)
        .await
        .map_err(|e| refused(e.to_string()))?;
    if !output.status.success() {
        return Err(refused(format!(
            "--handover-check failed ({})",
            output.status
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let range = text
        .lines()
        .find_map(|l| l.strip_prefix("cyrneld handover reads "))
        .and_then(|r| r.trim().split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| {
            refused("--handover-check did not say which state versions it reads".into())
        })?;
    if !(range.0..=range.1).contains(&STATE_VERSION) {
        return Err(refused(format!(
            "it reads handover state versions {}-{}, this daemon writes version {STATE_VERSION}",
            range.0, range.1
        )));
    }
    Ok(())
}

/// What `--handover-check` prints.
pub fn check_line() -> String {
    format!("cyrneld handover reads {}-{}", READS.0, READS.1)
}

/// Hands over to `binary` (steps 3 and 4); falls back to the running image
/// (`image`) when that fails. Returns only when both fail.
pub fn exec(
    binary: &Path,
    image: &OwnedFd,
    listener: OwnedFd,
    generation: u64,
    runs: Vec<HandedRun>,
) -> io::Error {
    use std::os::unix::ffi::OsStrExt;
    let args: Vec<OsString> = std::env::args_os().collect();
    let own_env = current_env();
    let mut keep: Vec<RawFd> = vec![listener.as_raw_fd(), image.as_raw_fd()];
    let wire = Wire {
        args: args.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: own_env.iter().map(|e| e.as_bytes().to_vec()).collect(),
        version: STATE_VERSION,
        generation,
        listener: listener.as_raw_fd(),
        image: image.as_raw_fd(),
        runs: runs
            .iter()
            .map(|r| {
                let s = r.streams.unwrap_or_default();
                WireRun {
                    id: r.id.0,
                    pid: r.pid.unwrap_or(0),
                    pidfd: r.pidfd.as_raw_fd(),
                    stdout: r.stdout.as_ref().map(AsRawFd::as_raw_fd),
                    stderr: r.stderr.as_ref().map(AsRawFd::as_raw_fd),
                    folder: r.folder.as_ref().map(|f| match f {
                        FolderHandle::Private(fd) => WireFolder::Private(fd.as_raw_fd()),
                        FolderHandle::Host(dir, fd) => {
                            WireFolder::Host(fd.as_raw_fd(), dir.clone())
                        }
                    }),
                    streams: [
                        s.stdout_len,
                        s.stdout_dropped,
                        s.stderr_len,
                        s.stderr_dropped,
                    ],
                    signalled: r.signalled.clone(),
                    escaped: r.escaped.clone(),
                    journals: [
                        r.journals[0].as_ref().map(AsRawFd::as_raw_fd),
                        r.journals[1].as_ref().map(AsRawFd::as_raw_fd),
                    ],
                }
            })
            .collect(),
    };
    keep.extend(wire.runs.iter().flat_map(WireRun::fds));
    let json = match serde_json::to_vec(&wire) {
        Ok(j) => j,
        Err(e) => return io::Error::other(e),
    };
    let state = match reexec::sealed_memfd(c"cyrneld-handover", &json) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    keep.push(state.as_raw_fd());
    for &fd in &keep {
        // SAFETY: every number in `keep` belongs to a descriptor owned by
        // this function's arguments or locals, open until it returns.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if let Err(e) = reexec::keep_across_exec(fd) {
            return e;
        }
    }
    let spec = format!("{}:{}", state.as_raw_fd(), image.as_raw_fd());
    let mut env = own_env.clone();
    env.push(format!("{ENV_STATE}={spec}").into());
    tracing::info!(binary = %binary.display(), runs = runs.len(), "handing over: executing the new image");
    let e = reexec::exec(Some(binary), image, args.clone(), env);
    let why = format!("cannot execute {}: {e}", binary.display());
    tracing::error!(%why, "handover failed; executing the previous image again");
    exec_previous(image, &spec, &why, Some(args), Some(own_env))
}

/// Step 5: when this image was started by a handover, takes over its state
/// (and removes the variables). Call first thing in `main`, while the
/// process has one thread, and [`Inherited::commit`] once the command line
/// and the configuration are valid (else [`Inherited::fall_back`]). If the
/// state cannot be read, executes the previous image again and does not
/// return.
pub fn take() -> Option<Inherited> {
    let spec = std::env::var(ENV_STATE).ok()?;
    let fallback = std::env::var(ENV_FALLBACK).ok();
    // SAFETY: called while the process has one thread (see above), so no
    // other thread reads the environment concurrently.
    unsafe {
        std::env::remove_var(ENV_STATE);
        std::env::remove_var(ENV_FALLBACK);
    }
    let (state_fd, image_fd) = spec
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<RawFd>().ok()?, b.parse::<RawFd>().ok()?)))?;
    match read(&spec, state_fd, image_fd, fallback.clone()) {
        Ok(inherited) => Some(inherited),
        Err(why) => {
            eprintln!("cyrneld: cannot take over from the previous image: {why}");
            if fallback.is_some() {
                // The previous image cannot read its own state either:
                // nothing to go back to.
                eprintln!(
                    "cyrneld: the previous image failed too; starting without the handed-over runs"
                );
                return None;
            }
            let image = match reexec::take_handed_over(image_fd) {
                Ok(fd) => fd,
                Err(e) => {
                    eprintln!("cyrneld: the previous image is not available ({e})");
                    return None;
                }
            };
            // Back to the previous image, with the same state.
            let e = exec_previous(
                &image,
                &spec,
                &format!("the new image could not read the state: {why}"),
                None,
                None,
            );
            eprintln!("cyrneld: cannot execute the previous image again: {e}");
            None
        }
    }
}

fn read(
    spec: &str,
    state_fd: RawFd,
    image_fd: RawFd,
    fallback: Option<String>,
) -> Result<Inherited, String> {
    let state = reexec::take_handed_over(state_fd).map_err(|e| format!("state descriptor: {e}"))?;
    let bytes =
        reexec::read_from_start(&state, MAX_STATE_BYTES).map_err(|e| format!("state: {e}"))?;
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let v: Version = serde_json::from_slice(&bytes).map_err(|e| format!("state: {e}"))?;
    if !(READS.0..=READS.1).contains(&v.version) {
        return Err(format!(
            "state version {} (this image reads {}-{})",
            v.version, READS.0, READS.1
        ));
    }
    let wire: Wire = serde_json::from_slice(&bytes).map_err(|e| format!("state: {e}"))?;
    if wire.image != image_fd {
        return Err("the state names another image descriptor".into());
    }
    // First every check, taking nothing: a failure must leave every
    // descriptor open for the previous image to take back.
    let mut all = vec![wire.listener, wire.image];
    all.extend(wire.runs.iter().flat_map(WireRun::fds));
    let mut seen = std::collections::HashSet::from([state_fd]);
    for &fd in &all {
        if !seen.insert(fd) {
            return Err(format!("descriptor {fd} is named twice"));
        }
        reexec::is_open(fd).map_err(|e| format!("descriptor {fd}: {e}"))?;
    }
    let take = |fd: RawFd| -> Result<OwnedFd, String> {
        reexec::take_handed_over(fd).map_err(|e| format!("descriptor {fd}: {e}"))
    };
    let image = take(wire.image)?;
    let taken: Vec<RawFd> = all.iter().copied().filter(|&fd| fd != wire.image).collect();
    let listener = std::net::TcpListener::from(take(wire.listener)?);
    let mut runs = Vec::with_capacity(wire.runs.len());
    for r in wire.runs {
        let folder = match r.folder {
            None => None,
            Some(WireFolder::Private(fd)) => Some(FolderHandle::Private(take(fd)?)),
            Some(WireFolder::Host(fd, dir)) => Some(FolderHandle::Host(dir, take(fd)?)),
        };
        let [stdout_len, stdout_dropped, stderr_len, stderr_dropped] = r.streams;
        runs.push(HandedRun {
            id: ProcessId(r.id),
            pid: Some(r.pid).filter(|&p| p > 0),
            pidfd: take(r.pidfd)?,
            stdout: r.stdout.map(take).transpose()?,
            stderr: r.stderr.map(take).transpose()?,
            folder,
            streams: Some(StreamStats {
                stdout_len,
                stderr_len,
                stdout_dropped,
                stderr_dropped,
            }),
            signalled: r.signalled,
            escaped: r.escaped,
            journals: [
                r.journals[0].map(take).transpose()?,
                r.journals[1].map(take).transpose()?,
            ],
        });
    }
    Ok(Inherited {
        listener,
        adoption: Adoption { runs, child: true },
        generation: wire.generation,
        fallback,
        back: Some(Back {
            spec: spec.to_string(),
            _state: state,
            image,
            taken,
            args: os_strings(wire.args),
            env: os_strings(wire.env),
        }),
    })
}
