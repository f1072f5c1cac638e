//! The only module that talks to the kernel about processes: spawning a run
//! as the leader of a new process group, waiting for the leader without
//! reaping it, signalling the group, finding group members in /proc, and
//! proving a pid's identity after a restart.
//!
//! Pid-reuse safety rests on one rule: the leader of a run we started stays
//! unreaped (a zombie at worst) until its whole group is gone, so its pid,
//! which is also the group id, cannot be handed to another process while we
//! may still signal it. Exits are observed through a pidfd with `WNOWAIT`;
//! the reap happens once, explicitly, in [`Leader::reap`]. Orphans
//! reparented to the daemon are reaped by the main thread only
//! ([`OrphanReaper`]), whose `waitid(P_ALL)` is limited to that thread's
//! own children (`__WNOTHREAD`) and so never sees a leader, a child of the
//! spawner thread (handed-over leaders are protected by pid). Nothing waits
//! for any child of the whole process. It knows nothing of HTTP, JSON or
//! RocksDB.
//!
//! A run is tracked by a [`Scope`]: its own cgroup v2 when the host offers
//! one (every descendant, also escaped ones), else its process group plus
//! the daemon's child-subreaper status, which reparents orphaned
//! descendants to the daemon, where they are found by the
//! `CYRNEL_PROCESS_ID` tag in their environment.

pub mod cgroup;
pub mod journal;
pub mod reexec;
pub mod sandbox;
mod spawn;
pub mod usage;

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::OnceLock;

use nix::sys::signal::{killpg, Signal as NixSignal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

use crate::model::ProcIdentity;
use cgroup::{Joiner, RunCgroup};

/// FNV-1a (64 bits): a stable, dependency-free name for what belongs to
/// one data dir on the host (its cgroup folder, its `/dev/shm` folder, its
/// block of run uids).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `PIDFD_SIGNAL_PROCESS_GROUP` from linux/pidfd.h (Linux 6.9+).
const PIDFD_SIGNAL_PROCESS_GROUP: libc::c_uint = 1 << 2;

/// The signals the supervisor sends to a run; signal numbers and nix's
/// types stay inside `proc`. (SIGCONT follows every `Term` on its own.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Term,
    Kill,
}

impl Signal {
    fn number(self) -> i32 {
        match self {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        }
    }

    fn nix(self) -> NixSignal {
        match self {
            Signal::Term => NixSignal::SIGTERM,
            Signal::Kill => NixSignal::SIGKILL,
        }
    }
}

/// How the leader ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

/// What to run and how.
pub struct SpawnSpec<'a> {
    /// The staged code file.
    pub code_path: &'a Path,
    /// Execute `code_path` directly (it starts with `#!`) instead of passing
    /// it to `shell`.
    pub direct: bool,
    pub shell: &'a str,
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    /// Moves the child into its cgroup between clone and exec.
    pub cgroup: Option<&'a Joiner>,
    /// `(resource, limit)` pairs set with setrlimit before exec.
    pub rlimits: &'a [(Rlimit, u64)],
    /// Run as this uid/gid (supplementary groups dropped).
    pub credentials: Option<(u32, u32)>,
    /// The run's isolation steps.
    pub sandbox: &'a sandbox::Steps,
}

/// A resource limit of a child.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rlimit {
    OpenFiles,
    Processes,
    CoreSize,
    AddressSpace,
    CpuSeconds,
}

impl Rlimit {
    fn resource(self) -> libc::__rlimit_resource_t {
        match self {
            Rlimit::OpenFiles => libc::RLIMIT_NOFILE,
            Rlimit::Processes => libc::RLIMIT_NPROC,
            Rlimit::CoreSize => libc::RLIMIT_CORE,
            Rlimit::AddressSpace => libc::RLIMIT_AS,
            Rlimit::CpuSeconds => libc::RLIMIT_CPU,
        }
    }
}

/// The daemon's effective uid.
pub fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Raises the daemon's own open-file limit to its hard limit (a supervisor
/// holds a few descriptors per run and per connection). Returns the soft
/// limit it had, which children get back unless configured otherwise.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(soft)
}

/// Resolves a user (name or number) and group (name, number, or the
/// user's primary group) to ids.
pub fn resolve_credentials(user: &str, group: Option<&str>) -> Result<(u32, u32), String> {
    use nix::unistd::{Group, User};
    let u = match user.parse::<u32>() {
        Ok(uid) => User::from_uid(uid.into()).ok().flatten(),
        Err(_) => User::from_name(user).ok().flatten(),
    };
    let (uid, primary) = match (u, user.parse::<u32>()) {
        (Some(u), _) => (u.uid.as_raw(), u.gid.as_raw()),
        (None, Ok(uid)) if group.is_some() => (uid, 0),
        (None, _) => return Err(format!("no such user {user:?}")),
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(g)
                .ok()
                .flatten()
                .map(|g| g.gid.as_raw())
                .ok_or_else(|| format!("no such group {g:?}"))?,
        },
    };
    Ok((uid, gid))
}

