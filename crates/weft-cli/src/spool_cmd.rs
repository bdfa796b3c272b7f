//! `weft spool`: inspect and repair a stopped node's spool — pending messages per destination,
//! one record in full, dead letters, and putting dead letters back (`replay`) or removing them
//! (`purge`).
//!
//! Every command first takes the data directory's lock (`<data dir>/lock`, the same exclusive
//! lock a running node holds), so it never reads or writes a live node's spool, and a node cannot
//! start while a command runs. Opening the spool runs its recovery, which may truncate a torn tail
//! or quarantine a corrupt segment: those are printed as warnings (and listed under `warnings` in
//! the JSON output), never hidden.
//!
//! Record payloads are [`weft::proto::spooled`] entries: outgoing messages and inbound dedup
//! watermarks. A payload that does not decode is shown as undecodable, never skipped.
//!
//! `replay` does not use [`Spool::replay`] (which would keep the message's old wire numbering,
//! and the receiver would drop it as a duplicate): it writes the message back *unnumbered*
//! (epoch 0, seq 0), and the node's recovery gives it the next sequence number of its
//! destination's stream at the next start.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use clap::{ArgGroup, Args, Subcommand};
use serde::Serialize;
use weft::proto::link::RetryPolicy;
use weft::proto::spooled::{self, SpoolEntry, SpooledMessage, Watermark};
use weft::{Limits, NodeId, OutgoingMessage};
use weft_spool::{FsStorage, Recovery, Spool, SpoolConfig, SpoolError};

/// `println!` without its panic when stdout is gone (`weft spool ls | head`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` without its panic when stdout is gone.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

/// Bytes of a body (or header value) shown in the human-readable preview of `show`.
const PREVIEW_BYTES: usize = 256;

