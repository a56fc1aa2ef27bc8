//! The tpmif v2 shared page (`xen/include/public/io/tpmif.h`), as Linux's xen-tpmfront and
//! mini-os use it:
//!
//! ```text
//! u32 length @0 | u8 state @4 | u8 locality @5 | u8 pad @6 | u8 nr_extra_pages @7
//! u32 extra_pages[nr_extra_pages] @8 | packet @ 8 + 4 * nr_extra_pages
//! ```
//!
//! (tpmif.h's comment says the packet starts at 16 + 4n; both real implementations use 8 + 4n.)
//! The frontend only ever writes SUBMIT or CANCEL, the backend only IDLE or FINISH. Everything
//! the peer wrote is validated here: invalid values are errors, never panics.

use std::sync::atomic::{fence, Ordering};

use crate::{Error, Result, SharedPage, PAGE_SIZE};

const OFF_LENGTH: usize = 0;
const OFF_STATE: usize = 4;
const OFF_LOCALITY: usize = 5;
const OFF_NR_EXTRA: usize = 7;
/// Offset of the packet when no extra pages are used.
pub const HEADER_LEN: usize = 8;
/// Largest packet that fits the shared page (no extra pages): 4088 bytes.
pub const MAX_PACKET: usize = PAGE_SIZE - HEADER_LEN;

/// `enum vtpm_shared_page_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum TpmifState {
    /// No contents; vTPM idle; also "cancel complete".
    Idle = 0,
    /// Request ready; vTPM working.
    Submit = 1,
    /// Response ready; vTPM idle.
    Finish = 2,
    /// Cancel requested; vTPM working.
    Cancel = 3,
}

impl TpmifState {
    /// Parses the state byte.
    pub fn from_u8(v: u8) -> Result<Self> {
        Ok(match v {
            0 => TpmifState::Idle,
            1 => TpmifState::Submit,
            2 => TpmifState::Finish,
            3 => TpmifState::Cancel,
            other => return Err(Error::Tpmif(format!("invalid state value {other}"))),
        })
    }
}

/// A bounds-checked view of a tpmif shared page.
#[derive(Debug, Clone, Copy)]
pub struct Tpmif<'a> {
    page: &'a SharedPage,
}

impl<'a> Tpmif<'a> {
    /// Views `page` as a tpmif page.
    pub fn new(page: &'a SharedPage) -> Self {
        Tpmif { page }
    }

    /// Current state, read with acquire ordering so that the payload written before it is
    /// visible afterwards.
    pub fn state(&self) -> Result<TpmifState> {
        let raw = self.page.load_u8(OFF_STATE, Ordering::Acquire)?;
        TpmifState::from_u8(raw)
    }

    /// The raw state byte (for diagnostics of invalid values).
    pub fn raw_state(&self) -> Result<u8> {
        self.page.load_u8(OFF_STATE, Ordering::Acquire)
    }

    /// Publishes a new state after everything written before it (release ordering).
    pub fn set_state(&self, state: TpmifState) -> Result<()> {
        fence(Ordering::Release);
        self.page.store_u8(OFF_STATE, state as u8, Ordering::Release)
    }

    /// The locality byte of the current request.
    pub fn locality(&self) -> Result<u8> {
        self.page.load_u8(OFF_LOCALITY, Ordering::Relaxed)
    }

    /// Where the packet starts (8 + 4 * nr_extra_pages) and how many bytes fit from there.
    pub fn packet_window(&self) -> Result<(usize, usize)> {
        let n = self.page.load_u8(OFF_NR_EXTRA, Ordering::Relaxed)? as usize;
        let off = HEADER_LEN + 4 * n;
        Ok((off, PAGE_SIZE - off))
    }

    /// Copies the packet out of the page into `buf` (cleared first): the length field is read
    /// once, checked against the room after the header, and never trusted beyond that.
    pub fn read_packet(&self, buf: &mut Vec<u8>) -> Result<()> {
        let (off, room) = self.packet_window()?;
        let len = self.page.load_u32(OFF_LENGTH, Ordering::Relaxed)? as usize;
        if len > room {
            return Err(Error::Tpmif(format!("length {len} exceeds the {room} bytes after the header")));
        }
        buf.clear();
        buf.resize(len, 0);
        self.page.read_bytes(off, buf)
    }

