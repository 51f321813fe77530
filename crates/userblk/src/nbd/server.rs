//! The NBD server frontend: listening sockets, and one thread with one
//! ring per connection.
//!
//! A connection thread negotiates ([`super::handshake`]), then loops:
//! read whatever requests have arrived, start each in a free slot of its
//! [`Slots`] (the target finishes inline or on the ring), and send every
//! finished reply in one `sendmsg`. Replies go out as requests finish, in
//! any order, as the protocol allows. When every slot is busy the thread
//! stops reading, so a client cannot make it queue without bound.
//!
//! ```no_run
//! use std::sync::Arc;
//! use userblk::nbd::server::{Listen, Server, ServerOptions};
//! use userblk::targets::MemTarget;
//!
//! let target = Arc::new(MemTarget::new(1 << 30)?);
//! let opts = ServerOptions::new(vec!["unix:/tmp/mem.sock".parse()?]);
//! let server = Server::start(target, opts)?;
//! // ... `nbdinfo nbd+unix:///?socket=/tmp/mem.sock` ...
//! server.stop();
//! # Ok::<(), userblk::Error>(())
//! ```

use std::collections::HashMap;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{RecvFlags, SendFlags};

use super::handshake::{self, Export, HandshakeError, Negotiated, Outcome};
use super::proto::*;
use super::transmission::{self, Command, Header, Limits, MAX_PAYLOAD};
use crate::slots::{Event, Slots};
use crate::target::{IoResult, Op, Request, Target};
use crate::{Error, Result};

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address, `HOST:PORT` (port 0 picks a free one).
    Tcp(String),
}

impl std::str::FromStr for Listen {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(Error::invalid(
                    "unix: needs a socket path, e.g. unix:/run/disk.sock",
                ));
            }
            Ok(Listen::Unix(PathBuf::from(p)))
        } else if let Some(a) = s.strip_prefix("tcp:") {
            let port_ok = a
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
            if !port_ok {
                return Err(Error::invalid(format!(
                    "tcp:{a}: expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:10809"
                )));
            }
            Ok(Listen::Tcp(a.to_string()))
        } else {
            Err(Error::invalid(format!(
                "{s}: expected unix:PATH or tcp:HOST:PORT"
            )))
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// How the server serves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Sockets to listen on.
    pub listen: Vec<Listen>,
    /// Export name (clients may also ask for the default, empty, name).
    pub export_name: String,
    /// Description shown by `nbdinfo`.
    pub description: String,
    /// Requests in flight per connection.
    pub depth: u16,
    /// Buffer per request slot; larger requests (up to 32 MiB) get a larger one for their time.
    pub buf_bytes: usize,
    /// Connections served at once; more are closed at once.
    pub max_connections: usize,
    /// Time a client has, from connecting, to finish the handshake.
    pub handshake_timeout: Duration,
}

impl ServerOptions {
    /// Defaults for listening on `listen`.
    pub fn new(listen: Vec<Listen>) -> Self {
        ServerOptions {
            listen,
            export_name: String::new(),
            description: String::new(),
            depth: 64,
            buf_bytes: 1 << 20,
            max_connections: 64,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// What the server has done, for logs and `list`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
    /// Reads served.
    pub reads: AtomicU64,
    /// Writes served.
    pub writes: AtomicU64,
    /// Flushes served.
    pub flushes: AtomicU64,
    /// Trims and write-zeroes served.
    pub zeroes: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
}

impl Counters {
    fn count(&self, op: Op, ok: bool) {
        let c = match op {
            Op::Read => &self.reads,
            Op::Write => &self.writes,
            Op::Flush => &self.flushes,
            Op::Discard | Op::WriteZeroes => &self.zeroes,
        };
        c.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A running server: an accept thread and a thread per connection.
pub struct Server {
    shared: Arc<Shared>,
    wake: Arc<OwnedFd>,
    acceptor: Option<JoinHandle<()>>,
    addresses: Vec<Listen>,
    unix_paths: Vec<PathBuf>,
}

/// What the accept thread and connection threads share.
struct Shared {
    target: Arc<dyn Target>,
    export: Export,
    limits: Limits,
    opts: ServerOptions,
    counters: Arc<Counters>,
    stopping: AtomicBool,
    /// Open connections, to shut down at stop: id -> a dup of the socket.
    conns: Mutex<HashMap<u64, (OwnedFd, JoinHandle<()>)>>,
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Unix(l) => l.as_fd(),
            Listener::Tcp(l) => l.as_fd(),
        }
    }
}

impl Listener {
    fn accept(&self) -> io::Result<OwnedFd> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| s.into()),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                // Replies are sent whole; do not let Nagle hold the last one back.
                let _ = s.set_nodelay(true);
                Ok(s.into())
            }
        }
    }
}

