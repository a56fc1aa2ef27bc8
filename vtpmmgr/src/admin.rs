//! The management commands, as an operator's tool calls them: over the admin socket, or over
//! a vtpm device to a manager in its own domain.

use std::path::Path;

use xvtpm_proto::mgr::{self, status, GroupShow, Page, Reply, Request, VtpmShow};
use xvtpm_proto::{Secret, Uuid};

use crate::server::Client;
use crate::{uuid_str, Error, Result};

/// How management requests reach the manager: one framed request in, its framed reply out.
pub trait AdminLink: std::fmt::Debug {
    /// Sends `request` and returns the whole reply.
    fn exchange(&mut self, request: &[u8]) -> Result<Vec<u8>>;
}

impl AdminLink for Client {
    fn exchange(&mut self, request: &[u8]) -> Result<Vec<u8>> {
        Client::exchange(self, request)
    }
}

/// A vTPM as the manager reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VtpmInfo {
    /// Its uuid.
    pub uuid: [u8; 16],
    /// Its group.
    pub group: u32,
    /// Whether it has saved a state key.
    pub has_key: bool,
    /// Whether it was exported (and is frozen here).
    pub exported: bool,
}

/// A group as the manager reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    /// Its number.
    pub number: u32,
    /// Its uuid (all zeros for group 0).
    pub uuid: [u8; 16],
    /// vTPMs in it.
    pub vtpms: u32,
}

/// A connection to the manager's management commands.
#[derive(Debug)]
pub struct Admin {
    link: Box<dyn AdminLink>,
}

fn malformed(e: xvtpm_proto::Error) -> Error {
    Error::Protocol(format!("malformed reply from the manager: {e}"))
}

fn uuid_at(b: &[u8]) -> Result<[u8; 16]> {
    Uuid::from_slice(b).map(|u| u.0).ok_or_else(|| Error::Protocol("short reply from the manager".into()))
}

impl Admin {
    /// Connects to the admin socket at `path`.
    pub fn connect(path: &Path) -> Result<Self> {
        Ok(Self::over(Box::new(Client::connect(path)?)))
    }

    /// [`Admin::connect`], each exchange waiting at most `timeout` for the manager.
    pub fn connect_with_timeout(path: &Path, timeout: std::time::Duration) -> Result<Self> {
        Ok(Self::over(Box::new(Client::connect_with_timeout(path, Some(timeout))?)))
    }

    /// Management commands over `link`.
    pub fn over(link: Box<dyn AdminLink>) -> Self {
        Self { link }
    }

    fn call(&mut self, request: &Request, what: &str) -> Result<Vec<u8>> {
        let r = self.link.exchange(&request.encode())?;
        let reply = Reply::decode(&r)
            .map_err(|e| Error::Protocol(format!("malformed reply of {} bytes from the manager: {e}", r.len())))?;
        match (reply.status, reply.body) {
            (status::SUCCESS, out) => Ok(out),
            (status::BADINDEX, _) if what.starts_with("group ") => Err(Error::NotFound(what.to_string())),
            (status::BADINDEX, _) => Err(Error::UnknownVtpm(what.to_string())),
            (status::AUTHFAIL, _) => {
                Err(Error::NotAuthorized("the manager refused (is this its admin socket, or its admin domain?)".into()))
            }
            (status::EXISTS, _) => Err(Error::Exists(format!("{what} exists already at the manager"))),
            (status::BAD_PARAMETER, _) => Err(Error::Protocol(format!("the manager refused {what} (see its log)"))),
            (st, _) => Err(Error::Protocol(format!("the manager failed {what} with status {st} (see its log)"))),
        }
    }

    /// Provisions a vTPM (a random uuid unless given); its uuid.
    pub fn provision(&mut self, uuid: Option<[u8; 16]>, group: u32, token: Option<&[u8; 32]>) -> Result<[u8; 16]> {
        // A token travels after a uuid: with no uuid given, the tool picks one.
        let named = match (uuid, token) {
            (Some(u), t) => Some((Uuid(u), t.copied().map(Secret))),
            (None, Some(t)) => Some((Uuid::from_random(rand::random()), Some(Secret(*t)))),
            (None, None) => None,
        };
        // The group is what can be missing; the uuid what can exist already.
        match self.call(&Request::VtpmNew { group, named }, &format!("group {group}")) {
            Err(Error::Exists(_)) => Err(Error::Exists(match uuid {
                Some(u) => format!("vTPM {} is already provisioned", uuid_str(&u)),
                None => "a vTPM with that uuid is already provisioned".into(),
            })),
            r => uuid_at(&r?),
        }
    }

