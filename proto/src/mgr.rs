//! The vTPM manager protocol, in Xen's framing (the TPM header: `tag u16 | size u32 |
//! ordinal u32`, big-endian). vTPM commands (tag 0x01C1) act for the calling vTPM, whose
//! identity comes from the transport, never from the payload; management commands (tag
//! 0x01C2) are for the operator. Replies carry tag 0x01C4 (0x01C5 for the dispatcher's own
//! refusals of management commands) and a status where the TPM header has its code.
//!
//! [`Request::decode`] sorts every message into a typed [`Request`] or the reason it is not
//! one ([`Malformed`]); [`Reply`] frames the answer. The body layouts of replies are here too
//! ([`VtpmShow`], [`GroupShow`], [`Page`]), so the manager and its clients share one codec.

use crate::tpm::{self, Reader, HEADER_SIZE};
use crate::{Error, Secret, Uuid};

/// vTPM command tag.
pub const TAG_REQ: u16 = 0x01C1;
/// Management command tag.
pub const TAG_REQ2: u16 = 0x01C2;
/// Reply tag.
pub const TAG_RSP: u16 = 0x01C4;
/// Reply tag of the dispatcher's refusals of management commands (Xen: request tag + 3).
pub const TAG_RSP2: u16 = 0x01C5;
/// Header size.
pub const HEADER: usize = HEADER_SIZE;
/// Largest message.
pub const MAX_MESSAGE: usize = 4096;
/// Largest reply a page of a list may fill: tpmif's largest packet, so that lists page the
/// same over Xen (the admin device of a manager in its own domain) as over a Unix socket.
pub const MAX_REPLY: usize = 4088;

/// Ordinals.
pub mod ord {
    /// vTPM: store the state's hash and key (SHA-256[32] | key[32]; Xen's 52-byte form too).
    pub const SAVEHASHKEY: u32 = 1;
    /// vTPM: the saved hash and key.
    pub const LOADHASHKEY: u32 = 2;
    /// vTPM: the calling vTPM's boot hash: 20 bytes (Xen's TPM_DIGEST), the first 20 of its
    /// SHA-256 measurement.
    pub const GET_BOOT_HASH: u32 = 3;
    /// vTPM: a hardware quote bound to the calling vTPM (TPM 2.0 or 1.2).
    pub const GET_QUOTE: u32 = 4;
    /// Management: the groups (count, then each group's number, from an optional 4-byte
    /// offset).
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
    /// Ours, management: approve a boot hash for a group; replies u32 1 if newly approved.
    pub const GROUP_APPROVE: u32 = 0x0200_0402;
    /// Ours, management: withdraw an approval; replies u32 1 if it was approved.
    pub const GROUP_REVOKE: u32 = 0x0200_0403;
    /// Ours, management: a page of a group's approved boot hashes.
    pub const GROUP_APPROVED: u32 = 0x0200_0404;
    /// Ours, management: this manager's migration public key (65 bytes).
    pub const MIGRATION_KEY: u32 = 0x0200_0405;
    /// Ours, management: export a vTPM; replies the bundle, and the vTPM is frozen here.
    pub const VTPM_EXPORT: u32 = 0x0200_0406;
    /// Ours, management: import a bundle; replies the vTPM's uuid.
    pub const VTPM_IMPORT: u32 = 0x0200_0407;
    /// Ours, management: the public part of the key that signs deep quotes (TPM 2.0: its
    /// TPMT_PUBLIC; TPM 1.2: its TPM_PUBKEY), for verifiers to register.
    pub const ATTESTATION_KEY: u32 = 0x0200_0408;
    /// Ours, management: pin a source manager's migration identity (bundles it signs are
    /// imported); replies u32 1 if newly pinned.
    pub const MIGRATION_TRUST: u32 = 0x0200_0409;
    /// Ours, management: unpin a source manager; replies u32 1 if it was pinned.
    pub const MIGRATION_DISTRUST: u32 = 0x0200_040A;
    /// Ours, management: bind a vTPM's socket clients to a uid (body: uuid, u32 uid), or
    /// clear its binding (uuid alone: the next BIND records one).
    pub const VTPM_SET_UID: u32 = 0x0200_040B;
}

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

