//! NBD client: connect to a server, negotiate, send requests, match replies.
//!
//! - [`NbdUri`]: `nbd://host[:port]/export` and `nbd+unix:///export?socket=PATH`.
//! - [`connect`]: open the socket and run the fixed-newstyle handshake
//!   ([`negotiate`]): `NBD_OPT_GO` asking for block sizes, falling back to
//!   `NBD_OPT_EXPORT_NAME` on servers that do not know `GO`.
//! - [`encode_request`], [`read_reply`]: the transmission phase's wire format
//!   (simple replies only; structured replies are never negotiated here).
//! - [`status`]: a second kind of connection, with structured replies and
//!   `base:allocation`, for block status.
//!
//! Everything read from the server is bounded before anything is allocated
//! for it, so a hostile server gets an error, not a panic or a huge buffer.
//! The multiplexing of many requests on one connection, and reconnecting,
//! live in [`crate::targets::nbd`].

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::{SocketAddr as UnixAddr, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use super::proto::{self, option_name, rep_error_name};
use crate::target::{Flags, Op, Request};
use crate::{Error, Result};

pub mod status;

/// The IANA port of NBD.
pub const DEFAULT_PORT: u16 = 10809;

/// Longest option reply payload accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// Longest server error message kept for the user.
const MAX_MESSAGE_CHARS: usize = 512;
/// The second magic of an oldstyle server.
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// TCP: a host name or address, and a port.
    Tcp {
        /// Host name, IPv4 or IPv6 address (without brackets).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix domain socket.
    Unix(UnixPath),
}

/// A Unix socket's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UnixPath {
    /// A socket file.
    File(PathBuf),
    /// A Linux abstract socket (the URI's `socket=` began with `%00`).
    Abstract(Vec<u8>),
}

/// A parsed NBD URI (the format of the NBD project's `doc/uri.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    text: String,
    /// Where the server listens.
    pub addr: Addr,
    /// The export name (may be empty: the server's default export).
    pub export: String,
}

impl std::fmt::Display for NbdUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for NbdUri {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        NbdUri::parse(s)
    }
}

impl NbdUri {
    /// Parse `nbd://host[:port][/export]` or `nbd+unix:///[export]?socket=PATH`.
    ///
    /// ```
    /// use userblk::nbd::client::{Addr, NbdUri};
    /// let u = NbdUri::parse("nbd://[::1]:10810/disk%201").unwrap();
    /// assert_eq!(u.addr, Addr::Tcp { host: "::1".into(), port: 10810 });
    /// assert_eq!(u.export, "disk 1");
    /// ```
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |reason: String| Error::NbdUri {
            uri: text.to_string(),
            reason,
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            bad("expected nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH".into())
        })?;
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            "nbds" | "nbds+unix" | "nbds+vsock" => {
                return Err(bad(format!("{scheme}: TLS is not supported")))
            }
            "nbd+vsock" => return Err(bad("nbd+vsock: vsock is not supported".into())),
            _ => {
                return Err(bad(format!(
                    "unknown scheme {scheme:?} (expected nbd or nbd+unix)"
                )))
            }
        };
        if rest.contains('#') {
            return Err(bad("a URI fragment (#...) has no meaning here".into()));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let export = String::from_utf8(percent_decode(path).map_err(&bad)?)
            .map_err(|_| bad("the export name is not UTF-8".into()))?;
        if export.len() > proto::MAX_STRING {
            return Err(bad(format!(
                "the export name is {} bytes long (at most {})",
                export.len(),
                proto::MAX_STRING
            )));
        }
        if export.contains('\0') {
            return Err(bad("the export name contains a NUL byte".into()));
        }
        let mut socket = None;
        for param in query.into_iter().flat_map(|q| q.split('&')) {
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            match key {
                "socket" if unix => socket = Some(percent_decode(value).map_err(&bad)?),
                "" => {}
                k if k.starts_with("tls") => return Err(bad(format!("{k}: TLS is not supported"))),
                k => return Err(bad(format!("unknown query parameter {k:?}"))),
            }
        }
        let addr = if unix {
            if !authority.is_empty() {
                return Err(bad(format!(
                    "nbd+unix URIs take no host ({authority:?}); write nbd+unix:///EXPORT?socket=PATH"
                )));
            }
            let socket = socket.ok_or_else(|| bad("nbd+unix needs ?socket=PATH".into()))?;
            Addr::Unix(match socket.split_first() {
                None => return Err(bad("the socket path is empty".into())),
                Some((0, name)) => UnixPath::Abstract(name.to_vec()),
                Some(_) => {
                    use std::os::unix::ffi::OsStringExt;
                    UnixPath::File(PathBuf::from(std::ffi::OsString::from_vec(socket)))
                }
            })
        } else {
            let (host, port) = parse_authority(authority).map_err(bad)?;
            Addr::Tcp { host, port }
        };
        Ok(NbdUri {
            text: text.to_string(),
            addr,
            export,
        })
    }
}

