//! The operator endpoint: Prometheus metrics and JSON status over HTTP on loopback.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{addr, node, within};

async fn get(server: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(server).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = String::new();
    within("response", stream.read_to_string(&mut response))
        .await
        .unwrap();
    response
}

#[tokio::test]
async fn metrics_and_status_describe_the_running_node() {
    let a = node("shop").await;
    let b = node("shop").await;
    a.add_peer(addr(&b)).unwrap();
    let mut inbox = b.receive("c").unwrap();
    let receipt = a.send(b.id(), "c", &b"x"[..]).await.unwrap();
    crate::support::take_and_ack(&mut inbox, receipt).await;

    let server = weft::admin::serve(a.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let at = server.local_addr();

    let metrics = get(at, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(metrics.starts_with("HTTP/1.1 200 OK\r\n"), "{metrics}");
    let labels = format!("{{node=\"{}\",mesh=\"shop\"}}", a.id());
    assert!(
        metrics.contains(&format!("weft_messages_sent_total{labels} 1\n")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("weft_messages_acked_total{labels} 1\n")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("weft_peers_connected{labels} 1\n")),
        "{metrics}"
    );

    let status = get(at, b"GET /status HTTP/1.1\r\n\r\n").await;
    let body = status.split("\r\n\r\n").nth(1).unwrap();
    let status: serde_json::Value = serde_json::from_str(body).expect("status is JSON");
    assert_eq!(status["node_id"], a.id().to_string(), "{body}");
    assert_eq!(status["mesh"], "shop", "{body}");
    assert_eq!(
        status["peers_connected"],
        serde_json::json!([b.id().to_string()])
    );
    assert_eq!(status["metrics"]["acked"], 1, "{body}");

    assert!(get(at, b"GET /nope HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 404"));
    assert!(get(at, b"DELETE /metrics HTTP/1.1\r\n\r\n")
        .await
        .starts_with("HTTP/1.1 400"));
    let huge = vec![b'a'; 20_000];
    assert!(get(at, &huge).await.starts_with("HTTP/1.1 431"));
    server.shutdown().await;
}

/// A mesh name with quotes, a tab and a control character comes back intact in `/status` (the
/// status is JSON built by serde, not by hand).
#[tokio::test]
async fn status_is_valid_json_whatever_the_mesh_is_called() {
    let mesh = "shop \"east\"\tfloor \u{1}";
    let a = node(mesh).await;
    let server = weft::admin::serve(a.clone(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let status = get(server.local_addr(), b"GET /status HTTP/1.1\r\n\r\n").await;
    let body = status.split("\r\n\r\n").nth(1).unwrap();
    let status: serde_json::Value = serde_json::from_str(body).expect("status is JSON");
    assert_eq!(status["mesh"], mesh, "{body}");
    assert_eq!(status["peers_connected"], serde_json::json!([]));
    a.shutdown().await;
}
