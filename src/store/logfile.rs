//! Reads RocksDB's log format (write-ahead logs and the MANIFEST) without
//! RocksDB, to say exactly which file is damaged and where.
//!
//! RocksDB's own recovery reports a damaged log as "Corruption: checksum
//! mismatch" without naming the file; the operator needs the name, the
//! damaged byte ranges, and how much was readable around them. This module
//! walks a log the way RocksDB's `log::Reader` does (32 KiB blocks, 7-byte
//! legacy or 11-byte recyclable headers, CRC32C over type and payload,
//! fragments FIRST/MIDDLE/LAST), never writes, and for write-ahead logs also
//! reads each batch's RocksDB sequence number and operation count, which
//! bound how many operations a damaged range can have held. It knows
//! nothing of cyrnel's keys or of processes.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

const BLOCK: usize = 32 * 1024;
const LEGACY_HEADER: usize = 7;
const RECYCLABLE_HEADER: usize = 11;

/// What a log file is, which decides how its records are read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogKind {
    /// A write-ahead log: each record is a WriteBatch.
    Wal,
    /// The MANIFEST: each record is a version edit.
    Manifest,
}

/// A byte range that failed RocksDB's checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub len: u64,
    pub what: &'static str,
}

/// The result of reading one log file.
#[derive(Clone, Debug)]
pub struct LogScan {
    pub path: PathBuf,
    pub kind: LogKind,
    pub size: u64,
    /// Whole logical records that passed their checksums.
    pub records: u64,
    /// Readable records before the first damage and after the last.
    pub records_before_damage: u64,
    pub records_after_damage: u64,
    pub damage: Vec<Damage>,
    /// Offset of an incomplete last record (a write that never finished):
    /// RocksDB drops it silently and so may we.
    pub torn_tail: Option<u64>,
    /// Write-ahead logs: each stretch of damage, as (the RocksDB
    /// sequence-number gap to the next readable batch, if one follows and
    /// one precedes it; the damaged bytes).
    pub lost: Vec<(Option<u64>, u64)>,
}

impl LogScan {
    pub fn is_damaged(&self) -> bool {
        !self.damage.is_empty()
    }

    /// An upper bound on the RocksDB operations the damaged stretches
    /// held, given that every operation takes at least `min_op_bytes` of
    /// log: the sequence-number gap where one is known, else (or if
    /// smaller) the damaged bytes over `min_op_bytes`.
    pub fn lost_ops_bound(&self, min_op_bytes: u64) -> u64 {
        self.lost
            .iter()
            .map(|&(gap, bytes)| {
                let by_bytes = bytes.div_ceil(min_op_bytes.max(1));
                gap.map_or(by_bytes, |g| g.min(by_bytes))
            })
            .sum()
    }

    /// One line for an operator.
    pub fn describe(&self) -> String {
        let what = match self.kind {
            LogKind::Wal => "write-ahead log",
            LogKind::Manifest => "manifest",
        };
        let mut s = format!("{what} {}: {} bytes", self.path.display(), self.size);
        if self.damage.is_empty() {
            s.push_str(&format!(", {} records, all readable", self.records));
        } else {
            let ranges: Vec<String> = self
                .damage
                .iter()
                .map(|d| format!("{} at bytes {}..{}", d.what, d.offset, d.offset + d.len))
                .collect();
            s.push_str(&format!(
                ", DAMAGED: {}; {} records readable ({} before the damage, {} after it)",
                ranges.join(", "),
                self.records,
                self.records_before_damage,
                self.records_after_damage
            ));
        }
        if let Some(at) = self.torn_tail {
            s.push_str(&format!(
                "; incomplete last record at byte {at} (a write that never completed; dropped)"
            ));
        }
        s
    }
}

/// Reads one log file.
pub fn scan(path: &Path, kind: LogKind) -> io::Result<LogScan> {
    let data = fs::read(path)?;
    Ok(scan_bytes(path, kind, &data))
}

