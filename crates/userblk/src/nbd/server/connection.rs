//! One client's connection: the handshake, then the transmission loop.

use std::io::IoSlice;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::sockopt::Timeout;
use rustix::net::{RecvFlags, SendFlags};

use super::budget::Budget;
use super::handshake::{self, HandshakeError, Negotiated, Outcome};
use super::listener::leave_handshake;
use super::timed::Stream;
use super::transmission::{self, Command, Header, Limits, MAX_PAYLOAD};
use super::{Counters, Shared, PAYLOAD_WAIT};
use crate::nbd::proto::*;
use crate::slots::{Event, Slots};
use crate::target::{IoResult, Op, Request, Target};
use crate::Error;

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
pub(super) enum ConnError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("client broke the protocol: {0}")]
    Protocol(String),
    #[error("socket: {0}")]
    Io(Errno),
    #[error(transparent)]
    Ring(#[from] Error),
    #[error("newer connections pushed this one out during its handshake")]
    PushedOut,
    #[error("{0} connections are served already")]
    Full(usize),
}

/// A connection counted as in the transmission phase while this lives.
struct Serving<'a>(&'a AtomicUsize);

impl<'a> Serving<'a> {
    fn enter(shared: &'a Shared) -> std::result::Result<Self, ConnError> {
        let max = shared.opts.max_connections;
        let n = &shared.transmitting;
        n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |c| {
            (c < max).then_some(c + 1)
        })
        .map_err(|_| ConnError::Full(max))?;
        Ok(Serving(n))
    }
}

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(super) fn serve_connection(
    shared: &Shared,
    id: u64,
    sock: &OwnedFd,
) -> std::result::Result<(), ConnError> {
    let mut stream = Stream {
        sock,
        deadline: Instant::now() + shared.opts.handshake_timeout,
    };
    let outcome = handshake::negotiate(&mut stream, &shared.export);
    let admitted = leave_handshake(shared, id);
    let neg = match outcome? {
        Outcome::Closed => return Ok(()),
        Outcome::Transmission(n) => n,
    };
    if !admitted {
        return Err(ConnError::PushedOut);
    }
    let _serving = Serving::enter(shared)?;
    // A client that stops in the middle of a write's data gives up its
    // share of the payload budget after this long (an idle client between
    // requests only wakes its thread up to read again).
    rustix::net::sockopt::set_socket_timeout(sock, Timeout::Recv, Some(PAYLOAD_STALL))
        .map_err(ConnError::Io)?;
    tracing::debug!(?neg, "nbd: transmission");
    let slots = Slots::new(shared.limits.caps, shared.opts.depth, shared.opts.buf_bytes)?;
    let n = slots.len();
    let mut conn = Conn {
        sock,
        target: &*shared.target,
        counters: &shared.counters,
        neg,
        limits: shared.limits,
        base_bytes: shared.opts.buf_bytes,
        free: (0..u16::try_from(slots.len()).unwrap_or(1)).rev().collect(),
        headers: vec![None; slots.len()],
        rest: vec![None; slots.len()],
        slots,
        rbuf: vec![0; READ_BUF],
        rstart: 0,
        rend: 0,
        out: Vec::with_capacity(64 * 1024),
        segs: Vec::with_capacity(256),
        seg_data: 0,
        events: Vec::with_capacity(256),
        extents: Vec::new(),
        status: Vec::new(),
        granted: vec![0; n],
        budget: &shared.budget,
        big_bytes: 0,
        need: REQUEST_LEN,
        last_input: Instant::now(),
        eof: false,
        poll_armed: false,
    };
    let result = conn.run();
    // Whatever happened, no slot may still be the target's when the buffers go.
    let mut events = Vec::new();
    if let Err(e) = conn.slots.drain(conn.target, &mut events) {
        tracing::error!("nbd: waiting for requests in flight: {e}");
    }
    result
}

