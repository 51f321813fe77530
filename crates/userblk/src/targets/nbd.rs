//! `nbd`: a remote NBD server as a target.
//!
//! [`NbdTarget::connect`] connects and negotiates once, synchronously, so a
//! server that is down or refuses the export is an error at once. The
//! device's capabilities come from what the server advertised.
//!
//! Requests never block the frontend thread: `submit` hands each one over
//! with [`Ctx::defer`] and returns. Two threads of the target's own do the
//! network work, started at the first request (not at `connect`, so a
//! daemon can still set itself up single-threaded):
//!
//! - the **sender** takes queued requests in order and writes them (header,
//!   then a write's payload straight from the request's buffer);
//! - the **receiver** reads replies, matches each by cookie to the request
//!   in flight, reads a read's data into its buffer, and completes it. It
//!   also owns the connection: when it breaks (EOF, an error, a malformed
//!   reply) it reconnects at once, then with backoff (100 ms doubling to
//!   2 s), and every request not yet answered is sent again on the new
//!   connection (block requests are idempotent). A server whose export
//!   changed size or lost a feature the device advertised is refused and
//!   retried. Requests that wait longer than the reconnect timeout for a
//!   connection fail with EIO; later ones wait again.
//!
//! Dropping the target sends `NBD_CMD_DISC` and joins both threads.
//!
//! Allocation ([`Target::extents`], for `userblk copy` and NBD re-exports)
//! comes from `NBD_CMD_BLOCK_STATUS` on a second connection of its own,
//! made on first use, with structured replies (see
//! [`client::status`]). Only a server that advertises multi-conn is asked
//! for one, since a server made for one client may never answer a second
//! (qemu-nbd without `--shared`); without one, everything is reported as
//! data, which is always true.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use serde_json::json;

use crate::io::Deferred;
use crate::nbd::client::status::StatusConn;
use crate::nbd::client::{self, BlockSizes, ClientError, ExportInfo, NbdUri, Stream};
use crate::nbd::proto;
use crate::target::{
    ring_result, Caps, Ctx, Extent, Op, RangeOpCaps, Request, Submit, Target, MAX_RANGE_OP_BYTES,
};
use crate::{Error, Result};

mod reconnect;

/// How long requests wait for a lost connection to come back, by default.
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long connecting and negotiating may take, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest read or write sent to a server (the protocol's interoperable default).
pub const MAX_REQUEST: u32 = 32 << 20;

const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Requests' headers are gathered up to this much before a write to the socket.
const SEND_BUF: usize = 64 << 10;
const RECV_BUF: usize = 64 << 10;
/// Longest wait to connect and negotiate the block status connection:
/// allocation queries are best effort, not worth stalling a caller long.
const STATUS_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After the block status connection failed, how long to report data
/// before trying again.
const STATUS_RETRY: Duration = Duration::from_secs(10);

/// How to reach the server, and how patient to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// The server and export.
    pub uri: NbdUri,
    /// After a connection is lost, requests wait this long for a new one, then fail with EIO.
    pub reconnect_timeout: Duration,
    /// Limit on connecting, and on each read and write of the handshake.
    pub connect_timeout: Duration,
}

