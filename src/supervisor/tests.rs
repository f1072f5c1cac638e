//! The actor against a real store in a temporary directory (whose reserve
//! the tests move to fake a full disk) and the real starter with isolation
//! off: the paths integration tests cannot steer (a refused write at a
//! chosen moment).

use std::sync::Arc;

use tokio::sync::broadcast;

use super::*;
use crate::events::Hub;
use crate::model::{Change, ChangeKind, ExitState, ProcessId, Record, State};
use crate::proc::sandbox::{FolderLimits, Paths, Policy, Requested};
use crate::store::Store;

struct Fixture {
    sup: Supervisor,
    store: Store,
    events: broadcast::Receiver<Arc<Change>>,
    _dir: tempfile::TempDir,
}

fn fixture(max_running: usize, max_queued: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let runs = dir.path().join("runs");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(&runs).unwrap();
    let store = Store::open(&data, 0).unwrap();
    let paths = Paths {
        data_dir: data,
        secret_files: Vec::new(),
        runs_base: runs,
        shared_dirs: Vec::new(),
    };
    let limits = FolderLimits {
        bytes: 1 << 20,
        inodes: 64,
    };
    let policy = Policy::detect(Requested::Off, paths, limits, "/bin/sh").unwrap();
    let settings = Settings {
        default_timeout_ms: None,
        kill_grace_ms: 5_000,
        max_running,
        shell: "/bin/sh".into(),
        env: Vec::new(),
        max_output_bytes: 1 << 20,
        sandbox: Arc::new(policy),
        run_uids: None,
        network: true,
        event_retention: 1000,
        cgroups: None,
        max_queued,
        rlimits: Vec::new(),
        credentials: None,
        cgroup_limits: Vec::new(),
        idempotency_retention_ms: 60_000,
        service: None,
    };
    let hub = Arc::new(Hub::new(1024));
    let events = hub.subscribe();
    let sup = Supervisor::start(store.clone(), settings, hub, Default::default()).unwrap();
    Fixture {
        sup,
        store,
        events,
        _dir: dir,
    }
}

fn create(code: &str, autorun: bool) -> CreateRequest {
    CreateRequest {
        code: code.into(),
        r#ref: None,
        timeout: Timeout::Default,
        kill_grace_ms: None,
        network: None,
        autorun,
        idempotency: None,
    }
}

fn keyed(code: &str, key: &str) -> CreateRequest {
    let mut fingerprint = [0; 32];
    fingerprint[..code.len().min(32)].copy_from_slice(&code.as_bytes()[..code.len().min(32)]);
    CreateRequest {
        idempotency: Some(crate::model::Idempotency {
            key: key.into(),
            fingerprint,
        }),
        ..create(code, true)
    }
}

impl Fixture {
    /// Waits for the event of `id` entering `state`.
    async fn entered(&mut self, id: ProcessId, state: State) -> Record {
        loop {
            let change = self.events.recv().await.expect("event stream");
            if change.record.id == id && change.kind == ChangeKind::Entered(state) {
                return change.record.clone();
            }
        }
    }
}

#[tokio::test]
async fn a_refused_rerun_rolls_back_to_the_durable_idle_record() {
    let mut f = fixture(4, 16);
    let id = f.sup.create(create("exit 0", true)).await.unwrap();
    let settled = f.entered(id, State::Idle).await;
    assert_eq!(settled.exit_state, Some(ExitState::Success));

    // The disk is full: new work is refused, facts and deletes are not.
    f.store.set_reserve(u64::MAX);
    for _ in 0..2 {
        let err = f.sup.run(id, true).await.unwrap_err();
        assert!(
            matches!(
                err,
                SupervisorError::Storage(crate::store::StoreError::Full)
            ),
            "a refused rerun answers that the disk is full, not {err:?}"
        );
    }
    assert_eq!(f.store.get(id).unwrap().unwrap().state, State::Idle);
    // In memory it is idle again too: a delete is accepted.
    let deleted = f.sup.delete(id).await.unwrap();
    assert_eq!(deleted.state, State::Idle);
    assert!(f.store.get(id).unwrap().is_none());
    assert!(matches!(
        f.sup.kill(id).await.unwrap_err(),
        SupervisorError::NotFound
    ));
    f.sup.shutdown().await;
}

