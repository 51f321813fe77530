//! The client's half of the fixed-newstyle handshake.

use std::io::{self, Read, Write};
use std::time::Duration;

use super::wire::{read_array, read_u16, read_u32, read_u64};
use super::{connect_socket, io_error, sanitize, ClientError, NbdUri, Stream};
use crate::nbd::proto;

/// Longest option reply payload accepted during the handshake.
const MAX_OPTION_REPLY: u32 = 64 << 10;
/// The second magic of an oldstyle server.
pub(super) const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;

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

/// Send an option with its payload.
pub(super) fn send_option<W: Write + ?Sized>(
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
pub(super) fn greet<S: Read + Write + ?Sized>(
    s: &mut S,
) -> std::result::Result<(bool, bool), ClientError> {
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
pub(super) fn read_option_reply<S: Read + ?Sized>(
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
pub(super) fn opt_go<S: Read + Write + ?Sized>(
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
pub(super) fn opt_export_name<S: Read + Write + ?Sized>(
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
