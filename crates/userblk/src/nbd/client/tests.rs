use super::handshake::OLDSTYLE_MAGIC;
use super::*;
use crate::nbd::proto;
use crate::target::{Flags, Op, Request};
use std::io::Cursor;
use std::io::{self, Read, Write};

// ---- URIs ----

fn tcp(host: &str, port: u16) -> Addr {
    Addr::Tcp {
        host: host.into(),
        port,
    }
}

#[test]
fn uri_tcp_forms() {
    for (text, addr, export) in [
        ("nbd://example.com/disk", tcp("example.com", 10809), "disk"),
        ("nbd://example.com", tcp("example.com", 10809), ""),
        ("nbd://example.com/", tcp("example.com", 10809), ""),
        (
            "nbd://example.com//disk",
            tcp("example.com", 10809),
            "/disk",
        ),
        (
            "nbd://example.com/hello%20world",
            tcp("example.com", 10809),
            "hello world",
        ),
        ("nbd://127.0.0.1:10810/a/b", tcp("127.0.0.1", 10810), "a/b"),
        ("nbd://[::1]:2000/x", tcp("::1", 2000), "x"),
        ("nbd://[fe80::1]/", tcp("fe80::1", 10809), ""),
        ("NBD://h:1", tcp("h", 1), ""),
    ] {
        let u = NbdUri::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(u.addr, addr, "{text}");
        assert_eq!(u.export, export, "{text}");
        assert_eq!(u.to_string(), text);
    }
}

#[test]
fn uri_unix_forms() {
    let u = NbdUri::parse("nbd+unix:///disk?socket=/run/nbd.sock").unwrap();
    assert_eq!(u.addr, Addr::Unix(UnixPath::File("/run/nbd.sock".into())));
    assert_eq!(u.export, "disk");
    let u = NbdUri::parse("nbd+unix://?socket=/tmp/a%20b").unwrap();
    assert_eq!(u.addr, Addr::Unix(UnixPath::File("/tmp/a b".into())));
    assert_eq!(u.export, "");
    let u = NbdUri::parse("nbd+unix:///?socket=%00abstract").unwrap();
    assert_eq!(u.addr, Addr::Unix(UnixPath::Abstract(b"abstract".to_vec())));
    let u: NbdUri = "nbd+unix:///x?socket=rel.sock".parse().unwrap();
    assert_eq!(u.addr, Addr::Unix(UnixPath::File("rel.sock".into())));
}

#[test]
fn uri_errors_say_what_is_wrong() {
    for (text, says) in [
        ("example.com/disk", "expected nbd://"),
        ("http://example.com/", "unknown scheme"),
        ("nbds://example.com/", "TLS is not supported"),
        ("nbds+unix:///?socket=/s", "TLS is not supported"),
        ("nbd+vsock://1/", "vsock"),
        ("nbd:///disk", "no host"),
        ("nbd://:10809/disk", "no host"),
        ("nbd://h:0/", "bad port"),
        ("nbd://h:65536/", "bad port"),
        ("nbd://h:x/", "bad port"),
        ("nbd://::1/", "brackets"),
        ("nbd://[::1/", "closing ]"),
        ("nbd://[::1]x/", "expected :PORT"),
        ("nbd://user@h/", "TLS"),
        ("nbd://h/%zz", "bad percent escape"),
        ("nbd://h/%4", "bad percent escape"),
        ("nbd://h/a%00b", "NUL"),
        ("nbd://h/%ff", "not UTF-8"),
        ("nbd://h/?socket=/s", "unknown query parameter"),
        ("nbd://h/?tls-type=x509", "TLS"),
        ("nbd://h/#frag", "fragment"),
        ("nbd+unix:///disk", "?socket=PATH"),
        ("nbd+unix:///disk?socket=", "empty"),
        ("nbd+unix://host/disk?socket=/s", "take no host"),
        ("nbd+unix:///?socket=/s&x-foo=1", "unknown query parameter"),
    ] {
        match NbdUri::parse(text) {
            Ok(u) => panic!("{text} parsed as {u:?}"),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains(says), "{text}: {msg:?} lacks {says:?}");
                assert!(msg.contains(text), "{text}: {msg:?} does not quote the URI");
            }
        }
    }
    let long = format!("nbd://h/{}", "a".repeat(proto::MAX_STRING + 1));
    assert!(NbdUri::parse(&long)
        .unwrap_err()
        .to_string()
        .contains("at most"));
}

