//! Two links joined by a simulated connection that can drop at any moment, driven by random
//! operation sequences. Properties: every pushed message is delivered exactly once and in order,
//! and everything is acknowledged once the connection stays up.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use crate::backoff::SplitMix64;
use crate::frame::{DataContext, FrameDecoder, Limits};
use crate::id::NodeId;
use crate::link::{Link, LinkConfig, LinkEvent, OutgoingMessage};

struct Side {
    link: Link,
    decoder: FrameDecoder,
    /// Bytes received but not yet decoded (belongs to the current connection).
    rx: BytesMut,
    /// The current connection's stream context.
    rx_data: DataContext,
    delivered: Vec<Bytes>,
    acked_up_to: u64,
    pushed: u64,
    acks_on_delivery: bool,
    /// With `ack_on_delivery` off: (epoch, highest delivered or skipped) for `acknowledge`.
    settled: (u64, u64),
    /// Transmits with `poll_transmit_chunks` (large bodies as buffers of their own).
    chunked: bool,
}

impl Side {
    fn new(local: NodeId, peer: NodeId, config: LinkConfig) -> Self {
        Self {
            decoder: FrameDecoder::new(Limits::default()),
            link: Link::new(local, peer, 77, config.clone()),
            rx: BytesMut::new(),
            rx_data: DataContext::new(),
            delivered: Vec::new(),
            acked_up_to: 0,
            pushed: 0,
            acks_on_delivery: config.ack_on_delivery,
            settled: (0, 0),
            chunked: false,
        }
    }

    fn receive(&mut self, bytes: &[u8]) {
        self.rx.extend_from_slice(bytes);
        while let Some(frame) = self
            .decoder
            .decode_in(&mut self.rx_data, &mut self.rx)
            .expect("valid frames")
        {
            self.link.handle_frame(frame).expect("no protocol error");
            while let Some(message) = self.link.pop_delivery() {
                let seq = message.header.id.seq;
                assert!(seq > self.settled.1, "delivered in order, never twice");
                self.settled.1 = seq;
                self.delivered.push(message.body);
            }
            while let Some(event) = self.link.poll_event() {
                match event {
                    LinkEvent::Acked { up_to } => {
                        assert!(up_to > self.acked_up_to, "acks only move forward");
                        self.acked_up_to = up_to;
                    }
                    LinkEvent::InboundStream { epoch, base } => self.settled = (epoch, base),
                    LinkEvent::Skipped { epoch, from, up_to } => {
                        assert_eq!(epoch, self.settled.0);
                        assert_eq!(from, self.settled.1 + 1, "only what did not arrive");
                        assert!(up_to > self.settled.1, "skips only move forward");
                        self.settled.1 = up_to;
                    }
                }
            }
        }
    }

    /// The driver's part with `ack_on_delivery` off: acknowledge what was delivered.
    fn acknowledge(&mut self) {
        let (epoch, up_to) = self.settled;
        self.link.acknowledge(epoch, up_to);
    }

    fn transmit(&mut self, wire: &mut VecDeque<Bytes>, max_bytes: usize) {
        if !self.link_acks_on_delivery() {
            self.acknowledge();
        }
        let mut buf = BytesMut::new();
        if self.chunked {
            let mut chunks = VecDeque::new();
            self.link
                .poll_transmit_chunks(&mut buf, &mut chunks, max_bytes);
            wire.extend(chunks);
        } else {
            self.link.poll_transmit(&mut buf, max_bytes);
        }
        if !buf.is_empty() {
            wire.push_back(buf.freeze());
        }
    }
}

impl Side {
    fn link_acks_on_delivery(&self) -> bool {
        self.acks_on_delivery
    }
}

struct Pair {
    a: Side,
    b: Side,
    a_to_b: VecDeque<Bytes>,
    b_to_a: VecDeque<Bytes>,
}

