//! The HTTP client behind `cyrnelctl`: it turns calls such as
//! [`Client::create`] or [`Client::kill`] into requests to a `cyrneld`
//! (hyper 1, one connection per request), decodes the answers into the shared
//! wire types of [`crate::api::wire`], reads streamed bodies chunk by chunk
//! and parses Server-Sent Events, reconnecting with `Last-Event-ID` when the
//! daemon closes an event stream. Every failure is a [`ClientError`].
//!
//! It knows only the HTTP contract: nothing of the supervisor, the store or
//! the domain model (a daemon may be another version or another host), and
//! nothing of terminals, output formats or exit codes, which belong to the
//! binary.

pub use crate::model::Timeout;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;

use crate::api::wire::{Created, ErrorBody, ProcessJson, ProcessList};

/// A Process record owned by the caller.
pub type Process = ProcessJson<'static>;

/// How long establishing a TCP connection may take: an unroutable host
/// otherwise hangs for the kernel's minutes-long SYN retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause before reopening an event stream that ended without
/// delivering anything, doubled up to `MAX_REOPEN_DELAY`, so that a daemon
/// that keeps closing streams at once is not hammered.
const FIRST_REOPEN_DELAY: Duration = Duration::from_millis(100);
const MAX_REOPEN_DELAY: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The `--url` or API key cannot be used.
    #[error("{0}")]
    Config(String),
    /// No TCP connection to the daemon.
    #[error("cannot connect to {url}: {}", io_reason(.source))]
    Connect {
        url: String,
        #[source]
        source: io::Error,
    },
    /// The daemon answered with an error status.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    /// The connection broke during an exchange.
    #[error("connection to {url} failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: hyper::Error,
    },
    /// The daemon answered something this client does not understand.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

impl ClientError {
    /// Whether the daemon could not be reached at all.
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect { .. })
    }
}

/// `connection refused` rather than `Connection refused (os error 111)`.
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::TimedOut => format!("no answer within {CONNECT_TIMEOUT:?}"),
        _ => {
            let text = e.to_string();
            match text.find(" (os error") {
                Some(i) => text[..i].to_string(),
                None => text,
            }
        }
    }
}

/// What `POST /processes` needs.
#[derive(Clone, Debug)]
pub struct NewProcess {
    pub code: String,
    pub r#ref: Option<String>,
    pub timeout: Timeout,
}

/// Filters of `GET /processes`, passed through as given: the daemon
/// validates them.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub state: Option<String>,
    pub status: Option<String>,
    pub r#ref: Option<String>,
}

/// Which captured stream of a process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pipe {
    Stdout,
    Stderr,
}

impl Pipe {
    fn path(self) -> &'static str {
        match self {
            Pipe::Stdout => "stdout",
            Pipe::Stderr => "stderr",
        }
    }
}

/// A client of one daemon. Cheap to clone; holds no connection.
#[derive(Clone, Debug)]
pub struct Client {
    /// The URL as the user gave it (without a trailing slash), for messages.
    url: String,
    /// Host and port to connect to.
    host: String,
    port: u16,
    /// The `Host` header: the URL's authority.
    authority: HeaderValue,
    /// Path prefix before `/processes` (empty unless the daemon sits behind
    /// a proxy under a sub-path).
    base: String,
    /// `Bearer <key>`, marked sensitive.
    auth: Option<HeaderValue>,
}

