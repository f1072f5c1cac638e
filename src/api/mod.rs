//! The HTTP API: the only module that knows HTTP and JSON.
//!
//! hyper 1 over hyper-util's tokio glue; one function ([`route`]) maps a
//! request to a handler, one ([`error_response`]) maps supervisor errors to
//! statuses. Reads go straight to the store, which holds only durable
//! state; changes go through the supervisor.

pub mod backup;
pub mod ratelimit;
pub mod wire;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use crate::config::RateLimits;
use ratelimit::{Bucket, Limit, Limiter, Verdict};
use std::sync::RwLock;

use crate::events::Hub;
use crate::model::{Change, ExitState, Filter, Idempotency, ProcessId, Record, State, Stream};
use crate::store::{Store, StoreError};
use crate::supervisor::machine::Reject;
use crate::supervisor::{Supervisor, SupervisorError};
use wire::{parse_create, parse_run, record_json, Invalid, NOT_AN_OBJECT};

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How long in-flight requests get to finish once the server stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes per chunk of a streamed list.
const LIST_CHUNK: usize = 64 * 1024;
/// The OpenAPI document of the API as built, checked into the repository
/// (`openapi.json`) and served at `GET /openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// Header carrying the bytes dropped past `max_output_bytes`.
pub const DROPPED_HEADER: &str = "x-cyrnel-dropped-bytes";

/// What every handler may use.
pub struct ApiState {
    pub store: Store,
    pub supervisor: Supervisor,
    pub api_key: ApiKey,
    pub max_body_bytes: u64,
    pub hub: Arc<Hub>,
    /// Interval of `: keep-alive` comments on event streams.
    pub heartbeat: Duration,
    pub limiter: Limiter,
    /// Replaceable at run time (configuration reload).
    pub rate_limits: RwLock<RateLimits>,
    pub http: HttpLimits,
    /// `GET /metrics`.
    pub metrics: crate::metrics::Metrics,
    /// `POST /handover`, `GET /handover`.
    pub handover: Arc<crate::handover::Control>,
}

/// Connection hygiene settings.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
}

/// The bearer token every route but `/health` requires (none: no auth).
/// Replaceable while the server runs, so that a configuration reload
/// (SIGHUP) takes effect for the next request without a restart. A read
/// lock held for one comparison per request; a reload is the only writer.
#[derive(Default)]
pub struct ApiKey(RwLock<Option<Arc<str>>>);

impl ApiKey {
    pub fn new(key: Option<String>) -> Self {
        Self(RwLock::new(key.map(Arc::from)))
    }

    /// The key in force now.
    pub fn get(&self) -> Option<Arc<str>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the key; requests that already passed auth are unaffected.
    pub fn set(&self, key: Option<String>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = key.map(Arc::from);
    }
}

/// Serves until `shutdown` resolves, then lets in-flight requests finish
/// (bounded by DRAIN_TIMEOUT).
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(state.http.max_connections));
    tokio::pin!(shutdown);
    loop {
        // At most max_connections at once: further clients wait in the
        // kernel's listen backlog instead of costing memory here.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = &mut shutdown => break,
        };
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors and the like: back off briefly
                        // instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let http = state.http;
                let state = state.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(handle(&state, req, peer).await) }
                });
                // The header timeout also ends idle keep-alive connections
                // (hyper starts it when it waits for the next request head).
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(http.header_read_timeout)
                    .max_buf_size(http.max_header_bytes)
                    .serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    drop(permit);
                });
            }
            _ = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish in time");
    }
}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(status, "application/json", body)
}

fn text(body: impl Into<Bytes>) -> Response<Body> {
    respond(StatusCode::OK, "text/plain; charset=utf-8", body)
}

fn error(status: StatusCode, message: &str) -> Response<Body> {
    json(
        status,
        serde_json::to_vec(&serde_json::json!({ "error": message })).expect("json"),
    )
}

fn bad_request(m: Invalid) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, m.0)
}

