//! Block status from a server: a connection that negotiates structured
//! replies and the `base:allocation` metadata context, then asks
//! `NBD_CMD_BLOCK_STATUS` one request at a time.
//!
//! The nbd target keeps this apart from its data connection, whose replies
//! stay simple: only allocation queries (`userblk copy`, an NBD re-export)
//! pay for structured replies, and the data path is unchanged.

use std::io::{Read, Write};
use std::time::Duration;

use super::{
    connect_socket, encode_request, greet, io_error, opt_go, read_array, read_option_reply,
    read_u32, sanitize, send_option, Addr, ClientError, ExportInfo, Stream,
};
use crate::nbd::proto;
use crate::target::Extent;

/// The metadata context asked for.
const BASE_ALLOCATION: &str = "base:allocation";
/// Longest structured reply chunk accepted: room for 64 Ki descriptors.
const MAX_CHUNK: u32 = 4 + 8 * 65536;
/// Structured reply chunk header after the magic: flags, type, cookie, length.
const CHUNK_HEADER_REST: usize = 2 + 2 + 8 + 4;
/// Simple reply header after the magic: error, cookie.
const SIMPLE_REST: usize = 4 + 8;

/// A connection negotiated for block status.
#[derive(Debug)]
pub struct StatusConn {
    stream: Stream,
    /// The id the server gave `base:allocation`.
    context: u32,
    next_cookie: u64,
}

/// Connect to `addr` and negotiate `export` with structured replies and
/// `base:allocation`. [`ClientError::NoStatus`] if the server offers no
/// block status.
pub fn connect(
    addr: &Addr,
    export: &str,
    timeout: Duration,
) -> std::result::Result<(StatusConn, ExportInfo), ClientError> {
    let mut stream = connect_socket(addr, timeout)?;
    let during = "setting socket timeouts";
    stream
        .set_timeouts(Some(timeout.max(Duration::from_millis(1))))
        .map_err(io_error(during))?;
    let (info, context) = negotiate(&mut stream, export)?;
    Ok((
        StatusConn {
            stream,
            context,
            next_cookie: 1,
        },
        info,
    ))
}

/// The handshake for block status: structured replies, the metadata
/// context, then `NBD_OPT_GO`.
pub fn negotiate<S: Read + Write + ?Sized>(
    s: &mut S,
    export: &str,
) -> std::result::Result<(ExportInfo, u32), ClientError> {
    let (fixed, _) = greet(s)?;
    if !fixed {
        return Err(ClientError::NoStatus("the server is not fixed newstyle"));
    }
    send_option(
        s,
        proto::OPT_STRUCTURED_REPLY,
        &[],
        "sending NBD_OPT_STRUCTURED_REPLY",
    )?;
    let during = "reading the reply to NBD_OPT_STRUCTURED_REPLY";
    match read_option_reply(s, proto::OPT_STRUCTURED_REPLY, during)? {
        (proto::REP_ACK, _) => {}
        (r, _) if r & proto::REP_FLAG_ERROR != 0 => {
            return Err(ClientError::NoStatus(
                "the server has no structured replies",
            ))
        }
        (r, _) => {
            return Err(ClientError::UnexpectedReply {
                option: proto::OPT_STRUCTURED_REPLY,
                reply: r,
            })
        }
    }
    let context = set_meta_context(s, export)?;
    match opt_go(s, export)? {
        Some(info) => Ok((info, context)),
        None => Err(ClientError::NoStatus("the server does not know NBD_OPT_GO")),
    }
}

