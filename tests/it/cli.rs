//! `cyrnelctl` end to end: the real binary against a real `cyrneld` started
//! by the harness. The daemon is checked through the harness's own HTTP
//! client and `/proc`, never through `cyrnelctl` itself. Commands that do not
//! end by themselves (`events`, `logs -f`, `wait` on a running process) run
//! as child processes whose output is read line by line until the expected
//! lines appear, with the harness's deadline; nothing sleeps to synchronise.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::support::*;

const CTL: &str = env!("CARGO_BIN_EXE_cyrnelctl");

fn url(d: &Daemon) -> String {
    format!("http://127.0.0.1:{}", d.port())
}

/// `cyrnelctl ARGS` aimed at `url`, with no inherited `CYRNEL_*` variable.
fn ctl_cmd(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(CTL);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CYRNEL_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("CYRNEL_URL", url).args(args).stdin(Stdio::null());
    cmd
}

/// A child that is killed and reaped if the test fails before it exits.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug)]
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(self) -> Out {
        assert_eq!(self.code, Some(0), "cyrnelctl failed: {self:?}");
        self
    }

    /// Asserts exit status 1 and a single stderr line containing `needle`.
    #[track_caller]
    fn fails_with(&self, needle: &str) {
        assert_eq!(self.code, Some(1), "expected exit 1: {self:?}");
        assert_eq!(
            self.stderr.lines().count(),
            1,
            "expected one line on stderr: {self:?}"
        );
        assert!(
            self.stderr.starts_with("cyrnelctl: ") && self.stderr.contains(needle),
            "stderr should contain {needle:?}: {self:?}"
        );
    }
}

