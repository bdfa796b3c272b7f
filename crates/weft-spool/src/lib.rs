//! The on-disk retry spool of Weft: where a reliable send waits, durably, until its peer
//! acknowledges it.
//!
//! A node hands each outgoing message (opaque bytes to this crate) to [`Spool::append`], makes a
//! batch durable with one [`Spool::sync`], and reports those sends *accepted*. When the peer
//! acknowledges, [`Spool::retire`] / [`Spool::retire_up_to`] drop them; after the retry budget or
//! the expiry, [`Spool::dead_letter`] moves them to the dead-letter log with a reason. After a
//! crash, [`Spool::open`] returns every record that was accepted and not retired, so nothing a
//! send reported accepted is lost — the property Jepsen found NATS 2.12.1 without, because it
//! acknowledged before fsync and did not detect truncated or bit-flipped files.
//!
//! The spool is synchronous and does no IO of its own: it talks to a [`Storage`] — [`FsStorage`]
//! in production, [`SimStorage`] (pending vs durable bytes, crashes, torn writes, bit flips,
//! `ENOSPC`, `EIO`) in tests and in the simulation.
//!
//! ```
//! use weft_spool::{CrashMode, SimStorage, Spool, SpoolConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let disk = SimStorage::new(7); // or FsStorage::open("./var/orders/spool")?
//! let (mut spool, recovery) = Spool::open(disk.clone(), SpoolConfig::default())?;
//! assert!(recovery.pending.is_empty()); // after a restart: send these again
//!
//! let first = spool.append(b"order 7")?; // buffered, not durable yet
//! let second = spool.append(b"order 8")?;
//! assert!(spool.sync()? >= second); // one fsync for the batch: both sends are accepted now
//!
//! spool.retire_up_to(first)?; // the peer acknowledged `first`
//! spool.dead_letter(second, "expired")?; // gave up on `second`: durable in the dead letters
//! spool.sync()?; // retirements, like appends, are durable at the next sync
//!
//! drop(spool);
//! disk.crash(CrashMode::TornTail); // power loss
//! let (spool, recovery) = Spool::open(disk, SpoolConfig::default())?;
//! assert!(recovery.pending.is_empty());
//! assert_eq!(spool.dead_letters().next().map(|letter| letter.reason), Some("expired"));
//! # Ok(()) }
//! ```
//!
//! # On disk
//! One directory holds two logs, each a series of segment files named by a 64-bit id and the
//! segment's first seq, in hex:
//! ```text
//! spool-0000000000000001-0000000000000001.log   pending log: Append, Retire, RetireUpTo
//! spool-0000000000000002-00000000000003e9.log   ... the newest segment is the active one
//! dead-0000000000000001-0000000000000001.log    dead-letter log: DeadLetter, DeadLetterRemoved
//! spool-0000000000000003-00000000000007d1.log.quarantined   corrupt, renamed aside for inspection
//! ```
//! (The first seq is also in the header; the name keeps it when a header is damaged, so that a
//! seq is never handed out twice.)
//! Every segment starts with a header record (magic, format version, log, segment id, first seq)
//! and then holds records back to back: `len:u32-le | checksum:u64-le | body`, the checksum a
//! truncated blake3 over segment id, length and body. The [`record`] module is the format's
//! specification. A segment rolls over when the next record would take it past
//! [`SpoolConfig::segment_bytes_target`]; a segment that is not active, holds no live record and
//! whose retirements no longer matter is deleted whole. When a few long-lived records keep too
//! much of the log on disk, [`Spool::sync`] *compacts*: it copies them to the end of the log
//! under their own seqs and deletes the segments they emptied (see `docs/design/durability.md`, "The
//! spool", for why no crash during it loses or resurrects a record). Other files in the
//! directory are ignored.
//!
//! # Guarantees
//! - **Durability.** When [`Spool::sync`] returns `Ok(up_to)`, every append with a seq up to
//!   `up_to`, and every retirement before the sync, is durable (under [`FsyncPolicy::Always`] and
//!   [`FsyncPolicy::Interval`]; [`FsyncPolicy::Never`] does no fsync at all).
//! - **Recovery yields a prefix.** After a crash, the pending set is exactly what the log said at
//!   some point at or after the last successful sync: the synced state plus a *prefix* of the
//!   unsynced operations — never a gap, never a record that was not appended, never a record whose
//!   retirement was synced. Older segments are fsynced before a newer one receives its first byte,
//!   and segments are deleted only after the retirements that emptied them are durable, so no
//!   crash can reorder the logs' operations.
//! - **Damage is detected and reported, never skipped silently.** Every record is checksummed and
//!   its length checked before use. Damage at the very end of the newest segment with nothing
//!   valid after it is a torn write: it is truncated and reported in [`Recovery::truncated`].
//!   Damage anywhere else is corruption: the segment's records before the damage are kept (copied
//!   into the active segment), the segment is renamed aside (`*.quarantined`), a `tracing::error!`
//!   alarm is raised and [`Recovery::quarantined`] reports it with the seqs that may be lost.
//!   Recovery never panics on any content. (Damage to the very last record of the newest segment
//!   is indistinguishable from a torn write and is treated as one.)
//! - **Bounded.** Disk bytes and records of both logs are capped ([`SpoolConfig`]); at a cap an
//!   operation is refused with [`SpoolError::Full`] — backpressure, not growth. The in-memory index
//!   holds a few dozen bytes per live record; payloads stay on disk. The write buffer is bounded by
//!   [`SpoolConfig::write_buffer_bytes_max`]; recovery holds the pending payloads it returns.
//!   Space is reclaimed a segment at a time, and a record pending for long does not keep the rest
//!   of the log with it: once a log's garbage reaches four segment targets (or a quarter of its
//!   cap), a sync copies the live records out of the oldest segments and deletes them, provided
//!   that frees at least twice what it copies (bounded write amplification). Compaction is never
//!   refused by the caps; it may briefly take up to one segment target beyond them (see
//!   [`SpoolConfig::bytes_max`]). A spool that is genuinely full of live records still turns into
//!   backpressure — one more reason for the driver to dead-letter on expiry.
//! - **Storage failures stop the spool.** After a failed write or fsync the on-disk state is
//!   uncertain (Linux may drop dirty pages and report success on a retry), so the spool refuses
//!   everything ([`SpoolError::Poisoned`]) until reopened; recovery then reads what is really there.
//!
//! # Cost
//! [`Spool::append`], [`Spool::retire`] and [`Spool::retire_up_to`] only encode into a memory
//! buffer (a blake3 of the record and an index insert; no syscall). [`Spool::sync`] is one `write`
//! and one `fdatasync` per batch (plus one directory fsync when a segment was created or
//! deleted); the occasional sync that compacts reads back the records it copies and adds one
//! `write` and `fdatasync`. Dead-letter operations fsync the dead-letter log each time (they are
//! rare).
//!
//! # Using it from the driver
//! - **Threading.** Everything takes `&mut self` and blocks on IO: own the spool on one dedicated
//!   thread or blocking task, and send it commands over a channel.
//! - **Group commit** ([`FsyncPolicy::Always`]): take every command waiting in the channel, append
//!   them all, call [`Spool::sync`] once, then complete each send as accepted. While that fsync
//!   runs, new sends queue up and form the next batch, so the batch size adapts to the load and one
//!   fsync serves them all. [`FsyncPolicy::Interval`]: complete sends after the append and sync on
//!   a timer. [`FsyncPolicy::Never`]: the same, and say loudly that it is not durable.
//! - **Receipts.** A send is *accepted* once a sync covering its seq returned `Ok`; it is
//!   *delivered* when the peer's ack arrives (then retire it). If a sync fails, the sends it would
//!   have covered are not accepted: fail them, drop the spool and reopen it. Their records may or
//!   may not be in the next [`Recovery::pending`] — if they are, they will be sent (at least once;
//!   the message id in the payload lets the receiver deduplicate).
//! - **After a restart** every record in [`Recovery::pending`] was accepted by some earlier
//!   incarnation (or at least written, with a prefix of the unsynced ones) and not acknowledged:
//!   send them all again, in seq order. Their receipts died with the old process; new receipts
//!   can only be "delivered" events. [`Recovery::quarantined`] is an alarm for the operator and a
//!   metric; [`QuarantinedSegment::possibly_lost_seqs`] lists what may be gone.
//! - **Seqs are local.** They are this spool's, not the wire's. Seqs of appends that were never
//!   synced may be handed out again after a crash, so never show a seq to a peer before it is
//!   durable — or key the wire by the message id, which the payload carries.
//! - **The payload is the driver's.** Destination, message id, creation time and expiry belong in
//!   it (for the CLI's "pending per destination" and "oldest age", and for expiry, which is a
//!   driver policy: it calls [`Spool::dead_letter`] with reason "expired").
//! - **One owner per directory.** Nothing here locks the directory; the node's data-dir lock must
//!   keep the CLI's `replay`/`purge` from running against a live node's spool.
//!
//! # Modules
//! - [`record`]: the record format, encoding and two-phase decoding.
//! - [`storage`]: the [`Storage`] trait and its durability contract; [`FsStorage`].
//! - [`sim`]: [`SimStorage`], the deterministic faulty disk.
//! - `spool` (re-exported here): [`Spool`], its configuration, recovery report and errors.
#![warn(missing_docs)]

mod error;
mod log;
pub mod record;
pub mod sim;
mod spool;
pub mod storage;

pub use error::{Cap, OpenError, SpoolError, StorageError, StorageOp};
pub use record::LogKind;
pub use sim::{CrashMode, SimStorage};
pub use spool::{
    Corruption, DeadLetter, DeadLetterInfo, FsyncPolicy, PendingInfo, PendingRecord,
    QuarantinedSegment, Recovery, Replayed, SegmentInfo, Spool, SpoolConfig, SpoolStats,
    TruncatedTail, RESERVED_BYTES, RESERVED_RECORDS, SEGMENT_BYTES_TARGET_LIMIT,
    SEGMENT_BYTES_TARGET_MIN,
};
pub use storage::{FsStorage, Storage};