    /// The vTPMs of `group` (fetched a page at a time).
    pub fn list(&mut self, group: u32) -> Result<Vec<[u8; 16]>> {
        let mut all = Vec::new();
        loop {
            let offset = all.len() as u32;
            let out = self.call(&Request::VtpmList { group, offset }, "the list")?;
            let page = Page::<16>::decode(&out).map_err(malformed)?;
            let empty = page.items.is_empty();
            all.extend(page.items);
            if all.len() >= page.total as usize || empty {
                return Ok(all);
            }
        }
    }

    /// One vTPM.
    pub fn show(&mut self, uuid: &[u8; 16]) -> Result<VtpmInfo> {
        let out = self.call(&Request::VtpmShow { uuid: Uuid(*uuid) }, &format!("vTPM {}", uuid_str(uuid)))?;
        let v = VtpmShow::decode(&out).map_err(malformed)?;
        Ok(VtpmInfo { uuid: *uuid, group: v.group, has_key: v.has_key, exported: v.exported })
    }

    /// The manager's migration public key (what `export` at another manager takes).
    pub fn migration_key(&mut self) -> Result<Vec<u8>> {
        self.call(&Request::MigrationKey, "the migration key")
    }

    /// The public part of the key that signs this manager's deep quotes (TPM 2.0: TPMT_PUBLIC;
    /// TPM 1.2: TPM_PUBKEY).
    pub fn attestation_key(&mut self) -> Result<Vec<u8>> {
        self.call(&Request::AttestationKey, "the attestation key")
    }

    /// Exports a vTPM to the manager whose migration identity is `to`: the bundle (and the
    /// vTPM is frozen at this manager). A vTPM exported to another manager already goes only
    /// with `force`.
    pub fn export(&mut self, uuid: &[u8; 16], to: &[u8], force: bool) -> Result<Vec<u8>> {
        // Checked here too, so a bad key gets its reason (the manager answers a status only).
        crate::migrate::check_public(to)?;
        let r = Request::VtpmExport { uuid: Uuid(*uuid), to: to.to_vec(), force };
        match self.call(&r, &format!("vTPM {}", uuid_str(uuid))) {
            Err(Error::Exists(_)) => Err(Error::Exists(format!(
                "vTPM {} was exported to another manager already: export it to that one again, or, if its \
                 bundle is lost for good, use --force",
                uuid_str(uuid)
            ))),
            r => r,
        }
    }

    /// Pins the source manager whose migration identity is `source` (bundles it signs are
    /// imported here); `false`: pinned already.
    pub fn trust_source(&mut self, source: &[u8]) -> Result<bool> {
        crate::migrate::check_public(source)?;
        let out = self.call(&Request::MigrationTrust { source: source.to_vec() }, "the migration source")?;
        Ok(out == 1u32.to_be_bytes())
    }

    /// Unpins a source manager; `false`: it was not pinned.
    pub fn distrust_source(&mut self, source: &[u8]) -> Result<bool> {
        crate::migrate::check_public(source)?;
        let out = self.call(&Request::MigrationDistrust { source: source.to_vec() }, "the migration source")?;
        Ok(out == 1u32.to_be_bytes())
    }

    /// Imports a bundle into `group`; the vTPM's uuid.
    pub fn import(&mut self, bundle: &[u8], group: u32) -> Result<[u8; 16]> {
        // The reasons a manager can only answer with a status, checked here first.
        let to = crate::migrate::destination(bundle)?;
        let mine = self.migration_key()?;
        if to != mine.as_slice() {
            return Err(Error::NotAuthorized(format!(
                "the bundle was made for another manager's migration key ({}...), not this one's ({}...)",
                crate::hex(&to[1..9]),
                crate::hex(&mine[1..9])
            )));
        }
        match self.call(&Request::VtpmImport { group, bundle: bundle.to_vec() }, &format!("group {group}")) {
            Err(Error::NotAuthorized(_)) => Err(Error::NotAuthorized(format!(
                "refused: the bundle does not authenticate (damaged or forged), or its source manager ({}...) is \
                 not pinned here (`xvtpm vtpm trust-source`); the manager's log says which",
                crate::hex(&crate::migrate::source(bundle)?[1..9])
            ))),
            Err(Error::Exists(_)) => Err(Error::Exists(
                "the bundle's vTPM is already provisioned at this manager, or this bundle was imported here before"
                    .into(),
            )),
            r => uuid_at(&r?),
        }
    }

