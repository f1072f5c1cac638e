#!/usr/bin/env python3
"""A service-manager stand-in for the integration tests (no systemd here).

Runs one daemon the way systemd runs a unit with

    Type=notify  NotifyAccess=main  KillMode=process  KillSignal=SIGTERM
    Restart=on-failure  FileDescriptorStoreMax=N

and implements what the daemon can see of systemd (v252) from inside, as
sd_notify(3), sd_listen_fds(3) and https://systemd.io/FILE_DESCRIPTOR_STORE
document it:

- A notify socket (unix datagram, SO_PASSCRED): NOTIFY_SOCKET is a path or
  an @abstract name. Only the main process may send (NotifyAccess=main:
  the sender's pid, from SCM_CREDENTIALS); a datagram with a NUL byte or
  truncated is ignored. READY=1, RELOADING=1, STOPPING=1 (which wins over
  READY=1, which wins over RELOADING=1), STATUS=.
- The fd store. FDSTOREREMOVE=1 with a valid FDNAME= closes every stored
  descriptor of that name (and wins over FDSTORE=1 in the same message).
  FDSTORE=1 stores each attached descriptor under FDNAME= ("stored" when
  missing or invalid: 1-255 printable ASCII characters, no ':'), unless the
  store already holds the same open file (kcmp KCMP_FILE, a dup): then it
  is closed; beyond FileDescriptorStoreMax= it is closed. Unless FDPOLL=0,
  a stored descriptor is watched (epoll, no events: only EPOLLHUP/EPOLLERR)
  and dropped when one is seen; one that epoll refuses (a regular file) is
  kept unwatched. Descriptors attached to any other message are closed.
- Child subreaper (PR_SET_CHILD_SUBREAPER): whatever the daemon leaves
  behind when it dies is reparented here, as to PID 1 under systemd, and
  reaped here.
- Restart=on-failure: when the main process exits with a code other than 0
  or dies by a signal other than SIGHUP, SIGINT, SIGTERM and SIGPIPE (those
  four count as clean, as for systemd), and no stop was asked for, it is
  started again (after --restart-sec seconds, or with --hold-restarts when
  the `restart` command comes) with the store passed:
  descriptors 3..3+n, LISTEN_FDS=n, LISTEN_FDNAMES (':'-joined), LISTEN_PID
  (the new process's own pid: fork, dup2 into place, set the environment,
  execve). As systemd keeps the store in a list it prepends to, the most
  recently stored descriptor comes first. With nothing stored the three
  variables are not set. More than --start-limit-burst starts within
  --start-limit-interval seconds fail the unit (systemd's defaults: 5 in
  10 s; 0 turns the limit off).
- Stop (the `stop` command, EOF on stdin, or SIGTERM/SIGINT to the stand-in):
  SIGTERM to the main process only (KillMode=process), SIGKILL after
  --timeout-stop-sec. A clean exit or a stop deactivates the unit: the store
  is closed.

The daemon runs in a session of its own, stdin /dev/null, stdout and stderr
to --log (appended) or to this script's stderr, in this script's working
directory and environment (without NOTIFY_SOCKET and LISTEN_*, which are
set as above).

Departures from systemd, for tests: what is left of the unit once it is
inactive (with KillMode=process systemd leaves it running) is reported
(`leftover`) and then SIGKILLed, so that a test leaves nothing behind; the
restart delay and start limits are options, and a restart can be held until
a test says so.

Output: one line per event on stdout, flushed at once:

    started PID N NAMES       started with N stored descriptors, NAMES their
                              LISTEN_FDNAMES (empty when N is 0)
    ready PID | reloading PID | stopping PID | status PID TEXT
    stored NAME               a descriptor entered the store
    duplicate NAME            already in the store (same open file): closed
    full NAME                 FileDescriptorStoreMax reached: closed
    removed NAME COUNT        FDSTOREREMOVE=1 closed COUNT descriptors
    dropped NAME              EPOLLHUP/EPOLLERR seen (FDPOLL not 0): closed
    unstored PID COUNT        descriptors sent without FDSTORE=1: closed
    ignored PID REASON        a datagram not acted upon
    exited PID exited CODE | exited PID killed SIG | exited PID dumped SIG
                              the main process ended
    reaped PID exited CODE | reaped PID killed SIG | reaped PID dumped SIG
                              another process (an orphan) was reaped
    restarting COUNT          the COUNTth automatic restart begins (held:
                              it starts at the `restart` command)
    failed REASON             the unit failed (start-limit-hit, spawn error)
    list COUNT NAMES          answer to `list`: the store in LISTEN order,
                              ':'-joined
    released COUNT            the unit is inactive: the store is closed
    leftover PID COMM         a process still there once the unit is inactive
    inactive                  the unit is inactive; the stand-in exits 0

Commands, one per line on stdin: `stop`, `list`, `restart` (a held restart).
"""

