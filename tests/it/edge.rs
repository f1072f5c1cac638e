//! The HTTP edge under hostile and broken clients: rate limits (per client
//! address, with their headers and exact 429), slowloris and oversized
//! requests on raw sockets, many idle connections, admission control of
//! the queue, resource limits and user switching of children (observed from
//! inside them), a bounded fork bomb, and the API key from a file.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::FromRawFd;

use crate::support::*;

/// A response read from a raw socket until the server closes it.
struct Raw {
    status: u16,
    head: String,
    body: String,
}

impl Raw {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

fn read_all(mut s: TcpStream) -> Raw {
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).expect("read response");
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Raw {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// Connects to the daemon from a chosen loopback source address.
fn connect_from(src: [u8; 4], port: u16) -> TcpStream {
    // SAFETY: socket(2) returns a new descriptor that nothing else owns,
    // so TcpStream::from_raw_fd becomes its only owner; bind(2) and
    // connect(2) read `len` bytes from sockaddr_in values that live on this
    // stack frame for the whole call, and `len` is their size. All-zero
    // bytes are a valid sockaddr_in (plain integers).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let mut local: libc::sockaddr_in = std::mem::zeroed();
        local.sin_family = libc::AF_INET as libc::sa_family_t;
        local.sin_addr.s_addr = u32::from_ne_bytes(src);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(
            libc::bind(fd, &local as *const _ as *const libc::sockaddr, len),
            0,
            "bind"
        );
        let mut remote: libc::sockaddr_in = std::mem::zeroed();
        remote.sin_family = libc::AF_INET as libc::sa_family_t;
        remote.sin_port = port.to_be();
        remote.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        assert_eq!(
            libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len),
            0,
            "connect"
        );
        TcpStream::from_raw_fd(fd)
    }
}

fn post_from(src: [u8; 4], port: u16, path: &str, body: &str) -> Raw {
    let mut s = connect_from(src, port);
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    read_all(s)
}

#[test]
fn create_is_rate_limited_per_client_with_headers_and_exact_429() {
    let d = Daemon::options()
        .env("CYRNEL_RATE_LIMIT_CREATE_PER_MIN", "3")
        .start();
    let body = r#"{"code":"true","autorun":false}"#;
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let r = post_from([127, 0, 0, 1], d.port(), "/processes", body);
        assert_eq!(r.status, 201, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-limit").as_deref(), Some("3"));
        remaining.push(r.header("x-ratelimit-remaining").unwrap());
        let reset: u64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert!(reset > 1_700_000_000, "reset is Unix seconds: {reset}");
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let r = post_from([127, 0, 0, 1], d.port(), "/processes", body);
    assert_eq!(r.status, 429, "{}", r.body);
    let s: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&s), "{s}");
    assert_eq!(
        r.body,
        format!(
            r#"{{"error":"rate_limit_exceeded","message":"Too many requests. Try again in {s} seconds.","retryAfter":{s}}}"#
        )
    );
    assert_eq!(r.header("x-ratelimit-remaining").as_deref(), Some("0"));
    // Another client address has its own budget.
    let other = post_from([127, 0, 0, 2], d.port(), "/processes", body);
    assert_eq!(other.status, 201, "{}", other.body);
    assert_eq!(other.header("x-ratelimit-remaining").as_deref(), Some("2"));
    // The rejected request created nothing.
    assert_eq!(d.list_ids("").len(), 4);
    // Other routes are not limited by the create budget.
    assert_eq!(
        post_from([127, 0, 0, 1], d.port(), "/processes/1/signals/run", "{}").status,
        200
    );
}

