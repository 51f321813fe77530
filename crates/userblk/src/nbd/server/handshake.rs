//! The server's side of the NBD handshake: fixed newstyle option haggling.
//!
//! [`negotiate`] works on any byte stream, so the same code serves Unix and
//! TCP sockets, the tests and the fuzzer. Every length the client sends is
//! checked against what the option can hold before anything is read or
//! allocated; a client that breaks a MUST of the protocol is disconnected
//! (the spec's "hard disconnect"), one that sends a malformed or unknown
//! option gets the matching error reply and may try again.

use std::io::{self, Read, Write};

use crate::nbd::proto::*;

/// Longest option payload accepted: the largest legitimate one is a
/// meta-context request with a handful of 4 KiB strings.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Options a client may send before it has to choose an export: enough for
/// any real client, a bound for a client that never stops.
pub const MAX_OPTIONS: usize = 4096;

/// Id of `base:allocation` in block status replies.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// The one export a server offers, as the handshake describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// Name clients ask for; the empty name (the default export) is accepted too.
    pub name: String,
    /// Shown to humans by `nbdinfo` and `NBD_OPT_LIST`.
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags, without the ones that depend on the negotiation (`SEND_DF`).
    pub flags: u16,
    /// Block size constraints: minimum, preferred, maximum.
    pub block_sizes: (u32, u32, u32),
}

impl Export {
    fn matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.name.as_bytes()
    }
}

/// What the client and server agreed on for the transmission phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Negotiated {
    /// Replies use structured chunks.
    pub structured: bool,
    /// `base:allocation` was selected: block status is allowed.
    pub base_allocation: bool,
    /// The client asked for block sizes with `NBD_OPT_GO`, so it promised to honour them.
    pub block_size_agreed: bool,
    /// The transmission flags sent to the client.
    pub flags: u16,
}

/// How the handshake ended, short of an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// On to the transmission phase.
    Transmission(Negotiated),
    /// The client aborted (`NBD_OPT_ABORT`) or went away.
    Closed,
}

/// Why the server hung up during the handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed.
    #[error("handshake: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol; the connection is closed.
    #[error("handshake: {0}")]
    Protocol(String),
}

fn protocol(msg: impl Into<String>) -> HandshakeError {
    HandshakeError::Protocol(msg.into())
}

/// Bytes of one option's payload, read with bounds checks.
struct Payload<'a> {
    data: &'a [u8],
}

impl<'a> Payload<'a> {
    fn u16(&mut self) -> Option<u16> {
        let (head, rest) = self.data.split_first_chunk::<2>()?;
        self.data = rest;
        Some(u16::from_be_bytes(*head))
    }

    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.data.split_first_chunk::<4>()?;
        self.data = rest;
        Some(u32::from_be_bytes(*head))
    }

    fn bytes(&mut self, n: u32) -> Option<&'a [u8]> {
        let n = usize::try_from(n).ok()?;
        if n > self.data.len() {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }

    /// A string of the protocol: at most 4096 bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        if n as usize > MAX_STRING {
            return None;
        }
        self.bytes(n)
    }

    fn done(&self) -> bool {
        self.data.is_empty()
    }
}

/// Option replies, buffered so each goes out in one write.
struct Replies<'s, S: Write> {
    stream: &'s mut S,
    buf: Vec<u8>,
}

impl<S: Write> Replies<'_, S> {
    fn reply(&mut self, opt: u32, kind: u32, parts: &[&[u8]]) {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        self.buf.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        self.buf.extend_from_slice(&opt.to_be_bytes());
        self.buf.extend_from_slice(&kind.to_be_bytes());
        // Every reply we build is a few KiB at most.
        self.buf
            .extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
        for p in parts {
            self.buf.extend_from_slice(p);
        }
    }

    fn error(&mut self, opt: u32, kind: u32, msg: &str) -> io::Result<()> {
        tracing::debug!("{}: {}: {msg}", option_name(opt), rep_error_name(kind));
        // Messages quote what the client sent, so cap them at the
        // protocol's string limit, on a character boundary.
        let mut end = msg.len().min(MAX_STRING);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        self.reply(opt, kind, &[&msg.as_bytes()[..end]]);
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.write_all(&self.buf)?;
        self.buf.clear();
        self.stream.flush()
    }
}