fn bind(l: &Listen) -> Result<(Listener, Listen)> {
    match l {
        Listen::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(Error::invalid(format!(
                        "{}: exists and is not a socket",
                        path.display()
                    )));
                }
                // A socket nobody answers on is left over from a dead server.
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(Error::invalid(format!(
                        "{}: another server is listening there",
                        path.display()
                    )));
                }
                let _ = std::fs::remove_file(path);
            }
            let lst = UnixListener::bind(path).map_err(|e| Error::path(path, e))?;
            Ok((Listener::Unix(lst), l.clone()))
        }
        Listen::Tcp(addr) => {
            let lst = TcpListener::bind(addr.as_str())
                .map_err(|e| Error::io(format!("listening on tcp:{addr}"), e))?;
            let real = lst
                .local_addr()
                .map_or_else(|_| addr.clone(), |a| a.to_string());
            Ok((Listener::Tcp(lst), Listen::Tcp(real)))
        }
    }
}

impl Server {
    /// Bind every address and start accepting connections for `target`.
    pub fn start(target: Arc<dyn Target>, opts: ServerOptions) -> Result<Server> {
        if opts.listen.is_empty() {
            return Err(Error::invalid(
                "the NBD server needs an address to listen on",
            ));
        }
        if opts.export_name.len() > MAX_STRING {
            return Err(Error::invalid("export name longer than 4096 bytes"));
        }
        let caps = target.caps();
        caps.check()?;
        let limits = Limits::new(caps);
        let export = Export {
            name: opts.export_name.clone(),
            description: opts.description.clone(),
            size: caps.size,
            flags: limits.flags(),
            block_sizes: limits.block_sizes(),
        };
        let mut listeners = Vec::new();
        let mut addresses = Vec::new();
        let mut unix_paths = Vec::new();
        for l in &opts.listen {
            let (lst, real) = bind(l).inspect_err(|_| {
                unix_paths.iter().for_each(|p| {
                    let _ = std::fs::remove_file(p);
                });
            })?;
            if let Listen::Unix(p) = l {
                unix_paths.push(p.clone());
            }
            listeners.push(lst);
            addresses.push(real);
        }
        let wake = Arc::new(
            rustix::event::eventfd(0, EventfdFlags::CLOEXEC)
                .map_err(|e| Error::io("eventfd", e))?,
        );
        let shared = Arc::new(Shared {
            target,
            export,
            limits,
            opts,
            counters: Arc::new(Counters::default()),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            let wake = wake.clone();
            std::thread::Builder::new()
                .name("nbd-accept".into())
                .spawn(move || accept_loop(&shared, &listeners, &wake))
                .map_err(|e| Error::io("starting the NBD accept thread", e))?
        };
        Ok(Server {
            shared,
            wake,
            acceptor: Some(acceptor),
            addresses,
            unix_paths,
        })
    }

    /// The addresses listened on (a TCP port 0 replaced by the real port).
    pub fn addresses(&self) -> &[Listen] {
        &self.addresses
    }

    /// The transmission flags clients get (before `SEND_DF`, which depends on the client).
    pub fn flags(&self) -> u16 {
        self.shared.export.flags
    }

    /// What has been served so far.
    pub fn counters(&self) -> Arc<Counters> {
        self.shared.counters.clone()
    }

    /// Stop: close the listeners, end every connection (requests in flight
    /// finish first), and wait for the threads.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        let _ = rustix::io::write(&*self.wake, &1u64.to_ne_bytes());
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        let conns: Vec<_> = match self.shared.conns.lock() {
            Ok(mut c) => c.drain().collect(),
            Err(p) => p.into_inner().drain().collect(),
        };
        for (_, (sock, _)) in &conns {
            // Ends a blocked read with EOF: the thread finishes what it
            // has in flight and leaves.
            let _ = rustix::net::shutdown(sock, rustix::net::Shutdown::Read);
        }
        for (_, (sock, thread)) in conns {
            let _ = thread.join();
            drop(sock);
        }
        for p in &self.unix_paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.stop_inner();
        }
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addresses", &self.addresses)
            .finish()
    }
}

