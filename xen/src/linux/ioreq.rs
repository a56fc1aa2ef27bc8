//! An ioreq server made through `/dev/xen/privcmd`'s device-model operations: how a process in
//! dom0 (outside QEMU) emulates an MMIO range of one HVM guest.
//!
//! The privcmd handle is restricted to the guest's domain before anything else, so the process
//! holding it can make device-model operations on that guest only, and no other hypercall:
//! what QEMU's own `-xen-domid-restrict` does.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::evtchn::LinuxEvtchn;
use super::ioctl::{
    ioctl, PrivcmdDmOp, PrivcmdDmOpBuf, PrivcmdMmapResource, XenDmOp, XenDmOpCreateIoreqServer,
    XenDmOpDestroyIoreqServer, XenDmOpIoreqServerRange, XenDmOpSetIoreqServerState, HVM_IOREQSRV_BUFIOREQ_OFF,
    IOCTL_PRIVCMD_DM_OP, IOCTL_PRIVCMD_MMAP_RESOURCE, IOCTL_PRIVCMD_RESTRICT, XENMEM_RESOURCE_IOREQ_SERVER,
    XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ, XEN_DMOP_CREATE_IOREQ_SERVER, XEN_DMOP_DESTROY_IOREQ_SERVER,
    XEN_DMOP_IO_RANGE_MEMORY, XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER, XEN_DMOP_SET_IOREQ_SERVER_STATE,
};
use super::privcmd::PRIVCMD;
use crate::ioreq::{self, IoRequest, IoreqServer, IOREQ_SIZE, SLOTS};
use crate::{DomId, Error, EventChannel, Port, Result, PAGE_SIZE};

/// A privcmd handle that serves one domain only.
#[derive(Debug)]
pub struct DeviceModel {
    privcmd: OwnedFd,
    domid: DomId,
}

impl DeviceModel {
    /// Opens privcmd and restricts the handle to `domid` for good.
    pub fn open(domid: DomId) -> Result<Self> {
        let privcmd = super::open_device(std::path::Path::new(PRIVCMD), 0)?;
        let mut dom = domid;
        // SAFETY: the restrict ioctl reads one domid_t, which `dom` is, live for the call.
        unsafe { ioctl(privcmd.as_fd(), IOCTL_PRIVCMD_RESTRICT, &mut dom) }
            .map_err(|e| Error::io(format!("restrict {PRIVCMD} to domain {domid}"), e))?;
        Ok(DeviceModel { privcmd, domid })
    }

    /// The domain served.
    pub fn domid(&self) -> DomId {
        self.domid
    }

    /// Makes device-model operation `op` with arguments `args` (read and written back).
    fn op<T>(&self, name: &str, op: u32, args: &mut T) -> Result<()>
    where
        T: Copy,
    {
        let mut buf = XenDmOp { op, pad: 0, u: *args };
        let bufs = [PrivcmdDmOpBuf { uptr: (&raw mut buf).cast(), size: size_of::<XenDmOp<T>>() }];
        let mut call = PrivcmdDmOp { dom: self.domid, num: 1, ubufs: bufs.as_ptr() };
        // SAFETY: `call` names one buffer, `buf`, with its true size; both live on this frame
        // for the call, and the kernel pins the buffer while Xen reads and writes it.
        unsafe { ioctl(self.privcmd.as_fd(), IOCTL_PRIVCMD_DM_OP, &mut call) }
            .map_err(|e| Error::io(format!("{name} (domain {})", self.domid), e))?;
        *args = buf.u;
        Ok(())
    }

