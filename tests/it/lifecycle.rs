//! What `cyrneld` does to real OS processes, checked through HTTP and the
//! kernel's own view in `/proc`: kills and timeouts reach every member of the
//! process group (with SIGTERM, then SIGKILL after the grace period), a run
//! settles only when the whole group is gone, output capture and its cap,
//! structured output, exit codes and signals, the child's environment and
//! stdio, the run queue, and what survives a daemon crash (`kill -9`) or a
//! graceful stop (SIGTERM).

use crate::support::*;
use std::fs;
use std::path::{Path, PathBuf};

/// Reads a pid a script wrote with `echo $$ > FILE` (waits for the file and
/// its newline, so a half-written number is never read).
#[track_caller]
fn read_pid_file(path: &Path) -> i32 {
    poll(&format!("pid in {}", path.display()), || {
        let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
        if !text.ends_with('\n') {
            return Err(format!("partial: {text:?}"));
        }
        text.trim().parse().map_err(|e| format!("{text:?}: {e}"))
    })
}

#[track_caller]
fn assert_outcome(rec: &Json, exit_state: &str, error: Option<&str>) {
    assert_eq!(rec["state"].as_str(), Some("idle"), "{rec}");
    assert_eq!(rec["exitState"].as_str(), Some(exit_state), "{rec}");
    match error {
        Some(message) => assert_eq!(rec["error"].as_str(), Some(message), "{rec}"),
        None => assert!(
            rec.get("error").is_some_and(Json::is_null),
            "error must be null: {rec}"
        ),
    }
    assert!(rec["pid"].is_null(), "pid must be null once idle: {rec}");
    assert_timestamp(&rec["completedAt"], "completedAt");
}

// ---------------------------------------------------------------------------
// Kill, grace, escalation
// ---------------------------------------------------------------------------

#[test]
fn kill_ends_every_member_of_the_group() {
    let d = Daemon::start();
    let id = d.create_code("sleep 300 & sleep 300 & wait");
    let pid = d.wait_running_pid(id);
    let (_, pgrp) = proc_stat(pid).expect("leader in /proc");
    assert_eq!(pgrp, pid, "the child must lead its own process group");
    let members = wait_group_size(pid, 3);

    let r = d.kill(id);
    assert_eq!(r.status, 200, "{r}");
    let rec = r.json();
    assert_eq!(rec["state"].as_str(), Some("terminating"), "{rec}");

    let rec = d.wait_idle(id);
    // The run settles only once the whole group is gone: no waiting here.
    assert_group_gone(pid);
    for m in members {
        assert!(!is_alive(m), "group member {m} survived the kill");
    }
    assert_outcome(&rec, "canceled", None);
    assert_eq!(rec["signal"].as_str(), Some("SIGTERM"), "{rec}");
    assert!(rec["exitCode"].is_null(), "{rec}");
}

#[test]
fn kill_right_after_create_cancels_whatever_stage_the_start_is_in() {
    let d = Daemon::options().env("RUST_LOG", "cyrnel=debug").start();
    // Each kill lands while its run is still queued, being staged and
    // spawned by the starter thread (the kill then waits for the start),
    // or already running. Whichever: 200, canceled, nothing left alive.
    let ids: Vec<i64> = (0..40)
        .map(|_| {
            let id = d.create_code("sleep 300");
            let r = d.kill(id);
            assert_eq!(r.status, 200, "kill of {id}: {r}");
            id
        })
        .collect();
    for id in ids {
        let rec = d.wait_idle(id);
        assert_eq!(rec["exitState"].as_str(), Some("canceled"), "{rec}");
        assert_eq!(alive_of_run(&d, id), Vec::<i32>::new(), "{rec}");
    }
    assert_no_zombies_under(d.pid());
    // The middle case is the one this test is for; most kills hit it (a
    // start takes longer than the client's next round trip).
    let waited = d
        .logs()
        .matches("command waits for the run to start")
        .count();
    assert!(waited > 0, "no kill arrived while its run was starting");
}

#[test]
fn term_ignoring_group_is_sigkilled_after_the_grace() {
    let d = Daemon::start(); // grace 300 ms
    let m = marker_dir();
    let ready = m.path().join("ready");
    let code = format!(
        "trap '' TERM\nsleep 300 &\nsleep 300 &\n: > {}\nwait\n",
        sq(&ready)
    );
    let id = d.create_code(&code);
    let pid = d.wait_running_pid(id);
    wait_for_file(&ready);
    let members = wait_group_size(pid, 3);

    let r = d.kill(id);
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["state"].as_str(), Some("terminating"), "{r}");
    let rec = d.wait_idle(id);
    assert_group_gone(pid);
    for m in members {
        assert!(!is_alive(m), "group member {m} survived SIGKILL");
    }
    assert_outcome(&rec, "canceled", None);
    assert_eq!(rec["signal"].as_str(), Some("SIGKILL"), "{rec}");
    assert!(rec["exitCode"].is_null(), "{rec}");
}

