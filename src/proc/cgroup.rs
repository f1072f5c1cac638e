//! cgroup v2 tracking of runs: each run gets its own cgroup, created before
//! the code is executed (the child moves itself in between clone and exec),
//! so every descendant, also one that calls `setsid()` or double-forks, is
//! found, killed with `cgroup.kill`, and waited for through
//! `cgroup.events` (`populated 0`). Detected at start-up, never assumed.
//!
//! A child is created right in its new cgroup (`CLONE_INTO_CGROUP`) only
//! where that is known to be safe: on this kernel (6.18) a child created
//! in a cgroup that was ever killed through `cgroup.kill` dies of SIGKILL
//! at birth, and so does every such child when the daemon's own cgroup
//! was ever killed (`spawn::created_in_cgroup_lives`). So the root probes
//! at start, and a leftover cgroup (of unknown history) is joined through
//! `cgroup.procs` instead.

use std::ffi::{CStr, CString};
use std::fs;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Whether the cgroup v2 line of a `/proc/<pid>/cgroup` text names exactly
/// `dir` (the whole path under `mount`: a process in the root cgroup has an
/// empty path, which every directory "ends with").
fn names_cgroup(proc_cgroup: &str, mount: &Path, dir: &Path) -> bool {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .is_some_and(|path| mount.join(path.trim().trim_start_matches('/')) == dir)
}

/// The directory under which runs get their cgroups (`run-<id>`).
#[derive(Clone, Debug)]
pub struct CgroupRoot {
    dir: PathBuf,
    /// Where the cgroup2 hierarchy is mounted: a member's path in
    /// `/proc/<pid>/cgroup` is relative to it.
    mount: PathBuf,
    /// Controllers enabled for run cgroups (of "memory" and "pids": what
    /// the host delegates).
    controllers: Vec<String>,
    /// Whether a child created in a new cgroup lives (the start-up probe);
    /// else every child joins its cgroup after the clone.
    create_in: bool,
    /// `dir`, opened: run cgroups are made and removed relative to it.
    fd: Arc<OwnedFd>,
}