impl NbdOptions {
    /// Options with the default timeouts.
    pub fn new(uri: NbdUri) -> Self {
        NbdOptions {
            uri,
            reconnect_timeout: DEFAULT_RECONNECT_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

/// The nbd target.
pub struct NbdTarget {
    shared: Arc<Shared>,
    started: AtomicBool,
    threads: Mutex<Threads>,
    status: Mutex<StatusLink>,
}

/// The block status connection.
enum StatusLink {
    /// Not made yet: make one on the next query.
    Idle,
    Up(StatusConn),
    /// Failed: report data until then.
    Failed(Instant),
    /// The server has no block status (or no multi-conn): data, always.
    Never,
}

enum Threads {
    /// Not started; the connection made by `connect`, if still unused.
    Idle(Option<Stream>),
    /// The sender and the receiver.
    Running {
        sender: JoinHandle<()>,
        receiver: JoinHandle<()>,
    },
}

/// What the target and its threads share.
struct Shared {
    opts: NbdOptions,
    /// The export as first negotiated; later connections must match it.
    export: ExportInfo,
    caps: Caps,
    state: Mutex<State>,
    /// Wakes the sender: requests queued, a new connection, shutdown.
    send_cv: Condvar,
    /// Wakes the receiver from its reconnect backoff: shutdown.
    link_cv: Condvar,
}

struct State {
    /// Every request not yet answered, by cookie (so in submission order).
    entries: BTreeMap<u64, Entry>,
    /// Cookies for the sender, while connected.
    queue: VecDeque<u64>,
    next_cookie: u64,
    link: Link,
    /// Connections made so far.
    generation: u64,
    /// The socket being used or negotiated, so it can be shut down.
    sock: Option<Stream>,
    shutdown: bool,
}

enum Link {
    /// No connection; the receiver is making one.
    Down,
    /// Connected; the sender takes the write handle when it sees the generation change.
    Up {
        generation: u64,
        writer: Option<Stream>,
    },
}

/// The request's buffer, lent by the frontend, until its result is posted.
type Lent = Arc<Mutex<Option<Deferred>>>;

struct Entry {
    req: Request,
    /// The connection it was last sent on (`None` while it waits to be sent).
    sent_on: Option<u64>,
    /// Since when it has been waiting for a connection (for the reconnect timeout).
    waiting_since: Instant,
    deferred: Lent,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn errno_res(e: Errno) -> i32 {
    -e.raw_os_error()
}

/// The device's capabilities for an export; the export's size is rounded
/// down to whole blocks.
fn caps_for(info: &ExportInfo) -> std::result::Result<Caps, ClientError> {
    let b = info.block_sizes.unwrap_or(BlockSizes {
        min: 1,
        preferred: 4096,
        max: u32::MAX,
    });
    let bad = ClientError::BadBlockSizes {
        min: b.min,
        preferred: b.preferred,
        max: b.max,
    };
    if !b.min.is_power_of_two() || b.min > 65536 {
        return Err(bad);
    }
    let lbs = b.min.max(512);
    if b.max < lbs {
        return Err(bad);
    }
    let max_request = b.max.min(MAX_REQUEST) / lbs * lbs;
    let pbs = if b.preferred.is_power_of_two() {
        b.preferred.clamp(lbs, 65536)
    } else {
        4096.max(lbs)
    };
    let size = info.size / u64::from(lbs) * u64::from(lbs);
    if size == 0 {
        return Err(ClientError::TooSmall {
            size: info.size,
            block: lbs,
        });
    }
    let range_max = MAX_RANGE_OP_BYTES / u64::from(lbs) * u64::from(lbs);
    Ok(Caps {
        logical_block_size: lbs,
        physical_block_size: pbs,
        read_only: info.has(proto::FLAG_READ_ONLY),
        volatile_cache: info.has(proto::FLAG_SEND_FLUSH),
        fua: info.has(proto::FLAG_SEND_FUA),
        rotational: info.has(proto::FLAG_ROTATIONAL),
        discard: info.has(proto::FLAG_SEND_TRIM).then_some(RangeOpCaps {
            granularity: pbs,
            max_bytes: range_max,
        }),
        write_zeroes: info
            .has(proto::FLAG_SEND_WRITE_ZEROES)
            .then_some(RangeOpCaps {
                granularity: lbs,
                max_bytes: range_max,
            }),
        max_request: Some(max_request),
        ..Caps::new(size)
    })
}

impl NbdTarget {
    /// Connect to the server and negotiate the export. Fails if the server
    /// cannot be reached, refuses the export, or offers one no block device
    /// can present.
    pub fn connect(opts: NbdOptions) -> Result<Self> {
        let uri = opts.uri.to_string();
        let wrap = |err| Error::Nbd {
            uri: uri.clone(),
            err,
        };
        let (stream, export) = client::connect(&opts.uri, opts.connect_timeout).map_err(wrap)?;
        let caps = caps_for(&export).map_err(wrap)?;
        caps.check()?;
        if caps.size != export.size {
            tracing::warn!(
                "nbd {uri}: the export's size {} is not a multiple of the {}-byte block size; the device has {} bytes",
                export.size,
                caps.logical_block_size,
                caps.size
            );
        }
        tracing::info!(
            "nbd {uri}: export of {} bytes, flags {:#x}, block sizes {:?}",
            export.size,
            export.flags,
            export.block_sizes
        );
        let sock = stream
            .try_clone()
            .map_err(|e| Error::io(format!("nbd {uri}: duplicating the socket"), e))?;
        Ok(NbdTarget {
            shared: Arc::new(Shared {
                opts,
                export,
                caps,
                state: Mutex::new(State {
                    entries: BTreeMap::new(),
                    queue: VecDeque::new(),
                    next_cookie: 1,
                    link: Link::Down,
                    generation: 0,
                    sock: Some(sock),
                    shutdown: false,
                }),
                send_cv: Condvar::new(),
                link_cv: Condvar::new(),
            }),
            started: AtomicBool::new(false),
            threads: Mutex::new(Threads::Idle(Some(stream))),
            status: Mutex::new(StatusLink::Idle),
        })
    }

    /// The server's URI.
    pub fn uri(&self) -> &NbdUri {
        &self.shared.opts.uri
    }

    /// What the server said about the export when the target connected.
    pub fn export(&self) -> &ExportInfo {
        &self.shared.export
    }

    /// Ask the server for the allocation of `[offset, offset + len)`:
    /// false (nothing appended) if it cannot be had now.
    fn block_status(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> bool {
        let shared = &self.shared;
        let mut link = lock(&self.status);
        if matches!(*link, StatusLink::Idle)
            || matches!(*link, StatusLink::Failed(t) if Instant::now() >= t)
        {
            *link = self.connect_status();
        }
        let StatusLink::Up(conn) = &mut *link else {
            return false;
        };
        let block = u64::from(shared.caps.logical_block_size);
        // A request's length is 32 bits; less than asked is allowed.
        let len = u32::try_from(len).unwrap_or(u32::MAX / 65536 * 65536);
        let first = out.len();
        match conn.block_status(offset, len, block, out) {
            Ok(()) => true,
            Err(e) => {
                out.truncate(first);
                if !matches!(e, ClientError::Failed { .. }) {
                    // Out of step with the server, or it is gone: a new
                    // connection later (a hung server costs every query
                    // its timeouts otherwise).
                    tracing::warn!("nbd {}: block status connection lost: {e}", shared.uri());
                    *link = StatusLink::Failed(Instant::now() + STATUS_RETRY);
                }
                false
            }
        }
    }

    /// Make the block status connection, if the server can have one.
    fn connect_status(&self) -> StatusLink {
        let shared = &self.shared;
        let uri = shared.uri();
        if !shared.export.has(proto::FLAG_CAN_MULTI_CONN) {
            tracing::info!("nbd {uri}: no multi-conn, so no block status: everything is data");
            return StatusLink::Never;
        }
        let timeout = shared.opts.connect_timeout.min(STATUS_CONNECT_TIMEOUT);
        match client::status::connect(&uri.addr, &uri.export, timeout) {
            Ok((conn, info)) => match shared.compatible(&info) {
                Ok(()) => StatusLink::Up(conn),
                Err(e) => {
                    tracing::warn!("nbd {uri}: block status connection: {e}");
                    StatusLink::Failed(Instant::now() + STATUS_RETRY)
                }
            },
            Err(ClientError::NoStatus(why)) => {
                tracing::info!("nbd {uri}: {why}: everything is data");
                StatusLink::Never
            }
            Err(e) => {
                tracing::warn!("nbd {uri}: block status connection: {e}");
                StatusLink::Failed(Instant::now() + STATUS_RETRY)
            }
        }
    }

    /// Start the sender and receiver threads, once.
    fn ensure_started(&self) -> std::result::Result<(), Errno> {
        if self.started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut threads = lock(&self.threads);
        let Threads::Idle(first) = &mut *threads else {
            return Ok(());
        };
        let first = first.take();
        let shared = Arc::clone(&self.shared);
        let sender = std::thread::Builder::new()
            .name("nbd-send".into())
            .spawn(move || shared.sender())
            .map_err(|e| {
                tracing::error!("nbd: starting the sender thread: {e}");
                Errno::AGAIN
            })?;
        let shared = Arc::clone(&self.shared);
        let receiver = std::thread::Builder::new()
            .name("nbd-recv".into())
            .spawn(move || shared.receiver(first));
        match receiver {
            Ok(receiver) => {
                *threads = Threads::Running { sender, receiver };
                self.started.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) => {
                tracing::error!("nbd: starting the receiver thread: {e}");
                lock(&self.shared.state).shutdown = true;
                self.shared.send_cv.notify_all();
                let _ = sender.join();
                lock(&self.shared.state).shutdown = false;
                Err(Errno::AGAIN)
            }
        }
    }
}

impl Shared {
    fn uri(&self) -> &NbdUri {
        &self.opts.uri
    }

    /// Queue a request for the sender (or for the next connection).
    fn enqueue(&self, req: Request, deferred: Deferred) {
        let mut st = lock(&self.state);
        let cookie = st.next_cookie;
        st.next_cookie = st.next_cookie.wrapping_add(1);
        st.entries.insert(
            cookie,
            Entry {
                req,
                sent_on: None,
                waiting_since: Instant::now(),
                deferred: Arc::new(Mutex::new(Some(deferred))),
            },
        );
        if matches!(st.link, Link::Up { .. }) {
            st.queue.push_back(cookie);
            drop(st);
            self.send_cv.notify_one();
        }
    }

    // ---- the receiver: replies and the connection's life ----

    fn receiver(&self, first: Option<Stream>) {
        let mut next = first;
        loop {
            let stream = match next.take() {
                Some(s) => s,
                None => match self.reconnect() {
                    Some(s) => s,
                    None => return,
                },
            };
            let why = match self.install(&stream) {
                Ok(Some(generation)) => self.serve(stream, generation),
                Ok(None) => return,
                Err(e) => e,
            };
            if !self.lose(&why) {
                return;
            }
        }
    }

    /// Make `stream` the connection: the sender gets a handle on it and
    /// every unanswered request is queued to be sent on it. `None` on shutdown.
    fn install(&self, stream: &Stream) -> std::result::Result<Option<u64>, ClientError> {
        let dup = || {
            stream
                .try_clone()
                .map_err(client::io_error("duplicating the socket"))
        };
        let (writer, sock) = (dup()?, dup()?);
        let mut st = lock(&self.state);
        if st.shutdown {
            return Ok(None);
        }
        st.generation += 1;
        let generation = st.generation;
        st.link = Link::Up {
            generation,
            writer: Some(writer),
        };
        st.sock = Some(sock);
        let mut queue = VecDeque::with_capacity(st.entries.len());
        for (cookie, e) in st.entries.iter_mut() {
            e.sent_on = None;
            queue.push_back(*cookie);
        }
        st.queue = queue;
        drop(st);
        self.send_cv.notify_all();
        Ok(Some(generation))
    }

    /// Read replies until the connection fails; returns why it did.
    fn serve(&self, stream: Stream, generation: u64) -> ClientError {
        let mut r = BufReader::with_capacity(RECV_BUF, stream);
        loop {
            let reply = match client::read_reply(&mut r) {
                Ok(reply) => reply,
                Err(e) => return e,
            };
            let cookie = reply.cookie;
            let entry = {
                let mut st = lock(&self.state);
                match st.entries.get(&cookie) {
                    Some(e) if e.sent_on == Some(generation) => {}
                    _ => return ClientError::UnknownCookie(cookie),
                }
                if reply.error == proto::ESHUTDOWN {
                    // Not the request's fault: it goes again on the next connection.
                    return ClientError::ShuttingDown;
                }
                match st.entries.remove(&cookie) {
                    Some(e) => e,
                    None => return ClientError::UnknownCookie(cookie),
                }
            };
            let mut lent = lock(&entry.deferred);
            let res = if reply.error != 0 {
                errno_res(proto::errno_from_error(reply.error))
            } else if entry.req.op == Op::Read {
                let read = match lent.as_mut() {
                    Some(d) => r.read_exact(d.data_mut()),
                    None => Ok(()),
                };
                if let Err(e) = read {
                    drop(lent);
                    lock(&self.state).entries.insert(cookie, entry);
                    return client::io_error("reading a read's data")(e);
                }
                i32::try_from(entry.req.len).unwrap_or(i32::MAX)
            } else if entry.req.op == Op::Write {
                i32::try_from(entry.req.len).unwrap_or(i32::MAX)
            } else {
                0
            };
            if let Some(d) = lent.take() {
                d.complete(res);
            }
        }
    }

    // ---- the sender ----

    fn sender(&self) {
        let mut out: Option<(u64, BufWriter<Stream>)> = None;
        let mut batch: Vec<(u64, Request, Lent)> = Vec::new();
        loop {
            {
                let mut st = lock(&self.state);
                let generation = loop {
                    if st.shutdown {
                        let up = match st.link {
                            Link::Up { generation, .. } => Some(generation),
                            Link::Down => None,
                        };
                        drop(st);
                        if let Some((g, w)) = out.as_mut() {
                            if Some(*g) == up {
                                self.disconnect(w);
                            }
                        }
                        return;
                    }
                    if let Link::Up { generation, writer } = &mut st.link {
                        let generation = *generation;
                        if out.as_ref().map(|o| o.0) != Some(generation) {
                            out = writer
                                .take()
                                .map(|w| (generation, BufWriter::with_capacity(SEND_BUF, w)));
                        }
                        if out.is_some() && !st.queue.is_empty() {
                            break generation;
                        }
                    }
                    st = self
                        .send_cv
                        .wait(st)
                        .unwrap_or_else(PoisonError::into_inner);
                };
                while let Some(cookie) = st.queue.pop_front() {
                    if let Some(e) = st.entries.get_mut(&cookie) {
                        e.sent_on = Some(generation);
                        batch.push((cookie, e.req, Arc::clone(&e.deferred)));
                    }
                }
            }
            if let Some((_, w)) = out.as_mut() {
                if let Err(e) = self.send(w, &batch) {
                    // The receiver sees the shut-down socket and reconnects.
                    tracing::debug!("nbd {}: sending: {e}", self.uri());
                    w.get_ref().shutdown();
                    out = None;
                }
            }
            batch.clear();
        }
    }

    fn send(
        &self,
        w: &mut BufWriter<Stream>,
        batch: &[(u64, Request, Lent)],
    ) -> std::io::Result<()> {
        for (cookie, req, lent) in batch {
            let (cmd, flags) = client::command(req, self.export.flags);
            let len = if req.op == Op::Flush { 0 } else { req.len };
            w.write_all(&client::encode_request(
                cmd, flags, *cookie, req.offset, len,
            ))?;
            if req.op == Op::Write {
                let lent = lock(lent);
                match lent.as_ref() {
                    Some(d) => w.write_all(d.data())?,
                    // Answered before it was sent: the server is not following the protocol.
                    None => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            "a write was answered before its data was sent",
                        ))
                    }
                }
            }
        }
        w.flush()
    }

    /// `NBD_CMD_DISC` on the way out.
    fn disconnect(&self, w: &mut BufWriter<Stream>) {
        let disc = client::encode_request(proto::CMD_DISC, 0, 0, 0, 0);
        if let Err(e) = w.write_all(&disc).and_then(|()| w.flush()) {
            tracing::debug!("nbd {}: sending NBD_CMD_DISC: {e}", self.uri());
        }
    }
}

impl Drop for NbdTarget {
    fn drop(&mut self) {
        let threads = std::mem::replace(&mut *lock(&self.threads), Threads::Idle(None));
        match threads {
            Threads::Idle(None) => {}
            Threads::Idle(Some(stream)) => {
                let mut w = BufWriter::new(stream);
                self.shared.disconnect(&mut w);
            }
            Threads::Running { sender, receiver } => {
                {
                    let mut st = lock(&self.shared.state);
                    st.shutdown = true;
                    if !st.entries.is_empty() {
                        // Requests still out (the frontend did not drain):
                        // do not wait for the sender to finish writing them.
                        if let Some(s) = &st.sock {
                            s.shutdown();
                        }
                    }
                }
                self.shared.send_cv.notify_all();
                if sender.join().is_err() {
                    tracing::error!("nbd: the sender thread panicked");
                }
                if let Some(s) = &lock(&self.shared.state).sock {
                    s.shutdown();
                }
                self.shared.link_cv.notify_all();
                if receiver.join().is_err() {
                    tracing::error!("nbd: the receiver thread panicked");
                }
            }
        }
    }
}

impl std::fmt::Debug for NbdTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTarget")
            .field("uri", &self.shared.opts.uri.to_string())
            .field("export", &self.shared.export)
            .finish()
    }
}