/// `NBD_OPT_SET_META_CONTEXT` for `base:allocation`: its id.
fn set_meta_context<S: Read + Write + ?Sized>(
    s: &mut S,
    export: &str,
) -> std::result::Result<u32, ClientError> {
    let too_long = || ClientError::NoStatus("the export name is too long");
    let name_len = u32::try_from(export.len()).map_err(|_| too_long())?;
    let mut payload = Vec::with_capacity(export.len() + 12 + BASE_ALLOCATION.len());
    payload.extend_from_slice(&name_len.to_be_bytes());
    payload.extend_from_slice(export.as_bytes());
    payload.extend_from_slice(&1u32.to_be_bytes());
    let query_len = u32::try_from(BASE_ALLOCATION.len()).map_err(|_| too_long())?;
    payload.extend_from_slice(&query_len.to_be_bytes());
    payload.extend_from_slice(BASE_ALLOCATION.as_bytes());
    let option = proto::OPT_SET_META_CONTEXT;
    send_option(s, option, &payload, "sending NBD_OPT_SET_META_CONTEXT")?;
    let during = "reading the reply to NBD_OPT_SET_META_CONTEXT";
    let mut context = None;
    loop {
        match read_option_reply(s, option, during)? {
            (proto::REP_META_CONTEXT, data) => {
                let Some((id, name)) = data.split_first_chunk::<4>() else {
                    return Err(ClientError::UnexpectedReply {
                        option,
                        reply: proto::REP_META_CONTEXT,
                    });
                };
                if name == BASE_ALLOCATION.as_bytes() {
                    context = Some(u32::from_be_bytes(*id));
                }
            }
            (proto::REP_ACK, _) => {
                return context.ok_or(ClientError::NoStatus(
                    "the server has no base:allocation context",
                ))
            }
            (r, data) if r & proto::REP_FLAG_ERROR != 0 => {
                tracing::debug!("nbd: NBD_OPT_SET_META_CONTEXT refused: {}", sanitize(&data));
                return Err(ClientError::NoStatus(
                    "the server refused NBD_OPT_SET_META_CONTEXT",
                ));
            }
            (reply, _) => return Err(ClientError::UnexpectedReply { option, reply }),
        }
    }
}

impl Drop for StatusConn {
    fn drop(&mut self) {
        // Say goodbye (best effort: the socket has its timeouts).
        let cookie = self.next_cookie;
        let disc = encode_request(proto::CMD_DISC, 0, cookie, 0, 0);
        let _ = self.stream.write_all(&disc);
        self.stream.shutdown();
    }
}

/// One extent of a reply, as the server sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Raw {
    len: u64,
    flags: u32,
}

impl StatusConn {
    /// The allocation of `[offset, offset + len)`, appended to `out` as
    /// extents from `offset`: at most `len`, at least one `block` (less
    /// only if `len` is). Holes and zeroes are shrunk to whole blocks, so
    /// a block is never called a hole while part of it is data.
    ///
    /// An error chunk is [`ClientError::Failed`] and leaves the connection
    /// usable; any other error leaves it out of step: drop it.
    pub fn block_status(
        &mut self,
        offset: u64,
        len: u32,
        block: u64,
        out: &mut Vec<Extent>,
    ) -> std::result::Result<(), ClientError> {
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let req = encode_request(proto::CMD_BLOCK_STATUS, 0, cookie, offset, len);
        self.stream
            .write_all(&req)
            .map_err(io_error("sending NBD_CMD_BLOCK_STATUS"))?;
        read_extents(&mut self.stream, cookie, self.context, len, block, out)
    }
}

/// Read the server's reply to the block status request `cookie` for
/// `len` bytes, and append its extents for `context` to `out` as
/// [`StatusConn::block_status`] describes.
pub fn read_extents<R: Read + ?Sized>(
    r: &mut R,
    cookie: u64,
    context: u32,
    len: u32,
    block: u64,
    out: &mut Vec<Extent>,
) -> std::result::Result<(), ClientError> {
    let raw = read_status_reply(r, cookie, context)?;
    push_extents(&raw, u64::from(len), block.max(1), out);
    Ok(())
}

fn bad(what: impl Into<String>) -> ClientError {
    ClientError::BadStructured(what.into())
}

