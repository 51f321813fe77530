// Random bytes and offsets are truncated from 64-bit draws on purpose.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

use super::*;
use crate::filters::rng::Rng;
use crate::filters::testing::{assert_refused, probe, ring_probe, run_on, Seen};
use crate::slots::Engine;
use crate::slots::{Event, Slots};
use crate::target::{IoResult, Request};

const SIZE: usize = 1 << 20;

fn cfg(spec: &str) -> Config {
    Config::parse(&spec.parse().unwrap()).unwrap()
}

/// A flakey filter over a probe of `SIZE` bytes (ring-native or not), its
/// engine, what the probe sees, and the probe itself.
struct Rig {
    f: Flakey,
    e: Engine,
    seen: Seen,
    disk: Arc<dyn Target>,
    control: Registry,
}

fn rig_on(inner: (Arc<dyn Target>, Seen), spec: &str) -> Rig {
    let (disk, seen) = inner;
    let control = Registry::new();
    let f = Flakey::new(Arc::clone(&disk), cfg(spec), &control).unwrap();
    let e = Engine::new(&f, 1 << 20).unwrap();
    Rig {
        f,
        e,
        seen,
        disk,
        control,
    }
}

fn rig(spec: &str) -> Rig {
    rig_on(probe(SIZE), spec)
}

impl Rig {
    fn write(&mut self, offset: u64, data: &[u8]) -> IoResult {
        self.write_flags(offset, data, Flags::NONE)
    }

    fn write_flags(&mut self, offset: u64, data: &[u8], flags: Flags) -> IoResult {
        let len = u32::try_from(data.len()).unwrap();
        let req = Request::new(Op::Write, offset, len).with_flags(flags);
        self.e.run(&self.f, req, &mut data.to_vec())
    }

    fn op(&mut self, op: Op, offset: u64, len: u32) -> IoResult {
        run_on(&mut self.e, &self.f, Request::new(op, offset, len)).0
    }

    fn flush(&mut self) -> IoResult {
        self.op(Op::Flush, 0, 0)
    }

    fn read(&mut self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut buf = vec![0xEE; len];
        let req = Request::new(Op::Read, offset, u32::try_from(len).unwrap());
        self.e.run(&self.f, req, &mut buf).map(|_| buf)
    }

    /// What the disk beneath holds (not counted as seen).
    fn on_disk(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut e = Engine::new(&*self.disk, 1 << 20).unwrap();
        let mut buf = vec![0; len];
        let req = Request::new(Op::Read, offset, u32::try_from(len).unwrap());
        e.run(&*self.disk, req, &mut buf).unwrap();
        let _ = self.seen.take().pop();
        buf
    }

    /// The ops the disk beneath received since the last look.
    fn ops_seen(&self) -> Vec<(Op, u64, u32)> {
        self.seen
            .take()
            .into_iter()
            .map(|r| (r.op, r.offset, r.len))
            .collect()
    }
}

fn bytes(byte: u8, len: usize) -> Vec<u8> {
    vec![byte; len]
}

#[test]
fn options_parse_and_print() {
    let c = cfg("flakey:trigger=/run/cut,max_dirty=1M,broken=ack-flush");
    assert_eq!(c.trigger.as_deref(), Some(std::path::Path::new("/run/cut")));
    assert_eq!((c.max_dirty, c.broken), (1 << 20, Some(Broken::AckFlush)));
    assert_eq!(
        c.to_string(),
        "flakey:trigger=/run/cut,max_dirty=1M,broken=ack-flush"
    );
    assert_eq!(cfg("flakey").to_string(), "flakey:max_dirty=64M");
    assert_refused(
        Config::parse,
        &[
            ("flakey:broken=yes", "unknown breakage 'yes'"),
            ("flakey:max_dirty=lots", "invalid size"),
            ("flakey:trigger=/x,power=off", "unknown option 'power'"),
        ],
    );
}

