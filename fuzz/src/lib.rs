//! What the NBD fuzz targets share: a client's side of the wire, the
//! parsers that check what the server sent back, and the seed corpus.
//!
//! - [`wire`]: building client messages (options, request headers).
//! - [`replies`]: reading option replies and structured reply chunks.
//! - [`caps`]: target capabilities drawn from fuzz input.
//! - [`seeds`]: the seed inputs of every target (`examples/gen_seeds.rs`).

pub mod caps;
pub mod replies;
pub mod seeds;
pub mod wire;
