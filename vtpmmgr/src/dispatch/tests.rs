//! Every ordinal through the dispatcher against an in-memory [`Service`]: who may send it,
//! what it answers, and what a malformed one answers. No TPM, no store.

use std::collections::{BTreeMap, BTreeSet};

use xvtpm_proto::mgr::{ord, GroupShow, Page, VtpmShow, TAG_REQ, TAG_REQ2};
use xvtpm_proto::tpm::frame;
use xvtpm_proto::Secret;

use super::*;

const U: [u8; 16] = [0x11; 16];
const OTHER: [u8; 16] = [0x22; 16];
const TOKEN: &[u8] = b"the token";
const APPROVED: BootHash = [0xAB; 32];

/// A vTPM of the fake: group, saved blob, token digest.
type Vtpm = (u32, Option<Vec<u8>>, [u8; 32]);
/// A quote asked of the fake: uuid, boot hash, nonce, PCRs.
type Quote = ([u8; 16], Option<BootHash>, Vec<u8>, Vec<u8>);

#[derive(Debug, Default)]
struct Fake {
    vtpms: BTreeMap<[u8; 16], Vtpm>,
    /// The uid each vTPM's socket clients are bound to.
    uids: BTreeMap<[u8; 16], u32>,
    /// Pinned migration sources.
    sources: BTreeSet<Vec<u8>>,
    groups: BTreeMap<u32, ([u8; 16], BTreeSet<BootHash>)>,
    quotes: Vec<Quote>,
}

impl Fake {
    fn new() -> Self {
        let mut f = Fake::default();
        f.groups.insert(0, ([0; 16], BTreeSet::new()));
        f.vtpms.insert(U, (0, None, Sha256::digest(TOKEN).into()));
        f
    }

    fn known(&self, uuid: &[u8; 16]) -> Result<&Vtpm> {
        self.vtpms.get(uuid).ok_or_else(|| Error::UnknownVtpm(Uuid(*uuid).to_string()))
    }
}