impl Pair {
    fn new(config: LinkConfig) -> Self {
        let a = NodeId::from_bytes([1; 32]);
        let b = NodeId::from_bytes([2; 32]);
        let mut pair = Self {
            a: Side::new(a, b, config.clone()),
            b: Side::new(b, a, config),
            a_to_b: VecDeque::new(),
            b_to_a: VecDeque::new(),
        };
        // A hands large bodies over as buffers of their own, B copies every body into batches.
        pair.a.chunked = true;
        pair.reconnect();
        pair
    }

    fn reconnect(&mut self) {
        // A dead connection takes its bytes in flight and its half-read frames with it.
        self.a_to_b.clear();
        self.b_to_a.clear();
        self.a.rx.clear();
        self.b.rx.clear();
        self.a.rx_data.reset();
        self.b.rx_data.reset();
        self.a.link.disconnected();
        self.b.link.disconnected();
        self.a.link.connected();
        self.b.link.connected();
    }

    fn push(side: &mut Side, rng: &mut SplitMix64) {
        let mut text = format!("m{}:{}", side.pushed + 1, rng.next_u64() % 1000);
        if rng.next_u64().is_multiple_of(16) {
            // Large enough to travel as a buffer of its own from a chunked sender.
            text.extend(std::iter::repeat_n(' ', crate::link::SEPARATE_BODY_BYTES));
        }
        let body = Bytes::from(text);
        if side.link.has_room(body.len()) {
            side.link
                .push(OutgoingMessage::command("c", body, 0))
                .expect("room was checked");
            side.pushed += 1;
        }
    }

    fn step(&mut self, rng: &mut SplitMix64) {
        match rng.next_u64() % 10 {
            0..=2 => Self::push(&mut self.a, rng),
            3 => Self::push(&mut self.b, rng),
            4 => self
                .a
                .transmit(&mut self.a_to_b, 1 + (rng.next_u64() % 400) as usize),
            5 => self
                .b
                .transmit(&mut self.b_to_a, 1 + (rng.next_u64() % 400) as usize),
            6 | 7 => {
                if let Some(chunk) = self.a_to_b.pop_front() {
                    // Deliver a prefix; the rest stays in flight.
                    let cut = (rng.next_u64() as usize % chunk.len()) + 1;
                    self.b.receive(&chunk[..cut]);
                    if cut < chunk.len() {
                        self.a_to_b.push_front(chunk.slice(cut..));
                    }
                }
            }
            8 => {
                if let Some(chunk) = self.b_to_a.pop_front() {
                    self.a.receive(&chunk);
                }
            }
            _ => {
                if rng.next_u64().is_multiple_of(8) {
                    self.reconnect();
                }
            }
        }
    }

    /// Runs with a healthy connection until nothing moves. Bounded: each round either moves bytes
    /// or ends the loop, and there is a finite amount to move.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            self.a.transmit(&mut self.a_to_b, usize::MAX);
            self.b.transmit(&mut self.b_to_a, usize::MAX);
            if self.a_to_b.is_empty() && self.b_to_a.is_empty() {
                return;
            }
            while let Some(chunk) = self.a_to_b.pop_front() {
                self.b.receive(&chunk);
            }
            while let Some(chunk) = self.b_to_a.pop_front() {
                self.a.receive(&chunk);
            }
        }
        panic!("links never went idle");
    }
}

fn expected(count: u64, delivered: &[Bytes]) {
    assert_eq!(delivered.len() as u64, count, "each message exactly once");
    for (i, body) in delivered.iter().enumerate() {
        let text = std::str::from_utf8(body).unwrap().trim_end();
        let seq: u64 = text[1..text.find(':').unwrap()].parse().unwrap();
        assert_eq!(seq, i as u64 + 1, "in order");
    }
}

