//! A small shop on one machine: five nodes on loopback using the messaging patterns.
//!
//! - `orders` publishes `orders/created` events; `points` and `mail` subscribe (pub/sub);
//! - `orders` asks `pricing` for a price before taking each order (request/response);
//! - `orders` pushes a thumbnail job per order to the `thumbnails` queue, which `points` and
//!   `mail` also work on as competing workers (push/pull: each job to exactly one of them);
//! - `shipping` subscribes to `orders/*` and publishes `shipping/delivered`, which `orders`
//!   subscribes to: its view of each order becomes eventually consistent.
//!
//! Everything stays on 127.0.0.1. Run: `cargo run -p weft-examples --example shop`

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use weft::{Identity, Node};

#[derive(Serialize, Deserialize, Debug, Clone)]
struct OrderCreated {
    id: u32,
    sku: String,
    cents: u64,
}

#[derive(Serialize, Deserialize, Debug)]
struct Delivered {
    id: u32,
}

const ORDERS: u32 = 5;

async fn start(name: &str) -> Result<Node> {
    let node = Node::builder()
        .mesh("shop")
        .identity(Identity::generate()?)
        .bind("127.0.0.1:0".parse()?)
        .start()
        .await?;
    println!("{name:>8} is {}", node.id().short());
    Ok(node)
}

#[tokio::main]
async fn main() -> Result<()> {
    let orders = start("orders").await?;
    let pricing = start("pricing").await?;
    let points = start("points").await?;
    let mail = start("mail").await?;
    let shipping = start("shipping").await?;
    let all = [&orders, &pricing, &points, &mail, &shipping];
    // A full mesh (in production mDNS or seeds do this).
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            a.add_peer(b.addr()?)?;
        }
    }
    for node in all {
        tokio::time::timeout(Duration::from_secs(10), node.wait_for_peers(all.len() - 1))
            .await
            .context("the nodes did not connect")??;
    }

    // pricing: an RPC service.
    let mut quotes = pricing.serve("pricing").await?;
    tokio::spawn(async move {
        while let Some(request) = quotes.recv().await {
            let sku: String = request.decode().unwrap_or_default();
            let cents = 10 * sku.bytes().map(u64::from).sum::<u64>();
            let _ = request.reply_typed(&cents).await;
        }
    });

    // points and mail: subscribers of new orders, and competing thumbnail workers.
    let mut tasks = Vec::new();
    for (name, node) in [("points", &points), ("mail", &mail)] {
        let mut created = node.subscribe("orders/created").await?;
        tasks.push(tokio::spawn(async move {
            for _ in 0..ORDERS {
                let Some(event) = created.recv().await else {
                    return;
                };
                if let Ok(order) = weft::decode::<OrderCreated>(&event.body) {
                    let action = if name == "points" {
                        "grants points for"
                    } else {
                        "emails about"
                    };
                    println!(
                        "{name:>8} {action} order {} ({} cents)",
                        order.id, order.cents
                    );
                }
            }
        }));
    }
    for (name, node) in [("points", points.clone()), ("mail", mail.clone())] {
        let mut jobs = node.pull("thumbnails").await?;
        tokio::spawn(async move {
            while let Some(job) = jobs.recv().await {
                println!(
                    "{name:>8} renders thumbnail {}",
                    String::from_utf8_lossy(&job.body)
                );
            }
        });
    }

    // shipping: delivers every created order, then says so.
    let mut to_ship = shipping.subscribe("orders/*").await?;
    let shipper = shipping.clone();
    tokio::spawn(async move {
        while let Some(event) = to_ship.recv().await {
            if let Ok(order) = weft::decode::<OrderCreated>(&event.body) {
                let _ = shipper
                    .publish_typed("shipping/delivered", &Delivered { id: order.id })
                    .await;
            }
        }
    });
    let mut delivered = orders.subscribe("shipping/delivered").await?;

    // orders: price, take, announce and hand out work for each order.
    let mut state = BTreeMap::new();
    for id in 1..=ORDERS {
        let sku = format!("sku-{id}");
        let reply = orders
            .request_typed("pricing", &sku)
            .timeout(Duration::from_secs(2))
            .await?;
        let cents: u64 = weft::decode(&reply.body)?;
        let order = OrderCreated { id, sku, cents };
        println!(
            "{:>8} takes order {id}: {} at {cents} cents",
            "orders", order.sku
        );
        state.insert(id, "created");
        let published = orders.publish_typed("orders/created", &order).await?;
        // Reliable: every subscriber acknowledges (points, mail and shipping).
        published.delivered().await?;
        orders.push("thumbnails", format!("order-{id}.png")).await?;
    }
    // Eventually consistent: every order ends up delivered.
    while state.values().any(|s| *s != "delivered") {
        let event = tokio::time::timeout(Duration::from_secs(10), delivered.recv())
            .await
            .context("shipping did not report every delivery")?
            .context("node stopped")?;
        let Delivered { id } = weft::decode(&event.body)?;
        state.insert(id, "delivered");
        println!("{:>8} sees order {id} delivered", "orders");
    }
    for task in tasks {
        task.await?;
    }
    println!("all {ORDERS} orders priced, announced, rendered and delivered");
    for node in all {
        node.shutdown().await;
    }
    Ok(())
}
