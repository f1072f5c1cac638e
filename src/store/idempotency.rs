//! Idempotency keys of creates, in their own column family:
//!
//! - `k<key>` → fingerprint (32 bytes) · id (8, BE) · claimed at (8, ms BE):
//!   the claim, written in the same synced batch as the record it created;
//! - `t<claimed at (8, ms BE)><key>` → empty: the same claim ordered by time,
//!   so expiry reads only what has expired.
//!
//! A claim older than the retention window counts as absent when read, and
//! the background sweep removes it (a later claim of the same key keeps its
//! `k` entry: the sweep deletes `k` only when its time matches).

use rocksdb::{Direction, IteratorMode};

use super::{Batch, Op, Store, StoreError, CF_IDEMPOTENCY};
use crate::model::{Idempotency, ProcessId};

/// A key's claim: which request first used it and what it created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub fingerprint: [u8; 32],
    pub id: ProcessId,
    pub claimed_ms: u64,
}

fn key_entry(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + key.len());
    k.push(b'k');
    k.extend_from_slice(key.as_bytes());
    k
}

fn time_entry(claimed_ms: u64, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + key.len());
    k.push(b't');
    k.extend_from_slice(&claimed_ms.to_be_bytes());
    k.extend_from_slice(key.as_bytes());
    k
}

fn decode(v: &[u8]) -> Option<([u8; 32], u64, u64)> {
    if v.len() != 48 {
        return None;
    }
    Some((
        v[..32].try_into().ok()?,
        u64::from_be_bytes(v[32..40].try_into().ok()?),
        u64::from_be_bytes(v[40..48].try_into().ok()?),
    ))
}

impl Batch {
    /// Claims `key` for the record `id` created in this batch.
    pub fn put_idempotency(&mut self, key: &Idempotency, id: ProcessId, now_ms: u64) {
        let mut v = Vec::with_capacity(48);
        v.extend_from_slice(&key.fingerprint);
        v.extend_from_slice(&id.0.to_be_bytes());
        v.extend_from_slice(&now_ms.to_be_bytes());
        self.ops
            .push(Op::Put(CF_IDEMPOTENCY, key_entry(&key.key), v));
        self.ops.push(Op::Put(
            CF_IDEMPOTENCY,
            time_entry(now_ms, &key.key),
            Vec::new(),
        ));
    }
}

impl Store {
    /// The claim of `key` made at or after `since_ms` (older ones have
    /// expired).
    pub fn idempotency(&self, key: &str, since_ms: u64) -> Result<Option<Claim>, StoreError> {
        let v = self
            .db()
            .get_cf(self.cf(CF_IDEMPOTENCY), key_entry(key))
            .map_err(StoreError::read)?;
        Ok(v.as_deref().and_then(decode).and_then(|(fp, id, at)| {
            (at >= since_ms).then_some(Claim {
                fingerprint: fp,
                id: ProcessId(id),
                claimed_ms: at,
            })
        }))
    }

    /// Removes up to `max` claims made before `before_ms`; returns how many
    /// it removed (fewer than `max`: nothing older is left). Reads only the
    /// expired part of the time index; the deletes go through the writer
    /// like any batch.
    pub async fn expire_idempotency(
        &self,
        before_ms: u64,
        max: usize,
    ) -> Result<usize, StoreError> {
        let cf = self.cf(CF_IDEMPOTENCY);
        let mut batch = Batch::durable().essential();
        let mut n = 0;
        for item in self
            .db()
            .iterator_cf(cf, IteratorMode::From(b"t", Direction::Forward))
        {
            let (k, _) = item.map_err(StoreError::read)?;
            if k.first() != Some(&b't') || k.len() < 9 || n == max {
                break;
            }
            let at = u64::from_be_bytes(k[1..9].try_into().expect("8 bytes"));
            if at >= before_ms {
                break;
            }
            let key = String::from_utf8_lossy(&k[9..]).into_owned();
            let current = self
                .db()
                .get_cf(cf, key_entry(&key))
                .map_err(StoreError::read)?;
            // A later claim of the same key stays.
            if current
                .as_deref()
                .and_then(decode)
                .is_some_and(|c| c.2 == at)
            {
                batch.ops.push(Op::Delete(CF_IDEMPOTENCY, key_entry(&key)));
            }
            batch.ops.push(Op::Delete(CF_IDEMPOTENCY, k.to_vec()));
            n += 1;
        }
        if n > 0 {
            self.write(batch).await?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str, fp: u8) -> Idempotency {
        Idempotency {
            key: k.into(),
            fingerprint: [fp; 32],
        }
    }

    #[tokio::test]
    async fn claims_are_read_back_expire_and_a_later_claim_survives_the_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path(), 0).unwrap();
        let mut b = Batch::durable();
        b.put_idempotency(&key("a", 1), ProcessId(1), 100);
        b.put_idempotency(&key("b", 2), ProcessId(2), 200);
        s.write(b).await.unwrap();
        let a = s.idempotency("a", 0).unwrap().unwrap();
        assert_eq!(
            (a.fingerprint, a.id, a.claimed_ms),
            ([1; 32], ProcessId(1), 100)
        );
        assert!(s.idempotency("a", 101).unwrap().is_none(), "expired");
        assert!(s.idempotency("c", 0).unwrap().is_none());
        // "a" claimed again after it expired.
        let mut b = Batch::durable();
        b.put_idempotency(&key("a", 3), ProcessId(3), 300);
        s.write(b).await.unwrap();
        assert_eq!(s.expire_idempotency(250, 1).await.unwrap(), 1);
        assert_eq!(s.expire_idempotency(250, 10).await.unwrap(), 1);
        assert_eq!(s.expire_idempotency(250, 10).await.unwrap(), 0);
        assert!(s.idempotency("b", 0).unwrap().is_none());
        assert_eq!(s.idempotency("a", 0).unwrap().unwrap().id, ProcessId(3));
        assert_eq!(s.expire_idempotency(400, 10).await.unwrap(), 1);
        assert!(s.idempotency("a", 0).unwrap().is_none());
    }
}
