//! The per-peer protocol, whole: one [`Session`] per known peer owns its connection lifecycle
//! ([`Peer`]) and, per [`Lane`], the stream ([`Link`]), persist-before-acknowledge
//! ([`WatermarkGate`]) and expiry checks ([`ExpiryTimer`]).
//!
//! A session is what one driver task owns for one peer. It knows which of the lanes' streams
//! are in place on the current connection, so a new connection moves every lane at once and a
//! lane's stream from a connection replaced meanwhile is refused; it turns the links' events,
//! the gates' persist requests and given-up messages into one queue of [`SessionEvent`]s; and it
//! owns every per-peer deadline (dial, watermark retry, expiry).
//!
//! # Driving it
//! Like quinn-proto's `Connection`. Inputs: `handle_*` (connections and lane streams, frames
//! per lane, settlements, the spool's answers, addresses, dial failures, timeouts), each with
//! the time it happened where time matters. Per lane, the driver also works the [`Link`]
//! directly through [`Session::link_mut`] for what concerns that stream alone: pushing messages,
//! taking deliveries ([`Link::pop_delivery`]), encoding what to send ([`Link::poll_transmit_chunks`]),
//! withdrawals. Outputs, drained after every input in this order:
//! 1. [`Session::poll_event`] until `None`: dials, up/down, acknowledgements of our streams,
//!    inbound streams that started or skipped (before any of their messages reach the
//!    application), persist requests, given-up messages;
//! 2. per lane, [`Link::poll_transmit_chunks`] while [`Link::wants_transmit`];
//! 3. [`Session::poll_timeout`], then sleep until it and call [`Session::handle_timeout`].
//!
//! Nothing here reads a clock or the OS's randomness: time is a parameter, and the one random
//! input (backoff jitter) is seeded by the driver. `peer_tests` runs two sessions over a
//! simulated wire in virtual time.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::frame::Frame;
use crate::link::{GiveUp, GivenUp, Link, LinkConfig, LinkError, LinkEvent};
use crate::peer::{
    Admit, ExpiryTimer, NewConnection, Peer, PeerConfig, PeerEvent, Refusal, Watermark,
    WatermarkGate,
};
use crate::{Lane, NodeId};

/// Longest a clean shutdown waits for what is queued for the peer to be written and
/// acknowledged (see [`Session::handle_shutdown`]).
pub const SHUTDOWN_DRAIN: Duration = Duration::from_millis(500);

/// What a [`Session`] needs to know of the node's settings.
#[derive(Clone, Debug, Default)]
pub struct SessionConfig {
    /// Dialing and reconnecting.
    pub peer: PeerConfig,
    /// Every lane's stream.
    pub link: LinkConfig,
    /// Whether a spool makes inbound watermarks durable before they are acknowledged (see
    /// [`WatermarkGate`]).
    pub spooled: bool,
}

/// What the driver must do for a [`Session`] (see the module doc for when to ask).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionEvent {
    /// The connection lifecycle's: dial, up, down (see [`PeerEvent`]).
    Peer(PeerEvent),
    /// The peer took our stream in `lane` up to and including `up_to`.
    Acked {
        /// The stream's lane.
        lane: Lane,
        /// Highest acknowledged sequence number.
        up_to: u64,
    },
    /// The peer's stream in `lane` (re)started: everything up to `base` counts as settled.
    InboundStream {
        /// The stream's lane.
        lane: Lane,
        /// Its epoch.
        epoch: u64,
        /// Settled up to here.
        base: u64,
    },
    /// The peer gave up sequence numbers `from..=up_to` of its stream in `lane`.
    Skipped {
        /// The stream's lane.
        lane: Lane,
        /// Its epoch.
        epoch: u64,
        /// Lowest skipped.
        from: u64,
        /// Highest skipped.
        up_to: u64,
    },
    /// Make this inbound watermark of `lane` durable, then answer with
    /// [`Session::handle_durable`] or [`Session::handle_refused`].
    Persist {
        /// The stream's lane.
        lane: Lane,
        /// (epoch, settled up to).
        watermark: Watermark,
    },
    /// A message of our stream in `lane` will never be delivered: expired, over its retry
    /// budget, or given up on request. It goes to the dead letters.
    GivenUp {
        /// The stream's lane.
        lane: Lane,
        /// The message and why.
        given_up: GivenUp,
    },
}

