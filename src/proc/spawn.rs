//! Starting a child the way `posix_spawn` does: `clone(CLONE_VM |
//! CLONE_VFORK | CLONE_PIDFD)`. The child shares the daemon's memory until
//! it calls `execve`, so nothing is copied: no page tables, and no
//! copy-on-write faults (each of which costs a TLB shootdown across the
//! cores) in the daemon afterwards. A plain `fork` of the daemon cost more
//! CPU than everything else a run does (BENCHMARKS.md). `std::process`
//! would fall back to `fork` as soon as a pre-exec hook is set, and runs
//! need one: they join their cgroup and take their rlimits before exec.
//!
//! The rules for the code that runs in the child ([`child_main`]): it runs
//! on its own small stack, in the daemon's memory, while the calling thread
//! is suspended and the daemon's other threads keep running. It therefore
//! only makes system calls on data prepared by the parent: no allocation,
//! no lock, no glibc wrapper that keeps process-wide state (setuid and
//! friends go through `syscall` because glibc's wrappers would signal the
//! daemon's threads). All signals are blocked across the clone and the
//! child resets every disposition to the default before unblocking them,
//! so no daemon signal handler can run in the child. Where the child is
//! made with `clone3`, the kernel resets the handlers itself
//! (`CLONE_CLEAR_SIGHAND`) and the child only resets the signals the
//! daemon ignores (see [`ignored_signals`]).
//!
//! On a thread dedicated to spawning, the child also shares the daemon's
//! descriptor table (`CLONE_FILES`) and copies only its lowest slots before
//! it sets up its own descriptors, so a spawn does not cost more with every
//! client the daemon serves (see [`StdioSlots`]). Until then it only reads
//! descriptors the spawning thread holds, and adds nothing to the table
//! but the socket it brings loopback up with (closed on every path).

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

use super::sandbox::{Seccomp, Steps};

/// The child's stack. Its frames are small (system calls only); execve
/// itself runs on the kernel stack.
const CHILD_STACK: usize = 64 * 1024;

/// What the child must do, prepared by the parent before the clone.
pub struct Exec<'a> {
    pub program: &'a Path,
    pub args: &'a [&'a OsStr],
    pub env: &'a [(String, String)],
    pub cwd: &'a Path,
    /// An fd on the run's cgroup directory: the child is created in it
    /// (`clone3` with `CLONE_INTO_CGROUP`) when `into_cgroup` says so and
    /// the kernel can, else it joins it by writing "0" to its
    /// `cgroup.procs` before exec.
    pub cgroup: Option<RawFd>,
    pub into_cgroup: bool,
    pub rlimits: &'a [(libc::__rlimit_resource_t, libc::rlim_t)],
    /// `(uid, gid)`; supplementary groups are dropped.
    pub credentials: Option<(u32, u32)>,
    /// The run's isolation (`sandbox.rs`).
    pub sandbox: &'a Steps,
}

/// A child that has called execve: its pid, a pidfd on it, and the read
/// ends of its stdout and stderr pipes.
pub struct Child {
    pub pid: i32,
    pub pidfd: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    /// The child's start time in clock ticks since boot, as
    /// `/proc/<pid>/stat` shows it, when the clock alone tells it (see
    /// [`start_ticks`]); `None`: read it from `/proc`.
    pub start_time: Option<u64>,
}

impl Child {
    /// Waits for the child to end and reaps it: `(si_code, si_status)`,
    /// e.g. `(CLD_EXITED, code)`. For start-up probes and tests; runs are
    /// waited for through `Leader`.
    pub fn wait(&self) -> io::Result<(i32, i32)> {
        wait_pidfd(&self.pidfd)
    }
}

/// A blocking `waitid` that reaps our own child through its pidfd:
/// `(si_code, si_status)`.
fn wait_pidfd(pidfd: &OwnedFd) -> io::Result<(i32, i32)> {
    // SAFETY: siginfo_t is a C struct of integers and a union of integers
    // and pointers, for which all-zero bytes are a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t that outlives the call,
    // and the pidfd is open (borrowed for the call).
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::__WALL,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid succeeded without WNOHANG, so the kernel filled in the
    // SIGCHLD layout of the union, of which si_status is a member.
    Ok((info.si_code, unsafe { info.si_status() }))
}

/// Which step failed in the child (stored with its errno).
#[derive(Clone, Copy)]
#[repr(i32)]
enum Step {
    Signals = 1,
    ProcessGroup,
    Cgroup,
    Rlimit,
    Namespaces,
    Mounts,
    Loopback,
    Capabilities,
    Credentials,
    Chdir,
    Stdio,
    Landlock,
    Seccomp,
    Exec,
}

impl Step {
    fn from_i32(n: i32) -> Option<Step> {
        Some(match n {
            1 => Step::Signals,
            2 => Step::ProcessGroup,
            3 => Step::Cgroup,
            4 => Step::Rlimit,
            5 => Step::Namespaces,
            6 => Step::Mounts,
            7 => Step::Loopback,
            8 => Step::Capabilities,
            9 => Step::Credentials,
            10 => Step::Chdir,
            11 => Step::Stdio,
            12 => Step::Landlock,
            13 => Step::Seccomp,
            14 => Step::Exec,
            _ => return None,
        })
    }

    fn describe(self) -> &'static str {
        match self {
            Step::Signals => "resetting signal handlers",
            Step::ProcessGroup => "creating the process group",
            Step::Cgroup => "joining the run's cgroup",
            Step::Rlimit => "setting resource limits",
            Step::Namespaces => "creating the run's namespaces",
            Step::Mounts => "preparing the run's file system view",
            Step::Loopback => "bringing up loopback in the run's network namespace",
            Step::Capabilities => "dropping capabilities",
            Step::Landlock => "applying the Landlock ruleset",
            Step::Seccomp => "applying the seccomp filter",
            Step::Credentials => "switching user and group",
            Step::Chdir => "entering the working directory",
            Step::Stdio => "setting up stdin, stdout and stderr",
            Step::Exec => "exec",
        }
    }
}

/// Level `full`'s mount work, as raw pointers into the parent's memory.
struct ChildMounts {
    private_tmp: RawFd,
    mask_dirs: *const *const libc::c_char,
    n_mask_dirs: usize,
    /// Detached mounts for `mask_dirs` (null: mount a new tmpfs on each).
    mask_fds: *const RawFd,
    /// A detached `proc` for `/proc` (-1: mount a new instance).
    proc: RawFd,
    mask_files: *const *const libc::c_char,
    n_mask_files: usize,
    shared: *const *const libc::c_char,
    n_shared: usize,
    dev_shm: bool,
}

/// Everything the child reads, as raw pointers into memory the parent keeps
/// alive (and unchanged) until the clone returns.
struct ChildArgs {
    /// The signals whose disposition the child resets to the default:
    /// every one ([`all_signals`]), or only the ignored ones
    /// ([`ignored_signals`]) where the kernel already reset every handler
    /// (`CLONE_CLEAR_SIGHAND`).
    reset: *const libc::c_int,
    n_reset: usize,
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    /// Nonzero when the child shares the parent's descriptor table
    /// (`CLONE_FILES`): it takes a copy of the slots below this one only
    /// (`close_range(.., CLOSE_RANGE_UNSHARE)`) before it sets up its
    /// stdio. See [`StdioSlots`].
    fd_limit: libc::c_uint,
    /// The `cgroup.procs` of a cgroup to join, opened for writing by the
    /// parent (-1: none, or the child was created in it).
    join_cgroup: RawFd,
    rlimits: *const (libc::__rlimit_resource_t, libc::rlim_t),
    n_rlimits: usize,
    credentials: Option<(u32, u32)>,
    unshare: libc::c_int,
    mounts: Option<ChildMounts>,
    loopback_up: bool,
    no_new_privs: bool,
    landlock: RawFd,
    seccomp: *const libc::sock_fprog,
    /// Written by the child on failure: the step and its errno.
    failed_step: AtomicI32,
    failed_errno: AtomicI32,
    /// `CLOCK_BOOTTIME` in ns, read by the child first thing.
    child_boottime: std::sync::atomic::AtomicU64,
    /// The CPU affinity to take back before exec (null: unchanged).
    affinity: *const libc::cpu_set_t,
    /// The nice value to take back before exec (the spawning thread runs
    /// at a higher priority, [`prioritize_this_thread`]).
    nice: Option<libc::c_int>,
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::other("a path, argument or variable contains NUL"))
}