#[test]
fn child_ignoring_term_is_killed_after_the_leader_exits() {
    let d = Daemon::start(); // grace 300 ms
    let m = marker_dir();
    let ready = m.path().join("ready");
    // The leader dies on SIGTERM; its child ignores it and must be SIGKILLed.
    let code = format!(
        "(trap '' TERM; : > {}; exec sleep 300) &\nwait\n",
        sq(&ready)
    );
    let id = d.create_code(&code);
    let leader = d.wait_running_pid(id);
    wait_for_file(&ready);
    let members = wait_group_size(leader, 2);
    let child = *members
        .iter()
        .find(|p| **p != leader)
        .expect("a child besides the leader");

    let r = d.kill(id);
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["state"].as_str(), Some("terminating"), "{r}");
    // Until the child is gone the run must not be idle. The state is read
    // first: if it is idle and the child is alive afterwards, the child was
    // alive when the daemon settled.
    poll("the TERM-ignoring child to die", || {
        let rec = d.record(id);
        let alive = is_alive(child);
        if rec["state"].as_str() == Some("idle") && alive {
            panic!("run settled while group member {child} was alive: {rec}");
        }
        if alive {
            Err(format!("{child} alive; {rec}"))
        } else {
            Ok(())
        }
    });
    let rec = d.wait_idle(id);
    assert_group_gone(leader);
    assert_outcome(&rec, "canceled", None);
    assert_eq!(
        rec["signal"].as_str(),
        Some("SIGTERM"),
        "the leader itself died of SIGTERM: {rec}"
    );
}

#[test]
fn run_stays_running_while_background_children_live() {
    let d = Daemon::start();
    let m = marker_dir();
    let (ready, release) = (m.path().join("ready"), m.path().join("release"));
    let code = format!(
        "( : > {}; while [ ! -f {} ]; do sleep 0.01; done ) >/dev/null 2>&1 &\nexit 0\n",
        sq(&ready),
        sq(&release)
    );
    let id = d.create_code(&code);
    let leader = d.wait_running_pid(id);
    wait_for_file(&ready);
    poll("the leader to exit", || {
        if is_alive(leader) {
            Err("alive".to_string())
        } else {
            Ok(())
        }
    });
    assert!(
        !group_members(leader).is_empty(),
        "the background loop must still be alive"
    );
    // The leader is gone but its group is not: the run must keep running,
    // and the leader stays an unreaped zombie of the daemon (its pid, the
    // group id, is held), although the daemon reaps the orphaned loop's
    // exited children meanwhile.
    for _ in 0..20 {
        let rec = d.record(id);
        assert_eq!(
            rec["state"].as_str(),
            Some("running"),
            "settled while the group still had live members: {rec}"
        );
        assert_eq!(
            zombies_of(d.pid()),
            vec![leader],
            "the leader must be held unreaped, nothing else"
        );
    }
    fs::write(&release, "").unwrap();
    let rec = d.wait_idle(id);
    assert_group_gone(leader);
    // The orphaned loop (reparented to the daemon) and the leader are reaped.
    assert_no_zombies_under(d.pid());
    assert_outcome(&rec, "success", None);
    assert_eq!(rec["exitCode"].as_i64(), Some(0), "{rec}");
}

