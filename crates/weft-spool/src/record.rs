//! The record format: length-prefixed, checksummed, decoded in two phases.
//!
//! ```text
//! record   = len:u32-le  checksum:u64-le  body            (len counts the body only)
//! checksum = first 8 bytes of blake3(segment_id:u64-le || len:u32-le || body), read as u64-le
//! body     = kind:u8  fields
//!
//! kind 1  SegmentHeader      magic:[u8;8]="WEFTSPOL" format_version:u16 log:u8 segment_id:u64 first_seq:u64
//! kind 2  Append             seq:u64  payload:(rest of body)
//! kind 3  Retire             seq:u64
//! kind 4  RetireUpTo         seq:u64
//! kind 5  DeadLetter         seq:u64  reason_len:u16  reason:utf8[reason_len]  payload:(rest of body)
//! kind 6  DeadLetterRemoved  seq:u64
//! ```
//! All integers are little-endian. Every segment file starts with a `SegmentHeader` record and holds
//! nothing but records, back to back.
//!
//! The checksum also covers the id of the segment the record was written to (the id is in the file
//! name, not repeated per record), so a record that turns up in the wrong file — stale blocks of a
//! deleted segment after a crash, a file renamed by hand — fails its checksum like a flipped bit.
//!
//! Decoding is two-phase (STYLE rule 5): the 12-byte header is read first and the length is checked
//! against [`RECORD_BODY_BYTES_MAX`] and against the bytes actually present before the body is
//! touched; the body is then decoded from a bounded slice, and payloads are borrowed, never copied.
//!
//! Why a truncated blake3 rather than CRC32C: blake3 is already a workspace dependency (no new
//! crate), 64 bits make an undetected random corruption a 2^-64 event rather than 2^-32, and its
//! cost for small records (~100 ns for a 64-byte payload) is well inside the per-record budget of
//! the spool, which is dominated by the fsync it shares with the whole batch anyway.

use std::fmt;

/// Bytes of the record header: `len:u32` + `checksum:u64`.
pub const RECORD_HEADER_BYTES: usize = 4 + 8;

/// Largest payload any configuration may allow (a format bound, so that a record written under one
/// configuration is never mistaken for corruption under another). [`crate::SpoolConfig`]'s
/// `payload_bytes_max` must not exceed it.
pub const PAYLOAD_BYTES_LIMIT: u32 = 64 * 1024 * 1024;

/// Longest dead-letter reason, in bytes of UTF-8. Longer reasons are cut at a character boundary:
/// a reason is a diagnosis for a human, and refusing to dead-letter a message because its reason is
/// verbose would be worse than shortening the reason.
pub const REASON_BYTES_MAX: usize = 512;

/// Largest body the decoder accepts: a dead letter carrying the largest payload and reason. Any
/// length above it is corruption, refused before anything is allocated or hashed.
pub const RECORD_BODY_BYTES_MAX: usize =
    1 + 8 + 2 + REASON_BYTES_MAX + PAYLOAD_BYTES_LIMIT as usize;

/// The on-disk format version written into every segment header. A segment with a higher version
/// was written by a newer Weft: the spool refuses to open rather than misread (or quarantine) it.
pub const FORMAT_VERSION: u16 = 1;

/// Magic bytes at the start of every segment header body.
pub const MAGIC: [u8; 8] = *b"WEFTSPOL";

const KIND_SEGMENT_HEADER: u8 = 1;
const KIND_APPEND: u8 = 2;
const KIND_RETIRE: u8 = 3;
const KIND_RETIRE_UP_TO: u8 = 4;
const KIND_DEAD_LETTER: u8 = 5;
const KIND_DEAD_LETTER_REMOVED: u8 = 6;

/// Body bytes of a segment header: kind, magic, version, log, segment id, first seq.
const SEGMENT_HEADER_BODY_BYTES: usize = 1 + 8 + 2 + 1 + 8 + 8;

/// Encoded size of a segment header record.
pub const SEGMENT_HEADER_RECORD_BYTES: usize = RECORD_HEADER_BYTES + SEGMENT_HEADER_BODY_BYTES;