/// Bytes read from the socket at a time: many small requests per read.
const READ_BUF: usize = 256 * 1024;
/// How long to poll a busy socket before sleeping on it.
const SPIN: Duration = Duration::from_micros(50);
/// A socket counts as busy this long after its last input.
const SPIN_AFTER_INPUT: Duration = Duration::from_millis(1);
/// Writes up to this long are dispatched once their data is buffered;
/// longer ones are read straight into their slot's buffer.
const SMALL_WRITE: u32 = 64 * 1024;
/// Ring token of the socket's readability poll.
const SOCK_TOKEN: u16 = u16::MAX;
/// Reads at least this long are checked for holes first (see
/// [`Conn::read_of_zeroes`]): a lookup costs about what sending a few KiB does.
const HOLE_CHECK_MIN: u32 = 64 * 1024;
/// Memory the oversized requests of one connection may hold at once (all
/// connections together are bounded by the server's payload budget).
const BIG_BUDGET: usize = 128 << 20;
/// A client that sends nothing for this long in the middle of a write's
/// data is hung up on.
const PAYLOAD_STALL: Duration = Duration::from_secs(30);
/// Replies gathered before they are sent anyway.
const MAX_SEGS: usize = 512;
/// Read data gathered before it is sent anyway: the client starts
/// receiving while later reads are still being copied.
const SEND_DATA_BYTES: usize = 256 * 1024;

/// One piece of the outgoing stream.
#[derive(Debug, Clone, Copy)]
enum Seg {
    /// Bytes `start..end` of `out`.
    Bytes(usize, usize),
    /// The first `len` bytes of a slot's buffer (a read's data); the slot
    /// is free again once sent.
    Data(u16, usize),
    /// A slot whose reply is all in `out`: free again once sent.
    Release(u16),
}

struct Conn<'a> {
    sock: &'a OwnedFd,
    target: &'a dyn Target,
    counters: &'a Counters,
    neg: Negotiated,
    limits: Limits,
    base_bytes: usize,
    slots: Slots,
    /// Slots neither with the target nor waiting for their reply to be sent.
    free: Vec<u16>,
    headers: Vec<Option<Header>>,
    /// A trim or write-zeroes split for the target's limit: the rest of
    /// its range (next offset, end), served piece by piece in its slot.
    rest: Vec<Option<(u64, u64)>>,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    out: Vec<u8>,
    segs: Vec<Seg>,
    /// Bytes of read data in `segs`.
    seg_data: usize,
    events: Vec<Event>,
    extents: Vec<crate::target::Extent>,
    /// A block status reply's (length, flags) pairs, reused.
    status: Vec<(u32, u32)>,
    /// Bytes of the server's payload budget each slot's buffer holds.
    granted: Vec<usize>,
    budget: &'a Budget,
    /// Bytes of buffers grown for oversized requests (the sum of `granted`).
    big_bytes: usize,
    /// Bytes the next request needs buffered before it is dispatched: a
    /// header, or a small write's header and data (waiting for those on
    /// the ring beats blocking in `recv` with other work at hand).
    need: usize,
    /// When bytes last came in (see [`Conn::spin_fill`]).
    last_input: Instant,
    /// The client closed its side, sent NBD_CMD_DISC, or the server is stopping.
    eof: bool,
    poll_armed: bool,
}