/// Read the chunks of the reply to `cookie` up to the one marked done:
/// the descriptors of context `context`.
fn read_status_reply<R: Read + ?Sized>(
    r: &mut R,
    cookie: u64,
    context: u32,
) -> std::result::Result<Vec<Raw>, ClientError> {
    let during = "reading a block status reply";
    let mut raw = None;
    let mut failed = None;
    loop {
        let magic = read_u32(r, during)?;
        if magic == proto::SIMPLE_REPLY_MAGIC {
            let rest: [u8; SIMPLE_REST] = read_array(r, during)?;
            let error = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            if u64::from_be_bytes(rest[4..].try_into().unwrap_or_default()) != cookie {
                return Err(bad("a simple reply for another cookie"));
            }
            return Err(if error != 0 {
                ClientError::Failed {
                    error,
                    message: String::new(),
                }
            } else {
                bad("a simple reply to NBD_CMD_BLOCK_STATUS")
            });
        }
        if magic != proto::STRUCTURED_REPLY_MAGIC {
            return Err(ClientError::BadReplyMagic(magic));
        }
        let h: [u8; CHUNK_HEADER_REST] = read_array(r, during)?;
        let flags = u16::from_be_bytes([h[0], h[1]]);
        let kind = u16::from_be_bytes([h[2], h[3]]);
        let got = u64::from_be_bytes(h[4..12].try_into().unwrap_or_default());
        let length = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        if got != cookie {
            return Err(bad(format!("a chunk for cookie {got:#x}, not {cookie:#x}")));
        }
        if length > MAX_CHUNK {
            return Err(bad(format!("a chunk of {length} bytes")));
        }
        let mut payload = vec![0u8; length as usize];
        r.read_exact(&mut payload).map_err(io_error(during))?;
        match kind {
            proto::REPLY_TYPE_NONE if length == 0 => {}
            proto::REPLY_TYPE_BLOCK_STATUS => {
                let Some((id, rest)) = payload.split_first_chunk::<4>() else {
                    return Err(bad("a block status chunk without a context id"));
                };
                if rest.is_empty() || rest.len() % 8 != 0 {
                    return Err(bad(format!("a block status chunk of {length} bytes")));
                }
                if u32::from_be_bytes(*id) == context {
                    let mut v = Vec::with_capacity(rest.len() / 8);
                    for d in rest.chunks_exact(8) {
                        let len = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                        if len == 0 {
                            return Err(bad("an extent of length 0"));
                        }
                        let flags = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                        v.push(Raw {
                            len: u64::from(len),
                            flags,
                        });
                    }
                    raw = Some(v);
                }
            }
            k if k & (1 << 15) != 0 => {
                let Some((error, rest)) = payload.split_first_chunk::<4>() else {
                    return Err(bad("an error chunk without an error"));
                };
                let msg_len = rest
                    .get(..2)
                    .map_or(0, |m| usize::from(u16::from_be_bytes([m[0], m[1]])));
                let message = rest.get(2..2 + msg_len).map(sanitize).unwrap_or_default();
                failed = Some(ClientError::Failed {
                    error: u32::from_be_bytes(*error),
                    message,
                });
            }
            k => return Err(bad(format!("a chunk of type {k} to NBD_CMD_BLOCK_STATUS"))),
        }
        if flags & proto::REPLY_FLAG_DONE != 0 {
            break;
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    raw.ok_or_else(|| bad("no extents for base:allocation"))
}

/// Append `raw` (clipped to `len`) to `out`, holes and zeroes shrunk to
/// whole blocks, neighbours of one kind merged.
fn push_extents(raw: &[Raw], len: u64, block: u64, out: &mut Vec<Extent>) {
    let first = out.len();
    let mut pos = 0u64;
    for d in raw {
        if pos >= len {
            break;
        }
        let end = pos.saturating_add(d.len).min(len);
        let kind = Extent {
            len: 0,
            hole: d.flags & proto::STATE_HOLE != 0,
            zero: d.flags & proto::STATE_ZERO != 0,
        };
        let (a, b) = (pos.next_multiple_of(block), end / block * block);
        if (kind.hole || kind.zero) && b > a {
            Extent::data(a - pos).push_merged(out, first);
            Extent { len: b - a, ..kind }.push_merged(out, first);
            Extent::data(end - b).push_merged(out, first);
        } else {
            Extent::data(end - pos).push_merged(out, first);
        }
        pos = end;
    }
    // Less than one block described: call one block data (always true).
    if pos < block.min(len) {
        out.truncate(first);
        out.push(Extent::data(block.min(len)));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chunk(flags: u16, kind: u16, cookie: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&proto::STRUCTURED_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn status(id: u32, d: &[(u32, u32)]) -> Vec<u8> {
        let mut v = id.to_be_bytes().to_vec();
        for (len, flags) in d {
            v.extend_from_slice(&len.to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
        }
        v
    }

    const HZ: u32 = proto::STATE_HOLE | proto::STATE_ZERO;

    #[test]
    fn replies_become_block_aligned_extents() {
        let done = proto::REPLY_FLAG_DONE;
        let ty = proto::REPLY_TYPE_BLOCK_STATUS;
        // Another context's chunk first, then ours, then NONE with DONE.
        let mut wire = chunk(0, ty, 7, &status(9, &[(4096, 0)]));
        wire.extend(chunk(
            0,
            ty,
            7,
            &status(3, &[(1024, 0), (8192, HZ), (100, 0)]),
        ));
        wire.extend(chunk(done, proto::REPLY_TYPE_NONE, 7, &[]));
        let raw = read_status_reply(&mut &wire[..], 7, 3).unwrap();
        let mut out = Vec::new();
        push_extents(&raw, 1 << 20, 4096, &mut out);
        // The hole 1024..9216 is shrunk to 4096..8192; the rest is data.
        assert_eq!(
            out,
            vec![
                Extent::data(4096),
                Extent::hole(4096),
                Extent::data(9316 - 8192)
            ]
        );
        // Clipped to the length asked for.
        out.clear();
        push_extents(&raw, 6144, 512, &mut out);
        assert_eq!(out, vec![Extent::data(1024), Extent::hole(5120)]);
        // Less than a block described: one block of data.
        out.clear();
        push_extents(
            &[Raw {
                len: 100,
                flags: HZ,
            }],
            1 << 20,
            4096,
            &mut out,
        );
        assert_eq!(out, vec![Extent::data(4096)]);
        // Zero but allocated stays apart from holes.
        out.clear();
        let z = proto::STATE_ZERO;
        push_extents(
            &[Raw {
                len: 8192,
                flags: z,
            }],
            8192,
            512,
            &mut out,
        );
        assert_eq!(
            out,
            vec![Extent {
                len: 8192,
                hole: false,
                zero: true
            }]
        );
    }

    #[test]
    fn malformed_replies_are_errors() {
        let ty = proto::REPLY_TYPE_BLOCK_STATUS;
        let done = proto::REPLY_FLAG_DONE;
        let err = |wire: Vec<u8>| read_status_reply(&mut &wire[..], 7, 3).unwrap_err();
        // Wrong cookie, zero-length extent, odd payload, too long, unknown type.
        assert!(matches!(
            err(chunk(done, ty, 8, &status(3, &[(512, 0)]))),
            ClientError::BadStructured(_)
        ));
        assert!(matches!(
            err(chunk(done, ty, 7, &status(3, &[(0, 0)]))),
            ClientError::BadStructured(_)
        ));
        assert!(matches!(
            err(chunk(done, ty, 7, &[0, 0, 0, 3, 1, 2, 3])),
            ClientError::BadStructured(_)
        ));
        let mut huge = chunk(done, ty, 7, &[]);
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(err(huge), ClientError::BadStructured(_)));
        assert!(matches!(
            err(chunk(done, proto::REPLY_TYPE_OFFSET_DATA, 7, &[0; 9])),
            ClientError::BadStructured(_)
        ));
        // Done without our context.
        assert!(matches!(
            err(chunk(done, ty, 7, &status(4, &[(512, 0)]))),
            ClientError::BadStructured(_)
        ));
        // Cut short.
        assert!(matches!(
            err(chunk(done, ty, 7, &status(3, &[(512, 0)]))[..20].to_vec()),
            ClientError::Closed { .. } | ClientError::Io { .. }
        ));
        // An error chunk: the request failed, the stream is still in step.
        let mut e = 5u32.to_be_bytes().to_vec();
        e.extend_from_slice(&3u16.to_be_bytes());
        e.extend_from_slice(b"bad");
        assert!(matches!(
            err(chunk(done, proto::REPLY_TYPE_ERROR, 7, &e)),
            ClientError::Failed { error: 5, ref message } if message == "bad"
        ));
        // A simple error reply.
        let mut simple = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
        simple.extend_from_slice(&22u32.to_be_bytes());
        simple.extend_from_slice(&7u64.to_be_bytes());
        assert!(matches!(err(simple), ClientError::Failed { error: 22, .. }));
    }
}
