//! The service-manager stand-in (`support/manager.py`) itself, so that the
//! crash tests of the daemon rest on something tested: small Python daemons
//! (`TOY`) store descriptors, crash and read them back, and report what they
//! were passed through `STATUS=`; the library's own `cyrnel::service` does
//! the same from this test binary started as a daemon; and today's `cyrneld`
//! runs, crashes, restarts and stops under it.

use std::fs;
use std::process::Command;

use cyrnel::service::LISTEN_FDNAMES_MAX;

use crate::support::*;

/// A daemon for the stand-in, in Python: `python3 -c TOY MODE [ARG]`.
/// It speaks sd_notify(3) itself (the main process must send: the stand-in
/// has NotifyAccess=main) and reports as JSON in `STATUS=`.
const TOY: &str = r#"
import array, fcntl, json, os, select, signal, socket, struct, subprocess, sys

def passed():
    """What this start was given, read as sd_listen_fds(3) does, before
    this process opens anything of its own."""
    fds = []
    for entry in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink("/proc/self/fd/" + entry)
        except OSError:
            continue  # the directory listdir had open
        if int(entry) > 2:
            fds.append(int(entry))
    fds.sort()
    return {
        "pid_is_ours": os.environ.get("LISTEN_PID") == str(os.getpid()),
        "listen_fds": os.environ.get("LISTEN_FDS"),
        "names": os.environ.get("LISTEN_FDNAMES"),
        "open": fds,
        "cloexec": [fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC for fd in fds],
    }

info = passed()
mode, args = sys.argv[1], sys.argv[2:]
first = info["listen_fds"] is None
address = os.environ["NOTIFY_SOCKET"]
target = "\0" + address[1:] if address.startswith("@") else address
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

def send(text, fds=()):
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([text.encode()], ancillary, 0, target)

def report(**more):
    info.update(more)
    send("READY=1\nSTATUS=" + json.dumps(info, sort_keys=True))

def kind(fd):
    target = os.readlink("/proc/self/fd/%d" % fd)
    return target.split(":")[0].split(" ")[0].lstrip("/")

def contents(fd):
    if kind(fd) == "pipe":
        os.set_blocking(fd, False)
        data = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except BlockingIOError:
                return data.decode() + "<open>"
            if not chunk:
                return data.decode() + "<eof>"
            data += chunk
    return os.pread(fd, 4096, 0).decode()