fn run(seed: u64, config: LinkConfig, steps: usize) {
    let mut rng = SplitMix64::new(seed);
    let mut pair = Pair::new(config);
    for _ in 0..steps {
        pair.step(&mut rng);
    }
    pair.settle();
    expected(pair.a.pushed, &pair.b.delivered);
    expected(pair.b.pushed, &pair.a.delivered);
    assert_eq!(
        pair.a.acked_up_to, pair.a.pushed,
        "seed {seed}: all of a's acked"
    );
    assert_eq!(
        pair.b.acked_up_to, pair.b.pushed,
        "seed {seed}: all of b's acked"
    );
    assert_eq!(pair.a.link.queued_messages(), 0);
    assert_eq!(pair.a.link.queued_bytes(), 0);
}

#[test]
fn random_operations_with_connection_drops_lose_and_duplicate_nothing() {
    for seed in 0..300 {
        run(seed, LinkConfig::default(), 400);
    }
}

#[test]
fn small_windows_and_queues_still_deliver_everything() {
    let config = LinkConfig {
        window_messages: 3,
        window_bytes: 20,
        queue_messages_max: 5,
        queue_bytes_max: 60,
        ..LinkConfig::default()
    };
    for seed in 1_000..1_300 {
        run(seed, config.clone(), 600);
    }
}

#[test]
fn retransmissions_after_reconnect_are_counted_and_deduplicated() {
    let mut pair = Pair::new(LinkConfig::default());
    let mut rng = SplitMix64::new(5);
    for _ in 0..10 {
        Pair::push(&mut pair.a, &mut rng);
    }
    pair.a.transmit(&mut pair.a_to_b, usize::MAX);
    let chunk = pair.a_to_b.pop_front().unwrap();
    pair.b.receive(&chunk); // b has all 10, but its ack never reaches a
    pair.reconnect();
    pair.settle();
    assert_eq!(pair.b.delivered.len(), 10);
    assert_eq!(pair.a.acked_up_to, 10);
    assert_eq!(
        pair.a.link.stats().retransmitted,
        0,
        "b's re-ack retired them before a resent"
    );
    assert_eq!(pair.b.link.stats().duplicates, 0);
}

#[test]
fn a_gap_is_a_protocol_error() {
    use crate::frame::Frame;
    let a = NodeId::from_bytes([1; 32]);
    let b = NodeId::from_bytes([2; 32]);
    let mut receiver = Link::new(b, a, 1, LinkConfig::default());
    receiver.connected();
    receiver
        .handle_frame(Frame::Resume {
            epoch: 9,
            next_seq: 1,
        })
        .unwrap();
    let mut sender = Link::new(a, b, 9, LinkConfig::default());
    sender.connected();
    sender
        .handle_frame(Frame::Resume {
            epoch: 1,
            next_seq: 1,
        })
        .unwrap();
    for _ in 0..2 {
        sender
            .push(OutgoingMessage::command("c", Bytes::new(), 0))
            .unwrap();
    }
    let mut buf = BytesMut::new();
    sender.poll_transmit(&mut buf, usize::MAX);
    let decoder = FrameDecoder::new(Limits::default());
    let mut context = DataContext::new();
    let mut frames = Vec::new();
    while let Some(f) = decoder.decode_in(&mut context, &mut buf).unwrap() {
        frames.push(f);
    }
    // frames: Resume, Data 1, Data 2. Skip data 1.
    let err = receiver.handle_frame(frames.pop().unwrap()).unwrap_err();
    assert_eq!(
        err,
        crate::link::LinkError::Gap {
            expected: 1,
            got: 2
        }
    );
}

