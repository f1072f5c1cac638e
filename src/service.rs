//! The service manager's side of the daemon's life: systemd's notification
//! protocol (sd_notify(3)) with its file-descriptor store
//! (<https://systemd.io/FILE_DESCRIPTOR_STORE>), and the descriptors a
//! (re)started daemon receives from it (sd_listen_fds(3)).
//!
//! - [`Notifier`] sends datagrams to `$NOTIFY_SOCKET`: state changes
//!   (`READY=1`, `STATUS=…`, …) and descriptors to park in the store
//!   (`FDSTORE=1`, `FDPOLL=0`, `FDNAME=…`, the descriptor as `SCM_RIGHTS`) or
//!   to take out of it (`FDSTOREREMOVE=1`, `FDNAME=…`).
//! - [`take_listen_fds`] adopts what the manager passes at start
//!   (`LISTEN_PID`, `LISTEN_FDS`, `LISTEN_FDNAMES`, descriptors from 3 on):
//!   after a crash and a restart, the descriptors parked in the store.
//!
//! Written on libc rather than with the `sd-notify` crate, which cannot
//! reach an abstract-namespace socket (`NOTIFY_SOCKET=@…`), opens and
//! connects a new socket for every message, and stops setting `FD_CLOEXEC`
//! at the first received descriptor it cannot look at.
//!
//! What the manager does with a message is not reported back: the protocol
//! has no answers. A store the unit does not allow (`FileDescriptorStoreMax=`
//! is 0 or full) or a name the manager refuses is dropped by it silently,
//! which is why names are checked here first ([`check_fd_name`]).

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The longest name the store accepts for a descriptor (`FDNAME=`).
pub const FD_NAME_MAX: usize = 255;

/// The most bytes of names, with the `:` between them, that a restart can
/// pass in `LISTEN_FDNAMES`: Linux caps one environment string at 128 KiB
/// (`MAX_ARG_STRLEN`, counting `LISTEN_FDNAMES=` and the final NUL). A store
/// whose names add up to more can be filled but never passed back: the
/// manager's `execve` of the service fails with `E2BIG` at every restart.
/// `FileDescriptorStoreMax=` × (the longest name + 1) − 1 must stay below.
pub const LISTEN_FDNAMES_MAX: usize = 131_072 - "LISTEN_FDNAMES=".len() - 1;

/// How long a send may wait for room in the manager's queue before it
/// fails (`SO_SNDTIMEO`). A manager that reads nothing for this long is
/// stuck; a caller must not be.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// The send buffer asked for (`SO_SNDBUF`, capped by the kernel at
/// `net.core.wmem_max`), so that a burst of messages (a start of many runs
/// parks several descriptors each) queues instead of blocking.
const SEND_BUFFER: libc::c_int = 8 << 20;

/// Where notifications go: `$NOTIFY_SOCKET` as read once at start.
///
/// Cheap to use from any thread (`&self`, one `sendmsg` per call on a socket
/// made once), never panics. Without a service manager (no
/// `NOTIFY_SOCKET`) every call does nothing and returns `Ok`. The socket is
/// close-on-exec: an image started by `execve` reads the variable again.
pub struct Notifier {
    target: Target,
}

enum Target {
    /// No `NOTIFY_SOCKET` (or an empty one).
    Absent,
    /// An unbound datagram socket and the manager's address.
    Socket {
        socket: OwnedFd,
        addr: libc::sockaddr_un,
        addr_len: libc::socklen_t,
    },
    /// `NOTIFY_SOCKET` is set but cannot be used (a relative path, a
    /// `vsock:` address, too long, or the socket could not be made): every
    /// call returns this error, so the caller can say why.
    Unusable(String),
}

