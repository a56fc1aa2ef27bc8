//! Target `xenstore_wire`: the xenstored wire protocol as the client reads it
//! (`xvtpm_xen::xenstore::wire`, and what `Xenstore`'s reader does with each message: replies,
//! error replies, watch events), plus the parsers of the values a guest writes into xenstore
//! (xenbus state, numbers, uuids, permissions).
//!
//! Input: byte 0 picks how the stream is cut into reads (and whether some reads are
//! interrupted); the rest is the byte stream from xenstored.
//!
//! Checked: reading the stream in one piece and in fuzzer-chosen short reads gives the same
//! messages; every message's payload is its header's length and at most 4096 bytes; messages
//! re-encode to bytes that read back to themselves; a clean end consumed every byte; payload
//! splitting and joining are inverse; each value parser's result re-encodes to a value that
//! parses to the same thing.

use std::io::{self, Read};

use xvtpm_xen::xenbus::{parse_num, parse_uuid, XenbusState};
use xvtpm_xen::xenstore::wire::{
    error_payload, nul_terminated, parse_error, split_nul, Header, Message, MsgType, HEADER_LEN, PAYLOAD_MAX,
};
use xvtpm_xen::{Perm, XsErrno};

/// A reader that hands out the stream in short pieces, sometimes failing with `Interrupted`.
struct Chunked<'a> {
    data: &'a [u8],
    mode: u8,
    calls: usize,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls += 1;
        if self.mode & 0x80 != 0 && self.calls.is_multiple_of(3) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        let step = 1 + (self.calls * usize::from(self.mode & 0x7F)) % 23;
        let n = buf.len().min(self.data.len()).min(step);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// The messages read until the stream ended, and whether it ended in an error.
fn read_all(r: &mut impl Read) -> (Vec<Message>, bool) {
    let mut out = Vec::new();
    loop {
        match Message::read_from(r) {
            Ok(Some(m)) => out.push(m),
            Ok(None) => return (out, false),
            Err(_) => return (out, true),
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((mode, stream)) = crate::selector(data) else { return };
    let (msgs, failed) = read_all(&mut &stream[..]);
    let chunked = read_all(&mut Chunked { data: stream, mode, calls: 0 });
    assert_eq!((&msgs, failed), (&chunked.0, chunked.1), "short reads changed what was read");

    let consumed: usize = msgs.iter().map(|m| HEADER_LEN + m.payload.len()).sum();
    assert!(consumed <= stream.len());
    if !failed {
        assert_eq!(consumed, stream.len(), "a clean end left bytes unread");
    }
    for m in &msgs {
        check_message(m);
    }
}

fn check_message(m: &Message) {
    assert_eq!(m.header.len as usize, m.payload.len(), "payload length differs from the header's");
    assert!(m.payload.len() <= PAYLOAD_MAX, "payload of {} bytes", m.payload.len());
    assert_eq!(Header::decode(&m.header.encode()), m.header);
    let bytes = m.encode();
    assert_eq!(Message::read_from(&mut &bytes[..]).expect("re-read").as_ref(), Some(m), "re-encoding");
    if let Some(t) = MsgType::from_u32(m.header.ty) {
        assert_eq!(t as u32, m.header.ty);
        assert_eq!(m.msg_type(), Some(t));
        let again = Message::new(t, m.header.req_id, m.header.tx_id, m.payload.clone()).expect("fits");
        assert_eq!(&again, m);
    }

    // Splitting a payload into NUL-terminated strings and joining them back.
    let parts = split_nul(&m.payload);
    let joined = nul_terminated(&parts);
    if m.payload.is_empty() || m.payload.ends_with(&[0]) {
        assert_eq!(joined, m.payload, "split then join");
    } else {
        assert_eq!(joined[..joined.len() - 1], m.payload[..], "split then join (final NUL added)");
    }

    // What the client makes of each kind of message.
    match m.msg_type() {
        Some(MsgType::Error) => {
            let e = parse_error(&m.payload);
            let back = parse_error(&error_payload(e));
            assert!(back == e || (e == XsErrno::Other && back == XsErrno::EIO), "errno {e:?} came back as {back:?}");
        }
        Some(MsgType::WatchEvent) if parts.len() >= 2 => {
            let path = String::from_utf8_lossy(parts[0]);
            let token = String::from_utf8_lossy(parts[1]);
            assert!(path.len() >= parts[0].len() && token.len() >= parts[1].len());
        }
        Some(MsgType::TransactionStart) => {
            let s = String::from_utf8_lossy(m.payload.strip_suffix(&[0]).unwrap_or(&m.payload)).into_owned();
            if let Ok(id) = s.parse::<u32>() {
                assert_eq!(id.to_string().parse::<u32>(), Ok(id));
            }
        }
        _ => {}
    }
    for part in parts.iter().filter(|p| !p.is_empty()) {
        check_value(part);
    }
}

/// The parsers of node values a guest controls.
fn check_value(v: &[u8]) {
    if let Ok(p) = Perm::parse(v) {
        assert_eq!(Perm::parse(p.encode().as_bytes()).expect("re-parse"), p, "permission {:?}", p.encode());
    }
    if let Ok(s) = XenbusState::parse("/fuzz/state", v) {
        assert_eq!(XenbusState::parse("/fuzz/state", s.as_str().as_bytes()).expect("re-parse"), s);
        assert_eq!(XenbusState::from_u32(s as u32), Some(s));
    }
    if let Ok(n) = parse_num::<u32>("/fuzz/ring-ref", v) {
        assert_eq!(parse_num::<u32>("/fuzz/ring-ref", n.to_string().as_bytes()).expect("re-parse"), n);
    }
    let _ = parse_num::<u16>("/fuzz/domid", v);
    if let Ok(u) = parse_uuid("/fuzz/uuid", v) {
        assert_eq!(u.len(), 36);
        let parsed = xvtpm_proto::Uuid::parse(&u).expect("a uuid xenbus accepts is a uuid");
        assert_eq!(parsed.to_string(), u, "uuid text round trip");
    }
    if let Ok(Ok(u)) = std::str::from_utf8(v).map(xvtpm_proto::Uuid::parse) {
        assert_eq!(xvtpm_proto::Uuid::parse(&u.to_string()), Ok(u));
    }
}