/// Who may send a request, which decides how the manager authorises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A vTPM acting for itself.
    Vtpm,
    /// A Unix-socket client naming its vTPM.
    Bind,
    /// The operator.
    Admin,
}

/// A request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// SAVEHASHKEY: the state's hash and key, checked by the manager.
    SaveHashKey(Secret<Vec<u8>>),
    /// LOADHASHKEY.
    LoadHashKey,
    /// GET_BOOT_HASH.
    GetBootHash,
    /// GET_QUOTE of `pcrs` (numbers 0-23) with the verifier's `nonce`.
    GetQuote {
        /// The verifier's nonce.
        nonce: [u8; 20],
        /// The PCRs to quote, ascending.
        pcrs: Vec<u8>,
    },
    /// BIND.
    Bind {
        /// The vTPM.
        uuid: Uuid,
        /// Its token.
        token: Secret<Vec<u8>>,
    },
    /// GROUP_LIST from `offset`.
    GroupList {
        /// The first group to list.
        offset: u32,
    },
    /// GROUP_NEW.
    GroupNew,
    /// GROUP_DEL.
    GroupDel {
        /// The group.
        group: u32,
    },
    /// GROUP_SHOW.
    GroupShow {
        /// The group.
        group: u32,
    },
    /// VTPM_LIST of `group` from `offset`.
    VtpmList {
        /// The group.
        group: u32,
        /// The first vTPM to list.
        offset: u32,
    },
    /// VTPM_SHOW.
    VtpmShow {
        /// The vTPM.
        uuid: Uuid,
    },
    /// VTPM_NEW.
    VtpmNew {
        /// Its group.
        group: u32,
        /// Its uuid and, for a vTPM that reaches the manager by its socket, the 32-byte token
        /// it will present (`None`: the manager picks a random uuid, and there is no token).
        named: Option<(Uuid, Option<Secret<[u8; 32]>>)>,
    },
    /// VTPM_DEL.
    VtpmDel {
        /// The vTPM.
        uuid: Uuid,
    },
    /// GROUP_APPROVE.
    GroupApprove {
        /// The group.
        group: u32,
        /// The boot hash.
        hash: [u8; 32],
    },
    /// GROUP_REVOKE.
    GroupRevoke {
        /// The group.
        group: u32,
        /// The boot hash.
        hash: [u8; 32],
    },
    /// GROUP_APPROVED of `group` from `offset`.
    GroupApproved {
        /// The group.
        group: u32,
        /// The first hash to list.
        offset: u32,
    },
    /// MIGRATION_KEY.
    MigrationKey,
    /// ATTESTATION_KEY.
    AttestationKey,
    /// VTPM_EXPORT.
    VtpmExport {
        /// The vTPM.
        uuid: Uuid,
        /// The destination manager's migration identity.
        to: Vec<u8>,
        /// Export a vTPM exported already to another manager (its first bundle is lost).
        force: bool,
    },
    /// VTPM_SET_UID.
    VtpmSetUid {
        /// The vTPM.
        uuid: Uuid,
        /// The uid its socket clients must run as; `None`: cleared.
        uid: Option<u32>,
    },
    /// MIGRATION_TRUST.
    MigrationTrust {
        /// The source manager's migration identity.
        source: Vec<u8>,
    },
    /// MIGRATION_DISTRUST.
    MigrationDistrust {
        /// The source manager's migration identity.
        source: Vec<u8>,
    },
    /// VTPM_IMPORT.
    VtpmImport {
        /// The group it joins.
        group: u32,
        /// The bundle.
        bundle: Vec<u8>,
    },
}

