//! SIGHUP reloads the configuration file: a new API key and new rate
//! limits take effect for the next request, the log level changes, running
//! processes are not touched, and an invalid file is logged and ignored
//! (the old key stays). A key that needs a restart keeps its running value
//! and the reload's log line names it.
//! The key comes from the file (not `CYRNEL_API_KEY`, which would win over
//! it), so these tests send their own `Authorization` headers.

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::*;

/// A config file the test rewrites between reloads.
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> ConfigFile {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cyrneld.toml");
        let file = ConfigFile { _dir: dir, path };
        file.write(text);
        file
    }

    /// Replaces the file atomically, so a reload never reads half of it.
    /// Mode 0600: a file that holds api_key must not be readable by others.
    fn write(&self, text: &str) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.path.with_extension("tmp");
        fs::write(&tmp, text).expect("write config");
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).expect("chmod config");
        fs::rename(&tmp, &self.path).expect("rename config");
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("utf-8 path")
    }
}

fn start(config: &ConfigFile) -> Daemon {
    Daemon::options().arg("--config").arg(config.path()).start()
}

fn bearer(key: &str) -> (String, String) {
    ("Authorization".to_string(), format!("Bearer {key}"))
}

/// GET `path` with `key` (or no Authorization header); the status.
fn status_with(d: &Daemon, path: &str, key: Option<&str>) -> u16 {
    let auth = key.map(bearer);
    let headers: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    d.raw("GET", path, &headers, None).status
}

fn hup(d: &Daemon) {
    send_signal("HUP", d.pid() as i32);
}

/// Waits until requests with `key` pass and requests with `old` get 401.
#[track_caller]
fn wait_key_in_force(d: &Daemon, key: Option<&str>, old: &str) {
    poll(&format!("key {key:?} to replace {old:?}"), || {
        let new_status = status_with(d, "/processes", key);
        let old_status = status_with(d, "/processes", Some(old));
        if new_status == 200 && old_status == 401 {
            Ok(())
        } else {
            Err(format!("new key: {new_status}, old key: {old_status}"))
        }
    })
}