impl Client {
    /// A client for `url` (`http://HOST[:PORT][/PREFIX]`); `api_key` is sent
    /// as `Authorization: Bearer <key>` on every request.
    pub fn new(url: &str, api_key: Option<&str>) -> Result<Client, ClientError> {
        let bad = |why: &str| ClientError::Config(format!("invalid URL {url:?}: {why}"));
        let trimmed = url.trim().trim_end_matches('/');
        let rest = if let Some(rest) = trimmed.strip_prefix("http://") {
            rest
        } else if trimmed.starts_with("https://") {
            return Err(bad("https is not supported; cyrneld speaks plain HTTP"));
        } else {
            return Err(bad("it must start with http://"));
        };
        let (authority, base) = match rest.find(['/', '?', '#']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], &rest[i..]),
            Some(_) => return Err(bad("query strings and fragments are not supported")),
            None => (rest, ""),
        };
        if base.contains(['?', '#']) {
            return Err(bad("query strings and fragments are not supported"));
        }
        if authority.contains('@') {
            return Err(bad(
                "credentials in the URL are not supported; use the API key",
            ));
        }
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("bad host or port"))?;
        let authority = HeaderValue::from_str(authority).map_err(|_| bad("bad host"))?;
        let auth = match api_key {
            Some(key) => {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                    ClientError::Config(
                        "the API key contains characters not allowed in an HTTP header".into(),
                    )
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Client {
            url: trimmed.to_string(),
            host,
            port,
            authority,
            base: base.to_string(),
            auth,
        })
    }

    /// The daemon's URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `POST /processes`; the new id.
    pub async fn create(&self, new: &NewProcess) -> Result<u64, ClientError> {
        let mut body = serde_json::json!({ "code": new.code });
        if let Some(r) = &new.r#ref {
            body["ref"] = r.as_str().into();
        }
        match new.timeout {
            Timeout::Default => {}
            Timeout::Unlimited => body["options"] = serde_json::json!({ "timeout": null }),
            Timeout::Ms(ms) => body["options"] = serde_json::json!({ "timeout": ms }),
        }
        let resp = self
            .send(Method::POST, "/processes", Some(body), &[])
            .await?;
        let created: Created = self.json(resp).await?;
        Ok(created.id)
    }

    /// `GET /processes` as the daemon sent it (`{"processes": [...]}`).
    pub async fn list_raw(&self, filter: &ListFilter) -> Result<Bytes, ClientError> {
        let mut query = String::new();
        for (key, value) in [
            ("state", &filter.state),
            ("status", &filter.status),
            ("ref", &filter.r#ref),
        ] {
            if let Some(v) = value {
                query.push(if query.is_empty() { '?' } else { '&' });
                let _ = write!(query, "{key}={}", percent_encode(v));
            }
        }
        let resp = self
            .send(Method::GET, &format!("/processes{query}"), None, &[])
            .await?;
        self.bytes(resp).await
    }

    /// `GET /processes`, newest first.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<Process>, ClientError> {
        let body = self.list_raw(filter).await?;
        let list: ProcessList<'_> = decode(&body)?;
        Ok(list
            .processes
            .into_iter()
            .map(ProcessJson::into_owned)
            .collect())
    }

    /// `GET /processes/{id}` as the daemon sent it.
    pub async fn get_raw(&self, id: u64) -> Result<Bytes, ClientError> {
        let resp = self
            .send(Method::GET, &format!("/processes/{id}"), None, &[])
            .await?;
        self.bytes(resp).await
    }

    /// `GET /processes/{id}`.
    pub async fn get(&self, id: u64) -> Result<Process, ClientError> {
        decode(&self.get_raw(id).await?)
    }

    /// `POST /processes/{id}/signals/kill`; the record after the signal.
    pub async fn kill(&self, id: u64) -> Result<Process, ClientError> {
        let path = format!("/processes/{id}/signals/kill");
        let resp = self
            .send(Method::POST, &path, Some(serde_json::json!({})), &[])
            .await?;
        self.json(resp).await
    }

    /// `POST /processes/{id}/signals/run`; the record, queued again.
    pub async fn run(&self, id: u64, force: bool) -> Result<Process, ClientError> {
        let path = format!("/processes/{id}/signals/run");
        let body = serde_json::json!({ "force": force });
        let resp = self.send(Method::POST, &path, Some(body), &[]).await?;
        self.json(resp).await
    }

    /// `DELETE /processes/{id}`; the record as it was.
    pub async fn delete(&self, id: u64) -> Result<Process, ClientError> {
        let resp = self
            .send(Method::DELETE, &format!("/processes/{id}"), None, &[])
            .await?;
        self.json(resp).await
    }

    /// `POST /backup`: the daemon writes a consistent copy of its database
    /// to `dir` (absolute, not existing yet) while it runs.
    pub async fn backup(&self, dir: &str) -> Result<crate::api::backup::BackupJson, ClientError> {
        let body = serde_json::json!({ "dir": dir });
        let resp = self.send(Method::POST, "/backup", Some(body), &[]).await?;
        self.json(resp).await
    }

    /// `POST /handover`: the daemon re-executes the binary on disk, keeping
    /// every run; answered once that binary passed the daemon's check.
    pub async fn handover(&self) -> Result<HandoverStarted, ClientError> {
        let resp = self.send(Method::POST, "/handover", None, &[]).await?;
        self.json(resp).await
    }

    /// `GET /handover`: how many handovers the daemon has been through.
    pub async fn handover_status(&self) -> Result<HandoverStatus, ClientError> {
        let resp = self.send(Method::GET, "/handover", None, &[]).await?;
        self.json(resp).await
    }

    /// `GET /processes/{id}/output`: the structured output, a JSON object,
    /// as the daemon sent it.
    pub async fn output(&self, id: u64) -> Result<Bytes, ClientError> {
        let resp = self
            .send(Method::GET, &format!("/processes/{id}/output"), None, &[])
            .await?;
        self.bytes(resp).await
    }

    /// `GET /processes/{id}/stdout` (or stderr). With `follow` the body keeps
    /// growing while the process runs and ends when its run settles.
    pub async fn stream(&self, id: u64, pipe: Pipe, follow: bool) -> Result<Chunks, ClientError> {
        let query = if follow { "?follow=true" } else { "" };
        let path = format!("/processes/{id}/{}{query}", pipe.path());
        let resp = self.send(Method::GET, &path, None, &[]).await?;
        Ok(Chunks {
            body: resp.into_body(),
            url: self.url.clone(),
        })
    }

    /// Opens one event stream: `GET /events`, or `/processes/{id}/events`
    /// when `process` is given, resuming after sequence number `after`.
    pub async fn events(
        &self,
        process: Option<u64>,
        after: Option<u64>,
    ) -> Result<EventStream, ClientError> {
        let path = match process {
            Some(id) => format!("/processes/{id}/events"),
            None => "/events".to_string(),
        };
        let accept = (ACCEPT, HeaderValue::from_static("text/event-stream"));
        let resp = match after {
            Some(n) => {
                let last = HeaderValue::from(n);
                let headers = [accept, (LAST_EVENT_ID.clone(), last)];
                self.send(Method::GET, &path, None, &headers).await?
            }
            None => self.send(Method::GET, &path, None, &[accept]).await?,
        };
        Ok(EventStream {
            chunks: Chunks {
                body: resp.into_body(),
                url: self.url.clone(),
            },
            parser: SseParser::default(),
            pending: VecDeque::new(),
        })
    }

    /// A self-reopening subscription to the events of one process (or all
    /// of them), starting after sequence number `since` (`None`: live only).
    pub fn subscribe(&self, process: Option<u64>, since: Option<u64>) -> Subscription {
        Subscription {
            client: self.clone(),
            process,
            last_id: since,
            stream: None,
            delay: FIRST_REOPEN_DELAY,
            delivered: true,
            opened: false,
        }
    }

    /// Sends one request on a fresh connection; an error status becomes
    /// [`ClientError::Api`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        headers: &[(hyper::header::HeaderName, HeaderValue)],
    ) -> Result<Response<Incoming>, ClientError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(self.connect_error(source)),
            Err(_) => return Err(self.connect_error(io::ErrorKind::TimedOut.into())),
        };
        // Small requests and a human waiting: no Nagle delay.
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.transport(e))?;
        tokio::spawn(async move {
            // Its errors surface through the request or the body as well.
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(HOST, self.authority.clone());
        if let Some(auth) = &self.auth {
            req = req.header(AUTHORIZATION, auth.clone());
        }
        for (name, value) in headers {
            req = req.header(name, value.clone());
        }
        let body = match body {
            Some(v) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Bytes::from(serde_json::to_vec(&v).expect("a JSON value serialises"))
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(body))
            .map_err(|e| ClientError::Config(format!("cannot build the request: {e}")))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.api_error(resp).await)
        }
    }

    fn connect_error(&self, source: io::Error) -> ClientError {
        ClientError::Connect {
            url: self.url.clone(),
            source,
        }
    }

    fn transport(&self, source: hyper::Error) -> ClientError {
        ClientError::Transport {
            url: self.url.clone(),
            source,
        }
    }

    /// The daemon's `{"error": ...}` message, or for rate limiting its
    /// `message`; for anything else the status' reason.
    async fn api_error(&self, resp: Response<Incoming>) -> ClientError {
        let status = resp.status();
        let body = self.bytes(resp).await.unwrap_or_default();
        let mut message = serde_json::from_slice::<ErrorBody>(&body)
            .ok()
            .map(|e| e.error);
        if message.as_deref() == Some("rate_limit_exceeded") {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                if let Some(m) = v.get("message").and_then(|m| m.as_str()) {
                    message = Some(m.to_string());
                }
            }
        }
        let message = message.unwrap_or_else(|| {
            let text = String::from_utf8_lossy(&body);
            let text = text.trim();
            if !text.is_empty() && text.len() <= 200 && !text.contains('\n') {
                text.to_string()
            } else {
                status.canonical_reason().unwrap_or("Error").to_string()
            }
        });
        ClientError::Api {
            status: status.as_u16(),
            message,
        }
    }

    async fn bytes(&self, resp: Response<Incoming>) -> Result<Bytes, ClientError> {
        resp.into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .map_err(|e| self.transport(e))
    }

    async fn json<T: DeserializeOwned>(&self, resp: Response<Incoming>) -> Result<T, ClientError> {
        decode(&self.bytes(resp).await?)
    }
}