/// `/dev/null` for every child's stdin, opened once.
fn dev_null() -> io::Result<RawFd> {
    static NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let fd = std::fs::File::open("/dev/null")?;
    Ok(NULL
        .get_or_init(|| above_stdio(fd.into()).expect("dup of /dev/null"))
        .as_raw_fd())
}

/// The same fd, moved above 2 if it is one of the standard descriptors
/// (a daemon started with those closed), so the child's dup2 onto 0, 1
/// and 2 never overwrites a source it still needs.
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    dup_above_stdio(fd.as_raw_fd())
}

/// A close-on-exec duplicate of `fd` in the lowest free slot above the
/// standard three.
fn dup_above_stdio(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor that we own.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: n is a fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// A pipe with both ends close-on-exec: (read, write).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors from pipe2.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((above_stdio(r)?, above_stdio(w)?))
}

/// `struct clone_args` of `clone3(2)` (the fields up to `cgroup`, Linux 5.7).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
/// clone3: reset every signal handler to the default in the child (Linux
/// 5.5; `CLONE_INTO_CGROUP` needs 5.7, so wherever clone3 is used here).
const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;

/// The signals this process ignores (`SIG_IGN`), read once: the Rust
/// runtime ignores SIGPIPE before `main`, and the daemon never ignores a
/// signal after start-up (it installs handlers, which `CLONE_CLEAR_SIGHAND`
/// resets). A child made with `CLONE_CLEAR_SIGHAND` keeps ignored signals
/// ignored, so it resets these itself: one system call each, where
/// resetting every signal took 62 per spawn.
fn ignored_signals() -> &'static [libc::c_int] {
    static IGNORED: OnceLock<Vec<libc::c_int>> = OnceLock::new();
    IGNORED.get_or_init(|| {
        all_signals()
            .iter()
            .copied()
            .filter(|&sig| {
                // The kernel's struct sigaction: handler first.
                let mut old = [0u64; 4];
                // SAFETY: a query (no new action) into a local buffer of
                // the kernel's sigaction size; raw, because glibc refuses
                // its internal signals.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        std::ptr::null::<u64>(),
                        old.as_mut_ptr(),
                        8usize,
                    )
                };
                r == 0 && old[0] == libc::SIG_IGN as u64
            })
            .collect()
    })
}

/// Every signal whose disposition can be set (1 to 64 but SIGKILL and
/// SIGSTOP).
fn all_signals() -> &'static [libc::c_int] {
    static ALL: OnceLock<Vec<libc::c_int>> = OnceLock::new();
    ALL.get_or_init(|| {
        (1..=64)
            .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
            .collect()
    })
}

/// Set once `clone3` with `CLONE_INTO_CGROUP` turned out to be missing.
static CLONE3_UNAVAILABLE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// `clone3(args)`, the child running `f(arg)` on the stack `args` gives
/// and exiting with its return value. The C library has no wrapper that
/// takes a function, so the system call is made here: in the child, which
/// starts on the new stack with the parent's registers, the callee-saved
/// registers still hold `f` and `arg`.
///
/// # Safety
/// `args` must describe a valid stack for the child (and `CLONE_VM` with
/// `CLONE_VFORK`, the only way it is used, so the parent's memory stays
/// untouched while the child runs); `f` must follow `child_main`'s rules.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3(
    args: &CloneArgs,
    f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    arg: *mut libc::c_void,
) -> io::Result<i32> {
    let ret: i64;
    std::arch::asm!(
        "syscall",
        "test rax, rax",
        "jnz 2f",
        // The child: no frame above this one; the stack top is 16-byte
        // aligned, as a call expects.
        "xor ebp, ebp",
        "mov rdi, r12",
        "call r13",
        "mov edi, eax",
        "mov eax, {exit}",
        "syscall",
        "ud2",
        "2:",
        exit = const libc::SYS_exit,
        inlateout("rax") libc::SYS_clone3 => ret,
        in("rdi") args as *const CloneArgs,
        in("rsi") std::mem::size_of::<CloneArgs>(),
        in("r12") arg,
        in("r13") f,
        lateout("rcx") _,
        lateout("r11") _,
        options(nostack),
    );
    if ret < 0 {
        Err(io::Error::from_raw_os_error(-ret as i32))
    } else {
        Ok(ret as i32)
    }
}

/// Elsewhere the child joins its cgroup through `cgroup.procs`.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3(
    _args: &CloneArgs,
    _f: extern "C" fn(*mut libc::c_void) -> libc::c_int,
    _arg: *mut libc::c_void,
) -> io::Result<i32> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}

/// Whether a child created in `cgroup` (`clone3` with `CLONE_INTO_CGROUP`)
/// lives: some kernels (6.18 here) kill such a child at birth when the
/// parent's cgroup and the target differ in how often they were killed
/// through `cgroup.kill` (a fork-versus-kill check that compares the
/// parent's cgroup at the start with the target at the end). `cgroup`
/// should be a new, never-killed cgroup: then this tells whether the
/// daemon's own cgroup was ever killed. `false` also where clone3 or
/// `CLONE_INTO_CGROUP` is missing.
pub fn created_in_cgroup_lives(cgroup: RawFd) -> bool {
    extern "C" fn exit_at_once(_: *mut libc::c_void) -> libc::c_int {
        // SAFETY: ends the child without running anything of the daemon.
        unsafe { libc::_exit(0) }
    }
    let mut stack: Vec<MaybeUninit<u8>> = Vec::with_capacity(16 * 1024);
    let top = (stack.as_mut_ptr() as usize + 16 * 1024) & !0xf;
    let mut pidfd: libc::c_int = -1;
    let clone_args = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD) as u64 | CLONE_INTO_CGROUP,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        stack: stack.as_mut_ptr() as u64,
        stack_size: (top - stack.as_ptr() as usize) as u64,
        cgroup: cgroup as u64,
        ..CloneArgs::default()
    };
    let blocked = SignalsBlocked::new();
    // SAFETY: signals blocked across the clone as in `spawn`; the child
    // only exits, on the stack `clone_args` describes, which outlives it
    // (CLONE_VFORK: this thread waits until the child has exited).
    let result = unsafe { clone3(&clone_args, exit_at_once, std::ptr::null_mut()) };
    drop(blocked);
    result.is_ok() && exited_zero(pidfd)
}

/// Every signal blocked in the calling thread until drop, which restores
/// the thread's mask: a child cloned meanwhile starts with them blocked,
/// so no handler of the daemon can run in it.
struct SignalsBlocked(libc::sigset_t);

impl SignalsBlocked {
    fn new() -> SignalsBlocked {
        // SAFETY: sigset_t is an array of integers: all-zero bytes are a
        // valid (empty) set, which sigfillset fills; pthread_sigmask
        // changes only this thread's mask and writes the old one into
        // `old`, a live local.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
            SignalsBlocked(old)
        }
    }
}

