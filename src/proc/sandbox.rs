//! Run isolation: what the daemon can take away from posted code, decided
//! once at start-up ([`Policy::detect`]) and prepared per run
//! ([`Policy::prepare`]) for the child to apply between clone and exec
//! (`spawn.rs`). Posted code is untrusted: a run must not be able to touch
//! the daemon, its data, its secrets or another run.
//!
//! Levels (ARCHITECTURE.md, "Isolation"):
//! - `full` (the daemon holds the capabilities listed in [`FULL_CAPS`]): a
//!   uid of its own per run, its own mount and IPC namespaces (the host
//!   read-only, the data dir, config file and key file masked, a private
//!   size-capped tmpfs as `/tmp` and `/dev/shm` that holds the run's
//!   folder, a `/proc` that shows only its own processes), no capability
//!   in any set, `no_new_privs`, then Landlock and seccomp as a second
//!   wall. `options.network: false` adds a network namespace with only
//!   loopback.
//! - `landlock` (an unprivileged daemon): Landlock file rules (read-only
//!   host minus the daemon's paths, writes only in the run's folder on a
//!   tmpfs), signal and abstract-socket scoping, ptrace confinement,
//!   seccomp (also denying SysV IPC, which cannot be private here),
//!   `no_new_privs`. `network: false` denies IP sockets.
//! - `none`: nothing (`sandbox = "off"`, or neither is available).
//!
//! No PID namespace: its init semantics would change how a run is killed.
//! This module makes the system calls of the parent side; it knows nothing
//! of records, HTTP or RocksDB.

use std::ffi::{CStr, CString};
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::SandboxLevel;

/// Capabilities (bit numbers from linux/capability.h) that level `full`
/// needs in the daemon's effective set: namespaces and mounts
/// (SYS_ADMIN), a uid per run (SETUID, SETGID), emptying the children's
/// bounding set (SETPCAP), handing the run its folder (CHOWN), signalling
/// processes of other uids (KILL), reading their `/proc` entries
/// (SYS_PTRACE, DAC_READ_SEARCH), loopback in a network namespace
/// (NET_ADMIN).
pub const FULL_CAPS: &[(u32, &str)] = &[
    (0, "CAP_CHOWN"),
    (2, "CAP_DAC_READ_SEARCH"),
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
    (12, "CAP_NET_ADMIN"),
    (19, "CAP_SYS_PTRACE"),
    (21, "CAP_SYS_ADMIN"),
];

/// Where the run's folder is inside its own mount namespace (level `full`):
/// the private tmpfs is mounted at `/tmp`, the folder is this directory in it.
pub const PRIVATE_TMP: &str = "/tmp";
const FOLDER_IN_TMPFS: &str = "cyrnel";

/// What the operator asked for (`sandbox` setting).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requested {
    /// The strongest level the daemon can apply.
    Auto,
    /// Exactly this level, or the daemon does not start.
    Full,
    Landlock,
    Off,
}

/// Paths a run must never reach, and where run folders live.
#[derive(Clone, Debug)]
pub struct Paths {
    pub data_dir: PathBuf,
    /// The config file and the key file, where set.
    pub secret_files: Vec<PathBuf>,
    /// Where run folders are made at levels `landlock` and `none` (a tmpfs
    /// when one is writable, else inside the data dir).
    pub runs_base: PathBuf,
    /// Host directories every run may read and write (`shared_dirs`): the
    /// operator's explicit exception to "writes only in its own folder".
    pub shared_dirs: Vec<PathBuf>,
}

/// Per-run limits of the folder and temporary space.
#[derive(Clone, Copy, Debug)]
pub struct FolderLimits {
    pub bytes: u64,
    pub inodes: u64,
}

/// The isolation every run gets, decided once at start-up.
pub struct Policy {
    pub level: SandboxLevel,
    paths: Paths,
    limits: FolderLimits,
    /// Landlock ABI version (0: unavailable).
    landlock_abi: i32,
    /// Read-only rules (level `landlock`): host paths minus the daemon's.
    read_roots: Vec<(OwnedFd, bool)>,
    /// Device nodes every run may read and write.
    devices: Vec<(OwnedFd, bool)>,
    /// `/` for level `full`'s read rule.
    root: Option<OwnedFd>,
    /// `shared_dirs`, for their read-write rules.
    shared: Vec<(OwnedFd, bool)>,
    /// Filters for runs with and without network (`None`: no seccomp).
    seccomp_net: Option<Arc<Seccomp>>,
    seccomp_no_net: Option<Arc<Seccomp>>,
    /// Directories (data dir) and files (config, key) masked at `full`.
    mask_dirs: Arc<[CString]>,
    mask_files: Arc<[CString]>,
    /// `shared_dirs`, made writable again in a run's read-only view.
    shared_paths: Arc<[CString]>,
    /// Whether `/dev/shm` exists to be replaced (level `full`).
    has_dev_shm: bool,
    /// Level `full`: the `proc` and mask instances runs get clones of
    /// (`None`: a kernel that cannot clone them; each run mounts its own).
    shared_mounts: Option<SharedMounts>,
    /// Features missing on this kernel, for the start-up log.
    pub degraded: Vec<&'static str>,
}

/// A run's folder (working directory, code, output file) and temporary
/// space. Removed when dropped: the run has settled and its output was read.
pub struct RunFolder {
    kind: FolderKind,
}

enum FolderKind {
    /// Level `full`: a tmpfs of its own, not mounted anywhere in the
    /// daemon's namespace. The child mounts it at `/tmp`; dropping the last
    /// reference (ours, once the run's namespace is gone) frees it.
    Private { mount: OwnedFd },
    /// A directory under `runs_base`, removed on drop.
    Host { dir: PathBuf, fd: OwnedFd },
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("level", &self.level)
            .field("paths", &self.paths)
            .field("limits", &self.limits)
            .field("landlock_abi", &self.landlock_abi)
            .field("read_roots", &self.read_roots.len())
            .field("degraded", &self.degraded)
            .finish_non_exhaustive()
    }
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        if let FolderKind::Host { dir, .. } = &self.kind {
            if let Err(e) = fs::remove_dir_all(dir) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(dir = %dir.display(), error = %e, "removing a run folder failed");
                }
            }
        }
    }
}

/// A run folder as descriptors, to hand it to the next image of the
/// daemon (see [`RunFolder::into_handle`]).
#[derive(Debug)]
pub enum FolderHandle {
    /// Level `full`: the detached tmpfs.
    Private(OwnedFd),
    /// A directory under `runs_base` and the descriptor open on it.
    Host(PathBuf, OwnedFd),
}

impl FolderHandle {
    /// The descriptor the handover keeps open across `execve`.
    pub fn fd(&self) -> &OwnedFd {
        match self {
            FolderHandle::Private(fd) | FolderHandle::Host(_, fd) => fd,
        }
    }
}