/// Encoded size of a `Retire`, `RetireUpTo` or `DeadLetterRemoved` record.
pub const SEQ_RECORD_BYTES: usize = RECORD_HEADER_BYTES + 1 + 8;

/// Encoded size of the smallest `Append` record (empty payload). Used to bound how many sequence
/// numbers an unreadable stretch of a segment can have held.
pub const APPEND_RECORD_BYTES_MIN: usize = RECORD_HEADER_BYTES + 1 + 8;

/// Which of the two logs in a spool directory a segment belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogKind {
    /// The pending log: appended messages and their retirements (`spool-*.log`).
    Spool,
    /// The dead-letter log: messages given up on, with reasons (`dead-*.log`).
    Dead,
}

impl LogKind {
    /// File name prefix of this log's segments.
    pub const fn prefix(self) -> &'static str {
        match self {
            LogKind::Spool => "spool",
            LogKind::Dead => "dead",
        }
    }

    const fn to_byte(self) -> u8 {
        match self {
            LogKind::Spool => 1,
            LogKind::Dead => 2,
        }
    }

    const fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(LogKind::Spool),
            2 => Some(LogKind::Dead),
            _ => None,
        }
    }
}

impl fmt::Display for LogKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.prefix())
    }
}

/// The first record of every segment: what the file is and where its sequence numbers start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version the segment was written with.
    pub format_version: u16,
    /// Which log the segment belongs to.
    pub log: LogKind,
    /// The segment's id (also in its file name).
    pub segment_id: u64,
    /// The spool's next sequence number when the segment was created: every record first
    /// appended to this or a later segment has a seq at least this large (copies of older live
    /// records, written by compaction or by recovery's relocation, keep their lower seqs).
    /// Recovery uses it so that sequence numbers are not reused even when every record of the
    /// older segments was retired and deleted.
    pub first_seq: u64,
}

/// One decoded record. Payloads and reasons borrow from the buffer they were decoded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// The first record of a segment.
    SegmentHeader(SegmentHeader),
    /// An outgoing message, opaque to the spool. A second `Append` of a seq that is live at that
    /// point of the log is a copy of the same record (compaction, relocation out of a quarantined
    /// segment) and becomes its location.
    Append {
        /// Its sequence number.
        seq: u64,
        /// The bytes the driver asked to keep.
        payload: &'a [u8],
    },
    /// The message `seq` was acknowledged (or moved to the dead letters).
    Retire {
        /// The retired sequence number.
        seq: u64,
    },
    /// Every message pending at this point of the log with a seq `<= seq` was acknowledged.
    RetireUpTo {
        /// The highest retired sequence number.
        seq: u64,
    },
    /// A message given up on (dead-letter log only).
    DeadLetter {
        /// Its sequence number in the pending log.
        seq: u64,
        /// Why it was given up on.
        reason: &'a str,
        /// The message, as it was appended.
        payload: &'a [u8],
    },
    /// A dead letter was replayed or purged (dead-letter log only).
    DeadLetterRemoved {
        /// The removed dead letter's sequence number.
        seq: u64,
    },
}

