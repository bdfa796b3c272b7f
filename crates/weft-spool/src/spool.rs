//! The spool: a pending log and a dead-letter log in one directory, with caps, recovery and the
//! operations the driver and the CLI need.

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use tracing::{error, info};

use crate::error::{Cap, OpenError, SpoolError, StorageError, StorageOp};
use crate::log::{self, Entry, Log, Settings};
use crate::record::{
    truncate_reason, DecodeError, LogKind, Record, PAYLOAD_BYTES_LIMIT, RECORD_HEADER_BYTES,
    SEGMENT_HEADER_RECORD_BYTES, SEQ_RECORD_BYTES,
};
use crate::storage::Storage;

/// Smallest allowed [`SpoolConfig::segment_bytes_target`]: room for a header and a few records.
/// (Tests use tiny segments to exercise rolling and deletion; production wants megabytes.)
pub const SEGMENT_BYTES_TARGET_MIN: u64 = 256;

/// Largest allowed [`SpoolConfig::segment_bytes_target`]. Recovery reads a whole segment into
/// memory at a time, so this also bounds recovery's peak buffer per segment.
pub const SEGMENT_BYTES_TARGET_LIMIT: u64 = 1024 * 1024 * 1024;

/// When records become durable. The spool does the fsyncs in [`Spool::sync`]; *when* to call it is
/// the driver's decision, which it takes from this policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum FsyncPolicy {
    /// Group commit (the default): the driver reports a send accepted only after a
    /// [`Spool::sync`] that covers it returned. Sends that arrive while one sync runs are batched
    /// into the next, so one fsync serves many sends and throughput grows with concurrency.
    #[default]
    Always,
    /// The driver reports sends accepted at once and calls [`Spool::sync`] on a timer of this
    /// period: a crash of the machine may lose the last period's accepted sends.
    Interval(Duration),
    /// **Not durable.** [`Spool::sync`] hands records to the operating system but never fsyncs
    /// (no file, no directory). Survives the process being killed, not the machine losing power:
    /// then anything may be lost, though recovery still returns only valid records.
    Never,
}

/// Bounds and behaviour of a spool. Every bound is a hard cap reached with a typed error
/// ([`SpoolError::Full`]), never with unbounded growth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolConfig {
    /// When records become durable (read by the driver; `Never` also switches off the fsyncs).
    pub fsync: FsyncPolicy,
    /// Most disk bytes of the pending log: all its segments, including retired records not yet
    /// reclaimed and the write buffer. Each append also reserves room for its future retirement
    /// record, so retiring is never refused. The excesses, all bounded: a retirement that rolls
    /// the log over writes a segment header (40 bytes) not reserved for — at most one per
    /// `segment_bytes_target` bytes of retirements; copies recovery makes out of a quarantined
    /// segment are not refused either; and compaction (see [`Spool::sync`]) is never refused by
    /// the cap: inside one `sync` it writes its copies (at most one `segment_bytes_target`, or
    /// one segment's live records) before it deletes the segments they empty, which free at
    /// least twice as much. So the directory can briefly hold up to a segment target more than
    /// this; leave that much room on the disk.
    pub bytes_max: u64,
    /// Most pending (appended, not retired) records. Also bounds the in-memory index.
    pub records_max: u64,
    /// Largest payload accepted by [`Spool::append`]; must cover the driver's largest encoded
    /// message (the default covers `weft-proto`'s 8 MiB body plus 64 KiB header).
    pub payload_bytes_max: u32,
    /// A segment rolls over once the next record would take it past this size. Smaller segments
    /// reclaim space sooner (a segment is deleted whole), larger ones mean fewer files.
    pub segment_bytes_target: u64,
    /// Most bytes buffered in memory before they are handed to the storage without waiting for a
    /// sync. Bounds the write buffer when the caller batches many records per sync.
    pub write_buffer_bytes_max: usize,
    /// Most disk bytes of the dead-letter log (compacted like the pending log, with the same
    /// bounded excess; see [`SpoolConfig::bytes_max`]).
    pub dead_bytes_max: u64,
    /// Most dead letters. Also bounds the reasons kept in memory (each at most
    /// [`crate::record::REASON_BYTES_MAX`] bytes).
    pub dead_records_max: u64,
}

