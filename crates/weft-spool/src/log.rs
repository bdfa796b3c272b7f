//! One segmented, append-only log: the machinery shared by the pending log and the dead-letter log.
//!
//! A log is a set of segment files `{prefix}-{id:016x}-{first_seq:016x}.log`, ordered by id; the
//! newest is the *active* one and receives every new record. Records are encoded into an in-memory buffer
//! ([`Log::push`]) and handed to the storage in one `append` per segment by [`Log::flush`]; one
//! fsync per touched segment in [`Log::sync`] makes the whole batch durable.
//!
//! Each live entry (a pending message, a dead letter) is indexed by seq with its location. Each
//! segment counts its live entries and remembers which *older* segments its records depend on
//! (`refs`): the segments holding records that its retirements retired, and the segments holding
//! the originals of records copied into it (see compaction below). A segment may be deleted once
//! it is not active, has no live entry, and every segment it refers to is gone: deleting it
//! earlier would drop retirement records while the records they retire still exist, and recovery
//! would resurrect those.
//!
//! Ordering rules that make recovery yield a prefix (see the crate docs):
//! - before the first byte is written to a new segment, every older segment with unsynced bytes is
//!   fsynced, so a crash can never keep a newer segment's records while losing an older one's;
//! - segments are deleted only in [`Log::delete_retired`], which runs after a sync, so the
//!   retirements that emptied them are durable first. Deletions go oldest first: a segment
//!   referring to another is removed after it, so on a file system that makes directory changes
//!   durable in order (journaling file systems do; one directory fsync covers a batch) a crash
//!   in the middle never keeps a record while dropping the retirement that retired it.
//!
//! # Compaction
//! Deleting whole segments alone cannot reclaim a log in which one old record stays live: it pins
//! its segment, and through `refs` every later segment that retired one of its neighbours.
//! [`Log::compact`] (run after a sync) therefore *copies forward*: when enough of the log is
//! garbage, it picks the oldest segments (a prefix of the log, so that every retirement they hold
//! refers only to segments that go with them), reads their live records back (checksums
//! verified), appends them again at the end of the log under **their own seqs**, makes the copies
//! durable, and only then deletes the evacuated segments and whatever they pinned. Why each crash
//! is harmless:
//! - before the copies are durable: the originals are untouched; recovery may also find a prefix
//!   of the copies, which only relocates live records (replay takes a later `Append` of a live seq
//!   as its new location — the same rule that relocates the records of a quarantined segment);
//! - between the copies' sync and the deletions: recovery finds every record twice and keeps the
//!   copy; the evacuated segments then hold no live record and are deleted at the end of recovery;
//! - during the deletions: they only remove segments that recovery would delete anyway.
//!
//! A copy is appended only for a record that is live at that point of the log, so no earlier
//! retirement can apply to it, and every later retirement of its seq retires the copy (and, in
//! replay, the original before it). The segment holding a copy refers to the original's segment,
//! so it is never deleted first — otherwise a retirement of the copy could be deleted with it
//! while the original still existed. Seqs never change, so the callers' handles (the node's
//! record tags) stay valid. The plan, the trigger and the bounds are in [`Log::compaction_plan`].
//!
//! Recovery ([`scan`], then [`Scanned::finish`]) replays every readable record in log order. A
//! quarantined segment's readable live records are copied into the active segment under their
//! own seqs (recovery accepts a second `Append` of a seq as the record's new location), and so are
//! the retirements it held of records in older segments — renaming it aside must neither lose the
//! former nor resurrect what the latter retired.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use tracing::{debug, error, warn};

use crate::error::{OpenError, SpoolError, StorageError, StorageOp};
use crate::record::{
    self, DecodeError, LogKind, Record, SegmentHeader, APPEND_RECORD_BYTES_MIN, FORMAT_VERSION,
    RECORD_BODY_BYTES_MAX, RECORD_HEADER_BYTES, SEGMENT_HEADER_RECORD_BYTES,
};
use crate::storage::Storage;
use crate::{Corruption, QuarantinedSegment, TruncatedTail};

/// Longest segment file recovery reads: the largest allowed target plus one oversized record that
/// went into a segment of its own. Anything beyond is corruption, not data.
pub(crate) const SEGMENT_FILE_BYTES_MAX: u64 = crate::SEGMENT_BYTES_TARGET_LIMIT
    + (SEGMENT_HEADER_RECORD_BYTES + RECORD_HEADER_BYTES + RECORD_BODY_BYTES_MAX) as u64;

/// Most bytes of candidate records hashed while deciding whether damage at the end of the newest
/// segment is a torn write or corruption (see [`looks_torn`]). Past it the damage counts as
/// corruption: the conservative answer, which keeps the file for inspection.
const TORN_SCAN_HASHED_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// Suffix given to a corrupt segment when it is renamed aside.
pub(crate) const QUARANTINE_SUFFIX: &str = ".quarantined";

/// Most segments one compaction step evacuates: bounds its planning (a linear pass over at most
/// this many prefixes) and, with [`Settings::segment_bytes_target`] as the copy budget, its IO.
const COMPACTION_SEGMENTS_MAX: usize = 64;

/// A compaction step must reclaim at least this many bytes per byte it copies. Bounds the write
/// amplification of compaction: live records are copied out of a prefix only when at most a
/// third of what it frees is live.
const COMPACTION_RECLAIM_PER_COPIED_BYTE: u64 = 2;

/// Compaction is considered once the log's garbage (disk bytes not holding a live record) reaches
/// this many segment targets, or a quarter of the log's cap if that is less.
const COMPACTION_TRIGGER_SEGMENTS: u64 = 4;

/// A segment's file name: `{prefix}-{id:016x}-{first_seq:016x}.log`.
///
/// The first seq is in the name as well as in the header because a name survives what a header
/// may not: if the newest segment's header is torn or rots, or a segment is quarantined, its name
/// still tells recovery which seqs were handed out, so that none is handed out twice.
pub(crate) fn segment_name(kind: LogKind, id: u64, first_seq: u64) -> String {
    format!("{}-{id:016x}-{first_seq:016x}.log", kind.prefix())
}

/// The id and first seq of a segment file name of this log, if it is one.
fn parse_segment_name(kind: LogKind, name: &str) -> Option<(u64, u64)> {
    let numbers = name
        .strip_prefix(kind.prefix())?
        .strip_prefix('-')?
        .strip_suffix(".log")?;
    let (id, first_seq) = numbers.split_once('-')?;
    let hex = |text: &str| {
        (text.len() == 16 && text.bytes().all(|b| b.is_ascii_hexdigit()))
            .then(|| u64::from_str_radix(text, 16).ok())
            .flatten()
    };
    Some((hex(id)?, hex(first_seq)?))
}