static LAST_EVENT_ID: hyper::header::HeaderName =
    hyper::header::HeaderName::from_static("last-event-id");

fn decode<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|e| {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        ClientError::Protocol(format!("{e}: {text:?}"))
    })
}

/// `host:port`, `host`, `[v6]:port` or `[v6]`; port 80 when absent.
fn split_host_port(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return None;
    }
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
        Some(_) => return None,
        None => 80,
    };
    Some((host.to_string(), port))
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A streamed response body, read chunk by chunk.
pub struct Chunks {
    body: Incoming,
    url: String,
}

impl Chunks {
    /// The next chunk of data; `None` once the body ended.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ClientError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(source)) => {
                    return Err(ClientError::Transport {
                        url: self.url.clone(),
                        source,
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }
}

/// One Server-Sent Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The `id:` field (the daemon's sequence number), if it was a number.
    pub id: Option<u64>,
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines, joined with `\n`.
    pub data: String,
}

impl Event {
    /// The Process record carried by a state or `deleted` event.
    pub fn process(&self) -> Result<Process, ClientError> {
        decode(self.data.as_bytes())
    }
}

/// Incremental `text/event-stream` parser (the WHATWG rules: lines end in
/// LF, CRLF or CR; `:` starts a comment; a blank line dispatches).
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    /// A CR ended the last line: an LF right after it belongs to it.
    after_cr: bool,
    id: Option<String>,
    event: Option<String>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; returns the events they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        for &b in bytes {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(ev) = self.line_done(&line) {
                        events.push(ev);
                    }
                }
                _ => self.line.push(b),
            }
        }
        events
    }

    fn line_done(&mut self, line: &[u8]) -> Option<Event> {
        if line.is_empty() {
            let data = self.data.take();
            let event = self.event.take();
            let id = self.id.take();
            // An event without data is not dispatched (WHATWG).
            let data = data?;
            return Some(Event {
                id: id.and_then(|s| s.parse().ok()),
                event: event.unwrap_or_else(|| "message".to_string()),
                data,
            });
        }
        if line[0] == b':' {
            return None;
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "id" => self.id = Some(value.to_string()),
            "event" => self.event = Some(value.to_string()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_string()),
            },
            _ => {}
        }
        None
    }
}

