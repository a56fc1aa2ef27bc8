//! The manager protocol, in Xen's framing: `tag u16 | size u32 | ordinal u32`, big-endian.
//! vTPM commands (tag 0x01C1) act for the calling vTPM, whose identity comes from the
//! transport (the device uuid libxl wrote in xenstore, or a Unix-socket client's BIND), never
//! from the payload. Management commands (tag 0x01C2) are served only to the admin socket.
//! Replies carry tag 0x01C4 (0x01C5 for errors of the dispatcher itself) and a status.

use sha2::{Digest, Sha256};

use crate::manager::Manager;
use crate::store::dev::BlockDev;
use crate::{uuid_str, BootHash, Error};

/// vTPM command tag.
pub const TAG_REQ: u16 = 0x01C1;
/// Management command tag.
pub const TAG_REQ2: u16 = 0x01C2;
/// Reply tag.
pub const TAG_RSP: u16 = 0x01C4;
/// Reply tag of dispatcher errors to management commands (Xen: request tag + 3).
pub const TAG_RSP2: u16 = 0x01C5;
/// Header size.
pub const HEADER: usize = 10;
/// Largest message.
pub const MAX_MESSAGE: usize = 4096;
/// Largest reply a page of a list may fill: tpmif's largest packet, so that lists page the
/// same over Xen (the admin device of a manager in its own domain) as over a Unix socket.
pub const MAX_REPLY: usize = 4088;

/// vTPM ordinals.
pub const SAVEHASHKEY: u32 = 1;
/// Returns the saved hash and key.
pub const LOADHASHKEY: u32 = 2;
/// The calling vTPM's boot hash: 20 bytes (Xen's TPM_DIGEST), the first 20 of its SHA-256
/// measurement.
pub const GET_BOOT_HASH: u32 = 3;
/// A hardware quote bound to the calling vTPM (TPM 2.0 or 1.2).
pub const GET_QUOTE: u32 = 4;
/// Management: the groups (count, then each group's number, from an optional 4-byte offset:
/// a page fills at most [`MAX_REPLY`]).
pub const GROUP_LIST: u32 = 0x0200_0101;
/// Management: create a group.
pub const GROUP_NEW: u32 = 0x0200_0102;
/// Management: delete an empty group.
pub const GROUP_DEL: u32 = 0x0200_0103;
/// Management: a group's uuid and number of vTPMs.
pub const GROUP_SHOW: u32 = 0x0200_0107;
/// Management: a group's vTPMs.
pub const VTPM_LIST: u32 = 0x0200_0201;
/// Management: one vTPM's group and whether it saved a key.
pub const VTPM_SHOW: u32 = 0x0200_0202;
/// Management: provision a vTPM.
pub const VTPM_NEW: u32 = 0x0200_0204;
/// Management: delete a vTPM.
pub const VTPM_DEL: u32 = 0x0200_0205;
/// Ours: a Unix-socket client names its vTPM (uuid) and proves it may act for it (token).
pub const BIND: u32 = 0x0200_0401;
/// Ours, management: approve a boot hash for a group (group u32 | hash[32]); replies u32 1
/// if newly approved, 0 if it was already.
pub const GROUP_APPROVE: u32 = 0x0200_0402;
/// Ours, management: withdraw an approval (group u32 | hash[32]); replies u32 1 if it was
/// approved, 0 if not.
pub const GROUP_REVOKE: u32 = 0x0200_0403;
/// Ours, management: a group's approved boot hashes (group u32); replies count u32, then
/// the hashes.
pub const GROUP_APPROVED: u32 = 0x0200_0404;
/// Ours, management: this manager's migration public key (65 bytes).
pub const MIGRATION_KEY: u32 = 0x0200_0405;
/// Ours, management: export a vTPM (uuid[16] | the destination's migration key[65]); replies
/// the bundle, and the vTPM is frozen here.
pub const VTPM_EXPORT: u32 = 0x0200_0406;
/// Ours, management: import a bundle (group u32 | bundle); replies the vTPM's uuid.
pub const VTPM_IMPORT: u32 = 0x0200_0407;

