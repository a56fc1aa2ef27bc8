//! Mapping foreign grants through `/dev/xen/gntdev`.
//!
//! Mapping is two steps: MAP_GRANT_REF registers the grant with the driver and returns an mmap
//! offset, then `mmap` at that offset maps it. Undoing is the reverse: `munmap` (done by
//! [`SharedPage`]) and UNMAP_GRANT_REF, after which the driver releases the grant once no
//! mapping uses it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use super::ioctl::{
    self, IoctlGntdevGrantRef, IoctlGntdevMapGrantRef, IoctlGntdevUnmapGrantRef, IOCTL_GNTDEV_MAP_GRANT_REF,
    IOCTL_GNTDEV_UNMAP_GRANT_REF,
};
use crate::{DomId, Error, GrantMapper, GrantRef, Result, SharedPage, PAGE_SIZE};

/// The grant mapping device.
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";

/// An open `/dev/xen/gntdev`. Pages mapped through it keep the device open until they are
/// dropped.
#[derive(Debug)]
pub struct LinuxGntdev {
    fd: Arc<OwnedFd>,
}

impl LinuxGntdev {
    /// Opens [`GNTDEV_PATH`].
    pub fn open() -> Result<Self> {
        Self::open_path(Path::new(GNTDEV_PATH))
    }

    /// Opens a grant mapping device at another path.
    pub fn open_path(path: &Path) -> Result<Self> {
        Ok(LinuxGntdev { fd: Arc::new(super::open_device(path, 0)?) })
    }
}

/// Forgets the grant registered at `index` (after its mapping is gone).
fn unmap_grant_ref(fd: &OwnedFd, index: u64) -> io::Result<()> {
    let mut arg = IoctlGntdevUnmapGrantRef { index, count: 1, pad: 0 };
    // SAFETY: `arg` is the struct UNMAP_GRANT_REF reads.
    unsafe { ioctl::ioctl(fd.as_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) }.map(drop)
}

impl GrantMapper for LinuxGntdev {
    fn map(&self, domid: DomId, gref: GrantRef, writable: bool) -> Result<SharedPage> {
        let err = |op, source| Error::Grant { op, domid, gref, source };
        let mut arg = IoctlGntdevMapGrantRef {
            count: 1,
            pad: 0,
            index: 0,
            refs: [IoctlGntdevGrantRef { domid: domid.into(), ref_: gref }],
        };
        // SAFETY: `arg` is the struct MAP_GRANT_REF reads and writes, with room for its `count`
        // (one) references.
        unsafe { ioctl::ioctl(self.fd.as_fd(), IOCTL_GNTDEV_MAP_GRANT_REF, &mut arg) }.map_err(|e| err("map", e))?;
        let index = arg.index;
        // The driver asks Xen to map the grant during mmap, so this is where a bad reference or a
        // read-only grant mapped writable fails.
        let ptr = match super::mmap_page(self.fd.as_fd(), index, writable) {
            Ok(p) => p,
            Err(e) => {
                if let Err(u) = unmap_grant_ref(&self.fd, index) {
                    log::warn!("gntdev: undoing map of grant {gref} of domain {domid} failed: {u}");
                }
                return Err(err("mmap", e));
            }
        };
        let fd = Arc::clone(&self.fd);
        let release = Box::new(move || {
            if let Err(e) = unmap_grant_ref(&fd, index) {
                log::warn!("gntdev: unmap of grant {gref} of domain {domid} failed: {e}");
            }
        });
        log::debug!("gntdev: mapped grant {gref} of domain {domid} (writable {writable}) at offset {index:#x}");
        // SAFETY: `ptr` is the start of the PAGE_SIZE mapping just made, owned by nothing else;
        // it is readable, and writable when `writable` (a read-only page is only ever read by
        // callers that asked for one).
        Ok(unsafe { SharedPage::from_mmap(ptr, PAGE_SIZE, gref, Some(release)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_errors_name_domain_and_ref() {
        let g = LinuxGntdev::open_path(Path::new("/dev/null")).expect("open /dev/null");
        match g.map(3, 42, true) {
            Err(Error::Grant { op: "map", domid: 3, gref: 42, source }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOTTY), "{source}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_device_is_named() {
        let err = LinuxGntdev::open_path(Path::new("/nonexistent/gntdev")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/gntdev"), "{err}");
    }
}
