//! The transmission phase on the wire: request headers in, replies out.
//!
//! Parsing is separate from serving so that every check a hostile client
//! can reach is a pure function, tested and fuzzed on its own: a request
//! becomes a [`Command`] only if its type, flags, range and alignment are
//! valid for this export and this negotiation; otherwise it gets the NBD
//! error the specification names.

use super::handshake::Negotiated;
use crate::nbd::proto::*;
pub use crate::nbd::wire::{chunk_header, simple_reply, Header};
use crate::target::{Caps, Flags, Op, Request};

/// Largest read or write payload: the size the specification says a server
/// should accept from any client. Larger writes close the connection.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What a valid request asks the server to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A request for the target.
    Io(Request),
    /// Succeeds without touching the target (empty ranges, `NBD_CMD_CACHE`).
    Nothing,
    /// Block status of a range.
    BlockStatus {
        /// Start.
        offset: u64,
        /// Length.
        len: u32,
        /// Only one extent wanted.
        one: bool,
    },
    /// The client is leaving.
    Disconnect,
}

/// The export as the transmission phase checks requests against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// What the target declared.
    pub caps: Caps,
    /// Largest read or write.
    pub max_payload: u32,
}

impl Limits {
    /// The limits for `caps`.
    pub fn new(caps: Caps) -> Self {
        let max_payload = caps.max_request.map_or(MAX_PAYLOAD, |m| m.min(MAX_PAYLOAD));
        // Keep the maximum a multiple of the minimum, as the spec requires.
        let lbs = caps.logical_block_size;
        Limits {
            caps,
            max_payload: max_payload / lbs * lbs,
        }
    }

    /// The block sizes to advertise: minimum, preferred, maximum.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        (
            self.caps.logical_block_size,
            self.caps.physical_block_size.max(512),
            self.max_payload,
        )
    }

    /// Transmission flags that say exactly what the target supports.
    ///
    /// Multi-conn is advertised because every connection goes to the one
    /// target of this daemon, and a target's flush covers every write it
    /// completed, whichever connection (or queue) it came from.
    pub fn flags(&self) -> u16 {
        let c = &self.caps;
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_CACHE | FLAG_CAN_MULTI_CONN;
        if c.read_only {
            f |= FLAG_READ_ONLY;
        }
        // A client may always flush; with no volatile cache it is cheap.
        f |= FLAG_SEND_FLUSH;
        if c.fua || !c.volatile_cache {
            // Without a volatile cache every write is already durable.
            f |= FLAG_SEND_FUA;
        }
        if c.rotational {
            f |= FLAG_ROTATIONAL;
        }
        if !c.read_only && c.discard.is_some() {
            f |= FLAG_SEND_TRIM;
        }
        if !c.read_only && c.write_zeroes.is_some() {
            // The target zeroes without writing data, so it is fast.
            f |= FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        f
    }
}

/// The largest piece a trim or write-zeroes of `len` bytes is cut into
/// for a target whose limit is below it (NBD has no way to advertise the
/// limit, so the server splits): `None` when it goes whole.
///
/// Pieces are a multiple of the target's granularity, at most its `max_bytes`.
pub fn range_piece(caps: &Caps, op: Op, len: u32) -> Option<u32> {
    let rc = match op {
        Op::Discard => caps.discard?,
        Op::WriteZeroes => caps.write_zeroes?,
        _ => return None,
    };
    if u64::from(len) <= rc.max_bytes {
        return None;
    }
    let g = u64::from(rc.granularity);
    // `Caps::check` guarantees max_bytes >= granularity; below `len`, a u32.
    let piece = (rc.max_bytes / g * g).max(g);
    u32::try_from(piece).ok()
}

const KNOWN_FLAGS: u16 =
    CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO;