/// Why a message is not a [`Request`]; each decides the manager's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Malformed {
    /// Shorter than a header.
    Short {
        /// Its length.
        len: usize,
    },
    /// A size field that is not the length.
    Size {
        /// Its tag.
        tag: u16,
        /// The size field.
        claimed: u32,
        /// The length.
        len: usize,
    },
    /// An unknown tag.
    Tag(u16),
    /// An unknown ordinal for its tag.
    Ordinal {
        /// The tag.
        tag: u16,
        /// The ordinal.
        ordinal: u32,
    },
    /// A known request whose body does not fit it.
    Body {
        /// Its class.
        class: Class,
        /// Its ordinal.
        ordinal: u32,
        /// What is wrong.
        why: String,
    },
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Short { len } => write!(f, "message of {len} bytes, shorter than a header"),
            Malformed::Size { claimed, len, .. } => write!(f, "size field {claimed} but {len} bytes"),
            Malformed::Tag(t) => write!(f, "unknown tag {t:#x}"),
            Malformed::Ordinal { ordinal, .. } => write!(f, "unknown ordinal {ordinal:#x}"),
            Malformed::Body { why, .. } => f.write_str(why),
        }
    }
}

/// The class of a known (tag, ordinal); `None`: unknown.
pub fn class_of(tag: u16, ordinal: u32) -> Option<Class> {
    use ord::*;
    match (tag, ordinal) {
        (TAG_REQ, SAVEHASHKEY | LOADHASHKEY | GET_BOOT_HASH | GET_QUOTE) => Some(Class::Vtpm),
        (TAG_REQ2, BIND) => Some(Class::Bind),
        (
            TAG_REQ2,
            GROUP_LIST | GROUP_NEW | GROUP_DEL | GROUP_SHOW | VTPM_LIST | VTPM_SHOW | VTPM_NEW | VTPM_DEL
            | GROUP_APPROVE | GROUP_REVOKE | GROUP_APPROVED | MIGRATION_KEY | VTPM_EXPORT | VTPM_IMPORT
            | ATTESTATION_KEY | MIGRATION_TRUST | MIGRATION_DISTRUST | VTPM_SET_UID,
        ) => Some(Class::Admin),
        _ => None,
    }
}

fn group_and_hash(r: &mut Reader<'_>) -> Option<(u32, [u8; 32])> {
    let g = r.u32()?;
    let h = r.array::<32>()?;
    (r.remaining() == 0).then_some((g, h))
}

/// The PCR numbers set in a TPM_PCR_SELECTION bitmap.
fn pcrs_of(bits: &[u8]) -> Vec<u8> {
    (0..24u8).filter(|p| bits.get(usize::from(p / 8)).is_some_and(|b| b & (1 << (p % 8)) != 0)).collect()
}