#[test]
fn per_process_kill_grace_overrides_the_configured_one() {
    // A configured grace of ten minutes would outlast the test's deadline;
    // the process' own killGrace must apply instead.
    let d = Daemon::options()
        .env("CYRNEL_KILL_GRACE_MS", "600000")
        .start();
    let m = marker_dir();
    let ready = m.path().join("ready");
    let code = format!("trap '' TERM\n: > {}\nsleep 300\n", sq(&ready));
    let id = d.create_with(&code, r#""options":{"killGrace":100}"#);
    let pid = d.wait_running_pid(id);
    wait_for_file(&ready);
    assert_eq!(d.kill(id).status, 200);
    let rec = d.wait_idle(id);
    assert_group_gone(pid);
    assert_outcome(&rec, "canceled", None);
    assert_eq!(rec["signal"].as_str(), Some("SIGKILL"), "{rec}");
}

// ---------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------

#[test]
fn timeout_settles_as_timeout_and_kills_the_group() {
    let d = Daemon::start(); // grace 300 ms
    let m = marker_dir();
    let (pid_a, pid_b) = (m.path().join("a.pid"), m.path().join("b.pid"));
    // The timeouts leave the scripts ample time to write their pid files
    // (their group ids) first; nothing here measures how long anything took.

    // Dies on SIGTERM.
    let a = d.create_with(
        &format!("echo $$ > {}\nsleep 300 & wait\n", sq(&pid_a)),
        r#""options":{"timeout":1000}"#,
    );
    // Ignores SIGTERM: the timeout must escalate to SIGKILL.
    let b = d.create_with(
        &format!(
            "trap '' TERM\nsleep 300 &\necho $$ > {}\nwait\n",
            sq(&pid_b)
        ),
        r#""options":{"timeout":1000}"#,
    );
    let (leader_a, leader_b) = (read_pid_file(&pid_a), read_pid_file(&pid_b));

    let rec = d.wait_idle(a);
    assert_group_gone(leader_a);
    assert_outcome(&rec, "timeout", None);
    assert_eq!(rec["signal"].as_str(), Some("SIGTERM"), "{rec}");

    let rec = d.wait_idle(b);
    assert_group_gone(leader_b);
    assert_outcome(&rec, "timeout", None);
    assert_eq!(rec["signal"].as_str(), Some("SIGKILL"), "{rec}");
}

#[test]
fn configured_default_timeout_applies() {
    let d = Daemon::options()
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "1000")
        .start();
    let m = marker_dir();
    let pid_file = m.path().join("pid");
    let id = d.create_code(&format!("echo $$ > {}\nsleep 300\n", sq(&pid_file)));
    let leader = read_pid_file(&pid_file);
    let rec = d.wait_idle(id);
    assert_group_gone(leader);
    assert_outcome(&rec, "timeout", None);
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

#[test]
fn output_beyond_the_cap_is_dropped_and_counted() {
    let d = Daemon::options()
        .env("CYRNEL_MAX_OUTPUT_BYTES", "1000")
        .start();
    // 10000 lines of 10 bytes each = 100000 bytes per stream, all distinct.
    let id = d.create_code("seq -f '%09g' 0 9999\nseq -f 'e%08g' 0 9999 >&2\n");
    let rec = d.wait_idle(id);
    assert_outcome(&rec, "success", None);

    let expected_out: String = (0..10000).map(|i| format!("{i:09}\n")).collect();
    let expected_err: String = (0..10000).map(|i| format!("e{i:08}\n")).collect();
    assert_eq!(expected_out.len(), 100_000);

    let r = d.sub(id, "stdout");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.body.len(), 1000, "stdout must be capped at 1000 bytes");
    assert_eq!(
        r.text(),
        expected_out[..1000],
        "stdout must be the first 1000 bytes"
    );
    assert_eq!(r.header("x-cyrnel-dropped-bytes"), Some("99000"), "{r}");

    let r = d.sub(id, "stderr");
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(
        r.text(),
        expected_err[..1000],
        "stderr must be the first 1000 bytes"
    );
    assert_eq!(r.header("x-cyrnel-dropped-bytes"), Some("99000"), "{r}");
}

