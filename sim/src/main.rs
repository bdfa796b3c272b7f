//! Weft simulation (being built).
mod determinism;
mod net;

fn main() {
    let _ = (determinism::quinn_seams, net::TurmoilUdpSocket::bind);
}
