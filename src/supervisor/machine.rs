//! The state machine: (record, event) → next record + effects, as pure
//! functions. No processes, no clocks (time comes in with the event), no
//! I/O, so every transition is unit-tested directly. The actor in `mod.rs`
//! persists the new record and carries out the effects.

use crate::model::{
    signal_name, ExitState, ProcIdentity, Record, Resources, SandboxLevel, State, TermCause,
    UsageSource,
};
use crate::proc::cgroup::CgroupUsage;
use crate::proc::{ExitStatus, Rusage};

/// Message for a run found alive (or dead) after a daemon restart.
pub const RESTARTED_ERROR: &str = "Supervisor restarted while the process was running.";

/// Message for a re-adopted run that ended while the daemon was down, on a
/// kernel that keeps no exit status for a process that is not our child.
pub const EXIT_LOST_ERROR: &str =
    "Exit status unknown: the supervisor restarted after the process ended.";

#[derive(Debug)]
pub enum Event {
    /// A client's kill signal.
    Kill { now: u64 },
    /// A client's run signal.
    Run { force: bool },
    /// A client's delete.
    Delete,
    /// The process was spawned.
    Started {
        identity: ProcIdentity,
        /// The isolation the run got, and the uid its processes run as.
        sandbox: SandboxLevel,
        uid: Option<u32>,
        now: u64,
    },
    /// The process could not be spawned.
    StartFailed { error: String, now: u64 },
    /// `options.timeout` expired.
    TimedOut { now: u64 },
    /// The daemon is stopping; `grace` is the longest it may wait.
    Shutdown { now: u64, grace: u64 },
    /// Found non-idle at start-up; `alive` says whether any process of the
    /// recorded group still exists.
    Recovered { alive: bool, now: u64 },
    /// The leader has exited and the group is empty.
    Settled {
        status: Option<ExitStatus>,
        /// The status is unknown because the leader ended while the daemon
        /// was down (a crash) on a kernel that keeps no exit status.
        status_lost: bool,
        output: OutputOutcome,
        streams: StreamStats,
        /// Processes our signals reached, and those outside the group.
        killed: Option<u32>,
        escaped: Option<u32>,
        /// What the run used (see [`resources`]).
        resources: Option<Resources>,
        now: u64,
    },
}

/// A settled run's resources from what the kernel reported: the run's
/// cgroup where it has one (every process of the run), else the leader's
/// `wait` accounting (the leader and the children it waited for; it misses
/// processes that left the leader, which the leader never waited for).
/// Peak memory comes from the cgroup's `memory.peak` when the memory
/// controller is enabled, else from the largest resident set `wait`
/// reported; `peakProcesses` needs the pids controller, `oomKilled` the
/// memory controller.
pub fn resources(leader: Option<Rusage>, cgroup: Option<CgroupUsage>) -> Option<Resources> {
    let ms = |us: u64| us / 1000;
    match (cgroup, leader) {
        (Some(cg), leader) => Some(Resources {
            cpu_user_ms: ms(cg.user_us),
            cpu_system_ms: ms(cg.system_us),
            peak_memory_bytes: cg.memory_peak.or(leader.map(|l| l.max_rss_bytes)),
            oom_killed: cg.oom_kills.is_some_and(|n| n > 0),
            peak_processes: cg.pids_peak,
            source: UsageSource::Cgroup,
        }),
        (None, Some(l)) => Some(Resources {
            cpu_user_ms: ms(l.user_us),
            cpu_system_ms: ms(l.system_us),
            peak_memory_bytes: Some(l.max_rss_bytes),
            oom_killed: false,
            peak_processes: None,
            source: UsageSource::Rusage,
        }),
        (None, None) => None,
    }
}

/// What the CYRNEL_OUTPUT file held at the end of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputOutcome {
    None,
    Object(Vec<u8>),
    Invalid(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub stdout_len: u64,
    pub stderr_len: u64,
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
}

/// How a transition's write may be treated when free space runs low.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// Records what processes did, or a kill or delete: may use the
    /// storage reserve.
    Fact,
    /// New work (a rerun): refused below the storage reserve.
    NewWork,
}