impl Service for Fake {
    fn authorize(&self, uuid: &[u8; 16], token: &[u8]) -> Result<()> {
        let digest: [u8; 32] = Sha256::digest(token).into();
        self.authorize_digest(uuid, &digest)
    }
    fn bind_uid(&mut self, uuid: &[u8; 16], uid: u32) -> Result<()> {
        match *self.uids.entry(*uuid).or_insert(uid) {
            u if u == uid => Ok(()),
            _ => Err(Error::NotAuthorized("another uid".into())),
        }
    }
    fn set_uid(&mut self, uuid: &[u8; 16], uid: Option<u32>) -> Result<()> {
        self.known(uuid)?;
        match uid {
            Some(u) => self.uids.insert(*uuid, u),
            None => self.uids.remove(uuid),
        };
        Ok(())
    }
    fn authorize_digest(&self, uuid: &[u8; 16], digest: &[u8; 32]) -> Result<()> {
        match self.known(uuid)? {
            (_, _, d) if d == digest => Ok(()),
            _ => Err(Error::NotAuthorized("wrong token".into())),
        }
    }
    fn check_boot(&self, uuid: &[u8; 16], boot: Option<&BootHash>) -> Result<()> {
        let (group, ..) = self.known(uuid)?;
        let approved = &self.groups[group].1;
        match boot {
            _ if approved.is_empty() => Ok(()),
            Some(h) if approved.contains(h) => Ok(()),
            _ => Err(Error::NotAuthorized("boot hash not approved".into())),
        }
    }
    fn save(&mut self, uuid: &[u8; 16], blob: &[u8]) -> Result<()> {
        self.vtpms.get_mut(uuid).ok_or(Error::UnknownVtpm(String::new()))?.1 = Some(blob.to_vec());
        Ok(())
    }
    fn load(&self, uuid: &[u8; 16]) -> Result<Vec<u8>> {
        self.known(uuid)?.1.clone().ok_or(Error::NoSavedState(String::new()))
    }
    fn quote(&mut self, uuid: &[u8; 16], boot: Option<&BootHash>, nonce: &[u8], pcrs: &[u8]) -> Result<Vec<u8>> {
        self.quotes.push((*uuid, boot.copied(), nonce.to_vec(), pcrs.to_vec()));
        Ok(b"quote".to_vec())
    }
    fn provision(&mut self, uuid: [u8; 16], group: u32, token: Option<&[u8]>) -> Result<()> {
        if self.vtpms.contains_key(&uuid) {
            return Err(Error::Exists(String::new()));
        }
        if !self.groups.contains_key(&group) {
            return Err(Error::NotFound(format!("group {group}")));
        }
        self.vtpms.insert(uuid, (group, None, token.map(|t| Sha256::digest(t).into()).unwrap_or_default()));
        Ok(())
    }
    fn show(&self, uuid: &[u8; 16]) -> Result<Option<VtpmShow>> {
        Ok(self.vtpms.get(uuid).map(|v| VtpmShow { group: v.0, has_key: v.1.is_some(), exported: false }))
    }
    fn delete(&mut self, uuid: &[u8; 16]) -> Result<bool> {
        Ok(self.vtpms.remove(uuid).is_some())
    }
    fn vtpms_of(&self, group: u32) -> Result<Vec<[u8; 16]>> {
        Ok(self.vtpms.iter().filter(|v| v.1 .0 == group).map(|v| *v.0).collect())
    }
    fn groups(&self) -> Result<Vec<(u32, [u8; 16], usize)>> {
        let count = |g: u32| self.vtpms.values().filter(|v| v.0 == g).count();
        Ok(self.groups.iter().map(|(n, g)| (*n, g.0, count(*n))).collect())
    }
    fn new_group(&mut self) -> Result<(u32, [u8; 16])> {
        let n = self.groups.keys().last().copied().unwrap_or_default() + 1;
        self.groups.insert(n, ([n as u8; 16], BTreeSet::new()));
        Ok((n, [n as u8; 16]))
    }
    fn delete_group(&mut self, group: u32) -> Result<()> {
        self.groups.remove(&group).map(drop).ok_or(Error::NotFound(format!("group {group}")))
    }
    fn approve(&mut self, group: u32, hash: &BootHash) -> Result<bool> {
        Ok(self.groups.get_mut(&group).ok_or(Error::NotFound(String::new()))?.1.insert(*hash))
    }
    fn revoke(&mut self, group: u32, hash: &BootHash) -> Result<bool> {
        Ok(self.groups.get_mut(&group).ok_or(Error::NotFound(String::new()))?.1.remove(hash))
    }
    fn approved(&self, group: u32) -> Result<Vec<BootHash>> {
        Ok(self.groups.get(&group).ok_or(Error::NotFound(String::new()))?.1.iter().copied().collect())
    }
    fn migration_public(&self) -> Vec<u8> {
        vec![4; 65]
    }
    fn attestation_public(&mut self) -> Result<Vec<u8>> {
        Ok(vec![7; 90])
    }
    fn export(&mut self, uuid: &[u8; 16], to: &[u8], force: bool) -> Result<Vec<u8>> {
        self.known(uuid)?;
        Ok([&b"bundle for "[..], to, &[u8::from(force)]].concat())
    }
    fn trust_source(&mut self, source: &[u8]) -> Result<bool> {
        Ok(self.sources.insert(source.to_vec()))
    }
    fn distrust_source(&mut self, source: &[u8]) -> Result<bool> {
        Ok(self.sources.remove(source))
    }
    fn import(&mut self, bundle: &[u8], group: u32) -> Result<[u8; 16]> {
        match bundle {
            b"good" => self.provision(OTHER, group, None).map(|()| OTHER),
            _ => Err(Error::NotAuthorized("damaged".into())),
        }
    }
}

/// Sends `r` (already encoded) as `caller`; (reply tag, status, body).
fn send(f: &mut Fake, caller: &mut Caller, boot: Option<&BootHash>, msg: &[u8]) -> (u16, u32, Vec<u8>) {
    let r = Reply::decode(&handle(f, caller, boot, msg)).expect("a well-formed reply");
    (r.tag, r.status, r.body)
}