#[test]
fn advertises_a_write_back_cache_with_fua() {
    let r = rig("flakey");
    let caps = r.f.caps();
    assert!(caps.volatile_cache && caps.fua);
    assert_eq!(caps.size, SIZE as u64);
    assert_eq!(caps.discard, r.disk.caps().discard);
    assert_eq!(r.f.describe()["filters"][0], "flakey:max_dirty=64M");
}

#[test]
fn writes_are_held_back_until_a_flush_writes_them_down() {
    let mut r = rig("flakey");
    assert_eq!(r.write(4096, &bytes(7, 8192)), Ok(8192));
    assert_eq!(r.op(Op::Discard, 65536, 4096), Ok(0));
    assert_eq!(r.ops_seen(), [], "nothing reaches the disk before a flush");
    // Reads see the held-back writes over the disk, byte for byte.
    let got = r.read(0, 16384).unwrap();
    assert_eq!(r.ops_seen(), [(Op::Read, 0, 16384)]);
    assert_eq!(&got[..4096], &bytes(0, 4096)[..]);
    assert_eq!(&got[4096..12288], &bytes(7, 8192)[..]);
    assert_eq!(r.on_disk(4096, 8192), bytes(0, 8192));
    // A read wholly inside the overlay does not go down at all.
    assert_eq!(r.read(8192, 512).unwrap(), bytes(7, 512));
    assert_eq!(r.ops_seen(), []);
    assert_eq!(r.flush(), Ok(0));
    assert_eq!(
        r.ops_seen(),
        [
            (Op::Write, 4096, 8192),
            (Op::Discard, 65536, 4096),
            (Op::Flush, 0, 0)
        ]
    );
    assert_eq!(r.on_disk(4096, 8192), bytes(7, 8192));
    let s = r.f.status();
    assert_eq!(
        (s.dirty_bytes, s.dirty_pieces, s.writes, s.flushes),
        (0, 0, 1, 1)
    );
    // Nothing held: the flush only flushes the disk.
    assert_eq!(r.flush(), Ok(0));
    assert_eq!(r.ops_seen(), [(Op::Flush, 0, 0)]);
}

#[test]
fn fua_writes_are_on_the_disk_when_they_complete() {
    for inner in [probe(SIZE), ring_probe(SIZE)] {
        let mut r = rig_on(inner, "flakey");
        assert_eq!(r.write(0, &bytes(1, 4096)), Ok(4096));
        assert_eq!(r.write_flags(8192, &bytes(2, 4096), Flags::FUA), Ok(4096));
        // The probe has no FUA of its own: a write and a flush.
        assert_eq!(r.ops_seen(), [(Op::Write, 8192, 4096), (Op::Flush, 0, 0)]);
        assert_eq!(r.on_disk(8192, 4096), bytes(2, 4096));
        assert!(r.f.power_cut().is_some());
        assert!(r.f.power_up());
        assert_eq!(
            r.read(0, 4096).unwrap(),
            bytes(0, 4096),
            "the plain write was lost"
        );
        assert_eq!(
            r.read(8192, 4096).unwrap(),
            bytes(2, 4096),
            "the FUA write survived"
        );
    }
}

