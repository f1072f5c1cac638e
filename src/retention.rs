//! Retention: deletes idle records beyond a count or past an age, through
//! the supervisor's own delete (the path DELETE takes), so each deletion is
//! a durable transition with its event and gives its space back like any
//! other. Optional: without `retention_max_records` or
//! `retention_max_age_ms` nothing runs. Knows neither HTTP nor RocksDB.

use std::time::Duration;

use crate::model::{ProcessId, State};
use crate::store::Store;
use crate::supervisor::{now_ms, Supervisor};

/// How often retention looks.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Most records deleted per sweep, so one sweep never monopolises the
/// writer; the next sweep continues.
const MAX_PER_SWEEP: usize = 1000;

/// What to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Records kept at most, counting every record newest first; idle ones
    /// beyond it are deleted (a record still running stays until idle).
    pub max_records: Option<u64>,
    /// Idle records whose run settled (or that were created, if never run)
    /// longer ago than this are deleted.
    pub max_age_ms: Option<u64>,
}

impl Policy {
    pub fn is_active(&self) -> bool {
        self.max_records.is_some() || self.max_age_ms.is_some()
    }
}

/// The ids retention would delete now, oldest last (newest-first scan).
pub fn victims(store: &Store, policy: Policy, now: u64) -> Vec<ProcessId> {
    let mut seen: u64 = 0;
    let mut out = Vec::new();
    let scanned = store.scan_newest_first(None, |r| {
        seen += 1;
        if r.state == State::Idle {
            let beyond = policy.max_records.is_some_and(|max| seen > max);
            let settled = r.completed_at.unwrap_or(r.created_at);
            let old = policy
                .max_age_ms
                .is_some_and(|age| now.saturating_sub(settled) > age);
            if beyond || old {
                out.push(r.id);
            }
        }
        true
    });
    if let Err(e) = scanned {
        tracing::warn!(error = %e, "retention: cannot read the records");
    }
    // Oldest first, and a bounded number per sweep.
    out.reverse();
    out.truncate(MAX_PER_SWEEP);
    out
}

/// Sweeps until the task is dropped (aborted at shutdown).
pub async fn run(store: Store, supervisor: Supervisor, policy: Policy) {
    tracing::info!(
        ?policy,
        "retention: deleting idle records beyond the policy"
    );
    loop {
        let ids = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || victims(&store, policy, now_ms()))
                .await
                .unwrap_or_default()
        };
        let mut deleted = 0usize;
        for id in ids {
            if supervisor.is_shutting_down() {
                return;
            }
            // A record that became busy meanwhile is refused: left for later.
            if supervisor.delete(id).await.is_ok() {
                deleted += 1;
            }
        }
        if deleted > 0 {
            tracing::info!(deleted, "retention: deleted idle records");
        }
        tokio::time::sleep(SWEEP_EVERY).await;
    }
}

/// Removes idempotency keys older than `retention_ms`, in the background:
/// a sweep reads only the expired part of the keys' time index and
/// deletes at most `MAX_PER_SWEEP` keys per batch through the writer.
/// Expired keys already count as absent when a create reads them; this
/// only gives their space back.
pub async fn expire_idempotency_keys(store: Store, retention_ms: u64) {
    let every = Duration::from_millis(retention_ms / 2)
        .clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        let before = now_ms().saturating_sub(retention_ms);
        let mut removed = 0;
        loop {
            match store.expire_idempotency(before, MAX_PER_SWEEP).await {
                Ok(n) => {
                    removed += n;
                    if n < MAX_PER_SWEEP {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "removing expired idempotency keys failed");
                    break;
                }
            }
        }
        if removed > 0 {
            tracing::debug!(removed, "removed expired idempotency keys");
        }
    }
}