impl Conn<'_> {
    fn run(&mut self) -> std::result::Result<(), ConnError> {
        loop {
            self.dispatch()?;
            if self.slots.in_use() > 0 {
                self.slots.wait(self.target, false, &mut self.events)?;
                self.on_events();
            }
            self.send()?;
            if self.eof && self.slots.in_use() == 0 {
                return Ok(());
            }
            if self.can_take() && self.has_request() {
                continue;
            }
            let want_input = !self.eof && self.can_take();
            if self.slots.in_use() == 0 {
                if !want_input {
                    // Only replies were waiting, and they are sent.
                    continue;
                }
                // Nothing in flight: block on the socket alone (after a
                // short spin while the client is busy).
                if !self.spin_fill()? {
                    self.fill(RecvFlags::empty())?;
                }
                continue;
            }
            if want_input && self.fill(RecvFlags::DONTWAIT)? {
                continue;
            }
            if want_input && !self.poll_armed {
                self.slots
                    .poll_readable(self.sock.as_fd(), SOCK_TOKEN)
                    .map_err(ConnError::Io)?;
                self.poll_armed = true;
            }
            self.slots.wait(self.target, true, &mut self.events)?;
            self.on_events();
        }
    }

    fn can_take(&self) -> bool {
        !self.free.is_empty()
    }

    fn buffered(&self) -> usize {
        self.rend - self.rstart
    }

    /// A whole request header is buffered (and, for a small write, its data).
    fn has_request(&self) -> bool {
        !self.eof && self.buffered() >= self.need
    }

    /// Poll the socket without sleeping for a moment, if requests came
    /// in a moment ago; true if something was read.
    ///
    /// A client with requests in a steady stream sends the next one soon
    /// after its last reply: catching it awake saves a sleep, a wakeup and
    /// the client an inter-processor interrupt per request. With 4 KiB
    /// writes at QD 32 over a Unix socket on 2 cores, sleeping in `recv`
    /// meant a context switch per request and fio at 100% of a core.
    fn spin_fill(&mut self) -> std::result::Result<bool, ConnError> {
        let now = Instant::now();
        if now.duration_since(self.last_input) > SPIN_AFTER_INPUT {
            return Ok(false);
        }
        while now.elapsed() < SPIN {
            if self.fill(RecvFlags::DONTWAIT)? {
                return Ok(true);
            }
            std::hint::spin_loop();
        }
        Ok(false)
    }

    /// Read more of the stream; false if nothing was there (DONTWAIT).
    fn fill(&mut self, flags: RecvFlags) -> std::result::Result<bool, ConnError> {
        if self.rstart > 0
            && (self.rstart == self.rend || self.rbuf.len() - self.rstart < self.need)
        {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        if self.rend == self.rbuf.len() {
            // Full of whole requests waiting for slots: nothing to read into.
            return Ok(false);
        }
        loop {
            match rustix::net::recv(self.sock, &mut self.rbuf[self.rend..], flags) {
                Ok((0, _)) => {
                    self.eof = true;
                    return Ok(true);
                }
                Ok((n, _)) => {
                    self.rend += n;
                    self.last_input = Instant::now();
                    return Ok(true);
                }
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => return Ok(false),
                Err(Errno::CONNRESET | Errno::PIPE | Errno::TIMEDOUT) => {
                    self.eof = true;
                    return Ok(true);
                }
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
    }

    /// Read exactly `buf.len()` bytes: buffered ones first, then the socket.
    fn read_exact_into(
        rbuf: &[u8],
        rstart: &mut usize,
        rend: usize,
        sock: &OwnedFd,
        buf: &mut [u8],
    ) -> std::result::Result<(), ConnError> {
        let have = (rend - *rstart).min(buf.len());
        buf[..have].copy_from_slice(&rbuf[*rstart..*rstart + have]);
        *rstart += have;
        let mut done = have;
        while done < buf.len() {
            match rustix::net::recv(sock, &mut buf[done..], RecvFlags::WAITALL) {
                Ok((0, _)) => {
                    return Err(ConnError::Protocol(
                        "client went away in the middle of a write's data".into(),
                    ))
                }
                Ok((n, _)) => done += n,
                Err(Errno::INTR) => {}
                Err(Errno::AGAIN) => {
                    return Err(ConnError::Protocol(format!(
                        "client sent none of a write's data for {PAYLOAD_STALL:?}"
                    )))
                }
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        Ok(())
    }

    /// Drop `n` bytes of payload (a refused write's data).
    fn skip(&mut self, mut n: usize) -> std::result::Result<(), ConnError> {
        let have = self.buffered().min(n);
        self.rstart += have;
        n -= have;
        let mut sink = [0u8; 16 * 1024];
        while n > 0 {
            let want = n.min(sink.len());
            Self::read_exact_into(&[], &mut 0, 0, self.sock, &mut sink[..want])?;
            n -= want;
        }
        Ok(())
    }

    /// Start every buffered request there is a slot for.
    fn dispatch(&mut self) -> std::result::Result<(), ConnError> {
        while self.has_request() {
            let Some(&slot) = self.free.last() else {
                return Ok(());
            };
            let mut raw = [0u8; REQUEST_LEN];
            raw.copy_from_slice(&self.rbuf[self.rstart..self.rstart + REQUEST_LEN]);
            let Some(h) = Header::parse(&raw) else {
                return Err(ConnError::Protocol(format!(
                    "bad request magic {:#010x}",
                    u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]])
                )));
            };
            let payload = h.payload_len();
            if payload > MAX_PAYLOAD {
                return Err(ConnError::Protocol(format!(
                    "write of {payload} bytes (at most {MAX_PAYLOAD})"
                )));
            }
            if h.kind == CMD_WRITE && payload <= SMALL_WRITE {
                let whole = REQUEST_LEN + payload as usize;
                if self.buffered() < whole {
                    self.need = whole;
                    return Ok(());
                }
            }
            self.need = REQUEST_LEN;
            let big = payload as usize > self.base_bytes;
            if big && self.big_bytes + payload as usize > BIG_BUDGET && self.slots.in_use() > 0 {
                // Let earlier big requests finish first.
                return Ok(());
            }
            self.rstart += REQUEST_LEN;
            let cmd = match transmission::command(&h, &self.neg, &self.limits) {
                Ok(c) => c,
                Err(e) => {
                    self.skip(payload as usize)?;
                    tracing::debug!(?h, e, "nbd: refused request");
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    self.reply_now(&h, e);
                    continue;
                }
            };
            match cmd {
                Command::Disconnect => {
                    self.eof = true;
                    return Ok(());
                }
                Command::Nothing => {
                    self.skip(payload as usize)?;
                    self.reply_now(&h, 0);
                }
                Command::BlockStatus { offset, len, one } => {
                    self.block_status(&h, offset, len, one)
                }
                Command::Io(req) if self.read_of_zeroes(&h, &req) => {
                    self.counters.count(Op::Read, true);
                    let start = self.out.len();
                    transmission::hole_reply(&mut self.out, &h);
                    self.segs.push(Seg::Bytes(start, self.out.len()));
                }
                Command::Io(req) => self.start_io(slot, h, req, payload)?,
            }
            if self.segs.len() >= MAX_SEGS || self.seg_data >= SEND_DATA_BYTES {
                self.send()?;
            }
        }
        Ok(())
    }

    /// Get `n` bytes of the server's payload budget before allocating a
    /// buffer for them; false if they did not come within [`PAYLOAD_WAIT`].
    ///
    /// A connection that holds budget itself first finishes and sends its
    /// own requests, which gives it back: no connection sleeps on budget
    /// while holding some, so none waits on another that waits on it.
    fn take_budget(&mut self, n: usize) -> std::result::Result<bool, ConnError> {
        let deadline = Instant::now() + PAYLOAD_WAIT;
        loop {
            if self.budget.try_take(n) {
                return Ok(true);
            }
            if self.big_bytes > 0 {
                self.send()?;
            }
            if self.big_bytes == 0 || self.slots.in_use() == 0 || Instant::now() >= deadline {
                return Ok(self.budget.take_until(n, deadline));
            }
            self.slots.wait(self.target, true, &mut self.events)?;
            self.on_events();
        }
    }

    /// Start a read, write, flush, trim or write-zeroes in `slot` (the
    /// last free one), its payload read first.
    fn start_io(
        &mut self,
        slot: u16,
        h: Header,
        req: Request,
        payload: u32,
    ) -> std::result::Result<(), ConnError> {
        let need = if req.op.has_data() {
            req.len as usize
        } else {
            0
        };
        if need > self.slots.buf(slot).len() {
            if !self.take_budget(need)? {
                tracing::debug!(?h, "nbd: no payload budget within {PAYLOAD_WAIT:?}");
                self.skip(payload as usize)?;
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.reply_now(&h, error_from_errno(Errno::NOMEM));
                return Ok(());
            }
            if let Err(e) = self.slots.reserve(slot, need) {
                self.budget.give(need);
                self.skip(payload as usize)?;
                self.reply_now(&h, error_from_errno(e));
                return Ok(());
            }
            self.granted[usize::from(slot)] = need;
            self.big_bytes += need;
        }
        if req.op == Op::Write {
            if need > self.buffered() {
                // About to wait for the client: let it have the replies
                // it may be waiting for first.
                self.send()?;
            }
            let buf = &mut self.slots.buf_mut(slot)[..need];
            Self::read_exact_into(&self.rbuf, &mut self.rstart, self.rend, self.sock, buf)?;
        }
        // `slot` was the last free one; a send above may have freed more since.
        if let Some(i) = self.free.iter().rposition(|&s| s == slot) {
            self.free.swap_remove(i);
        }
        self.headers[usize::from(slot)] = Some(h);
        let mut req = req;
        if let Some(piece) = transmission::range_piece(&self.limits.caps, req.op, req.len) {
            let end = req.offset + u64::from(req.len);
            req.len = piece;
            self.rest[usize::from(slot)] = Some((req.offset + u64::from(piece), end));
        }
        self.start(slot, req);
        Ok(())
    }

    /// Start `req` in `slot`, and the pieces after it while they finish inline.
    fn start(&mut self, slot: u16, mut req: Request) {
        while let Some(result) = self.slots.start(self.target, slot, req) {
            match self.next_piece(slot, &req, result) {
                Some(next) => req = next,
                None => return self.finished(slot, req.op, result),
            }
        }
    }

    /// The piece of a split request to start after `req` ended with `result`.
    fn next_piece(&mut self, slot: u16, req: &Request, result: IoResult) -> Option<Request> {
        let rest = &mut self.rest[usize::from(slot)];
        let (offset, end) = rest.take()?;
        if result.is_err() {
            return None;
        }
        let max = transmission::range_piece(&self.limits.caps, req.op, u32::MAX)?;
        // `end - offset` is below the original u32 length.
        let len = u32::try_from((end - offset).min(u64::from(max))).unwrap_or(max);
        if offset + u64::from(len) < end {
            *rest = Some((offset + u64::from(len), end));
        }
        Some(Request {
            offset,
            len,
            ..*req
        })
    }

    fn on_events(&mut self) {
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            match ev {
                Event::Done { slot, req, result } => match self.next_piece(slot, &req, result) {
                    Some(next) => self.start(slot, next),
                    None => self.finished(slot, req.op, result),
                },
                Event::Frontend {
                    token: SOCK_TOKEN, ..
                } => self.poll_armed = false,
                Event::Frontend { token, res } => {
                    tracing::warn!(token, res, "nbd: stray ring completion");
                }
            }
        }
        self.events = events;
    }

    /// A request in `slot` finished: queue its reply.
    fn finished(&mut self, slot: u16, op: Op, result: IoResult) {
        let Some(h) = self.headers[usize::from(slot)].take() else {
            tracing::error!(slot, "nbd: finished request with no header");
            self.free.push(slot);
            return;
        };
        self.counters.count(op, result.is_ok());
        let start = self.out.len();
        match result {
            Ok(_) if op == Op::Read => {
                transmission::reply_header(&mut self.out, &self.neg, &h, 0, h.len);
                self.segs.push(Seg::Bytes(start, self.out.len()));
                self.segs.push(Seg::Data(slot, h.len as usize));
                self.seg_data += h.len as usize;
            }
            Ok(_) => {
                transmission::reply_header(&mut self.out, &self.neg, &h, 0, 0);
                self.segs.push(Seg::Bytes(start, self.out.len()));
                self.segs.push(Seg::Release(slot));
            }
            Err(e) => {
                tracing::debug!(?h, %e, "nbd: request failed");
                // An error reply carries no data, simple or structured.
                let err = error_from_errno(e);
                transmission::reply_header(&mut self.out, &self.neg, &h, err, 0);
                self.segs.push(Seg::Bytes(start, self.out.len()));
                self.segs.push(Seg::Release(slot));
            }
        }
    }

    /// A reply that needs no slot (errors found before dispatch, no-ops:
    /// a read answered here has length 0 or an error, so no data).
    fn reply_now(&mut self, h: &Header, error: u32) {
        let start = self.out.len();
        transmission::reply_header(&mut self.out, &self.neg, h, error, 0);
        self.segs.push(Seg::Bytes(start, self.out.len()));
    }

    /// Whether `req` is a read that can be answered with one hole chunk
    /// instead of data: the client takes structured replies and allows
    /// fragments (no `DF`), the read is large enough for the saving to pay
    /// for the lookup, and the target says the whole range reads as zeroes.
    fn read_of_zeroes(&self, h: &Header, req: &Request) -> bool {
        if req.op != Op::Read
            || !self.neg.structured
            || h.flags & CMD_FLAG_DF != 0
            || req.len < HOLE_CHECK_MIN
        {
            return false;
        }
        self.target
            .reads_zeroes(req.offset, u64::from(req.len))
            .unwrap_or(false)
    }

    fn block_status(&mut self, h: &Header, offset: u64, len: u32, one: bool) {
        self.extents.clear();
        let result = self
            .target
            .extents(offset, u64::from(len), &mut self.extents);
        if let Err(e) = result {
            self.reply_now(h, error_from_errno(e));
            return;
        }
        let pairs = &mut self.status;
        pairs.clear();
        let mut covered = 0u64;
        for e in &self.extents {
            if covered >= u64::from(len) {
                break;
            }
            let l = e.len.min(u64::from(len) - covered);
            covered += l;
            let flags = if e.hole { STATE_HOLE } else { 0 } | if e.zero { STATE_ZERO } else { 0 };
            // `l` is at most `len`, a u32.
            pairs.push((u32::try_from(l).unwrap_or(u32::MAX), flags));
            if one {
                break;
            }
        }
        if pairs.is_empty() {
            pairs.push((len, 0));
        }
        let start = self.out.len();
        transmission::block_status_reply(&mut self.out, h.cookie, pairs);
        self.segs.push(Seg::Bytes(start, self.out.len()));
    }

    /// Send every queued reply, then free their slots.
    fn send(&mut self) -> std::result::Result<(), ConnError> {
        if self.segs.is_empty() {
            return Ok(());
        }
        let result = {
            let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(self.segs.len());
            for s in &self.segs {
                match *s {
                    Seg::Bytes(a, b) if b > a => iov.push(IoSlice::new(&self.out[a..b])),
                    Seg::Data(slot, len) => {
                        let buf = self.slots.buf(slot);
                        iov.push(IoSlice::new(&buf[..len.min(buf.len())]));
                    }
                    _ => {}
                }
            }
            send_all(self.sock, &mut iov)
        };
        for s in std::mem::take(&mut self.segs) {
            if let Seg::Data(slot, _) | Seg::Release(slot) = s {
                if self.slots.buf(slot).len() > self.base_bytes {
                    self.slots.shrink(slot);
                }
                let granted = std::mem::take(&mut self.granted[usize::from(slot)]);
                self.big_bytes = self.big_bytes.saturating_sub(granted);
                self.budget.give(granted);
                self.free.push(slot);
            }
        }
        self.out.clear();
        self.seg_data = 0;
        match result {
            Ok(()) => Ok(()),
            // The client is gone: stop reading, let what is in flight finish.
            Err(Errno::PIPE | Errno::CONNRESET) => {
                self.eof = true;
                Ok(())
            }
            Err(e) => Err(ConnError::Io(e)),
        }
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        self.budget.give(self.granted.iter().sum());
    }
}

fn send_all(sock: &OwnedFd, mut iov: &mut [IoSlice<'_>]) -> std::result::Result<(), Errno> {
    // Skip empty slices so that "nothing left" is simply "no slices left".
    IoSlice::advance_slices(&mut iov, 0);
    while !iov.is_empty() {
        // At most IOV_MAX (1024) slices per call.
        let n = iov.len().min(1024);
        match rustix::net::sendmsg(
            sock,
            &iov[..n],
            &mut rustix::net::SendAncillaryBuffer::default(),
            SendFlags::NOSIGNAL,
        ) {
            Ok(sent) => IoSlice::advance_slices(&mut iov, sent),
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