    /// Destroys ioreq server `id` of the domain (one a dead process left), best effort: its
    /// ranges would otherwise overlap a new server's.
    pub fn destroy_ioreq_server(&self, id: u16) {
        let mut d = XenDmOpDestroyIoreqServer { id, pad: 0 };
        if let Err(e) = self.op("XEN_DMOP_destroy_ioreq_server", XEN_DMOP_DESTROY_IOREQ_SERVER, &mut d) {
            log::warn!("{e}");
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.privcmd.as_fd()
    }
}

/// The server's page of synchronous requests, mapped from Xen.
#[derive(Debug)]
struct IoreqPage {
    ptr: NonNull<u8>,
}

// SAFETY: the page is plain shared memory; every access goes through volatile reads and
// writes or atomics on the state byte, from whichever thread holds the server.
unsafe impl Send for IoreqPage {}
// SAFETY: as above; concurrent users coordinate through the slot's state byte.
unsafe impl Sync for IoreqPage {}

impl IoreqPage {
    /// Maps frame `XENMEM_resource_ioreq_server_frame_ioreq(0)` of server `id`.
    fn map(dm: &DeviceModel, id: u16) -> Result<Self> {
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        // SAFETY: a new shared mapping of one page of the privcmd device, at an address of the
        // kernel's choosing; it only reserves the range the ioctl below fills.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), PAGE_SIZE, prot, libc::MAP_SHARED, dm.fd().as_raw_fd(), 0) };
        if p == libc::MAP_FAILED {
            return Err(Error::io("map a page of the privcmd device", io::Error::last_os_error()));
        }
        let page = IoreqPage {
            ptr: NonNull::new(p.cast::<u8>()).ok_or_else(|| Error::io("mmap", io::ErrorKind::Other.into()))?,
        };
        let mut res = PrivcmdMmapResource {
            dom: dm.domid,
            type_: XENMEM_RESOURCE_IOREQ_SERVER,
            id: id.into(),
            idx: XENMEM_RESOURCE_IOREQ_SERVER_FRAME_IOREQ,
            num: 1,
            addr: p as u64,
        };
        // SAFETY: `res` describes the one privcmd page mapped above, owned by `page`.
        unsafe { ioctl(dm.fd(), IOCTL_PRIVCMD_MMAP_RESOURCE, &mut res) }
            .map_err(|e| Error::io(format!("map the ioreq page of server {id} (domain {})", dm.domid), e))?;
        Ok(page)
    }

    /// A copy of `vcpu`'s slot.
    fn slot(&self, vcpu: usize) -> [u8; IOREQ_SIZE] {
        assert!(vcpu < SLOTS, "vCPU slot {vcpu} outside the page");
        // SAFETY: slot `vcpu` lies inside the mapped page (vcpu < SLOTS); a volatile read,
        // since Xen writes the page.
        unsafe { self.ptr.as_ptr().add(vcpu * IOREQ_SIZE).cast::<[u8; IOREQ_SIZE]>().read_volatile() }
    }

    /// `vcpu`'s state byte.
    fn flags(&self, vcpu: usize) -> &AtomicU8 {
        assert!(vcpu < SLOTS, "vCPU slot {vcpu} outside the page");
        // SAFETY: the byte lies inside the mapped page, which lives as long as `self`; Xen
        // accesses it as a byte too, and AtomicU8 has the layout of u8.
        unsafe { AtomicU8::from_ptr(self.ptr.as_ptr().add(vcpu * IOREQ_SIZE + ioreq::OFF_FLAGS)) }
    }