impl Drop for SignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `new`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Whether the child behind `pidfd` (fresh from `CLONE_PIDFD`, owned from
/// here) exited with status 0; waits for it and reaps it.
fn exited_zero(pidfd: libc::c_int) -> bool {
    // SAFETY: CLONE_PIDFD gave the caller a fresh descriptor on the child,
    // which it hands over.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    wait_pidfd(&pidfd).is_ok_and(|(code, status)| code == libc::CLD_EXITED && status == 0)
}

thread_local! {
    /// The nice value children of this thread take back before exec, when
    /// the thread raised its own priority.
    static CHILD_NICE: std::cell::Cell<Option<libc::c_int>> = const { std::cell::Cell::new(None) };
}

/// How much higher than the daemon's the spawning thread's priority is.
const SPAWNER_BOOST: libc::c_int = 5;

/// Raises the calling thread's priority (nice value lowered by
/// [`SPAWNER_BOOST`]) when the daemon may (CAP_SYS_NICE); its children
/// take the daemon's nice value back right before exec, so runs start at
/// the daemon's priority. The thread that spawns runs is a serial stage:
/// it waits for each child's isolation steps and exec, and starved of CPU
/// by the runs it started it limited how many runs a second the daemon
/// could start. Returns whether the priority was raised.
pub fn prioritize_this_thread() -> bool {
    // SAFETY: getpriority/setpriority on the calling thread (a tid is a
    // valid PRIO_PROCESS target for one thread on Linux).
    unsafe {
        let tid = libc::gettid() as libc::id_t;
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, tid);
        if nice == -1 && *libc::__errno_location() != 0 {
            return false;
        }
        let boosted = (nice - SPAWNER_BOOST).max(-20);
        if boosted == nice || libc::setpriority(libc::PRIO_PROCESS, tid, boosted) != 0 {
            return false;
        }
        CHILD_NICE.set(Some(nice));
        true
    }
}

thread_local! {
    /// Whether this thread's capability bounding set is already empty.
    static BOUNDING_EMPTY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Empties the calling thread's capability bounding set, once per thread.
///
/// A child inherits the bounding set of the thread that clones it, so a
/// thread whose children must all start with an empty one drops every
/// capability from its own set once, instead of each child dropping them
/// one by one (a `PR_CAPBSET_DROP` per capability, each of which copies
/// and commits the credentials: about 80 µs per spawn measured here).
/// The thread keeps its effective and permitted sets: the bounding set
/// only limits what an `execve` can grant, and the threads that spawn
/// runs never exec anything else. But threads it creates later inherit
/// the empty set too, and a root child exec'd from it by other code would
/// start without capabilities: spawn sandboxed runs from dedicated
/// threads (the starter; the probe runs on a thread of its own).
fn empty_bounding_set() -> io::Result<()> {
    if BOUNDING_EMPTY.get() {
        return Ok(());
    }
    for cap in 0..64 {
        // SAFETY: prctl on this thread's own credentials.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            let e = io::Error::last_os_error();
            // EINVAL past the kernel's last capability.
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(io::Error::new(
                    e.kind(),
                    format!("emptying the capability bounding set: {e}"),
                ));
            }
        }
    }
    BOUNDING_EMPTY.set(true);
    Ok(())
}

/// Where the calling thread stands with seccomp stage one (see
/// [`Seccomp`]).
enum StageOne {
    /// Not a spawning thread: its children install the whole filter, and
    /// the thread itself is never changed.
    NotHere,
    /// Dedicated to spawning ([`dedicate_this_thread`]): takes stage one
    /// at its first sandboxed spawn.
    Allowed,
    Installed(std::sync::Arc<[libc::sock_filter]>),
    /// Installing failed; its children install the whole filter.
    Failed,
}

thread_local! {
    static STAGE_ONE: std::cell::RefCell<StageOne> = const { std::cell::RefCell::new(StageOne::NotHere) };
}

/// Marks the calling thread as one that spawns runs and does nothing
/// else: at its first spawn with a seccomp filter it puts `no_new_privs`
/// and the filter's stage one on itself, for good, and every later child
/// only adds stage two (see [`Seccomp`]). Stage one denies what the
/// thread and any thread it creates could otherwise do (ptrace, keyrings,
/// BPF, io_uring, namespaces through `clone`, ...), so only threads that
/// exist to spawn (the starter, the start-up probe) call this; the
/// children of any other thread install the whole filter. It also gives
/// the thread its [`StdioSlots`], so call it early, while the daemon holds
/// few descriptors: the slots are the lowest free ones.
pub fn dedicate_this_thread() {
    STAGE_ONE.with_borrow_mut(|s| {
        if matches!(s, StageOne::NotHere) {
            *s = StageOne::Allowed;
        }
    });
    STDIO_SLOTS.with_borrow_mut(|slots| {
        if slots.is_none() {
            match StdioSlots::new() {
                Ok(made) => *slots = made,
                Err(e) => {
                    tracing::warn!(error = %e, "no descriptor slots for the spawning thread; each child copies the daemon's whole descriptor table")
                }
            }
        }
    });
}

/// Two descriptor slots, low in the daemon's table and held for the life
/// of a spawning thread, through which its children get their stdout and
/// stderr.
///
/// A child made by `clone` copies its parent's whole descriptor table
/// (a reference on every open file) and closes the copies at exec: about
/// 0.1 µs per descriptor the daemon holds, so with a thousand idle
/// clients (`/events` streams, keep-alive connections) some 100 µs per
/// spawn, spent on the serial spawning thread. The children of a thread
/// with slots share the table instead (`CLONE_FILES`) and, before they
/// set up their stdio, take a copy of the slots below
/// [`StdioSlots::limit`] only (`close_range` with `CLOSE_RANGE_UNSHARE`,
/// Linux 5.9, sound since the fix checked in [`table_unshares_below`]):
/// `/dev/null` and the two slots, into which the thread duplicates the
/// child's pipe ends before the clone (and `/dev/null` again after it, so
/// the pipes see their end when the child's copies close). The child
/// closes whatever else it copied below the limit, as it does with a
/// whole table.
struct StdioSlots {
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// One past the highest of the slots and `/dev/null`.
    limit: libc::c_uint,
}

thread_local! {
    /// This thread's slots (only on a thread dedicated to spawning, and
    /// where the kernel can unshare a table by `close_range`).
    static STDIO_SLOTS: std::cell::RefCell<Option<StdioSlots>> = const { std::cell::RefCell::new(None) };
}

impl StdioSlots {
    /// `None` where the kernel cannot unshare a table by `close_range`
    /// soundly (before Linux 5.9, the call filtered, or without the fix
    /// of CVE-2024-45025): see [`table_unshares_below`].
    fn new() -> io::Result<Option<StdioSlots>> {
        let null = dev_null()?;
        let (stdout, stderr) = (dup_above_stdio(null)?, dup_above_stdio(null)?);
        let highest = null.max(stdout.as_raw_fd()).max(stderr.as_raw_fd());
        let limit = highest as libc::c_uint + 1;
        Ok(table_unshares_below(limit).then_some(StdioSlots {
            stdout,
            stderr,
            limit,
        }))
    }
}

/// Whether a child sharing this process's descriptor table can take a
/// copy of its slots below `limit` (`close_range` with
/// `CLOSE_RANGE_UNSHARE`) and get a sound table.
///
/// Kernels from 5.9 until the fix of CVE-2024-45025 (6.11, and the stable
/// releases it was backported to) copied stale "word full" bits for the
/// slots above the cut: where the parent had 64 consecutive descriptors
/// open there, the child's later descriptors skip those numbers (and a
/// process with a low `RLIMIT_NOFILE` runs out early). So the check makes
/// that case: a first child, with a private copy of the table, fills the
/// 64 slots from the first multiple of 64 at or above `limit`; a child of
/// it sharing that table unshares below `limit` and checks that the
/// lowest free slot from there is the first of them. Both are made
/// `CLONE_VM | CLONE_VFORK` and only make system calls. What it finds is
/// the kernel's, so it is checked once per process (at the first thread's
/// `limit`).
fn table_unshares_below(limit: libc::c_uint) -> bool {
    static SOUND: OnceLock<bool> = OnceLock::new();
    *SOUND.get_or_init(|| check_unshare_below(limit))
}