/// A started run: the unreaped leader and its two output pipes.
pub struct Spawned {
    pub leader: Leader,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
    pub identity: ProcIdentity,
}

/// The leader of a run's process group, held through a pidfd and never
/// reaped until [`Leader::reap`].
pub struct Leader {
    pid: i32,
    pidfd: AsyncFd<OwnedFd>,
    /// Whether it is our child. A leader re-adopted after a crash of the
    /// daemon is not (init or a subreaper reaped it): its exit status comes
    /// from the pidfd (`PIDFD_INFO_EXIT`) and nothing of it is ours to reap.
    child: bool,
}

pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Spawned> {
    let code = spec.code_path.as_os_str();
    let (program, args): (&Path, &[&OsStr]) = if spec.direct {
        (spec.code_path, &[])
    } else {
        (Path::new(spec.shell), std::slice::from_ref(&code))
    };
    let rlimits: Vec<(libc::__rlimit_resource_t, libc::rlim_t)> = spec
        .rlimits
        .iter()
        .map(|(r, v)| (r.resource(), *v as libc::rlim_t))
        .collect();
    let child = spawn::spawn(&spawn::Exec {
        program,
        args,
        env: spec.env,
        cwd: spec.cwd,
        cgroup: spec.cgroup.map(Joiner::raw_fd),
        into_cgroup: spec.cgroup.is_some_and(Joiner::create_in),
        rlimits: &rlimits,
        credentials: spec.credentials,
        sandbox: spec.sandbox,
    })?;
    let pid = child.pid;
    let identity = ProcIdentity {
        pid,
        start_time: child
            .start_time
            .or_else(|| stat(pid).map(|s| s.start_time))
            .unwrap_or(0),
        boot_id: boot_id().to_string(),
    };
    let pidfd = register_pidfd(child.pidfd)?;
    Ok(Spawned {
        leader: Leader {
            pid,
            pidfd,
            child: true,
        },
        stdout: pipe_receiver(child.stdout)?,
        stderr: pipe_receiver(child.stderr)?,
        identity,
    })
}

/// A pidfd registered with the runtime: readable once its process exits.
fn register_pidfd(pidfd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd takes ownership of the OwnedFd, which stays open
    // and refers to the same pidfd until the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// The read end of a child's output pipe (a fresh `pipe2` end, blocking,
/// read-only), made non-blocking for the runtime. What
/// `pipe::Receiver::from_owned_fd` would check (a pipe, readable) holds by
/// construction; it costs three system calls per pipe, this one.
fn pipe_receiver(fd: OwnedFd) -> io::Result<pipe::Receiver> {
    // SAFETY: fcntl on a descriptor we own; a fresh pipe end has no other
    // status flag that F_SETFL would clear.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) } != 0 {
        return Err(io::Error::last_os_error());
    }
    pipe::Receiver::from_owned_fd_unchecked(fd)
}

/// Raises the calling thread's priority for spawning runs, where the
/// daemon may (`spawn::prioritize_this_thread`).
pub fn prioritize_spawner() {
    if spawn::prioritize_this_thread() {
        tracing::debug!("the spawner thread runs at a raised priority");
    }
}

/// Dedicates the calling thread to spawning runs: it takes the seccomp
/// filter's first stage at its first sandboxed spawn, so that each child
/// installs only the second (`sandbox::Seccomp`), and its children share
/// the descriptor table, copying only its lowest slots. Call it only on
/// threads that do nothing else (the starter's spawner; see `spawn.rs`),
/// early.
pub fn dedicate_spawner_thread() {
    spawn::dedicate_this_thread();
}

/// Start-up: runs `shell <folder>/code` with `prepared`'s isolation and
/// waits for it; returns its exit code (`None`: killed by a signal).
pub fn probe_spawn(
    shell: &str,
    prepared: &sandbox::Prepared,
    credentials: Option<(u32, u32)>,
) -> io::Result<Option<i32>> {
    let code = prepared.cwd.join("code");
    let args = [code.as_os_str()];
    let child = spawn::spawn(&spawn::Exec {
        program: Path::new(shell),
        args: &args,
        env: &[],
        cwd: &prepared.cwd,
        cgroup: None,
        into_cgroup: false,
        rlimits: &[],
        credentials,
        sandbox: &prepared.steps,
    })?;
    let (code, status) = child.wait()?;
    Ok((code == libc::CLD_EXITED).then_some(status))
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes two integers and touches no memory of
    // ours; on success it returns a new descriptor (O_CLOEXEC is implied).
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel, is open, and nothing
    // else owns or closes it: the OwnedFd becomes its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_send_signal(pidfd: &OwnedFd, sig: i32, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a descriptor kept open by the
    // borrowed OwnedFd for the whole call, and a null siginfo pointer,
    // which the kernel reads as "no siginfo" (it reads no memory of ours).
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            flags,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// What the kernel accounted to an exited leader: its own use and that of
/// the children it waited for (`RUSAGE_BOTH`, as `wait4` reports it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rusage {
    pub user_us: u64,
    pub system_us: u64,
    /// The largest resident set among them (not a sum).
    pub max_rss_bytes: u64,
}

