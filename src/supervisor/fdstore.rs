//! Runs parked in the service manager's file-descriptor store, so that they
//! outlive a crash of the daemon (systemd with `KillMode=process`): when a
//! run starts, its pidfd, the read ends of its output pipes and its folder
//! go into the store, each under its own name; when it settles, they are
//! taken out. A daemon restarted by the manager receives what is left
//! (`LISTEN_FDS`) and re-adopts those runs ([`adoption`]).
//!
//! Names: `run-<id>-pid`, `run-<id>-out`, `run-<id>-err`, `run-<id>-dir`,
//! and the capture journals `run-<id>-jout`, `run-<id>-jerr` (parked by the
//! capture when the first bytes arrive, see `proc::journal`).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

use tokio::net::unix::pipe;

use super::{Adoption, HandedRun};
use crate::model::{ProcessId, Stream};
use crate::proc::sandbox::{FolderHandle, RunFolder};
use crate::proc::{reexec, Leader};
use crate::service::Notifier;

const KINDS: [&str; 6] = ["pid", "out", "err", "dir", "jout", "jerr"];

/// The capacity asked for a parked run's pipes (the kernel's default
/// `fs.pipe-max-size`; root may get it beyond that).
const PARKED_PIPE_BYTES: i32 = 1 << 20;

fn name(id: ProcessId, kind: &str) -> String {
    format!("run-{}-{kind}", id.0)
}

/// The name a stream's capture journal is parked under.
pub(super) fn journal_name(id: ProcessId, stream: Stream) -> String {
    name(
        id,
        match stream {
            Stream::Stdout => "jout",
            Stream::Stderr => "jerr",
        },
    )
}

/// Parks a started run's descriptors: its pidfd, its output pipes (raised
/// to the largest capacity allowed: what the run writes while no daemon
/// reads waits there) and its folder (`dir`: a private one, level
/// `full`). A failure costs only the run's survival of a crash.
pub(super) fn park(
    notifier: &Notifier,
    id: ProcessId,
    leader: &Leader,
    [stdout, stderr]: [&pipe::Receiver; 2],
    folder: &RunFolder,
) {
    for pipe in [stdout.as_fd(), stderr.as_fd()] {
        let _ = reexec::raise_pipe_size(pipe, PARKED_PIPE_BYTES);
    }
    let fds = [
        Some(leader.pidfd()),
        Some(stdout.as_fd()),
        Some(stderr.as_fd()),
        folder.private_fd(),
    ];
    for (kind, fd) in KINDS[..4].iter().zip(fds) {
        if let Some(fd) = fd {
            if let Err(e) = notifier.store(&name(id, kind), fd) {
                tracing::warn!(%id, error = %e, "cannot park the run's descriptors in the service manager's store; it will not outlive a crash");
                return;
            }
        }
    }
}

/// Takes a settled run's descriptors out of the store.
pub(super) fn unpark(notifier: &Notifier, id: ProcessId) {
    for kind in KINDS {
        if let Err(e) = notifier.remove(&name(id, kind)) {
            tracing::warn!(%id, error = %e, "cannot take the run's descriptors out of the service manager's store");
            return;
        }
    }
}

/// The runs among the descriptors the manager passed at start (any other
/// descriptor is closed). Their leaders are not our children any more.
pub fn adoption(fds: Vec<(String, OwnedFd)>) -> Adoption {
    let mut by_run: BTreeMap<u64, [Option<OwnedFd>; 6]> = BTreeMap::new();
    for (n, fd) in fds {
        let parsed = n.strip_prefix("run-").and_then(|rest| {
            let (id, kind) = rest.split_once('-')?;
            Some((
                id.parse::<u64>().ok()?,
                KINDS.iter().position(|k| *k == kind)?,
            ))
        });
        match parsed {
            Some((id, k)) => by_run.entry(id).or_default()[k] = Some(fd),
            None => {
                tracing::warn!(name = %n, "closing a descriptor from the service manager's store that is not a run's")
            }
        }
    }
    let runs = by_run
        .into_iter()
        .filter_map(|(id, [pid, out, err, dir, jout, jerr])| {
            let Some(pidfd) = pid else {
                tracing::warn!(
                    id,
                    "a run's descriptors came back without its pidfd; not adopting it"
                );
                return None;
            };
            Some(HandedRun {
                id: ProcessId(id),
                // The record's: the leader may be gone (and reaped) by now.
                pid: None,
                pidfd,
                stdout: out,
                stderr: err,
                folder: dir.map(FolderHandle::Private),
                streams: None,
                signalled: Vec::new(),
                escaped: Vec::new(),
                journals: [jout, jerr],
            })
        })
        .collect();
    Adoption { runs, child: false }
}