/// `host[:port]` or `[v6]:port` of an `nbd://` URI.
fn parse_authority(authority: &str) -> std::result::Result<(String, u16), String> {
    if authority.contains('@') {
        return Err("user names are only for TLS, which is not supported".into());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or("an IPv6 address needs a closing ]")?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or("expected :PORT after ]")?),
            ),
        }
    } else {
        match authority.split_once(':') {
            Some((_, p)) if p.contains(':') => {
                return Err("an IPv6 address must be in brackets: nbd://[::1]/".into())
            }
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("no host (nbd://HOST[:PORT]/EXPORT)".into());
    }
    let port = match port {
        None | Some("") => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("bad port {p:?}")),
        },
    };
    Ok((host.to_string(), port))
}

fn percent_decode(s: &str) -> std::result::Result<Vec<u8>, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in {s:?}"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// What can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    /// The server did not answer in time.
    #[error("timed out {during}")]
    Timeout {
        /// What the client was doing.
        during: &'static str,
    },
    /// The server closed the connection.
    #[error("the server closed the connection {during}")]
    Closed {
        /// What the client was doing.
        during: &'static str,
    },
    /// Reading or writing the socket failed.
    #[error("{during}: {err}")]
    Io {
        /// What the client was doing.
        during: &'static str,
        /// What the OS said.
        err: io::Error,
    },
    /// The greeting's magic is wrong.
    #[error("not an NBD server (greeting magic {0:#018x})")]
    NotNbd(u64),
    /// The server speaks only the oldstyle handshake.
    #[error("the server speaks the oldstyle handshake, which is not supported")]
    Oldstyle,
    /// The server answered an option with an error.
    #[error("the server refused {}: {}{}", option_name(*option), rep_error_name(*reply), message_suffix(message))]
    Refused {
        /// The option (`NBD_OPT_*`).
        option: u32,
        /// The error reply (`NBD_REP_ERR_*`).
        reply: u32,
        /// The server's message, sanitised.
        message: String,
    },
    /// The server hung up after `NBD_OPT_EXPORT_NAME`, its way of refusing an export.
    #[error("the server closed the connection after NBD_OPT_EXPORT_NAME: it has no export named {export:?} or refused it")]
    ExportNameRefused {
        /// The export asked for.
        export: String,
    },
    /// An option reply with the wrong magic.
    #[error("option reply with magic {0:#018x}")]
    BadOptionMagic(u64),
    /// A reply to another option than the one sent.
    #[error("reply to option {got} while waiting for {}", option_name(*sent))]
    WrongOption {
        /// The option sent.
        sent: u32,
        /// The option the reply names.
        got: u32,
    },
    /// An option reply longer than any valid one.
    #[error("option reply of {len} bytes (at most {max} accepted)")]
    ReplyTooLong {
        /// Its length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// An option reply type that makes no sense here.
    #[error("unexpected reply type {reply:#x} to {}", option_name(*option))]
    UnexpectedReply {
        /// The option.
        option: u32,
        /// The reply type.
        reply: u32,
    },
    /// An `NBD_REP_INFO` whose length does not fit its type.
    #[error("malformed NBD_REP_INFO of type {info} with {len} bytes")]
    BadInfo {
        /// The info type.
        info: u16,
        /// Its length.
        len: u32,
    },
    /// `NBD_REP_ACK` came before the export's size.
    #[error("the server ended NBD_OPT_GO without the export's size")]
    NoExportInfo,
    /// Block size constraints no client could honour.
    #[error("unusable block sizes: minimum {min}, preferred {preferred}, maximum {max}")]
    BadBlockSizes {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum.
        max: u32,
    },
    /// The export holds not even one block.
    #[error("the export's size {size} is smaller than one {block}-byte block")]
    TooSmall {
        /// Its size.
        size: u64,
        /// The block size.
        block: u32,
    },
    /// On a reconnect, the export's size differs.
    #[error("the export's size changed from {was} to {now} bytes")]
    SizeChanged {
        /// The size when the device was made.
        was: u64,
        /// The size now.
        now: u64,
    },
    /// On a reconnect, the export lacks something the device advertised.
    #[error("the export no longer offers {0}")]
    LostFeature(&'static str),
    /// A transmission reply with an unknown magic.
    #[error("reply with magic {0:#010x}")]
    BadReplyMagic(u32),
    /// A structured reply, which was never negotiated.
    #[error("structured reply, which was not negotiated")]
    UnexpectedStructured,
    /// A reply whose cookie matches no request in flight.
    #[error("reply for cookie {0:#x}, which matches no request in flight")]
    UnknownCookie(u64),
    /// The server answered `ESHUTDOWN`: it is going away.
    #[error("the server is shutting down (ESHUTDOWN)")]
    ShuttingDown,
    /// The server offers no block status (`base:allocation`).
    #[error("no block status: {0}")]
    NoStatus(&'static str),
    /// A structured reply that breaks the protocol.
    #[error("malformed structured reply: {0}")]
    BadStructured(String),
    /// The server answered a request with an error.
    #[error(
        "the server failed the request with NBD error {error}{}",
        message_suffix(message)
    )]
    Failed {
        /// The NBD error.
        error: u32,
        /// The server's message, sanitised.
        message: String,
    },
}

