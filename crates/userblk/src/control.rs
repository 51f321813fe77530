//! Named actions a running device offers its operator (a filter's
//! `powercut`, say), and the Unix socket a daemon serves them on.
//!
//! Parts of a device stack [`Registry::register`] actions while they are
//! built and lose them when dropped ([`Registration`]). A daemon serves its
//! registry with [`Server`]: one JSON line in per connection; out, at once
//! an acknowledgement line ([`Ack`]), then, once the request has run (an
//! s3 `writeback` may take minutes), one JSON line with the [`Reply`]. A
//! client so tells a stuck daemon from a busy one within seconds.
//! [`request`] is the client side (`userblk ctl`).
//!
//! ```
//! use userblk::control::Registry;
//!
//! let reg = Registry::new();
//! let _on = reg.register("hello", "example", "say hello", |_args| Ok("hello".into()));
//! assert_eq!(reg.run("hello", &[]).unwrap(), ["example: hello"]);
//! assert!(reg.run("goodbye", &[]).is_err());
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What an action does when run: its arguments in, a line of output or an error message out.
pub type Handler = Arc<dyn Fn(&[String]) -> Result<String, String> + Send + Sync>;

/// What a frontend does on [`Request::Resize`]: the new size in bytes and
/// whether shrinking is allowed in, a line saying what happened or the
/// reason it refused out.
pub type ResizeHandler = Arc<dyn Fn(u64, bool) -> Result<String, String> + Send + Sync>;

/// Why a control request failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing in the device offers the action.
    #[error("{}", no_such_action(name, known))]
    NoSuchAction {
        /// The action asked for.
        name: String,
        /// The actions the device offers.
        known: Vec<String>,
    },
    /// The action ran and failed.
    #[error("{owner}: {action}: {msg}")]
    Failed {
        /// Who offers it (a filter's name).
        owner: String,
        /// The action.
        action: String,
        /// What went wrong.
        msg: String,
    },
    /// The socket could not be set up, reached or read.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// What the OS said.
        err: std::io::Error,
    },
    /// The server did not answer in time.
    #[error("{}", no_answer(*pid, *waited, *stopped, *acked))]
    NoAnswer {
        /// The server's process, when the socket tells.
        pid: Option<i32>,
        /// How long the client waited.
        waited: Duration,
        /// Whether the server's process is stopped (`SIGSTOP`).
        stopped: bool,
        /// Whether the server acknowledged the request (it is running it).
        acked: bool,
    },
    /// The other side said something that is not this protocol.
    #[error("control protocol: {0}")]
    Protocol(String),
}

fn no_answer(pid: Option<i32>, waited: Duration, stopped: bool, acked: bool) -> String {
    let who = pid.map_or_else(
        || "the daemon".to_string(),
        |p| format!("the daemon (pid {p})"),
    );
    match (stopped, pid) {
        (true, Some(p)) => {
            format!("{who} is stopped and cannot answer (`kill -CONT {p}` resumes it)")
        }
        _ if !acked => format!(
            "{who} did not take the request within {} s: it is stuck",
            waited.as_secs_f64().round()
        ),
        _ => format!(
            "{who} did not answer within {} s",
            waited.as_secs_f64().round()
        ),
    }
}

fn no_such_action(name: &str, known: &[String]) -> String {
    if known.is_empty() {
        format!("no control action '{name}': the device offers none")
    } else {
        format!(
            "no control action '{name}' (the device offers: {})",
            known.join(", ")
        )
    }
}

/// One action, as [`Registry::actions`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionInfo {
    /// Its name (`powercut`).
    pub name: String,
    /// Who offers it (`flakey`).
    pub owner: String,
    /// One line on what it does.
    pub help: String,
}

struct Entry {
    id: u64,
    info: ActionInfo,
    handler: Handler,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    entries: Vec<Entry>,
    /// The frontend's resize, with its registration's id.
    resize: Option<(u64, ResizeHandler)>,
}

/// The actions a device offers. Cheap to clone: clones share one table.
#[derive(Clone, Default)]
pub struct Registry {
    table: Arc<Mutex<Table>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("actions", &self.actions())
            .finish()
    }
}