/// One open event stream.
pub struct EventStream {
    chunks: Chunks,
    parser: SseParser,
    /// Events parsed from the last chunk, not yet returned.
    pending: VecDeque<Event>,
}

impl EventStream {
    /// The next event; `None` when the daemon closed the stream.
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            match self.chunks.next().await? {
                Some(data) => self.pending.extend(self.parser.push(&data)),
                None => return Ok(None),
            }
        }
    }
}

/// What a [`Subscription`] yields.
#[derive(Debug)]
pub enum Delivery {
    Event(Event),
    /// The stream was (re)opened: events from before the first one after
    /// this may be missing if no sequence number was known to resume from,
    /// so a caller waiting for a state should look at the record again.
    Opened,
    /// Reopening failed (the daemon is restarting or unreachable); it is
    /// tried again, with a growing pause, on the next call.
    Retrying(ClientError),
}

/// An event stream that reopens itself with `Last-Event-ID` when the daemon
/// closes it (a slow client, a restart), so that no retained event is lost
/// or repeated: the sequence numbers are persisted, so this holds across
/// daemon restarts too. The first open fails at once if the daemon cannot
/// be reached; after that, an unreachable or shutting-down daemon is
/// retried for as long as the caller keeps asking.
pub struct Subscription {
    client: Client,
    process: Option<u64>,
    last_id: Option<u64>,
    stream: Option<EventStream>,
    delay: Duration,
    /// Whether the current stream delivered an event (resets the back-off).
    delivered: bool,
    /// Whether a stream was ever opened (later failures are retried).
    opened: bool,
}