fn message_suffix(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(" ({m})")
    }
}

/// The server's text, safe to print: printable characters only, bounded.
fn sanitize(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_MESSAGE_CHARS)
        .collect()
}

/// An I/O error during `during`, as a [`ClientError`].
pub fn io_error(during: &'static str) -> impl Fn(io::Error) -> ClientError {
    move |err| match err.kind() {
        io::ErrorKind::UnexpectedEof => ClientError::Closed { during },
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout { during },
        _ => ClientError::Io { during, err },
    }
}

/// A connected socket, TCP or Unix.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Stream {
    /// A second handle on the same socket (for a reader and a writer thread).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    /// Shut both directions down: blocked reads and writes on every handle return.
    pub fn shutdown(&self) {
        // Fails only on a socket that is already disconnected.
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Read and write timeouts (`None`: block forever).
    pub fn set_timeouts(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write_vectored(bufs),
            Stream::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Open a socket to `addr`, giving up after `timeout` (TCP; a Unix
/// connect does not wait).
pub fn connect_socket(addr: &Addr, timeout: Duration) -> std::result::Result<Stream, ClientError> {
    match addr {
        Addr::Unix(UnixPath::File(p)) => UnixStream::connect(p)
            .map(Stream::Unix)
            .map_err(ClientError::Connect),
        Addr::Unix(UnixPath::Abstract(name)) => {
            use std::os::linux::net::SocketAddrExt;
            let a = UnixAddr::from_abstract_name(name).map_err(ClientError::Connect)?;
            UnixStream::connect_addr(&a)
                .map(Stream::Unix)
                .map_err(ClientError::Connect)
        }
        Addr::Tcp { host, port } => {
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(ClientError::Connect)?;
            let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        // Small requests go out at once; replies are matched by cookie anyway.
                        let _ = s.set_nodelay(true);
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = e,
                }
            }
            Err(ClientError::Connect(last))
        }
    }
}

/// Block size constraints from `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests' offsets and lengths must be multiples of this.
    pub min: u32,
    /// Requests of this size and alignment are efficient.
    pub preferred: u32,
    /// Largest read or write payload (`u32::MAX`: no limit).
    pub max: u32,
}