/// An action's place in a [`Registry`]; dropping it withdraws the action.
#[derive(Debug)]
#[must_use = "dropping the registration withdraws the action at once"]
pub struct Registration {
    table: Weak<Mutex<Table>>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(t) = self.table.upgrade() {
            let mut t = t.lock().unwrap_or_else(PoisonError::into_inner);
            t.entries.retain(|e| e.id != self.id);
            if t.resize.as_ref().is_some_and(|(id, _)| *id == self.id) {
                t.resize = None;
            }
        }
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Offer action `name` on behalf of `owner` until the returned
    /// [`Registration`] is dropped. Several owners may offer one name:
    /// running it runs each of them, in the order they registered.
    pub fn register(
        &self,
        name: &str,
        owner: &str,
        help: &str,
        handler: impl Fn(&[String]) -> Result<String, String> + Send + Sync + 'static,
    ) -> Registration {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.next_id += 1;
        let id = t.next_id;
        t.entries.push(Entry {
            id,
            info: ActionInfo {
                name: name.into(),
                owner: owner.into(),
                help: help.into(),
            },
            handler: Arc::new(handler),
        });
        Registration {
            table: Arc::downgrade(&self.table),
            id,
        }
    }

    /// Answer [`Request::Resize`] with `handler` until the returned
    /// [`Registration`] is dropped (the frontend serving the device offers
    /// it, once the device is live).
    pub fn on_resize(
        &self,
        handler: impl Fn(u64, bool) -> Result<String, String> + Send + Sync + 'static,
    ) -> Registration {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.next_id += 1;
        let id = t.next_id;
        t.resize = Some((id, Arc::new(handler)));
        Registration {
            table: Arc::downgrade(&self.table),
            id,
        }
    }

    /// Resize the device to `size` bytes through the frontend's handler.
    pub fn resize(&self, size: u64, allow_shrink: bool) -> Result<String, String> {
        let handler = {
            let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            t.resize.as_ref().map(|(_, h)| Arc::clone(h))
        };
        match handler {
            // Without the lock: a resize takes a while and must not block registrations.
            Some(h) => h(size, allow_shrink),
            None => Err("the device is not live yet, or its daemon cannot resize it".into()),
        }
    }

    /// Every action offered, in the order registered.
    pub fn actions(&self) -> Vec<ActionInfo> {
        let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        t.entries.iter().map(|e| e.info.clone()).collect()
    }

    /// Run action `name` with `args`: each handler's output as
    /// `owner: output`. The first handler to fail ends the run with its error.
    pub fn run(&self, name: &str, args: &[String]) -> Result<Vec<String>, ControlError> {
        // Handlers run without the lock: they may take a while (a power cut
        // waits for the write in flight) and must not block registrations.
        let handlers: Vec<(String, Handler)> = {
            let t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            t.entries
                .iter()
                .filter(|e| e.info.name == name)
                .map(|e| (e.info.owner.clone(), Arc::clone(&e.handler)))
                .collect()
        };
        if handlers.is_empty() {
            let mut known: Vec<String> = self.actions().into_iter().map(|a| a.name).collect();
            known.dedup();
            return Err(ControlError::NoSuchAction {
                name: name.into(),
                known,
            });
        }
        handlers
            .into_iter()
            .map(|(owner, h)| match h(args) {
                Ok(out) => Ok(format!("{owner}: {out}")),
                Err(msg) => Err(ControlError::Failed {
                    owner,
                    action: name.into(),
                    msg,
                }),
            })
            .collect()
    }
}

/// A request on the socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// List the actions.
    List,
    /// Run one.
    Run {
        /// The action.
        action: String,
        /// Its arguments.
        #[serde(default)]
        args: Vec<String>,
    },
    /// Change the device's size (`userblk resize`): the target's, then the
    /// frontend's. Answered once both are done, or with why not.
    Resize {
        /// The new size in bytes.
        size: u64,
        /// Whether it may be smaller than now.
        #[serde(default)]
        allow_shrink: bool,
    },
}

/// The line a server sends as soon as it has read a request, before running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// Always true.
    pub ack: bool,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Output lines (one per handler run).
    #[serde(default)]
    pub output: Vec<String>,
    /// The actions (for [`Request::List`]).
    #[serde(default)]
    pub actions: Vec<ActionInfo>,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// For an unknown action: the actions there are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known: Option<Vec<String>>,
}

impl Reply {
    fn failed(error: String) -> Reply {
        Reply {
            ok: false,
            output: Vec::new(),
            actions: Vec::new(),
            error: Some(error),
            known: None,
        }
    }