#[derive(Subcommand, Debug)]
pub enum SpoolCommand {
    /// Pending messages per destination (count, bytes, oldest age, channels), inbound
    /// watermarks, dead letters and the spool's size.
    Ls {
        #[command(flatten)]
        target: Target,
        /// Also list every pending record (its seq, for `weft spool show SEQ`).
        #[arg(long)]
        records: bool,
    },
    /// One spool record in full (pending or dead letter): destination, stream numbers, header
    /// fields and the body.
    Show {
        #[command(flatten)]
        target: Target,
        /// The record's spool sequence number (`weft spool ls --records` and `weft spool dead`
        /// list them).
        seq: u64,
        /// Also write the message body, raw, to this file.
        #[arg(long)]
        body_out: Option<PathBuf>,
    },
    /// The dead letters: messages the node gave up on, with the reason.
    Dead(Target),
    /// Put dead letters back into the spool: the node sends them again at its next start, as
    /// new messages at the end of their destination's stream.
    #[command(group(ArgGroup::new("which").required(true).args(["seq", "all"])))]
    Replay {
        #[command(flatten)]
        target: Target,
        /// The dead letter's sequence number (see `weft spool dead`).
        seq: Option<u64>,
        /// Replay every dead letter.
        #[arg(long)]
        all: bool,
        /// Give the replayed messages a new expiry this many seconds from now. Without it, an
        /// expiry that has already passed is cleared (else the node would give the message up
        /// again at once) and one still ahead is kept.
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
    /// Delete dead letters for good.
    #[command(group(ArgGroup::new("which").required(true).args(["seq", "all"])))]
    Purge {
        #[command(flatten)]
        target: Target,
        /// The dead letter's sequence number (see `weft spool dead`).
        seq: Option<u64>,
        /// Delete every dead letter.
        #[arg(long)]
        all: bool,
    },
}

/// Which node's spool, and how to print.
#[derive(Args, Debug)]
pub struct Target {
    /// The node's data directory (the node must be stopped).
    #[arg(long)]
    data_dir: PathBuf,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// Runs one `weft spool` command (synchronous: the spool does blocking IO).
pub fn run(command: SpoolCommand) -> Result<()> {
    match command {
        SpoolCommand::Ls { target, records } => ls(&target, records),
        SpoolCommand::Show {
            target,
            seq,
            body_out,
        } => show(&target, seq, body_out.as_deref()),
        SpoolCommand::Dead(target) => dead(&target),
        SpoolCommand::Replay {
            target,
            seq,
            all: _,
            expires_in_secs,
        } => replay(&target, seq, expires_in_secs),
        SpoolCommand::Purge {
            target,
            seq,
            all: _,
        } => purge(&target, seq),
    }
}

/// A stopped node's spool, opened under the data directory's lock.
struct Opened {
    spool: Spool<FsStorage>,
    recovery: Recovery,
    /// Recovery problems, already printed on stderr.
    warnings: Vec<String>,
    /// Held until the command ends: no node starts meanwhile.
    _lock: File,
}

fn open(data_dir: &Path) -> Result<Opened> {
    if !data_dir.is_dir() {
        bail!(
            "{} is not a directory: pass the node's --data-dir",
            data_dir.display()
        );
    }
    let spool_dir = data_dir.join("spool");
    if !spool_dir.is_dir() {
        bail!(
            "{} has no spool (no spool/ directory): pass the --data-dir of a node that has run",
            data_dir.display()
        );
    }
    let lock_path = data_dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("cannot open {}", lock_path.display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "the node using {} is running ({} is locked): stop it first, weft spool never touches a live node's spool",
            data_dir.display(),
            lock_path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            bail!("cannot lock {}: {e}", lock_path.display())
        }
    }
    let storage = FsStorage::open(&spool_dir)
        .with_context(|| format!("cannot open {}", spool_dir.display()))?;
    let (spool, recovery) = Spool::open(storage, SpoolConfig::default())
        .map_err(|e| anyhow!("cannot open the spool in {}: {e}", spool_dir.display()))?;
    let warnings = recovery_warnings(&recovery);
    for warning in &warnings {
        eprintln!("warning: {warning}");
    }
    Ok(Opened {
        spool,
        recovery,
        warnings,
        _lock: lock,
    })
}

fn recovery_warnings(recovery: &Recovery) -> Vec<String> {
    let mut warnings = Vec::new();
    for tail in &recovery.truncated {
        warnings.push(format!(
            "torn tail: {} bytes cut off the end of {} at offset {} (writes that were never synced; expected after a crash)",
            tail.bytes, tail.file, tail.offset
        ));
    }
    for segment in &recovery.quarantined {
        let lost = match &segment.possibly_lost_seqs {
            Some(seqs) if !seqs.is_empty() => {
                format!("; records {}..{} may be lost", seqs.start, seqs.end - 1)
            }
            Some(_) => String::new(),
            None => "; an unknown number of records may be lost".to_owned(),
        };
        warnings.push(format!(
            "corrupt segment {} renamed to {}: {} at offset {}, {} bytes unreadable, {} records before the damage kept{lost}",
            segment.file,
            segment.renamed_to,
            segment.corruption,
            segment.offset,
            segment.unreadable_bytes,
            segment.relocated_records
        ));
    }
    for file in &recovery.quarantined_earlier {
        warnings.push(format!(
            "quarantined segment {file} from an earlier run awaits inspection (delete it once inspected)"
        ));
    }
    warnings
}

fn decode(payload: Bytes) -> Result<SpoolEntry, String> {
    spooled::decode(payload, Limits::default()).map_err(|e| e.to_string())
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn print_json(value: &impl Serialize) -> Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ls

#[derive(Serialize, Default)]
struct Listing {
    data_dir: String,
    destinations: Vec<Destination>,
    /// Every pending message, with `--records` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    records: Option<Vec<RecordJson>>,
    watermarks: Vec<WatermarkJson>,
    /// Idempotency keys the node remembers (one record each).
    idempotency_keys: u64,
    undecodable: Vec<Undecodable>,
    dead_letters: u64,
    stats: Stats,
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct Destination {
    node_id: String,
    node_id_short: String,
    pending: u64,
    /// Spool payload bytes of its records (header and body).
    payload_bytes: u64,
    body_bytes: u64,
    oldest_created_unix_ms: u64,
    oldest_age_ms: i64,
    channels: Vec<String>,
    /// Replayed dead letters the node numbers at its next start.
    unnumbered: u64,
    /// Delayed messages waiting for their due time (numbered only then).
    scheduled: u64,
    /// The earliest due time among them (Unix ms).
    next_due_unix_ms: Option<u64>,
}

#[derive(Serialize)]
struct RecordJson {
    seq: u64,
    destination: String,
    destination_short: String,
    epoch: u64,
    /// 0: unnumbered (a replayed dead letter; the node numbers it at its next start).
    wire_seq: u64,
    /// The lane it was numbered in (`normal`, `high`, `bulk`); an unnumbered message takes its
    /// priority's when numbered.
    lane: String,
    channel: String,
    payload_bytes: u64,
    age_ms: i64,
    /// A delayed message: not delivered before this time (Unix ms).
    due_unix_ms: Option<u64>,
}

#[derive(Serialize)]
struct WatermarkJson {
    seq: u64,
    peer: String,
    peer_short: String,
    /// The lane of the peer's stream (`normal`, `high`, `bulk`).
    lane: String,
    epoch: u64,
    up_to: u64,
}

impl WatermarkJson {
    fn new(seq: u64, watermark: &Watermark) -> Self {
        Self {
            seq,
            peer: watermark.peer.to_string(),
            peer_short: watermark.peer.short(),
            lane: watermark.lane.to_string(),
            epoch: watermark.epoch,
            up_to: watermark.up_to,
        }
    }
}

#[derive(Serialize)]
struct Undecodable {
    seq: u64,
    payload_bytes: u64,
    error: String,
}

#[derive(Serialize, Default)]
struct Stats {
    pending_records: u64,
    pending_payload_bytes: u64,
    spool_disk_bytes: u64,
    dead_records: u64,
    dead_disk_bytes: u64,
    next_seq: u64,
}

fn ls(target: &Target, list_records: bool) -> Result<()> {
    let opened = open(&target.data_dir)?;
    let now = now_unix_ms();
    let mut by_dest: BTreeMap<NodeId, (Destination, BTreeSet<String>)> = BTreeMap::new();
    let mut listing = Listing {
        data_dir: target.data_dir.display().to_string(),
        ..Default::default()
    };
    let mut records = Vec::new();
    for record in &opened.recovery.pending {
        let payload_bytes = record.payload.len() as u64;
        match decode(record.payload.clone()) {
            Ok(SpoolEntry::Message(spooled)) => {
                let message = &spooled.message;
                if list_records {
                    records.push(RecordJson {
                        seq: record.seq,
                        destination: spooled.dest.to_string(),
                        destination_short: spooled.dest.short(),
                        epoch: spooled.epoch,
                        wire_seq: spooled.seq,
                        lane: spooled.lane.to_string(),
                        channel: message.channel.to_string(),
                        payload_bytes,
                        age_ms: age_ms(now, message.created_unix_ms),
                        due_unix_ms: message.deliver_after_unix_ms(),
                    });
                }
                let (dest, channels) = by_dest.entry(spooled.dest).or_insert_with(|| {
                    let dest = Destination {
                        node_id: spooled.dest.to_string(),
                        node_id_short: spooled.dest.short(),
                        pending: 0,
                        payload_bytes: 0,
                        body_bytes: 0,
                        oldest_created_unix_ms: message.created_unix_ms,
                        oldest_age_ms: 0,
                        channels: Vec::new(),
                        unnumbered: 0,
                        scheduled: 0,
                        next_due_unix_ms: None,
                    };
                    (dest, BTreeSet::new())
                });
                dest.pending += 1;
                dest.payload_bytes += payload_bytes;
                dest.body_bytes += message.body.len() as u64;
                dest.oldest_created_unix_ms =
                    dest.oldest_created_unix_ms.min(message.created_unix_ms);
                if spooled.is_waiting() {
                    dest.scheduled += 1;
                    let due = message.deliver_after_unix_ms();
                    dest.next_due_unix_ms = dest.next_due_unix_ms.min(due).or(due);
                } else {
                    dest.unnumbered += u64::from(spooled.seq == 0);
                }
                channels.insert(message.channel.to_string());
            }
            Ok(SpoolEntry::Watermark(watermark)) => listing
                .watermarks
                .push(WatermarkJson::new(record.seq, &watermark)),
            // The durable subscription registry: one record, no destination (`show` dumps it).
            Ok(SpoolEntry::Registry(_)) => {}
            Ok(SpoolEntry::Key(_)) => listing.idempotency_keys += 1,
            Err(error) => listing.undecodable.push(Undecodable {
                seq: record.seq,
                payload_bytes,
                error,
            }),
        }
    }
    listing.destinations = by_dest
        .into_values()
        .map(|(mut dest, channels)| {
            dest.oldest_age_ms = age_ms(now, dest.oldest_created_unix_ms);
            dest.channels = channels.into_iter().collect();
            dest
        })
        .collect();
    let stats = opened.spool.stats();
    listing.dead_letters = stats.dead_records;
    listing.stats = Stats {
        pending_records: stats.pending_records,
        pending_payload_bytes: stats.pending_payload_bytes,
        spool_disk_bytes: stats.spool_bytes,
        dead_records: stats.dead_records,
        dead_disk_bytes: stats.dead_bytes,
        next_seq: stats.next_seq,
    };
    listing.warnings = opened.warnings;
    listing.records = list_records.then_some(records);
    if target.json {
        return print_json(&listing);
    }
    if let Some(records) = &listing.records {
        let rows = records
            .iter()
            .map(|r| {
                vec![
                    r.seq.to_string(),
                    r.destination_short.clone(),
                    if let (0, Some(due)) = (r.wire_seq, r.due_unix_ms) {
                        format!("scheduled, due {}", due_text(due, now))
                    } else if r.wire_seq == 0 {
                        "unnumbered".to_owned()
                    } else {
                        format!("{}/{}", r.epoch, r.wire_seq)
                    },
                    human_bytes(r.payload_bytes),
                    human_age(r.age_ms),
                    r.channel.clone(),
                ]
            })
            .collect();
        out!(
            "{}",
            table(
                &["SEQ", "DESTINATION", "EPOCH/SEQ", "BYTES", "AGE", "CHANNEL"],
                rows
            )
        );
        outln!();
    }
    if listing.destinations.is_empty() {
        outln!("no pending messages");
    } else {
        let rows = listing
            .destinations
            .iter()
            .map(|d| {
                vec![
                    d.node_id_short.clone(),
                    d.pending.to_string(),
                    human_bytes(d.payload_bytes),
                    human_age(d.oldest_age_ms),
                    d.channels.join(", "),
                ]
            })
            .collect();
        out!(
            "{}",
            table(
                &["DESTINATION", "PENDING", "BYTES", "OLDEST", "CHANNELS"],
                rows
            )
        );
    }
    for d in listing.destinations.iter().filter(|d| d.scheduled > 0) {
        outln!(
            "{}: {} delayed message(s) waiting for their due time (numbered only then), the next due {}",
            d.node_id_short,
            d.scheduled,
            d.next_due_unix_ms.map_or_else(String::new, |due| due_text(due, now))
        );
    }
    for bad in &listing.undecodable {
        outln!(
            "undecodable record {} ({} bytes): {} (`weft spool show {}` dumps it)",
            bad.seq,
            bad.payload_bytes,
            bad.error,
            bad.seq
        );
    }
    outln!(
        "inbound watermarks: {}   idempotency keys: {}   dead letters: {}{}",
        listing.watermarks.len(),
        listing.idempotency_keys,
        listing.dead_letters,
        if listing.dead_letters > 0 {
            " (weft spool dead lists them)"
        } else {
            ""
        }
    );
    let stats = &listing.stats;
    outln!(
        "spool: {} records, {} payload, {} on disk; dead-letter log: {} on disk",
        stats.pending_records,
        human_bytes(stats.pending_payload_bytes),
        human_bytes(stats.spool_disk_bytes),
        human_bytes(stats.dead_disk_bytes)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// show

#[derive(Serialize)]
struct Shown {
    seq: u64,
    /// `pending` or `dead letter`.
    state: &'static str,
    /// Why it was dead-lettered.
    reason: Option<String>,
    payload_bytes: u64,
    /// `message`, `watermark` or `undecodable`.
    entry: &'static str,
    message: Option<MessageJson>,
    watermark: Option<WatermarkJson>,
    idempotency_key: Option<KeyJson>,
    /// Why the payload does not decode.
    error: Option<String>,
    /// The raw payload of an undecodable entry.
    payload_hex: Option<String>,
    warnings: Vec<String>,
}

/// An idempotency key the node remembers.
#[derive(Serialize)]
struct KeyJson {
    producer: String,
    /// The key (UTF-8, lossy).
    key: String,
    /// The message that brought it first.
    message: String,
    first_seen_unix_ms: u64,
}

#[derive(Serialize)]
struct MessageJson {
    destination: String,
    destination_short: String,
    epoch: u64,
    /// 0: unnumbered (a replayed dead letter; the node numbers it at its next start).
    wire_seq: u64,
    /// See [`RecordJson`].
    lane: String,
    /// A delayed message: not delivered before this time (Unix ms).
    due_unix_ms: Option<u64>,
    due_utc: Option<String>,
    kind: String,
    channel: String,
    priority: u8,
    created_unix_ms: u64,
    created_utc: String,
    age_ms: i64,
    expires_unix_ms: Option<u64>,
    expires_utc: Option<String>,
    correlation_id: Option<u64>,
    reply_to: Option<String>,
    shard_key_hex: Option<String>,
    headers: Vec<HeaderJson>,
    body_bytes: u64,
    /// The body as text, when it is valid UTF-8.
    body_utf8: Option<String>,
    body_hex: String,
}

#[derive(Serialize)]
struct HeaderJson {
    name: String,
    value_utf8: Option<String>,
    value_hex: String,
}

impl MessageJson {
    fn new(spooled: &SpooledMessage, now: u64) -> Self {
        let message = &spooled.message;
        let options = message.options.as_deref();
        let expires = options.and_then(|o| o.expires_unix_ms);
        Self {
            destination: spooled.dest.to_string(),
            destination_short: spooled.dest.short(),
            epoch: spooled.epoch,
            wire_seq: spooled.seq,
            lane: spooled.lane.to_string(),
            due_unix_ms: message.deliver_after_unix_ms(),
            due_utc: message.deliver_after_unix_ms().map(utc),
            kind: format!("{:?}", message.kind).to_lowercase(),
            channel: message.channel.to_string(),
            priority: message.priority.0,
            created_unix_ms: message.created_unix_ms,
            created_utc: utc(message.created_unix_ms),
            age_ms: age_ms(now, message.created_unix_ms),
            expires_unix_ms: expires,
            expires_utc: expires.map(utc),
            correlation_id: options.and_then(|o| o.correlation_id),
            reply_to: options.and_then(|o| o.reply_to).map(|id| id.to_string()),
            shard_key_hex: options.and_then(|o| o.shard_key.as_deref()).map(hex),
            headers: options
                .map(|o| {
                    o.headers
                        .iter()
                        .map(|(name, value)| HeaderJson {
                            name: name.clone(),
                            value_utf8: std::str::from_utf8(value).ok().map(str::to_owned),
                            value_hex: hex(value),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            body_bytes: message.body.len() as u64,
            body_utf8: std::str::from_utf8(&message.body).ok().map(str::to_owned),
            body_hex: hex(&message.body),
        }
    }
}

/// A due time for people: the UTC time and how far away it is.
fn due_text(due_unix_ms: u64, now: u64) -> String {
    let left = age_ms(due_unix_ms, now);
    if left > 0 {
        format!("{} (in {})", utc(due_unix_ms), human_age(left))
    } else {
        format!("{} (passed {} ago)", utc(due_unix_ms), human_age(-left))
    }
}

fn show(target: &Target, seq: u64, body_out: Option<&Path>) -> Result<()> {
    let mut opened = open(&target.data_dir)?;
    let (state, reason, payload) = if opened.spool.is_pending(seq) {
        let payload = opened
            .spool
            .read(seq)
            .map_err(|e| anyhow!("cannot read record {seq}: {e}"))?;
        ("pending", None, payload)
    } else {
        match opened.spool.read_dead_letter(seq) {
            Ok(letter) => ("dead letter", Some(letter.reason), letter.payload),
            Err(SpoolError::NotDeadLettered { .. }) => bail!(
                "record {seq} is neither pending nor a dead letter in {}: `weft spool ls --records` and `weft spool dead` list them",
                target.data_dir.display()
            ),
            Err(e) => bail!("cannot read dead letter {seq}: {e}"),
        }
    };
    let payload_bytes = payload.len() as u64;
    let now = now_unix_ms();
    let mut shown = Shown {
        seq,
        state,
        reason,
        payload_bytes,
        entry: "undecodable",
        message: None,
        watermark: None,
        idempotency_key: None,
        error: None,
        payload_hex: None,
        warnings: std::mem::take(&mut opened.warnings),
    };
    let mut body = None;
    match decode(payload.clone()) {
        Ok(SpoolEntry::Message(spooled)) => {
            shown.entry = "message";
            shown.message = Some(MessageJson::new(&spooled, now));
            body = Some(spooled.message.body);
        }
        Ok(SpoolEntry::Watermark(watermark)) => {
            shown.entry = "watermark";
            shown.watermark = Some(WatermarkJson::new(seq, &watermark));
        }
        Ok(SpoolEntry::Registry(_)) => {
            shown.entry = "durable subscription registry";
            shown.payload_hex = Some(hex(&payload));
        }
        Ok(SpoolEntry::Key(key)) => {
            shown.entry = "idempotency key";
            shown.idempotency_key = Some(KeyJson {
                producer: key.id.producer.to_string(),
                key: String::from_utf8_lossy(&key.key).into_owned(),
                message: key.id.to_string(),
                first_seen_unix_ms: key.at_unix_ms,
            });
        }
        Err(error) => shown.error = Some(error),
    }
    if shown.entry == "undecodable" {
        shown.payload_hex = Some(hex(&payload));
    }
    if let Some(path) = body_out {
        let Some(body) = &body else {
            bail!("record {seq} is not a message, so it has no body to write to --body-out");
        };
        std::fs::write(path, body)
            .with_context(|| format!("cannot write the body to {}", path.display()))?;
    }
    if target.json {
        return print_json(&shown);
    }
    let mut out = String::new();
    let _ = write!(out, "record {seq}: {state}");
    if let Some(reason) = &shown.reason {
        let _ = write!(out, " (given up: {reason})");
    }
    let _ = writeln!(out, ", {payload_bytes} bytes in the spool");
    if let Some(m) = &shown.message {
        let field = |out: &mut String, name: &str, value: &str| {
            let _ = writeln!(out, "  {name:<13}{value}");
        };
        field(&mut out, "destination", &m.destination);
        let stream = if let (0, Some(due)) = (m.wire_seq, m.due_unix_ms) {
            format!(
                "scheduled: unnumbered until due {} (numbered then)",
                due_text(due, now)
            )
        } else if m.wire_seq == 0 {
            "unnumbered (the node numbers it at its next start)".to_owned()
        } else {
            format!("{} lane, epoch {}, seq {}", m.lane, m.epoch, m.wire_seq)
        };
        field(&mut out, "stream", &stream);
        field(&mut out, "kind", &m.kind);
        field(&mut out, "channel", &m.channel);
        field(&mut out, "priority", &m.priority.to_string());
        field(
            &mut out,
            "created",
            &format!("{} ({} ago)", m.created_utc, human_age(m.age_ms)),
        );
        let expires = match (m.expires_unix_ms, &m.expires_utc) {
            (Some(at), Some(text)) => {
                let left = age_ms(at, now);
                if left > 0 {
                    format!("{text} (in {})", human_age(left))
                } else {
                    format!("{text} (passed {} ago)", human_age(-left))
                }
            }
            _ => "never".to_owned(),
        };
        field(&mut out, "expires", &expires);
        if let Some(id) = m.correlation_id {
            field(&mut out, "correlation", &id.to_string());
        }
        if let Some(reply_to) = &m.reply_to {
            field(&mut out, "reply to", reply_to);
        }
        if let Some(key) = &m.shard_key_hex {
            field(&mut out, "shard key", key);
        }
        for header in &m.headers {
            let value = header.value_utf8.as_ref().map_or_else(
                || format!("hex {}", header.value_hex),
                |text| format!("{text:?}"),
            );
            field(&mut out, "header", &format!("{} = {value}", header.name));
        }
        if let Some(body) = &body {
            field(&mut out, "body", &format!("{} bytes", body.len()));
            out.push_str(&preview(body));
        }
    } else if let Some(w) = &shown.watermark {
        let _ = writeln!(
            out,
            "  inbound watermark: messages from {} ({} lane, stream epoch {}) delivered up to seq {}",
            w.peer, w.lane, w.epoch, w.up_to
        );
    } else if let Some(k) = &shown.idempotency_key {
        let _ = writeln!(
            out,
            "  idempotency key {:?} of {}: first brought by message {} at {} (Unix ms)",
            k.key, k.producer, k.message, k.first_seen_unix_ms
        );
    } else {
        let _ = writeln!(
            out,
            "  undecodable payload: {}",
            shown.error.as_deref().unwrap_or_default()
        );
        out.push_str(&preview(&payload));
    }
    out!("{out}");
    if let Some(path) = body_out {
        outln!("body written to {}", path.display());
    }
    Ok(())
}

/// Text (lossy) and hex previews of the first [`PREVIEW_BYTES`] bytes.
fn preview(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(PREVIEW_BYTES)];
    let more = if bytes.len() > shown.len() {
        format!(
            " … ({} more bytes; --json or --body-out for all)",
            bytes.len() - shown.len()
        )
    } else {
        String::new()
    };
    let mut out = format!("    text  {:?}{more}\n", String::from_utf8_lossy(shown));
    for (i, line) in shown.chunks(16).enumerate() {
        let _ = writeln!(out, "    {:04x}  {}", i * 16, hex_spaced(line));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// dead

#[derive(Serialize)]
struct DeadListing {
    data_dir: String,
    dead_letters: Vec<DeadJson>,
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct DeadJson {
    seq: u64,
    reason: String,
    payload_bytes: u64,
    /// `message`, `watermark` or `undecodable`.
    entry: &'static str,
    destination: Option<String>,
    destination_short: Option<String>,
    channel: Option<String>,
    created_unix_ms: Option<u64>,
    age_ms: Option<i64>,
    expires_unix_ms: Option<u64>,
    /// Why the payload does not decode (or could not be read).
    error: Option<String>,
}

fn dead(target: &Target) -> Result<()> {
    let mut opened = open(&target.data_dir)?;
    let now = now_unix_ms();
    let infos: Vec<(u64, String, u64)> = opened
        .spool
        .dead_letters()
        .map(|l| (l.seq, l.reason.to_owned(), u64::from(l.payload_bytes)))
        .collect();
    let mut letters = Vec::with_capacity(infos.len());
    for (seq, reason, payload_bytes) in infos {
        let mut letter = DeadJson {
            seq,
            reason,
            payload_bytes,
            entry: "undecodable",
            destination: None,
            destination_short: None,
            channel: None,
            created_unix_ms: None,
            age_ms: None,
            expires_unix_ms: None,
            error: None,
        };
        match opened
            .spool
            .read_dead_letter(seq)
            .map(|l| decode(l.payload))
        {
            Ok(Ok(SpoolEntry::Message(spooled))) => {
                let message = spooled.message;
                letter.entry = "message";
                letter.destination = Some(spooled.dest.to_string());
                letter.destination_short = Some(spooled.dest.short());
                letter.channel = Some(message.channel.into());
                letter.created_unix_ms = Some(message.created_unix_ms);
                letter.age_ms = Some(age_ms(now, message.created_unix_ms));
                letter.expires_unix_ms = message.options.and_then(|o| o.expires_unix_ms);
            }
            Ok(Ok(SpoolEntry::Watermark(watermark))) => {
                letter.entry = "watermark";
                letter.destination = Some(watermark.peer.to_string());
                letter.destination_short = Some(watermark.peer.short());
            }
            Ok(Ok(SpoolEntry::Registry(_))) => letter.entry = "durable subscription registry",
            Ok(Ok(SpoolEntry::Key(_))) => letter.entry = "idempotency key",
            Ok(Err(error)) => letter.error = Some(error),
            Err(error) => letter.error = Some(format!("cannot read it: {error}")),
        }
        letters.push(letter);
    }
    let listing = DeadListing {
        data_dir: target.data_dir.display().to_string(),
        dead_letters: letters,
        warnings: std::mem::take(&mut opened.warnings),
    };
    if target.json {
        return print_json(&listing);
    }
    if listing.dead_letters.is_empty() {
        outln!("no dead letters");
        return Ok(());
    }
    let rows = listing
        .dead_letters
        .iter()
        .map(|l| {
            let dash = || "-".to_owned();
            vec![
                l.seq.to_string(),
                l.destination_short.clone().unwrap_or_else(dash),
                match l.entry {
                    "message" => l.channel.clone().unwrap_or_else(dash),
                    "watermark" => "(inbound watermark)".to_owned(),
                    _ => format!("(undecodable: {})", l.error.as_deref().unwrap_or_default()),
                },
                human_bytes(l.payload_bytes),
                l.age_ms.map_or_else(dash, human_age),
                l.reason.clone(),
            ]
        })
        .collect();
    out!(
        "{}",
        table(
            &["SEQ", "DESTINATION", "CHANNEL", "BYTES", "AGE", "REASON"],
            rows
        )
    );
    outln!(
        "{} dead letters; `weft spool show SEQ` shows one, `replay SEQ|--all` sends again, `purge SEQ|--all` deletes",
        listing.dead_letters.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// replay

#[derive(Serialize)]
struct ReplayReport {
    replayed: Vec<ReplayedJson>,
    failed: Vec<FailedJson>,
    warnings: Vec<String>,
}

#[derive(Serialize)]
struct ReplayedJson {
    dead_seq: u64,
    /// The new pending record.
    seq: u64,
    destination: String,
    channel: String,
    /// What was changed so that the node does not give it up again at once.
    notes: Vec<String>,
}

#[derive(Serialize)]
struct FailedJson {
    dead_seq: u64,
    error: String,
}

fn replay(target: &Target, seq: Option<u64>, expires_in_secs: Option<u64>) -> Result<()> {
    let mut opened = open(&target.data_dir)?;
    let seqs: Vec<u64> = match seq {
        Some(seq) => vec![seq],
        None => opened.spool.dead_letters().map(|l| l.seq).collect(),
    };
    let now = now_unix_ms();
    let new_expiry = expires_in_secs.map(|secs| now.saturating_add(secs.saturating_mul(1000)));
    let mut report = ReplayReport {
        replayed: Vec::new(),
        failed: Vec::new(),
        warnings: std::mem::take(&mut opened.warnings),
    };
    for dead_seq in seqs {
        match replay_one(&mut opened.spool, dead_seq, now, new_expiry) {
            Ok(replayed) => report.replayed.push(replayed),
            Err(e) if seq.is_some() => return Err(e),
            Err(e) => report.failed.push(FailedJson {
                dead_seq,
                error: format!("{e:#}"),
            }),
        }
    }
    if target.json {
        print_json(&report)?;
    } else {
        if report.replayed.is_empty() && report.failed.is_empty() {
            outln!("no dead letters to replay");
        }
        for r in &report.replayed {
            outln!(
                "dead letter {} -> pending record {} (to {}, channel {}): the node sends it at its next start",
                r.dead_seq,
                r.seq,
                short_of(&r.destination),
                r.channel
            );
            for note in &r.notes {
                outln!("  note: {note}");
            }
        }
        for f in &report.failed {
            eprintln!("dead letter {} not replayed: {}", f.dead_seq, f.error);
        }
    }
    if !report.failed.is_empty() {
        bail!(
            "{} of {} dead letters could not be replayed (listed above); they stay dead letters",
            report.failed.len(),
            report.failed.len() + report.replayed.len()
        );
    }
    Ok(())
}

/// Puts one dead letter back as an unnumbered pending message, durably, then deletes the dead
/// letter. A crash in between leaves it in both places (sent again and still listed): at least
/// once, never lost.
fn replay_one(
    spool: &mut Spool<FsStorage>,
    dead_seq: u64,
    now: u64,
    new_expiry: Option<u64>,
) -> Result<ReplayedJson> {
    let letter = match spool.read_dead_letter(dead_seq) {
        Ok(letter) => letter,
        Err(SpoolError::NotDeadLettered { .. }) => {
            bail!("{dead_seq} is not a dead letter: `weft spool dead` lists them")
        }
        Err(e) => bail!("cannot read dead letter {dead_seq}: {e}"),
    };
    let spooled = match decode(letter.payload) {
        Ok(SpoolEntry::Message(spooled)) => spooled,
        Ok(SpoolEntry::Watermark(_)) => bail!(
            "dead letter {dead_seq} is an inbound watermark, not a message: there is nothing to send (purge it)"
        ),
        Ok(SpoolEntry::Registry(_)) => bail!(
            "dead letter {dead_seq} is a durable subscription registry, not a message: there is nothing to send (purge it)"
        ),
        Ok(SpoolEntry::Key(_)) => bail!(
            "dead letter {dead_seq} is an idempotency key, not a message: there is nothing to send (purge it)"
        ),
        Err(e) => bail!(
            "dead letter {dead_seq} does not decode ({e}): `weft spool show {dead_seq}` dumps it; purge it once inspected"
        ),
    };
    let (message, notes) = renewed(spooled.message, now, new_expiry);
    let mut payload = BytesMut::new();
    spooled::encode_message(
        &spooled.dest,
        0,
        0,
        &message,
        Limits::default(),
        &mut payload,
    )
    .map_err(|e| anyhow!("cannot re-encode dead letter {dead_seq}: {e}"))?;
    let full_fix = "let the node deliver what is pending, or purge dead letters, then retry";
    let seq = spool.append(&payload).map_err(|e| match e {
        SpoolError::Full { .. } => anyhow!("the spool is full ({e}): {full_fix}"),
        e => anyhow!("cannot append dead letter {dead_seq} to the spool: {e}"),
    })?;
    // Durable before the dead letter goes: a crash in between duplicates, never loses.
    spool
        .sync()
        .map_err(|e| anyhow!("cannot make the replayed message durable: {e}"))?;
    spool.purge(dead_seq).map_err(|e| {
        anyhow!("replayed dead letter {dead_seq} as record {seq}, but could not delete the dead letter ({e}): purge it by hand")
    })?;
    Ok(ReplayedJson {
        dead_seq,
        seq,
        destination: spooled.dest.to_string(),
        channel: message.channel.into(),
        notes,
    })
}

/// The message as replayed: an expiry that has passed is cleared (or replaced by `new_expiry`),
/// and a message older than the default retry period gets a fresh creation time — else the node
/// would give it up again at once.
fn renewed(
    mut message: OutgoingMessage,
    now: u64,
    new_expiry: Option<u64>,
) -> (OutgoingMessage, Vec<String>) {
    let mut notes = Vec::new();
    let expiry = message.options.as_ref().and_then(|o| o.expires_unix_ms);
    match (expiry, new_expiry) {
        (_, Some(at)) => {
            message = message.with_expiry(at);
            notes.push(format!("expires at {}", utc(at)));
        }
        (Some(at), None) if at <= now => {
            if let Some(options) = message.options.as_mut() {
                options.expires_unix_ms = None;
            }
            if message.options.as_ref().is_some_and(|o| o.is_empty()) {
                message.options = None;
            }
            notes.push(format!(
                "its expiry ({}) had passed and is cleared (--expires-in-secs sets a new one)",
                utc(at)
            ));
        }
        _ => {}
    }
    let retry_period_ms = RetryPolicy::default().max_age_ms;
    if now.saturating_sub(message.created_unix_ms) > retry_period_ms {
        notes.push(format!(
            "created {}, older than the retry period: its creation time is now",
            utc(message.created_unix_ms)
        ));
        message.created_unix_ms = now;
    }
    (message, notes)
}

// ---------------------------------------------------------------------------------------------
// purge

#[derive(Serialize)]
struct PurgeReport {
    purged: Vec<u64>,
    warnings: Vec<String>,
}

fn purge(target: &Target, seq: Option<u64>) -> Result<()> {
    let mut opened = open(&target.data_dir)?;
    let purged = match seq {
        Some(seq) => {
            opened.spool.purge(seq).map_err(|e| match e {
                SpoolError::NotDeadLettered { .. } => anyhow!(
                    "{seq} is not a dead letter in {}: `weft spool dead` lists them",
                    target.data_dir.display()
                ),
                e => anyhow!("cannot purge dead letter {seq}: {e}"),
            })?;
            vec![seq]
        }
        None => {
            let seqs: Vec<u64> = opened.spool.dead_letters().map(|l| l.seq).collect();
            opened
                .spool
                .purge_all()
                .map_err(|e| anyhow!("cannot purge the dead letters: {e}"))?;
            seqs
        }
    };
    let report = PurgeReport {
        purged,
        warnings: std::mem::take(&mut opened.warnings),
    };
    if target.json {
        return print_json(&report);
    }
    match report.purged.as_slice() {
        [] => outln!("no dead letters to purge"),
        [seq] => outln!("dead letter {seq} deleted"),
        seqs => outln!("{} dead letters deleted", seqs.len()),
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// formatting

/// `now - then` in milliseconds; negative when `then` is in the future (clock skew).
fn age_ms(now: u64, then: u64) -> i64 {
    (i128::from(now) - i128::from(then)).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

fn human_age(ms: i64) -> String {
    if ms < 0 {
        return "in the future".to_owned();
    }
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {:02}s", secs / 60, secs % 60),
        3600..86_400 => format!("{}h {:02}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {:02}h", secs / 86_400, secs % 86_400 / 3600),
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Unix milliseconds as an ISO 8601 UTC time (`2026-01-02T03:04:05.678Z`).
fn utc(unix_ms: u64) -> String {
    let days = (unix_ms / 86_400_000) as i64;
    let ms_of_day = unix_ms % 86_400_000;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        ms_of_day / 3_600_000,
        ms_of_day / 60_000 % 60,
        ms_of_day / 1000 % 60,
        ms_of_day % 1000
    )
}

fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

fn hex_spaced(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn short_of(node_id: &str) -> &str {
    node_id.get(..8).unwrap_or(node_id)
}

/// Left-aligned columns separated by two spaces.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                let _ = write!(out, "{cell:<width$}  ");
            }
        }
        out.push('\n');
    };
    line(headers.to_vec());
    for row in &rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn ages_and_sizes_read_well() {
        assert_eq!(human_age(59_999), "59s");
        assert_eq!(human_age(61_000), "1m 01s");
        assert_eq!(human_age(3 * 86_400_000 + 3_600_000), "3d 01h");
        assert_eq!(human_age(-5), "in the future");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(age_ms(0, u64::MAX), i64::MIN);
    }

    #[test]
    fn replay_clears_a_passed_expiry_and_keeps_one_ahead() {
        let now = 10_000_000;
        let message = OutgoingMessage::command("ch", Bytes::from_static(b"x"), now - 1000);
        let (passed, notes) = renewed(message.clone().with_expiry(now - 1), now, None);
        assert_eq!(passed.options, None);
        assert_eq!(notes.len(), 1);
        let (ahead, notes) = renewed(message.clone().with_expiry(now + 1), now, None);
        assert_eq!(ahead.options.unwrap().expires_unix_ms, Some(now + 1));
        assert!(notes.is_empty());
        let (set, _) = renewed(message, now, Some(now + 5000));
        assert_eq!(set.options.unwrap().expires_unix_ms, Some(now + 5000));
    }
}
