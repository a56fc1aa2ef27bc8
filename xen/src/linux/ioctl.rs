//! The ioctl interface of Linux's Xen devices: request numbers and argument layouts of
//! `<xen/evtchn.h>`, `<xen/gntdev.h>`, `<xen/gntalloc.h>` and `<xen/privcmd.h>` (Linux uapi),
//! and the one hypercall argument we pass through privcmd (`struct xen_domctl` of Xen's
//! `public/domctl.h`), checked against the C headers by the tests.

use std::ffi::{c_int, c_uint};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

// `_IOC` encoding of `asm-generic/ioctl.h`; a few architectures override the direction and
// size widths in their own `asm/ioctl.h`.
#[cfg(not(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "mips32r6",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
)))]
mod arch {
    pub const IOC_NONE: u32 = 0;
    pub const IOC_WRITE: u32 = 1;
    pub const IOC_READ: u32 = 2;
    pub const IOC_SIZEBITS: u32 = 14;
}
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "mips32r6",
    target_arch = "mips64r6",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
mod arch {
    pub const IOC_NONE: u32 = 1;
    pub const IOC_READ: u32 = 2;
    pub const IOC_WRITE: u32 = 4;
    pub const IOC_SIZEBITS: u32 = 13;
}

/// `_IOC_NONE`: the argument is not copied by the generic ioctl code (all Xen ioctls).
pub const IOC_NONE: u32 = arch::IOC_NONE;
/// `_IOC_WRITE`: user space writes the argument.
pub const IOC_WRITE: u32 = arch::IOC_WRITE;
/// `_IOC_READ`: user space reads the argument.
pub const IOC_READ: u32 = arch::IOC_READ;

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + arch::IOC_SIZEBITS;

/// Linux's `_IOC(dir, type, nr, size)`. Panics (at compile time, for constants) when `size`
/// does not fit its field, where C would silently corrupt the number.
pub const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << arch::IOC_SIZEBITS), "ioctl argument too large");
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}

// ---- /dev/xen/evtchn -------------------------------------------------------------------

/// `struct ioctl_evtchn_bind_interdomain`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnBindInterdomain {
    /// Domain that allocated the port.
    pub remote_domain: c_uint,
    /// Its port.
    pub remote_port: c_uint,
}

/// `struct ioctl_evtchn_bind_unbound_port`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnBindUnboundPort {
    /// Domain allowed to bind the new port.
    pub remote_domain: c_uint,
}

/// `struct ioctl_evtchn_unbind`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnUnbind {
    /// Local port to close.
    pub port: c_uint,
}

/// `struct ioctl_evtchn_notify`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnNotify {
    /// Local port whose peer to signal.
    pub port: c_uint,
}

/// Binds a port another domain allocated; returns the local port.
pub const IOCTL_EVTCHN_BIND_INTERDOMAIN: u32 = ioc(IOC_NONE, b'E', 1, size_of::<IoctlEvtchnBindInterdomain>());
/// Allocates a port for a remote domain to bind; returns the local port.
pub const IOCTL_EVTCHN_BIND_UNBOUND_PORT: u32 = ioc(IOC_NONE, b'E', 2, size_of::<IoctlEvtchnBindUnboundPort>());
/// Closes a local port.
pub const IOCTL_EVTCHN_UNBIND: u32 = ioc(IOC_NONE, b'E', 3, size_of::<IoctlEvtchnUnbind>());
/// Signals the peer of a local port.
pub const IOCTL_EVTCHN_NOTIFY: u32 = ioc(IOC_NONE, b'E', 4, size_of::<IoctlEvtchnNotify>());
/// Empties the ring of fired ports and clears its overflow condition.
pub const IOCTL_EVTCHN_RESET: u32 = ioc(IOC_NONE, b'E', 5, 0);

/// `struct ioctl_evtchn_restrict_domid`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlEvtchnRestrictDomid {
    /// The one domain the handle may bind to from now on.
    pub domid: u16,
}

/// Restricts the handle, for good, to interdomain channels with one domain (Linux 4.12+).
pub const IOCTL_EVTCHN_RESTRICT_DOMID: u32 = ioc(IOC_NONE, b'E', 6, size_of::<IoctlEvtchnRestrictDomid>());

// ---- /dev/xen/gntdev -------------------------------------------------------------------

/// `struct ioctl_gntdev_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntdevGrantRef {
    /// Granting domain.
    pub domid: u32,
    /// Grant reference (`ref` in C).
    pub ref_: u32,
}

