//! The arguments of a request payload, split as C xenstored splits them.

use super::XsResult;
use crate::XsErrno;

/// The NUL-terminated strings of a payload; bytes after the last NUL are ignored, as C
/// xenstored's `get_strings` does.
pub(super) fn strings(payload: &[u8]) -> Vec<&[u8]> {
    let mut parts: Vec<&[u8]> = payload.split(|b| *b == 0).collect();
    parts.pop();
    parts
}

/// The single argument of a payload that must be exactly one NUL-terminated string.
pub(super) fn onearg(payload: &[u8]) -> XsResult<&[u8]> {
    match payload.iter().position(|b| *b == 0) {
        Some(i) if i + 1 == payload.len() => Ok(&payload[..i]),
        _ => Err(XsErrno::EINVAL),
    }
}