impl RunFolder {
    /// The detached tmpfs of a level-`full` folder (`None` for a folder
    /// on a host file system, which is found again by its path).
    pub fn private_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match &self.kind {
            FolderKind::Private { mount } => Some(mount.as_fd()),
            FolderKind::Host { .. } => None,
        }
    }

    /// Gives up the folder without removing it, as descriptors.
    pub fn into_handle(self) -> FolderHandle {
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped and never used again, so the
        // kind is moved out exactly once (RunFolder's Drop, which would
        // remove the folder, does not run).
        let kind = unsafe { std::ptr::read(&this.kind) };
        match kind {
            FolderKind::Private { mount } => FolderHandle::Private(mount),
            FolderKind::Host { dir, fd } => FolderHandle::Host(dir, fd),
        }
    }

    /// The folder a previous image of the daemon handed over.
    pub fn from_handle(handle: FolderHandle) -> RunFolder {
        RunFolder {
            kind: match handle {
                FolderHandle::Private(mount) => FolderKind::Private { mount },
                FolderHandle::Host(dir, fd) => FolderKind::Host { dir, fd },
            },
        }
    }

    /// The structured output file's bytes, at most `max + 1` of them (so a
    /// caller can tell "too large"). Opened beneath the folder without
    /// following any symlink: the run owns the folder and could plant one.
    pub fn read_output(&self, max: u64) -> io::Result<Vec<u8>> {
        let (dirfd, rel) = match &self.kind {
            FolderKind::Private { mount } => (mount.as_raw_fd(), c"cyrnel/output"),
            FolderKind::Host { fd, .. } => (fd.as_raw_fd(), c"output"),
        };
        let fd = openat_beneath(dirfd, rel, libc::O_RDONLY | libc::O_NONBLOCK)?;
        let file = fs::File::from(fd);
        if !file.metadata()?.is_file() {
            return Err(io::Error::other("the output file is not a regular file"));
        }
        let mut buf = Vec::new();
        file.take(max.saturating_add(1)).read_to_end(&mut buf)?;
        Ok(buf)
    }
}

/// What the child does for one run, prepared by the parent. Borrowed by
/// `spawn::Exec` for the duration of the clone.
pub struct Prepared {
    pub folder: RunFolder,
    /// The run's working directory as the run sees it.
    pub cwd: PathBuf,
    /// `CYRNEL_OUTPUT` as the run sees it.
    pub output_path: PathBuf,
    /// Extra environment (`TMPDIR` where `/tmp` is not private).
    pub env: Vec<(String, String)>,
    pub steps: Steps,
}

/// The child's isolation steps: plain data and descriptors, applied
/// without allocating (see `spawn.rs`). Owned (the paths and the filter
/// are shared with the [`Policy`]), so a run can be prepared on one thread
/// and spawned on another.
#[derive(Default)]
pub struct Steps {
    /// `unshare(2)` flags (mount, IPC, network namespaces).
    pub unshare: libc::c_int,
    /// Level `full`: the mount work.
    pub mounts: Option<Mounts>,
    /// Bring `lo` up (a new network namespace).
    pub loopback_up: bool,
    /// Empty the bounding set: the spawning thread empties its own once
    /// (the daemon holds CAP_SETPCAP) and the child inherits it.
    pub drop_bounding: bool,
    pub no_new_privs: bool,
    pub landlock: Option<OwnedFd>,
    /// The filter (shared with the [`Policy`]), in two stages: see
    /// [`Seccomp`].
    pub seccomp: Option<Arc<Seccomp>>,
}

/// A run's seccomp filter, split in two stages that together decide every
/// call exactly as `whole` does.
///
/// Installing a filter costs each child about 50 µs here, of which about
/// 30 µs does not depend on the program's size (validation, conversion,
/// JIT, and the per-number action cache built with interrupts off;
/// BENCHMARKS.md). Filters are inherited, so a thread dedicated to
/// spawning (`proc::dedicate_spawner_thread`) installs stage one on
/// itself once: the deny list minus [`SETUP_CALLS`], the calls the daemon
/// makes itself to prepare and start runs. Each child adds stage two,
/// those few calls, right before exec. The kernel runs both on every call
/// and acts on the stricter answer; the stages deny disjoint sets, so a
/// run's calls get exactly the answers `whole` gives. The children of any
/// other thread install `whole` (`spawn::child_filter`).
pub struct Seccomp {
    /// For the spawning thread, once (with `no_new_privs`).
    pub(super) first: Arc<[libc::sock_filter]>,
    /// For each child, on top of `first`.
    pub(super) second: Arc<[libc::sock_filter]>,
    /// Both in one program.
    pub(super) whole: Arc<[libc::sock_filter]>,
}

impl Seccomp {
    /// The filter for runs with or without IP sockets, on top of `first`
    /// ([`seccomp_stage_one`]): one stage one serves every variant, since
    /// a thread runs under one.
    pub(super) fn new(
        first: Arc<[libc::sock_filter]>,
        private_ipc: bool,
        deny_ip_sockets: bool,
    ) -> Seccomp {
        Seccomp {
            first,
            second: seccomp_stage_two(deny_ip_sockets).into(),
            whole: seccomp_program(private_ipc, deny_ip_sockets).into(),
        }
    }
}

pub struct Mounts {
    pub private_tmp: RawFd,
    pub mask_dirs: Arc<[CString]>,
    /// Detached clones of the shared mask tmpfs, one per `mask_dirs`
    /// entry (empty: the child mounts a new tmpfs on each).
    pub masks: Vec<OwnedFd>,
    /// A detached clone of the shared `proc` (`None`: the child mounts a
    /// new instance).
    pub proc: Option<OwnedFd>,
    pub mask_files: Arc<[CString]>,
    /// Bound onto themselves read-write after the read-only pass.
    pub shared: Arc<[CString]>,
    pub dev_shm: bool,
}

/// Effective capabilities of the daemon (the `CapEff` mask).
fn effective_caps() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// The Landlock ABI version of this kernel (0: none).
pub fn landlock_abi() -> i32 {
    // SAFETY: the version query takes no attribute.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    if v < 0 {
        0
    } else {
        v as i32
    }
}

const LANDLOCK_CREATE_RULESET_VERSION: u32 = 1;
const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
const FS_EXECUTE: u64 = 1 << 0;
const FS_WRITE_FILE: u64 = 1 << 1;
const FS_READ_FILE: u64 = 1 << 2;
const FS_READ_DIR: u64 = 1 << 3;
const FS_REFER: u64 = 1 << 13;
const FS_TRUNCATE: u64 = 1 << 14;
const NET_BIND_TCP: u64 = 1 << 0;
const NET_CONNECT_TCP: u64 = 1 << 1;
const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
const SCOPE_SIGNAL: u64 = 1 << 1;

#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// Every filesystem right this ABI knows (ioctl on devices left alone).
fn fs_rights(abi: i32) -> u64 {
    let mut r = (1u64 << 13) - 1;
    if abi >= 2 {
        r |= FS_REFER;
    }
    if abi >= 3 {
        r |= FS_TRUNCATE;
    }
    r
}

/// Rights that may be granted on a non-directory.
fn file_rights(abi: i32) -> u64 {
    let mut r = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE;
    if abi >= 3 {
        r |= FS_TRUNCATE;
    }
    r
}