fn accept_loop(shared: &Arc<Shared>, listeners: &[Listener], wake: &OwnedFd) {
    let mut next_id = 0u64;
    loop {
        let mut fds: Vec<PollFd<'_>> = listeners
            .iter()
            .map(|l| PollFd::new(l, PollFlags::IN))
            .collect();
        fds.push(PollFd::new(wake, PollFlags::IN));
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => {
                tracing::error!("nbd: poll on listening sockets: {e}");
                return;
            }
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        for (l, _) in listeners.iter().zip(ready).filter(|(_, r)| *r) {
            let sock = match l.accept() {
                Ok(s) => s,
                Err(e) => {
                    // ECONNABORTED, EMFILE...: keep serving the others.
                    tracing::warn!("nbd: accept: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            reap_finished(shared);
            let open = shared.counters.open.load(Ordering::Relaxed);
            if open >= shared.opts.max_connections as u64 {
                tracing::warn!(
                    "nbd: refusing a connection: {open} open, at most {}",
                    shared.opts.max_connections
                );
                continue;
            }
            next_id += 1;
            spawn_connection(shared, next_id, sock);
        }
    }
}

/// Forget connections whose threads have ended.
fn reap_finished(shared: &Shared) {
    let mut conns = match shared.conns.lock() {
        Ok(c) => c,
        Err(p) => p.into_inner(),
    };
    conns.retain(|_, (_, t)| !t.is_finished());
}

fn spawn_connection(shared: &Arc<Shared>, id: u64, sock: OwnedFd) {
    let dup = match rustix::io::fcntl_dupfd_cloexec(&sock, 0) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("nbd: connection {id}: {e}");
            return;
        }
    };
    let counters = shared.counters.clone();
    counters.connections.fetch_add(1, Ordering::Relaxed);
    counters.open.fetch_add(1, Ordering::Relaxed);
    let s = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("nbd-conn-{id}"))
        .spawn(move || {
            match serve_connection(&s, &sock) {
                Ok(()) => tracing::debug!("nbd: connection {id} closed"),
                Err(e) => tracing::info!("nbd: connection {id}: {e}"),
            }
            // Count the connection closed before the client can see it
            // closed, so it may connect again at once under max_connections.
            s.counters.open.fetch_sub(1, Ordering::Relaxed);
            // The stop list holds a duplicate: hang up for both.
            let _ = rustix::net::shutdown(&sock, rustix::net::Shutdown::Both);
        });
    match spawned {
        Ok(t) => {
            let mut conns = match shared.conns.lock() {
                Ok(c) => c,
                Err(p) => p.into_inner(),
            };
            conns.insert(id, (dup, t));
        }
        Err(e) => {
            counters.open.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("nbd: connection {id}: cannot start its thread: {e}");
        }
    }
}

/// A connected socket as a byte stream for the handshake, which must be
/// over by `deadline`: a client trickling bytes cannot hold a connection.
struct Stream<'a> {
    sock: &'a OwnedFd,
    deadline: Instant,
}

impl Stream<'_> {
    /// Wait until the socket is ready for `events`, or the deadline passes.
    fn wait(&self, events: PollFlags) -> io::Result<()> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the handshake took too long",
                ));
            }
            let ts = rustix::event::Timespec::try_from(left).unwrap_or(rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            });
            let mut fds = [PollFd::new(self.sock, events)];
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(0) | Err(Errno::INTR) => {}
                Ok(_) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for Stream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            self.wait(PollFlags::IN)?;
            match rustix::net::recv(self.sock, &mut *buf, RecvFlags::DONTWAIT) {
                Ok((n, _)) => return Ok(n),
                Err(Errno::INTR | Errno::AGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Write for Stream<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            self.wait(PollFlags::OUT)?;
            match rustix::net::send(self.sock, buf, SendFlags::NOSIGNAL | SendFlags::DONTWAIT) {
                Ok(n) => return Ok(n),
                Err(Errno::INTR | Errno::AGAIN) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error("client broke the protocol: {0}")]
    Protocol(String),
    #[error("socket: {0}")]
    Io(Errno),
    #[error(transparent)]
    Ring(#[from] Error),
}

fn serve_connection(shared: &Shared, sock: &OwnedFd) -> std::result::Result<(), ConnError> {
    let mut stream = Stream {
        sock,
        deadline: Instant::now() + shared.opts.handshake_timeout,
    };
    let neg = match handshake::negotiate(&mut stream, &shared.export)? {
        Outcome::Closed => return Ok(()),
        Outcome::Transmission(n) => n,
    };
    tracing::debug!(?neg, "nbd: transmission");
    let slots = Slots::new(shared.limits.caps, shared.opts.depth, shared.opts.buf_bytes)?;
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
/// Memory all oversized requests of a connection may hold at once.
const BIG_BUDGET: usize = 128 << 20;
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
    /// Bytes of buffers grown for oversized requests.
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
            if let Err(e) = self.slots.reserve(slot, need) {
                self.skip(payload as usize)?;
                self.reply_now(&h, error_from_errno(e));
                return Ok(());
            }
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
                    self.big_bytes = self.big_bytes.saturating_sub(self.slots.buf(slot).len());
                    self.slots.shrink(slot);
                }
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