/// Where a live entry's record is, and what the index needs to know about it.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// Segment id.
    pub segment: u64,
    /// Offset of the record (its header) in the segment.
    pub offset: u64,
    /// Encoded record length.
    pub record_len: u32,
    /// Payload length.
    pub payload_len: u32,
    /// Dead letters only: why.
    pub reason: Option<Box<str>>,
}

#[derive(Debug)]
pub(crate) struct Segment {
    /// File name.
    pub name: String,
    /// Its first seq (in its header and its name).
    pub first_seq: u64,
    /// Length, including bytes still in the write buffer.
    pub bytes: u64,
    /// Bytes handed to the storage.
    pub written: u64,
    /// Live entries whose record is in this segment.
    pub live: u64,
    /// Encoded bytes of those entries' records: what compaction would copy to evacuate it.
    live_bytes: u64,
    /// Older segments this one must not outlive: those holding records that its retirements
    /// retired, and those holding the originals of records copied into it by compaction (or by
    /// recovery's relocation).
    refs: BTreeSet<u64>,
    /// Whether the file exists (a segment is created when its first bytes are flushed).
    created: bool,
    /// Recovery found it corrupt; it is renamed aside once its live entries are relocated.
    quarantined: bool,
    /// A record read back from it failed its checksum: compaction leaves it alone (the next open
    /// quarantines it and keeps what is readable).
    unreadable: bool,
}

impl Segment {
    fn new(name: String, first_seq: u64, bytes: u64, created: bool) -> Self {
        Self {
            name,
            first_seq,
            bytes,
            written: if created { bytes } else { 0 },
            live: 0,
            live_bytes: 0,
            refs: BTreeSet::new(),
            created,
            quarantined: false,
            unreadable: false,
        }
    }
}

/// Encoded records for one segment, waiting to be written.
#[derive(Debug)]
struct Chunk {
    segment: u64,
    bytes: Vec<u8>,
}

/// How a log writes, from [`crate::SpoolConfig`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub segment_bytes_target: u64,
    pub write_buffer_bytes_max: usize,
    /// `false` under [`crate::FsyncPolicy::Never`]: no fsync of files or directory, ever.
    pub fsync: bool,
    /// The log's byte cap ([`crate::SpoolConfig::bytes_max`] or `dead_bytes_max`): compaction
    /// starts earlier under a small cap (see [`Log::compaction_plan`]).
    pub bytes_max: u64,
}

/// What one compaction step does (see [`Log::compaction_plan`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CompactionPlan {
    /// The segments whose live records are copied forward, oldest first: a prefix of the log.
    pub evacuate: Vec<u64>,
    /// Whether the active segment is among them: the log then rolls to a fresh segment first.
    pub rolls: bool,
    /// Bytes the copies take (plus a segment header if the log rolls).
    pub copy_bytes: u64,
    /// Bytes of the segments deleted once the copies are durable: the evacuated ones and those
    /// they pinned.
    pub reclaim_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct Log {
    pub kind: LogKind,
    settings: Settings,
    pub segments: BTreeMap<u64, Segment>,
    /// Id of the segment receiving new records; `0` only before recovery created one.
    pub active: u64,
    next_segment_id: u64,
    /// Records not yet handed to the storage, in log order, at most one chunk per segment.
    chunks: Vec<Chunk>,
    /// A cleared buffer kept for the next chunk, so a steady stream of batches does not reallocate.
    spare: Vec<u8>,
    /// Bytes in `chunks`.
    pub unwritten_bytes: usize,
    /// Segments with bytes written but not fsynced.
    unsynced: BTreeSet<u64>,
    /// A create or remove awaits a directory fsync.
    dir_dirty: bool,
    /// A segment lost its last live entry since the last [`Log::delete_retired`].
    deletion_due: bool,
    /// Live entries by seq.
    pub entries: BTreeMap<u64, Entry>,
    /// Sum of segment lengths (buffered bytes included).
    pub disk_bytes: u64,
    /// Sum of live entries' payload lengths.
    pub payload_bytes: u64,
    /// Sum of live entries' encoded record lengths: `disk_bytes` minus this is garbage.
    live_bytes: u64,
    /// Compaction steps completed since the log was opened.
    pub compactions: u64,
    /// Records copied forward by compaction since the log was opened (counted when copied, so a
    /// step that failed or was interrupted counts too).
    pub compacted_records: u64,
}

impl Log {
    fn new(kind: LogKind, settings: Settings) -> Self {
        Self {
            kind,
            settings,
            segments: BTreeMap::new(),
            active: 0,
            next_segment_id: 1,
            chunks: Vec::new(),
            spare: Vec::new(),
            unwritten_bytes: 0,
            unsynced: BTreeSet::new(),
            dir_dirty: false,
            deletion_due: false,
            entries: BTreeMap::new(),
            disk_bytes: 0,
            payload_bytes: 0,
            live_bytes: 0,
            compactions: 0,
            compacted_records: 0,
        }
    }

    /// The file name of segment `id`.
    pub fn name(&self, id: u64) -> String {
        match self.segments.get(&id) {
            Some(segment) => segment.name.clone(),
            None => format!("{}-{id:016x}-(deleted).log", self.kind.prefix()),
        }
    }

    /// Starts a new active segment (its file is created at the next flush).
    fn roll(&mut self, first_seq: u64) {
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        let header = Record::SegmentHeader(SegmentHeader {
            format_version: FORMAT_VERSION,
            log: self.kind,
            segment_id: id,
            first_seq,
        });
        let mut bytes = std::mem::take(&mut self.spare);
        header.encode(id, &mut bytes);
        let len = bytes.len() as u64;
        self.chunks.push(Chunk { segment: id, bytes });
        self.unwritten_bytes += len as usize;
        self.disk_bytes += len;
        self.segments.insert(
            id,
            Segment::new(
                segment_name(self.kind, id, first_seq),
                first_seq,
                len,
                false,
            ),
        );
        self.active = id;
    }