/// Records [`Spool::append_reserved`] may add beyond [`SpoolConfig::records_max`].
pub const RESERVED_RECORDS: u64 = 4_096;
/// Bytes [`Spool::append_reserved`] may add beyond [`SpoolConfig::bytes_max`].
pub const RESERVED_BYTES: u64 = 1024 * 1024;

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            fsync: FsyncPolicy::Always,
            bytes_max: 1024 * 1024 * 1024,
            records_max: 1_000_000,
            payload_bytes_max: 16 * 1024 * 1024,
            segment_bytes_target: 16 * 1024 * 1024,
            write_buffer_bytes_max: 1024 * 1024,
            dead_bytes_max: 256 * 1024 * 1024,
            dead_records_max: 100_000,
        }
    }
}

impl SpoolConfig {
    fn validate(&self) -> Result<(), OpenError> {
        let problem = |field, problem| Err(OpenError::Config { field, problem });
        if self.segment_bytes_target < SEGMENT_BYTES_TARGET_MIN {
            return problem("segment_bytes_target", "is below SEGMENT_BYTES_TARGET_MIN");
        }
        if self.segment_bytes_target > SEGMENT_BYTES_TARGET_LIMIT {
            return problem(
                "segment_bytes_target",
                "is above SEGMENT_BYTES_TARGET_LIMIT",
            );
        }
        if self.payload_bytes_max > PAYLOAD_BYTES_LIMIT {
            return problem("payload_bytes_max", "is above PAYLOAD_BYTES_LIMIT");
        }
        if self.records_max == 0 || self.dead_records_max == 0 {
            return problem("records_max/dead_records_max", "must be at least 1");
        }
        if self.bytes_max == 0 || self.dead_bytes_max == 0 {
            return problem("bytes_max/dead_bytes_max", "must be at least 1");
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn settings_for_tests(&self) -> Settings {
        self.settings(LogKind::Spool)
    }

    fn settings(&self, kind: LogKind) -> Settings {
        Settings {
            segment_bytes_target: self.segment_bytes_target,
            write_buffer_bytes_max: self.write_buffer_bytes_max,
            fsync: self.fsync != FsyncPolicy::Never,
            bytes_max: match kind {
                LogKind::Spool => self.bytes_max,
                LogKind::Dead => self.dead_bytes_max,
            },
        }
    }
}

/// A pending record as recovery found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingRecord {
    /// Its sequence number.
    pub seq: u64,
    /// The payload, exactly as appended (checksum verified).
    pub payload: Bytes,
}

/// A torn write cut off the end of a log's newest segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruncatedTail {
    /// Which log.
    pub log: LogKind,
    /// The segment file.
    pub file: String,
    /// Where the damage started; the file now ends here (or was removed, if `0`).
    pub offset: u64,
    /// Bytes cut off.
    pub bytes: u64,
}

/// What was wrong where recovery stopped reading a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Corruption {
    /// A record did not decode (checksum, length, kind...).
    Record(DecodeError),
    /// The first record is not this segment's header.
    MissingHeader,
    /// A valid record that cannot be where it is (a header mid-file, a record of the other log).
    Misplaced {
        /// What was found.
        what: &'static str,
    },
    /// The file is longer than any segment can be.
    Oversized {
        /// Its length.
        len: u64,
    },
}

impl fmt::Display for Corruption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Corruption::Record(error) => write!(f, "{error}"),
            Corruption::MissingHeader => f.write_str("segment header missing or wrong"),
            Corruption::Misplaced { what } => write!(f, "misplaced record: {what}"),
            Corruption::Oversized { len } => write!(f, "file of {len} bytes is too long"),
        }
    }
}

