//! The on-disk value codec for process records.
//!
//! One leading version byte, then fixed-order fields. Version 2 appends
//! `killed` and `escaped` to version 1; version 3 appends `network`,
//! `sandbox` and `run_uid`; version 4 appends `resources`. Older values
//! still decode (the new fields absent, `network` true).
//! Integers are big-endian; an optional value is a presence byte (0/1)
//! followed by the value; a string is a u32 length and UTF-8 bytes. A new
//! field means a new version byte and a decoder that still reads every older
//! one: the golden-bytes tests below pin today's bytes so that never breaks
//! silently. Knows nothing of RocksDB or HTTP.

use crate::model::{
    ChangeKind, ExitState, ProcIdentity, ProcessId, Record, Resources, SandboxLevel, State,
    TermCause, UsageSource,
};

pub const RECORD_V1: u8 = 1;
pub const RECORD_V2: u8 = 2;
pub const RECORD_V3: u8 = 3;
pub const RECORD_V4: u8 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record value is truncated")]
    Truncated,
    #[error("unknown record format version {0}")]
    UnknownVersion(u8),
    #[error("invalid {0} tag {1}")]
    BadTag(&'static str, u8),
    #[error("record string is not UTF-8")]
    BadUtf8,
    #[error("{0} trailing bytes after record")]
    Trailing(usize),
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn str(&mut self, s: &str) {
        self.0.extend_from_slice(&(s.len() as u32).to_be_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn opt<T>(&mut self, v: &Option<T>, f: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v)
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let len = u32::from_be_bytes(self.take(4)?.try_into().unwrap()) as usize;
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| DecodeError::BadUtf8)
    }
    fn bool(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            t => Err(DecodeError::BadTag("bool", t)),
        }
    }
    fn opt<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        if self.bool()? {
            Ok(Some(f(self)?))
        } else {
            Ok(None)
        }
    }
}

pub(super) fn state_tag(s: State) -> u8 {
    match s {
        State::Queued => 1,
        State::Running => 2,
        State::Terminating => 3,
        State::Idle => 4,
    }
}

pub(super) fn exit_tag(s: ExitState) -> u8 {
    match s {
        ExitState::Success => 1,
        ExitState::Failed => 2,
        ExitState::Timeout => 3,
        ExitState::Canceled => 4,
    }
}

fn sandbox_tag(l: SandboxLevel) -> u8 {
    match l {
        SandboxLevel::Full => 1,
        SandboxLevel::Landlock => 2,
        SandboxLevel::None => 3,
    }
}

fn cause_tag(c: TermCause) -> u8 {
    match c {
        TermCause::Kill => 1,
        TermCause::Timeout => 2,
        TermCause::Shutdown => 3,
        TermCause::Restart => 4,
    }
}

/// An event value: one kind byte (a state tag, or 5 for deleted), then the
/// record as [`encode_record`] writes it.
pub fn encode_change(kind: ChangeKind, r: &Record) -> Vec<u8> {
    let tag = match kind {
        ChangeKind::Entered(s) => state_tag(s),
        ChangeKind::Deleted => 5,
    };
    let mut out = vec![tag];
    out.extend_from_slice(&encode_record(r));
    out
}

pub fn decode_change(bytes: &[u8]) -> Result<(ChangeKind, Record), DecodeError> {
    let (&tag, rest) = bytes.split_first().ok_or(DecodeError::Truncated)?;
    let kind = match tag {
        5 => ChangeKind::Deleted,
        t => ChangeKind::Entered(state_from_tag(t)?),
    };
    Ok((kind, decode_record(rest)?))
}

fn state_from_tag(t: u8) -> Result<State, DecodeError> {
    match t {
        1 => Ok(State::Queued),
        2 => Ok(State::Running),
        3 => Ok(State::Terminating),
        4 => Ok(State::Idle),
        t => Err(DecodeError::BadTag("state", t)),
    }
}

pub fn encode_record(r: &Record) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(128));
    w.u8(RECORD_V4);
    w.u64(r.id.0);
    w.opt(&r.r#ref, |w, s| w.str(s));
    w.u8(state_tag(r.state));
    w.opt(&r.exit_state, |w, e| w.u8(exit_tag(*e)));
    w.opt(&r.error, |w, s| w.str(s));
    w.u64(r.created_at);
    w.opt(&r.started_at, |w, v| w.u64(*v));
    w.opt(&r.completed_at, |w, v| w.u64(*v));
    w.opt(&r.identity, |w, i| {
        w.i32(i.pid);
        w.u64(i.start_time);
        w.str(&i.boot_id);
    });
    w.opt(&r.exit_code, |w, v| w.i32(*v));
    w.opt(&r.signal, |w, v| w.i32(*v));
    w.opt(&r.timeout_ms, |w, v| w.u64(*v));
    w.u64(r.kill_grace_ms);
    w.opt(&r.term_cause, |w, c| w.u8(cause_tag(*c)));
    w.opt(&r.kill_deadline, |w, v| w.u64(*v));
    w.u64(r.stdout_len);
    w.u64(r.stderr_len);
    w.u64(r.stdout_dropped);
    w.u64(r.stderr_dropped);
    w.u8(r.has_output as u8);
    w.opt(&r.killed, |w, v| w.u32(*v));
    w.opt(&r.escaped, |w, v| w.u32(*v));
    w.u8(r.network as u8);
    w.opt(&r.sandbox, |w, l| w.u8(sandbox_tag(*l)));
    w.opt(&r.run_uid, |w, v| w.u32(*v));
    w.opt(&r.resources, |w, u| {
        w.u64(u.cpu_user_ms);
        w.u64(u.cpu_system_ms);
        w.opt(&u.peak_memory_bytes, |w, v| w.u64(*v));
        w.u8(u.oom_killed as u8);
        w.opt(&u.peak_processes, |w, v| w.u64(*v));
        w.u8(match u.source {
            UsageSource::Cgroup => 1,
            UsageSource::Rusage => 2,
        });
    });
    w.0
}

