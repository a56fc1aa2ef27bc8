//! The store's node tree and the requests on its nodes (read, write, mkdir, rm, directory,
//! get_perms, set_perms), with the semantics of C xenstored.

use std::collections::HashMap;

use super::args::{onearg, strings};
use super::paths::{basename, child_path, node_path, parent_of, SPECIAL_PATHS};
use super::perms::{get_node, inherited, keeps_owner, PERM_OWNER, PERM_READ, PERM_WRITE};
use super::transaction::StoreView;
use super::watch::WatchTrigger;
use super::XsResult;
use crate::xenstore::wire::{self, MsgType};
use crate::{DomId, Perm, PermAccess, Result, XsErrno};

/// One node of the store.
#[derive(Debug, Clone)]
pub(super) struct Node {
    pub(super) value: Vec<u8>,
    /// Never empty: the first entry is the owner and the access of unlisted domains.
    pub(super) perms: Vec<Perm>,
    /// Child names in creation order, as C xenstored lists them.
    pub(super) children: Vec<String>,
    /// Bumped on every committed change of the node (value, perms or children).
    gen: u64,
}

/// The committed store, keyed by absolute path.
#[derive(Debug)]
pub(super) struct Tree {
    nodes: HashMap<String, Node>,
    next_gen: u64,
}

impl Tree {
    pub(super) fn new() -> Self {
        let mut tree = Tree { nodes: HashMap::new(), next_gen: 1 };
        let perms = vec![Perm { domid: 0, access: PermAccess::None }];
        for (path, child) in [("/", Some("local")), ("/local", Some("domain")), ("/local/domain", None)] {
            let children = child.map(str::to_owned).into_iter().collect();
            tree.store(path, Node { value: Vec::new(), perms: perms.clone(), children, gen: 0 });
        }
        tree
    }

    pub(super) fn get(&self, path: &str) -> Option<&Node> {
        self.nodes.get(path)
    }

    pub(super) fn store(&mut self, path: &str, mut node: Node) {
        node.gen = self.next_gen;
        self.next_gen += 1;
        self.nodes.insert(path.to_owned(), node);
    }

    pub(super) fn remove(&mut self, path: &str) {
        self.nodes.remove(path);
    }

    pub(super) fn gen(&self, path: &str) -> Option<u64> {
        self.nodes.get(path).map(|n| n.gen)
    }
}