    /// Writes a packet and its length (not the state). Errors if it does not fit.
    pub fn write_packet(&self, data: &[u8]) -> Result<()> {
        let (off, room) = self.packet_window()?;
        if data.len() > room {
            return Err(Error::Tpmif(format!("packet of {} bytes exceeds the {room} bytes available", data.len())));
        }
        self.page.write_bytes(off, data)?;
        self.page.store_u32(OFF_LENGTH, data.len() as u32, Ordering::Relaxed)
    }

    /// Frontend side: writes a request at `locality` with no extra pages (not the state).
    pub fn write_request(&self, locality: u8, data: &[u8]) -> Result<()> {
        if data.len() > MAX_PACKET {
            return Err(Error::Tpmif(format!("command of {} bytes exceeds the maximum of {MAX_PACKET}", data.len())));
        }
        self.page.store_u8(OFF_NR_EXTRA, 0, Ordering::Relaxed)?;
        self.page.store_u8(OFF_LOCALITY, locality, Ordering::Relaxed)?;
        self.write_packet(data)
    }

    /// Writes the raw header fields; for tests that play a misbehaving peer.
    pub fn write_raw_header(&self, length: u32, state: u8, locality: u8, nr_extra_pages: u8) -> Result<()> {
        self.page.store_u32(OFF_LENGTH, length, Ordering::Relaxed)?;
        self.page.store_u8(OFF_LOCALITY, locality, Ordering::Relaxed)?;
        self.page.store_u8(OFF_NR_EXTRA, nr_extra_pages, Ordering::Relaxed)?;
        fence(Ordering::Release);
        self.page.store_u8(OFF_STATE, state, Ordering::Release)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_linux_and_minios() {
        let page = SharedPage::anonymous().expect("page");
        let t = Tpmif::new(&page);
        t.write_request(2, &[0xAA, 0xBB, 0xCC]).expect("write");
        t.set_state(TpmifState::Submit).expect("state");
        let mut raw = [0u8; 12];
        page.read_bytes(0, &mut raw).expect("read");
        assert_eq!(&raw[0..4], &3u32.to_ne_bytes(), "length @0");
        assert_eq!(raw[4], 1, "state @4");
        assert_eq!(raw[5], 2, "locality @5");
        assert_eq!(raw[7], 0, "nr_extra_pages @7");
        assert_eq!(&raw[8..11], &[0xAA, 0xBB, 0xCC], "packet @8");
    }

    #[test]
    fn extra_pages_move_the_packet() {
        let page = SharedPage::anonymous().expect("page");
        let t = Tpmif::new(&page);
        t.write_raw_header(0, 0, 0, 3).expect("hdr");
        assert_eq!(t.packet_window().expect("window"), (20, PAGE_SIZE - 20));
        t.write_raw_header(0, 0, 0, 255).expect("hdr");
        assert_eq!(t.packet_window().expect("window"), (8 + 1020, PAGE_SIZE - 1028));
    }

    #[test]
    fn hostile_values_are_errors() {
        let page = SharedPage::anonymous().expect("page");
        let t = Tpmif::new(&page);
        let mut buf = Vec::new();
        for len in [MAX_PACKET as u32 + 1, 4096, u32::MAX] {
            t.write_raw_header(len, 1, 0, 0).expect("hdr");
            assert!(t.read_packet(&mut buf).is_err(), "length {len}");
        }
        t.write_raw_header(MAX_PACKET as u32, 1, 0, 0).expect("hdr");
        t.read_packet(&mut buf).expect("max fits");
        assert_eq!(buf.len(), MAX_PACKET);
        t.write_raw_header(4000, 1, 0, 200).expect("hdr");
        assert!(t.read_packet(&mut buf).is_err(), "extra pages shrink the room");
        for s in [4u8, 0x7f, 0xff] {
            t.write_raw_header(0, s, 0, 0).expect("hdr");
            assert!(t.state().is_err());
        }
        assert!(t.write_request(0, &vec![0; MAX_PACKET + 1]).is_err());
        t.write_request(0, &vec![0x5a; MAX_PACKET]).expect("4088 bytes fit");
    }
}