/// Everything the actor must do for a decided transition. It carries out
/// each one, in order, in one exhaustive `match`.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Write the decided record in one durable batch, together with what
    /// the other effects add to it. Always the first effect.
    Persist(Priority),
    /// Take the record out of the run queue (it never started).
    Dequeue,
    /// Put the record at the end of the run queue (once durable).
    Enqueue,
    /// Remove the previous run's outputs (in the same write).
    ClearOutputs,
    /// Remove the record with its code and outputs.
    DeleteAll,
    /// Send SIGTERM to the group (once durable) and SIGKILL at the deadline.
    Terminate { deadline: u64 },
    /// Move an already running escalation's SIGKILL earlier.
    Hasten { deadline: u64 },
    /// Arm the run's timeout.
    ArmTimeout { after_ms: u64 },
    /// The run is over: reap, release the run slot, store the output.
    Finish { output: Option<Vec<u8>> },
}

/// Why a request was refused; the API maps these to 409/400.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Reject {
    #[error("Process is already terminating.")]
    AlreadyTerminating,
    #[error("Process is already idle.")]
    AlreadyIdle,
    #[error("Process must be idle to accept a run signal.")]
    RunNotIdle,
    #[error("Process has existing outputs. Set force: true to overwrite.")]
    HasOutputs,
    #[error("Process must be idle before it can be deleted.")]
    DeleteNotIdle,
    /// The event does not apply in this state (internal; never reaches a
    /// client).
    #[error("event does not apply in this state")]
    Stale,
}

pub type Decision = Result<(Record, Vec<Effect>), Reject>;

fn terminate(rec: &Record, cause: TermCause, now: u64, grace: u64) -> (Record, Vec<Effect>) {
    let mut next = rec.clone();
    next.state = State::Terminating;
    next.term_cause = Some(cause);
    let deadline = now.saturating_add(grace);
    next.kill_deadline = Some(deadline);
    (next, vec![Effect::Terminate { deadline }])
}

/// Clears everything a run leaves behind, for a new run.
fn reset_run(next: &mut Record) {
    next.exit_state = None;
    next.error = None;
    next.started_at = None;
    next.completed_at = None;
    next.identity = None;
    next.run_uid = None;
    next.exit_code = None;
    next.signal = None;
    next.term_cause = None;
    next.kill_deadline = None;
    next.stdout_len = 0;
    next.stderr_len = 0;
    next.stdout_dropped = 0;
    next.stderr_dropped = 0;
    next.has_output = false;
    next.killed = None;
    next.escaped = None;
    next.sandbox = None;
    next.resources = None;
}

/// Decides `event` for `rec`: the next record and everything the actor
/// must do about it (see [`Effect`]).
pub fn decide(rec: &Record, event: Event) -> Decision {
    let priority = match event {
        Event::Run { .. } => Priority::NewWork,
        _ => Priority::Fact,
    };
    let (next, mut effects) = transition(rec, event)?;
    effects.insert(0, Effect::Persist(priority));
    Ok((next, effects))
}