    /// Buffers `record` at the end of the log, rolling to a new segment first if it would push the
    /// active one past the target. Returns the segment and offset it was given. `next_seq` becomes
    /// the new segment header's `first_seq` if a roll happens.
    pub fn push(&mut self, record: &Record<'_>, next_seq: u64) -> (u64, u64) {
        let len = record.encoded_len() as u64;
        let must_roll = match self.segments.get(&self.active) {
            Some(active) => {
                active.quarantined
                    || (active.bytes > SEGMENT_HEADER_RECORD_BYTES as u64
                        && active.bytes + len > self.settings.segment_bytes_target)
            }
            None => true,
        };
        if must_roll {
            self.roll(next_seq);
        }
        let id = self.active;
        if self.chunks.last().is_none_or(|chunk| chunk.segment != id) {
            let bytes = std::mem::take(&mut self.spare);
            self.chunks.push(Chunk { segment: id, bytes });
        }
        let mut offset = 0;
        if let (Some(chunk), Some(segment)) = (self.chunks.last_mut(), self.segments.get_mut(&id)) {
            offset = segment.bytes;
            record.encode(id, &mut chunk.bytes);
            segment.bytes += len;
        }
        self.unwritten_bytes += len as usize;
        self.disk_bytes += len;
        (id, offset)
    }

    /// Whether the write buffer has grown past its bound and should be flushed.
    pub fn buffer_full(&self) -> bool {
        self.unwritten_bytes > self.settings.write_buffer_bytes_max
    }

    /// Indexes a live entry. If `seq` is live already, `entry` is a copy of its record made
    /// later in the log (by compaction, or by recovery relocating it out of a quarantined
    /// segment, or found by recovery's replay) and becomes its location.
    pub fn insert(&mut self, seq: u64, entry: Entry) {
        let at = entry.segment;
        if let Some(segment) = self.segments.get_mut(&at) {
            segment.live += 1;
            segment.live_bytes += u64::from(entry.record_len);
        }
        self.payload_bytes += u64::from(entry.payload_len);
        self.live_bytes += u64::from(entry.record_len);
        if let Some(old) = self.entries.insert(seq, entry) {
            self.unindex(&old);
            // The original stays on disk until its segment is deleted. The copy's segment must
            // not go first: with it could go a retirement of the copy, and the original would
            // come back.
            if old.segment != at && self.segments.contains_key(&old.segment) {
                if let Some(segment) = self.segments.get_mut(&at) {
                    segment.refs.insert(old.segment);
                }
            }
        }
    }

    fn unindex(&mut self, entry: &Entry) {
        self.payload_bytes -= u64::from(entry.payload_len);
        self.live_bytes -= u64::from(entry.record_len);
        if let Some(segment) = self.segments.get_mut(&entry.segment) {
            debug_assert!(segment.live > 0, "live count underflow");
            segment.live = segment.live.saturating_sub(1);
            segment.live_bytes = segment
                .live_bytes
                .saturating_sub(u64::from(entry.record_len));
            if segment.live == 0 {
                self.deletion_due = true;
            }
        }
    }

    /// Removes a live entry because a record in segment `by` retired it.
    pub fn remove(&mut self, seq: u64, by: u64) -> Option<Entry> {
        let entry = self.entries.remove(&seq)?;
        self.unindex(&entry);
        if entry.segment != by {
            if let Some(segment) = self.segments.get_mut(&by) {
                segment.refs.insert(entry.segment);
            }
        }
        Some(entry)
    }

    /// Hands every buffered record to the storage (no fsync, except of older segments before a new
    /// one receives its first bytes).
    pub fn flush<S: Storage>(&mut self, storage: &mut S) -> Result<(), StorageError> {
        let chunks = std::mem::take(&mut self.chunks);
        self.unwritten_bytes = 0;
        let mut spare = None;
        for chunk in chunks {
            let name = self.name(chunk.segment);
            let created = self
                .segments
                .get(&chunk.segment)
                .is_some_and(|segment| segment.created);
            if !created {
                if self.settings.fsync {
                    for id in std::mem::take(&mut self.unsynced) {
                        let older = self.name(id);
                        storage
                            .sync(&older)
                            .map_err(|e| StorageError::new(StorageOp::Sync, &older, e))?;
                    }
                }
                storage
                    .create(&name)
                    .map_err(|e| StorageError::new(StorageOp::Create, &name, e))?;
                self.dir_dirty = true;
            }
            storage
                .append(&name, &chunk.bytes)
                .map_err(|e| StorageError::new(StorageOp::Append, &name, e))?;
            if let Some(segment) = self.segments.get_mut(&chunk.segment) {
                segment.created = true;
                segment.written += chunk.bytes.len() as u64;
                debug_assert_eq!(
                    segment.written, segment.bytes,
                    "flush wrote a partial chunk"
                );
            }
            self.unsynced.insert(chunk.segment);
            spare = Some(chunk.bytes);
        }
        if let Some(mut bytes) = spare {
            bytes.clear();
            self.spare = bytes;
        }
        Ok(())
    }

    /// Flushes, then makes everything written durable: one fsync per written segment (normally
    /// one) and a directory fsync if segments were created or removed.
    pub fn sync<S: Storage>(&mut self, storage: &mut S) -> Result<(), StorageError> {
        self.flush(storage)?;
        if self.settings.fsync {
            for id in std::mem::take(&mut self.unsynced) {
                let name = self.name(id);
                storage
                    .sync(&name)
                    .map_err(|e| StorageError::new(StorageOp::Sync, &name, e))?;
            }
            if self.dir_dirty {
                storage
                    .sync_dir()
                    .map_err(|e| StorageError::new(StorageOp::SyncDir, "", e))?;
            }
        } else {
            self.unsynced.clear();
        }
        self.dir_dirty = false;
        Ok(())
    }

    /// Deletes every segment that is not active, holds no live entry and refers to no remaining
    /// segment; call after [`Log::sync`]. Returns how many were deleted.
    pub fn delete_retired<S: Storage>(&mut self, storage: &mut S) -> Result<usize, StorageError> {
        if !self.deletion_due {
            return Ok(0);
        }
        self.deletion_due = false;
        let mut doomed = BTreeSet::new();
        // Refs point to older segments, so one ascending pass sees every cascade.
        for (&id, segment) in &self.segments {
            let deletable = id != self.active
                && segment.live == 0
                && segment.created
                && !segment.quarantined
                && segment.written == segment.bytes
                && segment
                    .refs
                    .iter()
                    .all(|r| doomed.contains(r) || !self.segments.contains_key(r));
            if deletable {
                doomed.insert(id);
            }
        }
        for &id in &doomed {
            debug_assert!(
                !self.entries.values().any(|entry| entry.segment == id),
                "deleting a segment that holds a live entry"
            );
            let name = self.name(id);
            storage
                .remove(&name)
                .map_err(|e| StorageError::new(StorageOp::Remove, &name, e))?;
            if let Some(segment) = self.segments.remove(&id) {
                self.disk_bytes -= segment.bytes;
            }
            self.unsynced.remove(&id);
        }
        if !doomed.is_empty() {
            // Refs to deleted segments are satisfied for good: forget them, so that the sets of
            // long-lived segments do not grow with every segment that came and went.
            for segment in self.segments.values_mut() {
                segment.refs.retain(|id| !doomed.contains(id));
            }
            if self.settings.fsync {
                storage
                    .sync_dir()
                    .map_err(|e| StorageError::new(StorageOp::SyncDir, "", e))?;
            }
        }
        Ok(doomed.len())
    }