fn ok(f: &mut Fake, caller: &mut Caller, r: Request) -> Vec<u8> {
    let (tag, st, body) = send(f, caller, None, &r.encode());
    assert_eq!((tag, st), (TAG_RSP, status::SUCCESS), "{r:?}");
    body
}

fn st(f: &mut Fake, caller: &mut Caller, msg: &[u8]) -> (u16, u32) {
    let (tag, st, _) = send(f, caller, None, msg);
    (tag, st)
}

#[test]
fn vtpm_commands_act_for_the_transports_vtpm() {
    let (mut f, mut me) = (Fake::new(), Caller::Vtpm(U));
    assert_eq!(st(&mut f, &mut me, &Request::LoadHashKey.encode()), (TAG_RSP, status::BAD_PARAMETER));
    assert!(ok(&mut f, &mut me, Request::SaveHashKey(Secret(vec![7; 64]))).is_empty());
    assert_eq!(ok(&mut f, &mut me, Request::LoadHashKey), vec![7; 64]);
    // A vTPM the manager does not know.
    assert_eq!(st(&mut f, &mut Caller::Vtpm(OTHER), &Request::LoadHashKey.encode()), (TAG_RSP, status::BAD_PARAMETER));
    let q = Request::GetQuote { nonce: [5; 20], pcrs: vec![0, 23] };
    assert_eq!(send(&mut f, &mut me, Some(&APPROVED), &q.encode()).2, b"quote");
    assert_eq!(f.quotes, [(U, Some(APPROVED), vec![5; 20], vec![0, 23])]);
    // Xen's GET_BOOT_HASH is 20 bytes; an unmeasured vTPM has none.
    assert_eq!(send(&mut f, &mut me, Some(&APPROVED), &Request::GetBootHash.encode()).2, APPROVED[..20]);
    assert_eq!(st(&mut f, &mut me, &Request::GetBootHash.encode()), (TAG_RSP, status::BAD_PARAMETER));
}

#[test]
fn approvals_gate_every_vtpm_command_but_get_boot_hash() {
    let (mut f, mut me) = (Fake::new(), Caller::Vtpm(U));
    f.groups.get_mut(&0).expect("group 0").1.insert(APPROVED);
    let other: BootHash = [1; 32];
    for r in [
        Request::LoadHashKey,
        Request::SaveHashKey(Secret(vec![1; 64])),
        Request::GetQuote { nonce: [0; 20], pcrs: vec![] },
    ] {
        assert_eq!(send(&mut f, &mut me, Some(&other), &r.encode()).1, status::AUTHFAIL, "{r:?}");
        assert_eq!(send(&mut f, &mut me, None, &r.encode()).1, status::AUTHFAIL, "{r:?}");
    }
    assert_eq!(send(&mut f, &mut me, Some(&other), &Request::GetBootHash.encode()).1, status::SUCCESS);
    assert!(f.quotes.is_empty());
    // A malformed GET_QUOTE from an unapproved vTPM is refused as unapproved, not as malformed.
    let bad_quote = frame(TAG_REQ, ord::GET_QUOTE, &[0; 21]);
    assert_eq!(send(&mut f, &mut me, Some(&other), &bad_quote).1, status::AUTHFAIL);
    assert_eq!(send(&mut f, &mut me, Some(&APPROVED), &bad_quote).1, status::BAD_PARAMETER);
}