fn open_path(p: &Path) -> io::Result<(OwnedFd, bool)> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(p)?;
    let is_dir = f.metadata()?.is_dir();
    Ok((OwnedFd::from(f), is_dir))
}

/// Opens `rel` beneath `dirfd`, refusing symlinks and `..` escapes.
fn openat_beneath(dirfd: RawFd, rel: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    const RESOLVE_NO_XDEV: u64 = 0x01;
    const RESOLVE_NO_SYMLINKS: u64 = 0x04;
    const RESOLVE_BENEATH: u64 = 0x08;
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        mode: 0,
        resolve: RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV,
    };
    // SAFETY: openat2 with a valid path and a struct of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd,
            rel.as_ptr(),
            &how as *const OpenHow,
            std::mem::size_of::<OpenHow>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor from the kernel.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Every entry below `root` that leads to nothing in `protected`: the
/// allow-list Landlock needs to mean "everything but these".
fn allow_except(root: &Path, protected: &[PathBuf], out: &mut Vec<PathBuf>) {
    let Ok(dir) = fs::read_dir(root) else {
        return;
    };
    for e in dir.flatten() {
        let p = e.path();
        if protected.iter().any(|x| x == &p) {
            continue;
        }
        let is_real_dir = e.file_type().is_ok_and(|t| t.is_dir());
        if is_real_dir && protected.iter().any(|x| x.starts_with(&p)) {
            allow_except(&p, protected, out);
        } else {
            out.push(p);
        }
    }
}

const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
    "/dev/tty",
    "/dev/ptmx",
    "/dev/pts",
];

impl Policy {
    /// Decides the level: the strongest the daemon can apply (or exactly
    /// the one requested), proven by starting a probe child with it.
    pub fn detect(
        requested: Requested,
        paths: Paths,
        limits: FolderLimits,
        shell: &str,
    ) -> Result<Policy, String> {
        let abi = landlock_abi();
        let caps = effective_caps();
        let missing: Vec<&str> = FULL_CAPS
            .iter()
            .filter(|(bit, _)| caps & (1u64 << bit) == 0)
            .map(|(_, name)| *name)
            .collect();
        let mut why_not = Vec::new();
        let candidates: &[SandboxLevel] = match requested {
            Requested::Off => &[SandboxLevel::None],
            Requested::Full => &[SandboxLevel::Full],
            Requested::Landlock => &[SandboxLevel::Landlock],
            Requested::Auto => &[
                SandboxLevel::Full,
                SandboxLevel::Landlock,
                SandboxLevel::None,
            ],
        };
        for &level in candidates {
            match level {
                SandboxLevel::Full if !missing.is_empty() => {
                    why_not.push(format!("full: missing {}", missing.join(", ")));
                    continue;
                }
                SandboxLevel::Landlock if abi < 1 => {
                    why_not.push("landlock: the kernel has no Landlock".into());
                    continue;
                }
                _ => {}
            }
            let policy = match Policy::build(level, paths.clone(), limits, abi) {
                Ok(p) => p,
                Err(e) => {
                    why_not.push(format!("{}: {e}", level.as_str()));
                    continue;
                }
            };
            match policy.probe(shell) {
                Ok(()) => {
                    if !why_not.is_empty() {
                        tracing::warn!(level = level.as_str(), why = %why_not.join("; "), "runs get a weaker sandbox");
                    }
                    return Ok(policy);
                }
                Err(e) => why_not.push(format!("{}: {e}", level.as_str())),
            }
        }
        Err(why_not.join("; "))
    }