    /// Garbage (disk bytes not holding a live record) from which on compaction is considered:
    /// [`COMPACTION_TRIGGER_SEGMENTS`] segment targets, or a quarter of the cap if less.
    fn compaction_trigger_bytes(&self) -> u64 {
        (self.settings.segment_bytes_target * COMPACTION_TRIGGER_SEGMENTS)
            .min(self.settings.bytes_max / 4)
            .max(1)
    }

    /// Decides whether a compaction step is worth it now, and which segments it evacuates.
    ///
    /// Only a fully durable log is compacted (call after [`Log::sync`]), and only once its
    /// garbage reached [`Log::compaction_trigger_bytes`] — so a log whose segments empty in order
    /// (acks that keep up) never pays for it. The candidates are the prefixes of the log, oldest
    /// segment first: evacuating a prefix empties it, and since refs only point to older
    /// segments, nothing outside the prefix can keep it alive. For every segment one ascending
    /// pass computes the shortest prefix after whose evacuation it can be deleted (its own
    /// position if it holds live records, else the longest needed by the segments it refers to),
    /// which gives each prefix's reclaimed bytes; its copied bytes are its live bytes. The step
    /// takes the prefix with the largest net gain among those that
    /// - copy at most one segment target (the first segment is always allowed, so that a segment
    ///   holding one huge record can still move) and span at most [`COMPACTION_SEGMENTS_MAX`]
    ///   segments: bounds on the step's IO, memory and the transient growth before deletion;
    /// - reclaim at least [`COMPACTION_RECLAIM_PER_COPIED_BYTE`] times what they copy: bounds the
    ///   write amplification (every byte copied frees at least two), and keeps the log from
    ///   churning through mostly live segments;
    /// - gain at least half the trigger: no fsync spent on a crumb.
    ///
    /// The active segment can be part of a prefix (the log then rolls first): a log smaller than
    /// one segment target — a cap below the target — is otherwise never reclaimed at all.
    pub fn compaction_plan(&self) -> Option<CompactionPlan> {
        let trigger = self.compaction_trigger_bytes();
        let garbage = self.disk_bytes.saturating_sub(self.live_bytes);
        if garbage < trigger || self.unwritten_bytes > 0 || !self.unsynced.is_empty() {
            return None;
        }
        const NEVER: usize = usize::MAX;
        let evacuable =
            |segment: &Segment| segment.created && !segment.quarantined && !segment.unreadable;
        // needs[id]: the length of the shortest evacuated prefix after which `id` can go.
        let mut needs: BTreeMap<u64, usize> = BTreeMap::new();
        // freed_at[length]: bytes of the segments that become deletable exactly at that length.
        let considered = self.segments.len().min(COMPACTION_SEGMENTS_MAX);
        let mut freed_at = vec![0u64; considered + 1];
        for (position, (&id, segment)) in self.segments.iter().enumerate() {
            // Live records must be copied out of it, or it is the active segment (only a roll
            // lets that go): it goes only with a prefix that includes it.
            let must_be_evacuated = segment.live > 0 || id == self.active;
            let mut need = match (must_be_evacuated, evacuable(segment)) {
                (false, _) => 0,
                (true, true) => position + 1,
                (true, false) => NEVER,
            };
            if !segment.created || segment.quarantined {
                need = NEVER;
            }
            for referred in &segment.refs {
                if let Some(&referred_need) = needs.get(referred) {
                    need = need.max(referred_need);
                }
            }
            needs.insert(id, need);
            if let Some(freed) = freed_at.get_mut(need) {
                *freed += segment.bytes;
            }
        }

        let budget = self.settings.segment_bytes_target;
        let mut best: Option<CompactionPlan> = None;
        let mut copy_bytes = 0u64;
        let mut reclaim_bytes = freed_at[0];
        for (position, (&id, segment)) in self.segments.iter().enumerate().take(considered) {
            let rolls = id == self.active;
            if !evacuable(segment) && (segment.live > 0 || rolls) {
                break;
            }
            copy_bytes += segment.live_bytes;
            if rolls {
                copy_bytes += SEGMENT_HEADER_RECORD_BYTES as u64;
            }
            if position > 0 && copy_bytes > budget {
                break;
            }
            reclaim_bytes += freed_at[position + 1];
            let gain = reclaim_bytes.saturating_sub(copy_bytes);
            let worth_it = reclaim_bytes >= COMPACTION_RECLAIM_PER_COPIED_BYTE * copy_bytes
                && gain >= trigger / 2
                && best
                    .as_ref()
                    .is_none_or(|plan| gain > plan.reclaim_bytes.saturating_sub(plan.copy_bytes));
            if worth_it {
                best = Some(CompactionPlan {
                    evacuate: self.segments.keys().take(position + 1).copied().collect(),
                    rolls,
                    copy_bytes,
                    reclaim_bytes,
                });
            }
            if rolls {
                break;
            }
        }
        best
    }

