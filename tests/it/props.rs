//! Property tests for the request validation and the id parser, against
//! reference models written from the contract (docs/api-contract.md):
//!
//! - `ProcessId::parse` accepts exactly the strings of ASCII digits whose
//!   value is in 1..=2^63-1 (leading zeros allowed), and every such id
//!   round-trips; over HTTP, every route with an id answers 400 `Field 'id'
//!   must be a positive integer.` for anything else and 404 for a valid id
//!   that does not exist.
//! - `parse_create` / `parse_run` give, for any JSON value, exactly the
//!   model's decision: the parsed request, or the first failing rule's exact
//!   message. Every message is one the OpenAPI document lists.
//! - Over HTTP, any body (JSON or not) posted to create, run or kill gets
//!   the model's answer: 201, 404, or 400 with the exact message; never a
//!   5xx.
//!
//! The generator is a small seeded xorshift (no proptest: adding it to the
//! dev-dependencies rebuilds RocksDB's build dependencies). Every run uses
//! the same seed, so a failure is reproducible; set CYRNEL_PROPS_SEED to
//! explore others. A failing case prints its seed, case number and input.

use crate::support::*;
use cyrnel::api::wire::{parse_create, parse_run, MAX_CODE_CHARS};
use cyrnel::model::ProcessId;
use cyrnel::supervisor::Timeout;
use serde_json::{Map, Number, Value};
use std::collections::BTreeSet;

const MAX_ID: &str = "9223372036854775807";
const BAD_ID: &str = "Field 'id' must be a positive integer.";
const NOT_FOUND: &str = "Process not found.";
const NOT_OBJECT: &str = "Request body must be an object.";
const MALFORMED: &str = "Malformed JSON in request body.";
const MISSING_CODE: &str = "Missing required field: code";
const CODE_TYPE: &str = "Field 'code' must be a string.";
const CODE_SIZE: &str = "Field 'code' must not exceed 100 KB.";
const REF_TYPE: &str = "Field 'ref' in body must be a string.";
const REF_EMPTY: &str = "Field 'ref' must not be empty.";
const OPTIONS_TYPE: &str = "Field 'options' must be an object.";
const TIMEOUT: &str = "Field 'options.timeout' must be a positive integer or null.";
const KILL_GRACE: &str = "Field 'options.killGrace' must be a non-negative integer.";
const AUTORUN: &str = "Field 'autorun' must be a boolean.";
const FORCE: &str = "Field 'force' must be a boolean.";

/// Unicode White_Space: what "trimmed" removes from a ref (the document's
/// pattern for `ref` names the same set).
const WHITE_SPACE: &[char] = &[
    '\t', '\n', '\u{b}', '\u{c}', '\r', ' ', '\u{85}', '\u{a0}', '\u{1680}', '\u{2000}',
    '\u{2001}', '\u{2002}', '\u{2003}', '\u{2004}', '\u{2005}', '\u{2006}', '\u{2007}', '\u{2008}',
    '\u{2009}', '\u{200a}', '\u{2028}', '\u{2029}', '\u{202f}', '\u{205f}', '\u{3000}',
];
/// Look like white space but are not (never trimmed).
const NOT_WHITE_SPACE: &[char] = &['\u{1c}', '\u{1f}', '\u{200b}', '\u{180e}', '\u{feff}', '\0'];

// ---------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------

/// xorshift64*: small, seeded, good enough to spread cases.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True with probability `pct`/100.
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }

    /// Digits of a u64 drawn across magnitudes, not just near 2^64.
    fn magnitude(&mut self) -> u64 {
        let bits = self.below(65) as u32;
        match bits {
            0 => 0,
            64 => self.next(),
            b => self.next() >> (64 - b),
        }
    }
}

