//! One task per run: captures stdout/stderr into the store as they arrive
//! (capped per stream, the excess counted and dropped), waits for the leader
//! to exit without reaping it, waits for the rest of the group to go, drains
//! the pipes, reads the structured output, and reports one `Finished` to the
//! actor. It never signals or reaps: the actor owns those decisions.
//!
//! A handover parks it instead: until the run's processes are gone, the
//! actor's park signal stops the capture after the chunk it is storing (the
//! rest stays in the pipe) and hands the pipes, the folder and the counts
//! back to the actor as one `Parked`, for the next image of the daemon.

use std::borrow::Cow;
use std::sync::Arc;

use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch};

use super::machine::{self, OutputOutcome, StreamStats};
use super::Internal;
use crate::events::Hub;
use crate::model::{ProcIdentity, ProcessId, Resources, Stream};
use crate::output::parse_output;
use crate::proc::cgroup::RunCgroup;
use crate::proc::journal::Journal;
use crate::proc::sandbox::RunFolder;
use crate::proc::{self, ExitStatus, Leader, Tracked};
use crate::store::{Batch, Store};

const READ_BUF: usize = 64 * 1024;

pub struct Finished {
    pub id: ProcessId,
    pub gen: u64,
    pub status: Option<ExitStatus>,
    /// The status is unknown because the leader ended while no image of
    /// the daemon was its parent (a crash), on a kernel that keeps none.
    pub status_lost: bool,
    pub resources: Option<Resources>,
    pub output: OutputOutcome,
    pub streams: StreamStats,
}

/// A run a handover stopped watching: what the next image needs.
pub struct Parked {
    pub id: ProcessId,
    pub gen: u64,
    /// `None`: the stream had ended (every writer closed it).
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
    pub folder: Option<RunFolder>,
    pub streams: StreamStats,
    /// The capture journals (stdout, stderr), if any were made.
    pub journals: [Option<Journal>; 2],
}

pub struct RunContext {
    pub id: ProcessId,
    pub gen: u64,
    pub store: Store,
    pub max_output_bytes: u64,
    /// The run's folder: its output file is read from it, then it is
    /// removed (`None`: a run from before a restart whose folder is gone).
    pub folder: Option<RunFolder>,
    pub tx: mpsc::UnboundedSender<Internal>,
    pub hub: Arc<Hub>,
    /// Turns true when a handover parks every run.
    pub park: watch::Receiver<bool>,
    /// What was captured before (a run re-adopted after a restart).
    pub start: StreamStats,
    /// Capture through journals parked in this service manager's store
    /// (`None`: no manager, plain reads).
    pub service: Option<Arc<crate::service::Notifier>>,
    /// Journals handed back (stdout, stderr): their unstored bytes are
    /// stored first.
    pub journals: [Option<Journal>; 2],
}

/// What a capture task is told to do.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Run,
    /// Every writer is gone: read what is buffered and end.
    Drain,
    /// A handover: end after the chunk being stored, leave the rest.
    Park,
}

/// What a capture task ends with: (kept, dropped) bytes so far, and the
/// pipe when it was parked.
struct Captured {
    kept: u64,
    dropped: u64,
    pipe: Option<pipe::Receiver>,
    journal: Option<Journal>,
}

/// Waits until the actor parks every run.
async fn parked(park: &mut watch::Receiver<bool>) {
    // An error: the actor is gone, and nothing will park.
    if park.wait_for(|p| *p).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Supervises a run we spawned (or re-adopted).
pub async fn watch_child(
    mut ctx: RunContext,
    leader: Arc<Leader>,
    tracked: Tracked,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
) {
    let (mode_tx, mode_rx) = watch::channel(Mode::Run);
    let [jout, jerr] = std::mem::take(&mut ctx.journals);
    let out = tokio::spawn(capture(
        Sink::new(&ctx, Stream::Stdout, jout),
        (ctx.start.stdout_len, ctx.start.stdout_dropped),
        stdout,
        mode_rx.clone(),
    ));
    let err = tokio::spawn(capture(
        Sink::new(&ctx, Stream::Stderr, jerr),
        (ctx.start.stderr_len, ctx.start.stderr_dropped),
        stderr,
        mode_rx,
    ));
    let mut park = ctx.park.clone();
    let ended = async {
        let r = leader.exited().await;
        tracked.wait_only_leader_left().await;
        r
    };
    let exited = tokio::select! {
        r = ended => r,
        _ = parked(&mut park) => {
            let _ = mode_tx.send(Mode::Park);
            let parked_or_ended = |c: Result<Captured, _>| match c {
                Ok(c) => c,
                Err(_) => {
                    tracing::error!(id = %ctx.id, "a capture task failed while parking");
                    Captured { kept: 0, dropped: 0, pipe: None, journal: None }
                }
            };
            let (o, e) = (parked_or_ended(out.await), parked_or_ended(err.await));
            drop(leader);
            let _ = ctx.tx.send(Internal::Parked(Parked {
                id: ctx.id,
                gen: ctx.gen,
                stdout: o.pipe,
                stderr: e.pipe,
                folder: ctx.folder.take(),
                streams: StreamStats {
                    stdout_len: o.kept,
                    stdout_dropped: o.dropped,
                    stderr_len: e.kept,
                    stderr_dropped: e.dropped,
                },
                journals: [o.journal, e.journal],
            }));
            return;
        }
    };
    let mut status_lost = false;
    let (status, rusage) = match exited {
        Ok((s, usage)) => (Some(s), usage),
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            status_lost = true;
            (None, None)
        }
        Err(e) => {
            tracing::error!(id = %ctx.id, error = %e, "waiting for the leader failed");
            (None, None)
        }
    };
    // Nothing of the run is alive: its cgroup's figures are final.
    let resources = machine::resources(rusage, tracked.cgroup_usage());
    // Every writer in the group is gone: what they wrote is in the pipes.
    let _ = mode_tx.send(Mode::Drain);
    let counts = |c: Result<Captured, _>| c.map(|c| (c.kept, c.dropped)).unwrap_or_default();
    let (o, e) = (counts(out.await), counts(err.await));
    finish(ctx, status, status_lost, resources, o, e).await;
}