    fn build(
        level: SandboxLevel,
        paths: Paths,
        limits: FolderLimits,
        abi: i32,
    ) -> io::Result<Policy> {
        let mut degraded = Vec::new();
        let landlock_abi = match level {
            SandboxLevel::None => 0,
            _ => abi,
        };
        if (1..6).contains(&landlock_abi) {
            degraded.push("Landlock signal and abstract-socket scoping (ABI 6)");
        }
        if (1..4).contains(&landlock_abi) && level == SandboxLevel::Landlock {
            degraded.push("Landlock TCP rules for network:false (ABI 4)");
        }
        if level != SandboxLevel::None && landlock_abi < 1 {
            degraded.push("Landlock");
        }
        let mut read_roots = Vec::new();
        let mut devices = Vec::new();
        let mut root = None;
        let mut shared = Vec::new();
        if landlock_abi >= 1 {
            for d in &paths.shared_dirs {
                shared.push(open_path(d)?);
            }
            for d in DEVICES {
                if let Ok(fd) = open_path(Path::new(d)) {
                    devices.push(fd);
                }
            }
            match level {
                SandboxLevel::Full => root = Some(open_path(Path::new("/"))?.0),
                SandboxLevel::Landlock => {
                    let mut protected = vec![paths.data_dir.clone(), paths.runs_base.clone()];
                    protected.extend(paths.secret_files.iter().cloned());
                    let mut allowed = Vec::new();
                    allow_except(Path::new("/"), &protected, &mut allowed);
                    for p in allowed {
                        if let Ok(fd) = open_path(&p) {
                            read_roots.push(fd);
                        }
                    }
                }
                SandboxLevel::None => {}
            }
        }
        let seccomp_on = level != SandboxLevel::None && seccomp_arch().is_some();
        if level != SandboxLevel::None && !seccomp_on {
            degraded.push("seccomp (unsupported architecture)");
        }
        let private_ipc = level == SandboxLevel::Full;
        let (seccomp_net, seccomp_no_net) = if seccomp_on {
            let first: Arc<[libc::sock_filter]> = seccomp_stage_one(private_ipc).into();
            let stages = |deny_ip_sockets| {
                Some(Arc::new(Seccomp::new(
                    first.clone(),
                    private_ipc,
                    deny_ip_sockets,
                )))
            };
            // At full, a network namespace takes the network away.
            (stages(false), stages(level == SandboxLevel::Landlock))
        } else {
            (None, None)
        };
        let cstr = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
        let (mut mask_dirs, mut mask_files, mut shared_paths) =
            (Vec::new(), Vec::new(), Vec::new());
        let mut shared_mounts = None;
        if level == SandboxLevel::Full {
            shared_mounts = match SharedMounts::new() {
                Ok(m) => Some(m),
                Err(e) => {
                    tracing::debug!(error = %e, "no shared proc and mask mounts; each run mounts its own");
                    None
                }
            };
            mask_dirs.push(cstr(&paths.data_dir)?);
            for f in &paths.secret_files {
                mask_files.push(cstr(f)?);
            }
            for d in &paths.shared_dirs {
                shared_paths.push(cstr(d)?);
            }
        } else {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&paths.runs_base)?;
        }
        Ok(Policy {
            level,
            paths,
            limits,
            landlock_abi,
            read_roots,
            devices,
            root,
            shared,
            seccomp_net,
            seccomp_no_net,
            mask_dirs: mask_dirs.into(),
            mask_files: mask_files.into(),
            shared_paths: shared_paths.into(),
            has_dev_shm: Path::new("/dev/shm").is_dir(),
            shared_mounts,
            degraded,
        })
    }

    /// Starts `shell -c exit` with this policy and checks it exits 0. On
    /// a thread of its own, dedicated to it as the starter's spawner is
    /// (the same two seccomp stages as every run): the spawning thread's
    /// bounding set is emptied and it takes the filter's first stage
    /// (`spawn.rs`), and the caller's must stay as it is.
    fn probe(&self, shell: &str) -> io::Result<()> {
        let uid = match self.level {
            SandboxLevel::Full => Some((0x7FFD_FFFF, 0x7FFD_FFFF)),
            _ => None,
        };
        let code = std::thread::scope(|s| {
            s.spawn(|| {
                let prepared = self.prepare(0, b"exit 0\n", uid, true)?;
                super::spawn::dedicate_this_thread();
                super::probe_spawn(shell, &prepared, uid)
            })
            .join()
            .map_err(|_| io::Error::other("the probe thread panicked"))?
        })?;
        if code != Some(0) {
            return Err(io::Error::other(format!(
                "a probe run ended with {code:?} instead of exit code 0"
            )));
        }
        Ok(())
    }

    /// The folder and the child's steps for run `id` running as `uid`.
    pub fn prepare(
        &self,
        id: u64,
        code: &[u8],
        uid: Option<(u32, u32)>,
        network: bool,
    ) -> io::Result<Prepared> {
        let (folder, cwd, output_path, env) = match self.level {
            SandboxLevel::Full => {
                let mount = private_tmpfs(self.limits)?;
                let dirfd = mount.as_raw_fd();
                stage_at(dirfd, code, uid)?;
                let cwd = Path::new(PRIVATE_TMP).join(FOLDER_IN_TMPFS);
                (
                    RunFolder {
                        kind: FolderKind::Private { mount },
                    },
                    cwd.clone(),
                    cwd.join("output"),
                    Vec::new(),
                )
            }
            _ => {
                let dir = self.paths.runs_base.join(id.to_string());
                match fs::remove_dir_all(&dir) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                fs::DirBuilder::new().mode(0o700).create(&dir)?;
                let fd = OwnedFd::from(fs::File::open(&dir)?);
                let folder = RunFolder {
                    kind: FolderKind::Host {
                        dir: dir.clone(),
                        fd,
                    },
                };
                stage_host(&dir, code, uid)?;
                let env = match self.level {
                    SandboxLevel::None => Vec::new(),
                    _ => vec![("TMPDIR".to_string(), dir.join("tmp").display().to_string())],
                };
                (folder, dir.clone(), dir.join("output"), env)
            }
        };
        let mut steps = Steps::default();
        match self.level {
            SandboxLevel::None => {}
            SandboxLevel::Full => {
                steps.unshare = libc::CLONE_NEWNS | libc::CLONE_NEWIPC;
                if !network {
                    steps.unshare |= libc::CLONE_NEWNET;
                    steps.loopback_up = true;
                }
                let FolderKind::Private { mount } = &folder.kind else {
                    unreachable!("level full has a private folder")
                };
                let (proc, masks) = match &self.shared_mounts {
                    Some(shared) => {
                        let (proc, masks) = shared.clone_for_run(self.mask_dirs.len())?;
                        (Some(proc), masks)
                    }
                    None => (None, Vec::new()),
                };
                steps.mounts = Some(Mounts {
                    private_tmp: mount.as_raw_fd(),
                    mask_dirs: self.mask_dirs.clone(),
                    masks,
                    proc,
                    mask_files: self.mask_files.clone(),
                    shared: self.shared_paths.clone(),
                    dev_shm: self.has_dev_shm,
                });
                steps.drop_bounding = true;
                steps.no_new_privs = true;
            }
            SandboxLevel::Landlock => {
                steps.no_new_privs = true;
            }
        }
        if self.level != SandboxLevel::None {
            if self.landlock_abi >= 1 {
                // The run's own folder: its tmpfs (the mount's root), or
                // the host folder, through the descriptor the folder holds.
                let own = match &folder.kind {
                    FolderKind::Private { mount } => mount.as_raw_fd(),
                    FolderKind::Host { fd, .. } => fd.as_raw_fd(),
                };
                steps.landlock = Some(self.ruleset(own, network)?);
            }
            steps.seccomp = if network {
                self.seccomp_net.clone()
            } else {
                self.seccomp_no_net.clone()
            };
        }
        Ok(Prepared {
            folder,
            cwd,
            output_path,
            env,
            steps,
        })
    }

    /// A Landlock ruleset for one run: read (and execute) the host as the
    /// level allows, read and write the run's own folder and the usual
    /// device nodes; at ABI 6, no signals or abstract sockets outside the
    /// run; at ABI 4 and `network: false` (level `landlock`), no TCP.
    /// `own`: a descriptor on the run's folder.
    fn ruleset(&self, own: RawFd, network: bool) -> io::Result<OwnedFd> {
        let abi = self.landlock_abi;
        let all = fs_rights(abi);
        let mut attr = RulesetAttr {
            handled_access_fs: all,
            handled_access_net: 0,
            scoped: 0,
        };
        if abi >= 4 && !network && self.level == SandboxLevel::Landlock {
            attr.handled_access_net = NET_BIND_TCP | NET_CONNECT_TCP;
        }
        if abi >= 6 {
            attr.scoped = SCOPE_SIGNAL | SCOPE_ABSTRACT_UNIX_SOCKET;
        }
        // SAFETY: a valid attribute of the size passed; returns a new fd.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const RulesetAttr,
                std::mem::size_of::<RulesetAttr>(),
                0u32,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor from the kernel.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let read = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR;
        let device = FS_READ_FILE | FS_WRITE_FILE | FS_READ_DIR | (all & FS_TRUNCATE);
        let add = |fd: RawFd, is_dir: bool, access: u64| -> io::Result<()> {
            let access = if is_dir {
                access & all
            } else {
                access & file_rights(abi)
            };
            let rule = PathBeneathAttr {
                allowed_access: access,
                parent_fd: fd,
            };
            // SAFETY: a valid rule struct and ruleset fd.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset.as_raw_fd(),
                    LANDLOCK_RULE_PATH_BENEATH,
                    &rule as *const PathBeneathAttr,
                    0u32,
                )
            };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        if let Some(root) = &self.root {
            add(root.as_raw_fd(), true, read)?;
        }
        for (fd, is_dir) in &self.read_roots {
            add(fd.as_raw_fd(), *is_dir, read)?;
        }
        for (fd, is_dir) in &self.devices {
            add(fd.as_raw_fd(), *is_dir, device)?;
        }
        add(own, true, all)?;
        for (fd, is_dir) in &self.shared {
            add(fd.as_raw_fd(), *is_dir, all)?;
        }
        Ok(ruleset)
    }

    /// Where run folders of levels `landlock` and `none` live.
    pub fn runs_base(&self) -> &Path {
        &self.paths.runs_base
    }

    /// Removes the folder base once no run folder is left in it (graceful
    /// stop); a restart on the same data dir makes it again.
    pub fn remove_runs_base_if_empty(&self) {
        let _ = fs::remove_dir(&self.paths.runs_base);
    }

    /// After a restart: the folder of run `id` if one is left on the host
    /// (levels `landlock` and `none`; a private tmpfs is gone with the
    /// daemon's descriptor on it).
    pub fn adopt_folder(&self, id: u64) -> Option<RunFolder> {
        let dir = self.paths.runs_base.join(id.to_string());
        let fd = OwnedFd::from(fs::File::open(&dir).ok()?);
        Some(RunFolder {
            kind: FolderKind::Host { dir, fd },
        })
    }

    /// After a restart: removes host folders of runs not in `keep`.
    pub fn remove_stale_folders(&self, keep: impl Fn(u64) -> bool) {
        let Ok(dir) = fs::read_dir(&self.paths.runs_base) else {
            return;
        };
        for e in dir.flatten() {
            let id = e.file_name().to_str().and_then(|n| n.parse::<u64>().ok());
            if id.is_some_and(|id| !keep(id)) {
                if let Err(err) = fs::remove_dir_all(e.path()) {
                    tracing::warn!(dir = %e.path().display(), error = %err, "removing a stale run folder failed");
                }
            }
        }
    }
}

