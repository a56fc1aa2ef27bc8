//! Watches: what a connection watches, which changes trigger which watches, and which
//! domains may see the events, as in C xenstored.

use super::args::strings;
use super::paths::{canonical, home, is_child, node_path, parent_of};
use super::perms::{perm_for, PERM_READ};
use super::transaction::StoreView;
use super::XsResult;
use crate::{DomId, Perm, XsErrno};

/// Watches one connection may hold (C xenstored's default watch quota).
const MAX_WATCHES: usize = 128;
/// `XENSTORE_REL_PATH_MAX`, the length limit of special ("@...") watch paths.
const REL_PATH_MAX: usize = 2048;

/// A change that triggers watches: on `path` and its ancestors, or (`exact`) on `path` only.
/// The permissions are taken when the change happens so that a removed node, or one changed
/// inside a transaction, is judged as it was.
#[derive(Debug, Clone)]
pub(super) struct WatchTrigger {
    path: String,
    exact: bool,
    perms: Vec<Perm>,
    parent_perms: Option<Vec<Perm>>,
    old_perms: Option<Vec<Perm>>,
}

impl WatchTrigger {
    /// The trigger of a change to `path`, whose node has (or, if removed, had) `perms`, and
    /// `old_perms` before a permission change.
    pub(super) fn new(
        view: &mut StoreView<'_>,
        path: &str,
        exact: bool,
        perms: Vec<Perm>,
        old_perms: Option<Vec<Perm>>,
    ) -> Self {
        let parent_perms = if path == "/" { None } else { view.get(parent_of(path)).map(|p| p.perms.clone()) };
        WatchTrigger { path: path.to_owned(), exact, perms, parent_perms, old_perms }
    }

    /// The trigger of special watch `name` ("@releaseDomain"): dom0's alone, as C xenstored's
    /// special nodes are by default.
    pub(super) fn special(name: &str) -> Self {
        let perms = vec![Perm { domid: 0, access: crate::PermAccess::None }];
        WatchTrigger { path: name.to_owned(), exact: true, perms, parent_perms: None, old_perms: None }
    }

    /// C xenstored's `watch_permitted`: the watcher may read the node (before or after a
    /// permission change) or its parent.
    fn permitted(&self, domid: DomId) -> bool {
        let readable = |p: &[Perm]| perm_for(domid, p) & PERM_READ != 0;
        self.old_perms.as_deref().is_some_and(readable)
            || readable(&self.perms)
            || self.parent_perms.as_deref().is_some_and(readable)
    }

    fn matches(&self, watch: &str) -> bool {
        if self.exact {
            self.path == watch
        } else {
            is_child(&self.path, watch)
        }
    }
}

#[derive(Debug)]
struct Watch {
    /// Absolute path, or a special "@..." name.
    node: String,
    token: Vec<u8>,
    /// Registered with a relative path: events name paths relative to the domain's home.
    relative: bool,
}

/// The watches of one connection; `domid` in its methods is the connection's domain.
#[derive(Debug, Default)]
pub(super) struct WatchList {
    watches: Vec<Watch>,
}

impl WatchList {
    /// XS_WATCH: adds the watch of a request payload and returns its first event, which
    /// names the path as the client gave it: (path, token).
    pub(super) fn add(&mut self, domid: DomId, payload: &[u8]) -> XsResult<(String, Vec<u8>)> {
        let args = strings(payload);
        let [path, token] = args[..] else { return Err(XsErrno::EINVAL) };
        let path = std::str::from_utf8(path).map_err(|_| XsErrno::EINVAL)?;
        let (node, relative) = if path.starts_with('@') {
            if path.len() > REL_PATH_MAX {
                return Err(XsErrno::EINVAL);
            }
            (path.to_owned(), false)
        } else {
            (node_path(domid, path.as_bytes())?, !path.starts_with('/'))
        };
        if self.watches.iter().any(|w| w.node == node && w.token == token) {
            return Err(XsErrno::EEXIST);
        }
        if self.watches.len() >= MAX_WATCHES {
            return Err(XsErrno::E2BIG);
        }
        self.watches.push(Watch { node, token: token.to_vec(), relative });
        Ok((path.to_owned(), token.to_vec()))
    }