/// The one mapping from supervisor errors to HTTP.
fn error_response(e: SupervisorError) -> Response<Body> {
    let status = match &e {
        SupervisorError::NotFound => StatusCode::NOT_FOUND,
        SupervisorError::Rejected(Reject::HasOutputs) => StatusCode::BAD_REQUEST,
        SupervisorError::Rejected(Reject::Stale) => StatusCode::INTERNAL_SERVER_ERROR,
        SupervisorError::Rejected(_) => StatusCode::CONFLICT,
        SupervisorError::ShuttingDown | SupervisorError::Gone => StatusCode::SERVICE_UNAVAILABLE,
        SupervisorError::TooManyQueued => StatusCode::TOO_MANY_REQUESTS,
        SupervisorError::IdempotencyConflict => StatusCode::CONFLICT,
        SupervisorError::SignalFailed => StatusCode::INTERNAL_SERVER_ERROR,
        SupervisorError::Storage(StoreError::Full) => StatusCode::INSUFFICIENT_STORAGE,
        SupervisorError::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
    };
    let message = match &e {
        SupervisorError::Gone => "Service is shutting down.".to_string(),
        SupervisorError::Storage(StoreError::Full) => "Storage is full.".to_string(),
        SupervisorError::Storage(inner) => format!("Storage is unavailable: {inner}"),
        other => other.to_string(),
    };
    error(status, &message)
}

fn store_error(e: impl std::fmt::Display) -> Response<Body> {
    tracing::error!(error = %e, "storage read failed");
    error(
        StatusCode::SERVICE_UNAVAILABLE,
        &format!("Storage is unavailable: {e}"),
    )
}

/// Routes of the API, by path shape.
enum Route<'a> {
    Health,
    OpenApi,
    Events,
    Processes,
    ProcessEvents(&'a str),
    Process(&'a str),
    Code(&'a str),
    Output(&'a str),
    Stdout(&'a str),
    Stderr(&'a str),
    Run(&'a str),
    Kill(&'a str),
    Backup,
    Metrics,
    Handover,
}

fn route(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix('/')?;
    if rest.split('/').any(str::is_empty) {
        return None;
    }
    let mut parts = rest.split('/');
    let r = match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("health"), None, ..) => Route::Health,
        (Some("openapi.json"), None, ..) => Route::OpenApi,
        (Some("events"), None, ..) => Route::Events,
        (Some("backup"), None, ..) => Route::Backup,
        (Some("metrics"), None, ..) => Route::Metrics,
        (Some("handover"), None, ..) => Route::Handover,
        (Some("processes"), Some(id), Some("events"), None, _) => Route::ProcessEvents(id),
        (Some("processes"), None, ..) => Route::Processes,
        (Some("processes"), Some(id), None, ..) => Route::Process(id),
        (Some("processes"), Some(id), Some("code"), None, _) => Route::Code(id),
        (Some("processes"), Some(id), Some("output"), None, _) => Route::Output(id),
        (Some("processes"), Some(id), Some("stdout"), None, _) => Route::Stdout(id),
        (Some("processes"), Some(id), Some("stderr"), None, _) => Route::Stderr(id),
        (Some("processes"), Some(id), Some("signals"), Some("run"), None) => Route::Run(id),
        (Some("processes"), Some(id), Some("signals"), Some("kill"), None) => Route::Kill(id),
        _ => return None,
    };
    Some(r)
}

impl Route<'_> {
    /// The methods a route answers, as the `Allow` header lists them.
    fn allowed(&self) -> &'static [&'static str] {
        match self {
            Route::Health
            | Route::OpenApi
            | Route::Metrics
            | Route::Events
            | Route::ProcessEvents(_)
            | Route::Code(_)
            | Route::Output(_)
            | Route::Stdout(_)
            | Route::Stderr(_) => &["GET"],
            Route::Processes | Route::Handover => &["GET", "POST"],
            Route::Process(_) => &["GET", "DELETE"],
            Route::Run(_) | Route::Kill(_) | Route::Backup => &["POST"],
        }
    }

    /// The route's path template (a metrics label: no ids).
    fn template(&self) -> &'static str {
        match self {
            Route::Health => "/health",
            Route::OpenApi => "/openapi.json",
            Route::Metrics => "/metrics",
            Route::Events => "/events",
            Route::Processes => "/processes",
            Route::ProcessEvents(_) => "/processes/{id}/events",
            Route::Process(_) => "/processes/{id}",
            Route::Code(_) => "/processes/{id}/code",
            Route::Output(_) => "/processes/{id}/output",
            Route::Stdout(_) => "/processes/{id}/stdout",
            Route::Stderr(_) => "/processes/{id}/stderr",
            Route::Run(_) => "/processes/{id}/signals/run",
            Route::Kill(_) => "/processes/{id}/signals/kill",
            Route::Backup => "/backup",
            Route::Handover => "/handover",
        }
    }

    fn id(&self) -> Option<&str> {
        match self {
            Route::Health
            | Route::OpenApi
            | Route::Metrics
            | Route::Events
            | Route::Processes
            | Route::Backup
            | Route::Handover => None,
            Route::ProcessEvents(id)
            | Route::Process(id)
            | Route::Code(id)
            | Route::Output(id)
            | Route::Stdout(id)
            | Route::Stderr(id)
            | Route::Run(id)
            | Route::Kill(id) => Some(id),
        }
    }
}

/// Compares without an early exit so timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn authorized(req: &Request<Incoming>, key: &str) -> bool {
    let Some(value) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, token)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(token.trim().as_bytes(), key.as_bytes())
}

