//! The HTTP contract of `cyrneld` (docs/api-contract.md), checked end to end
//! against the real binary: every status code and exact error message of
//! every endpoint (create validation, list filters and paging, the record and
//! its sub-resources, run/kill/delete, bad and unknown ids, unknown paths,
//! wrong methods, authentication), the command line and configuration
//! errors at start-up, and that ids are never reused, not even after a delete
//! or a restart. What happens to the OS processes themselves is in
//! `lifecycle.rs`.

use crate::support::*;
use std::fs;

/// Endpoints that take a process id: (method, suffix after `/processes/{id}`,
/// body to send).
const ID_ENDPOINTS: &[(&str, &str, Option<&str>)] = &[
    ("GET", "", None),
    ("DELETE", "", None),
    ("GET", "/code", None),
    ("GET", "/output", None),
    ("GET", "/stdout", None),
    ("GET", "/stderr", None),
    ("POST", "/signals/run", Some("{}")),
    ("POST", "/signals/kill", None),
];

const OUTPUTS_NOT_READY: &str = "Process output is not yet available.";
const BAD_ID: &str = "Field 'id' must be a positive integer.";
const NOT_FOUND: &str = "Process not found.";
const BODY_NOT_OBJECT: &str = "Request body must be an object.";
const MALFORMED: &str = "Malformed JSON in request body.";
const LIMIT_ERROR: &str = "Invalid value for 'limit': must be an integer between 1 and 1000.";

/// A script that says it is ready, then waits for `release` to appear.
fn wait_for_release_script(ready: &std::path::Path, release: &std::path::Path) -> String {
    format!(
        ": > {}\nwhile [ ! -f {} ]; do sleep 0.01; done\n",
        sq(ready),
        sq(release)
    )
}

// ---------------------------------------------------------------------------
// Health, command line, configuration
// ---------------------------------------------------------------------------