#[test]
fn socket_clients_bind_with_the_token_and_lose_it_when_it_changes() {
    let mut f = Fake::new();
    let unbound = Caller::Socket { uid: 1000, bound: None };
    let mut c = unbound.clone();
    assert_eq!(st(&mut f, &mut c, &Request::LoadHashKey.encode()), (TAG_RSP, status::AUTHFAIL));
    let bind = |token: &[u8]| Request::Bind { uuid: Uuid(U), token: Secret(token.to_vec()) }.encode();
    // Unknown uuid and wrong token answer alike.
    assert_eq!(st(&mut f, &mut c, &bind(b"wrong")), (TAG_RSP, status::AUTHFAIL));
    let unknown = Request::Bind { uuid: Uuid(OTHER), token: Secret(TOKEN.to_vec()) }.encode();
    assert_eq!(st(&mut f, &mut c, &unknown), (TAG_RSP, status::AUTHFAIL));
    assert_eq!(c, unbound);
    assert!(f.uids.is_empty(), "no uid is recorded for a client without the token");
    assert_eq!(st(&mut f, &mut c, &bind(TOKEN)), (TAG_RSP, status::SUCCESS));
    assert_eq!(f.uids.get(&U), Some(&1000), "the first BIND records its uid");
    // The token in another user's hands: refused, as an unknown uuid is.
    let mut thief = Caller::Socket { uid: 1001, bound: None };
    assert_eq!(st(&mut f, &mut thief, &bind(TOKEN)), (TAG_RSP, status::AUTHFAIL));
    assert_eq!(st(&mut f, &mut thief, &Request::LoadHashKey.encode()), (TAG_RSP, status::AUTHFAIL));
    // The operator rebinds it (say, the vTPM now runs as its own user): the thief's uid now,
    // for the test's sake; and clears it, so the next BIND records one again.
    let mut admin = Caller::Admin;
    assert!(ok(&mut f, &mut admin, Request::VtpmSetUid { uuid: Uuid(U), uid: Some(1001) }).is_empty());
    let mut thief = Caller::Socket { uid: 1001, bound: None };
    assert_eq!(st(&mut f, &mut thief, &bind(TOKEN)), (TAG_RSP, status::SUCCESS));
    assert!(ok(&mut f, &mut admin, Request::VtpmSetUid { uuid: Uuid(U), uid: None }).is_empty());
    assert!(!f.uids.contains_key(&U));
    let unknown = Request::VtpmSetUid { uuid: Uuid(OTHER), uid: Some(1) }.encode();
    assert_eq!(st(&mut f, &mut admin, &unknown), (TAG_RSP, status::BADINDEX));
    f.uids.insert(U, 1000);
    // The debug form (what logs print) carries no token digest.
    let shown = format!("{c:?}");
    assert!(shown.contains("uid 1000") && !shown.contains(&format!("{:?}", &Sha256::digest(TOKEN)[..4])), "{shown}");
    assert!(ok(&mut f, &mut c, Request::SaveHashKey(Secret(vec![3; 64]))).is_empty());
    // Deleted and provisioned anew with another token: the binding no longer holds.
    f.vtpms.get_mut(&U).expect("vtpm").2 = [0; 32];
    assert_eq!(st(&mut f, &mut c, &Request::LoadHashKey.encode()), (TAG_RSP, status::AUTHFAIL));
    assert_eq!(c, unbound);
    // BIND with a short body; BIND from a vTPM domain or the admin socket.
    assert_eq!(st(&mut f, &mut c, &frame(TAG_REQ2, ord::BIND, &[0; 15])), (TAG_RSP, status::BAD_PARAMETER));
    assert_eq!(st(&mut f, &mut Caller::Vtpm(U), &bind(TOKEN)), (TAG_RSP2, status::AUTHFAIL));
    assert_eq!(st(&mut f, &mut Caller::Admin, &bind(TOKEN)), (TAG_RSP2, status::BAD_ORDINAL));
}