    fn answer(registry: &Registry, req: Request) -> Reply {
        let mut r = Reply {
            ok: true,
            output: Vec::new(),
            actions: Vec::new(),
            error: None,
            known: None,
        };
        match req {
            Request::List => r.actions = registry.actions(),
            Request::Resize { size, allow_shrink } => match registry.resize(size, allow_shrink) {
                Ok(line) => r.output = vec![line],
                Err(e) => {
                    r.ok = false;
                    r.error = Some(e);
                }
            },
            Request::Run { action, args } => match registry.run(&action, &args) {
                Ok(out) => r.output = out,
                Err(e) => {
                    r.ok = false;
                    if let ControlError::NoSuchAction { known, .. } = &e {
                        r.known = Some(known.clone());
                    }
                    r.error = Some(e.to_string());
                }
            },
        }
        r
    }
}

/// How long a connection may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests run at once (each on a thread of its own, so that one long
/// action does not keep the others from being acknowledged).
const MAX_IN_FLIGHT: usize = 8;
/// How often the server looks at its stop flag (under a second).
const TICK: Duration = Duration::from_millis(200);

/// A registry's socket, bound and listening, for a caller's own poll
/// loop: [`Endpoint::answer_ready`] once its fd is readable. A daemon so
/// serves it from the thread that also waits for its signals instead of a
/// thread of its own. Dropping it removes the socket.
#[derive(Debug)]
pub struct Endpoint {
    listener: UnixListener,
    path: PathBuf,
    registry: Registry,
    in_flight: Arc<AtomicUsize>,
}

impl Endpoint {
    /// Listen for `registry`'s requests on a new socket at `path` (mode
    /// 0600; a stale socket left there is replaced).
    pub fn bind(registry: Registry, path: &Path) -> Result<Endpoint, ControlError> {
        use std::os::unix::fs::{FileTypeExt, PermissionsExt};
        let io = |what: &str| {
            let what = format!("{what} {}", path.display());
            move |err| ControlError::Io { what, err }
        };
        if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
            std::fs::remove_file(path).map_err(io("removing the stale socket"))?;
        }
        let listener = UnixListener::bind(path).map_err(io("listening on"))?;
        let endpoint = Endpoint {
            listener,
            path: path.to_path_buf(),
            registry,
            in_flight: Arc::new(AtomicUsize::new(0)),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("setting the mode of"))?;
        // Accepting must not block the caller's loop when a client gave up.
        endpoint
            .listener
            .set_nonblocking(true)
            .map_err(io("setting up"))?;
        Ok(endpoint)
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept a waiting connection, if any, and answer it on a thread of
    /// its own (a few at once; more are told busy).
    pub fn answer_ready(&self) {
        match self.listener.accept() {
            Ok((conn, _)) => self.dispatch(conn),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::debug!("control socket: accept: {e}"),
        }
    }

