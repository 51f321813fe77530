//! `handshake::negotiate` with arbitrary bytes as the client.
//!
//! The input is everything the client sends, from its flags on; the
//! server's output goes into a `Vec`. Besides "never panics", the output is
//! checked against a model of the client's side built from the input alone:
//!
//! - the greeting is exact, and the rest of the output is option replies
//!   (right magic, length fields that match) to the options the input sent,
//!   in order, each option's replies ending in exactly one ACK or error,
//!   and nothing after the option that ends the handshake;
//! - every reply is the one the protocol asks for (INFO_EXPORT carries the
//!   export's size and the flags later used, errors are UTF-8 strings of at
//!   most 4096 bytes, meta contexts only after structured replies);
//! - `Outcome::Transmission` happens only right after an `EXPORT_NAME` for
//!   the export or a `GO` answered with ACK, and its `Negotiated` is what
//!   the replies said (structured, `base:allocation`, block sizes, flags);
//! - every other ending (abort, EOF, protocol error, short read) matches
//!   where the input stopped.
//!
//! Each input is run against two exports: a named one with a description,
//! and a read-only one with the empty (default) name.
#![no_main]

use std::io::{self, Cursor};

use libfuzzer_sys::fuzz_target;
use userblk::nbd::proto::*;
use userblk::nbd::server::handshake::{
    negotiate, Duplex, Export, HandshakeError, Negotiated, Outcome, BASE_ALLOCATION_ID,
    MAX_OPTIONS, MAX_OPTION_LEN,
};
use userblk_fuzz::replies::{self, OptReply};

fuzz_target!(|data: &[u8]| {
    for export in exports() {
        let mut out = Vec::new();
        let mut input = Cursor::new(data);
        let result = negotiate(&mut Duplex::new(&mut input, &mut out), &export);
        check(data, &export, &out, &result);
    }
});

fn exports() -> [Export; 2] {
    let sizes = (512, 4096, 32 << 20);
    [
        Export {
            name: userblk_fuzz::wire::EXPORT_NAME.into(),
            description: "a fuzzed export".into(),
            size: 0x1234_5600,
            flags: FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_CACHE
                | FLAG_CAN_MULTI_CONN,
            block_sizes: sizes,
        },
        Export {
            name: String::new(),
            description: String::new(),
            size: 1 << 20,
            flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
            block_sizes: sizes,
        },
    ]
}

/// One option as the client sent it.
struct ClientOpt<'a> {
    opt: u32,
    data: &'a [u8],
}

/// Why the server stops reading options if no option ends the handshake first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The input ends before flags or between options (or inside an option's magic).
    Eof,
    /// Unknown client flags.
    BadFlags,
    /// An option without `IHAVEOPT`.
    BadMagic,
    /// An option longer than the server accepts.
    TooLong,
    /// The input ends inside an option's header or data.
    Truncated,
    /// More options than the server accepts.
    TooMany,
}

/// The client's side, read from the input alone.
struct Client<'a> {
    no_zeroes: bool,
    opts: Vec<ClientOpt<'a>>,
    end: End,
}

fn parse_client(data: &[u8]) -> Client<'_> {
    let mut c = Client {
        no_zeroes: false,
        opts: Vec::new(),
        end: End::Eof,
    };
    let Some((flags, mut p)) = data.split_first_chunk::<4>() else {
        return c;
    };
    let flags = u32::from_be_bytes(*flags);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        c.end = End::BadFlags;
        return c;
    }
    c.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
    c.end = loop {
        if c.opts.len() == MAX_OPTIONS {
            break End::TooMany;
        }
        let Some((magic, rest)) = p.split_first_chunk::<8>() else {
            break End::Eof;
        };
        if u64::from_be_bytes(*magic) != IHAVEOPT {
            break End::BadMagic;
        }
        let Some((opt, rest)) = rest.split_first_chunk::<4>() else {
            break End::Truncated;
        };
        let Some((len, rest)) = rest.split_first_chunk::<4>() else {
            break End::Truncated;
        };
        let len = u32::from_be_bytes(*len);
        if len > MAX_OPTION_LEN {
            break End::TooLong;
        }
        if rest.len() < len as usize {
            break End::Truncated;
        }
        let (data, rest) = rest.split_at(len as usize);
        c.opts.push(ClientOpt {
            opt: u32::from_be_bytes(*opt),
            data,
        });
        p = rest;
    };
    c
}

/// What the replies so far have agreed to.
#[derive(Default)]
struct Agreed {
    structured: bool,
    base_allocation: bool,
}

