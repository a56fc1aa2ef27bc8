//! A page of memory shared with another domain (or, in the simulation, another process).
//!
//! The peer may write the page at any moment, so nothing here hands out a Rust reference to
//! its bytes: single fields are read and written as atomics, bulk data is copied in or out and
//! validated afterwards by the caller.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use crate::{grant::GrantRef, Error, Result, PAGE_SIZE};

type Release = Box<dyn FnOnce() + Send + Sync>;

/// A mapped shared page. Dropping it unmaps the memory and then runs the release hook (unmap
/// the grant, revoke it, ...).
pub struct SharedPage {
    ptr: NonNull<u8>,
    len: usize,
    gref: GrantRef,
    release: Option<Release>,
}

// SAFETY: the page is plain memory mapped into this process; every access goes through atomics
// or explicit copies that tolerate concurrent modification, so it may move between and be
// shared by threads.
unsafe impl Send for SharedPage {}
// SAFETY: as above, `&SharedPage` only allows atomic accesses and copies.
unsafe impl Sync for SharedPage {}

impl std::fmt::Debug for SharedPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPage").field("ptr", &self.ptr).field("gref", &self.gref).finish()
    }
}

impl SharedPage {
    /// Wraps a mapping made with `mmap`.
    ///
    /// # Safety
    /// `ptr` must be the start of a live `mmap` mapping of `len` bytes (a multiple of the page
    /// size, readable and writable or at least readable if the caller only reads) that nothing
    /// else unmaps; the page takes ownership and `munmap`s it on drop.
    pub unsafe fn from_mmap(ptr: NonNull<u8>, len: usize, gref: GrantRef, release: Option<Release>) -> Self {
        SharedPage { ptr, len, gref, release }
    }

    /// A private anonymous page, for tests of code that works on shared pages.
    pub fn anonymous() -> Result<Self> {
        // SAFETY: a fresh anonymous private mapping; no existing memory is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::io("mmap anonymous page", std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::Sim("mmap returned null".into()))?;
        // SAFETY: `ptr` is the mapping just created, `PAGE_SIZE` long, owned by nobody else.
        Ok(unsafe { SharedPage::from_mmap(ptr, PAGE_SIZE, 0, None) })
    }

    /// The grant reference this page was mapped from or granted as.
    pub fn gref(&self) -> GrantRef {
        self.gref
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn check(&self, offset: usize, len: usize, align: usize) -> Result<*mut u8> {
        let end = offset.checked_add(len);
        if end.is_none_or(|e| e > self.len) || !offset.is_multiple_of(align) {
            return Err(Error::OutOfBounds { offset, len });
        }
        // SAFETY: offset + len <= self.len, so the pointer stays inside the mapping.
        Ok(unsafe { self.ptr.as_ptr().add(offset) })
    }

    /// Atomically loads the byte at `offset`.
    pub fn load_u8(&self, offset: usize, order: Ordering) -> Result<u8> {
        let p = self.check(offset, 1, 1)?;
        // SAFETY: `p` is in bounds of the live mapping; AtomicU8 has alignment 1.
        Ok(unsafe { AtomicU8::from_ptr(p) }.load(order))
    }

    /// Atomically stores the byte at `offset`.
    pub fn store_u8(&self, offset: usize, value: u8, order: Ordering) -> Result<()> {
        let p = self.check(offset, 1, 1)?;
        // SAFETY: `p` is in bounds of the live mapping; AtomicU8 has alignment 1.
        unsafe { AtomicU8::from_ptr(p) }.store(value, order);
        Ok(())
    }

    /// Atomically loads the native-endian u32 at `offset` (4-byte aligned).
    pub fn load_u32(&self, offset: usize, order: Ordering) -> Result<u32> {
        let p = self.check(offset, 4, 4)?;
        // SAFETY: in bounds, and aligned to 4 because the mapping is page aligned and `offset`
        // is a multiple of 4.
        Ok(unsafe { AtomicU32::from_ptr(p.cast()) }.load(order))
    }

    /// Atomically stores the native-endian u32 at `offset` (4-byte aligned).
    pub fn store_u32(&self, offset: usize, value: u32, order: Ordering) -> Result<()> {
        let p = self.check(offset, 4, 4)?;
        // SAFETY: in bounds and 4-byte aligned, as in `load_u32`.
        unsafe { AtomicU32::from_ptr(p.cast()) }.store(value, order);
        Ok(())
    }

    /// Copies `dst.len()` bytes out of the page starting at `offset`. The peer may be writing
    /// concurrently: the copy is a snapshot the caller must validate, never trust.
    pub fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        let p = self.check(offset, dst.len(), 1)?;
        // SAFETY: source is in bounds of the mapping, destination is a distinct local buffer of
        // the same length. A concurrent write by the peer can only change which bytes we copy,
        // which callers treat as untrusted input.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into the page at `offset`.
    pub fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<()> {
        let p = self.check(offset, src.len(), 1)?;
        // SAFETY: destination is in bounds of the mapping, source is a distinct local buffer.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        Ok(())
    }

    /// Zeroes the whole page.
    pub fn zero(&self) -> Result<()> {
        let p = self.check(0, self.len, 1)?;
        // SAFETY: the whole mapping, which we own for writing.
        unsafe { std::ptr::write_bytes(p, 0, self.len) };
        Ok(())
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: `from_mmap` made us the owner of this mapping; nothing can use it after drop.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            log::warn!("munmap of shared page (gref {}) failed: {}", self.gref, std::io::Error::last_os_error());
        }
        if let Some(release) = self.release.take() {
            release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_and_alignment_are_errors() {
        let p = SharedPage::anonymous().expect("page");
        assert!(p.load_u8(PAGE_SIZE, Ordering::Relaxed).is_err());
        assert!(p.load_u32(PAGE_SIZE - 2, Ordering::Relaxed).is_err());
        assert!(p.load_u32(2, Ordering::Relaxed).is_err());
        assert!(p.read_bytes(PAGE_SIZE - 1, &mut [0u8; 2]).is_err());
        assert!(p.write_bytes(usize::MAX, &[1]).is_err());
        p.store_u32(8, 0xdead_beef, Ordering::Relaxed).expect("store");
        assert_eq!(p.load_u32(8, Ordering::Relaxed).expect("load"), 0xdead_beef);
        let mut b = [0u8; 4];
        p.read_bytes(8, &mut b).expect("read");
        assert_eq!(u32::from_ne_bytes(b), 0xdead_beef);
    }

    #[test]
    fn release_hook_runs_on_drop() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let flag = Arc::new(AtomicBool::new(false));
        let f2 = flag.clone();
        let base = SharedPage::anonymous().expect("page");
        let ptr = base.ptr;
        std::mem::forget(base);
        // SAFETY: `ptr` is the mapping of the forgotten page, now owned by the new one.
        let p = unsafe {
            SharedPage::from_mmap(ptr, PAGE_SIZE, 7, Some(Box::new(move || f2.store(true, Ordering::SeqCst))))
        };
        assert_eq!(p.gref(), 7);
        drop(p);
        assert!(flag.load(Ordering::SeqCst));
    }
}