async fn handle(state: &ApiState, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = dispatch(state, req, peer).await;
    tracing::debug!(%peer, %method, %path, status = resp.status().as_u16(), "request");
    resp
}

async fn dispatch(state: &ApiState, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    if req.uri().to_string().len() > state.http.max_uri_bytes {
        return error(StatusCode::URI_TOO_LONG, "URI is too long.");
    }
    let path = req.uri().path().to_string();
    let route = route(&path);
    let is_health = matches!(route, Some(Route::Health));
    if !is_health {
        if let Some(key) = state.api_key.get() {
            if !authorized(&req, &key) {
                return error(StatusCode::UNAUTHORIZED, "Unauthorized");
            }
        }
    }
    let Some(route) = route else {
        return error(StatusCode::NOT_FOUND, "Not found.");
    };
    let allowed = route.allowed();
    if !allowed.contains(&req.method().as_str()) {
        let allow = allowed.join(", ");
        let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.");
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_str(&allow).expect("ascii"));
        return r;
    }
    let limited = rate_limit(state, &route, req.method(), peer);
    if let Some(v) = limited.filter(|v| v.retry_after.is_some()) {
        // Only the methods a route allows get here: a fixed set of labels.
        let method = allowed
            .iter()
            .find(|m| **m == req.method().as_str())
            .copied()
            .unwrap_or("other");
        state.metrics.rate_limited(method, route.template());
        return rate_limited(v);
    }
    let mut resp = route_request(state, req, route).await;
    if let Some(v) = limited {
        add_rate_headers(&mut resp, &v);
    }
    resp
}

/// Counts the request against the limits that apply to it; returns the
/// most restrictive verdict (a rejection first, else the fewest left).
fn rate_limit(
    state: &ApiState,
    route: &Route<'_>,
    method: &Method,
    peer: SocketAddr,
) -> Option<Verdict> {
    let limits = *state.rate_limits.read().expect("rate limits");
    let per_min = |max| Limit {
        max,
        window_ms: 60_000,
    };
    let bucket = match (route, method) {
        (Route::Processes, &Method::POST) => Some((Bucket::Create, per_min(limits.create_per_min))),
        (Route::Run(_), _) => Some((Bucket::Run, per_min(limits.run_per_min))),
        (Route::Kill(_), _) => Some((Bucket::Kill, per_min(limits.kill_per_min))),
        _ => None,
    };
    let global = (!matches!(route, Route::Health)).then_some((
        Bucket::Global,
        Limit {
            max: limits.global_max,
            window_ms: limits.global_window_ms,
        },
    ));
    let ip = peer.ip().to_canonical();
    [bucket, global]
        .into_iter()
        .flatten()
        .filter_map(|(b, l)| state.limiter.check(ip, b, l))
        .min_by_key(|v| (v.retry_after.is_none(), v.remaining))
}

fn add_rate_headers(resp: &mut Response<Body>, v: &Verdict) {
    let h = resp.headers_mut();
    h.insert("x-ratelimit-limit", HeaderValue::from(v.limit));
    h.insert("x-ratelimit-remaining", HeaderValue::from(v.remaining));
    h.insert("x-ratelimit-reset", HeaderValue::from(v.reset));
}

/// 429 with the contract's body and `Retry-After`.
fn rate_limited(v: Verdict) -> Response<Body> {
    let s = v.retry_after.unwrap_or(1);
    let body = serde_json::json!({
        "error": "rate_limit_exceeded",
        "message": format!("Too many requests. Try again in {s} seconds."),
        "retryAfter": s,
    });
    let mut r = json(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::to_vec(&body).expect("json"),
    );
    add_rate_headers(&mut r, &v);
    r.headers_mut().insert("retry-after", HeaderValue::from(s));
    r
}

