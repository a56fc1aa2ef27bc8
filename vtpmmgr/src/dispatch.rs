//! The manager protocol's server side: decode ([`xvtpm_proto::mgr::Request::decode`]) →
//! authorise the caller → act ([`Service`]) → encode the [`Reply`]. vTPM commands act for the
//! calling vTPM, whose identity comes from the transport (the device uuid libxl wrote in
//! xenstore, or a Unix-socket client's BIND), never from the payload; management commands are
//! served only to the admin socket and the admin domain's devices ([`Caller::Admin`]).

use sha2::{Digest, Sha256};
use xvtpm_proto::mgr::{self, status, Class, Malformed, Page, Reply, Request, TAG_RSP, TAG_RSP2};
use xvtpm_proto::Uuid;

use crate::{BootHash, Error, Result};

/// Who is calling.
#[derive(Clone, PartialEq, Eq)]
pub enum Caller {
    /// A vTPM whose identity the transport established (Xen: its device's uuid).
    Vtpm([u8; 16]),
    /// A Unix-socket client running as `uid` (the kernel's SO_PEERCRED), bound to a vTPM once
    /// BIND succeeded: its uuid and the SHA-256 of the token it presented, checked again at
    /// every command (the vTPM may have been deleted and provisioned anew with another token
    /// since).
    Socket {
        /// The client's uid.
        uid: u32,
        /// The vTPM it acts for.
        bound: Option<([u8; 16], [u8; 32])>,
    },
    /// The admin socket.
    Admin,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token's digest: it is what the store compares tokens against.
        match self {
            Caller::Vtpm(u) => write!(f, "vTPM {}", Uuid(*u)),
            Caller::Socket { uid, bound: Some((u, _)) } => write!(f, "socket client (uid {uid}) bound to {}", Uuid(*u)),
            Caller::Socket { uid, bound: None } => write!(f, "socket client (uid {uid})"),
            Caller::Admin => f.write_str("admin"),
        }
    }
}

/// What the dispatcher asks of the manager, one method per action. [`crate::manager::Manager`]
/// is the implementation; the dispatcher's tests use an in-memory one.
pub trait Service {
    /// Whether `token` is vTPM `uuid`'s.
    fn authorize(&self, uuid: &[u8; 16], token: &[u8]) -> Result<()>;
    /// Whether socket clients running as `uid` may act for vTPM `uuid`: the uid its first BIND
    /// came from (recorded then), or the one it was bound to.
    fn bind_uid(&mut self, uuid: &[u8; 16], uid: u32) -> Result<()>;
    /// VTPM_SET_UID: binds vTPM `uuid`'s socket clients to `uid`, or clears the binding.
    fn set_uid(&mut self, uuid: &[u8; 16], uid: Option<u32>) -> Result<()>;
    /// Whether the SHA-256 of a token is still vTPM `uuid`'s.
    fn authorize_digest(&self, uuid: &[u8; 16], digest: &[u8; 32]) -> Result<()>;
    /// Whether vTPM `uuid` may run with `boot` (its group's approvals).
    fn check_boot(&self, uuid: &[u8; 16], boot: Option<&BootHash>) -> Result<()>;
    /// SAVEHASHKEY.
    fn save(&mut self, uuid: &[u8; 16], blob: &[u8]) -> Result<()>;
    /// LOADHASHKEY.
    fn load(&self, uuid: &[u8; 16]) -> Result<Vec<u8>>;
    /// GET_QUOTE.
    fn quote(&mut self, uuid: &[u8; 16], boot: Option<&BootHash>, nonce: &[u8], pcrs: &[u8]) -> Result<Vec<u8>>;
    /// VTPM_NEW.
    fn provision(&mut self, uuid: [u8; 16], group: u32, token: Option<&[u8]>) -> Result<()>;
    /// VTPM_SHOW (`None`: unknown).
    fn show(&self, uuid: &[u8; 16]) -> Result<Option<mgr::VtpmShow>>;
    /// VTPM_DEL (`false`: unknown).
    fn delete(&mut self, uuid: &[u8; 16]) -> Result<bool>;
    /// The vTPMs of `group`.
    fn vtpms_of(&self, group: u32) -> Result<Vec<[u8; 16]>>;
    /// Every group: number, uuid, vTPMs in it.
    fn groups(&self) -> Result<Vec<(u32, [u8; 16], usize)>>;
    /// GROUP_NEW: number and uuid.
    fn new_group(&mut self) -> Result<(u32, [u8; 16])>;
    /// GROUP_DEL.
    fn delete_group(&mut self, group: u32) -> Result<()>;
    /// GROUP_APPROVE (`false`: approved already).
    fn approve(&mut self, group: u32, hash: &BootHash) -> Result<bool>;
    /// GROUP_REVOKE (`false`: was not approved).
    fn revoke(&mut self, group: u32, hash: &BootHash) -> Result<bool>;
    /// GROUP_APPROVED.
    fn approved(&self, group: u32) -> Result<Vec<BootHash>>;
    /// MIGRATION_KEY: the public key.
    fn migration_public(&self) -> Vec<u8>;
    /// ATTESTATION_KEY: the deep-quote key's public part.
    fn attestation_public(&mut self) -> Result<Vec<u8>>;
    /// VTPM_EXPORT.
    fn export(&mut self, uuid: &[u8; 16], to: &[u8], force: bool) -> Result<Vec<u8>>;
    /// MIGRATION_TRUST (`false`: pinned already).
    fn trust_source(&mut self, source: &[u8]) -> Result<bool>;
    /// MIGRATION_DISTRUST (`false`: was not pinned).
    fn distrust_source(&mut self, source: &[u8]) -> Result<bool>;
    /// VTPM_IMPORT.
    fn import(&mut self, bundle: &[u8], group: u32) -> Result<[u8; 16]>;
}