impl Record<'_> {
    /// Bytes this record takes on disk, header included.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_BYTES + self.body_len()
    }

    fn body_len(&self) -> usize {
        match self {
            Record::SegmentHeader(_) => SEGMENT_HEADER_BODY_BYTES,
            Record::Append { payload, .. } => 1 + 8 + payload.len(),
            Record::Retire { .. }
            | Record::RetireUpTo { .. }
            | Record::DeadLetterRemoved { .. } => 1 + 8,
            Record::DeadLetter {
                reason, payload, ..
            } => 1 + 8 + 2 + reason.len() + payload.len(),
        }
    }

    /// Appends the encoded record to `out`, checksummed for segment `segment_id`.
    ///
    /// The caller keeps payloads within [`PAYLOAD_BYTES_LIMIT`] and reasons within
    /// [`REASON_BYTES_MAX`] (the spool checks both before encoding); a record that breaks them
    /// would be refused by the decoder as corruption.
    pub fn encode(&self, segment_id: u64, out: &mut Vec<u8>) {
        let body_len = self.body_len();
        debug_assert!(body_len <= RECORD_BODY_BYTES_MAX, "record body too large");
        out.reserve(RECORD_HEADER_BYTES + body_len);
        let start = out.len();
        // The length fits: bodies are bounded by RECORD_BODY_BYTES_MAX, far below u32::MAX.
        let len = u32::try_from(body_len).unwrap_or(u32::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        match *self {
            Record::SegmentHeader(header) => {
                out.push(KIND_SEGMENT_HEADER);
                out.extend_from_slice(&MAGIC);
                out.extend_from_slice(&header.format_version.to_le_bytes());
                out.push(header.log.to_byte());
                out.extend_from_slice(&header.segment_id.to_le_bytes());
                out.extend_from_slice(&header.first_seq.to_le_bytes());
            }
            Record::Append { seq, payload } => {
                out.push(KIND_APPEND);
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(payload);
            }
            Record::Retire { seq } => {
                out.push(KIND_RETIRE);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Record::RetireUpTo { seq } => {
                out.push(KIND_RETIRE_UP_TO);
                out.extend_from_slice(&seq.to_le_bytes());
            }
            Record::DeadLetter {
                seq,
                reason,
                payload,
            } => {
                out.push(KIND_DEAD_LETTER);
                out.extend_from_slice(&seq.to_le_bytes());
                let reason_len = u16::try_from(reason.len()).unwrap_or(u16::MAX);
                out.extend_from_slice(&reason_len.to_le_bytes());
                out.extend_from_slice(reason.as_bytes());
                out.extend_from_slice(payload);
            }
            Record::DeadLetterRemoved { seq } => {
                out.push(KIND_DEAD_LETTER_REMOVED);
                out.extend_from_slice(&seq.to_le_bytes());
            }
        }
        let body_start = start + RECORD_HEADER_BYTES;
        let checksum = checksum(segment_id, len, &out[body_start..]);
        out[start + 4..body_start].copy_from_slice(&checksum.to_le_bytes());
    }
}

/// The record checksum: blake3 over the segment id, the length and the body, truncated to 64 bits.
pub fn checksum(segment_id: u64, len: u32, body: &[u8]) -> u64 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&segment_id.to_le_bytes());
    hasher.update(&len.to_le_bytes());
    hasher.update(body);
    let hash = hasher.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Why bytes did not decode as a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The buffer ends inside the record (header or body). At the end of the newest segment this is
    /// what a torn write looks like.
    #[error("record is incomplete: {needed} bytes needed, {available} present")]
    Incomplete {
        /// Bytes the record needs (header, or header + declared body).
        needed: u64,
        /// Bytes present from the record's start to the end of the buffer.
        available: u64,
    },
    /// The declared length is above [`RECORD_BODY_BYTES_MAX`].
    #[error("record length {len} exceeds the maximum of {RECORD_BODY_BYTES_MAX}")]
    TooLong {
        /// The declared body length.
        len: u32,
    },
    /// The checksum does not match the bytes.
    #[error("record checksum mismatch")]
    Checksum,
    /// The checksum matched but the kind byte is unknown.
    #[error("unknown record kind {kind}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
    },
    /// The checksum matched but the body does not fit its kind (wrong size, bad UTF-8, bad magic).
    #[error("malformed record: {what}")]
    Malformed {
        /// What is wrong.
        what: &'static str,
    },
    /// A segment header from a newer format version.
    #[error("segment format version {version} is newer than this build's {FORMAT_VERSION}")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
}