impl Request {
    /// Decodes one whole message. Lenient where Xen's manager and our earlier clients are
    /// (a missing list offset is 0; bodies of requests that take none are ignored), strict
    /// where a field matters.
    pub fn decode(msg: &[u8]) -> Result<Self, Malformed> {
        use ord::*;
        let h = tpm::Header::peek(msg).ok_or(Malformed::Short { len: msg.len() })?;
        if h.size as usize != msg.len() {
            return Err(Malformed::Size { tag: h.tag, claimed: h.size, len: msg.len() });
        }
        if h.tag != TAG_REQ && h.tag != TAG_REQ2 {
            return Err(Malformed::Tag(h.tag));
        }
        let ordinal = h.code;
        let class = class_of(h.tag, ordinal).ok_or(Malformed::Ordinal { tag: h.tag, ordinal })?;
        let body = &msg[HEADER..];
        let mut r = Reader::new(body);
        let bad = |why: &str| Malformed::Body { class, ordinal, why: why.to_string() };
        Ok(match ordinal {
            SAVEHASHKEY => Request::SaveHashKey(Secret(body.to_vec())),
            LOADHASHKEY => Request::LoadHashKey,
            GET_BOOT_HASH if body.is_empty() => Request::GetBootHash,
            GET_BOOT_HASH => return Err(bad("GET_BOOT_HASH takes no parameters")),
            // nonce[20] | TPM_PCR_SELECTION (u16 size, bitmap) [| u32 flags, ignored].
            GET_QUOTE => match (r.array::<20>(), r.sized16()) {
                (Some(nonce), Some(bits)) if bits.len() <= 3 => Request::GetQuote { nonce, pcrs: pcrs_of(bits) },
                _ => return Err(bad("GET_QUOTE: nonce[20] and a PCR selection of up to 3 bytes")),
            },
            BIND => match Uuid::from_slice(body) {
                Some(uuid) => Request::Bind { uuid, token: Secret(body[16..].to_vec()) },
                None => return Err(bad("BIND needs a 16-byte uuid and a token")),
            },
            GROUP_LIST => Request::GroupList { offset: r.u32().unwrap_or_default() },
            GROUP_NEW => Request::GroupNew,
            GROUP_DEL | GROUP_SHOW => match (r.u32(), r.remaining()) {
                (Some(group), 0) if ordinal == GROUP_DEL => Request::GroupDel { group },
                (Some(group), 0) => Request::GroupShow { group },
                _ => return Err(bad("a group number expected")),
            },
            VTPM_LIST => Request::VtpmList { group: r.u32().unwrap_or_default(), offset: r.u32().unwrap_or_default() },
            VTPM_SHOW | VTPM_DEL => match (Uuid::from_slice(body), body.len()) {
                (Some(uuid), 16) if ordinal == VTPM_SHOW => Request::VtpmShow { uuid },
                (Some(uuid), 16) => Request::VtpmDel { uuid },
                _ => return Err(bad("a 16-byte uuid expected")),
            },
            VTPM_NEW => {
                let group = r.u32().unwrap_or_default();
                match body.len() {
                    4 => Request::VtpmNew { group, named: None },
                    20 | 52 => {
                        Request::VtpmNew { group, named: r.array().map(|u| (Uuid(u), r.array::<32>().map(Secret))) }
                    }
                    n => return Err(bad(&format!("VTPM_NEW with a {n}-byte body"))),
                }
            }
            GROUP_APPROVE | GROUP_REVOKE => match group_and_hash(&mut r) {
                Some((group, hash)) if ordinal == GROUP_APPROVE => Request::GroupApprove { group, hash },
                Some((group, hash)) => Request::GroupRevoke { group, hash },
                None => return Err(bad("a group number and a 32-byte boot hash expected")),
            },
            GROUP_APPROVED => match (r.u32(), body.len()) {
                (Some(group), 4 | 8) => Request::GroupApproved { group, offset: r.u32().unwrap_or_default() },
                _ => return Err(bad("GROUP_APPROVED needs a group number")),
            },
            MIGRATION_KEY => Request::MigrationKey,
            ATTESTATION_KEY => Request::AttestationKey,
            VTPM_EXPORT => match (Uuid::from_slice(body), body.get(16)) {
                (Some(uuid), Some(&f @ (0 | 1))) => {
                    Request::VtpmExport { uuid, force: f == 1, to: body[17..].to_vec() }
                }
                _ => return Err(bad("VTPM_EXPORT needs a uuid, a force flag (0 or 1) and a migration key")),
            },
            MIGRATION_TRUST => Request::MigrationTrust { source: body.to_vec() },
            VTPM_SET_UID => match (Uuid::from_slice(body), body.len()) {
                (Some(uuid), 16) => Request::VtpmSetUid { uuid, uid: None },
                (Some(uuid), 20) => Request::VtpmSetUid { uuid, uid: tpm::be32(body, 16) },
                _ => return Err(bad("VTPM_SET_UID needs a uuid and, to bind, a uid")),
            },
            MIGRATION_DISTRUST => Request::MigrationDistrust { source: body.to_vec() },
            VTPM_IMPORT => match r.u32() {
                Some(group) => Request::VtpmImport { group, bundle: r.rest().to_vec() },
                None => return Err(bad("VTPM_IMPORT needs a group and a bundle")),
            },
            _ => return Err(Malformed::Ordinal { tag: h.tag, ordinal }),
        })
    }