const MOUNT_ATTR_RDONLY: libc::c_uint = 0x1;
const MOUNT_ATTR_NOSUID: libc::c_uint = 0x2;
const MOUNT_ATTR_NODEV: libc::c_uint = 0x4;
const MOUNT_ATTR_NOEXEC: libc::c_uint = 0x8;

/// A new file system instance of type `fstype`, configured with `options`
/// (string values; `None`: a flag such as `ro`), as a detached mount with
/// the mount attributes `attrs`: mounted nowhere until someone moves it.
fn detached_mount(
    fstype: &CStr,
    options: &[(&CStr, Option<&CStr>)],
    attrs: libc::c_uint,
) -> io::Result<OwnedFd> {
    const FSCONFIG_SET_FLAG: libc::c_uint = 0;
    const FSCONFIG_SET_STRING: libc::c_uint = 1;
    const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
    const FSMOUNT_CLOEXEC: libc::c_uint = 1;
    // SAFETY: fsopen with a C string; returns a new fd.
    let fs = unsafe { libc::syscall(libc::SYS_fsopen, fstype.as_ptr(), 1u32) };
    if fs < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    let fs = unsafe { OwnedFd::from_raw_fd(fs as RawFd) };
    for (key, value) in options {
        let (cmd, value) = match value {
            Some(v) => (FSCONFIG_SET_STRING, v.as_ptr()),
            None => (FSCONFIG_SET_FLAG, std::ptr::null()),
        };
        // SAFETY: valid C strings for the duration of the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                fs.as_raw_fd(),
                cmd,
                key.as_ptr(),
                value,
                0,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: plain syscalls on the fs context.
    let r = unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<u8>(),
            std::ptr::null::<u8>(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above; returns a new fd on the mount.
    let m = unsafe { libc::syscall(libc::SYS_fsmount, fs.as_raw_fd(), FSMOUNT_CLOEXEC, attrs) };
    if m < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(m as RawFd) })
}

/// A detached tmpfs for one run (size and inode capped), mounted nowhere.
fn private_tmpfs(limits: FolderLimits) -> io::Result<OwnedFd> {
    let size = CString::new(limits.bytes.to_string()).map_err(io::Error::other)?;
    let inodes = CString::new(limits.inodes.to_string()).map_err(io::Error::other)?;
    detached_mount(
        c"tmpfs",
        &[
            (c"size", Some(&size)),
            (c"nr_inodes", Some(&inodes)),
            (c"mode", Some(c"1777")),
        ],
        MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
    )
}

/// File system instances every run of level `full` gets a mount of,
/// made once: a `proc` that shows a process only to those who may trace
/// it (`hidepid=invisible`: with a uid per run, a run sees its own
/// processes only), and an empty read-only tmpfs that masks the data dir.
/// Per run, [`SharedMounts::clone_for_run`] makes new detached mounts of
/// them (`open_tree(OPEN_TREE_CLONE)`: no new superblock) that the child
/// moves into its view. A new `proc` and a new tmpfs per run cost two
/// superblocks made and torn down per spawn.
struct SharedMounts {
    proc: OwnedFd,
    mask: OwnedFd,
}

impl SharedMounts {
    /// Makes both instances and checks that this kernel lets them be
    /// cloned (Linux 6.15 and later clone a detached mount; before, the
    /// caller falls back to new instances per run).
    fn new() -> io::Result<SharedMounts> {
        let proc = detached_mount(
            c"proc",
            &[(c"hidepid", Some(c"invisible"))],
            MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )?;
        let mask = detached_mount(
            c"tmpfs",
            &[
                (c"size", Some(c"4k")),
                (c"nr_inodes", Some(c"2")),
                (c"mode", Some(c"000")),
                (c"ro", None),
            ],
            MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
        )?;
        let shared = SharedMounts { proc, mask };
        shared.clone_for_run(1)?;
        Ok(shared)
    }

    /// Detached mounts for one run: its `proc`, and one mask per masked
    /// directory. Closing one before it was moved anywhere unmounts it.
    fn clone_for_run(&self, masks: usize) -> io::Result<(OwnedFd, Vec<OwnedFd>)> {
        let proc = clone_mount(&self.proc)?;
        let masks = (0..masks)
            .map(|_| clone_mount(&self.mask))
            .collect::<io::Result<_>>()?;
        Ok((proc, masks))
    }
}

/// A new detached mount of the same tree as `mount` (`open_tree` with
/// `OPEN_TREE_CLONE`): same superblock, same mount attributes.
fn clone_mount(mount: &OwnedFd) -> io::Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    // SAFETY: open_tree on a valid fd with an empty path; returns a new fd.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            mount.as_raw_fd(),
            c"".as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Creates `cyrnel/` (0700), `cyrnel/code` (0700) and `cyrnel/output`
/// (0600) in the private tmpfs, owned by the run's uid. The folder is
/// handed over last: a daemon that is not root (the packaged unit's
/// capabilities have no CAP_DAC_OVERRIDE) cannot create files in a 0700
/// folder of another uid.
fn stage_at(mount: RawFd, code: &[u8], uid: Option<(u32, u32)>) -> io::Result<()> {
    let (u, g) = uid.map_or((u32::MAX, u32::MAX), |(u, g)| (u, g));
    // SAFETY: mkdirat with a C string relative to a valid dirfd.
    check(unsafe { libc::mkdirat(mount, c"cyrnel".as_ptr(), 0o700) })?;
    for (name, mode, content) in [
        (c"cyrnel/code", 0o700, code),
        (c"cyrnel/output", 0o600, &b""[..]),
    ] {
        // SAFETY: as above; the fd is owned by the File.
        let fd = unsafe {
            libc::openat(
                mount,
                name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                mode,
            )
        };
        check(fd)?;
        // SAFETY: a fresh descriptor.
        let mut f = unsafe { fs::File::from_raw_fd(fd) };
        f.write_all(content)?;
        // SAFETY: fchown on the file we just created.
        check(unsafe { libc::fchown(f.as_raw_fd(), u, g) })?;
    }
    // SAFETY: fchownat with a C string relative to a valid dirfd.
    check(unsafe { libc::fchownat(mount, c"cyrnel".as_ptr(), u, g, 0) })?;
    Ok(())
}