#[test]
fn a_power_cut_loses_exactly_the_writes_no_flush_covered() {
    let mut r = rig("flakey");
    let a = bytes(0xA, 16384);
    assert_eq!(r.write(0, &a), Ok(16384));
    assert_eq!(r.flush(), Ok(0));
    // Unflushed: a partial overwrite, a write elsewhere, a write-zeroes
    // over flushed data.
    assert_eq!(r.write(4096 + 512, &bytes(0xB, 1024)), Ok(1024));
    assert_eq!(r.write(32768, &bytes(0xC, 4096)), Ok(4096));
    assert_eq!(r.op(Op::WriteZeroes, 12288, 4096), Ok(0));
    let mut want = a.clone();
    want[4608..5632].fill(0xB);
    want[12288..].fill(0);
    assert_eq!(r.read(0, 16384).unwrap(), want);
    let _ = r.ops_seen();

    let lost = r.f.power_cut().unwrap();
    assert_eq!(
        lost,
        Lost {
            pieces: 3,
            bytes: 5120
        }
    );
    assert_eq!(r.f.power_cut(), None, "already off");
    for op in [Op::Read, Op::Write, Op::Discard, Op::WriteZeroes] {
        assert_eq!(r.op(op, 0, 4096), Err(Errno::IO), "{op:?} after the cut");
    }
    assert_eq!(r.flush(), Err(Errno::IO));
    let mut out = Vec::new();
    assert_eq!(r.f.extents(0, 4096, &mut out), Err(Errno::IO));
    assert_eq!(r.ops_seen(), [], "a disk without power sees nothing");
    assert!(!r.f.status().powered);

    assert!(r.f.power_up());
    assert!(!r.f.power_up(), "already on");
    assert_eq!(r.read(0, 16384).unwrap(), a);
    assert_eq!(r.read(32768, 4096).unwrap(), bytes(0, 4096));
    let s = r.f.status();
    assert_eq!((s.power_cuts, s.lost_at_last_cut), (1, lost));
}

#[test]
fn agrees_with_a_model_of_a_write_back_cache() {
    // Random requests, power cuts included, against two images: what the
    // device must read back, and what must survive a power cut.
    for (round, inner) in [probe(SIZE), ring_probe(SIZE)].into_iter().enumerate() {
        let mut r = rig_on(inner, "flakey");
        let rng = Rng::new(Some(7 + round as u64));
        let mut current = vec![0u8; SIZE];
        let mut durable = vec![0u8; SIZE];
        let pick = |n: u64| rng.next_u64() % n;
        for step in 0..3000 {
            let off = pick(SIZE as u64 / 512 - 1) * 512;
            let len = ((pick(64) + 1) * 512).min(SIZE as u64 - off);
            let (o, n) = (off as usize, len as usize);
            let len32 = u32::try_from(len).unwrap();
            match pick(100) {
                0..=39 => {
                    let data: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                    let fua = pick(10) == 0;
                    let flags = if fua { Flags::FUA } else { Flags::NONE };
                    assert_eq!(r.write_flags(off, &data, flags), Ok(len32));
                    current[o..o + n].copy_from_slice(&data);
                    if fua {
                        durable[o..o + n].copy_from_slice(&data);
                    }
                }
                40..=47 => {
                    let op = if pick(2) == 0 {
                        Op::Discard
                    } else {
                        Op::WriteZeroes
                    };
                    assert_eq!(r.op(op, off, len32), Ok(0));
                    current[o..o + n].fill(0);
                }
                48..=57 => {
                    assert_eq!(r.flush(), Ok(0));
                    durable.copy_from_slice(&current);
                }
                58..=59 => {
                    r.f.power_cut().unwrap();
                    assert_eq!(r.op(Op::Read, off, len32), Err(Errno::IO));
                    assert!(r.f.power_up());
                    current.copy_from_slice(&durable);
                    let got = r.read(0, SIZE).unwrap();
                    assert!(
                        got == current,
                        "step {step}: the disk after a cut is not what was flushed"
                    );
                }
                _ => {
                    let got = r.read(off, n).unwrap();
                    assert!(
                        got == current[o..o + n],
                        "step {step}: read {off}+{len} differs"
                    );
                }
            }
        }
    }
}