#[test]
fn structured_output_lines_are_shallow_merged() {
    let d = Daemon::start();
    let code = r#"echo '{"a":1,"b":{"x":1,"y":1},"s":"one"}' >> "$CYRNEL_OUTPUT"
echo '' >> "$CYRNEL_OUTPUT"
echo '{"b":{"y":2},"c":[1,2],"s":"two","u":"\u00e9"}' >> "$CYRNEL_OUTPUT"
echo plain stdout
"#;
    let id = d.create_code(code);
    let rec = d.wait_idle(id);
    assert_outcome(&rec, "success", None);
    assert_eq!(
        d.output_json(id),
        json(r#"{"a":1,"b":{"y":2},"c":[1,2],"s":"two","u":"é"}"#),
        "later keys win, nested objects are replaced, not merged"
    );
    assert_eq!(d.stdout_text(id), "plain stdout\n");
}

#[test]
fn invalid_structured_output_line_fails_the_run() {
    let d = Daemon::start();
    let second = d.create_code(
        "echo '{\"a\":1}' >> \"$CYRNEL_OUTPUT\"\necho '[1,2]' >> \"$CYRNEL_OUTPUT\"\nexit 0\n",
    );
    let first = d.create_code("echo 'not json' >> \"$CYRNEL_OUTPUT\"\n");
    let third = d.create_code(
        "echo '{\"a\":1}' >> \"$CYRNEL_OUTPUT\"\necho '{\"b\":2}' >> \"$CYRNEL_OUTPUT\"\necho 42 >> \"$CYRNEL_OUTPUT\"\n",
    );
    let rec = d.wait_idle(second);
    assert_outcome(
        &rec,
        "failed",
        Some("Invalid output: line 2 is not a JSON object."),
    );
    let rec = d.wait_idle(first);
    assert_outcome(
        &rec,
        "failed",
        Some("Invalid output: line 1 is not a JSON object."),
    );
    let rec = d.wait_idle(third);
    assert_outcome(
        &rec,
        "failed",
        Some("Invalid output: line 3 is not a JSON object."),
    );
}

#[test]
fn nonzero_exit_and_death_by_signal_fail_the_run() {
    let d = Daemon::start();
    let exit3 = d.create_code("echo partial\necho oops >&2\nexit 3\n");
    let segv = d.create_code("kill -SEGV $$\n");
    let empty = d.create_code("");

    let rec = d.wait_idle(exit3);
    assert_outcome(&rec, "failed", Some("Process exited with code 3."));
    assert_eq!(rec["exitCode"].as_i64(), Some(3), "{rec}");
    assert!(rec["signal"].is_null(), "{rec}");
    assert_eq!(d.stdout_text(exit3), "partial\n");
    assert_eq!(d.stderr_text(exit3), "oops\n");

    let rec = d.wait_idle(segv);
    assert_outcome(
        &rec,
        "failed",
        Some("Process was terminated by signal SIGSEGV."),
    );
    assert_eq!(rec["signal"].as_str(), Some("SIGSEGV"), "{rec}");
    assert!(rec["exitCode"].is_null(), "{rec}");

    let rec = d.wait_idle(empty);
    assert_outcome(&rec, "success", None);
}

#[test]
fn shebang_code_is_executed_directly() {
    let d = Daemon::start();
    // Run by the shell, "hello" would be a missing command; executed
    // directly, cat prints the script itself.
    let cat_code = "#!/bin/cat\nhello from cat\n";
    let cat = d.create_code(cat_code);
    let sh = d.create_code("#!/bin/sh\necho \"shebang $CYRNEL_PROCESS_ID\"\n");

    let rec = d.wait_idle(cat);
    assert_outcome(&rec, "success", None);
    assert_eq!(d.stdout_text(cat), cat_code);

    let rec = d.wait_idle(sh);
    assert_outcome(&rec, "success", None);
    assert_eq!(d.stdout_text(sh), format!("shebang {sh}\n"));
}

#[test]
fn configured_shell_runs_plain_code() {
    assert!(
        Path::new("/bin/bash").exists(),
        "this test needs /bin/bash to tell shells apart"
    );
    let code = "printf '%s' \"${BASH_VERSION:+bash}\"";
    let d = Daemon::start();
    let id = d.create_code(code);
    assert_outcome(&d.wait_idle(id), "success", None);
    assert_eq!(
        d.stdout_text(id),
        "",
        "the default shell is /bin/sh (dash here)"
    );
    drop(d);

    let d = Daemon::options().env("CYRNEL_SHELL", "/bin/bash").start();
    let id = d.create_code(code);
    assert_outcome(&d.wait_idle(id), "success", None);
    assert_eq!(d.stdout_text(id), "bash", "CYRNEL_SHELL must be used");
}

#[test]
fn child_environment_stdio_and_working_directory() {
    let d = Daemon::options()
        .env("LEAKY_VAR", "leak")
        .env(
            "CYRNEL_ENV",
            r#"{"PATH":"/usr/bin:/bin","GREETING":"hello world"}"#,
        )
        .start();
    let code = r#"printf 'id=%s\n' "$CYRNEL_PROCESS_ID"
printf 'path=%s\n' "$PATH"
printf 'greeting=%s\n' "$GREETING"
printf 'leak=%s\n' "${LEAKY_VAR-unset}"
printf 'home=%s\n' "${HOME-unset}"
printf 'output=%s\n' "${CYRNEL_OUTPUT:+set}"
printf 'stdin=%s\n' "$(readlink /proc/$$/fd/0)"
if read line; then echo 'read=data'; else echo 'read=eof'; fi
set -- $(sed 's/.*) //' /proc/$$/stat)
printf 'leader=%s\n' "$([ "$3" = "$$" ] && echo yes || echo "no: pgrp $3 pid $$")"
printf 'cwd=%s\n' "$(pwd -P)"
printf 'code=%s %s\n' "$(stat -c '%a' code)" "$(cmp -s code "$0" && echo is-this-script)"
"#;
    let id = d.create_code(code);
    let rec = d.wait_idle(id);
    assert_outcome(&rec, "success", None);
    // The run's folder: a private /tmp of its own at level full, a folder
    // under the daemon's run folder base otherwise.
    let cwd = match rec["sandbox"].as_str() {
        Some("full") => PathBuf::from("/tmp/cyrnel"),
        _ => d
            .runs_base()
            .expect("runs_base logged")
            .join(id.to_string()),
    };
    // The code is staged in the working directory as `code`, mode 0700.
    let expected = format!(
        "id={id}\npath=/usr/bin:/bin\ngreeting=hello world\nleak=unset\nhome=unset\n\
         output=set\nstdin=/dev/null\nread=eof\nleader=yes\ncwd={}\ncode=700 is-this-script\n",
        cwd.display()
    );
    assert_eq!(d.stdout_text(id), expected);
    assert_eq!(d.stderr_text(id), "");
}

#[test]
fn child_starts_with_default_signals_and_only_stdio_open() {
    let d = Daemon::start();
    // Both programs are children of the run's shell and inherit its
    // dispositions, mask and descriptors (dash's own script descriptor is
    // close-on-exec). Python lists /proc/self/fd through one descriptor of
    // its own, the lowest free one.
    let code = r#"grep -E '^Sig(Blk|Ign):' /proc/self/status
python3 -c 'import os; print(sorted(int(f) for f in os.listdir("/proc/self/fd")))'
readlink /proc/$$/fd/0
"#;
    let id = d.create_code(code);
    assert_outcome(&d.wait_idle(id), "success", None);
    assert_eq!(
        d.stdout_text(id),
        "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n[0, 1, 2, 3]\n/dev/null\n",
        "no blocked or ignored signal, nothing open but stdin, stdout and stderr"
    );
}

/// A run does not get a copy of the daemon's descriptor table, however
/// many clients the daemon serves: its table (`FDSize`) holds only the
/// daemon's lowest slots.
#[test]
fn a_run_copies_none_of_the_daemons_client_connections() {
    use std::io::{Read, Write};
    const CLIENTS: usize = 300;
    let d = Daemon::start();
    // Each connection answered once, so the daemon has accepted it and
    // holds its descriptor; all stay open (keep-alive).
    let clients: Vec<std::net::TcpStream> = (0..CLIENTS)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", d.port())).unwrap();
            c.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            let mut head = [0u8; 12];
            c.read_exact(&mut head).unwrap();
            assert_eq!(&head, b"HTTP/1.1 200");
            c
        })
        .collect();
    let daemon_fds = || {
        fs::read_dir(format!("/proc/{}/fd", d.pid()))
            .unwrap()
            .count()
    };
    let before = daemon_fds();
    assert!(before > CLIENTS, "the daemon holds {before} descriptors");
    // The run's shell itself: the grep it forks gets a table sized to
    // what the shell has open.
    let id = d.create_code("grep '^FDSize:' /proc/$$/status\n");
    assert_outcome(&d.wait_idle(id), "success", None);
    // Still held once the run has settled, so they were held while it
    // started.
    let daemon_fds = daemon_fds();
    assert!(
        daemon_fds > CLIENTS,
        "the daemon still holds the connections: {daemon_fds} descriptors"
    );
    let out = d.stdout_text(id);
    let size: usize = out
        .trim()
        .strip_prefix("FDSize:")
        .unwrap_or_else(|| panic!("{out}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        size < CLIENTS,
        "the run's table has {size} slots while the daemon holds {daemon_fds} descriptors"
    );
    drop(clients);
}