async fn route_request(
    state: &ApiState,
    req: Request<Incoming>,
    route: Route<'_>,
) -> Response<Body> {
    let id = match route.id().map(ProcessId::parse) {
        Some(None) => return bad_request(Invalid("Field 'id' must be a positive integer.")),
        Some(Some(id)) => Some(id),
        None => None,
    };
    let method = req.method().clone();
    match (route, id) {
        (Route::Health, _) => json(StatusCode::OK, r#"{"status":"ok"}"#),
        (Route::OpenApi, _) => json(StatusCode::OK, OPENAPI),
        (Route::Metrics, _) => {
            let format = metrics_format(req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()));
            respond(
                StatusCode::OK,
                format.content_type(),
                state.metrics.render(format),
            )
        }
        (Route::Processes, _) if method == Method::POST => create(state, req).await,
        (Route::Processes, _) => list(state, req.uri().query().unwrap_or("")).await,
        (Route::Process(_), Some(id)) if method == Method::DELETE => {
            reply_record(state.supervisor.delete(id).await)
        }
        (Route::Process(_), Some(id)) => {
            with_record(state, id, |r| json(StatusCode::OK, record_json(&r)))
        }
        (Route::Code(_), Some(id)) => code(state, id),
        (Route::Output(_), Some(id)) => output(state, id),
        (Route::Stdout(_), Some(id)) => stream(state, id, Stream::Stdout, req.uri().query()),
        (Route::Stderr(_), Some(id)) => stream(state, id, Stream::Stderr, req.uri().query()),
        (Route::Events, _) => events(state, &req, None),
        (Route::ProcessEvents(_), Some(id)) => events(state, &req, Some(id)),
        (Route::Run(_), Some(id)) => run(state, id, req).await,
        (Route::Kill(_), Some(id)) => kill(state, id, req).await,
        (Route::Backup, _) => match read_json(state, req).await {
            Ok(body) => backup::backup(state, body).await,
            Err(r) => r,
        },
        (Route::Handover, _) if method == Method::POST => handover(state).await,
        (Route::Handover, _) => json(
            StatusCode::OK,
            wire::handover_status(&state.handover.status(), std::process::id()),
        ),
        _ => error(StatusCode::NOT_FOUND, "Not found."),
    }
}

/// `POST /handover`: 202 once the binary on disk passed the preflight (the
/// daemon then re-executes itself, keeping every run and this socket), 409
/// with the reason when it did not.
async fn handover(state: &ApiState) -> Response<Body> {
    match state.handover.request().await {
        Ok(binary) => json(
            StatusCode::ACCEPTED,
            wire::handover_started(&binary, std::process::id()),
        ),
        Err(e) => error(StatusCode::CONFLICT, &format!("Handover refused: {e}.")),
    }
}

/// OpenMetrics when the client prefers it (Prometheus asks for it first),
/// else the Prometheus text format (curl, `promtool check metrics`, older
/// scrapers): the q-values of `application/openmetrics-text` and of
/// `text/plain` (or a wildcard covering it) decide, ties going to OpenMetrics.
fn metrics_format(accept: Option<&str>) -> crate::metrics::Format {
    use crate::metrics::Format;
    let (mut open, mut text) = (0.0f32, 0.0f32);
    for range in accept.unwrap_or("").split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => open = open.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    if open > 0.0 && open >= text {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

fn reply_record(r: Result<Record, SupervisorError>) -> Response<Body> {
    match r {
        Ok(rec) => json(StatusCode::OK, record_json(&rec)),
        Err(e) => error_response(e),
    }
}

fn with_record(
    state: &ApiState,
    id: ProcessId,
    f: impl FnOnce(Record) -> Response<Body>,
) -> Response<Body> {
    match state.store.get(id) {
        Ok(Some(r)) => f(r),
        Ok(None) => error_response(SupervisorError::NotFound),
        Err(e) => store_error(e),
    }
}

/// Reads the body within `max_body_bytes`. `Ok(None)` for an empty body.
async fn read_json(
    state: &ApiState,
    req: Request<Incoming>,
) -> Result<Option<Value>, Response<Body>> {
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, "Request body is too large.");
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > state.max_body_bytes) {
        return Err(too_large());
    }
    let limited = Limited::new(req.into_body(), state.max_body_bytes as usize);
    let bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            return Err(too_large())
        }
        Err(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "Could not read the request body.",
            ))
        }
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|_| error(StatusCode::BAD_REQUEST, "Malformed JSON in request body."))
}