/// The check of [`table_unshares_below`].
fn check_unshare_below(limit: libc::c_uint) -> bool {
    struct Probe {
        limit: libc::c_uint,
        /// The first of the 64 slots filled (a multiple of 64).
        block: libc::c_int,
        null: RawFd,
        inner_stack: *mut libc::c_void,
    }
    extern "C" fn shares_and_unshares(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `arg` is the parent's Probe, alive while it is suspended
        // (CLONE_VFORK); system calls on its numbers, then the child ends
        // without running anything of the daemon. The table it changes is
        // its own copy, or, if the call failed, the shared one untouched.
        unsafe {
            let p = &*(arg as *const Probe);
            let ok = libc::syscall(
                libc::SYS_close_range,
                p.limit,
                u32::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            ) == 0
                && libc::fcntl(p.null, libc::F_DUPFD_CLOEXEC, p.block) == p.block;
            libc::_exit(if ok { 0 } else { 1 })
        }
    }
    extern "C" fn fills_then_clones(arg: *mut libc::c_void) -> libc::c_int {
        // SAFETY: as above; this child has a private copy of the daemon's
        // table (no CLONE_FILES), so filling slots in it changes nothing of
        // the daemon's; it waits for its own child, which exits at once.
        unsafe {
            let p = &*(arg as *const Probe);
            for fd in p.block..p.block + 64 {
                if libc::fcntl(fd, libc::F_GETFD) < 0 && libc::dup2(p.null, fd) != fd {
                    libc::_exit(2);
                }
            }
            let pid = libc::clone(
                shares_and_unshares,
                p.inner_stack,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_FILES,
                arg,
            );
            let mut status = 0;
            let ok = pid > 0
                && libc::waitpid(pid, &mut status, libc::__WALL) == pid
                && libc::WIFEXITED(status)
                && libc::WEXITSTATUS(status) == 0;
            libc::_exit(if ok { 0 } else { 1 })
        }
    }
    let Ok(null) = dev_null() else {
        return false;
    };
    const STACK: usize = 16 * 1024;
    let mut stacks: Vec<MaybeUninit<u8>> = Vec::with_capacity(2 * STACK);
    let base = stacks.as_mut_ptr() as usize;
    let top = |i: usize| ((base + (i + 1) * STACK) & !0xf) as *mut libc::c_void;
    let probe = Probe {
        limit,
        block: (limit.div_ceil(64) * 64) as libc::c_int,
        null,
        inner_stack: top(1),
    };
    let mut pidfd: libc::c_int = -1;
    let blocked = SignalsBlocked::new();
    // SAFETY: signals blocked across the clone as in `spawn`; the children
    // run on the two halves of `stacks` with a pointer to `probe`, both
    // alive until they have exited (CLONE_VFORK: this thread waits for the
    // first, which waits for the second).
    let pid = unsafe {
        libc::clone(
            fills_then_clones,
            top(0),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD,
            (&probe as *const Probe).cast_mut().cast(),
            &mut pidfd as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
        )
    };
    drop(blocked);
    drop(stacks);
    pid >= 0 && exited_zero(pidfd)
}

/// The pipe ends duplicated into a thread's [`StdioSlots`] for one spawn;
/// on drop, the slots hold `/dev/null` again.
struct InSlots {
    slots: [RawFd; 2],
    null: RawFd,
}

impl InSlots {
    fn new(slots: &StdioSlots, null: RawFd, stdout: RawFd, stderr: RawFd) -> io::Result<InSlots> {
        let put = |from: RawFd, to: &OwnedFd| -> io::Result<()> {
            // SAFETY: dup3 onto a slot this thread owns, which stays open
            // (it now refers to `from`'s file).
            if unsafe { libc::dup3(from, to.as_raw_fd(), libc::O_CLOEXEC) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        let in_slots = InSlots {
            slots: [slots.stdout.as_raw_fd(), slots.stderr.as_raw_fd()],
            null,
        };
        put(stdout, &slots.stdout)?;
        put(stderr, &slots.stderr)?;
        Ok(in_slots)
    }
}

impl Drop for InSlots {
    fn drop(&mut self) {
        for slot in self.slots {
            // SAFETY: as in `new`: the slot stays open, on /dev/null.
            unsafe { libc::dup3(self.null, slot, libc::O_CLOEXEC) };
        }
    }
}

/// The filter a child of this thread installs for `s`: stage two when the
/// thread runs under `s.first` (installed here on a dedicated thread's
/// first call), else the whole filter.
fn child_filter(s: &Seccomp) -> &[libc::sock_filter] {
    STAGE_ONE.with_borrow_mut(|state| {
        if matches!(state, StageOne::Allowed) {
            *state = match install_on_this_thread(&s.first) {
                Ok(()) => StageOne::Installed(s.first.clone()),
                Err(e) => {
                    tracing::warn!(error = %e, "seccomp stage one on the spawning thread failed; each child installs the whole filter");
                    StageOne::Failed
                }
            };
        }
        match state {
            StageOne::Installed(f) if std::sync::Arc::ptr_eq(f, &s.first) => &s.second[..],
            _ => &s.whole[..],
        }
    })
}

/// `no_new_privs` and then `prog` as a seccomp filter on the calling
/// thread only (no `SECCOMP_FILTER_FLAG_TSYNC`). With
/// `SECCOMP_FILTER_FLAG_SPEC_ALLOW` where the kernel knows it (Linux
/// 4.17): on kernels that turn speculative-execution mitigations on for
/// every task with a filter, the daemon's thread stays as it was; each
/// child's stage two, installed without the flag, still turns them on for
/// the run.
fn install_on_this_thread(prog: &[libc::sock_filter]) -> io::Result<()> {
    const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
    const SECCOMP_FILTER_FLAG_SPEC_ALLOW: libc::c_ulong = 1 << 2;
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_ptr().cast_mut(),
    };
    // SAFETY: prctl and seccomp on the calling thread; `fprog` points at
    // `prog`, alive for the calls (the kernel copies the program).
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(io::Error::last_os_error());
        }
        let with_flag = libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            &fprog as *const libc::sock_fprog,
        );
        if with_flag == 0 {
            return Ok(());
        }
        if *libc::__errno_location() != libc::EINVAL
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog,
                0,
                0,
            ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Starts `exec` as a child of the calling thread. Returns once the child