/// Status codes (TPM 1.2 values, as Xen's manager uses them).
pub mod status {
    /// Success.
    pub const SUCCESS: u32 = 0;
    /// Not allowed.
    pub const AUTHFAIL: u32 = 1;
    /// Management: no such vTPM or group.
    pub const BADINDEX: u32 = 2;
    /// Unknown vTPM (vTPM commands), malformed body.
    pub const BAD_PARAMETER: u32 = 3;
    /// Ours, management: the vTPM exists already.
    pub const EXISTS: u32 = 0x41;
    /// Internal failure (store, hardware TPM).
    pub const FAIL: u32 = 9;
    /// Not now: the vTPM is over its rate (TPM 1.2's TPM_RETRY).
    pub const RETRY: u32 = 0x800;
    /// Unknown ordinal.
    pub const BAD_ORDINAL: u32 = 10;
    /// Wrong size field.
    pub const SIZE: u32 = 23;
    /// Unknown tag.
    pub const BADTAG: u32 = 30;
}

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A vTPM whose identity the transport established (Xen: its device's uuid).
    Vtpm([u8; 16]),
    /// A Unix-socket client, bound to a vTPM once BIND succeeded: its uuid and the SHA-256 of
    /// the token it presented, checked again at every command (the vTPM may have been deleted
    /// and provisioned anew with another token since).
    Socket(Option<([u8; 16], [u8; 32])>),
    /// The admin socket.
    Admin,
}

/// A reply.
pub fn reply(tag: u16, status: u32, body: &[u8]) -> Vec<u8> {
    let mut r = tag.to_be_bytes().to_vec();
    r.extend_from_slice(&((HEADER + body.len()) as u32).to_be_bytes());
    r.extend_from_slice(&status.to_be_bytes());
    r.extend_from_slice(body);
    r
}

/// A request.
pub fn request(tag: u16, ordinal: u32, body: &[u8]) -> Vec<u8> {
    reply(tag, ordinal, body)
}

/// A reply's status and body; `None` unless its size field is its length.
pub fn split_reply(r: &[u8]) -> Option<(u32, Vec<u8>)> {
    let (size, status) = (be32(r, 2)?, be32(r, 6)?);
    (size as usize == r.len()).then(|| (status, r[HEADER..].to_vec()))
}

/// A new random (version 4) uuid.
pub fn random_uuid() -> [u8; 16] {
    let mut u: [u8; 16] = rand::random();
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}

/// Parses a uuid in its text form.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(u)
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn status_of(e: &Error) -> u32 {
    match e {
        Error::UnknownVtpm(_) | Error::NoSavedState(_) | Error::Protocol(_) => status::BAD_PARAMETER,
        Error::NotAuthorized(_) => status::AUTHFAIL,
        Error::Busy(_) => status::RETRY,
        Error::Exists(_) => status::EXISTS,
        _ => status::FAIL,
    }
}

/// The vTPM `caller` acts for: the transport's identity, or a socket's bound vTPM whose token
/// still holds (it may have been deleted and provisioned anew since BIND). `None`: refuse.
fn acting_for<D: BlockDev>(mgr: &Manager<D>, caller: &mut Caller) -> Option<[u8; 16]> {
    match caller {
        Caller::Vtpm(u) => Some(*u),
        Caller::Socket(Some((u, digest))) => match mgr.authorize_digest(u, digest) {
            Ok(()) => Some(*u),
            Err(e) => {
                log::warn!("{}: no longer authorized: {e}", uuid_str(u));
                *caller = Caller::Socket(None);
                None
            }
        },
        _ => {
            log::warn!("{caller:?}: vTPM command before naming a vTPM (BIND)");
            None
        }
    }
}

/// Group number and boot hash of GROUP_APPROVE and GROUP_REVOKE.
fn group_and_hash(body: &[u8]) -> Result<(u32, [u8; 32]), Error> {
    match (be32(body, 0), body.get(4..).and_then(|h| <[u8; 32]>::try_from(h).ok())) {
        (Some(g), Some(h)) => Ok((g, h)),
        _ => Err(Error::Protocol("a group number and a 32-byte boot hash expected".into())),
    }
}

/// Handles one message from `caller`, whose boot hash the transport could not measure.
pub fn handle<D: BlockDev>(mgr: &mut Manager<D>, caller: &mut Caller, msg: &[u8]) -> Vec<u8> {
    handle_measured(mgr, caller, None, msg)
}

