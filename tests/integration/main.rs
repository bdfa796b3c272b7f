//! Integration tests over real QUIC on 127.0.0.1. One test binary, one module per area.

mod support;

mod admin;
mod admission;
mod crash;
mod delay;
mod discovery;
mod discovery_admission;
mod discovery_interop;
mod durability;
mod durable_subs;
mod gossip;
mod hostile;
mod options;
mod p2p;
mod patterns;
mod priority;
mod proxy;
mod publish_batch;
mod reliability;
mod typed;