#[test]
fn health_answers_ok_and_never_needs_auth() {
    let d = Daemon::start();
    let r = d.raw("GET", "/health", &[], None);
    assert_eq!(r.status, 200, "{r}");
    r.assert_json_content_type();
    assert_eq!(r.json(), json(r#"{"status":"ok"}"#), "{r}");

    let d = Daemon::options().api_key("health-key").start();
    let r = d.raw("GET", "/health", &[], None);
    assert_eq!(r.status, 200, "/health must not need auth: {r}");
    assert_eq!(r.json(), json(r#"{"status":"ok"}"#), "{r}");
    let r = d.raw(
        "GET",
        "/health",
        &[("Authorization", "Bearer wrong-key")],
        None,
    );
    assert_eq!(r.status, 200, "/health must not check a wrong key: {r}");
}

#[test]
fn version_and_help_exit_zero() {
    let (status, out) = run_to_exit(&["--version"], &[]);
    assert_eq!(status.code(), Some(0), "--version: {status}; output: {out}");
    let line = out
        .lines()
        .find(|l| l.contains("cyrneld"))
        .unwrap_or_else(|| panic!("--version must print a line with 'cyrneld': {out:?}"));
    assert!(
        line.contains(env!("CARGO_PKG_VERSION")),
        "--version line must contain version {}: {line:?}",
        env!("CARGO_PKG_VERSION")
    );

    let (status, out) = run_to_exit(&["--help"], &[]);
    assert_eq!(status.code(), Some(0), "--help: {status}; output: {out}");
    assert!(
        out.contains("--listen"),
        "--help must document --listen: {out}"
    );
    assert!(
        out.contains("--data-dir"),
        "--help must document --data-dir: {out}"
    );
}

/// Starts the binary with an invalid setting and expects a non-zero exit
/// whose output names the offending key (case-insensitively, so both
/// `kill_grace_ms` and `CYRNEL_KILL_GRACE_MS` count).
#[track_caller]
fn assert_rejected(extra_args: &[&str], env: &[(&str, &str)], key_names: &[&str]) {
    let data = tempfile::tempdir().unwrap();
    let data_path = data.path().to_str().unwrap().to_string();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--listen",
        listen.as_str(),
        "--data-dir",
        data_path.as_str(),
    ];
    args.extend_from_slice(extra_args);
    let (status, out) = run_to_exit(&args, env);
    assert!(
        matches!(status.code(), Some(c) if c != 0),
        "{args:?} {env:?}: expected a non-zero exit code, got {status}; output: {out}"
    );
    let lower = out.to_ascii_lowercase();
    assert!(
        key_names
            .iter()
            .any(|k| lower.contains(&k.to_ascii_lowercase())),
        "{args:?} {env:?}: the error must name one of {key_names:?}; output: {out}"
    );
}

#[test]
fn invalid_configuration_is_rejected_at_start() {
    assert_rejected(&[], &[("CYRNEL_KILL_GRACE_MS", "abc")], &["kill_grace_ms"]);
    assert_rejected(&[], &[("CYRNEL_KILL_GRACE_MS", "-5")], &["kill_grace_ms"]);
    assert_rejected(&[], &[("CYRNEL_MAX_RUNNING", "0")], &["max_running"]);
    assert_rejected(&[], &[("CYRNEL_MAX_RUNNING", "many")], &["max_running"]);
    assert_rejected(
        &[],
        &[("CYRNEL_DEFAULT_TIMEOUT_MS", "soon")],
        &["default_timeout_ms"],
    );
    assert_rejected(
        &[],
        &[("CYRNEL_MAX_OUTPUT_BYTES", "x")],
        &["max_output_bytes"],
    );
    assert_rejected(&[], &[("CYRNEL_ENV", "not json")], &["cyrnel_env", "env"]);
    assert_rejected(&[], &[("CYRNEL_ENV", "[1,2]")], &["cyrnel_env", "env"]);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cyrneld.toml");
    fs::write(&config, "no_such_setting = 1\n").unwrap();
    let config_arg = config.to_str().unwrap();
    assert_rejected(&["--config", config_arg], &[], &["no_such_setting"]);

    // Without an API key the daemon must refuse a non-loopback address.
    let data = tempfile::tempdir().unwrap();
    let listen = format!("0.0.0.0:{}", free_port());
    let (status, out) = run_to_exit(
        &[
            "--listen",
            &listen,
            "--data-dir",
            data.path().to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        matches!(status.code(), Some(c) if c != 0),
        "listening on {listen} without an API key must fail: {status}; output: {out}"
    );
    let lower = out.to_ascii_lowercase();
    assert!(
        lower.contains("api_key") || lower.contains("api key"),
        "the error must mention the api key: {out}"
    );
}

#[test]
fn config_file_key_applies_and_env_overrides_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cyrneld.toml");
    fs::write(&config, "api_key = \"from-file\"\n").unwrap();
    // Owner-only, or the daemon refuses a file holding the key.
    fs::set_permissions(
        &config,
        <fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();

    let d = Daemon::options().arg("--config").arg(config_arg).start();
    let r = d.raw("GET", "/processes", &[], None);
    r.assert_error(401, "Unauthorized");
    let r = d.raw(
        "GET",
        "/processes",
        &[("Authorization", "Bearer from-file")],
        None,
    );
    assert_eq!(r.status, 200, "the key from the config file must work: {r}");
    drop(d);

    let d = Daemon::options()
        .arg("--config")
        .arg(config_arg)
        .env("CYRNEL_API_KEY", "from-env")
        .start();
    let r = d.raw(
        "GET",
        "/processes",
        &[("Authorization", "Bearer from-env")],
        None,
    );
    assert_eq!(r.status, 200, "the environment must override the file: {r}");
    let r = d.raw(
        "GET",
        "/processes",
        &[("Authorization", "Bearer from-file")],
        None,
    );
    r.assert_error(401, "Unauthorized");
}

// ---------------------------------------------------------------------------
// Create
// ---------------------------------------------------------------------------

#[test]
fn create_answers_201_and_the_record_has_every_field() {
    let d = Daemon::start();
    let id = d.create_with("exit 0", r#""autorun":false"#);
    let rec = d.record(id);
    for key in [
        "id",
        "state",
        "exitState",
        "error",
        "createdAt",
        "completedAt",
        "startedAt",
        "pid",
        "exitCode",
        "signal",
    ] {
        assert!(rec.get(key).is_some(), "record must have {key:?}: {rec}");
    }
    assert!(
        rec.get("ref").is_none(),
        "ref must be absent when not set: {rec}"
    );
    assert_eq!(rec["id"].as_i64(), Some(id), "{rec}");
    assert_eq!(
        rec["state"].as_str(),
        Some("idle"),
        "autorun:false is idle: {rec}"
    );
    for key in [
        "exitState",
        "error",
        "completedAt",
        "startedAt",
        "pid",
        "exitCode",
        "signal",
    ] {
        assert!(
            rec[key].is_null(),
            "{key} must be null before any run: {rec}"
        );
    }
    assert_timestamp(&rec["createdAt"], "createdAt");

    let r = d.get(&format!("/processes/{id}"));
    r.assert_json_content_type();

    let id2 = d.create(&format!(
        r#"{{"code":{},"ref":"  nightly  "}}"#,
        js("echo hi")
    ));
    assert!(id2 > id, "ids must grow: {id} then {id2}");
    let rec = d.wait_idle(id2);
    assert_eq!(
        rec["ref"].as_str(),
        Some("nightly"),
        "ref is trimmed: {rec}"
    );
    assert_eq!(rec["exitState"].as_str(), Some("success"), "{rec}");
    assert!(rec["error"].is_null(), "{rec}");
    assert!(rec["pid"].is_null(), "pid is null once idle: {rec}");
    assert_eq!(rec["exitCode"].as_i64(), Some(0), "{rec}");
    assert!(rec["signal"].is_null(), "{rec}");
    assert_timestamp(&rec["createdAt"], "createdAt");
    assert_timestamp(&rec["startedAt"], "startedAt");
    assert_timestamp(&rec["completedAt"], "completedAt");
    let (created, started, completed) = (
        rec["createdAt"].as_str().unwrap(),
        rec["startedAt"].as_str().unwrap(),
        rec["completedAt"].as_str().unwrap(),
    );
    assert!(
        created <= started && started <= completed,
        "createdAt <= startedAt <= completedAt: {rec}"
    );
}

#[test]
fn create_rejects_invalid_bodies_with_exact_messages() {
    let d = Daemon::start();
    let timeout_msg = "Field 'options.timeout' must be a positive integer or null.";
    let grace_msg = "Field 'options.killGrace' must be a non-negative integer.";
    let cases: &[(&str, &str)] = &[
        ("{}", "Missing required field: code"),
        (
            r#"{"ref":"x","autorun":false}"#,
            "Missing required field: code",
        ),
        (r#"{"code":5}"#, "Field 'code' must be a string."),
        (r#"{"code":["echo"]}"#, "Field 'code' must be a string."),
        (r#"{"code":{"a":1}}"#, "Field 'code' must be a string."),
        (r#"{"code":true}"#, "Field 'code' must be a string."),
        (
            r#"{"code":"x","ref":5}"#,
            "Field 'ref' in body must be a string.",
        ),
        (
            r#"{"code":"x","ref":["a"]}"#,
            "Field 'ref' in body must be a string.",
        ),
        (r#"{"code":"x","ref":""}"#, "Field 'ref' must not be empty."),
        (
            r#"{"code":"x","ref":"   "}"#,
            "Field 'ref' must not be empty.",
        ),
        (
            r#"{"code":"x","ref":" \t\n "}"#,
            "Field 'ref' must not be empty.",
        ),
        (r#"{"code":"x","options":{"timeout":0}}"#, timeout_msg),
        (r#"{"code":"x","options":{"timeout":-5}}"#, timeout_msg),
        (r#"{"code":"x","options":{"timeout":1.5}}"#, timeout_msg),
        (r#"{"code":"x","options":{"timeout":"100"}}"#, timeout_msg),
        (r#"{"code":"x","options":{"timeout":true}}"#, timeout_msg),
        (r#"{"code":"x","options":{"timeout":{}}}"#, timeout_msg),
        (r#"{"code":"x","options":{"killGrace":-1}}"#, grace_msg),
        (r#"{"code":"x","options":{"killGrace":2.5}}"#, grace_msg),
        (r#"{"code":"x","options":{"killGrace":"5"}}"#, grace_msg),
        (
            r#"{"code":"x","options":5}"#,
            "Field 'options' must be an object.",
        ),
        (
            r#"{"code":"x","options":"fast"}"#,
            "Field 'options' must be an object.",
        ),
        (
            r#"{"code":"x","options":[1]}"#,
            "Field 'options' must be an object.",
        ),
        (
            r#"{"code":"x","autorun":"true"}"#,
            "Field 'autorun' must be a boolean.",
        ),
        (
            r#"{"code":"x","autorun":1}"#,
            "Field 'autorun' must be a boolean.",
        ),
        ("", BODY_NOT_OBJECT),
        ("[]", BODY_NOT_OBJECT),
        (r#"[{"code":"x"}]"#, BODY_NOT_OBJECT),
        (r#""code""#, BODY_NOT_OBJECT),
        ("null", BODY_NOT_OBJECT),
        ("5", BODY_NOT_OBJECT),
        ("true", BODY_NOT_OBJECT),
        ("{", MALFORMED),
        (r#"{"code":"x""#, MALFORMED),
        ("{code: 1}", MALFORMED),
        ("not json at all", MALFORMED),
        (r#"{"code":"x"} trailing"#, MALFORMED),
    ];
    for (body, message) in cases {
        let r = d.post("/processes", body);
        assert_eq!(r.status, 400, "body {body:?} must be rejected: {r}");
        r.assert_error(400, message);
    }
    // No body at all is the same as an empty one.
    d.post_no_body("/processes")
        .assert_error(400, BODY_NOT_OBJECT);

    assert_eq!(
        d.list_ids(""),
        Vec::<i64>::new(),
        "a rejected create must not leave a record"
    );

    // The edges that are valid.
    let accepted = [
        r#"{"code":"","autorun":false}"#,
        r#"{"code":"x","autorun":false,"options":{"timeout":null}}"#,
        r#"{"code":"x","autorun":false,"options":{"timeout":1}}"#,
        r#"{"code":"x","autorun":false,"options":{"killGrace":0}}"#,
        r#"{"code":"x","autorun":false,"options":{}}"#,
        r#"{"code":"x","autorun":false,"unknownField":[1,{"a":null}]}"#,
        r#"{"code":"x","autorun":false,"options":{"unknownOption":true}}"#,
        r#"{"code":"x","autorun":false,"ref":"r"}"#,
    ];
    for body in accepted {
        d.create(body);
    }
    assert_eq!(d.list_ids("").len(), accepted.len());
}

#[test]
fn code_length_limit_is_102400_characters() {
    let d = Daemon::start();
    let too_long = "Field 'code' must not exceed 100 KB.";

    // Characters, not bytes: 102400 two-byte characters are allowed too.
    for ch in ["a", "é"] {
        let code = ch.repeat(102_400);
        let id = d.create_with(&code, r#""autorun":false"#);
        assert_eq!(
            d.sub(id, "code").text(),
            code,
            "code must be stored exactly"
        );
        let r = d.post(
            "/processes",
            &format!(r#"{{"code":{},"autorun":false}}"#, js(&ch.repeat(102_401))),
        );
        r.assert_error(400, too_long);
    }
}

#[test]
fn request_body_over_the_limit_is_413() {
    let d = Daemon::options()
        .env("CYRNEL_MAX_BODY_BYTES", "1024")
        .start();
    let body_of_len = |len: usize| {
        let skeleton = r#"{"code":"","autorun":false}"#;
        let pad = "x".repeat(len - skeleton.len());
        let body = format!(r#"{{"code":"{pad}","autorun":false}}"#);
        assert_eq!(body.len(), len);
        body
    };
    let id = d.create(&body_of_len(1024));
    assert!(id >= 1);
    d.post("/processes", &body_of_len(1025))
        .assert_error(413, "Request body is too large.");
    d.post("/processes", &body_of_len(4000))
        .assert_error(413, "Request body is too large.");
    d.run(
        id,
        &format!(r#"{{"force":true,"pad":"{}"}}"#, "y".repeat(2000)),
    )
    .assert_error(413, "Request body is too large.");
    assert_eq!(d.list_ids(""), vec![id], "a 413 must not create a record");
    assert!(
        d.record(id)["exitState"].is_null(),
        "a 413 run must not have run the process"
    );
}

// ---------------------------------------------------------------------------
// List
// ---------------------------------------------------------------------------

#[test]
fn list_filters_by_state_status_and_ref_newest_first() {
    let d = Daemon::start();
    let never_ran = d.create_with("exit 0", r#""ref":"a","autorun":false"#);
    let succeeded = d.create_with("exit 0", r#""ref":"b""#);
    let failed = d.create_with("exit 1", r#""ref":"a""#);
    let timed_out = d.create_with("sleep 300", r#""options":{"timeout":1}"#);
    let canceled = d.create_code("sleep 300");
    d.wait_running_pid(canceled);
    assert_eq!(d.kill(canceled).status, 200);
    for id in [succeeded, failed, timed_out, canceled] {
        d.wait_idle(id);
    }
    let running = d.create_with("sleep 300", r#""ref":"a b""#);
    d.wait_running_pid(running);

    let all = vec![running, canceled, timed_out, failed, succeeded, never_ran];
    assert_eq!(d.list_ids(""), all, "newest first, every record");
    let r = d.get("/processes");
    r.assert_json_content_type();

    let cases: &[(&str, Vec<i64>)] = &[
        (
            "state=idle",
            vec![canceled, timed_out, failed, succeeded, never_ran],
        ),
        ("state=running", vec![running]),
        ("state=queued", vec![]),
        ("state=terminating", vec![]),
        ("status=success", vec![succeeded]),
        ("status=failed", vec![failed]),
        ("status=timeout", vec![timed_out]),
        ("status=canceled", vec![canceled]),
        ("status=null", vec![running, never_ran]),
        ("ref=a", vec![failed, never_ran]),
        ("ref=%20a%20", vec![failed, never_ran]),
        ("ref=a%20b", vec![running]),
        ("ref=b", vec![succeeded]),
        ("ref=zzz", vec![]),
        ("state=idle&ref=a", vec![failed, never_ran]),
        ("status=null&state=idle", vec![never_ran]),
        ("status=failed&ref=b", vec![]),
    ];
    for (query, expected) in cases {
        assert_eq!(&d.list_ids(query), expected, "GET /processes?{query}");
    }

    // Settled records in the list are the same as GET /processes/{id}.
    let list = d.list("state=idle");
    for rec in list["processes"].as_array().unwrap() {
        let id = rec["id"].as_i64().unwrap();
        assert_eq!(rec, &d.record(id), "list entry vs record of {id}");
    }
    let rec = d.record(timed_out);
    assert_eq!(rec["exitState"].as_str(), Some("timeout"), "{rec}");
    assert!(rec.get("ref").is_none(), "ref absent when never set: {rec}");
}

#[test]
fn list_rejects_bad_filter_values() {
    let d = Daemon::start();
    d.create_with("exit 0", r#""autorun":false"#);
    let state_msg = "Invalid value for 'state': must be one of queued, running, idle, terminating.";
    let status_msg =
        "Invalid value for 'status': must be one of success, failed, timeout, canceled, null.";
    let ref_msg = "Invalid value for 'ref': must not be empty.";
    let cases: &[(&str, &str)] = &[
        ("state=bogus", state_msg),
        ("state=done", state_msg),
        ("status=bogus", status_msg),
        ("status=ok", status_msg),
        ("ref=", ref_msg),
        ("ref=%20%20", ref_msg),
        ("limit=0", LIMIT_ERROR),
        ("limit=1001", LIMIT_ERROR),
        ("limit=-1", LIMIT_ERROR),
        ("limit=abc", LIMIT_ERROR),
        ("limit=1.5", LIMIT_ERROR),
        ("limit=", LIMIT_ERROR),
        ("limit=99999999999999999999999", LIMIT_ERROR),
        (
            "limit=3&cursor=zzz-not-a-cursor",
            "Invalid value for 'cursor'.",
        ),
    ];
    for (query, message) in cases {
        d.get(&format!("/processes?{query}"))
            .assert_error(400, message);
    }
}

/// Percent-encodes everything but RFC 3986 unreserved characters, so an
/// opaque cursor survives the trip through a query string.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Follows `nextCursor` from `query` (which has a limit) until it is null;
/// returns all ids in order. Each page must hold at most `limit` records.
#[track_caller]
fn walk_pages(d: &Daemon, query: &str, limit: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _page in 0..100 {
        let q = match &cursor {
            None => query.to_string(),
            Some(c) => format!("{query}&cursor={}", percent_encode(c)),
        };
        let page = d.list(&q);
        let page_ids = ids_of(&page);
        assert!(page_ids.len() <= limit, "page over limit {limit}: {page}");
        ids.extend(page_ids);
        let next = page
            .get("nextCursor")
            .unwrap_or_else(|| panic!("with limit, nextCursor must be present: {page}"));
        match next {
            Json::Null => return ids,
            Json::String(c) => {
                assert!(!c.is_empty(), "nextCursor must not be empty: {page}");
                cursor = Some(c.clone());
            }
            other => panic!("nextCursor must be a string or null, got {other}"),
        }
    }
    panic!("paging {query} did not end after 100 pages");
}

#[test]
fn list_pages_with_limit_and_cursor() {
    let d = Daemon::start();
    let mut ids = Vec::new();
    for i in 0..7 {
        let extra = if i % 2 == 1 {
            r#""autorun":false,"ref":"odd""#
        } else {
            r#""autorun":false"#
        };
        ids.push(d.create_with(&format!("echo {i}"), extra));
    }
    ids.reverse(); // newest first
    let odd: Vec<i64> = ids
        .iter()
        .copied()
        .filter(|id| d.record(*id)["ref"].as_str() == Some("odd"))
        .collect();
    assert_eq!(odd.len(), 3);

    let first = d.list("limit=3");
    assert_eq!(ids_of(&first), ids[..3].to_vec(), "first page: {first}");
    assert!(
        first["nextCursor"].as_str().is_some(),
        "a full page with more to come needs a cursor: {first}"
    );

    assert_eq!(walk_pages(&d, "limit=3", 3), ids, "limit=3");
    assert_eq!(walk_pages(&d, "limit=1", 1), ids, "limit=1");
    assert_eq!(walk_pages(&d, "limit=7", 7), ids, "limit=7");
    assert_eq!(walk_pages(&d, "limit=2&ref=odd", 2), odd, "limit=2&ref=odd");

    let all = d.list("limit=1000");
    assert_eq!(ids_of(&all), ids, "limit=1000");
    assert!(
        all["nextCursor"].is_null() && all.get("nextCursor").is_some(),
        "fewer records than the limit: nextCursor must be null: {all}"
    );
}

// ---------------------------------------------------------------------------
// Ids
// ---------------------------------------------------------------------------

#[test]
fn malformed_ids_are_400_on_every_endpoint() {
    let d = Daemon::start();
    d.create_with("exit 0", r#""autorun":false"#);
    let bad_ids = [
        "1.5",
        "1abc",
        "+5",
        "0",
        "-1",
        "abc",
        "9223372036854775808",
        "99999999999999999999999",
        "1e3",
        "0x1",
    ];
    for bad in bad_ids {
        for (method, suffix, body) in ID_ENDPOINTS {
            let path = format!("/processes/{bad}{suffix}");
            let r = d.request(method, &path, body.map(str::as_bytes));
            assert_eq!(r.status, 400, "{method} {path}: {r}");
            r.assert_error(400, BAD_ID);
        }
    }
}

#[test]
fn unknown_ids_are_404_on_every_endpoint() {
    let d = Daemon::start();
    d.create_with("exit 0", r#""autorun":false"#);
    for id in ["999", "9223372036854775807"] {
        for (method, suffix, body) in ID_ENDPOINTS {
            let path = format!("/processes/{id}{suffix}");
            d.request(method, &path, body.map(str::as_bytes))
                .assert_error(404, NOT_FOUND);
        }
    }
}

#[test]
fn ids_are_never_reused_after_delete_or_restart() {
    let mut d = Daemon::start();
    let a = d.create_with("echo a", r#""autorun":false"#);
    let b = d.create_with("echo b", r#""autorun":false"#);
    let c = d.create_with("echo c", r#""autorun":false"#);
    assert!(a >= 1 && a < b && b < c, "ids grow: {a} {b} {c}");
    assert_eq!(d.delete(&format!("/processes/{c}")).status, 200);
    let e = d.create_with("echo e", r#""autorun":false"#);
    assert!(e > c, "id {e} reuses or precedes deleted id {c}");
    assert_eq!(d.delete(&format!("/processes/{e}")).status, 200);

    d.stop_gracefully();
    d.restart_same_dir();
    let f = d.create_with("echo f", r#""autorun":false"#);
    assert!(f > e, "after a restart id {f} reuses or precedes {e}");

    // A 201 means durable: a crash right after must not lose the record.
    let g = d.create_with("echo g", r#""autorun":false"#);
    d.kill9();
    d.restart_same_dir();
    assert_eq!(
        d.sub(g, "code").text(),
        "echo g",
        "record {g} lost in a crash"
    );
    let h = d.create_with("echo h", r#""autorun":false"#);
    assert!(h > g, "after a crash id {h} reuses or precedes {g}");

    assert_eq!(d.list_ids(""), vec![h, g, f, b, a]);
    assert_eq!(d.sub(a, "code").text(), "echo a");
    d.get(&format!("/processes/{c}"))
        .assert_error(404, NOT_FOUND);
    d.get(&format!("/processes/{e}"))
        .assert_error(404, NOT_FOUND);
}

// ---------------------------------------------------------------------------
// Sub-resources
// ---------------------------------------------------------------------------

#[test]
fn code_is_served_as_text_in_any_state() {
    let d = Daemon::options().env("CYRNEL_MAX_RUNNING", "1").start();
    let code = "printf '%s' \"héllo \\\"quoted\\\"\"\n# ünïcödé — no trailing newline";
    let id = d.create_with(code, r#""autorun":false"#);
    let r = d.sub(id, "code");
    assert_eq!(r.status, 200, "{r}");
    r.assert_text_content_type();
    assert_eq!(
        r.body,
        code.as_bytes(),
        "code must be returned byte for byte"
    );

    let empty = d.create_with("", r#""autorun":false"#);
    let r = d.sub(empty, "code");
    assert_eq!(r.status, 200, "{r}");
    assert!(r.body.is_empty(), "{r}");

    let running = d.create_code("sleep 300");
    d.wait_running_pid(running);
    let queued = d.create_code("echo queued");
    assert_eq!(d.record(queued)["state"].as_str(), Some("queued"));
    assert_eq!(d.sub(running, "code").text(), "sleep 300");
    assert_eq!(d.sub(queued, "code").text(), "echo queued");
    assert_eq!(d.kill(running).status, 200);
    d.wait_idle(queued);
    assert_eq!(d.sub(running, "code").text(), "sleep 300");
}

#[test]
fn outputs_are_409_until_idle_then_typed() {
    let d = Daemon::options().env("CYRNEL_MAX_RUNNING", "1").start();
    let m = marker_dir();
    let (ready, release) = (m.path().join("ready"), m.path().join("release"));
    let blocker = d.create_code(&wait_for_release_script(&ready, &release));
    d.wait_running_pid(blocker);
    wait_for_file(&ready);
    let queued = d.create_code("echo out; echo err >&2");
    assert_eq!(d.record(queued)["state"].as_str(), Some("queued"));
    for id in [blocker, queued] {
        for what in ["output", "stdout", "stderr"] {
            d.sub(id, what).assert_error(409, OUTPUTS_NOT_READY);
        }
    }
    fs::write(&release, "").unwrap();
    d.wait_idle(blocker);
    let rec = d.wait_idle(queued);
    assert_eq!(rec["exitState"].as_str(), Some("success"), "{rec}");

    let r = d.sub(queued, "stdout");
    assert_eq!(r.status, 200, "{r}");
    r.assert_text_content_type();
    assert_eq!(r.text(), "out\n");
    assert_eq!(r.header("x-cyrnel-dropped-bytes"), Some("0"), "{r}");
    let r = d.sub(queued, "stderr");
    assert_eq!(r.status, 200, "{r}");
    r.assert_text_content_type();
    assert_eq!(r.text(), "err\n");
    assert_eq!(r.header("x-cyrnel-dropped-bytes"), Some("0"), "{r}");
    let r = d.sub(queued, "output");
    assert_eq!(r.status, 200, "{r}");
    r.assert_json_content_type();
    assert_eq!(r.json(), json("{}"), "nothing emitted: output is {{}}");

    // Idle and never run: nothing to show, but no 409 either.
    let fresh = d.create_with("echo never", r#""autorun":false"#);
    assert_eq!(d.stdout_text(fresh), "");
    assert_eq!(d.stderr_text(fresh), "");
    assert_eq!(d.output_json(fresh), json("{}"));
}

// ---------------------------------------------------------------------------
// Signals and delete
// ---------------------------------------------------------------------------

#[test]
fn run_signal_contract() {
    let d = Daemon::options().env("CYRNEL_MAX_RUNNING", "1").start();
    let id = d.create_with("echo ran", r#""autorun":false"#);
    d.run(id, "").assert_error(400, BODY_NOT_OBJECT);
    d.post_no_body(&format!("/processes/{id}/signals/run"))
        .assert_error(400, BODY_NOT_OBJECT);
    d.run(id, "[]").assert_error(400, BODY_NOT_OBJECT);
    d.run(id, "true").assert_error(400, BODY_NOT_OBJECT);
    d.run(id, "{").assert_error(400, MALFORMED);
    d.run(id, r#"{"force":"yes"}"#)
        .assert_error(400, "Field 'force' must be a boolean.");
    d.run(id, r#"{"force":1}"#)
        .assert_error(400, "Field 'force' must be a boolean.");
    assert!(
        d.record(id)["exitState"].is_null() && d.record(id)["state"].as_str() == Some("idle"),
        "rejected run signals must not run the process"
    );

    // Never ran, so no outputs: {} is enough.
    let r = d.run(id, "{}");
    assert_eq!(r.status, 200, "{r}");
    r.assert_json_content_type();
    let rec = r.json();
    assert_eq!(rec["id"].as_i64(), Some(id), "{rec}");
    assert!(
        matches!(rec["state"].as_str(), Some("queued" | "running")),
        "a run signal queues the process: {rec}"
    );
    assert!(
        rec["exitState"].is_null() && rec["completedAt"].is_null(),
        "{rec}"
    );
    let rec = d.wait_idle(id);
    assert_eq!(rec["exitState"].as_str(), Some("success"), "{rec}");
    assert_eq!(d.stdout_text(id), "ran\n");

    let existing = "Process has existing outputs. Set force: true to overwrite.";
    d.run(id, "{}").assert_error(400, existing);
    d.run(id, r#"{"force":false}"#).assert_error(400, existing);
    d.run(id, r#"{"other":true}"#).assert_error(400, existing);
    let r = d.run(id, r#"{"force":true}"#);
    assert_eq!(r.status, 200, "{r}");
    assert!(
        r.json()["completedAt"].is_null(),
        "a new run resets completedAt: {r}"
    );
    let rec = d.wait_idle(id);
    assert_eq!(rec["exitState"].as_str(), Some("success"), "{rec}");
    assert_eq!(
        d.stdout_text(id),
        "ran\n",
        "force must not append to the old stdout"
    );

    // Not idle: running and queued.
    let must_be_idle = "Process must be idle to accept a run signal.";
    let m = marker_dir();
    let (ready, release) = (m.path().join("ready"), m.path().join("release"));
    let blocker = d.create_code(&wait_for_release_script(&ready, &release));
    d.wait_running_pid(blocker);
    wait_for_file(&ready);
    let queued = d.create_code("echo q");
    assert_eq!(d.record(queued)["state"].as_str(), Some("queued"));
    d.run(blocker, r#"{"force":true}"#)
        .assert_error(409, must_be_idle);
    d.run(queued, r#"{"force":true}"#)
        .assert_error(409, must_be_idle);

    // A canceled run counts as an existing output.
    let r = d.kill(queued);
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["exitState"].as_str(), Some("canceled"), "{r}");
    d.run(queued, "{}").assert_error(400, existing);

    fs::write(&release, "").unwrap();
    d.wait_idle(blocker);
    assert_eq!(d.run(queued, r#"{"force":true}"#).status, 200);
    let rec = d.wait_idle(queued);
    assert_eq!(rec["exitState"].as_str(), Some("success"), "{rec}");
    assert_eq!(d.stdout_text(queued), "q\n");
}

#[test]
fn kill_signal_contract() {
    let d = Daemon::options().env("CYRNEL_MAX_RUNNING", "1").start();
    let m = marker_dir();
    let (ready, release) = (m.path().join("ready"), m.path().join("release"));
    // The blocker holds the only slot. On SIGTERM its sleep dies and the
    // shell waits for `release` before exiting, so "terminating" lasts
    // exactly as long as the test wants; the long grace keeps SIGKILL away.
    let blocker_code = format!(
        "trap 'while [ ! -f {rel} ]; do sleep 0.01; done; exit 0' TERM\n: > {rdy}\nsleep 300\n",
        rel = sq(&release),
        rdy = sq(&ready)
    );
    let blocker = d.create_with(&blocker_code, r#""options":{"killGrace":600000}"#);
    let pid = d.wait_running_pid(blocker);
    wait_for_file(&ready);

    // queued → idle + canceled at once.
    let queued = d.create_code("echo must-never-run");
    assert_eq!(d.record(queued)["state"].as_str(), Some("queued"));
    let r = d.kill(queued);
    assert_eq!(r.status, 200, "{r}");
    r.assert_json_content_type();
    let rec = r.json();
    assert_eq!(rec["id"].as_i64(), Some(queued), "{rec}");
    assert_eq!(rec["state"].as_str(), Some("idle"), "{rec}");
    assert_eq!(rec["exitState"].as_str(), Some("canceled"), "{rec}");
    assert!(rec["error"].is_null(), "{rec}");
    assert_timestamp(&rec["completedAt"], "completedAt");
    assert_eq!(
        d.record(queued),
        rec,
        "GET must show what the kill answered"
    );
    d.kill(queued).assert_error(409, "Process is already idle.");

    // Bodies: absent or any object; a non-object is 400.
    let kill_path = format!("/processes/{blocker}/signals/kill");
    for body in ["[]", "5", r#""stop""#, "null"] {
        let r = d.post(&kill_path, body);
        assert_eq!(r.status, 400, "kill body {body:?}: {r}");
        r.assert_json_content_type();
        assert!(r.json()["error"].as_str().is_some(), "{r}");
    }
    d.post(&kill_path, "{").assert_error(400, MALFORMED);
    assert_eq!(d.record(blocker)["state"].as_str(), Some("running"));

    // running → terminating at once; the group is still alive.
    let r = d.post(&kill_path, r#"{"reason":"ignored"}"#);
    assert_eq!(r.status, 200, "{r}");
    let rec = r.json();
    assert_eq!(rec["state"].as_str(), Some("terminating"), "{rec}");
    assert_eq!(rec["pid"].as_i64(), Some(pid as i64), "{rec}");
    assert!(rec["exitState"].is_null(), "{rec}");
    d.kill(blocker)
        .assert_error(409, "Process is already terminating.");
    let rec = d.record(blocker);
    assert_eq!(rec["state"].as_str(), Some("terminating"), "{rec}");
    assert!(
        !group_members(pid).is_empty(),
        "the shell waiting for release must still be alive"
    );
    d.run(blocker, r#"{"force":true}"#)
        .assert_error(409, "Process must be idle to accept a run signal.");
    d.delete(&format!("/processes/{blocker}"))
        .assert_error(409, "Process must be idle before it can be deleted.");

    fs::write(&release, "").unwrap();
    let rec = d.wait_idle(blocker);
    assert_group_gone(pid);
    assert_eq!(
        rec["exitState"].as_str(),
        Some("canceled"),
        "a kill is canceled even on exit 0: {rec}"
    );
    assert!(rec["error"].is_null() && rec["pid"].is_null(), "{rec}");
    d.kill(blocker)
        .assert_error(409, "Process is already idle.");

    let never = d.create_with("echo x", r#""autorun":false"#);
    d.kill(never).assert_error(409, "Process is already idle.");
    assert_eq!(
        d.record(queued)["exitState"].as_str(),
        Some("canceled"),
        "the canceled queued process must never have run"
    );
    assert_eq!(d.stdout_text(queued), "");
}

#[test]
fn delete_contract() {
    let mut d = Daemon::options().env("CYRNEL_MAX_RUNNING", "1").start();
    let running = d.create_code("sleep 300");
    d.wait_running_pid(running);
    let queued = d.create_code("echo q");
    assert_eq!(d.record(queued)["state"].as_str(), Some("queued"));
    let must_be_idle = "Process must be idle before it can be deleted.";
    d.delete(&format!("/processes/{running}"))
        .assert_error(409, must_be_idle);
    d.delete(&format!("/processes/{queued}"))
        .assert_error(409, must_be_idle);
    assert_eq!(d.kill(queued).status, 200);
    assert_eq!(d.kill(running).status, 200);
    d.wait_idle(running);

    let id = d.create_code("echo bye");
    d.wait_idle(id);
    let before = d.record(id);
    let r = d.delete(&format!("/processes/{id}"));
    assert_eq!(r.status, 200, "{r}");
    r.assert_json_content_type();
    assert_eq!(r.json(), before, "DELETE answers the record as it was");

    for (method, suffix, body) in ID_ENDPOINTS {
        let path = format!("/processes/{id}{suffix}");
        d.request(method, &path, body.map(str::as_bytes))
            .assert_error(404, NOT_FOUND);
    }
    assert_eq!(d.list_ids(""), vec![queued, running]);
    // Nothing of the run is left on disk: its folder went when it settled.
    assert!(!d.data_dir().join("run").join(id.to_string()).exists());

    // Deletion is durable.
    d.kill9();
    d.restart_same_dir();
    d.get(&format!("/processes/{id}"))
        .assert_error(404, NOT_FOUND);
    assert_eq!(d.list_ids(""), vec![queued, running]);
}

// ---------------------------------------------------------------------------
// Routing and authentication
// ---------------------------------------------------------------------------

#[test]
fn unknown_paths_are_404() {
    let d = Daemon::start();
    let id = d.create_with("echo x", r#""autorun":false"#);
    for (method, path) in [
        ("GET", "/".to_string()),
        ("GET", "/nope".to_string()),
        ("POST", "/nope".to_string()),
        ("GET", "/processesx".to_string()),
        ("GET", "/health/x".to_string()),
        ("GET", format!("/processes/{id}/nope")),
        ("GET", format!("/processes/{id}/signals")),
        ("POST", format!("/processes/{id}/signals/nope")),
        ("GET", format!("/processes/{id}/code/x")),
    ] {
        d.request(method, &path, None)
            .assert_error(404, "Not found.");
    }
}

#[test]
fn wrong_methods_are_405_with_allow() {
    let d = Daemon::start();
    let id = d.create_with("echo x", r#""autorun":false"#);
    let p = format!("/processes/{id}");
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("PUT", "/processes".into(), &["GET", "POST"]),
        ("DELETE", "/processes".into(), &["GET", "POST"]),
        ("PATCH", p.clone(), &["DELETE", "GET"]),
        ("POST", p.clone(), &["DELETE", "GET"]),
        ("PUT", format!("{p}/code"), &["GET"]),
        ("POST", format!("{p}/output"), &["GET"]),
        ("DELETE", format!("{p}/stdout"), &["GET"]),
        ("POST", format!("{p}/stderr"), &["GET"]),
        ("POST", "/health".into(), &["GET"]),
        ("GET", format!("{p}/signals/run"), &["POST"]),
        ("DELETE", format!("{p}/signals/kill"), &["POST"]),
    ];
    for (method, path, allow) in &cases {
        let r = d.request(method, path, None);
        r.assert_error(405, "Method not allowed.");
        assert_eq!(
            r.allow(),
            allow.to_vec(),
            "{method} {path}: Allow header: {r}"
        );
    }
    let rec = d.record(id);
    assert!(
        rec["state"].as_str() == Some("idle") && rec["exitState"].is_null(),
        "405s must change nothing: {rec}"
    );
}

#[test]
fn api_key_is_required_on_every_route_but_health() {
    let key = "s3cret-key";
    let d = Daemon::options().api_key(key).start();
    let id = d.create_with("echo x", r#""autorun":false"#);
    let before = d.record(id);

    let routes: Vec<(&str, String, Option<&str>)> = vec![
        ("GET", "/processes".into(), None),
        ("POST", "/processes".into(), Some(r#"{"code":"echo no"}"#)),
        ("GET", format!("/processes/{id}"), None),
        ("DELETE", format!("/processes/{id}"), None),
        ("GET", format!("/processes/{id}/code"), None),
        ("GET", format!("/processes/{id}/output"), None),
        ("GET", format!("/processes/{id}/stdout"), None),
        ("GET", format!("/processes/{id}/stderr"), None),
        ("POST", format!("/processes/{id}/signals/run"), Some("{}")),
        ("POST", format!("/processes/{id}/signals/kill"), None),
        ("GET", "/processes/abc".into(), None),
        ("GET", "/nope".into(), None),
        ("PUT", "/processes".into(), None),
    ];
    let bad_headers: Vec<Option<String>> = vec![
        None,
        Some("Bearer wrong".into()),
        Some(format!("Bearer {}", &key[..key.len() - 1])),
        Some(format!("Bearer {key}x")),
        Some(format!("Basic {key}")),
        Some(key.to_string()),
        Some("Bearer".into()),
        Some("Bearer ".into()),
    ];
    for (method, path, body) in &routes {
        for header in &bad_headers {
            let headers: Vec<(&str, &str)> = header
                .iter()
                .map(|h| ("Authorization", h.as_str()))
                .collect();
            let r = d.raw(method, path, &headers, body.map(str::as_bytes));
            assert_eq!(r.status, 401, "{method} {path} with {header:?}: {r}");
            r.assert_error(401, "Unauthorized");
        }
    }
    assert_eq!(
        d.list_ids(""),
        vec![id],
        "unauthorized calls must change nothing"
    );
    assert_eq!(
        d.record(id),
        before,
        "unauthorized calls must change nothing"
    );

    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {key}");
        let r = d.raw("GET", "/processes", &[("Authorization", &auth)], None);
        assert_eq!(r.status, 200, "scheme {scheme:?} must be accepted: {r}");
    }
    let auth = format!("Bearer {key}");
    let with_key = [("Authorization", auth.as_str())];
    d.raw("GET", "/nope", &with_key, None)
        .assert_error(404, "Not found.");
    let r = d.raw("PUT", "/processes", &with_key, None);
    r.assert_error(405, "Method not allowed.");
    d.raw("GET", "/processes/abc", &with_key, None)
        .assert_error(400, BAD_ID);
}

#[test]
fn without_api_key_no_auth_is_needed() {
    let d = Daemon::start();
    let r = d.raw("GET", "/processes", &[], None);
    assert_eq!(r.status, 200, "{r}");
    let r = d.raw(
        "GET",
        "/processes",
        &[("Authorization", "Bearer anything")],
        None,
    );
    assert_eq!(r.status, 200, "an unneeded header must be harmless: {r}");
    let r = d.raw(
        "POST",
        "/processes",
        &[],
        Some(br#"{"code":"echo x","autorun":false}"#),
    );
    assert_eq!(r.status, 201, "{r}");
}
