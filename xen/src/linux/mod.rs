//! The real Xen interfaces of a Linux domain: `/dev/xen/evtchn`, `/dev/xen/gntdev`,
//! `/dev/xen/gntalloc`, `/dev/xen/privcmd` and xenstored.

pub mod evtchn;
pub mod gntalloc;
pub mod gntdev;
pub mod held;
pub mod helper;
pub mod ioctl;
pub mod ioreq;
pub mod privcmd;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;

use crate::xenstore::wire::{self, Message, MsgType};
use crate::{
    DomId, DomainInfo, Error, EventChannel, GrantAllocator, GrantMapper, Result, TxId, Xen, Xenstore, PAGE_SIZE,
};

pub use evtchn::LinuxEvtchn;
pub use gntalloc::LinuxGntalloc;
pub use gntdev::LinuxGntdev;
pub use held::HeldXen;

/// xenstored's socket, present where xenstored runs in this domain (usually dom0).
pub const XENSTORED_SOCKET: &str = "/run/xenstored/socket";
/// The kernel's xenstore device, available in every domain with xenfs/xenbus.
pub const XENBUS_DEVICE: &str = "/dev/xen/xenbus";
/// Lists `control_d` in the control domain.
pub const CAPABILITIES: &str = "/proc/xen/capabilities";

/// The real Xen of the Linux domain we run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinuxXen {
    domid: DomId,
}

impl LinuxXen {
    /// Connects to xenstore to learn our domain id (the relative key `domid`; 0 in a control
    /// domain whose toolstack did not write it).
    pub fn open() -> Result<Self> {
        let xs = open_xenstore()?;
        let domid = match xs.read_string(TxId::NONE, "domid") {
            Ok(s) => s.trim().parse().map_err(|_| Error::Malformed { path: "domid".into(), value: s })?,
            Err(e) if e.is_enoent() && is_control_domain() => {
                log::info!("no \"domid\" in xenstore; {CAPABILITIES} says this is the control domain: 0");
                0
            }
            Err(e) => return Err(e),
        };
        log::debug!("running in domain {domid}");
        Ok(LinuxXen { domid })
    }

    /// For a caller that already knows its domain id; opens nothing.
    pub fn with_domid(domid: DomId) -> Self {
        LinuxXen { domid }
    }
}

impl Xen for LinuxXen {
    fn domid(&self) -> DomId {
        self.domid
    }

    fn xenstore(&self) -> Result<Xenstore> {
        open_xenstore()
    }

    fn evtchn(&self) -> Result<Box<dyn EventChannel>> {
        Ok(Box::new(LinuxEvtchn::open()?))
    }

    fn grant_mapper(&self) -> Result<Box<dyn GrantMapper>> {
        Ok(Box::new(LinuxGntdev::open()?))
    }

    fn grant_allocator(&self) -> Result<Box<dyn GrantAllocator>> {
        Ok(Box::new(LinuxGntalloc::open()?))
    }

    fn domain_info(&self, domid: DomId) -> Result<Option<DomainInfo>> {
        privcmd::domain_info(domid)
    }
}

/// A new connection to xenstored: its unix socket where it runs in this domain, else the
/// kernel's xenbus device.
pub fn open_xenstore() -> Result<Xenstore> {
    match UnixStream::connect(XENSTORED_SOCKET) {
        Ok(stream) => return Xenstore::from_unix(stream),
        // A stale socket of a stopped xenstored: the device may still work.
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            log::warn!("cannot connect to {XENSTORED_SOCKET} ({e}); trying {XENBUS_DEVICE}")
        }
        Err(_) => {}
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(XENBUS_DEVICE)
        .map_err(|e| Error::io(format!("open {XENBUS_DEVICE} (and no xenstored at {XENSTORED_SOCKET})"), e))?;
    let reader = file.try_clone().map_err(|e| Error::io(format!("dup {XENBUS_DEVICE}"), e))?;
    let waker = file.try_clone().map_err(|e| Error::io(format!("dup {XENBUS_DEVICE}"), e))?;
    Ok(Xenstore::new(Box::new(reader), Box::new(file), Some(Box::new(move || wake_xenbus_reader(waker)))))
}

/// Ends the client's reader thread once the last handle is gone. Unlike a socket, the xenbus
/// device cannot be shut down and a blocked read() only returns with a message, so ask a
/// harmless question: the reader finds nobody waiting for the answer and exits, closing the
/// device (which also drops our watches in the kernel).
fn wake_xenbus_reader(mut file: File) {
    let sent = Message::new(MsgType::Read, 0, TxId::NONE.0, wire::nul_terminated(&[b"domid"]))
        .and_then(|m| m.write_to(&mut file));
    if let Err(e) = sent {
        log::debug!("cannot wake the xenbus reader thread: {e}");
    }
}