/// has called execve (or failed before it, in which case it is reaped and
/// the error returned). With `sandbox.drop_bounding`, the calling thread's
/// own bounding set is emptied first (once; see [`empty_bounding_set`]).
pub fn spawn(exec: &Exec<'_>) -> io::Result<Child> {
    if exec.sandbox.drop_bounding {
        empty_bounding_set()?;
    }
    let program = cstring(exec.program.as_os_str().as_bytes())?;
    let mut argv_own = Vec::with_capacity(exec.args.len() + 1);
    argv_own.push(program.clone());
    for a in exec.args {
        argv_own.push(cstring(a.as_bytes())?);
    }
    let mut envp_own = Vec::with_capacity(exec.env.len());
    for (k, v) in exec.env {
        let mut kv = Vec::with_capacity(k.len() + v.len() + 1);
        kv.extend_from_slice(k.as_bytes());
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        envp_own.push(cstring(&kv)?);
    }
    let argv: Vec<*const libc::c_char> = argv_own
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const libc::c_char> = envp_own
        .iter()
        .map(|c| c.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let cwd = cstring(exec.cwd.as_os_str().as_bytes())?;
    let stdin = dev_null()?;
    let seccomp = exec.sandbox.seccomp.as_deref().map(|s| {
        let prog = child_filter(s);
        libc::sock_fprog {
            len: prog.len() as libc::c_ushort,
            filter: prog.as_ptr().cast_mut(),
        }
    });
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    // The child's stdout and stderr: through this thread's slots, where it
    // has them (the child then shares the table), else the pipe ends.
    let in_slots = STDIO_SLOTS.with_borrow(|slots| {
        slots
            .as_ref()
            .map(|sl| {
                InSlots::new(sl, stdin, out_w.as_raw_fd(), err_w.as_raw_fd()).map(|i| (i, sl.limit))
            })
            .transpose()
    })?;
    let (child_out, child_err, fd_limit) = match &in_slots {
        Some((i, limit)) => (i.slots[0], i.slots[1], *limit),
        None => (out_w.as_raw_fd(), err_w.as_raw_fd(), 0),
    };
    let share_table = if fd_limit != 0 { libc::CLONE_FILES } else { 0 };
    let mask_fds: Vec<RawFd> = exec
        .sandbox
        .mounts
        .as_ref()
        .map(|m| m.masks.iter().map(|f| f.as_raw_fd()).collect())
        .unwrap_or_default();
    let pointers = |paths: &[CString]| -> Vec<*const libc::c_char> {
        paths.iter().map(|c| c.as_ptr()).collect()
    };
    let (mask_dirs, mask_files, shared) = exec
        .sandbox
        .mounts
        .as_ref()
        .map(|m| {
            (
                pointers(&m.mask_dirs),
                pointers(&m.mask_files),
                pointers(&m.shared),
            )
        })
        .unwrap_or_default();

    let (every, ignored) = (all_signals(), ignored_signals());
    let mut args = ChildArgs {
        reset: every.as_ptr(),
        n_reset: every.len(),
        program: program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        cwd: cwd.as_ptr(),
        stdin,
        stdout: child_out,
        stderr: child_err,
        fd_limit,
        join_cgroup: -1,
        rlimits: exec.rlimits.as_ptr(),
        n_rlimits: exec.rlimits.len(),
        credentials: exec.credentials,
        unshare: exec.sandbox.unshare,
        mounts: exec.sandbox.mounts.as_ref().map(|m| ChildMounts {
            private_tmp: m.private_tmp,
            mask_dirs: mask_dirs.as_ptr(),
            n_mask_dirs: mask_dirs.len(),
            mask_fds: if mask_fds.len() == mask_dirs.len() && !mask_fds.is_empty() {
                mask_fds.as_ptr()
            } else {
                std::ptr::null()
            },
            proc: m.proc.as_ref().map_or(-1, |f| f.as_raw_fd()),
            mask_files: mask_files.as_ptr(),
            n_mask_files: mask_files.len(),
            shared: shared.as_ptr(),
            n_shared: shared.len(),
            dev_shm: m.dev_shm,
        }),
        loopback_up: exec.sandbox.loopback_up,
        no_new_privs: exec.sandbox.no_new_privs,
        landlock: exec.sandbox.landlock.as_ref().map_or(-1, |f| f.as_raw_fd()),
        seccomp: seccomp.as_ref().map_or(std::ptr::null(), |p| p as *const _),
        failed_step: AtomicI32::new(0),
        failed_errno: AtomicI32::new(0),
        child_boottime: std::sync::atomic::AtomicU64::new(0),
        affinity: std::ptr::null(),
        nice: CHILD_NICE.get(),
    };
    let mut stack: Vec<MaybeUninit<u8>> = Vec::with_capacity(CHILD_STACK);
    // The stack grows down: hand clone its 16-byte aligned top.
    let top = {
        let end = stack.as_mut_ptr() as usize + CHILD_STACK;
        (end & !0xf) as *mut libc::c_void
    };
    let mut pidfd: libc::c_int = -1;
    let before_clone = boottime_ns();
    let pin = PinnedToThisCpu::new();
    args.affinity = pin
        .as_ref()
        .map_or(std::ptr::null(), |p| &p.affinity as *const libc::cpu_set_t);

    // Every signal blocked in this thread across the clone: the child
    // starts with them blocked and unblocks only after resetting the
    // handlers.
    let blocked = SignalsBlocked::new();
    // The child is created in its cgroup where the kernel can do that
    // (Linux 5.7): moving it in afterwards by writing to `cgroup.procs`
    // takes the cgroup core's fork lock for writing, which waits for an
    // RCU grace period, and this thread waits for the child (0.3-0.45 ms
    // a spawn measured here).
    let mut result = Err(io::Error::from_raw_os_error(libc::ENOSYS));
    let mut settled = false;
    if let Some(cgroup) = exec.cgroup.filter(|_| exec.into_cgroup) {
        if !CLONE3_UNAVAILABLE.load(Ordering::Relaxed) {
            (args.reset, args.n_reset) = (ignored.as_ptr(), ignored.len());
            let clone_args = CloneArgs {
                flags: (libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | share_table)
                    as u64
                    | CLONE_INTO_CGROUP
                    | CLONE_CLEAR_SIGHAND,
                pidfd: &mut pidfd as *mut libc::c_int as u64,
                stack: stack.as_mut_ptr() as u64,
                stack_size: (top as usize - stack.as_ptr() as usize) as u64,
                cgroup: cgroup as u64,
                ..CloneArgs::default()
            };
            // SAFETY: as for clone below; the kernel starts the child on
            // the stack described in `clone_args`.
            result = unsafe {
                clone3(
                    &clone_args,
                    child_main,
                    (&args as *const ChildArgs).cast_mut().cast(),
                )
            };
            match &result {
                Ok(_) => settled = true,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOSYS | libc::E2BIG | libc::EPERM)
                    ) =>
                {
                    // No clone3 (before 5.3, or filtered), or one without
                    // CLONE_INTO_CGROUP (before 5.7): join the old way.
                    CLONE3_UNAVAILABLE.store(true, Ordering::Relaxed);
                    (args.reset, args.n_reset) = (every.as_ptr(), every.len());
                }
                Err(e) => {
                    settled = true;
                    result = Err(io::Error::new(
                        e.kind(),
                        format!("{}: {e}", Step::Cgroup.describe()),
                    ));
                }
            }
        }
    }
    // The joiner's `cgroup.procs`, opened here so that the child only
    // writes to it (a child sharing the table adds nothing to it).
    let mut procs: Option<OwnedFd> = None;
    if !settled {
        if let Some(dir) = exec.cgroup {
            match super::cgroup::open_at(dir, c"cgroup.procs", libc::O_WRONLY) {
                Ok(fd) => procs = Some(fd),
                Err(e) => {
                    settled = true;
                    result = Err(io::Error::new(
                        e.kind(),
                        format!("{}: {e}", Step::Cgroup.describe()),
                    ));
                }
            }
        }
    }
    if !settled {
        args.join_cgroup = procs.as_ref().map_or(-1, |f| f.as_raw_fd());
        // SAFETY: the child runs child_main on `stack` with a pointer to
        // `args`; with CLONE_VFORK this thread is suspended until the child
        // has called execve or exited, so `args`, `stack` and everything
        // they point to outlive its use. CLONE_PIDFD stores the pidfd in
        // `pidfd`. No exit signal (the low byte of the flags is 0) until
        // the child's execve, which sets SIGCHLD as every exec does: the
        // leader's exit is seen through the pidfd, and the orphan reaper
        // does not see it because it waits for the main thread's own
        // children only (OrphanReaper). With CLONE_FILES (`share_table`)
        // the child takes its own copy of the table before it sets up its
        // descriptors (child_main; see the module docs), and the daemon's
        // descriptors it reads meanwhile stay open: this thread holds them.
        let pid = unsafe {
            libc::clone(
                child_main,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | share_table,
                (&args as *const ChildArgs).cast_mut().cast(),
                &mut pidfd as *mut libc::c_int,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_int>(),
            )
        };
        result = if pid < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(pid)
        };
    }
    drop(blocked);
    drop(pin);
    drop(stack);
    // The slots back on /dev/null before anything can wait for the pipes'
    // end (the child has its own copies, or has exited).
    drop(in_slots);
    drop(procs);
    let pid = result?;
    // SAFETY: CLONE_PIDFD gave us a fresh descriptor on the child.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    drop((out_w, err_w));
    let step = args.failed_step.load(Ordering::Acquire);
    if let Some(step) = Step::from_i32(step) {
        let errno = args.failed_errno.load(Ordering::Acquire);
        // The child has exited (with CLONE_VFORK the clone returns only
        // once the child has called execve or exited, and it reported a
        // failed step), so the blocking wait returns at once and reaps it.
        let _ = wait_pidfd(&pidfd);
        let err = io::Error::from_raw_os_error(errno);
        return Err(match step {
            Step::Exec => err,
            other => io::Error::new(err.kind(), format!("{}: {err}", other.describe())),
        });
    }
    let start_time = start_ticks(before_clone, args.child_boottime.load(Ordering::Acquire));
    Ok(Child {
        pid,
        pidfd,
        stdout: out_r,
        stderr: err_r,
        start_time,
    })
}