fn read_u32(s: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(s: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn closed(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// Run the handshake for `export` on `stream` (already connected).
///
/// ```
/// use userblk::nbd::server::handshake::{negotiate, Export, Outcome};
/// use userblk::nbd::proto::*;
///
/// // A client that only says hello and aborts.
/// let mut input = Vec::new();
/// input.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
/// input.extend_from_slice(&IHAVEOPT.to_be_bytes());
/// input.extend_from_slice(&OPT_ABORT.to_be_bytes());
/// input.extend_from_slice(&0u32.to_be_bytes());
/// let mut stream = std::io::Cursor::new(input);
/// let mut out = Vec::new();
/// let export = Export {
///     name: String::new(),
///     description: String::new(),
///     size: 1 << 20,
///     flags: FLAG_HAS_FLAGS,
///     block_sizes: (512, 4096, 1 << 20),
/// };
/// let mut io = userblk::nbd::server::handshake::Duplex::new(&mut stream, &mut out);
/// assert_eq!(negotiate(&mut io, &export).unwrap(), Outcome::Closed);
/// ```
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    export: &Export,
) -> Result<Outcome, HandshakeError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&hello)?;
    stream.flush()?;
    let client_flags = match read_u32(stream) {
        Ok(f) => f,
        Err(e) if closed(&e) => return Ok(Outcome::Closed),
        Err(e) => return Err(e.into()),
    };
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(protocol(format!(
            "client flags {client_flags:#x} set unknown bits"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut state = Negotiated::default();
    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let magic = match read_u64(stream) {
            Ok(m) => m,
            Err(e) if closed(&e) => return Ok(Outcome::Closed),
            Err(e) => return Err(e.into()),
        };
        if magic != IHAVEOPT {
            return Err(protocol(format!("bad option magic {magic:#x}")));
        }
        let opt = read_u32(stream)?;
        let len = read_u32(stream)?;
        if len > MAX_OPTION_LEN {
            return Err(protocol(format!(
                "{} with {len} bytes of data (at most {MAX_OPTION_LEN})",
                option_name(opt)
            )));
        }
        data.clear();
        data.resize(len as usize, 0);
        stream.read_exact(&mut data)?;
        let mut replies = Replies {
            stream,
            buf: Vec::new(),
        };
        match option(&mut replies, export, &mut state, opt, &data, no_zeroes)? {
            Next::Continue => {}
            Next::Transmission => {
                state.flags = transmission_flags(export, &state);
                return Ok(Outcome::Transmission(state));
            }
            Next::Abort => return Ok(Outcome::Closed),
        }
    }
    Err(protocol(format!("more than {MAX_OPTIONS} options")))
}

enum Next {
    Continue,
    Transmission,
    Abort,
}

fn transmission_flags(export: &Export, state: &Negotiated) -> u16 {
    let mut flags = export.flags | FLAG_HAS_FLAGS;
    if state.structured {
        // Reads are always answered in one chunk, so "do not fragment" holds trivially.
        flags |= FLAG_SEND_DF;
    }
    flags
}

fn option<S: Write>(
    r: &mut Replies<'_, S>,
    export: &Export,
    state: &mut Negotiated,
    opt: u32,
    data: &[u8],
    no_zeroes: bool,
) -> Result<Next, HandshakeError> {
    match opt {
        OPT_EXPORT_NAME => {
            if !export.matches(data) {
                // This option has no error reply: the spec says hang up.
                return Err(protocol(format!(
                    "NBD_OPT_EXPORT_NAME for unknown export {:?}",
                    String::from_utf8_lossy(data)
                )));
            }
            state.flags = transmission_flags(export, state);
            let mut b = Vec::with_capacity(134);
            b.extend_from_slice(&export.size.to_be_bytes());
            b.extend_from_slice(&state.flags.to_be_bytes());
            if !no_zeroes {
                b.resize(b.len() + 124, 0);
            }
            r.stream.write_all(&b)?;
            r.stream.flush()?;
            Ok(Next::Transmission)
        }
        OPT_ABORT => {
            r.reply(opt, REP_ACK, &[]);
            // The client may already be gone; either way the session is over.
            let _ = r.flush();
            Ok(Next::Abort)
        }
        OPT_LIST => {
            if !data.is_empty() {
                r.error(opt, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                return Ok(Next::Continue);
            }
            let name = export.name.as_bytes();
            let len = u32::try_from(name.len()).unwrap_or(0).to_be_bytes();
            r.reply(
                opt,
                REP_SERVER,
                &[&len, name, export.description.as_bytes()],
            );
            r.reply(opt, REP_ACK, &[]);
            r.flush()?;
            Ok(Next::Continue)
        }
        OPT_INFO | OPT_GO => info_or_go(r, export, state, opt, data),
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                r.error(
                    opt,
                    REP_ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                )?;
                return Ok(Next::Continue);
            }
            state.structured = true;
            r.reply(opt, REP_ACK, &[]);
            r.flush()?;
            Ok(Next::Continue)
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => meta_context(r, export, state, opt, data),
        OPT_STARTTLS => {
            r.error(opt, REP_ERR_UNSUP, "TLS is not supported by this server")?;
            Ok(Next::Continue)
        }
        _ => {
            r.error(
                opt,
                REP_ERR_UNSUP,
                &format!("option {opt} ({}) is not supported", option_name(opt)),
            )?;
            Ok(Next::Continue)
        }
    }
}

fn info_or_go<S: Write>(
    r: &mut Replies<'_, S>,
    export: &Export,
    state: &mut Negotiated,
    opt: u32,
    data: &[u8],
) -> Result<Next, HandshakeError> {
    let mut p = Payload { data };
    let parsed = (|| {
        let name = p.string()?;
        let n = p.u16()?;
        let mut wanted = Vec::with_capacity(usize::from(n.min(64)));
        for _ in 0..n {
            wanted.push(p.u16()?);
        }
        p.done().then_some((name, wanted))
    })();
    let Some((name, wanted)) = parsed else {
        r.error(
            opt,
            REP_ERR_INVALID,
            "malformed NBD_OPT_INFO/NBD_OPT_GO data",
        )?;
        return Ok(Next::Continue);
    };
    if !export.matches(name) {
        r.error(
            opt,
            REP_ERR_UNKNOWN,
            &format!(
                "no export named {:?} (this server exports {:?})",
                String::from_utf8_lossy(name),
                export.name
            ),
        )?;
        return Ok(Next::Continue);
    }
    let flags = transmission_flags(export, state);
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.size.to_be_bytes());
    info.extend_from_slice(&flags.to_be_bytes());
    r.reply(opt, REP_INFO, &[&info]);
    if wanted.contains(&INFO_NAME) {
        r.reply(
            opt,
            REP_INFO,
            &[&INFO_NAME.to_be_bytes(), export.name.as_bytes()],
        );
    }
    if wanted.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
        r.reply(
            opt,
            REP_INFO,
            &[
                &INFO_DESCRIPTION.to_be_bytes(),
                export.description.as_bytes(),
            ],
        );
    }
    // Sent even when not asked for: clients that did not ask still learn
    // the constraints, and requests outside them get EINVAL, not corruption.
    let (min, pref, max) = export.block_sizes;
    let mut bs = Vec::with_capacity(14);
    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&min.to_be_bytes());
    bs.extend_from_slice(&pref.to_be_bytes());
    bs.extend_from_slice(&max.to_be_bytes());
    r.reply(opt, REP_INFO, &[&bs]);
    r.reply(opt, REP_ACK, &[]);
    r.flush()?;
    if opt == OPT_GO {
        state.block_size_agreed = wanted.contains(&INFO_BLOCK_SIZE);
        state.flags = flags;
        Ok(Next::Transmission)
    } else {
        Ok(Next::Continue)
    }
}

