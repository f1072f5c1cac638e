//! Per-client rate limiting: fixed windows aligned to the wall clock, one
//! counter per (client address, bucket). Memory is bounded: at most
//! `MAX_CLIENTS` counters are kept; expired windows are swept first, and if
//! the table is still full the oldest windows are forgotten (those clients
//! get a fresh window early, never a wrong rejection).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Counters kept at most.
pub const MAX_CLIENTS: usize = 100_000;

/// What is limited separately.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bucket {
    Create,
    Run,
    Kill,
    /// The optional limit over all routes.
    Global,
}

/// A limit: `max` requests per `window_ms`; `max == 0` disables it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub max: u64,
    pub window_ms: u64,
}

/// The outcome of counting one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub limit: u64,
    pub remaining: u64,
    /// Unix seconds when the window ends.
    pub reset: u64,
    /// Seconds until a rejected client may retry; `None` when allowed.
    pub retry_after: Option<u64>,
}

pub struct Limiter {
    counters: Mutex<HashMap<(IpAddr, Bucket), (u64, u64)>>,
    max_clients: usize,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::with_capacity(MAX_CLIENTS)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Limiter {
    pub fn with_capacity(max_clients: usize) -> Limiter {
        Limiter {
            counters: Mutex::new(HashMap::new()),
            max_clients: max_clients.max(1),
        }
    }

    /// Counts a request of `ip` against `limit`; `None` if disabled.
    pub fn check(&self, ip: IpAddr, bucket: Bucket, limit: Limit) -> Option<Verdict> {
        self.check_at(ip, bucket, limit, now_ms())
    }

    fn check_at(&self, ip: IpAddr, bucket: Bucket, limit: Limit, now: u64) -> Option<Verdict> {
        if limit.max == 0 || limit.window_ms == 0 {
            return None;
        }
        let window = now / limit.window_ms;
        let end_ms = (window + 1) * limit.window_ms;
        let mut map = self.counters.lock().expect("rate limiter");
        if map.len() >= self.max_clients && !map.contains_key(&(ip, bucket)) {
            // Sweep windows that have ended (any bucket's window length is
            // at most the longest configured; a counter from an older
            // window is useless).
            map.retain(|_, (w, _)| *w >= window);
            if map.len() >= self.max_clients {
                let oldest = map.values().map(|(w, _)| *w).min().unwrap_or(window);
                map.retain(|_, (w, _)| *w > oldest);
                if map.len() >= self.max_clients {
                    map.clear();
                }
            }
        }
        let entry = map.entry((ip, bucket)).or_insert((window, 0));
        if entry.0 != window {
            *entry = (window, 0);
        }
        entry.1 += 1;
        let count = entry.1;
        let rejected = count > limit.max;
        Some(Verdict {
            limit: limit.max,
            remaining: limit.max.saturating_sub(count),
            reset: end_ms.div_ceil(1000),
            retry_after: rejected.then(|| end_ms.saturating_sub(now).div_ceil(1000).max(1)),
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.counters.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Limit = Limit {
        max: 3,
        window_ms: 60_000,
    };

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn counts_down_then_rejects_until_the_window_ends() {
        let l = Limiter::default();
        let t = 120_000 + 15_000; // 15 s into a window
        let v: Vec<_> = (0..4)
            .map(|_| l.check_at(ip(1), Bucket::Create, MIN, t).unwrap())
            .collect();
        assert_eq!(
            v.iter().map(|v| v.remaining).collect::<Vec<_>>(),
            vec![2, 1, 0, 0]
        );
        assert!(v[..3].iter().all(|v| v.retry_after.is_none()));
        assert_eq!(v[3].retry_after, Some(45));
        assert_eq!(v[3].reset, 180);
        // Next window: fresh.
        let n = l.check_at(ip(1), Bucket::Create, MIN, 180_000).unwrap();
        assert_eq!((n.remaining, n.retry_after), (2, None));
    }

    #[test]
    fn clients_and_buckets_are_separate_and_zero_disables() {
        let l = Limiter::default();
        for _ in 0..3 {
            l.check_at(ip(1), Bucket::Create, MIN, 0);
        }
        assert!(l
            .check_at(ip(1), Bucket::Create, MIN, 0)
            .unwrap()
            .retry_after
            .is_some());
        assert!(l
            .check_at(ip(2), Bucket::Create, MIN, 0)
            .unwrap()
            .retry_after
            .is_none());
        assert!(l
            .check_at(ip(1), Bucket::Kill, MIN, 0)
            .unwrap()
            .retry_after
            .is_none());
        assert_eq!(
            l.check_at(
                ip(1),
                Bucket::Run,
                Limit {
                    max: 0,
                    window_ms: 60_000
                },
                0
            ),
            None
        );
    }

    #[test]
    fn memory_stays_bounded_with_many_clients() {
        let l = Limiter::with_capacity(100);
        for n in 0..10_000u32 {
            let a = IpAddr::from(n.to_be_bytes());
            l.check_at(a, Bucket::Create, MIN, 0);
            assert!(l.len() <= 100);
        }
    }
}