// ---- handshake against scripted servers ----

/// A server that says `input` and records what the client sends.
struct Script {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Script {
    fn new(input: Vec<u8>) -> Self {
        Script {
            input: Cursor::new(input),
            output: Vec::new(),
        }
    }
}

impl Read for Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn greeting(flags: u16) -> Vec<u8> {
    let mut v = proto::NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&flags.to_be_bytes());
    v
}

fn opt_reply(v: &mut Vec<u8>, option: u32, reply: u32, payload: &[u8]) {
    v.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply.to_be_bytes());
    v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    v.extend_from_slice(payload);
}

fn info_export(v: &mut Vec<u8>, size: u64, flags: u16) {
    let mut p = proto::INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&size.to_be_bytes());
    p.extend_from_slice(&flags.to_be_bytes());
    opt_reply(v, proto::OPT_GO, proto::REP_INFO, &p);
}

const BOTH: u16 = proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES;
const FLAGS: u16 = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FLUSH | proto::FLAG_SEND_TRIM;

fn run(input: Vec<u8>, export: &str) -> (std::result::Result<ExportInfo, ClientError>, Vec<u8>) {
    let mut s = Script::new(input);
    let r = negotiate(&mut s, export);
    (r, s.output)
}

#[test]
fn go_with_block_sizes() {
    let mut v = greeting(BOTH);
    opt_reply(
        &mut v,
        proto::OPT_GO,
        proto::REP_INFO,
        &[0, 1, b'd', b'i', b's', b'k'],
    );
    info_export(&mut v, 64 << 20, FLAGS);
    let mut bs = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for w in [512u32, 4096, 1 << 20] {
        bs.extend_from_slice(&w.to_be_bytes());
    }
    opt_reply(&mut v, proto::OPT_GO, proto::REP_INFO, &bs);
    opt_reply(&mut v, proto::OPT_GO, proto::REP_ACK, &[]);
    let (r, out) = run(v, "disk");
    let info = r.unwrap();
    assert_eq!(info.size, 64 << 20);
    assert_eq!(info.flags, FLAGS);
    assert!(info.has(proto::FLAG_SEND_TRIM) && !info.has(proto::FLAG_SEND_FUA));
    assert_eq!(
        info.block_sizes,
        Some(BlockSizes {
            min: 512,
            preferred: 4096,
            max: 1 << 20
        })
    );
    // Client flags, then NBD_OPT_GO "disk" asking for NBD_INFO_BLOCK_SIZE.
    let mut want = 3u32.to_be_bytes().to_vec();
    want.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    want.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    want.extend_from_slice(&12u32.to_be_bytes());
    want.extend_from_slice(&4u32.to_be_bytes());
    want.extend_from_slice(b"disk");
    want.extend_from_slice(&[0, 1, 0, 3]);
    assert_eq!(out, want);
}

#[test]
fn go_unsupported_falls_back_to_export_name() {
    let mut v = greeting(BOTH);
    opt_reply(&mut v, proto::OPT_GO, proto::REP_ERR_UNSUP, b"what?");
    v.extend_from_slice(&(1u64 << 30).to_be_bytes());
    v.extend_from_slice(&FLAGS.to_be_bytes());
    let (r, out) = run(v, "x");
    let info = r.unwrap();
    assert_eq!(
        (info.size, info.flags, info.block_sizes),
        (1 << 30, FLAGS, None)
    );
    let tail = &out[out.len() - 17..];
    assert_eq!(&tail[..8], &proto::IHAVEOPT.to_be_bytes());
    assert_eq!(&tail[8..12], &proto::OPT_EXPORT_NAME.to_be_bytes());
    assert_eq!(&tail[12..16], &1u32.to_be_bytes());
    assert_eq!(&tail[16..], b"x");
}

#[test]
fn plain_newstyle_uses_export_name_with_zeroes() {
    let mut v = greeting(0);
    v.extend_from_slice(&4096u64.to_be_bytes());
    v.extend_from_slice(&proto::FLAG_HAS_FLAGS.to_be_bytes());
    v.extend_from_slice(&[0u8; 124]);
    let (r, out) = run(v.clone(), "");
    assert_eq!(r.unwrap().size, 4096);
    assert_eq!(
        &out[..4],
        &0u32.to_be_bytes(),
        "no client flags for a plain server"
    );
    // Without the 124 zeroes the client must wait for them, and see EOF.
    v.truncate(v.len() - 1);
    assert!(matches!(run(v, "").0, Err(ClientError::Closed { .. })));
}

