//! The seed corpus: short, valid conversations the fuzzer starts from, so
//! it spends its time on the interesting paths instead of rediscovering
//! the magic numbers. `examples/gen_seeds.rs` writes them to
//! `fuzz/corpus/<target>/<name>`.

use userblk::nbd::proto::*;

use crate::caps;
use crate::wire::{self, EXPORT_NAME};

/// One seed file: its name and contents.
pub type Seed = (&'static str, Vec<u8>);

/// Export size of the `nbd_server` harness (its `MemTarget`).
pub const SERVER_SIZE: u64 = 1 << 20;

/// Seeds of `nbd_handshake`: client bytes from the client flags on.
pub fn handshake() -> Vec<Seed> {
    let name = EXPORT_NAME.as_bytes();
    let fixed = FLAG_C_FIXED_NEWSTYLE;
    let both = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let mut v = Vec::new();

    let mut b = Vec::new();
    wire::client_flags(&mut b, fixed);
    wire::option(&mut b, OPT_ABORT, &[]);
    v.push(("abort", b));

    let mut b = Vec::new();
    wire::client_flags(&mut b, both);
    wire::option(&mut b, OPT_EXPORT_NAME, name);
    v.push(("export_name", b));

    let mut b = Vec::new();
    wire::client_flags(&mut b, fixed);
    wire::option(&mut b, OPT_EXPORT_NAME, b"");
    v.push(("export_name_default_zeroes", b));

    let mut b = Vec::new();
    wire::client_flags(&mut b, both);
    wire::option(&mut b, OPT_STRUCTURED_REPLY, &[]);
    wire::option(&mut b, OPT_LIST_META_CONTEXT, &wire::meta_data(name, &[]));
    wire::option(
        &mut b,
        OPT_SET_META_CONTEXT,
        &wire::meta_data(name, &[BASE_ALLOCATION.as_bytes()]),
    );
    wire::option(
        &mut b,
        OPT_GO,
        &wire::info_data(name, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    v.push(("structured_meta_go", b));

    let mut b = Vec::new();
    wire::client_flags(&mut b, both);
    wire::option(&mut b, OPT_LIST, &[]);
    wire::option(&mut b, OPT_INFO, &wire::info_data(name, &[]));
    wire::option(&mut b, OPT_GO, &wire::info_data(b"", &[]));
    v.push(("list_info_go", b));

    let mut b = Vec::new();
    wire::client_flags(&mut b, both);
    wire::option(&mut b, OPT_STRUCTURED_REPLY, &[]);
    wire::option(
        &mut b,
        OPT_LIST_META_CONTEXT,
        &wire::meta_data(name, &[b"base:", b"base:*", b"x-other:thing"]),
    );
    wire::option(
        &mut b,
        OPT_SET_META_CONTEXT,
        &wire::meta_data(b"", &[b"x-other:thing"]),
    );
    wire::option(&mut b, OPT_EXPORT_NAME, name);
    v.push(("meta_queries_export_name", b));

    let mut b = Vec::new();
    wire::client_flags(&mut b, both);
    wire::option(&mut b, OPT_SET_META_CONTEXT, &wire::meta_data(name, &[]));
    wire::option(&mut b, OPT_STARTTLS, &[]);
    wire::option(&mut b, 42, &[1, 2, 3]);
    wire::option(&mut b, OPT_EXTENDED_HEADERS, &[]);
    wire::option(&mut b, OPT_GO, &wire::info_data(b"nope", &[]));
    wire::option(&mut b, OPT_INFO, &[0, 0, 0, 9]);
    wire::option(&mut b, OPT_STRUCTURED_REPLY, &[0]);
    wire::option(&mut b, OPT_LIST, &[0]);
    wire::option(&mut b, OPT_ABORT, &[]);
    v.push(("error_replies", b));
    v
}

/// Seeds of `nbd_request`: capability configuration, then request headers.
pub fn request() -> Vec<Seed> {
    let mb = 1 << 20;
    let mut v = Vec::new();

    let mut b = caps::encode(mb, 0x02 | 0x04, None).to_vec();
    every_command(&mut b, mb);
    v.push(("every_command", b));

    let mut b = caps::encode(mb, 0x01, None).to_vec();
    every_command(&mut b, mb);
    v.push(("read_only", b));

    // 4 KiB blocks, a 64 KiB request limit and an export ending at the top
    // of the u64 range: the overflow edge.
    let top = u64::MAX - 4095;
    let mut b = caps::encode(top, 0, Some(64 << 10)).to_vec();
    b[0] = 3;
    wire::request(&mut b, CMD_READ, 0, 1, top - 4096, 4096);
    wire::request(&mut b, CMD_READ, 0, 2, top - 4096, 8192);
    wire::request(&mut b, CMD_WRITE, 0, 3, 0, 64 << 10);
    wire::request(&mut b, CMD_WRITE, 0, 4, 0, 128 << 10);
    wire::request(&mut b, CMD_TRIM, 0, 5, top - (1 << 20), 1 << 20);
    v.push(("huge_export", b));
    v
}

/// One request of every kind, valid, then a few invalid ones.
fn every_command(b: &mut Vec<u8>, size: u64) {
    let mut cookie = 0;
    let mut req = |b: &mut Vec<u8>, kind, flags, offset, len| {
        cookie += 1;
        wire::request(b, kind, flags, cookie, offset, len);
    };
    req(b, CMD_READ, 0, 0, 4096);
    req(b, CMD_READ, CMD_FLAG_DF, size - 512, 512);
    req(b, CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
    req(b, CMD_FLUSH, 0, 0, 0);
    req(b, CMD_TRIM, 0, 8192, 8192);
    req(b, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096);
    req(b, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096);
    req(b, CMD_CACHE, 0, 0, 65536);
    req(b, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 65536);
    req(b, CMD_READ, 0, 0, 0);
    req(b, CMD_READ, 0, size, 512);
    req(b, CMD_WRITE, 0, 100, 512);
    req(b, CMD_DISC, 0, 0, 0);
}

/// Seeds of `nbd_server`: transmission bytes, sent after the harness's own
/// handshake (structured replies, `base:allocation`, `GO`).
pub fn server() -> Vec<Seed> {
    let size = SERVER_SIZE;
    let mut v = Vec::new();

    let mut b = Vec::new();
    wire::request(&mut b, CMD_WRITE, 0, 1, 4096, 1024);
    b.extend((0..1024u32).map(|i| (i % 251) as u8));
    wire::request(&mut b, CMD_READ, CMD_FLAG_DF, 2, 4096, 1024);
    wire::request(&mut b, CMD_FLUSH, 0, 3, 0, 0);
    wire::request(&mut b, CMD_TRIM, 0, 4, 0, 8192);
    wire::request(&mut b, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 8192, 4096);
    wire::request(&mut b, CMD_BLOCK_STATUS, 0, 6, 0, 65536);
    wire::request(&mut b, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 7, 0, 65536);
    wire::request(&mut b, CMD_CACHE, 0, 8, 0, 4096);
    wire::request(&mut b, CMD_DISC, 0, 9, 0, 0);
    v.push(("every_command", b));

    let mut b = Vec::new();
    for i in 0..40u64 {
        wire::request(&mut b, CMD_READ, 0, 100 + i, i * 4096 % size, 4096);
    }
    wire::request(&mut b, CMD_READ, 0, 200, 0, 512 << 10);
    v.push(("pipelined_reads", b));

    let mut b = Vec::new();
    wire::request(&mut b, CMD_READ, 0, 1, size, 512);
    wire::request(&mut b, CMD_WRITE, 0, 2, 100, 512);
    b.extend_from_slice(&[0xaa; 512]);
    wire::request(&mut b, CMD_READ, 1 << 9, 3, 0, 512);
    wire::request(&mut b, 99, 0, 4, 0, 512);
    wire::request(&mut b, CMD_WRITE, 0, 5, 0, 4096);
    b.extend_from_slice(&[0x55; 100]);
    v.push(("errors_then_short_write", b));

    let mut b = Vec::new();
    wire::request(&mut b, CMD_READ, 0, 1, 0, 512);
    b.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
    b.extend_from_slice(&[0; 24]);
    v.push(("bad_magic", b));
    v
}

/// An option reply from the server.
fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// A structured reply chunk from the server.
fn chunk(out: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, payload: &[u8]) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    out.extend_from_slice(payload);
}

/// A server's greeting and its answer to `NBD_OPT_GO` (export and block sizes).
fn greeting_and_go(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend_from_slice(&(64u64 << 20).to_be_bytes());
    export
        .extend_from_slice(&(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN).to_be_bytes());
    option_reply(out, OPT_GO, REP_INFO, &export);
    let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [512u32, 4096, 32 << 20] {
        sizes.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(out, OPT_GO, REP_INFO, &sizes);
    option_reply(out, OPT_GO, REP_ACK, &[]);
}

/// Seeds of `nbd_client`: the first byte picks the parser, the rest is
/// what the server sends.
pub fn client() -> Vec<Seed> {
    let mut v = Vec::new();

    let mut b = vec![0];
    greeting_and_go(&mut b);
    v.push(("data_handshake", b));

    let mut b = vec![1];
    let mut go = Vec::new();
    greeting_and_go(&mut go);
    // The greeting, then structured replies and the context, then GO.
    b.extend_from_slice(&go[..18]);
    option_reply(&mut b, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
    let mut ctx = 3u32.to_be_bytes().to_vec();
    ctx.extend_from_slice(b"base:allocation");
    option_reply(&mut b, OPT_SET_META_CONTEXT, REP_META_CONTEXT, &ctx);
    option_reply(&mut b, OPT_SET_META_CONTEXT, REP_ACK, &[]);
    b.extend_from_slice(&go[18..]);
    v.push(("status_handshake", b));

    // Block status of 1 MiB in 4 KiB blocks: another context's chunk, ours,
    // then NONE marked done.
    let mut b = vec![2];
    b.extend_from_slice(&(1u32 << 20).to_be_bytes());
    b.push(3);
    let descriptors = |id: u32, d: &[(u32, u32)]| {
        let mut p = id.to_be_bytes().to_vec();
        for (len, flags) in d {
            p.extend_from_slice(&len.to_be_bytes());
            p.extend_from_slice(&flags.to_be_bytes());
        }
        p
    };
    chunk(
        &mut b,
        0,
        REPLY_TYPE_BLOCK_STATUS,
        7,
        &descriptors(9, &[(4096, 0)]),
    );
    let hz = STATE_HOLE | STATE_ZERO;
    let ours = descriptors(
        3,
        &[(1000, 0), (70000, hz), (8192, STATE_ZERO), (1 << 20, hz)],
    );
    chunk(&mut b, 0, REPLY_TYPE_BLOCK_STATUS, 7, &ours);
    chunk(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 7, &[]);
    v.push(("block_status", b));

    // An error chunk, done.
    let mut b = vec![2, 0, 1, 0, 0, 0];
    let mut e = EIO.to_be_bytes().to_vec();
    e.extend_from_slice(&4u16.to_be_bytes());
    e.extend_from_slice(b"oops");
    chunk(&mut b, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 7, &e);
    v.push(("block_status_error", b));
    v
}