    /// Writes `vcpu`'s data field.
    fn set_data(&self, vcpu: usize, data: u64) {
        assert!(vcpu < SLOTS, "vCPU slot {vcpu} outside the page");
        // SAFETY: bytes 8..16 of slot `vcpu` lie inside the mapped page; 8-byte aligned.
        unsafe { self.ptr.as_ptr().add(vcpu * IOREQ_SIZE + 8).cast::<u64>().write_volatile(data.to_le()) }
    }
}

impl Drop for IoreqPage {
    fn drop(&mut self) {
        // SAFETY: the page was mapped by `map` and nothing refers to it any more.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), PAGE_SIZE) };
    }
}

/// An enabled ioreq server for one guest's MMIO ranges; destroyed when dropped.
#[derive(Debug)]
pub struct LinuxIoreqServer {
    dm: DeviceModel,
    id: u16,
    page: IoreqPage,
    evtchn: LinuxEvtchn,
    /// Local port to vCPU, and back.
    vcpu_of: HashMap<Port, usize>,
    port_of: Vec<Port>,
    /// Requests found waiting when the ports were bound.
    early: Mutex<VecDeque<usize>>,
    /// Left to Xen when dropped, for a later process to adopt.
    keep: std::sync::atomic::AtomicBool,
}

impl LinuxIoreqServer {
    /// Registers a server for `dm`'s domain that gets its accesses to the inclusive MMIO
    /// ranges `mmio`, and enables it.
    pub fn create(dm: DeviceModel, mmio: &[(u64, u64)]) -> Result<Self> {
        let mut create = XenDmOpCreateIoreqServer { handle_bufioreq: HVM_IOREQSRV_BUFIOREQ_OFF, ..Default::default() };
        dm.op("XEN_DMOP_create_ioreq_server", XEN_DMOP_CREATE_IOREQ_SERVER, &mut create)?;
        let id = create.id;
        let made = (|| {
            let page = IoreqPage::map(&dm, id)?;
            for &(start, end) in mmio {
                let mut range = XenDmOpIoreqServerRange { id, pad: 0, type_: XEN_DMOP_IO_RANGE_MEMORY, start, end };
                dm.op("XEN_DMOP_map_io_range_to_ioreq_server", XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER, &mut range)?;
            }
            let mut state = XenDmOpSetIoreqServerState { id, enabled: 1, pad: 0 };
            dm.op("XEN_DMOP_set_ioreq_server_state", XEN_DMOP_SET_IOREQ_SERVER_STATE, &mut state)?;
            Ok(page)
        })();
        let served = match made {
            Ok(page) => Self::serve(dm, id, page, "new"),
            Err(e) => Err((dm, e)),
        };
        served.map_err(|(dm, e)| {
            let mut d = XenDmOpDestroyIoreqServer { id, pad: 0 };
            let _ = dm.op("XEN_DMOP_destroy_ioreq_server", XEN_DMOP_DESTROY_IOREQ_SERVER, &mut d);
            e
        })
    }

    /// Takes over server `id` of `dm`'s domain, which an earlier process made and left
    /// (it ended without destroying it): a vCPU waiting on it gets its answer from us.
    pub fn adopt(dm: DeviceModel, id: u16) -> Result<Self> {
        let page = IoreqPage::map(&dm, id)?;
        Self::serve(dm, id, page, "adopted").map_err(|(_, e)| e)
    }

    /// The server's id (for a later process to adopt).
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Leaves the server registered when this is dropped: the guest's vCPUs that touch its
    /// ranges then wait for the process that adopts it, instead of reading all ones.
    pub fn keep(&self) {
        self.keep.store(true, Ordering::SeqCst);
    }

    /// Binds the vCPUs' event channels of an enabled server whose page is mapped.
    fn serve(dm: DeviceModel, id: u16, page: IoreqPage, how: &str) -> std::result::Result<Self, (DeviceModel, Error)> {
        let bound = (|| {
            // Enabled, Xen has written each vCPU's event channel into its slot.
            let evtchn = LinuxEvtchn::open()?;
            evtchn.restrict_to(dm.domid)?;
            let mut vcpu_of = HashMap::new();
            let mut port_of = Vec::new();
            for vcpu in 0..SLOTS {
                let remote = ioreq::slot_port(&page.slot(vcpu));
                if remote == 0 {
                    break;
                }
                let local = evtchn.bind_interdomain(dm.domid, remote)?;
                vcpu_of.insert(local, vcpu);
                port_of.push(local);
            }
            if port_of.is_empty() {
                return Err(Error::io(
                    format!("ioreq server {id} of domain {}: no vCPU event channel in its page", dm.domid),
                    io::ErrorKind::InvalidData.into(),
                ));
            }
            // A vCPU that made a request before its port was bound, or whose request an
            // earlier process took and never answered, would wait for good.
            let early: VecDeque<usize> = (0..port_of.len())
                .filter(|&v| {
                    let state = ioreq::slot_state(page.flags(v).load(Ordering::Acquire));
                    state == ioreq::STATE_READY || state == ioreq::STATE_INPROCESS
                })
                .collect();
            // An answer an earlier process wrote but did not signal: the vCPU still sleeps.
            for (v, port) in port_of.iter().enumerate() {
                if ioreq::slot_state(page.flags(v).load(Ordering::Acquire)) == ioreq::STATE_RESP_READY {
                    evtchn.notify(*port)?;
                }
            }
            Ok((evtchn, vcpu_of, port_of, early))
        })();
        match bound {
            Ok((evtchn, vcpu_of, port_of, early)) => {
                log::info!(
                    "ioreq server {id} ({how}) for domain {}: {} vCPU(s), {} request(s) waiting",
                    dm.domid,
                    port_of.len(),
                    early.len()
                );
                Ok(LinuxIoreqServer {
                    dm,
                    id,
                    page,
                    evtchn,
                    vcpu_of,
                    port_of,
                    early: Mutex::new(early),
                    keep: false.into(),
                })
            }
            Err(e) => Err((dm, e)),
        }
    }

