//! Permissions as C xenstored applies them: the access a domain has to a node, the error a
//! request gets for a node it may not use, and who owns what a domain creates or changes.

use super::paths::parent_of;
use super::transaction::StoreView;
use super::tree::Node;
use super::XsResult;
use crate::{DomId, Perm, PermAccess, XsErrno};

/// Access bits, as C xenstored's `XS_PERM_*`.
pub(super) const PERM_READ: u8 = 1;
pub(super) const PERM_WRITE: u8 = 2;
pub(super) const PERM_OWNER: u8 = 4;

/// C xenstored's `perm_for_conn` as access bits.
pub(super) fn perm_for(domid: DomId, perms: &[Perm]) -> u8 {
    let Some((owner, others)) = perms.split_first() else { return 0 };
    if domid == 0 || owner.domid == domid {
        return PERM_READ | PERM_WRITE | PERM_OWNER;
    }
    let entry = others.iter().find(|p| p.domid == domid).unwrap_or(owner);
    match entry.access {
        PermAccess::None => 0,
        PermAccess::Read => PERM_READ,
        PermAccess::Write => PERM_WRITE,
        PermAccess::Both => PERM_READ | PERM_WRITE,
    }
}

/// C xenstored's `get_node`: the node if `domid` has the `need`ed access. A missing or
/// forbidden node is ENOENT only if the nearest existing ancestor grants that access, else
/// EACCES, so the error does not reveal what the domain may not see.
pub(super) fn get_node(view: &mut StoreView<'_>, domid: DomId, path: &str, need: u8) -> XsResult<Node> {
    let errno = match view.get(path) {
        Some(node) if perm_for(domid, &node.perms) & need == need => return Ok(node.clone()),
        Some(_) => XsErrno::EACCES,
        None => XsErrno::ENOENT,
    };
    let mut ancestor = path;
    let parent_perm = loop {
        if ancestor == "/" {
            break 0;
        }
        ancestor = parent_of(ancestor);
        if let Some(node) = view.get(ancestor) {
            break perm_for(domid, &node.perms);
        }
    };
    Err(if parent_perm & need != 0 { errno } else { XsErrno::EACCES })
}

/// The permissions of a node `creator` makes below a node with `parent` permissions: the
/// parent's, owned by the creator unless that is dom0.
pub(super) fn inherited(parent: &[Perm], creator: DomId) -> Vec<Perm> {
    let mut perms = parent.to_vec();
    if creator != 0 {
        if let Some(owner) = perms.first_mut() {
            owner.domid = creator;
        }
    }
    perms
}

/// Whether `domid` may replace a node's permissions `old` by `new`: only dom0 may give a
/// node another owner.
pub(super) fn keeps_owner(domid: DomId, old: &[Perm], new: &[Perm]) -> bool {
    domid == 0 || new.first().map(|p| p.domid) == old.first().map(|p| p.domid)
}

#[cfg(test)]
mod tests {
    use super::super::paths::home;
    use super::super::test_support::{client, errno, make_home, perm, server, NONE};
    use crate::{PermAccess, XsErrno};

