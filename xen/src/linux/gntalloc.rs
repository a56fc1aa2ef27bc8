//! Granting our pages through `/dev/xen/gntalloc`.
//!
//! ALLOC_GREF allocates a page, grants it and returns the reference and an mmap offset; we map
//! it to use it. Undoing is `munmap` (done by [`SharedPage`]) and DEALLOC_GREF, after which the
//! driver revokes the grant and frees the page once no mapping uses it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use super::ioctl::{
    self, IoctlGntallocAllocGref, IoctlGntallocDeallocGref, GNTALLOC_FLAG_WRITABLE, IOCTL_GNTALLOC_ALLOC_GREF,
    IOCTL_GNTALLOC_DEALLOC_GREF,
};
use crate::{DomId, Error, GrantAllocator, Result, SharedPage, PAGE_SIZE};

/// The grant allocation device.
pub const GNTALLOC_PATH: &str = "/dev/xen/gntalloc";

/// An open `/dev/xen/gntalloc`. Pages granted through it keep the device open until they are
/// dropped.
#[derive(Debug)]
pub struct LinuxGntalloc {
    fd: Arc<OwnedFd>,
}

impl LinuxGntalloc {
    /// Opens [`GNTALLOC_PATH`].
    pub fn open() -> Result<Self> {
        Self::open_path(Path::new(GNTALLOC_PATH))
    }

    /// Opens a grant allocation device at another path.
    pub fn open_path(path: &Path) -> Result<Self> {
        Ok(LinuxGntalloc { fd: Arc::new(super::open_device(path, 0)?) })
    }
}

/// Releases the grant allocated at `index` (after its mapping is gone).
fn dealloc_gref(fd: &OwnedFd, index: u64) -> io::Result<()> {
    let mut arg = IoctlGntallocDeallocGref { index, count: 1 };
    // SAFETY: `arg` is the struct DEALLOC_GREF reads.
    unsafe { ioctl::ioctl(fd.as_fd(), IOCTL_GNTALLOC_DEALLOC_GREF, &mut arg) }.map(drop)
}

impl GrantAllocator for LinuxGntalloc {
    fn grant(&self, domid: DomId, writable: bool) -> Result<SharedPage> {
        let mut arg = IoctlGntallocAllocGref {
            domid,
            flags: if writable { GNTALLOC_FLAG_WRITABLE } else { 0 },
            count: 1,
            index: 0,
            gref_ids: [0],
        };
        // SAFETY: `arg` is the struct ALLOC_GREF reads and writes, with room for its `count`
        // (one) references.
        unsafe { ioctl::ioctl(self.fd.as_fd(), IOCTL_GNTALLOC_ALLOC_GREF, &mut arg) }
            .map_err(|source| Error::Grant { op: "alloc", domid, gref: 0, source })?;
        let (index, gref) = (arg.index, arg.gref_ids[0]);
        // The page is ours: always mapped writable, `writable` only limits the peer.
        let ptr = match super::mmap_page(self.fd.as_fd(), index, true) {
            Ok(p) => p,
            Err(source) => {
                if let Err(d) = dealloc_gref(&self.fd, index) {
                    log::warn!("gntalloc: undoing grant {gref} to domain {domid} failed: {d}");
                }
                return Err(Error::Grant { op: "mmap", domid, gref, source });
            }
        };
        let fd = Arc::clone(&self.fd);
        let release = Box::new(move || {
            if let Err(e) = dealloc_gref(&fd, index) {
                log::warn!("gntalloc: revoking grant {gref} to domain {domid} failed: {e}");
            }
        });
        log::debug!("gntalloc: granted ref {gref} to domain {domid} (writable {writable}) at offset {index:#x}");
        // SAFETY: `ptr` is the start of the readable and writable PAGE_SIZE mapping just made,
        // owned by nothing else.
        let page = unsafe { SharedPage::from_mmap(ptr, PAGE_SIZE, gref, Some(release)) };
        // The driver hands out zeroed pages; clearing again keeps the guarantee independent of it.
        page.zero()?;
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_errors_name_domain() {
        let g = LinuxGntalloc::open_path(Path::new("/dev/null")).expect("open /dev/null");
        match g.grant(5, true) {
            Err(Error::Grant { op: "alloc", domid: 5, gref: 0, source }) => {
                assert_eq!(source.raw_os_error(), Some(libc::ENOTTY), "{source}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_device_is_named() {
        let err = LinuxGntalloc::open_path(Path::new("/nonexistent/gntalloc")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/gntalloc"), "{err}");
    }
}