/// The `Idempotency-Key` header: absent, or 1–255 visible ASCII
/// characters, once.
fn idempotency_key(req: &Request<Incoming>) -> Result<Option<String>, Invalid> {
    let mut values = req.headers().get_all("idempotency-key").iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let bytes = value.as_bytes();
    let visible = |b: &u8| (0x21..=0x7e).contains(b);
    if values.next().is_some()
        || bytes.is_empty()
        || bytes.len() > 255
        || !bytes.iter().all(visible)
    {
        return Err(Invalid(
            "Header 'Idempotency-Key' must be 1 to 255 visible ASCII characters.",
        ));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

async fn create(state: &ApiState, req: Request<Incoming>) -> Response<Body> {
    if state.supervisor.is_shutting_down() {
        return error_response(SupervisorError::ShuttingDown);
    }
    let key = match idempotency_key(&req) {
        Ok(k) => k,
        Err(m) => return bad_request(m),
    };
    let body = match read_json(state, req).await {
        Ok(Some(v)) => v,
        Ok(None) => return bad_request(NOT_AN_OBJECT),
        Err(r) => return r,
    };
    let mut request = match parse_create(&body) {
        Ok(r) => r,
        Err(m) => return bad_request(m),
    };
    request.idempotency = key.map(|key| Idempotency {
        fingerprint: wire::fingerprint("POST", "/processes", &body),
        key,
    });
    match state.supervisor.create(request).await {
        Ok(id) => json(StatusCode::CREATED, format!("{{\"id\":{id}}}")),
        Err(e) => error_response(e),
    }
}

async fn run(state: &ApiState, id: ProcessId, req: Request<Incoming>) -> Response<Body> {
    let body = match read_json(state, req).await {
        Ok(Some(v)) => v,
        Ok(None) => return bad_request(NOT_AN_OBJECT),
        Err(r) => return r,
    };
    match parse_run(&body) {
        Ok(force) => reply_record(state.supervisor.run(id, force).await),
        Err(m) => bad_request(m),
    }
}

async fn kill(state: &ApiState, id: ProcessId, req: Request<Incoming>) -> Response<Body> {
    match read_json(state, req).await {
        Ok(None) => {}
        Ok(Some(Value::Object(_))) => {}
        Ok(Some(_)) => return bad_request(NOT_AN_OBJECT),
        Err(r) => return r,
    }
    reply_record(state.supervisor.kill(id).await)
}

fn code(state: &ApiState, id: ProcessId) -> Response<Body> {
    match state.store.code(id) {
        Ok(Some(c)) => text(c),
        Ok(None) => error_response(SupervisorError::NotFound),
        Err(e) => store_error(e),
    }
}

const NOT_YET: &str = "Process output is not yet available.";

fn output(state: &ApiState, id: ProcessId) -> Response<Body> {
    with_record(state, id, |r| {
        if r.state != State::Idle {
            return error(StatusCode::CONFLICT, NOT_YET);
        }
        match state.store.output(id) {
            Ok(Some(o)) => json(StatusCode::OK, o),
            Ok(None) => json(StatusCode::OK, "{}"),
            Err(e) => store_error(e),
        }
    })
}

fn stream(state: &ApiState, id: ProcessId, which: Stream, query: Option<&str>) -> Response<Body> {
    let mut follow = false;
    for (k, v) in query_pairs(query.unwrap_or("")) {
        if k == "follow" {
            follow = match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return bad_request(Invalid(
                        "Invalid value for 'follow': must be true or false.",
                    ))
                }
            };
        }
    }
    if follow {
        return with_record(state, id, |_| follow_stream(state, id, which));
    }
    with_record(state, id, |r| {
        if r.state != State::Idle {
            return error(StatusCode::CONFLICT, NOT_YET);
        }
        let dropped = match which {
            Stream::Stdout => r.stdout_dropped,
            Stream::Stderr => r.stderr_dropped,
        };
        match state.store.stream(id, which) {
            Ok(bytes) => {
                let mut resp = text(bytes);
                resp.headers_mut()
                    .insert(DROPPED_HEADER, HeaderValue::from(dropped));
                resp
            }
            Err(e) => store_error(e),
        }
    })
}