fn seed() -> u64 {
    std::env::var("CYRNEL_PROPS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x00C0_FFEE_5EED)
}

/// Runs `cases` cases of a property with its own generator stream.
fn check(name: &str, cases: u32, mut f: impl FnMut(&mut Rng, &dyn Fn() -> String)) {
    let seed = seed()
        ^ name
            .bytes()
            .fold(0u64, |h, b| h.wrapping_mul(31) ^ b as u64);
    let mut rng = Rng::new(seed);
    for case in 0..cases {
        let ctx = || format!("property {name}, seed {seed:#x}, case {case}");
        f(&mut rng, &ctx);
    }
}

/// A string meant to probe the id parser.
fn id_candidate(r: &mut Rng) -> String {
    match r.below(8) {
        // Valid ids, sometimes with leading zeros.
        0 | 1 => {
            let n = 1 + r.below(i64::MAX as u64);
            format!(
                "{}{n}",
                "0".repeat(r.below(3) as usize * r.below(4) as usize)
            )
        }
        2 => {
            let n = r.magnitude();
            n.to_string()
        }
        // Boundaries.
        3 => r
            .pick(&[
                "0",
                "00",
                "1",
                "01",
                MAX_ID,
                "09223372036854775807",
                "9223372036854775808",
                "18446744073709551615",
                "18446744073709551616",
                "99999999999999999999999",
                "",
            ])
            .to_string(),
        // A valid id with one character changed, inserted or appended.
        4 | 5 => {
            let mut s: Vec<char> = (1 + r.below(1 << 40)).to_string().chars().collect();
            let c = r.pick(&[
                '+', '-', '.', 'e', 'E', 'x', 'a', ' ', '_', '~', '٣', '１', '\u{0}', '0',
            ]);
            let at = r.below(s.len() as u64 + 1) as usize;
            match r.below(3) {
                0 if at < s.len() => s[at] = c,
                _ => s.insert(at, c),
            }
            s.into_iter().collect()
        }
        // Anything from a small alphabet.
        _ => {
            let len = r.below(25) as usize;
            (0..len)
                .map(|_| r.pick(&['0', '1', '9', '7', '+', '-', '.', 'a', 'Z', '~', '_']))
                .collect()
        }
    }
}

/// The contract's id rule, decided on the digits (no integer parsing).
fn id_model(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = s.trim_start_matches('0');
    let too_big = digits.len() > MAX_ID.len() || (digits.len() == MAX_ID.len() && digits > MAX_ID);
    if digits.is_empty() || too_big {
        return None;
    }
    Some(digits.parse().expect("at most 2^63-1"))
}

fn string(r: &mut Rng) -> String {
    match r.below(12) {
        0 => String::new(),
        1 => r
            .pick(&["echo hi", "x", "nightly", "0", "true", "a b"])
            .to_string(),
        // Only white space (trimmed to nothing), or look-alikes that are not.
        2 => (0..1 + r.below(4)).map(|_| r.pick(WHITE_SPACE)).collect(),
        3 => (0..1 + r.below(3))
            .map(|_| r.pick(NOT_WHITE_SPACE))
            .collect(),
        4 => format!(
            "{}{}{}",
            r.pick(WHITE_SPACE),
            r.pick(&["a", "é", "𝕏", "ref"]),
            r.pick(WHITE_SPACE)
        ),
        // Around the code limit, counted in characters (multi-byte ones too).
        5 if r.chance(15) => {
            let n = MAX_CODE_CHARS - 1 + r.below(3) as usize;
            r.pick(&["a", "é", "𝕏"]).repeat(n)
        }
        _ => {
            let len = r.below(12) as usize;
            (0..len)
                .map(|_| {
                    r.pick(&[
                        'a', 'b', 'z', ' ', '"', '\\', '\n', '{', '}', 'é', '𝕏', '\u{1}', '#', '!',
                        '\u{85}', '\u{feff}',
                    ])
                })
                .collect()
        }
    }
}

/// Numbers as JSON has them, including whole numbers written as floats
/// (`5.0`), which count as integers (JSON Schema's rule).
fn number(r: &mut Rng) -> Value {
    match r.below(8) {
        7 => Value::Number(Number::from_f64((r.magnitude() >> 20) as f64).expect("finite")),
        0 => Value::from(r.below(7) as i64 - 3),
        1 => Value::from(r.magnitude()),
        2 => Value::from(-((r.magnitude() >> 1) as i64) - 1),
        3 => Value::from(r.pick(&[u64::MAX, i64::MAX as u64, 1, 0])),
        _ => {
            let f = (r.magnitude() >> 12) as f64 / 1000.0 + 0.5;
            let f = if r.chance(30) { -f } else { f };
            Value::Number(Number::from_f64(f).expect("finite"))
        }
    }
}

const KEYS: &[&str] = &[
    "code",
    "ref",
    "options",
    "timeout",
    "killGrace",
    "autorun",
    "force",
    "",
    "x",
    "Code",
];

fn value(r: &mut Rng, depth: u32) -> Value {
    let leaf = depth == 0 || r.chance(60);
    match (leaf, r.below(5)) {
        (true, 0) => Value::Null,
        (true, 1) => Value::Bool(r.chance(50)),
        (true, 2) => number(r),
        (true, _) => Value::String(string(r)),
        (false, 0 | 1) => Value::Array((0..r.below(4)).map(|_| value(r, depth - 1)).collect()),
        (false, _) => {
            let mut m = Map::new();
            for _ in 0..r.below(5) {
                m.insert(r.pick(KEYS).to_string(), value(r, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// A create body: mostly objects shaped like the real thing, so that every
/// rule is reached, with wrong types and edge values in every field.
fn create_body(r: &mut Rng) -> Value {
    if r.chance(8) {
        return value(r, 3);
    }
    let mut m = Map::new();
    match r.below(10) {
        0 => {}
        1 => {
            m.insert("code".into(), value(r, 2));
        }
        _ => {
            m.insert("code".into(), Value::String(string(r)));
        }
    }
    match r.below(4) {
        0 => {}
        1 => {
            m.insert("ref".into(), value(r, 1));
        }
        _ => {
            m.insert("ref".into(), Value::String(string(r)));
        }
    }
    match r.below(6) {
        0 | 1 => {}
        2 => {
            m.insert("options".into(), value(r, 2));
        }
        _ => {
            let mut o = Map::new();
            for key in ["timeout", "killGrace"] {
                match r.below(4) {
                    0 => {}
                    1 => {
                        o.insert(key.into(), Value::Null);
                    }
                    2 => {
                        o.insert(key.into(), value(r, 1));
                    }
                    _ => {
                        o.insert(key.into(), number(r));
                    }
                }
            }
            if r.chance(20) {
                o.insert("other".into(), value(r, 1));
            }
            m.insert("options".into(), Value::Object(o));
        }
    }
    match r.below(4) {
        0 | 1 => {}
        2 => {
            m.insert("autorun".into(), Value::Bool(r.chance(50)));
        }
        _ => {
            m.insert("autorun".into(), value(r, 1));
        }
    }
    if r.chance(20) {
        m.insert(r.pick(KEYS).to_string(), value(r, 2));
    }
    Value::Object(m)
}

fn run_body(r: &mut Rng) -> Value {
    match r.below(4) {
        0 => value(r, 2),
        1 => Value::Object(Map::new()),
        _ => {
            let mut m = Map::new();
            let force = if r.chance(50) {
                Value::Bool(r.chance(50))
            } else {
                value(r, 1)
            };
            m.insert("force".into(), force);
            if r.chance(20) {
                m.insert(r.pick(KEYS).to_string(), value(r, 1));
            }
            Value::Object(m)
        }
    }
}

/// Raw bodies: JSON text, JSON cut short, white space, bytes that are not
/// UTF-8, or nothing at all.
fn raw_body(r: &mut Rng, json: &Value) -> Option<Vec<u8>> {
    let text = serde_json::to_vec(json).expect("serialise");
    match r.below(12) {
        0 => None,
        1 => Some((0..r.below(4)).map(|_| r.pick(b" \t\r\n\x0c")).collect()),
        2 => {
            let cut = r.below(text.len() as u64) as usize;
            Some(text[..cut].to_vec())
        }
        3 => Some(
            r.pick(&[
                &b"{\"code\":\"\xff\"}"[..],
                b"{\"code\":\"\\ud800\"}",
                b"{'code':'x'}",
                b"{\"code\":\"x\"} trailing",
                b"\xef\xbb\xbf{}",
                b"nul",
                b"[1,]",
            ])
            .to_vec(),
        ),
        _ => Some(text),
    }
}

// ---------------------------------------------------------------------------
// Models
// ---------------------------------------------------------------------------

/// What a valid create body means.
#[derive(Debug, PartialEq)]
struct Create {
    code: String,
    r#ref: Option<String>,
    timeout: Timeout,
    kill_grace_ms: Option<u64>,
    autorun: bool,
}

/// The contract's create rules, in the contract's order.
fn create_model(v: &Value) -> Result<Create, &'static str> {
    let Value::Object(o) = v else {
        return Err(NOT_OBJECT);
    };
    let code = match o.get("code") {
        None => return Err(MISSING_CODE),
        Some(Value::String(s)) if s.chars().count() > MAX_CODE_CHARS => return Err(CODE_SIZE),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(CODE_TYPE),
    };
    let r#ref = match o.get("ref") {
        None => None,
        Some(Value::String(s)) => {
            let t = s.trim_matches(WHITE_SPACE);
            if t.is_empty() {
                return Err(REF_EMPTY);
            }
            Some(t.to_string())
        }
        Some(_) => return Err(REF_TYPE),
    };
    // Whole numbers (also written as floats) up to 100,000 days in ms.
    let integer = |v: &Value| {
        let Value::Number(n) = v else { return None };
        let n = n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.is_finite() && f.fract() == 0.0 && *f >= 0.0 && *f <= 8.64e12)
                .map(|f| f as u64)
        })?;
        (n <= 8_640_000_000_000).then_some(n)
    };
    let (timeout, kill_grace_ms) = match o.get("options") {
        None | Some(Value::Null) => (Timeout::Default, None),
        Some(Value::Object(opts)) => {
            let timeout = match opts.get("timeout") {
                None => Timeout::Default,
                Some(Value::Null) => Timeout::Unlimited,
                Some(t) => match integer(t) {
                    Some(ms) if ms > 0 => Timeout::Ms(ms),
                    _ => return Err(TIMEOUT),
                },
            };
            let grace = match opts.get("killGrace") {
                None | Some(Value::Null) => None,
                Some(g) => Some(integer(g).ok_or(KILL_GRACE)?),
            };
            (timeout, grace)
        }
        Some(_) => return Err(OPTIONS_TYPE),
    };
    let autorun = match o.get("autorun") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(AUTORUN),
    };
    Ok(Create {
        code,
        r#ref,
        timeout,
        kill_grace_ms,
        autorun,
    })
}

fn run_model(v: &Value) -> Result<bool, &'static str> {
    let Value::Object(o) = v else {
        return Err(NOT_OBJECT);
    };
    match o.get("force") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(FORCE),
    }
}

