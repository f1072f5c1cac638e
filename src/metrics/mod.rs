//! The daemon's Prometheus metrics, built with `prometheus-client` (the
//! official Rust client) and rendered in the Prometheus text format for
//! `GET /metrics`. Aggregate series only: no per-run label, whose
//! cardinality would grow with every run. Values that live elsewhere (the
//! store's memory use) are read at scrape time. Knows nothing of HTTP.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::model::SandboxLevel;
use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LevelLabel {
    level: String,
}

/// Every series the daemon exports, and the registry that renders them.
pub struct Metrics {
    registry: Registry,
    store: Store,
    cache: Gauge,
    cache_pinned: Gauge,
    memtables: Gauge,
}

impl Metrics {
    pub fn new(store: Store, sandbox: SandboxLevel) -> Metrics {
        let mut registry = Registry::with_prefix("cyrnel");
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").to_string(),
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
                .get_or_create(&LevelLabel {
                    level: l.as_str().to_string(),
                })
                .set(i64::from(l == sandbox));
        }
        registry.register(
            "sandbox_level",
            "The isolation level runs get (1 for the level in force)",
            level,
        );
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
            registry,
            store,
            cache,
            cache_pinned,
            memtables,
        }
    }

    /// The text exposition of every series, with the values read now.
    pub fn render(&self) -> String {
        let m = self.store.memory_usage();
        self.cache.set(gauge_value(m.cache));
        self.cache_pinned.set(gauge_value(m.cache_pinned));
        self.memtables.set(gauge_value(m.memtables));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn gauge_value(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}
