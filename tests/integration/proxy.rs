//! A UDP relay on loopback that a test can cut: the node on one side dials the relay's front
//! address, and the relay forwards datagrams to the other node and back. While cut, every
//! datagram is dropped, so the QUIC connection through it dies by idle timeout.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

pub struct Relay {
    /// Dial this instead of the target.
    pub front: SocketAddr,
    cut: Arc<AtomicBool>,
    cut_backward: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Relay {
    /// Relays between whoever sends to `front` first and `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let cut = Arc::new(AtomicBool::new(false));
        let cut_backward = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let client: Arc<tokio::sync::Mutex<Option<SocketAddr>>> = Default::default();
        let forward = {
            let (front, back, cut, dropped, client) = (
                front.clone(),
                back.clone(),
                cut.clone(),
                dropped.clone(),
                client.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, from)) = front.recv_from(&mut buf).await {
                    *client.lock().await = Some(from);
                    if cut.load(Ordering::Relaxed) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let _ = back.send_to(&buf[..n], target).await;
                }
            })
        };
        let backward = {
            let (front, back, cut, cut_backward, dropped, client) = (
                front.clone(),
                back.clone(),
                cut.clone(),
                cut_backward.clone(),
                dropped.clone(),
                client.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, _)) = back.recv_from(&mut buf).await {
                    if cut.load(Ordering::Relaxed) || cut_backward.load(Ordering::Relaxed) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    if let Some(client) = *client.lock().await {
                        let _ = front.send_to(&buf[..n], client).await;
                    }
                }
            })
        };
        Self {
            front: front.local_addr().unwrap(),
            cut,
            cut_backward,
            dropped,
            tasks: vec![forward, backward],
        }
    }

    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }

    /// Drops only what the target sends back (its acknowledgements, say).
    pub fn cut_backward(&self, cut: bool) {
        self.cut_backward.store(cut, Ordering::Relaxed);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