fn transition(rec: &Record, event: Event) -> Decision {
    use State::*;
    match (rec.state, event) {
        (Queued, Event::Kill { now }) => {
            let mut next = rec.clone();
            next.state = Idle;
            next.exit_state = Some(ExitState::Canceled);
            next.completed_at = Some(now);
            Ok((next, vec![Effect::Dequeue]))
        }
        (Running, Event::Kill { now }) => {
            Ok(terminate(rec, TermCause::Kill, now, rec.kill_grace_ms))
        }
        (Terminating, Event::Kill { .. }) => Err(Reject::AlreadyTerminating),
        (Idle, Event::Kill { .. }) => Err(Reject::AlreadyIdle),

        (Idle, Event::Run { force }) => {
            if rec.has_outputs() && !force {
                return Err(Reject::HasOutputs);
            }
            let mut next = rec.clone();
            reset_run(&mut next);
            next.state = Queued;
            Ok((next, vec![Effect::ClearOutputs, Effect::Enqueue]))
        }
        (_, Event::Run { .. }) => Err(Reject::RunNotIdle),

        (Idle, Event::Delete) => Ok((rec.clone(), vec![Effect::DeleteAll])),
        (_, Event::Delete) => Err(Reject::DeleteNotIdle),

        (
            Queued,
            Event::Started {
                identity,
                sandbox,
                uid,
                now,
            },
        ) => {
            let mut next = rec.clone();
            next.state = Running;
            next.started_at = Some(now);
            next.identity = Some(identity);
            next.sandbox = Some(sandbox);
            next.run_uid = uid;
            let effects = rec
                .timeout_ms
                .map(|after_ms| vec![Effect::ArmTimeout { after_ms }])
                .unwrap_or_default();
            Ok((next, effects))
        }
        (Queued, Event::StartFailed { error, now }) => {
            let mut next = rec.clone();
            next.state = Idle;
            next.started_at = Some(now);
            next.completed_at = Some(now);
            next.exit_state = Some(ExitState::Failed);
            next.error = Some(format!("Failed to start: {error}"));
            Ok((next, vec![Effect::Finish { output: None }]))
        }

        (Running, Event::TimedOut { now }) => {
            Ok(terminate(rec, TermCause::Timeout, now, rec.kill_grace_ms))
        }

        (Running, Event::Shutdown { now, grace }) => Ok(terminate(
            rec,
            TermCause::Shutdown,
            now,
            rec.kill_grace_ms.min(grace),
        )),
        (Terminating, Event::Shutdown { now, grace }) => {
            let deadline = now.saturating_add(grace);
            match rec.kill_deadline {
                Some(d) if d <= deadline => Err(Reject::Stale),
                _ => {
                    let mut next = rec.clone();
                    next.kill_deadline = Some(deadline);
                    Ok((next, vec![Effect::Hasten { deadline }]))
                }
            }
        }

        (Running | Terminating, Event::Recovered { alive, now }) => {
            // A run that was only running failed because we went away; one
            // that was already being terminated ends as the kill meant.
            let cause = if rec.state == Running {
                TermCause::Restart
            } else {
                TermCause::Kill
            };
            let mut next = rec.clone();
            next.term_cause = Some(cause);
            if alive {
                next.state = Terminating;
                // Resume an escalation at its original deadline.
                let deadline = rec
                    .kill_deadline
                    .unwrap_or_else(|| now.saturating_add(rec.kill_grace_ms));
                next.kill_deadline = Some(deadline);
                Ok((next, vec![Effect::Terminate { deadline }]))
            } else {
                Ok(settle(
                    &next,
                    None,
                    false,
                    OutputOutcome::None,
                    StreamStats::default(),
                    now,
                ))
            }
        }

        (
            Running | Terminating,
            Event::Settled {
                status,
                status_lost,
                output,
                streams,
                killed,
                escaped,
                resources,
                now,
            },
        ) => {
            let (mut next, fx) = settle(rec, status, status_lost, output, streams, now);
            next.killed = killed;
            next.escaped = escaped;
            next.resources = resources;
            Ok((next, fx))
        }

        _ => Err(Reject::Stale),
    }
}