#[test]
fn management_is_for_the_admin_socket_only() {
    let mut f = Fake::new();
    let every_admin_request = [
        Request::GroupList { offset: 0 },
        Request::GroupNew,
        Request::GroupDel { group: 0 },
        Request::GroupShow { group: 0 },
        Request::VtpmList { group: 0, offset: 0 },
        Request::VtpmShow { uuid: Uuid(U) },
        Request::VtpmNew { group: 0, named: None },
        Request::VtpmDel { uuid: Uuid(U) },
        Request::GroupApprove { group: 0, hash: APPROVED },
        Request::GroupRevoke { group: 0, hash: APPROVED },
        Request::GroupApproved { group: 0, offset: 0 },
        Request::MigrationKey,
        Request::AttestationKey,
        Request::VtpmExport { uuid: Uuid(U), to: vec![4; 65], force: false },
        Request::MigrationTrust { source: vec![5; 130] },
        Request::MigrationDistrust { source: vec![5; 130] },
        Request::VtpmSetUid { uuid: Uuid(U), uid: Some(7) },
        Request::VtpmImport { group: 0, bundle: b"good".to_vec() },
    ];
    let bound = Some((U, Sha256::digest(TOKEN).into()));
    for caller in [Caller::Vtpm(U), Caller::Socket { uid: 0, bound: None }, Caller::Socket { uid: 0, bound }] {
        for r in &every_admin_request {
            assert_eq!(st(&mut f, &mut caller.clone(), &r.encode()), (TAG_RSP2, status::AUTHFAIL), "{caller:?} {r:?}");
        }
        // Also an unknown management ordinal and a malformed known one.
        assert_eq!(st(&mut f, &mut caller.clone(), &frame(TAG_REQ2, 0x0200_0999, &[])), (TAG_RSP2, status::AUTHFAIL));
        assert_eq!(
            st(&mut f, &mut caller.clone(), &frame(TAG_REQ2, ord::VTPM_SHOW, &[1])),
            (TAG_RSP2, status::AUTHFAIL)
        );
    }
    assert_eq!(f.vtpms.len(), 1);
    assert_eq!(f.groups.len(), 1);
}

#[test]
fn vtpm_management_ordinals() {
    let (mut f, mut admin) = (Fake::new(), Caller::Admin);
    let new = ok(&mut f, &mut admin, Request::VtpmNew { group: 0, named: None });
    let random = Uuid::from_slice(&new).expect("a uuid");
    assert_eq!(random.0[6] >> 4, 4, "a version-4 uuid");
    let token = [9u8; 32];
    assert_eq!(
        ok(&mut f, &mut admin, Request::VtpmNew { group: 0, named: Some((Uuid(OTHER), Some(Secret(token)))) }),
        OTHER
    );
    assert_eq!(f.vtpms[&OTHER].2, <[u8; 32]>::from(Sha256::digest(token)));
    let again = Request::VtpmNew { group: 0, named: Some((Uuid(OTHER), None)) }.encode();
    assert_eq!(st(&mut f, &mut admin, &again), (TAG_RSP, status::EXISTS));
    let no_group = Request::VtpmNew { group: 7, named: None }.encode();
    assert_eq!(st(&mut f, &mut admin, &no_group), (TAG_RSP, status::BADINDEX));
    assert_eq!(st(&mut f, &mut admin, &frame(TAG_REQ2, ord::VTPM_NEW, &[0; 21])), (TAG_RSP, status::BAD_PARAMETER));

    let show = ok(&mut f, &mut admin, Request::VtpmShow { uuid: Uuid(U) });
    assert_eq!(VtpmShow::decode(&show), Ok(VtpmShow { group: 0, has_key: false, exported: false }));
    let unknown = Request::VtpmShow { uuid: Uuid([0x33; 16]) }.encode();
    assert_eq!(st(&mut f, &mut admin, &unknown), (TAG_RSP, status::BADINDEX));

    let list = Page::<16>::decode(&ok(&mut f, &mut admin, Request::VtpmList { group: 0, offset: 1 })).expect("page");
    assert_eq!(list.total, 3);
    assert_eq!(list.items.len(), 2);

    assert!(ok(&mut f, &mut admin, Request::VtpmDel { uuid: random }).is_empty());
    assert_eq!(st(&mut f, &mut admin, &Request::VtpmDel { uuid: random }.encode()), (TAG_RSP, status::BADINDEX));

    assert_eq!(ok(&mut f, &mut admin, Request::MigrationKey), vec![4; 65]);
    assert_eq!(ok(&mut f, &mut admin, Request::AttestationKey), vec![7; 90]);
    let bundle = ok(&mut f, &mut admin, Request::VtpmExport { uuid: Uuid(U), to: vec![4; 65], force: true });
    assert_eq!(bundle, [&b"bundle for "[..], &[4; 65], &[1]].concat(), "the key and the force flag reach the service");
    let trust = |source: u8| Request::MigrationTrust { source: vec![source; 130] };
    assert_eq!(ok(&mut f, &mut admin, trust(5)), 1u32.to_be_bytes());
    assert_eq!(ok(&mut f, &mut admin, trust(5)), 0u32.to_be_bytes(), "pinned already");
    let distrust = Request::MigrationDistrust { source: vec![5; 130] };
    assert_eq!(ok(&mut f, &mut admin, distrust.clone()), 1u32.to_be_bytes());
    assert_eq!(ok(&mut f, &mut admin, distrust), 0u32.to_be_bytes());
    f.vtpms.remove(&OTHER);
    assert_eq!(ok(&mut f, &mut admin, Request::VtpmImport { group: 0, bundle: b"good".to_vec() }), OTHER);
    let damaged = Request::VtpmImport { group: 0, bundle: b"bad".to_vec() }.encode();
    assert_eq!(st(&mut f, &mut admin, &damaged), (TAG_RSP, status::AUTHFAIL));
}