/// The thread that spawns runs may run at a raised priority (as root):
/// a run still starts at the daemon's own (the daemon inherits this test's
/// nice value).
#[test]
fn a_run_starts_at_the_daemons_priority() {
    let nice = |stat: &str| -> i64 {
        // Field 19; the command name (field 2) may hold spaces.
        let after = &stat[stat.rfind(')').expect("stat has a command") + 2..];
        after
            .split(' ')
            .nth(16)
            .expect("field 19")
            .parse()
            .expect("nice")
    };
    let ours = nice(&std::fs::read_to_string("/proc/self/stat").unwrap());
    let d = Daemon::start();
    let id = d.create_code("cat /proc/self/stat\n");
    assert_outcome(&d.wait_idle(id), "success", None);
    assert_eq!(nice(&d.stdout_text(id)), ours, "{}", d.stdout_text(id));
}

#[test]
fn code_that_cannot_be_executed_fails_to_start() {
    let d = Daemon::start();
    let missing = d.create_code("#!/no/such/interpreter\n");
    let rec = d.wait_idle(missing);
    assert_outcome(
        &rec,
        "failed",
        Some("Failed to start: No such file or directory (os error 2)"),
    );
    assert!(rec["exitCode"].is_null(), "{rec}");
    // The daemon goes on starting other runs.
    let ok = d.create_code("exit 0");
    assert_outcome(&d.wait_idle(ok), "success", None);
}

