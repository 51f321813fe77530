//! The volatile cache of `flakey`: writes, discards and write-zeroes not
//! yet written down, as non-overlapping pieces of the device.
//!
//! Every byte in the overlay is the newest version of that byte: a write
//! cuts whatever it overlaps out of older pieces. So writing any part of
//! the overlay down, at any time, never puts older data over newer, and a
//! read sees the overlay over the target beneath.
//!
//! Pieces carry a sequence number: the oldest is written down first when
//! the overlay is full, and a piece written down leaves the overlay only if
//! nothing replaced it meanwhile ([`Overlay::written`]).

use std::collections::{BTreeMap, BTreeSet};

use crate::target::{Flags, Op, Request};

/// What a piece holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Written data.
    Data(Vec<u8>),
    /// A discard or write-zeroes (with its flags): reads as zeroes, and
    /// goes down as the same op.
    Zero(Op, Flags),
}

#[derive(Debug)]
struct Piece {
    len: u64,
    seq: u64,
    kind: Kind,
}

impl Piece {
    fn data_bytes(&self) -> u64 {
        match &self.kind {
            Kind::Data(v) => v.len() as u64,
            Kind::Zero(..) => 0,
        }
    }
}

/// One request's worth of the overlay to write down, and the pieces it
/// came from (`start`, `end`, `seq`), for [`Overlay::written`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// The request for the target beneath (a write's data is in the buffer
    /// given to [`Overlay::batch`]).
    pub req: Request,
    /// Where its bytes came from.
    pub from: Vec<(u64, u64, u64)>,
}

/// The held-back requests.
#[derive(Debug, Default)]
pub struct Overlay {
    /// By start offset; no two overlap.
    pieces: BTreeMap<u64, Piece>,
    /// (seq, start) of every piece: oldest first.
    order: BTreeSet<(u64, u64)>,
    data_bytes: u64,
    next_seq: u64,
}

impl Overlay {
    /// An empty overlay.
    pub fn new() -> Self {
        Overlay::default()
    }