impl fmt::Debug for Notifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Absent => f.write_str("Notifier(no service manager)"),
            Target::Socket { addr, addr_len, .. } => {
                write!(f, "Notifier({})", describe(addr, *addr_len))
            }
            Target::Unusable(why) => write!(f, "Notifier(unusable: {why})"),
        }
    }
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`: an absolute path (`/run/systemd/notify`) or a
    /// name in Linux's abstract namespace (`@name`). Unset or empty: no
    /// manager, every call is a no-op. Any other value gives a notifier
    /// whose calls fail with the reason ([`Notifier::is_present`] is then
    /// true: a manager is there, but cannot be reached).
    pub fn from_env() -> Notifier {
        match std::env::var_os("NOTIFY_SOCKET") {
            None => Notifier {
                target: Target::Absent,
            },
            Some(value) => Notifier::for_socket(&value),
        }
    }

    /// A notifier for the given `NOTIFY_SOCKET` value (see
    /// [`Notifier::from_env`]).
    pub fn for_socket(value: &OsStr) -> Notifier {
        let target = match sockaddr(value) {
            Ok(None) => Target::Absent,
            Ok(Some((addr, addr_len))) => match datagram_socket() {
                Ok(socket) => Target::Socket {
                    socket,
                    addr,
                    addr_len,
                },
                Err(e) => Target::Unusable(format!(
                    "NOTIFY_SOCKET={}: cannot make a socket: {e}",
                    value.to_string_lossy()
                )),
            },
            Err(why) => Target::Unusable(why),
        };
        Notifier { target }
    }

    /// Whether a service manager gave a socket (`NOTIFY_SOCKET` is set).
    pub fn is_present(&self) -> bool {
        !matches!(self.target, Target::Absent)
    }

    /// Sends state changes, newline-separated `KEY=VALUE` assignments:
    /// `READY=1`, `RELOADING=1`, `STOPPING=1`, `STATUS=…`, `MAINPID=…`,
    /// `MONOTONIC_USEC=…`, …
    pub fn notify(&self, text: &str) -> io::Result<()> {
        if text.as_bytes().contains(&0) {
            return Err(invalid(format!(
                "a notification cannot contain a NUL byte: {text:?}"
            )));
        }
        self.send(text.as_bytes(), None)
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC=` that systemd (v253+) wants
    /// with it.
    pub fn reloading(&self) -> io::Result<()> {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes one timespec into our local.
        if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1_000;
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"))
    }

    /// Parks a duplicate of `fd` in the manager's store under `name`
    /// (`FDSTORE=1`, `FDPOLL=0`, `FDNAME=name`). With `FDPOLL=0` the manager
    /// keeps it even once it reports `POLLHUP` or `POLLERR` (a pipe whose
    /// writers are gone, a pidfd of a reaped process); only [`remove`] or a
    /// stop of the service takes it out. The store hands it back, with its
    /// name, to the next start of the service ([`take_listen_fds`]).
    ///
    /// `name` must pass [`check_fd_name`]. Names need not be unique;
    /// a descriptor the store already holds (the same open file, a `dup`)
    /// is not stored twice.
    ///
    /// [`remove`]: Notifier::remove
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> io::Result<()> {
        check_fd_name(name)?;
        let text = format!("FDSTORE=1\nFDPOLL=0\nFDNAME={name}");
        self.send(text.as_bytes(), Some(fd))
    }

    /// Closes every descriptor stored under `name` in the manager
    /// (`FDSTOREREMOVE=1`, `FDNAME=name`). Removing a name that holds
    /// nothing is not an error (the manager says nothing either way).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        check_fd_name(name)?;
        let text = format!("FDSTOREREMOVE=1\nFDNAME={name}");
        self.send(text.as_bytes(), None)
    }

    /// One datagram to the manager, with `fd` attached as `SCM_RIGHTS`.
    fn send(&self, text: &[u8], fd: Option<BorrowedFd<'_>>) -> io::Result<()> {
        let (socket, addr, addr_len) = match &self.target {
            Target::Absent => return Ok(()),
            Target::Unusable(why) => return Err(io::Error::other(why.clone())),
            Target::Socket {
                socket,
                addr,
                addr_len,
            } => (socket, addr, *addr_len),
        };
        let mut iov = libc::iovec {
            iov_base: text.as_ptr() as *mut libc::c_void,
            iov_len: text.len(),
        };
        // Room for one control message carrying one descriptor, aligned
        // for cmsghdr (u64 covers its alignment).
        let mut control = [0u64; 4];
        // SAFETY: msghdr is a C struct of integers and pointers, for which
        // all-zero bytes are a valid (empty) value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = addr as *const libc::sockaddr_un as *mut libc::c_void;
        msg.msg_namelen = addr_len;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(fd) = fd {
            // SAFETY: CMSG_SPACE only computes a size from its argument.
            let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) };
            debug_assert!(space as usize <= std::mem::size_of_val(&control));
            msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = space as _;
            // SAFETY: msg_control points at `control`, which is aligned for
            // cmsghdr, zeroed, and at least CMSG_SPACE(one fd) bytes long
            // (checked above), so CMSG_FIRSTHDR returns a pointer to its
            // start, and the header and CMSG_DATA (one RawFd) lie inside it.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&msg);
                (*cmsg).cmsg_level = libc::SOL_SOCKET;
                (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd.as_raw_fd());
            }
        }
        loop {
            // SAFETY: `msg` and everything it points to (the address, the
            // one iovec over `text`, the control buffer) live until the call
            // returns; the socket and the attached descriptor are open for
            // the whole call (borrowed). The kernel only reads them.
            let sent = unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if sent >= 0 {
                return if sent as usize == text.len() {
                    Ok(())
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("the service manager took {sent} of {} bytes", text.len()),
                    ))
                };
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(io::Error::new(
                    e.kind(),
                    format!("notify {}: {e}", describe(addr, addr_len)),
                ));
            }
        }
    }
}