impl Rusage {
    fn from_raw(ru: &libc::rusage) -> Rusage {
        let us = |t: libc::timeval| (t.tv_sec.max(0) as u64) * 1_000_000 + t.tv_usec.max(0) as u64;
        Rusage {
            user_us: us(ru.ru_utime),
            system_us: us(ru.ru_stime),
            max_rss_bytes: (ru.ru_maxrss.max(0) as u64) * 1024,
        }
    }
}

/// waitid(P_PIDFD) on our own child (`__WALL`: a leader has no exit signal
/// until its own exec).
/// Through the raw system call, whose fifth argument (which glibc's
/// wrapper hides) returns the child's resource usage, also with `WNOWAIT`.
fn waitid_pidfd(pidfd: &OwnedFd, flags: libc::c_int) -> io::Result<Option<(ExitStatus, Rusage)>> {
    // SAFETY: siginfo_t is a C struct of integers and a union of
    // integers and pointers, for which all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: rusage is a C struct of integers and timevals: all-zero
    // bytes are a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `info` and `ru` are valid, writable locals that outlive the
    // call; the pidfd stays open for the call (borrowed OwnedFd).
    let r = unsafe {
        libc::syscall(
            libc::SYS_waitid,
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info as *mut libc::siginfo_t,
            flags | libc::WEXITED | libc::WNOHANG | libc::__WALL,
            &mut ru as *mut libc::rusage,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded, so `info` holds either the SIGCHLD layout
    // of the union the kernel filled in or, with WNOHANG and nothing
    // exited, still our zero bytes (si_pid 0); both are valid to read.
    let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
    if pid == 0 {
        return Ok(None);
    }
    let status = match info.si_code {
        libc::CLD_EXITED => ExitStatus::Code(status),
        _ => ExitStatus::Signal(status),
    };
    Ok(Some((status, Rusage::from_raw(&ru))))
}

impl Leader {
    /// A leader handed over by an earlier image of the daemon (`child`:
    /// the same process after `execve`, so still its parent) or parked in
    /// the service manager's fd store across a crash (not our child).
    /// Call from within the runtime.
    pub fn adopt(pidfd: OwnedFd, pid: i32, child: bool) -> io::Result<Leader> {
        Ok(Leader {
            pid,
            pidfd: register_pidfd(pidfd)?,
            child,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The pidfd, to park a copy of it (the service manager's store).
    pub fn pidfd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.pidfd.get_ref().as_fd()
    }

    /// Whether the daemon is the leader's parent (see [`Leader::adopt`]).
    pub fn is_child(&self) -> bool {
        self.child
    }

    /// The pidfd, to hand it over; the leader stays unreaped.
    pub fn into_pidfd(self) -> OwnedFd {
        self.pidfd.into_inner()
    }

    /// Waits until the leader has exited, without reaping it; returns its
    /// status and, for our own child, what it (with the children it waited
    /// for) used. Not our child: the status comes from the pidfd once the
    /// leader is reaped (Linux 6.15); an error of kind `Unsupported` means
    /// the kernel cannot say.
    pub async fn exited(&self) -> io::Result<(ExitStatus, Option<Rusage>)> {
        // Not our child: the pidfd turns readable when the leader exits,
        // and its exit information appears when whoever is its parent now
        // reaps it; until then it is looked at again with a backoff.
        let mut reap_wait = std::time::Duration::from_millis(1);
        loop {
            let mut guard = self.pidfd.readable().await?;
            if self.child {
                if let Some((status, usage)) = waitid_pidfd(self.pidfd.get_ref(), libc::WNOWAIT)? {
                    return Ok((status, Some(usage)));
                }
            } else {
                match pidfd_exit_info(self.pidfd.get_ref())? {
                    ExitInfo::Exited(status) => return Ok((status, None)),
                    ExitInfo::Unknown => {
                        return Err(io::Error::new(
                            io::ErrorKind::Unsupported,
                            "the kernel does not report the exit status of a process that is not our child",
                        ))
                    }
                    // Exited (the pidfd is readable), not reaped yet.
                    ExitInfo::NotYet => {
                        drop(guard);
                        tokio::time::sleep(reap_wait).await;
                        reap_wait = (reap_wait * 2).min(std::time::Duration::from_millis(100));
                        continue;
                    }
                }
            }
            guard.clear_ready();
        }
    }

    /// Reaps the leader. Call only once the group is empty and will not be
    /// signalled again. A leader that is not our child is left alone.
    pub fn reap(&self) -> io::Result<Option<ExitStatus>> {
        if !self.child {
            return Ok(None);
        }
        let reaped = waitid_pidfd(self.pidfd.get_ref(), 0)?.map(|(status, _)| status);
        unprotect_leader(self.pid);
        Ok(reaped)
    }
}

/// What a pidfd says of its process's end.
enum ExitInfo {
    Exited(ExitStatus),
    NotYet,
    /// The kernel keeps no exit information (before Linux 6.15), or the
    /// process was reaped without it being recorded.
    Unknown,
}

/// `PIDFD_GET_INFO` with `PIDFD_INFO_EXIT` (Linux 6.15): the exit status of
/// any process a pidfd refers to, available once it has been reaped.
fn pidfd_exit_info(pidfd: &OwnedFd) -> io::Result<ExitInfo> {
    // SAFETY: pidfd_info is a C struct of integers: all-zero bytes are a
    // valid value.
    let mut info: libc::pidfd_info = unsafe { std::mem::zeroed() };
    info.mask = u64::from(libc::PIDFD_INFO_EXIT);
    // SAFETY: PIDFD_GET_INFO writes at most size_of::<pidfd_info>() bytes
    // (the size is encoded in the request) into our valid local.
    let r = unsafe { libc::ioctl(pidfd.as_raw_fd(), libc::PIDFD_GET_INFO, &mut info) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // Reaped, and this kernel keeps nothing of it.
            Some(libc::ESRCH) => Ok(ExitInfo::Unknown),
            // No PIDFD_GET_INFO at all (before Linux 6.13).
            Some(libc::ENOTTY | libc::EINVAL) => Ok(ExitInfo::Unknown),
            _ => Err(e),
        };
    }
    if info.mask & u64::from(libc::PIDFD_INFO_EXIT) == 0 {
        return Ok(ExitInfo::NotYet);
    }
    let status = info.exit_code;
    Ok(ExitInfo::Exited(if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    }))
}

/// The fields of /proc/<pid>/stat we use.
#[derive(Clone, Copy, Debug)]
pub struct Stat {
    pub state: u8,
    pub ppid: i32,
    pub pgrp: i32,
    pub start_time: u64,
}

pub fn stat(pid: i32) -> Option<Stat> {
    let s = fs::read(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&s)
}

fn parse_stat(s: &[u8]) -> Option<Stat> {
    // The command name (field 2) may contain spaces and parentheses; every
    // later field starts after the last ')'.
    let close = s.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&s[close + 1..]).ok()?;
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.as_bytes()[0];
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    // starttime is field 22; we are at field 6 now.
    let start_time = f.nth(16)?.parse().ok()?;
    Some(Stat {
        state,
        ppid,
        pgrp,
        start_time,
    })
}

fn live(s: &Stat) -> bool {
    s.state != b'Z' && s.state != b'X'
}

fn all_pids() -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .collect()
}

/// Makes the daemon the reaper of orphaned descendants (PR_SET_CHILD_SUBREAPER):
/// a process that escapes its run's group is reparented here instead of to
/// init, so it can still be found and killed.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)?;
    Ok(())
}

