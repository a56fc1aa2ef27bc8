//! Real MMIO: the TPM's window mapped from `/dev/mem` (a domain granted the pages with
//! `iomem=`, or dom0 with the kernel's tpm_tis/tpm_crb not bound to the device).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::ptr::NonNull;

use crate::mmio::{Mmio, TPM_BASE, WINDOW_LEN};
use crate::{Error, Result};

/// A mapped physical window.
pub struct DevMem {
    ptr: NonNull<u8>,
    len: u32,
    base: u64,
    _file: File,
}

// SAFETY: the mapping is owned by this value alone and accessed only through `&mut self`
// (volatile reads and writes), so moving it to another thread is sound.
unsafe impl Send for DevMem {}

impl std::fmt::Debug for DevMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevMem").field("base", &self.base).field("len", &self.len).finish_non_exhaustive()
    }
}

impl DevMem {
    /// Maps the TPM's five locality pages from `/dev/mem`.
    pub fn open_tpm() -> Result<Self> {
        Self::open(Path::new("/dev/mem"), TPM_BASE, WINDOW_LEN)
    }

    /// Maps `len` bytes at physical address `base` (a multiple of the page size) of `path`:
    /// `/dev/mem`, or any file in tests.
    pub fn open(path: &Path, base: u64, len: u32) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_SYNC | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let offset =
            libc::off_t::try_from(base).map_err(|_| Error::NoDevice(format!("address {base:#x} too large")))?;
        // SAFETY: a fresh shared mapping of our own file descriptor; the kernel checks the
        // range and the result is checked against MAP_FAILED before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            let hint = if e.raw_os_error() == Some(libc::EPERM) {
                " (a driver owns the range, or the kernel's STRICT_DEVMEM refuses it: unbind tpm_tis/tpm_crb, e.g. with initcall_blacklist=)"
            } else {
                ""
            };
            return Err(Error::io(format!("map {len:#x} bytes at {base:#x} of {}{hint}", path.display()), e));
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::NoDevice("mmap returned null".into()))?;
        Ok(Self { ptr, len, base, _file: file })
    }

    fn in_range(&self, offset: u32, width: u32) -> bool {
        offset.is_multiple_of(width) && offset.checked_add(width).is_some_and(|end| end <= self.len)
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `open`, which nothing else references.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len as usize);
        }
    }
}

impl Mmio for DevMem {
    fn read8(&mut self, offset: u32) -> u8 {
        if !self.in_range(offset, 1) {
            return u8::MAX;
        }
        // SAFETY: `offset` is inside the mapping (checked above); device registers need volatile
        // accesses of the exact width.
        unsafe { self.ptr.as_ptr().add(offset as usize).read_volatile() }
    }

    fn read32(&mut self, offset: u32) -> u32 {
        if !self.in_range(offset, 4) {
            return u32::MAX;
        }
        // SAFETY: inside the mapping and 4-byte aligned (checked above; the mapping is page
        // aligned).
        unsafe { self.ptr.as_ptr().add(offset as usize).cast::<u32>().read_volatile() }
    }

    fn write8(&mut self, offset: u32, value: u8) {
        if self.in_range(offset, 1) {
            // SAFETY: inside the mapping (checked).
            unsafe { self.ptr.as_ptr().add(offset as usize).write_volatile(value) }
        }
    }

    fn write32(&mut self, offset: u32, value: u32) {
        if self.in_range(offset, 4) {
            // SAFETY: inside the mapping and aligned (checked).
            unsafe { self.ptr.as_ptr().add(offset as usize).cast::<u32>().write_volatile(value) }
        }
    }

    fn base(&self) -> u64 {
        self.base
    }

    fn len(&self) -> u32 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_file_and_bounds_accesses() {
        let path = std::env::temp_dir().join(format!("xvtpm-devmem-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; WINDOW_LEN as usize]).expect("file");
        let mut m = DevMem::open(&path, 0, WINDOW_LEN).expect("map");
        m.write32(0x1018, 0x1122_3344);
        m.write8(0x4FFF, 0x77);
        assert_eq!(m.read32(0x1018), 0x1122_3344);
        assert_eq!(m.read8(0x1019), 0x33);
        assert_eq!(m.read32(0x1019), u32::MAX, "unaligned");
        assert_eq!(m.read8(WINDOW_LEN), u8::MAX, "outside");
        m.write32(WINDOW_LEN - 2, 1);
        drop(m);
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(&bytes[0x1018..0x101C], &0x1122_3344u32.to_le_bytes());
        assert_eq!(bytes[0x4FFF], 0x77);
        let _ = std::fs::remove_file(&path);
        let e = DevMem::open(Path::new("/nonexistent/mem"), 0, 4096).expect_err("fails");
        assert!(e.to_string().contains("/nonexistent/mem"), "{e}");
    }
}