/// Decide what a request means, or which NBD error it gets.
///
/// The caller has already refused (by closing the connection) writes whose
/// payload exceeds [`MAX_PAYLOAD`]; a write refused here still has its
/// payload on the wire, which the caller reads and drops.
pub fn command(h: &Header, neg: &Negotiated, lim: &Limits) -> Result<Command, u32> {
    let caps = &lim.caps;
    if h.flags & !KNOWN_FLAGS != 0 {
        return Err(EINVAL);
    }
    let only = |allowed: u16| {
        if h.flags & !(allowed | CMD_FLAG_FUA) != 0 {
            Err(EINVAL)
        } else {
            Ok(())
        }
    };
    let mut flags = Flags::NONE;
    if h.flags & CMD_FLAG_FUA != 0 {
        flags = flags.with(Flags::FUA);
    }
    let end = h.offset.checked_add(u64::from(h.len));
    let in_range = end.is_some_and(|e| e <= caps.size);
    let lbs = u64::from(caps.logical_block_size);
    let aligned = h.offset.is_multiple_of(lbs) && u64::from(h.len).is_multiple_of(lbs);
    let op = match h.kind {
        CMD_DISC => return Ok(Command::Disconnect),
        CMD_FLUSH => {
            only(0)?;
            return Ok(Command::Io(Request::new(Op::Flush, 0, 0)));
        }
        CMD_READ => {
            let df = if neg.structured { CMD_FLAG_DF } else { 0 };
            only(df)?;
            Op::Read
        }
        CMD_WRITE => {
            only(0)?;
            Op::Write
        }
        CMD_TRIM => {
            only(0)?;
            if caps.read_only {
                return Err(EPERM);
            }
            if caps.discard.is_none() {
                return Err(EINVAL);
            }
            Op::Discard
        }
        CMD_WRITE_ZEROES => {
            only(CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO)?;
            if caps.read_only {
                return Err(EPERM);
            }
            if caps.write_zeroes.is_none() {
                return Err(if h.flags & CMD_FLAG_FAST_ZERO != 0 {
                    ENOTSUP
                } else {
                    EINVAL
                });
            }
            if h.flags & CMD_FLAG_NO_HOLE != 0 {
                flags = flags.with(Flags::NOUNMAP);
            }
            Op::WriteZeroes
        }
        CMD_CACHE => {
            only(0)?;
            return if in_range && aligned {
                Ok(Command::Nothing)
            } else {
                Err(EINVAL)
            };
        }
        CMD_BLOCK_STATUS => {
            only(CMD_FLAG_REQ_ONE)?;
            if !neg.base_allocation || h.len == 0 || !in_range || !aligned {
                return Err(EINVAL);
            }
            return Ok(Command::BlockStatus {
                offset: h.offset,
                len: h.len,
                one: h.flags & CMD_FLAG_REQ_ONE != 0,
            });
        }
        _ => return Err(EINVAL),
    };
    if op == Op::Write && caps.read_only {
        return Err(EPERM);
    }
    if !in_range {
        return Err(if op.modifies() { ENOSPC } else { EINVAL });
    }
    if !aligned || (op.has_data() && h.len > lim.max_payload) {
        return Err(EINVAL);
    }
    if h.len == 0 {
        return Ok(Command::Nothing);
    }
    Ok(Command::Io(Request {
        op,
        offset: h.offset,
        len: h.len,
        flags,
    }))
}

/// Append the reply header for a request that succeeded or failed with
/// `error` (0 for success) to `out`. For a successful read the caller sends
/// `data_len` bytes of data right after it.
pub fn reply_header(out: &mut Vec<u8>, neg: &Negotiated, h: &Header, error: u32, data_len: u32) {
    if !neg.structured {
        out.extend_from_slice(&simple_reply(h.cookie, error));
        return;
    }
    if error != 0 {
        let msg: &[u8] = match error {
            EINVAL => b"invalid request",
            ENOSPC => b"beyond the end of the export",
            EPERM => b"read-only export",
            ENOTSUP => b"not supported",
            _ => b"",
        };
        // The messages above are a few bytes long.
        let mlen = u16::try_from(msg.len()).unwrap_or(0);
        let len = 6 + u32::from(mlen);
        out.extend_from_slice(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_ERROR,
            h.cookie,
            len,
        ));
        out.extend_from_slice(&error.to_be_bytes());
        out.extend_from_slice(&mlen.to_be_bytes());
        out.extend_from_slice(msg);
    } else if h.kind == CMD_READ && data_len > 0 {
        out.extend_from_slice(&chunk_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_OFFSET_DATA,
            h.cookie,
            8 + data_len,
        ));
        out.extend_from_slice(&h.offset.to_be_bytes());
    } else {
        out.extend_from_slice(&chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, h.cookie, 0));
    }
}

/// Append the whole reply to a read of `h.len` bytes that all read as
/// zeroes: one `OFFSET_HOLE` chunk (structured replies only), no data.
pub fn hole_reply(out: &mut Vec<u8>, h: &Header) {
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_HOLE,
        h.cookie,
        12,
    ));
    out.extend_from_slice(&h.offset.to_be_bytes());
    out.extend_from_slice(&h.len.to_be_bytes());
}