fn scan_bytes(path: &Path, kind: LogKind, data: &[u8]) -> LogScan {
    let mut out = LogScan {
        path: path.to_path_buf(),
        kind,
        size: data.len() as u64,
        records: 0,
        records_before_damage: 0,
        records_after_damage: 0,
        damage: Vec::new(),
        torn_tail: None,
        lost: Vec::new(),
    };
    // Start offset and bytes of a fragmented record being assembled.
    let mut frag: Option<(usize, Vec<u8>)> = None;
    // Next expected RocksDB sequence number, once a batch was read.
    let mut next_seq: Option<u64> = None;
    // Damaged bytes since the last readable batch, not yet accounted for.
    let mut pending_lost: u64 = 0;
    let mut pos = 0usize;
    fn damage(out: &mut LogScan, pending: &mut u64, offset: usize, len: usize, what: &'static str) {
        if len == 0 {
            return;
        }
        // Adjacent damage of the same kind reads as one range.
        if let Some(last) = out.damage.last_mut() {
            if last.offset + last.len == offset as u64 && last.what == what {
                last.len += len as u64;
                *pending += len as u64;
                return;
            }
        }
        out.damage.push(Damage {
            offset: offset as u64,
            len: len as u64,
            what,
        });
        *pending += len as u64;
    }
    // A record that cannot be read from `pos`: the fragments gathered for
    // it are lost, and so is the rest of its block (up to `end`).
    fn drop_block(
        out: &mut LogScan,
        pending: &mut u64,
        frag: &mut Option<(usize, Vec<u8>)>,
        pos: usize,
        end: usize,
        what: &'static str,
    ) {
        if let Some((start, _)) = frag.take() {
            damage(out, pending, start, pos - start, "lost fragment");
        }
        damage(out, pending, pos, end - pos, what);
    }
    while pos < data.len() {
        let block_end = (pos / BLOCK + 1) * BLOCK;
        let avail = block_end.min(data.len()) - pos;
        if block_end - pos < LEGACY_HEADER {
            // Block trailer: zero padding.
            pos = block_end;
            continue;
        }
        if avail < LEGACY_HEADER {
            out.torn_tail = Some(frag.as_ref().map_or(pos, |f| f.0) as u64);
            frag = None;
            break;
        }
        let h = &data[pos..];
        let len = u16::from_le_bytes([h[4], h[5]]) as usize;
        let typ = h[6];
        if typ == 0 && len == 0 {
            // Preallocated zeros: RocksDB skips the rest of the block.
            pos = block_end;
            continue;
        }
        let recyclable = matches!(typ, 5..=8 | 11 | 131);
        let hsize = if recyclable {
            RECYCLABLE_HEADER
        } else {
            LEGACY_HEADER
        };
        if hsize + len > avail {
            if block_end >= data.len() {
                // The file ends inside this record: a torn write.
                out.torn_tail = Some(frag.as_ref().map_or(pos, |f| f.0) as u64);
                frag = None;
                break;
            }
            drop_block(
                &mut out,
                &mut pending_lost,
                &mut frag,
                pos,
                block_end,
                "bad record length",
            );
            pos = block_end;
            continue;
        }
        let stored = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let actual = mask(crc32c(&h[6..hsize + len]));
        if stored != actual {
            // Like RocksDB: the length itself may be wrong, so the rest of
            // the block is dropped.
            drop_block(
                &mut out,
                &mut pending_lost,
                &mut frag,
                pos,
                block_end.min(data.len()),
                "checksum mismatch",
            );
            pos = block_end;
            continue;
        }
        let payload = &h[hsize..hsize + len];
        let mut complete: Option<Vec<u8>> = None;
        match typ {
            1 | 5 => {
                if let Some((start, _)) = frag.take() {
                    damage(
                        &mut out,
                        &mut pending_lost,
                        start,
                        pos - start,
                        "partial record without end",
                    );
                }
                complete = Some(payload.to_vec());
            }
            2 | 6 => {
                if let Some((start, _)) = frag.take() {
                    damage(
                        &mut out,
                        &mut pending_lost,
                        start,
                        pos - start,
                        "partial record without end",
                    );
                }
                frag = Some((pos, payload.to_vec()));
            }
            3 | 7 => match frag.as_mut() {
                Some((_, buf)) => buf.extend_from_slice(payload),
                None => damage(
                    &mut out,
                    &mut pending_lost,
                    pos,
                    hsize + len,
                    "missing start of fragmented record",
                ),
            },
            4 | 8 => match frag.take() {
                Some((_, mut buf)) => {
                    buf.extend_from_slice(payload);
                    complete = Some(buf);
                }
                None => damage(
                    &mut out,
                    &mut pending_lost,
                    pos,
                    hsize + len,
                    "missing start of fragmented record",
                ),
            },
            // Metadata records (compression type, timestamp sizes,
            // predecessor log info): checked, nothing to read.
            _ => {}
        }
        pos += hsize + len;
        if let Some(record) = complete {
            out.records += 1;
            if out.damage.is_empty() {
                out.records_before_damage += 1;
            } else {
                out.records_after_damage += 1;
            }
            if kind == LogKind::Wal && record.len() >= 12 {
                let seq = u64::from_le_bytes(record[0..8].try_into().expect("8 bytes"));
                let count = u32::from_le_bytes(record[8..12].try_into().expect("4 bytes"));
                if pending_lost > 0 {
                    // Every operation lost in between had a sequence number
                    // in the gap; without a previous batch, the bytes bound it.
                    let gap = next_seq.filter(|n| seq >= *n).map(|n| seq - n);
                    out.lost.push((gap, pending_lost));
                    pending_lost = 0;
                }
                next_seq = Some(seq.saturating_add(u64::from(count)));
            }
        }
    }
    if frag.is_some() {
        // A fragmented record the file ends inside: a torn write.
        out.torn_tail = frag.map(|f| f.0 as u64);
    }
    // Damage no readable batch follows: only its bytes bound it.
    if pending_lost > 0 {
        out.lost.push((None, pending_lost));
    }
    out
}