import argparse
import ctypes
import errno
import fcntl
import os
import resource
import select
import signal
import socket
import struct
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
KCMP_FILE = 0
SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)
NOTIFY_BUFFER_MAX = 4096  # systemd reads datagrams of up to PIPE_BUF bytes
SCM_MAX_FD = 253  # the most descriptors one datagram can carry
CLEAN_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE}
LIBC = ctypes.CDLL(None, use_errno=True)


def emit(*words):
    sys.stdout.write(" ".join(str(w) for w in words) + "\n")
    sys.stdout.flush()


def note(text):
    sys.stderr.write("manager.py: %s\n" % text)
    sys.stderr.flush()


def fdname_is_valid(name):
    """systemd's fdname_is_valid: printable ASCII but ':', at most 255."""
    return len(name) <= 255 and all(" " <= c <= "~" and c != ":" for c in name)


def same_file(a, b):
    """systemd's same_fd: kcmp(KCMP_FILE), else the same inode and flags."""
    if SYS_KCMP is not None:
        pid = os.getpid()
        long = ctypes.c_long
        r = LIBC.syscall(long(SYS_KCMP), long(pid), long(pid), long(KCMP_FILE), long(a), long(b))
        if r >= 0:
            return r == 0
        if ctypes.get_errno() not in (errno.ENOSYS, errno.EPERM, errno.EACCES):
            raise OSError(ctypes.get_errno(), "kcmp")
    sa, sb = os.fstat(a), os.fstat(b)
    if (sa.st_dev, sa.st_ino) != (sb.st_dev, sb.st_ino):
        return False
    return fcntl.fcntl(a, fcntl.F_GETFL) == fcntl.fcntl(b, fcntl.F_GETFL)


def describe_status(status):
    """("exited", code, None) or ("killed"/"dumped", signal name, number)."""
    if os.WIFEXITED(status):
        return ("exited", os.WEXITSTATUS(status), None)
    sig = os.WTERMSIG(status)
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = str(sig)
    return ("dumped" if os.WCOREDUMP(status) else "killed", name, sig)


class Entry:
    def __init__(self, fd, name, polled):
        self.fd = fd
        self.name = name
        self.polled = polled