#[test]
fn group_management_ordinals() {
    let (mut f, mut admin) = (Fake::new(), Caller::Admin);
    let new = ok(&mut f, &mut admin, Request::GroupNew);
    assert_eq!(new, [&1u32.to_be_bytes()[..], &[1; 16]].concat());
    let groups = Page::<4>::decode(&ok(&mut f, &mut admin, Request::GroupList { offset: 0 })).expect("page");
    assert_eq!((groups.total, groups.items), (2, vec![[0; 4], [0, 0, 0, 1]]));
    let show = GroupShow::decode(&ok(&mut f, &mut admin, Request::GroupShow { group: 0 })).expect("show");
    assert_eq!(show, GroupShow { uuid: Uuid([0; 16]), vtpms: 1 });
    assert_eq!(st(&mut f, &mut admin, &Request::GroupShow { group: 9 }.encode()), (TAG_RSP, status::BADINDEX));

    let approve = Request::GroupApprove { group: 1, hash: APPROVED };
    assert_eq!(ok(&mut f, &mut admin, approve.clone()), 1u32.to_be_bytes());
    assert_eq!(ok(&mut f, &mut admin, approve), 0u32.to_be_bytes());
    let approved = Page::<32>::decode(&ok(&mut f, &mut admin, Request::GroupApproved { group: 1, offset: 0 }));
    assert_eq!(approved.expect("page").items, vec![APPROVED]);
    assert_eq!(ok(&mut f, &mut admin, Request::GroupRevoke { group: 1, hash: APPROVED }), 1u32.to_be_bytes());
    assert_eq!(ok(&mut f, &mut admin, Request::GroupRevoke { group: 1, hash: APPROVED }), 0u32.to_be_bytes());
    let short = frame(TAG_REQ2, ord::GROUP_APPROVE, &[0; 35]);
    assert_eq!(st(&mut f, &mut admin, &short), (TAG_RSP, status::BAD_PARAMETER));

    assert!(ok(&mut f, &mut admin, Request::GroupDel { group: 1 }).is_empty());
    assert_eq!(st(&mut f, &mut admin, &Request::GroupDel { group: 1 }.encode()), (TAG_RSP, status::BADINDEX));
}

#[test]
fn frames_that_are_not_requests() {
    let (mut f, mut admin) = (Fake::new(), Caller::Admin);
    assert_eq!(st(&mut f, &mut admin, &[1, 0xC2, 0]), (TAG_RSP, status::SIZE));
    let mut long = Request::GroupNew.encode();
    long.push(0);
    assert_eq!(st(&mut f, &mut admin, &long), (TAG_RSP2, status::SIZE));
    let mut long = Request::LoadHashKey.encode();
    long.push(0);
    assert_eq!(st(&mut f, &mut Caller::Vtpm(U), &long), (TAG_RSP, status::SIZE));
    assert_eq!(st(&mut f, &mut admin, &frame(0x8001, 0x17b, &[0, 8])), (TAG_RSP, status::BADTAG));
    assert_eq!(st(&mut f, &mut Caller::Vtpm(U), &frame(TAG_REQ, 9, &[])), (TAG_RSP, status::BAD_ORDINAL));
    assert_eq!(st(&mut f, &mut admin, &frame(TAG_REQ2, 0x0200_0999, &[])), (TAG_RSP2, status::BAD_ORDINAL));
}