fn check(data: &[u8], export: &Export, out: &[u8], result: &Result<Outcome, HandshakeError>) {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    assert!(
        out.starts_with(&hello),
        "greeting {:02x?}",
        &out[..out.len().min(18)]
    );
    let mut o = &out[hello.len()..];
    let client = parse_client(data);
    let mut agreed = Agreed::default();
    for (i, op) in client.opts.iter().enumerate() {
        let ctx = format!(
            "option #{i} ({}, {} bytes)",
            option_name(op.opt),
            op.data.len()
        );
        if op.opt == OPT_EXPORT_NAME {
            if !matches_export(export, op.data) {
                assert!(o.is_empty(), "{ctx}: unknown export, yet replies {o:02x?}");
                assert!(
                    matches!(result, Err(HandshakeError::Protocol(_))),
                    "{ctx}: unknown export must hang up, got {result:?}"
                );
                return;
            }
            let n = transmission(result, &ctx);
            let mut tail = export.size.to_be_bytes().to_vec();
            tail.extend_from_slice(&n.flags.to_be_bytes());
            if !client.no_zeroes {
                tail.resize(tail.len() + 124, 0);
            }
            assert_eq!(o, &tail[..], "{ctx}: export data");
            check_negotiated(export, &agreed, &n, false, &ctx);
            return;
        }
        let replies = take_replies(&mut o, op.opt, &ctx);
        if let Some(n) = answer(export, &mut agreed, op, &replies, &ctx) {
            assert_eq!(
                result.as_ref().ok(),
                Some(&Outcome::Transmission(n)),
                "{ctx}"
            );
            assert!(o.is_empty(), "{ctx}: bytes after GO's ACK: {o:02x?}");
            return;
        }
        if op.opt == OPT_ABORT {
            assert!(
                matches!(result, Ok(Outcome::Closed)),
                "{ctx}: abort gave {result:?}"
            );
            assert!(o.is_empty(), "{ctx}: bytes after ABORT's ACK: {o:02x?}");
            return;
        }
    }
    assert!(o.is_empty(), "replies to options never sent: {o:02x?}");
    let ok = match client.end {
        End::Eof => matches!(result, Ok(Outcome::Closed)),
        End::BadFlags | End::BadMagic | End::TooLong | End::TooMany => {
            matches!(result, Err(HandshakeError::Protocol(_)))
        }
        End::Truncated => {
            matches!(result, Err(HandshakeError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof)
        }
    };
    assert!(
        ok,
        "input ends with {:?}, handshake gave {result:?}",
        client.end
    );
}

fn matches_export(export: &Export, name: &[u8]) -> bool {
    name.is_empty() || name == export.name.as_bytes()
}

fn transmission(result: &Result<Outcome, HandshakeError>, ctx: &str) -> Negotiated {
    match result {
        Ok(Outcome::Transmission(n)) => *n,
        other => panic!("{ctx}: expected transmission, got {other:?}"),
    }
}

/// The transmission flags the export must announce once `agreed`.
fn flags_for(export: &Export, agreed: &Agreed) -> u16 {
    let df = if agreed.structured { FLAG_SEND_DF } else { 0 };
    export.flags | FLAG_HAS_FLAGS | df
}

fn check_negotiated(export: &Export, agreed: &Agreed, n: &Negotiated, sizes: bool, ctx: &str) {
    assert_eq!(n.structured, agreed.structured, "{ctx}: structured");
    assert_eq!(
        n.base_allocation, agreed.base_allocation,
        "{ctx}: base:allocation"
    );
    assert!(
        !n.base_allocation || n.structured,
        "{ctx}: meta context without structured replies"
    );
    assert_eq!(n.block_size_agreed, sizes, "{ctx}: block sizes agreed");
    assert_eq!(
        n.flags,
        flags_for(export, agreed),
        "{ctx}: transmission flags"
    );
}

/// The replies to one option, up to and including its ACK or error.
fn take_replies<'a>(o: &mut &'a [u8], opt: u32, ctx: &str) -> Vec<OptReply<'a>> {
    let mut v = Vec::new();
    loop {
        let r = match replies::opt_reply(o) {
            Ok(Some(r)) => r,
            Ok(None) => panic!("{ctx}: replies end without ACK or error: {v:?}"),
            Err(e) => panic!("{ctx}: {e}"),
        };
        assert_eq!(r.opt, opt, "{ctx}: reply {r:?} names another option");
        if r.kind & REP_FLAG_ERROR != 0 {
            assert!(
                std::str::from_utf8(r.data).is_ok(),
                "{ctx}: error message not UTF-8"
            );
            // Messages quote the client's input: still within the limit.
            let n = r.data.len();
            assert!(n <= MAX_STRING, "{ctx}: error message of {n} bytes");
        }
        let done = r.is_final();
        v.push(r);
        if done {
            return v;
        }
    }
}