/// Messages that expire or exhaust their attempts are given up, anywhere in the queue, with the
/// connection dropping at random: the receiver still sees a gap-free, duplicate-free stream (the
/// sender skips what it gave up), every message is delivered or given up, and a message given up
/// was never delivered unless a dead connection carried it.
fn run_giving_up(seed: u64, ack_on_delivery: bool) {
    let mut rng = SplitMix64::new(seed);
    let config = LinkConfig {
        retry: crate::link::RetryPolicy {
            max_attempts: 3,
            max_age_ms: 10_000,
        },
        ack_on_delivery,
        ..LinkConfig::default()
    };
    let mut pair = Pair::new(config);
    let mut now = 0u64;
    let mut given_up = Vec::new();
    for _ in 0..600 {
        now += 1;
        match rng.next_u64() % 12 {
            0..=2 => {
                let n = pair.a.pushed + 1;
                let body = Bytes::from(format!("m{n}:{now}"));
                let mut message = OutgoingMessage::command("c", body, now);
                if rng.next_u64().is_multiple_of(3) {
                    message = message.with_expiry(now + rng.next_u64() % 60);
                }
                if pair.a.link.has_room(message.body.len()) {
                    pair.a
                        .link
                        .push_at(n, n, message)
                        .expect("room was checked");
                    pair.a.pushed = n;
                }
            }
            3 => given_up.extend(pair.a.link.expire(now)),
            _ => pair.step(&mut rng),
        }
    }
    given_up.extend(pair.a.link.expire(now + 1_000_000));
    pair.settle();
    let delivered: Vec<u64> = pair
        .b
        .delivered
        .iter()
        .map(|body| {
            let text = std::str::from_utf8(body).unwrap();
            text[1..text.find(':').unwrap()].parse().unwrap()
        })
        .collect();
    assert!(
        delivered.windows(2).all(|w| w[0] < w[1]),
        "seed {seed}: in order, once"
    );
    for n in 1..=pair.a.pushed {
        let gave_up = given_up.iter().any(|g| g.seq == n);
        assert!(
            gave_up || delivered.contains(&n),
            "seed {seed}: message {n} neither delivered nor given up"
        );
    }
    assert_eq!(pair.a.link.queued_messages(), 0, "seed {seed}");
    assert_eq!(pair.a.link.queued_bytes(), 0, "seed {seed}");
    let mut retired = Vec::new();
    pair.a.link.take_retired(&mut retired);
    for tag in &retired {
        assert!(
            delivered.contains(tag),
            "seed {seed}: retired {tag} was delivered"
        );
    }
}

#[test]
fn given_up_messages_are_skipped_without_gaps_or_duplicates() {
    for seed in 0..300 {
        run_giving_up(seed, true);
        run_giving_up(seed, false);
    }
}

#[test]
fn restored_streams_continue_where_they_left_off() {
    let a = NodeId::from_bytes([1; 32]);
    let b = NodeId::from_bytes([2; 32]);
    // b persisted that it delivered a's stream 5 up to 3; a restarts with 3..=6 still spooled.
    let mut sender = Link::new(a, b, 1, LinkConfig::default());
    sender.restore_outbound(5, 2);
    for seq in 3..=6 {
        let body = Bytes::from(format!("m{seq}:0"));
        sender
            .push_at(seq, seq, OutgoingMessage::command("c", body, 0))
            .unwrap();
    }
    let mut receiver = Link::new(b, a, 1, LinkConfig::default());
    receiver.restore_inbound(5, 3);
    sender.connected();
    receiver.connected();
    let decoder = FrameDecoder::new(Limits::default());
    let (mut fwd, mut back) = (DataContext::new(), DataContext::new());
    let mut delivered = Vec::new();
    for _ in 0..4 {
        let mut buf = BytesMut::new();
        sender.poll_transmit(&mut buf, usize::MAX);
        while let Some(frame) = decoder.decode_in(&mut fwd, &mut buf).unwrap() {
            receiver.handle_frame(frame).unwrap();
            while let Some(message) = receiver.pop_delivery() {
                delivered.push(message.header.id.seq);
            }
        }
        let mut back_bytes = BytesMut::new();
        receiver.poll_transmit(&mut back_bytes, usize::MAX);
        while let Some(frame) = decoder.decode_in(&mut back, &mut back_bytes).unwrap() {
            sender.handle_frame(frame).unwrap();
        }
    }
    assert_eq!(delivered, vec![4, 5, 6], "3 was a duplicate");
    let mut retired = Vec::new();
    sender.take_retired(&mut retired);
    assert_eq!(retired, vec![3, 4, 5, 6]);
    assert!(sender
        .push_at(6, 0, OutgoingMessage::command("c", Bytes::new(), 0))
        .is_err());
}