fn meta_context<S: Write>(
    r: &mut Replies<'_, S>,
    export: &Export,
    state: &mut Negotiated,
    opt: u32,
    data: &[u8],
) -> Result<Next, HandshakeError> {
    let set = opt == OPT_SET_META_CONTEXT;
    if set {
        // Replaced even if this request fails.
        state.base_allocation = false;
    }
    if !state.structured {
        r.error(opt, REP_ERR_INVALID, "negotiate structured replies first")?;
        return Ok(Next::Continue);
    }
    let mut p = Payload { data };
    let parsed = (|| {
        let name = p.string()?;
        let n = p.u32()?;
        let mut queries = Vec::new();
        for _ in 0..n {
            queries.push(p.string()?);
        }
        p.done().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        r.error(opt, REP_ERR_INVALID, "malformed meta context request")?;
        return Ok(Next::Continue);
    };
    if !export.matches(name) {
        r.error(
            opt,
            REP_ERR_UNKNOWN,
            &format!("no export named {:?}", String::from_utf8_lossy(name)),
        )?;
        return Ok(Next::Continue);
    }
    let selects =
        |q: &[u8]| q == BASE_ALLOCATION.as_bytes() || (!set && (q == b"base:" || q == b"base:*"));
    // Listing with no query lists everything there is.
    let found = if queries.is_empty() {
        !set
    } else {
        queries.iter().any(|q| selects(q))
    };
    if found {
        let id: u32 = if set { BASE_ALLOCATION_ID } else { 0 };
        r.reply(
            opt,
            REP_META_CONTEXT,
            &[&id.to_be_bytes(), BASE_ALLOCATION.as_bytes()],
        );
        if set {
            state.base_allocation = true;
        }
    }
    r.reply(opt, REP_ACK, &[]);
    r.flush()?;
    Ok(Next::Continue)
}

/// A reader and a writer as one stream (for tests and the fuzzer: input
/// from a buffer, replies into another).
#[derive(Debug)]
pub struct Duplex<R, W> {
    r: R,
    w: W,
}

impl<R, W> Duplex<R, W> {
    /// Join `r` and `w`.
    pub fn new(r: R, w: W) -> Self {
        Duplex { r, w }
    }
}

impl<R: Read, W> Read for Duplex<R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}

impl<R, W: Write> Write for Duplex<R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

#[cfg(test)]
mod tests;