    /// Takes `vcpu`'s request if one is ready (or, `left` over by an earlier process, in
    /// process).
    fn take(&self, vcpu: usize, left: bool) -> Option<IoRequest> {
        let flags = self.page.flags(vcpu);
        let f = flags.load(Ordering::Acquire);
        let state = ioreq::slot_state(f);
        if state != ioreq::STATE_READY && !(left && state == ioreq::STATE_INPROCESS) {
            return None;
        }
        let slot = self.page.slot(vcpu);
        flags.store((f & 0xF0) | ioreq::STATE_INPROCESS, Ordering::Release);
        Some(IoRequest::decode(vcpu as u32, &slot))
    }
}

impl IoreqServer for LinuxIoreqServer {
    fn next(&self, timeout: Option<Duration>) -> Result<Option<IoRequest>> {
        loop {
            let early = self.early.lock().unwrap_or_else(PoisonError::into_inner).pop_front();
            if let Some(vcpu) = early {
                if let Some(req) = self.take(vcpu, true) {
                    return Ok(Some(req));
                }
                continue;
            }
            let Some(port) = self.evtchn.wait(timeout)? else { return Ok(None) };
            let vcpu = self.vcpu_of.get(&port).copied();
            self.evtchn.unmask(port)?;
            // A notification without a ready request (spurious, or for one already taken).
            if let Some(req) = vcpu.and_then(|v| self.take(v, false)) {
                return Ok(Some(req));
            }
        }
    }

    fn complete(&self, req: &IoRequest, data: u64) -> Result<()> {
        let vcpu = req.vcpu as usize;
        let port = *self.port_of.get(vcpu).ok_or_else(|| {
            Error::io(format!("complete a request of vCPU {vcpu}"), io::ErrorKind::InvalidInput.into())
        })?;
        if req.read && !req.data_is_ptr {
            self.page.set_data(vcpu, data);
        }
        // The Release store makes the data visible before the state that tells Xen to read it.
        let flags = self.page.flags(vcpu);
        let f = flags.load(Ordering::Relaxed);
        flags.store((f & 0xF0) | ioreq::STATE_RESP_READY, Ordering::Release);
        self.evtchn.notify(port)
    }

    fn interrupt(&self) {
        self.evtchn.interrupt();
    }

    fn domid(&self) -> DomId {
        self.dm.domid
    }
}

impl Drop for LinuxIoreqServer {
    fn drop(&mut self) {
        if self.keep.load(Ordering::SeqCst) {
            return;
        }
        // Its ranges go with it; the guest's later accesses there read all ones.
        let mut d = XenDmOpDestroyIoreqServer { id: self.id, pad: 0 };
        if let Err(e) = self.dm.op("XEN_DMOP_destroy_ioreq_server", XEN_DMOP_DESTROY_IOREQ_SERVER, &mut d) {
            // Gone with its domain, usually.
            log::debug!("{e}");
        }
    }
}