/// Whether `pid`'s environment carries `CYRNEL_PROCESS_ID=<tag>`.
fn has_tag(pid: i32, tag: &str) -> bool {
    let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let want = format!("CYRNEL_PROCESS_ID={tag}");
    env.split(|b| *b == 0).any(|kv| kv == want.as_bytes())
}

/// Live children of this daemon (reparented orphans included) tagged with
/// run `tag`, excluding `leader`.
fn tagged_strays(tag: &str, leader: i32) -> Vec<i32> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&pid| pid != leader)
        .filter(|&pid| stat(pid).is_some_and(|s| s.ppid == me && live(&s)))
        .filter(|&pid| has_tag(pid, tag))
        .collect()
}

/// The uid a process runs as (the owner of its `/proc` entry).
fn uid_of(pid: i32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(format!("/proc/{pid}")).ok().map(|m| m.uid())
}

/// Live processes running as `uid`.
fn processes_of_uid(uid: u32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| uid_of(pid) == Some(uid))
        .filter(|&pid| stat(pid).is_some_and(|s| live(&s)))
        .collect()
}

/// Reaps the orphans reparented to the daemon (it is a child subreaper),
/// and nothing else. The kernel hands an orphan to the first live thread of
/// its new parent, the main thread, while a run's leader is a child of the
/// thread that spawned it. So the main thread waits for its own children
/// only (`__WNOTHREAD`): every orphan, never a leader, which the supervisor
/// keeps unreaped until its run is empty. The main thread must therefore
/// never spawn a run.
///
/// SIGCHLD is blocked in every thread (the mask is set here, before any
/// other thread exists, and inherited); the main thread takes it with
/// `sigwait`. Leaders are cloned without an exit signal, but their own
/// `execve` sets it to SIGCHLD (the kernel does so for every exec), so
/// what keeps this `waitid` off them is `__WNOTHREAD`: a leader is a child
/// of the spawner thread. After a handover the handed-over leaders are
/// children of the main thread; they are protected by pid
/// ([`protect_leaders`]) until the supervisor reaps them.
pub struct OrphanReaper {
    main: libc::pthread_t,
    done: std::sync::atomic::AtomicBool,
}

