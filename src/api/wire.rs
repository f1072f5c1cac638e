//! Wire types: the JSON clients see, and the validation of what they send.
//! The only serde types of the API; `cyrnelctl` will share them.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{signal_name, Record, Resources};
use crate::supervisor::{CreateRequest, Timeout};

/// Longest `code`, in characters.
pub const MAX_CODE_CHARS: usize = 102_400;

/// Largest `options.timeout` / `options.killGrace`: 100,000 days, so a
/// deadline stays a four-digit-year ISO-8601 time.
pub const MAX_MS: u64 = 8_640_000_000_000;

/// A JSON number that is a whole number of milliseconds in 0..=MAX_MS:
/// `1000`, and also `1000.0` or `1e3` (JSON Schema calls those integers,
/// and clients that serialise numbers as floats send them).
fn whole_ms(v: &Value) -> Option<u64> {
    let n = match v.as_u64() {
        Some(n) => n,
        None => {
            let f = v.as_f64()?;
            if !f.is_finite() || f.fract() != 0.0 || f < 0.0 || f > MAX_MS as f64 {
                return None;
            }
            f as u64
        }
    };
    (n <= MAX_MS).then_some(n)
}

/// A Process record as the API shows it. The server serialises it from a
/// borrowed record; `cyrnelctl` deserialises it into owned strings.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProcessJson<'a> {
    pub id: u64,
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub r#ref: Option<Cow<'a, str>>,
    pub state: Cow<'a, str>,
    pub exit_state: Option<Cow<'a, str>>,
    pub error: Option<Cow<'a, str>>,
    pub created_at: String,
    pub completed_at: Option<String>,
    #[serde(default)]
    pub started_at: Option<String>,
    #[serde(default)]
    pub pid: Option<i32>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub signal: Option<String>,
    /// Processes our signals reached while terminating the run (extension).
    #[serde(default)]
    pub killed: Option<u32>,
    /// How many of them were outside the run's process group (extension).
    #[serde(default)]
    pub escaped: Option<u32>,
    /// While terminating: when SIGKILL is due (extension). Persisted with
    /// the kill, and kept across daemon restarts.
    #[serde(default)]
    pub kill_deadline: Option<String>,
    /// The isolation level the current run got: `full`, `landlock` or
    /// `none`; null before a run starts (extension).
    #[serde(default)]
    pub sandbox: Option<Cow<'a, str>>,
    /// What the last run used; null until it settles (extension).
    #[serde(default)]
    pub resources: Option<ResourcesJson>,
}

/// A settled run's resources (extension).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResourcesJson {
    pub cpu_user_ms: u64,
    pub cpu_system_ms: u64,
    pub peak_memory_bytes: Option<u64>,
    pub oom_killed: bool,
    pub peak_processes: Option<u64>,
    /// `cgroup` or `rusage`.
    pub source: String,
}

impl From<&Resources> for ResourcesJson {
    fn from(r: &Resources) -> Self {
        ResourcesJson {
            cpu_user_ms: r.cpu_user_ms,
            cpu_system_ms: r.cpu_system_ms,
            peak_memory_bytes: r.peak_memory_bytes,
            oom_killed: r.oom_killed,
            peak_processes: r.peak_processes,
            source: r.source.as_str().to_string(),
        }
    }
}

impl ProcessJson<'_> {
    /// Detaches a record from the buffer it was decoded from.
    pub fn into_owned(self) -> ProcessJson<'static> {
        ProcessJson {
            id: self.id,
            r#ref: self.r#ref.map(|c| Cow::Owned(c.into_owned())),
            state: Cow::Owned(self.state.into_owned()),
            exit_state: self.exit_state.map(|c| Cow::Owned(c.into_owned())),
            error: self.error.map(|c| Cow::Owned(c.into_owned())),
            created_at: self.created_at,
            completed_at: self.completed_at,
            started_at: self.started_at,
            pid: self.pid,
            exit_code: self.exit_code,
            signal: self.signal,
            killed: self.killed,
            escaped: self.escaped,
            kill_deadline: self.kill_deadline,
            sandbox: self.sandbox.map(|c| Cow::Owned(c.into_owned())),
            resources: self.resources,
        }
    }
}

/// `{"processes": [...]}`, plus `nextCursor` when paging.
#[derive(Serialize, Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct ProcessList<'a> {
    #[serde(borrow)]
    pub processes: Vec<ProcessJson<'a>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `{"id": N}` from create.
#[derive(Serialize, Deserialize, Debug)]
pub struct Created {
    pub id: u64,
}

