//! The management commands, as an operator's tool calls them: over the admin socket, or over
//! a vtpm device to a manager in its own domain.

use std::path::Path;

use crate::proto::{self, status, TAG_REQ2};
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

fn be32(b: &[u8], at: usize) -> Result<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
        .ok_or_else(|| Error::Protocol("short reply from the manager".into()))
}

fn uuid_at(b: &[u8], at: usize) -> Result<[u8; 16]> {
    b.get(at..at + 16)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| Error::Protocol("short reply from the manager".into()))
}

impl Admin {
    /// Connects to the admin socket at `path`.
    pub fn connect(path: &Path) -> Result<Self> {
        Ok(Self::over(Box::new(Client::connect(path)?)))
    }

    /// Management commands over `link`.
    pub fn over(link: Box<dyn AdminLink>) -> Self {
        Self { link }
    }

    fn call(&mut self, ordinal: u32, body: &[u8], what: &str) -> Result<Vec<u8>> {
        let r = self.link.exchange(&proto::request(TAG_REQ2, ordinal, body))?;
        let reply = proto::split_reply(&r)
            .ok_or_else(|| Error::Protocol(format!("malformed reply of {} bytes from the manager", r.len())))?;
        match reply {
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
        let mut body = group.to_be_bytes().to_vec();
        match (uuid, token) {
            (Some(u), _) => body.extend_from_slice(&u),
            (None, Some(_)) => body.extend_from_slice(&crate::proto::random_uuid()),
            (None, None) => {}
        }
        if let Some(t) = token {
            body.extend_from_slice(t);
        }
        // The group is what can be missing; the uuid what can exist already.
        match self.call(proto::VTPM_NEW, &body, &format!("group {group}")) {
            Err(Error::Exists(_)) => Err(Error::Exists(match uuid {
                Some(u) => format!("vTPM {} is already provisioned", uuid_str(&u)),
                None => "a vTPM with that uuid is already provisioned".into(),
            })),
            r => uuid_at(&r?, 0),
        }
    }

    /// The vTPMs of `group` (fetched a page at a time).
    pub fn list(&mut self, group: u32) -> Result<Vec<[u8; 16]>> {
        let mut all = Vec::new();
        loop {
            let offset = all.len() as u32;
            let out = self.call(proto::VTPM_LIST, &[group.to_be_bytes(), offset.to_be_bytes()].concat(), "the list")?;
            let total = be32(&out, 0)? as usize;
            let page: Vec<[u8; 16]> =
                out.get(4..).unwrap_or_default().chunks_exact(16).map(|c| uuid_at(c, 0)).collect::<Result<_>>()?;
            let empty = page.is_empty();
            all.extend(page);
            if all.len() >= total || empty {
                return Ok(all);
            }
        }
    }

    /// One vTPM.
    pub fn show(&mut self, uuid: &[u8; 16]) -> Result<VtpmInfo> {
        let out = self.call(proto::VTPM_SHOW, uuid, &format!("vTPM {}", uuid_str(uuid)))?;
        Ok(VtpmInfo { uuid: *uuid, group: be32(&out, 0)?, has_key: be32(&out, 4)? != 0, exported: be32(&out, 8)? != 0 })
    }

    /// The manager's migration public key (what `export` at another manager takes).
    pub fn migration_key(&mut self) -> Result<Vec<u8>> {
        self.call(proto::MIGRATION_KEY, &[], "the migration key")
    }

    /// Exports a vTPM to the manager whose migration key is `to`: the bundle (and the vTPM is
    /// frozen at this manager).
    pub fn export(&mut self, uuid: &[u8; 16], to: &[u8]) -> Result<Vec<u8>> {
        // Checked here too, so a bad key gets its reason (the manager answers a status only).
        crate::migrate::check_public(to)?;
        self.call(proto::VTPM_EXPORT, &[&uuid[..], to].concat(), &format!("vTPM {}", uuid_str(uuid)))
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
        let body = [&group.to_be_bytes()[..], bundle].concat();
        match self.call(proto::VTPM_IMPORT, &body, &format!("group {group}")) {
            Err(Error::NotAuthorized(_)) => {
                Err(Error::NotAuthorized("the bundle does not authenticate at this manager (damaged?)".into()))
            }
            Err(Error::Exists(_)) => {
                Err(Error::Exists("the bundle's vTPM is already provisioned at this manager".into()))
            }
            r => uuid_at(&r?, 0),
        }
    }

    /// Deletes a vTPM and its key.
    pub fn delete(&mut self, uuid: &[u8; 16]) -> Result<()> {
        self.call(proto::VTPM_DEL, uuid, &format!("vTPM {}", uuid_str(uuid))).map(drop)
    }

    /// Creates a group.
    pub fn group_new(&mut self) -> Result<GroupInfo> {
        let out = self.call(proto::GROUP_NEW, &[], "the new group")?;
        Ok(GroupInfo { number: be32(&out, 0)?, uuid: uuid_at(&out, 4)?, vtpms: 0 })
    }

    /// Every group.
    pub fn groups(&mut self) -> Result<Vec<GroupInfo>> {
        let mut numbers: Vec<u32> = Vec::new();
        loop {
            let offset = numbers.len() as u32;
            let out = self.call(proto::GROUP_LIST, &offset.to_be_bytes(), "the group list")?;
            let total = be32(&out, 0)? as usize;
            let before = numbers.len();
            numbers.extend(
                out.get(4..).unwrap_or_default().chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]])),
            );
            if numbers.len() >= total || numbers.len() == before {
                break;
            }
        }
        numbers
            .into_iter()
            .map(|n| {
                let g = self.call(proto::GROUP_SHOW, &n.to_be_bytes(), &format!("group {n}"))?;
                Ok(GroupInfo { number: n, uuid: uuid_at(&g, 0)?, vtpms: be32(&g, 16)? })
            })
            .collect()
    }

    /// Deletes an empty group.
    pub fn group_delete(&mut self, n: u32) -> Result<()> {
        self.call(proto::GROUP_DEL, &n.to_be_bytes(), &format!("group {n}")).map(drop)
    }

    /// Approves `boot_hash` for the vTPMs of group `n`; `false`: it was approved already.
    pub fn approve(&mut self, n: u32, boot_hash: &[u8; 32]) -> Result<bool> {
        let out =
            self.call(proto::GROUP_APPROVE, &[&n.to_be_bytes()[..], boot_hash].concat(), &format!("group {n}"))?;
        Ok(be32(&out, 0)? != 0)
    }

    /// Withdraws an approval; `false`: it was not approved.
    pub fn revoke(&mut self, n: u32, boot_hash: &[u8; 32]) -> Result<bool> {
        let out = self.call(proto::GROUP_REVOKE, &[&n.to_be_bytes()[..], boot_hash].concat(), &format!("group {n}"))?;
        Ok(be32(&out, 0)? != 0)
    }

    /// The boot hashes approved for group `n` (empty: its vTPMs may run with any).
    pub fn approved(&mut self, n: u32) -> Result<Vec<[u8; 32]>> {
        let mut hashes: Vec<[u8; 32]> = Vec::new();
        loop {
            let offset = hashes.len() as u32;
            let req = [n.to_be_bytes(), offset.to_be_bytes()].concat();
            let out = self.call(proto::GROUP_APPROVED, &req, &format!("group {n}"))?;
            let count = be32(&out, 0)? as usize;
            let before = hashes.len();
            hashes.extend(out[4..].chunks_exact(32).filter_map(|c| <[u8; 32]>::try_from(c).ok()));
            if hashes.len() == count {
                return Ok(hashes);
            }
            if hashes.len() == before || hashes.len() > count {
                return Err(Error::Protocol(format!("the manager listed {} of {count} approved hashes", hashes.len())));
            }
        }
    }
}