/// Filters of `GET /processes`.
struct ListQuery {
    filter: Filter,
    limit: Option<usize>,
    cursor: Option<ProcessId>,
}

fn parse_list_query(query: &str) -> Result<ListQuery, Invalid> {
    let mut q = ListQuery {
        filter: Filter::default(),
        limit: None,
        cursor: None,
    };
    for (k, v) in query_pairs(query) {
        match k.as_str() {
            "state" => {
                q.filter.state = Some(State::parse(&v).ok_or(Invalid(
                    "Invalid value for 'state': must be one of queued, running, idle, terminating.",
                ))?)
            }
            "status" => {
                q.filter.status = Some(if v == "null" {
                    None
                } else {
                    Some(ExitState::parse(&v).ok_or(Invalid(
                        "Invalid value for 'status': must be one of success, failed, timeout, canceled, null.",
                    ))?)
                })
            }
            "ref" => {
                let t = v.trim();
                if t.is_empty() {
                    return Err(Invalid("Invalid value for 'ref': must not be empty."));
                }
                q.filter.r#ref = Some(t.to_string());
            }
            "limit" => {
                q.limit = Some(
                    v.parse::<usize>()
                        .ok()
                        .filter(|n| (1..=1000).contains(n) && v.bytes().all(|b| b.is_ascii_digit()))
                        .ok_or(Invalid(
                            "Invalid value for 'limit': must be an integer between 1 and 1000.",
                        ))?,
                )
            }
            "cursor" => {
                q.cursor = Some(ProcessId::parse(&v).ok_or(Invalid("Invalid value for 'cursor'."))?)
            }
            _ => {}
        }
    }
    Ok(q)
}

/// Decoded query parameters; the first occurrence of a name wins.
fn query_pairs(query: &str) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::new();
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16)
                {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn list(state: &ApiState, query: &str) -> Response<Body> {
    let q = match parse_list_query(query) {
        Ok(q) => q,
        Err(m) => return bad_request(m),
    };
    let store = state.store.clone();
    match q.limit {
        Some(limit) => {
            let page = tokio::task::spawn_blocking(move || {
                let mut items = Vec::with_capacity(limit.min(128));
                let mut more = false;
                store
                    .scan_matching(&q.filter, q.cursor, |r| {
                        if items.len() == limit {
                            more = true;
                            return false;
                        }
                        items.push(r);
                        true
                    })
                    .map(|_| (items, more))
            })
            .await;
            match page {
                Ok(Ok((items, more))) => {
                    let next = items.last().filter(|_| more).map(|r| r.id);
                    let mut body = b"{\"processes\":[".to_vec();
                    for (i, r) in items.iter().enumerate() {
                        if i > 0 {
                            body.push(b',');
                        }
                        body.extend_from_slice(&record_json(r));
                    }
                    match next {
                        Some(id) => body
                            .extend_from_slice(format!("],\"nextCursor\":\"{id}\"}}").as_bytes()),
                        None => body.extend_from_slice(b"],\"nextCursor\":null}"),
                    }
                    json(StatusCode::OK, body)
                }
                Ok(Err(e)) => store_error(e),
                Err(e) => store_error(e),
            }
        }
        None => stream_list(store, q),
    }
}

/// Streams every match, newest first, in chunks: memory stays flat however
/// many records exist. A storage error mid-stream aborts the response.
fn stream_list(store: Store, q: ListQuery) -> Response<Body> {
    let (tx, resp) = channel_body("application/json");
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(LIST_CHUNK + 1024);
        buf.extend_from_slice(b"{\"processes\":[");
        let mut first = true;
        let mut open = true;
        let res = store.scan_matching(&q.filter, q.cursor, |r| {
            if !first {
                buf.push(b',');
            }
            first = false;
            buf.extend_from_slice(&record_json(&r));
            if buf.len() >= LIST_CHUNK {
                let chunk = Bytes::from(std::mem::replace(
                    &mut buf,
                    Vec::with_capacity(LIST_CHUNK + 1024),
                ));
                open = tx.blocking_send(chunk).is_ok();
            }
            open
        });
        match res {
            Ok(()) if open => {
                buf.extend_from_slice(b"]}");
                let _ = tx.blocking_send(Bytes::from(buf));
            }
            Ok(()) => {}
            // The body ends without its closing "]}": the client gets a
            // document that does not parse, never a short valid list.
            Err(e) => tracing::error!(error = %e, "listing failed mid-stream"),
        }
    });
    resp
}