/// Runs `cmd` to its end (within the deadline), feeding it `input` on stdin.
#[track_caller]
fn finish(mut cmd: Command, input: Option<&[u8]>) -> Out {
    let dir = tempfile::tempdir().expect("temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    cmd.stdout(fs::File::create(&out_path).expect("stdout file"))
        .stderr(fs::File::create(&err_path).expect("stderr file"));
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = Guard(cmd.spawn().expect("spawn cyrnelctl"));
    if let Some(input) = input {
        let mut stdin = child.0.stdin.take().expect("stdin");
        stdin.write_all(input).expect("write stdin");
    }
    let status = poll(&format!("{cmd:?} to exit"), || {
        match child.0.try_wait().expect("try_wait") {
            Some(status) => Ok(status),
            None => Err(format!(
                "still running; stdout so far: {:?}",
                fs::read_to_string(&out_path).unwrap_or_default()
            )),
        }
    });
    Out {
        code: status.code(),
        stdout: fs::read_to_string(&out_path).expect("read stdout"),
        stderr: fs::read_to_string(&err_path).expect("read stderr"),
    }
}

#[track_caller]
fn ctl(d: &Daemon, args: &[&str]) -> Out {
    finish(ctl_cmd(&url(d), args), None)
}

/// A `cyrnelctl` that keeps running; its stdout is collected line by line
/// (and its stderr, for failure messages).
struct Live {
    child: Guard,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

/// Collects the lines of `from` on a thread of its own.
fn collect_lines(from: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

impl Live {
    fn spawn(mut cmd: Command) -> Live {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn cyrnelctl");
        let lines = collect_lines(child.stdout.take().expect("stdout"));
        let stderr = collect_lines(child.stderr.take().expect("stderr"));
        Live {
            child: Guard(child),
            lines,
            stderr,
        }
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn seen(&self) -> String {
        format!(
            "stdout {:?}, stderr {:?}",
            self.lines(),
            self.stderr.lock().unwrap()
        )
    }

    /// Waits until some line satisfies `pred`; returns it.
    #[track_caller]
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        poll(what, || {
            if let Some(line) = self.lines().into_iter().find(|l| pred(l)) {
                return Ok(line);
            }
            if let Some(status) = self.child.0.try_wait().expect("try_wait") {
                panic!("cyrnelctl exited ({status}) before {what}; {}", self.seen());
            }
            Err(self.seen())
        })
    }

    /// Waits for the child to exit by itself; its exit code.
    #[track_caller]
    fn wait_exit(&mut self) -> Option<i32> {
        poll("cyrnelctl to exit", || match self.child.0.try_wait() {
            Ok(Some(status)) => Ok(status.code()),
            _ => Err(format!("still running; {}", self.seen())),
        })
    }
}

/// `key: value` lines (as `show` prints them) as a map.
fn fields(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The rows of a `ps` table whose first column is `id`.
fn ps_row(table: &str, id: i64) -> Option<Vec<String>> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|cols| cols.first().map(String::as_str) == Some(id.to_string().as_str()))
}

// ---------------------------------------------------------------------------
// run
// ---------------------------------------------------------------------------

#[test]
fn run_follows_both_streams_and_exits_with_the_process_code() {
    let d = Daemon::start();
    let out = ctl(&d, &["run", "-c", "echo hi; echo err >&2; exit 3"]);
    assert_eq!(out.code, Some(3), "{out:?}");
    assert_eq!(out.stdout, "hi\n", "{out:?}");
    assert_eq!(out.stderr, "err\n", "{out:?}");
}

#[test]
fn run_of_a_signalled_process_exits_128_plus_the_signal() {
    let d = Daemon::start();
    let out = ctl(&d, &["run", "-c", "kill -TERM $$"]);
    assert_eq!(out.code, Some(143), "{out:?}");
}

#[test]
fn run_no_wait_prints_the_id_of_the_created_process() {
    let d = Daemon::start();
    let out = ctl(
        &d,
        &[
            "run",
            "--no-wait",
            "--ref",
            "nightly",
            "--timeout",
            "none",
            "-c",
            "echo later",
        ],
    )
    .ok();
    let id: i64 = out
        .stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("not an id: {out:?}"));
    assert_eq!(out.stdout, format!("{id}\n"));
    let rec = d.wait_idle(id);
    assert_eq!(rec["ref"].as_str(), Some("nightly"), "{rec}");
    assert_eq!(d.stdout_text(id), "later\n");
}

#[test]
fn run_reads_code_from_a_file_and_from_stdin() {
    let d = Daemon::start();
    let dir = marker_dir();
    let script = dir.path().join("job.sh");
    fs::write(&script, "echo from-file\n").unwrap();
    let out = ctl(&d, &["run", script.to_str().unwrap()]).ok();
    assert_eq!(out.stdout, "from-file\n");

    let out = finish(
        ctl_cmd(&url(&d), &["run", "-"]),
        Some(b"echo from-stdin; exit 5\n"),
    );
    assert_eq!(out.code, Some(5), "{out:?}");
    assert_eq!(out.stdout, "from-stdin\n");

    let missing = dir.path().join("missing.sh");
    let out = ctl(&d, &["run", missing.to_str().unwrap()]);
    out.fails_with("cannot read");
}

#[test]
fn run_timeout_reaches_the_daemon() {
    let d = Daemon::start();
    let out = ctl(&d, &["run", "--timeout", "200", "-c", "sleep 300"]);
    assert_eq!(out.code, Some(143), "{out:?}");
    assert!(out.stderr.contains("timed out"), "{out:?}");
    let recs = d.list("status=timeout");
    assert_eq!(ids_of(&recs).len(), 1, "{recs}");
}

#[test]
fn ctrl_c_during_run_cancels_the_process_and_reports_its_end() {
    let d = Daemon::start();
    let mut live = Live::spawn(ctl_cmd(
        &url(&d),
        &[
            "run",
            "--timeout",
            "none",
            "-c",
            "echo up; sleep 300 & sleep 300; wait",
        ],
    ));
    live.wait_line("the process to say it is up", |l| l == "up");
    let ids = d.list_ids("state=running");
    assert_eq!(ids.len(), 1, "{ids:?}");
    let pgid = d.wait_running_pid(ids[0]);
    send_signal("INT", live.child.0.id() as i32);
    assert_eq!(live.wait_exit(), Some(143), "{}", live.seen());
    let rec = d.record(ids[0]);
    assert_eq!(
        (rec["state"].as_str(), rec["exitState"].as_str()),
        (Some("idle"), Some("canceled")),
        "{rec}"
    );
    assert_group_gone(pgid);
}

// ---------------------------------------------------------------------------
// Inspecting
// ---------------------------------------------------------------------------

#[test]
fn ps_prints_a_table_filters_and_json() {
    let d = Daemon::start();
    let a = d.create_with("true", r#""ref":"alpha""#);
    let b = d.create_with("exit 2", r#""ref":"beta""#);
    d.wait_idle(a);
    d.wait_idle(b);

    let out = ctl(&d, &["ps"]).ok();
    let header: Vec<&str> = out
        .stdout
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["ID", "REF", "STATE", "EXIT", "STARTED", "DURATION", "CPU", "MEM"],
        "{out:?}"
    );
    let row = ps_row(&out.stdout, a).unwrap_or_else(|| panic!("no row for {a}: {out:?}"));
    assert_eq!(&row[1..4], ["alpha", "idle", "success"], "{out:?}");
    let row = ps_row(&out.stdout, b).unwrap_or_else(|| panic!("no row for {b}: {out:?}"));
    assert_eq!(&row[1..4], ["beta", "idle", "failed(2)"], "{out:?}");
    // Newest first, as the daemon lists them.
    let first_b = out.stdout.find(&format!("\n{b} ")).unwrap();
    let first_a = out.stdout.find(&format!("\n{a} ")).unwrap();
    assert!(first_b < first_a, "{out:?}");

    let out = ctl(&d, &["ps", "--ref", "alpha"]).ok();
    assert!(ps_row(&out.stdout, a).is_some(), "{out:?}");
    assert!(ps_row(&out.stdout, b).is_none(), "{out:?}");
    let out = ctl(&d, &["ps", "--status", "failed", "--state", "idle"]).ok();
    assert!(ps_row(&out.stdout, a).is_none(), "{out:?}");
    assert!(ps_row(&out.stdout, b).is_some(), "{out:?}");

    let out = ctl(&d, &["ps", "--json"]).ok();
    let j = parse_json(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(ids_of(&j), vec![b, a]);
}

#[test]
fn show_prints_the_record() {
    let d = Daemon::start();
    let id = d.create_with("exit 4", r#""ref":"r1""#);
    d.wait_idle(id);
    let out = ctl(&d, &["show", &id.to_string()]).ok();
    let f = fields(&out.stdout);
    assert_eq!(f["id"], id.to_string(), "{out:?}");
    assert_eq!(f["ref"], "r1", "{out:?}");
    assert_eq!(f["state"], "idle", "{out:?}");
    assert_eq!(f["exitState"], "failed", "{out:?}");
    assert_eq!(f["exitCode"], "4", "{out:?}");
    assert_eq!(f["error"], "Process exited with code 4.", "{out:?}");
    // The isolation level the run got (the suite runs as root: full).
    assert_eq!(f["sandbox"], "full", "{out:?}");

    let out = ctl(&d, &["show", "--json", &id.to_string()]).ok();
    let j = parse_json(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(j, d.record(id));
}

#[test]
fn output_prints_the_structured_output() {
    let d = Daemon::start();
    let id = d.create_code(
        r#"echo '{"a":1}' >> "$CYRNEL_OUTPUT"; echo '{"b":"x","a":2}' >> "$CYRNEL_OUTPUT""#,
    );
    d.wait_idle(id);
    let out = ctl(&d, &["output", &id.to_string()]).ok();
    let j = parse_json(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert_eq!(j, json(r#"{"a":2,"b":"x"}"#));
}

#[test]
fn logs_prints_stdout_or_stderr() {
    let d = Daemon::start();
    let id = d.create_code("echo out; echo err >&2");
    d.wait_idle(id);
    let out = ctl(&d, &["logs", &id.to_string()]).ok();
    assert_eq!(out.stdout, "out\n");
    let out = ctl(&d, &["logs", "--stderr", &id.to_string()]).ok();
    assert_eq!(out.stdout, "err\n");

    let running = d.create_with("sleep 300", r#""options":{"timeout":null}"#);
    d.wait_running_pid(running);
    ctl(&d, &["logs", &running.to_string()])
        .fails_with("Process output is not yet available. (HTTP 409)");
}

#[test]
fn logs_follow_streams_until_the_run_settles() {
    let d = Daemon::start();
    let dir = marker_dir();
    let go = dir.path().join("go");
    let id = d.create_with(
        &format!(
            "echo first; while [ ! -e {} ]; do sleep 0.02; done; echo second",
            sq(&go)
        ),
        r#""options":{"timeout":null}"#,
    );
    let mut live = Live::spawn(ctl_cmd(&url(&d), &["logs", "-f", &id.to_string()]));
    live.wait_line("the first line", |l| l == "first");
    fs::write(&go, "").unwrap();
    assert_eq!(live.wait_exit(), Some(0));
    assert_eq!(live.lines(), ["first", "second"]);
    assert_eq!(d.record(id)["state"].as_str(), Some("idle"));
}

// ---------------------------------------------------------------------------
// Changing
// ---------------------------------------------------------------------------

#[test]
fn kill_terminates_the_whole_group() {
    let d = Daemon::start();
    let id = d.create_with(
        "sleep 300 & sleep 300; wait",
        r#""options":{"timeout":null}"#,
    );
    let pgid = d.wait_running_pid(id);
    wait_group_size(pgid, 3);
    let out = ctl(&d, &["kill", &id.to_string()]).ok();
    assert_eq!(out.stdout, format!("{id} terminating\n"));
    let rec = d.wait_idle(id);
    assert_eq!(rec["exitState"].as_str(), Some("canceled"), "{rec}");
    assert_group_gone(pgid);

    ctl(&d, &["kill", &id.to_string()]).fails_with("Process is already idle. (HTTP 409)");

    // Several ids: each is tried; a failure is named and makes the exit 1.
    let other = d.create_with("sleep 300", r#""options":{"timeout":null}"#);
    let pgid = d.wait_running_pid(other);
    let out = ctl(&d, &["kill", "999999", &other.to_string()]);
    out.fails_with("process 999999: Process not found. (HTTP 404)");
    assert_eq!(out.stdout, format!("{other} terminating\n"));
    d.wait_idle(other);
    assert_group_gone(pgid);
}

#[test]
fn rerun_needs_force_when_there_are_outputs() {
    let d = Daemon::start();
    let dir = marker_dir();
    let count = dir.path().join("count");
    // umask 0: each run has a uid of its own, and the second must append
    // to the file the first created.
    let id = d.create_code(&format!("umask 0; echo run >> {}; echo again", sq(&count)));
    d.wait_idle(id);
    ctl(&d, &["rerun", &id.to_string()]).fails_with("Set force: true to overwrite. (HTTP 400)");
    let out = ctl(&d, &["rerun", "--force", &id.to_string()]).ok();
    assert_eq!(out.stdout, format!("{id} queued\n"));
    let rec = d.wait_idle(id);
    assert_eq!(rec["exitState"].as_str(), Some("success"), "{rec}");
    assert_eq!(fs::read_to_string(&count).unwrap(), "run\nrun\n");
    assert_eq!(d.stdout_text(id), "again\n");
}

#[test]
fn rm_deletes_idle_processes_only() {
    let d = Daemon::start();
    let id = d.create_code("true");
    d.wait_idle(id);
    let out = ctl(&d, &["rm", &id.to_string()]).ok();
    assert_eq!(out.stdout, format!("{id} deleted\n"));
    assert_eq!(d.get(&format!("/processes/{id}")).status, 404);

    let running = d.create_with("sleep 300", r#""options":{"timeout":null}"#);
    d.wait_running_pid(running);
    ctl(&d, &["rm", &running.to_string()])
        .fails_with("Process must be idle before it can be deleted. (HTTP 409)");
    assert_eq!(d.record(running)["state"].as_str(), Some("running"));
}

// ---------------------------------------------------------------------------
// Waiting and events
// ---------------------------------------------------------------------------

#[test]
fn wait_exits_zero_only_if_every_process_succeeded() {
    let d = Daemon::start();
    let good = d.create_code("true");
    let bad = d.create_code("exit 4");
    let out = ctl(&d, &["wait", &good.to_string()]).ok();
    assert_eq!(out.stdout, format!("{good} success\n"));
    let out = ctl(&d, &["wait", &good.to_string(), &bad.to_string()]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stdout.contains(&format!("{good} success\n")), "{out:?}");
    assert!(
        out.stdout
            .contains(&format!("{bad} failed: Process exited with code 4.\n")),
        "{out:?}"
    );
    ctl(&d, &["wait", "999999"]).fails_with("Process not found. (HTTP 404)");
}

#[test]
fn wait_blocks_until_the_process_is_idle() {
    let d = Daemon::start();
    let dir = marker_dir();
    let (started, go) = (dir.path().join("started"), dir.path().join("go"));
    let id = d.create_with(
        &format!(
            "touch {}; while [ ! -e {} ]; do sleep 0.02; done",
            sq(&started),
            sq(&go)
        ),
        r#""options":{"timeout":null}"#,
    );
    wait_for_file(&started);
    let mut live = Live::spawn(ctl_cmd(&url(&d), &["wait", &id.to_string()]));
    fs::write(&go, "").unwrap();
    assert_eq!(live.wait_exit(), Some(0), "{}", live.seen());
    // `wait` returned, so the daemon must already show the settled run.
    let rec = d.record(id);
    assert_eq!(rec["state"].as_str(), Some("idle"), "{rec}");
    assert_eq!(live.lines(), [format!("{id} success")]);
}

#[test]
fn events_replays_history_then_follows_live() {
    let d = Daemon::start();
    let first = d.create_code("true");
    d.wait_idle(first);
    let mut live = Live::spawn(ctl_cmd(&url(&d), &["events", "--since", "0"]));
    for (state, exit) in [("queued", "-"), ("running", "-"), ("idle", "success")] {
        let want = format!(" {state} {first} {state} {exit}");
        live.wait_line(&format!("event {want:?}"), |l| l.ends_with(&want));
    }
    let second = d.create_code("exit 1");
    let want = format!(" idle {second} idle failed");
    live.wait_line(&format!("live event {want:?}"), |l| l.ends_with(&want));
    d.wait_idle(second);
    let out = ctl(&d, &["rm", &second.to_string()]).ok();
    assert_eq!(out.stdout, format!("{second} deleted\n"));
    let want = format!(" deleted {second} idle failed");
    live.wait_line(&format!("event {want:?}"), |l| l.ends_with(&want));

    // Sequence numbers come first and increase strictly.
    let seqs: Vec<u64> = live
        .lines()
        .iter()
        .map(|l| {
            l.split(' ')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("no sequence number in {l:?}"))
        })
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{:?}", live.lines());
}

#[test]
fn events_of_one_process_as_json() {
    let d = Daemon::start();
    let a = d.create_code("true");
    let b = d.create_code("true");
    d.wait_idle(a);
    d.wait_idle(b);
    let mut live = Live::spawn(ctl_cmd(
        &url(&d),
        &["events", "--json", "--since", "0", &b.to_string()],
    ));
    live.wait_line("b's idle event", |l| {
        parse_json(l).is_ok_and(|j| j["state"].as_str() == Some("idle"))
    });
    let lines = live.lines();
    for l in &lines {
        let j = parse_json(l).unwrap_or_else(|e| panic!("{e}: {l:?}"));
        assert_eq!(j["id"].as_i64(), Some(b), "{lines:?}");
    }
    assert_eq!(lines.len(), 3, "{lines:?}");
}

// ---------------------------------------------------------------------------
// Errors and authentication
// ---------------------------------------------------------------------------

#[test]
fn an_unknown_id_is_one_clear_line() {
    let d = Daemon::start();
    for args in [
        &["show", "999999"][..],
        &["logs", "999999"],
        &["output", "999999"],
        &["rerun", "999999"],
        &["rm", "999999"],
        &["kill", "999999"],
    ] {
        let out = ctl(&d, args);
        out.fails_with("Process not found. (HTTP 404)");
        assert_eq!(out.stderr, "cyrnelctl: Process not found. (HTTP 404)\n");
    }
}

#[test]
fn a_refused_connection_says_how_to_start_cyrneld() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let out = finish(ctl_cmd(&url, &["ps"]), None);
    out.fails_with("cyrneld");
    assert!(
        out.stderr
            .contains(&format!("cannot connect to {url}: connection refused")),
        "{out:?}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let url = format!("http://127.0.0.1:{}", free_port());
    for args in [
        &["run"][..],
        &["run", "-c", "true", "file.sh"],
        &["run", "--timeout", "0", "-c", "true"],
        &["show", "abc"],
        &["ps", "--state", "bogus"],
        &["kill"],
    ] {
        let out = finish(ctl_cmd(&url, args), None);
        assert_eq!(out.code, Some(2), "{args:?}: {out:?}");
    }
}

#[test]
fn the_api_key_comes_from_the_environment_or_a_flag() {
    let d = Daemon::options().api_key("s3cret").start();
    ctl(&d, &["ps"]).fails_with("Unauthorized (HTTP 401)");

    let mut cmd = ctl_cmd(&url(&d), &["ps", "--json"]);
    cmd.env("CYRNEL_API_KEY", "s3cret");
    let out = finish(cmd, None).ok();
    assert!(parse_json(&out.stdout).is_ok(), "{out:?}");

    ctl(&d, &["--api-key", "s3cret", "ps"]).ok();

    let mut cmd = ctl_cmd(&url(&d), &["ps"]);
    cmd.env("CYRNEL_API_KEY", "wrong");
    finish(cmd, None).fails_with("Unauthorized (HTTP 401)");
}

// ---------------------------------------------------------------------------
// Completions and man page
// ---------------------------------------------------------------------------

#[test]
fn completions_and_man_page_are_generated() {
    let url = format!("http://127.0.0.1:{}", free_port());
    for shell in ["bash", "zsh", "fish"] {
        let out = finish(ctl_cmd(&url, &["completions", shell]), None).ok();
        assert!(out.stdout.contains("cyrnelctl"), "{shell}: {out:?}");
        assert!(out.stdout.contains("rerun"), "{shell}: {out:?}");
    }
    let out = finish(ctl_cmd(&url, &["man"]), None).ok();
    assert!(out.stdout.contains(".TH cyrnelctl"), "{out:?}");
    assert!(out.stdout.contains("CYRNEL_API_KEY"), "{out:?}");
    assert!(out.stdout.contains(".SH ENVIRONMENT"), "{out:?}");
    assert!(out.stdout.contains(".SH \"EXIT STATUS\""), "{out:?}");

    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    finish(ctl_cmd(&url, &["man", "--out-dir", out_dir]), None).ok();
    for page in ["cyrnelctl.1", "cyrnelctl-run.1", "cyrnelctl-events.1"] {
        let text =
            fs::read_to_string(dir.path().join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page}: {text}");
    }
    let main_page = fs::read_to_string(dir.path().join("cyrnelctl.1")).unwrap();
    assert!(main_page.contains(".SH ENVIRONMENT"), "{main_page}");
}

/// `cyrneld --man`: cyrneld(8), which the packages install. Every signal
/// that `cyrneld --help` names is described in its SIGNALS section, so the
/// two cannot drift apart; `--man` with anything else is a usage error.
#[test]
fn cyrneld_man_page_is_generated() {
    let daemon = |args: &[&str]| {
        let mut cmd = Command::new(BIN);
        cmd.args(args).stdin(Stdio::null());
        finish(cmd, None)
    };
    let page = daemon(&["--man"]).ok().stdout;
    assert!(page.contains(".TH cyrneld 8"), "{page}");
    for section in [
        ".SH NAME",
        ".SH SYNOPSIS",
        ".SH OPTIONS",
        ".SH CONFIGURATION",
        ".SH SIGNALS",
        ".SH ENVIRONMENT",
        ".SH FILES",
        ".SH \"EXIT STATUS\"",
        ".SH \"SEE ALSO\"",
        ".SH VERSION",
    ] {
        assert!(
            page.contains(section),
            "no {section} in cyrneld(8):\n{page}"
        );
    }
    for flag in ["config", "listen", "data\\-dir", "check", "salvage"] {
        assert!(
            page.contains(&format!("\\-\\-{flag}")),
            "--{flag} missing:\n{page}"
        );
    }
    let signals_section = page
        .split(".SH SIGNALS")
        .nth(1)
        .and_then(|rest| rest.split("\n.SH ").next())
        .unwrap();
    let help = daemon(&["--help"]).ok().stdout;
    assert!(help.contains("cyrneld(8)"), "{help}");
    let named: Vec<&str> = help
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| {
            w.len() > 3 && w.starts_with("SIG") && w[3..].bytes().all(|b| b.is_ascii_uppercase())
        })
        .collect();
    assert!(
        named.contains(&"SIGTERM") && named.contains(&"SIGHUP"),
        "{help}"
    );
    for signal in named {
        assert!(
            signals_section.contains(&format!("\\fB{signal}\\fR")),
            "{signal} is in --help but not in cyrneld(8)'s SIGNALS:\n{signals_section}"
        );
    }
    let both = daemon(&["--man", "--check"]);
    assert_eq!(both.code, Some(2), "{both:?}");
    assert!(both.stderr.contains("cannot be used with"), "{both:?}");
}

#[test]
fn handover_waits_for_the_new_image_or_says_why_not() {
    let d = Daemon::options().own_binary().start();
    let run = d.create_code("sleep 300");
    let pid = d.wait_running_pid(run);
    let out = ctl(&d, &["handover"]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with(&format!(
            "handed over to {} (pid {}, handover 1)",
            d.binary().display(),
            d.pid()
        )),
        "{out:?}"
    );
    assert!(is_alive(pid));
    fs::remove_file(d.binary()).unwrap();
    let out = ctl(&d, &["handover"]);
    assert_eq!(out.code, Some(1), "{out:?}");
    assert!(out.stderr.contains("Handover refused:"), "{out:?}");
    assert_eq!(d.record(run)["state"], "running");
}
