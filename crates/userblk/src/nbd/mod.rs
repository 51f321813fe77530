//! The NBD protocol: a server that exports any target (a frontend), and a
//! client that makes any NBD server a target.
//!
//! - [`proto`]: wire constants from the specification.
//! - [`handshake`]: the server's side of option haggling.
//! - [`transmission`]: request parsing and reply encoding.
//! - [`server`]: listening sockets, one thread and one ring per connection.
//! - [`client`]: the client side, used by the nbd target.

pub mod client;
pub mod handshake;
pub mod proto;
pub mod server;
pub mod transmission;
