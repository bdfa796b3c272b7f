//! The README's first code block, as code that compiles: the first thing a reader copies must
//! build. A test keeps the block and this file the same.

use weft::NodeId;

/// The README's first code block, verbatim between the markers. Compiled, never run: it binds a
/// public port and dials a placeholder address.
#[allow(dead_code, unused_variables, unused_mut)]
#[rustfmt::skip] // aligned as in the README
async fn readme_tour(
    points_id: NodeId,
    body: &'static str,
    sku: &'static str,
    job: &'static str,
) -> anyhow::Result<()> {
    // README begin
    let node = weft::Node::builder()
        .mesh("shop")
        .data_dir("./var/orders")            // identity key (created on first start)
        .bind("0.0.0.0:7450".parse()?)
        .start()
        .await?;
    node.add_peer("<node id>@10.0.0.7:7450".parse()?)?;
    let receipt = node.send(points_id, "points/grant", body).await?;   // waits only for queue room
    receipt.await?;                                                    // the peer has it
    let mut inbox = node.receive("points/grant")?;                    // a Stream of messages

    let mut orders = node.subscribe("orders/*").await?;               // PUB/SUB, wildcards
    let mut billing = node.subscribe_durable("billing", "orders/*").await?; // gets what it missed
    let published = node.publish("orders/created", body).await?;      // to every subscriber, acked
    let price = node.request("pricing", sku)                           // REQ/REP (.to(id): DEALER/ROUTER)
        .timeout(std::time::Duration::from_millis(500))
        .await?;
    let mut requests = node.serve("pricing").await?;                  // requests.recv()?.reply(..)
    node.push("thumbnails", job).await?;                              // PUSH/PULL: one worker each
    let mut jobs = node.pull("thumbnails").await?;                    // competing consumers, credit
    // README end
    Ok(())
}

/// The lines between the markers above, without the function's indentation.
fn tour() -> Vec<String> {
    let source = include_str!("readme.rs");
    let begin = "    // README begin\n";
    let start = source.find(begin).expect("begin marker") + begin.len();
    let len = source[start..]
        .find("    // README end")
        .expect("end marker");
    source[start..start + len]
        .lines()
        .map(|line| line.strip_prefix("    ").unwrap_or(line).to_owned())
        .collect()
}

/// The README's first `rust` block.
fn readme() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let begin = "```rust\n";
    let start = readme.find(begin).expect("a rust block") + begin.len();
    let len = readme[start..].find("```").expect("its end");
    readme[start..start + len]
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readme_tour_is_this_code() {
    let (tour, readme) = (tour(), readme());
    assert!(readme.len() > 5, "the README's first block has code");
    assert_eq!(
        tour, readme,
        "README.md's first code block and examples/tests/readme.rs differ"
    );
}