/// Every error body but rate limiting's.
#[derive(Serialize, Deserialize, Debug)]
pub struct ErrorBody {
    pub error: String,
}

impl<'a> From<&'a Record> for ProcessJson<'a> {
    fn from(r: &'a Record) -> Self {
        ProcessJson {
            id: r.id.0,
            r#ref: r.r#ref.as_deref().map(Cow::Borrowed),
            state: Cow::Borrowed(r.state.as_str()),
            exit_state: r.exit_state.map(|e| Cow::Borrowed(e.as_str())),
            error: r.error.as_deref().map(Cow::Borrowed),
            created_at: iso8601(r.created_at),
            completed_at: r.completed_at.map(iso8601),
            started_at: r.started_at.map(iso8601),
            pid: r.pid(),
            exit_code: r.exit_code,
            signal: r.signal.map(signal_name),
            killed: r.killed,
            escaped: r.escaped,
            kill_deadline: r.kill_deadline.map(iso8601),
            sandbox: r.sandbox.map(|l| Cow::Borrowed(l.as_str())),
            resources: r.resources.as_ref().map(ResourcesJson::from),
        }
    }
}

pub fn record_json(r: &Record) -> Vec<u8> {
    serde_json::to_vec(&ProcessJson::from(r)).expect("record serialises")
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn iso8601(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// A 400 with its exact message.
#[derive(Debug, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

pub const NOT_AN_OBJECT: Invalid = Invalid("Request body must be an object.");

/// Validates a create body, in the contract's order.
pub fn parse_create(body: &Value) -> Result<CreateRequest, Invalid> {
    let obj = body.as_object().ok_or(NOT_AN_OBJECT)?;
    let code = match obj.get("code") {
        None => return Err(Invalid("Missing required field: code")),
        Some(Value::String(s)) => s,
        Some(_) => return Err(Invalid("Field 'code' must be a string.")),
    };
    if code.chars().count() > MAX_CODE_CHARS {
        return Err(Invalid("Field 'code' must not exceed 100 KB."));
    }
    let r#ref = match obj.get("ref") {
        None => None,
        Some(Value::String(s)) => {
            let t = s.trim();
            if t.is_empty() {
                return Err(Invalid("Field 'ref' must not be empty."));
            }
            Some(t.to_string())
        }
        Some(_) => return Err(Invalid("Field 'ref' in body must be a string.")),
    };
    let (timeout, kill_grace_ms, network) = match obj.get("options") {
        None | Some(Value::Null) => (Timeout::Default, None, None),
        Some(Value::Object(o)) => {
            let timeout = match o.get("timeout") {
                None => Timeout::Default,
                Some(Value::Null) => Timeout::Unlimited,
                Some(v) => match whole_ms(v) {
                    Some(ms) if ms > 0 => Timeout::Ms(ms),
                    _ => {
                        return Err(Invalid(
                            "Field 'options.timeout' must be a positive integer or null.",
                        ))
                    }
                },
            };
            let grace = match o.get("killGrace") {
                None | Some(Value::Null) => None,
                Some(v) => Some(whole_ms(v).ok_or(Invalid(
                    "Field 'options.killGrace' must be a non-negative integer.",
                ))?),
            };
            let network = match o.get("network") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => return Err(Invalid("Field 'options.network' must be a boolean.")),
            };
            (timeout, grace, network)
        }
        Some(_) => return Err(Invalid("Field 'options' must be an object.")),
    };
    let autorun = match obj.get("autorun") {
        None => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Invalid("Field 'autorun' must be a boolean.")),
    };
    Ok(CreateRequest {
        code: code.clone(),
        r#ref,
        timeout,
        kill_grace_ms,
        network,
        autorun,
        idempotency: None,
    })
}

/// The fingerprint of a request for idempotency: SHA-256 over the method,
/// the path and the body in a canonical form (object keys sorted, no
/// whitespace), so the same request spelled differently matches.
pub fn fingerprint(method: &str, path: &str, body: &Value) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut canon = Vec::new();
    canonical(body, &mut canon);
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(&canon);
    h.finalize().into()
}

fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(Value::String(k.clone()).to_string().as_bytes());
                out.push(b':');
                canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// Validates a run-signal body: `{"force": bool}`, both optional.
pub fn parse_run(body: &Value) -> Result<bool, Invalid> {
    let obj = body.as_object().ok_or(NOT_AN_OBJECT)?;
    match obj.get("force") {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(Invalid("Field 'force' must be a boolean.")),
    }
}

/// `POST /handover`'s answer: the binary that passed the preflight.
pub fn handover_started(binary: &std::path::Path, pid: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "status": "handing over",
        "binary": binary.display().to_string(),
        "pid": pid,
    }))
    .expect("json")
}