/// Creates, with `key`, a process that runs until `marker` exists.
fn create_waiting(d: &Daemon, key: &str, marker: &Path) -> i64 {
    let code = format!(
        "while [ ! -e {} ]; do sleep 0.01; done; echo done",
        sq(marker)
    );
    let body = format!(r#"{{"code":{},"options":{{"timeout":null}}}}"#, js(&code));
    let auth = bearer(key);
    let r = d.raw(
        "POST",
        "/processes",
        &[(auth.0.as_str(), auth.1.as_str())],
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 201, "create: {r}");
    r.json()["id"].as_i64().expect("id")
}

fn record_with(d: &Daemon, key: &str, id: i64) -> Json {
    let auth = bearer(key);
    let r = d.raw(
        "GET",
        &format!("/processes/{id}"),
        &[(auth.0.as_str(), auth.1.as_str())],
        None,
    );
    assert_eq!(r.status, 200, "GET /processes/{id}: {r}");
    r.json()
}

#[test]
fn new_api_key_takes_effect_and_running_processes_keep_running() {
    let config = ConfigFile::new("api_key = \"old-key\"\n");
    let mut d = start(&config);
    assert_eq!(status_with(&d, "/processes", Some("old-key")), 200);
    assert_eq!(status_with(&d, "/processes", Some("new-key")), 401);
    assert_eq!(status_with(&d, "/processes", None), 401);

    let markers = marker_dir();
    let release = markers.path().join("release");
    let id = create_waiting(&d, "old-key", &release);
    let pid = poll("the process to run", || {
        let rec = record_with(&d, "old-key", id);
        match (rec["state"].as_str(), rec["pid"].as_i64()) {
            (Some("running"), Some(pid)) => Ok(pid as i32),
            _ => Err(rec.to_string()),
        }
    });

    config.write("api_key = \"new-key\"\n");
    hup(&d);
    wait_key_in_force(&d, Some("new-key"), "old-key");
    wait_log_count(&d, "configuration reloaded", 1);
    assert_eq!(status_with(&d, "/processes", None), 401);
    // /health never needs a key, before or after.
    assert_eq!(status_with(&d, "/health", None), 200);

    // The reload touched neither the daemon nor its process.
    assert!(d.has_exited().is_none(), "SIGHUP stopped the daemon");
    let rec = record_with(&d, "new-key", id);
    assert_eq!(rec["state"].as_str(), Some("running"), "{rec}");
    assert_eq!(rec["pid"].as_i64(), Some(pid as i64), "{rec}");
    assert!(is_alive(pid), "the process died across the reload");

    // It goes on to finish normally.
    fs::write(&release, "").expect("write marker");
    let rec = poll("the process to finish", || {
        let rec = record_with(&d, "new-key", id);
        if rec["state"].as_str() == Some("idle") {
            Ok(rec)
        } else {
            Err(rec.to_string())
        }
    });
    assert_eq!(rec["exitState"].as_str(), Some("success"), "{rec}");
    assert_eq!(rec["exitCode"].as_i64(), Some(0), "{rec}");

    // Removing the key (loopback listener) turns authentication off.
    config.write("# no api_key\n");
    hup(&d);
    poll("requests without a key to pass", || {
        match status_with(&d, "/processes", None) {
            200 => Ok(()),
            other => Err(other.to_string()),
        }
    });
    d.stop_gracefully();
}

#[test]
fn invalid_config_on_reload_keeps_the_old_key() {
    let config = ConfigFile::new("api_key = \"old-key\"\n");
    let mut d = start(&config);
    let markers = marker_dir();
    let release = markers.path().join("release");
    let id = create_waiting(&d, "old-key", &release);

    let invalid = [
        "api_key = \"new-key\"\nmax_running = \"many\"\n", // wrong type
        "api_key = \"new-key\"\nno_such_key = 1\n",        // unknown key
        "api_key = \"new-key\n",                           // not TOML
        "api_key = \" \"\n",                               // empty key
    ];
    for (n, text) in invalid.iter().enumerate() {
        config.write(text);
        hup(&d);
        wait_log_count(&d, "configuration reload failed", n + 1);
        assert_eq!(
            status_with(&d, "/processes", Some("old-key")),
            200,
            "the old key must stay after reloading {text:?}"
        );
        assert_eq!(status_with(&d, "/processes", Some("new-key")), 401);
    }
    // A missing file fails the same way.
    fs::remove_file(&config.path).expect("remove config");
    hup(&d);
    wait_log_count(&d, "configuration reload failed", invalid.len() + 1);
    assert_eq!(status_with(&d, "/processes", Some("old-key")), 200);

    assert!(
        d.has_exited().is_none(),
        "a failed reload stopped the daemon"
    );
    assert_eq!(
        record_with(&d, "old-key", id)["state"].as_str(),
        Some("running")
    );

    // After the failures, a valid file is applied.
    config.write("api_key = \"new-key\"\n");
    hup(&d);
    wait_key_in_force(&d, Some("new-key"), "old-key");
    fs::write(&release, "").expect("write marker");
    d.stop_gracefully();
}

#[test]
fn rate_limits_are_reloaded() {
    // The harness turns the per-route limits off through the environment
    // (which wins over the file); the limit over all routes is the file's.
    let config = ConfigFile::new("# no limits\n");
    let mut d = start(&config);
    for _ in 0..5 {
        assert_eq!(status_with(&d, "/processes", None), 200);
    }
    config.write("rate_limit_max = 2\nrate_limit_window_ms = 60000\n");
    hup(&d);
    wait_log_count(&d, "configuration reloaded", 1);
    // Within a few requests of the reload the new limit answers 429.
    poll("a 429 under the reloaded limit", || {
        match status_with(&d, "/processes", None) {
            429 => Ok(()),
            other => Err(other.to_string()),
        }
    });
    // And removing it again lets requests through at once.
    config.write("# no limits\n");
    hup(&d);
    poll(
        "requests to pass once the limit is removed",
        || match status_with(&d, "/processes", None) {
            200 => Ok(()),
            other => Err(other.to_string()),
        },
    );
    d.stop_gracefully();
}

#[test]
fn log_level_is_reloaded() {
    let config = ConfigFile::new("log_level = \"info\"\n");
    let mut d = start(&config);
    // The API logs each request (with its path) at debug level only.
    assert_eq!(status_with(&d, "/processes/999001", None), 404);
    config.write("log_level = \"debug\"\n");
    hup(&d);
    wait_log_count(&d, "configuration reloaded", 1);
    if std::env::var_os("RUST_LOG").is_some() {
        // RUST_LOG (inherited from whoever runs the tests) wins over
        // log_level, at start and on reload, and the daemon says so.
        wait_log_count(&d, "RUST_LOG is set", 1);
    } else {
        poll("a debug line for a request after the reload", || {
            assert_eq!(status_with(&d, "/processes/999002", None), 404);
            let logs = d.logs();
            if logs.contains("/processes/999002") {
                Ok(())
            } else {
                Err(logs)
            }
        });
        let logs = d.logs();
        assert!(
            !logs.contains("/processes/999001"),
            "a debug line was logged before the reload:\n{logs}"
        );
    }
    d.stop_gracefully();
}

#[test]
fn restart_keys_keep_their_value_and_the_reload_names_them() {
    let config = ConfigFile::new("max_body_bytes = 1024\n");
    let mut d = start(&config);
    let body = format!(r#"{{"code":"{}","autorun":false}}"#, "x".repeat(2000));
    d.post("/processes", &body)
        .assert_error(413, "Request body is too large.");

    config.write("max_body_bytes = 4096\nrate_limit_max = 1000\n");
    hup(&d);
    wait_log_count(&d, "configuration reloaded", 1);
    let logs = d.logs();
    assert!(
        logs.contains(r#"applied=["rate_limit_max"]"#),
        "the reload must apply rate_limit_max:\n{logs}"
    );
    assert!(
        logs.contains(r#"restart_needed=["max_body_bytes"]"#),
        "the reload must name max_body_bytes as needing a restart:\n{logs}"
    );
    // The running limit stays until a restart.
    d.post("/processes", &body)
        .assert_error(413, "Request body is too large.");
    assert!(d.list_ids("").is_empty(), "a 413 must not create a record");
    d.stop_gracefully();
}