    /// Binds a vTPM's socket clients to `uid`, or (`None`) clears the binding so that the next
    /// BIND records one.
    pub fn set_uid(&mut self, uuid: &[u8; 16], uid: Option<u32>) -> Result<()> {
        self.call(&Request::VtpmSetUid { uuid: Uuid(*uuid), uid }, &format!("vTPM {}", uuid_str(uuid))).map(drop)
    }

    /// Deletes a vTPM and its key.
    pub fn delete(&mut self, uuid: &[u8; 16]) -> Result<()> {
        self.call(&Request::VtpmDel { uuid: Uuid(*uuid) }, &format!("vTPM {}", uuid_str(uuid))).map(drop)
    }

    /// Creates a group.
    pub fn group_new(&mut self) -> Result<GroupInfo> {
        let out = self.call(&Request::GroupNew, "the new group")?;
        let number = mgr::decode_u32(&out).map_err(malformed)?;
        Ok(GroupInfo { number, uuid: uuid_at(out.get(4..).unwrap_or_default())?, vtpms: 0 })
    }

    /// Every group.
    pub fn groups(&mut self) -> Result<Vec<GroupInfo>> {
        let mut numbers: Vec<u32> = Vec::new();
        loop {
            let offset = numbers.len() as u32;
            let out = self.call(&Request::GroupList { offset }, "the group list")?;
            let page = Page::<4>::decode(&out).map_err(malformed)?;
            let before = numbers.len();
            numbers.extend(page.items.into_iter().map(u32::from_be_bytes));
            if numbers.len() >= page.total as usize || numbers.len() == before {
                break;
            }
        }
        numbers
            .into_iter()
            .map(|n| {
                let g = self.call(&Request::GroupShow { group: n }, &format!("group {n}"))?;
                let g = GroupShow::decode(&g).map_err(malformed)?;
                Ok(GroupInfo { number: n, uuid: g.uuid.0, vtpms: g.vtpms })
            })
            .collect()
    }

    /// Deletes an empty group.
    pub fn group_delete(&mut self, n: u32) -> Result<()> {
        self.call(&Request::GroupDel { group: n }, &format!("group {n}")).map(drop)
    }

    /// Approves `boot_hash` for the vTPMs of group `n`; `false`: it was approved already.
    pub fn approve(&mut self, n: u32, boot_hash: &[u8; 32]) -> Result<bool> {
        let out = self.call(&Request::GroupApprove { group: n, hash: *boot_hash }, &format!("group {n}"))?;
        Ok(mgr::decode_u32(&out).map_err(malformed)? != 0)
    }

    /// Withdraws an approval; `false`: it was not approved.
    pub fn revoke(&mut self, n: u32, boot_hash: &[u8; 32]) -> Result<bool> {
        let out = self.call(&Request::GroupRevoke { group: n, hash: *boot_hash }, &format!("group {n}"))?;
        Ok(mgr::decode_u32(&out).map_err(malformed)? != 0)
    }

    /// The boot hashes approved for group `n` (empty: its vTPMs may run with any).
    pub fn approved(&mut self, n: u32) -> Result<Vec<[u8; 32]>> {
        let mut hashes: Vec<[u8; 32]> = Vec::new();
        loop {
            let offset = hashes.len() as u32;
            let out = self.call(&Request::GroupApproved { group: n, offset }, &format!("group {n}"))?;
            let page = Page::<32>::decode(&out).map_err(malformed)?;
            let count = page.total as usize;
            let before = hashes.len();
            hashes.extend(page.items);
            if hashes.len() == count {
                return Ok(hashes);
            }
            if hashes.len() == before || hashes.len() > count {
                return Err(Error::Protocol(format!("the manager listed {} of {count} approved hashes", hashes.len())));
            }
        }
    }
}