/// The calling thread held on the CPU it runs on while it spawns, its
/// affinity restored on drop.
///
/// A child starts on a CPU the kernel picks for new tasks, often the other
/// one on a small machine, although its parent is about to sleep until the
/// child has called execve; and the parent, woken then, may land behind
/// the child. Held on one CPU for the clone, the parent hands that CPU to
/// its child and gets it back when the child execs (which is where the
/// kernel balances a new program across CPUs anyway). The child takes the
/// thread's own affinity back before exec, so runs may use every CPU the
/// daemon may. On two cores this raised spawn throughput by 10-15 %
/// (BENCHMARKS.md).
struct PinnedToThisCpu {
    affinity: libc::cpu_set_t,
}

impl PinnedToThisCpu {
    /// `None` (nothing changed) when the affinity cannot be read or set.
    fn new() -> Option<PinnedToThisCpu> {
        const SIZE: usize = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: affinity calls on this thread with a set of the size
        // passed; sched_getcpu has no preconditions.
        unsafe {
            let mut affinity: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, SIZE, &mut affinity) != 0 {
                return None;
            }
            let cpu = libc::sched_getcpu();
            if cpu < 0 || cpu as usize >= libc::CPU_SETSIZE as usize {
                return None;
            }
            let mut one: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu as usize, &mut one);
            if libc::sched_setaffinity(0, SIZE, &one) != 0 {
                return None;
            }
            Some(PinnedToThisCpu { affinity })
        }
    }
}

impl Drop for PinnedToThisCpu {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.affinity);
        }
    }
}

/// `CLOCK_BOOTTIME` in ns (0 if it cannot be read).
fn boottime_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime fills the timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The start time `/proc/<pid>/stat` will show for a child (field 22,
/// clock ticks since boot), without reading it: the kernel takes it from
/// `CLOCK_BOOTTIME` while creating the child, so it lies between a clock
/// reading before the clone and the child's first reading, and those two
/// fall in the same tick for most spawns (a tick is 10 ms, the gap tens
/// of µs). `None` when they do not, or a reading is missing.
fn start_ticks(before_ns: u64, child_ns: u64) -> Option<u64> {
    static NS_PER_TICK: OnceLock<u64> = OnceLock::new();
    let per_tick = *NS_PER_TICK.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if hz > 0 && 1_000_000_000 % hz as u64 == 0 {
            1_000_000_000 / hz as u64
        } else {
            0
        }
    });
    if per_tick == 0 || before_ns == 0 || child_ns < before_ns {
        return None;
    }
    let tick = before_ns / per_tick;
    (child_ns / per_tick == tick).then_some(tick)
}

/// The child, between clone and execve. See the module docs for its rules.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's ChildArgs, alive and unchanged
    // while the parent is suspended (CLONE_VFORK).
    let a = unsafe { &*(arg as *const ChildArgs) };
    // First, for the start time (the C library reads the clock through
    // the vDSO: no lock, no errno unless it fails).
    a.child_boottime.store(boottime_ns(), Ordering::Release);
    let fail = |step: Step| -> libc::c_int {
        // SAFETY: errno of this thread (the parent's slot, which is
        // suspended); then the child ends without running any atexit code.
        unsafe {
            a.failed_errno
                .store(*libc::__errno_location(), Ordering::Release);
            a.failed_step.store(step as i32, Ordering::Release);
            libc::_exit(127)
        }
    };
    // SAFETY: (the whole block) raw system calls on descriptors, strings
    // and structs the parent prepared and keeps alive, unchanged, while it
    // is suspended (CLONE_VFORK); nothing allocates or takes a lock, which
    // the child of a clone(CLONE_VM) of a multi-threaded process must not.
    unsafe {
        // Default dispositions for every signal (handlers are the daemon's
        // code; ignored signals are reset too, as for a fresh service).
        // The kernel's struct sigaction (handler, flags, restorer, mask),
        // all zero: SIG_DFL, no flags, nothing blocked while handling. Raw,
        // because glibc refuses its internal signals (32, 33), which a
        // parent may have left ignored. With the handlers already cleared
        // by the kernel, only the ignored signals are left to reset (`reset`
        // says which).
        let dfl = [0u64; 4];
        for i in 0..a.n_reset {
            let sig = *a.reset.add(i);
            if libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                dfl.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            ) != 0
            {
                return fail(Step::Signals);
            }
        }
        if libc::setpgid(0, 0) != 0 {
            return fail(Step::ProcessGroup);
        }
        if a.join_cgroup >= 0 && libc::write(a.join_cgroup, b"0".as_ptr().cast(), 1) != 1 {
            return fail(Step::Cgroup);
        }
        // Before dropping privileges, so a root daemon may also raise them.
        for i in 0..a.n_rlimits {
            let (resource, value) = *a.rlimits.add(i);
            let lim = libc::rlimit {
                rlim_cur: value,
                rlim_max: value,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return fail(Step::Rlimit);
            }
        }
        if a.unshare != 0 && libc::unshare(a.unshare) != 0 {
            return fail(Step::Namespaces);
        }
        if let Some(m) = &a.mounts {
            if !private_view(m) {
                return fail(Step::Mounts);
            }
        }
        if a.loopback_up && !loopback_up() {
            return fail(Step::Loopback);
        }
        // The bounding set is already empty when `drop_bounding` is set:
        // the child inherited the calling thread's (`empty_bounding_set`),
        // so nothing the run executes can ever regain a capability.
        // A sandboxed run (`no_new_privs`) also leaves with every
        // capability set empty.
        if a.no_new_privs {
            // EINVAL before Linux 4.3 (no ambient set): nothing to clear.
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
        }
        if let Some((uid, gid)) = a.credentials {
            if libc::syscall(libc::SYS_setgroups, 0usize, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
                || libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
            {
                return fail(Step::Credentials);
            }
        }
        if a.no_new_privs {
            // Switching to a non-root uid emptied the effective and
            // permitted sets; the inheritable one stays unless cleared.
            let header = [0x2008_0522u32, 0]; // _LINUX_CAPABILITY_VERSION_3
            let data = [0u32; 6];
            if libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) != 0 {
                return fail(Step::Capabilities);
            }
        }
        if a.no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return fail(Step::Capabilities);
        }
        if libc::chdir(a.cwd) != 0 {
            return fail(Step::Chdir);
        }
        // The CPUs the daemon may use, not only the one it cloned on.
        // Best effort: a failure leaves the run on that one CPU.
        if !a.affinity.is_null() {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), a.affinity);
        }
        // The daemon's priority, not the spawning thread's (lowering one's
        // own priority needs no privilege).
        if let Some(nice) = a.nice {
            libc::setpriority(libc::PRIO_PROCESS, 0, nice);
        }
        if a.landlock >= 0 && libc::syscall(libc::SYS_landlock_restrict_self, a.landlock, 0u32) != 0
        {
            return fail(Step::Landlock);
        }
        // The descriptors, after every step that uses one of the parent's
        // (cgroup, mounts, Landlock ruleset). A child that shares the
        // daemon's table takes its own copy of the low slots first.
        if a.fd_limit != 0
            && libc::syscall(
                libc::SYS_close_range,
                a.fd_limit,
                u32::MAX,
                libc::CLOSE_RANGE_UNSHARE,
            ) != 0
        {
            return fail(Step::Stdio);
        }
        for (from, to) in [(a.stdin, 0), (a.stdout, 1), (a.stderr, 2)] {
            if libc::dup2(from, to) != to {
                return fail(Step::Stdio);
            }
        }
        // Descriptors the daemon itself inherited without close-on-exec
        // (a careless parent, a test harness) are not the child's
        // business. Closed in the child's own table (a copy: never shared
        // by now); ENOSYS before Linux 5.9, where exec still closes those
        // marked close-on-exec.
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        // Last: from here on the filter applies to every call.
        if !a.seccomp.is_null()
            && libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                a.seccomp,
                0,
                0,
            ) != 0
        {
            return fail(Step::Seccomp);
        }
        let empty: libc::sigset_t = std::mem::zeroed();
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return fail(Step::Signals);
        }
        libc::execve(a.program, a.argv, a.envp);
        fail(Step::Exec)
    }
}