    fn dispatch(&self, conn: UnixStream) {
        // Accepted sockets do not inherit the listener's O_NONBLOCK on Linux,
        // but make sure: the answer uses timeouts, not polling.
        let _ = conn.set_nonblocking(false);
        let in_flight = &self.in_flight;
        if in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_IN_FLIGHT {
            in_flight.fetch_sub(1, Ordering::SeqCst);
            let busy = format!("busy: {MAX_IN_FLIGHT} requests are running");
            let _ = send(&conn, &Reply::failed(busy));
            return;
        }
        let (registry, left) = (self.registry.clone(), Arc::clone(in_flight));
        let run = move || {
            if let Err(e) = answer(conn, &registry) {
                tracing::debug!("control request: {e}");
            }
            left.fetch_sub(1, Ordering::SeqCst);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("control-req".into())
            .spawn(run)
        {
            // The closure (and its connection) is gone: the client sees it closed.
            in_flight.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!("control request: no thread for it: {e}");
        }
    }
}

impl std::os::fd::AsFd for Endpoint {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

/// How long a closing endpoint waits for the answers to requests it
/// accepted: a daemon that leaves because of one (`upgrade`'s handover)
/// must not exit before that answer is written, or its client sees the
/// connection close and cannot tell a handover from a crash.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

impl Drop for Endpoint {
    fn drop(&mut self) {
        // No new connections first, then the ones running may finish.
        let _ = std::fs::remove_file(&self.path);
        let deadline = std::time::Instant::now() + ANSWER_GRACE;
        while self.in_flight.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A registry served on a Unix socket by a thread of its own, until dropped
/// (which removes the socket).
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serve `registry` on a new socket at `path` (mode 0600; a stale
    /// socket left there is replaced).
    pub fn start(registry: Registry, path: &Path) -> Result<Server, ControlError> {
        let endpoint = Endpoint::bind(registry, path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("control".into())
                .spawn(move || {
                    serve_until(
                        &endpoint,
                        || Ok(()),
                        &stop,
                        "control socket",
                        |()| {
                            endpoint.answer_ready();
                        },
                    );
                })
                .map_err(|err| ControlError::Io {
                    what: format!("starting the server for {}", path.display()),
                    err,
                })?
        };
        Ok(Server {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The thread's endpoint removes the socket as the thread ends.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accept connections on `listener` (through `accept`) and hand them to
/// `handle` one at a time, until `stop` is set: the wait for a connection
/// wakes every [`TICK`] to look. `what` names the server in logs. For
/// small servers on threads of their own (this one, `stats`' metrics).
pub(crate) fn serve_until<C>(
    listener: impl std::os::fd::AsFd,
    accept: impl Fn() -> std::io::Result<C>,
    stop: &AtomicBool,
    what: &str,
    mut handle: impl FnMut(C),
) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: i64::from(TICK.subsec_nanos()),
    };
    while !stop.load(Ordering::SeqCst) {
        let mut fds = [PollFd::new(&listener, PollFlags::IN)];
        match poll(&mut fds, Some(&tick)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => {
                tracing::error!("{what}: {e}");
                return;
            }
        }
        match accept() {
            Ok(conn) => handle(conn),
            Err(e) => tracing::debug!("{what}: accept: {e}"),
        }
    }
}

/// Read one request line from `conn` and answer it.
fn answer(conn: UnixStream, registry: &Registry) -> std::io::Result<()> {
    conn.set_read_timeout(Some(READ_TIMEOUT))?;
    conn.set_write_timeout(Some(READ_TIMEOUT))?;
    let mut line = String::new();
    // A request is small: a longer one is not ours.
    BufReader::new((&conn).take(64 << 10)).read_line(&mut line)?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => {
            tracing::info!("control: {}", line.trim());
            send(&conn, &Ack { ack: true })?;
            Reply::answer(registry, req)
        }
        Err(e) => Reply::failed(format!("bad request: {e}")),
    };
    send(&conn, &reply)
}

/// Write `msg` as one JSON line.
fn send(conn: &UnixStream, msg: &impl Serialize) -> std::io::Result<()> {
    let mut body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    body.push(b'\n');
    let mut w = conn;
    w.write_all(&body)
}

/// How long connecting and sending a request may take, and how long a
/// stopped server is given to answer before it is reported as stopped.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a server may take to acknowledge a request it was sent.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a waiting client looks at whether its server was stopped.
const POLL: Duration = Duration::from_millis(250);

/// Send `req` to the server at `path` and wait up to `timeout` for its
/// reply. Connecting and sending have [`CONNECT_TIMEOUT`], the server's
/// acknowledgement [`ACK_TIMEOUT`]: a stuck server is reported within
/// seconds, and one that is stopped (`SIGSTOP`) is named as such.
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Reply, ControlError> {
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |err| ControlError::Io { what, err }
    };
    let conn = connect(path, CONNECT_TIMEOUT)?;
    // The listener's pid, as the kernel recorded it at listen(): the
    // daemon to name in an error, and to look at while waiting.
    let pid = rustix::net::sockopt::socket_peercred(&conn)
        .ok()
        .map(|c| c.pid.as_raw_nonzero().get());
    let mut acked = false;
    let no_answer = |waited: Duration, stopped: bool, acked: bool| ControlError::NoAnswer {
        pid,
        waited,
        stopped,
        acked,
    };
    conn.set_write_timeout(Some(CONNECT_TIMEOUT))
        .map_err(io("setting a timeout on"))?;
    conn.set_read_timeout(Some(POLL))
        .map_err(io("setting a timeout on"))?;
    let mut body = serde_json::to_vec(req).map_err(|e| ControlError::Protocol(e.to_string()))?;
    body.push(b'\n');
    match (&conn).write_all(&body) {
        Err(e) if is_timeout(&e) => return Err(no_answer(CONNECT_TIMEOUT, false, false)),
        r => r.map_err(io("writing to"))?,
    }
    let start = std::time::Instant::now();
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = line.iter().position(|&b| b == b'\n') {
            // The acknowledgement comes first (not from an older daemon).
            if serde_json::from_slice::<Ack>(&line[..end]).is_ok_and(|a| a.ack) {
                acked = true;
                line.drain(..=end);
                continue;
            }
            break;
        }
        match (&conn).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                let waited = start.elapsed();
                if waited >= CONNECT_TIMEOUT && pid.is_some_and(crate::state::pid_is_stopped) {
                    return Err(no_answer(waited, true, acked));
                }
                if waited >= timeout || (!acked && waited >= ACK_TIMEOUT) {
                    return Err(no_answer(waited, false, acked));
                }
            }
            Err(e) => return Err(io("reading from")(e)),
        }
        if line.len() > 16 << 20 {
            return Err(ControlError::Protocol("answer longer than 16 MiB".into()));
        }
    }
    if line.is_empty() {
        return Err(ControlError::Protocol(format!(
            "{} closed the connection without an answer",
            path.display()
        )));
    }
    let line = String::from_utf8_lossy(&line);
    serde_json::from_str(&line).map_err(|e| ControlError::Protocol(format!("{e}: {line}")))
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Connect to `path` without blocking past `timeout`: a Unix connect
/// blocks while the listener's backlog is full, as it is when the server
/// stopped accepting.
fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, ControlError> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let io = |what: &str| {
        let what = format!("{what} {}", path.display());
        move |err: std::io::Error| ControlError::Io { what, err }
    };
    let addr = SocketAddrUnix::new(path).map_err(|e| io("connecting to")(e.into()))?;
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
        None,
    )
    .map_err(|e| io("connecting to")(e.into()))?;
    let start = std::time::Instant::now();
    loop {
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => break,
            Err(rustix::io::Errno::INTR) => {}
            Err(rustix::io::Errno::AGAIN) if start.elapsed() < timeout => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(rustix::io::Errno::AGAIN) => {
                let pid = None;
                return Err(ControlError::NoAnswer {
                    pid,
                    waited: start.elapsed(),
                    stopped: false,
                    acked: false,
                });
            }
            Err(e) => return Err(io("connecting to")(e.into())),
        }
    }
    let conn = UnixStream::from(fd);
    conn.set_nonblocking(false).map_err(io("connecting to"))?;
    Ok(conn)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn actions_come_and_go_with_their_registration() {
        let reg = Registry::new();
        let a = reg.register("powercut", "flakey", "cut", |_| Ok("cut".into()));
        let b = reg.register("powercut", "other", "cut too", |args| Ok(args.join("+")));
        let args = ["x".to_string(), "y".to_string()];
        assert_eq!(
            reg.run("powercut", &args).unwrap(),
            ["flakey: cut", "other: x+y"]
        );
        drop(a);
        assert_eq!(reg.run("powercut", &[]).unwrap(), ["other: "]);
        drop(b);
        let e = reg.run("powercut", &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no control action 'powercut': the device offers none"
        );
        let _c = reg.register("powerup", "flakey", "up", |_| Err("already on".into()));
        let e = reg.run("powercut", &[]).unwrap_err();
        assert!(
            e.to_string().contains("(the device offers: powerup)"),
            "{e}"
        );
        let e = reg.run("powerup", &[]).unwrap_err();
        assert_eq!(e.to_string(), "flakey: powerup: already on");
    }

    #[test]
    fn a_closing_endpoint_lets_running_requests_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let reg = Registry::new();
        let finished = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&finished);
        let _slow = reg.register("slow", "test", "answer late", move |_| {
            std::thread::sleep(Duration::from_millis(300));
            done.store(true, Ordering::SeqCst);
            Ok("late".into())
        });
        let endpoint = Endpoint::bind(reg, &path).unwrap();
        let client = {
            let path = path.clone();
            std::thread::spawn(move || {
                let run = Request::Run {
                    action: "slow".into(),
                    args: Vec::new(),
                };
                request(&path, &run, Duration::from_secs(5))
            })
        };
        // Accept it, then close while the action still runs.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while endpoint.in_flight.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "never accepted");
            endpoint.answer_ready();
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(endpoint);
        assert!(
            finished.load(Ordering::SeqCst),
            "the endpoint closed before its request was answered"
        );
        let reply = client.join().unwrap().unwrap();
        assert_eq!(reply.output, ["test: late"]);
    }

    #[test]
    fn a_server_answers_on_its_socket_and_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        // A stale socket of a dead process is replaced.
        drop(UnixListener::bind(&path).unwrap());
        let reg = Registry::new();
        let _r = reg.register("ping", "test", "answer pong", |_| Ok("pong".into()));
        let server = Server::start(reg.clone(), &path).unwrap();
        let t = Duration::from_secs(5);
        let run = |action: &str| Request::Run {
            action: action.into(),
            args: Vec::new(),
        };
        let r = request(&path, &run("ping"), t).unwrap();
        assert!(r.ok);
        assert_eq!(r.output, ["test: pong"]);
        let r = request(&path, &Request::List, t).unwrap();
        assert_eq!(r.actions[0].name, "ping");
        let r = request(&path, &run("nope"), t).unwrap();
        assert!(!r.ok);
        assert_eq!(r.known, Some(vec!["ping".to_string()]));
        // Garbage gets an answer too, not a hang.
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(b"hello\n").unwrap();
        let mut line = String::new();
        BufReader::new(&c).read_line(&mut line).unwrap();
        assert!(line.contains("bad request"), "{line}");
        // Resize goes to the frontend's handler, only while it is registered.
        let resize = Request::Resize {
            size: 4096,
            allow_shrink: false,
        };
        let r = request(&path, &resize, t).unwrap();
        assert!(!r.ok && r.error.unwrap().contains("cannot resize"));
        let on = reg.on_resize(|size, shrink| match shrink {
            false => Ok(format!("now {size}")),
            true => Err("no".into()),
        });
        let r = request(&path, &resize, t).unwrap();
        assert_eq!((r.ok, r.output), (true, vec!["now 4096".to_string()]));
        drop(on);
        assert!(!request(&path, &resize, t).unwrap().ok);
        drop(server);
        assert!(!path.exists());
        assert!(request(&path, &run("ping"), t).is_err());
    }

    #[test]
    fn a_long_action_is_waited_for_and_others_are_answered_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let reg = Registry::new();
        let slow = ACK_TIMEOUT + Duration::from_secs(1);
        let _on = reg.register("slow", "test", "takes a while", move |_| {
            std::thread::sleep(slow);
            Ok("done".into())
        });
        let _server = Server::start(reg, &path).unwrap();
        let long = {
            let path = path.clone();
            let slow = Request::Run {
                action: "slow".into(),
                args: Vec::new(),
            };
            std::thread::spawn(move || request(&path, &slow, Duration::from_secs(60)))
        };
        std::thread::sleep(Duration::from_millis(300));
        let start = std::time::Instant::now();
        let listed = request(&path, &Request::List, Duration::from_secs(60)).unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(listed.actions.len(), 1);
        let reply = long.join().unwrap().unwrap();
        assert_eq!(reply.output, ["test: done"]);
    }

    #[test]
    fn a_server_that_never_answers_is_an_error_in_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        // Bound and listening, but never accepting: connect and write
        // succeed into the backlog, and no answer comes.
        let _listener = UnixListener::bind(&path).unwrap();
        let start = std::time::Instant::now();
        let e = request(&path, &Request::List, Duration::from_secs(1)).unwrap_err();
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        let pid = std::process::id();
        assert!(
            matches!(e, ControlError::NoAnswer { stopped: false, .. }),
            "{e:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("the daemon (pid {pid}) did not take the request within 1 s: it is stuck")
        );
    }

    #[test]
    fn a_stopped_server_is_named_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        // A listener in another process, which the test stops.
        let script = format!(
            "import socket,os,time\ns=socket.socket(socket.AF_UNIX)\ns.bind({:?})\ns.listen(1)\nos.kill(os.getpid(),19)\ntime.sleep(60)",
            path.display().to_string()
        );
        let Ok(mut child) = std::process::Command::new("python3")
            .args(["-c", &script])
            .spawn()
        else {
            eprintln!("SKIPPED: no python3 to play a stopped daemon");
            return;
        };
        let pid = i32::try_from(child.id()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !crate::state::pid_is_stopped(pid) {
            assert!(std::time::Instant::now() < deadline, "never stopped");
            std::thread::sleep(Duration::from_millis(20));
        }
        let start = std::time::Instant::now();
        let e = request(&path, &Request::List, Duration::from_secs(180));
        let waited = start.elapsed();
        child.kill().unwrap();
        child.wait().unwrap();
        let e = e.unwrap_err();
        assert!(
            waited < CONNECT_TIMEOUT + Duration::from_secs(2),
            "{waited:?}"
        );
        assert_eq!(
            e.to_string(),
            format!("the daemon (pid {pid}) is stopped and cannot answer (`kill -CONT {pid}` resumes it)")
        );
    }
}