/// How the daemon reads a body: empty or white space is "no body", else it
/// must be JSON.
fn body_model(raw: Option<&[u8]>) -> Result<Option<Value>, &'static str> {
    let bytes = raw.unwrap_or_default();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|_| MALFORMED)
}

/// The 400 messages the OpenAPI document lists for an operation.
fn documented_400(path: &str, method: &str) -> BTreeSet<String> {
    let doc: Value =
        serde_json::from_str(include_str!("../../openapi.json")).expect("openapi.json");
    doc["paths"][path][method]["responses"]["400"]["content"]["application/json"]["schema"]
        ["properties"]["error"]["enum"]
        .as_array()
        .unwrap_or_else(|| panic!("no 400 messages for {method} {path}"))
        .iter()
        .map(|m| m.as_str().expect("message").to_string())
        .collect()
}

fn short(v: &impl std::fmt::Display) -> String {
    let s = v.to_string();
    if s.chars().count() > 300 {
        format!(
            "{}… ({} chars)",
            s.chars().take(300).collect::<String>(),
            s.chars().count()
        )
    } else {
        s
    }
}

// ---------------------------------------------------------------------------
// Properties of the library functions
// ---------------------------------------------------------------------------

#[test]
fn id_parser_accepts_exactly_the_contract_ids() {
    check("id_parser", 20_000, |r, ctx| {
        let s = id_candidate(r);
        assert_eq!(
            ProcessId::parse(&s).map(|id| id.0),
            id_model(&s),
            "{}: {s:?}",
            ctx()
        );
    });
}

