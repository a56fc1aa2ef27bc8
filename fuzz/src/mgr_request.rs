//! Target `mgr_request`: the vTPM manager protocol (`xvtpm_proto::mgr`), which the manager
//! decodes from vTPMs, socket clients and the operator, and its clients decode replies of.
//!
//! Input: one whole message (or reply body); every decoder gets it.
//!
//! Checked: a decoded request re-encodes to a message that decodes to the same request, with
//! the tag, ordinal and class the input had; a refusal prints (the manager logs it); a
//! decoded reply re-encodes to exactly the input; the reply bodies (VTPM_SHOW, GROUP_SHOW,
//! list pages, u32) re-encode to the bytes they were read from, and list pages hold exactly
//! the whole items there were.

use xvtpm_proto::mgr::{class_of, decode_u32, GroupShow, Malformed, Page, Reply, Request, VtpmShow, HEADER};
use xvtpm_proto::tpm;

/// Runs one input.
pub fn run(data: &[u8]) {
    request(data);
    reply(data);
    bodies(data);
}

fn request(data: &[u8]) {
    match Request::decode(data) {
        Ok(r) => {
            let h = tpm::Header::of(data).expect("a decoded request has a whole header");
            assert_eq!((r.tag(), r.ordinal()), (h.tag, h.code), "tag or ordinal changed");
            assert_eq!(class_of(h.tag, h.code), Some(r.class()), "class");
            let enc = r.encode();
            assert_eq!(tpm::Header::of(&enc).expect("encoded header").size as usize, enc.len());
            assert_eq!(Request::decode(&enc), Ok(r.clone()), "request round trip");
            assert_eq!(r.body(), enc[HEADER..], "body");
        }
        Err(e) => {
            let _ = e.to_string();
            match e {
                Malformed::Short { len } => assert!(len < HEADER && len == data.len()),
                Malformed::Size { claimed, len, .. } => assert!(claimed as usize != len && len == data.len()),
                Malformed::Ordinal { tag, ordinal } => assert_eq!(class_of(tag, ordinal), None),
                Malformed::Body { class, ordinal, .. } => {
                    let h = tpm::Header::of(data).expect("a body is refused only after its header");
                    assert_eq!((class_of(h.tag, h.code), ordinal), (Some(class), h.code));
                }
                Malformed::Tag(_) => {}
            }
        }
    }
}

fn reply(data: &[u8]) {
    if let Ok(r) = Reply::decode(data) {
        assert_eq!(r.encode(), data, "reply round trip");
        assert_eq!(r.body.len() + HEADER, data.len());
    }
}

fn bodies(data: &[u8]) {
    match VtpmShow::decode(data) {
        Ok(v) => {
            assert!(data.len() >= 12);
            assert_eq!(VtpmShow::decode(&v.encode()), Ok(v));
            assert_eq!(v.encode()[..4], data[..4], "group");
        }
        Err(_) => assert!(data.len() < 12),
    }
    match GroupShow::decode(data) {
        Ok(g) => assert_eq!(g.encode(), data[..20], "GROUP_SHOW round trip"),
        Err(_) => assert!(data.len() < 20),
    }
    page::<16>(data);
    page::<32>(data);
    match decode_u32(data) {
        Ok(v) => assert_eq!(v.to_be_bytes(), data[..4]),
        Err(_) => assert!(data.len() < 4),
    }
}

fn page<const N: usize>(data: &[u8]) {
    match Page::<N>::decode(data) {
        Ok(p) => {
            assert_eq!(p.items.len(), (data.len() - 4) / N, "items in a page");
            let enc = p.encode();
            assert_eq!(enc, data[..enc.len()], "page round trip");
            assert_eq!(Page::<N>::decode(&enc), Ok(p));
        }
        Err(_) => assert!(data.len() < 4),
    }
}
