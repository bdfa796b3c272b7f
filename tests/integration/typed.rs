//! Typed bodies on the consuming side: `recv_typed` on an inbox, a subscription and a puller
//! (which is also a `Stream`), and a body of another type handed back with its message.

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::support::{mesh_with, within};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Order {
    id: u32,
    item: String,
}

fn order(id: u32) -> Order {
    Order {
        id,
        item: format!("sku-{id}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_arrive_typed_on_every_consuming_handle_and_a_wrong_type_is_handed_back() {
    let nodes = mesh_with("typed", 2, |_| {}).await;
    let (a, b) = (&nodes[0], &nodes[1]);

    // Point to point: a typed body, then one that is not an `Order`.
    let mut inbox = b.receive("orders").unwrap();
    let _ = a.send_typed(b.id(), "orders", &order(1)).await.unwrap();
    let _ = a.send(b.id(), "orders", vec![0xff; 3]).await.unwrap();
    let typed = within("typed", inbox.recv_typed::<Order>())
        .await
        .unwrap()
        .expect("an Order");
    assert_eq!(typed.value, order(1));
    assert_eq!(typed.message.header.channel.as_str(), "orders");
    let wrong = within("not an order", inbox.recv_typed::<Order>())
        .await
        .unwrap()
        .expect_err("three 0xff bytes are no Order");
    assert_eq!(&wrong.message.body[..], &[0xff; 3], "handed back whole");

    // Pub/sub.
    let mut subscription = within("subscribe", b.subscribe("orders/*")).await.unwrap();
    let _ = a.publish_typed("orders/new", &order(2)).await.unwrap();
    let event = within("typed event", subscription.recv_typed::<Order>())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(event.value, order(2));
    assert_eq!(event.message.header.channel.as_str(), "orders/new");

    // Work queues: typed, and the puller as a stream.
    let mut puller = within("pull", b.pull("jobs")).await.unwrap();
    within("worker known", a.wait_for_workers("jobs", 1))
        .await
        .unwrap();
    for id in [3, 4] {
        a.push("jobs", weft::encode(&order(id)).unwrap())
            .await
            .unwrap();
    }
    let item = within("typed item", puller.recv_typed::<Order>())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(item.value, order(3));
    let next = within("the next item from the stream", puller.next())
        .await
        .expect("the node runs");
    assert_eq!(next.header.channel.as_str(), "jobs");
    assert_eq!(weft::decode::<Order>(&next.body).unwrap(), order(4));
    // Requests and replies, typed end to end; a reply of another type comes back with it.
    let mut service = within("serve", b.serve("orders")).await.unwrap();
    within("service known", a.wait_for_service("orders", 1))
        .await
        .unwrap();
    let server = tokio::spawn(async move {
        let request = service.recv().await.unwrap();
        let asked: Order = request.decode().unwrap();
        request.reply_typed(&order(asked.id + 100)).await.unwrap();
        let request = service.recv().await.unwrap();
        request.reply(vec![0xff; 3]).await.unwrap();
    });
    let reply = within(
        "typed reply",
        a.request_typed("orders", &order(5)).reply_as::<Order>(),
    )
    .await
    .unwrap();
    assert_eq!(reply.value, order(105));
    assert_eq!(reply.message.header.id.producer, b.id());
    let wrong = within(
        "a reply of another type",
        a.request_typed("orders", &order(6)).reply_as::<Order>(),
    )
    .await
    .expect_err("three 0xff bytes are no Order");
    assert!(
        matches!(&wrong, weft::RequestError::Reply(undecodable) if undecodable.message.body[..] == [0xff; 3]),
        "{wrong:?}"
    );
    within("server", server).await.unwrap();
    for node in &nodes {
        node.shutdown().await;
    }
}