#[test]
fn every_id_in_range_round_trips() {
    check("id_round_trip", 20_000, |r, ctx| {
        let n = 1 + r.magnitude() % (i64::MAX as u64);
        assert_eq!(
            ProcessId::parse(&n.to_string()).map(|id| id.0),
            Some(n),
            "{}",
            ctx()
        );
        let zeros = "0".repeat(r.below(30) as usize);
        assert_eq!(
            ProcessId::parse(&format!("{zeros}{n}")).map(|id| id.0),
            Some(n),
            "{}",
            ctx()
        );
    });
    assert_eq!(
        ProcessId::parse(MAX_ID).map(|id| id.0),
        Some(i64::MAX as u64)
    );
}

#[test]
fn create_validation_matches_the_contract() {
    let documented = documented_400("/processes", "post");
    let mut seen = BTreeSet::new();
    check("parse_create", 20_000, |r, ctx| {
        let body = create_body(r);
        let got = parse_create(&body)
            .map(|c| Create {
                code: c.code,
                r#ref: c.r#ref,
                timeout: c.timeout,
                kill_grace_ms: c.kill_grace_ms,
                autorun: c.autorun,
            })
            .map_err(|e| e.0);
        let want = create_model(&body);
        assert_eq!(got, want, "{}: body {}", ctx(), short(&body));
        if let Err(m) = got {
            assert!(
                documented.contains(m),
                "{}: {m:?} is not in openapi.json",
                ctx()
            );
            seen.insert(m);
        }
    });
    // The generator reaches every rule.
    for m in [
        NOT_OBJECT,
        MISSING_CODE,
        CODE_TYPE,
        CODE_SIZE,
        REF_TYPE,
        REF_EMPTY,
        OPTIONS_TYPE,
        TIMEOUT,
        KILL_GRACE,
        AUTORUN,
    ] {
        assert!(
            seen.contains(m),
            "no generated body was rejected with {m:?}"
        );
    }
}