/// Decodes the record at the start of `buf`, written to segment `segment_id`. Returns the record
/// and its encoded length.
///
/// Phase one checks the header (length against [`RECORD_BODY_BYTES_MAX`] and against `buf`, then
/// the checksum); phase two decodes the bounded body. Nothing is allocated.
pub fn decode(buf: &[u8], segment_id: u64) -> Result<(Record<'_>, usize), DecodeError> {
    let Some((header, rest)) = buf.split_first_chunk::<RECORD_HEADER_BYTES>() else {
        return Err(DecodeError::Incomplete {
            needed: RECORD_HEADER_BYTES as u64,
            available: buf.len() as u64,
        });
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if len as usize > RECORD_BODY_BYTES_MAX {
        return Err(DecodeError::TooLong { len });
    }
    let body_len = len as usize;
    let Some(body) = rest.get(..body_len) else {
        return Err(DecodeError::Incomplete {
            needed: (RECORD_HEADER_BYTES + body_len) as u64,
            available: buf.len() as u64,
        });
    };
    let mut stored = [0u8; 8];
    stored.copy_from_slice(&header[4..]);
    let stored = u64::from_le_bytes(stored);
    if checksum(segment_id, len, body) != stored {
        return Err(DecodeError::Checksum);
    }
    let record = decode_body(body)?;
    Ok((record, RECORD_HEADER_BYTES + body_len))
}

/// Phase two: the body is complete and its checksum matched.
fn decode_body(body: &[u8]) -> Result<Record<'_>, DecodeError> {
    let Some((&kind, fields)) = body.split_first() else {
        return Err(DecodeError::Malformed { what: "empty body" });
    };
    match kind {
        KIND_SEGMENT_HEADER => {
            let mut reader = Reader(fields);
            let magic = reader.take::<8>("segment header")?;
            if magic != MAGIC {
                return Err(DecodeError::Malformed {
                    what: "segment header magic",
                });
            }
            let format_version = u16::from_le_bytes(reader.take::<2>("segment header")?);
            if format_version > FORMAT_VERSION {
                return Err(DecodeError::UnsupportedVersion {
                    version: format_version,
                });
            }
            let [log] = reader.take::<1>("segment header")?;
            let log = LogKind::from_byte(log).ok_or(DecodeError::Malformed {
                what: "segment header log kind",
            })?;
            let segment_id = u64::from_le_bytes(reader.take::<8>("segment header")?);
            let first_seq = u64::from_le_bytes(reader.take::<8>("segment header")?);
            reader.finish("segment header")?;
            Ok(Record::SegmentHeader(SegmentHeader {
                format_version,
                log,
                segment_id,
                first_seq,
            }))
        }
        KIND_APPEND => {
            let mut reader = Reader(fields);
            let seq = u64::from_le_bytes(reader.take::<8>("append")?);
            Ok(Record::Append {
                seq,
                payload: reader.0,
            })
        }
        KIND_RETIRE | KIND_RETIRE_UP_TO | KIND_DEAD_LETTER_REMOVED => {
            let mut reader = Reader(fields);
            let seq = u64::from_le_bytes(reader.take::<8>("seq record")?);
            reader.finish("seq record")?;
            Ok(match kind {
                KIND_RETIRE => Record::Retire { seq },
                KIND_RETIRE_UP_TO => Record::RetireUpTo { seq },
                _ => Record::DeadLetterRemoved { seq },
            })
        }
        KIND_DEAD_LETTER => {
            let mut reader = Reader(fields);
            let seq = u64::from_le_bytes(reader.take::<8>("dead letter")?);
            let reason_len = u16::from_le_bytes(reader.take::<2>("dead letter")?) as usize;
            if reason_len > REASON_BYTES_MAX || reason_len > reader.0.len() {
                return Err(DecodeError::Malformed {
                    what: "dead letter reason length",
                });
            }
            let (reason, payload) = reader.0.split_at(reason_len);
            let reason = std::str::from_utf8(reason).map_err(|_| DecodeError::Malformed {
                what: "dead letter reason is not UTF-8",
            })?;
            Ok(Record::DeadLetter {
                seq,
                reason,
                payload,
            })
        }
        kind => Err(DecodeError::UnknownKind { kind }),
    }
}

/// A bounds-checked cursor over a body.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let Some((head, rest)) = self.0.split_first_chunk::<N>() else {
            return Err(DecodeError::Malformed { what });
        };
        self.0 = rest;
        Ok(*head)
    }

    fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Malformed { what })
        }
    }
}