/// A segment found corrupt in its middle and renamed aside. Raised as a `tracing::error!` alarm
/// too; never skipped silently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantinedSegment {
    /// Which log.
    pub log: LogKind,
    /// The segment's name.
    pub file: String,
    /// Its name now (kept for inspection; the operator deletes it).
    pub renamed_to: String,
    /// Where the damage is. Records before it were read and kept.
    pub offset: u64,
    /// What the damage is.
    pub corruption: Corruption,
    /// Bytes from the damage to the end of the file, which could not be read.
    pub unreadable_bytes: u64,
    /// Live records read from the segment before the damage and copied into the active segment.
    pub relocated_records: usize,
    /// Pending-log segments: the seqs the unreadable part may have held (some may have been
    /// retired already). Those not in [`Recovery::pending`] and not dead letters are lost: report
    /// them. `None` when no bound is known. The range covers records first appended there; the
    /// unreadable part may also have held copies of older records, written by compaction, whose
    /// seqs are lower (nothing on disk bounds those: compare with what the driver expected).
    pub possibly_lost_seqs: Option<Range<u64>>,
}

/// What [`Spool::open`] found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Every pending record, in seq order. All of it is durable now. The driver sends each again
    /// (the receiver's dedup absorbs those that had arrived).
    pub pending: Vec<PendingRecord>,
    /// The seq the next append will get. Greater than every seq that was ever durable.
    pub next_seq: u64,
    /// Dead letters in the directory (see [`Spool::dead_letters`]).
    pub dead_letters: usize,
    /// Torn writes cut off: records that were never synced. Expected after a crash.
    pub truncated: Vec<TruncatedTail>,
    /// Segments corrupt in the middle, renamed aside. Never expected: an alarm.
    pub quarantined: Vec<QuarantinedSegment>,
    /// Quarantined files left by earlier opens, still awaiting an operator.
    pub quarantined_earlier: Vec<String>,
}

impl Recovery {
    /// Whether nothing at all was damaged (a clean shutdown, or a crash that tore nothing).
    pub fn is_clean(&self) -> bool {
        self.truncated.is_empty() && self.quarantined.is_empty()
    }
}

/// A pending record, as listed by [`Spool::pending`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingInfo {
    /// Its sequence number.
    pub seq: u64,
    /// Its payload's length.
    pub payload_bytes: u32,
}

/// A dead letter, as listed by [`Spool::dead_letters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeadLetterInfo<'a> {
    /// The sequence number it had in the pending log.
    pub seq: u64,
    /// Why it was given up on.
    pub reason: &'a str,
    /// Its payload's length.
    pub payload_bytes: u32,
}

/// A dead letter read back whole by [`Spool::read_dead_letter`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetter {
    /// The sequence number it had in the pending log.
    pub seq: u64,
    /// Why it was given up on.
    pub reason: String,
    /// The payload, exactly as appended.
    pub payload: Bytes,
}

/// A dead letter put back into the pending log by [`Spool::replay`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replayed {
    /// The seq it had as a dead letter.
    pub dead_seq: u64,
    /// Its new seq in the pending log (durable).
    pub seq: u64,
    /// The payload, for the driver to send.
    pub payload: Bytes,
}

/// Sizes and counts for the CLI and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpoolStats {
    /// Pending records.
    pub pending_records: u64,
    /// Sum of their payload lengths.
    pub pending_payload_bytes: u64,
    /// The oldest pending seq (the head of the retry queue).
    pub oldest_pending_seq: Option<u64>,
    /// The seq the next append gets.
    pub next_seq: u64,
    /// Every append with a seq up to this one was covered by a successful [`Spool::sync`]
    /// (durable, unless the policy is [`FsyncPolicy::Never`]).
    pub synced_up_to: u64,
    /// Disk bytes of the pending log (write buffer included); what [`SpoolConfig::bytes_max`]
    /// bounds.
    pub spool_bytes: u64,
    /// Bytes in the write buffer, not yet handed to the storage.
    pub buffered_bytes: u64,
    /// Dead letters.
    pub dead_records: u64,
    /// Sum of their payload lengths.
    pub dead_payload_bytes: u64,
    /// Disk bytes of the dead-letter log.
    pub dead_bytes: u64,
    /// Compaction steps completed since the spool was opened (both logs; see [`Spool::sync`]).
    pub compactions: u64,
    /// Live records compaction copied forward since the spool was opened (both logs; counted
    /// when copied, so a step that failed or was interrupted counts too).
    pub compacted_records: u64,
}

