//! The transactional outbox, processed exactly once. An order service writes each order and its
//! outbox row in one SQLite transaction; a relay sends the unsent rows to the billing node, each
//! with the row's id as its idempotency key, and marks a row sent once billing acknowledged it.
//!
//! Half-way through, the order service crashes between "billing acknowledged row N" and "row N
//! marked sent" (the window every outbox has). After its restart the relay finds row N unsent
//! and sends it again — a *new* message, which message-id deduplication cannot recognise — and
//! the billing node drops it by its key: every order is billed once. Billing restarts too (its
//! window of keys is persisted in its spool), and a third copy of row N, sent after that, is
//! dropped as well.
//!
//! Everything stays on 127.0.0.1 and in a temporary directory.
//! Run: `cargo run -p weft-examples --example outbox`

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use weft::{Inbox, MessageOptions, Node, NodeAddr};

const ORDERS: u32 = 8;
/// The relay "crashes" after billing acknowledged this row and before marking it sent.
const CRASH_AFTER_ROW: i64 = 4;

#[derive(Serialize, Deserialize, Debug)]
struct Order {
    id: u32,
    cents: i64,
}

/// Opens the order service's database (creating its tables).
fn open_db(path: &Path) -> Result<Connection> {
    let db = Connection::open(path).context("open the orders database")?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, cents INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS outbox (
             row INTEGER PRIMARY KEY AUTOINCREMENT,
             payload BLOB NOT NULL,
             sent INTEGER NOT NULL DEFAULT 0);",
    )?;
    Ok(db)
}

/// Places an order: the order and its outbox row commit together, or neither does.
fn place_order(db: &mut Connection, order: &Order) -> Result<()> {
    let tx = db.transaction()?;
    tx.execute(
        "INSERT INTO orders (id, cents) VALUES (?1, ?2)",
        params![order.id, order.cents],
    )?;
    tx.execute(
        "INSERT INTO outbox (payload) VALUES (?1)",
        params![weft::encode(order)?.to_vec()],
    )?;
    tx.commit()?;
    Ok(())
}

/// What the relay did.
enum Relayed {
    /// Every unsent row was sent and marked.
    AllSent(usize),
    /// It stopped (crashed) after billing acknowledged `row`, before marking it sent.
    CrashedAfter(i64),
}

/// Sends every unsent row, oldest first, keyed by its row id; marks a row sent once billing
/// acknowledged it. With `crash_after`, stops right after that row's acknowledgement.
async fn relay(
    db: &Connection,
    node: &Node,
    billing: weft::NodeId,
    crash_after: Option<i64>,
) -> Result<Relayed> {
    let rows: Vec<(i64, Vec<u8>)> = db
        .prepare("SELECT row, payload FROM outbox WHERE sent = 0 ORDER BY row")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    for (row, payload) in &rows {
        let options = MessageOptions::new().idempotency_key(format!("outbox/{row}"));
        let receipt = node
            .send_with(billing, "billing", payload.clone(), &options)
            .await?;
        tokio::time::timeout(Duration::from_secs(10), receipt)
            .await
            .context("billing acknowledges")??;
        if crash_after == Some(*row) {
            return Ok(Relayed::CrashedAfter(*row));
        }
        db.execute("UPDATE outbox SET sent = 1 WHERE row = ?1", params![row])?;
    }
    Ok(Relayed::AllSent(rows.len()))
}

/// Bills what arrives, until `until` orders are billed; every order once.
async fn bill(inbox: &mut Inbox, billed: &mut BTreeMap<u32, i64>, until: usize) -> Result<()> {
    while billed.len() < until {
        let message = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
            .await
            .context("the next order")?
            .context("billing's node stopped")?;
        let order: Order = weft::decode(&message.body)?;
        let key = message
            .header
            .idempotency_key()
            .cloned()
            .unwrap_or_default();
        if billed.insert(order.id, order.cents).is_some() {
            bail!("order {} billed twice", order.id);
        }
        println!(
            "     billing: order {} billed, {} cents (key {})",
            order.id,
            order.cents,
            String::from_utf8_lossy(&key)
        );
    }
    inbox.settle();
    Ok(())
}