fn status_of(e: &Error, class: Class) -> u32 {
    match e {
        // Management tells "no such vTPM or group" apart, for the operator's tool.
        Error::UnknownVtpm(_) if class == Class::Admin => status::BADINDEX,
        Error::NotFound(_) => status::BADINDEX,
        Error::UnknownVtpm(_) | Error::NoSavedState(_) | Error::Protocol(_) => status::BAD_PARAMETER,
        Error::NotAuthorized(_) => status::AUTHFAIL,
        Error::Busy(_) => status::RETRY,
        Error::Exists(_) => status::EXISTS,
        _ => status::FAIL,
    }
}

/// The vTPM `caller` acts for: the transport's identity, or a socket's bound vTPM whose token
/// still holds (it may have been deleted and provisioned anew since BIND). `None`: refuse.
fn acting_for<S: Service>(svc: &S, caller: &mut Caller) -> Option<[u8; 16]> {
    match caller {
        Caller::Vtpm(u) => Some(*u),
        Caller::Socket { bound: Some((u, digest)), uid } => match svc.authorize_digest(u, digest) {
            Ok(()) => Some(*u),
            Err(e) => {
                log::warn!("{}: no longer authorized: {e}", Uuid(*u));
                *caller = Caller::Socket { uid: *uid, bound: None };
                None
            }
        },
        _ => {
            log::warn!("{caller:?}: vTPM command before naming a vTPM (BIND)");
            None
        }
    }
}

/// Whether `caller` may send a request of `class`; `Err`: the refusal.
fn authorise<S: Service>(
    svc: &S,
    caller: &mut Caller,
    boot: Option<&BootHash>,
    class: Class,
    ordinal: u32,
) -> std::result::Result<Option<[u8; 16]>, Reply> {
    match class {
        Class::Vtpm => {
            let uuid = acting_for(svc, caller).ok_or(Reply::refuse(TAG_RSP, status::AUTHFAIL))?;
            // A vTPM's boot hash is not checked to tell it its own boot hash.
            if ordinal != mgr::ord::GET_BOOT_HASH {
                if let Err(e) = svc.check_boot(&uuid, boot) {
                    log::warn!("{caller:?}: ordinal {ordinal:#x}: {e}");
                    return Err(Reply::refuse(TAG_RSP, status_of(&e, class)));
                }
            }
            Ok(Some(uuid))
        }
        Class::Bind if matches!(caller, Caller::Socket { .. }) => Ok(None),
        Class::Bind | Class::Admin if *caller != Caller::Admin => {
            log::warn!("{caller:?}: management ordinal {ordinal:#x} refused outside the admin socket");
            Err(Reply::refuse(TAG_RSP2, status::AUTHFAIL))
        }
        // BIND means nothing on the admin socket.
        Class::Bind => Err(Reply::refuse(TAG_RSP2, status::BAD_ORDINAL)),
        Class::Admin => Ok(None),
    }
}