#[test]
fn kill_and_run_limits_and_zero_disables() {
    let d = Daemon::options()
        .env("CYRNEL_RATE_LIMIT_KILL_PER_MIN", "1")
        .env("CYRNEL_RATE_LIMIT_RUN_PER_MIN", "0")
        .start();
    let id = d.create_with("true", r#""autorun":false"#);
    // run limit 0: unlimited and no headers.
    for _ in 0..5 {
        let r = d.run(id, r#"{"force":true}"#);
        assert!(r.status == 200 || r.status == 409, "{r}");
        assert_eq!(r.header("x-ratelimit-limit"), None);
    }
    d.wait_idle(id);
    let first = d.kill(id);
    assert_eq!(first.status, 409, "{first}");
    assert_eq!(first.header("x-ratelimit-remaining"), Some("0"));
    let second = d.kill(id);
    assert_eq!(second.status, 429, "{second}");
}

#[test]
fn a_global_window_resets() {
    let d = Daemon::options()
        .env("CYRNEL_RATE_LIMIT_MAX", "2")
        .env("CYRNEL_RATE_LIMIT_WINDOW_MS", "500")
        .start();
    // Exhaust the window (health is never limited).
    let reset_of = |r: &Response| {
        r.header("x-ratelimit-reset")
            .unwrap()
            .parse::<u64>()
            .unwrap()
    };
    let mut first_reset = 0;
    poll("a window to be exhausted", || {
        let r = d.get("/processes");
        if r.status == 429 {
            first_reset = reset_of(&r);
            Ok(())
        } else {
            Err(format!("{}", r.status))
        }
    });
    assert_eq!(d.get("/health").status, 200);
    // A later window admits requests again.
    let r = poll("the next window", || {
        let r = d.get("/processes");
        if r.status == 200 {
            Ok(r)
        } else {
            Err(format!("{}", r.status))
        }
    });
    assert!(reset_of(&r) >= first_reset);
}

#[test]
fn slowloris_is_dropped_while_others_are_served() {
    let d = Daemon::options()
        .env("CYRNEL_HEADER_READ_TIMEOUT_MS", "300")
        .start();
    let mut slow = TcpStream::connect(("127.0.0.1", d.port())).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: 1")
        .unwrap();
    // A normal client is served meanwhile.
    assert_eq!(d.get("/health").status, 200);
    // The slow client is cut off: the server closes its connection.
    slow.set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .unwrap();
    poll("the slow connection to be closed", || {
        let mut b = [0u8; 1024];
        match slow.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(_) => Ok(()), // an error response, then close
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    });
}

#[test]
fn oversized_headers_uris_and_bodies_are_refused() {
    let d = Daemon::options()
        .env("CYRNEL_MAX_BODY_BYTES", "4096")
        .start();
    let mut s = TcpStream::connect(("127.0.0.1", d.port())).unwrap();
    let big = "a".repeat(64 * 1024);
    let _ = write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(read_all(s).status, 431);

    let uri = format!("/processes?x={}", "b".repeat(9000));
    let r = d.get(&uri);
    r.assert_error(414, "URI is too long.");

    // A chunked body with no length is cut off while streaming.
    let mut s = TcpStream::connect(("127.0.0.1", d.port())).unwrap();
    write!(s, "POST /processes HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n").unwrap();
    let chunk = "c".repeat(1024);
    for _ in 0..8 {
        if write!(s, "400\r\n{chunk}\r\n").is_err() {
            break;
        }
    }
    let _ = write!(s, "0\r\n\r\n");
    let r = read_all(s);
    assert_eq!(r.status, 413, "{}", r.head);
    assert_eq!(r.body, r#"{"error":"Request body is too large."}"#);
    assert_eq!(d.get("/health").status, 200);
}

#[test]
fn a_thousand_idle_connections_do_not_stop_a_normal_client() {
    // This test process needs ~1000 descriptors too.
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    setrlimit(Resource::RLIMIT_NOFILE, hard.min(65536), hard).expect("setrlimit");
    let d = Daemon::start();
    let idle: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(("127.0.0.1", d.port())).expect("connect"))
        .collect();
    let r = d.get("/health");
    assert_eq!(r.status, 200);
    let id = d.create_code("echo ok");
    d.wait_idle(id);
    drop(idle);
    assert_eq!(d.stdout_text(id), "ok\n");
}

#[test]
fn the_queue_is_bounded() {
    let d = Daemon::options()
        .env("CYRNEL_MAX_RUNNING", "1")
        .env("CYRNEL_MAX_QUEUED", "2")
        .start();
    let blocker = d.create_with("sleep 300", r#""options":{"timeout":null}"#);
    d.wait_running_pid(blocker);
    d.create_code("true");
    d.create_code("true");
    d.post("/processes", r#"{"code":"true"}"#)
        .assert_error(429, "Too many queued processes.");
    // Not queued: allowed.
    assert_eq!(
        d.post("/processes", r#"{"code":"true","autorun":false}"#)
            .status,
        201
    );
    assert_eq!(d.list_ids("").len(), 4);
    d.kill(blocker);
}

#[test]
fn resource_limits_are_set_before_exec() {
    let d = Daemon::options()
        .env("CYRNEL_RLIMIT_NOFILE", "100")
        .env("CYRNEL_RLIMIT_CORE", "0")
        .env("CYRNEL_RLIMIT_CPU", "77")
        .start();
    let id = d.create_code("ulimit -n; ulimit -c; ulimit -t");
    let rec = d.wait_idle(id);
    assert_eq!(rec["exitState"].as_str(), Some("success"), "{rec}");
    assert_eq!(d.stdout_text(id), "100\n0\n77\n");
}

fn uid_of(name: &str) -> String {
    let out = std::process::Command::new("id")
        .args(["-u", name])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn children_run_as_the_configured_user_without_supplementary_groups() {
    let d = Daemon::options().env("CYRNEL_USER", "nobody").start();
    let code = "id -u; id -G; echo '{\"me\":1}' >> \"$CYRNEL_OUTPUT\"; pwd > /dev/null";
    let id = d.create_code(code);
    let rec = d.wait_idle(id);
    assert_eq!(
        rec["exitState"].as_str(),
        Some("success"),
        "{rec}: {}",
        d.stderr_text(id)
    );
    let gid_out = std::process::Command::new("id")
        .args(["-g", "nobody"])
        .output()
        .unwrap();
    let gid = String::from_utf8(gid_out.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(d.stdout_text(id), format!("{}\n{gid}\n", uid_of("nobody")));
    assert_eq!(d.output_json(id), json(r#"{"me":1}"#));
    // The database stays private.
    let db = fs::metadata(d.data_dir().join("db")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(db.permissions().mode() & 0o777, 0o700);
}

#[test]
fn a_bounded_fork_bomb_is_contained_and_killed() {
    let d = Daemon::options()
        .env("CYRNEL_USER", "nobody")
        .env("CYRNEL_RLIMIT_NPROC", "40")
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "0")
        .start();
    let m = marker_dir();
    let marker = m.path().join("done");
    let code = format!(
        "i=0; while [ $i -lt 200 ]; do (sleep 300 &) 2>/dev/null; i=$((i+1)); done; : > {}; sleep 300",
        sq(&marker)
    );
    let id = d.create_code(&code);
    wait_for_file(&marker);
    let alive = alive_of_run(&d, id).len();
    assert!(
        alive <= 40,
        "nproc 40 must bound the run, found {alive} processes"
    );
    assert_eq!(d.get("/health").status, 200);
    d.kill(id);
    d.wait_idle(id);
    assert_eq!(alive_of_run(&d, id), Vec::<i32>::new());
}

#[test]
fn the_api_key_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    fs::write(&file, "s3cret\n").unwrap();
    // Owner-only, or the daemon refuses it.
    fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let d = Daemon::options()
        .env("CYRNEL_API_KEY_FILE", file.to_str().unwrap())
        .start();
    assert_eq!(d.get("/processes").status, 401);
    let r = d.raw(
        "GET",
        "/processes",
        &[("Authorization", "Bearer s3cret")],
        None,
    );
    assert_eq!(r.status, 200, "{r}");
    assert!(!d.logs().contains("s3cret"), "the key must not be logged");
}

#[test]
fn pids_max_is_enforced_where_delegated_and_reported_where_not() {
    let d = Daemon::options()
        .env("CYRNEL_PIDS_MAX", "20")
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "0")
        .start();
    let m = marker_dir();
    let marker = m.path().join("done");
    let code = format!(
        "i=0; while [ $i -lt 100 ]; do (sleep 300 &) 2>/dev/null; i=$((i+1)); done; : > {}; sleep 300",
        sq(&marker)
    );
    let id = d.create_code(&code);
    wait_for_file(&marker);
    let alive = alive_of_run(&d, id).len();
    if d.logs()
        .contains("not enforced: the pids cgroup controller is not delegated")
    {
        // Reported, and true: this host's cgroup v2 root offers no pids
        // controller to delegate.
        let offered = fs::read_to_string("/sys/fs/cgroup/unified/cgroup.subtree_control")
            .or_else(|_| fs::read_to_string("/sys/fs/cgroup/cgroup.subtree_control"))
            .unwrap_or_default();
        assert!(
            !offered.split_whitespace().any(|c| c == "pids"),
            "pids is delegated but was reported missing"
        );
        assert!(
            alive > 20,
            "without the controller nothing bounds the run ({alive})"
        );
    } else {
        assert!(alive <= 20, "pids.max 20 must bound the run, found {alive}");
    }
    d.kill(id);
    d.wait_idle(id);
    assert_eq!(alive_of_run(&d, id), Vec::<i32>::new());
}

#[test]
fn idle_keep_alive_connections_are_closed() {
    let d = Daemon::options()
        .env("CYRNEL_HEADER_READ_TIMEOUT_MS", "300")
        .start();
    let mut s = TcpStream::connect(("127.0.0.1", d.port())).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .unwrap();
    let mut got = Vec::new();
    // The answer arrives, then (idle) the server closes the connection.
    poll("the idle keep-alive connection to be closed", || {
        let mut b = [0u8; 1024];
        match s.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(n) => {
                got.extend_from_slice(&b[..n]);
                Err("answer read, still open".into())
            }
            Err(e) => Err(e.to_string()),
        }
    });
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200 OK"));
}