/// Moves everything `from` has to send into `to` (`context`: the direction's stream context),
/// returning what `to` delivered (seq, body).
fn pump(from: &mut Link, to: &mut Link, context: &mut DataContext) -> Vec<(u64, Bytes)> {
    let decoder = FrameDecoder::new(Limits::default());
    let mut buf = BytesMut::new();
    from.poll_transmit(&mut buf, usize::MAX);
    let mut delivered = Vec::new();
    while let Some(frame) = decoder.decode_in(context, &mut buf).unwrap() {
        to.handle_frame(frame).unwrap();
        while let Some(message) = to.pop_delivery() {
            delivered.push((message.header.id.seq, message.body));
        }
    }
    delivered
}

#[test]
fn volatile_messages_go_ahead_of_data_unsequenced_and_die_with_the_connection() {
    let a = NodeId::from_bytes([1; 32]);
    let b = NodeId::from_bytes([2; 32]);
    let mut sender = Link::new(a, b, 1, LinkConfig::default());
    let mut receiver = Link::new(b, a, 1, LinkConfig::default());
    // Each direction's stream context, new with each connection.
    let (mut fwd, mut back) = (DataContext::new(), DataContext::new());
    let message = |body: &'static str| OutgoingMessage::command("c", Bytes::from(body), 0);
    assert_eq!(
        sender.push_volatile(message("early")),
        Err(super::link::PushError::NotConnected),
        "nothing to wait on without a connection"
    );
    sender.push(message("d1")).unwrap();
    sender.connected();
    receiver.connected();
    // The peer's resume must arrive before data is sent.
    pump(&mut receiver, &mut sender, &mut back);
    sender.push_volatile(message("v1")).unwrap();
    sender.push(message("d2")).unwrap();
    let delivered = pump(&mut sender, &mut receiver, &mut fwd);
    let order: Vec<_> = delivered
        .iter()
        .map(|(seq, body)| (*seq, body.clone()))
        .collect();
    assert_eq!(
        order,
        vec![
            (0, Bytes::from("v1")),
            (1, Bytes::from("d1")),
            (2, Bytes::from("d2"))
        ]
    );
    pump(&mut receiver, &mut sender, &mut back);
    assert_eq!(
        sender.acked_up_to(),
        2,
        "volatile messages are not in the acked sequence"
    );
    assert_eq!(sender.stats().volatile_sent, 1);
    assert_eq!(receiver.stats().volatile_received, 1);
    // A volatile message queued when the connection dies is dropped and counted, not resent.
    sender.push_volatile(message("v2")).unwrap();
    sender.disconnected();
    receiver.disconnected();
    fwd.reset();
    back.reset();
    assert_eq!(sender.stats().volatile_dropped, 2);
    sender.connected();
    receiver.connected();
    pump(&mut receiver, &mut sender, &mut back);
    assert!(pump(&mut sender, &mut receiver, &mut fwd).is_empty());
}

#[test]
fn the_volatile_queue_is_bounded() {
    let a = NodeId::from_bytes([1; 32]);
    let b = NodeId::from_bytes([2; 32]);
    let config = LinkConfig {
        volatile_messages_max: 2,
        ..LinkConfig::default()
    };
    let mut sender = Link::new(a, b, 1, config);
    sender.connected();
    for _ in 0..2 {
        sender
            .push_volatile(OutgoingMessage::command("c", Bytes::new(), 0))
            .unwrap();
    }
    assert!(!sender.has_volatile_room());
    assert_eq!(
        sender.push_volatile(OutgoingMessage::command("c", Bytes::new(), 0)),
        Err(super::link::PushError::VolatileFull(2))
    );
}

