//! Delayed sends: the node's schedule of messages waiting for their due time, and the task that
//! releases them into their peers' streams (see [`weft_proto::schedule`] for why a delayed
//! message is held at the sender and numbered only when due, and for the ordering guarantee).
//!
//! ```text
//! send(delayed) ── check due time, take a place (ScheduleFull) ──┬─ no spool: into the schedule
//!                                                                 └─ spool: Command::Schedule →
//!      writer appends it UNNUMBERED (seq 0, due time) + sync → into the schedule ("accepted")
//! release task: at the due time (sender's wall clock), per message: a slot in the peer's queue
//!      (await), then under the lane queue's lock seq = next, exactly like a fresh send:
//!      no spool: into the link;  spool: Command::Append{release} → writer appends the NUMBERED
//!      copy (naming its origin) and retires the unnumbered record, one sync, then the link
//! ```
//! Places in the schedule are bounded by `NodeConfig::schedule_max` (a send beyond it fails with
//! `SendError::ScheduleFull`); a message holds its place until its release is durable.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tracing::debug;
use weft_proto::schedule::Schedule;
use weft_proto::{NodeId, OutgoingMessage};

use crate::metrics::Metrics;
use crate::receipt::SlotState;

/// The longest the release task sleeps without looking at the clock again: bounds how late a
/// release is after the wall clock is stepped (the task sleeps on the monotonic clock).
const RECHECK_MAX: Duration = Duration::from_secs(1);
/// Most messages released in one round before the task yields (and re-reads the clock).
const RELEASE_ROUND_MAX: usize = 4_096;
/// How long releases pause after the spool refused one for lack of room.
const SPOOL_FULL_PAUSE: Duration = Duration::from_millis(100);

/// What the schedule keeps of a message besides the message: its record and its receipt's slot.
#[derive(Debug)]
pub(crate) struct Ticket {
    /// The unnumbered spool record holding it (0: no spool).
    pub tag: u64,
    /// Tells its receipt when it is numbered (or failed).
    pub slot: watch::Sender<SlotState>,
    /// Whether it holds one of the `schedule_max` places (restored messages beyond it do not).
    pub holds_place: bool,
}

/// A message waiting for its due time.
#[derive(Debug)]
pub(crate) struct Waiting {
    pub dest: NodeId,
    pub message: OutgoingMessage,
    pub ticket: Ticket,
}

/// The node's schedule. Shared by the API (places), the spool writer (inserts after the sync)
/// and the release task.
#[derive(Debug)]
pub(crate) struct Scheduler {
    /// Bounded through `places`, not its own capacity (restored messages may exceed the places).
    schedule: Mutex<Schedule<Waiting>>,
    /// `schedule_max` places; a send takes one before anything else.
    places: Semaphore,
    places_max: usize,
    /// Woken on every insert (a newly earliest due time).
    wake: Notify,
    /// Releases wait until then (a full spool refused one).
    paused_until: Mutex<Option<Instant>>,
    /// Set at shutdown: what arrives later (a spool write finishing) is dropped, so that its
    /// receipt reports `NodeClosed` instead of waiting for a release that never comes.
    closed: std::sync::atomic::AtomicBool,
    /// Whether the release task runs (started with the first delayed message).
    started: std::sync::atomic::AtomicBool,
    metrics: Arc<Metrics>,
}