#[test]
fn a_full_overlay_writes_its_oldest_down_first() {
    let mut r = rig("flakey:max_dirty=16K");
    for i in 0..8u8 {
        assert_eq!(r.write(u64::from(i) * 8192, &bytes(i + 1, 4096)), Ok(4096));
        assert!(
            r.f.status().dirty_bytes <= 16384,
            "over the bound after write {i}"
        );
    }
    // Four fit; each later write pushed the oldest one down.
    let downs: Vec<u64> = r
        .ops_seen()
        .iter()
        .map(|(op, off, _)| {
            assert_eq!(*op, Op::Write);
            *off
        })
        .collect();
    assert_eq!(downs, [0, 8192, 16384, 24576]);
    r.f.power_cut().unwrap();
    r.f.power_up();
    for i in 0..8u8 {
        let want = if i < 4 { i + 1 } else { 0 };
        assert_eq!(
            r.read(u64::from(i) * 8192, 4096).unwrap(),
            bytes(want, 4096),
            "write {i}"
        );
    }
}

#[test]
fn everything_flushed_survives_even_with_a_small_overlay() {
    let mut r = rig("flakey:max_dirty=8K");
    let rng = Rng::new(Some(3));
    let mut flushed = vec![0u8; 64 << 10];
    let mut current = flushed.clone();
    for _ in 0..200 {
        let off = (rng.next_u64() % 127) as usize * 512;
        let data = bytes(rng.next_u64() as u8, 1024);
        r.write(off as u64, &data).unwrap();
        current[off..off + 1024].copy_from_slice(&data);
        if rng.next_u64().is_multiple_of(8) {
            r.flush().unwrap();
            flushed.copy_from_slice(&current);
        }
    }
    r.flush().unwrap();
    flushed.copy_from_slice(&current);
    r.write(0, &bytes(0xFF, 4096)).unwrap();
    r.f.power_cut().unwrap();
    r.f.power_up();
    assert!(r.read(0, 64 << 10).unwrap() == flushed);
}

#[test]
fn broken_ack_flush_acknowledges_and_keeps_nothing() {
    let mut r = rig("flakey:broken=ack-flush");
    r.write(0, &bytes(5, 4096)).unwrap();
    assert_eq!(r.flush(), Ok(0));
    assert_eq!(r.ops_seen(), [], "the lying flush wrote nothing");
    r.f.power_cut().unwrap();
    r.f.power_up();
    assert_eq!(
        r.read(0, 4096).unwrap(),
        bytes(0, 4096),
        "flushed data lost"
    );
    // The cache still drains when asked to by the operator.
    r.write(0, &bytes(6, 4096)).unwrap();
    r.f.write_back().unwrap();
    assert_eq!(r.on_disk(0, 4096), bytes(6, 4096));
    assert_eq!(r.f.status().broken, Some("ack-flush"));
}

#[test]
fn the_trigger_file_cuts_and_restores_power() {
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("cut");
    let mut r = rig(&format!("flakey:trigger={}", trigger.display()));
    r.write(0, &bytes(1, 4096)).unwrap();
    r.flush().unwrap();
    r.write(0, &bytes(2, 4096)).unwrap();
    std::fs::write(&trigger, b"").unwrap();
    // A flush always looks; other requests within a few ms.
    assert_eq!(r.flush(), Err(Errno::IO));
    assert_eq!(r.op(Op::Read, 0, 4096), Err(Errno::IO));
    std::fs::remove_file(&trigger).unwrap();
    std::thread::sleep(TRIGGER_INTERVAL * 2);
    assert_eq!(r.read(0, 4096).unwrap(), bytes(1, 4096));
    assert_eq!(r.f.status().power_cuts, 1);
}