/// A segment file, as listed by [`Spool::segments`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Which log.
    pub log: LogKind,
    /// File name.
    pub file: String,
    /// Length in bytes (write buffer included).
    pub bytes: u64,
    /// Live records in it (pending records or dead letters).
    pub live_records: u64,
    /// Its header's first seq.
    pub first_seq: u64,
    /// Whether it is the one receiving new records.
    pub active: bool,
}

/// The on-disk retry spool: see the [crate docs](crate) for the format and the guarantees.
///
/// Synchronous and single-owner (`&mut self` everywhere): the driver owns it on one blocking task
/// or thread and sends it work through a channel. It is `Send` when its storage is.
pub struct Spool<S: Storage> {
    storage: S,
    config: SpoolConfig,
    main: Log,
    dead: Log,
    next_seq: u64,
    synced_up_to: u64,
    /// Set by the first write failure; every later mutation is refused.
    poisoned: Option<String>,
}

impl<S: Storage> fmt::Debug for Spool<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl<S: Storage> Spool<S> {
    /// Opens the spool in `storage`'s directory (empty is fine), recovering whatever is there.
    ///
    /// Recovery reads every segment of both logs, checks every record, truncates a torn tail off
    /// the newest segment, quarantines segments damaged in the middle (after copying their
    /// readable live records into the active segment), finishes dead-letter moves a crash
    /// interrupted, deletes fully retired segments, and fsyncs, so that everything it reports is
    /// durable. It never panics on what it reads.
    pub fn open(mut storage: S, config: SpoolConfig) -> Result<(Self, Recovery), OpenError> {
        config.validate()?;
        let names = storage
            .list()
            .map_err(|e| StorageError::new(StorageOp::List, "", e))?;
        let mut main = log::scan(
            &mut storage,
            LogKind::Spool,
            &names,
            config.settings(LogKind::Spool),
        )?;
        let mut dead = log::scan(
            &mut storage,
            LogKind::Dead,
            &names,
            config.settings(LogKind::Dead),
        )?;
        // Seqs damaged bytes at the end of the pending log may have held come after every seq
        // known from either log.
        let floor = main.seq_floor.max(dead.seq_floor);
        let next_seq = floor.saturating_add(main.tail_room).saturating_add(1);
        if let Some(report) = main
            .tail_quarantine
            .and_then(|i| main.quarantined.get_mut(i))
        {
            if main.tail_room > 0 {
                report.possibly_lost_seqs = Some(floor + 1..next_seq);
            }
        }
        main.finish(&mut storage, next_seq)?;
        dead.finish(&mut storage, next_seq)?;

        // A crash between a dead letter's durable copy and its retirement becoming durable leaves
        // the seq in both logs: finish the move.
        let moved: Vec<u64> = main
            .log
            .entries
            .keys()
            .filter(|seq| dead.log.entries.contains_key(seq))
            .copied()
            .collect();
        if !moved.is_empty() {
            for &seq in &moved {
                let (segment, _) = main.log.push(&Record::Retire { seq }, next_seq);
                main.log.remove(seq, segment);
            }
            main.log.sync(&mut storage)?;
            main.log.delete_retired(&mut storage)?;
        }

        let pending = main
            .log
            .entries
            .keys()
            .filter_map(|&seq| {
                let payload = main.payloads.get(&seq)?.clone();
                Some(PendingRecord { seq, payload })
            })
            .collect::<Vec<_>>();
        debug_assert_eq!(pending.len(), main.log.entries.len(), "payload per entry");
        let mut truncated = main.truncated;
        truncated.extend(dead.truncated);
        let mut quarantined = main.quarantined;
        quarantined.extend(dead.quarantined);
        let mut quarantined_earlier = main.quarantined_earlier;
        quarantined_earlier.extend(dead.quarantined_earlier);
        let recovery = Recovery {
            pending,
            next_seq,
            dead_letters: dead.log.entries.len(),
            truncated,
            quarantined,
            quarantined_earlier,
        };
        info!(
            pending = recovery.pending.len(),
            dead_letters = recovery.dead_letters,
            next_seq,
            truncated = recovery.truncated.len(),
            quarantined = recovery.quarantined.len(),
            "spool recovered"
        );
        if !recovery.quarantined_earlier.is_empty() {
            error!(
                files = ?recovery.quarantined_earlier,
                "quarantined spool segments from earlier runs await inspection"
            );
        }
        let spool = Self {
            storage,
            config,
            main: main.log,
            dead: dead.log,
            next_seq,
            synced_up_to: next_seq - 1,
            poisoned: None,
        };
        Ok((spool, recovery))
    }