fn is_control_domain() -> bool {
    std::fs::read_to_string(CAPABILITIES).is_ok_and(|c| c.contains("control_d"))
}

/// Opens a Xen device read/write and close-on-exec, with extra `flags`.
fn open_device(path: &Path, flags: i32) -> Result<OwnedFd> {
    let file =
        OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC | flags).open(path).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::NotFound {
                " (not a Xen domain, or its driver is not loaded)"
            } else {
                ""
            };
            Error::io(format!("open {}{hint}", path.display()), e)
        })?;
    Ok(file.into())
}

/// Maps one page of a gntdev/gntalloc device at mmap offset `index` (shared, as both drivers
/// require).
fn mmap_page(fd: BorrowedFd<'_>, index: u64, writable: bool) -> io::Result<NonNull<u8>> {
    let offset = libc::off_t::try_from(index).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
    // SAFETY: a new mapping at an address of the kernel's choosing, so no existing memory is
    // affected; `fd` is open for the duration of the call.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE_SIZE, prot, libc::MAP_SHARED, fd.as_raw_fd(), offset) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned address 0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SharedPage;
    use std::os::fd::AsFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn with_domid_is_what_it_says() {
        let x = LinuxXen::with_domid(7);
        assert_eq!(x.domid(), 7);
        assert_eq!(format!("{x:?}"), "LinuxXen { domid: 7 }");
    }

    #[test]
    fn open_names_the_device_when_there_is_no_xen() {
        if Path::new("/dev/xen").exists() {
            return; // a real Xen domain: nothing to check here
        }
        for (path, err) in [
            ("/dev/xen/evtchn", LinuxEvtchn::open().map(drop).expect_err("no evtchn")),
            ("/dev/xen/gntdev", LinuxGntdev::open().map(drop).expect_err("no gntdev")),
            ("/dev/xen/gntalloc", LinuxGntalloc::open().map(drop).expect_err("no gntalloc")),
        ] {
            let msg = err.to_string();
            assert!(msg.contains(path), "{path}: {msg}");
            assert!(matches!(err, Error::Io { ref source, .. } if source.kind() == io::ErrorKind::NotFound), "{err:?}");
        }
    }

    #[test]
    fn xenstore_without_xen_names_the_device() {
        if Path::new(XENSTORED_SOCKET).exists() || Path::new(XENBUS_DEVICE).exists() {
            return;
        }
        let err = open_xenstore().expect_err("no xenstore");
        assert!(err.to_string().contains(XENBUS_DEVICE), "{err}");
        let err = LinuxXen::open().expect_err("no xenstore");
        assert!(err.to_string().contains(XENBUS_DEVICE), "{err}");
    }

    /// The mapping helper and the page's release hook, on a plain file standing in for a
    /// device.
    #[test]
    fn mmap_page_of_a_file() {
        let path = std::env::temp_dir().join(format!("xvtpm-linux-mmap-{}", std::process::id()));
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).expect("file");
        let _ = std::fs::remove_file(&path);
        file.set_len(2 * PAGE_SIZE as u64).expect("len");
        let fd: Arc<OwnedFd> = Arc::new(file.into());
        let released = Arc::new(AtomicBool::new(false));
        let ptr = mmap_page(fd.as_fd(), PAGE_SIZE as u64, true).expect("mmap");
        let (fd2, r2) = (Arc::clone(&fd), Arc::clone(&released));
        // SAFETY: `ptr` is the page just mapped, owned by nothing else.
        let page = unsafe {
            SharedPage::from_mmap(
                ptr,
                PAGE_SIZE,
                9,
                Some(Box::new(move || {
                    let _keep = &fd2;
                    r2.store(true, Ordering::SeqCst)
                })),
            )
        };
        page.store_u32(4, 0x1234_5678, Ordering::Relaxed).expect("store");
        drop(page);
        assert!(released.load(Ordering::SeqCst));
        // The write went to the file at the page's offset: the mapping was shared.
        let mut buf = [0u8; 4];
        let f = File::from(Arc::try_unwrap(fd).expect("sole owner"));
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, PAGE_SIZE as u64 + 4).expect("read");
        assert_eq!(u32::from_ne_bytes(buf), 0x1234_5678);
        assert!(mmap_page(f.as_fd(), u64::MAX, false).is_err());
    }
}