    /// The ordinal.
    pub fn ordinal(&self) -> u32 {
        use ord::*;
        match self {
            Request::SaveHashKey(_) => SAVEHASHKEY,
            Request::LoadHashKey => LOADHASHKEY,
            Request::GetBootHash => GET_BOOT_HASH,
            Request::GetQuote { .. } => GET_QUOTE,
            Request::Bind { .. } => BIND,
            Request::GroupList { .. } => GROUP_LIST,
            Request::GroupNew => GROUP_NEW,
            Request::GroupDel { .. } => GROUP_DEL,
            Request::GroupShow { .. } => GROUP_SHOW,
            Request::VtpmList { .. } => VTPM_LIST,
            Request::VtpmShow { .. } => VTPM_SHOW,
            Request::VtpmNew { .. } => VTPM_NEW,
            Request::VtpmDel { .. } => VTPM_DEL,
            Request::GroupApprove { .. } => GROUP_APPROVE,
            Request::GroupRevoke { .. } => GROUP_REVOKE,
            Request::GroupApproved { .. } => GROUP_APPROVED,
            Request::MigrationKey => MIGRATION_KEY,
            Request::AttestationKey => ATTESTATION_KEY,
            Request::VtpmExport { .. } => VTPM_EXPORT,
            Request::MigrationTrust { .. } => MIGRATION_TRUST,
            Request::VtpmSetUid { .. } => VTPM_SET_UID,
            Request::MigrationDistrust { .. } => MIGRATION_DISTRUST,
            Request::VtpmImport { .. } => VTPM_IMPORT,
        }
    }

    /// The class.
    pub fn class(&self) -> Class {
        match self {
            Request::SaveHashKey(_) | Request::LoadHashKey | Request::GetBootHash | Request::GetQuote { .. } => {
                Class::Vtpm
            }
            Request::Bind { .. } => Class::Bind,
            _ => Class::Admin,
        }
    }

    /// The tag.
    pub fn tag(&self) -> u16 {
        match self.class() {
            Class::Vtpm => TAG_REQ,
            Class::Bind | Class::Admin => TAG_REQ2,
        }
    }

    /// The body.
    pub fn body(&self) -> Vec<u8> {
        match self {
            Request::SaveHashKey(b) => b.0.clone(),
            Request::LoadHashKey
            | Request::GetBootHash
            | Request::GroupNew
            | Request::MigrationKey
            | Request::AttestationKey => Vec::new(),
            Request::GetQuote { nonce, pcrs } => {
                let mut bits = [0u8; 3];
                for p in pcrs.iter().filter(|p| **p < 24) {
                    bits[usize::from(p / 8)] |= 1 << (p % 8);
                }
                [&nonce[..], &3u16.to_be_bytes(), &bits].concat()
            }
            Request::Bind { uuid, token } => [&uuid.0[..], &token.0].concat(),
            Request::GroupList { offset } => offset.to_be_bytes().to_vec(),
            Request::GroupDel { group } | Request::GroupShow { group } => group.to_be_bytes().to_vec(),
            Request::VtpmList { group, offset } | Request::GroupApproved { group, offset } => {
                [group.to_be_bytes(), offset.to_be_bytes()].concat()
            }
            Request::VtpmShow { uuid } | Request::VtpmDel { uuid } => uuid.0.to_vec(),
            Request::VtpmNew { group, named } => {
                let mut b = group.to_be_bytes().to_vec();
                if let Some((uuid, token)) = named {
                    b.extend_from_slice(&uuid.0);
                    b.extend_from_slice(token.as_ref().map_or(&[][..], |t| &t.0[..]));
                }
                b
            }
            Request::GroupApprove { group, hash } | Request::GroupRevoke { group, hash } => {
                [&group.to_be_bytes()[..], hash].concat()
            }
            Request::VtpmExport { uuid, to, force } => [&uuid.0[..], &[u8::from(*force)], to].concat(),
            Request::MigrationTrust { source } | Request::MigrationDistrust { source } => source.clone(),
            Request::VtpmSetUid { uuid, uid } => {
                [&uuid.0[..], uid.map(u32::to_be_bytes).as_ref().map_or(&[][..], |u| &u[..])].concat()
            }
            Request::VtpmImport { group, bundle } => [&group.to_be_bytes()[..], bundle].concat(),
        }
    }