/// Level `full`'s view of the file system, in the run's new mount
/// namespace: nothing propagates back to the host; the data dir is hidden
/// under an empty read-only tmpfs and the config and key files under
/// `/dev/null`; everything is read-only and nosuid but the operator's
/// `shared_dirs`; the run's own tmpfs
/// becomes `/tmp` (and `/dev/shm`); `/proc` shows only processes the run
/// may trace, i.e. its own. Called in the child: system calls only.
///
/// # Safety
/// Every pointer in `m` must be valid (prepared by the parent).
unsafe fn private_view(m: &ChildMounts) -> bool {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    /// `MS_PRIVATE` (linux/mount.h), as `mount_attr.propagation` takes it.
    const MS_PRIVATE: u64 = 1 << 18;
    let null = std::ptr::null::<libc::c_char>();
    // One pass over the copied tree: every mount private (nothing mounted
    // here propagates to the host) and read-only and nosuid. What is
    // mounted below comes with its own flags (the masks are read-only,
    // the run's tmpfs is writable, the /dev/null binds are of a read-only
    // mount now).
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
        attr_clr: 0,
        propagation: MS_PRIVATE,
        userns_fd: 0,
    };
    if libc::syscall(
        libc::SYS_mount_setattr,
        libc::AT_FDCWD,
        c"/".as_ptr(),
        libc::AT_RECURSIVE as libc::c_uint,
        &attr as *const MountAttr,
        std::mem::size_of::<MountAttr>(),
    ) != 0
    {
        return false;
    }
    for i in 0..m.n_mask_dirs {
        let dir = *m.mask_dirs.add(i);
        let ok = if m.mask_fds.is_null() {
            libc::mount(
                c"tmpfs".as_ptr(),
                dir,
                c"tmpfs".as_ptr(),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                c"size=4k,nr_inodes=2,mode=000".as_ptr().cast(),
            ) == 0
        } else {
            attach(*m.mask_fds.add(i), dir)
        };
        if !ok {
            return false;
        }
    }
    for i in 0..m.n_mask_files {
        if libc::mount(
            c"/dev/null".as_ptr(),
            *m.mask_files.add(i),
            null,
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
            && *libc::__errno_location() != libc::ENOENT
        {
            return false;
        }
    }
    // The operator's shared directories: a new bind of each, writable.
    let writable = MountAttr {
        attr_set: 0,
        attr_clr: MOUNT_ATTR_RDONLY,
        propagation: 0,
        userns_fd: 0,
    };
    for i in 0..m.n_shared {
        let p = *m.shared.add(i);
        if libc::mount(p, p, null, libc::MS_BIND | libc::MS_REC, std::ptr::null()) != 0
            || libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                p,
                libc::AT_RECURSIVE as libc::c_uint,
                &writable as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            ) != 0
        {
            return false;
        }
    }
    if !attach(m.private_tmp, c"/tmp".as_ptr()) {
        return false;
    }
    if m.dev_shm
        && libc::mount(
            c"/tmp".as_ptr(),
            c"/dev/shm".as_ptr(),
            null,
            libc::MS_BIND,
            std::ptr::null(),
        ) != 0
    {
        return false;
    }
    if m.proc >= 0 {
        attach(m.proc, c"/proc".as_ptr())
    } else {
        libc::mount(
            c"proc".as_ptr(),
            c"/proc".as_ptr(),
            c"proc".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            c"hidepid=invisible".as_ptr().cast(),
        ) == 0
    }
}

/// Moves the detached mount `fd` onto `target` (`move_mount`).
///
/// # Safety
/// `target` must be a valid C string.
unsafe fn attach(fd: RawFd, target: *const libc::c_char) -> bool {
    const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
    libc::syscall(
        libc::SYS_move_mount,
        fd,
        c"".as_ptr(),
        libc::AT_FDCWD,
        target,
        MOVE_MOUNT_F_EMPTY_PATH,
    ) == 0
}

/// Brings `lo` up in a new network namespace. Called in the child.
///
/// # Safety
/// Only system calls on local data.
unsafe fn loopback_up() -> bool {
    let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
    if s < 0 {
        return false;
    }
    let mut req: libc::ifreq = std::mem::zeroed();
    req.ifr_name[0] = b'l' as libc::c_char;
    req.ifr_name[1] = b'o' as libc::c_char;
    let ok = libc::ioctl(s, libc::SIOCGIFFLAGS, &mut req) == 0 && {
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        libc::ioctl(s, libc::SIOCSIFFLAGS, &req) == 0
    };
    libc::close(s);
    ok
}