    /// Runs one compaction step if [`Log::compaction_plan`] finds one worth it: copies the live
    /// records of the planned segments to the end of the log under their own seqs, makes the
    /// copies durable, then deletes the segments that emptied (see the module docs for why a
    /// crash anywhere in between is harmless). Call after [`Log::sync`].
    ///
    /// Every record is read back (checksum verified) before anything is written, so a record
    /// that cannot be read leaves the log as it was: a checksum failure marks its segment
    /// unreadable (raising an alarm; compaction stops short of it and the next open quarantines
    /// it), a read error just skips this step. A write failure is returned: the caller poisons.
    /// Returns whether a step ran. Peak memory: the payloads copied, at most one segment target
    /// plus one record.
    pub fn compact<S: Storage>(
        &mut self,
        storage: &mut S,
        next_seq: u64,
    ) -> Result<bool, StorageError> {
        let Some(plan) = self.compaction_plan() else {
            return Ok(false);
        };
        let evacuated: BTreeSet<u64> = plan.evacuate.iter().copied().collect();
        let moving: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, entry)| evacuated.contains(&entry.segment))
            .map(|(&seq, _)| seq)
            .collect();
        let mut copies = Vec::with_capacity(moving.len());
        for seq in moving {
            match self.read_payload(storage, seq) {
                Ok(payload) => copies.push((seq, payload)),
                Err(Err(failure)) => return Err(failure),
                Err(Ok(SpoolError::Corrupt {
                    file,
                    offset,
                    error: decode_error,
                    ..
                })) => {
                    error!(
                        log = %self.kind,
                        %file,
                        offset,
                        seq,
                        error = %decode_error,
                        "ALARM: spool record failed its checksum when compaction read it back; \
                         the segment stays as it is until the next open quarantines it"
                    );
                    if let Some(segment) = self.entries.get(&seq).map(|entry| entry.segment) {
                        if let Some(segment) = self.segments.get_mut(&segment) {
                            segment.unreadable = true;
                        }
                    }
                    return Ok(false);
                }
                Err(Ok(refused)) => {
                    warn!(log = %self.kind, seq, error = %refused, "compaction skipped: a record could not be read back");
                    return Ok(false);
                }
            }
        }
        if plan.rolls {
            self.roll(next_seq);
        }
        let mut records = 0;
        for (seq, payload) in copies {
            let Some(reason) = self.entries.get(&seq).map(|entry| entry.reason.clone()) else {
                continue;
            };
            let record = match &reason {
                Some(reason) => Record::DeadLetter {
                    seq,
                    reason,
                    payload: &payload,
                },
                None => Record::Append {
                    seq,
                    payload: &payload,
                },
            };
            let record_len = record.encoded_len();
            let (segment, offset) = self.push(&record, next_seq);
            self.insert(
                seq,
                Entry {
                    segment,
                    offset,
                    record_len: u32::try_from(record_len).unwrap_or(u32::MAX),
                    payload_len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                    reason,
                },
            );
            records += 1;
            self.compacted_records += 1;
            if self.buffer_full() {
                self.flush(storage)?;
            }
        }
        // The copies are durable before anything they replace is deleted.
        self.sync(storage)?;
        self.deletion_due = true;
        let segments_deleted = self.delete_retired(storage)?;
        debug_assert!(
            plan.evacuate
                .iter()
                .all(|id| !self.segments.contains_key(id)),
            "an evacuated segment survived its compaction"
        );
        self.compactions += 1;
        debug!(
            log = %self.kind,
            records,
            segments_evacuated = plan.evacuate.len(),
            segments_deleted,
            copied_bytes = plan.copy_bytes,
            reclaimed_bytes = plan.reclaim_bytes,
            "spool compacted"
        );
        Ok(true)
    }

    /// Reads a live entry's record back from the storage, checks it, and returns its payload.
    /// Flushes first if the record is still in the write buffer; a failure of that flush is a
    /// write failure (`Err(Err(_))`), the caller poisons on it.
    pub fn read_payload<S: Storage>(
        &mut self,
        storage: &mut S,
        seq: u64,
    ) -> Result<Bytes, Result<SpoolError, StorageError>> {
        let entry = self
            .entries
            .get(&seq)
            .cloned()
            .ok_or(Ok(SpoolError::NotPending { seq }))?;
        let buffered = self
            .segments
            .get(&entry.segment)
            .is_none_or(|segment| segment.written < entry.offset + u64::from(entry.record_len));
        if buffered {
            self.flush(storage).map_err(Err)?;
        }
        let name = self.name(entry.segment);
        let mut buf = vec![0; entry.record_len as usize];
        storage
            .read_at(&name, entry.offset, &mut buf)
            .map_err(|e| Ok(StorageError::new(StorageOp::Read, &name, e).into()))?;
        let corrupt = |error| {
            Ok(SpoolError::Corrupt {
                seq,
                file: name.clone(),
                offset: entry.offset,
                error,
            })
        };
        let payload_len = match record::decode(&buf, entry.segment) {
            Ok((Record::Append { seq: s, payload }, _)) if s == seq => payload.len(),
            Ok((
                Record::DeadLetter {
                    seq: s, payload, ..
                },
                _,
            )) if s == seq => payload.len(),
            Ok(_) => {
                return Err(corrupt(DecodeError::Malformed {
                    what: "wrong record",
                }))
            }
            Err(error) => return Err(corrupt(error)),
        };
        let payload_start = buf.len() - payload_len;
        Ok(Bytes::from(buf).slice(payload_start..))
    }
}

/// What recovery learned from one log before it is finished (see [`Scanned::finish`]).
#[derive(Debug)]
pub(crate) struct Scanned {
    pub log: Log,
    /// Payloads of the live entries, sliced from the segment buffers read.
    pub payloads: BTreeMap<u64, Bytes>,
    /// The highest seq this log shows was handed out: records' seqs, and first seqs (from the
    /// segment names) minus one.
    pub seq_floor: u64,
    /// The highest seq shown by the segments read so far, in log order (their names' first seqs
    /// minus one, and their records).
    read_floor: u64,
    /// How many seqs the damaged bytes at the end of the newest segment (torn or corrupt) could
    /// have held: the next seq must skip that many past every seq known.
    pub tail_room: u64,
    /// Index in `quarantined` of the newest segment, if it was quarantined.
    pub tail_quarantine: Option<usize>,
    pub truncated: Vec<TruncatedTail>,
    pub quarantined: Vec<QuarantinedSegment>,
    /// Retirements read from the segment being scanned, of records in older segments:
    /// `(seq, segment of its record)`.
    segment_retirements: Vec<(u64, u64)>,
    /// Such retirements read from segments that are being quarantined: renaming those aside would
    /// resurrect the records they retired, so [`Scanned::finish`] writes them again.
    orphaned_retirements: Vec<(u64, u64)>,
    /// `.quarantined` files found from earlier opens.
    pub quarantined_earlier: Vec<String>,
}

