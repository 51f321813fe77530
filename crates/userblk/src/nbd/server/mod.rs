//! The NBD server frontend: listening sockets, and one thread with one
//! ring per connection.
//!
//! A connection thread negotiates ([`handshake`]), then loops:
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

use std::collections::{HashMap, VecDeque};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::event::EventfdFlags;

use crate::nbd::proto::MAX_STRING;
use crate::state::SocketId;
use crate::target::{Op, Target};
use crate::{Error, Result};
use budget::Budget;
use handshake::Export;
use listener::{accept_loop, bind};
use transmission::{Limits, MAX_PAYLOAD};

mod budget;
mod clients;
pub use clients::Clients;
mod connection;
pub mod handshake;
mod listener;
mod timed;
pub mod transmission;

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
    /// Connections in the transmission phase at once; more are closed at once.
    pub max_connections: usize,
    /// Connections still in the handshake at once. Counted apart from
    /// `max_connections` so that idle sockets cannot lock real clients out:
    /// when full, a new connection pushes out the oldest one still in its
    /// handshake.
    pub max_handshakes: usize,
    /// Time a client has, from connecting, to finish the handshake.
    pub handshake_timeout: Duration,
    /// Memory for request payloads larger than a slot's buffer, shared by
    /// every connection; a request waits for its share (at most
    /// [`PAYLOAD_WAIT`]) before its buffer is allocated or its data read.
    pub payload_budget: usize,
}

/// Longest a request waits for its share of the payload budget before it
/// is answered with `ENOMEM`.
pub const PAYLOAD_WAIT: Duration = Duration::from_secs(10);

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
            max_handshakes: 64,
            handshake_timeout: Duration::from_secs(10),
            payload_budget: 256 << 20,
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
    pub(super) fn count(&self, op: Op, ok: bool) {
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
    /// The Unix sockets bound, removed at stop while they are still ours.
    sockets: Vec<SocketId>,
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
    /// Connections still in their handshake, oldest first.
    pending: Mutex<VecDeque<u64>>,
    /// Connections in the transmission phase.
    transmitting: AtomicUsize,
    /// Memory for oversized payloads, across all connections.
    budget: Budget,
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
        if opts.payload_budget < MAX_PAYLOAD as usize {
            return Err(Error::invalid(format!(
                "an NBD payload budget of {} bytes is below the largest request ({MAX_PAYLOAD})",
                opts.payload_budget
            )));
        }
        if opts.max_handshakes == 0 {
            return Err(Error::invalid(
                "the NBD server needs room for at least one handshake",
            ));
        }
        let payload_budget = opts.payload_budget;
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
        let mut sockets: Vec<SocketId> = Vec::new();
        for l in &opts.listen {
            let (lst, real, id) = bind(l).inspect_err(|_| {
                sockets.iter().for_each(|s| {
                    s.remove_if_ours();
                });
            })?;
            sockets.extend(id);
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
            pending: Mutex::new(VecDeque::new()),
            transmitting: AtomicUsize::new(0),
            budget: Budget::new(payload_budget),
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
            sockets,
        })
    }

    /// The addresses listened on (a TCP port 0 replaced by the real port).
    pub fn addresses(&self) -> &[Listen] {
        &self.addresses
    }

    /// The Unix sockets bound, as they were bound (for cleaning up after a
    /// crash without removing a newer server's socket at the same path).
    pub fn unix_sockets(&self) -> &[SocketId] {
        &self.sockets
    }

    /// The transmission flags clients get (before `SEND_DF`, which depends on the client).
    pub fn flags(&self) -> u16 {
        self.shared.export.flags
    }

    /// What has been served so far.
    pub fn counters(&self) -> Arc<Counters> {
        self.shared.counters.clone()
    }

    /// Who is connected (`del` refuses a device in use, naming them).
    pub fn clients(&self) -> Clients {
        Clients(self.shared.clone())
    }

    /// Bytes of the payload budget held by requests now, and the most ever
    /// held at once.
    pub fn payload_bytes(&self) -> (u64, u64) {
        (self.shared.budget.taken(), self.shared.budget.peak())
    }

    /// Stop: close the listeners, end every connection (requests in flight
    /// finish first), and wait for the threads.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Requests waiting for payload memory give up instead of holding stop up.
        self.shared.budget.close();
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
        for s in &self.sockets {
            s.remove_if_ours();
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