    fn check(&self) -> Result<(), SpoolError> {
        match &self.poisoned {
            Some(cause) => Err(SpoolError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Records a write failure: from now on the spool refuses every mutation.
    fn poison(&mut self, failure: StorageError) -> SpoolError {
        if self.poisoned.is_none() {
            error!(%failure, "spool storage failed; refusing further writes until reopened");
            self.poisoned = Some(failure.to_string());
        }
        SpoolError::Storage(failure)
    }

    fn flush_if_full(&mut self) -> Result<(), SpoolError> {
        if self.main.buffer_full() {
            if let Err(failure) = self.main.flush(&mut self.storage) {
                return Err(self.poison(failure));
            }
        }
        Ok(())
    }

    /// Appends a record and returns its seq. **Not durable** until a [`Spool::sync`] returns.
    ///
    /// Seqs are strictly increasing. The record is buffered in memory (no IO) unless the buffer
    /// passed [`SpoolConfig::write_buffer_bytes_max`] or the segment rolled over, in which case it
    /// is written (still without fsync). Refused with [`SpoolError::Full`] at
    /// [`SpoolConfig::records_max`] or [`SpoolConfig::bytes_max`], and with
    /// [`SpoolError::PayloadTooLarge`] above [`SpoolConfig::payload_bytes_max`].
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, SpoolError> {
        self.append_within(payload, 0, 0)
    }

    /// [`Spool::append`] into a reserve beyond the caps ([`RESERVED_RECORDS`] records,
    /// [`RESERVED_BYTES`] bytes), for small records that replace older ones — the node's dedup
    /// watermarks. A full spool must still take them: an acknowledgement waits for its
    /// watermark, so two nodes whose spools are full of messages for each other would otherwise
    /// wait for each other for good. The reserve stays bounded because each such record retires
    /// its predecessor.
    pub fn append_reserved(&mut self, payload: &[u8]) -> Result<u64, SpoolError> {
        self.append_within(payload, RESERVED_RECORDS, RESERVED_BYTES)
    }

    fn append_within(
        &mut self,
        payload: &[u8],
        extra_records: u64,
        extra_bytes: u64,
    ) -> Result<u64, SpoolError> {
        self.check()?;
        if payload.len() > self.config.payload_bytes_max as usize {
            return Err(SpoolError::PayloadTooLarge {
                len: payload.len(),
                max: self.config.payload_bytes_max,
            });
        }
        let pending = self.main.entries.len() as u64;
        if pending >= self.config.records_max + extra_records {
            return Err(SpoolError::Full {
                cap: Cap::Records,
                used: pending,
                max: self.config.records_max,
            });
        }
        let seq = self.next_seq;
        let record = Record::Append { seq, payload };
        let record_len = record.encoded_len() as u64;
        // Room for the record, for every pending record's retirement (this one's included), and
        // for a segment header should the record roll the log over.
        let needed = self.main.disk_bytes
            + (pending + 1) * SEQ_RECORD_BYTES as u64
            + record_len
            + SEGMENT_HEADER_RECORD_BYTES as u64;
        if needed > self.config.bytes_max + extra_bytes {
            return Err(SpoolError::Full {
                cap: Cap::Bytes,
                used: self.main.disk_bytes,
                max: self.config.bytes_max,
            });
        }
        debug_assert!(
            self.main
                .entries
                .last_key_value()
                .is_none_or(|(&last, _)| last < seq),
            "seqs strictly increasing"
        );
        let (segment, offset) = self.main.push(&record, seq);
        self.main.insert(
            seq,
            Entry {
                segment,
                offset,
                record_len: record_len as u32,
                payload_len: payload.len() as u32,
                reason: None,
            },
        );
        self.next_seq += 1;
        self.flush_if_full()?;
        Ok(seq)
    }

    /// Makes every record appended (and every retirement) before it durable, with one write and
    /// one fsync for the whole batch (plus a directory fsync if a segment was created), then
    /// deletes segments that are now fully retired. Returns the seq up to which every append is
    /// durable.
    ///
    /// Then, when enough of the pending log is garbage that a few long-lived records keep on disk
    /// (each pins its segment, and the later segments that retired its neighbours), it
    /// *compacts*: copies the live records of the oldest segments to the end of the log under
    /// their own seqs, fsyncs the copies and deletes the segments they emptied — a second write
    /// and fsync, in the syncs that need one. Seqs never change, and no crash during it loses or
    /// resurrects a record (see `docs/design/durability.md`, "The spool").
    ///
    /// Under [`FsyncPolicy::Never`] it writes but does not fsync. On failure the spool is poisoned
    /// (see [`SpoolError::Poisoned`]): the batch is *not* accepted.
    pub fn sync(&mut self) -> Result<u64, SpoolError> {
        self.check()?;
        if let Err(failure) = self.main.sync(&mut self.storage) {
            return Err(self.poison(failure));
        }
        self.synced_up_to = self.next_seq - 1;
        let reclaimed = self
            .main
            .delete_retired(&mut self.storage)
            .and_then(|_| self.main.compact(&mut self.storage, self.next_seq));
        if let Err(failure) = reclaimed {
            return Err(self.poison(failure));
        }
        Ok(self.synced_up_to)
    }

    /// Hands everything buffered to the storage without an fsync: it survives the process being
    /// killed, not the machine losing power. (For [`FsyncPolicy::Interval`], between syncs.)
    pub fn flush(&mut self) -> Result<(), SpoolError> {
        self.check()?;
        if let Err(failure) = self.main.flush(&mut self.storage) {
            return Err(self.poison(failure));
        }
        Ok(())
    }

    /// Syncs and gives the storage back. Dropping a spool without this loses whatever was
    /// appended since the last sync, exactly like a crash (the spool never writes in `Drop`).
    pub fn close(mut self) -> Result<S, SpoolError> {
        self.sync()?;
        Ok(self.storage)
    }

    /// Retires the pending record `seq`: it was acknowledged. Buffered like an append; durable at
    /// the next sync. Refused with [`SpoolError::NotPending`] if `seq` is not pending (a duplicate
    /// ack is the caller's to ignore).
    pub fn retire(&mut self, seq: u64) -> Result<(), SpoolError> {
        self.check()?;
        let Some(location) = self.main.entries.get(&seq).map(|entry| entry.segment) else {
            return Err(SpoolError::NotPending { seq });
        };
        let (segment, _) = self.main.push(&Record::Retire { seq }, self.next_seq);
        debug_assert!(location <= segment, "a retirement follows its record");
        self.main.remove(seq, segment);
        self.flush_if_full()
    }

    /// Retires every pending record with a seq up to `seq` (a cumulative ack), with one record.
    /// Returns how many were retired (0 is fine: acks repeat).
    pub fn retire_up_to(&mut self, seq: u64) -> Result<u64, SpoolError> {
        self.check()?;
        let retired: Vec<u64> = self.main.entries.range(..=seq).map(|(&s, _)| s).collect();
        if retired.is_empty() {
            return Ok(0);
        }
        let (segment, _) = self.main.push(&Record::RetireUpTo { seq }, self.next_seq);
        for &seq in &retired {
            self.main.remove(seq, segment);
        }
        self.flush_if_full()?;
        Ok(retired.len() as u64)
    }

    /// Moves the pending record `seq` to the dead-letter log with `reason` (cut to
    /// [`crate::record::REASON_BYTES_MAX`] bytes), then retires it.
    ///
    /// The dead letter is durable when this returns (one write + fsync of the dead-letter log —
    /// dead-lettering is rare); the retirement is buffered like any other. A crash in between is
    /// finished by the next open. Refused with [`SpoolError::Full`] at the dead-letter caps (the
    /// record stays pending).
    pub fn dead_letter(&mut self, seq: u64, reason: &str) -> Result<(), SpoolError> {
        self.check()?;
        let Some(payload_len) = self.main.entries.get(&seq).map(|entry| entry.payload_len) else {
            return Err(SpoolError::NotPending { seq });
        };
        let reason = truncate_reason(reason);
        let dead_records = self.dead.entries.len() as u64;
        if dead_records >= self.config.dead_records_max {
            return Err(SpoolError::Full {
                cap: Cap::DeadRecords,
                used: dead_records,
                max: self.config.dead_records_max,
            });
        }
        let record_len = RECORD_HEADER_BYTES + 1 + 8 + 2 + reason.len() + payload_len as usize;
        let needed = self.dead.disk_bytes
            + (dead_records + 1) * SEQ_RECORD_BYTES as u64
            + record_len as u64
            + SEGMENT_HEADER_RECORD_BYTES as u64;
        if needed > self.config.dead_bytes_max {
            return Err(SpoolError::Full {
                cap: Cap::DeadBytes,
                used: self.dead.disk_bytes,
                max: self.config.dead_bytes_max,
            });
        }
        let payload = self.read_payload(LogKind::Spool, seq)?;
        let record = Record::DeadLetter {
            seq,
            reason,
            payload: &payload,
        };
        debug_assert_eq!(record.encoded_len(), record_len);
        let (segment, offset) = self.dead.push(&record, self.next_seq);
        self.dead.insert(
            seq,
            Entry {
                segment,
                offset,
                record_len: record_len as u32,
                payload_len,
                reason: Some(reason.into()),
            },
        );
        if let Err(failure) = self.dead.sync(&mut self.storage) {
            return Err(self.poison(failure));
        }
        let (segment, _) = self.main.push(&Record::Retire { seq }, self.next_seq);
        self.main.remove(seq, segment);
        self.flush_if_full()
    }

    /// Reads the payload of a pending record back from disk (checksum verified).
    pub fn read(&mut self, seq: u64) -> Result<Bytes, SpoolError> {
        self.check()?;
        self.read_payload(LogKind::Spool, seq)
    }

    /// Reads a dead letter back whole (checksum verified).
    pub fn read_dead_letter(&mut self, seq: u64) -> Result<DeadLetter, SpoolError> {
        self.check()?;
        let Some(reason) = self.dead.entries.get(&seq).map(|e| e.reason.clone()) else {
            return Err(SpoolError::NotDeadLettered { seq });
        };
        let payload = self.read_payload(LogKind::Dead, seq)?;
        Ok(DeadLetter {
            seq,
            reason: reason.unwrap_or_default().into(),
            payload,
        })
    }

    fn read_payload(&mut self, kind: LogKind, seq: u64) -> Result<Bytes, SpoolError> {
        let log = match kind {
            LogKind::Spool => &mut self.main,
            LogKind::Dead => &mut self.dead,
        };
        match log.read_payload(&mut self.storage, seq) {
            Ok(payload) => Ok(payload),
            Err(Ok(SpoolError::NotPending { seq })) if kind == LogKind::Dead => {
                Err(SpoolError::NotDeadLettered { seq })
            }
            Err(Ok(refused)) => Err(refused),
            Err(Err(failure)) => Err(self.poison(failure)),
        }
    }

    /// Puts the dead letter `seq` back into the pending log under a new seq and removes it from
    /// the dead letters. Both steps are durable when this returns; the driver sends the returned
    /// payload. A crash between the two leaves it in both places (at-least-once: the receiver's
    /// dedup absorbs the duplicate).
    pub fn replay(&mut self, seq: u64) -> Result<Replayed, SpoolError> {
        self.check()?;
        if !self.dead.entries.contains_key(&seq) {
            return Err(SpoolError::NotDeadLettered { seq });
        }
        let payload = self.read_payload(LogKind::Dead, seq)?;
        let new_seq = self.append(&payload)?;
        self.sync()?;
        self.remove_dead_letters(&[seq])?;
        Ok(Replayed {
            dead_seq: seq,
            seq: new_seq,
            payload,
        })
    }

    /// Deletes the dead letter `seq` for good (durable when this returns).
    pub fn purge(&mut self, seq: u64) -> Result<(), SpoolError> {
        self.check()?;
        if !self.dead.entries.contains_key(&seq) {
            return Err(SpoolError::NotDeadLettered { seq });
        }
        self.remove_dead_letters(&[seq])
    }

    /// Deletes every dead letter (durable when this returns). Returns how many.
    pub fn purge_all(&mut self) -> Result<u64, SpoolError> {
        self.check()?;
        let seqs: Vec<u64> = self.dead.entries.keys().copied().collect();
        self.remove_dead_letters(&seqs)?;
        Ok(seqs.len() as u64)
    }

    fn remove_dead_letters(&mut self, seqs: &[u64]) -> Result<(), SpoolError> {
        if seqs.is_empty() {
            return Ok(());
        }
        for &seq in seqs {
            let (segment, _) = self
                .dead
                .push(&Record::DeadLetterRemoved { seq }, self.next_seq);
            self.dead.remove(seq, segment);
        }
        let next_seq = self.next_seq;
        let result = self
            .dead
            .sync(&mut self.storage)
            .and_then(|()| self.dead.delete_retired(&mut self.storage))
            .and_then(|_| self.dead.compact(&mut self.storage, next_seq));
        match result {
            Ok(_) => Ok(()),
            Err(failure) => Err(self.poison(failure)),
        }
    }

    /// Pending records in seq order (without payloads; see [`Spool::read`]).
    pub fn pending(&self) -> impl Iterator<Item = PendingInfo> + '_ {
        self.main.entries.iter().map(|(&seq, entry)| PendingInfo {
            seq,
            payload_bytes: entry.payload_len,
        })
    }

    /// Whether `seq` is pending.
    pub fn is_pending(&self, seq: u64) -> bool {
        self.main.entries.contains_key(&seq)
    }

    /// Dead letters in seq order (without payloads; see [`Spool::read_dead_letter`]).
    pub fn dead_letters(&self) -> impl Iterator<Item = DeadLetterInfo<'_>> + '_ {
        self.dead
            .entries
            .iter()
            .map(|(&seq, entry)| DeadLetterInfo {
                seq,
                reason: entry.reason.as_deref().unwrap_or_default(),
                payload_bytes: entry.payload_len,
            })
    }

    /// Counts and sizes.
    pub fn stats(&self) -> SpoolStats {
        SpoolStats {
            pending_records: self.main.entries.len() as u64,
            pending_payload_bytes: self.main.payload_bytes,
            oldest_pending_seq: self.main.entries.keys().next().copied(),
            next_seq: self.next_seq,
            synced_up_to: self.synced_up_to,
            spool_bytes: self.main.disk_bytes,
            buffered_bytes: self.main.unwritten_bytes as u64,
            dead_records: self.dead.entries.len() as u64,
            dead_payload_bytes: self.dead.payload_bytes,
            dead_bytes: self.dead.disk_bytes,
            compactions: self.main.compactions + self.dead.compactions,
            compacted_records: self.main.compacted_records + self.dead.compacted_records,
        }
    }

    /// Every segment file of both logs, oldest first per log.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        [&self.main, &self.dead]
            .into_iter()
            .flat_map(|log| {
                log.segments.iter().map(move |(&id, segment)| SegmentInfo {
                    log: log.kind,
                    file: log.name(id),
                    bytes: segment.bytes,
                    live_records: segment.live,
                    first_seq: segment.first_seq,
                    active: id == log.active,
                })
            })
            .collect()
    }

    /// The configuration it was opened with (the driver reads [`SpoolConfig::fsync`] here).
    pub fn config(&self) -> &SpoolConfig {
        &self.config
    }

    /// Whether an earlier storage failure stopped the spool (see [`SpoolError::Poisoned`]).
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// The storage, for inspection.
    pub fn storage(&self) -> &S {
        &self.storage
    }
}