impl Scheduler {
    pub(crate) fn new(places_max: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            schedule: Mutex::new(Schedule::new(usize::MAX)),
            places: Semaphore::new(places_max.min(Semaphore::MAX_PERMITS)),
            places_max,
            wake: Notify::new(),
            paused_until: Mutex::new(None),
            closed: std::sync::atomic::AtomicBool::new(false),
            started: std::sync::atomic::AtomicBool::new(false),
            metrics,
        }
    }

    /// Takes a place for a new delayed message, or says how many wait.
    pub(crate) fn take_place(&self) -> Result<(), usize> {
        match self.places.try_acquire() {
            Ok(place) => {
                place.forget();
                Ok(())
            }
            Err(_) => Err(self.places_max),
        }
    }

    /// True the first time only: the caller starts the release task.
    pub(crate) fn mark_started(&self) -> bool {
        !self.started.swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Whether anything waits (restored at start).
    pub(crate) fn has_waiting(&self) -> bool {
        !self
            .schedule
            .lock()
            .expect("schedule lock poisoned")
            .is_empty()
    }

    /// Gives a place back (the message was released, or refused before it was scheduled).
    pub(crate) fn free_place(&self, held: bool) {
        if held {
            self.places.add_permits(1);
        }
    }

    /// Puts a message into the schedule (accepted: durable with a spool).
    pub(crate) fn insert(&self, waiting: Waiting) {
        let due = waiting
            .message
            .deliver_after_unix_ms()
            .expect("only delayed messages are scheduled");
        let mut schedule = self.schedule.lock().expect("schedule lock poisoned");
        if self.closed.load(std::sync::atomic::Ordering::Relaxed) {
            // (Checked under the lock `close` takes: nothing slips in after it emptied.)
            return;
        }
        if schedule.insert(due, waiting).is_err() {
            unreachable!("the schedule's own capacity is unbounded; places bound it");
        }
        self.metrics.scheduled_set(schedule.len() as u64);
        drop(schedule);
        self.wake.notify_one();
    }

    /// Messages a restart found waiting in the spool: they take places while there are any.
    pub(crate) fn restore(&self, restored: Vec<(NodeId, u64, OutgoingMessage)>) {
        for (dest, tag, message) in restored {
            let holds_place = self.take_place().is_ok();
            let (slot, _) = crate::receipt::slot(true);
            self.insert(Waiting {
                dest,
                message,
                ticket: Ticket {
                    tag,
                    slot,
                    holds_place,
                },
            });
        }
    }

    /// A release the spool refused for lack of room: back into the schedule (it keeps its
    /// due time, hence its place in the due order), and releases pause a little.
    pub(crate) fn refused_for_room(&self, waiting: Waiting) {
        *self.paused_until.lock().expect("pause lock poisoned") =
            Some(Instant::now() + SPOOL_FULL_PAUSE);
        self.insert(waiting);
    }

    fn pop_due(&self, now_unix_ms: u64) -> Option<Waiting> {
        let mut schedule = self.schedule.lock().expect("schedule lock poisoned");
        let (_, waiting) = schedule.pop_due(now_unix_ms)?;
        self.metrics.scheduled_set(schedule.len() as u64);
        Some(waiting)
    }

    fn next_due(&self) -> Option<u64> {
        self.schedule
            .lock()
            .expect("schedule lock poisoned")
            .next_due()
    }

    /// Empties the schedule at shutdown: the receipts of what waited report `NodeClosed` (with
    /// a spool the messages stay there and are scheduled again at the next start).
    pub(crate) fn close(&self) {
        let mut schedule = self.schedule.lock().expect("schedule lock poisoned");
        self.closed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let mut dropped = 0;
        while schedule.pop_due(u64::MAX).is_some() {
            dropped += 1;
        }
        self.metrics.scheduled_set(0);
        if dropped > 0 {
            debug!(dropped, "node stops with delayed messages waiting");
        }
    }
}

/// The release task: sleeps until the earliest due time (at most [`RECHECK_MAX`]), then hands
/// everything due to `release` (which numbers and enqueues it), in due order. `now_unix_ms` is
/// the node's wall clock; the task ends when `shutdown` turns true.
pub(crate) async fn run<Release, Released>(
    scheduler: Arc<Scheduler>,
    mut shutdown: watch::Receiver<bool>,
    now_unix_ms: impl Fn() -> u64,
    release: Release,
) where
    Release: Fn(Waiting) -> Released,
    Released: std::future::Future<Output = ()>,
{
    loop {
        let paused = scheduler
            .paused_until
            .lock()
            .expect("pause lock poisoned")
            .take();
        if let Some(until) = paused {
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                () = tokio::time::sleep_until(until) => {}
            }
        }
        let mut released = 0;
        while released < RELEASE_ROUND_MAX {
            let Some(waiting) = scheduler.pop_due(now_unix_ms()) else {
                break;
            };
            released += 1;
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                () = release(waiting) => {}
            }
        }
        if released >= RELEASE_ROUND_MAX {
            tokio::task::yield_now().await;
            continue;
        }
        let Some(due) = scheduler.next_due() else {
            // Nothing scheduled: no timer at all (an idle node's runtime, and the simulation's
            // event order, are as without this task) until an insert wakes the task.
            tokio::select! {
                biased;
                _ = shutdown.wait_for(|stop| *stop) => break,
                () = scheduler.wake.notified() => {}
            }
            continue;
        };
        let wait = Duration::from_millis(due.saturating_sub(now_unix_ms())).min(RECHECK_MAX);
        tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            () = scheduler.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
    scheduler.close();
}