fn only_error(replies: &[OptReply<'_>], kind: u32, ctx: &str) {
    assert_eq!(replies.len(), 1, "{ctx}: {replies:?}");
    assert_eq!(replies[0].kind, kind, "{ctx}: {replies:?}");
}

/// Check the replies to `op`; `Some` when they end the handshake (a GO's ACK).
fn answer(
    export: &Export,
    agreed: &mut Agreed,
    op: &ClientOpt<'_>,
    replies: &[OptReply<'_>],
    ctx: &str,
) -> Option<Negotiated> {
    let last = replies[replies.len() - 1];
    match op.opt {
        OPT_ABORT => {
            assert_eq!(replies.len(), 1, "{ctx}: {replies:?}");
            assert!(
                last.kind == REP_ACK && last.data.is_empty(),
                "{ctx}: {last:?}"
            );
        }
        OPT_LIST if !op.data.is_empty() => only_error(replies, REP_ERR_INVALID, ctx),
        OPT_LIST => {
            assert_eq!(replies.len(), 2, "{ctx}: {replies:?}");
            let s = replies[0];
            assert_eq!(s.kind, REP_SERVER, "{ctx}");
            let (len, name) = s
                .data
                .split_first_chunk::<4>()
                .expect("REP_SERVER too short");
            let len = u32::from_be_bytes(*len) as usize;
            assert!(len <= name.len(), "{ctx}: name length {len} past the reply");
            assert_eq!(&name[..len], export.name.as_bytes(), "{ctx}");
            assert_eq!(last.kind, REP_ACK, "{ctx}");
        }
        OPT_STRUCTURED_REPLY if !op.data.is_empty() => only_error(replies, REP_ERR_INVALID, ctx),
        OPT_STRUCTURED_REPLY => {
            assert_eq!(replies.len(), 1, "{ctx}: {replies:?}");
            assert_eq!(last.kind, REP_ACK, "{ctx}");
            agreed.structured = true;
        }
        OPT_INFO | OPT_GO => return info_or_go(export, agreed, op, replies, ctx),
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            meta_context(export, agreed, op, replies, ctx)
        }
        OPT_STARTTLS => only_error(replies, REP_ERR_UNSUP, ctx),
        _ => only_error(replies, REP_ERR_UNSUP, ctx),
    }
    None
}

/// A protocol string: 32-bit length, at most 4096 bytes.
fn take_string<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, rest) = p.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len) as usize;
    if len > MAX_STRING || len > rest.len() {
        return None;
    }
    let (s, rest) = rest.split_at(len);
    *p = rest;
    Some(s)
}

/// `NBD_OPT_INFO`/`GO` data: name and information types, nothing after.
fn parse_info(mut p: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name = take_string(&mut p)?;
    let (n, mut rest) = p.split_first_chunk::<2>()?;
    let mut infos = Vec::new();
    for _ in 0..u16::from_be_bytes(*n) {
        let (i, r) = rest.split_first_chunk::<2>()?;
        infos.push(u16::from_be_bytes(*i));
        rest = r;
    }
    rest.is_empty().then_some((name, infos))
}

/// Meta context data: name and queries, nothing after.
fn parse_meta(mut p: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let name = take_string(&mut p)?;
    let (n, rest) = p.split_first_chunk::<4>()?;
    p = rest;
    let mut queries = Vec::new();
    for _ in 0..u32::from_be_bytes(*n) {
        queries.push(take_string(&mut p)?);
    }
    p.is_empty().then_some((name, queries))
}