/// What the handshake learnt about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`proto::FLAG_*`).
    pub flags: u16,
    /// Block sizes, if the server sent them.
    pub block_sizes: Option<BlockSizes>,
}

impl ExportInfo {
    /// Whether a transmission flag is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & proto::FLAG_HAS_FLAGS != 0 && self.flags & flag != 0
    }
}

/// Connect to `uri` and negotiate its export; every step of it gives up after `timeout`.
/// The stream comes back in blocking mode, ready for transmission.
pub fn connect(
    uri: &NbdUri,
    timeout: Duration,
) -> std::result::Result<(Stream, ExportInfo), ClientError> {
    let mut s = connect_socket(&uri.addr, timeout)?;
    let info = handshake(&mut s, &uri.export, timeout)?;
    Ok((s, info))
}

/// Run [`negotiate`] on a connected stream with `timeout` on every read and
/// write; the timeouts are cleared again afterwards.
pub fn handshake(
    s: &mut Stream,
    export: &str,
    timeout: Duration,
) -> std::result::Result<ExportInfo, ClientError> {
    let during = "setting socket timeouts";
    s.set_timeouts(Some(timeout.max(Duration::from_millis(1))))
        .map_err(io_error(during))?;
    let info = negotiate(s, export)?;
    s.set_timeouts(None).map_err(io_error(during))?;
    Ok(info)
}

fn read_array<const N: usize, R: Read + ?Sized>(
    r: &mut R,
    during: &'static str,
) -> std::result::Result<[u8; N], ClientError> {
    let mut b = [0u8; N];
    r.read_exact(&mut b).map_err(io_error(during))?;
    Ok(b)
}

fn read_u16<R: Read + ?Sized>(
    r: &mut R,
    during: &'static str,
) -> std::result::Result<u16, ClientError> {
    read_array::<2, R>(r, during).map(u16::from_be_bytes)
}

fn read_u32<R: Read + ?Sized>(
    r: &mut R,
    during: &'static str,
) -> std::result::Result<u32, ClientError> {
    read_array::<4, R>(r, during).map(u32::from_be_bytes)
}

fn read_u64<R: Read + ?Sized>(
    r: &mut R,
    during: &'static str,
) -> std::result::Result<u64, ClientError> {
    read_array::<8, R>(r, during).map(u64::from_be_bytes)
}

/// Send an option with its payload.
fn send_option<W: Write + ?Sized>(
    w: &mut W,
    option: u32,
    payload: &[u8],
    during: &'static str,
) -> std::result::Result<(), ClientError> {
    let len = u32::try_from(payload.len()).map_err(|_| ClientError::Io {
        during,
        err: io::Error::new(io::ErrorKind::InvalidInput, "option too long"),
    })?;
    let mut msg = Vec::with_capacity(16 + payload.len());
    msg.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(payload);
    w.write_all(&msg).map_err(io_error(during))?;
    w.flush().map_err(io_error(during))
}

/// The client's half of the fixed-newstyle handshake, up to transmission.
///
/// Sends `NBD_OPT_GO` with an `NBD_INFO_BLOCK_SIZE` request; if the server
/// does not know `GO` (`NBD_REP_ERR_UNSUP`), or is not fixed-newstyle, uses
/// `NBD_OPT_EXPORT_NAME`.
pub fn negotiate<S: Read + Write + ?Sized>(
    s: &mut S,
    export: &str,
) -> std::result::Result<ExportInfo, ClientError> {
    let (fixed, no_zeroes) = greet(s)?;
    if fixed {
        if let Some(info) = opt_go(s, export)? {
            return Ok(info);
        }
        tracing::debug!("nbd: the server does not know NBD_OPT_GO; using NBD_OPT_EXPORT_NAME");
    }
    opt_export_name(s, export, no_zeroes)
}