class Manager:
    def __init__(self, args):
        self.args = args
        self.command = args.command
        self.store = []  # newest first, as systemd's LIST_PREPEND keeps it
        self.by_fd = {}  # polled descriptors: fd -> Entry
        self.main_pid = None
        self.stop_requested = False
        self.stop_deadline = None
        self.restart_at = None
        self.restart_held = False
        self.restarts = 0
        self.starts = []  # start times, for the start limit
        self.finished = False
        self.stdin_buffer = b""

        # Room for a large store (systemd raises its own limit likewise);
        # the daemon gets the limit this script was started with.
        self.nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile[1], self.nofile[1]))

        if LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        address = args.socket
        if address.startswith("@"):
            self.sock.bind("\0" + address[1:])
        else:
            if os.path.exists(address):
                os.unlink(address)
            self.sock.bind(address)
            os.chmod(address, 0o777)  # as systemd's /run/systemd/notify
        self.sock.setblocking(False)
        self.notify_socket = address

        # Signals arrive as their numbers, written by the interpreter's C
        # handler into this pipe (the Python handlers do nothing).
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.wake_w)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)

        self.log_fd = None
        if args.log:
            self.log_fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

        self.epoll = select.epoll()
        self.epoll.register(self.sock.fileno(), select.EPOLLIN)
        self.epoll.register(self.wake_r, select.EPOLLIN)
        self.commands = True
        try:
            os.set_blocking(0, False)
            self.epoll.register(0, select.EPOLLIN)
        except (PermissionError, OSError):
            self.commands = False  # stdin is not a pipe: no commands

    # -- the main process --------------------------------------------------

    def start(self):
        now = time.monotonic()
        burst, interval = self.args.start_limit_burst, self.args.start_limit_interval
        self.starts = [t for t in self.starts if now - t < interval]
        if burst > 0 and len(self.starts) >= burst:
            emit("failed", "start-limit-hit")
            self.deactivate()
            return
        self.starts.append(now)
        names = [e.name for e in self.store]
        fds = [e.fd for e in self.store]
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}
        env["NOTIFY_SOCKET"] = self.notify_socket
        pid = os.fork()
        if pid == 0:
            self.exec_child(fds, names, env)  # never returns
        self.main_pid = pid
        emit("started", pid, len(fds), ":".join(names))

    def exec_child(self, fds, names, env):
        try:
            for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            os.setsid()
            resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)
            null = os.open("/dev/null", os.O_RDONLY)
            os.dup2(null, 0)
            out = self.log_fd if self.log_fd is not None else 2
            os.dup2(out, 1)
            if out != 2:
                os.dup2(out, 2)
            n = len(fds)
            # Out of the way of 3..3+n first, then into place (dup2 clears
            # FD_CLOEXEC), then nothing else stays open.
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3 + n) for fd in fds]
            for i, fd in enumerate(high):
                os.dup2(fd, 3 + i, inheritable=True)
            os.closerange(3 + n, os.sysconf("SC_OPEN_MAX"))
            if n > 0:
                env["LISTEN_PID"] = str(os.getpid())
                env["LISTEN_FDS"] = str(n)
                env["LISTEN_FDNAMES"] = ":".join(names)
            os.execvpe(self.command[0], self.command, env)
        except BaseException as e:  # noqa: BLE001 - the child must never return
            try:
                os.write(2, ("manager.py: cannot start %s: %s\n" % (self.command[0], e)).encode())
            finally:
                os._exit(127)

    def on_main_exit(self, status):
        pid = self.main_pid
        how, value, sig = describe_status(status)
        emit("exited", pid, how, value)
        self.main_pid = None
        clean = value == 0 if how == "exited" else sig in CLEAN_SIGNALS
        if self.stop_requested or clean:
            self.deactivate()
            return
        self.restarts += 1
        emit("restarting", self.restarts)
        if self.args.hold_restarts:
            self.restart_held = True
        else:
            self.restart_at = time.monotonic() + self.args.restart_sec

    def stop(self):
        if self.stop_requested:
            return
        self.stop_requested = True
        self.restart_at = None
        self.restart_held = False
        if self.main_pid is None:
            self.deactivate()
            return
        try:
            os.kill(self.main_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.stop_deadline = time.monotonic() + self.args.timeout_stop_sec

    def deactivate(self):
        """The unit is inactive: close the store, report and end what is
        left, and finish."""
        count = len(self.store)
        for e in list(self.store):
            self.close_entry(e)
        emit("released", count)
        for _ in range(100):
            left = self.descendants()
            if not left:
                break
            for pid, comm in left:
                emit("leftover", pid, comm)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.reap(block=True)
        emit("inactive")
        self.finished = True

    def descendants(self):
        """Every process below this one, from /proc: (pid, comm)."""
        parent = {}
        comm = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % entry) as f:
                    stat = f.read()
            except OSError:
                continue
            close = stat.rindex(")")
            fields = stat[close + 2:].split()
            if fields[0] == "Z":
                continue  # a zombie: reaped below
            parent[int(entry)] = int(fields[1])
            comm[int(entry)] = stat[stat.index("(") + 1:close]
        me = os.getpid()
        found = []
        frontier = [me]
        while frontier:
            p = frontier.pop()
            for child, ppid in parent.items():
                if ppid == p:
                    found.append((child, comm[child]))
                    frontier.append(child)
        return found

    def reap(self, block=False):
        # What the main process sent before it ended is acted upon first,
        # as systemd dispatches notifications before SIGCHLD: it is still
        # the main process for those messages.
        self.on_notify()
        while True:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.main_pid:
                self.on_main_exit(status)
            else:
                emit("reaped", pid, *describe_status(status)[:2])
            if block:
                # Reap what is there now; the caller looks again.
                block = False

    # -- the notify socket -------------------------------------------------

    def on_notify(self):
        cred_size = struct.calcsize("3i")
        while True:
            try:
                data, ancdata, flags, _ = self.sock.recvmsg(
                    NOTIFY_BUFFER_MAX,
                    socket.CMSG_SPACE(SCM_MAX_FD * 4) + socket.CMSG_SPACE(cred_size),
                    socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                return
            fds = []
            sender = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds.extend(struct.unpack("%di" % (usable // 4), payload[:usable]))
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    sender = struct.unpack("3i", payload[:cred_size])[0]
            try:
                self.handle(data, fds, flags, sender)
            finally:
                for fd in fds:
                    if fd is not None:
                        os.close(fd)

    def handle(self, data, fds, flags, sender):
        """Acts on one datagram; sets the descriptors it keeps to None in
        `fds` (the caller closes the rest)."""
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            emit("ignored", sender, "truncated")
            return
        if sender is None or self.main_pid is None or sender != self.main_pid:
            emit("ignored", sender, "not-the-main-process")
            return
        if b"\0" in data:
            emit("ignored", sender, "nul-byte")
            return
        tags = data.decode("utf-8", "replace").split("\n")

        def find(prefix):
            for t in tags:
                if t.startswith(prefix):
                    return t[len(prefix):]
            return None

        if "STOPPING=1" in tags:
            emit("stopping", sender)
        elif "READY=1" in tags:
            emit("ready", sender)
        elif "RELOADING=1" in tags:
            emit("reloading", sender)
        status = find("STATUS=")
        if status is not None:
            emit("status", sender, status)

        stored_path = False
        if "FDSTOREREMOVE=1" in tags:
            name = find("FDNAME=")
            if name is None or not fdname_is_valid(name):
                emit("ignored", sender, "fdstoreremove-without-valid-fdname")
            else:
                gone = [e for e in self.store if e.name == name]
                for e in gone:
                    self.close_entry(e)
                emit("removed", name, len(gone))
        elif "FDSTORE=1" in tags:
            stored_path = True
            name = find("FDNAME=")
            if name is None or not fdname_is_valid(name):
                name = "stored"
            polled = "FDPOLL=0" not in tags
            for i, fd in enumerate(fds):
                if self.add(fd, name, polled):
                    fds[i] = None
        if not stored_path and fds:
            emit("unstored", sender, len(fds))

    def add(self, fd, name, polled):
        """Stores `fd` (True) or says why not (False: the caller closes it)."""
        if len(self.store) >= self.args.fdstore_max:
            emit("full", name)
            return False
        st = os.fstat(fd)
        for e in self.store:
            other = os.fstat(e.fd)
            if (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino) and same_file(e.fd, fd):
                emit("duplicate", name)
                return False
        entry = Entry(fd, name, polled)
        if polled:
            try:
                self.epoll.register(fd, 0)  # EPOLLHUP and EPOLLERR only
                self.by_fd[fd] = entry
            except PermissionError:
                entry.polled = False  # not pollable (a regular file): kept
        self.store.insert(0, entry)
        emit("stored", name)
        return True

    def close_entry(self, entry):
        self.store.remove(entry)
        if entry.polled:
            self.epoll.unregister(entry.fd)
            del self.by_fd[entry.fd]
        os.close(entry.fd)

    # -- commands ----------------------------------------------------------

    def on_stdin(self):
        try:
            chunk = os.read(0, 4096)
        except BlockingIOError:
            return
        if not chunk:
            self.epoll.unregister(0)
            self.stop()
            return
        self.stdin_buffer += chunk
        while b"\n" in self.stdin_buffer:
            line, self.stdin_buffer = self.stdin_buffer.split(b"\n", 1)
            command = line.decode().strip()
            if command == "stop":
                self.stop()
            elif command == "restart":
                if self.restart_held:
                    self.restart_held = False
                    self.start()
                else:
                    note("restart: no restart is held")
            elif command == "list":
                emit("list", len(self.store), ":".join(e.name for e in self.store))
            elif command:
                note("unknown command %r" % command)

    # -- the loop ----------------------------------------------------------

    def run(self):
        self.start()
        while not self.finished:
            timeout = -1
            now = time.monotonic()
            for at in (self.restart_at, self.stop_deadline):
                if at is not None:
                    left = max(0.0, at - now)
                    timeout = left if timeout < 0 else min(timeout, left)
            ready = dict(self.epoll.poll(timeout))
            # Hung-up stored descriptors first: handling a message may
            # close one and store another under the same number.
            for fd in [fd for fd in ready if fd in self.by_fd]:
                entry = self.by_fd[fd]
                self.close_entry(entry)
                emit("dropped", entry.name)
            if self.sock.fileno() in ready:
                self.on_notify()
            if self.commands and 0 in ready:
                self.on_stdin()
            if self.wake_r in ready:
                signals = b""
                try:
                    while True:
                        chunk = os.read(self.wake_r, 512)
                        if not chunk:
                            break
                        signals += chunk
                except BlockingIOError:
                    pass
                if signal.SIGTERM in signals or signal.SIGINT in signals:
                    self.stop()
            if self.finished:
                return
            self.reap()
            if self.finished:
                return
            now = time.monotonic()
            if self.stop_deadline is not None and now >= self.stop_deadline and self.main_pid:
                self.stop_deadline = None
                try:
                    os.kill(self.main_pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if self.restart_at is not None and now >= self.restart_at:
                self.restart_at = None
                self.start()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--socket", required=True, help="the notify socket: a path or @name")
    parser.add_argument("--fdstore-max", type=int, default=0, help="FileDescriptorStoreMax= (0)")
    parser.add_argument("--restart-sec", type=float, default=0.1, help="RestartSec= (0.1)")
    parser.add_argument("--hold-restarts", action="store_true",
                        help="restart only at the `restart` command")
    parser.add_argument("--start-limit-burst", type=int, default=5, help="StartLimitBurst= (5)")
    parser.add_argument("--start-limit-interval", type=float, default=10.0,
                        help="StartLimitIntervalSec= (10)")
    parser.add_argument("--timeout-stop-sec", type=float, default=90.0, help="TimeoutStopSec= (90)")
    parser.add_argument("--log", help="the daemon's stdout and stderr (appended)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args()
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("no daemon command after --")
    Manager(args).run()


if __name__ == "__main__":
    main()