/// Writes `code` (0700), an empty `output` (0600) and `tmp/` (0700) into
/// the run's host folder, handed to the run's uid when it has its own.
fn stage_host(dir: &Path, code: &[u8], uid: Option<(u32, u32)>) -> io::Result<()> {
    let code_path = dir.join("code");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(&code_path)?;
    f.write_all(code)?;
    drop(f);
    let output = dir.join("output");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&output)?;
    let tmp = dir.join("tmp");
    fs::DirBuilder::new().mode(0o700).create(&tmp)?;
    if let Some((u, g)) = uid {
        for p in [dir, code_path.as_path(), output.as_path(), tmp.as_path()] {
            std::os::unix::fs::chown(p, Some(u), Some(g))?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// seccomp: a deny list as a classic BPF program.

#[cfg(target_arch = "x86_64")]
fn seccomp_arch() -> Option<u32> {
    Some(0xC000_003E) // AUDIT_ARCH_X86_64
}

#[cfg(target_arch = "aarch64")]
fn seccomp_arch() -> Option<u32> {
    Some(0xC000_00B7) // AUDIT_ARCH_AARCH64
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn seccomp_arch() -> Option<u32> {
    None
}

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;

fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

const LD_ABS_W: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;
/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARG0_LOW: u32 = 16;

/// System calls no run needs and that widen what it can reach: tracing
/// and other processes' memory, mounts and namespaces, kernel keyrings,
/// BPF, perf, modules, kexec, userfaultfd, file handles, io_uring (which
/// performs calls past this filter), swap, reboot.
fn denied_calls(private_ipc: bool) -> Vec<(libc::c_long, i32)> {
    use libc::*;
    let mut v: Vec<(c_long, i32)> = [
        SYS_ptrace,
        SYS_process_vm_readv,
        SYS_process_vm_writev,
        SYS_pidfd_getfd,
        SYS_kcmp,
        SYS_mount,
        SYS_umount2,
        SYS_pivot_root,
        SYS_chroot,
        SYS_unshare,
        SYS_setns,
        SYS_fsopen,
        SYS_fsconfig,
        SYS_fsmount,
        SYS_fspick,
        SYS_move_mount,
        SYS_open_tree,
        SYS_mount_setattr,
        SYS_bpf,
        SYS_keyctl,
        SYS_add_key,
        SYS_request_key,
        SYS_perf_event_open,
        SYS_init_module,
        SYS_finit_module,
        SYS_delete_module,
        SYS_kexec_load,
        SYS_kexec_file_load,
        SYS_userfaultfd,
        SYS_open_by_handle_at,
        SYS_name_to_handle_at,
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_swapon,
        SYS_swapoff,
        SYS_reboot,
        SYS_acct,
        SYS_quotactl,
        SYS_syslog,
    ]
    .into_iter()
    .map(|nr| (nr, EPERM))
    .collect();
    #[cfg(target_arch = "x86_64")]
    v.extend([(SYS_iopl, EPERM), (SYS_ioperm, EPERM)]);
    // clone3's flags live in memory a filter cannot read: ENOSYS makes
    // the C library fall back to clone, whose flags are checked below.
    v.push((SYS_clone3, ENOSYS));
    if !private_ipc {
        // Without an IPC namespace, SysV IPC and POSIX message queues are
        // shared with every other run: refuse them.
        v.extend(
            [
                SYS_shmget,
                SYS_shmat,
                SYS_shmctl,
                SYS_semget,
                SYS_semop,
                SYS_semtimedop,
                SYS_semctl,
                SYS_msgget,
                SYS_msgsnd,
                SYS_msgrcv,
                SYS_msgctl,
                SYS_mq_open,
            ]
            .into_iter()
            .map(|nr| (nr, EPERM)),
        );
    }
    v
}

/// What the filter does with one system call number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Errno(u32),
    /// clone: EPERM when its flags ask for a namespace.
    Clone,
    /// socket: EACCES for IP and packet sockets.
    Socket,
}

/// Denied calls the daemon makes itself to set runs up: `clone3` (the
/// spawner), the mount API that prepares a run's folder and mounts
/// (`open_tree` to `fsmount`; a thread that spawns may prepare too, as the
/// probe and the benchmarks do), and what each child of level `full` does
/// between clone and exec (its namespaces and mount view). Seccomp stage
/// one allows them, stage two denies them (see [`Seccomp`]). The mount
/// API's numbers are consecutive (428 to 432), so stage two stays small.
const SETUP_CALLS: [libc::c_long; 9] = [
    libc::SYS_clone3,
    libc::SYS_unshare,
    libc::SYS_mount,
    libc::SYS_mount_setattr,
    libc::SYS_open_tree,
    libc::SYS_move_mount,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
];

/// Every number the filter does not simply allow, sorted, with what it
/// does: the deny list, clone with namespace flags, and (`deny_ip_sockets`)
/// IP and packet sockets.
fn filter_entries(private_ipc: bool, deny_ip_sockets: bool) -> Vec<(u32, Action)> {
    let mut entries: Vec<(u32, Action)> = denied_calls(private_ipc)
        .into_iter()
        .map(|(nr, errno)| (nr as u32, Action::Errno(errno as u32)))
        .collect();
    entries.push((libc::SYS_clone as u32, Action::Clone));
    if deny_ip_sockets {
        entries.push((libc::SYS_socket as u32, Action::Socket));
    }
    entries.sort_unstable_by_key(|e| e.0);
    entries.dedup_by_key(|e| e.0);
    entries
}

/// Whether an entry belongs to stage two: a setup call, or a rule only
/// some runs get (IP sockets).
fn in_stage_two(e: &(u32, Action)) -> bool {
    SETUP_CALLS.iter().any(|&nr| nr as u32 == e.0) || e.1 == Action::Socket
}

/// A self-contained filter deciding `entries`: any other architecture
/// kills the process, x32 numbers are refused, the rest is searched
/// ([`search`]). Empty where seccomp is not supported.
fn self_contained(entries: &[(u32, Action)]) -> Vec<libc::sock_filter> {
    let Some(arch) = seccomp_arch() else {
        return Vec::new();
    };
    let mut p = vec![
        stmt(LD_ABS_W, ARCH),
        jump(JEQ_K, arch, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_ABS_W, NR),
    ];
    #[cfg(target_arch = "x86_64")]
    {
        // x32 system call numbers would bypass the list.
        p.push(jump(JGE_K, 0x4000_0000, 0, 1));
        p.push(stmt(RET_K, RET_ERRNO | libc::EPERM as u32));
    }
    p.extend(search(entries));
    p
}

/// The whole filter program: the deny list, clone with namespace flags,
/// and (for `network: false` at level `landlock`) IP and packet sockets.
///
/// The numbers are searched as a binary tree, not a list: the kernel runs
/// a new filter once for every system call number when it is installed
/// (to cache which calls are always allowed), so a list of ~60 compares
/// cost about that many instructions per number for every spawn; and the
/// tree is over intervals with shared outcomes ([`search`]), so the
/// program is small.
pub fn seccomp_program(private_ipc: bool, deny_ip_sockets: bool) -> Vec<libc::sock_filter> {
    self_contained(&filter_entries(private_ipc, deny_ip_sockets))
}

/// Stage one (see [`Seccomp`]): the whole program minus stage two's
/// entries.
pub fn seccomp_stage_one(private_ipc: bool) -> Vec<libc::sock_filter> {
    let entries: Vec<_> = filter_entries(private_ipc, false)
        .into_iter()
        .filter(|e| !in_stage_two(e))
        .collect();
    self_contained(&entries)
}

/// Stage two (see [`Seccomp`]): the setup calls and, for
/// `deny_ip_sockets`, IP and packet sockets. Only ever installed on top
/// of stage one, which already decides other architectures (the process
/// is killed, whatever this stage answers) and x32 numbers.
pub fn seccomp_stage_two(deny_ip_sockets: bool) -> Vec<libc::sock_filter> {
    if seccomp_arch().is_none() {
        return Vec::new();
    }
    // Whether IPC is private does not touch these entries.
    let entries: Vec<_> = filter_entries(true, deny_ip_sockets)
        .into_iter()
        .filter(in_stage_two)
        .collect();
    let mut p = vec![stmt(LD_ABS_W, NR)];
    p.extend(search(&entries));
    p
}

/// The instructions for one action; the accumulator holds the number.
fn action(a: Action) -> Vec<libc::sock_filter> {
    let ns_flags = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP) as u32;
    match a {
        Action::Errno(e) => vec![stmt(RET_K, RET_ERRNO | e)],
        // x86_64 and aarch64 both pass clone's flags first.
        Action::Clone => vec![
            stmt(LD_ABS_W, ARG0_LOW),
            jump(JSET_K, ns_flags, 0, 1),
            stmt(RET_K, RET_ERRNO | libc::EPERM as u32),
            stmt(RET_K, RET_ALLOW),
        ],
        Action::Socket => vec![
            stmt(LD_ABS_W, ARG0_LOW),
            jump(JEQ_K, libc::AF_INET as u32, 3, 0),
            jump(JEQ_K, libc::AF_INET6 as u32, 2, 0),
            jump(JEQ_K, libc::AF_PACKET as u32, 1, 0),
            stmt(RET_K, RET_ALLOW),
            stmt(RET_K, RET_ERRNO | libc::EACCES as u32),
        ],
    }
}

/// What a run of consecutive system call numbers leads to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Leaf {
    Allow,
    Act(Action),
}