fn mask(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// CRC-32C (Castagnoli), as RocksDB computes it.
pub fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, slot) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *slot = c;
        }
        t
    });
    let mut crc = !0u32;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes records the way RocksDB's log writer does (legacy format).
    fn write_log(records: &[Vec<u8>]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            let mut left = &r[..];
            let mut first = true;
            loop {
                let room = BLOCK - out.len() % BLOCK;
                if room < LEGACY_HEADER {
                    out.resize(out.len() + room, 0);
                    continue;
                }
                let n = left.len().min(room - LEGACY_HEADER);
                let last = n == left.len();
                let typ: u8 = match (first, last) {
                    (true, true) => 1,
                    (true, false) => 2,
                    (false, false) => 3,
                    (false, true) => 4,
                };
                let mut body = vec![typ];
                body.extend_from_slice(&left[..n]);
                out.extend_from_slice(&mask(crc32c(&body)).to_le_bytes());
                out.extend_from_slice(&(n as u16).to_le_bytes());
                out.extend_from_slice(&body);
                left = &left[n..];
                first = false;
                if last {
                    break;
                }
            }
        }
        out
    }

    fn batch(seq: u64, count: u32, len: usize) -> Vec<u8> {
        let mut b = seq.to_le_bytes().to_vec();
        b.extend_from_slice(&count.to_le_bytes());
        b.resize(len, 7);
        b
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn reads_whole_and_fragmented_records() {
        let log = write_log(&[batch(1, 5, 100), batch(6, 5, 70_000), batch(11, 5, 50)]);
        let s = scan_bytes(Path::new("x.log"), LogKind::Wal, &log);
        assert_eq!(s.records, 3);
        assert!(s.damage.is_empty() && s.torn_tail.is_none(), "{s:?}");
    }

    #[test]
    fn a_flipped_byte_is_damage_and_the_sequence_gap_bounds_the_loss() {
        let mut log = write_log(&[batch(1, 5, 100), batch(6, 5, 100), batch(11, 5, 100)]);
        log[150] ^= 0xff;
        let s = scan_bytes(Path::new("x.log"), LogKind::Wal, &log);
        assert_eq!(s.records, 1, "{s:?}");
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.damage[0].what, "checksum mismatch");
        assert_eq!(s.records_after_damage, 0);
        // Nothing readable after it: the damaged bytes bound it.
        assert_eq!(s.lost_ops_bound(1), s.damage[0].len);
        assert_eq!(s.lost_ops_bound(13), s.damage[0].len.div_ceil(13));
    }

    #[test]
    fn damage_in_one_block_leaves_the_next_block_readable() {
        let mut log = write_log(&[batch(1, 5, 100), batch(6, 5, 40_000), batch(11, 5, 100)]);
        // Damage the second record's first fragment, in block 0.
        log[120] ^= 0xff;
        let s = scan_bytes(Path::new("x.log"), LogKind::Wal, &log);
        assert_eq!(s.records_before_damage, 1, "{s:?}");
        assert_eq!(s.records_after_damage, 1, "{s:?}");
        assert_eq!(s.lost_ops_bound(13), 5, "the sequence gap, {s:?}");
    }

    #[test]
    fn a_truncated_tail_is_torn_not_damaged() {
        let log = write_log(&[batch(1, 5, 100), batch(6, 5, 100)]);
        let s = scan_bytes(Path::new("x.log"), LogKind::Wal, &log[..log.len() - 10]);
        assert_eq!(s.records, 1);
        assert!(s.damage.is_empty(), "{s:?}");
        assert_eq!(s.torn_tail, Some(107));
    }
}
