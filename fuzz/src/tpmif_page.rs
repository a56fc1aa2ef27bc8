//! Target `tpmif_page`: the tpmif v2 shared page (`xvtpm_xen::tpmif`) as the backend's worker
//! serves it, over a real (anonymous) `SharedPage` whose bytes are the fuzzer's: the guest
//! owns that page and may write anything into it.
//!
//! Input: the page's first bytes (the rest of the page is zero). The pad byte at offset 6,
//! which the protocol leaves unused, also picks the length of the response the harness writes
//! back: the room after the header plus or minus up to 128 bytes, so both sides of the bound
//! are tried.
//!
//! Checked: the state, locality and packet window are exactly what the raw bytes say; a
//! packet is read only if its length fits the room after `8 + 4 * nr_extra_pages`, and then
//! it is those bytes; a response is written only if it fits, reads back unchanged and leaves
//! the header (but its length) alone; a rejected write leaves the whole page untouched; the
//! frontend's `write_request` round-trips through `read_packet`.

use xvtpm_xen::tpmif::{Tpmif, TpmifState, HEADER_LEN, MAX_PACKET};
use xvtpm_xen::{SharedPage, PAGE_SIZE};

/// One page per thread (libFuzzer runs one; `cargo test` several), mapped once.
fn page() -> &'static SharedPage {
    thread_local! {
        static PAGE: &'static SharedPage = Box::leak(Box::new(SharedPage::anonymous().expect("an anonymous page")));
    }
    PAGE.with(|p| *p)
}

fn snapshot(page: &SharedPage) -> Vec<u8> {
    let mut all = vec![0u8; PAGE_SIZE];
    page.read_bytes(0, &mut all).expect("the whole page is in bounds");
    all
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let page = page();
    let mut raw = vec![0u8; PAGE_SIZE];
    let n = data.len().min(PAGE_SIZE);
    raw[..n].copy_from_slice(&data[..n]);
    page.write_bytes(0, &raw).expect("a page-sized write");
    let t = Tpmif::new(page);

    // The state byte: four valid values, anything else an error (never a panic).
    let raw_state = raw[4];
    match t.state() {
        Ok(s) => assert_eq!(s as u8, raw_state, "state decoded to another value"),
        Err(_) => assert!(raw_state > 3, "valid state {raw_state} refused"),
    }
    assert_eq!(t.raw_state().expect("state byte"), raw_state);
    assert_eq!(t.locality().expect("locality byte"), raw[5]);

    // Where the packet lies.
    let nr_extra = usize::from(raw[7]);
    let (off, room) = t.packet_window().expect("the window always lies within the page");
    assert_eq!(off, HEADER_LEN + 4 * nr_extra, "packet offset");
    assert_eq!(off + room, PAGE_SIZE, "room after the header");

    // The backend reads the request: its length is checked against the room, once.
    let len = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
    let mut buf = vec![0xEE; 7];
    match t.read_packet(&mut buf) {
        Ok(()) => {
            assert!(len <= room, "length {len} accepted with only {room} bytes of room");
            assert_eq!(buf, &raw[off..off + len], "packet bytes");
        }
        Err(_) => assert!(len > room, "length {len} refused with {room} bytes of room"),
    }
    assert_eq!(snapshot(page), raw, "reading changed the page");

    // The backend writes a response of a length around the room.
    let rsp_len = (room as isize + isize::from(raw[6] as i8)).max(0) as usize;
    let rsp: Vec<u8> = (0..rsp_len).map(|i| (i as u8) ^ 0x5A).collect();
    match t.write_packet(&rsp) {
        Ok(()) => {
            assert!(rsp_len <= room, "response of {rsp_len} bytes written into {room} bytes");
            let after = snapshot(page);
            assert_eq!(&after[0..4], &(rsp_len as u32).to_ne_bytes(), "length field");
            assert_eq!(&after[4..off], &raw[4..off], "header or extra-page list changed");
            assert_eq!(&after[off..off + rsp_len], &rsp[..], "response bytes");
            assert_eq!(&after[off + rsp_len..], &raw[off + rsp_len..], "bytes after the response changed");
            let mut back = Vec::new();
            t.read_packet(&mut back).expect("a response just written reads back");
            assert_eq!(back, rsp);
        }
        Err(_) => {
            assert!(rsp_len > room, "response of {rsp_len} bytes refused with {room} bytes of room");
            assert_eq!(snapshot(page), raw, "a refused response changed the page");
        }
    }

    // Publishing a state is what the next read sees.
    for s in [TpmifState::Finish, TpmifState::Idle, TpmifState::Submit, TpmifState::Cancel] {
        t.set_state(s).expect("state store");
        assert_eq!(t.state().expect("state just set"), s);
    }

    // The frontend's side: a request of the input's own bytes (one past the maximum at most).
    let req = &data[..data.len().min(MAX_PACKET + 1)];
    let before = snapshot(page);
    match t.write_request(raw[5], req) {
        Ok(()) => {
            assert!(req.len() <= MAX_PACKET, "request of {} bytes accepted", req.len());
            assert_eq!(t.packet_window().expect("window"), (HEADER_LEN, MAX_PACKET));
            assert_eq!(t.locality().expect("locality"), raw[5]);
            let mut back = Vec::new();
            t.read_packet(&mut back).expect("a request just written reads back");
            assert_eq!(back, req);
        }
        Err(_) => {
            assert!(req.len() > MAX_PACKET, "request of {} bytes refused", req.len());
            assert_eq!(snapshot(page), before, "a refused request changed the page");
        }
    }

    // The raw header writer used by hostile-peer tests puts every field where the reader
    // finds it.
    t.write_raw_header(len as u32, raw_state, raw[5], raw[7]).expect("raw header");
    assert_eq!(t.raw_state().expect("state"), raw_state);
    assert_eq!(t.locality().expect("locality"), raw[5]);
    assert_eq!(t.packet_window().expect("window").0, off);
}