/// A binary search over `entries` (sorted by number, distinct) that ends
/// in the entry's action, or in "allow" for a number not listed.
///
/// The numbers are first merged into intervals of the same outcome
/// (`mount` to `reboot` is one, and so is every gap between denied
/// numbers), and the search compares against interval starts only. Each
/// outcome's instructions appear once, at the end, and every comparison
/// that settles an interval jumps straight there: the program is about
/// one instruction per interval. (The kernel validates, converts and
/// JIT-compiles the filter for every new run; its size was most of what
/// installing it cost.)
fn search(entries: &[(u32, Action)]) -> Vec<libc::sock_filter> {
    // Intervals as (first number, outcome), covering 0..=u32::MAX.
    let mut intervals: Vec<(u32, Leaf)> = Vec::new();
    let mut next = 0u32;
    for &(nr, a) in entries {
        if nr > next {
            intervals.push((next, Leaf::Allow));
        }
        let leaf = Leaf::Act(a);
        if intervals.last().map(|i| i.1) != Some(leaf) || nr != next {
            intervals.push((nr, leaf));
        }
        next = nr + 1;
    }
    intervals.push((next, Leaf::Allow));
    intervals.dedup_by(|b, a| a.1 == b.1);

    /// Where a jump goes before the program is laid out.
    #[derive(Clone, Copy)]
    enum Target {
        At(usize),
        Leaf(Leaf),
    }
    // Comparisons, each with where it goes when the number is at least
    // its interval start (jt) and when it is below (jf).
    fn tree(iv: &[(u32, Leaf)], out: &mut Vec<(u32, Target, Target)>) -> Target {
        if iv.len() == 1 {
            return Target::Leaf(iv[0].1);
        }
        let mid = iv.len() / 2;
        let at = out.len();
        out.push((iv[mid].0, Target::At(0), Target::At(0)));
        let below = tree(&iv[..mid], out);
        let above = tree(&iv[mid..], out);
        out[at].1 = above;
        out[at].2 = below;
        Target::At(at)
    }
    let mut nodes = Vec::new();
    tree(&intervals, &mut nodes);
    // The outcomes' blocks follow the comparisons, each once.
    let mut leaves: Vec<Leaf> = Vec::new();
    for (_, l) in &intervals {
        if !leaves.contains(l) {
            leaves.push(*l);
        }
    }
    let mut leaf_at = Vec::new();
    // (With no comparison at all, the one outcome's block comes first.)
    let mut pos = nodes.len();
    let mut blocks = Vec::new();
    for l in &leaves {
        let body = match l {
            Leaf::Allow => vec![stmt(RET_K, RET_ALLOW)],
            Leaf::Act(a) => action(*a),
        };
        leaf_at.push((*l, pos));
        pos += body.len();
        blocks.extend(body);
    }
    let resolve = |t: Target| match t {
        Target::At(i) => i,
        Target::Leaf(l) => leaf_at.iter().find(|(x, _)| *x == l).expect("a block").1,
    };
    let mut p = Vec::new();
    for (i, &(k, above, below)) in nodes.iter().enumerate() {
        let off = |t: Target| -> u8 {
            u8::try_from(resolve(t) - (i + 1)).expect("the filter fits BPF's jump range")
        };
        p.push(jump(JGE_K, k, off(above), off(below)));
    }
    p.extend(blocks);
    p
}

/// Where the daemon of `data_dir` keeps the folders of its runs at levels
/// `landlock` and `none` when it may (a tmpfs: no disk inode per run):
/// `/dev/shm/cyrnel-<hash of the data dir>`, the same 64-bit hash as its
/// cgroup folder, so two daemons never share one. (Named after the uid
/// block before, one of 4094: two data dirs in the same block shared the
/// folder, or one daemon found another user's there and fell back to
/// `<data_dir>/run`.)
pub fn shm_runs_base(data_dir: &Path) -> PathBuf {
    Path::new("/dev/shm").join(format!(
        "cyrnel-{:016x}",
        super::fnv1a(data_dir.as_os_str().as_bytes())
    ))
}

