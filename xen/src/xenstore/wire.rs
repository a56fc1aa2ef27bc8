//! The xenstored wire protocol (Xen's `xen/include/public/io/xs_wire.h`): a 16-byte header
//! `struct xsd_sockmsg { u32 type, req_id, tx_id, len }` in host byte order, then `len` bytes of
//! payload (at most 4096), made of NUL-separated strings.

use std::io::{Read, Write};

use crate::{Error, Result, XsErrno};

/// Size of `struct xsd_sockmsg`.
pub const HEADER_LEN: usize = 16;
/// `XENSTORE_PAYLOAD_MAX`.
pub const PAYLOAD_MAX: usize = 4096;
/// `XENSTORE_ABS_PATH_MAX`.
pub const ABS_PATH_MAX: usize = 3072;

/// `enum xsd_sockmsg_type`.
// The message types are xs_wire.h's, named after their XS_* constants.
#[allow(missing_docs)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MsgType {
    Control = 0,
    Directory = 1,
    Read = 2,
    GetPerms = 3,
    Watch = 4,
    Unwatch = 5,
    TransactionStart = 6,
    TransactionEnd = 7,
    Introduce = 8,
    Release = 9,
    GetDomainPath = 10,
    Write = 11,
    Mkdir = 12,
    Rm = 13,
    SetPerms = 14,
    WatchEvent = 15,
    Error = 16,
    IsDomainIntroduced = 17,
    Resume = 18,
    SetTarget = 19,
    /// 20 was XS_RESTRICT, since removed.
    ResetWatches = 21,
    DirectoryPart = 22,
}

impl MsgType {
    /// Parses a message type number.
    pub fn from_u32(v: u32) -> Option<Self> {
        use MsgType::*;
        Some(match v {
            0 => Control,
            1 => Directory,
            2 => Read,
            3 => GetPerms,
            4 => Watch,
            5 => Unwatch,
            6 => TransactionStart,
            7 => TransactionEnd,
            8 => Introduce,
            9 => Release,
            10 => GetDomainPath,
            11 => Write,
            12 => Mkdir,
            13 => Rm,
            14 => SetPerms,
            15 => WatchEvent,
            16 => Error,
            17 => IsDomainIntroduced,
            18 => Resume,
            19 => SetTarget,
            21 => ResetWatches,
            22 => DirectoryPart,
            _ => return None,
        })
    }
}

/// `struct xsd_sockmsg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Raw message type (see [`MsgType`]).
    pub ty: u32,
    /// Request id, echoed in the reply; 0 in watch events.
    pub req_id: u32,
    /// Transaction id, 0 outside a transaction.
    pub tx_id: u32,
    /// Payload length.
    pub len: u32,
}

impl Header {
    /// The 16 header bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.ty.to_ne_bytes());
        b[4..8].copy_from_slice(&self.req_id.to_ne_bytes());
        b[8..12].copy_from_slice(&self.tx_id.to_ne_bytes());
        b[12..16].copy_from_slice(&self.len.to_ne_bytes());
        b
    }

    /// Parses 16 header bytes.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let u = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header { ty: u(0), req_id: u(4), tx_id: u(8), len: u(12) }
    }
}

/// A whole message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its header (`len` equals `payload.len()`).
    pub header: Header,
    /// Its payload.
    pub payload: Vec<u8>,
}

impl Message {
    /// A message with `payload`; errors if the payload exceeds [`PAYLOAD_MAX`].
    pub fn new(ty: MsgType, req_id: u32, tx_id: u32, payload: Vec<u8>) -> Result<Self> {
        if payload.len() > PAYLOAD_MAX {
            return Err(Error::XsProtocol(format!("payload of {} bytes exceeds {PAYLOAD_MAX}", payload.len())));
        }
        Ok(Message { header: Header { ty: ty as u32, req_id, tx_id, len: payload.len() as u32 }, payload })
    }

    /// Header and payload as one buffer (written with one `write` call, as `/dev/xen/xenbus`
    /// prefers).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len());
        v.extend_from_slice(&self.header.encode());
        v.extend_from_slice(&self.payload);
        v
    }

    /// The message type, if known.
    pub fn msg_type(&self) -> Option<MsgType> {
        MsgType::from_u32(self.header.ty)
    }

    /// Reads one message; `Ok(None)` on a clean end of stream before a header.
    pub fn read_from(r: &mut impl Read) -> Result<Option<Self>> {
        let mut hb = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match r.read(&mut hb[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(Error::XsProtocol("stream ended inside a header".into())),
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io("xenstore read", e)),
            }
        }
        let header = Header::decode(&hb);
        if header.len as usize > PAYLOAD_MAX {
            return Err(Error::XsProtocol(format!("payload length {} exceeds {PAYLOAD_MAX}", header.len)));
        }
        let mut payload = vec![0u8; header.len as usize];
        r.read_exact(&mut payload).map_err(|e| Error::io("xenstore read payload", e))?;
        Ok(Some(Message { header, payload }))
    }

    /// Writes the message in one call.
    pub fn write_to(&self, w: &mut impl Write) -> Result<()> {
        w.write_all(&self.encode()).map_err(|e| Error::io("xenstore write", e))?;
        w.flush().map_err(|e| Error::io("xenstore flush", e))
    }
}

/// Joins strings, each terminated by NUL: `"a\0b\0"`.
pub fn nul_terminated(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p);
        v.push(0);
    }
    v
}