/// Reads every segment of a log and rebuilds its index. Truncates a torn tail (durably) but does
/// not otherwise write: quarantined segments are renamed by [`Scanned::finish`], after their live
/// entries are safe elsewhere.
pub(crate) fn scan<S: Storage>(
    storage: &mut S,
    kind: LogKind,
    names: &[String],
    settings: Settings,
) -> Result<Scanned, OpenError> {
    let mut log = Log::new(kind, settings);
    let mut segments: BTreeMap<u64, (u64, &str)> = BTreeMap::new();
    let mut quarantined_earlier = Vec::new();
    let mut seq_floor = 0u64;
    for name in names {
        if let Some((id, first_seq)) = parse_segment_name(kind, name) {
            seq_floor = seq_floor.max(first_seq.saturating_sub(1));
            log.next_segment_id = log.next_segment_id.max(id.saturating_add(1));
            if let Some((_, other)) = segments.insert(id, (first_seq, name)) {
                // Two files claim one id: only a hand could do that. Read neither silently.
                error!(log = %kind, %name, %other, "ALARM: two spool segments share an id");
                return Err(OpenError::DuplicateSegment {
                    file: name.clone(),
                    other: other.to_owned(),
                });
            }
        } else if let Some((id, first_seq)) = name
            .strip_suffix(QUARANTINE_SUFFIX)
            .and_then(|original| parse_segment_name(kind, original))
        {
            quarantined_earlier.push(name.clone());
            seq_floor = seq_floor.max(first_seq.saturating_sub(1));
            log.next_segment_id = log.next_segment_id.max(id.saturating_add(1));
        }
    }
    quarantined_earlier.sort();

    let mut scanned = Scanned {
        log,
        payloads: BTreeMap::new(),
        seq_floor,
        read_floor: 0,
        tail_room: 0,
        tail_quarantine: None,
        truncated: Vec::new(),
        quarantined: Vec::new(),
        segment_retirements: Vec::new(),
        orphaned_retirements: Vec::new(),
        quarantined_earlier,
    };
    // For each quarantined pending-log segment not the newest: the seqs its unreadable part may
    // have held start at `low`, and end at the next readable header's first seq.
    let mut open_ranges: Vec<(usize, u64)> = Vec::new();
    let count = segments.len();
    for (index, (id, (first_seq, name))) in segments.into_iter().enumerate() {
        let last = index + 1 == count;
        scanned.read_floor = scanned.read_floor.max(first_seq.saturating_sub(1));
        for (report, low) in open_ranges.drain(..) {
            if first_seq > low {
                scanned.quarantined[report].possibly_lost_seqs = Some(low..first_seq);
            }
        }
        let len = storage
            .len(name)
            .map_err(|e| StorageError::new(StorageOp::Len, name, e))?;
        let read_len = len.min(SEGMENT_FILE_BYTES_MAX);
        let mut data = vec![0; usize::try_from(read_len).unwrap_or(0)];
        storage
            .read_at(name, 0, &mut data)
            .map_err(|e| StorageError::new(StorageOp::Read, name, e))?;
        let data = Bytes::from(data);
        scanned.segment_retirements.clear();
        let outcome = scanned.scan_segment(id, first_seq, name, &data)?;
        let mut damage = outcome.damage;
        if damage.is_none() && len > read_len {
            damage = Some((read_len, Corruption::Oversized { len }));
        }
        let Some((at, corruption)) = damage else {
            continue;
        };
        let unreadable_bytes = len - at;
        // Seqs the unreadable bytes may have held come after everything read before them. At the
        // end of the log nothing else bounds them: the next seq moves past as many as the bytes
        // could hold (see `tail_room`), so that no seq a peer may have seen is handed out again
        // (for a torn tail they were never synced, but may have been sent).
        let low = scanned.read_floor.saturating_add(1);
        let room = unreadable_bytes / APPEND_RECORD_BYTES_MIN as u64;
        let torn = last && len == read_len && looks_torn(&data, at, id);
        if kind == LogKind::Spool && last {
            scanned.tail_room = room;
        }
        if torn {
            scanned.truncate_torn(storage, id, name, at, len)?;
            continue;
        }
        error!(
            log = %kind,
            file = %name,
            offset = at,
            %corruption,
            unreadable_bytes,
            "ALARM: spool segment is corrupt; quarantining it (readable records are kept, the \
             rest is lost)"
        );
        if let Some(segment) = scanned.log.segments.get_mut(&id) {
            segment.quarantined = true;
        }
        let orphaned = std::mem::take(&mut scanned.segment_retirements);
        scanned.orphaned_retirements.extend(orphaned);
        if kind == LogKind::Spool {
            if last {
                scanned.tail_quarantine = Some(scanned.quarantined.len());
            } else {
                open_ranges.push((scanned.quarantined.len(), low));
            }
        }
        scanned.quarantined.push(QuarantinedSegment {
            log: kind,
            file: name.to_owned(),
            renamed_to: format!("{name}{QUARANTINE_SUFFIX}"),
            offset: at,
            corruption,
            unreadable_bytes,
            relocated_records: 0,
            possibly_lost_seqs: None,
        });
    }
    scanned.seq_floor = scanned.seq_floor.max(scanned.read_floor);
    Ok(scanned)
}

/// What scanning one segment found.
struct SegmentOutcome {
    /// Offset and kind of the first damage, if any.
    damage: Option<(u64, Corruption)>,
}

impl Scanned {
    fn scan_segment(
        &mut self,
        id: u64,
        first_seq: u64,
        name: &str,
        data: &Bytes,
    ) -> Result<SegmentOutcome, OpenError> {
        let mut outcome = SegmentOutcome { damage: None };
        let mut offset = match record::decode(data, id) {
            // An empty file holds nothing to lose: a segment created just before a crash, or one
            // whose torn header recovery cut off.
            _ if data.is_empty() => 0,
            Ok((Record::SegmentHeader(header), len))
                if header.log == self.log.kind
                    && header.segment_id == id
                    && header.first_seq == first_seq =>
            {
                len
            }
            Ok(_) => {
                outcome.damage = Some((0, Corruption::MissingHeader));
                0
            }
            Err(DecodeError::UnsupportedVersion { version }) => {
                return Err(OpenError::UnsupportedVersion {
                    file: name.to_owned(),
                    version,
                });
            }
            Err(error) => {
                outcome.damage = Some((0, Corruption::Record(error)));
                0
            }
        };
        self.log.segments.insert(
            id,
            Segment::new(name.to_owned(), first_seq, data.len() as u64, true),
        );
        if outcome.damage.is_some() {
            return Ok(outcome);
        }
        while offset < data.len() {
            let (record, len) = match record::decode(&data[offset..], id) {
                Ok(decoded) => decoded,
                Err(error) => {
                    outcome.damage = Some((offset as u64, Corruption::Record(error)));
                    break;
                }
            };
            if let Err(corruption) = self.apply(id, offset, len, &record, data) {
                outcome.damage = Some((offset as u64, corruption));
                break;
            }
            offset += len;
        }
        Ok(outcome)
    }

