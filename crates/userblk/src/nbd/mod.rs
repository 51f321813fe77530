//! The NBD protocol: a server that exports any target (a frontend), and a
//! client that makes any NBD server a target.
//!
//! Layers, lowest first (imports only go downward):
//! - [`proto`]: wire constants from the specification;
//!   [`wire`]: the transmission phase's message layouts both sides share.
//! - [`client`]: the client side, used by the nbd target
//!   ([`crate::targets::nbd`]); it knows nothing of the server.
//! - [`server`]: the frontend: listening sockets, one thread and one ring per
//!   connection, with the server's side of option haggling
//!   ([`server::handshake`]) and request parsing and reply encoding
//!   ([`server::transmission`]).

pub mod client;
pub mod proto;
pub mod server;
pub mod wire;