/// Handles one message from `caller`, measured by its transport as `boot` (`None`: not
/// measured); the reply. Never panics on any input.
pub fn handle<S: Service>(svc: &mut S, caller: &mut Caller, boot: Option<&BootHash>, msg: &[u8]) -> Vec<u8> {
    let request = match Request::decode(msg) {
        Ok(r) => r,
        Err(m) => return refuse_malformed(svc, caller, boot, &m).encode(),
    };
    let (class, ordinal) = (request.class(), request.ordinal());
    let uuid = match authorise(svc, caller, boot, class, ordinal) {
        Ok(u) => u,
        Err(reply) => return reply.encode(),
    };
    let result = match (request, uuid) {
        (Request::Bind { uuid, token }, _) => return bind(svc, caller, &uuid.0, &token.0).encode(),
        (request, Some(uuid)) => act_for_vtpm(svc, &uuid, boot, request),
        (request, None) => administer(svc, request),
    };
    match result {
        Ok(body) => Reply::ok(body).encode(),
        Err(e) => {
            log::warn!("{caller:?}: ordinal {ordinal:#x}: {e}");
            Reply::refuse(TAG_RSP, status_of(&e, class)).encode()
        }
    }
}

/// The answer to a message that is not a request. A known request with a malformed body is
/// authorised first, so that it tells an unauthorised caller nothing more than a good one.
fn refuse_malformed<S: Service>(svc: &S, caller: &mut Caller, boot: Option<&BootHash>, m: &Malformed) -> Reply {
    log::warn!("{caller:?}: {m}");
    match m {
        Malformed::Short { .. } => Reply::refuse(TAG_RSP, status::SIZE),
        Malformed::Size { tag, .. } => {
            Reply::refuse(if *tag == mgr::TAG_REQ2 { TAG_RSP2 } else { TAG_RSP }, status::SIZE)
        }
        Malformed::Tag(_) => Reply::refuse(TAG_RSP, status::BADTAG),
        Malformed::Ordinal { tag, .. } if *tag == mgr::TAG_REQ2 && *caller != Caller::Admin => {
            Reply::refuse(TAG_RSP2, status::AUTHFAIL)
        }
        Malformed::Ordinal { tag, .. } => {
            Reply::refuse(if *tag == mgr::TAG_REQ2 { TAG_RSP2 } else { TAG_RSP }, status::BAD_ORDINAL)
        }
        Malformed::Body { class, ordinal, .. } => match authorise(svc, caller, boot, *class, *ordinal) {
            Err(refusal) => refusal,
            Ok(_) => Reply::refuse(TAG_RSP, status::BAD_PARAMETER),
        },
    }
}

/// BIND: the socket client acts for `uuid` from now on, if `token` is its.
fn bind<S: Service>(svc: &mut S, caller: &mut Caller, uuid: &[u8; 16], token: &[u8]) -> Reply {
    let Caller::Socket { uid, .. } = *caller else { return Reply::refuse(TAG_RSP2, status::BAD_ORDINAL) };
    // The token first: a uid is recorded only for a client that holds it.
    match svc.authorize(uuid, token).and_then(|()| svc.bind_uid(uuid, uid)) {
        Ok(()) => {
            *caller = Caller::Socket { uid, bound: Some((*uuid, Sha256::digest(token).into())) };
            Reply::ok(Vec::new())
        }
        Err(e) => {
            // A client that failed to bind acts for no vTPM, and learns nothing about which
            // uuids exist: unknown and wrong token answer alike.
            *caller = Caller::Socket { uid, bound: None };
            log::warn!("{caller:?}: BIND refused: {e}");
            Reply::refuse(TAG_RSP, status::AUTHFAIL)
        }
    }
}

