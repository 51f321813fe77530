//! Differential test: random sequences of requests applied to `MemTarget`,
//! `FileTarget` (a temp file, O_DIRECT where the filesystem allows it),
//! qcow2, cow, a write-back cache, flakey, the nbd target on nbdkit (a test
//! of its own, as it needs nbdkit) and a plain `Vec<u8>` model; every read
//! must return the same bytes from all of them.
//!
//! Discard is a hint in general, but every target here implements it as
//! zeroing at block granularity (qcow2 and cow with 4 KiB clusters), so the
//! model zeroes discarded ranges.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[allow(dead_code)]
mod common;

use common::servers::installed;
use common::skip::{self, Prereq};
use common::{pattern, Fixture};
use proptest::prelude::*;
use userblk::slots::Engine;
use userblk::targets::{FileOptions, FileTarget, MemTarget};
use userblk::{Flags, IoResult, Op, Request, Target};

const BLOCK: u64 = 4096;
const BLOCKS: u64 = 256;
const DEV_SIZE: u64 = BLOCK * BLOCKS;
/// Largest request, in blocks.
const MAX_BLOCKS: u64 = 64;

#[derive(Debug, Clone)]
enum Step {
    Write {
        block: u64,
        blocks: u64,
        seed: u64,
        fua: bool,
    },
    Read {
        block: u64,
        blocks: u64,
    },
    Discard {
        block: u64,
        blocks: u64,
    },
    WriteZeroes {
        block: u64,
        blocks: u64,
        nounmap: bool,
    },
    Flush,
}

/// A block range inside the device.
fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..BLOCKS, 1..=MAX_BLOCKS).prop_map(|(b, n)| (b, n.min(BLOCKS - b)))
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (range(), any::<u64>(), proptest::bool::weighted(0.2)).prop_map(
            |((block, blocks), seed, fua)| Step::Write { block, blocks, seed, fua }
        ),
        4 => range().prop_map(|(block, blocks)| Step::Read { block, blocks }),
        2 => range().prop_map(|(block, blocks)| Step::Discard { block, blocks }),
        2 => (range(), any::<bool>()).prop_map(|((block, blocks), nounmap)| {
            Step::WriteZeroes { block, blocks, nounmap }
        }),
        1 => Just(Step::Flush),
    ]
}

fn us(x: u64) -> usize {
    usize::try_from(x).unwrap()
}

fn len32(x: u64) -> u32 {
    u32::try_from(x).unwrap()
}

/// A target and an engine to drive it.
struct Driven<'a> {
    name: &'static str,
    target: &'a dyn Target,
    engine: Engine,
}

impl<'a> Driven<'a> {
    fn new(name: &'static str, target: &'a dyn Target) -> Self {
        let engine = Engine::new(target, us(MAX_BLOCKS * BLOCK)).unwrap();
        Driven {
            name,
            target,
            engine,
        }
    }

    fn run(&mut self, req: Request, data: &mut [u8]) -> IoResult {
        self.engine.run(self.target, req, data)
    }
}

/// First differing offset of two equal-length slices.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// A fixture of the device's size; `None` if its server is missing.
type Make = fn(u64) -> Option<Fixture>;

/// Targets beside mem and file in every sequence.
const LOCAL: &[(&str, Make)] = &[
    ("qcow2", |s| Some(common::qcow2_sized(s, BLOCK))),
    ("cow", |s| Some(common::cow_sized(s, false, len32(BLOCK)))),
    ("cache-writeback", |s| {
        Some(common::cache_writeback_sized(s))
    }),
    ("flakey", |s| Some(common::flakey_sized(s))),
];