/// Splits a payload of NUL-terminated strings (a missing final NUL is tolerated).
pub fn split_nul(payload: &[u8]) -> Vec<&[u8]> {
    let body = payload.strip_suffix(&[0]).unwrap_or(payload);
    if body.is_empty() && payload.is_empty() {
        return Vec::new();
    }
    body.split(|b| *b == 0).collect()
}

/// The payload of an `XS_ERROR` reply: `"ENOENT\0"`.
pub fn error_payload(errno: XsErrno) -> Vec<u8> {
    nul_terminated(&[errno.name().as_bytes()])
}

/// Parses an `XS_ERROR` payload.
pub fn parse_error(payload: &[u8]) -> XsErrno {
    let name = payload.split(|b| *b == 0).next().unwrap_or_default();
    XsErrno::from_name(&String::from_utf8_lossy(name))
}

/// The "OK\0" reply payload of write, mkdir, rm, watch, ...
pub const OK: &[u8] = b"OK\0";

#[cfg(test)]
mod tests {
    use super::*;

    /// Message type numbers and error names as listed in xs_wire.h of Xen 4.17.
    #[test]
    fn numbers_match_xs_wire_h() {
        let expected: &[(MsgType, u32)] = &[
            (MsgType::Control, 0),
            (MsgType::Directory, 1),
            (MsgType::Read, 2),
            (MsgType::GetPerms, 3),
            (MsgType::Watch, 4),
            (MsgType::Unwatch, 5),
            (MsgType::TransactionStart, 6),
            (MsgType::TransactionEnd, 7),
            (MsgType::Introduce, 8),
            (MsgType::Release, 9),
            (MsgType::GetDomainPath, 10),
            (MsgType::Write, 11),
            (MsgType::Mkdir, 12),
            (MsgType::Rm, 13),
            (MsgType::SetPerms, 14),
            (MsgType::WatchEvent, 15),
            (MsgType::Error, 16),
            (MsgType::IsDomainIntroduced, 17),
            (MsgType::Resume, 18),
            (MsgType::SetTarget, 19),
            (MsgType::ResetWatches, 21),
            (MsgType::DirectoryPart, 22),
        ];
        for (t, n) in expected {
            assert_eq!(*t as u32, *n);
            assert_eq!(MsgType::from_u32(*n), Some(*t));
        }
        assert_eq!(MsgType::from_u32(20), None);
        let names = [
            "EINVAL",
            "EACCES",
            "EEXIST",
            "EISDIR",
            "ENOENT",
            "ENOMEM",
            "ENOSPC",
            "EIO",
            "ENOTEMPTY",
            "ENOSYS",
            "EROFS",
            "EBUSY",
            "EAGAIN",
            "EISCONN",
            "E2BIG",
            "EPERM",
        ];
        for (e, n) in XsErrno::ALL.iter().zip(names) {
            assert_eq!(e.name(), n);
            assert_eq!(XsErrno::from_name(n), *e);
        }
    }

    /// A write request for "/a" = "xy" in transaction 5, request id 7, byte for byte.
    #[test]
    fn write_request_bytes() {
        let m = Message::new(MsgType::Write, 7, 5, b"/a\0xy".to_vec()).expect("msg");
        let mut want = Vec::new();
        for v in [11u32, 7, 5, 5] {
            want.extend_from_slice(&v.to_le_bytes());
        }
        want.extend_from_slice(b"/a\0xy");
        assert_eq!(m.encode(), want);
        let back = Message::read_from(&mut &want[..]).expect("read").expect("some");
        assert_eq!(back, m);
    }

    #[test]
    fn error_and_watch_event_bytes() {
        let e = Message::new(MsgType::Error, 3, 0, error_payload(XsErrno::ENOENT)).expect("msg");
        let b = e.encode();
        assert_eq!(&b[0..4], &16u32.to_le_bytes());
        assert_eq!(&b[12..16], &7u32.to_le_bytes());
        assert_eq!(&b[16..], b"ENOENT\0");
        assert_eq!(parse_error(&b[16..]), XsErrno::ENOENT);
        let w = Message::new(MsgType::WatchEvent, 0, 0, nul_terminated(&[b"/local/domain/0/backend", b"tok"]))
            .expect("msg");
        assert_eq!(&w.encode()[16..], b"/local/domain/0/backend\0tok\0");
    }

    #[test]
    fn oversized_and_truncated_are_errors() {
        assert!(Message::new(MsgType::Write, 1, 0, vec![0; PAYLOAD_MAX + 1]).is_err());
        let mut hdr = Header { ty: 2, req_id: 1, tx_id: 0, len: (PAYLOAD_MAX + 1) as u32 }.encode().to_vec();
        assert!(Message::read_from(&mut &hdr[..]).is_err());
        hdr = Header { ty: 2, req_id: 1, tx_id: 0, len: 10 }.encode().to_vec();
        hdr.extend_from_slice(b"abc");
        assert!(Message::read_from(&mut &hdr[..]).is_err());
        assert!(Message::read_from(&mut &hdr[..5]).is_err());
        assert!(Message::read_from(&mut &[][..]).expect("eof").is_none());
    }

    #[test]
    fn nul_split() {
        assert_eq!(split_nul(b"a\0bc\0"), vec![&b"a"[..], &b"bc"[..]]);
        assert_eq!(split_nul(b"a\0bc"), vec![&b"a"[..], &b"bc"[..]]);
        assert!(split_nul(b"").is_empty());
        assert_eq!(split_nul(b"\0"), vec![&b""[..]]);
    }
}
