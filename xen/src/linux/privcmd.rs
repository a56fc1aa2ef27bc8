//! What the hypervisor says of a domain (`XEN_DOMCTL_getdomaininfo`), asked through
//! `/dev/xen/privcmd`. Only a privileged domain (dom0, or one Xen's XSM policy allows) gets an
//! answer; elsewhere the hypervisor refuses with EPERM.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use super::ioctl::{
    ioctl, PrivcmdHypercall, XenDomctl, XenDomctlGetDomainInfo, HYPERVISOR_DOMCTL, IOCTL_PRIVCMD_HYPERCALL,
    XEN_DOMCTL_GETDOMAININFO,
};
use super::open_device;
use crate::{DomId, DomainInfo, Error, Result, PAGE_SIZE};

/// The privileged-command device.
pub const PRIVCMD: &str = "/dev/xen/privcmd";
/// Hypercall argument buffers that stay put in memory while Xen reads them (Linux 4.18+).
pub const HYPERCALL_BUFFERS: &str = "/dev/xen/hypercall";

/// The domctl interface versions we try, Xen 4.17's (Debian 12) first, then 4.18's and
/// 4.19's, then 4.16's: the hypervisor only answers a caller of its own version, and the
/// part of the call we use (the header, the info's domain and flags) is the same in all.
pub(super) const DOMCTL_VERSIONS: [u32; 4] = [0x15, 0x16, 0x17, 0x14];

/// The version that worked last (0: none yet).
static KNOWN_VERSION: AtomicU32 = AtomicU32::new(0);

/// One page the hypervisor reads and writes a hypercall's argument in: from
/// [`HYPERCALL_BUFFERS`] where the kernel has it, else anonymous memory locked in place.
struct HypercallPage {
    ptr: NonNull<u8>,
}

impl HypercallPage {
    /// A page of `buffers` (an open [`HYPERCALL_BUFFERS`]), else of locked anonymous memory.
    fn new(buffers: Option<BorrowedFd<'_>>) -> io::Result<Self> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        if let Some(fd) = buffers {
            // SAFETY: a new shared mapping of one page at an address of the kernel's choosing;
            // no existing memory is affected and `fd` is open for the call.
            let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE_SIZE, prot, libc::MAP_SHARED, fd.as_raw_fd(), 0) };
            if let Some(ptr) = NonNull::new(p.cast::<u8>()).filter(|_| p != libc::MAP_FAILED) {
                return Ok(HypercallPage { ptr });
            }
        }
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // SAFETY: a new anonymous mapping at an address of the kernel's choosing.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE_SIZE, prot, flags, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = HypercallPage { ptr: NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave 0"))? };
        // Xen cannot take a page fault on our behalf: the page must be present. mlock keeps it
        // resident; the kernel could still migrate it during the call (compaction), which Xen
        // reports as EFAULT, an error, never a wrong answer. /dev/xen/hypercall has no such gap.
        // SAFETY: the range is the page just mapped, owned by `page`.
        if unsafe { libc::mlock(p, PAGE_SIZE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(page)
    }
}

impl Drop for HypercallPage {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `new` and nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), PAGE_SIZE) };
    }
}

/// The privileged-command device and (where the kernel has it) the hypercall buffer device,
/// held open: a process that gives up the right to open them (a sandboxed vtpm) keeps asking.
#[derive(Debug)]
pub struct Privcmd {
    privcmd: OwnedFd,
    buffers: Option<File>,
}

impl Privcmd {
    /// Opens both devices.
    pub fn open() -> Result<Self> {
        let privcmd = open_device(std::path::Path::new(PRIVCMD), 0)?;
        let buffers = File::options().read(true).write(true).open(HYPERCALL_BUFFERS).ok();
        Ok(Privcmd { privcmd, buffers })
    }

    /// Domain `domid` as the hypervisor reports it; `None` if there is no such domain.
    pub fn domain_info(&self, domid: DomId) -> Result<Option<DomainInfo>> {
        let page = HypercallPage::new(self.buffers.as_ref().map(File::as_fd))
            .map_err(|e| Error::io("a hypercall buffer", e))?;
        ask(self.privcmd.as_fd(), &page, domid)
    }
}

/// Domain `domid` as the hypervisor reports it (the devices opened for this one question).
pub fn domain_info(domid: DomId) -> Result<Option<DomainInfo>> {
    Privcmd::open()?.domain_info(domid)
}

fn ask(privcmd: BorrowedFd<'_>, page: &HypercallPage, domid: DomId) -> Result<Option<DomainInfo>> {
    let domctl = page.ptr.as_ptr().cast::<XenDomctl>();
    let known = KNOWN_VERSION.load(Ordering::Relaxed);
    let versions =
        std::iter::once(known).filter(|v| *v != 0).chain(DOMCTL_VERSIONS.into_iter().filter(|v| *v != known));
    for version in versions {
        let request = XenDomctl {
            cmd: XEN_DOMCTL_GETDOMAININFO,
            interface_version: version,
            domain: domid,
            pad: [0; 3],
            getdomaininfo: XenDomctlGetDomainInfo { domain: 0, pad1: 0, flags: 0, rest: [0; 15] },
        };
        // SAFETY: `domctl` points to the start of the page, which is page-aligned, larger than
        // `XenDomctl` and ours alone.
        unsafe { domctl.write(request) };
        let mut call = PrivcmdHypercall { op: HYPERVISOR_DOMCTL, arg: [domctl as u64, 0, 0, 0, 0] };
        // SAFETY: `call` is a live privcmd_hypercall whose one argument points to a
        // xen_domctl in memory that stays mapped and locked until `page` drops, after this.
        let rc = unsafe { ioctl(privcmd, IOCTL_PRIVCMD_HYPERCALL, &mut call) };
        match rc {
            Ok(_) => {
                KNOWN_VERSION.store(version, Ordering::Relaxed);
                // SAFETY: as for the write; the hypervisor filled it in.
                let reply = unsafe { domctl.read() };
                // Xen 4.17 answers with the next domain when `domid` is gone.
                return Ok(
                    (reply.getdomaininfo.domain == domid).then(|| DomainInfo::from_flags(reply.getdomaininfo.flags))
                );
            }
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
            Err(e) => return Err(Error::io(format!("XEN_DOMCTL_getdomaininfo of domain {domid}"), e)),
        }
    }
    Err(Error::io(
        format!(
            "XEN_DOMCTL_getdomaininfo of domain {domid}: refused with EACCES for each of the domctl interface versions {DOMCTL_VERSIONS:#x?} (a Xen this build does not know, or an XSM policy that denies it)"
        ),
        io::Error::from_raw_os_error(libc::EACCES),
    ))
}