/// Supervises a run found alive after a restart: no pipes, no child of
/// ours; its cgroup (or its group in /proc) is watched until it is empty.
pub async fn watch_orphan(
    ctx: RunContext,
    identity: Option<ProcIdentity>,
    cgroup: Option<RunCgroup>,
) {
    proc::poll_until(|| !proc::orphan_alive(identity.as_ref(), cgroup.as_ref())).await;
    let resources = machine::resources(None, cgroup.as_ref().and_then(RunCgroup::usage));
    finish(ctx, None, false, resources, (0, 0), (0, 0)).await;
}

async fn finish(
    mut ctx: RunContext,
    status: Option<ExitStatus>,
    status_lost: bool,
    resources: Option<Resources>,
    out: (u64, u64),
    err: (u64, u64),
) {
    let max = ctx.max_output_bytes;
    let output = match ctx.folder.take() {
        None => parse_output(None, max),
        Some(folder) => {
            // Most output files are empty or a few lines, on a tmpfs: read
            // them right here rather than paying a hand-off to the blocking
            // pool per run. Dropping the folder removes it: the run has
            // settled and its output is read.
            let bytes = match folder.read_output(max) {
                Ok(b) => Some(b),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => {
                    tracing::warn!(id = %ctx.id, error = %e, "cannot read the output file");
                    None
                }
            };
            let outcome = parse_output(bytes.as_deref(), max);
            drop(folder);
            outcome
        }
    };
    let _ = ctx.tx.send(Internal::Finished(Finished {
        id: ctx.id,
        gen: ctx.gen,
        status,
        status_lost,
        resources,
        output,
        streams: StreamStats {
            stdout_len: out.0,
            stdout_dropped: out.1,
            stderr_len: err.0,
            stderr_dropped: err.1,
        },
    }));
}

/// Where one captured stream goes.
struct Sink {
    store: Store,
    hub: Arc<Hub>,
    id: ProcessId,
    stream: Stream,
    cap: u64,
    service: Option<Arc<crate::service::Notifier>>,
    journal: Option<Journal>,
}

impl Sink {
    fn new(ctx: &RunContext, stream: Stream, journal: Option<Journal>) -> Sink {
        Sink {
            store: ctx.store.clone(),
            hub: ctx.hub.clone(),
            id: ctx.id,
            stream,
            cap: ctx.max_output_bytes,
            service: ctx.service.clone(),
            journal,
        }
    }
}

