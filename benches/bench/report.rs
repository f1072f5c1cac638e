//! Statistics and the report: one table and one JSON document.

use crate::*;

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Summary {
    pub(crate) n: usize,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) mean: f64,
}

/// Nearest-rank percentiles of millisecond samples.
pub(crate) fn summarize(samples: &[f64]) -> Summary {
    assert!(!samples.is_empty(), "no samples");
    let mut s = samples.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let rank = |p: f64| s[((p * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    Summary {
        n: s.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        max: s[s.len() - 1],
        mean: s.iter().sum::<f64>() / s.len() as f64,
    }
}

impl Summary {
    pub(crate) fn json(&self) -> Value {
        json!({"n": self.n, "p50_ms": r3(self.p50), "p99_ms": r3(self.p99),
               "max_ms": r3(self.max), "mean_ms": r3(self.mean)})
    }
    pub(crate) fn cell(&self) -> String {
        format!("{} / {} ms", fmt_ms(self.p50), fmt_ms(self.p99))
    }
}

pub(crate) fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn fmt_ms(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

pub(crate) fn fmt_rate(x: f64) -> String {
    if x >= 100.0 {
        format!("{:.0}", x)
    } else {
        format!("{x:.1}")
    }
}

/// A benchmark target: one value against one limit (or several, all
/// needed). Rendered once into the table's Target and Met columns and the
/// JSON's `targets`, so the two never disagree.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    /// The JSON name (what is measured, with its unit).
    pub(crate) name: String,
    pub(crate) value: f64,
    /// How the table and the JSON state the limit, e.g. `≥ 0.5`.
    pub(crate) text: String,
    pub(crate) met: bool,
}

impl Target {
    /// `value ≥ limit`.
    pub(crate) fn at_least(name: &str, value: f64, limit: f64) -> Target {
        Target {
            name: name.to_string(),
            value,
            text: format!("≥ {limit}"),
            met: value >= limit,
        }
    }

    /// `value ≤ limit` (in `unit`, which may be empty).
    pub(crate) fn at_most(name: &str, value: f64, limit: f64, unit: &str) -> Target {
        let unit = if unit.is_empty() {
            String::new()
        } else {
            format!(" {unit}")
        };
        Target {
            name: name.to_string(),
            value,
            text: format!("≤ {limit}{unit}"),
            met: value <= limit,
        }
    }

    /// Both this and `other` (their texts joined; the value stays this one's).
    pub(crate) fn and(mut self, other: Target) -> Target {
        self.text = format!("{} and {}: {}", self.text, other.name, other.text);
        self.met &= other.met;
        self
    }

    fn json(&self) -> Value {
        json!({"name": self.name, "value": r3(self.value), "target": self.text, "met": self.met})
    }
}

pub(crate) struct Row {
    pub(crate) metric: String,
    pub(crate) value: String,
    pub(crate) baseline: String,
    pub(crate) ratio: String,
    pub(crate) target: Option<Target>,
}

#[derive(Default)]
pub(crate) struct Report {
    pub(crate) rows: Vec<Row>,
    pub(crate) json: serde_json::Map<String, Value>,
    /// The isolation-step table (section `steps`), printed after the main one.
    pub(crate) steps_table: String,
}

impl Report {
    pub(crate) fn row(&mut self, metric: &str, value: String) -> &mut Row {
        self.rows.push(Row {
            metric: metric.to_string(),
            value,
            baseline: String::new(),
            ratio: String::new(),
            target: None,
        });
        self.rows.last_mut().expect("row")
    }

    /// Every target of the rows, for the JSON document.
    pub(crate) fn targets(&self) -> Vec<Value> {
        self.rows
            .iter()
            .filter_map(|r| r.target.as_ref())
            .map(Target::json)
            .collect()
    }

    pub(crate) fn table(&self) -> String {
        let mut out = String::new();
        out.push_str("| # | Metric | cyrneld | Baseline (same run) | Ratio | Target | Met |\n");
        out.push_str("| --- | --- | --- | --- | --- | --- | --- |\n");
        for (i, r) in self.rows.iter().enumerate() {
            let (target, met) = match &r.target {
                Some(t) => (t.text.as_str(), if t.met { "yes" } else { "**no**" }),
                None => ("", ""),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                i + 1,
                r.metric,
                r.value,
                r.baseline,
                r.ratio,
                target,
                met
            );
        }
        out
    }
}

impl Row {
    pub(crate) fn baseline(&mut self, b: String) -> &mut Row {
        self.baseline = b;
        self
    }
    pub(crate) fn ratio(&mut self, r: f64) -> &mut Row {
        self.ratio = format!("{r:.2}");
        self
    }
    pub(crate) fn meets(&mut self, t: Target) -> &mut Row {
        self.target = Some(t);
        self
    }
}

/// A small deterministic PRNG (xorshift64*), for random ids and cursors.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}
