//! Integration tests of Weft over real QUIC on loopback live in integration/.