#[tokio::test]
async fn a_refused_create_leaves_nothing() {
    let mut f = fixture(4, 16);
    f.store.set_reserve(u64::MAX);
    let err = f.sup.create(create("exit 0", true)).await.unwrap_err();
    assert!(matches!(err, SupervisorError::Storage(_)), "{err:?}");
    f.store.set_reserve(0);
    let id = f.sup.create(create("exit 0", true)).await.unwrap();
    f.entered(id, State::Idle).await;
    let earlier = ProcessId(id.0 - 1);
    assert!(f.store.get(earlier).unwrap().is_none());
    assert!(matches!(
        f.sup.delete(earlier).await.unwrap_err(),
        SupervisorError::NotFound
    ));
    f.sup.shutdown().await;
}

#[tokio::test]
async fn admission_counts_queued_runs_and_slots_come_back() {
    let mut f = fixture(1, 1);
    let first = f.sup.create(create("exec sleep 600", true)).await.unwrap();
    f.entered(first, State::Running).await;
    // The only slot is held: the next run waits, the one after is refused.
    let second = f.sup.create(create("exit 0", true)).await.unwrap();
    assert!(matches!(
        f.sup.create(create("exit 0", true)).await.unwrap_err(),
        SupervisorError::TooManyQueued
    ));
    // An idle record does not count; its run signal does.
    let idle = f.sup.create(create("exit 0", false)).await.unwrap();
    assert!(matches!(
        f.sup.run(idle, false).await.unwrap_err(),
        SupervisorError::TooManyQueued
    ));
    // Cancelling the queued one frees its place in the queue.
    let canceled = f.sup.kill(second).await.unwrap();
    assert_eq!(canceled.exit_state, Some(ExitState::Canceled));
    let third = f.sup.run(idle, false).await.unwrap();
    assert_eq!(third.state, State::Queued);
    // Killing the running one gives its slot to the queued one.
    f.sup.kill(first).await.unwrap();
    let killed = f.entered(first, State::Idle).await;
    assert_eq!(killed.exit_state, Some(ExitState::Canceled));
    let ran = f.entered(idle, State::Idle).await;
    assert_eq!(ran.exit_state, Some(ExitState::Success));
    f.sup.shutdown().await;
}

#[tokio::test]
async fn repeats_of_a_key_in_flight_get_the_first_answer_and_start_nothing() {
    let mut f = fixture(4, 64);
    // Sent together: the first claims the key, the others wait for its
    // write and get its id.
    let answers =
        futures_util::future::join_all((0..16).map(|_| f.sup.create(keyed("exit 0", "k1")))).await;
    let ids: Vec<ProcessId> = answers.into_iter().map(Result::unwrap).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
    f.entered(ids[0], State::Idle).await;
    // Later, from the store: the same id; a different request is refused.
    assert_eq!(f.sup.create(keyed("exit 0", "k1")).await.unwrap(), ids[0]);
    assert!(matches!(
        f.sup.create(keyed("exit 1", "k1")).await.unwrap_err(),
        SupervisorError::IdempotencyConflict
    ));
    // One record exists, and it ran once.
    let next = f.sup.create(create("exit 0", false)).await.unwrap();
    assert_eq!(next.0, ids[0].0 + 1, "no id was spent on a repeat");
    assert_eq!(f.store.get(ids[0]).unwrap().unwrap().state, State::Idle);
    f.sup.shutdown().await;
}

#[tokio::test]
async fn a_key_whose_create_was_refused_is_free_again() {
    let mut f = fixture(4, 16);
    f.store.set_reserve(u64::MAX);
    assert!(matches!(
        f.sup.create(keyed("exit 0", "k2")).await.unwrap_err(),
        SupervisorError::Storage(_)
    ));
    f.store.set_reserve(0);
    let id = f.sup.create(keyed("exit 0", "k2")).await.unwrap();
    f.entered(id, State::Idle).await;
    assert_eq!(f.sup.create(keyed("exit 0", "k2")).await.unwrap(), id);
    f.sup.shutdown().await;
}
