//! `transmission::Header::parse` and `transmission::command` on arbitrary
//! request headers, under many exports and negotiations.
//!
//! Input: [`caps::CONFIG_LEN`] bytes describing one more export
//! (`userblk_fuzz::caps`), then 28-byte request headers. Each header is
//! parsed as sent (the parse must succeed exactly when the magic is right,
//! and round-trip through `encode`), then with the magic forced right and
//! judged by `command` under every negotiation (structured replies and
//! `base:allocation` on and off) for each export: a writable one with
//! discard and write-zeroes, a read-only one that still declares both, one
//! with neither, one with 4 KiB blocks, a 64 KiB request limit and its end
//! at the top of the u64 range, one whose request limit is not a multiple
//! of its block size, and the one the input describes.
//!
//! Checked: `command` accepts a request exactly when the protocol says it
//! is valid for that export and negotiation (an oracle written from the
//! specification, see `valid`), and whatever it accepts is in range,
//! aligned, within the payload limit, no modification of a read-only
//! export, passes `userblk::target::validate`, and carries the header's
//! op, range and flags. Refusals use the protocol's error numbers.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use userblk::nbd::proto::*;
use userblk::nbd::server::handshake::Negotiated;
use userblk::nbd::server::transmission::{
    command, range_piece, Command, Header, Limits, MAX_PAYLOAD,
};
use userblk::target::{validate, Caps, Flags, Op, RangeOpCaps};
use userblk_fuzz::caps::{self, CONFIG_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((config, headers)) = data.split_first_chunk::<CONFIG_LEN>() else {
        return;
    };
    let mut limits = fixed_limits().to_vec();
    let drawn = caps::decode(config);
    // Only capabilities a server would start with (`Server::start` checks them).
    if drawn.check().is_ok() {
        let l = Limits::new(drawn);
        check_limits(&l);
        limits.push(l);
    }
    for raw in headers.chunks_exact(REQUEST_LEN) {
        let raw: &[u8; REQUEST_LEN] = raw.try_into().expect("chunks_exact");
        check_parse(raw);
        let mut forced = *raw;
        forced[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        let h = Header::parse(&forced).expect("header with the right magic refused");
        for l in &limits {
            for neg in negotiations() {
                check_command(&h, &neg, l);
            }
        }
    }
});

fn fixed_limits() -> &'static [Limits] {
    static L: OnceLock<Vec<Limits>> = OnceLock::new();
    L.get_or_init(|| {
        let mb = 1 << 20;
        let full = Caps {
            volatile_cache: true,
            fua: true,
            discard: Some(RangeOpCaps::with_granularity(4096)),
            write_zeroes: Some(RangeOpCaps::with_granularity(512)),
            ..Caps::new(mb)
        };
        let read_only = Caps {
            read_only: true,
            ..full
        };
        let bare = Caps::new(mb);
        let huge = Caps {
            logical_block_size: 4096,
            max_request: Some(64 << 10),
            discard: Some(RangeOpCaps::with_granularity(4096)),
            ..Caps::new(u64::MAX - 4095)
        };
        let odd_limit = Caps {
            max_request: Some(1000),
            ..full
        };
        let all = [full, read_only, bare, huge, odd_limit];
        all.iter()
            .map(|c| {
                c.check().expect("fixed caps are valid");
                let l = Limits::new(*c);
                check_limits(&l);
                l
            })
            .collect()
    })
}

fn negotiations() -> impl Iterator<Item = Negotiated> {
    (0..4).map(|i| Negotiated {
        structured: i & 1 != 0,
        base_allocation: i & 2 != 0,
        ..Negotiated::default()
    })
}

