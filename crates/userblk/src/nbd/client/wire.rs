//! The transmission phase's wire format, client side: requests out, simple
//! replies in, and the bounded reads everything else is built on.

use std::io::Read;

use super::{io_error, ClientError, ExportInfo};
use crate::nbd::proto;
use crate::nbd::wire::Header;
use crate::target::{Flags, Op, Request};

pub(super) fn read_array<const N: usize, R: Read + ?Sized>(
    r: &mut R,
    during: &'static str,
) -> std::result::Result<[u8; N], ClientError> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).map_err(io_error(during))?;
    Ok(b)
}

pub(super) fn read_u16<R: Read + ?Sized>(
    r: &mut R,
    during: &'static str,
) -> std::result::Result<u16, ClientError> {
    read_array::<2, R>(r, during).map(u16::from_be_bytes)
}

pub(super) fn read_u32<R: Read + ?Sized>(
    r: &mut R,
    during: &'static str,
) -> std::result::Result<u32, ClientError> {
    read_array::<4, R>(r, during).map(u32::from_be_bytes)
}

pub(super) fn read_u64<R: Read + ?Sized>(
    r: &mut R,
    during: &'static str,
) -> std::result::Result<u64, ClientError> {
    read_array::<8, R>(r, during).map(u64::from_be_bytes)
}

/// The command and command flags for a request on an export with `flags`.
pub fn command(req: &Request, export_flags: u16) -> (u16, u16) {
    let info = ExportInfo {
        size: 0,
        flags: export_flags,
        block_sizes: None,
    };
    let fua = if req.flags.contains(Flags::FUA) && info.has(proto::FLAG_SEND_FUA) {
        proto::CMD_FLAG_FUA
    } else {
        0
    };
    match req.op {
        Op::Read => (proto::CMD_READ, 0),
        Op::Write => (proto::CMD_WRITE, fua),
        Op::Flush => (proto::CMD_FLUSH, 0),
        Op::Discard => (proto::CMD_TRIM, fua),
        Op::WriteZeroes => {
            let no_hole = if req.flags.contains(Flags::NOUNMAP) {
                proto::CMD_FLAG_NO_HOLE
            } else {
                0
            };
            (proto::CMD_WRITE_ZEROES, fua | no_hole)
        }
    }
}

/// A transmission request header.
pub fn encode_request(
    cmd: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; proto::REQUEST_LEN] {
    Header {
        flags,
        kind: cmd,
        cookie,
        offset,
        len,
    }
    .encode()
}

/// A simple reply's header; a read's data follows it when `error` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// 0, or an NBD error (`proto::E*`).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Read one simple reply header. A structured reply or a bad magic is an
/// error: the stream can no longer be trusted.
pub fn read_reply<R: Read + ?Sized>(r: &mut R) -> std::result::Result<Reply, ClientError> {
    let b: [u8; proto::SIMPLE_REPLY_LEN] = read_array(r, "reading a reply")?;
    let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    match word(0) {
        proto::SIMPLE_REPLY_MAGIC => {}
        proto::STRUCTURED_REPLY_MAGIC => return Err(ClientError::UnexpectedStructured),
        m => return Err(ClientError::BadReplyMagic(m)),
    }
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&b[8..16]);
    Ok(Reply {
        error: word(4),
        cookie: u64::from_be_bytes(cookie),
    })
}