fn info_or_go(
    export: &Export,
    agreed: &Agreed,
    op: &ClientOpt<'_>,
    replies: &[OptReply<'_>],
    ctx: &str,
) -> Option<Negotiated> {
    let Some((name, infos)) = parse_info(op.data) else {
        only_error(replies, REP_ERR_INVALID, ctx);
        return None;
    };
    if !matches_export(export, name) {
        only_error(replies, REP_ERR_UNKNOWN, ctx);
        return None;
    }
    let (last, infos_sent) = replies.split_last().expect("at least one reply");
    assert_eq!(last.kind, REP_ACK, "{ctx}: {last:?}");
    let mut export_info = None;
    let mut sizes = None;
    let mut named = false;
    let mut described = false;
    for r in infos_sent {
        assert_eq!(r.kind, REP_INFO, "{ctx}: {r:?}");
        let (t, d) = r
            .data
            .split_first_chunk::<2>()
            .expect("REP_INFO without a type");
        match u16::from_be_bytes(*t) {
            INFO_EXPORT => {
                assert!(export_info.is_none() && d.len() == 10, "{ctx}: {r:?}");
                export_info = Some(d);
            }
            INFO_BLOCK_SIZE => {
                assert!(sizes.is_none() && d.len() == 12, "{ctx}: {r:?}");
                sizes = Some(d);
            }
            INFO_NAME => {
                assert!(!named && d == export.name.as_bytes(), "{ctx}: {r:?}");
                named = true;
            }
            INFO_DESCRIPTION => {
                assert!(
                    !described && d == export.description.as_bytes(),
                    "{ctx}: {r:?}"
                );
                described = true;
            }
            t => panic!("{ctx}: unknown information type {t}"),
        }
    }
    assert_eq!(named, infos.contains(&INFO_NAME), "{ctx}: INFO_NAME");
    let want_desc = infos.contains(&INFO_DESCRIPTION) && !export.description.is_empty();
    assert_eq!(described, want_desc, "{ctx}: INFO_DESCRIPTION");
    let info = export_info.unwrap_or_else(|| panic!("{ctx}: no INFO_EXPORT"));
    assert_eq!(&info[..8], &export.size.to_be_bytes(), "{ctx}: size");
    let flags = u16::from_be_bytes([info[8], info[9]]);
    assert_eq!(flags, flags_for(export, agreed), "{ctx}: flags");
    // Block sizes are always sent (the server's choice, allowed by the spec).
    let sizes = sizes.unwrap_or_else(|| panic!("{ctx}: no INFO_BLOCK_SIZE"));
    let (min, pref, max) = export.block_sizes;
    let mut want = min.to_be_bytes().to_vec();
    want.extend_from_slice(&pref.to_be_bytes());
    want.extend_from_slice(&max.to_be_bytes());
    assert_eq!(sizes, &want[..], "{ctx}: block sizes");
    if op.opt != OPT_GO {
        return None;
    }
    let n = Negotiated {
        structured: agreed.structured,
        base_allocation: agreed.base_allocation,
        block_size_agreed: infos.contains(&INFO_BLOCK_SIZE),
        flags,
    };
    check_negotiated(export, agreed, &n, n.block_size_agreed, ctx);
    Some(n)
}

fn meta_context(
    export: &Export,
    agreed: &mut Agreed,
    op: &ClientOpt<'_>,
    replies: &[OptReply<'_>],
    ctx: &str,
) {
    let set = op.opt == OPT_SET_META_CONTEXT;
    if set {
        // SET replaces the selection, whatever its outcome.
        agreed.base_allocation = false;
    }
    if !agreed.structured {
        only_error(replies, REP_ERR_INVALID, ctx);
        return;
    }
    let Some((name, queries)) = parse_meta(op.data) else {
        only_error(replies, REP_ERR_INVALID, ctx);
        return;
    };
    if !matches_export(export, name) {
        only_error(replies, REP_ERR_UNKNOWN, ctx);
        return;
    }
    let (last, contexts) = replies.split_last().expect("at least one reply");
    assert_eq!(last.kind, REP_ACK, "{ctx}: {last:?}");
    assert!(contexts.len() <= 1, "{ctx}: {replies:?}");
    let exact = queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes());
    let listed = match contexts.first() {
        None => false,
        Some(r) => {
            assert_eq!(r.kind, REP_META_CONTEXT, "{ctx}: {r:?}");
            let (id, name) = r
                .data
                .split_first_chunk::<4>()
                .expect("short REP_META_CONTEXT");
            assert_eq!(name, BASE_ALLOCATION.as_bytes(), "{ctx}: {r:?}");
            let id = u32::from_be_bytes(*id);
            // SET names the id block status replies will use; LIST SHOULD say 0.
            assert_eq!(id, if set { BASE_ALLOCATION_ID } else { 0 }, "{ctx}: {r:?}");
            true
        }
    };
    if set {
        assert_eq!(listed, exact, "{ctx}: selection of {queries:?}");
        agreed.base_allocation = listed;
    } else if queries.is_empty() || exact {
        assert!(listed, "{ctx}: list of {queries:?} misses base:allocation");
    } else {
        // A namespace query ("base:", "base:*") may list it; nothing else may.
        let wild = queries.iter().any(|q| q.starts_with(b"base:"));
        assert!(wild || !listed, "{ctx}: {queries:?} listed base:allocation");
    }
}