/// Tests elsewhere in `proc`: runs `/bin/true` as a run's child is
/// spawned, in the cgroup open as `cgroup`, and waits for it: how it ended
/// (`si_code`, `si_status`).
#[cfg(test)]
pub(super) fn run_true_for_test(cgroup: RawFd, into_cgroup: bool) -> (i32, i32) {
    let steps = super::sandbox::Steps::default();
    let child = spawn(&Exec {
        program: std::path::Path::new("/bin/true"),
        args: &[],
        env: &[],
        cwd: std::path::Path::new("/"),
        cgroup: Some(cgroup),
        into_cgroup,
        rlimits: &[],
        credentials: None,
        sandbox: &steps,
    })
    .unwrap();
    child.wait().unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_only_when_both_readings_share_a_tick() {
        // SAFETY: sysconf has no preconditions.
        let tick = 1_000_000_000 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        assert_eq!(start_ticks(5 * tick + 1, 5 * tick + 2), Some(5));
        assert_eq!(start_ticks(5 * tick, 6 * tick - 1), Some(5));
        assert_eq!(start_ticks(6 * tick - 1, 6 * tick), None);
        assert_eq!(start_ticks(0, 5), None);
        assert_eq!(start_ticks(10, 5), None);
    }

    fn status_field(status: &str, key: &str) -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} missing: {status}"))
            .trim()
            .to_string()
    }

    fn cpus_allowed(status: &str) -> String {
        status_field(status, "Cpus_allowed_list:")
    }

    /// Spawns `program arg` with `steps` from this thread; its stdout.
    fn stdout_of(program: &str, arg: &str, steps: &Steps) -> String {
        let child = spawn(&Exec {
            program: Path::new(program),
            args: &[OsStr::new(arg)],
            env: &[],
            cwd: Path::new("/"),
            cgroup: None,
            into_cgroup: false,
            rlimits: &[],
            credentials: None,
            sandbox: steps,
        })
        .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(child.stdout), &mut out).unwrap();
        wait_pidfd(&child.pidfd).unwrap();
        out
    }

    /// Spawns `cat /proc/self/status` with `steps` from this thread: the
    /// child's view of itself.
    fn a_childs_status(steps: &Steps) -> String {
        stdout_of("/bin/cat", "/proc/self/status", steps)
    }

    /// The spawning thread is held on one CPU only for the clone, and the
    /// child runs with the thread's own affinity.
    #[test]
    fn the_child_and_the_thread_keep_their_affinity() {
        let mine = || cpus_allowed(&std::fs::read_to_string("/proc/thread-self/status").unwrap());
        let before = mine();
        let child = a_childs_status(&Steps::default());
        assert_eq!(mine(), before);
        assert_eq!(cpus_allowed(&child), before);
    }

    /// The children of a thread dedicated to spawning share its
    /// descriptor table and copy only its low slots, so their table stays
    /// the smallest (`FDSize`) however many descriptors the process holds;
    /// the children of any other thread copy the whole table. Both get
    /// their stdout (this test reads it) and see none of the process's
    /// other descriptors.
    #[test]
    fn a_dedicated_threads_children_copy_only_the_low_descriptor_slots() {
        const MANY: usize = 200;
        let child_view = |dedicated: bool| {
            std::thread::spawn(move || {
                // Dedicated first, as the starter's spawner is at start-up:
                // its slots are low, the many descriptors above them.
                if dedicated {
                    dedicate_this_thread();
                    assert!(
                        STDIO_SLOTS.with_borrow(|s| s.is_some()),
                        "this kernel unshares by close_range (5.9)"
                    );
                }
                let mut held: Vec<std::fs::File> = (0..MANY)
                    .map(|_| std::fs::File::open("/dev/null").unwrap())
                    .collect();
                // One without close-on-exec, as a careless parent leaves.
                // SAFETY: open returns a fresh descriptor, owned by a File.
                held.push(unsafe {
                    std::fs::File::from_raw_fd(libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY))
                });
                let highest = held.iter().map(|f| f.as_raw_fd()).max().unwrap();
                let status = a_childs_status(&Steps::default());
                let size: usize = status_field(&status, "FDSize:").parse().unwrap();
                let out = stdout_of("/bin/ls", "/proc/self/fd", &Steps::default());
                let open: Vec<i32> = out.split_whitespace().map(|n| n.parse().unwrap()).collect();
                drop(held);
                (size, open, highest)
            })
            .join()
            .unwrap()
        };
        let stdio = || -> Vec<(u64, u64)> {
            (0..3)
                .map(|fd| {
                    let f = std::mem::ManuallyDrop::new(
                        // SAFETY: borrowed for fstat only, never closed.
                        unsafe { std::fs::File::from_raw_fd(fd) },
                    );
                    let m = f.metadata().unwrap();
                    use std::os::unix::fs::MetadataExt;
                    (m.dev(), m.ino())
                })
                .collect()
        };
        let stdio_before = stdio();
        let (shared_size, shared_open, _) = child_view(true);
        assert_eq!(
            stdio(),
            stdio_before,
            "the process's own 0, 1 and 2 are untouched"
        );
        let (copied_size, copied_open, highest) = child_view(false);
        assert!(
            copied_size > highest as usize,
            "a whole copy holds slot {highest}: FDSize {copied_size}"
        );
        assert!(
            shared_size < MANY,
            "only the low slots were copied: FDSize {shared_size}"
        );
        // 0, 1, 2 and the one `ls` reads the directory through: not the
        // one left without close-on-exec either.
        assert_eq!(shared_open.len(), 4, "{shared_open:?}");
        assert_eq!(copied_open.len(), 4, "{copied_open:?}");
    }

    /// A child that fails joining its cgroup (here `cgroup.procs` is
    /// `/dev/full`: the write fails with ENOSPC) leaves nothing behind in
    /// the descriptor table it shared with a dedicated thread.
    #[test]
    fn a_child_that_fails_to_join_its_cgroup_leaves_no_descriptor_behind() {
        let dir = std::env::temp_dir().join(format!("cyrnel-join-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let _ = std::fs::remove_file(dir.join("cgroup.procs"));
        std::os::unix::fs::symlink("/dev/full", dir.join("cgroup.procs")).unwrap();
        let cgroup = std::fs::File::open(&dir).unwrap();
        let full_open = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
                .filter(|t| t == Path::new("/dev/full"))
                .count()
        };
        let err = std::thread::scope(|s| {
            s.spawn(|| {
                dedicate_this_thread();
                spawn(&Exec {
                    program: Path::new("/bin/true"),
                    args: &[],
                    env: &[],
                    cwd: Path::new("/"),
                    cgroup: Some(cgroup.as_raw_fd()),
                    into_cgroup: false,
                    rlimits: &[],
                    credentials: None,
                    sandbox: &Steps::default(),
                })
                .err()
                .expect("the join fails")
            })
            .join()
            .unwrap()
        });
        assert!(
            err.to_string().starts_with("joining the run's cgroup")
                && err.kind() == io::ErrorKind::StorageFull,
            "{err}"
        );
        assert_eq!(full_open(), 0, "a descriptor on cgroup.procs was left open");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `syscall(nr, arg, 0, 0, 0, 0)`: 0, or the errno.
    fn errno_of(nr: libc::c_long, arg: libc::c_long) -> i32 {
        // SAFETY: the calls used here take integers only (unshare's flags,
        // keyctl's operation); bad values are refused, nothing is written.
        let r = unsafe { libc::syscall(nr, arg, 0, 0, 0, 0) };
        if r == 0 {
            0
        } else {
            io::Error::last_os_error().raw_os_error().unwrap()
        }
    }

    /// A thread dedicated to spawning takes seccomp stage one once (and
    /// `no_new_privs`), which its children inherit under the stage two
    /// they add; a thread under another stage one gives its children the
    /// whole filter, and a thread not dedicated is never changed.
    #[test]
    fn a_dedicated_thread_takes_seccomp_stage_one_and_its_children_add_stage_two() {
        use super::super::sandbox::seccomp_stage_one;
        use std::sync::Arc;
        let stages = || Arc::new(Seccomp::new(seccomp_stage_one(true).into(), true, false));
        let me = || std::fs::read_to_string("/proc/thread-self/status").unwrap();
        let filters =
            |status: &str| -> u32 { status_field(status, "Seccomp_filters:").parse().unwrap() };
        // Not dedicated: whole filters for the children, the thread as it was.
        std::thread::spawn(move || {
            let s = stages();
            let before = me();
            assert!(std::ptr::eq(child_filter(&s), &s.whole[..]));
            assert_eq!(filters(&me()), filters(&before));
            assert_eq!(
                status_field(&me(), "NoNewPrivs:"),
                status_field(&before, "NoNewPrivs:")
            );
        })
        .join()
        .unwrap();
        std::thread::spawn(move || {
            let (mine, other) = (stages(), stages());
            let before = filters(&me());
            dedicate_this_thread();
            // no_new_privs is left to the thread: the child inherits it.
            let steps = Steps {
                seccomp: Some(mine.clone()),
                ..Steps::default()
            };
            for _ in 0..2 {
                let out = a_childs_status(&steps);
                // The thread's stage and the child's own.
                assert_eq!(filters(&out), before + 2);
                assert_eq!(status_field(&out, "NoNewPrivs:"), "1");
                assert_eq!(filters(&me()), before + 1);
                assert_eq!(status_field(&me(), "NoNewPrivs:"), "1");
            }
            // The thread holds stage one, not the whole list: it may
            // unshare (here refused for a bad flag, not by the filter),
            // and it may not use keyrings.
            assert_eq!(errno_of(libc::SYS_unshare, 1), libc::EINVAL);
            assert_eq!(errno_of(libc::SYS_keyctl, 0), libc::EPERM);
            assert!(std::ptr::eq(child_filter(&mine), &mine.second[..]));
            assert!(std::ptr::eq(child_filter(&other), &other.whole[..]));
            assert_eq!(filters(&me()), before + 1);
        })
        .join()
        .unwrap();
    }

    /// The start time worked out from the clock is the one `/proc` shows.
    #[test]
    fn start_time_matches_proc() {
        let steps = Steps::default();
        let mut known = 0;
        for _ in 0..50 {
            let child = spawn(&Exec {
                program: Path::new("/bin/true"),
                args: &[],
                env: &[],
                cwd: Path::new("/"),
                cgroup: None,
                into_cgroup: false,
                rlimits: &[],
                credentials: None,
                sandbox: &steps,
            })
            .unwrap();
            // Unreaped (a zombie at worst), so its /proc entry is there.
            let from_proc = super::super::stat(child.pid).unwrap().start_time;
            if let Some(t) = child.start_time {
                assert_eq!(t, from_proc);
                known += 1;
            }
            child.wait().unwrap();
        }
        assert!(known > 0, "the clock never told the start time");
    }
}