impl Subscription {
    pub async fn next(&mut self) -> Result<Delivery, ClientError> {
        loop {
            let Some(stream) = &mut self.stream else {
                if !self.delivered {
                    tokio::time::sleep(self.delay).await;
                    self.delay = (self.delay * 2).min(MAX_REOPEN_DELAY);
                }
                self.delivered = false;
                return match self.client.events(self.process, self.last_id).await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        self.opened = true;
                        Ok(Delivery::Opened)
                    }
                    Err(e) if self.opened && is_transient(&e) => Ok(Delivery::Retrying(e)),
                    Err(e) => Err(e),
                };
            };
            match stream.next().await {
                Ok(Some(ev)) => {
                    if let Some(id) = ev.id {
                        self.last_id = Some(id);
                    }
                    self.delivered = true;
                    self.delay = FIRST_REOPEN_DELAY;
                    return Ok(Delivery::Event(ev));
                }
                // Closed by the daemon, or the connection broke: reopen.
                Ok(None) | Err(ClientError::Transport { .. }) => self.stream = None,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Failures a restarting daemon causes.
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::Transport { .. } => true,
        ClientError::Api { status, .. } => *status == 503,
        ClientError::Config(_) | ClientError::Protocol(_) => false,
    }
}

/// The signal number of a wire signal name (`SIGTERM`, or `SIG<n>` for
/// signals the daemon has no name for).
pub fn signal_number(name: &str) -> Option<i32> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    if let Some(i) = NAMES.iter().position(|n| *n == name) {
        return Some(i as i32 + 1);
    }
    name.strip_prefix("SIG")?
        .parse()
        .ok()
        .filter(|n| (1..=64).contains(n))
}

/// `POST /handover`'s answer.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct HandoverStarted {
    pub binary: String,
    pub pid: u32,
}

/// `GET /handover`'s answer.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HandoverStatus {
    pub pid: u32,
    pub generation: u64,
    pub binary: String,
    pub state_version: u32,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let c = Client::new("http://127.0.0.1:9371", None).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("127.0.0.1", 9371, "")
        );
        let c = Client::new("http://localhost/api/", Some("k")).unwrap();
        assert_eq!(
            (c.host.as_str(), c.port, c.base.as_str()),
            ("localhost", 80, "/api")
        );
        assert_eq!(c.url(), "http://localhost/api");
        let c = Client::new("http://[::1]:8080", None).unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 8080));
        for bad in [
            "127.0.0.1:9371",
            "https://x",
            "http://",
            "http://h:x",
            "http://h:",
            "http://h:99999",
            "http://u:p@h",
            "http://h/?a=1",
        ] {
            assert!(
                matches!(Client::new(bad, None), Err(ClientError::Config(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            Client::new("http://h", Some("a\nb")),
            Err(ClientError::Config(_))
        ));
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("a b&c=d/é~"), "a%20b%26c%3Dd%2F%C3%A9~");
    }

    #[test]
    fn sse_events_across_chunks_and_line_endings() {
        let mut p = SseParser::default();
        assert!(p
            .push(b": keep-alive\n\nid: 3\nevent: running\nda")
            .is_empty());
        let evs = p.push(b"ta: {\"id\":1}\n\nid: 4\r\nevent: idle\r");
        assert_eq!(
            evs,
            vec![Event {
                id: Some(3),
                event: "running".into(),
                data: "{\"id\":1}".into()
            }]
        );
        let evs = p.push(b"\ndata: a\rdata:b\r\n\r\n");
        assert_eq!(
            evs,
            vec![Event {
                id: Some(4),
                event: "idle".into(),
                data: "a\nb".into()
            }]
        );
        // No data: nothing to dispatch; no event name: "message".
        assert!(p.push(b"event: x\n\n").is_empty());
        assert_eq!(p.push(b"data\n\n")[0].event, "message");
    }

    #[test]
    fn signal_numbers() {
        assert_eq!(signal_number("SIGTERM"), Some(15));
        assert_eq!(signal_number("SIGKILL"), Some(9));
        assert_eq!(signal_number("SIGHUP"), Some(1));
        assert_eq!(signal_number("SIGSYS"), Some(31));
        assert_eq!(signal_number("SIG40"), Some(40));
        assert_eq!(signal_number("TERM"), None);
        assert_eq!(signal_number("SIG0"), None);
    }

    #[test]
    fn records_outlive_their_buffer() {
        let text = r#"{"id":1,"ref":"a\"b","state":"idle","exitState":"success","error":null,"createdAt":"x","completedAt":null}"#.to_string();
        let p: ProcessJson<'_> = serde_json::from_str(&text).unwrap();
        let p = ProcessJson::into_owned(p);
        drop(text);
        assert_eq!(p.r#ref.as_deref(), Some("a\"b"));
    }
}