/// The greeting and the client's flags: whether the server is fixed
/// newstyle, and whether it leaves out the 124 zeroes.
fn greet<S: Read + Write + ?Sized>(s: &mut S) -> std::result::Result<(bool, bool), ClientError> {
    let during = "reading the server's greeting";
    let magic = read_u64(s, during)?;
    if magic != proto::NBDMAGIC {
        return Err(ClientError::NotNbd(magic));
    }
    match read_u64(s, during)? {
        proto::IHAVEOPT => {}
        OLDSTYLE_MAGIC => return Err(ClientError::Oldstyle),
        other => return Err(ClientError::NotNbd(other)),
    }
    let server_flags = read_u16(s, during)?;
    let fixed = server_flags & proto::FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = server_flags & proto::FLAG_NO_ZEROES != 0;
    let mut client_flags = 0;
    if fixed {
        client_flags |= proto::FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        client_flags |= proto::FLAG_C_NO_ZEROES;
    }
    let during = "sending the client flags";
    s.write_all(&client_flags.to_be_bytes())
        .map_err(io_error(during))?;
    Ok((fixed, no_zeroes))
}

/// Read one reply to `option`: its type and its data.
fn read_option_reply<S: Read + ?Sized>(
    s: &mut S,
    option: u32,
    during: &'static str,
) -> std::result::Result<(u32, Vec<u8>), ClientError> {
    let magic = read_u64(s, during)?;
    if magic != proto::OPT_REPLY_MAGIC {
        return Err(ClientError::BadOptionMagic(magic));
    }
    let got = read_u32(s, during)?;
    if got != option {
        return Err(ClientError::WrongOption { sent: option, got });
    }
    let reply = read_u32(s, during)?;
    let len = read_u32(s, during)?;
    if len > MAX_OPTION_REPLY {
        return Err(ClientError::ReplyTooLong {
            len,
            max: MAX_OPTION_REPLY,
        });
    }
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data).map_err(io_error(during))?;
    Ok((reply, data))
}

/// `NBD_OPT_GO`: `None` if the server does not support it.
fn opt_go<S: Read + Write + ?Sized>(
    s: &mut S,
    export: &str,
) -> std::result::Result<Option<ExportInfo>, ClientError> {
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len()).map_err(|_| ClientError::Io {
        during: "sending NBD_OPT_GO",
        err: io::Error::new(io::ErrorKind::InvalidInput, "export name too long"),
    })?;
    let mut payload = Vec::with_capacity(name.len() + 8);
    payload.extend_from_slice(&name_len.to_be_bytes());
    payload.extend_from_slice(name);
    payload.extend_from_slice(&1u16.to_be_bytes());
    payload.extend_from_slice(&proto::INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, proto::OPT_GO, &payload, "sending NBD_OPT_GO")?;

    let mut export_info: Option<(u64, u16)> = None;
    let mut block_sizes = None;
    let during = "reading the reply to NBD_OPT_GO";
    loop {
        let (reply, data) = read_option_reply(s, proto::OPT_GO, during)?;
        // Bounded by MAX_OPTION_REPLY.
        let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
        match reply {
            proto::REP_ACK => {
                let (size, flags) = export_info.ok_or(ClientError::NoExportInfo)?;
                return Ok(Some(ExportInfo {
                    size,
                    flags,
                    block_sizes,
                }));
            }
            proto::REP_INFO => {
                let bad = ClientError::BadInfo {
                    info: data
                        .get(..2)
                        .map_or(u16::MAX, |t| u16::from_be_bytes([t[0], t[1]])),
                    len,
                };
                let (ty, body) = match data.split_first_chunk::<2>() {
                    Some((t, body)) => (u16::from_be_bytes(*t), body),
                    None => return Err(bad),
                };
                match ty {
                    proto::INFO_EXPORT => {
                        let (size, rest) = body.split_first_chunk::<8>().ok_or(bad)?;
                        let flags: &[u8; 2] = rest
                            .try_into()
                            .map_err(|_| ClientError::BadInfo { info: ty, len })?;
                        export_info = Some((u64::from_be_bytes(*size), u16::from_be_bytes(*flags)));
                    }
                    proto::INFO_BLOCK_SIZE => {
                        let b: &[u8; 12] = body.try_into().map_err(|_| bad)?;
                        let word =
                            |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                        block_sizes = Some(BlockSizes {
                            min: word(0),
                            preferred: word(4),
                            max: word(8),
                        });
                    }
                    // Name, description and future types: nothing we need.
                    _ => {}
                }
            }
            proto::REP_ERR_UNSUP => return Ok(None),
            r if r & proto::REP_FLAG_ERROR != 0 => {
                return Err(ClientError::Refused {
                    option: proto::OPT_GO,
                    reply: r,
                    message: sanitize(&data),
                })
            }
            r => {
                return Err(ClientError::UnexpectedReply {
                    option: proto::OPT_GO,
                    reply: r,
                })
            }
        }
    }
}