impl Target for NbdTarget {
    fn caps(&self) -> Caps {
        self.shared.caps
    }

    fn resize(&self, _new_size: u64) -> crate::Result<u64> {
        Err(crate::Error::cannot_resize(
            "the nbd target",
            "the export's size is the NBD server's (resize it there, then add the device again)",
        ))
    }

    fn submit(&self, ctx: &mut Ctx<'_>) -> Submit {
        let req = *ctx.req();
        if req.op == Op::Flush && !self.shared.caps.volatile_cache {
            // No cache on the server: every completed write is already durable.
            return Submit::Done(Ok(0));
        }
        if req.op.has_data() && ctx.data().len() != req.len as usize {
            return Submit::Done(Err(Errno::INVAL));
        }
        if let Err(e) = self.ensure_started() {
            return Submit::Done(Err(e));
        }
        match ctx.defer(0) {
            Ok(d) => {
                self.shared.enqueue(req, d);
                Submit::Pending
            }
            Err(e) => Submit::Done(Err(e)),
        }
    }

    fn complete(&self, _ctx: &mut Ctx<'_>, _step: u16, res: i32) -> Submit {
        Submit::Done(ring_result(res))
    }

    fn extents(&self, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<(), Errno> {
        if !self.block_status(offset, len, out) {
            out.push(Extent::data(len));
        }
        Ok(())
    }

    /// A network round trip is too dear for the read path.
    fn reads_zeroes(&self, _offset: u64, _len: u64) -> Result<bool, Errno> {
        Ok(false)
    }

    fn describe(&self) -> serde_json::Value {
        json!({
            "type": "nbd",
            "uri": self.shared.opts.uri.to_string(),
            "size": self.shared.caps.size,
            "reconnect_timeout": self.shared.opts.reconnect_timeout.as_secs_f64(),
        })
    }
}
