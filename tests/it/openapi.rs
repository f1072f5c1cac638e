//! The OpenAPI document (`openapi.json`): served verbatim at
//! `GET /openapi.json`, valid JSON with every internal reference resolving,
//! and in step with the router: the paths it documents are exactly the path
//! shapes `route()` in src/api/mod.rs matches, and for every path the methods
//! it documents are exactly those the daemon lists in the `Allow` header of
//! a 405. `make fuzz` checks the rest (statuses, content types, schemas)
//! against the live daemon.

use crate::support::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

const SPEC: &str = include_str!("../../openapi.json");
const ROUTER: &str = include_str!("../../src/api/mod.rs");

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn spec() -> Value {
    serde_json::from_str(SPEC).expect("openapi.json is valid JSON")
}

/// Documented methods per path, upper-case.
fn documented(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    doc["paths"]
        .as_object()
        .expect("paths object")
        .iter()
        .map(|(path, item)| {
            let methods = item
                .as_object()
                .expect("path item object")
                .keys()
                .filter(|k| METHODS.contains(&k.as_str()))
                .map(|k| k.to_ascii_uppercase())
                .collect();
            (path.clone(), methods)
        })
        .collect()
}

/// The path shapes `route()` matches, read from its match arms, e.g.
/// `(Some("processes"), Some(id), Some("signals"), Some("run"), None) =>`
/// becomes `/processes/{id}/signals/run`.
fn router_paths() -> BTreeSet<String> {
    let start = ROUTER
        .find("fn route(path: &str)")
        .expect("fn route in src/api/mod.rs");
    let body = &ROUTER[start..];
    let body = &body[..body.find("\n}\n").expect("end of fn route")];
    let mut paths = BTreeSet::new();
    for line in body.lines() {
        let line = line.trim();
        let Some((pattern, _)) = line.split_once("=> Route::") else {
            continue;
        };
        let pattern = pattern.trim();
        let pattern = pattern
            .strip_prefix('(')
            .and_then(|p| p.strip_suffix(')'))
            .unwrap_or_else(|| panic!("route() arm is not a tuple pattern: {line}"));
        let mut path = String::new();
        for part in pattern.split(',').map(str::trim) {
            if let Some(lit) = part
                .strip_prefix("Some(\"")
                .and_then(|p| p.strip_suffix("\")"))
            {
                path.push('/');
                path.push_str(lit);
            } else if part == "Some(id)" {
                path.push_str("/{id}");
            } else if part == "None" || part == ".." || part == "_" {
                break;
            } else {
                panic!("unexpected pattern {part:?} in route(): {line}");
            }
        }
        paths.insert(path);
    }
    assert!(
        paths.len() >= 12,
        "could not read the routes of src/api/mod.rs: {paths:?}"
    );
    paths
}

fn resolve<'a>(doc: &'a Value, pointer: &str) -> Option<&'a Value> {
    doc.pointer(pointer.strip_prefix('#')?)
}

fn refs<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("$ref", Value::String(s)) => out.push(s),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn served_document_is_the_file_byte_for_byte() {
    let d = Daemon::options().api_key("doc-key").start();
    let r = d.get("/openapi.json");
    assert_eq!(r.status, 200, "{r}");
    r.assert_json_content_type();
    assert!(
        r.body == SPEC.as_bytes(),
        "GET /openapi.json differs from openapi.json ({} bytes served, {} in the file)",
        r.body.len(),
        SPEC.len()
    );
    // Like every route but /health, it needs the key.
    d.raw("GET", "/openapi.json", &[], None)
        .assert_error(401, "Unauthorized");
}

#[test]
fn document_is_openapi_3_with_resolving_references() {
    let doc = spec();
    let version = doc["openapi"].as_str().expect("openapi version");
    assert!(version.starts_with("3."), "{version}");
    assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        assert!(resolve(&doc, r).is_some(), "unresolved $ref {r}");
    }
    // Bearer auth everywhere but /health.
    assert_eq!(
        doc["components"]["securitySchemes"]["bearerAuth"]["scheme"],
        "bearer"
    );
    assert_eq!(doc["security"][0]["bearerAuth"], Value::Array(vec![]));
    for (path, methods) in documented(&doc) {
        for m in methods {
            let op = &doc["paths"][&path][m.to_ascii_lowercase()];
            assert!(op["operationId"].is_string(), "{m} {path}: operationId");
            let responses = op["responses"].as_object().expect("responses");
            assert!(responses.contains_key("405"), "{m} {path}: 405");
            if path == "/health" {
                assert_eq!(op["security"], Value::Array(vec![]), "/health is open");
                assert!(!responses.contains_key("401"));
            } else {
                assert!(op.get("security").is_none(), "{m} {path}: global security");
                assert!(responses.contains_key("401"), "{m} {path}: 401");
                assert!(responses.contains_key("429"), "{m} {path}: 429");
            }
        }
    }
}

#[test]
fn documented_paths_are_the_router_paths() {
    let doc = spec();
    let documented: BTreeSet<String> = documented(&doc).into_keys().collect();
    assert_eq!(documented, router_paths());
}

#[test]
fn documented_methods_are_the_allowed_methods() {
    let doc = spec();
    let d = Daemon::options().api_key("doc-key").start();
    for (path, methods) in documented(&doc) {
        let concrete = path.replace("{id}", "1");
        // A method no route answers: the 405 lists what the path answers.
        let r = d.request("PATCH", &concrete, None);
        r.assert_error(405, "Method not allowed.");
        let allowed: BTreeSet<String> = r.allow().into_iter().collect();
        assert_eq!(allowed, methods, "methods of {path}");
    }
    // An undocumented path is unknown to the daemon too.
    d.get("/processes/1/nothing")
        .assert_error(404, "Not found.");
}

#[test]
fn documented_error_messages_include_the_contract_ones() {
    let doc = spec();
    let create_400 = &doc["paths"]["/processes"]["post"]["responses"]["400"]["content"]
        ["application/json"]["schema"]["properties"]["error"]["enum"];
    let listed: BTreeSet<&str> = create_400
        .as_array()
        .expect("create 400 messages")
        .iter()
        .map(|v| v.as_str().expect("message"))
        .collect();
    for m in [
        "Missing required field: code",
        "Field 'code' must be a string.",
        "Field 'code' must not exceed 100 KB.",
        "Field 'ref' in body must be a string.",
        "Field 'ref' must not be empty.",
        "Field 'options.timeout' must be a positive integer or null.",
        "Field 'autorun' must be a boolean.",
        "Request body must be an object.",
        "Malformed JSON in request body.",
    ] {
        assert!(listed.contains(m), "{m}");
    }
}
