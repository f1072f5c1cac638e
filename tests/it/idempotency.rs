//! `Idempotency-Key` on create, against the real daemon: a repeat answers
//! what the first answered and starts nothing; a different request with the
//! same key is refused; concurrent repeats make one process; keys survive a
//! graceful restart and a `kill -9`; bad keys change nothing.

use std::fs;
use std::sync::{Arc, Barrier};

use crate::support::*;

fn post_keyed(d: &Daemon, key: &str, body: &str) -> Response {
    d.raw(
        "POST",
        "/processes",
        &[
            ("Idempotency-Key", key),
            ("Content-Type", "application/json"),
        ],
        Some(body.as_bytes()),
    )
}

/// Code that appends a line to `file` each time it runs.
fn counting_body(file: &std::path::Path, extra: &str) -> String {
    format!(
        r#"{{"code":{}{extra}}}"#,
        js(&format!("umask 0; echo ran >> {}", sq(file)))
    )
}

fn runs_of(file: &std::path::Path) -> usize {
    fs::read_to_string(file).unwrap_or_default().lines().count()
}

#[test]
fn a_repeat_answers_the_first_answer_and_starts_nothing() {
    let d = Daemon::start();
    let markers = marker_dir();
    let file = markers.path().join("runs");
    let body = counting_body(&file, r#","ref":"job-1""#);
    let first = post_keyed(&d, "order-42", &body);
    assert_eq!(first.status, 201, "{first}");
    let id = first.json()["id"].as_i64().unwrap();
    d.wait_idle(id);
    // The same request spelled differently: other key order and spacing.
    let v: Json = json(&body);
    let respelled = format!("{{ \"ref\" : {} ,\n \"code\": {} }}", v["ref"], v["code"]);
    for again in [body.as_str(), respelled.as_str()] {
        let r = post_keyed(&d, "order-42", again);
        assert_eq!(r.status, 201, "{r}");
        assert_eq!(r.text(), first.text(), "the first answer, byte for byte");
    }
    assert_eq!(d.list_ids(""), vec![id], "one record");
    assert_eq!(runs_of(&file), 1, "it ran once");
    // A different request with the same key changes nothing.
    let other = counting_body(&file, r#","ref":"job-2""#);
    post_keyed(&d, "order-42", &other).assert_error(
        409,
        "Idempotency-Key was already used with a different request.",
    );
    assert_eq!(d.list_ids(""), vec![id]);
    // Another key is another create.
    let r = post_keyed(&d, "order-43", &body);
    assert_eq!(r.status, 201, "{r}");
    assert_ne!(r.json()["id"].as_i64().unwrap(), id);
}

#[test]
fn concurrent_repeats_create_exactly_one_process() {
    let d = Arc::new(Daemon::start());
    let markers = marker_dir();
    let file = markers.path().join("runs");
    let body = Arc::new(counting_body(&file, ""));
    let n = 16;
    let barrier = Arc::new(Barrier::new(n));
    let answers: Vec<Response> = (0..n)
        .map(|_| {
            let (d, body, barrier) = (d.clone(), body.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                post_keyed(&d, "same-moment", &body)
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for r in &answers {
        assert_eq!(r.status, 201, "{r}");
        assert_eq!(r.text(), answers[0].text(), "one id for every repeat");
    }
    let id = answers[0].json()["id"].as_i64().unwrap();
    d.wait_idle(id);
    assert_eq!(d.list_ids(""), vec![id], "exactly one process");
    assert_eq!(runs_of(&file), 1, "it ran once");
}

#[test]
fn keys_survive_a_restart_and_a_crash() {
    let mut d = Daemon::start();
    let body = r#"{"code":"exit 0"}"#;
    let first = post_keyed(&d, "before-restart", body);
    assert_eq!(first.status, 201, "{first}");
    let id = first.json()["id"].as_i64().unwrap();
    d.wait_idle(id);
    d.stop_gracefully();
    d.restart_same_dir();
    assert_eq!(post_keyed(&d, "before-restart", body).text(), first.text());
    // Answered 201 just before a kill -9: the claim was in the same synced
    // write as the record.
    let crashed = post_keyed(&d, "before-crash", body);
    assert_eq!(crashed.status, 201, "{crashed}");
    d.kill9();
    d.restart_same_dir();
    assert_eq!(post_keyed(&d, "before-crash", body).text(), crashed.text());
    post_keyed(&d, "before-crash", r#"{"code":"exit 1"}"#).assert_error(
        409,
        "Idempotency-Key was already used with a different request.",
    );
    assert_eq!(d.list_ids("").len(), 2);
}

#[test]
fn bad_keys_are_refused_and_change_nothing() {
    let d = Daemon::start();
    let body = br#"{"code":"exit 0"}"#;
    let msg = "Header 'Idempotency-Key' must be 1 to 255 visible ASCII characters.";
    let long = "k".repeat(256);
    for key in ["", "has space", "tab\there", "caf\u{e9}", long.as_str()] {
        let r = d.raw(
            "POST",
            "/processes",
            &[("Idempotency-Key", key)],
            Some(body),
        );
        r.assert_error(400, msg);
    }
    let twice = d.raw(
        "POST",
        "/processes",
        &[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        Some(body),
    );
    twice.assert_error(400, msg);
    assert!(d.list_ids("").is_empty(), "nothing was created");
    // 255 visible characters are a key.
    let longest = "~".repeat(255);
    let r = d.raw(
        "POST",
        "/processes",
        &[("Idempotency-Key", &longest)],
        Some(body),
    );
    assert_eq!(r.status, 201, "{r}");
}

#[test]
fn a_key_is_free_again_after_the_retention_window() {
    let d = Daemon::options()
        .env("CYRNEL_IDEMPOTENCY_RETENTION_S", "1")
        .start();
    let first = post_keyed(&d, "short-lived", r#"{"code":"exit 0"}"#);
    assert_eq!(first.status, 201, "{first}");
    // Until the window has passed a different request is refused; then the
    // key makes a new process.
    let second = poll("the key to expire", || {
        let r = post_keyed(&d, "short-lived", r#"{"code":"exit 1"}"#);
        match r.status {
            201 => Ok(r),
            409 => Err(r.to_string()),
            _ => panic!("unexpected answer: {r}"),
        }
    });
    assert_ne!(second.text(), first.text());
    assert_eq!(d.list_ids("").len(), 2);
}
