//! What the NBD fuzz targets share: a client's side of the wire, the
//! parsers that check what the server sent back, and the seed corpus.
//!
//! - [`wire`]: building client messages (options, request headers).
//! - [`replies`]: reading option replies and structured reply chunks.
//! - [`caps`]: target capabilities drawn from fuzz input.
//! - [`seeds`]: the seed inputs of every target (`examples/gen_seeds.rs`).
//! - [`strict`]: whether to check what known, reported bugs break.

pub mod caps;
pub mod replies;
pub mod seeds;
pub mod wire;

/// Whether to check the invariants that reported, not yet fixed, library
/// bugs break: set `USERBLK_FUZZ_STRICT=1` (docs/fuzzing.md, "Findings").
/// Off by default so that a run goes on to find new bugs; once a fix lands,
/// delete its exemption from the target.
pub fn strict() -> bool {
    static S: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *S.get_or_init(|| std::env::var_os("USERBLK_FUZZ_STRICT").is_some_and(|v| v == "1"))
}
