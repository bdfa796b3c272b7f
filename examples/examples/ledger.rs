//! A ledger sharded by account id: a teller node pushes each account's entries to the `ledger`
//! queue keyed by the account, and three bookkeeper nodes pull from it. Each account is owned by
//! one live bookkeeper (rendezvous hashing), which keeps its running balance. Half-way through,
//! one bookkeeper leaves: its accounts move to the others, and every account's entries are still
//! applied in the order the teller made them (the new owner starts an account only after the
//! old owner acknowledged what it had of it). An entry the leaving bookkeeper had taken but not
//! acknowledged is delivered again to the new owner, which recognises it by its position and
//! skips it: at-least-once delivery, exactly-once bookkeeping.
//!
//! Everything stays on 127.0.0.1. Run: `cargo run -p weft-examples --example ledger`

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use weft::{Identity, Node, Puller};

#[derive(Serialize, Deserialize, Debug, Clone, Copy)]
struct Entry {
    account: u32,
    /// Position of this entry among its account's entries, from 0.
    n: u32,
    cents: i64,
}

const ACCOUNTS: u32 = 6;
const ENTRIES_PER_ACCOUNT: u32 = 20;

/// Per account: (entries applied, balance, who applied the last one).
type Books = Arc<Mutex<BTreeMap<u32, (u32, i64, String)>>>;

async fn start(name: &str) -> Result<Node> {
    let node = Node::builder()
        .mesh("ledger")
        .identity(Identity::generate()?)
        .bind("127.0.0.1:0".parse()?)
        // A bookkeeper that left has its unacknowledged entries given to the others after 1 s.
        .configure(|c| c.patterns.work_reassign_after = Duration::from_secs(1))
        .start()
        .await?;
    println!("{name:>12} is {}", node.id().short());
    Ok(node)
}

/// A bookkeeper: applies each entry to its account, checking that it is the account's next one.
async fn keep_books(
    name: String,
    mut ledger: Puller,
    books: Books,
    done: mpsc::UnboundedSender<()>,
) -> Result<()> {
    while let Some(message) = ledger.recv().await {
        let entry: Entry = weft::decode(&message.body).context("a ledger entry")?;
        let mut books = books.lock().expect("books lock");
        let (applied, balance, last) = books.entry(entry.account).or_insert((0, 0, String::new()));
        if entry.n < *applied {
            println!(
                "{name:>12}: account {} entry {:>2} again (redelivered after a move): skipped",
                entry.account, entry.n
            );
            continue;
        }
        if entry.n != *applied {
            bail!(
                "account {}: entry {} arrived when {} were applied",
                entry.account,
                entry.n,
                applied
            );
        }
        if *last != name && !last.is_empty() {
            println!("account {} moves from {last} to {name}", entry.account);
        }
        *applied += 1;
        *balance += entry.cents;
        *last = name.clone();
        println!(
            "{name:>12}: account {} entry {:>2}: {:+6} -> balance {:+7}",
            entry.account, entry.n, entry.cents, balance
        );
        let _ = done.send(());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let teller = start("teller").await?;
    let names = ["bookkeeper-a", "bookkeeper-b", "bookkeeper-c"];
    let mut keepers = Vec::new();
    for name in names {
        keepers.push(start(name).await?);
    }
    for keeper in &keepers {
        teller.add_peer(keeper.addr()?)?;
        tokio::time::timeout(Duration::from_secs(10), teller.connected(keeper.id()))
            .await
            .context("connecting")??;
    }
    let books: Books = Arc::default();
    let (done, mut applied) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for (name, keeper) in names.iter().zip(&keepers) {
        let puller = keeper.pull("ledger").await?;
        tasks.push(tokio::spawn(keep_books(
            name.to_string(),
            puller,
            Arc::clone(&books),
            done.clone(),
        )));
    }
    let total = ACCOUNTS * ENTRIES_PER_ACCOUNT;
    let mut expected: BTreeMap<u32, i64> = BTreeMap::new();
    for i in 0..total {
        let entry = Entry {
            account: i % ACCOUNTS,
            n: i / ACCOUNTS,
            cents: (i64::from(i) * 37 % 200) - 100,
        };
        *expected.entry(entry.account).or_default() += entry.cents;
        teller
            .push_keyed(
                "ledger",
                entry.account.to_le_bytes().to_vec(),
                weft::encode(&entry)?,
            )
            .await?;
        if i == total / 2 {
            println!("bookkeeper-c leaves; its accounts move to the others");
            keepers.pop().expect("three keepers").shutdown().await;
        }
    }
    // Every entry applied once (a bookkeeper that finds one out of order stops, and this times
    // out).
    for _ in 0..total {
        tokio::time::timeout(Duration::from_secs(30), applied.recv())
            .await
            .context("entries not all applied in time")?
            .context("every bookkeeper stopped")?;
    }
    println!("\nfinal balances:");
    for (account, (applied, balance, last)) in books.lock().expect("books lock").iter() {
        println!("  account {account}: {balance:+7} after {applied} entries (last kept by {last})");
        if expected.get(account) != Some(balance) {
            bail!(
                "account {account}: balance {balance}, expected {:?}",
                expected.get(account)
            );
        }
    }
    for task in tasks {
        task.abort();
        // A bookkeeper that stopped on its own (the one that left) must not have failed.
        if let Ok(result) = task.await {
            result?;
        }
    }
    teller.shutdown().await;
    for keeper in keepers {
        keeper.shutdown().await;
    }
    Ok(())
}