/// The outcome mapping of the contract.
fn settle(
    rec: &Record,
    status: Option<ExitStatus>,
    // The status is unknown because the leader ended while the daemon was
    // down (see `Event::Settled`).
    status_lost: bool,
    output: OutputOutcome,
    streams: StreamStats,
    now: u64,
) -> (Record, Vec<Effect>) {
    let mut next = rec.clone();
    next.state = State::Idle;
    next.completed_at = Some(now);
    next.identity = None;
    next.run_uid = None;
    next.kill_deadline = None;
    next.stdout_len = streams.stdout_len;
    next.stderr_len = streams.stderr_len;
    next.stdout_dropped = streams.stdout_dropped;
    next.stderr_dropped = streams.stderr_dropped;
    let (exit_code, signal) = match status {
        Some(ExitStatus::Code(c)) => (Some(c), None),
        Some(ExitStatus::Signal(s)) => (None, Some(s)),
        None => (None, None),
    };
    next.exit_code = exit_code;
    next.signal = signal;
    let (stored, invalid) = match output {
        OutputOutcome::None => (None, None),
        OutputOutcome::Object(bytes) => (Some(bytes), None),
        OutputOutcome::Invalid(msg) => (None, Some(msg)),
    };
    next.has_output = stored.is_some();
    let (exit_state, error) = match rec.term_cause {
        Some(TermCause::Kill | TermCause::Shutdown) => (ExitState::Canceled, None),
        Some(TermCause::Timeout) => (ExitState::Timeout, None),
        Some(TermCause::Restart) => (ExitState::Failed, Some(RESTARTED_ERROR.to_string())),
        None => match status {
            Some(ExitStatus::Code(0)) => match invalid {
                None => (ExitState::Success, None),
                Some(msg) => (ExitState::Failed, Some(msg)),
            },
            Some(ExitStatus::Code(c)) => (
                ExitState::Failed,
                Some(format!("Process exited with code {c}.")),
            ),
            Some(ExitStatus::Signal(s)) => (
                ExitState::Failed,
                Some(format!(
                    "Process was terminated by signal {}.",
                    signal_name(s)
                )),
            ),
            None if status_lost => (ExitState::Failed, Some(EXIT_LOST_ERROR.to_string())),
            None => (
                ExitState::Failed,
                Some("Process exit status is unknown.".to_string()),
            ),
        },
    };
    next.term_cause = None;
    next.exit_state = Some(exit_state);
    next.error = error;
    (next, vec![Effect::Finish { output: stored }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ProcessId;

    fn rec(state: State) -> Record {
        let mut r = Record::new(ProcessId(1), None, 100);
        r.state = state;
        r.kill_grace_ms = 500;
        r.timeout_ms = Some(1000);
        r
    }

    fn ident() -> ProcIdentity {
        ProcIdentity {
            pid: 42,
            start_time: 7,
            boot_id: "b".into(),
        }
    }

    fn running() -> Record {
        decide(
            &rec(State::Queued),
            Event::Started {
                identity: ident(),
                sandbox: SandboxLevel::Full,
                uid: Some(0x7000_0000),
                now: 200,
            },
        )
        .unwrap()
        .0
    }

    #[test]
    fn a_status_lost_in_a_restart_says_so() {
        let lost = |status_lost| settled_as(&running(), None, status_lost, OutputOutcome::None);
        assert_eq!(lost(true).error.as_deref(), Some(EXIT_LOST_ERROR));
        assert_eq!(lost(true).exit_state, Some(ExitState::Failed));
        assert_eq!(
            lost(false).error.as_deref(),
            Some("Process exit status is unknown.")
        );
    }

    fn settled(r: &Record, status: Option<ExitStatus>, output: OutputOutcome) -> Record {
        settled_as(r, status, false, output)
    }

    fn settled_as(
        r: &Record,
        status: Option<ExitStatus>,
        status_lost: bool,
        output: OutputOutcome,
    ) -> Record {
        decide(
            r,
            Event::Settled {
                status,
                status_lost,
                output,
                streams: StreamStats::default(),
                killed: None,
                escaped: None,
                resources: None,
                now: 900,
            },
        )
        .unwrap()
        .0
    }

    #[test]
    fn kill_queued_cancels_at_once() {
        let (next, fx) = decide(&rec(State::Queued), Event::Kill { now: 5 }).unwrap();
        assert_eq!(next.state, State::Idle);
        assert_eq!(next.exit_state, Some(ExitState::Canceled));
        assert_eq!(next.completed_at, Some(5));
        assert_eq!(fx, vec![Effect::Persist(Priority::Fact), Effect::Dequeue]);
    }

    #[test]
    fn kill_running_terminates_with_deadline() {
        let (next, fx) = decide(&running(), Event::Kill { now: 300 }).unwrap();
        assert_eq!(next.state, State::Terminating);
        assert_eq!(next.term_cause, Some(TermCause::Kill));
        assert_eq!(next.kill_deadline, Some(800));
        assert_eq!(
            fx,
            vec![
                Effect::Persist(Priority::Fact),
                Effect::Terminate { deadline: 800 }
            ]
        );
        assert_eq!(next.pid(), Some(42));
    }

    #[test]
    fn kill_rejections() {
        assert_eq!(
            decide(&rec(State::Terminating), Event::Kill { now: 0 }).unwrap_err(),
            Reject::AlreadyTerminating
        );
        assert_eq!(
            decide(&rec(State::Idle), Event::Kill { now: 0 }).unwrap_err(),
            Reject::AlreadyIdle
        );
    }

    #[test]
    fn start_sets_running_and_arms_timeout() {
        let (next, fx) = decide(
            &rec(State::Queued),
            Event::Started {
                identity: ident(),
                sandbox: SandboxLevel::Full,
                uid: Some(0x7000_0000),
                now: 200,
            },
        )
        .unwrap();
        assert_eq!(next.state, State::Running);
        assert_eq!(next.started_at, Some(200));
        assert_eq!(
            fx,
            vec![
                Effect::Persist(Priority::Fact),
                Effect::ArmTimeout { after_ms: 1000 }
            ]
        );
        let mut no_limit = rec(State::Queued);
        no_limit.timeout_ms = None;
        let (_, fx) = decide(
            &no_limit,
            Event::Started {
                identity: ident(),
                sandbox: SandboxLevel::Full,
                uid: Some(0x7000_0000),
                now: 1,
            },
        )
        .unwrap();
        assert_eq!(fx, vec![Effect::Persist(Priority::Fact)]);
    }

    #[test]
    fn start_failure_fails_the_run() {
        let (next, fx) = decide(
            &rec(State::Queued),
            Event::StartFailed {
                error: "No such file".into(),
                now: 9,
            },
        )
        .unwrap();
        assert_eq!(next.state, State::Idle);
        assert_eq!(next.exit_state, Some(ExitState::Failed));
        assert_eq!(next.error.as_deref(), Some("Failed to start: No such file"));
        assert_eq!(
            fx,
            vec![
                Effect::Persist(Priority::Fact),
                Effect::Finish { output: None }
            ]
        );
    }

    #[test]
    fn natural_exits_map_to_the_contract() {
        let r = running();
        let ok = settled(
            &r,
            Some(ExitStatus::Code(0)),
            OutputOutcome::Object(b"{}".to_vec()),
        );
        assert_eq!(
            (ok.exit_state, ok.error.clone(), ok.exit_code, ok.signal),
            (Some(ExitState::Success), None, Some(0), None)
        );
        assert!(ok.has_output);
        assert_eq!(ok.pid(), None);
        assert_eq!(ok.completed_at, Some(900));

        let code3 = settled(&r, Some(ExitStatus::Code(3)), OutputOutcome::None);
        assert_eq!(code3.exit_state, Some(ExitState::Failed));
        assert_eq!(code3.error.as_deref(), Some("Process exited with code 3."));

        let segv = settled(&r, Some(ExitStatus::Signal(11)), OutputOutcome::None);
        assert_eq!(
            segv.error.as_deref(),
            Some("Process was terminated by signal SIGSEGV.")
        );
        assert_eq!(segv.signal, Some(11));
        assert_eq!(segv.exit_code, None);

        let bad = settled(
            &r,
            Some(ExitStatus::Code(0)),
            OutputOutcome::Invalid("Invalid output: line 2 is not a JSON object.".into()),
        );
        assert_eq!(bad.exit_state, Some(ExitState::Failed));
        assert_eq!(
            bad.error.as_deref(),
            Some("Invalid output: line 2 is not a JSON object.")
        );
    }

    #[test]
    fn terminated_runs_settle_by_cause() {
        let killed = decide(&running(), Event::Kill { now: 300 }).unwrap().0;
        let s = settled(&killed, Some(ExitStatus::Signal(9)), OutputOutcome::None);
        assert_eq!(
            (s.exit_state, s.error.clone(), s.signal),
            (Some(ExitState::Canceled), None, Some(9))
        );
        assert_eq!(s.term_cause, None);
        assert_eq!(s.kill_deadline, None);

        let timed = decide(&running(), Event::TimedOut { now: 1200 }).unwrap().0;
        assert_eq!(timed.term_cause, Some(TermCause::Timeout));
        let s = settled(&timed, Some(ExitStatus::Signal(15)), OutputOutcome::None);
        assert_eq!((s.exit_state, s.error), (Some(ExitState::Timeout), None));
    }

    #[test]
    fn shutdown_uses_the_shorter_grace() {
        let (next, fx) = decide(
            &running(),
            Event::Shutdown {
                now: 1000,
                grace: 100,
            },
        )
        .unwrap();
        assert_eq!(next.term_cause, Some(TermCause::Shutdown));
        assert_eq!(
            fx,
            vec![
                Effect::Persist(Priority::Fact),
                Effect::Terminate { deadline: 1100 }
            ]
        );
        let killed = decide(&running(), Event::Kill { now: 1000 }).unwrap().0; // deadline 1500
        let (h, fx) = decide(
            &killed,
            Event::Shutdown {
                now: 1000,
                grace: 100,
            },
        )
        .unwrap();
        assert_eq!(h.kill_deadline, Some(1100));
        assert_eq!(
            fx,
            vec![
                Effect::Persist(Priority::Fact),
                Effect::Hasten { deadline: 1100 }
            ]
        );
        assert_eq!(
            decide(
                &killed,
                Event::Shutdown {
                    now: 1000,
                    grace: 5000
                }
            )
            .unwrap_err(),
            Reject::Stale
        );
        let s = settled(
            &decide(&running(), Event::Shutdown { now: 1, grace: 1 })
                .unwrap()
                .0,
            None,
            OutputOutcome::None,
        );
        assert_eq!(s.exit_state, Some(ExitState::Canceled));
    }

    #[test]
    fn run_signal_rules() {
        assert_eq!(
            decide(&running(), Event::Run { force: true }).unwrap_err(),
            Reject::RunNotIdle
        );
        let never_ran = rec(State::Idle);
        let (q, fx) = decide(&never_ran, Event::Run { force: false }).unwrap();
        assert_eq!(q.state, State::Queued);
        assert_eq!(
            fx,
            vec![
                Effect::Persist(Priority::NewWork),
                Effect::ClearOutputs,
                Effect::Enqueue
            ]
        );
        let done = settled(&running(), Some(ExitStatus::Code(0)), OutputOutcome::None);
        assert_eq!(
            decide(&done, Event::Run { force: false }).unwrap_err(),
            Reject::HasOutputs
        );
        let (again, _) = decide(&done, Event::Run { force: true }).unwrap();
        assert_eq!(
            (
                again.exit_state,
                again.completed_at,
                again.started_at,
                again.exit_code
            ),
            (None, None, None, None)
        );
        let mut only_stdout = rec(State::Idle);
        only_stdout.stdout_len = 1;
        assert_eq!(
            decide(&only_stdout, Event::Run { force: false }).unwrap_err(),
            Reject::HasOutputs
        );
    }

    #[test]
    fn delete_only_when_idle() {
        assert_eq!(
            decide(&rec(State::Idle), Event::Delete).unwrap().1,
            vec![Effect::Persist(Priority::Fact), Effect::DeleteAll]
        );
        for s in [State::Queued, State::Running, State::Terminating] {
            assert_eq!(
                decide(&rec(s), Event::Delete).unwrap_err(),
                Reject::DeleteNotIdle
            );
        }
    }

    #[test]
    fn recovery_policy() {
        // Dead after restart: settles at once.
        let (r, _) = decide(
            &running(),
            Event::Recovered {
                alive: false,
                now: 5000,
            },
        )
        .unwrap();
        assert_eq!(
            (r.state, r.exit_state, r.error.as_deref()),
            (State::Idle, Some(ExitState::Failed), Some(RESTARTED_ERROR))
        );
        let killed = decide(&running(), Event::Kill { now: 300 }).unwrap().0;
        let (r, _) = decide(
            &killed,
            Event::Recovered {
                alive: false,
                now: 5000,
            },
        )
        .unwrap();
        assert_eq!((r.exit_state, r.error), (Some(ExitState::Canceled), None));
        // Alive: terminated; a kill in progress keeps its original deadline.
        let (r, fx) = decide(
            &killed,
            Event::Recovered {
                alive: true,
                now: 5000,
            },
        )
        .unwrap();
        assert_eq!(r.state, State::Terminating);
        assert_eq!(
            fx,
            vec![
                Effect::Persist(Priority::Fact),
                Effect::Terminate { deadline: 800 }
            ]
        );
        let (r, fx) = decide(
            &running(),
            Event::Recovered {
                alive: true,
                now: 5000,
            },
        )
        .unwrap();
        assert_eq!(
            fx,
            vec![
                Effect::Persist(Priority::Fact),
                Effect::Terminate { deadline: 5500 }
            ]
        );
        let s = settled(&r, None, OutputOutcome::None);
        assert_eq!(
            (s.exit_state, s.error.as_deref()),
            (Some(ExitState::Failed), Some(RESTARTED_ERROR))
        );
    }

    #[test]
    fn stale_events_are_refused() {
        assert_eq!(
            decide(&rec(State::Idle), Event::TimedOut { now: 0 }).unwrap_err(),
            Reject::Stale
        );
        assert_eq!(
            decide(
                &rec(State::Idle),
                Event::Started {
                    identity: ident(),
                    sandbox: SandboxLevel::Full,
                    uid: Some(0x7000_0000),
                    now: 0
                }
            )
            .unwrap_err(),
            Reject::Stale
        );
        assert_eq!(
            decide(
                &rec(State::Idle),
                Event::Settled {
                    status: None,
                    status_lost: false,
                    output: OutputOutcome::None,
                    streams: StreamStats::default(),
                    killed: None,
                    escaped: None,
                    resources: None,
                    now: 0
                }
            )
            .unwrap_err(),
            Reject::Stale
        );
    }

    #[test]
    fn resources_prefer_the_cgroup_and_fall_back_to_wait_accounting() {
        let leader = Rusage {
            user_us: 7_500,
            system_us: 1_200,
            max_rss_bytes: 10 << 20,
        };
        let cpu_only = CgroupUsage {
            user_us: 20_000,
            system_us: 3_000,
            ..CgroupUsage::default()
        };
        assert_eq!(
            resources(Some(leader), Some(cpu_only)),
            Some(Resources {
                cpu_user_ms: 20,
                cpu_system_ms: 3,
                peak_memory_bytes: Some(10 << 20),
                oom_killed: false,
                peak_processes: None,
                source: UsageSource::Cgroup,
            })
        );
        let full = CgroupUsage {
            memory_peak: Some(64 << 20),
            oom_kills: Some(1),
            pids_peak: Some(4),
            ..cpu_only
        };
        let r = resources(Some(leader), Some(full)).unwrap();
        assert_eq!(
            (r.peak_memory_bytes, r.oom_killed, r.peak_processes),
            (Some(64 << 20), true, Some(4))
        );
        assert_eq!(
            resources(Some(leader), None),
            Some(Resources {
                cpu_user_ms: 7,
                cpu_system_ms: 1,
                peak_memory_bytes: Some(10 << 20),
                oom_killed: false,
                peak_processes: None,
                source: UsageSource::Rusage,
            })
        );
        assert_eq!(resources(None, None), None);
    }

    #[test]
    fn a_rerun_clears_the_last_resources() {
        let mut done = settled(&running(), Some(ExitStatus::Code(0)), OutputOutcome::None);
        done.resources = resources(Some(Rusage::default()), None);
        let (queued, _) = decide(&done, Event::Run { force: true }).unwrap();
        assert_eq!(queued.resources, None);
    }
}