/// The requests on nodes: read, write, mkdir, rm, directory, get_perms, set_perms.
pub(super) fn node_op(
    view: &mut StoreView<'_>,
    domid: DomId,
    ty: MsgType,
    payload: &[u8],
) -> XsResult<(Vec<u8>, Vec<WatchTrigger>)> {
    let ok = || wire::OK.to_vec();
    match ty {
        MsgType::Read => {
            let path = node_path(domid, onearg(payload)?)?;
            Ok((get_node(view, domid, &path, PERM_READ)?.value, Vec::new()))
        }
        MsgType::Directory => {
            let path = node_path(domid, onearg(payload)?)?;
            let node = get_node(view, domid, &path, PERM_READ)?;
            let names: Vec<&[u8]> = node.children.iter().map(|c| c.as_bytes()).collect();
            Ok((wire::nul_terminated(&names), Vec::new()))
        }
        MsgType::GetPerms => {
            let path = node_path(domid, onearg(payload)?)?;
            let node = get_node(view, domid, &path, PERM_READ)?;
            let perms: Vec<String> = node.perms.iter().map(Perm::encode).collect();
            let parts: Vec<&[u8]> = perms.iter().map(|p| p.as_bytes()).collect();
            Ok((wire::nul_terminated(&parts), Vec::new()))
        }
        MsgType::Write => {
            let nul = payload.iter().position(|b| *b == 0).ok_or(XsErrno::EINVAL)?;
            let path = node_path(domid, &payload[..nul])?;
            let value = payload[nul + 1..].to_vec();
            let node = match get_node(view, domid, &path, PERM_WRITE) {
                Ok(mut node) => {
                    node.value = value;
                    view.put(&path, Some(node.clone()));
                    node
                }
                Err(XsErrno::ENOENT) => create(view, domid, &path, value)?,
                Err(e) => return Err(e),
            };
            let trigger = WatchTrigger::new(view, &path, false, node.perms, None);
            Ok((ok(), vec![trigger]))
        }
        MsgType::Mkdir => {
            let path = node_path(domid, onearg(payload)?)?;
            match get_node(view, domid, &path, PERM_WRITE) {
                // C xenstored neither changes nor fires anything for an existing node.
                Ok(_) => Ok((ok(), Vec::new())),
                Err(XsErrno::ENOENT) => {
                    let node = create(view, domid, &path, Vec::new())?;
                    let trigger = WatchTrigger::new(view, &path, false, node.perms, None);
                    Ok((ok(), vec![trigger]))
                }
                Err(e) => Err(e),
            }
        }
        MsgType::Rm => {
            let path = node_path(domid, onearg(payload)?)?;
            match get_node(view, domid, &path, PERM_WRITE) {
                Ok(_) if path == "/" => Err(XsErrno::EINVAL),
                Ok(_) => {
                    let mut triggers = Vec::new();
                    remove_subtree(view, &path, true, &mut triggers);
                    let parent_path = parent_of(&path);
                    if let Some(mut parent) = view.get(parent_path).cloned() {
                        parent.children.retain(|c| c != basename(&path));
                        view.put(parent_path, Some(parent));
                    }
                    Ok((ok(), triggers))
                }
                // As C xenstored: removing a missing node is fine if its parent exists.
                Err(XsErrno::ENOENT) if view.get(parent_of(&path)).is_some() => Ok((ok(), Vec::new())),
                Err(e) => Err(e),
            }
        }
        MsgType::SetPerms => {
            let args = strings(payload);
            let (&raw, perm_args) = args.split_first().ok_or(XsErrno::EINVAL)?;
            if perm_args.is_empty() {
                return Err(XsErrno::EINVAL);
            }
            let perms = perm_args.iter().map(|p| Perm::parse(p)).collect::<Result<Vec<_>>>();
            let perms = perms.map_err(|_| XsErrno::EINVAL)?;
            if raw.starts_with(b"@") {
                // Special paths have no node; only dom0 may set their (unused here) permissions.
                return match SPECIAL_PATHS.iter().any(|s| s.as_bytes() == raw) {
                    false => Err(XsErrno::EINVAL),
                    true if domid != 0 => Err(XsErrno::EACCES),
                    true => Ok((ok(), Vec::new())),
                };
            }
            let path = node_path(domid, raw)?;
            let mut node = get_node(view, domid, &path, PERM_WRITE | PERM_OWNER)?;
            if !keeps_owner(domid, &node.perms, &perms) {
                return Err(XsErrno::EPERM);
            }
            let old = std::mem::replace(&mut node.perms, perms);
            view.put(&path, Some(node.clone()));
            let trigger = WatchTrigger::new(view, &path, false, node.perms, Some(old));
            Ok((ok(), vec![trigger]))
        }
        _ => Err(XsErrno::ENOSYS),
    }
}

/// Creates `path` and its missing ancestors; each new node inherits its parent's
/// permissions, owned by the creator unless that is dom0.
fn create(view: &mut StoreView<'_>, domid: DomId, path: &str, value: Vec<u8>) -> XsResult<Node> {
    let mut missing = vec![path.to_owned()];
    let mut parent_path = parent_of(path).to_owned();
    let mut parent = loop {
        if let Some(node) = view.get(&parent_path) {
            break node.clone();
        }
        if parent_path == "/" {
            return Err(XsErrno::EIO);
        }
        missing.push(parent_path.clone());
        parent_path = parent_of(&parent_path).to_owned();
    };
    for p in missing.iter().rev() {
        parent.children.push(basename(p).to_owned());
        let perms = inherited(&parent.perms, domid);
        view.put(&parent_path, Some(parent));
        parent = Node { value: Vec::new(), perms, children: Vec::new(), gen: 0 };
        parent_path.clone_from(p);
    }
    parent.value = value;
    view.put(path, Some(parent.clone()));
    Ok(parent)
}