/// One non-blocking read(2) straight on the pipe. Not `try_read`: that
/// answers WouldBlock from tokio's readiness cache without asking the
/// kernel, and a fast process's last bytes would be lost when the reactor
/// has not reported them yet.
fn drain_read(pipe: &pipe::Receiver, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: read(2) into a valid buffer on an open, non-blocking fd.
    let n = unsafe { libc::read(pipe.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Bytes waiting in the pipe (FIONREAD); 0 when empty, closed or on error.
fn pending_bytes(pipe: &pipe::Receiver) -> usize {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int.
    if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut n) } != 0 {
        return 0;
    }
    n.max(0) as usize
}

/// Copies one pipe into the store until EOF, or until told to drain (then
/// it reads what is already buffered) or to park (then it stops after the
/// chunk it is storing and gives the pipe back). Every byte it reads is
/// stored (or counted as dropped) before it looks at its mode again, so a
/// parked pipe holds exactly what was not captured. Under a service
/// manager, bytes leave the pipe only into the run's journal
/// (`proc::journal`), so a crash loses none of them either.
async fn capture(
    sink: Sink,
    (mut kept, mut dropped): (u64, u64),
    pipe: Option<pipe::Receiver>,
    mut mode: watch::Receiver<Mode>,
) -> Captured {
    let Sink {
        store,
        hub,
        id,
        stream,
        cap,
        service,
        mut journal,
    } = sink;
    // What a journal handed back holds beyond what it knows stored goes
    // to the same stream offsets again (idempotent), then capture goes on.
    if let Some(j) = &mut journal {
        match j.pending() {
            Ok((at, mut bytes)) => {
                let room = cap.saturating_sub(at).min(bytes.len() as u64) as usize;
                if room > 0 {
                    bytes.truncate(room);
                    let mut b = Batch::buffered();
                    b.put_chunk(id, stream, at, bytes);
                    if let Err(e) = store.write(b).await {
                        tracing::warn!(%id, error = %e, "storing journaled output failed; bytes dropped");
                    }
                }
                kept = at + room as u64;
                let _ = j.mark_stored(room as u64);
                hub.output_changed(id);
            }
            Err(e) => tracing::warn!(%id, error = %e, "cannot read a capture journal"),
        }
    }
    // A stream that had ended before a handover: nothing more comes.
    let Some(pipe) = pipe else {
        return Captured {
            kept,
            dropped,
            pipe: None,
            journal,
        };
    };
    // Allocated when the first bytes arrive: most runs of a busy daemon
    // sit silent (a `sleep`), and two idle 64 KiB buffers per run would be
    // most of the daemon's memory per process.
    let mut buf: Vec<u8> = Vec::new();
    let mut stopping = false;
    loop {
        if !stopping {
            tokio::select! {
                r = pipe.readable() => if r.is_err() { break },
                _ = mode.changed() => {}
            }
            match *mode.borrow_and_update() {
                Mode::Run => {}
                Mode::Drain => stopping = true,
                Mode::Park => {
                    return Captured {
                        kept,
                        dropped,
                        pipe: Some(pipe),
                        journal,
                    }
                }
            }
        }
        if journal.is_none() && buf.is_empty() {
            if let Some(service) = &service {
                // The first bytes: a journal, parked before it takes any.
                journal = Journal::create(kept).ok().filter(|j| {
                    service
                        .store(&super::fdstore::journal_name(id, stream), j.fd())
                        .is_ok()
                });
            }
        }
        // The bytes taken in: read back from the journal (owned, stored as
        // they are) or read into `buf` (copied once, into the chunk stored).
        let chunk: Cow<'_, [u8]> = if let Some(j) = &mut journal {
            let taken = if stopping {
                use std::os::fd::AsFd;
                j.take_from(pipe.as_fd(), READ_BUF)
            } else {
                use std::os::fd::AsFd;
                pipe.try_io(|| j.take_from(pipe.as_fd(), READ_BUF))
            };
            match taken {
                Ok(0) => break,
                Ok(_) => match j.unstored() {
                    Ok(b) => Cow::Owned(b),
                    Err(_) => break,
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !stopping => continue,
                Err(_) => break,
            }
        } else {
            if buf.is_empty() {
                // A silent run's pipe is usually empty at the end: ask
                // before allocating a buffer only to read nothing.
                if stopping && pending_bytes(&pipe) == 0 {
                    break;
                }
                buf = vec![0u8; READ_BUF];
            }
            // While running, try_read (which clears tokio's readiness when
            // the pipe turns out empty); when draining, a real read(2).
            let read = if stopping {
                drain_read(&pipe, &mut buf)
            } else {
                pipe.try_read(&mut buf)
            };
            let n = match read {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && !stopping => continue,
                Err(_) => break, // drained (WouldBlock), or done
            };
            if n == 0 {
                break;
            }
            Cow::Borrowed(&buf[..n])
        };
        let n = chunk.len();
        let room = cap.saturating_sub(kept).min(n as u64) as usize;
        let mut stored = 0u64;
        if room > 0 {
            // Owned: stored as it is (cut to `room`); borrowed from `buf`:
            // what fits copied once.
            let bytes = match chunk {
                Cow::Owned(mut b) => {
                    b.truncate(room);
                    b
                }
                Cow::Borrowed(b) => b[..room].to_vec(),
            };
            let mut b = Batch::buffered();
            b.put_chunk(id, stream, kept, bytes);
            match store.write(b).await {
                Ok(()) => {
                    kept += room as u64;
                    stored = room as u64;
                    hub.output_changed(id);
                }
                // Not stored (full disk): counted as dropped, like bytes
                // past the cap.
                Err(e) => {
                    tracing::warn!(%id, error = %e, "storing output failed; bytes dropped");
                    dropped += room as u64;
                }
            }
        }
        dropped += (n - room) as u64;
        if let Some(j) = &mut journal {
            let _ = j.mark_stored(stored);
        }
    }
    Captured {
        kept,
        dropped,
        pipe: None,
        journal,
    }
}