/// `GET /handover`: this daemon's handovers.
pub fn handover_status(s: &crate::handover::Status, pid: u32) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "pid": pid,
        "generation": s.generation,
        "binary": s.binary.display().to_string(),
        "stateVersion": crate::handover::STATE_VERSION,
        "lastError": s.last_error,
    }))
    .expect("json")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn iso8601_formats_utc_millis() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(iso8601(1_795_780_800_123), "2026-11-27T12:00:00.123Z");
        assert_eq!(iso8601(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
    }

    #[test]
    fn create_validation_messages() {
        let cases = [
            (json!([]), "Request body must be an object."),
            (json!({}), "Missing required field: code"),
            (json!({"code": 1}), "Field 'code' must be a string."),
            (json!({"code": null}), "Field 'code' must be a string."),
            (
                json!({"code": "x".repeat(MAX_CODE_CHARS + 1)}),
                "Field 'code' must not exceed 100 KB.",
            ),
            (
                json!({"code": "", "ref": 5}),
                "Field 'ref' in body must be a string.",
            ),
            (
                json!({"code": "", "ref": "  "}),
                "Field 'ref' must not be empty.",
            ),
            (
                json!({"code": "", "options": 1}),
                "Field 'options' must be an object.",
            ),
            (
                json!({"code": "", "options": {"timeout": 0}}),
                "Field 'options.timeout' must be a positive integer or null.",
            ),
            (
                json!({"code": "", "options": {"timeout": 1.5}}),
                "Field 'options.timeout' must be a positive integer or null.",
            ),
            (
                json!({"code": "", "options": {"timeout": "1"}}),
                "Field 'options.timeout' must be a positive integer or null.",
            ),
            (
                json!({"code": "", "options": {"killGrace": -1}}),
                "Field 'options.killGrace' must be a non-negative integer.",
            ),
            (
                json!({"code": "", "autorun": "yes"}),
                "Field 'autorun' must be a boolean.",
            ),
        ];
        for (body, msg) in cases {
            assert_eq!(parse_create(&body).unwrap_err(), Invalid(msg), "{body}");
        }
    }

    #[test]
    fn create_defaults_and_values() {
        let r = parse_create(&json!({"code": ""})).unwrap();
        assert_eq!(
            (r.timeout, r.kill_grace_ms, r.autorun, r.r#ref),
            (Timeout::Default, None, true, None)
        );
        let r = parse_create(&json!({"code": "é".repeat(MAX_CODE_CHARS), "ref": " a ", "options": {"timeout": null, "killGrace": 0}, "autorun": false, "extra": 1})).unwrap();
        assert_eq!(
            (r.timeout, r.kill_grace_ms, r.autorun, r.r#ref.as_deref()),
            (Timeout::Unlimited, Some(0), false, Some("a"))
        );
        assert_eq!(
            parse_create(&json!({"code": "", "options": {"timeout": 5}}))
                .unwrap()
                .timeout,
            Timeout::Ms(5)
        );
    }

    #[test]
    fn whole_floats_are_integers_and_huge_values_are_refused() {
        let opts = |o: Value| parse_create(&json!({"code": "", "options": o}));
        assert_eq!(
            opts(json!({"timeout": 1000.0})).unwrap().timeout,
            Timeout::Ms(1000)
        );
        assert_eq!(
            opts(json!({"timeout": 1e3})).unwrap().timeout,
            Timeout::Ms(1000)
        );
        assert_eq!(
            opts(json!({"killGrace": 500.0})).unwrap().kill_grace_ms,
            Some(500)
        );
        assert_eq!(
            opts(json!({"killGrace": MAX_MS})).unwrap().kill_grace_ms,
            Some(MAX_MS)
        );
        for bad in [
            json!(1.5),
            json!(-0.5),
            json!(u64::MAX),
            json!(MAX_MS + 1),
            json!(1e300),
        ] {
            assert!(opts(json!({"timeout": bad.clone()})).is_err(), "{bad}");
            assert!(opts(json!({"killGrace": bad.clone()})).is_err(), "{bad}");
        }
        assert!(opts(json!({"timeout": 0.0})).is_err());
    }

    #[test]
    fn run_body() {
        assert_eq!(parse_run(&json!({})), Ok(false));
        assert_eq!(parse_run(&json!({"force": true})), Ok(true));
        assert_eq!(
            parse_run(&json!({"force": 1})),
            Err(Invalid("Field 'force' must be a boolean."))
        );
        assert_eq!(parse_run(&json!(null)), Err(NOT_AN_OBJECT));
    }
}