#[test]
fn export_name_hangup_names_the_export() {
    let v = greeting(proto::FLAG_NO_ZEROES);
    let e = run(v, "missing").0.unwrap_err();
    assert!(matches!(e, ClientError::ExportNameRefused { .. }), "{e:?}");
    assert!(e.to_string().contains("\"missing\""));
}

#[test]
fn error_reply_names_the_error_and_keeps_a_clean_message() {
    let mut v = greeting(BOTH);
    opt_reply(
        &mut v,
        proto::OPT_GO,
        proto::REP_ERR_UNKNOWN,
        b"export 'x' not present\x1b[2J\n",
    );
    let e = run(v, "x").0.unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("NBD_REP_ERR_UNKNOWN"), "{msg}");
    assert!(msg.contains("NBD_OPT_GO"), "{msg}");
    assert!(msg.contains("export 'x' not present"), "{msg}");
    assert!(!msg.contains('\x1b') && !msg.contains('\n'), "{msg:?}");
}

#[test]
fn hostile_handshakes_are_errors() {
    type Check = fn(&ClientError) -> bool;
    let mut cases: Vec<(&str, Vec<u8>, Check)> = Vec::new();

    let mut v = b"HTTP/1.1".to_vec();
    v.extend_from_slice(&[0; 10]);
    cases.push(("not nbd", v, |e| matches!(e, ClientError::NotNbd(_))));

    let mut v = proto::NBDMAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
    v.extend_from_slice(&[0; 20]);
    cases.push(("oldstyle", v, |e| matches!(e, ClientError::Oldstyle)));

    cases.push((
        "truncated greeting",
        proto::NBDMAGIC.to_be_bytes()[..5].to_vec(),
        |e| matches!(e, ClientError::Closed { .. }),
    ));

    // A length of 4 GiB - 1: must be refused before allocating it.
    let mut v = greeting(BOTH);
    v.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&proto::OPT_GO.to_be_bytes());
    v.extend_from_slice(&proto::REP_INFO.to_be_bytes());
    v.extend_from_slice(&u32::MAX.to_be_bytes());
    cases.push(("oversized reply", v, |e| {
        matches!(e, ClientError::ReplyTooLong { len: u32::MAX, .. })
    }));

    let mut v = greeting(BOTH);
    v.extend_from_slice(&0xdead_beef_u64.to_be_bytes());
    v.extend_from_slice(&[0; 12]);
    cases.push(("bad option magic", v, |e| {
        matches!(e, ClientError::BadOptionMagic(0xdead_beef))
    }));

    let mut v = greeting(BOTH);
    opt_reply(&mut v, proto::OPT_LIST, proto::REP_ACK, &[]);
    cases.push(("wrong option", v, |e| {
        matches!(e, ClientError::WrongOption { .. })
    }));

    let mut v = greeting(BOTH);
    opt_reply(&mut v, proto::OPT_GO, proto::REP_ACK, &[]);
    cases.push(("ack without size", v, |e| {
        matches!(e, ClientError::NoExportInfo)
    }));

    let mut v = greeting(BOTH);
    opt_reply(&mut v, proto::OPT_GO, proto::REP_INFO, &[0]);
    cases.push(("one-byte info", v, |e| {
        matches!(e, ClientError::BadInfo { .. })
    }));

    let mut v = greeting(BOTH);
    opt_reply(&mut v, proto::OPT_GO, proto::REP_INFO, &[0, 0, 1, 2, 3]);
    cases.push(("short export info", v, |e| {
        matches!(e, ClientError::BadInfo { info: 0, len: 5 })
    }));

    let mut v = greeting(BOTH);
    let mut long = vec![0, 0];
    long.extend_from_slice(&[0; 11]);
    opt_reply(&mut v, proto::OPT_GO, proto::REP_INFO, &long);
    cases.push(("long export info", v, |e| {
        matches!(e, ClientError::BadInfo { info: 0, len: 13 })
    }));

    let mut v = greeting(BOTH);
    opt_reply(&mut v, proto::OPT_GO, proto::REP_INFO, &[0, 3, 0, 0, 2, 0]);
    cases.push(("short block sizes", v, |e| {
        matches!(e, ClientError::BadInfo { info: 3, .. })
    }));

    let mut v = greeting(BOTH);
    opt_reply(&mut v, proto::OPT_GO, proto::REP_SERVER, &[0, 0, 0, 0]);
    cases.push(("unexpected reply", v, |e| {
        matches!(e, ClientError::UnexpectedReply { .. })
    }));

    let mut v = greeting(BOTH);
    info_export(&mut v, 1 << 20, FLAGS);
    v.truncate(v.len() - 3);
    cases.push(("truncated info", v, |e| {
        matches!(e, ClientError::Closed { .. })
    }));

    for (what, input, check) in cases {
        let e = run(input, "x").0.expect_err(what);
        assert!(check(&e), "{what}: got {e:?}");
        assert!(!e.to_string().is_empty());
    }
}