/// What the export advertises agrees with what `command` enforces.
fn check_limits(l: &Limits) {
    let c = &l.caps;
    let lbs = c.logical_block_size;
    assert_eq!(
        l.max_payload % lbs,
        0,
        "{l:?}: payload limit not whole blocks"
    );
    assert!(l.max_payload <= MAX_PAYLOAD, "{l:?}");
    assert!(
        c.max_request.is_none_or(|m| l.max_payload <= m),
        "{l:?}: above the target's limit"
    );
    let (min, pref, max) = l.block_sizes();
    assert!(
        min.is_power_of_two() && min == lbs,
        "{l:?}: minimum block size {min}"
    );
    assert!(
        pref.is_power_of_two() && pref >= min,
        "{l:?}: preferred block size {pref}"
    );
    assert!(
        max >= min && max % min == 0,
        "{l:?}: maximum block size {max}"
    );
    let f = l.flags();
    assert_ne!(f & FLAG_HAS_FLAGS, 0);
    assert_eq!(f & FLAG_READ_ONLY != 0, c.read_only, "{l:?}: {f:#x}");
    assert_eq!(
        f & FLAG_SEND_TRIM != 0,
        c.supports(Op::Discard),
        "{l:?}: {f:#x}"
    );
    assert_eq!(
        f & FLAG_SEND_WRITE_ZEROES != 0,
        c.supports(Op::WriteZeroes),
        "{l:?}: {f:#x}"
    );
    assert!(
        f & FLAG_SEND_FAST_ZERO == 0 || f & FLAG_SEND_WRITE_ZEROES != 0,
        "{f:#x}"
    );
    assert_eq!(f & FLAG_SEND_DF, 0, "SEND_DF depends on the negotiation");
}

fn check_parse(raw: &[u8; REQUEST_LEN]) {
    let magic_ok = raw[..4] == REQUEST_MAGIC.to_be_bytes();
    match Header::parse(raw) {
        Some(h) => {
            assert!(magic_ok, "parsed a header with magic {:02x?}", &raw[..4]);
            assert_eq!(&h.encode(), raw, "encode(parse(x)) != x");
            let payload = if h.kind == CMD_WRITE { h.len } else { 0 };
            assert_eq!(h.payload_len(), payload);
        }
        None => assert!(!magic_ok, "refused a header with the right magic"),
    }
}

/// The request's range lies in the export and is aligned to its blocks.
fn in_range_and_aligned(h: &Header, caps: &Caps) -> bool {
    let lbs = u64::from(caps.logical_block_size);
    let end = h.offset.checked_add(u64::from(h.len));
    end.is_some_and(|e| e <= caps.size)
        && h.offset.is_multiple_of(lbs)
        && u64::from(h.len).is_multiple_of(lbs)
}

/// The oracle: whether the protocol (and the export's declared limits) make
/// this request one the server must carry out. Written from the NBD
/// specification, not from `command`: flags are the ones each command
/// defines (FUA accepted everywhere, DF only with structured replies),
/// ranges must lie inside the export and be whole blocks, reads and writes
/// at most the advertised maximum, modifications need a writable export
/// that declared the op, block status needs `base:allocation` and a length.
fn valid(h: &Header, neg: &Negotiated, l: &Limits) -> bool {
    let caps = &l.caps;
    let df = if neg.structured { CMD_FLAG_DF } else { 0 };
    let allowed = CMD_FLAG_FUA
        | match h.kind {
            CMD_READ => df,
            CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
            CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            // Flags of a disconnect do not matter, as long as they are defined ones.
            CMD_DISC => CMD_FLAG_NO_HOLE | CMD_FLAG_DF | CMD_FLAG_REQ_ONE | CMD_FLAG_FAST_ZERO,
            _ => return false,
        };
    if h.flags & !allowed != 0 {
        return false;
    }
    let range = in_range_and_aligned(h, caps);
    match h.kind {
        CMD_DISC | CMD_FLUSH => true,
        CMD_READ => range && h.len <= l.max_payload,
        CMD_WRITE => !caps.read_only && range && h.len <= l.max_payload,
        CMD_TRIM => caps.supports(Op::Discard) && range,
        CMD_WRITE_ZEROES => caps.supports(Op::WriteZeroes) && range,
        CMD_CACHE => range,
        CMD_BLOCK_STATUS => neg.base_allocation && h.len > 0 && range,
        _ => false,
    }
}