/// Where the cgroup2 hierarchy is mounted, from /proc/self/mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (right.split_whitespace().next()? == "cgroup2")
            .then(|| left.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// This process's own cgroup v2 path ("0::/path" in /proc/self/cgroup).
fn own_cgroup() -> Option<String> {
    let s = fs::read_to_string("/proc/self/cgroup").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
}

impl CgroupRoot {
    /// Finds a cgroup v2 subtree this daemon may manage: below its own
    /// cgroup (a delegated subtree under systemd's `Delegate=yes`, or the
    /// root when running as root), in a folder named after `instance` (the
    /// data dir), so that two daemons never share run cgroups and a
    /// restarted daemon finds its own. Probes by creating and removing a
    /// child and checking `cgroup.kill` exists. `Err` says why not.
    pub fn detect(instance: &Path) -> Result<CgroupRoot, String> {
        let mount = cgroup2_mount().ok_or("no cgroup2 hierarchy is mounted")?;
        let own = own_cgroup().ok_or("this process has no cgroup v2 path")?;
        let base = mount.join(own.trim_start_matches('/'));
        let dir = base.join(format!(
            "cyrnel-{:016x}",
            super::fnv1a(instance.as_os_str().as_bytes())
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
        if !dir.join("cgroup.kill").exists() {
            return Err(format!(
                "{} has no cgroup.kill (kernel older than 5.14)",
                dir.display()
            ));
        }
        let probe = dir.join(format!("probe-{}", std::process::id()));
        fs::create_dir(&probe).map_err(|e| format!("cannot create {}: {e}", probe.display()))?;
        let writable = fs::OpenOptions::new()
            .write(true)
            .open(probe.join("cgroup.procs"))
            .map(|_| ());
        let create_in = writable.is_ok()
            && open_dir(&probe)
                .is_ok_and(|dir| super::spawn::created_in_cgroup_lives(dir.as_raw_fd()));
        if writable.is_ok() && !create_in {
            tracing::info!("run children join their cgroup after the clone: one created in a new cgroup did not live (no CLONE_INTO_CGROUP, or this daemon's cgroup was killed through cgroup.kill)");
        }
        let _ = fs::remove_dir(&probe);
        writable.map_err(|e| format!("cannot move processes into {}: {e}", dir.display()))?;
        let fd = open_dir(&dir).map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
        // Enable the controllers the parent makes available to us, so run
        // cgroups can carry memory.max and pids.max.
        let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
        let controllers: Vec<String> = ["memory", "pids"]
            .into_iter()
            .filter(|c| available.split_whitespace().any(|a| a == *c))
            .filter(|c| fs::write(dir.join("cgroup.subtree_control"), format!("+{c}")).is_ok())
            .map(str::to_string)
            .collect();
        Ok(CgroupRoot {
            dir,
            mount,
            controllers,
            create_in,
            fd: Arc::new(fd),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Removes the instance's folder once no run cgroup is left in it
    /// (graceful stop).
    pub fn remove_if_empty(&self) {
        let _ = fs::remove_dir(&self.dir);
    }

    /// The cgroup of run `id` (whether or not it exists).
    pub fn run(&self, id: u64) -> RunCgroup {
        let name = format!("run-{id}");
        RunCgroup {
            dir: self.dir.join(&name),
            name: CString::new(name).expect("no NUL in a number"),
            root: self.fd.clone(),
            fd: None,
            mount: self.mount.clone(),
            create_in: self.create_in,
            memory: self.has("memory"),
            pids: self.has("pids"),
        }
    }

    /// The ids of the run cgroups that exist under this root (`run-<id>`).
    pub fn existing_runs(&self) -> Vec<u64> {
        let Ok(dir) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("run-")?
                    .parse::<u64>()
                    .ok()
            })
            .collect()
    }

    /// Whether `controller` ("memory", "pids") is enabled for run cgroups.
    pub fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// What a run's cgroup accounted, read once the run is empty. The CPU
/// times come from `cpu.stat` (present on every cgroup v2); the others need
/// their controller enabled for the run's cgroup and are `None` without.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupUsage {
    pub user_us: u64,
    pub system_us: u64,
    /// `memory.peak`: the most memory the cgroup's processes held at once.
    pub memory_peak: Option<u64>,
    /// `oom_kill` of `memory.events`.
    pub oom_kills: Option<u64>,
    /// `pids.peak`: the most processes alive at once.
    pub pids_peak: Option<u64>,
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

impl CgroupUsage {
    fn parse(
        cpu_stat: &str,
        memory_peak: Option<&str>,
        memory_events: Option<&str>,
        pids_peak: Option<&str>,
    ) -> Option<CgroupUsage> {
        Some(CgroupUsage {
            user_us: keyed(cpu_stat, "user_usec")?,
            system_us: keyed(cpu_stat, "system_usec")?,
            memory_peak: memory_peak.and_then(|s| s.trim().parse().ok()),
            oom_kills: memory_events.and_then(|s| keyed(s, "oom_kill")),
            pids_peak: pids_peak.and_then(|s| s.trim().parse().ok()),
        })
    }
}

/// One run's cgroup. Its files are opened relative to its directory once
/// that is open ([`RunCgroup::opened`]: a run the daemon spawned), else by
/// path (a run found after a restart): a path walk through cgroupfs per
/// file was a good part of what settling a run cost.
#[derive(Clone, Debug)]
pub struct RunCgroup {
    dir: PathBuf,
    /// `run-<id>`, its name in the root's directory.
    name: CString,
    /// The root's directory.
    root: Arc<OwnedFd>,
    /// Its own directory, once opened.
    fd: Option<Arc<OwnedFd>>,
    mount: PathBuf,
    /// The root's probe: a child created in a new cgroup lives.
    create_in: bool,
    /// Whether the memory and pids controllers are enabled for it (their
    /// `memory.peak`, `memory.events` and `pids.peak` exist).
    memory: bool,
    pids: bool,
}

/// Opened before spawning: the cgroup's directory. The child is created in
/// it (`clone3` with `CLONE_INTO_CGROUP`), or joins it between clone and
/// exec where the kernel cannot (`spawn.rs`), before it can run any code
/// of its own.
pub struct Joiner {
    fd: Arc<OwnedFd>,
    /// Whether the child may be created in it: a cgroup this daemon just
    /// made (never killed), and a kernel that lets such a child live.
    create_in: bool,
}

impl Joiner {
    pub(crate) fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    pub(crate) fn create_in(&self) -> bool {
        self.create_in
    }
}

/// `openat(dirfd, name, flags | O_CLOEXEC)`.
pub(super) fn open_at(dirfd: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: openat with a C string; returns a new descriptor.
    let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A cgroup's directory, opened `O_RDONLY | O_DIRECTORY | O_CLOEXEC` (std
/// sets `O_CLOEXEC` on every open), as `clone3(CLONE_INTO_CGROUP)` and
/// `openat` of its files take it.
fn open_dir(dir: &Path) -> io::Result<OwnedFd> {
    let dir = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY)
        .open(dir)?;
    Ok(OwnedFd::from(dir))
}

/// Whether a `cgroup.events` text has the line `populated 1`.
fn says_populated(events: &[u8]) -> bool {
    events.split(|b| *b == b'\n').any(|l| l == b"populated 1")
}

/// A run's `cgroup.events`, open and registered for the kernel's change
/// notification: kernfs reports `EPOLLPRI` on an open cgroup file once its
/// content changed since that descriptor last read it. (Not inotify: closing
/// an inotify instance waits for an SRCU grace period, which stalled the
/// runtime thread for up to 30 ms per run.)
pub struct EventsFile {
    fd: tokio::io::unix::AsyncFd<fs::File>,
}

impl EventsFile {
    /// Reads the file again (from offset 0, which also re-arms the
    /// notification): whether `populated 1`.
    pub fn populated(&self) -> io::Result<bool> {
        use std::os::unix::fs::FileExt;
        let mut buf = [0u8; 256];
        // pread(2) at offset 0.
        let n = self.fd.get_ref().read_at(&mut buf, 0)?;
        Ok(says_populated(&buf[..n]))
    }

    /// Waits until the file has changed since the last [`EventsFile::populated`].
    pub async fn changed(&self) -> io::Result<()> {
        let mut guard = self
            .fd
            .ready(tokio::io::Interest::PRIORITY | tokio::io::Interest::ERROR)
            .await?;
        guard.clear_ready();
        Ok(())
    }
}

impl RunCgroup {
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Creates the cgroup (an empty leftover from a crash is reused) and
    /// opens its directory for the child to be created in (a new cgroup)
    /// or to join (a leftover, which may have been killed).
    pub fn prepare(&self, limits: &[(&CStr, u64)]) -> io::Result<Joiner> {
        // SAFETY: mkdirat with a C string relative to the root's open fd.
        let new = if unsafe { libc::mkdirat(self.root.as_raw_fd(), self.name.as_ptr(), 0o777) } == 0
        {
            true
        } else {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
            false
        };
        let fd = open_at(
            self.root.as_raw_fd(),
            &self.name,
            libc::O_RDONLY | libc::O_DIRECTORY,
        )?;
        // Controller limits (memory.max, pids.max), only those enabled.
        for (file, value) in limits {
            let f = open_at(fd.as_raw_fd(), file, libc::O_WRONLY)?;
            io::Write::write_all(&mut fs::File::from(f), value.to_string().as_bytes())?;
        }
        Ok(Joiner {
            fd: Arc::new(fd),
            create_in: new && self.create_in,
        })
    }

    /// The same cgroup, with the directory `joiner` opened (the run was
    /// spawned in it): its files are opened relative to it from now on.
    pub fn opened(mut self, joiner: &Joiner) -> RunCgroup {
        self.fd = Some(joiner.fd.clone());
        self
    }

    /// Opens one of its files (`O_CLOEXEC`).
    fn open_file(&self, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
        match &self.fd {
            Some(dir) => open_at(dir.as_raw_fd(), name, flags),
            None => {
                let path = self.dir.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
                let path = CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)?;
                open_at(libc::AT_FDCWD, &path, flags)
            }
        }
    }

    /// One of its files' text (`None`: missing or unreadable). Read with
    /// plain `read`s: no size hint is asked for (cgroupfs has none).
    fn read(&self, name: &CStr) -> Option<String> {
        let mut f = fs::File::from(self.open_file(name, libc::O_RDONLY).ok()?);
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 512];
        loop {
            match f.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        String::from_utf8(buf).ok()
    }

    pub fn exists(&self) -> bool {
        self.dir.is_dir()
    }

    /// Live members (zombies are not listed).
    pub fn members(&self) -> Vec<i32> {
        self.read(c"cgroup.procs")
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// `populated 1` in cgroup.events: some live process is inside.
    pub fn populated(&self) -> bool {
        let Ok(fd) = self.open_file(c"cgroup.events", libc::O_RDONLY) else {
            return false;
        };
        // The file is two short lines, read whole by one read(2) (as
        // `EventsFile::populated` does).
        let mut buf = [0u8; 256];
        // SAFETY: read(2) into a local buffer of the size passed.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        n > 0 && says_populated(&buf[..n as usize])
    }

    /// Opens `cgroup.events` for change notifications; read it with
    /// [`EventsFile::populated`], then wait with [`EventsFile::changed`],
    /// and no change is missed.
    pub fn events_file(&self) -> io::Result<EventsFile> {
        let fd = fs::File::from(self.open_file(c"cgroup.events", libc::O_RDONLY)?);
        // SAFETY: the AsyncFd takes the File by value and is its only
        // owner; nothing closes or replaces the descriptor while the
        // AsyncFd holds it (it is only read with pread through
        // `get_ref`), so it stays open and the same file until the AsyncFd
        // drops, and `as_raw_fd` returns the same number throughout.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                fd,
                tokio::io::Interest::PRIORITY | tokio::io::Interest::ERROR,
            )
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(EventsFile { fd })
    }

    /// What the cgroup accounted (`None`: `cpu.stat` unreadable). Read it
    /// once the run is empty, before [`RunCgroup::remove`]. The memory and
    /// pids figures only where their controller is enabled (else the files
    /// do not exist).
    pub fn usage(&self) -> Option<CgroupUsage> {
        let read_if = |enabled: bool, name: &CStr| enabled.then(|| self.read(name)).flatten();
        CgroupUsage::parse(
            &self.read(c"cpu.stat")?,
            read_if(self.memory, c"memory.peak").as_deref(),
            read_if(self.memory, c"memory.events").as_deref(),
            read_if(self.pids, c"pids.peak").as_deref(),
        )
    }

    /// SIGKILL to every process in the cgroup, atomically with respect to
    /// forks (the kernel's `cgroup.kill`).
    pub fn kill(&self) -> io::Result<()> {
        let f = self.open_file(c"cgroup.kill", libc::O_WRONLY)?;
        io::Write::write_all(&mut fs::File::from(f), b"1")
    }

    /// Whether `pid` is (still) in this cgroup, from /proc/<pid>/cgroup.
    pub fn contains(&self, pid: i32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|s| names_cgroup(&s, &self.mount, &self.dir))
    }

    /// Removes the (empty) cgroup.
    pub fn remove(&self) {
        // SAFETY: unlinkat with a C string relative to the root's open fd.
        let r = unsafe {
            libc::unlinkat(
                self.root.as_raw_fd(),
                self.name.as_ptr(),
                libc::AT_REMOVEDIR,
            )
        };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(cgroup = %self.dir.display(), error = %e, "removing a run cgroup failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `/bin/true` in the cgroup the joiner opened, as a run's child
    /// is spawned: how it ended (`si_code`, `si_status`).
    fn run_true_in(joiner: &Joiner) -> (i32, i32) {
        super::super::spawn::run_true_for_test(joiner.raw_fd(), joiner.create_in())
    }

    /// A child is created in a new cgroup, and joins a leftover one that
    /// was killed before (created in it, it would die at birth on some
    /// kernels): either way it runs.
    #[test]
    fn a_killed_leftover_cgroup_is_joined_not_created_in() {
        let instance = tempfile::tempdir().unwrap();
        let Ok(root) = CgroupRoot::detect(instance.path()) else {
            // No cgroup v2 subtree this process may manage: nothing to test.
            return;
        };
        let fresh = root.run(1);
        let joiner = fresh.prepare(&[]).unwrap();
        assert_eq!(joiner.create_in(), root.create_in);
        assert_eq!(run_true_in(&joiner), (libc::CLD_EXITED, 0));
        fresh.remove();
        // A leftover of a crash, killed (empty) before this run.
        let leftover = root.run(2);
        fs::create_dir(leftover.path()).unwrap();
        leftover.kill().unwrap();
        let joiner = leftover.prepare(&[]).unwrap();
        assert!(!joiner.create_in());
        assert_eq!(run_true_in(&joiner), (libc::CLD_EXITED, 0));
        leftover.remove();
        root.remove_if_empty();
    }

    #[test]
    fn usage_reads_cpu_stat_and_what_the_controllers_offer() {
        let cpu = "usage_usec 5000\nuser_usec 3000\nsystem_usec 2000\nnr_periods 0\n";
        let events = "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n";
        assert_eq!(
            CgroupUsage::parse(cpu, Some("67108864\n"), Some(events), Some("3\n")),
            Some(CgroupUsage {
                user_us: 3000,
                system_us: 2000,
                memory_peak: Some(64 << 20),
                oom_kills: Some(1),
                pids_peak: Some(3),
            })
        );
        let only_cpu = CgroupUsage::parse(cpu, None, None, None).unwrap();
        assert_eq!(
            (only_cpu.memory_peak, only_cpu.oom_kills, only_cpu.pids_peak),
            (None, None, None)
        );
        assert_eq!(CgroupUsage::parse("usage_usec 1\n", None, None, None), None);
    }

    #[test]
    fn membership_compares_the_whole_path() {
        let mount = Path::new("/sys/fs/cgroup");
        let dir = Path::new("/sys/fs/cgroup/svc/cyrnel-1/run-7");
        assert!(names_cgroup("0::/svc/cyrnel-1/run-7\n", mount, dir));
        assert!(names_cgroup(
            "1:name=systemd:/x\n0::/svc/cyrnel-1/run-7\n",
            mount,
            dir
        ));
        // The root cgroup (an empty path) and other cgroups are not it.
        assert!(!names_cgroup("0::/\n", mount, dir));
        assert!(!names_cgroup("0::\n", mount, dir));
        assert!(!names_cgroup("0::/run-7\n", mount, dir));
        assert!(!names_cgroup("0::/svc/cyrnel-1/run-70\n", mount, dir));
        assert!(!names_cgroup(
            "1:name=systemd:/svc/cyrnel-1/run-7\n",
            mount,
            dir
        ));
    }
}