/// `struct ioctl_gntdev_map_grant_ref` with room for one reference (the C struct's `refs[1]`;
/// the driver reads `count` of them).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntdevMapGrantRef {
    /// Number of grants in `refs`.
    pub count: u32,
    /// Padding.
    pub pad: u32,
    /// Out: the mmap offset (in bytes) of the mapping.
    pub index: u64,
    /// The grants.
    pub refs: [IoctlGntdevGrantRef; 1],
}

/// `struct ioctl_gntdev_unmap_grant_ref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntdevUnmapGrantRef {
    /// The `index` the map ioctl returned.
    pub index: u64,
    /// Number of pages (as mapped).
    pub count: u32,
    /// Padding.
    pub pad: u32,
}

/// `struct ioctl_gntdev_unmap_notify` (`ioctl_gntalloc_unmap_notify` has the same layout).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntdevUnmapNotify {
    /// mmap offset of the byte to clear (any byte of the page for events only).
    pub index: u64,
    /// `UNMAP_NOTIFY_*` flags.
    pub action: u32,
    /// Port to notify with `UNMAP_NOTIFY_SEND_EVENT`.
    pub event_channel_port: u32,
}

/// `struct ioctl_gntalloc_unmap_notify`.
pub type IoctlGntallocUnmapNotify = IoctlGntdevUnmapNotify;

/// Registers grants to map; the result's `index` is the offset to give `mmap`.
pub const IOCTL_GNTDEV_MAP_GRANT_REF: u32 = ioc(IOC_NONE, b'G', 0, size_of::<IoctlGntdevMapGrantRef>());
/// Forgets grants registered by the map ioctl (unmapped once no mmap uses them).
pub const IOCTL_GNTDEV_UNMAP_GRANT_REF: u32 = ioc(IOC_NONE, b'G', 1, size_of::<IoctlGntdevUnmapGrantRef>());
/// Asks the driver to clear a byte and/or notify a port when the mapping goes away.
pub const IOCTL_GNTDEV_SET_UNMAP_NOTIFY: u32 = ioc(IOC_NONE, b'G', 7, size_of::<IoctlGntdevUnmapNotify>());

/// Clear the byte at `index` on unmap.
pub const UNMAP_NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// Notify `event_channel_port` on unmap.
pub const UNMAP_NOTIFY_SEND_EVENT: u32 = 0x2;

// ---- /dev/xen/gntalloc -----------------------------------------------------------------

/// `struct ioctl_gntalloc_alloc_gref` with room for one reference (the C struct's
/// `gref_ids[1]`; the driver writes `count` of them).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntallocAllocGref {
    /// Domain to grant the pages to.
    pub domid: u16,
    /// `GNTALLOC_FLAG_*`.
    pub flags: u16,
    /// Number of pages.
    pub count: u32,
    /// Out: the mmap offset (in bytes) of the pages.
    pub index: u64,
    /// Out: the grant references, one per page.
    pub gref_ids: [u32; 1],
}

/// `struct ioctl_gntalloc_dealloc_gref`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IoctlGntallocDeallocGref {
    /// The `index` the alloc ioctl returned.
    pub index: u64,
    /// Number of pages (as allocated).
    pub count: u32,
}

/// The peer may map the pages writable.
pub const GNTALLOC_FLAG_WRITABLE: u16 = 1;

/// Allocates and grants pages; the result's `index` is the offset to give `mmap`.
pub const IOCTL_GNTALLOC_ALLOC_GREF: u32 = ioc(IOC_NONE, b'G', 5, size_of::<IoctlGntallocAllocGref>());
/// Revokes grants and frees the pages (once no mmap uses them).
pub const IOCTL_GNTALLOC_DEALLOC_GREF: u32 = ioc(IOC_NONE, b'G', 6, size_of::<IoctlGntallocDeallocGref>());
/// Like [`IOCTL_GNTDEV_SET_UNMAP_NOTIFY`], for allocated pages.
pub const IOCTL_GNTALLOC_SET_UNMAP_NOTIFY: u32 = ioc(IOC_NONE, b'G', 7, size_of::<IoctlGntallocUnmapNotify>());

// ---- /dev/xen/privcmd ------------------------------------------------------------------

/// `struct privcmd_hypercall`: a hypercall number and its arguments.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrivcmdHypercall {
    /// `__HYPERVISOR_*`.
    pub op: u64,
    /// The arguments; pointers are user addresses of memory the hypervisor can reach.
    pub arg: [u64; 5],
}