impl OrphanReaper {
    /// Call first thing on the main thread, before any other thread starts.
    pub fn install() -> io::Result<OrphanReaper> {
        // gettid == getpid only on the main thread.
        if nix::unistd::gettid() != nix::unistd::getpid() {
            return Err(io::Error::other(
                "the orphan reaper must run on the main thread",
            ));
        }
        // Blocks SIGCHLD in this thread; threads created later inherit the
        // mask. Children get an empty mask (spawn.rs).
        sigchld_set().thread_block()?;
        Ok(OrphanReaper {
            // SAFETY: pthread_self has no preconditions and cannot fail; it
            // returns the calling (main) thread's own handle.
            main: unsafe { libc::pthread_self() },
            done: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reaps orphans until [`OrphanReaper::stop`] is called. Run it on the
    /// main thread.
    pub fn run(&self) {
        let set = sigchld_set();
        loop {
            reap_own_children();
            if self.done.load(std::sync::atomic::Ordering::Acquire) {
                // The last ones, reparented while the daemon stopped.
                reap_own_children();
                return;
            }
            // Waits for the blocked SIGCHLD; any outcome means: look again.
            let _ = set.wait();
        }
    }

    /// Makes [`OrphanReaper::run`] return (from any thread).
    pub fn stop(&self) {
        self.done.store(true, std::sync::atomic::Ordering::Release);
        // SAFETY: `self.main` is the main thread's handle (`install`
        // checked that it ran there). The main thread ends only with the
        // process, so the handle names a live thread (pthread_kill on the
        // handle of a thread that has ended would be undefined).
        unsafe { libc::pthread_kill(self.main, libc::SIGCHLD) };
    }
}

fn sigchld_set() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(NixSignal::SIGCHLD);
    set
}

/// Reaps every exited child of the calling thread; returns how many.
fn reap_own_children() -> usize {
    {
        let protected = PROTECTED_LEADERS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !protected.is_empty() {
            return reap_own_children_but(&protected);
        }
    }
    let mut n = 0;
    loop {
        // SAFETY: siginfo_t is a C struct of integers and a union of
        // integers and pointers, for which all-zero bytes are a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::__WNOTHREAD;
        // SAFETY: `info` is a valid, writable siginfo_t that outlives the
        // call; P_ALL takes no id.
        if unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) } != 0 {
            return n; // ECHILD: this thread has no children
        }
        // SAFETY: waitid succeeded, so `info` holds the SIGCHLD layout the
        // kernel filled in or, with WNOHANG and no child exited, still our
        // zero bytes (si_pid 0); both are valid to read.
        if unsafe { info.si_pid() } == 0 {
            return n;
        }
        n += 1;
    }
}

/// Leaders handed over by a previous image of the daemon: after `execve`
/// they are children of the main thread (every thread but the one that
/// executed is gone, and its children went to that one), which must never
/// reap them. Held from `protect_leaders` until the supervisor reaps them.
static PROTECTED_LEADERS: std::sync::Mutex<std::collections::BTreeSet<i32>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Keeps the orphan reaper away from these handed-over leaders. Call
/// before [`OrphanReaper::run`].
pub fn protect_leaders(pids: impl IntoIterator<Item = i32>) {
    PROTECTED_LEADERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .extend(pids);
}

fn unprotect_leader(pid: i32) {
    PROTECTED_LEADERS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&pid);
}

/// The main thread's children one by one (from /proc), all but
/// `protected`: while handed-over leaders are its children too.
fn reap_own_children_but(protected: &std::collections::BTreeSet<i32>) -> usize {
    let tid = nix::unistd::gettid().as_raw();
    let Ok(list) = fs::read_to_string(format!("/proc/self/task/{tid}/children")) else {
        return 0;
    };
    let mut n = 0;
    for pid in list
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        if protected.contains(&pid) {
            continue;
        }
        // SAFETY: as in `reap_own_children`, for one pid.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::__WNOTHREAD;
        // SAFETY: `info` is a valid, writable siginfo_t that outlives the
        // call.
        if unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, flags) } == 0
            // SAFETY: filled by waitid (or still zero bytes).
            && unsafe { info.si_pid() } != 0
        {
            n += 1;
        }
    }
    n
}