/// A stable block of 65,536 uids for this data dir, in 1879048192 ..
/// 2147352575 (0x70000000 .. 0x7FFDFFFF: above container ranges and
/// systemd's dynamic users, below the ranges systemd reserves), so two
/// daemons on one host do not share run uids unless their data dirs
/// collide in 1 of 4094 blocks (`sandbox_uid_base` sets it explicitly).
pub fn default_uid_base(data_dir: &Path) -> u32 {
    let h = super::fnv1a(data_dir.as_os_str().as_bytes());
    0x7000_0000 + (h % 4094) as u32 * 65_536
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_except_skips_protected_paths_and_their_parents() {
        let d = tempfile::tempdir().unwrap();
        for p in ["a/b/secret", "a/b/ok", "a/c", "d"] {
            fs::create_dir_all(d.path().join(p)).unwrap();
        }
        let mut out = Vec::new();
        allow_except(d.path(), &[d.path().join("a/b/secret")], &mut out);
        out.sort();
        let want: Vec<PathBuf> = ["a/b/ok", "a/c", "d"]
            .iter()
            .map(|p| d.path().join(p))
            .collect();
        assert_eq!(out, want);
    }

    #[test]
    fn uid_blocks_stay_in_range() {
        for dir in ["/var/lib/cyrnel", "/tmp/x", "", "/a/very/long/path/indeed"] {
            let base = default_uid_base(Path::new(dir));
            assert!(
                (0x7000_0000..=0x7FFD_0000).contains(&base),
                "{dir}: {base:#x}"
            );
            assert_eq!(base % 65_536, 0);
        }
        // The block is persisted with every run (`run_uid`): the same data
        // dir must keep the same block across versions.
        assert_eq!(default_uid_base(Path::new("/var/lib/cyrnel")), 0x75fd_0000);
    }

    /// Runs a filter on one call, as the kernel would: the return value.
    fn run_filter(p: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let (mut pc, mut acc) = (0usize, 0u32);
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                LD_ABS_W => {
                    acc = match i.k {
                        ARCH => arch,
                        NR => nr,
                        ARG0_LOW => arg0,
                        k => panic!("load at {k}"),
                    }
                }
                JEQ_K | JGE_K | JSET_K => {
                    let hit = match i.code {
                        JEQ_K => acc == i.k,
                        JGE_K => acc >= i.k,
                        _ => acc & i.k != 0,
                    };
                    pc += usize::from(if hit { i.jt } else { i.jf });
                }
                RET_K => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn seccomp_decides_every_call_as_the_deny_list_says() {
        let arch = seccomp_arch().unwrap();
        for (ipc, net) in [(true, false), (false, true), (false, false)] {
            let p = seccomp_program(ipc, net);
            let denied = denied_calls(ipc);
            for nr in 0..600u32 {
                let want = if let Some((_, e)) = denied.iter().find(|(n, _)| *n as u32 == nr) {
                    RET_ERRNO | *e as u32
                } else {
                    RET_ALLOW
                };
                let plain =
                    if nr == libc::SYS_clone as u32 || (net && nr == libc::SYS_socket as u32) {
                        RET_ALLOW // with harmless arguments
                    } else {
                        want
                    };
                let arg = if nr == libc::SYS_socket as u32 {
                    libc::AF_UNIX as u32
                } else {
                    0
                };
                assert_eq!(run_filter(&p, arch, nr, arg), plain, "nr {nr}");
            }
            let clone = libc::SYS_clone as u32;
            assert_eq!(
                run_filter(&p, arch, clone, libc::CLONE_NEWUSER as u32),
                RET_ERRNO | libc::EPERM as u32
            );
            assert_eq!(run_filter(&p, arch, clone, libc::SIGCHLD as u32), RET_ALLOW);
            let socket = libc::SYS_socket as u32;
            let inet = run_filter(&p, arch, socket, libc::AF_INET as u32);
            assert_eq!(
                inet,
                if net {
                    RET_ERRNO | libc::EACCES as u32
                } else {
                    RET_ALLOW
                }
            );
            assert_eq!(run_filter(&p, arch, 0, 0) & 0xffff_0000, RET_ALLOW);
            assert_eq!(run_filter(&p, 0x1234, 0, 0), RET_KILL_PROCESS);
            // A binary search: far fewer instructions per call than entries.
            // About one comparison per interval of numbers with the same
            // outcome, each outcome's instructions once.
            assert!(p.len() < 2 * denied.len() + 16, "{}", p.len());
        }
    }

    /// Of the answers of an older filter (`a`) and a newer one (`b`), the
    /// one the kernel acts on: the action of highest precedence, and on a
    /// tie the newer filter's.
    fn stricter(a: u32, b: u32) -> u32 {
        let rank = |r: u32| match r & 0xffff_0000 {
            RET_KILL_PROCESS => 0,
            RET_ERRNO => 1,
            RET_ALLOW => 2,
            other => panic!("action {other:#x}"),
        };
        if rank(a) < rank(b) {
            a
        } else {
            b
        }
    }

    #[test]
    fn seccomp_stages_together_decide_every_call_as_the_whole_filter() {
        let arch = seccomp_arch().unwrap();
        let args = [
            0,
            libc::SIGCHLD as u32,
            libc::CLONE_NEWUSER as u32,
            (libc::CLONE_NEWNS | libc::CLONE_NEWIPC) as u32,
            libc::AF_UNIX as u32,
            libc::AF_INET as u32,
            libc::AF_INET6 as u32,
            libc::AF_PACKET as u32,
        ];
        for ipc in [true, false] {
            let one = seccomp_stage_one(ipc);
            for net in [false, true] {
                let whole = seccomp_program(ipc, net);
                let two = seccomp_stage_two(net);
                for a in [arch, 0x1234] {
                    for nr in (0..1024u32).chain(0x4000_0000..0x4000_0200) {
                        for &arg in &args {
                            let (first, second) =
                                (run_filter(&one, a, nr, arg), run_filter(&two, a, nr, arg));
                            assert_eq!(
                                stricter(first, second),
                                run_filter(&whole, a, nr, arg),
                                "ipc {ipc}, net {net}, arch {a:#x}, nr {nr}, arg {arg:#x}"
                            );
                            // The stages deny disjoint sets.
                            if a == arch {
                                assert!(
                                    first == RET_ALLOW || second == RET_ALLOW,
                                    "both stages decide nr {nr}, arg {arg:#x}"
                                );
                            }
                        }
                    }
                }
                // Stage one lets the spawner and the child make their
                // setup calls; stage two holds those and little else.
                for nr in SETUP_CALLS {
                    assert_eq!(run_filter(&one, arch, nr as u32, 0), RET_ALLOW);
                    assert_ne!(run_filter(&two, arch, nr as u32, 0), RET_ALLOW);
                }
                assert!(two.len() < 24, "{}", two.len());
            }
        }
    }

    #[test]
    fn seccomp_jumps_stay_inside_the_program() {
        let programs = [(true, false), (false, true), (false, false)]
            .into_iter()
            .map(|(ipc, net)| seccomp_program(ipc, net))
            .chain([true, false].map(seccomp_stage_one))
            .chain([true, false].map(seccomp_stage_two));
        for p in programs {
            assert!(p.len() < 4096);
            for (i, ins) in p.iter().enumerate() {
                if ins.code & 0x07 == 0x05 {
                    assert!(i + 1 + (ins.jt.max(ins.jf) as usize) < p.len());
                }
            }
            // The program cannot run off its end.
            assert_eq!(p.last().unwrap().code, RET_K);
        }
    }
}