/// Makes a hypercall; returns what the hypervisor returned (negative: errno).
pub const IOCTL_PRIVCMD_HYPERCALL: u32 = ioc(IOC_NONE, b'P', 0, size_of::<PrivcmdHypercall>());

/// `struct privcmd_dm_op_buf`: one buffer of a device-model operation.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrivcmdDmOpBuf {
    /// The buffer's user address.
    pub uptr: *mut libc::c_void,
    /// Its length in bytes.
    pub size: usize,
}

/// `struct privcmd_dm_op`: a device-model operation (`HYPERVISOR_dm_op`) on a domain, with
/// its buffers; the kernel pins them for the call, so they may be ordinary memory.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrivcmdDmOp {
    /// The target domain.
    pub dom: u16,
    /// The number of buffers.
    pub num: u16,
    /// The buffers.
    pub ubufs: *const PrivcmdDmOpBuf,
}

/// `struct privcmd_mmap_resource`: maps frames of a domain's resource (such as an ioreq
/// server's pages) into a range earlier mapped from the privcmd device.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrivcmdMmapResource {
    /// The domain owning the resource.
    pub dom: u16,
    /// `XENMEM_resource_*`.
    pub type_: u32,
    /// The resource's id (the ioreq server id).
    pub id: u32,
    /// The first frame.
    pub idx: u32,
    /// The number of frames.
    pub num: u64,
    /// The user address of the privcmd mapping to fill.
    pub addr: u64,
}

/// Issues a device-model operation.
pub const IOCTL_PRIVCMD_DM_OP: u32 = ioc(IOC_NONE, b'P', 5, size_of::<PrivcmdDmOp>());
/// Restricts the handle to one domain for good: from then on it makes device-model operations
/// and mappings for that domain only, and no hypercall.
pub const IOCTL_PRIVCMD_RESTRICT: u32 = ioc(IOC_NONE, b'P', 6, size_of::<u16>());
/// Maps a resource's frames.
pub const IOCTL_PRIVCMD_MMAP_RESOURCE: u32 = ioc(IOC_NONE, b'P', 7, size_of::<PrivcmdMmapResource>());

/// `XEN_DMOP_create_ioreq_server` (a `HYPERVISOR_dm_op`, made through [`IOCTL_PRIVCMD_DM_OP`]).
pub const XEN_DMOP_CREATE_IOREQ_SERVER: u32 = 1;
/// `XEN_DMOP_map_io_range_to_ioreq_server`.
pub const XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER: u32 = 3;
/// `XEN_DMOP_set_ioreq_server_state`.
pub const XEN_DMOP_SET_IOREQ_SERVER_STATE: u32 = 5;
/// `XEN_DMOP_destroy_ioreq_server`.
pub const XEN_DMOP_DESTROY_IOREQ_SERVER: u32 = 6;
/// `XEN_DMOP_IO_RANGE_MEMORY`: an MMIO range.
pub const XEN_DMOP_IO_RANGE_MEMORY: u32 = 1;
/// `HVM_IOREQSRV_BUFIOREQ_OFF`: every request synchronous.
pub const HVM_IOREQSRV_BUFIOREQ_OFF: u8 = 0;
/// `XENMEM_resource_ioreq_server`.
pub const XENMEM_RESOURCE_IOREQ_SERVER: u32 = 0;
/// `XENMEM_resource_ioreq_server_frame_ioreq(0)`: the synchronous requests' page.
pub const XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ: u32 = 1;

/// `struct xen_dm_op` with one member of its union: the header is `op` and padding, and the
/// union starts at 8 (it holds 64-bit members).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenDmOp<T> {
    /// `XEN_DMOP_*`.
    pub op: u32,
    /// Padding.
    pub pad: u32,
    /// The operation's arguments.
    pub u: T,
}

/// `struct xen_dm_op_create_ioreq_server`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpCreateIoreqServer {
    /// `HVM_IOREQSRV_BUFIOREQ_*`.
    pub handle_bufioreq: u8,
    /// Padding.
    pub pad: [u8; 3],
    /// Out: the server's id.
    pub id: u16,
}

/// `struct xen_dm_op_ioreq_server_range`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpIoreqServerRange {
    /// The server.
    pub id: u16,
    /// Padding.
    pub pad: u16,
    /// `XEN_DMOP_IO_RANGE_*`.
    pub type_: u32,
    /// First address.
    pub start: u64,
    /// Last address (inclusive).
    pub end: u64,
}