fn check_sequence(steps: &[Step], also: &[(&'static str, Make)]) -> Result<(), TestCaseError> {
    let mem = MemTarget::new(DEV_SIZE).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("differential.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(DEV_SIZE)
        .unwrap();
    let file = FileTarget::open(FileOptions {
        path,
        ..FileOptions::default()
    })
    .unwrap();
    prop_assert_eq!(file.caps().size, DEV_SIZE);
    let fixtures: Vec<(&str, Fixture)> = also
        .iter()
        .map(|&(name, make)| (name, make(DEV_SIZE).expect("its prerequisite was checked")))
        .collect();
    let mut targets = vec![Driven::new("mem", &mem), Driven::new("file", &file)];
    for (name, fx) in &fixtures {
        targets.push(Driven::new(name, fx.target()));
    }
    let mut model = vec![0u8; us(DEV_SIZE)];

    for (i, s) in steps.iter().enumerate() {
        match *s {
            Step::Write {
                block,
                blocks,
                seed,
                fua,
            } => {
                let (off, len) = (block * BLOCK, blocks * BLOCK);
                let data = pattern(seed, us(len));
                let mut req = Request::new(Op::Write, off, len32(len));
                if fua {
                    req = req.with_flags(Flags::FUA);
                }
                for t in &mut targets {
                    let mut buf = data.clone();
                    prop_assert_eq!(
                        t.run(req, &mut buf),
                        Ok(len32(len)),
                        "step {}: {} {:?}",
                        i,
                        t.name,
                        s
                    );
                }
                model[us(off)..us(off + len)].copy_from_slice(&data);
            }
            Step::Read { block, blocks } => {
                let (off, len) = (block * BLOCK, blocks * BLOCK);
                let want = &model[us(off)..us(off + len)];
                for t in &mut targets {
                    let mut buf = vec![0xA5; us(len)];
                    let req = Request::new(Op::Read, off, len32(len));
                    prop_assert_eq!(
                        t.run(req, &mut buf),
                        Ok(len32(len)),
                        "step {}: {} {:?}",
                        i,
                        t.name,
                        s
                    );
                    if let Some(d) = first_difference(&buf, want) {
                        return Err(TestCaseError::fail(format!(
                            "step {i}: {} {s:?}: differs from the model at device offset {} (got {:#04x}, want {:#04x})",
                            t.name,
                            off + d as u64,
                            buf[d],
                            want[d]
                        )));
                    }
                }
            }
            Step::Discard { block, blocks } => {
                let (off, len) = (block * BLOCK, blocks * BLOCK);
                for t in &mut targets {
                    let req = Request::new(Op::Discard, off, len32(len));
                    prop_assert_eq!(t.run(req, &mut []), Ok(0), "step {}: {} {:?}", i, t.name, s);
                }
                model[us(off)..us(off + len)].fill(0);
            }
            Step::WriteZeroes {
                block,
                blocks,
                nounmap,
            } => {
                let (off, len) = (block * BLOCK, blocks * BLOCK);
                let mut req = Request::new(Op::WriteZeroes, off, len32(len));
                if nounmap {
                    req = req.with_flags(Flags::NOUNMAP);
                }
                for t in &mut targets {
                    prop_assert_eq!(t.run(req, &mut []), Ok(0), "step {}: {} {:?}", i, t.name, s);
                }
                model[us(off)..us(off + len)].fill(0);
            }
            Step::Flush => {
                for t in &mut targets {
                    let req = Request::new(Op::Flush, 0, 0);
                    prop_assert_eq!(t.run(req, &mut []), Ok(0), "step {}: {} flush", i, t.name);
                }
            }
        }
    }

    // And the whole device agrees at the end.
    for t in &mut targets {
        for chunk in 0..BLOCKS / MAX_BLOCKS {
            let (off, len) = (chunk * MAX_BLOCKS * BLOCK, MAX_BLOCKS * BLOCK);
            let mut buf = vec![0xA5; us(len)];
            let req = Request::new(Op::Read, off, len32(len));
            prop_assert_eq!(t.run(req, &mut buf), Ok(len32(len)));
            if let Some(d) = first_difference(&buf, &model[us(off)..us(off + len)]) {
                return Err(TestCaseError::fail(format!(
                    "final read: {} differs from the model at device offset {}",
                    t.name,
                    off + d as u64
                )));
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mem_file_and_model_agree(steps in proptest::collection::vec(step(), 1..=40)) {
        check_sequence(&steps, LOCAL)?;
    }
}

/// The nbd target on `nbdkit memory` (a server per sequence: fewer cases).
#[test]
fn nbd_and_model_agree() {
    if !skip::require(
        installed("nbdkit"),
        Prereq::CiInstalls,
        "nbdkit is not installed",
    ) {
        return;
    }
    let config = ProptestConfig {
        cases: 16,
        ..ProptestConfig::default()
    };
    let nbd: &[(&str, Make)] = &[("nbd", common::nbd_sized)];
    proptest::test_runner::TestRunner::new(config)
        .run(&proptest::collection::vec(step(), 1..=40), |steps| {
            check_sequence(&steps, nbd)
        })
        .unwrap();
}

/// A fixed sequence that touches every op, so the comparison itself is
/// known to run even if the random strategy changes.
#[test]
fn fixed_sequence_agrees() {
    let w = |block, blocks, seed| Step::Write {
        block,
        blocks,
        seed,
        fua: false,
    };
    let r = |block, blocks| Step::Read { block, blocks };
    let steps = [
        w(0, 64, 1),
        r(0, 64),
        Step::Discard {
            block: 8,
            blocks: 8,
        },
        r(0, 32),
        Step::WriteZeroes {
            block: 20,
            blocks: 4,
            nounmap: true,
        },
        Step::WriteZeroes {
            block: 30,
            blocks: 4,
            nounmap: false,
        },
        Step::Write {
            block: 250,
            blocks: 6,
            seed: 2,
            fua: true,
        },
        Step::Flush,
        r(0, 64),
        r(192, 64),
    ];
    check_sequence(&steps, LOCAL).unwrap();
}