fn check_command(h: &Header, neg: &Negotiated, l: &Limits) {
    let caps = &l.caps;
    let r = command(h, neg, l);
    let ctx = || format!("{h:?} {neg:?} {l:?} -> {r:?}");
    assert_eq!(r.is_ok(), valid(h, neg, l), "oracle disagrees: {}", ctx());
    let cmd = match r {
        Ok(c) => c,
        Err(e) => {
            assert!(
                [EINVAL, EPERM, ENOSPC, ENOTSUP, EOVERFLOW].contains(&e),
                "unexpected error {e}: {}",
                ctx()
            );
            let modifies = matches!(h.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
            let flags_ok = h.flags & !(CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO) == 0
                && (h.kind == CMD_WRITE_ZEROES || h.flags & !CMD_FLAG_FUA == 0);
            if caps.read_only && modifies && flags_ok {
                assert_eq!(e, EPERM, "read-only export: {}", ctx());
            }
            return;
        }
    };
    match cmd {
        Command::Io(req) => {
            assert_eq!(
                validate(caps, &req),
                Ok(()),
                "target would refuse: {}",
                ctx()
            );
            let op = match h.kind {
                CMD_READ => Op::Read,
                CMD_WRITE => Op::Write,
                CMD_FLUSH => Op::Flush,
                CMD_TRIM => Op::Discard,
                CMD_WRITE_ZEROES => Op::WriteZeroes,
                _ => panic!("I/O for command {}: {}", h.kind, ctx()),
            };
            assert_eq!(req.op, op, "{}", ctx());
            assert!(
                !(caps.read_only && op.modifies()),
                "modifies a read-only export: {}",
                ctx()
            );
            if op == Op::Flush {
                assert_eq!((req.offset, req.len), (0, 0), "{}", ctx());
            } else {
                assert_eq!((req.offset, req.len), (h.offset, h.len), "{}", ctx());
                assert!(req.len > 0, "{}", ctx());
                assert!(in_range_and_aligned(h, caps), "{}", ctx());
            }
            if op.has_data() {
                assert!(
                    req.len <= l.max_payload,
                    "over the payload limit: {}",
                    ctx()
                );
            }
            let range_op = match op {
                Op::Discard => caps.discard,
                Op::WriteZeroes => caps.write_zeroes,
                _ => None,
            };
            // The server cuts trims and write-zeroes over the target's
            // `max_bytes` into pieces of `range_piece` bytes.
            if let Some(rc) = range_op {
                match range_piece(caps, op, req.len) {
                    None => assert!(u64::from(req.len) <= rc.max_bytes, "{}", ctx()),
                    Some(p) => {
                        assert!(p > 0 && p < req.len, "piece {p}: {}", ctx());
                        assert!(u64::from(p) <= rc.max_bytes, "piece {p}: {}", ctx());
                        assert_eq!(p % rc.granularity, 0, "piece {p}: {}", ctx());
                    }
                }
            }
            // A flush is durable anyway, so FUA on it may be dropped;
            // everywhere else it must reach the target.
            if op != Op::Flush {
                let fua = h.flags & CMD_FLAG_FUA != 0;
                assert_eq!(req.flags.contains(Flags::FUA), fua, "{}", ctx());
            }
            let nounmap = op == Op::WriteZeroes && h.flags & CMD_FLAG_NO_HOLE != 0;
            assert_eq!(req.flags.contains(Flags::NOUNMAP), nounmap, "{}", ctx());
        }
        Command::Nothing => {
            let zero_len =
                matches!(h.kind, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) && h.len == 0;
            assert!(
                h.kind == CMD_CACHE || zero_len,
                "nothing to do for {}",
                ctx()
            );
            assert!(in_range_and_aligned(h, caps), "{}", ctx());
        }
        Command::BlockStatus { offset, len, one } => {
            assert_eq!(h.kind, CMD_BLOCK_STATUS, "{}", ctx());
            assert!(neg.base_allocation && len > 0, "{}", ctx());
            assert_eq!((offset, len), (h.offset, h.len), "{}", ctx());
            assert_eq!(one, h.flags & CMD_FLAG_REQ_ONE != 0, "{}", ctx());
            assert!(in_range_and_aligned(h, caps), "{}", ctx());
        }
        Command::Disconnect => assert_eq!(h.kind, CMD_DISC, "{}", ctx()),
    }
}