/// Checks a name for the descriptor store (`FDNAME=`): 1 to 255 printable
/// ASCII characters, no `:` (it separates names in `LISTEN_FDNAMES`). The
/// manager would ignore a bad name (and store the descriptor as `stored`,
/// or not remove anything) without a word.
pub fn check_fd_name(name: &str) -> io::Result<()> {
    if name.is_empty() {
        return Err(invalid("an fd store name cannot be empty".to_string()));
    }
    if name.len() > FD_NAME_MAX {
        return Err(invalid(format!(
            "fd store name {name:?} is {} bytes long; at most {FD_NAME_MAX} are allowed",
            name.len()
        )));
    }
    if let Some(c) = name.chars().find(|c| *c == ':') {
        return Err(invalid(format!(
            "fd store name {name:?} contains {c:?}, which separates names in LISTEN_FDNAMES"
        )));
    }
    if let Some(c) = name.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(invalid(format!(
            "fd store name {name:?} contains {c:?}: only printable ASCII is allowed"
        )));
    }
    Ok(())
}

/// Takes the descriptors the service manager passed to this process: with
/// `LISTEN_PID` equal to our pid, `LISTEN_FDS` descriptors from 3 on, named
/// by `LISTEN_FDNAMES` (`:`-separated; every one `unknown` when the variable
/// is absent, as sd_listen_fds_with_names(3) says). Each gets `FD_CLOEXEC`,
/// so none leaks into a run or survives an `execve`; then each is owned by
/// the returned `OwnedFd`. Nothing passed (no `LISTEN_PID`, or one for
/// another process): an empty vector.
///
/// Removes `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES` from the
/// environment in every case, so that no child and no later image of this
/// process (an `execve` keeps the pid) mistakes them for its own.
///
/// **Call it once, early in `main`, while the process has a single
/// thread**: it changes the environment, which is not safe while another
/// thread may read it (getenv(3) in libc or std), and the descriptors must
/// be taken before anything else opens or closes descriptors.
///
/// Errors (the variables malformed, a descriptor in the range not open,
/// the names not one per descriptor) close whatever had been passed: the
/// protocol was broken, and a descriptor that cannot be identified must
/// not be mistaken for another. Those in the manager's store are not
/// affected.
pub fn take_listen_fds() -> io::Result<Vec<(String, OwnedFd)>> {
    let vars = ListenVars {
        pid: std::env::var_os("LISTEN_PID"),
        fds: std::env::var_os("LISTEN_FDS"),
        names: std::env::var_os("LISTEN_FDNAMES"),
    };
    for key in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(key);
    }
    vars.take(std::process::id(), LISTEN_FDS_START)
}