#[test]
fn control_actions_cut_restore_drain_and_report() {
    let mut r = rig("flakey");
    let names: Vec<String> = r.control.actions().into_iter().map(|a| a.name).collect();
    assert_eq!(names, ["powercut", "powerup", "writeback", "status"]);
    r.write(0, &bytes(1, 4096)).unwrap();
    let out = r.control.run("writeback", &[]).unwrap();
    assert_eq!(out, ["flakey: written back"]);
    assert_eq!(r.ops_seen(), [(Op::Write, 0, 4096), (Op::Flush, 0, 0)]);
    r.write(4096, &bytes(2, 4096)).unwrap();
    let out = r.control.run("powercut", &[]).unwrap();
    assert!(
        out[0].contains("1 held-back pieces (4096 bytes of data) lost"),
        "{out:?}"
    );
    assert_eq!(r.op(Op::Read, 0, 512), Err(Errno::IO));
    let e = r.control.run("writeback", &[]).unwrap_err();
    assert_eq!(e.to_string(), "flakey: writeback: the power is off");
    let status: serde_json::Value = serde_json::from_str(
        r.control.run("status", &[]).unwrap()[0].trim_start_matches("flakey: "),
    )
    .unwrap();
    assert_eq!(status["powered"], false);
    assert_eq!(status["lost_at_last_cut"]["bytes"], 4096);
    assert_eq!(
        r.control.run("powerup", &[]).unwrap(),
        ["flakey: power restored"]
    );
    assert_eq!(r.read(0, 8192).unwrap()[..4096], bytes(1, 4096)[..]);
    drop(r.f);
    assert!(
        r.control.actions().is_empty(),
        "actions outlived the filter"
    );
}

#[test]
fn a_read_racing_a_write_down_reads_again() {
    // The ring-native probe answers a read only when its timer comes back:
    // a flush writing the overlay down meanwhile must not leave the read
    // with neither the overlay's bytes nor the disk's new ones.
    let (disk, seen) = ring_probe(SIZE);
    let control = Registry::new();
    let f = Flakey::new(disk, cfg("flakey"), &control).unwrap();
    // (The writer's own engine uses slot 0 of the probe: the read takes slot 1.)
    let mut slots = Slots::new(f.caps(), 2, 8192).unwrap();
    slots.buf_mut(0)[..4096].fill(9);
    assert_eq!(
        slots.start(&f, 0, Request::new(Op::Write, 0, 4096)),
        Some(Ok(4096))
    );
    assert_eq!(slots.start(&f, 1, Request::new(Op::Read, 0, 8192)), None);
    assert_eq!(slots.start(&f, 0, Request::new(Op::Flush, 0, 0)), None);
    let mut events = Vec::new();
    slots.drain(&f, &mut events).unwrap();
    assert_eq!(events.len(), 2);
    assert!(events
        .iter()
        .all(|e| matches!(e, Event::Done { result: Ok(_), .. })));
    assert_eq!(&slots.buf(1)[..4096], &bytes(9, 4096)[..]);
    assert_eq!(&slots.buf(1)[4096..8192], &bytes(0, 4096)[..]);
    let reads = seen.take().iter().filter(|r| r.op == Op::Read).count();
    assert!(reads >= 1);
}

#[test]
fn extents_count_held_back_data_as_data() {
    let mut r = rig("flakey");
    let mut out = Vec::new();
    r.f.extents(0, 65536, &mut out).unwrap();
    assert_eq!(out, [Extent::hole(65536)]);
    r.write(4096, &bytes(1, 4096)).unwrap();
    out.clear();
    r.f.extents(0, 65536, &mut out).unwrap();
    assert_eq!(out, [Extent::data(65536)]);
}

#[test]
fn a_stack_offers_its_actions_for_as_long_as_it_lives() {
    let env = crate::filters::Env::default();
    let specs: Vec<Spec> = ["stats", "flakey:max_dirty=1M"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let (disk, _) = probe(SIZE);
    let t = crate::filters::build(disk, &specs, &env).unwrap();
    assert!(t.caps().volatile_cache);
    assert_eq!(env.control.actions().len(), 4);
    assert!(env.control.run("powercut", &[]).is_ok());
    let mut e = Engine::new(&*t, 4096).unwrap();
    assert_eq!(
        run_on(&mut e, &*t, Request::new(Op::Read, 0, 512)).0,
        Err(Errno::IO)
    );
    drop(e);
    drop(t);
    assert!(env.control.actions().is_empty());
}
