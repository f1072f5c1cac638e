//! What a handover needs from the kernel: descriptors that survive
//! `execve` (and only those), a sealed memory file for the handed-over
//! state, the running image as a file, and the `execve` itself.
//!
//! The daemon opens every descriptor close-on-exec. A handover clears the
//! flag on exactly the descriptors it hands over, right before `execve`,
//! once nothing else of the daemon can fork (the server and the starter
//! are stopped), so none of them leaks into a child.

use std::ffi::{CStr, CString, OsString};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn fcntl(fd: RawFd, cmd: libc::c_int, arg: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: F_GETFD/F_SETFD/F_GETFL/F_SETFL/F_ADD_SEALS take an int and
    // touch no memory of ours; an invalid fd is EBADF.
    let r = unsafe { libc::fcntl(fd, cmd, arg) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Raises a pipe's capacity (`F_SETPIPE_SZ`): what a run writes while no
/// daemon reads (between a crash and the restart) waits there. Returns the
/// capacity it got.
pub fn raise_pipe_size(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<i32> {
    fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, bytes)
}

/// Sets or clears `FD_CLOEXEC`.
fn set_cloexec(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    let fd = fd.as_raw_fd();
    let flags = fcntl(fd, libc::F_GETFD, 0)?;
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    fcntl(fd, libc::F_SETFD, flags).map(|_| ())
}

/// Clears `FD_CLOEXEC`: the descriptor survives the next `execve`.
pub fn keep_across_exec(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_cloexec(fd, false)
}

/// Whether a descriptor number is open (without taking it).
pub fn is_open(fd: RawFd) -> io::Result<()> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "standard descriptors are never handed over",
        ));
    }
    fcntl(fd, libc::F_GETFD, 0).map(|_| ())
}

/// Sets `FD_CLOEXEC` again on a descriptor taken over.
pub fn close_on_exec(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_cloexec(fd, true)
}

/// Takes ownership of a descriptor number handed over through `execve`,
/// leaving `FD_CLOEXEC` clear (so it can still be handed back; see
/// [`close_on_exec`]). Fails (EBADF) when it is not open.
pub fn take_handed_over(fd: RawFd) -> io::Result<OwnedFd> {
    is_open(fd)?;
    // SAFETY: the descriptor is open (F_GETFD succeeded) and was handed to
    // this image to own; every number is taken at most once (the caller
    // checks the handed-over state for duplicates).
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A sealed, close-on-exec memory file holding `bytes`.
pub fn sealed_memfd(name: &CStr, bytes: &[u8]) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; memfd_create touches nothing else.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = fs::File::from(fd);
    io::Write::write_all(&mut file, bytes)?;
    let fd = OwnedFd::from(file);
    fcntl(
        fd.as_raw_fd(),
        libc::F_ADD_SEALS,
        libc::F_SEAL_SEAL | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE,
    )?;
    Ok(fd)
}

/// Everything in a file from its start (at most `max` bytes).
pub fn read_from_start(fd: &OwnedFd, max: u64) -> io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = fs::File::from(fd.try_clone()?);
    let len = file.metadata()?.len();
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {max} expected"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, 0)?;
    Ok(buf)
}

/// The running image, opened as a file (close-on-exec): what a failed
/// handover falls back to, even when the binary on disk was replaced.
pub fn open_running_image() -> io::Result<OwnedFd> {
    Ok(OwnedFd::from(fs::File::open("/proc/self/exe")?))
}

/// Whether `path` is the running image: the same file, not only the same
/// name (`/proc/self/exe` leads to the running image's file even when the
/// one at its path was replaced).
pub fn is_running_image(path: &Path) -> io::Result<bool> {
    let on_disk = fs::metadata(path)?;
    let running = fs::metadata("/proc/self/exe")?;
    Ok(on_disk.dev() == running.dev() && on_disk.ino() == running.ino())
}

fn cstrings(items: impl IntoIterator<Item = OsString>) -> io::Result<Vec<CString>> {
    items
        .into_iter()
        .map(|s| {
            CString::new(s.as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
        })
        .collect()
}

/// Replaces this process's image with `program` (a path) or, with `path`
/// `None`, the file open as `image`, keeping the pid, every child and
/// every descriptor without `FD_CLOEXEC`. Returns only on failure.
pub fn exec(
    path: Option<&Path>,
    image: &OwnedFd,
    args: Vec<OsString>,
    env: Vec<OsString>,
) -> io::Error {
    let (args, env) = match (cstrings(args), cstrings(env)) {
        (Ok(a), Ok(e)) => (a, e),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|a| a.as_ptr()).collect();
    envp.push(std::ptr::null());
    match path {
        Some(path) => {
            let path = match CString::new(path.as_os_str().as_bytes()) {
                Ok(p) => p,
                Err(e) => return io::Error::new(io::ErrorKind::InvalidInput, e),
            };
            // SAFETY: every pointer is to a NUL-terminated string that
            // lives until the call returns (it returns only on failure),
            // and both arrays end with a null pointer.
            unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        }
        None => {
            // SAFETY: as above; an empty path with AT_EMPTY_PATH executes
            // the open file itself.
            unsafe {
                libc::syscall(
                    libc::SYS_execveat,
                    image.as_raw_fd(),
                    c"".as_ptr(),
                    argv.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                )
            };
        }
    }
    io::Error::last_os_error()
}

/// Runs `binary arg` (no stdin, stderr discarded) and returns how it
/// ended and what it printed; kills it after `timeout`.
pub async fn ask(
    binary: &Path,
    arg: &str,
    timeout: std::time::Duration,
) -> io::Result<std::process::Output> {
    let child = std::process::Command::new(binary)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run it: {e}")))?;
    let pid = child.id() as i32;
    match tokio::time::timeout(
        timeout,
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => Err(io::Error::other(e)),
        Err(_) => {
            // SAFETY: kill(2) touches no memory; the child is unreaped
            // (wait_with_output still waits for it), so the pid is its.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{arg} did not answer within {} s", timeout.as_secs()),
            ))
        }
    }
}