async fn start(dir: &Path, bind: SocketAddr) -> Result<Node> {
    Node::builder()
        .mesh("outbox")
        .data_dir(dir)
        .bind(bind)
        .configure(|c| {
            c.reconnect_initial = Duration::from_millis(20);
            c.reconnect_max = Duration::from_millis(200);
        })
        .start()
        .await
        .with_context(|| format!("start a node in {}", dir.display()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let root = tempdir()?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let billing = start(&root.join("billing"), loopback).await?;
    let billing_addr = billing.local_addr()?;
    let mut inbox = billing.receive("billing")?;
    let orders_dir = root.join("orders");
    let mut db = open_db(&root.join("orders.sqlite"))?;
    for id in 1..=ORDERS {
        place_order(
            &mut db,
            &Order {
                id,
                cents: 1_000 + i64::from(id),
            },
        )?;
    }
    println!("order service: {ORDERS} orders and their outbox rows committed");

    let orders = start(&orders_dir, loopback).await?;
    orders.add_peer(NodeAddr::new(billing.id(), billing_addr))?;
    let billing_task = async move {
        let mut billed = BTreeMap::new();
        bill(&mut inbox, &mut billed, CRASH_AFTER_ROW as usize).await?;
        Ok::<_, anyhow::Error>((inbox, billed))
    };
    let (relayed, billing_side) = tokio::join!(
        relay(&db, &orders, billing.id(), Some(CRASH_AFTER_ROW)),
        billing_task
    );
    let Relayed::CrashedAfter(row) = relayed? else {
        bail!("the relay was to stop after row {CRASH_AFTER_ROW}")
    };
    let (mut inbox, mut billed_now) = billing_side?;
    println!("order service: crashed after billing acknowledged row {row}, before marking it sent");
    orders.shutdown().await;
    drop(orders);

    // The restarted service finds row 4 unsent and sends it again: billing drops it by its key.
    let orders = start(&orders_dir, loopback).await?;
    orders.add_peer(NodeAddr::new(billing.id(), billing_addr))?;
    let (relayed, billed_rest) = tokio::join!(
        relay(&db, &orders, billing.id(), None),
        bill(&mut inbox, &mut billed_now, ORDERS as usize)
    );
    billed_rest?;
    let Relayed::AllSent(sent) = relayed? else {
        bail!("the relay was to send everything")
    };
    println!("order service: restarted, sent {sent} rows (row {row} again)");
    let repeats = billing.metrics().idempotent_repeats;
    ensure!(
        repeats == 1,
        "billing dropped {repeats} repeats, expected 1"
    );
    println!("     billing: dropped {repeats} repeat of an idempotency key");

    // Billing restarts; a third copy of row 4 (a relay replaying its whole outbox, say) is
    // still recognised: the key was persisted before its first message was acknowledged.
    drop(inbox);
    billing.shutdown().await;
    drop(billing);
    let billing = start(&root.join("billing"), billing_addr).await?;
    let mut inbox = billing.receive("billing")?;
    db.execute("UPDATE outbox SET sent = 0 WHERE row = ?1", params![row])?;
    let Relayed::AllSent(1) = relay(&db, &orders, billing.id(), None).await? else {
        bail!("one row to send again")
    };
    let marker = orders
        .send(billing.id(), "billing", b"end".to_vec())
        .await?;
    let next = tokio::time::timeout(Duration::from_secs(10), inbox.recv())
        .await?
        .context("billing's node stopped")?;
    ensure!(
        &next.body[..] == b"end",
        "row {row} was handed on again after billing's restart"
    );
    inbox.settle();
    tokio::time::timeout(Duration::from_secs(10), marker).await??;
    ensure!(
        billing.metrics().idempotent_repeats == 1,
        "the repeat after the restart was dropped"
    );
    println!("     billing: restarted; row {row} sent a third time, dropped again");

    let total: i64 = billed_now.values().sum();
    ensure!(billed_now.len() == ORDERS as usize, "every order billed");
    println!("done: {ORDERS} orders billed exactly once, {total} cents in all");
    orders.shutdown().await;
    billing.shutdown().await;
    let _ = std::fs::remove_dir_all(&root);
    Ok(())
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("weft-outbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