    /// Bytes of data held (discards and write-zeroes hold none).
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Pieces held.
    pub fn pieces(&self) -> usize {
        self.pieces.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Hold `kind` at `start` (`len` bytes; a `Data` kind must be that long),
    /// replacing whatever the overlay held there.
    pub fn insert(&mut self, start: u64, len: u64, kind: Kind) {
        debug_assert!(!matches!(&kind, Kind::Data(v) if v.len() as u64 != len));
        if len == 0 {
            return;
        }
        self.carve(start, start + len, None);
        self.next_seq += 1;
        self.put(start, len, self.next_seq, kind);
    }

    fn put(&mut self, start: u64, len: u64, seq: u64, kind: Kind) {
        let p = Piece { len, seq, kind };
        self.data_bytes += p.data_bytes();
        self.order.insert((seq, start));
        self.pieces.insert(start, p);
    }

    fn take(&mut self, start: u64) -> Option<Piece> {
        let p = self.pieces.remove(&start)?;
        self.order.remove(&(p.seq, start));
        self.data_bytes -= p.data_bytes();
        Some(p)
    }

    /// Starts of the pieces overlapping `[start, end)`, in order.
    fn overlapping(&self, start: u64, end: u64) -> Vec<u64> {
        let before = self
            .pieces
            .range(..start)
            .next_back()
            .filter(|(&s, p)| s + p.len > start)
            .map(|(&s, _)| s);
        before
            .into_iter()
            .chain(self.pieces.range(start..end).map(|(&s, _)| s))
            .collect()
    }

    /// Cut `[start, end)` out of every piece (of sequence `only`, if given).
    fn carve(&mut self, start: u64, end: u64, only: Option<u64>) {
        for ps in self.overlapping(start, end) {
            if only.is_some_and(|seq| self.pieces.get(&ps).is_some_and(|p| p.seq != seq)) {
                continue;
            }
            let Some(p) = self.take(ps) else { continue };
            let pe = ps + p.len;
            let (left, right) = (ps < start, pe > end);
            match p.kind {
                Kind::Zero(op, flags) => {
                    if left {
                        self.put(ps, start - ps, p.seq, Kind::Zero(op, flags));
                    }
                    if right {
                        self.put(end, pe - end, p.seq, Kind::Zero(op, flags));
                    }
                }
                Kind::Data(mut v) => {
                    if right {
                        let tail = v[as_index(end - ps)..].to_vec();
                        self.put(end, pe - end, p.seq, Kind::Data(tail));
                    }
                    if left {
                        let keep = as_index(start - ps);
                        v.truncate(keep);
                        if v.capacity() > 2 * keep {
                            v.shrink_to_fit();
                        }
                        self.put(ps, start - ps, p.seq, Kind::Data(v));
                    }
                }
            }
        }
    }

    /// Whether every byte of `[start, start + len)` is in the overlay.
    pub fn covers(&self, start: u64, len: u64) -> bool {
        let end = start + len;
        let mut at = start;
        for ps in self.overlapping(start, end) {
            if ps > at {
                return false;
            }
            if let Some(p) = self.pieces.get(&ps) {
                at = at.max(ps + p.len);
            }
        }
        at >= end
    }

    /// Whether any byte of `[start, start + len)` is in the overlay.
    pub fn intersects(&self, start: u64, len: u64) -> bool {
        !self.overlapping(start, start + len).is_empty()
    }

    /// Copy the overlay's bytes of `[start, start + buf.len())` over `buf`
    /// (which holds the same range as the target beneath has it).
    pub fn patch(&self, start: u64, buf: &mut [u8]) {
        let end = start + buf.len() as u64;
        for ps in self.overlapping(start, end) {
            let Some(p) = self.pieces.get(&ps) else {
                continue;
            };
            let (a, b) = (ps.max(start), (ps + p.len).min(end));
            let dst = &mut buf[as_index(a - start)..as_index(b - start)];
            match &p.kind {
                Kind::Data(v) => dst.copy_from_slice(&v[as_index(a - ps)..as_index(b - ps)]),
                Kind::Zero(..) => dst.fill(0),
            }
        }
    }

    /// The ranges the overlay holds, adjacent pieces joined, in order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&s, p) in &self.pieces {
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = s + p.len,
                _ => out.push((s, s + p.len)),
            }
        }
        out
    }

    /// The range of the oldest piece.
    pub fn oldest(&self) -> Option<(u64, u64)> {
        let &(_, s) = self.order.first()?;
        self.pieces.get(&s).map(|p| (s, s + p.len))
    }

    /// The next request that writes down what the overlay holds in
    /// `[from, end)`: the first piece there, and for data the pieces
    /// right after it, up to `max_data` bytes (copied into `buf`, which
    /// must be that long); a discard or write-zeroes up to `max_zero`.
    /// `None` when the overlay holds nothing there.
    pub fn batch(
        &self,
        from: u64,
        end: u64,
        max_data: u32,
        max_zero: u32,
        buf: &mut [u8],
    ) -> Option<Batch> {
        let first = *self.overlapping(from, end).first()?;
        let p = self.pieces.get(&first)?;
        let a = first.max(from);
        if let Kind::Zero(op, flags) = p.kind {
            let len = (first + p.len).min(end) - a;
            let len = u32::try_from(len).unwrap_or(u32::MAX).min(max_zero);
            return Some(Batch {
                req: Request::new(op, a, len).with_flags(flags),
                from: vec![(a, a + u64::from(len), p.seq)],
            });
        }
        let mut from_pieces = Vec::new();
        let mut at = a;
        let limit = end.min(a + u64::from(max_data));
        let mut next = Some(first);
        while let Some(ps) = next {
            let Some(p) = self.pieces.get(&ps) else { break };
            let Kind::Data(v) = &p.kind else { break };
            let b = (ps + p.len).min(limit);
            buf[as_index(at - a)..as_index(b - a)]
                .copy_from_slice(&v[as_index(at - ps)..as_index(b - ps)]);
            from_pieces.push((at, b, p.seq));
            at = b;
            if at >= limit || at < ps + p.len {
                break;
            }
            next = self.pieces.contains_key(&at).then_some(at);
        }
        let len = u32::try_from(at - a).unwrap_or(u32::MAX);
        Some(Batch {
            req: Request::new(Op::Write, a, len),
            from: from_pieces,
        })
    }

    /// A batch is down: drop its bytes from the overlay, except where a
    /// newer request replaced them since (they are still to be written).
    pub fn written(&mut self, from: &[(u64, u64, u64)]) {
        for &(start, end, seq) in from {
            self.carve(start, end, Some(seq));
        }
    }

    /// Forget everything (a power cut): how many pieces and data bytes went.
    pub fn clear(&mut self) -> (usize, u64) {
        let lost = (self.pieces.len(), self.data_bytes);
        *self = Overlay {
            next_seq: self.next_seq,
            ..Overlay::default()
        };
        lost
    }
}