/// The three variables as found.
struct ListenVars {
    pid: Option<OsString>,
    fds: Option<OsString>,
    names: Option<OsString>,
}

impl ListenVars {
    /// Takes the descriptors `first..first + LISTEN_FDS` if `LISTEN_PID` is
    /// `our_pid`.
    fn take(&self, our_pid: u32, first: RawFd) -> io::Result<Vec<(String, OwnedFd)>> {
        let Some(pid) = &self.pid else {
            return Ok(Vec::new());
        };
        let pid: u32 = parse_var("LISTEN_PID", pid)?;
        if pid != our_pid {
            return Ok(Vec::new());
        }
        let Some(fds) = &self.fds else {
            return Ok(Vec::new());
        };
        let count: u32 = parse_var("LISTEN_FDS", fds)?;
        let count = RawFd::try_from(count)
            .ok()
            .filter(|n| n.checked_add(first).is_some())
            .ok_or_else(|| invalid(format!("LISTEN_FDS={count} is too large")))?;
        // Every descriptor of the range gets FD_CLOEXEC first, whatever
        // happens to the others: none may reach a child.
        let mut taken = Vec::with_capacity(count as usize);
        let mut missing = Vec::new();
        for fd in first..first + count {
            match set_cloexec(fd) {
                // SAFETY: the manager passed `fd` to this process for it to
                // own (LISTEN_PID is ours), it is open (F_GETFD succeeded),
                // and this is the only place that takes it: the variables
                // are gone from the environment once read.
                Ok(()) => taken.push(unsafe { OwnedFd::from_raw_fd(fd) }),
                Err(e) => missing.push(format!("{fd} ({e})")),
            }
        }
        if !missing.is_empty() {
            return Err(invalid(format!(
                "LISTEN_FDS={count} but these descriptors are not open: {}",
                missing.join(", ")
            )));
        }
        let names: Vec<String> = match &self.names {
            None => vec!["unknown".to_string(); taken.len()],
            Some(names) => {
                let names = names
                    .to_str()
                    .ok_or_else(|| invalid(format!("LISTEN_FDNAMES is not UTF-8: {names:?}")))?;
                let names: Vec<String> = names.split(':').map(str::to_string).collect();
                if names.len() != taken.len() {
                    return Err(invalid(format!(
                        "LISTEN_FDNAMES has {} names for LISTEN_FDS={count} descriptors",
                        names.len()
                    )));
                }
                names
            }
        };
        Ok(names.into_iter().zip(taken).collect())
    }
}

fn parse_var<T: std::str::FromStr>(key: &str, value: &OsStr) -> io::Result<T> {
    value
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("{key}={value:?} is not a number")))
}

/// Sets FD_CLOEXEC on `fd`; fails if it is not open.
fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl(F_GETFD) reads a descriptor's flags and touches no
    // memory of ours; an fd that is not open gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::FD_CLOEXEC == 0 {
        // SAFETY: as above, with F_SETFD and an integer argument.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

