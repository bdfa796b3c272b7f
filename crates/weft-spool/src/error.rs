//! Typed errors: why the spool did not open, why an operation was refused or failed.

use std::fmt;
use std::io;

use crate::record::DecodeError;

/// The storage operation that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageOp {
    /// Listing the directory.
    List,
    /// Reading a file's length.
    Len,
    /// Reading.
    Read,
    /// Creating a segment file.
    Create,
    /// Appending to a segment file.
    Append,
    /// Fsyncing a segment file.
    Sync,
    /// Truncating a torn tail.
    Truncate,
    /// Renaming a corrupt segment aside.
    Rename,
    /// Removing a retired segment.
    Remove,
    /// Fsyncing the directory.
    SyncDir,
}

impl fmt::Display for StorageOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StorageOp::List => "list",
            StorageOp::Len => "stat",
            StorageOp::Read => "read",
            StorageOp::Create => "create",
            StorageOp::Append => "append",
            StorageOp::Sync => "fsync",
            StorageOp::Truncate => "truncate",
            StorageOp::Rename => "rename",
            StorageOp::Remove => "remove",
            StorageOp::SyncDir => "directory fsync",
        })
    }
}

/// A [`crate::Storage`] call failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} of {file:?} failed: {source}")]
pub struct StorageError {
    /// What was attempted.
    pub op: StorageOp,
    /// The file (empty for directory operations).
    pub file: String,
    /// The underlying error.
    #[source]
    pub source: io::Error,
}

impl StorageError {
    pub(crate) fn new(op: StorageOp, file: &str, source: io::Error) -> Self {
        Self {
            op,
            file: file.to_owned(),
            source,
        }
    }
}

/// Which bound a refused operation hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cap {
    /// [`crate::SpoolConfig::bytes_max`]: disk bytes of the pending log.
    Bytes,
    /// [`crate::SpoolConfig::records_max`]: pending records.
    Records,
    /// [`crate::SpoolConfig::dead_bytes_max`]: disk bytes of the dead-letter log.
    DeadBytes,
    /// [`crate::SpoolConfig::dead_records_max`]: dead letters.
    DeadRecords,
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Cap::Bytes => "spool bytes",
            Cap::Records => "spool records",
            Cap::DeadBytes => "dead-letter bytes",
            Cap::DeadRecords => "dead-letter records",
        })
    }
}

/// Why [`crate::Spool::open`] failed. Nothing on disk was changed in a way that loses data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// A configuration value is out of its allowed range.
    #[error("invalid spool config: {field} {problem}")]
    Config {
        /// The offending field of [`crate::SpoolConfig`].
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A segment was written by a newer format version; this build must not touch it.
    #[error("{file} has format version {version}, newer than this build supports; upgrade Weft")]
    UnsupportedVersion {
        /// The segment file.
        file: String,
        /// Its version.
        version: u16,
    },
    /// Two segment files claim the same id (someone copied or renamed files by hand). Neither is
    /// read: the operator must decide which one is real.
    #[error("segment files {file} and {other} claim the same id; move one out of the directory")]
    DuplicateSegment {
        /// One file.
        file: String,
        /// The other.
        other: String,
    },
    /// The storage failed during recovery.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Why a spool operation was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SpoolError {
    /// A cap was reached: backpressure. Nothing was written. Retiring records (and then calling
    /// [`crate::Spool::sync`], which deletes fully retired segments and compacts when long-lived
    /// records keep garbage on disk) or dead-lettering makes room.
    #[error("{cap} cap reached ({used} of {max})")]
    Full {
        /// The bound that was hit.
        cap: Cap,
        /// Current use, in the bound's unit.
        used: u64,
        /// The configured bound.
        max: u64,
    },
    /// The payload is larger than [`crate::SpoolConfig::payload_bytes_max`].
    #[error("payload of {len} bytes exceeds the spool's maximum of {max}")]
    PayloadTooLarge {
        /// The payload's length.
        len: usize,
        /// The configured maximum.
        max: u32,
    },
    /// The sequence number is not pending (never appended, already retired or dead-lettered).
    #[error("seq {seq} is not pending")]
    NotPending {
        /// The sequence number asked for.
        seq: u64,
    },
    /// The sequence number is not in the dead-letter log.
    #[error("seq {seq} is not a dead letter")]
    NotDeadLettered {
        /// The sequence number asked for.
        seq: u64,
    },
    /// A record read back from disk failed its checksum: the medium corrupted it after it was
    /// written. The record is unreadable; the next open quarantines its segment.
    #[error("record of seq {seq} in {file} at offset {offset} is corrupt: {error}")]
    Corrupt {
        /// The record's sequence number.
        seq: u64,
        /// The segment file.
        file: String,
        /// The record's offset in it.
        offset: u64,
        /// What the decoder found.
        error: DecodeError,
    },
    /// The storage failed. If it failed while writing (append, fsync, create, remove, directory
    /// fsync) the spool is now poisoned: see [`SpoolError::Poisoned`].
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An earlier write or fsync failed, so what is on disk is uncertain (after a failed fsync
    /// Linux may have dropped the dirty pages and will not report it again). The spool refuses
    /// everything but introspection; drop it and [`crate::Spool::open`] again, which recovers from
    /// what is really on disk. Appends since the last successful sync may or may not be there.
    #[error("spool stopped after a storage failure ({cause}); reopen it to recover")]
    Poisoned {
        /// The first failure.
        cause: String,
    },
}
