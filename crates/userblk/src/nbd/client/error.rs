//! What can go wrong talking to a server, and the server's text made safe to print.

use std::io;

use crate::nbd::proto::{option_name, rep_error_name};

/// Longest server error message kept for the user.
const MAX_MESSAGE_CHARS: usize = 512;

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
pub(super) fn sanitize(bytes: &[u8]) -> String {
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