/// The address in `NOTIFY_SOCKET`: `None` when empty, an error when it is
/// neither an absolute path nor `@name`.
fn sockaddr(value: &OsStr) -> Result<Option<(libc::sockaddr_un, libc::socklen_t)>, String> {
    let bytes = value.as_bytes();
    let shown = value.to_string_lossy();
    // SAFETY: sockaddr_un is a C struct of integers, for which all-zero
    // bytes are a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let path_offset = std::mem::size_of::<libc::sa_family_t>();
    let capacity = addr.sun_path.len();
    let (body, len) = match bytes.first() {
        None => return Ok(None),
        // Abstract namespace: a leading NUL, then the name (no terminator).
        Some(b'@') => {
            let name = &bytes[1..];
            if name.len() + 1 > capacity {
                return Err(format!("NOTIFY_SOCKET={shown}: the name is too long"));
            }
            addr.sun_path[0] = 0;
            (&bytes[1..], path_offset + 1 + name.len())
        }
        Some(b'/') => {
            if bytes.len() + 1 > capacity {
                return Err(format!("NOTIFY_SOCKET={shown}: the path is too long"));
            }
            if bytes.contains(&0) {
                return Err(format!("NOTIFY_SOCKET={shown}: the path contains a NUL"));
            }
            (bytes, path_offset + bytes.len() + 1)
        }
        Some(_) => {
            return Err(format!(
                "NOTIFY_SOCKET={shown}: only an absolute path or an @abstract name is supported"
            ))
        }
    };
    let start = usize::from(bytes[0] == b'@');
    for (i, b) in body.iter().enumerate() {
        addr.sun_path[start + i] = *b as libc::c_char;
    }
    Ok(Some((addr, len as libc::socklen_t)))
}

/// The address as `NOTIFY_SOCKET` wrote it, for messages.
fn describe(addr: &libc::sockaddr_un, len: libc::socklen_t) -> String {
    let path_len = (len as usize).saturating_sub(std::mem::size_of::<libc::sa_family_t>());
    let bytes: Vec<u8> = addr.sun_path[..path_len.min(addr.sun_path.len())]
        .iter()
        .map(|c| *c as u8)
        .collect();
    match bytes.split_first() {
        Some((0, name)) => format!("@{}", String::from_utf8_lossy(name)),
        _ => String::from_utf8_lossy(bytes.split(|b| *b == 0).next().unwrap_or(&[])).into_owned(),
    }
}

/// An unbound, blocking, close-on-exec datagram socket with a send timeout
/// and a large send buffer (both best effort).
fn datagram_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) takes integers and returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let timeout = libc::timeval {
        tv_sec: SEND_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    set_socket_option(&socket, libc::SO_SNDTIMEO, &timeout);
    set_socket_option(&socket, libc::SO_SNDBUF, &SEND_BUFFER);
    Ok(socket)
}