/// Signals `pid` only if, after pinning it with a pidfd, `still_ours` holds;
/// with `then_cont`, SIGCONT follows through the same pidfd.
fn signal_pinned(pid: i32, sig: Signal, then_cont: bool, still_ours: impl Fn(i32) -> bool) -> bool {
    let Ok(fd) = pidfd_open(pid) else {
        return false;
    };
    let sent = still_ours(pid) && pidfd_send_signal(&fd, sig.number(), 0).is_ok();
    if sent && then_cont {
        let _ = pidfd_send_signal(&fd, libc::SIGCONT, 0);
    }
    sent
}

/// How a run's processes are tracked.
#[derive(Clone, Debug)]
pub enum Scope {
    /// Its own cgroup: every descendant.
    Cgroup(RunCgroup),
    /// Its process group, plus tagged orphans reparented to the daemon.
    Group,
}

/// Who a signal reached.
#[derive(Debug, Default)]
pub struct Signalled {
    /// Every process signalled.
    pub pids: Vec<i32>,
    /// Those outside the leader's process group.
    pub escaped: Vec<i32>,
}

/// A run as the kernel sees it: its leader's pid (= process group id), its
/// tag, and its scope.
#[derive(Clone, Debug)]
pub struct Tracked {
    pub pgid: i32,
    pub tag: String,
    /// A uid no other run has (level `full`): without a cgroup, every live
    /// process with it belongs to the run, wherever it went and whatever
    /// environment it gave itself.
    pub uid: Option<u32>,
    pub scope: Scope,
}

impl Tracked {
    /// What the run's cgroup accounted (`None` without one).
    pub fn cgroup_usage(&self) -> Option<cgroup::CgroupUsage> {
        match &self.scope {
            Scope::Cgroup(cg) => cg.usage(),
            Scope::Group => None,
        }
    }

    /// Live processes of the run other than the leader.
    pub fn others(&self) -> Vec<i32> {
        match &self.scope {
            Scope::Cgroup(cg) => cg
                .members()
                .into_iter()
                .filter(|&p| p != self.pgid)
                .collect(),
            Scope::Group => {
                let mut v: Vec<i32> = group_members(self.pgid)
                    .into_iter()
                    .filter(|&p| p != self.pgid)
                    .collect();
                v.extend(tagged_strays(&self.tag, self.pgid));
                if let Some(uid) = self.uid {
                    v.extend(
                        processes_of_uid(uid)
                            .into_iter()
                            .filter(|&p| p != self.pgid),
                    );
                }
                v.sort_unstable();
                v.dedup();
                v
            }
        }
    }

    /// Whether nothing but (at most) the zombie leader is left.
    pub fn only_leader_left(&self) -> bool {
        match &self.scope {
            // A zombie is no longer a member: populated 0 once the leader
            // has exited and every descendant is gone.
            Scope::Cgroup(cg) => !cg.populated() || cg.members().iter().all(|&p| p == self.pgid),
            Scope::Group => self.others().is_empty(),
        }
    }

