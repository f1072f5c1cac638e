//! `POST /backup`: an online, consistent copy of the database that a
//! daemon can start from, taken while runs go on. Authenticated like every
//! route but `/health`. The copy is a data dir: `<dir>/db` (a RocksDB
//! checkpoint) and an empty `<dir>/run`; start it with
//! `cyrneld --data-dir <dir>`. Knows HTTP and JSON; the copy itself is the
//! store's.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::PathBuf;

use hyper::StatusCode;
use serde_json::Value;

use super::{error, json, ApiState, Body};
use crate::store::StoreError;

/// The 201 answer (also what `cyrnelctl backup` reads).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupJson {
    /// The data dir written: start a daemon on it with `--data-dir`.
    pub dir: String,
    /// The id the copy hands out next: every id below it that was durable
    /// when the backup was taken is in the copy.
    pub next_id: u64,
    /// The last event sequence number in the copy.
    pub last_event_id: u64,
    pub took_ms: u64,
}

/// Validates `{"dir": "/absolute/path"}`: a path that does not exist yet,
/// whose parent does.
fn parse(body: &Value) -> Result<PathBuf, &'static str> {
    let Some(obj) = body.as_object() else {
        return Err("Request body must be a JSON object.");
    };
    if obj.keys().any(|k| k != "dir") {
        return Err("Only field 'dir' is allowed.");
    }
    let Some(dir) = obj.get("dir").and_then(Value::as_str) else {
        return Err("Field 'dir' must be a string.");
    };
    let path = PathBuf::from(dir);
    if !path.is_absolute() || dir.contains('\0') {
        return Err("Field 'dir' must be an absolute path.");
    }
    if path.symlink_metadata().is_ok() {
        return Err("Field 'dir' must name a directory that does not exist yet.");
    }
    // A backup holds every record, code and output: it goes only into a
    // directory private to the daemon's user (owned by it, mode 0700 or
    // stricter), never into a shared one such as /tmp or /.
    let parent = path.parent().and_then(|p| p.metadata().ok());
    let me = crate::proc::effective_uid();
    match parent {
        Some(m) if m.is_dir() && m.uid() == me && m.mode() & 0o077 == 0 => Ok(path),
        _ => Err("The parent of 'dir' must be an existing directory private to the daemon's user (mode 0700)."),
    }
}

pub(super) async fn backup(state: &ApiState, body: Option<Value>) -> hyper::Response<Body> {
    let dir = match body.as_ref().map(parse) {
        None => {
            return error(
                StatusCode::BAD_REQUEST,
                "Request body must be a JSON object.",
            )
        }
        Some(Err(m)) => return error(StatusCode::BAD_REQUEST, m),
        Some(Ok(dir)) => dir,
    };
    let store = state.store.clone();
    let target = dir.clone();
    let done = tokio::task::spawn_blocking(move || {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&target)
            .and_then(|()| {
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(target.join("run"))
            })
            .map_err(|e| StoreError::Backup(format!("{}: {e}", target.display())))?;
        store.backup(&target.join("db"))
    })
    .await;
    match done {
        Ok(Ok(info)) => {
            tracing::info!(dir = %dir.display(), next_id = info.next_id, took_ms = info.took_ms, "backup written");
            let body = BackupJson {
                dir: dir.display().to_string(),
                next_id: info.next_id,
                last_event_id: info.last_seq,
                took_ms: info.took_ms,
            };
            json(
                StatusCode::CREATED,
                serde_json::to_vec(&body).expect("json"),
            )
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, dir = %dir.display(), "backup failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("Backup failed: {e}"),
            )
        }
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "Backup failed."),
    }
}
