//! An operator endpoint: `GET /metrics` in the Prometheus text format and `GET /status` as JSON,
//! over plain HTTP/1.1 on an address you choose (bind it to loopback or a management network).
//!
//! It is deliberately tiny — no HTTP library — and bounded: requests over
//! [`REQUEST_BYTES_MAX`] are refused, a client gets [`REQUEST_TIMEOUT`] to send its request, at
//! most [`CONNECTIONS_MAX`] are served at once, and every response closes its connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, info};

use crate::node::Node;

/// Largest request (line and headers) read.
pub const REQUEST_BYTES_MAX: usize = 8 * 1024;
/// How long a client has to send its request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
pub const CONNECTIONS_MAX: usize = 16;

/// A running endpoint. Stops on [`AdminServer::shutdown`] or when dropped.
#[derive(Debug)]
pub struct AdminServer {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl AdminServer {
    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for the listener task.
    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Serves `node`'s metrics and status on `addr`.
pub async fn serve(node: Node, addr: SocketAddr) -> std::io::Result<AdminServer> {
    let listener = TcpListener::bind(addr).await?;
    let local_addr = listener.local_addr()?;
    let (stop, mut stopped) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    info!(%local_addr, "serving /metrics and /status");
    let task = tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                biased;
                _ = stopped.wait_for(|stop| *stop) => return,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                biased;
                _ = stopped.wait_for(|stop| *stop) => return,
                accepted = listener.accept() => accepted,
            };
            let Ok((stream, peer)) = accepted else {
                continue;
            };
            let node = node.clone();
            tokio::spawn(async move {
                if let Err(e) = respond(stream, &node).await {
                    debug!(%peer, error = %e, "admin request failed");
                }
                drop(permit);
            });
        }
    });
    Ok(AdminServer {
        local_addr,
        stop,
        task: Some(task),
    })
}

async fn respond(mut stream: TcpStream, node: &Node) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let complete = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        loop {
            if request.windows(4).any(|w| w == b"\r\n\r\n") {
                return true;
            }
            if request.len() > REQUEST_BYTES_MAX {
                return false;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => request.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or(false);
    let (status, content_type, body) = if !complete {
        if request.len() > REQUEST_BYTES_MAX {
            (
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n".to_owned(),
            )
        } else {
            (
                "400 Bad Request",
                "text/plain",
                "incomplete request\n".to_owned(),
            )
        }
    } else {
        let line = request.split(|b| *b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split(' ');
        match (parts.next(), parts.next()) {
            (Some("GET"), Some("/metrics")) => {
                ("200 OK", "text/plain; version=0.0.4", metrics_text(node))
            }
            (Some("GET"), Some("/status")) => ("200 OK", "application/json", status_json(node)),
            (Some("GET"), Some(_)) => (
                "404 Not Found",
                "text/plain",
                "try /metrics or /status\n".to_owned(),
            ),
            _ => (
                "400 Bad Request",
                "text/plain",
                "only GET /metrics and GET /status\n".to_owned(),
            ),
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// The node's counters in the Prometheus text format, labelled with node id and mesh.
pub fn metrics_text(node: &Node) -> String {
    let id = node.id().to_string();
    node.metrics()
        .to_prometheus(&[("node", &id), ("mesh", &node.config().mesh)])
}

/// The node's status as a JSON object: id, mesh, address, connected peers, counters.
pub fn status_json(node: &Node) -> String {
    #[derive(serde::Serialize)]
    struct Status<'a> {
        node_id: String,
        mesh: &'a str,
        addr: Option<String>,
        peers_connected: Vec<String>,
        metrics: crate::MetricsSnapshot,
    }
    let status = Status {
        node_id: node.id().to_string(),
        mesh: &node.config().mesh,
        addr: node.local_addr().ok().map(|a| a.to_string()),
        peers_connected: node
            .connected_peers()
            .iter()
            .map(|p| p.to_string())
            .collect(),
        metrics: node.metrics(),
    };
    serde_json::to_string(&status).expect("strings and integers serialize")
}