/// A response body fed by a task through a small bounded channel: the
/// producer waits for the client, so memory per stream stays bounded.
fn channel_body(content_type: &'static str) -> (mpsc::Sender<Bytes>, Response<Body>) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let frames = futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|item| item.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    let mut r = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames)));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    (tx, r)
}

/// Bytes read from the store per step of a follow stream.
const FOLLOW_CHUNK: usize = 64 * 1024;

/// `?follow=true`: what is stored, then new bytes as they arrive, until the
/// run settles. Offsets make the seam exact: each step reads from the byte
/// after the last one sent. The record is read before the bytes, so once
/// it says idle the bytes read after it are complete (a run's bytes are
/// written before its idle transition).
fn follow_stream(state: &ApiState, id: ProcessId, which: Stream) -> Response<Body> {
    let (tx, resp) = channel_body("text/plain; charset=utf-8");
    let store = state.store.clone();
    let hub = state.hub.clone();
    tokio::spawn(async move {
        let mut changes = hub.watch_output(id);
        let mut pos = 0u64;
        // The run being followed, once it has started.
        let mut followed: Option<u64> = None;
        let mut closing = false;
        loop {
            let Ok(Some(rec)) = store.get(id) else { return };
            match (followed, rec.started_at) {
                // A newer run replaced the one we followed: it has ended.
                (Some(a), Some(b)) if a != b => return,
                (None, Some(b)) => followed = Some(b),
                _ => {}
            }
            let settled = rec.state == State::Idle;
            loop {
                let (s, p) = (store.clone(), pos);
                let chunk =
                    tokio::task::spawn_blocking(move || s.stream_from(id, which, p, FOLLOW_CHUNK))
                        .await;
                let Ok(Ok(chunk)) = chunk else { return };
                if chunk.is_empty() {
                    break;
                }
                pos += chunk.len() as u64;
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return; // the client went away
                }
            }
            if settled || closing {
                return;
            }
            tokio::select! {
                _ = changes.changed() => {}
                // One more pass sends what arrived before the close.
                _ = hub.closed() => closing = true,
                _ = tx.closed() => return,
            }
        }
    });
    resp
}

/// Events replayed from the store per step.
const REPLAY_PAGE: usize = 256;

