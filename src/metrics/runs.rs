//! Run metrics derived from the event stream, not from the supervisor: the
//! hub hands every durable transition to [`RunMetrics`] (an
//! [`events::Observer`](crate::events::Observer)) in sequence order, before
//! any subscriber sees it. From those it keeps the records by state, counts
//! finished runs by exit state and dropped output bytes, and times spawn
//! (queued → running), kill-to-idle (terminating → idle) and run duration.
//!
//! A change carries the record after the transition, not the state before,
//! so the observer remembers the state of every record that is not idle
//! (those are few: the queue, the slots, the runs being put down). A record
//! it does not hold is idle, unless its id is at or above the next id the
//! store had when the metrics started and no event has named it yet: then
//! the change is its creation (creations are published in id order).
//! The starting point is one scan of the store's records at start-up,
//! before the supervisor writes anything, so the counts are right after a
//! restart too.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::events::Observer;
use crate::model::{Change, ChangeKind, ExitState, ProcessId, Record, State};
use crate::store::{Store, StoreError};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabel {
    exit_state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    stream: &'static str,
}

/// Upper bounds of the run duration buckets, seconds.
const RUN_DURATION_BUCKETS: [f64; 19] = [
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
    3600.0, 7200.0, 21600.0, 86400.0,
];

/// What the observer remembers of a record that is not idle.
#[derive(Clone, Copy, Debug)]
struct Unsettled {
    state: State,
    /// When the observer saw it enter that state (`None`: it was in that
    /// state when the metrics started).
    since: Option<Instant>,
}

#[derive(Debug, Default)]
struct Seen {
    unsettled: HashMap<ProcessId, Unsettled>,
    /// Ids at or above this have not been named by any change yet.
    next_id: u64,
}

#[derive(Debug)]
pub struct RunMetrics {
    seen: Mutex<Seen>,
    by_state: Family<StateLabel, Gauge>,
    finished: Family<ExitLabel, Counter>,
    dropped: Family<StreamLabel, Counter>,
    spawn_latency: Histogram,
    kill_to_idle: Histogram,
    run_duration: Histogram,
}

fn seconds_between_ms(from: u64, to: u64) -> f64 {
    to.saturating_sub(from) as f64 / 1000.0
}

impl RunMetrics {
    /// Starts from the records in `store` (one scan). Call before the
    /// supervisor starts writing, and let the hub report every change made
    /// afterwards.
    pub fn census(store: &Store) -> Result<RunMetrics, StoreError> {
        let m = RunMetrics::empty();
        let mut seen = Seen {
            next_id: store.next_id()?,
            ..Seen::default()
        };
        let mut counts = [0i64; 4];
        store.scan_newest_first(None, |r| {
            counts[state_index(r.state)] += 1;
            seen.next_id = seen.next_id.max(r.id.0 + 1);
            if r.state != State::Idle {
                seen.unsettled.insert(
                    r.id,
                    Unsettled {
                        state: r.state,
                        since: None,
                    },
                );
            }
            true
        })?;
        for s in State::ALL {
            m.gauge(s).set(counts[state_index(s)]);
        }
        *m.seen.lock().expect("run metrics") = seen;
        Ok(m)
    }

    fn empty() -> RunMetrics {
        let m = RunMetrics {
            seen: Mutex::default(),
            by_state: Family::default(),
            finished: Family::default(),
            dropped: Family::default(),
            spawn_latency: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            kill_to_idle: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
            run_duration: Histogram::new(RUN_DURATION_BUCKETS),
        };
        // Every label value from the first scrape on, at zero.
        for s in State::ALL {
            m.gauge(s);
        }
        for e in ExitState::ALL {
            let _ = m.finished.get_or_create(&ExitLabel {
                exit_state: e.as_str(),
            });
        }
        for stream in ["stdout", "stderr"] {
            let _ = m.dropped.get_or_create(&StreamLabel { stream });
        }
        m
    }

    fn gauge(&self, s: State) -> Gauge {
        self.by_state
            .get_or_create_owned(&StateLabel { state: s.as_str() })
    }

