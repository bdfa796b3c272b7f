//! Throughput on the real file system, for orientation (ignored by default; run with
//! `cargo test --release -p weft-spool --test throughput -- --ignored --nocapture`). The real
//! benchmark is `weft bench spool`; this only shows that append + sync batches well.

use std::time::Instant;

use weft_spool::{FsStorage, Spool, SpoolConfig};

fn run(label: &str, count: u64, batch: u64) {
    let dir = std::env::temp_dir().join(format!("weft-spool-throughput-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut spool, _) =
        Spool::open(FsStorage::open(&dir).expect("dir"), SpoolConfig::default()).expect("open");
    let payload = [0x5a; 64];
    let started = Instant::now();
    let mut acked = 0;
    for i in 1..=count {
        let seq = spool.append(&payload).expect("append");
        if i % batch == 0 {
            spool.sync().expect("sync");
            // Acks arrive: retire what was accepted a while ago, so segments are deleted.
            acked += spool
                .retire_up_to(seq.saturating_sub(4 * batch))
                .expect("retire");
        }
    }
    spool.sync().expect("sync");
    let elapsed = started.elapsed();
    eprintln!(
        "{label}: {count} x 64 B, sync every {batch}: {:.0} msgs/s ({:.1} MB/s of payload), {acked} retired",
        count as f64 / elapsed.as_secs_f64(),
        count as f64 * 64.0 / elapsed.as_secs_f64() / 1e6,
    );
    drop(spool);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "a measurement, not a check; run in release"]
fn append_and_sync_throughput() {
    run("group commit", 2_000_000, 10_000);
    run("group commit", 1_000_000, 1_000);
    run("fsync per message", 2_000, 1);
}