/// One lane of a session.
#[derive(Debug)]
struct LaneState {
    link: Link,
    gate: WatermarkGate,
    expiry: ExpiryTimer,
    /// The newest settlement the application made (what a gate retry persists).
    settled: Watermark,
}

/// The per-peer protocol state machine (see the module doc).
#[derive(Debug)]
pub struct Session {
    peer: Peer,
    /// Indexed by [`Lane::index`].
    lanes: Vec<LaneState>,
    events: VecDeque<SessionEvent>,
    spooled: bool,
}

impl Session {
    /// The session of `local` with `remote`, whose outbound streams start at `epoch` (unless
    /// restored); `seed` seeds the backoff jitter.
    pub fn new(
        local: NodeId,
        remote: NodeId,
        epoch: u64,
        config: SessionConfig,
        seed: u64,
    ) -> Self {
        let lanes = Lane::ALL
            .into_iter()
            .map(|lane| LaneState {
                link: Link::with_lane(local, remote, epoch, lane, config.link.clone()),
                gate: WatermarkGate::new(config.spooled, (0, 0)),
                expiry: ExpiryTimer::default(),
                settled: (0, 0),
            })
            .collect();
        Self {
            peer: Peer::new(local, remote, config.peer.clone(), seed),
            lanes,
            events: VecDeque::new(),
            spooled: config.spooled,
        }
    }

    /// Continues our stream in `lane` as the spool left it: `epoch`, acknowledged up to
    /// `acked_up_to` (the unacknowledged messages are pushed again by the driver).
    pub fn restore_outbound(&mut self, lane: Lane, epoch: u64, acked_up_to: u64) {
        self.lane_mut(lane)
            .link
            .restore_outbound(epoch, acked_up_to);
    }

    /// Continues the peer's stream in `lane` from the durable watermark `(epoch, up_to)`.
    pub fn restore_inbound(&mut self, lane: Lane, epoch: u64, up_to: u64) {
        let spooled = self.spooled;
        let state = self.lane_mut(lane);
        state.link.restore_inbound(epoch, up_to);
        state.gate = WatermarkGate::new(spooled, (epoch, up_to));
        state.settled = (epoch, up_to);
    }

    /// Deliberately acknowledges every lane's settlements before the spool confirms them (the
    /// simulation's canary: this loses messages at a crash).
    #[cfg(feature = "fault-injection")]
    pub fn acknowledge_before_durable(&mut self) {
        for state in &mut self.lanes {
            let gate = std::mem::replace(&mut state.gate, WatermarkGate::new(false, (0, 0)));
            state.gate = gate.acknowledge_before_durable();
        }
    }

    /// The connection lifecycle (read only: its inputs go through the session).
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// `lane`'s stream.
    pub fn link(&self, lane: Lane) -> &Link {
        &self.lanes[lane.index()].link
    }

    /// `lane`'s stream, for what concerns it alone (pushes, deliveries, transmits, withdrawals;
    /// see the module doc). Frames go through [`Session::handle_frame`].
    pub fn link_mut(&mut self, lane: Lane) -> &mut Link {
        &mut self.lanes[lane.index()].link
    }

    /// Whether `lane`'s stream is in place on the current connection.
    pub fn is_connected(&self, lane: Lane) -> bool {
        self.link(lane).is_connected()
    }

    /// Addresses to dial the peer at (see [`Peer::handle_addresses`]).
    pub fn handle_addresses(
        &mut self,
        now: Instant,
        addresses: impl IntoIterator<Item = SocketAddr>,
    ) {
        self.peer.handle_addresses(now, addresses);
        self.take_peer_events();
    }