#[test]
fn run_validation_matches_the_contract() {
    let documented = documented_400("/processes/{id}/signals/run", "post");
    check("parse_run", 20_000, |r, ctx| {
        let body = run_body(r);
        let got = parse_run(&body).map_err(|e| e.0);
        assert_eq!(got, run_model(&body), "{}: body {}", ctx(), short(&body));
        if let Err(m) = got {
            assert!(
                documented.contains(m),
                "{}: {m:?} is not in openapi.json",
                ctx()
            );
        }
    });
}

// ---------------------------------------------------------------------------
// The same over HTTP
// ---------------------------------------------------------------------------

/// A daemon for bodies that may be valid: no rate limits, and `/bin/true`
/// as the shell, so whatever code a valid body carries exits at once.
fn daemon() -> Daemon {
    Daemon::options()
        .env("CYRNEL_SHELL", "/bin/true")
        .env("CYRNEL_DEFAULT_TIMEOUT_MS", "2000")
        .env("CYRNEL_RATE_LIMIT_CREATE_PER_MIN", "0")
        .env("CYRNEL_RATE_LIMIT_RUN_PER_MIN", "0")
        .env("CYRNEL_RATE_LIMIT_KILL_PER_MIN", "0")
        .start()
}

#[test]
fn http_ids_are_validated_on_every_route() {
    let d = daemon();
    let routes: &[(&str, &str, Option<&[u8]>)] = &[
        ("GET", "", None),
        ("DELETE", "", None),
        ("GET", "/code", None),
        ("GET", "/output", None),
        ("GET", "/stdout", None),
        ("GET", "/stderr", None),
        ("GET", "/events", None),
        ("POST", "/signals/run", Some(b"{}")),
        ("POST", "/signals/kill", None),
    ];
    check("http_ids", 400, |r, ctx| {
        let id = id_candidate(r);
        // Only characters a request target may carry as they are.
        if id.is_empty()
            || !id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._~".contains(&b))
        {
            return;
        }
        let (method, suffix, body) = r.pick(routes);
        let path = format!("/processes/{id}{suffix}");
        let resp = d.request(method, &path, body);
        let ctx = format!("{}: {method} {path}", ctx());
        match id_model(&id) {
            Some(_) => assert_eq!(
                (resp.status, resp.json()["error"].as_str()),
                (404, Some(NOT_FOUND)),
                "{ctx}: {resp}"
            ),
            None => assert_eq!(
                (resp.status, resp.json()["error"].as_str()),
                (400, Some(BAD_ID)),
                "{ctx}: {resp}"
            ),
        }
    });
}

