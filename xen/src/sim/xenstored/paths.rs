//! Xenstore paths: domain homes, relative paths made absolute, which node names are valid,
//! and the path arithmetic of the tree.

use super::XsResult;
use crate::xenstore::wire::ABS_PATH_MAX;
use crate::{DomId, XsErrno};

/// The special watch paths C xenstored knows.
pub(super) const SPECIAL_PATHS: [&str; 2] = ["@introduceDomain", "@releaseDomain"];

/// A domain's home, where its relative paths point.
pub(super) fn home(domid: DomId) -> String {
    format!("/local/domain/{domid}")
}

/// Makes a relative path absolute; absolute and special ("@...") paths stay as they are.
pub(super) fn canonical(domid: DomId, path: &str) -> String {
    if path.starts_with('/') || path.starts_with('@') {
        path.to_owned()
    } else {
        format!("{}/{path}", home(domid))
    }
}

/// The absolute path of a request's node argument, if valid (C xenstored's
/// `is_valid_nodename` after canonicalization).
pub(super) fn node_path(domid: DomId, raw: &[u8]) -> XsResult<String> {
    let path = canonical(domid, std::str::from_utf8(raw).map_err(|_| XsErrno::EINVAL)?);
    let valid = path.starts_with('/')
        && (path == "/" || !path.ends_with('/'))
        && !path.contains("//")
        && path.len() <= ABS_PATH_MAX
        && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"-/_@".contains(&b));
    if valid {
        Ok(path)
    } else {
        Err(XsErrno::EINVAL)
    }
}

/// The parent of a valid absolute path ("/" for "/").
pub(super) fn parent_of(path: &str) -> &str {
    match path.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &path[..i],
    }
}

pub(super) fn basename(path: &str) -> &str {
    path.rfind('/').map_or(path, |i| &path[i + 1..])
}

pub(super) fn child_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

/// Whether `child` is `parent` or below it, by whole path components.
pub(super) fn is_child(child: &str, parent: &str) -> bool {
    parent == "/" || child.strip_prefix(parent).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{client, errno, ev, event, events, make_home, pairs, server, NONE};
    use crate::XsErrno;

    #[test]
    fn relative_paths() {
        let sim = server("relative");
        let dom0 = client(&sim, 0);
        make_home(&dom0, 5);
        let domu = client(&sim, 5);
        domu.write(NONE, "device/x", b"1").expect("relative write");
        assert_eq!(dom0.read(NONE, "/local/domain/5/device/x").expect("absolute read"), b"1");
        assert_eq!(domu.read(NONE, "device/x").expect("relative read"), b"1");
        assert_eq!(domu.directory(NONE, "device").expect("relative dir"), ["x"]);
        dom0.write(NONE, "name", b"Domain-0").expect("dom0 relative write");
        assert_eq!(dom0.read(NONE, "/local/domain/0/name").expect("read"), b"Domain-0");
        assert_eq!(errno(domu.read(NONE, "device/")), XsErrno::EINVAL);

        domu.watch("device", "rel").expect("relative watch");
        assert_eq!(event(&domu), ev("device", "rel"));
        domu.watch("/local/domain/5/device", "abs").expect("absolute watch");
        assert_eq!(event(&domu), ev("/local/domain/5/device", "abs"));
        dom0.write(NONE, "/local/domain/5/device/y", b"2").expect("write");
        assert_eq!(events(&domu, 2), pairs(&[("device/y", "rel"), ("/local/domain/5/device/y", "abs")]));
        domu.unwatch("device", "rel").expect("relative unwatch");
        assert_eq!(errno(domu.unwatch("/local/domain/5/device", "rel")), XsErrno::ENOENT);
    }
}