/// `NBD_OPT_EXPORT_NAME`: the server answers with the export or hangs up.
fn opt_export_name<S: Read + Write + ?Sized>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
) -> std::result::Result<ExportInfo, ClientError> {
    send_option(
        s,
        proto::OPT_EXPORT_NAME,
        export.as_bytes(),
        "sending NBD_OPT_EXPORT_NAME",
    )?;
    let during = "reading the reply to NBD_OPT_EXPORT_NAME";
    let size = match read_u64(s, during) {
        Err(ClientError::Closed { .. }) => {
            return Err(ClientError::ExportNameRefused {
                export: export.to_string(),
            })
        }
        r => r?,
    };
    let flags = read_u16(s, during)?;
    if !no_zeroes {
        read_array::<124, S>(s, during)?;
    }
    Ok(ExportInfo {
        size,
        flags,
        block_sizes: None,
    })
}

/// The command and command flags for a request on an export with `flags`.
pub fn command(req: &Request, export_flags: u16) -> (u16, u16) {
    let info = ExportInfo {
        size: 0,
        flags: export_flags,
        block_sizes: None,
    };
    let fua = if req.flags.contains(Flags::FUA) && info.has(proto::FLAG_SEND_FUA) {
        proto::CMD_FLAG_FUA
    } else {
        0
    };
    match req.op {
        Op::Read => (proto::CMD_READ, 0),
        Op::Write => (proto::CMD_WRITE, fua),
        Op::Flush => (proto::CMD_FLUSH, 0),
        Op::Discard => (proto::CMD_TRIM, fua),
        Op::WriteZeroes => {
            let no_hole = if req.flags.contains(Flags::NOUNMAP) {
                proto::CMD_FLAG_NO_HOLE
            } else {
                0
            };
            (proto::CMD_WRITE_ZEROES, fua | no_hole)
        }
    }
}

/// A transmission request header.
pub fn encode_request(
    cmd: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> [u8; proto::REQUEST_LEN] {
    let mut b = [0u8; proto::REQUEST_LEN];
    b[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// A simple reply's header; a read's data follows it when `error` is 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// 0, or an NBD error (`proto::E*`).
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

/// Read one simple reply header. A structured reply or a bad magic is an
/// error: the stream can no longer be trusted.
pub fn read_reply<R: Read + ?Sized>(r: &mut R) -> std::result::Result<Reply, ClientError> {
    let b: [u8; proto::SIMPLE_REPLY_LEN] = read_array(r, "reading a reply")?;
    let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    match word(0) {
        proto::SIMPLE_REPLY_MAGIC => {}
        proto::STRUCTURED_REPLY_MAGIC => return Err(ClientError::UnexpectedStructured),
        m => return Err(ClientError::BadReplyMagic(m)),
    }
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&b[8..16]);
    Ok(Reply {
        error: word(4),
        cookie: u64::from_be_bytes(cookie),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