    /// A connection passed its hello: install it (every lane moves off the one it replaces, and
    /// the normal lane, whose stream is the hello's, is in place at once) or close it as a
    /// duplicate. The driver closes whichever connection the answer says.
    pub fn handle_connection(&mut self, new: NewConnection) -> Admit {
        let admit = self.peer.handle_connection(new);
        if matches!(admit, Admit::Install { .. }) {
            self.disconnect_lanes();
            self.lane_mut(Lane::Normal).link.connected();
        }
        self.take_peer_events();
        admit
    }

    /// `lane`'s stream on the `generation`-th connection is in place. Returns false (and
    /// changes nothing) if that connection is no longer the current one: the driver drops the
    /// stream.
    pub fn handle_lane_stream(&mut self, lane: Lane, generation: u64) -> bool {
        if !self.peer.is_connected() || self.peer.generation() != generation || lane == Lane::Normal
        {
            return false;
        }
        let link = &mut self.lane_mut(lane).link;
        if link.is_connected() {
            return false; // the peer opened it twice
        }
        link.connected();
        self.peer.handle_lane_up(generation);
        self.take_peer_events();
        true
    }

    /// The current connection is gone (`goodbye`: the peer left on purpose). Every lane's
    /// stream goes with it; unacknowledged messages wait for the next one.
    pub fn handle_connection_lost(&mut self, now: Instant, goodbye: bool) {
        self.disconnect_lanes();
        self.peer.handle_connection_lost(now, goodbye);
        self.take_peer_events();
    }

    /// None of the addresses of the last dial connected.
    pub fn handle_dial_failed(&mut self, now: Instant) {
        self.peer.handle_dial_failed(now);
        self.take_peer_events();
    }

    /// The node is stopping (at `now`): no more dials. The driver then drains — keeps reading
    /// and writing until everything queued is acknowledged — but not past the returned
    /// deadline ([`SHUTDOWN_DRAIN`] from now), then finishes the streams and closes.
    pub fn handle_shutdown(&mut self, now: Instant) -> Instant {
        self.peer.handle_shutdown();
        self.take_peer_events();
        now + SHUTDOWN_DRAIN
    }

    /// Whether anything of ours is unacknowledged or unsent, or an acknowledgement of what the
    /// application settled is still to come (its watermark being persisted), in a lane whose
    /// stream is in place: what a draining driver still waits for. A node that stopped before
    /// acknowledging what its application had taken would have it handed to someone else
    /// (a work item to another worker) and handled twice.
    pub fn is_draining(&self) -> bool {
        self.lanes.iter().any(|state| {
            let link = &state.link;
            link.is_connected()
                && (link.wants_transmit()
                    || link.queued_messages() > 0
                    || state.gate.is_persisting())
        })
    }

    /// A frame arrived on `lane`'s stream. An error is the peer breaking the protocol: the
    /// driver closes the connection.
    pub fn handle_frame(&mut self, lane: Lane, frame: Frame) -> Result<(), LinkError> {
        let state = &mut self.lanes[lane.index()];
        state.link.handle_frame(frame)?;
        let resumed = state.link.peer_resumed();
        while let Some(event) = state.link.poll_event() {
            self.events.push_back(match event {
                LinkEvent::Acked { up_to } => SessionEvent::Acked { lane, up_to },
                LinkEvent::InboundStream { epoch, base } => {
                    state.settled = (epoch, base);
                    SessionEvent::InboundStream { lane, epoch, base }
                }
                LinkEvent::Skipped { epoch, from, up_to } => SessionEvent::Skipped {
                    lane,
                    epoch,
                    from,
                    up_to,
                },
            });
        }
        if resumed && lane == Lane::Normal {
            self.peer.handle_resumed();
        }
        Ok(())
    }

    /// The application settled the peer's stream in `lane` up to `watermark`: acknowledged at
    /// once without a spool, else persisted first ([`SessionEvent::Persist`]). `last`: the node
    /// is stopping, persist the newest whatever is in flight.
    pub fn handle_settled(&mut self, lane: Lane, watermark: Watermark, last: bool) {
        let state = &mut self.lanes[lane.index()];
        state.settled = watermark;
        let output = state.gate.handle_settled(watermark, last);
        self.apply_gate(lane, output);
    }