#[test]
fn withdrawn_messages_are_skipped_by_the_peer() {
    let a = NodeId::from_bytes([1; 32]);
    let b = NodeId::from_bytes([2; 32]);
    let mut sender = Link::new(a, b, 1, LinkConfig::default());
    let mut receiver = Link::new(b, a, 1, LinkConfig::default());
    // Each direction's stream context, new with each connection.
    let (mut fwd, mut back) = (DataContext::new(), DataContext::new());
    for (channel, body) in [
        ("work", "w1"),
        ("keep", "k2"),
        ("work", "w3"),
        ("keep", "k4"),
    ] {
        sender
            .push(OutgoingMessage::command(channel, Bytes::from(body), 0))
            .unwrap();
    }
    let withdrawn = sender.withdraw(|m| m.channel == "work");
    let seqs: Vec<u64> = withdrawn.iter().map(|(seq, _, _)| *seq).collect();
    assert_eq!(seqs, vec![1, 3]);
    assert_eq!(sender.queued_messages(), 2);
    sender.hold_for_withdrawal(1);
    sender.connected();
    receiver.connected();
    pump(&mut receiver, &mut sender, &mut back);
    // Held: the peer is not told to skip yet, nothing goes out (across a reconnect too).
    assert_eq!(pump(&mut sender, &mut receiver, &mut fwd), vec![]);
    sender.disconnected();
    receiver.disconnected();
    fwd.reset();
    back.reset();
    sender.connected();
    receiver.connected();
    pump(&mut receiver, &mut sender, &mut back);
    assert_eq!(pump(&mut sender, &mut receiver, &mut fwd), vec![]);
    assert_eq!(receiver.inbound().map(|s| s.1), Some(0), "no skip yet");
    sender.settle_withdrawal();
    let delivered = pump(&mut sender, &mut receiver, &mut fwd);
    assert_eq!(
        delivered,
        vec![(2, Bytes::from("k2")), (4, Bytes::from("k4"))],
        "the gaps are skipped, not waited for"
    );
    pump(&mut receiver, &mut sender, &mut back);
    assert_eq!(sender.queued_messages(), 0);
    // Nothing in flight on a live connection is taken back.
    sender
        .push(OutgoingMessage::command("work", Bytes::from("w5"), 0))
        .unwrap();
    pump(&mut sender, &mut receiver, &mut fwd);
    assert!(sender.withdraw(|_| true).is_empty());
}

/// A delayed message's retry age counts from its due time: released after a delay longer than
/// `max_age_ms`, it is not given up as too old at once; its expiry stays absolute.
#[test]
fn the_retry_age_of_a_delayed_message_counts_from_its_due_time() {
    const DAY_MS: u64 = 24 * 60 * 60 * 1000;
    let config = LinkConfig::default();
    assert_eq!(config.retry.max_age_ms, DAY_MS);
    let mut link = Link::new(
        NodeId::from_bytes([1; 32]),
        NodeId::from_bytes([2; 32]),
        7,
        config,
    );
    let body = Bytes::from_static(b"x");
    let delayed = OutgoingMessage::command("c", body.clone(), 0).with_deliver_after(2 * DAY_MS);
    let undelayed = OutgoingMessage::command("c", body, 0);
    link.push_at(1, 0, delayed).unwrap();
    link.push_at(2, 0, undelayed).unwrap();
    let given_up = link.expire(2 * DAY_MS + 60_000);
    assert_eq!(
        given_up.iter().map(|g| g.seq).collect::<Vec<_>>(),
        [2],
        "only the undelayed message is too old"
    );
    let given_up = link.expire(3 * DAY_MS + 1);
    assert_eq!(given_up.iter().map(|g| g.seq).collect::<Vec<_>>(), [1]);
}