/// `struct xen_dm_op_set_ioreq_server_state`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpSetIoreqServerState {
    /// The server.
    pub id: u16,
    /// 1: requests flow.
    pub enabled: u8,
    /// Padding.
    pub pad: u8,
}

/// `struct xen_dm_op_destroy_ioreq_server`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XenDmOpDestroyIoreqServer {
    /// The server.
    pub id: u16,
    /// Padding.
    pub pad: u16,
}

/// `__HYPERVISOR_domctl`.
pub const HYPERVISOR_DOMCTL: u64 = 36;
/// `XEN_DOMCTL_getdomaininfo`.
pub const XEN_DOMCTL_GETDOMAININFO: u32 = 5;

/// `struct xen_domctl_getdomaininfo`: only what we read is named; the rest of the union
/// member (`pad[128]`) is kept as bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenDomctlGetDomainInfo {
    /// The domain reported (Xen 4.17 reports the first domain at or above the one asked for).
    pub domain: u16,
    /// Padding.
    pub pad1: u16,
    /// `XEN_DOMINF_*`, with the shutdown code in bits 16..24.
    pub flags: u32,
    /// The other fields, unread.
    pub rest: [u64; 15],
}

/// `struct xen_domctl` with its `getdomaininfo` member: the header is the same for every
/// domctl and every interface version since Xen 4.x; `interface_version` must be the
/// hypervisor's own (`XEN_DOMCTL_INTERFACE_VERSION`), or it answers EACCES.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XenDomctl {
    /// `XEN_DOMCTL_*`.
    pub cmd: u32,
    /// `XEN_DOMCTL_INTERFACE_VERSION`.
    pub interface_version: u32,
    /// The domain asked about.
    pub domain: u16,
    /// Padding.
    pub pad: [u16; 3],
    /// The union `u`, as `getdomaininfo`.
    pub getdomaininfo: XenDomctlGetDomainInfo,
}