    /// Replays one valid record into the index.
    fn apply(
        &mut self,
        id: u64,
        offset: usize,
        len: usize,
        record: &Record<'_>,
        data: &Bytes,
    ) -> Result<(), Corruption> {
        let kind = self.log.kind;
        let misplaced = |what| Err(Corruption::Misplaced { what });
        let payload_entry = |seq: u64, payload: &[u8], reason: Option<&str>| {
            let payload_start = offset + len - payload.len();
            (
                Entry {
                    segment: id,
                    offset: offset as u64,
                    record_len: u32::try_from(len).unwrap_or(u32::MAX),
                    payload_len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                    reason: reason.map(Box::from),
                },
                data.slice(payload_start..offset + len),
                seq,
            )
        };
        let (entry, payload, seq) = match (*record, kind) {
            (Record::Append { seq, payload }, LogKind::Spool) => payload_entry(seq, payload, None),
            (
                Record::DeadLetter {
                    seq,
                    reason,
                    payload,
                },
                LogKind::Dead,
            ) => payload_entry(seq, payload, Some(reason)),
            (Record::Retire { seq }, LogKind::Spool)
            | (Record::DeadLetterRemoved { seq }, LogKind::Dead) => {
                self.read_floor = self.read_floor.max(seq);
                self.retire(seq, id);
                return Ok(());
            }
            (Record::RetireUpTo { seq }, LogKind::Spool) => {
                self.read_floor = self.read_floor.max(seq);
                let retired: Vec<u64> = self.log.entries.range(..=seq).map(|(&s, _)| s).collect();
                for seq in retired {
                    self.retire(seq, id);
                }
                return Ok(());
            }
            (Record::SegmentHeader(_), _) => return misplaced("segment header inside a segment"),
            (_, LogKind::Spool) => return misplaced("dead-letter record in the pending log"),
            (_, LogKind::Dead) => return misplaced("pending-log record in the dead-letter log"),
        };
        self.read_floor = self.read_floor.max(seq);
        self.log.insert(seq, entry);
        self.payloads.insert(seq, payload);
        Ok(())
    }

    /// Applies one retirement read from segment `id`.
    fn retire(&mut self, seq: u64, id: u64) {
        if let Some(entry) = self.log.remove(seq, id) {
            self.payloads.remove(&seq);
            if entry.segment != id {
                self.segment_retirements.push((seq, entry.segment));
            }
        }
    }

    /// Cuts a torn tail off the newest segment (or removes the segment if even its header is torn).
    fn truncate_torn<S: Storage>(
        &mut self,
        storage: &mut S,
        id: u64,
        name: &str,
        at: u64,
        len: u64,
    ) -> Result<(), OpenError> {
        warn!(
            log = %self.log.kind,
            file = %name,
            offset = at,
            bytes = len - at,
            "truncating a torn write at the end of the spool (records that were never synced)"
        );
        // Cut at the damage. If not even the header survived, the file becomes empty but stays
        // until a newer segment is durable: its name is the only record of its first seq. It is
        // then deleted like any segment without live records.
        storage
            .truncate(name, at)
            .map_err(|e| StorageError::new(StorageOp::Truncate, name, e))?;
        if let Some(segment) = self.log.segments.get_mut(&id) {
            segment.bytes = at;
            segment.written = at;
        }
        self.truncated.push(TruncatedTail {
            log: self.log.kind,
            file: name.to_owned(),
            offset: at,
            bytes: len - at,
        });
        Ok(())
    }

    /// Makes the recovered log writable and consistent on disk: picks or creates the active
    /// segment, relocates live entries out of quarantined segments into it, makes everything
    /// durable, renames the quarantined segments aside and deletes fully retired ones.
    pub fn finish<S: Storage>(&mut self, storage: &mut S, next_seq: u64) -> Result<(), OpenError> {
        let log = &mut self.log;
        for segment in log.segments.values() {
            log.disk_bytes += segment.bytes;
        }
        // The newest segment stays active if it survived intact (or truncated); otherwise a new
        // one starts. Its existing bytes may have survived a crash without an fsync (the page
        // cache outlives the process), so the next sync covers it too.
        // Every segment read may hold bytes that survived a process crash without an fsync (the
        // page cache outlives the process): the first sync covers them all, so that everything
        // recovery reports is durable.
        let readable: Vec<u64> = log
            .segments
            .iter()
            .filter(|(_, segment)| !segment.quarantined)
            .map(|(&id, _)| id)
            .collect();
        log.unsynced.extend(readable);
        // Likewise the directory entries read may not be durable yet (a segment created just
        // before the crash of the process): one directory fsync covers them.
        log.dir_dirty = true;
        // After damage the log continues in a fresh segment, whose header durably records
        // `next_seq`: the seqs the damaged bytes may have held must not come back at the next
        // open either, and nothing else on disk would remember them.
        let damaged = !self.truncated.is_empty() || !self.quarantined.is_empty();
        match log.segments.last_key_value() {
            Some((&id, segment))
                if !damaged
                    && !segment.quarantined
                    && segment.bytes >= SEGMENT_HEADER_RECORD_BYTES as u64
                    && id + 1 == log.next_segment_id =>
            {
                log.active = id;
            }
            _ => log.roll(next_seq),
        }

        let relocate: Vec<u64> = log
            .entries
            .iter()
            .filter(|(_, entry)| {
                log.segments
                    .get(&entry.segment)
                    .is_some_and(|segment| segment.quarantined)
            })
            .map(|(&seq, _)| seq)
            .collect();
        for seq in relocate {
            let (Some(entry), Some(payload)) = (log.entries.get(&seq), self.payloads.get(&seq))
            else {
                continue;
            };
            let from = entry.segment;
            let reason = entry.reason.clone();
            let record = match &reason {
                Some(reason) => Record::DeadLetter {
                    seq,
                    reason: reason.as_ref(),
                    payload: payload.as_ref(),
                },
                None => Record::Append {
                    seq,
                    payload: payload.as_ref(),
                },
            };
            let record_len = record.encoded_len();
            let (segment, offset) = log.push(&record, next_seq);
            log.insert(
                seq,
                Entry {
                    segment,
                    offset,
                    record_len: u32::try_from(record_len).unwrap_or(u32::MAX),
                    payload_len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
                    reason,
                },
            );
            let from_name = log.name(from);
            if let Some(report) = self.quarantined.iter_mut().find(|q| q.file == from_name) {
                report.relocated_records += 1;
            }
        }
        // Retirements in the readable part of a quarantined segment must outlive it.
        for (seq, location) in std::mem::take(&mut self.orphaned_retirements) {
            let survives = log
                .segments
                .get(&location)
                .is_some_and(|segment| !segment.quarantined);
            if !survives || log.entries.contains_key(&seq) {
                continue;
            }
            let record = match log.kind {
                LogKind::Spool => Record::Retire { seq },
                LogKind::Dead => Record::DeadLetterRemoved { seq },
            };
            let (segment, _) = log.push(&record, next_seq);
            if let Some(segment) = log.segments.get_mut(&segment) {
                segment.refs.insert(location);
            }
        }
        log.sync(storage)?;

        let quarantined: Vec<u64> = log
            .segments
            .iter()
            .filter(|(_, segment)| segment.quarantined)
            .map(|(&id, _)| id)
            .collect();
        for &id in &quarantined {
            let name = log.name(id);
            let aside = format!("{name}{QUARANTINE_SUFFIX}");
            storage
                .rename(&name, &aside)
                .map_err(|e| StorageError::new(StorageOp::Rename, &name, e))?;
            if let Some(segment) = log.segments.remove(&id) {
                log.disk_bytes -= segment.bytes;
            }
        }
        if !quarantined.is_empty() && log.settings.fsync {
            storage
                .sync_dir()
                .map_err(|e| StorageError::new(StorageOp::SyncDir, "", e))?;
        }
        log.deletion_due = true;
        log.delete_retired(storage)?;
        Ok(())
    }
}

