//! The client's parsers with arbitrary bytes as the server: the two
//! handshakes (`client::negotiate` for the nbd target's data connection,
//! `client::status::negotiate` for its block status connection) and block
//! status replies (`client::status::read_extents`).
//!
//! The first input byte picks which; the rest is everything the server
//! sends (what the client writes is dropped). Besides "never panics, never
//! allocates past the parsers' bounds", `read_extents` is checked: the
//! first 5 bytes give the length asked for and the block size (512 B to
//! 64 KiB), the rest is the reply to cookie 7 for context 3. On success
//! the extents it appended are none of length 0, no two neighbours of one
//! kind, cover at most the length and at least one block of it, and every
//! hole or zero extent starts and ends on a block boundary (a block is
//! never called a hole while part of it is data). On an error nothing is
//! appended.
#![no_main]

use std::io::{sink, Cursor};

use libfuzzer_sys::fuzz_target;
use userblk::nbd::client::{self, status};
use userblk::nbd::server::handshake::Duplex;
use userblk::Extent;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let _ = client::negotiate(&mut Duplex::new(Cursor::new(rest), sink()), "disk");
        }
        1 => {
            let _ = status::negotiate(&mut Duplex::new(Cursor::new(rest), sink()), "");
        }
        _ => check_extents(rest),
    }
});

fn check_extents(data: &[u8]) {
    let Some((head, wire)) = data.split_first_chunk::<5>() else {
        return;
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    let block = 512u64 << (head[4] % 8);
    // Something already there, which must be left alone.
    let before = Extent::hole(512);
    let mut out = vec![before];
    let r = status::read_extents(&mut Cursor::new(wire), 7, 3, len, block, &mut out);
    assert_eq!(out[0], before, "an earlier extent was changed");
    let ours = &out[1..];
    if r.is_err() {
        assert!(ours.is_empty(), "extents appended on an error: {ours:?}");
        return;
    }
    let len = u64::from(len);
    let total: u64 = ours.iter().map(|e| e.len).sum();
    assert!(
        total <= len,
        "{total} bytes described for {len} asked: {ours:?}"
    );
    assert!(
        total >= block.min(len),
        "less than a block described: {ours:?}"
    );
    let mut pos = 0u64;
    for (i, e) in ours.iter().enumerate() {
        assert!(e.len > 0, "an empty extent: {ours:?}");
        if i > 0 {
            let p = &ours[i - 1];
            assert!(p.hole != e.hole || p.zero != e.zero, "unmerged: {ours:?}");
        }
        if e.hole || e.zero {
            assert!(
                pos.is_multiple_of(block) && e.len.is_multiple_of(block),
                "a hole off the {block}-byte blocks at {pos}: {ours:?}"
            );
        }
        pos += e.len;
    }
}