    /// Waits until [`Tracked::only_leader_left`] holds: woken by the
    /// kernel through `cgroup.events` with a cgroup, else by polling `/proc`
    /// with a backoff from 1 to 100 ms. Most runs return at the first
    /// check, right after their leader's exit.
    pub async fn wait_only_leader_left(&self) {
        if self.only_leader_left() {
            return;
        }
        if let Scope::Cgroup(cg) = &self.scope {
            match self.wait_cgroup_empty(cg).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(cgroup = %cg.path().display(), error = %e, "cannot watch cgroup.events; polling");
                }
            }
        }
        poll_until(|| self.only_leader_left()).await;
    }

    /// Waits for `populated 0` (or only the zombie leader listed) through
    /// the change notification of `cgroup.events`. The kernel sends at most
    /// one notification per cgroup file every 10 ms and delays the next one
    /// until then; a run killed right after it started would wait for that.
    /// So the first 15 ms also look at the file after 1, 2, 4 and 8 ms.
    async fn wait_cgroup_empty(&self, cg: &RunCgroup) -> io::Result<()> {
        let events = cg.events_file()?;
        let mut early = Some(std::time::Duration::from_millis(1));
        while events.populated()? && !cg.members().iter().all(|&p| p == self.pgid) {
            match early {
                Some(delay) => {
                    tokio::select! {
                        r = events.changed() => r?,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    early = Some(delay * 2).filter(|d| d.as_millis() <= 8);
                }
                None => events.changed().await?,
            }
        }
        Ok(())
    }

    /// Sends `sig` to every process of the run. The group goes through
    /// `killpg` (the caller guarantees the leader is unreaped, so the group
    /// id is not recycled); processes outside the group are pinned with a
    /// pidfd and re-checked (still in the cgroup, or still tagged) first.
    /// SIGKILL to a cgroup uses `cgroup.kill`, which also catches forks in
    /// flight.
    pub fn signal(&self, sig: Signal) -> io::Result<Signalled> {
        let mut out = Signalled::default();
        // With a cgroup its member list is the whole run, and only those few
        // pids need a look in /proc; without one, the group and the tagged
        // strays are found by walking /proc.
        let (group, everyone): (HashSet<i32>, Vec<i32>) = match &self.scope {
            Scope::Cgroup(cg) => {
                let members = cg.members();
                let group = members
                    .iter()
                    .copied()
                    .filter(|&p| stat(p).is_some_and(|s| s.pgrp == self.pgid))
                    .collect();
                (group, members)
            }
            Scope::Group => {
                let group: HashSet<i32> = group_members(self.pgid).into_iter().collect();
                let mut v: Vec<i32> = group.iter().copied().collect();
                v.extend(tagged_strays(&self.tag, self.pgid));
                if let Some(uid) = self.uid {
                    v.extend(
                        processes_of_uid(uid)
                            .into_iter()
                            .filter(|p| !group.contains(p)),
                    );
                }
                v.sort_unstable();
                v.dedup();
                (group, v)
            }
        };
        // A stopped process cannot act on SIGTERM until it is continued:
        // every SIGTERM is followed by SIGCONT to the same processes, as
        // systemd does.
        let cont = sig == Signal::Term;
        let group_result = killpg(Pid::from_raw(self.pgid), sig.nix()).map_err(io::Error::from);
        if cont {
            let _ = killpg(Pid::from_raw(self.pgid), NixSignal::SIGCONT);
        }
        for pid in everyone {
            if group.contains(&pid) {
                out.pids.push(pid);
                continue;
            }
            out.escaped.push(pid);
            let sent = match &self.scope {
                // cgroup.kill below reaches it.
                Scope::Cgroup(_) if sig == Signal::Kill => true,
                Scope::Cgroup(cg) => signal_pinned(pid, sig, cont, |p| cg.contains(p)),
                Scope::Group => signal_pinned(pid, sig, cont, |p| {
                    has_tag(p, &self.tag) || self.uid.is_some_and(|u| uid_of(p) == Some(u))
                }),
            };
            if sent {
                out.pids.push(pid);
            }
        }
        if let (Scope::Cgroup(cg), Signal::Kill) = (&self.scope, sig) {
            if let Err(e) = cg.kill() {
                tracing::warn!(cgroup = %cg.path().display(), error = %e, "cgroup.kill failed");
            }
        }
        match group_result {
            // ESRCH: nothing left in the group (the leader is reaped only
            // later, so this means the group id itself is gone).
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(out),
            Err(e) if out.pids.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    /// Removes what the run left in the kernel (its cgroup).
    pub fn cleanup(&self) {
        if let Scope::Cgroup(cg) = &self.scope {
            cg.remove();
        }
    }
}

/// Polls `done` with exponential backoff (1 ms to 100 ms) until it holds.
pub async fn poll_until(mut done: impl FnMut() -> bool) {
    let mut delay = std::time::Duration::from_millis(1);
    while !done() {
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_millis(100));
    }
}

/// Live (not zombie, not dead) processes whose process group is `pgid`.
pub fn group_members(pgid: i32) -> Vec<i32> {
    group_members_since(pgid, 0)
}

fn group_members_since(pgid: i32, min_start: u64) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            stat(pid).is_some_and(|s| s.pgrp == pgid && live(&s) && s.start_time >= min_start)
        })
        .collect()
}

/// The kernel's boot id; with pid and start time it identifies a process
/// across daemon restarts.
pub fn boot_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
}

/// After a restart: the processes still alive in the group of a run we
/// started before, proven ours by boot id, group id and a start time no
/// earlier than the leader's (a process joins a group only after its leader
/// exists).
pub fn orphan_members(id: &ProcIdentity) -> Vec<i32> {
    if id.boot_id != boot_id() {
        return Vec::new();
    }
    group_members_since(id.pid, id.start_time)
}

/// Signals the orphaned members of a run we started before a restart. Each
/// target is pinned with a pidfd and its identity re-checked through it
/// before the signal, so a pid reused in between is never hit. Returns how
/// many processes were signalled.
pub fn signal_orphans(id: &ProcIdentity, sig: Signal) -> usize {
    let mut n = 0;
    for pid in orphan_members(id) {
        let Ok(fd) = pidfd_open(pid) else { continue };
        let still_ours =
            stat(pid).is_some_and(|s| s.pgrp == id.pid && s.start_time >= id.start_time);
        if still_ours && pidfd_send_signal(&fd, sig.number(), 0).is_ok() {
            if sig == Signal::Term {
                let _ = pidfd_send_signal(&fd, libc::SIGCONT, 0);
            }
            n += 1;
        }
    }
    n
}