#[test]
fn http_create_answers_as_the_model_never_5xx() {
    let d = daemon();
    let mut created = 0;
    check("http_create", 400, |r, ctx| {
        let mut body = create_body(r);
        // Code starting with #! would be executed itself, not by the shell.
        if let Some(Value::String(code)) = body.get_mut("code") {
            if code.starts_with("#!") {
                code.replace_range(..1, "x");
            }
        }
        let raw = raw_body(r, &body);
        let want = match body_model(raw.as_deref()) {
            Ok(None) => Err(NOT_OBJECT),
            Ok(Some(v)) => create_model(&v).map(|_| ()),
            Err(m) => Err(m),
        };
        let resp = d.request("POST", "/processes", raw.as_deref());
        let ctx = format!(
            "{}: body {}",
            ctx(),
            short(&String::from_utf8_lossy(raw.as_deref().unwrap_or_default()))
        );
        match want {
            Ok(()) => {
                assert_eq!(resp.status, 201, "{ctx}: {resp}");
                assert!(
                    resp.json()["id"].as_i64().is_some_and(|id| id >= 1),
                    "{ctx}: {resp}"
                );
                created += 1;
            }
            Err(m) => {
                assert_eq!(
                    (resp.status, resp.json()["error"].as_str()),
                    (400, Some(m)),
                    "{ctx}: {resp}"
                );
                resp.assert_json_content_type();
            }
        }
    });
    assert!(created > 20, "only {created} bodies were valid");
}

#[test]
fn http_run_and_kill_bodies_answer_as_the_model_never_5xx() {
    let d = daemon();
    // A valid id that does not exist: a valid body reaches the supervisor,
    // which answers 404.
    let id = 4_611_686_018_427_387_904u64;
    check("http_signals", 400, |r, ctx| {
        let kill = r.chance(50);
        let body = run_body(r);
        let raw = raw_body(r, &body);
        let want = match (kill, body_model(raw.as_deref())) {
            (_, Err(m)) => Err(m),
            (true, Ok(None | Some(Value::Object(_)))) => Ok(()),
            (true, Ok(Some(_))) => Err(NOT_OBJECT),
            (false, Ok(None)) => Err(NOT_OBJECT),
            (false, Ok(Some(v))) => run_model(&v).map(|_| ()),
        };
        let path = format!(
            "/processes/{id}/signals/{}",
            if kill { "kill" } else { "run" }
        );
        let resp = d.request("POST", &path, raw.as_deref());
        let ctx = format!(
            "{}: POST {path} body {}",
            ctx(),
            short(&String::from_utf8_lossy(raw.as_deref().unwrap_or_default()))
        );
        let expected = match want {
            Ok(()) => (404, NOT_FOUND),
            Err(m) => (400, m),
        };
        assert_eq!(
            (resp.status, resp.json()["error"].as_str()),
            (expected.0, Some(expected.1)),
            "{ctx}: {resp}"
        );
    });
}
