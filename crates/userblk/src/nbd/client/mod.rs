//! NBD client: connect to a server, negotiate, send requests, match replies.
//!
//! - [`NbdUri`]: `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`.
//! - [`connect`]: open the socket and run the fixed-newstyle handshake
//!   ([`negotiate`]): `NBD_OPT_GO` asking for block sizes, falling back to
//!   `NBD_OPT_EXPORT_NAME` on servers that do not know `GO`.
//! - [`encode_request`], [`read_reply`]: the transmission phase's wire format
//!   (simple replies only; structured replies are never negotiated here).
//! - [`status`]: a second kind of connection, with structured replies and
//!   `base:allocation`, for block status.
//!
//! Everything read from the server is bounded before anything is allocated
//! for it, so a hostile server gets an error, not a panic or a huge buffer.
//! The multiplexing of many requests on one connection, and reconnecting,
//! live in [`crate::targets::nbd`].

mod error;
mod handshake;
pub mod status;
mod stream;
mod uri;
mod wire;

pub use error::{io_error, ClientError};
pub use handshake::{connect, handshake, negotiate, BlockSizes, ExportInfo};
pub use stream::{connect_socket, Stream};
pub use uri::{Addr, NbdUri, UnixPath, UriError, DEFAULT_PORT};
pub use wire::{command, encode_request, read_reply, Reply};

use error::sanitize;
use handshake::{greet, opt_go, read_option_reply, send_option};
use wire::{read_array, read_u32};

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