def exit_code(pidfd):
    """The exit status of a reaped process, from its pidfd (PIDFD_GET_INFO
    with PIDFD_INFO_EXIT, Linux >= 6.15), once it is reaped."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    while not any(ev & select.POLLHUP for _, ev in poller.poll()):
        pass
    info = bytearray(64)
    struct.pack_into("Q", info, 0, 1 << 3)
    fcntl.ioctl(pidfd, 0xC040FF0B, info)
    if not struct.unpack_from("Q", info, 0)[0] & (1 << 3):
        return None
    return os.waitstatus_to_exitcode(struct.unpack_from("i", info, 60)[0])

def pause():
    while True:
        signal.pause()

if mode == "park":
    if first:
        r, w = os.pipe()
        os.write(w, b"before the crash\n")
        send("FDSTORE=1\nFDPOLL=0\nFDNAME=output", [r])
        m = os.memfd_create("state")
        os.write(m, b"generation 1")
        send("FDSTORE=1\nFDNAME=state", [m])
        os.close(r)
        os.close(m)
        report()
    else:
        report(contents={n: contents(3 + i) for i, n in enumerate(info["names"].split(":"))},
               kinds=[kind(fd) for fd in info["open"]])
    pause()

elif mode == "poll":
    if first:
        def pidfd_of(code):
            pid = os.fork()
            if pid == 0:
                os._exit(code)
            return pid, os.pidfd_open(pid)
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        os.write(w2, b"kept data")
        p1, pidfd1 = pidfd_of(0)
        p2, pidfd2 = pidfd_of(7)
        send("FDSTORE=1\nFDNAME=polled", [r1])
        send("FDSTORE=1\nFDPOLL=0\nFDNAME=kept", [r2])
        send("FDSTORE=1\nFDNAME=pidfd-polled", [pidfd1])
        send("FDSTORE=1\nFDPOLL=0\nFDNAME=pidfd-kept", [pidfd2])
        report()
        # Now hang them all up: the pipes lose their writers, the
        # children are reaped.
        for fd in (r1, r2, w1, w2):
            os.close(fd)
        os.waitpid(p1, 0)
        os.waitpid(p2, 0)
        send("STATUS=hung up")
    else:
        names = info["names"].split(":")
        report(contents=contents(3 + names.index("kept")),
               exit_code=exit_code(3 + names.index("pidfd-kept")))
    pause()

elif mode == "rules":
    r, w = os.pipe()
    send("FDSTORE=1\nFDNAME=a", [r])
    send("FDSTORE=1\nFDNAME=b", [os.dup(r)])         # the same open file
    send("FDSTORE=1\nFDNAME=bad:name", [os.memfd_create("x")])
    send("FDSTORE=1", [os.pipe()[0]])                # no FDNAME
    send("FDSTORE=1\nFDNAME=w", [os.pipe()[0]])      # beyond the maximum
    send("STATUS=with a descriptor", [os.pipe()[0]]) # no FDSTORE=1
    send("FDSTOREREMOVE=1\nFDNAME=stored")
    send("FDSTOREREMOVE=1")                          # no FDNAME
    send("READY=1\0")                                # a NUL byte
    report()
    pause()

elif mode == "exits":
    # The Nth start ends the Nth way.
    counter = args[0]
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    report(start=n)
    how = ["exit 3", "SIGSEGV", "SIGTERM", "exit 0"][n if n < 4 else 3]
    if how.startswith("exit"):
        sys.exit(int(how.split()[1]))
    signal.signal(getattr(signal, how), signal.SIG_DFL)
    os.kill(os.getpid(), getattr(signal, how))
    pause()

elif mode == "orphans":
    if first:
        # run-1 ends once this process is gone (EOF on its stdin), with 3;
        # run-2 outlives everything.
        run1 = subprocess.Popen(["sh", "-c", "read line; exit 3"], stdin=subprocess.PIPE)
        run2 = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
        send("FDSTORE=1\nFDPOLL=0\nFDNAME=run-1-pidfd", [os.pidfd_open(run1.pid)])
        report(run1=run1.pid, run2=run2.pid)
    else:
        report(run1_exit=exit_code(3))
    pause()

elif mode == "many":
    # args: COUNT NAME_LENGTH; every name distinct.
    count, length = int(args[0]), int(args[1])
    for i in range(count):
        name = ("%d-" % i).ljust(length, "n")
        send("FDSTORE=1\nFDPOLL=0\nFDNAME=" + name, [os.pipe()[0]])
    # The lists themselves would not fit in one notification (4 KiB).
    report(names_bytes=None if first else len(info["names"]), names=None,
           open=len(info["open"]), cloexec=None)
    pause()

elif mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    report()
    pause()

elif mode == "helper-sends":
    child = os.fork()
    if child == 0:
        send("READY=1\nSTATUS=from a child")
        os._exit(0)
    os.waitpid(child, 0)
    send("STATUS=helper %d" % child)
    report()
    pause()
"#;

fn toy(mode: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("python3");
    cmd.arg("-c").arg(TOY).arg(mode).args(args);
    cmd
}

/// The JSON of the last `STATUS=` the main process `pid` sent.
#[track_caller]
fn status_of(manager: &mut Manager, pid: u32) -> Json {
    manager.wait_for(&format!("a STATUS= from {pid}"), |s| {
        s.statuses
            .iter()
            .rev()
            .find(|(p, text)| *p == pid && text.starts_with('{'))
            .map(|(_, text)| parse_json(text).expect("STATUS= JSON"))
    })
}

#[test]
fn stored_descriptors_come_back_after_a_crash_as_listen_fds() {
    let mut m = Manager::start(&toy("park", &[]), &ManagerOptions::new().fdstore_max(4));
    let first = m.wait_ready();
    let passed = status_of(&mut m, first);
    assert_eq!(
        passed["listen_fds"],
        Json::Null,
        "a first start gets no LISTEN_*"
    );
    assert_eq!(passed["names"], Json::Null);
    assert_eq!(passed["open"], json("[]"), "nothing of the stand-in leaks");
    assert_eq!(m.state().starts[0], (first, vec![]));
    m.wait_stored("output");
    m.wait_stored("state");

    let second = m.kill9_and_wait_ready();
    assert_ne!(second, first);
    let state = m.state().clone();
    assert_eq!(state.exits, [(first, "killed SIGKILL".to_string())]);
    assert!(
        state.events.contains(&"restarting 1".to_string()),
        "{:?}",
        state.events
    );
    // The store as systemd keeps it: the newest first.
    let names = vec!["state".to_string(), "output".to_string()];
    assert_eq!(state.starts[1], (second, names.clone()));
    let passed = status_of(&mut m, second);
    assert_eq!(
        passed["pid_is_ours"], true,
        "LISTEN_PID is the new process' own pid"
    );
    assert_eq!(passed["listen_fds"], "2");
    assert_eq!(passed["names"], "state:output");
    assert_eq!(passed["open"], json("[3, 4]"), "fds 3 and 4, nothing else");
    assert_eq!(
        passed["cloexec"],
        json("[0, 0]"),
        "passed without FD_CLOEXEC"
    );
    assert_eq!(passed["kinds"], json(r#"["memfd", "pipe"]"#));
    // The same open files: what was written before the crash is there, and
    // the pipe's writer is gone with the crashed process.
    assert_eq!(passed["contents"]["state"], "generation 1");
    assert_eq!(passed["contents"]["output"], "before the crash\n<eof>");
    // The store is unchanged by the restart.
    assert_eq!(m.list(), names);

    let end = m.stop();
    assert_eq!(
        end.exits.last(),
        Some(&(second, "killed SIGTERM".to_string()))
    );
    assert!(
        end.events.contains(&"released 2".to_string()),
        "{:?}",
        end.events
    );
    assert!(end.leftovers.is_empty(), "{:?}", end.leftovers);
}

#[test]
fn fdpoll_0_keeps_what_hangs_up_and_the_default_drops_it() {
    let mut m = Manager::start(&toy("poll", &[]), &ManagerOptions::new().fdstore_max(8));
    let first = m.wait_ready();
    m.wait_for("the toy to hang everything up", |s| {
        s.statuses
            .iter()
            .any(|(p, t)| *p == first && t == "hung up")
            .then_some(())
    });
    // A pipe without writers and a pidfd of a reaped process report
    // POLLHUP: dropped unless stored with FDPOLL=0.
    m.wait_not_stored("polled");
    m.wait_not_stored("pidfd-polled");
    let events = &m.state().events;
    for name in ["polled", "pidfd-polled"] {
        assert!(events.contains(&format!("stored {name}")), "{events:?}");
        assert!(events.contains(&format!("dropped {name}")), "{events:?}");
    }
    assert_eq!(m.list(), ["pidfd-kept", "kept"]);

    let second = m.kill9_and_wait_ready();
    let passed = status_of(&mut m, second);
    assert_eq!(passed["names"], "pidfd-kept:kept");
    assert_eq!(
        passed["contents"], "kept data<eof>",
        "the pipe's data survived its writers"
    );
    assert_eq!(
        passed["exit_code"], 7,
        "the pidfd still tells how its process ended"
    );
}

#[test]
fn the_store_follows_systemd_s_rules() {
    let mut m = Manager::start(&toy("rules", &[]), &ManagerOptions::new().fdstore_max(3));
    let pid = m.wait_ready();
    for expected in [
        "stored a".to_string(),
        "duplicate b".to_string(),
        // An invalid FDNAME and none at all: "stored".
        "stored stored".to_string(),
        "stored stored".to_string(),
        "full w".to_string(),
        format!("unstored {pid} 1"),
        "removed stored 2".to_string(),
        format!("ignored {pid} fdstoreremove-without-valid-fdname"),
        format!("ignored {pid} nul-byte"),
        format!("ready {pid}"),
    ] {
        m.wait_event(&expected, |e| e == expected);
    }
    assert_eq!(m.list(), ["a"]);
}

#[test]
fn restart_on_failure_as_systemd_means_it() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("starts");
    let mut m = Manager::start(
        &toy("exits", &[counter.to_str().unwrap()]),
        &ManagerOptions::new(),
    );
    // exit 3 and SIGSEGV are failures: restarted; SIGTERM is a clean end.
    let end = m.wait_exit();
    let hows: Vec<&str> = end.exits.iter().map(|(_, h)| h.as_str()).collect();
    assert_eq!(hows.len(), 3, "{:?}", end.events);
    assert_eq!(hows[0], "exited 3");
    assert!(
        ["killed SIGSEGV", "dumped SIGSEGV"].contains(&hows[1]),
        "{hows:?}"
    );
    assert_eq!(hows[2], "killed SIGTERM");
    assert_eq!(end.starts.len(), 3);
    assert!(end.inactive);
    assert_eq!(fs::read_to_string(&counter).unwrap(), "3");
}

#[test]
fn the_start_limit_fails_a_daemon_that_keeps_crashing() {
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("starts");
    fs::write(&counter, "0").unwrap();
    // Every start exits 3 (the counter is reset by the command itself).
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "echo 0 > {c}; exec python3 -c \"$0\" exits {c}",
            c = counter.display()
        ))
        .arg(TOY);
    let mut m = Manager::start(&cmd, &ManagerOptions::new().start_limit_burst(2));
    let end = m.wait_exit();
    assert_eq!(end.starts.len(), 2, "{:?}", end.events);
    assert!(
        end.events.contains(&"failed start-limit-hit".to_string()),
        "{:?}",
        end.events
    );
}

#[test]
fn a_store_too_large_for_listen_fdnames_cannot_be_passed_back() {
    // Linux caps one environment string at 128 KiB (MAX_ARG_STRLEN), so
    // LISTEN_FDNAMES holds at most 131,056 bytes of names and ':'s. Within
    // it, a restart gets everything back; beyond it, execve fails with
    // E2BIG at every restart, as systemd's would, until the start limit
    // fails the unit and its store is closed.
    let fits = (LISTEN_FDNAMES_MAX + 1) / 256; // 511 names of 255 bytes and their ':'
    let opts = ManagerOptions::new().fdstore_max(1000);
    let mut m = Manager::start(&toy("many", &[&fits.to_string(), "255"]), &opts);
    m.wait_ready();
    m.wait_for("all names stored", |s| {
        (s.store.len() == fits).then_some(())
    });
    let second = m.kill9_and_wait_ready();
    let passed = status_of(&mut m, second);
    assert_eq!(passed["names_bytes"], fits * 256 - 1);
    assert_eq!(passed["open"], fits);
    assert!(fits * 256 - 1 <= LISTEN_FDNAMES_MAX);
    drop(m);

    let opts = ManagerOptions::new().fdstore_max(1000).start_limit_burst(3);
    let mut m = Manager::start(&toy("many", &[&(fits + 1).to_string(), "255"]), &opts);
    m.wait_ready();
    m.wait_for("all names stored", |s| {
        (s.store.len() == fits + 1).then_some(())
    });
    m.kill9();
    let end = m.wait_exit();
    assert!(
        end.events.contains(&"failed start-limit-hit".to_string()),
        "{:?}",
        end.events
    );
    assert!(
        end.exits[1..].iter().all(|(_, how)| how == "exited 127"),
        "{:?}",
        end.exits
    );
    assert!(
        m.report().contains("Argument list too long"),
        "{}",
        m.report()
    );
}

#[test]
fn a_stop_ends_with_sigkill_after_timeout_stop_sec() {
    let opts = ManagerOptions::new().timeout_stop_sec(0.2);
    let mut m = Manager::start(&toy("stubborn", &[]), &opts);
    let pid = m.wait_ready();
    let end = m.stop();
    assert_eq!(end.exits, [(pid, "killed SIGKILL".to_string())]);
    assert_eq!(end.starts.len(), 1, "a stop never restarts");
}

#[test]
fn orphans_are_reaped_here_and_leftovers_reported() {
    let mut m = Manager::start(&toy("orphans", &[]), &ManagerOptions::new());
    let first = m.wait_ready();
    let runs = status_of(&mut m, first);
    let run1 = runs["run1"].as_u64().unwrap() as u32;
    let run2 = runs["run2"].as_u64().unwrap() as u32;
    m.wait_stored("run-1-pidfd");
    let second = m.kill9_and_wait_ready();
    // run-1 ended (EOF on its stdin) after the crash, reparented to the
    // stand-in, which reaped it; the restarted daemon reads its exit
    // status from the parked pidfd.
    m.wait_for("run-1 to be reaped by the stand-in", |s| {
        s.reaped
            .contains(&(run1, "exited 3".to_string()))
            .then_some(())
    });
    assert_eq!(status_of(&mut m, second)["run1_exit"], 3);
    // run-2 still runs, below the stand-in.
    assert!(is_alive(run2 as i32));
    let end = m.stop();
    assert_eq!(end.leftovers, [(run2, "sleep".to_string())]);
    assert!(!is_alive(run2 as i32), "the stand-in kills what was left");
}

#[test]
fn only_the_main_process_may_notify() {
    let mut m = Manager::start(
        &toy("helper-sends", &[]),
        &ManagerOptions::new().abstract_socket(),
    );
    assert!(m.notify_socket().starts_with('@'));
    let pid = m.wait_ready();
    let helper: u32 = m.wait_for("the helper's pid", |s| {
        s.statuses.iter().find_map(|(p, t)| {
            (*p == pid)
                .then(|| t.strip_prefix("helper ")?.parse().ok())
                .flatten()
        })
    });
    let ignored = format!("ignored {helper} not-the-main-process");
    assert!(
        m.state().events.contains(&ignored),
        "{:?}",
        m.state().events
    );
    assert!(!m.state().events.contains(&format!("ready {helper}")));
}

// -- the library under the stand-in --------------------------------------

/// Set for this test binary when it runs as the daemon of
/// `the_library_parks_and_takes_back_descriptors_under_the_stand_in`.
const CHILD: &str = "CYRNEL_TEST_SERVICE_DAEMON";

/// The daemon side of the test below: this test binary, started by the
/// stand-in with only this test selected. Outside that (a normal test run)
/// it does nothing. First start: parks a pipe holding data and a file
/// through `Notifier::store`, says READY=1. After a crash: takes them back
/// with `take_listen_fds` and reports what it got in STATUS=.
#[test]
fn service_daemon_child() {
    use cyrnel::service::{take_listen_fds, Notifier};
    use std::io::{Read, Seek, Write};
    use std::os::fd::{AsFd, AsRawFd};
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let taken = take_listen_fds().expect("take_listen_fds");
    let notifier = Notifier::from_env();
    assert!(notifier.is_present());
    if taken.is_empty() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        writer.write_all(b"parked bytes").unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"state file").unwrap();
        notifier.store("run-1-stdout", reader.as_fd()).unwrap();
        notifier.store("run-1-state", file.as_fd()).unwrap();
        // The same open file again is no second entry (systemd drops
        // duplicates); another one is, until it is removed.
        notifier.store("again", file.as_fd()).unwrap();
        let other = tempfile::tempfile().unwrap();
        notifier.store("gone-soon", other.as_fd()).unwrap();
        notifier.remove("gone-soon").unwrap();
        notifier.notify("READY=1\nSTATUS=parked").unwrap();
        // The writer stays open: the pipe is not at EOF after the crash.
        std::mem::forget(writer);
    } else {
        let mut report = serde_json::Map::new();
        report.insert(
            "env_cleared".into(),
            ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"]
                .iter()
                .all(|k| std::env::var_os(k).is_none())
                .into(),
        );
        for (name, fd) in taken {
            // SAFETY-free check of the flag through /proc's fdinfo.
            let fdinfo =
                fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).unwrap();
            let flags = fdinfo
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
                .unwrap();
            let cloexec = flags & 0o2000000 != 0;
            let mut file = fs::File::from(fd);
            let mut text = String::new();
            if name == "run-1-stdout" {
                let mut buf = [0u8; 12];
                file.read_exact(&mut buf).unwrap();
                text = String::from_utf8_lossy(&buf).into_owned();
            } else {
                file.rewind().unwrap();
                file.read_to_string(&mut text).unwrap();
            }
            report.insert(name, serde_json::json!({"cloexec": cloexec, "text": text}));
        }
        let status = serde_json::Value::Object(report).to_string();
        notifier
            .notify(&format!("READY=1\nSTATUS={status}"))
            .unwrap();
    }
    loop {
        std::thread::park();
    }
}

#[test]
fn the_library_parks_and_takes_back_descriptors_under_the_stand_in() {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "manager::service_daemon_child",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(CHILD, "1");
    let mut m = Manager::start(&cmd, &ManagerOptions::new().abstract_socket());
    let first = m.wait_ready();
    m.wait_stored("run-1-stdout");
    m.wait_stored("run-1-state");
    assert_eq!(m.wait_removed("gone-soon"), 1);
    let events = &m.state().events;
    assert!(
        events.contains(&"duplicate again".to_string()),
        "{events:?}"
    );
    assert!(
        events.contains(&"stored gone-soon".to_string()),
        "{events:?}"
    );
    assert_eq!(m.list(), ["run-1-state", "run-1-stdout"]);
    let second = m.kill9_and_wait_ready();
    assert_ne!(first, second);
    let got = status_of(&mut m, second);
    assert_eq!(
        got,
        json(
            r#"{"env_cleared": true,
                "run-1-stdout": {"cloexec": true, "text": "parked bytes"},
                "run-1-state": {"cloexec": true, "text": "state file"}}"#
        ),
        "{}",
        m.report()
    );
}

// -- cyrneld under the stand-in ------------------------------------------

#[test]
fn cyrneld_starts_crashes_restarts_and_stops_under_the_stand_in() {
    let mut d = ManagedDaemon::start(Daemon::options());
    let first = d.pid();
    let port = d.port();
    let status = format!("listening on 127.0.0.1:{port}");
    d.manager().wait_for("STATUS=listening on …", |s| {
        s.statuses.contains(&(first, status.clone())).then_some(())
    });
    let id = d.create_code("echo before the crash");
    d.wait_idle(id);
    let second = d.kill9_and_wait_ready();
    assert_ne!(first, second);
    assert_eq!(d.stdout_text(id), "before the crash\n");
    let id2 = d.create_code("echo after");
    assert!(id2 > id);
    d.wait_idle(id2);
    let end = d.stop();
    assert!(end.leftovers.is_empty(), "{:?}", end.leftovers);
    assert!(d.logs().contains("cyrneld listening"));
}

#[test]
fn the_unit_sizes_the_store_for_what_a_restart_can_pass() {
    // FileDescriptorStoreMax= descriptors with the daemon's longest name
    // (`run-<id>-jout`, an id below 10^12: 21 bytes, the budget the unit's
    // comment states) fit in LISTEN_FDNAMES, and one more would not; more
    // could be stored but never passed back.
    let max: usize = unit_setting("FileDescriptorStoreMax")
        .expect("the unit sets FileDescriptorStoreMax=")
        .parse()
        .expect("a number");
    let longest = format!("run-{}-jout", 10u64.pow(12) - 1).len();
    assert_eq!(longest, 21);
    assert!(
        max * (longest + 1) - 1 <= LISTEN_FDNAMES_MAX,
        "FileDescriptorStoreMax={max}"
    );
    assert!(
        (max + 1) * (longest + 1) - 1 > LISTEN_FDNAMES_MAX,
        "as large as fits"
    );
    // At 6 descriptors per run (pidfd, stdout and stderr read ends, folder,
    // two capture journals), 30 times the default max_running (32).
    assert!(max / 6 >= 32 * 30, "FileDescriptorStoreMax={max}");
    let nofile: usize = unit_setting("LimitNOFILE").unwrap().parse().unwrap();
    assert!(
        nofile > max + 3,
        "LimitNOFILE={nofile} must hold the whole store"
    );
    assert_eq!(unit_setting("KillMode").as_deref(), Some("process"));
}