    /// The spool made `watermark` of `lane` durable: it is acknowledged. Returns whether this
    /// ended a refusal episode (for the driver's log).
    pub fn handle_durable(&mut self, lane: Lane, watermark: Watermark) -> bool {
        let (output, recovered) = self.lanes[lane.index()].gate.handle_durable(watermark);
        self.apply_gate(lane, output);
        // What was settled meanwhile goes next.
        let settled = self.lanes[lane.index()].settled;
        let output = self.lanes[lane.index()].gate.handle_settled(settled, false);
        self.apply_gate(lane, output);
        recovered
    }

    /// The spool did not make `watermark` of `lane` durable (see
    /// [`WatermarkGate::handle_refused`]).
    pub fn handle_refused(
        &mut self,
        lane: Lane,
        now: Instant,
        watermark: Watermark,
        stopped: bool,
    ) -> Refusal {
        self.lanes[lane.index()]
            .gate
            .handle_refused(now, watermark, stopped)
    }

    /// Gives up these messages of our stream in `lane` (ascending `seqs`) if they are still
    /// queued and not in flight ([`SessionEvent::GivenUp`]).
    pub fn give_up(&mut self, lane: Lane, seqs: &[u64], reason: GiveUp) {
        let given_up = self.lane_mut(lane).link.give_up(seqs, reason);
        self.events.extend(
            given_up
                .into_iter()
                .map(|given_up| SessionEvent::GivenUp { lane, given_up }),
        );
    }

    /// The next thing for the driver to do.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// The earliest deadline: a dial, a watermark retry, or an expiry check (armed here, at
    /// `now`, for a lane that has messages queued and no check armed).
    pub fn poll_timeout(&mut self, now: Instant) -> Option<Instant> {
        let mut earliest = self.peer.poll_timeout();
        for state in &mut self.lanes {
            state.expiry.arm(now, state.link.queued_messages());
            for at in [state.expiry.poll_timeout(), state.gate.poll_timeout()] {
                earliest = match (earliest, at) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        earliest
    }

    /// Time passed: whatever is due happens (at `now`; `now_unix_ms` is the wall clock that
    /// messages' expiry times are in).
    pub fn handle_timeout(&mut self, now: Instant, now_unix_ms: u64) {
        self.peer.handle_timeout(now);
        self.take_peer_events();
        for lane in Lane::ALL {
            let state = &mut self.lanes[lane.index()];
            if state.expiry.handle_timeout(now) {
                let given_up = state.link.expire(now_unix_ms);
                self.events.extend(
                    given_up
                        .into_iter()
                        .map(|given_up| SessionEvent::GivenUp { lane, given_up }),
                );
            }
            let state = &mut self.lanes[lane.index()];
            if state.gate.handle_timeout(now) {
                let output = state.gate.handle_settled(state.settled, false);
                self.apply_gate(lane, output);
            }
        }
    }

    fn lane_mut(&mut self, lane: Lane) -> &mut LaneState {
        &mut self.lanes[lane.index()]
    }

    fn apply_gate(&mut self, lane: Lane, output: crate::peer::GateOutput) {
        if let Some((epoch, up_to)) = output.acknowledge {
            self.lane_mut(lane).link.acknowledge(epoch, up_to);
        }
        if let Some(watermark) = output.persist {
            self.events
                .push_back(SessionEvent::Persist { lane, watermark });
        }
    }

    fn take_peer_events(&mut self) {
        while let Some(event) = self.peer.poll_event() {
            self.events.push_back(SessionEvent::Peer(event));
        }
    }

    /// Every lane loses its stream (the connection went, or another replaces it).
    fn disconnect_lanes(&mut self) {
        for state in &mut self.lanes {
            if state.link.is_connected() {
                state.link.disconnected();
            }
        }
    }
}