    /// The whole message.
    pub fn encode(&self) -> Vec<u8> {
        tpm::frame(self.tag(), self.ordinal(), &self.body())
    }
}

/// A reply: tag, status and body. `Debug` shows the body's length only: LOADHASHKEY's body is
/// a state key.
#[derive(Clone, PartialEq, Eq)]
pub struct Reply {
    /// [`TAG_RSP`], or [`TAG_RSP2`] for the dispatcher's refusals of management commands.
    pub tag: u16,
    /// A [`status`] code.
    pub status: u32,
    /// The body (empty unless the status is success).
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("tag", &self.tag)
            .field("status", &self.status)
            .field("body", &Secret(&self.body))
            .finish()
    }
}

impl Reply {
    /// A successful reply carrying `body`.
    pub fn ok(body: Vec<u8>) -> Self {
        Self { tag: TAG_RSP, status: status::SUCCESS, body }
    }

    /// A refusal with `status` and tag `tag`.
    pub fn refuse(tag: u16, status: u32) -> Self {
        Self { tag, status, body: Vec::new() }
    }

    /// The whole message.
    pub fn encode(&self) -> Vec<u8> {
        tpm::frame(self.tag, self.status, &self.body)
    }

    /// Decodes a whole reply, whose size field must be its length.
    pub fn decode(msg: &[u8]) -> Result<Self, Error> {
        let h = tpm::Header::of(msg)?;
        Ok(Self { tag: h.tag, status: h.code, body: msg[HEADER..].to_vec() })
    }
}

/// VTPM_SHOW's reply body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VtpmShow {
    /// Its group.
    pub group: u32,
    /// Whether it has saved a state key.
    pub has_key: bool,
    /// Whether it was exported (and is frozen here).
    pub exported: bool,
}

impl VtpmShow {
    /// The body.
    pub fn encode(&self) -> Vec<u8> {
        [self.group, u32::from(self.has_key), u32::from(self.exported)].iter().flat_map(|v| v.to_be_bytes()).collect()
    }

    /// Parses the body.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(b);
        match (r.u32(), r.u32(), r.u32()) {
            (Some(group), Some(k), Some(e)) => Ok(Self { group, has_key: k != 0, exported: e != 0 }),
            _ => Err(Error::Short { what: "VTPM_SHOW reply", got: b.len(), need: 12 }),
        }
    }
}

/// GROUP_SHOW's reply body (and GROUP_NEW's, whose count is absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupShow {
    /// Its uuid (all zeros for group 0).
    pub uuid: Uuid,
    /// vTPMs in it.
    pub vtpms: u32,
}

impl GroupShow {
    /// The body.
    pub fn encode(&self) -> Vec<u8> {
        [&self.uuid.0[..], &self.vtpms.to_be_bytes()].concat()
    }

    /// Parses the body.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(b);
        match (r.array().map(Uuid), r.u32()) {
            (Some(uuid), Some(vtpms)) => Ok(Self { uuid, vtpms }),
            _ => Err(Error::Short { what: "GROUP_SHOW reply", got: b.len(), need: 20 }),
        }
    }
}

/// One page of a list (GROUP_LIST, VTPM_LIST, GROUP_APPROVED): the total, then items of
/// `N` bytes, as many as fit [`MAX_REPLY`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<const N: usize> {
    /// How many items the whole list has.
    pub total: u32,
    /// This page's items.
    pub items: Vec<[u8; N]>,
}

impl<const N: usize> Page<N> {
    /// How many items fit one reply.
    pub const CAPACITY: usize = (MAX_REPLY - HEADER - 4) / N;

    /// The page of `all` that starts at `offset`.
    pub fn of(all: &[[u8; N]], offset: u32) -> Self {
        let items = all.iter().skip(offset as usize).take(Self::CAPACITY).copied().collect();
        Self { total: u32::try_from(all.len()).unwrap_or(u32::MAX), items }
    }