/// Handles one message from `caller`, measured by its transport as `boot` (`None`: not
/// measured); the reply. Never panics on any input.
pub fn handle_measured<D: BlockDev>(
    mgr: &mut Manager<D>,
    caller: &mut Caller,
    boot: Option<&BootHash>,
    msg: &[u8],
) -> Vec<u8> {
    let (Some(tag), Some(size), Some(ordinal)) =
        (msg.get(..2).map(|t| u16::from_be_bytes([t[0], t[1]])), be32(msg, 2), be32(msg, 6))
    else {
        log::warn!("{caller:?}: message of {} bytes, shorter than a header", msg.len());
        return reply(TAG_RSP, status::SIZE, &[]);
    };
    let err_tag = if tag == TAG_REQ2 { TAG_RSP2 } else { TAG_RSP };
    if size as usize != msg.len() {
        log::warn!("{caller:?}: size field {size} but {} bytes", msg.len());
        return reply(err_tag, status::SIZE, &[]);
    }
    let body = &msg[HEADER..];
    let r = match (tag, ordinal) {
        (TAG_REQ, SAVEHASHKEY | LOADHASHKEY) => {
            let Some(uuid) = acting_for(mgr, caller) else { return reply(TAG_RSP, status::AUTHFAIL, &[]) };
            mgr.check_boot(&uuid, boot).and_then(|()| match ordinal {
                SAVEHASHKEY => mgr.save(&uuid, body).map(|()| Vec::new()),
                _ => mgr.load(&uuid),
            })
        }
        (TAG_REQ, GET_QUOTE) => {
            let Some(uuid) = acting_for(mgr, caller) else { return reply(TAG_RSP, status::AUTHFAIL, &[]) };
            // nonce[20] | TPM_PCR_SELECTION (u16 size, bitmap) [| u32 flags, ignored].
            let n = body.get(20..22).map(|s| u16::from_be_bytes([s[0], s[1]]) as usize);
            mgr.check_boot(&uuid, boot).and_then(|()| match (body.get(..20), n.and_then(|n| body.get(22..22 + n))) {
                (Some(nonce), Some(bits)) if bits.len() <= 3 => {
                    let pcrs: Vec<u8> = (0..24u8)
                        .filter(|p| bits.get((p / 8) as usize).is_some_and(|b| b & (1 << (p % 8)) != 0))
                        .collect();
                    mgr.quote(&uuid, boot, nonce, &pcrs)
                }
                _ => Err(Error::Protocol("GET_QUOTE: nonce[20] and a PCR selection of up to 3 bytes".into())),
            })
        }
        (TAG_REQ, GET_BOOT_HASH) => {
            if acting_for(mgr, caller).is_none() {
                return reply(TAG_RSP, status::AUTHFAIL, &[]);
            }
            // Xen's reply is a TPM_DIGEST (20 bytes): the first 20 of our SHA-256.
            match boot {
                Some(h) if body.is_empty() => Ok(h[..20].to_vec()),
                Some(_) => Err(Error::Protocol("GET_BOOT_HASH takes no parameters".into())),
                None => Err(Error::Protocol("this vTPM could not be measured; it has no boot hash".into())),
            }
        }
        (TAG_REQ2, BIND) if matches!(caller, Caller::Socket(_)) => {
            let Some(uuid) = body.get(..16).and_then(|u| <[u8; 16]>::try_from(u).ok()) else {
                return reply(TAG_RSP, status::BAD_PARAMETER, &[]);
            };
            match mgr.authorize(&uuid, &body[16..]) {
                Ok(()) => {
                    *caller = Caller::Socket(Some((uuid, Sha256::digest(&body[16..]).into())));
                    Ok(Vec::new())
                }
                Err(e) => {
                    // A client that failed to bind acts for no vTPM, and learns nothing about
                    // which uuids exist: unknown and wrong token answer alike.
                    *caller = Caller::Socket(None);
                    log::warn!("{caller:?}: BIND refused: {e}");
                    return reply(TAG_RSP, status::AUTHFAIL, &[]);
                }
            }
        }
        (TAG_REQ2, _) if *caller != Caller::Admin => {
            log::warn!("{caller:?}: management ordinal {ordinal:#x} refused outside the admin socket");
            return reply(TAG_RSP2, status::AUTHFAIL, &[]);
        }
        (TAG_REQ2, VTPM_NEW) => {
            let group = be32(body, 0).unwrap_or_default();
            let uuid = match body.len() {
                4 => Some(random_uuid()),
                20 | 52 => body[4..20].try_into().ok(),
                _ => None,
            };
            match uuid {
                Some(u) => mgr.provision(u, group, body.get(20..52)).map(|()| u.to_vec()),
                None => Err(Error::Protocol(format!("VTPM_NEW with a {}-byte body", body.len()))),
            }
        }
        (TAG_REQ2, VTPM_SHOW) => match <[u8; 16]>::try_from(body) {
            Ok(u) => mgr.vtpm(&u).and_then(|r| match r {
                Some(r) => Ok([
                    r.group.to_be_bytes(),
                    u32::from(r.has_key()).to_be_bytes(),
                    u32::from(r.is_exported()).to_be_bytes(),
                ]
                .concat()),
                None => Err(Error::UnknownVtpm(uuid_str(&u))),
            }),
            Err(_) => Err(Error::Protocol("VTPM_SHOW needs a 16-byte uuid".into())),
        },
        (TAG_REQ2, VTPM_DEL) => match body.try_into() {
            Ok(u) => mgr.delete(&u).and_then(|found| match found {
                true => Ok(Vec::new()),
                false => Err(Error::UnknownVtpm(uuid_str(&u))),
            }),
            Err(_) => Err(Error::Protocol("VTPM_DEL needs a 16-byte uuid".into())),
        },
        (TAG_REQ2, VTPM_LIST) => {
            let (group, offset) = (be32(body, 0).unwrap_or_default(), be32(body, 4).unwrap_or_default() as usize);
            mgr.list().map(|recs| {
                let mine: Vec<_> = recs.iter().filter(|r| r.group == group).collect();
                let mut out = (mine.len() as u32).to_be_bytes().to_vec();
                for r in mine.iter().skip(offset).take((MAX_REPLY - HEADER - 4) / 16) {
                    out.extend_from_slice(&r.uuid);
                }
                out
            })
        }
        // The body is empty (from the first) or a 4-byte offset: a page of the list.
        (TAG_REQ2, GROUP_LIST) => mgr.groups().map(|gs| {
            let offset = be32(body, 0).unwrap_or_default() as usize;
            let mut out = (gs.len() as u32).to_be_bytes().to_vec();
            for (n, ..) in gs.iter().skip(offset).take((MAX_REPLY - HEADER - 4) / 4) {
                out.extend_from_slice(&n.to_be_bytes());
            }
            out
        }),
        (TAG_REQ2, GROUP_APPROVE) => {
            group_and_hash(body).and_then(|(g, h)| mgr.approve(g, &h)).map(|n| u32::from(n).to_be_bytes().to_vec())
        }
        (TAG_REQ2, GROUP_REVOKE) => {
            group_and_hash(body).and_then(|(g, h)| mgr.revoke(g, &h)).map(|n| u32::from(n).to_be_bytes().to_vec())
        }
        // The group, and optionally an offset: a page of its approved hashes.
        (TAG_REQ2, GROUP_APPROVED) => match be32(body, 0) {
            Some(n) if body.len() == 4 || body.len() == 8 => mgr.approved(n).map(|hs| {
                let offset = be32(body, 4).unwrap_or_default() as usize;
                let mut out = (hs.len() as u32).to_be_bytes().to_vec();
                for h in hs.iter().skip(offset).take((MAX_REPLY - HEADER - 4) / 32) {
                    out.extend_from_slice(h);
                }
                out
            }),
            _ => Err(Error::Protocol("GROUP_APPROVED needs a group number".into())),
        },
        (TAG_REQ2, MIGRATION_KEY) => Ok(mgr.migration_key().public().to_vec()),
        (TAG_REQ2, VTPM_EXPORT) => match body.get(..16).and_then(|u| <[u8; 16]>::try_from(u).ok()) {
            Some(u) => mgr.export(&u, &body[16..]),
            None => Err(Error::Protocol("VTPM_EXPORT needs a uuid and a migration key".into())),
        },
        (TAG_REQ2, VTPM_IMPORT) => match be32(body, 0) {
            Some(group) => mgr.import(&body[4..], group).map(|u| u.to_vec()),
            None => Err(Error::Protocol("VTPM_IMPORT needs a group and a bundle".into())),
        },
        (TAG_REQ2, GROUP_NEW) => mgr.new_group().map(|(n, u)| [&n.to_be_bytes()[..], &u].concat()),
        (TAG_REQ2, GROUP_DEL) => match be32(body, 0) {
            Some(n) if body.len() == 4 => mgr.delete_group(n).map(|()| Vec::new()),
            _ => Err(Error::Protocol("GROUP_DEL needs a group number".into())),
        },
        (TAG_REQ2, GROUP_SHOW) => match be32(body, 0) {
            Some(n) if body.len() == 4 => mgr.groups().and_then(|gs| match gs.into_iter().find(|g| g.0 == n) {
                Some((_, uuid, count)) => Ok([&uuid[..], &(count as u32).to_be_bytes()].concat()),
                None => Err(Error::NotFound(format!("group {n}"))),
            }),
            _ => Err(Error::Protocol("GROUP_SHOW needs a group number".into())),
        },
        (TAG_REQ | TAG_REQ2, _) => {
            log::warn!("{caller:?}: unknown ordinal {ordinal:#x}");
            return reply(err_tag, status::BAD_ORDINAL, &[]);
        }
        _ => {
            log::warn!("{caller:?}: unknown tag {tag:#x}");
            return reply(TAG_RSP, status::BADTAG, &[]);
        }
    };
    match r {
        Ok(body) => reply(TAG_RSP, status::SUCCESS, &body),
        Err(e) => {
            log::warn!("{caller:?}: ordinal {ordinal:#x}: {e}");
            // Management tells "no such vTPM or group" apart, for the operator's tool.
            let st = match (&e, tag) {
                (Error::UnknownVtpm(_), TAG_REQ2) if ordinal != BIND => status::BADINDEX,
                (Error::NotFound(_), _) => status::BADINDEX,
                _ => status_of(&e),
            };
            reply(TAG_RSP, st, &[])
        }
    }
}