    #[test]
    fn permissions() {
        let sim = server("perms");
        let dom0 = client(&sim, 0);
        make_home(&dom0, 5);
        let domu = client(&sim, 5);

        dom0.write(NONE, "/secret", b"s").expect("write");
        assert_eq!(dom0.get_perms(NONE, "/secret").expect("perms"), [perm(PermAccess::None, 0)]);
        assert_eq!(errno(domu.read(NONE, "/secret")), XsErrno::EACCES);
        assert_eq!(errno(domu.write(NONE, "/secret", b"x")), XsErrno::EACCES);
        assert_eq!(errno(domu.directory(NONE, "/secret")), XsErrno::EACCES);
        assert_eq!(errno(domu.get_perms(NONE, "/secret")), XsErrno::EACCES);
        assert_eq!(errno(domu.rm(NONE, "/secret")), XsErrno::EACCES);
        // Missing nodes: ENOENT where the domain may look, EACCES where it may not.
        assert_eq!(errno(domu.read(NONE, "/local/domain/5/missing")), XsErrno::ENOENT);
        assert_eq!(errno(domu.read(NONE, "/secret/missing")), XsErrno::EACCES);
        assert_eq!(errno(dom0.read(NONE, "/secret/missing")), XsErrno::ENOENT);
        assert_eq!(errno(domu.write(NONE, "/local/domain/9/x", b"v")), XsErrno::EACCES);
        assert_eq!(dom0.try_read(NONE, "/local/domain/9").expect("read"), None);

        dom0.write(NONE, "/shared", b"v").expect("write");
        dom0.set_perms(NONE, "/shared", &[perm(PermAccess::None, 0), perm(PermAccess::Read, 5)]).expect("grant r5");
        assert_eq!(domu.read(NONE, "/shared").expect("granted read"), b"v");
        assert_eq!(errno(domu.write(NONE, "/shared", b"w")), XsErrno::EACCES);
        dom0.set_perms(NONE, "/shared", &[perm(PermAccess::None, 0), perm(PermAccess::Both, 5)]).expect("grant b5");
        domu.write(NONE, "/shared", b"w").expect("granted write");
        assert_eq!(dom0.read(NONE, "/shared").expect("read"), b"w");
        assert_eq!(
            domu.get_perms(NONE, "/shared").expect("perms"),
            [perm(PermAccess::None, 0), perm(PermAccess::Both, 5)]
        );
        assert_eq!(errno(domu.set_perms(NONE, "/shared", &[perm(PermAccess::Both, 5)])), XsErrno::EACCES);
        // Default access for unlisted domains.
        dom0.write(NONE, "/public", b"p").expect("write");
        dom0.set_perms(NONE, "/public", &[perm(PermAccess::Read, 0)]).expect("world readable");
        assert_eq!(domu.read(NONE, "/public").expect("default read"), b"p");
        assert_eq!(errno(domu.write(NONE, "/public", b"x")), XsErrno::EACCES);

        // The owner may change its node's permissions but not give it away.
        domu.write(NONE, "mine", b"m").expect("write home");
        domu.set_perms(NONE, "mine", &[perm(PermAccess::None, 5), perm(PermAccess::Read, 7)]).expect("owner");
        assert_eq!(errno(domu.set_perms(NONE, "mine", &[perm(PermAccess::None, 7)])), XsErrno::EPERM);
        assert_eq!(errno(dom0.set_perms(NONE, "/shared", &[])), XsErrno::EINVAL);
    }

    #[test]
    fn created_nodes_inherit_perms_and_ownership() {
        let sim = server("inherit");
        let dom0 = client(&sim, 0);
        let domu = client(&sim, 5);
        let h = home(5);
        dom0.mkdir(NONE, &h).expect("mkdir");
        let home_perms = [perm(PermAccess::None, 5), perm(PermAccess::Read, 7)];
        dom0.set_perms(NONE, &h, &home_perms).expect("perms");

        domu.write(NONE, "dev/a", b"1").expect("write with a missing parent");
        assert_eq!(domu.get_perms(NONE, "dev").expect("perms"), home_perms);
        assert_eq!(domu.get_perms(NONE, "dev/a").expect("perms"), home_perms);
        dom0.write(NONE, &format!("{h}/fe"), b"x").expect("dom0 write");
        assert_eq!(dom0.get_perms(NONE, &format!("{h}/fe")).expect("perms"), home_perms, "dom0 keeps the owner");

        // A domain granted write on someone else's node owns what it creates below it.
        dom0.set_perms(NONE, &h, &[perm(PermAccess::None, 0), perm(PermAccess::Both, 5)]).expect("perms");
        domu.mkdir(NONE, "new/sub").expect("mkdir");
        let created = [perm(PermAccess::None, 5), perm(PermAccess::Both, 5)];
        assert_eq!(dom0.get_perms(NONE, &format!("{h}/new")).expect("perms"), created);
        assert_eq!(dom0.get_perms(NONE, &format!("{h}/new/sub")).expect("perms"), created);
        domu.set_perms(NONE, "new", &[perm(PermAccess::None, 5)]).expect("creator owns it");
    }
}
