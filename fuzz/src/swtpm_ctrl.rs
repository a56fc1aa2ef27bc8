//! Target `swtpm_ctrl`: swtpm's control-channel codec (`xvtpm_proto::ctrl`), which the vTPM's
//! socket server decodes from any local client and the hardware-TPM driver decodes from
//! swtpm.
//!
//! Input: a control byte stream (command code, then body), also handed whole to every
//! response decoder.
//!
//! Checked: `message_len_needed` is at least 4 and at most `CTRL_INPUT_SIZE`, stable once
//! that many bytes are there, and a server that reads until it is satisfied cuts the stream
//! into the same messages however the bytes trickle in; every request and response decoder
//! accepts exactly the lengths its struct needs and re-encodes to the bytes it read.

use xvtpm_proto::ctrl::*;

/// Runs one input.
pub fn run(data: &[u8]) {
    framing(data);
    if let Some(code) = xvtpm_proto::tpm::be32(data, 0) {
        if let Some(c) = CtrlCmd::from_code(code) {
            assert_eq!(c.code(), code);
            assert!(c.name().starts_with("CMD_"));
        }
        requests(&data[4..]);
    }
    responses(data);
}

/// How the server cuts a stream into messages: read until `message_len_needed` is met.
fn framing(stream: &[u8]) {
    let needed = message_len_needed(stream);
    assert!((4..=CTRL_INPUT_SIZE).contains(&needed), "needs {needed} bytes");
    if stream.len() >= needed {
        assert_eq!(message_len_needed(&stream[..needed]), needed, "the need changed once met");
    }
    // Whole stream at once, and byte by byte: the same messages.
    let whole = cut(stream, stream.len().max(1));
    let trickled = cut(stream, 1);
    assert_eq!(whole, trickled, "framing depends on how the bytes arrive");
}

/// The message lengths a server reading `step` bytes at a time (never past what it needs)
/// takes off `stream`.
fn cut(stream: &[u8], step: usize) -> Vec<usize> {
    let mut out = Vec::new();
    let mut rest = stream;
    while !rest.is_empty() {
        let mut have = 0;
        loop {
            let need = message_len_needed(&rest[..have]);
            if have >= need {
                break;
            }
            if have == rest.len() {
                return out;
            }
            have = (have + step).min(need).min(rest.len());
        }
        out.push(have);
        rest = &rest[have..];
    }
    out
}

fn requests(body: &[u8]) {
    match InitRequest::decode(body) {
        Some(r) => assert_eq!(r.encode(), body, "CMD_INIT"),
        None => assert_ne!(body.len(), PTM_INIT_SIZE),
    }
    match GetStateRequest::decode(body) {
        Some(r) => assert_eq!(r.encode(), body[..PTM_GETSTATE_REQ_SIZE], "CMD_GET_STATEBLOB"),
        None => assert!(body.len() < PTM_GETSTATE_REQ_SIZE),
    }
    match SetStateRequest::decode(body) {
        Some(r) => {
            assert_eq!(r.encode(), body[..PTM_SETSTATE_REQ_HDR_SIZE], "CMD_SET_STATEBLOB");
            // What message_len_needed waits for: the header and the blob, capped.
            let mut msg = CtrlCmd::SetStateBlob.code().to_be_bytes().to_vec();
            msg.extend_from_slice(body);
            let want = (4 + PTM_SETSTATE_REQ_HDR_SIZE).saturating_add(r.length as usize).min(CTRL_INPUT_SIZE);
            assert_eq!(message_len_needed(&msg), want);
        }
        None => assert!(body.len() < PTM_SETSTATE_REQ_HDR_SIZE),
    }
    match SetBufferSizeRequest::decode(body) {
        Some(r) => assert_eq!(r.encode(), body[..PTM_SETBUFFERSIZE_REQ_SIZE], "CMD_SET_BUFFERSIZE"),
        None => assert!(body.len() < PTM_SETBUFFERSIZE_REQ_SIZE),
    }
    match GetInfoRequest::decode(body) {
        Some(r) => {
            assert_eq!(r.encode()[..12], body[..12], "CMD_GET_INFO");
            assert_eq!(GetInfoRequest::decode(&r.encode()), Some(r));
        }
        None => assert!(body.len() < 12),
    }
}

fn responses(b: &[u8]) {
    match decode_result(b) {
        Some(rc) => assert_eq!(encode_result(rc), b[..PTM_RES_SIZE]),
        None => assert!(b.len() < PTM_RES_SIZE),
    }
    match decode_caps(b) {
        Some(c) => assert_eq!(encode_caps(c), b[..PTM_CAP_SIZE]),
        None => assert!(b.len() < PTM_CAP_SIZE),
    }
    match EstResponse::decode(b) {
        Some(r) => {
            assert!(b.len() > PTM_EST_RESP_BIT_OFFSET);
            assert_eq!(EstResponse::decode(&r.encode()), Some(r));
            assert_eq!((r.tpm_result.to_be_bytes(), r.bit), ([b[0], b[1], b[2], b[3]], b[PTM_EST_RESP_BIT_OFFSET]));
        }
        None => assert!(b.len() <= PTM_EST_RESP_BIT_OFFSET),
    }
    match GetStateResponse::decode(b) {
        Some(r) => assert_eq!(r.encode(), b[..PTM_GETSTATE_RESP_HDR_SIZE]),
        None => assert!(b.len() < PTM_GETSTATE_RESP_HDR_SIZE),
    }
    match SetBufferSizeResponse::decode(b) {
        Some(r) => assert_eq!(r.encode(), b[..PTM_SETBUFFERSIZE_RESP_SIZE]),
        None => assert!(b.len() < PTM_SETBUFFERSIZE_RESP_SIZE),
    }
}