/// Issues `request` on `fd` with argument `arg`; returns the driver's non-negative result.
///
/// # Safety
/// `arg` must be null or point to a live, properly initialised value of the layout the driver
/// reads and writes for `request`.
pub(super) unsafe fn ioctl<T>(fd: BorrowedFd<'_>, request: u32, arg: *mut T) -> io::Result<u32> {
    // SAFETY: `fd` is open for the duration of the call (borrowed); the caller guarantees `arg`
    // matches what the driver expects for `request`. `request as Ioctl` is how C passes the
    // number too (unsigned long on glibc, int on musl).
    let rc: c_int = unsafe { libc::ioctl(fd.as_raw_fd(), request as libc::Ioctl, arg) };
    // A negative result is -1 with errno set.
    u32::try_from(rc).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// The numbers derived by hand from the headers: `_IOC(_IOC_NONE, type, nr, size)` is
    /// `size << 16 | type << 8 | nr` with the generic encoding, and the struct sizes follow from
    /// 8-byte-aligned `__u64` fields (64-bit ABIs; i386 aligns them to 4).
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "riscv64"))]
    fn numbers_derived_by_hand() {
        assert_eq!(size_of::<IoctlEvtchnBindInterdomain>(), 8);
        assert_eq!(size_of::<IoctlEvtchnBindUnboundPort>(), 4);
        assert_eq!(size_of::<IoctlEvtchnUnbind>(), 4);
        assert_eq!(size_of::<IoctlEvtchnNotify>(), 4);
        assert_eq!(IOCTL_EVTCHN_BIND_INTERDOMAIN, 0x0008_4501);
        assert_eq!(IOCTL_EVTCHN_BIND_UNBOUND_PORT, 0x0004_4502);
        assert_eq!(IOCTL_EVTCHN_UNBIND, 0x0004_4503);
        assert_eq!(IOCTL_EVTCHN_NOTIFY, 0x0004_4504);
        assert_eq!(IOCTL_EVTCHN_RESET, 0x0000_4505);

        // count, pad, index (u64), refs[1] of two u32: 4 + 4 + 8 + 8.
        assert_eq!(size_of::<IoctlGntdevMapGrantRef>(), 24);
        assert_eq!(offset_of!(IoctlGntdevMapGrantRef, index), 8);
        assert_eq!(offset_of!(IoctlGntdevMapGrantRef, refs), 16);
        assert_eq!(size_of::<IoctlGntdevUnmapGrantRef>(), 16);
        assert_eq!(size_of::<IoctlGntdevUnmapNotify>(), 16);
        assert_eq!(IOCTL_GNTDEV_MAP_GRANT_REF, 0x0018_4700);
        assert_eq!(IOCTL_GNTDEV_UNMAP_GRANT_REF, 0x0010_4701);
        assert_eq!(IOCTL_GNTDEV_SET_UNMAP_NOTIFY, 0x0010_4707);

        // domid u16, flags u16, count u32, index u64, gref_ids[1] u32, tail padding to 8: 24.
        assert_eq!(size_of::<IoctlGntallocAllocGref>(), 24);
        assert_eq!(offset_of!(IoctlGntallocAllocGref, flags), 2);
        assert_eq!(offset_of!(IoctlGntallocAllocGref, count), 4);
        assert_eq!(offset_of!(IoctlGntallocAllocGref, index), 8);
        assert_eq!(offset_of!(IoctlGntallocAllocGref, gref_ids), 16);
        // index u64, count u32, tail padding: 16.
        assert_eq!(size_of::<IoctlGntallocDeallocGref>(), 16);
        assert_eq!(IOCTL_GNTALLOC_ALLOC_GREF, 0x0018_4705);
        assert_eq!(IOCTL_GNTALLOC_DEALLOC_GREF, 0x0010_4706);
        assert_eq!(IOCTL_GNTALLOC_SET_UNMAP_NOTIFY, 0x0010_4707);
        assert_eq!(GNTALLOC_FLAG_WRITABLE, 1);

        // op and five arguments, all u64: 48.
        assert_eq!(size_of::<PrivcmdHypercall>(), 48);
        assert_eq!(IOCTL_PRIVCMD_HYPERCALL, 0x0030_5000);
        // domid u16, num u16, padding, a pointer: 16; the buffer is a pointer and a size_t.
        assert_eq!(size_of::<PrivcmdDmOp>(), 16);
        assert_eq!(size_of::<PrivcmdDmOpBuf>(), 16);
        // dom u16 (padded), type, id, idx u32, num, addr u64: 32.
        assert_eq!(size_of::<PrivcmdMmapResource>(), 32);
        assert_eq!(offset_of!(PrivcmdMmapResource, num), 16);
        assert_eq!(IOCTL_PRIVCMD_DM_OP, 0x0010_5005);
        assert_eq!(IOCTL_PRIVCMD_RESTRICT, 0x0002_5006);
        assert_eq!(IOCTL_PRIVCMD_MMAP_RESOURCE, 0x0020_5007);
    }

    #[test]
    fn ioc_packs_fields() {
        let n = ioc(IOC_READ | IOC_WRITE, 0xab, 0xcd, 0x123);
        assert_eq!(n & 0xff, 0xcd);
        assert_eq!((n >> 8) & 0xff, 0xab);
        assert_eq!((n >> 16) & ((1 << arch::IOC_SIZEBITS) - 1), 0x123);
        assert_eq!(n >> IOC_DIRSHIFT, IOC_READ | IOC_WRITE);
    }

    /// One value to compare: the C expression that computes it and Rust's value.
    fn rust_values() -> Vec<(&'static str, u64)> {
        macro_rules! sz {
            ($c:literal, $t:ty) => {
                [
                    (concat!("sizeof(struct ", $c, ")"), size_of::<$t>() as u64),
                    (concat!("_Alignof(struct ", $c, ")"), align_of::<$t>() as u64),
                ]
            };
        }
        macro_rules! off {
            ($c:literal, $t:ty, $cf:literal, $rf:ident) => {
                (concat!("offsetof(struct ", $c, ", ", $cf, ")"), offset_of!($t, $rf) as u64)
            };
        }
        let mut v: Vec<(&'static str, u64)> = vec![
            ("IOCTL_EVTCHN_BIND_INTERDOMAIN", IOCTL_EVTCHN_BIND_INTERDOMAIN.into()),
            ("IOCTL_EVTCHN_BIND_UNBOUND_PORT", IOCTL_EVTCHN_BIND_UNBOUND_PORT.into()),
            ("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND.into()),
            ("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY.into()),
            ("IOCTL_EVTCHN_RESET", IOCTL_EVTCHN_RESET.into()),
            ("IOCTL_GNTDEV_MAP_GRANT_REF", IOCTL_GNTDEV_MAP_GRANT_REF.into()),
            ("IOCTL_GNTDEV_UNMAP_GRANT_REF", IOCTL_GNTDEV_UNMAP_GRANT_REF.into()),
            ("IOCTL_GNTDEV_SET_UNMAP_NOTIFY", IOCTL_GNTDEV_SET_UNMAP_NOTIFY.into()),
            ("IOCTL_GNTALLOC_ALLOC_GREF", IOCTL_GNTALLOC_ALLOC_GREF.into()),
            ("IOCTL_GNTALLOC_DEALLOC_GREF", IOCTL_GNTALLOC_DEALLOC_GREF.into()),
            ("IOCTL_GNTALLOC_SET_UNMAP_NOTIFY", IOCTL_GNTALLOC_SET_UNMAP_NOTIFY.into()),
            ("GNTALLOC_FLAG_WRITABLE", GNTALLOC_FLAG_WRITABLE.into()),
            ("UNMAP_NOTIFY_CLEAR_BYTE", UNMAP_NOTIFY_CLEAR_BYTE.into()),
            ("UNMAP_NOTIFY_SEND_EVENT", UNMAP_NOTIFY_SEND_EVENT.into()),
            off!("ioctl_evtchn_bind_interdomain", IoctlEvtchnBindInterdomain, "remote_domain", remote_domain),
            off!("ioctl_evtchn_bind_interdomain", IoctlEvtchnBindInterdomain, "remote_port", remote_port),
            off!("ioctl_evtchn_bind_unbound_port", IoctlEvtchnBindUnboundPort, "remote_domain", remote_domain),
            off!("ioctl_evtchn_unbind", IoctlEvtchnUnbind, "port", port),
            off!("ioctl_evtchn_notify", IoctlEvtchnNotify, "port", port),
            off!("ioctl_gntdev_grant_ref", IoctlGntdevGrantRef, "domid", domid),
            off!("ioctl_gntdev_grant_ref", IoctlGntdevGrantRef, "ref", ref_),
            off!("ioctl_gntdev_map_grant_ref", IoctlGntdevMapGrantRef, "count", count),
            off!("ioctl_gntdev_map_grant_ref", IoctlGntdevMapGrantRef, "pad", pad),
            off!("ioctl_gntdev_map_grant_ref", IoctlGntdevMapGrantRef, "index", index),
            off!("ioctl_gntdev_map_grant_ref", IoctlGntdevMapGrantRef, "refs", refs),
            off!("ioctl_gntdev_unmap_grant_ref", IoctlGntdevUnmapGrantRef, "index", index),
            off!("ioctl_gntdev_unmap_grant_ref", IoctlGntdevUnmapGrantRef, "count", count),
            off!("ioctl_gntdev_unmap_grant_ref", IoctlGntdevUnmapGrantRef, "pad", pad),
            off!("ioctl_gntdev_unmap_notify", IoctlGntdevUnmapNotify, "index", index),
            off!("ioctl_gntdev_unmap_notify", IoctlGntdevUnmapNotify, "action", action),
            off!("ioctl_gntdev_unmap_notify", IoctlGntdevUnmapNotify, "event_channel_port", event_channel_port),
            off!("ioctl_gntalloc_alloc_gref", IoctlGntallocAllocGref, "domid", domid),
            off!("ioctl_gntalloc_alloc_gref", IoctlGntallocAllocGref, "flags", flags),
            off!("ioctl_gntalloc_alloc_gref", IoctlGntallocAllocGref, "count", count),
            off!("ioctl_gntalloc_alloc_gref", IoctlGntallocAllocGref, "index", index),
            off!("ioctl_gntalloc_alloc_gref", IoctlGntallocAllocGref, "gref_ids", gref_ids),
            off!("ioctl_gntalloc_dealloc_gref", IoctlGntallocDeallocGref, "index", index),
            off!("ioctl_gntalloc_dealloc_gref", IoctlGntallocDeallocGref, "count", count),
            off!("ioctl_gntalloc_unmap_notify", IoctlGntallocUnmapNotify, "index", index),
            off!("ioctl_gntalloc_unmap_notify", IoctlGntallocUnmapNotify, "action", action),
            off!("ioctl_gntalloc_unmap_notify", IoctlGntallocUnmapNotify, "event_channel_port", event_channel_port),
        ];
        v.extend(sz!("ioctl_evtchn_bind_interdomain", IoctlEvtchnBindInterdomain));
        v.extend(sz!("ioctl_evtchn_bind_unbound_port", IoctlEvtchnBindUnboundPort));
        v.extend(sz!("ioctl_evtchn_unbind", IoctlEvtchnUnbind));
        v.extend(sz!("ioctl_evtchn_notify", IoctlEvtchnNotify));
        v.extend(sz!("ioctl_gntdev_grant_ref", IoctlGntdevGrantRef));
        v.extend(sz!("ioctl_gntdev_map_grant_ref", IoctlGntdevMapGrantRef));
        v.extend(sz!("ioctl_gntdev_unmap_grant_ref", IoctlGntdevUnmapGrantRef));
        v.extend(sz!("ioctl_gntdev_unmap_notify", IoctlGntdevUnmapNotify));
        v.extend(sz!("ioctl_gntalloc_alloc_gref", IoctlGntallocAllocGref));
        v.extend(sz!("ioctl_gntalloc_dealloc_gref", IoctlGntallocDeallocGref));
        v.extend(sz!("ioctl_gntalloc_unmap_notify", IoctlGntallocUnmapNotify));
        v
    }

    /// Compiles a C program against the system's Linux uapi headers and compares every number
    /// and layout it prints with ours. Missing `cc` or headers is a failure: CI installs them.
    #[test]
    fn matches_the_c_headers() {
        let values = rust_values();
        xvtpm_tests::clayout::check(
            "#include <stddef.h>\n#include <stdint.h>\n#include <stdio.h>\n#include <sys/ioctl.h>\n\
             /* The uapi headers use these Xen types without defining them (Xen's public\n\
              * headers do, in the programs that normally include them). */\n\
             typedef uint16_t domid_t;\ntypedef uint32_t grant_ref_t;\n\
             #include <xen/evtchn.h>\n#include <xen/gntdev.h>\n#include <xen/gntalloc.h>\n\
             int main(void) {\n",
            &values,
            "install linux-libc-dev",
        );
    }

    /// The device-model operations' layouts and numbers, and `ioreq_t` (its bit fields read
    /// back from a C-filled slot), against Xen's public headers.
    #[test]
    fn matches_xens_dm_op_and_ioreq_headers() {
        use crate::ioreq;
        macro_rules! sz {
            ($c:literal, $t:ty) => {
                (concat!("sizeof(struct ", $c, ")"), size_of::<$t>() as u64)
            };
        }
        let values: Vec<(&str, u64)> = vec![
            ("XEN_DMOP_create_ioreq_server", XEN_DMOP_CREATE_IOREQ_SERVER.into()),
            ("XEN_DMOP_map_io_range_to_ioreq_server", XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER.into()),
            ("XEN_DMOP_set_ioreq_server_state", XEN_DMOP_SET_IOREQ_SERVER_STATE.into()),
            ("XEN_DMOP_destroy_ioreq_server", XEN_DMOP_DESTROY_IOREQ_SERVER.into()),
            ("XEN_DMOP_IO_RANGE_MEMORY", XEN_DMOP_IO_RANGE_MEMORY.into()),
            ("HVM_IOREQSRV_BUFIOREQ_OFF", HVM_IOREQSRV_BUFIOREQ_OFF.into()),
            ("XENMEM_resource_ioreq_server", XENMEM_RESOURCE_IOREQ_SERVER.into()),
            ("XENMEM_resource_ioreq_server_frame_ioreq(0)", XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ.into()),
            ("offsetof(struct xen_dm_op, u)", offset_of!(XenDmOp<XenDmOpIoreqServerRange>, u) as u64),
            sz!("xen_dm_op_create_ioreq_server", XenDmOpCreateIoreqServer),
            ("offsetof(struct xen_dm_op_create_ioreq_server, id)", offset_of!(XenDmOpCreateIoreqServer, id) as u64),
            sz!("xen_dm_op_ioreq_server_range", XenDmOpIoreqServerRange),
            ("offsetof(struct xen_dm_op_ioreq_server_range, type)", offset_of!(XenDmOpIoreqServerRange, type_) as u64),
            ("offsetof(struct xen_dm_op_ioreq_server_range, start)", offset_of!(XenDmOpIoreqServerRange, start) as u64),
            ("offsetof(struct xen_dm_op_ioreq_server_range, end)", offset_of!(XenDmOpIoreqServerRange, end) as u64),
            sz!("xen_dm_op_set_ioreq_server_state", XenDmOpSetIoreqServerState),
            ("offsetof(struct xen_dm_op_set_ioreq_server_state, enabled)", offset_of!(XenDmOpSetIoreqServerState, enabled) as u64),
            sz!("xen_dm_op_destroy_ioreq_server", XenDmOpDestroyIoreqServer),
            ("sizeof(ioreq_t)", ioreq::IOREQ_SIZE as u64),
            ("offsetof(ioreq_t, vp_eport)", 24),
            ("offsetof(ioreq_t, count)", 16),
            ("offsetof(ioreq_t, size)", 20),
            ("offsetof(ioreq_t, type)", 31),
            ("STATE_IOREQ_READY", ioreq::STATE_READY.into()),
            ("STATE_IORESP_READY", ioreq::STATE_RESP_READY.into()),
            ("IOREQ_TYPE_COPY", ioreq::TYPE_COPY.into()),
            (
                "({ ioreq_t r; memset(&r, 0, sizeof r); r.state = STATE_IOREQ_READY; r.dir = IOREQ_READ; r.df = 1; ((unsigned char *)&r)[30]; })",
                ioreq::IoRequest { read: true, df: true, ..ioreq::IoRequest::decode(0, &[0; ioreq::IOREQ_SIZE]) }
                    .encode(0, ioreq::STATE_READY)[ioreq::OFF_FLAGS]
                    .into(),
            ),
            (
                "({ ioreq_t r; memset(&r, 0, sizeof r); r.data_is_ptr = 1; ((unsigned char *)&r)[30]; })",
                ioreq::IoRequest { data_is_ptr: true, ..ioreq::IoRequest::decode(0, &[0; ioreq::IOREQ_SIZE]) }
                    .encode(0, ioreq::STATE_NONE)[ioreq::OFF_FLAGS]
                    .into(),
            ),
        ];
        xvtpm_tests::clayout::check(
            "#define __XEN_TOOLS__ 1\n#include <stddef.h>\n#include <stdint.h>\n#include <stdio.h>\n#include <string.h>\n\
             #include <xen/xen.h>\n#include <xen/memory.h>\n#include <xen/hvm/dm_op.h>\n#include <xen/hvm/hvm_op.h>\n#include <xen/hvm/ioreq.h>\n\
             int main(void) {\n",
            &values,
            "install libxen-dev",
        );
    }

    /// The domctl layout and numbers against Xen's own public headers (libxen-dev; `<xen/
    /// privcmd.h>` of Linux cannot be compiled alone, so its one struct is checked by hand
    /// above). Xen 4.17's interface version is the first we try.
    #[test]
    fn matches_xens_domctl_header() {
        let values: Vec<(&str, u64)> = vec![
            ("sizeof(struct xen_domctl)", size_of::<XenDomctl>() as u64),
            ("_Alignof(struct xen_domctl)", align_of::<XenDomctl>() as u64),
            ("offsetof(struct xen_domctl, cmd)", offset_of!(XenDomctl, cmd) as u64),
            ("offsetof(struct xen_domctl, interface_version)", offset_of!(XenDomctl, interface_version) as u64),
            ("offsetof(struct xen_domctl, domain)", offset_of!(XenDomctl, domain) as u64),
            ("offsetof(struct xen_domctl, u.getdomaininfo)", offset_of!(XenDomctl, getdomaininfo) as u64),
            ("sizeof(((struct xen_domctl *)0)->u)", size_of::<XenDomctlGetDomainInfo>() as u64),
            ("offsetof(struct xen_domctl_getdomaininfo, domain)", offset_of!(XenDomctlGetDomainInfo, domain) as u64),
            ("offsetof(struct xen_domctl_getdomaininfo, flags)", offset_of!(XenDomctlGetDomainInfo, flags) as u64),
            ("XEN_DOMCTL_getdomaininfo", u64::from(XEN_DOMCTL_GETDOMAININFO)),
            ("__HYPERVISOR_domctl", HYPERVISOR_DOMCTL),
            ("XEN_DOMCTL_INTERFACE_VERSION", u64::from(super::super::privcmd::DOMCTL_VERSIONS[0])),
            ("SHUTDOWN_suspend", u64::from(crate::ShutdownReason::Suspend.code())),
            ("SHUTDOWN_reboot", u64::from(crate::ShutdownReason::Reboot.code())),
            ("SHUTDOWN_soft_reset", u64::from(crate::ShutdownReason::SoftReset.code())),
            (
                "XEN_DOMINF_dying | XEN_DOMINF_shutdown | (SHUTDOWN_crash << XEN_DOMINF_shutdownshift)",
                u64::from(crate::DomainInfo { shutdown: Some(crate::ShutdownReason::Crash), dying: true }.to_flags()),
            ),
        ];
        xvtpm_tests::clayout::check(
            "#define __XEN_TOOLS__ 1\n#include <stddef.h>\n#include <stdint.h>\n#include <stdio.h>\n\
             #include <xen/domctl.h>\n#include <xen/sched.h>\n\
             int main(void) {\n",
            &values,
            "install libxen-dev",
        );
    }
}