proptest::proptest! {
    /// Whatever follows a valid greeting, negotiation ends in a value or an error.
    #[test]
    fn negotiate_never_panics(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
                              reply in 0u32..8, ty in 0u16..5) {
        let mut v = greeting(BOTH);
        // Often a well-formed reply header, so the parser gets past the magic.
        v.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        v.extend_from_slice(&(reply | if reply > 4 { proto::REP_FLAG_ERROR } else { 0 }).to_be_bytes());
        v.extend_from_slice(&u32::try_from(tail.len() + 2).unwrap().to_be_bytes());
        v.extend_from_slice(&ty.to_be_bytes());
        v.extend_from_slice(&tail);
        let _ = run(v, "x");
    }
}

// ---- transmission ----

#[test]
fn request_header_bytes() {
    let b = encode_request(
        proto::CMD_WRITE,
        proto::CMD_FLAG_FUA,
        0x0102_0304_0506_0708,
        4096,
        512,
    );
    assert_eq!(
        b,
        [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // NBD_CMD_WRITE
            1, 2, 3, 4, 5, 6, 7, 8, // cookie
            0, 0, 0, 0, 0, 0, 0x10, 0, // offset 4096
            0, 0, 2, 0, // length 512
        ]
    );
}

#[test]
fn commands_and_flags() {
    let all = proto::FLAG_HAS_FLAGS | proto::FLAG_SEND_FUA;
    let w = Request::new(Op::Write, 0, 512).with_flags(Flags::FUA);
    assert_eq!(command(&w, all), (proto::CMD_WRITE, proto::CMD_FLAG_FUA));
    assert_eq!(command(&w, proto::FLAG_HAS_FLAGS), (proto::CMD_WRITE, 0));
    assert_eq!(
        command(&Request::new(Op::Read, 0, 512), all),
        (proto::CMD_READ, 0)
    );
    assert_eq!(
        command(&Request::new(Op::Flush, 0, 0), all),
        (proto::CMD_FLUSH, 0)
    );
    assert_eq!(
        command(&Request::new(Op::Discard, 0, 512), all),
        (proto::CMD_TRIM, 0)
    );
    let z = Request::new(Op::WriteZeroes, 0, 512);
    assert_eq!(command(&z, all), (proto::CMD_WRITE_ZEROES, 0));
    assert_eq!(
        command(&z.with_flags(Flags::NOUNMAP), all),
        (proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE)
    );
}

#[test]
fn replies_good_and_hostile() {
    let mut v = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&proto::EIO.to_be_bytes());
    v.extend_from_slice(&42u64.to_be_bytes());
    assert_eq!(
        read_reply(&mut Cursor::new(v)).unwrap(),
        Reply {
            error: proto::EIO,
            cookie: 42
        }
    );
    let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&[0; 12]);
    assert!(matches!(
        read_reply(&mut Cursor::new(v)),
        Err(ClientError::UnexpectedStructured)
    ));
    let v = vec![0xff; 16];
    assert!(matches!(
        read_reply(&mut Cursor::new(v)),
        Err(ClientError::BadReplyMagic(u32::MAX))
    ));
    let v = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    assert!(matches!(
        read_reply(&mut Cursor::new(v)),
        Err(ClientError::Closed { .. })
    ));
}