#[test]
fn rerun_with_force_clears_previous_outputs() {
    let d = Daemon::start();
    let m = marker_dir();
    let flag = m.path().join("ran-once");
    let code = format!(
        "if [ -f {f} ]; then echo second; exit 0; fi\n: > {f}\necho first\necho err1 >&2\n\
         echo '{{\"first\":1}}' >> \"$CYRNEL_OUTPUT\"\nexit 3\n",
        f = sq(&flag)
    );
    let id = d.create_code(&code);
    let rec = d.wait_idle(id);
    assert_outcome(&rec, "failed", Some("Process exited with code 3."));
    assert_eq!(d.stdout_text(id), "first\n");
    assert_eq!(d.output_json(id), json(r#"{"first":1}"#));

    let r = d.run(id, r#"{"force":true}"#);
    assert_eq!(r.status, 200, "{r}");
    let fresh = r.json();
    for key in ["exitState", "error", "completedAt", "exitCode", "signal"] {
        assert!(
            fresh[key].is_null(),
            "{key} must be cleared by a new run: {fresh}"
        );
    }
    let rec = d.wait_idle(id);
    assert_outcome(&rec, "success", None);
    assert_eq!(rec["exitCode"].as_i64(), Some(0), "{rec}");
    assert_eq!(d.stdout_text(id), "second\n");
    assert_eq!(d.stderr_text(id), "", "the old stderr must be gone");
    assert_eq!(d.output_json(id), json("{}"), "the old output must be gone");
}

#[test]
fn stdout_follow_streams_until_the_run_settles() {
    let d = Daemon::start();
    let m = marker_dir();
    let release = m.path().join("release");
    let code = format!(
        "echo one\nwhile [ ! -f {} ]; do sleep 0.01; done\necho two\n",
        sq(&release)
    );
    let id = d.create_code(&code);
    let mut stream = d.follow_until(&format!("/processes/{id}/stdout?follow=true"), "one\n");
    assert_eq!(stream.status, 200);
    let ct = stream
        .header("content-type")
        .unwrap_or("")
        .to_ascii_lowercase();
    assert_eq!(ct.replace(' ', ""), "text/plain;charset=utf-8");
    assert_eq!(d.record(id)["state"].as_str(), Some("running"));
    fs::write(&release, "").unwrap();
    let body = stream.read_to_end();
    assert_eq!(String::from_utf8_lossy(&body), "one\ntwo\n");
    let rec = d.record(id);
    assert_eq!(
        rec["state"].as_str(),
        Some("idle"),
        "the stream ends when the run settles: {rec}"
    );

    // On an idle process, follow just returns everything.
    let mut again = d.follow_until(&format!("/processes/{id}/stdout?follow=true"), "");
    assert_eq!(String::from_utf8_lossy(&again.read_to_end()), "one\ntwo\n");
}

// ---------------------------------------------------------------------------
// Queue
// ---------------------------------------------------------------------------

#[test]
fn queued_processes_start_in_fifo_order_within_the_limit() {
    let d = Daemon::options().env("CYRNEL_MAX_RUNNING", "2").start();
    let m = marker_dir();
    let release = m.path().join("release");
    let order = m.path().join("order");
    let blocker_code = |name: &str| {
        format!(
            ": > {}\nwhile [ ! -f {} ]; do sleep 0.01; done\n",
            sq(&m.path().join(name)),
            sq(&release)
        )
    };
    let b1 = d.create_code(&blocker_code("r1"));
    let b2 = d.create_code(&blocker_code("r2"));
    d.wait_running_pid(b1);
    d.wait_running_pid(b2);
    let queued: Vec<i64> = (0..5)
        // umask 0: every run has a uid of its own and appends to the file
        // the first one created.
        .map(|i| d.create_code(&format!("umask 0; echo {i} >> {}\n", sq(&order))))
        .collect();
    for id in &queued {
        let rec = d.record(*id);
        assert_eq!(
            rec["state"].as_str(),
            Some("queued"),
            "limit 2 is in use: {rec}"
        );
        assert!(rec["pid"].is_null() && rec["startedAt"].is_null(), "{rec}");
    }
    assert_eq!(d.list_ids("state=running"), vec![b2, b1]);

    fs::write(&release, "").unwrap();
    for id in &queued {
        assert_outcome(&d.wait_idle(*id), "success", None);
    }
    let lines: Vec<String> = fs::read_to_string(&order)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    // Two run at a time, so neighbours may swap; but a later one may never
    // start before an earlier one was started: check start order via
    // startedAt, and that every one ran once.
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec!["0", "1", "2", "3", "4"],
        "each ran exactly once"
    );
    let started: Vec<String> = queued
        .iter()
        .map(|id| d.record(*id)["startedAt"].as_str().unwrap().to_string())
        .collect();
    let mut in_order = started.clone();
    in_order.sort();
    assert_eq!(
        started, in_order,
        "queued processes must start first-in first-out"
    );
}

#[test]
fn single_slot_runs_queued_processes_one_by_one_in_order() {
    let d = Daemon::options().env("CYRNEL_MAX_RUNNING", "1").start();
    let m = marker_dir();
    let (ready, release) = (m.path().join("ready"), m.path().join("release"));
    let order = m.path().join("order");
    let blocker = d.create_code(&format!(
        ": > {}\nwhile [ ! -f {} ]; do sleep 0.01; done\n",
        sq(&ready),
        sq(&release)
    ));
    d.wait_running_pid(blocker);
    wait_for_file(&ready);
    let queued: Vec<i64> = (0..5)
        // umask 0: every run has a uid of its own and appends to the file
        // the first one created.
        .map(|i| d.create_code(&format!("umask 0; echo {i} >> {}\n", sq(&order))))
        .collect();
    for id in &queued {
        assert_eq!(d.record(*id)["state"].as_str(), Some("queued"));
    }
    fs::write(&release, "").unwrap();
    for id in &queued {
        assert_outcome(&d.wait_idle(*id), "success", None);
    }
    assert_eq!(fs::read_to_string(&order).unwrap(), "0\n1\n2\n3\n4\n");
}

// ---------------------------------------------------------------------------
// Crash and graceful stop
// ---------------------------------------------------------------------------

#[test]
fn daemon_crash_and_restart_recovers_every_record() {
    let mut d = Daemon::options().env("CYRNEL_MAX_RUNNING", "1").start();
    let done = d.create_code("echo done");
    d.wait_idle(done);
    let running = d.create_code("sleep 300 & wait");
    let pid = d.wait_running_pid(running);
    wait_group_size(pid, 2);
    let q1 = d.create_code("echo q1");
    let q2 = d.create_code("echo q2");
    for id in [q1, q2] {
        assert_eq!(d.record(id)["state"].as_str(), Some("queued"));
    }
    let before = d.list("");
    let ids = vec![q2, q1, running, done];
    assert_eq!(ids_of(&before), ids);

    d.kill9();
    d.restart_same_dir();

    // The orphaned group must be found and terminated.
    wait_group_gone(pid);
    let rec = d.wait_idle(running);
    assert_outcome(
        &rec,
        "failed",
        Some("Supervisor restarted while the process was running."),
    );
    for (id, out) in [(q1, "q1\n"), (q2, "q2\n")] {
        assert_outcome(&d.wait_idle(id), "success", None);
        assert_eq!(d.stdout_text(id), out);
    }
    assert_outcome(&d.record(done), "success", None);
    assert_eq!(d.stdout_text(done), "done\n");

    assert_eq!(d.list_ids(""), ids, "every id survives the crash");
    for old in before["processes"].as_array().unwrap() {
        let id = old["id"].as_i64().unwrap();
        let now = d.record(id);
        assert_eq!(now["createdAt"], old["createdAt"], "createdAt of {id}");
        assert_eq!(now.get("ref"), old.get("ref"), "ref of {id}");
    }
    assert_eq!(d.sub(running, "code").text(), "sleep 300 & wait");
    assert_eq!(d.sub(q1, "code").text(), "echo q1");
    let new = d.create_code("echo new");
    assert!(
        new > q2,
        "new id {new} must be above every old id (max {q2})"
    );
}

#[test]
fn captured_stdout_survives_a_daemon_crash() {
    let mut d = Daemon::start();
    let id = d.create_code("echo before-crash\nsleep 300\n");
    let pid = d.wait_running_pid(id);
    // Once a response has shown the bytes they must survive a crash.
    let stream = d.follow_until(
        &format!("/processes/{id}/stdout?follow=true"),
        "before-crash\n",
    );
    drop(stream);
    d.kill9();
    d.restart_same_dir();
    wait_group_gone(pid);
    let rec = d.wait_idle(id);
    assert_outcome(
        &rec,
        "failed",
        Some("Supervisor restarted while the process was running."),
    );
    assert_eq!(d.stdout_text(id), "before-crash\n");
}

#[test]
fn graceful_stop_cancels_running_processes_and_exits_zero() {
    let mut d = Daemon::start();
    let done = d.create_code("echo done");
    d.wait_idle(done);
    let id = d.create_code("sleep 300 & wait");
    let pid = d.wait_running_pid(id);
    let members = wait_group_size(pid, 2);

    d.stop_gracefully();
    // The daemon kills the group before it exits.
    assert_group_gone(pid);
    for m in members {
        assert!(!is_alive(m), "{m} survived the daemon's graceful stop");
    }

    d.restart_same_dir();
    let rec = d.wait_idle(id);
    assert_outcome(&rec, "canceled", None);
    assert_outcome(&d.record(done), "success", None);
    assert_eq!(d.stdout_text(done), "done\n");
}

#[test]
fn queued_processes_run_after_a_graceful_restart() {
    // The only slot is busy, so `queued` has never started when the daemon
    // stops; it must neither be started nor canceled by the stop, and must
    // run once the daemon is back, without any other request nudging it.
    let mut d = Daemon::options().env("CYRNEL_MAX_RUNNING", "1").start();
    let running = d.create_code("sleep 300");
    d.wait_running_pid(running);
    let queued = d.create_code("echo later");
    assert_eq!(d.record(queued)["state"].as_str(), Some("queued"));

    d.stop_gracefully();
    d.restart_same_dir();
    assert_outcome(&d.wait_idle(running), "canceled", None);
    let rec = d.wait_idle(queued);
    assert_outcome(&rec, "success", None);
    assert_eq!(d.stdout_text(queued), "later\n");
}

#[test]
fn graceful_stop_rejects_new_work_while_draining() {
    let mut d = Daemon::start();
    let m = marker_dir();
    let (ready, release) = (m.path().join("ready"), m.path().join("release"));
    // On SIGTERM the shell waits for `release` before exiting, which keeps
    // the daemon draining for as long as the test needs.
    let code = format!(
        "trap 'while [ ! -f {rel} ]; do sleep 0.01; done; exit 0' TERM\n: > {rdy}\nsleep 300\n",
        rel = sq(&release),
        rdy = sq(&ready)
    );
    let id = d.create_with(&code, r#""options":{"killGrace":600000}"#);
    let idle = d.create_with("echo x", r#""autorun":false"#);
    let pid = d.wait_running_pid(id);
    wait_for_file(&ready);

    d.send_sigterm();
    d.wait_for_state(id, "terminating");
    let r = d.post("/processes", r#"{"code":"echo late"}"#);
    r.assert_error(503, "Service is shutting down.");
    d.run(idle, "{}")
        .assert_error(503, "Service is shutting down.");
    assert!(
        d.has_exited().is_none(),
        "the daemon must wait for the group"
    );

    fs::write(&release, "").unwrap();
    let status = d.wait_exit();
    d.assert_exit_zero(status);
    assert_group_gone(pid);

    d.restart_same_dir();
    let rec = d.wait_idle(id);
    assert_outcome(&rec, "canceled", None);
    let rec = d.record(idle);
    assert!(
        rec["exitState"].is_null(),
        "the refused run must not have run: {rec}"
    );
    assert_eq!(
        d.list_ids(""),
        vec![idle, id],
        "the refused create left no record"
    );
}

#[test]
fn followed_bytes_equal_the_stored_bytes_for_bursty_output() {
    let d = Daemon::start();
    // Five bursts of ~130 KiB each, with pauses, on both streams.
    let code = "for i in 1 2 3 4 5; do head -c 100000 /dev/urandom | base64; \
                head -c 1000 /dev/urandom | base64 >&2; sleep 0.05; done";
    let id = d.create_code(code);
    let mut out = d.follow_until(&format!("/processes/{id}/stdout?follow=true"), "");
    let mut err = d.follow_until(&format!("/processes/{id}/stderr?follow=true"), "");
    let followed_out = out.read_to_end();
    let followed_err = err.read_to_end();
    let rec = d.wait_idle(id);
    assert_eq!(rec["exitState"].as_str(), Some("success"), "{rec}");
    let stored_out = d.sub(id, "stdout").body;
    let stored_err = d.sub(id, "stderr").body;
    assert!(stored_out.len() > 500_000, "{} bytes", stored_out.len());
    assert!(
        followed_out == stored_out,
        "stdout: followed {} bytes, stored {}",
        followed_out.len(),
        stored_out.len()
    );
    assert!(
        followed_err == stored_err,
        "stderr: followed {} bytes, stored {}",
        followed_err.len(),
        stored_err.len()
    );
}
