//! The wire protocol between a site and its targets (DP agents and child sites):
//! the pushing client ([`client::TargetClient`], reqwest) and the receiving service
//! ([`service::router`], axum), with the message formats they share ([`wire`]).
//!
//! **API Boundary:** the service checks everything that can be checked without
//! knowing the receiver's storage — authentication, body sizes, manifest decoding and
//! validation, chunk decompression and BLAKE3 verification, path rules on downloads —
//! before it calls the [`service::Receiver`] implementation. A receiver therefore never
//! sees an unverified chunk or an invalid path.
//!
//! The protocol is documented in `docs/protocol.md`.

pub mod bundle;
pub mod client;
pub mod listen;
pub mod peer;
pub mod service;
pub mod trust;
pub mod wire;