/// An offset inside a piece or a buffer as an index (pieces and buffers
/// are in memory, so they fit).
fn as_index(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The overlay over a zero-filled `size`-byte disk.
    fn view(o: &Overlay, size: usize) -> Vec<u8> {
        let mut v = vec![0xEE; size];
        o.patch(0, &mut v);
        v
    }

    fn data(byte: u8, len: usize) -> Kind {
        Kind::Data(vec![byte; len])
    }

    #[test]
    fn newer_writes_cut_older_pieces_byte_exactly() {
        let mut o = Overlay::new();
        o.insert(0, 8, data(1, 8));
        o.insert(2, 3, data(2, 3)); // splits the first piece in three
        o.insert(6, 4, Kind::Zero(Op::WriteZeroes, Flags::NONE)); // over its tail and beyond
        assert_eq!(view(&o, 12), [1, 1, 2, 2, 2, 1, 0, 0, 0, 0, 0xEE, 0xEE]);
        assert_eq!(o.data_bytes(), 6);
        assert_eq!(o.pieces(), 4);
        assert_eq!(o.ranges(), [(0, 10)]);
        assert!(o.covers(0, 10) && !o.covers(0, 11) && !o.covers(10, 2));
        assert!(o.intersects(9, 3) && !o.intersects(10, 2));
        // Oldest first: what is left of the first write.
        assert_eq!(o.oldest(), Some((0, 2)));
        o.insert(0, 12, data(3, 12));
        assert_eq!((o.pieces(), o.data_bytes()), (1, 12));
        assert_eq!(view(&o, 12), [3; 12]);
    }

    #[test]
    fn batches_join_adjacent_data_and_stop_at_limits() {
        let mut o = Overlay::new();
        o.insert(0, 4, data(1, 4));
        o.insert(4, 4, data(2, 4));
        o.insert(8, 4, Kind::Zero(Op::Discard, Flags::NONE));
        o.insert(20, 4, data(3, 4));
        let mut buf = vec![0; 16];
        let b = o.batch(0, 100, 16, 64, &mut buf).unwrap();
        assert_eq!(b.req, Request::new(Op::Write, 0, 8));
        assert_eq!(&buf[..8], [1, 1, 1, 1, 2, 2, 2, 2]);
        assert_eq!(b.from, [(0, 4, 1), (4, 8, 2)]);
        // A limit cuts a batch inside a piece.
        let b = o.batch(2, 100, 4, 64, &mut buf).unwrap();
        assert_eq!(
            (b.req, b.from),
            (Request::new(Op::Write, 2, 4), vec![(2, 4, 1), (4, 6, 2)])
        );
        let b = o.batch(8, 100, 16, 2, &mut buf).unwrap();
        assert_eq!(b.req, Request::new(Op::Discard, 8, 2));
        let b = o.batch(12, 22, 16, 64, &mut buf).unwrap();
        assert_eq!(b.req, Request::new(Op::Write, 20, 2));
        assert!(o.batch(24, 100, 16, 64, &mut buf).is_none());
    }

    #[test]
    fn written_keeps_what_was_replaced_meanwhile() {
        let mut o = Overlay::new();
        o.insert(0, 8, data(1, 8));
        let mut buf = vec![0; 8];
        let b = o.batch(0, 8, 8, 8, &mut buf).unwrap();
        // While the batch is on its way down, bytes 2..4 are written again.
        o.insert(2, 2, data(2, 2));
        o.written(&b.from);
        assert_eq!(o.ranges(), [(2, 4)]);
        assert_eq!(view(&o, 8)[..4], [0xEE, 0xEE, 2, 2]);
        assert_eq!(o.data_bytes(), 2);
        assert_eq!(o.clear(), (1, 2));
        assert!(o.is_empty() && o.oldest().is_none());
    }
}
