//! Simulated grant table: a granted page is a file `grants/<granter>/<gref>` in the simulation
//! directory (tmpfs), whose first page holds who may map it and whose second page is the
//! shared page itself. Any process can map it with `MAP_SHARED`, like a foreign mapping; the
//! access check that Xen makes is made here from the header.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{DomId, Error, GrantAllocator, GrantMapper, GrantRef, Result, SharedPage, PAGE_SIZE};

const MAGIC: u32 = 0x474e_5431; // "GNT1"
/// Linux starts handing out grant references above the reserved ones; so do we.
const FIRST_GREF: GrantRef = 8;

fn grant_dir(root: &Path, granter: DomId) -> PathBuf {
    root.join("grants").join(granter.to_string())
}

fn grant_err(op: &'static str, domid: DomId, gref: GrantRef, source: std::io::Error) -> Error {
    Error::Grant { op, domid, gref, source }
}

fn map_file(
    file: &File,
    writable: bool,
    gref: GrantRef,
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
) -> Result<SharedPage> {
    let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
    // SAFETY: maps one page of a regular file we hold open, at a page-aligned offset within
    // its size; no existing memory is affected.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), PAGE_SIZE, prot, libc::MAP_SHARED, file.as_raw_fd(), PAGE_SIZE as libc::off_t)
    };
    if p == libc::MAP_FAILED {
        return Err(grant_err("mmap", 0, gref, std::io::Error::last_os_error()));
    }
    let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::Sim("mmap returned null".into()))?;
    // SAFETY: `ptr` is the live one-page mapping just created; the page owns it from now on.
    Ok(unsafe { SharedPage::from_mmap(ptr, PAGE_SIZE, gref, release) })
}

/// Grants pages of domain `domid` in a simulation directory.
#[derive(Debug)]
pub struct SimGntalloc {
    root: PathBuf,
    domid: DomId,
}

impl SimGntalloc {
    /// Grants as `domid` in the simulation at `root`.
    pub fn new(root: &Path, domid: DomId) -> Self {
        SimGntalloc { root: root.to_path_buf(), domid }
    }
}

impl GrantAllocator for SimGntalloc {
    fn grant(&self, to: DomId, writable: bool) -> Result<SharedPage> {
        static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
        let dir = grant_dir(&self.root, self.domid);
        fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        // Build the whole file under a private name, then link it to the first free reference:
        // a mapper never sees a half-written header, and two granters never share a reference.
        let tmp = dir.join(format!(".tmp-{}-{}", std::process::id(), TMP_SEQ.fetch_add(1, Ordering::Relaxed)));
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| grant_err("create", to, 0, e))?;
        let mut hdr = Vec::with_capacity(12);
        hdr.extend_from_slice(&MAGIC.to_ne_bytes());
        hdr.extend_from_slice(&u32::from(to).to_ne_bytes());
        hdr.extend_from_slice(&u32::from(writable).to_ne_bytes());
        f.write_all(&hdr).and_then(|_| f.set_len(2 * PAGE_SIZE as u64)).map_err(|e| grant_err("create", to, 0, e))?;
        let mut gref = FIRST_GREF;
        let result = loop {
            match fs::hard_link(&tmp, dir.join(gref.to_string())) {
                Ok(()) => break Ok(gref),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => gref += 1,
                Err(e) => break Err(grant_err("link", to, gref, e)),
            }
        };
        let _ = fs::remove_file(&tmp);
        let gref = result?;
        let path = dir.join(gref.to_string());
        let release = Box::new(move || {
            if let Err(e) = fs::remove_file(&path) {
                log::warn!("sim: revoking grant {}: {e}", path.display());
            }
        });
        map_file(&f, true, gref, Some(release))
    }
}

/// Maps pages granted to domain `domid` in a simulation directory.
#[derive(Debug)]
pub struct SimGntdev {
    root: PathBuf,
    domid: DomId,
}

impl SimGntdev {
    /// Maps as `domid` in the simulation at `root`.
    pub fn new(root: &Path, domid: DomId) -> Self {
        SimGntdev { root: root.to_path_buf(), domid }
    }
}

impl GrantMapper for SimGntdev {
    fn map(&self, domid: DomId, gref: GrantRef, writable: bool) -> Result<SharedPage> {
        let path = grant_dir(&self.root, domid).join(gref.to_string());
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| grant_err("map", domid, gref, e))?;
        let mut hdr = [0u8; 12];
        file.read_exact_at(&mut hdr, 0).map_err(|e| grant_err("map", domid, gref, e))?;
        let word = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        if word(0) != MAGIC {
            return Err(grant_err("map", domid, gref, std::io::Error::from_raw_os_error(libc::EINVAL)));
        }
        // Xen refuses a mapping by a domain the grant is not for, or a writable mapping of a
        // read-only grant.
        if word(4) != u32::from(self.domid) || (writable && word(8) == 0) {
            return Err(grant_err("map", domid, gref, std::io::Error::from_raw_os_error(libc::EPERM)));
        }
        map_file(&file, writable, gref, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xvtpm-gnt-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("dir");
        d
    }

    #[test]
    fn grant_map_share_and_revoke() {
        let root = tmpdir("share");
        let fe = SimGntalloc::new(&root, 3);
        let be = SimGntdev::new(&root, 0);
        let page = fe.grant(0, true).expect("grant");
        let page2 = fe.grant(0, true).expect("grant");
        assert_ne!(page.gref(), page2.gref());
        let mapped = be.map(3, page.gref(), true).expect("map");
        page.store_u32(0, 0x1234_5678, Ordering::SeqCst).expect("store");
        assert_eq!(mapped.load_u32(0, Ordering::SeqCst).expect("load"), 0x1234_5678);
        mapped.store_u8(100, 9, Ordering::SeqCst).expect("store");
        assert_eq!(page.load_u8(100, Ordering::SeqCst).expect("load"), 9);
        // Another domain may not map it; an unknown reference does not map.
        assert!(SimGntdev::new(&root, 4).map(3, page.gref(), false).is_err());
        assert!(be.map(3, 9999, true).is_err());
        let gref = page.gref();
        drop(page);
        assert!(be.map(3, gref, true).is_err(), "revoked on drop");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn read_only_grant_refuses_writable_map() {
        let root = tmpdir("ro");
        let page = SimGntalloc::new(&root, 2).grant(0, false).expect("grant");
        let be = SimGntdev::new(&root, 0);
        assert!(be.map(2, page.gref(), true).is_err());
        be.map(2, page.gref(), false).expect("read-only map");
        let _ = fs::remove_dir_all(&root);
    }
}
