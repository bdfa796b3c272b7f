//! Quickstart: three nodes on loopback exchange acknowledged messages.
//!
//! `orders` sends commands to `points` and `mail`; each prints what it receives, and `orders`
//! prints each receipt (the receiver's acknowledgement). Everything stays on 127.0.0.1.
//!
//! Run: `cargo run -p weft-examples --example quickstart`

use anyhow::Result;
use serde::{Deserialize, Serialize};
use weft::{Identity, Node};

#[derive(Serialize, Deserialize, Debug)]
struct GrantPoints {
    user: String,
    points: u32,
}

async fn start(name: &str) -> Result<Node> {
    let node = Node::builder()
        .mesh("shop")
        .identity(Identity::generate()?)
        .bind("127.0.0.1:0".parse()?)
        .start()
        .await?;
    println!(
        "{name:>6} is {} at {}",
        node.id().short(),
        node.local_addr()?
    );
    Ok(node)
}

/// Prints `count` messages arriving on `channel`, decoded as `GrantPoints`.
fn consume(
    name: &'static str,
    node: &Node,
    channel: &str,
    count: usize,
) -> Result<tokio::task::JoinHandle<()>> {
    let mut inbox = node.receive(channel)?;
    Ok(tokio::spawn(async move {
        for _ in 0..count {
            let Some(message) = inbox.recv().await else {
                return;
            };
            match weft::decode::<GrantPoints>(&message.body) {
                Ok(grant) => println!(
                    "{name:>6} got  {:?} #{} from {}: {grant:?}",
                    message.header.channel,
                    message.header.id.seq,
                    message.header.id.producer.short()
                ),
                Err(e) => println!("{name:>6} got an undecodable body: {e}"),
            }
        }
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let orders = start("orders").await?;
    let points = start("points").await?;
    let mail = start("mail").await?;
    // The receivers open their channels first; messages sent earlier would wait for them anyway.
    let points_done = consume("points", &points, "points/grant", 3)?;
    let mail_done = consume("mail", &mail, "mail/send", 2)?;

    orders.add_peer(points.addr()?)?;
    orders.add_peer(mail.addr()?)?;

    let mut receipts = Vec::new();
    for (user, n) in [("ada", 10), ("bob", 5), ("cy", 7)] {
        let grant = GrantPoints {
            user: user.into(),
            points: n,
        };
        receipts.push(
            orders
                .send_typed(points.id(), "points/grant", &grant)
                .await?,
        );
    }
    for user in ["ada", "bob"] {
        let note = GrantPoints {
            user: user.into(),
            points: 0,
        };
        receipts.push(orders.send_typed(mail.id(), "mail/send", &note).await?);
    }
    for receipt in receipts {
        let delivered = receipt.await?;
        println!(
            "orders receipt: {} acknowledged by {}",
            delivered.id,
            delivered.peer.short()
        );
    }
    points_done.await?;
    mail_done.await?;
    let metrics = orders.metrics();
    println!(
        "orders sent {} messages, {} acknowledged",
        metrics.sent, metrics.acked
    );
    for node in [orders, points, mail] {
        node.shutdown().await;
    }
    Ok(())
}