/// Signals a whole group through its leader's pidfd when the leader still
/// exists and is provably the one we started (Linux 6.9+). Used by recovery
/// before falling back to per-member signals.
pub fn signal_orphan_group(id: &ProcIdentity, sig: Signal) -> bool {
    if id.boot_id != boot_id() {
        return false;
    }
    let Ok(fd) = pidfd_open(id.pid) else {
        return false;
    };
    let same = stat(id.pid).is_some_and(|s| s.start_time == id.start_time);
    let sent = same && pidfd_send_signal(&fd, sig.number(), PIDFD_SIGNAL_PROCESS_GROUP).is_ok();
    if sent && sig == Signal::Term {
        let _ = pidfd_send_signal(&fd, libc::SIGCONT, PIDFD_SIGNAL_PROCESS_GROUP);
    }
    sent
}

/// After a restart: live processes started by a daemon on this data dir
/// (their `CYRNEL_OUTPUT` lies under `run_dir`), with the run id they carry.
/// This finds a run spawned just before a crash whose `running` transition
/// never became durable: its record still says queued.
pub fn processes_of_run_dir(run_dir: &Path) -> Vec<(i32, u64)> {
    let prefix = format!("CYRNEL_OUTPUT={}/", run_dir.display());
    all_pids()
        .into_iter()
        .filter(|&pid| stat(pid).is_some_and(|s| live(&s)))
        .filter_map(|pid| {
            let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
            let id = env.split(|b| *b == 0).find_map(|kv| {
                let rest = kv.strip_prefix(prefix.as_bytes())?;
                std::str::from_utf8(rest)
                    .ok()?
                    .strip_suffix("/output")?
                    .parse::<u64>()
                    .ok()
            })?;
            Some((pid, id))
        })
        .collect()
}

/// After a restart at level `full`: SIGKILLs every process whose uid is
/// in `base .. base + count` but not in `tracked` (a run spawned just
/// before a crash whose `running` transition never became durable). Each
/// is pinned with a pidfd and its uid re-checked first. Returns the pids.
pub fn kill_uid_range(base: u32, count: u32, tracked: &HashSet<u32>) -> Vec<i32> {
    let ours = |uid: u32| uid >= base && uid - base < count && !tracked.contains(&uid);
    all_pids()
        .into_iter()
        .filter(|&pid| uid_of(pid).is_some_and(ours))
        .filter(|&pid| signal_pinned(pid, Signal::Kill, false, |p| uid_of(p).is_some_and(ours)))
        .collect()
}

/// SIGKILLs `pid` if, pinned by a pidfd, it still carries `CYRNEL_OUTPUT`
/// of run `id` under `run_dir`.
pub fn kill_untracked(pid: i32, run_dir: &Path, id: u64) -> bool {
    let want = format!("CYRNEL_OUTPUT={}/{id}/output", run_dir.display());
    signal_pinned(pid, Signal::Kill, false, |p| {
        fs::read(format!("/proc/{p}/environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
    })
}

/// After a restart: whether anything of a run from before is still alive.
/// With a cgroup, its membership decides; otherwise the recorded identity.
pub fn orphan_alive(identity: Option<&ProcIdentity>, cg: Option<&RunCgroup>) -> bool {
    cg.is_some_and(|cg| cg.populated()) || identity.is_some_and(|id| !orphan_members(id).is_empty())
}

/// After a restart: signals what is left of a run from before. Never
/// `killpg`: the leader is not our child any more and its group id may be
/// recycled. Cgroup members are pinned with a pidfd and re-checked to be in
/// the cgroup; SIGKILL uses `cgroup.kill`. Without a cgroup, the identity
/// check decides (see [`signal_orphans`]). Returns the pids signalled.
pub fn signal_orphan_run(
    identity: Option<&ProcIdentity>,
    cg: Option<&RunCgroup>,
    sig: Signal,
) -> Vec<i32> {
    let mut out = Vec::new();
    if let Some(cg) = cg.filter(|cg| cg.exists()) {
        let members = cg.members();
        if sig == Signal::Kill {
            if let Err(e) = cg.kill() {
                tracing::warn!(cgroup = %cg.path().display(), error = %e, "cgroup.kill failed");
            }
            out.extend(members);
        } else {
            out.extend(
                members
                    .into_iter()
                    .filter(|&p| signal_pinned(p, sig, sig == Signal::Term, |q| cg.contains(q))),
            );
        }
    }
    if let Some(id) = identity {
        if !signal_orphan_group(id, sig) {
            signal_orphans(id, sig);
        }
        out.extend(orphan_members(id));
    }
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_hostile_comm() {
        let line = b"4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 100 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(s.state, b'S');
        assert_eq!(s.pgrp, 4242);
        assert_eq!(s.start_time, 123456);
    }

    #[test]
    fn own_stat_is_readable() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert!(s.start_time > 0);
        assert!(!boot_id().is_empty());
    }
}