/// Whether damage at `at` in the newest segment looks like a torn write: nothing valid follows it.
///
/// A torn write leaves a last record that is incomplete or garbled and nothing after it; a bit
/// flip in the middle leaves valid records after the damage. So the rest of the segment is
/// searched for any record that decodes with this segment's id; finding one means corruption.
/// Only the classification uses what the search finds — records past damage are never applied,
/// since a payload could embed bytes that look like a valid record. A false "corrupt" costs an
/// alarm and a quarantine (the readable part is kept); the search is bounded by
/// [`TORN_SCAN_HASHED_BYTES_MAX`], past which the answer is "corrupt".
fn looks_torn(data: &[u8], at: u64, segment_id: u64) -> bool {
    let Ok(at) = usize::try_from(at) else {
        return false;
    };
    let mut hashed = 0u64;
    for start in at.saturating_add(1)..data.len() {
        let rest = &data[start..];
        let Some((header, body)) = rest.split_first_chunk::<RECORD_HEADER_BYTES>() else {
            break;
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        // Cheap filters first: a plausible length, a known kind byte.
        if len == 0
            || len > RECORD_BODY_BYTES_MAX
            || len > body.len()
            || !(1..=6).contains(&body[0])
        {
            continue;
        }
        hashed += len as u64;
        if hashed > TORN_SCAN_HASHED_BYTES_MAX {
            return false;
        }
        if record::decode(rest, segment_id).is_ok() {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_roundtrip() {
        let name = segment_name(LogKind::Dead, 0x2a, 7);
        assert_eq!(name, "dead-000000000000002a-0000000000000007.log");
        assert_eq!(parse_segment_name(LogKind::Dead, &name), Some((0x2a, 7)));
        assert_eq!(parse_segment_name(LogKind::Spool, &name), None);
        for bad in [
            "dead-2a-7.log",
            "dead-000000000000002a.log",
            "dead-000000000000002a-0000000000000007.log.quarantined",
            "dead-+00000000000002a-0000000000000007.log",
            "dead-000000000000002a-0000000000000007-0000000000000007.log",
        ] {
            assert_eq!(parse_segment_name(LogKind::Dead, bad), None, "{bad}");
        }
    }

    fn entry(segment: u64, offset: u64, record: &Record<'_>, payload_len: usize) -> Entry {
        Entry {
            segment,
            offset,
            record_len: record.encoded_len() as u32,
            payload_len: payload_len as u32,
            reason: None,
        }
    }

    /// Appends `record` holding a payload of `payload_len` and indexes it as live `seq`.
    fn append(log: &mut Log, seq: u64, payload: &[u8]) {
        let record = Record::Append { seq, payload };
        let (segment, offset) = log.push(&record, seq);
        log.insert(seq, entry(segment, offset, &record, payload.len()));
    }

    /// Pushes a retirement of `seq` and applies it.
    fn retire(log: &mut Log, seq: u64) {
        let (segment, _) = log.push(&Record::Retire { seq }, 100);
        log.remove(seq, segment);
    }

    /// A copy's segment must not be deleted while the segment holding the original exists: a
    /// retirement of the copy could go with it, and the original would come back at the next
    /// open. (Compaction deletes an original's segment right after the copy is durable, so only
    /// a segment kept for another reason — here a ref to an older segment with a live record —
    /// outlives its copies long enough for this to matter.)
    #[test]
    fn a_copy_does_not_outlive_the_segment_of_its_original() {
        let config = crate::SpoolConfig::default();
        let mut sim = crate::SimStorage::new(1);
        let mut log = Log::new(LogKind::Spool, config.settings_for_tests());
        append(&mut log, 1, b"Y, live for ever"); // segment 1
        append(&mut log, 2, b"Z");
        log.roll(3); // segment 2: X, and the retirement of Z (pins segment 2 behind segment 1)
        append(&mut log, 3, b"X");
        retire(&mut log, 2);
        log.roll(4); // segment 3: a copy of X
        append(&mut log, 3, b"X");
        log.roll(4); // segment 4: X retired
        retire(&mut log, 3);
        log.roll(4);
        log.sync(&mut sim).unwrap();
        log.deletion_due = true;
        log.delete_retired(&mut sim).unwrap();
        drop(log);
        let (_, recovery) = crate::Spool::open(sim, config).unwrap();
        let pending: Vec<u64> = recovery.pending.iter().map(|r| r.seq).collect();
        assert_eq!(pending, [1], "retired X came back");
    }

    #[test]
    fn torn_tails_and_flips_are_told_apart() {
        let mut data = Vec::new();
        for seq in 1..=3 {
            Record::Append {
                seq,
                payload: b"some payload",
            }
            .encode(9, &mut data);
        }
        let second = Record::Append {
            seq: 1,
            payload: b"some payload",
        }
        .encoded_len();
        // A cut inside the last record: torn.
        assert!(looks_torn(&data[..data.len() - 3], (2 * second) as u64, 9));
        // A damaged second record followed by a valid third: corruption.
        let mut flipped = data.clone();
        flipped[second + RECORD_HEADER_BYTES + 3] ^= 1;
        assert!(!looks_torn(&flipped, second as u64, 9));
        // Zeroed tail: torn.
        let mut zeroed = data[..2 * second].to_vec();
        zeroed.extend_from_slice(&[0; 100]);
        assert!(looks_torn(&zeroed, (2 * second) as u64, 9));
    }
}