pub fn decode_record(bytes: &[u8]) -> Result<Record, DecodeError> {
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if !(RECORD_V1..=RECORD_V4).contains(&version) {
        return Err(DecodeError::UnknownVersion(version));
    }
    let id = ProcessId(r.u64()?);
    let r#ref = r.opt(|r| r.str())?;
    let state = state_from_tag(r.u8()?)?;
    let exit_state = r.opt(|r| match r.u8()? {
        1 => Ok(ExitState::Success),
        2 => Ok(ExitState::Failed),
        3 => Ok(ExitState::Timeout),
        4 => Ok(ExitState::Canceled),
        t => Err(DecodeError::BadTag("exit state", t)),
    })?;
    let error = r.opt(|r| r.str())?;
    let created_at = r.u64()?;
    let started_at = r.opt(|r| r.u64())?;
    let completed_at = r.opt(|r| r.u64())?;
    let identity = r.opt(|r| {
        Ok(ProcIdentity {
            pid: r.i32()?,
            start_time: r.u64()?,
            boot_id: r.str()?,
        })
    })?;
    let exit_code = r.opt(|r| r.i32())?;
    let signal = r.opt(|r| r.i32())?;
    let timeout_ms = r.opt(|r| r.u64())?;
    let kill_grace_ms = r.u64()?;
    let term_cause = r.opt(|r| match r.u8()? {
        1 => Ok(TermCause::Kill),
        2 => Ok(TermCause::Timeout),
        3 => Ok(TermCause::Shutdown),
        4 => Ok(TermCause::Restart),
        t => Err(DecodeError::BadTag("termination cause", t)),
    })?;
    let kill_deadline = r.opt(|r| r.u64())?;
    let mut rec = Record {
        id,
        r#ref,
        state,
        exit_state,
        error,
        created_at,
        started_at,
        completed_at,
        identity,
        exit_code,
        signal,
        timeout_ms,
        kill_grace_ms,
        term_cause,
        kill_deadline,
        stdout_len: r.u64()?,
        stderr_len: r.u64()?,
        stdout_dropped: r.u64()?,
        stderr_dropped: r.u64()?,
        has_output: r.bool()?,
        killed: None,
        escaped: None,
        network: true,
        sandbox: None,
        run_uid: None,
        resources: None,
    };
    if version >= RECORD_V2 {
        rec.killed = r.opt(|r| r.u32())?;
        rec.escaped = r.opt(|r| r.u32())?;
    }
    if version >= RECORD_V3 {
        rec.network = r.bool()?;
        rec.sandbox = r.opt(|r| match r.u8()? {
            1 => Ok(SandboxLevel::Full),
            2 => Ok(SandboxLevel::Landlock),
            3 => Ok(SandboxLevel::None),
            t => Err(DecodeError::BadTag("sandbox level", t)),
        })?;
        rec.run_uid = r.opt(|r| r.u32())?;
    }
    if version >= RECORD_V4 {
        rec.resources = r.opt(|r| {
            Ok(Resources {
                cpu_user_ms: r.u64()?,
                cpu_system_ms: r.u64()?,
                peak_memory_bytes: r.opt(|r| r.u64())?,
                oom_killed: r.bool()?,
                peak_processes: r.opt(|r| r.u64())?,
                source: match r.u8()? {
                    1 => UsageSource::Cgroup,
                    2 => UsageSource::Rusage,
                    t => return Err(DecodeError::BadTag("usage source", t)),
                },
            })
        })?;
    }
    if !r.0.is_empty() {
        return Err(DecodeError::Trailing(r.0.len()));
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut r = Record::new(ProcessId(7), Some("nightly".into()), 1_795_000_000_000);
        r.state = State::Terminating;
        r.exit_state = Some(ExitState::Canceled);
        r.error = Some("x".into());
        r.started_at = Some(1_795_000_000_100);
        r.identity = Some(ProcIdentity {
            pid: 4242,
            start_time: 99,
            boot_id: "b".into(),
        });
        r.exit_code = Some(-1);
        r.signal = Some(9);
        r.timeout_ms = Some(30_000);
        r.kill_grace_ms = 5000;
        r.term_cause = Some(TermCause::Kill);
        r.kill_deadline = Some(1_795_000_005_100);
        r.stdout_len = 3;
        r.stderr_len = 4;
        r.stdout_dropped = 5;
        r.stderr_dropped = 6;
        r.has_output = true;
        r
    }

    /// Version-1 bytes as written by the first release. They must decode
    /// forever; a format change adds a version instead.
    const GOLDEN_V1: &str = concat!(
        "01",               // version
        "0000000000000007", // id
        "01",
        "00000007",
        "6e696768746c79", // ref "nightly"
        "03",             // state terminating
        "01",
        "04", // exit state canceled
        "01",
        "00000001",
        "78",               // error "x"
        "000001a1ee565e00", // created_at
        "01",
        "000001a1ee565e64", // started_at
        "00",               // completed_at null
        "01",
        "00001092",
        "0000000000000063",
        "00000001",
        "62", // identity
        "01",
        "ffffffff", // exit code -1
        "01",
        "00000009", // signal 9
        "01",
        "0000000000007530", // timeout 30000
        "0000000000001388", // kill grace 5000
        "01",
        "01", // cause kill
        "01",
        "000001a1ee5671ec", // kill deadline
        "0000000000000003",
        "0000000000000004",
        "0000000000000005",
        "0000000000000006",
        "01", // has output
    );

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Version-2 bytes: version 1's fields, then killed and escaped.
    fn golden_v2() -> String {
        format!(
            "02{}{}",
            &GOLDEN_V1[2..],
            concat!("01", "00000003", "01", "00000001")
        )
    }

    /// Version-3 bytes: version 2's fields, then network, sandbox and
    /// the run's uid.
    fn golden_v3() -> String {
        format!(
            "03{}{}",
            &golden_v2()[2..],
            concat!("00", "01", "01", "01", "70000001")
        )
    }

    fn sample_v3() -> Record {
        let mut r = sample();
        r.killed = Some(3);
        r.escaped = Some(1);
        r.network = false;
        r.sandbox = Some(SandboxLevel::Full);
        r.run_uid = Some(0x7000_0001);
        r
    }

    /// Version-4 bytes: version 3's fields, then the run's resources.
    fn golden_v4() -> String {
        format!(
            "04{}{}",
            &golden_v3()[2..],
            concat!(
                "01",               // resources present
                "00000000000004d2", // cpu user 1234 ms
                "0000000000000038", // cpu system 56 ms
                "01",
                "0000000004000000", // peak memory 64 MiB
                "01",               // oom killed
                "00",               // peak processes unknown
                "01",               // source cgroup
            )
        )
    }

    fn sample_v4() -> Record {
        let mut r = sample_v3();
        r.resources = Some(Resources {
            cpu_user_ms: 1234,
            cpu_system_ms: 56,
            peak_memory_bytes: Some(64 << 20),
            oom_killed: true,
            peak_processes: None,
            source: UsageSource::Cgroup,
        });
        r
    }

    #[test]
    fn golden_bytes_v4_encode_and_decode() {
        assert_eq!(hex(&encode_record(&sample_v4())), golden_v4());
        assert_eq!(decode_record(&unhex(&golden_v4())).unwrap(), sample_v4());
    }

    #[test]
    fn golden_bytes_v3_decode() {
        assert_eq!(decode_record(&unhex(&golden_v3())).unwrap(), sample_v3());
    }

    #[test]
    fn golden_bytes_v2_decode() {
        let mut r = sample();
        r.killed = Some(3);
        r.escaped = Some(1);
        assert_eq!(decode_record(&unhex(&golden_v2())).unwrap(), r);
    }

    /// Data written by the first release still reads.
    #[test]
    fn golden_bytes_v1_still_decode() {
        assert_eq!(decode_record(&unhex(GOLDEN_V1)).unwrap(), sample());
    }

    #[test]
    fn minimal_record_round_trips() {
        let r = Record::new(ProcessId(1), None, 0);
        assert_eq!(decode_record(&encode_record(&r)).unwrap(), r);
    }

    #[test]
    fn changes_round_trip_and_pin_their_tag() {
        let r = Record::new(ProcessId(3), None, 5);
        for kind in [ChangeKind::Entered(State::Running), ChangeKind::Deleted] {
            let bytes = encode_change(kind, &r);
            assert_eq!(decode_change(&bytes).unwrap(), (kind, r.clone()));
        }
        assert_eq!(encode_change(ChangeKind::Deleted, &r)[0], 5);
        assert_eq!(encode_change(ChangeKind::Entered(State::Idle), &r)[0], 4);
        assert_eq!(decode_change(&[9, 1]), Err(DecodeError::BadTag("state", 9)));
    }

    #[test]
    fn rejects_damage() {
        let good = encode_record(&sample());
        assert_eq!(
            decode_record(&good[..good.len() - 1]),
            Err(DecodeError::Truncated)
        );
        let mut future = good.clone();
        future[0] = 5;
        assert_eq!(decode_record(&future), Err(DecodeError::UnknownVersion(5)));
        let mut trailing = good;
        trailing.push(0);
        assert_eq!(decode_record(&trailing), Err(DecodeError::Trailing(1)));
        assert_eq!(decode_record(&[]), Err(DecodeError::Truncated));
    }
}