/// Removes `path` and everything below, children first. As C xenstored, each removed
/// descendant fires the watches on exactly it, and the top node fires its own and its
/// ancestors' watches, each judged by the permissions the node had.
fn remove_subtree(view: &mut StoreView<'_>, path: &str, top: bool, triggers: &mut Vec<WatchTrigger>) {
    let Some(node) = view.get(path).cloned() else { return };
    for child in &node.children {
        remove_subtree(view, &child_path(path, child), false, triggers);
    }
    let trigger = WatchTrigger::new(view, path, !top, node.perms, None);
    triggers.push(trigger);
    view.put(path, None);
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{client, errno, perm, server, NONE};
    use crate::xenstore::wire::ABS_PATH_MAX;
    use crate::{PermAccess, XsErrno};

    #[test]
    fn read_write_mkdir_rm_directory() {
        let sim = server("basic");
        let xs = client(&sim, 0);
        assert_eq!(xs.directory(NONE, "/").expect("dir /"), ["local"]);
        assert_eq!(xs.directory(NONE, "/local").expect("dir"), ["domain"]);
        assert!(xs.directory(NONE, "/local/domain").expect("dir").is_empty());
        assert_eq!(xs.get_perms(NONE, "/").expect("perms"), [perm(PermAccess::None, 0)]);

        xs.write(NONE, "/a/b", b"hello").expect("write");
        assert_eq!(xs.read(NONE, "/a/b").expect("read"), b"hello");
        assert_eq!(xs.read(NONE, "/a").expect("parent made"), b"");
        xs.write(NONE, "/a/c", b"x\0y").expect("binary value");
        assert_eq!(xs.read(NONE, "/a/c").expect("read"), b"x\0y");
        xs.write(NONE, "/a/b", b"").expect("overwrite");
        assert_eq!(xs.read(NONE, "/a/b").expect("read"), b"");
        xs.mkdir(NONE, "/a/d/e").expect("mkdir");
        xs.mkdir(NONE, "/a/d/e").expect("mkdir of an existing node");
        xs.write(NONE, "/a/d", b"keep").expect("write");
        xs.mkdir(NONE, "/a/d").expect("mkdir keeps the value");
        assert_eq!(xs.read(NONE, "/a/d").expect("read"), b"keep");
        assert_eq!(xs.directory(NONE, "/a").expect("dir"), ["b", "c", "d"]);
        assert!(xs.directory(NONE, "/a/b").expect("leaf").is_empty());
        assert_eq!(xs.directory(NONE, "/").expect("dir /"), ["local", "a"]);

        xs.rm(NONE, "/a/d").expect("rm subtree");
        assert_eq!(errno(xs.read(NONE, "/a/d/e")), XsErrno::ENOENT);
        assert_eq!(xs.directory(NONE, "/a").expect("dir"), ["b", "c"]);
        xs.rm(NONE, "/a").expect("rm");
        assert_eq!(xs.try_read(NONE, "/a/b").expect("try_read"), None);
        assert_eq!(xs.directory(NONE, "/").expect("dir /"), ["local"]);
        xs.rm(NONE, "/a").expect("rm of a missing node whose parent exists");
        assert_eq!(errno(xs.rm(NONE, "/a/b")), XsErrno::ENOENT);
        assert_eq!(errno(xs.rm(NONE, "/")), XsErrno::EINVAL);
        assert_eq!(errno(xs.directory(NONE, "/nope")), XsErrno::ENOENT);
        assert_eq!(xs.get_domain_path(7).expect("domain path"), "/local/domain/7");

        let long = format!("/{}", "x".repeat(ABS_PATH_MAX));
        for bad in ["/a//b", "/a/", "/a b", "", "/\u{e4}", "/a\nb", long.as_str()] {
            assert_eq!(errno(xs.write(NONE, bad, b"v")), XsErrno::EINVAL, "{bad:?}");
            assert_eq!(errno(xs.read(NONE, bad)), XsErrno::EINVAL, "{bad:?}");
        }
        xs.write(NONE, "/ok-_@9/Z", b"v").expect("all valid characters");
    }
}
