//! The daemon's Prometheus metrics, built with `prometheus-client` (the
//! official Rust client) and rendered for `GET /metrics` in the Prometheus
//! text format (0.0.4) or in OpenMetrics, whichever the scraper asks for.
//! Aggregate series only: no per-run label, whose cardinality would grow
//! with every run. Knows nothing of HTTP.
//!
//! Where each value comes from, so that no other module carries metrics
//! code: run metrics from the event stream (`runs.rs`, an observer of the
//! hub); store commits from an observer the store's writer calls after each
//! group commit; rate-limited requests from the API, which counts its 429s
//! here; event subscribers, the store's memory and the daemon's own process
//! metrics (`proc::usage`) read at scrape time.

mod runs;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::events::Hub;
use crate::model::SandboxLevel;
use crate::store::{CommitObserver, Store};

pub use runs::RunMetrics;

/// The exposition formats `GET /metrics` serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4 (`promtool check metrics`
    /// reads this one).
    Text,
    /// OpenMetrics 1.0 text, which Prometheus asks for first.
    OpenMetrics,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LevelLabel {
    level: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SyncedLabel {
    synced: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    method: &'static str,
    route: &'static str,
}

type CommitSeconds = Family<SyncedLabel, Histogram, fn() -> Histogram>;

/// Group commits of the store's writer.
#[derive(Debug)]
struct Commits {
    seconds: CommitSeconds,
    writes: Histogram,
}

impl CommitObserver for Commits {
    fn committed(&self, writes: usize, synced: bool, elapsed: Duration) {
        self.seconds
            .get_or_create(&SyncedLabel { synced })
            .observe(elapsed.as_secs_f64());
        self.writes.observe(writes as f64);
    }
}

/// The standard process metrics of the daemon, read on each scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let u = match crate::proc::usage::own_usage() {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read the daemon's own usage");
                return Ok(());
            }
        };
        let counter = ConstCounter::new(u.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent in seconds.",
            Some(&Unit::Seconds),
            counter.metric_type(),
        )?)?;
        let gauges: [(&str, &str, Option<Unit>, f64); 6] = [
            (
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(Unit::Bytes),
                u.resident_bytes as f64,
            ),
            (
                "process_virtual_memory",
                "Virtual memory size in bytes.",
                Some(Unit::Bytes),
                u.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                u.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                u.max_fds as f64,
            ),
            (
                "process_start_time",
                "Start time of the process since unix epoch in seconds.",
                Some(Unit::Seconds),
                u.start_time_seconds,
            ),
            (
                "process_threads",
                "Number of OS threads in the process.",
                None,
                u.threads as f64,
            ),
        ];
        for (name, help, unit, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(
                name,
                help,
                unit.as_ref(),
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Every series the daemon exports, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    store: Store,
    hub: Arc<Hub>,
    cache: Gauge,
    cache_pinned: Gauge,
    memtables: Gauge,
    subscribers: Gauge,
    rate_limited: Family<RouteLabel, Counter>,
}

impl Metrics {
    /// `runs` must be the hub's observer. Call before the supervisor
    /// starts, so that its first commits are counted too.
    pub fn new(store: Store, sandbox: SandboxLevel, hub: Arc<Hub>, runs: &RunMetrics) -> Metrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(ProcessCollector));
        let registry = root.sub_registry_with_prefix("cyrnel");
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running cyrneld's version", build);
        let level = Family::<LevelLabel, Gauge>::default();
        for l in [
            SandboxLevel::Full,
            SandboxLevel::Landlock,
            SandboxLevel::None,
        ] {
            level
                .get_or_create(&LevelLabel { level: l.as_str() })
                .set(i64::from(l == sandbox));
        }
        registry.register(
            "sandbox_level",
            "The isolation level runs get (1 for the level in force)",
            level,
        );
        runs.register(registry);
        let subscribers = Gauge::default();
        registry.register(
            "event_subscribers",
            "Live subscribers of the event broadcast (GET /events and /processes/{id}/events streams)",
            subscribers.clone(),
        );
        let rate_limited = Family::<RouteLabel, Counter>::default();
        registry.register(
            "rate_limited_requests",
            "Requests answered 429 by the rate limits, by method and route",
            rate_limited.clone(),
        );
        let commits = Arc::new(Commits {
            seconds: CommitSeconds::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 15))
            }),
            writes: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
        });
        for synced in [false, true] {
            let _ = commits.seconds.get_or_create(&SyncedLabel { synced });
        }
        registry.register_with_unit(
            "store_commit_duration",
            "Time of one group commit (one RocksDB write; synced: with its log fsync)",
            Unit::Seconds,
            commits.seconds.clone(),
        );
        registry.register(
            "store_commit_writes",
            "Queued writes (transitions, output chunks, deletes) applied by one group commit",
            commits.writes.clone(),
        );
        store.observe_commits(commits);
        let budget: Gauge = Gauge::default();
        budget.set(gauge_value(store.memory_usage().budget));
        registry.register(
            "storage_memory_budget_bytes",
            "RocksDB's memory budget (storage_memory_bytes)",
            budget,
        );
        let (cache, cache_pinned, memtables): (Gauge, Gauge, Gauge) = Default::default();
        registry.register(
            "storage_block_cache_bytes",
            "Bytes in RocksDB's shared block cache, memtable reservations included",
            cache.clone(),
        );
        registry.register(
            "storage_block_cache_pinned_bytes",
            "Bytes of the block cache pinned by readers",
            cache_pinned.clone(),
        );
        registry.register(
            "storage_memtable_bytes",
            "Bytes in RocksDB's memtables (all column families)",
            memtables.clone(),
        );
        Metrics {
            registry: root,
            store,
            hub,
            cache,
            cache_pinned,
            memtables,
            subscribers,
            rate_limited,
        }
    }

    /// Counts a request the rate limits refused. `route` is the route's
    /// template (a fixed set: no ids).
    pub fn rate_limited(&self, method: &'static str, route: &'static str) {
        self.rate_limited
            .get_or_create(&RouteLabel { method, route })
            .inc();
    }

    /// Every series, with the values read now.
    pub fn render(&self, format: Format) -> String {
        let m = self.store.memory_usage();
        self.cache.set(gauge_value(m.cache));
        self.cache_pinned.set(gauge_value(m.cache_pinned));
        self.memtables.set(gauge_value(m.memtables));
        self.subscribers
            .set(i64::try_from(self.hub.subscribers()).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = match format {
            Format::Text => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)
            }
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &self.registry)
            }
        };
        out
    }
}

fn gauge_value(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}