fn sse_frame(c: &Change) -> Bytes {
    let mut out = format!("id: {}\nevent: {}\ndata: ", c.seq, c.kind.name()).into_bytes();
    out.extend_from_slice(&record_json(&c.record));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// `GET /events` and `GET /processes/{id}/events`: Server-Sent Events.
///
/// The live subscription is taken before history is read, and every event
/// at or below the last id sent is skipped, so the seam between replay and
/// live has neither gap nor duplicate. A client that falls `event_buffer`
/// events behind is disconnected and resumes with `Last-Event-ID`.
fn events(state: &ApiState, req: &Request<Incoming>, only: Option<ProcessId>) -> Response<Body> {
    let mut since: Option<u64> = None;
    if let Some(v) = req.headers().get("last-event-id") {
        match v.to_str().ok().and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) => since = Some(n),
            None => {
                return bad_request(Invalid(
                    "Invalid value for 'Last-Event-ID': must be a non-negative integer.",
                ))
            }
        }
    }
    for (k, v) in query_pairs(req.uri().query().unwrap_or("")) {
        if k == "since" {
            match v.parse::<u64>() {
                // The header, when present, wins over the parameter.
                Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => since = since.or(Some(n)),
                _ => {
                    return bad_request(Invalid(
                        "Invalid value for 'since': must be a non-negative integer.",
                    ))
                }
            }
        }
    }
    if let Some(id) = only {
        match state.store.get(id) {
            Ok(Some(_)) => {}
            Ok(None) => return error_response(SupervisorError::NotFound),
            Err(e) => return store_error(e),
        }
    }
    let (tx, resp) = channel_body("text/event-stream");
    let store = state.store.clone();
    let hub = state.hub.clone();
    let heartbeat = state.heartbeat;
    let mut live = hub.subscribe();
    tokio::spawn(async move {
        let wanted = |c: &Change| only.is_none_or(|id| c.record.id == id);
        let Ok(last_seq) = store.last_seq() else {
            return;
        };
        let mut last = last_seq;
        if let Some(since) = since {
            let Ok(first) = store.first_seq() else { return };
            // Events after `since` that are gone: trimmed, or never written
            // by this data dir (an id from the future).
            let lost = since > last_seq || first.map_or(since < last_seq, |f| since + 1 < f);
            if lost {
                let reset = format!(
                    "id: {last_seq}\nevent: reset\ndata: {{\"error\":\"Events after {since} are no longer retained; re-read /processes.\",\"lastEventId\":{last_seq}}}\n\n"
                );
                if tx.send(Bytes::from(reset)).await.is_err() {
                    return;
                }
            } else {
                last = since;
                loop {
                    let (s, after) = (store.clone(), last);
                    let page =
                        tokio::task::spawn_blocking(move || s.changes_after(after, REPLAY_PAGE))
                            .await;
                    let Ok(Ok(page)) = page else { return };
                    if page.is_empty() {
                        break;
                    }
                    for c in page {
                        last = c.seq;
                        if wanted(&c) && tx.send(sse_frame(&c)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
        loop {
            let frame = tokio::select! {
                // Events already published go out before a close is
                // honoured: a shutdown's final transitions are delivered.
                biased;
                got = live.recv() => match got {
                    Ok(c) if c.seq > last => {
                        last = c.seq;
                        if !wanted(&c) {
                            continue;
                        }
                        sse_frame(&c)
                    }
                    Ok(_) => continue,
                    // Too far behind (or the hub is gone): end the stream;
                    // the client resumes from its last id.
                    Err(_) => return,
                },
                _ = tick.tick() => Bytes::from_static(b": keep-alive\n\n"),
                _ = hub.closed() => return,
            };
            if tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_shape() {
        assert!(matches!(route("/health"), Some(Route::Health)));
        assert!(matches!(route("/processes"), Some(Route::Processes)));
        assert!(matches!(route("/processes/7"), Some(Route::Process("7"))));
        assert!(matches!(
            route("/processes/x/stdout"),
            Some(Route::Stdout("x"))
        ));
        assert!(matches!(
            route("/processes/1/signals/kill"),
            Some(Route::Kill("1"))
        ));
        for bad in [
            "/",
            "",
            "/processes/",
            "/processes/1/",
            "/processes/1/signals",
            "/processes/1/signals/stop",
            "/health/x",
            "/processes/1/code/x",
        ] {
            assert!(route(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn list_query_validation() {
        assert!(
            parse_list_query("state=running&status=null&ref=%20a%20&limit=10&cursor=5").is_ok()
        );
        let q = parse_list_query("ref=a+b").unwrap();
        assert_eq!(q.filter.r#ref.as_deref(), Some("a b"));
        assert_eq!(
            parse_list_query("state=done").err().unwrap().0,
            "Invalid value for 'state': must be one of queued, running, idle, terminating."
        );
        assert_eq!(
            parse_list_query("status=x").err().unwrap().0,
            "Invalid value for 'status': must be one of success, failed, timeout, canceled, null."
        );
        for l in ["0", "1001", "a", "+5", ""] {
            assert!(parse_list_query(&format!("limit={l}")).is_err(), "{l}");
        }
        assert!(parse_list_query("cursor=0").is_err());
        assert!(parse_list_query("ref=%20").is_err());
        assert_eq!(percent_decode("%41%zz%"), "A%zz%");
    }

    #[test]
    fn metrics_format_follows_the_accept_header() {
        use crate::metrics::Format::{OpenMetrics, Text};
        // What Prometheus 2.x and 3.x send.
        for prometheus in [
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.5,*/*;q=0.1",
        ] {
            assert_eq!(metrics_format(Some(prometheus)), OpenMetrics, "{prometheus}");
        }
        for (accept, want) in [
            (None, Text),
            (Some("*/*"), Text),
            (Some("text/plain"), Text),
            (Some("application/openmetrics-text"), OpenMetrics),
            (
                Some("text/plain, application/openmetrics-text; q=0.5"),
                Text,
            ),
            (Some("application/openmetrics-text; q=0"), Text),
            (Some("application/json"), Text),
        ] {
            assert_eq!(metrics_format(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn constant_time_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