/// `setsockopt(SOL_SOCKET, option, value)`; a failure costs only the
/// option (best effort, as both uses here are).
fn set_socket_option<T>(socket: &OwnedFd, option: libc::c_int, value: &T) {
    // SAFETY: setsockopt reads `size_of::<T>()` bytes from `value`, which
    // lives across the call; the socket is open (borrowed).
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    /// One received datagram: its text and the descriptors it carried.
    fn receive(socket: &UnixDatagram) -> (String, Vec<OwnedFd>) {
        let mut buf = [0u8; 4096];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut control = [0u64; 64];
        // SAFETY: all-zero bytes are a valid msghdr.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `msg` points at `buf` and `control`, which outlive the
        // call; the socket is open.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        assert!(n >= 0, "recvmsg: {}", io::Error::last_os_error());
        assert_eq!(msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC), 0);
        let mut fds = Vec::new();
        // SAFETY: the kernel filled msg_control with msg_controllen bytes of
        // control messages; CMSG_FIRSTHDR/NXTHDR walk them within bounds,
        // and an SCM_RIGHTS message's data holds (len - CMSG_LEN(0)) / 4
        // descriptors that now belong to this process.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                    let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<RawFd>();
                    for i in 0..count {
                        fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        (String::from_utf8(buf[..n as usize].to_vec()).unwrap(), fds)
    }

    /// A receiving socket at a path, and the notifier for it.
    fn path_pair() -> (tempfile::TempDir, UnixDatagram, Notifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::for_socket(path.as_os_str());
        assert!(notifier.is_present());
        (dir, socket, notifier)
    }

    /// Whether two descriptors are the same open file (kcmp(2) KCMP_FILE).
    fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
        let pid = std::process::id() as libc::c_long;
        // SAFETY: kcmp takes integers only.
        let r = unsafe {
            libc::syscall(
                libc::SYS_kcmp,
                pid,
                pid,
                0, /* KCMP_FILE */
                a.as_raw_fd() as libc::c_long,
                b.as_raw_fd() as libc::c_long,
            )
        };
        assert!(r >= 0, "kcmp: {}", io::Error::last_os_error());
        r == 0
    }

    #[test]
    fn store_sends_the_documented_text_and_the_descriptor_itself() {
        let (_dir, socket, notifier) = path_pair();
        let mut file = tempfile::tempfile().unwrap();
        notifier.store("run-7-stdout", file.as_fd()).unwrap();
        let (text, fds) = receive(&socket);
        assert_eq!(text, "FDSTORE=1\nFDPOLL=0\nFDNAME=run-7-stdout");
        assert_eq!(fds.len(), 1);
        let received = &fds[0];
        assert!(same_file(file.as_fd(), received.as_fd()));
        let (ours, theirs) = (
            file.metadata().unwrap(),
            File::from(received.try_clone().unwrap())
                .metadata()
                .unwrap(),
        );
        assert_eq!((ours.dev(), ours.ino()), (theirs.dev(), theirs.ino()));
        // And it is usable: what is written through the received one is
        // read through ours (one open file, one offset).
        File::from(received.try_clone().unwrap())
            .write_all(b"parked")
            .unwrap();
        file.rewind().unwrap();
        let mut back = String::new();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "parked");
    }

    #[test]
    fn remove_and_notify_send_text_without_descriptors() {
        let (_dir, socket, notifier) = path_pair();
        notifier.remove("run-7-stdout").unwrap();
        let (text, fds) = receive(&socket);
        assert_eq!(text, "FDSTOREREMOVE=1\nFDNAME=run-7-stdout");
        assert!(fds.is_empty());
        notifier
            .notify("READY=1\nSTATUS=listening on 127.0.0.1:9371")
            .unwrap();
        let (text, fds) = receive(&socket);
        assert_eq!(text, "READY=1\nSTATUS=listening on 127.0.0.1:9371");
        assert!(fds.is_empty());
    }

    #[test]
    fn an_abstract_socket_is_reached() {
        let name = format!("cyrnel-service-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        let notifier = Notifier::for_socket(OsStr::new(&format!("@{name}")));
        assert!(notifier.is_present());
        assert_eq!(format!("{notifier:?}"), format!("Notifier(@{name})"));
        let (reader, _writer) = std::io::pipe().unwrap();
        notifier.store("pipe", reader.as_fd()).unwrap();
        let (text, fds) = receive(&socket);
        assert_eq!(text, "FDSTORE=1\nFDPOLL=0\nFDNAME=pipe");
        assert!(same_file(reader.as_fd(), fds[0].as_fd()));
    }

    #[test]
    fn the_notifier_is_shared_by_threads() {
        let (_dir, socket, notifier) = path_pair();
        let notifier = std::sync::Arc::new(notifier);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let notifier = notifier.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        notifier.notify(&format!("STATUS={t}-{i}")).unwrap();
                    }
                })
            })
            .collect();
        // Received while they send: the queue need not hold all 100.
        let mut got: Vec<String> = (0..100).map(|_| receive(&socket).0).collect();
        for t in threads {
            t.join().unwrap();
        }
        got.sort();
        let mut want: Vec<String> = (0..4)
            .flat_map(|t| (0..25).map(move |i| format!("STATUS={t}-{i}")))
            .collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn without_a_manager_every_call_is_a_no_op() {
        let notifier = Notifier::for_socket(OsStr::new(""));
        assert!(!notifier.is_present());
        let file = tempfile::tempfile().unwrap();
        notifier.notify("READY=1").unwrap();
        notifier.store("x", file.as_fd()).unwrap();
        notifier.remove("x").unwrap();
        // Names are still checked: a bug shows without systemd too.
        assert!(notifier.store("a:b", file.as_fd()).is_err());
    }

    #[test]
    fn unusable_sockets_say_why() {
        for (value, why) in [
            (
                "relative/path",
                "only an absolute path or an @abstract name",
            ),
            ("vsock:2:1234", "only an absolute path or an @abstract name"),
            (&format!("/{}", "x".repeat(200)), "the path is too long"),
            (&format!("@{}", "x".repeat(200)), "the name is too long"),
        ] {
            let notifier = Notifier::for_socket(OsStr::new(value));
            assert!(notifier.is_present(), "{value}");
            let e = notifier.notify("READY=1").unwrap_err();
            assert!(e.to_string().contains(why), "{value}: {e}");
        }
        // A socket nobody listens on: the send fails, it does not hang.
        let dir = tempfile::tempdir().unwrap();
        let gone = dir.path().join("gone");
        let e = Notifier::for_socket(gone.as_os_str())
            .notify("READY=1")
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains(&gone.display().to_string()), "{e}");
    }

    #[test]
    fn names_follow_the_fdname_rules() {
        for good in ["stored", "run-1-pidfd", "a b", &"n".repeat(255), "~!#"] {
            check_fd_name(good).unwrap();
        }
        for (bad, why) in [
            ("", "cannot be empty"),
            ("a:b", "separates names"),
            (&"n".repeat(256), "at most 255"),
            ("tab\there", "printable ASCII"),
            ("nl\n", "printable ASCII"),
            ("del\u{7f}", "printable ASCII"),
            ("é", "printable ASCII"),
        ] {
            let e = check_fd_name(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
        let (_dir, socket, notifier) = path_pair();
        let file = tempfile::tempfile().unwrap();
        assert!(notifier.store("x\nFDSTOREREMOVE=1", file.as_fd()).is_err());
        assert!(notifier.remove("a:b").is_err());
        assert!(notifier.notify("NUL\0").is_err());
        // Nothing was sent for any of them.
        socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(
            socket.recv(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    /// Serialises the tests that place descriptors at fixed numbers, so
    /// that one never takes (and closes) a number another just placed.
    static PLACED: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// `n` descriptors at consecutive numbers (as a manager passes them),
    /// each a pipe's read end, with their write ends; the first number.
    /// Hold `PLACED` while using them.
    fn consecutive_pipes(n: usize) -> (RawFd, Vec<OwnedFd>) {
        // Far above what the test process uses, so the block is free; the
        // kernel hands out the lowest free numbers, never these.
        let mut base = 600;
        loop {
            let mut readers = Vec::new();
            let mut writers = Vec::new();
            for _ in 0..n {
                let (r, w) = std::io::pipe().unwrap();
                readers.push(OwnedFd::from(r));
                writers.push(OwnedFd::from(w));
            }
            let mut placed = Vec::new();
            for (i, r) in readers.iter().enumerate() {
                let want = base + i as RawFd;
                // SAFETY: F_DUPFD with an integer argument returns a new
                // descriptor (no CLOEXEC, as a manager passes them).
                let fd = unsafe { libc::fcntl(r.as_raw_fd(), libc::F_DUPFD, want) };
                assert!(fd >= 0, "F_DUPFD: {}", io::Error::last_os_error());
                // SAFETY: `fd` was just made and belongs to nobody else.
                placed.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            let numbers: Vec<RawFd> = placed.iter().map(|f| f.as_raw_fd()).collect();
            if numbers.windows(2).all(|w| w[1] == w[0] + 1) && numbers[0] == base {
                // Handed over: the test's take() owns them now.
                for f in placed {
                    std::mem::forget(f);
                }
                return (base, writers);
            }
            base += 64;
        }
    }

    fn vars(pid: &str, fds: Option<&str>, names: Option<&str>) -> ListenVars {
        ListenVars {
            pid: Some(pid.into()),
            fds: fds.map(Into::into),
            names: names.map(Into::into),
        }
    }

    fn cloexec(fd: BorrowedFd<'_>) -> bool {
        // SAFETY: F_GETFD on an open, borrowed descriptor.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        flags >= 0 && flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn listen_fds_are_taken_named_and_made_close_on_exec() {
        let _placed = PLACED.lock().unwrap_or_else(|e| e.into_inner());
        let (first, writers) = consecutive_pipes(3);
        for i in 0..3 {
            // SAFETY: borrowing a descriptor placed above, open until take().
            assert!(!cloexec(unsafe { BorrowedFd::borrow_raw(first + i) }));
        }
        let taken = vars("42", Some("3"), Some("run-1-pidfd:run-1-stdout:state"))
            .take(42, first)
            .unwrap();
        let names: Vec<&str> = taken.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["run-1-pidfd", "run-1-stdout", "state"]);
        for (i, (name, fd)) in taken.iter().enumerate() {
            assert_eq!(fd.as_raw_fd(), first + i as RawFd, "{name}");
            assert!(cloexec(fd.as_fd()), "{name} has no FD_CLOEXEC");
        }
        // Each is the read end of its own pipe, in order.
        for (i, w) in writers.into_iter().enumerate() {
            File::from(w)
                .write_all(format!("pipe {i}").as_bytes())
                .unwrap();
        }
        for (i, (_, fd)) in taken.into_iter().enumerate() {
            let mut got = String::new();
            File::from(fd).read_to_string(&mut got).unwrap();
            assert_eq!(got, format!("pipe {i}"));
        }
    }

    #[test]
    fn names_default_to_unknown() {
        let _placed = PLACED.lock().unwrap_or_else(|e| e.into_inner());
        let (first, _writers) = consecutive_pipes(2);
        let taken = vars("7", Some("2"), None).take(7, first).unwrap();
        let names: Vec<&str> = taken.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["unknown", "unknown"]);
    }

    #[test]
    fn another_process_s_descriptors_are_left_alone() {
        let _placed = PLACED.lock().unwrap_or_else(|e| e.into_inner());
        let (first, _writers) = consecutive_pipes(1);
        assert!(vars("8", Some("1"), Some("x"))
            .take(9, first)
            .unwrap()
            .is_empty());
        // SAFETY: still ours and open: take() did not touch it.
        let fd = unsafe { OwnedFd::from_raw_fd(first) };
        assert!(!cloexec(fd.as_fd()));
        let none = ListenVars {
            pid: None,
            fds: Some("1".into()),
            names: None,
        };
        assert!(none.take(9, first).unwrap().is_empty());
        assert!(vars("9", None, None).take(9, first).unwrap().is_empty());
        assert!(vars("9", Some("0"), None)
            .take(9, first)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn a_broken_protocol_is_an_error_that_closes_what_was_passed() {
        let _placed = PLACED.lock().unwrap_or_else(|e| e.into_inner());
        for (pid, fds, names, why) in [
            ("x", Some("1"), None, "LISTEN_PID"),
            ("5", Some("-1"), None, "LISTEN_FDS"),
            ("5", Some("2147483647"), None, "too large"),
            ("5", Some("2"), Some("one"), "1 names for LISTEN_FDS=2"),
            ("5", Some("2"), Some("a:b:c"), "3 names for LISTEN_FDS=2"),
        ] {
            let (first, _writers) = consecutive_pipes(2);
            let e = vars(pid, fds, names).take(5, first).unwrap_err();
            assert!(e.to_string().contains(why), "{e}");
            if why.contains("names") {
                // Taken, made close-on-exec, and closed.
                for fd in first..first + 2 {
                    // SAFETY: F_GETFD only reads flags; EBADF says closed.
                    assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0);
                }
            } else {
                for fd in first..first + 2 {
                    // SAFETY: still ours: the error came before taking them.
                    drop(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // A descriptor of the range that is not open.
        let (first, _writers) = consecutive_pipes(1);
        let e = vars("5", Some("2"), None).take(5, first).unwrap_err();
        assert!(e.to_string().contains("not open"), "{e}");
        // SAFETY: F_GETFD only reads flags; EBADF says closed.
        assert!(unsafe { libc::fcntl(first, libc::F_GETFD) } < 0);
    }
}
