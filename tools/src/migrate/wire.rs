//! The migration channel between `xvtpm migrate-relay` (source) and `xvtpm migrate-accept`
//! (destination): frames carrying xl's own stream both ways, and the vTPM's hand-over.
//!
//! ```text
//! frame = kind u8 | length u32 BE | payload
//! ```
//!
//! Kinds: [`Kind::Hello`] (source to destination, first: JSON [`Hello`]), [`Kind::Xl`] (xl's
//! bytes, either way), [`Kind::XlEnd`] (that direction of xl's stream ended), [`Kind::Offer`]
//! (source to destination: the vTPM, named files as `xvtpm_vtpm::state::managed::encode`
//! lays them out), [`Kind::Accepted`] / [`Kind::Refused`] (destination's answer; refused
//! carries the reason as text).

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The largest frame taken from a peer: a state directory and its snapshots fit many times.
pub const MAX_FRAME: usize = 16 << 20;
/// What the destination's xl sends once the domain is built and paused: the vTPM must be
/// there before the source's xl answers it with "go".
pub const RECEIVER_READY: &[u8] = b"domain received, ready to unpause";
/// The source's xl's "go": from here on the guest runs at the destination.
pub const PERMISSION_TO_GO: &[u8] = b"domain is yours, you are cleared to unpause";
/// The protocol named in [`Hello`].
pub const PROTOCOL: &str = "xvtpm-migrate 1";

/// A frame's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The source's plan.
    Hello = 1,
    /// xl's stream.
    Xl = 2,
    /// One direction of xl's stream ended.
    XlEnd = 3,
    /// The vTPM.
    Offer = 4,
    /// The destination holds the vTPM.
    Accepted = 5,
    /// The destination cannot take the vTPM (why).
    Refused = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Xl,
            3 => Kind::XlEnd,
            4 => Kind::Offer,
            5 => Kind::Accepted,
            6 => Kind::Refused,
            _ => return None,
        })
    }
}

/// What the source tells the destination first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL`].
    pub protocol: String,
    /// The guest's vtpm device uuid (the `uuid=` of its `vtpm=` line).
    pub device_uuid: String,
    /// The vTPM's uuid at the managers.
    pub vtpm_uuid: String,
    /// A TPM 1.2 (else 2.0).
    pub tpm12: bool,
    /// What xl runs at the destination: `migrate-receive` and its flags.
    pub xl_args: Vec<String>,
    /// An HVM guest: its vTPM is xvtpmd's, named by the domain's uuid (both uuids above), and
    /// xvtpmd serves it at the destination once it is in place.
    #[serde(default)]
    pub hvm: bool,
}

/// Writes one frame.
pub fn send(w: &mut impl Write, kind: Kind, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| io::Error::other("frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head)?;
    w.write_all(payload)?;
    w.flush()
}

/// Reads one frame; `None` at a clean end of the stream (between frames).
pub fn recv(r: &mut impl Read) -> io::Result<Option<(Kind, Vec<u8>)>> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match r.read(&mut head[got..])? {
            0 if got == 0 => return Ok(None),
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed mid-frame")),
            n => got += n,
        }
    }
    let kind = Kind::from_u8(head[0])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("unknown frame kind {}", head[0])))?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("a frame of {len} bytes")));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((kind, payload)))
}

/// Finds a message in a byte stream that arrives in pieces: feed it each piece in order.
#[derive(Debug)]
pub struct Watch {
    needle: &'static [u8],
    /// The end of what was fed, as long as the needle minus one byte.
    tail: Vec<u8>,
}

impl Watch {
    /// Watches for `needle`.
    pub fn new(needle: &'static [u8]) -> Self {
        Watch { needle, tail: Vec::new() }
    }

    /// Feeds `piece`. If the needle ends inside it: `Some(offset)`, where the needle starts in
    /// `piece` (0 if it started in an earlier piece). What comes before the offset is not the
    /// message; from it on is (or its end).
    pub fn feed(&mut self, piece: &[u8]) -> Option<usize> {
        let mut joined = std::mem::take(&mut self.tail);
        let before = joined.len();
        joined.extend_from_slice(piece);
        let found = joined.windows(self.needle.len()).position(|w| w == self.needle);
        let keep = self.needle.len().saturating_sub(1).min(joined.len());
        self.tail = joined[joined.len() - keep..].to_vec();
        found.map(|at| at.saturating_sub(before))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_bad_ones_are_refused() {
        let mut buf = Vec::new();
        send(&mut buf, Kind::Xl, b"abc").expect("send");
        send(&mut buf, Kind::Accepted, b"").expect("send");
        let mut r = &buf[..];
        assert_eq!(recv(&mut r).expect("recv"), Some((Kind::Xl, b"abc".to_vec())));
        assert_eq!(recv(&mut r).expect("recv"), Some((Kind::Accepted, vec![])));
        assert_eq!(recv(&mut r).expect("recv"), None, "a clean end");
        assert!(recv(&mut &buf[..4]).is_err(), "cut inside the header");
        assert!(recv(&mut &buf[..6]).is_err(), "cut inside the payload");
        assert!(recv(&mut &[9u8, 0, 0, 0, 0][..]).is_err(), "unknown kind");
        assert!(recv(&mut &[2u8, 0xff, 0xff, 0xff, 0xff][..]).is_err(), "too large");
    }

    #[test]
    fn a_hello_of_a_pv_guest_from_before_hvm_guests_still_parses() {
        let old = br#"{"protocol":"xvtpm-migrate 1","device_uuid":"d","vtpm_uuid":"v","tpm12":false,"xl_args":["migrate-receive"]}"#;
        let h: Hello = serde_json::from_slice(old).expect("parse");
        assert!(!h.hvm, "a PV guest's");
        let hvm = Hello { hvm: true, ..h };
        let back: Hello = serde_json::from_slice(&serde_json::to_vec(&hvm).expect("json")).expect("parse");
        assert_eq!(back, hvm);
    }

    #[test]
    fn a_message_is_found_across_pieces() {
        let stream = [&b"xxxx"[..], RECEIVER_READY, b"\0yy"].concat();
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let mut w = Watch::new(RECEIVER_READY);
                let pieces = [&stream[..cut], &stream[cut..cut2], &stream[cut2..]];
                let hits: Vec<(usize, usize)> =
                    pieces.iter().enumerate().filter_map(|(i, p)| w.feed(p).map(|at| (i, at))).collect();
                assert_eq!(hits.len(), 1, "cuts {cut} {cut2}: {hits:?}");
                let (i, at) = hits[0];
                let piece_start: usize = pieces[..i].iter().map(|p| p.len()).sum();
                let end = 4 + RECEIVER_READY.len() - 1;
                assert!(piece_start <= end && end < piece_start + pieces[i].len(), "found where it ends");
                assert_eq!(at, 4usize.saturating_sub(piece_start), "cuts {cut} {cut2}");
            }
        }
        assert_eq!(Watch::new(RECEIVER_READY).feed(b"domain received, ready"), None);
    }
}