    /// XS_UNWATCH: removes the watch of a request payload.
    pub(super) fn remove(&mut self, domid: DomId, payload: &[u8]) -> XsResult<()> {
        let args = strings(payload);
        let [path, token] = args[..] else { return Err(XsErrno::EINVAL) };
        let path = std::str::from_utf8(path).map_err(|_| XsErrno::ENOENT)?;
        let node = canonical(domid, path);
        let i = self.watches.iter().position(|w| w.node == node && w.token == token).ok_or(XsErrno::ENOENT)?;
        self.watches.remove(i);
        Ok(())
    }

    pub(super) fn clear(&mut self) {
        self.watches.clear();
    }

    /// The events `trigger` causes on these watches: (path, token) pairs, the path relative
    /// to the domain's home for watches registered with a relative path.
    pub(super) fn events<'a>(
        &'a self,
        domid: DomId,
        trigger: &'a WatchTrigger,
    ) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        let permitted = trigger.permitted(domid);
        self.watches.iter().filter(move |w| permitted && trigger.matches(&w.node)).map(move |w| {
            let home = home(domid);
            let path = match trigger.path.strip_prefix(home.as_str()) {
                Some(rest) if w.relative => rest.strip_prefix('/').unwrap_or(rest),
                _ => trigger.path.as_str(),
            };
            (path, w.token.as_slice())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::paths::home;
    use super::super::test_support::{client, errno, ev, event, events, make_home, pairs, perm, server, NONE};
    use super::MAX_WATCHES;
    use crate::{PermAccess, XsErrno};

    #[test]
    fn watches_fire_on_changes_below() {
        let sim = server("watch");
        let w = client(&sim, 0);
        let xs = client(&sim, 0);
        w.watch("/a", "tA").expect("watch");
        assert_eq!(event(&w), ev("/a", "tA"));
        w.watch("/mark", "m").expect("watch");
        assert_eq!(event(&w), ev("/mark", "m"));

        xs.write(NONE, "/a/b/c", b"1").expect("write");
        assert_eq!(event(&w), ev("/a/b/c", "tA"));
        xs.write(NONE, "/a", b"2").expect("write");
        assert_eq!(event(&w), ev("/a", "tA"));
        // Neither "/ab" nor a no-op mkdir fires; the marker write shows nothing came before.
        xs.write(NONE, "/ab", b"x").expect("write");
        xs.mkdir(NONE, "/a/b").expect("mkdir existing");
        xs.write(NONE, "/mark", b"1").expect("write");
        assert_eq!(event(&w), ev("/mark", "m"));
        xs.mkdir(NONE, "/a/new").expect("mkdir");
        assert_eq!(event(&w), ev("/a/new", "tA"));
        xs.set_perms(NONE, "/a/new", &[perm(PermAccess::Read, 0)]).expect("set_perms");
        assert_eq!(event(&w), ev("/a/new", "tA"));

        w.watch("/a/b/c", "deep").expect("watch");
        assert_eq!(event(&w), ev("/a/b/c", "deep"));
        w.watch("/a/b/none", "none").expect("watch");
        assert_eq!(event(&w), ev("/a/b/none", "none"));
        xs.rm(NONE, "/a").expect("rm");
        assert_eq!(events(&w, 2), pairs(&[("/a", "tA"), ("/a/b/c", "deep")]));
        xs.write(NONE, "/mark", b"2").expect("write");
        assert_eq!(event(&w), ev("/mark", "m"), "a watch on a node that did not exist stays quiet");

        w.unwatch("/a", "tA").expect("unwatch");
        xs.write(NONE, "/a/again", b"1").expect("write");
        xs.write(NONE, "/mark", b"3").expect("write");
        assert_eq!(event(&w), ev("/mark", "m"));

        assert_eq!(errno(w.watch("/mark", "m")), XsErrno::EEXIST);
        w.watch("/mark", "m2").expect("same path, other token");
        assert_eq!(event(&w), ev("/mark", "m2"));
        assert_eq!(errno(w.unwatch("/nope", "m")), XsErrno::ENOENT);
        assert_eq!(errno(w.watch("/bad//path", "t")), XsErrno::EINVAL);
        w.watch("@releaseDomain", "rel").expect("special watch");
        assert_eq!(event(&w), ev("@releaseDomain", "rel"));
        w.watch("/", "root").expect("root watch");
        assert_eq!(event(&w), ev("/", "root"));
        xs.write(NONE, "/z", b"1").expect("write");
        assert_eq!(event(&w), ev("/z", "root"));
    }

    /// `XS_RELEASE` from dom0 fires `@releaseDomain` for dom0's watchers only; another domain
    /// may neither release nor hear of it.
    #[test]
    fn release_fires_release_domain_for_dom0_only() {
        let sim = server("release");
        let dom0 = client(&sim, 0);
        make_home(&dom0, 5);
        let domu = client(&sim, 5);
        dom0.watch("@releaseDomain", "rel").expect("watch");
        assert_eq!(event(&dom0), ev("@releaseDomain", "rel"));
        domu.watch("@releaseDomain", "rel").expect("watch");
        assert_eq!(event(&domu), ev("@releaseDomain", "rel"));
        domu.watch("mark", "m").expect("watch");
        assert_eq!(event(&domu), ev("mark", "m"));
        assert_eq!(errno(domu.release_domain(7)), XsErrno::EACCES);
        dom0.release_domain(7).expect("release");
        assert_eq!(event(&dom0), ev("@releaseDomain", "rel"));
        dom0.write(NONE, &format!("{}/mark", home(5)), b"1").expect("write");
        assert_eq!(event(&domu), ev("mark", "m"), "domain 5 heard of the release");
    }

    #[test]
    fn no_event_without_read_access() {
        let sim = server("watchperm");
        let dom0 = client(&sim, 0);
        make_home(&dom0, 5);
        let domu = client(&sim, 5);
        dom0.write(NONE, "/priv/x", b"1").expect("write");
        dom0.write(NONE, "/pub", b"").expect("write");
        dom0.set_perms(NONE, "/pub", &[perm(PermAccess::None, 0), perm(PermAccess::Read, 5)]).expect("perms");
        dom0.write(NONE, "/pub/hidden", b"").expect("write");
        dom0.set_perms(NONE, "/pub/hidden", &[perm(PermAccess::None, 0)]).expect("perms");

        domu.watch("/priv", "p").expect("watching an unreadable node is allowed");
        assert_eq!(event(&domu), ev("/priv", "p"));
        domu.watch("/pub", "pub").expect("watch");
        assert_eq!(event(&domu), ev("/pub", "pub"));
        domu.watch("mark", "m").expect("watch");
        assert_eq!(event(&domu), ev("mark", "m"));

        dom0.write(NONE, "/priv/x", b"2").expect("write");
        dom0.rm(NONE, "/priv").expect("rm");
        dom0.write(NONE, &format!("{}/mark", home(5)), b"1").expect("write");
        assert_eq!(event(&domu), ev("mark", "m"), "no event for /priv");
        // As C xenstored, a readable parent is enough.
        dom0.write(NONE, "/pub/hidden", b"1").expect("write");
        assert_eq!(event(&domu), ev("/pub/hidden", "pub"));
        // Losing read access still tells the watcher.
        dom0.set_perms(NONE, "/pub", &[perm(PermAccess::None, 0)]).expect("perms");
        assert_eq!(event(&domu), ev("/pub", "pub"));
    }

    #[test]
    fn watch_limit() {
        let sim = server("watchlimit");
        let xs = client(&sim, 0);
        for i in 0..MAX_WATCHES {
            xs.watch("/w", &i.to_string()).expect("watch");
        }
        assert_eq!(errno(xs.watch("/w", "one too many")), XsErrno::E2BIG);
        xs.unwatch("/w", "0").expect("unwatch");
        xs.watch("/w", "fits again").expect("watch");
    }
}
