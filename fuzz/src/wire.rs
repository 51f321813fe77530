//! The client's side of the NBD wire: option requests and request headers,
//! built from the library's own constants so that seeds and harnesses
//! speak exactly the protocol the server implements.

use userblk::nbd::proto::*;
use userblk::nbd::server::transmission::Header;

/// Name of the export every harness serves.
pub const EXPORT_NAME: &str = "disk";

/// Append the client flags (the first thing a client sends).
pub fn client_flags(out: &mut Vec<u8>, flags: u32) {
    out.extend_from_slice(&flags.to_be_bytes());
}

/// Append one option request: `IHAVEOPT`, option, length, data.
pub fn option(out: &mut Vec<u8>, opt: u32, data: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&opt.to_be_bytes());
    out.extend_from_slice(&len32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`: export name and the information
/// types asked for.
pub fn info_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, name);
    d.extend_from_slice(&u16::try_from(infos.len()).unwrap_or(u16::MAX).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
pub fn meta_data(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut d = Vec::new();
    string(&mut d, name);
    d.extend_from_slice(&len32(queries.len()).to_be_bytes());
    for q in queries {
        string(&mut d, q);
    }
    d
}

/// Append a request header.
pub fn request(out: &mut Vec<u8>, kind: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    let h = Header {
        flags,
        kind,
        cookie,
        offset,
        len,
    };
    out.extend_from_slice(&h.encode());
}

/// What a well-behaved client sends to reach the transmission phase with
/// structured replies and `base:allocation`: client flags (fixed newstyle,
/// no zeroes), `STRUCTURED_REPLY`, `SET_META_CONTEXT base:allocation`,
/// and `GO` asking for block sizes.
pub fn transmission_prefix() -> Vec<u8> {
    let mut b = Vec::new();
    client_flags(&mut b, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    option(&mut b, OPT_STRUCTURED_REPLY, &[]);
    option(
        &mut b,
        OPT_SET_META_CONTEXT,
        &meta_data(EXPORT_NAME.as_bytes(), &[BASE_ALLOCATION.as_bytes()]),
    );
    option(
        &mut b,
        OPT_GO,
        &info_data(EXPORT_NAME.as_bytes(), &[INFO_BLOCK_SIZE]),
    );
    b
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&len32(s.len()).to_be_bytes());
    out.extend_from_slice(s);
}

/// Lengths built here are a few KiB at most.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
