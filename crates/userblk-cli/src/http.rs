//! A tiny HTTP/1.1 server for one read-only resource (`/metrics`): a
//! thread per connection (a bounded number), a deadline for the request,
//! a bounded request size, one response per connection.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use userblk::nbd::server::Listen;

/// Largest request head read (request line and headers).
pub const MAX_REQUEST: usize = 8192;
/// Time a client has to send its request, and to take the response.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at once.
pub const MAX_CONNECTIONS: usize = 16;

/// What is served: the path, its content type and how to make its body.
#[derive(Clone, Copy)]
pub struct Resource {
    /// The one path answered (`/metrics`); a query string is ignored.
    pub path: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its body, made for each request.
    pub body: fn() -> String,
}

/// A bound listener.
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket, at its path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Bind `listen`. A Unix socket left by a server that is gone is
    /// replaced; one that still answers is not.
    pub fn bind(listen: &Listen) -> anyhow::Result<Listener> {
        match listen {
            Listen::Tcp(addr) => Ok(Listener::Tcp(
                TcpListener::bind(addr).with_context(|| format!("listening on tcp:{addr}"))?,
            )),
            Listen::Unix(path) => Ok(Listener::Unix(bind_unix(path)?, path.clone())),
        }
    }

    /// Where it listens, as `tcp:HOST:PORT` (the port picked if 0 was asked) or `unix:PATH`.
    pub fn address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// Serve `res` until the process ends.
    pub fn serve(&self, res: Resource) -> anyhow::Result<()> {
        let busy = Arc::new(AtomicUsize::new(0));
        loop {
            let conn: Box<dyn Conn> = match self {
                Listener::Tcp(l) => match l.accept() {
                    Ok((s, _)) => Box::new(s),
                    Err(e) => {
                        accept_error(e)?;
                        continue;
                    }
                },
                Listener::Unix(l, _) => match l.accept() {
                    Ok((s, _)) => Box::new(s),
                    Err(e) => {
                        accept_error(e)?;
                        continue;
                    }
                },
            };
            if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
                busy.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            let busy = Arc::clone(&busy);
            let spawned = std::thread::Builder::new()
                .name("http".into())
                .spawn(move || {
                    handle(conn, res);
                    busy.fetch_sub(1, Ordering::AcqRel);
                });
            if let Err(e) = spawned {
                tracing::warn!("no thread for a connection: {e}");
            }
        }
    }
}

/// Errors a listener outlives (a client that went before it was
/// accepted, no fds for a moment); others end the server.
fn accept_error(e: std::io::Error) -> anyhow::Result<()> {
    use std::io::ErrorKind as K;
    let out_of_fds = [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE]
        .iter()
        .any(|x| e.raw_os_error() == Some(x.raw_os_error()));
    if out_of_fds {
        tracing::warn!("accepting a connection: {e}");
        std::thread::sleep(Duration::from_millis(100));
        return Ok(());
    }
    match e.kind() {
        K::ConnectionAborted | K::ConnectionReset | K::Interrupted | K::WouldBlock => Ok(()),
        _ => Err(e).context("accepting a connection"),
    }
}

fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                bail!("unix:{}: another server listens there", path.display());
            }
            let is_socket = std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            if !is_socket {
                bail!("unix:{}: exists and is not a socket", path.display());
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
            UnixListener::bind(path)
                .with_context(|| format!("listening on unix:{}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("listening on unix:{}", path.display())),
    }
}

/// A connection of either kind.
trait Conn: Read + Write + Send {
    fn timeouts(&self, read: Duration, write: Duration) -> std::io::Result<()>;
    fn end_writes(&self);
}

impl Conn for TcpStream {
    fn timeouts(&self, read: Duration, write: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(read))?;
        self.set_write_timeout(Some(write))
    }
    fn end_writes(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

impl Conn for UnixStream {
    fn timeouts(&self, read: Duration, write: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(read))?;
        self.set_write_timeout(Some(write))
    }
    fn end_writes(&self) {
        let _ = self.shutdown(std::net::Shutdown::Write);
    }
}

/// Read one request from `conn` (within [`DEADLINE`]) and answer it.
fn handle(mut conn: Box<dyn Conn>, res: Resource) {
    let deadline = Instant::now() + DEADLINE;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head = loop {
        if let Some(end) = head_end(&buf) {
            break Ok(end);
        }
        if buf.len() >= MAX_REQUEST {
            break Err(Status::BadRequest("request too large"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || conn.timeouts(left, DEADLINE).is_err() {
            return;
        }
        match conn.read(&mut chunk) {
            // The client went, or did not finish in time: nobody to answer.
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let answer = head.and_then(|end| route(&buf[..end], res.path));
    let response = match answer {
        Ok(head_only) => {
            let body = (res.body)();
            response(200, "OK", res.content_type, &body, head_only)
        }
        Err(s) => {
            let (code, reason, text) = s.parts();
            response(
                code,
                reason,
                "text/plain; charset=utf-8",
                &format!("{text}\n"),
                false,
            )
        }
    };
    let _ = conn.write_all(response.as_bytes());
    let _ = conn.flush();
    // Closing with unread input would reset the connection, and the
    // client could lose the answer (to a request that was too large):
    // read what it still sends, for a little while.
    conn.end_writes();
    if conn.timeouts(LINGER, LINGER).is_ok() {
        let until = Instant::now() + LINGER;
        let mut left = MAX_DRAIN;
        while left > 0 && Instant::now() < until {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }
}

/// How long a connection is drained after its answer, at most.
const LINGER: Duration = Duration::from_millis(500);
/// How much is drained, at most.
const MAX_DRAIN: usize = 1 << 20;

/// Where the request head ends (after its blank line), if it has.
fn head_end(buf: &[u8]) -> Option<usize> {
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|p| p + 2);
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Why a request is not answered with the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 400: not an HTTP request we can read.
    BadRequest(&'static str),
    /// 404: another path.
    NotFound,
    /// 405: not GET or HEAD.
    MethodNotAllowed,
}

impl Status {
    fn parts(self) -> (u16, &'static str, &'static str) {
        match self {
            Status::BadRequest(why) => (400, "Bad Request", why),
            Status::NotFound => (404, "Not Found", "not found (try /metrics)"),
            Status::MethodNotAllowed => (405, "Method Not Allowed", "only GET and HEAD"),
        }
    }
}

/// Check a request head against the served `path`: `Ok(true)` for HEAD
/// (no body), `Ok(false)` for GET.
pub fn route(head: &[u8], path: &str) -> Result<bool, Status> {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = std::str::from_utf8(&head[..line_end])
        .map_err(|_| Status::BadRequest("request line is not text"))?
        .trim_end_matches('\r');
    let mut words = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(Status::BadRequest("expected METHOD TARGET HTTP/1.x"));
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !target.starts_with('/') {
        return Err(Status::BadRequest("expected METHOD TARGET HTTP/1.x"));
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Err(Status::MethodNotAllowed),
    };
    let wanted = target.split_once('?').map_or(target, |(p, _)| p);
    if wanted != path {
        return Err(Status::NotFound);
    }
    Ok(head_only)
}

fn response(code: u16, reason: &str, content_type: &str, body: &str, head_only: bool) -> String {
    let mut r = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        r.push_str(body);
    }
    r
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_routed_or_refused() {
        let ok = |h: &str| route(h.as_bytes(), "/metrics");
        assert_eq!(ok("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"), Ok(false));
        assert_eq!(ok("GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Ok(false));
        assert_eq!(ok("HEAD /metrics HTTP/1.1\r\n\r\n"), Ok(true));
        assert_eq!(ok("GET / HTTP/1.1\r\n\r\n"), Err(Status::NotFound));
        assert_eq!(ok("GET /metricsx HTTP/1.1\r\n\r\n"), Err(Status::NotFound));
        assert_eq!(
            ok("POST /metrics HTTP/1.1\r\n\r\n"),
            Err(Status::MethodNotAllowed)
        );
        for bad in [
            "GET /metrics\r\n\r\n",
            "GET /metrics HTTP/2\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "\r\n\r\n",
        ] {
            assert!(matches!(ok(bad), Err(Status::BadRequest(_))), "{bad:?}");
        }
        assert!(matches!(
            route(b"GET /\xff HTTP/1.1\r\n\r\n", "/metrics"),
            Err(Status::BadRequest(_))
        ));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n"), None);
    }

    /// A server of "up 1" at /metrics on a free local port, on a thread.
    fn serving() -> std::net::SocketAddr {
        let listener = Listener::bind(&Listen::Tcp("127.0.0.1:0".into())).unwrap();
        let Listener::Tcp(l) = &listener else {
            panic!("not tcp")
        };
        let addr = l.local_addr().unwrap();
        let res = Resource {
            path: "/metrics",
            content_type: "text/plain; version=0.0.4",
            body: || "up 1\n".into(),
        };
        std::thread::spawn(move || listener.serve(res));
        addr
    }

    /// Send `req` to the server at `addr` and return its answer.
    fn ask(addr: std::net::SocketAddr, req: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A client flooding us may see the connection closed mid-write.
        let _ = s.write_all(req);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn bad_and_huge_requests_get_400_and_the_server_goes_on() {
        let addr = serving();

        let bad = ask(addr, b"NONSENSE\r\n\r\n");
        assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");
        let huge = ask(addr, &vec![b'A'; 64 << 10]);
        assert!(huge.starts_with("HTTP/1.1 400 "), "{huge}");
        assert!(huge.contains("too large"), "{huge}");
        let other = ask(addr, b"GET /other HTTP/1.1\r\n\r\n");
        assert!(other.starts_with("HTTP/1.1 404 "), "{other}");

        let good = ask(addr, b"GET /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
        assert!(good.starts_with("HTTP/1.1 200 OK\r\n"), "{good}");
        assert!(
            good.contains("Content-Type: text/plain; version=0.0.4\r\n"),
            "{good}"
        );
        assert!(good.contains("Content-Length: 5\r\n"), "{good}");
        assert!(good.ends_with("\r\n\r\nup 1\n"), "{good}");
        let head = ask(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
    }

    #[test]
    fn a_client_that_sends_nothing_does_not_hold_the_server() {
        let addr = serving();
        let _silent: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let good = ask(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(good.starts_with("HTTP/1.1 200 OK"), "{good}");
    }
}