/// Append a block status reply for `base:allocation`: `extents` as
/// `(length, flags)` pairs.
pub fn block_status_reply(out: &mut Vec<u8>, cookie: u64, extents: &[(u32, u32)]) {
    let len = 4 + 8 * extents.len();
    out.extend_from_slice(&chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        u32::try_from(len).unwrap_or(u32::MAX),
    ));
    out.extend_from_slice(&super::handshake::BASE_ALLOCATION_ID.to_be_bytes());
    for &(l, f) in extents {
        out.extend_from_slice(&l.to_be_bytes());
        out.extend_from_slice(&f.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::RangeOpCaps;

    fn lim() -> Limits {
        let mut caps = Caps::new(1 << 20);
        caps.discard = Some(RangeOpCaps::with_granularity(4096));
        Limits::new(caps)
    }

    fn h(kind: u16, flags: u16, offset: u64, len: u32) -> Header {
        Header {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn header_round_trip_and_bad_magic() {
        let x = h(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        assert_eq!(Header::parse(&x.encode()), Some(x));
        let mut b = x.encode();
        b[0] ^= 1;
        assert_eq!(Header::parse(&b), None);
    }

    #[test]
    fn commands_checked_against_export() {
        let n = Negotiated::default();
        let l = lim();
        assert!(matches!(
            command(&h(CMD_READ, 0, 0, 4096), &n, &l),
            Ok(Command::Io(r)) if r.op == Op::Read && r.len == 4096
        ));
        // Past the end: EINVAL for reads, ENOSPC for writes.
        assert_eq!(command(&h(CMD_READ, 0, 1 << 20, 512), &n, &l), Err(EINVAL));
        assert_eq!(
            command(&h(CMD_WRITE, 0, (1 << 20) - 512, 1024), &n, &l),
            Err(ENOSPC)
        );
        assert_eq!(
            command(&h(CMD_READ, 0, u64::MAX - 10, 512), &n, &l),
            Err(EINVAL)
        );
        // Unaligned, unknown command, unknown or misplaced flags.
        assert_eq!(command(&h(CMD_READ, 0, 100, 512), &n, &l), Err(EINVAL));
        assert_eq!(command(&h(99, 0, 0, 512), &n, &l), Err(EINVAL));
        assert_eq!(command(&h(CMD_READ, 1 << 9, 0, 512), &n, &l), Err(EINVAL));
        assert_eq!(
            command(&h(CMD_READ, CMD_FLAG_DF, 0, 512), &n, &l),
            Err(EINVAL)
        );
        assert_eq!(
            command(&h(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 512), &n, &l),
            Err(EINVAL)
        );
        // Not declared by the target: zeroes; FAST_ZERO says so with ENOTSUP.
        assert_eq!(
            command(&h(CMD_WRITE_ZEROES, 0, 0, 512), &n, &l),
            Err(EINVAL)
        );
        assert_eq!(
            command(&h(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), &n, &l),
            Err(ENOTSUP)
        );
        // Block status without the meta context.
        assert_eq!(
            command(&h(CMD_BLOCK_STATUS, 0, 0, 512), &n, &l),
            Err(EINVAL)
        );
        let sn = Negotiated {
            structured: true,
            base_allocation: true,
            ..Negotiated::default()
        };
        assert!(matches!(
            command(&h(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &sn, &l),
            Ok(Command::BlockStatus { one: true, .. })
        ));
        assert!(matches!(
            command(&h(CMD_READ, CMD_FLAG_DF, 0, 512), &sn, &l),
            Ok(Command::Io(_))
        ));
        assert_eq!(
            command(&h(CMD_DISC, 0, 0, 0), &n, &l),
            Ok(Command::Disconnect)
        );
        assert_eq!(
            command(&h(CMD_CACHE, 0, 0, 4096), &n, &l),
            Ok(Command::Nothing)
        );
        assert!(matches!(
            command(&h(CMD_TRIM, CMD_FLAG_FUA, 0, 4096), &n, &l),
            Ok(Command::Io(r)) if r.op == Op::Discard && r.flags.contains(Flags::FUA)
        ));
    }

    #[test]
    fn read_only_refuses_modifications() {
        let mut caps = Caps::new(1 << 20);
        caps.read_only = true;
        caps.discard = Some(RangeOpCaps::with_granularity(4096));
        let l = Limits::new(caps);
        let n = Negotiated::default();
        assert_eq!(command(&h(CMD_WRITE, 0, 0, 512), &n, &l), Err(EPERM));
        assert_eq!(command(&h(CMD_TRIM, 0, 0, 4096), &n, &l), Err(EPERM));
        assert_ne!(l.flags() & FLAG_READ_ONLY, 0);
        assert_eq!(l.flags() & FLAG_SEND_TRIM, 0);
    }

    #[test]
    fn flags_follow_caps() {
        let f = lim().flags();
        assert_ne!(f & FLAG_SEND_TRIM, 0);
        assert_eq!(f & FLAG_SEND_WRITE_ZEROES, 0);
        assert_eq!(f & FLAG_READ_ONLY, 0);
        assert_eq!(lim().block_sizes(), (512, 4096, MAX_PAYLOAD));
    }

    #[test]
    fn replies_encode() {
        let sn = Negotiated {
            structured: true,
            ..Negotiated::default()
        };
        let mut out = Vec::new();
        reply_header(&mut out, &sn, &h(CMD_READ, 0, 4096, 512), 0, 512);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 8);
        assert_eq!(&out[16..20], &(520u32).to_be_bytes());
        out.clear();
        reply_header(
            &mut out,
            &Negotiated::default(),
            &h(CMD_READ, 0, 0, 512),
            EIO,
            0,
        );
        assert_eq!(out, simple_reply(7, EIO));
        out.clear();
        block_status_reply(&mut out, 7, &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(out.len(), CHUNK_HEADER_LEN + 4 + 16);
        out.clear();
        hole_reply(&mut out, &h(CMD_READ, 0, 1 << 20, 65536));
        assert_eq!(
            out[..CHUNK_HEADER_LEN],
            chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 7, 12)
        );
        assert_eq!(&out[20..28], &(1u64 << 20).to_be_bytes());
        assert_eq!(&out[28..], &65536u32.to_be_bytes());
    }
}
