//! Reading what the server sent: option replies (handshake) and structured
//! reply chunks (transmission). Each reader takes one message off the front
//! of a byte slice and says precisely what is wrong when the bytes are not
//! a well-formed message, so a harness can turn that into a panic.

use userblk::nbd::proto::*;

/// One option reply of the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReply<'a> {
    /// The option it answers.
    pub opt: u32,
    /// `NBD_REP_*`.
    pub kind: u32,
    /// Exactly as many bytes as the length field said.
    pub data: &'a [u8],
}

impl OptReply<'_> {
    /// The last reply to an option: an ACK or an error.
    pub fn is_final(&self) -> bool {
        self.kind == REP_ACK || self.kind & REP_FLAG_ERROR != 0
    }
}

/// Size of an option reply header: magic, option, type, length.
pub const OPT_REPLY_HEADER: usize = 20;

/// Take one option reply off `buf`; `Ok(None)` when `buf` is empty.
pub fn opt_reply<'a>(buf: &mut &'a [u8]) -> Result<Option<OptReply<'a>>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let Some((head, rest)) = buf.split_first_chunk::<OPT_REPLY_HEADER>() else {
        return Err(format!(
            "{} bytes left, less than an option reply header",
            buf.len()
        ));
    };
    let magic = u64::from_be_bytes(field(head, 0));
    if magic != OPT_REPLY_MAGIC {
        return Err(format!("option reply magic {magic:#018x}"));
    }
    let opt = u32::from_be_bytes(field(head, 8));
    let kind = u32::from_be_bytes(field(head, 12));
    let len = u32::from_be_bytes(field(head, 16)) as usize;
    if len > rest.len() {
        return Err(format!(
            "option reply {kind:#x} to {} says {len} bytes, {} follow",
            option_name(opt),
            rest.len()
        ));
    }
    let (data, rest) = rest.split_at(len);
    *buf = rest;
    Ok(Some(OptReply { opt, kind, data }))
}

/// One structured reply chunk of the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// `NBD_REPLY_FLAG_*`.
    pub flags: u16,
    /// `NBD_REPLY_TYPE_*`.
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Exactly as many bytes as the length field said.
    pub payload: &'a [u8],
}

/// Take one structured reply chunk off `buf`; `Ok(None)` when `buf` is empty.
pub fn chunk<'a>(buf: &mut &'a [u8]) -> Result<Option<Chunk<'a>>, String> {
    if buf.is_empty() {
        return Ok(None);
    }
    let Some((head, rest)) = buf.split_first_chunk::<CHUNK_HEADER_LEN>() else {
        return Err(format!(
            "{} bytes left, less than a chunk header",
            buf.len()
        ));
    };
    let magic = u32::from_be_bytes(field(head, 0));
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(format!("structured reply magic {magic:#010x}"));
    }
    let flags = u16::from_be_bytes(field(head, 4));
    let kind = u16::from_be_bytes(field(head, 6));
    let cookie = u64::from_be_bytes(field(head, 8));
    let len = u32::from_be_bytes(field(head, 16)) as usize;
    if len > rest.len() {
        return Err(format!(
            "chunk type {kind} for cookie {cookie:#x} says {len} bytes, {} follow",
            rest.len()
        ));
    }
    let (payload, rest) = rest.split_at(len);
    *buf = rest;
    Ok(Some(Chunk {
        flags,
        kind,
        cookie,
        payload,
    }))
}

/// Bytes `at..at + N` of `b` (callers pass offsets inside `b`).
pub fn field<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut x = [0u8; N];
    x.copy_from_slice(&b[at..at + N]);
    x
}