    /// The body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.total.to_be_bytes().to_vec();
        self.items.iter().for_each(|i| b.extend_from_slice(i));
        b
    }

    /// Parses the body (a trailing part of an item is ignored).
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let mut r = Reader::new(b);
        let total = r.u32().ok_or(Error::Short { what: "list reply", got: b.len(), need: 4 })?;
        let items = r.rest().chunks_exact(N).filter_map(|c| c.try_into().ok()).collect();
        Ok(Self { total, items })
    }
}

/// A reply body that is one big-endian u32 (GROUP_APPROVE, GROUP_REVOKE).
pub fn decode_u32(b: &[u8]) -> Result<u32, Error> {
    tpm::be32(b, 0).ok_or(Error::Short { what: "reply", got: b.len(), need: 4 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_requests() -> Vec<Request> {
        let u = Uuid([7; 16]);
        vec![
            Request::SaveHashKey(Secret(vec![1; 64])),
            Request::LoadHashKey,
            Request::GetBootHash,
            Request::GetQuote { nonce: [9; 20], pcrs: vec![0, 7, 16, 23] },
            Request::Bind { uuid: u, token: Secret(b"secret".to_vec()) },
            Request::GroupList { offset: 3 },
            Request::GroupNew,
            Request::GroupDel { group: 2 },
            Request::GroupShow { group: 2 },
            Request::VtpmList { group: 1, offset: 255 },
            Request::VtpmShow { uuid: u },
            Request::VtpmNew { group: 1, named: None },
            Request::VtpmNew { group: 1, named: Some((u, None)) },
            Request::VtpmNew { group: 1, named: Some((u, Some(Secret([5; 32])))) },
            Request::VtpmDel { uuid: u },
            Request::GroupApprove { group: 1, hash: [3; 32] },
            Request::GroupRevoke { group: 1, hash: [3; 32] },
            Request::GroupApproved { group: 1, offset: 127 },
            Request::MigrationKey,
            Request::AttestationKey,
            Request::VtpmExport { uuid: u, to: vec![4; 130], force: false },
            Request::VtpmExport { uuid: u, to: vec![4; 130], force: true },
            Request::MigrationTrust { source: vec![5; 130] },
            Request::MigrationDistrust { source: vec![5; 130] },
            Request::VtpmSetUid { uuid: u, uid: Some(1000) },
            Request::VtpmSetUid { uuid: u, uid: None },
            Request::VtpmImport { group: 6, bundle: vec![8; 300] },
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for r in all_requests() {
            let m = r.encode();
            assert_eq!(tpm::be32(&m, 2), Some(m.len() as u32));
            assert_eq!(Request::decode(&m), Ok(r.clone()), "{r:?}");
            assert_eq!(class_of(r.tag(), r.ordinal()), Some(r.class()));
        }
    }

    #[test]
    fn xen_layouts_are_byte_exact() {
        assert_eq!(Request::LoadHashKey.encode(), [0x01, 0xC1, 0, 0, 0, 10, 0, 0, 0, 2]);
        let q = Request::GetQuote { nonce: [0; 20], pcrs: vec![0, 9] }.encode();
        assert_eq!(&q[30..], [0, 3, 1, 2, 0]);
        assert_eq!(
            Request::VtpmList { group: 1, offset: 2 }.encode(),
            [0x01, 0xC2, 0, 0, 0, 18, 2, 0, 2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
        );
        assert_eq!(Reply::refuse(TAG_RSP2, status::AUTHFAIL).encode(), [0x01, 0xC5, 0, 0, 0, 10, 0, 0, 0, 1]);
    }

    #[test]
    fn malformed_messages_say_why() {
        assert_eq!(Request::decode(&[1, 0xC1, 0]), Err(Malformed::Short { len: 3 }));
        let mut m = Request::LoadHashKey.encode();
        m.push(0);
        assert_eq!(Request::decode(&m), Err(Malformed::Size { tag: TAG_REQ, claimed: 10, len: 11 }));
        assert_eq!(Request::decode(&tpm::frame(0x8001, 2, &[])), Err(Malformed::Tag(0x8001)));
        assert_eq!(
            Request::decode(&tpm::frame(TAG_REQ, 99, &[])),
            Err(Malformed::Ordinal { tag: TAG_REQ, ordinal: 99 })
        );
        // A management ordinal under the vTPM tag is unknown there.
        assert!(matches!(Request::decode(&tpm::frame(TAG_REQ, ord::VTPM_NEW, &[])), Err(Malformed::Ordinal { .. })));
        for (tag, ordinal, body) in [
            (TAG_REQ, ord::GET_BOOT_HASH, &[1u8][..]),
            (TAG_REQ, ord::GET_QUOTE, &[0; 21][..]),
            (TAG_REQ, ord::GET_QUOTE, &[[0; 20].as_slice(), &[0, 4, 1, 1, 1, 1]].concat()[..]),
            (TAG_REQ2, ord::BIND, &[0; 15][..]),
            (TAG_REQ2, ord::VTPM_SHOW, &[0; 17][..]),
            (TAG_REQ2, ord::VTPM_DEL, &[0; 15][..]),
            (TAG_REQ2, ord::VTPM_NEW, &[0; 21][..]),
            (TAG_REQ2, ord::GROUP_DEL, &[0; 5][..]),
            (TAG_REQ2, ord::GROUP_SHOW, &[][..]),
            (TAG_REQ2, ord::GROUP_APPROVE, &[0; 35][..]),
            (TAG_REQ2, ord::GROUP_REVOKE, &[0; 37][..]),
            (TAG_REQ2, ord::GROUP_APPROVED, &[0; 6][..]),
            (TAG_REQ2, ord::VTPM_EXPORT, &[0; 15][..]),
            (TAG_REQ2, ord::VTPM_IMPORT, &[0; 3][..]),
        ] {
            let e = Request::decode(&tpm::frame(tag, ordinal, body));
            assert!(
                matches!(&e, Err(Malformed::Body { ordinal: o, class, .. }) if *o == ordinal && Some(*class) == class_of(tag, ordinal)),
                "{ordinal:#x} {body:?}: {e:?}"
            );
        }
    }

    #[test]
    fn reply_bodies_round_trip_and_pages_fill_a_packet() {
        let v = VtpmShow { group: 4, has_key: true, exported: false };
        assert_eq!(VtpmShow::decode(&v.encode()), Ok(v));
        assert!(VtpmShow::decode(&[0; 11]).is_err());
        let g = GroupShow { uuid: Uuid([2; 16]), vtpms: 9 };
        assert_eq!(GroupShow::decode(&g.encode()), Ok(g));
        let all: Vec<[u8; 16]> = (0..300u32).map(|i| [i as u8; 16]).collect();
        let p = Page::of(&all, 10);
        assert_eq!(p.total, 300);
        assert_eq!(p.items.len(), Page::<16>::CAPACITY);
        assert_eq!(p.items[0], [10; 16]);
        assert!(Reply::ok(p.encode()).encode().len() <= MAX_REPLY);
        assert_eq!(Page::<16>::decode(&p.encode()), Ok(p));
        assert_eq!(Page::<4>::of(&[[1; 4]], 5).items, Vec::<[u8; 4]>::new());
        let r = Reply::ok(vec![1, 2]);
        assert_eq!(Reply::decode(&r.encode()), Ok(r));
        // A state key (LOADHASHKEY's answer, SAVEHASHKEY's body) or a token never shows in a log.
        let key = vec![0xAB; 64];
        for shown in [
            format!("{:?}", Reply::ok(key.clone())),
            format!("{:?}", Request::SaveHashKey(Secret(key.clone()))),
            format!("{:?}", Request::Bind { uuid: Uuid([1; 16]), token: Secret(key.clone()) }),
            format!("{:?}", Request::VtpmNew { group: 0, named: Some((Uuid([1; 16]), Some(Secret([0xAB; 32])))) }),
        ] {
            assert!(!shown.contains("171") && shown.contains("secret bytes"), "{shown}");
        }
        assert!(Reply::decode(&[0x01, 0xC4, 0, 0, 0, 11, 0, 0, 0, 0]).is_err());
    }
}
