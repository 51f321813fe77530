#![allow(clippy::cast_possible_truncation, clippy::unwrap_used)]

use std::io::Cursor;

use super::*;

fn export() -> Export {
    Export {
        name: "disk".into(),
        description: "a test disk".into(),
        size: 1 << 20,
        flags: FLAG_HAS_FLAGS | FLAG_SEND_FLUSH,
        block_sizes: (512, 4096, 32 << 20),
    }
}

/// Client bytes: flags then options.
struct Client(Vec<u8>);

impl Client {
    fn new(flags: u32) -> Self {
        Client(flags.to_be_bytes().to_vec())
    }
    fn opt(mut self, opt: u32, data: &[u8]) -> Self {
        self.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
        self.0.extend_from_slice(&opt.to_be_bytes());
        self.0
            .extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
        self.0.extend_from_slice(data);
        self
    }
    fn run(self) -> (Result<Outcome, HandshakeError>, Vec<u8>) {
        let mut out = Vec::new();
        let mut input = Cursor::new(self.0);
        let r = negotiate(&mut Duplex::new(&mut input, &mut out), &export());
        (r, out)
    }
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

/// Option replies after the 18-byte greeting: (option, type, data).
fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    let mut p = &out[18..];
    while p.len() >= 20 {
        assert_eq!(&p[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
        let kind = u32::from_be_bytes([p[12], p[13], p[14], p[15]]);
        let len = u32::from_be_bytes([p[16], p[17], p[18], p[19]]) as usize;
        v.push((opt, kind, p[20..20 + len].to_vec()));
        p = &p[20 + len..];
    }
    v
}

const FIXED: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

#[test]
fn greeting_is_fixed_newstyle() {
    let (r, out) = Client::new(FIXED).opt(OPT_ABORT, &[]).run();
    assert_eq!(r.unwrap(), Outcome::Closed);
    assert_eq!(&out[..8], &NBDMAGIC.to_be_bytes());
    assert_eq!(&out[8..16], &IHAVEOPT.to_be_bytes());
    assert_eq!(
        u16::from_be_bytes([out[16], out[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    assert_eq!(replies(&out), vec![(OPT_ABORT, REP_ACK, vec![])]);
}

#[test]
fn unknown_client_flags_close() {
    let (r, _) = Client::new(1 << 5).run();
    assert!(matches!(r, Err(HandshakeError::Protocol(_))));
}

#[test]
fn go_describes_the_export() {
    let (r, out) = Client::new(FIXED)
        .opt(OPT_STRUCTURED_REPLY, &[])
        .opt(
            OPT_GO,
            &go_data("disk", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION]),
        )
        .run();
    let Outcome::Transmission(n) = r.unwrap() else {
        panic!("no transmission");
    };
    assert!(n.structured && n.block_size_agreed && !n.base_allocation);
    assert_ne!(n.flags & FLAG_SEND_DF, 0);
    let reps = replies(&out);
    assert_eq!(reps[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
    let infos: Vec<_> = reps[1..].iter().filter(|r| r.1 == REP_INFO).collect();
    let export_info = infos
        .iter()
        .find(|r| r.2[..2] == INFO_EXPORT.to_be_bytes())
        .unwrap();
    assert_eq!(&export_info.2[2..10], &(1u64 << 20).to_be_bytes());
    let bs = infos
        .iter()
        .find(|r| r.2[..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .unwrap();
    assert_eq!(bs.2.len(), 14);
    assert_eq!(&bs.2[2..6], &512u32.to_be_bytes());
    assert!(infos.iter().any(|r| r.2[2..] == *b"disk"));
    assert!(infos.iter().any(|r| r.2[2..] == *b"a test disk"));
    assert_eq!(reps.last().unwrap().1, REP_ACK);
}

#[test]
fn default_name_is_accepted_and_unknown_names_are_not() {
    let (r, _) = Client::new(FIXED).opt(OPT_GO, &go_data("", &[])).run();
    assert!(matches!(r.unwrap(), Outcome::Transmission(_)));
    let (r, out) = Client::new(FIXED)
        .opt(OPT_GO, &go_data("other", &[]))
        .opt(OPT_ABORT, &[])
        .run();
    assert_eq!(r.unwrap(), Outcome::Closed);
    assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);
    // EXPORT_NAME cannot be refused politely: the connection closes.
    let (r, _) = Client::new(FIXED).opt(OPT_EXPORT_NAME, b"other").run();
    assert!(matches!(r, Err(HandshakeError::Protocol(_))));
}

#[test]
fn export_name_sends_size_flags_and_maybe_zeroes() {
    let (r, out) = Client::new(FLAG_C_FIXED_NEWSTYLE)
        .opt(OPT_EXPORT_NAME, b"disk")
        .run();
    assert!(matches!(r.unwrap(), Outcome::Transmission(_)));
    assert_eq!(out.len(), 18 + 8 + 2 + 124);
    let (_, out) = Client::new(FIXED).opt(OPT_EXPORT_NAME, b"").run();
    assert_eq!(out.len(), 18 + 8 + 2);
    assert_eq!(&out[18..26], &(1u64 << 20).to_be_bytes());
}

#[test]
fn list_and_malformed_options() {
    let (_, out) = Client::new(FIXED)
        .opt(OPT_LIST, &[])
        .opt(OPT_LIST, b"x")
        .opt(OPT_GO, &[0, 0, 0, 9, b'a'])
        .opt(OPT_STRUCTURED_REPLY, b"junk")
        .opt(OPT_STARTTLS, &[])
        .opt(OPT_EXTENDED_HEADERS, &[])
        .opt(77, b"whatever")
        .opt(OPT_ABORT, &[])
        .run();
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        vec![
            REP_SERVER,
            REP_ACK,
            REP_ERR_INVALID,
            REP_ERR_INVALID,
            REP_ERR_INVALID,
            REP_ERR_UNSUP,
            REP_ERR_UNSUP,
            REP_ERR_UNSUP,
            REP_ACK
        ]
    );
    let server = &replies(&out)[0].2;
    assert_eq!(&server[..4], &4u32.to_be_bytes());
    assert_eq!(&server[4..8], b"disk");
}

#[test]
fn meta_context_needs_structured_replies() {
    let (_, out) = Client::new(FIXED)
        .opt(OPT_SET_META_CONTEXT, &meta_data("disk", &[BASE_ALLOCATION]))
        .opt(OPT_ABORT, &[])
        .run();
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
}

#[test]
fn base_allocation_is_selected_and_listed() {
    let (r, out) = Client::new(FIXED)
        .opt(OPT_STRUCTURED_REPLY, &[])
        .opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[]))
        .opt(
            OPT_SET_META_CONTEXT,
            &meta_data("disk", &["qemu:dirty-bitmap:x", BASE_ALLOCATION]),
        )
        .opt(OPT_GO, &go_data("disk", &[]))
        .run();
    let Outcome::Transmission(n) = r.unwrap() else {
        panic!("no transmission");
    };
    assert!(n.base_allocation && !n.block_size_agreed);
    let reps = replies(&out);
    assert_eq!(reps[1].1, REP_META_CONTEXT);
    assert_eq!(&reps[1].2[4..], BASE_ALLOCATION.as_bytes());
    assert_eq!(reps[2].1, REP_ACK);
    assert_eq!(reps[3].1, REP_META_CONTEXT);
    assert_eq!(&reps[3].2[..4], &BASE_ALLOCATION_ID.to_be_bytes());
    // A later SET that selects nothing clears the selection.
    let (r, _) = Client::new(FIXED)
        .opt(OPT_STRUCTURED_REPLY, &[])
        .opt(OPT_SET_META_CONTEXT, &meta_data("disk", &[BASE_ALLOCATION]))
        .opt(OPT_SET_META_CONTEXT, &meta_data("disk", &["base:"]))
        .opt(OPT_GO, &go_data("disk", &[]))
        .run();
    let Outcome::Transmission(n) = r.unwrap() else {
        panic!("no transmission");
    };
    assert!(!n.base_allocation);
}

#[test]
fn hostile_lengths_are_bounded() {
    // An option claiming 4 GiB of data: refused before reading it.
    let mut c = Client::new(FIXED);
    c.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
    c.0.extend_from_slice(&OPT_GO.to_be_bytes());
    c.0.extend_from_slice(&u32::MAX.to_be_bytes());
    let (r, _) = c.run();
    assert!(matches!(r, Err(HandshakeError::Protocol(_))));
    // A string length past the option's end: INVALID, not a panic.
    let (_, out) = Client::new(FIXED)
        .opt(OPT_GO, &[0xff, 0xff, 0xff, 0xff])
        .opt(OPT_STRUCTURED_REPLY, &[])
        .opt(OPT_SET_META_CONTEXT, &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff])
        .opt(OPT_ABORT, &[])
        .run();
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        vec![REP_ERR_INVALID, REP_ACK, REP_ERR_INVALID, REP_ACK]
    );
    // Bad magic in an option header.
    let mut c = Client::new(FIXED);
    c.0.extend_from_slice(&0xdead_beef_u64.to_be_bytes());
    c.0.extend_from_slice(&[0; 8]);
    assert!(matches!(c.run().0, Err(HandshakeError::Protocol(_))));
    // A client that vanishes halfway through an option.
    let mut c = Client::new(FIXED);
    c.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
    c.0.extend_from_slice(&OPT_GO.to_be_bytes());
    c.0.extend_from_slice(&100u32.to_be_bytes());
    c.0.extend_from_slice(&[0; 10]);
    assert!(matches!(c.run().0, Err(HandshakeError::Io(_))));
    // One that vanishes between options is simply gone.
    let (r, _) = Client::new(FIXED).run();
    assert_eq!(r.unwrap(), Outcome::Closed);
}

#[test]
fn error_messages_fit_the_string_limit() {
    // Control bytes are quoted escaped, five characters each: a long name
    // once made a 20 KB message.
    let name = "\u{1}".repeat(MAX_STRING);
    let meta = meta_data(&name, &["base:allocation"]);
    let (r, out) = Client::new(FIXED)
        .opt(OPT_GO, &go_data(&name, &[]))
        .opt(OPT_STRUCTURED_REPLY, &[])
        .opt(OPT_SET_META_CONTEXT, &meta)
        .opt(OPT_ABORT, &[])
        .run();
    assert_eq!(r.unwrap(), Outcome::Closed);
    let reps = replies(&out);
    let errors: Vec<_> = reps
        .iter()
        .filter(|(o, _, _)| *o == OPT_GO || *o == OPT_SET_META_CONTEXT)
        .collect();
    assert_eq!(errors.len(), 2, "{reps:?}");
    for (opt, kind, msg) in errors {
        assert_eq!(*kind, REP_ERR_UNKNOWN, "option {opt}");
        assert!(msg.len() <= MAX_STRING, "option {opt}: {} bytes", msg.len());
        assert!(std::str::from_utf8(msg).is_ok());
    }
}