/// Cuts `reason` to at most [`REASON_BYTES_MAX`] bytes at a character boundary.
pub fn truncate_reason(reason: &str) -> &str {
    if reason.len() <= REASON_BYTES_MAX {
        return reason;
    }
    let mut end = REASON_BYTES_MAX;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    &reason[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(record: Record<'_>) {
        let mut out = Vec::new();
        record.encode(7, &mut out);
        assert_eq!(out.len(), record.encoded_len());
        let (decoded, len) = decode(&out, 7).expect("decodes");
        assert_eq!(decoded, record);
        assert_eq!(len, out.len());
        // Any other segment id fails the checksum.
        assert_eq!(decode(&out, 8), Err(DecodeError::Checksum));
    }

    #[test]
    fn every_kind_roundtrips() {
        roundtrip(Record::SegmentHeader(SegmentHeader {
            format_version: FORMAT_VERSION,
            log: LogKind::Dead,
            segment_id: 7,
            first_seq: 42,
        }));
        roundtrip(Record::Append {
            seq: 1,
            payload: b"hello",
        });
        roundtrip(Record::Append {
            seq: u64::MAX,
            payload: b"",
        });
        roundtrip(Record::Retire { seq: 3 });
        roundtrip(Record::RetireUpTo { seq: 4 });
        roundtrip(Record::DeadLetter {
            seq: 5,
            reason: "retry budget exhausted: ü",
            payload: &[0, 1, 2],
        });
        roundtrip(Record::DeadLetterRemoved { seq: 6 });
    }

    #[test]
    fn sizes_match_constants() {
        assert_eq!(
            Record::Retire { seq: 1 }.encoded_len(),
            SEQ_RECORD_BYTES,
            "retire"
        );
        assert_eq!(
            Record::Append {
                seq: 1,
                payload: &[]
            }
            .encoded_len(),
            APPEND_RECORD_BYTES_MIN
        );
        let header = Record::SegmentHeader(SegmentHeader {
            format_version: FORMAT_VERSION,
            log: LogKind::Spool,
            segment_id: 1,
            first_seq: 1,
        });
        assert_eq!(header.encoded_len(), SEGMENT_HEADER_RECORD_BYTES);
    }

    #[test]
    fn huge_length_is_refused_before_the_body_is_read() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        buf.extend_from_slice(&[0; 8]);
        assert_eq!(decode(&buf, 1), Err(DecodeError::TooLong { len: u32::MAX }));
    }

    #[test]
    fn every_truncation_is_incomplete_and_every_bit_flip_is_caught() {
        let mut out = Vec::new();
        Record::DeadLetter {
            seq: 9,
            reason: "expired",
            payload: b"payload",
        }
        .encode(3, &mut out);
        for cut in 0..out.len() {
            assert!(
                matches!(decode(&out[..cut], 3), Err(DecodeError::Incomplete { .. })),
                "cut at {cut}"
            );
        }
        for bit in 0..out.len() * 8 {
            let mut flipped = out.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode(&flipped, 3).is_err(),
                "flip of bit {bit} went unnoticed"
            );
        }
    }

    #[test]
    fn newer_format_versions_are_reported_as_such() {
        let mut out = Vec::new();
        Record::SegmentHeader(SegmentHeader {
            format_version: FORMAT_VERSION + 1,
            log: LogKind::Spool,
            segment_id: 1,
            first_seq: 1,
        })
        .encode(1, &mut out);
        assert_eq!(
            decode(&out, 1),
            Err(DecodeError::UnsupportedVersion {
                version: FORMAT_VERSION + 1
            })
        );
    }

    #[test]
    fn reasons_are_cut_at_a_character_boundary() {
        let long = "é".repeat(REASON_BYTES_MAX);
        let cut = truncate_reason(&long);
        assert!(cut.len() <= REASON_BYTES_MAX);
        assert!(cut.len() >= REASON_BYTES_MAX - 1);
        assert_eq!(truncate_reason("short"), "short");
    }
}