    /// Adds the series to `registry` (prefixed by it).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "processes",
            "Process records by state",
            self.by_state.clone(),
        );
        registry.register(
            "runs_finished",
            "Runs that ended (entered idle from queued, running or terminating) since the daemon started, by exit state",
            self.finished.clone(),
        );
        registry.register_with_unit(
            "spawn_latency",
            "From a run's queued event to its running event (includes waiting for a free slot under max_running)",
            Unit::Seconds,
            self.spawn_latency.clone(),
        );
        registry.register_with_unit(
            "kill_to_idle",
            "From a run's terminating event (kill, timeout, shutdown) to its idle event",
            Unit::Seconds,
            self.kill_to_idle.clone(),
        );
        registry.register_with_unit(
            "run_duration",
            "From a run's startedAt to its completedAt, for runs that got to running",
            Unit::Seconds,
            self.run_duration.clone(),
        );
        registry.register_with_unit(
            "output_dropped",
            "Captured output bytes dropped past max_output_bytes (or unstorable), counted when the run ends",
            Unit::Bytes,
            self.dropped.clone(),
        );
    }

    fn observe_at(&self, change: &Change, now: Instant) {
        let rec = &change.record;
        let id = rec.id;
        let mut seen = self.seen.lock().expect("run metrics");
        let before = match seen.unsettled.remove(&id) {
            Some(u) => Some(u),
            None if id.0 >= seen.next_id => None,
            None => Some(Unsettled {
                state: State::Idle,
                since: None,
            }),
        };
        seen.next_id = seen.next_id.max(id.0.saturating_add(1));
        if let Some(b) = before {
            self.gauge(b.state).dec();
        }
        let ChangeKind::Entered(state) = change.kind else {
            return; // deleted
        };
        self.gauge(state).inc();
        if state != State::Idle {
            seen.unsettled.insert(
                id,
                Unsettled {
                    state,
                    since: Some(now),
                },
            );
        }
        drop(seen);
        let Some(before) = before else { return };
        let elapsed = || before.since.map(|t| now.duration_since(t).as_secs_f64());
        match (before.state, state) {
            (State::Queued, State::Running) => {
                if let Some(s) = elapsed() {
                    self.spawn_latency.observe(s);
                }
            }
            (State::Queued | State::Running | State::Terminating, State::Idle) => {
                self.finished_run(before.state, rec);
                if before.state == State::Terminating {
                    if let Some(s) = elapsed() {
                        self.kill_to_idle.observe(s);
                    }
                }
            }
            _ => {}
        }
    }

    fn finished_run(&self, from: State, rec: &Record) {
        if let Some(e) = rec.exit_state {
            self.finished
                .get_or_create(&ExitLabel {
                    exit_state: e.as_str(),
                })
                .inc();
        }
        if from == State::Queued {
            return; // canceled while queued, or failed to start
        }
        if let (Some(start), Some(end)) = (rec.started_at, rec.completed_at) {
            self.run_duration.observe(seconds_between_ms(start, end));
        }
        for (stream, n) in [
            ("stdout", rec.stdout_dropped),
            ("stderr", rec.stderr_dropped),
        ] {
            if n > 0 {
                self.dropped
                    .get_or_create(&StreamLabel { stream })
                    .inc_by(n);
            }
        }
    }
}

impl Observer for RunMetrics {
    fn observe(&self, change: &Change) {
        self.observe_at(change, Instant::now());
    }
}