/// The vTPM commands, for the authorised vTPM `uuid`.
fn act_for_vtpm<S: Service>(svc: &mut S, uuid: &[u8; 16], boot: Option<&BootHash>, r: Request) -> Result<Vec<u8>> {
    match r {
        Request::SaveHashKey(blob) => svc.save(uuid, &blob.0).map(|()| Vec::new()),
        Request::LoadHashKey => svc.load(uuid),
        Request::GetQuote { nonce, pcrs } => svc.quote(uuid, boot, &nonce, &pcrs),
        // Xen's reply is a TPM_DIGEST (20 bytes): the first 20 of our SHA-256.
        Request::GetBootHash => match boot {
            Some(h) => Ok(h[..20].to_vec()),
            None => Err(Error::Protocol("this vTPM could not be measured; it has no boot hash".into())),
        },
        other => Err(Error::Protocol(format!("ordinal {:#x} is not a vTPM command", other.ordinal()))),
    }
}

/// The management commands.
fn administer<S: Service>(svc: &mut S, r: Request) -> Result<Vec<u8>> {
    let flag = |b: bool| u32::from(b).to_be_bytes().to_vec();
    match r {
        Request::VtpmNew { group, named } => {
            let (uuid, token) = match named {
                Some((u, token)) => (u.0, token),
                None => (Uuid::from_random(rand::random()).0, None),
            };
            svc.provision(uuid, group, token.as_ref().map(|t| &t.0[..])).map(|()| uuid.to_vec())
        }
        Request::VtpmShow { uuid } => match svc.show(&uuid.0)? {
            Some(v) => Ok(v.encode()),
            None => Err(Error::UnknownVtpm(uuid.to_string())),
        },
        Request::VtpmDel { uuid } => match svc.delete(&uuid.0)? {
            true => Ok(Vec::new()),
            false => Err(Error::UnknownVtpm(uuid.to_string())),
        },
        Request::VtpmSetUid { uuid, uid } => svc.set_uid(&uuid.0, uid).map(|()| Vec::new()),
        Request::VtpmList { group, offset } => svc.vtpms_of(group).map(|all| Page::of(&all, offset).encode()),
        Request::GroupList { offset } => svc.groups().map(|gs| {
            let numbers: Vec<[u8; 4]> = gs.iter().map(|(n, ..)| n.to_be_bytes()).collect();
            Page::of(&numbers, offset).encode()
        }),
        Request::GroupApprove { group, hash } => svc.approve(group, &hash).map(flag),
        Request::GroupRevoke { group, hash } => svc.revoke(group, &hash).map(flag),
        Request::GroupApproved { group, offset } => svc.approved(group).map(|hs| Page::of(&hs, offset).encode()),
        Request::MigrationKey => Ok(svc.migration_public()),
        Request::AttestationKey => svc.attestation_public(),
        Request::VtpmExport { uuid, to, force } => svc.export(&uuid.0, &to, force),
        Request::MigrationTrust { source } => svc.trust_source(&source).map(flag),
        Request::MigrationDistrust { source } => svc.distrust_source(&source).map(flag),
        Request::VtpmImport { group, bundle } => svc.import(&bundle, group).map(|u| u.to_vec()),
        Request::GroupNew => svc.new_group().map(|(n, u)| [&n.to_be_bytes()[..], &u].concat()),
        Request::GroupDel { group } => svc.delete_group(group).map(|()| Vec::new()),
        Request::GroupShow { group } => match svc.groups()?.into_iter().find(|g| g.0 == group) {
            Some((_, uuid, count)) => {
                Ok(mgr::GroupShow { uuid: Uuid(uuid), vtpms: u32::try_from(count).unwrap_or(u32::MAX) }.encode())
            }
            None => Err(Error::NotFound(format!("group {group}"))),
        },
        other => Err(Error::Protocol(format!("ordinal {:#x} is not a management command", other.ordinal()))),
    }
}

#[cfg(test)]
mod tests;