fn state_index(s: State) -> usize {
    match s {
        State::Queued => 0,
        State::Running => 1,
        State::Terminating => 2,
        State::Idle => 3,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn change(seq: u64, kind: ChangeKind, rec: &Record) -> Change {
        Change {
            seq,
            kind,
            record: rec.clone(),
        }
    }

    fn counts(m: &RunMetrics) -> [i64; 4] {
        [
            State::Queued,
            State::Running,
            State::Terminating,
            State::Idle,
        ]
        .map(|s| m.gauge(s).get())
    }

    /// `(count, sum)` of a histogram, as a scrape shows them.
    fn histogram(m: &RunMetrics, name: &str) -> (u64, f64) {
        let mut registry = Registry::default();
        m.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let value = |suffix: &str| -> f64 {
            let series = format!("{name}_seconds_{suffix} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&series))
                .unwrap_or_else(|| panic!("{series} in {text}"))
                .parse()
                .unwrap()
        };
        (value("count") as u64, value("sum"))
    }

    fn finished(m: &RunMetrics, e: ExitState) -> u64 {
        m.finished
            .get_or_create(&ExitLabel {
                exit_state: e.as_str(),
            })
            .get()
    }

    /// Feeds a record through `states` at 10 ms steps.
    fn walk(m: &RunMetrics, t0: Instant, rec: &mut Record, steps: &[State]) {
        for (i, s) in steps.iter().enumerate() {
            rec.state = *s;
            m.observe_at(
                &change(0, ChangeKind::Entered(*s), rec),
                t0 + Duration::from_millis(10 * i as u64),
            );
        }
    }

    #[test]
    fn states_outcomes_and_timings_follow_the_events() {
        let m = RunMetrics::empty();
        let t0 = Instant::now();
        // Created queued, runs, exits 0.
        let mut a = Record::new(ProcessId(1), None, 0);
        a.started_at = Some(1_000);
        a.completed_at = Some(3_500);
        a.exit_state = Some(ExitState::Success);
        a.stdout_dropped = 7;
        walk(&m, t0, &mut a, &[State::Queued, State::Running]);
        assert_eq!(counts(&m), [0, 1, 0, 0]);
        walk(&m, t0, &mut a, &[State::Idle]);
        assert_eq!(counts(&m), [0, 0, 0, 1]);
        assert_eq!(finished(&m, ExitState::Success), 1);
        let (n, sum) = histogram(&m, "spawn_latency");
        assert!(n == 1 && (sum - 0.01).abs() < 1e-9, "{n} {sum}");
        assert_eq!(histogram(&m, "run_duration"), (1, 2.5));
        assert_eq!(
            m.dropped
                .get_or_create(&StreamLabel { stream: "stdout" })
                .get(),
            7
        );
        // Created idle, then run and killed.
        let mut b = Record::new(ProcessId(2), None, 0);
        walk(&m, t0, &mut b, &[State::Idle]);
        b.started_at = Some(0);
        b.completed_at = Some(100);
        assert_eq!(counts(&m), [0, 0, 0, 2]);
        b.exit_state = Some(ExitState::Canceled);
        walk(
            &m,
            t0,
            &mut b,
            &[
                State::Queued,
                State::Running,
                State::Terminating,
                State::Idle,
            ],
        );
        assert_eq!(counts(&m), [0, 0, 0, 2]);
        assert_eq!(finished(&m, ExitState::Canceled), 1);
        let (n, sum) = histogram(&m, "kill_to_idle");
        assert!(n == 1 && (sum - 0.01).abs() < 1e-9, "{n} {sum}");
        // Rerun of an idle record, canceled while queued: finished, but no
        // run duration.
        a.exit_state = Some(ExitState::Canceled);
        walk(&m, t0, &mut a, &[State::Queued]);
        assert_eq!(counts(&m), [1, 0, 0, 1]);
        walk(&m, t0, &mut a, &[State::Idle]);
        assert_eq!(finished(&m, ExitState::Canceled), 2);
        assert_eq!(histogram(&m, "run_duration").0, 2);
        // Deleted.
        m.observe_at(&change(0, ChangeKind::Deleted, &a), t0);
        assert_eq!(counts(&m), [0, 0, 0, 1]);
    }

    #[tokio::test]
    async fn the_census_counts_the_stored_records_and_knows_which_ids_are_new() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 0).unwrap();
        let mut batch = crate::store::Batch::durable();
        let mut running = Record::new(ProcessId(1), None, 0);
        running.state = State::Running;
        let idle = Record::new(ProcessId(2), None, 0);
        batch.put_record(&running);
        batch.put_record(&idle);
        batch.put_next_id(3);
        store.write(batch).await.unwrap();
        let m = RunMetrics::census(&store).unwrap();
        assert_eq!(counts(&m), [0, 1, 0, 1]);
        // A run found after a restart settles: no timing without its start.
        running.state = State::Idle;
        running.exit_state = Some(ExitState::Failed);
        m.observe_at(
            &change(1, ChangeKind::Entered(State::Idle), &running),
            Instant::now(),
        );
        assert_eq!(counts(&m), [0, 0, 0, 2]);
        assert_eq!(finished(&m, ExitState::Failed), 1);
        assert_eq!(histogram(&m, "kill_to_idle").0, 0);
        // Id 2 is known (idle): its run signal moves it out of idle; id 3
        // is a creation.
        let mut rerun = idle.clone();
        rerun.state = State::Queued;
        m.observe_at(
            &change(2, ChangeKind::Entered(State::Queued), &rerun),
            Instant::now(),
        );
        let mut created = Record::new(ProcessId(3), None, 0);
        created.state = State::Queued;
        m.observe_at(
            &change(3, ChangeKind::Entered(State::Queued), &created),
            Instant::now(),
        );
        assert_eq!(counts(&m), [2, 0, 0, 1]);
    }
}
