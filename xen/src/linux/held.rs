//! Xen's devices opened up front, for a process about to lose the right to open them (a
//! sandboxed vtpm: another uid, and a root where `/dev/xen` and xenstored's socket are not).
//! Each held device goes to the first caller that asks for it; a later caller gets a new one
//! opened as [`LinuxXen`] would, which in the sandbox fails with the device named. privcmd is
//! not held here: questions about domains go to a [`DomainHelper`].

use std::sync::Mutex;

use super::helper::DomainHelper;
use super::{LinuxEvtchn, LinuxGntdev, LinuxXen};
use crate::{DomId, DomainInfo, EventChannel, GrantAllocator, GrantMapper, Result, Xen, Xenstore};

/// Xen's devices, opened by [`HeldXen::open`].
#[derive(Debug)]
pub struct HeldXen {
    linux: LinuxXen,
    xenstore: Xenstore,
    evtchn: Mutex<Option<LinuxEvtchn>>,
    gntdev: Mutex<Option<LinuxGntdev>>,
    helper: DomainHelper,
}

impl HeldXen {
    /// Opens an event channel handle (restricted to domain `frontend` when given: the one
    /// guest served) and the grant mapper, as domain `domid`; questions about domains go to
    /// `helper`, and xenstore requests over `xenstore` (the helper's relay; `None`: a direct
    /// connection).
    pub fn open(
        domid: DomId,
        frontend: Option<DomId>,
        helper: DomainHelper,
        xenstore: Option<std::os::unix::net::UnixStream>,
    ) -> Result<Self> {
        let evtchn = LinuxEvtchn::open()?;
        if let Some(f) = frontend {
            evtchn.restrict_to(f)?;
        }
        Ok(HeldXen {
            linux: LinuxXen::with_domid(domid),
            xenstore: match xenstore {
                Some(s) => Xenstore::from_unix(s)?,
                None => super::open_xenstore()?,
            },
            evtchn: Mutex::new(Some(evtchn)),
            gntdev: Mutex::new(Some(LinuxGntdev::open()?)),
            helper,
        })
    }
}

impl Xen for HeldXen {
    fn domid(&self) -> DomId {
        self.linux.domid()
    }

    /// The held connection: every caller shares it (its requests are matched to replies by id).
    fn xenstore(&self) -> Result<Xenstore> {
        Ok(self.xenstore.clone())
    }

    fn evtchn(&self) -> Result<Box<dyn EventChannel>> {
        match self.evtchn.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            Some(e) => Ok(Box::new(e)),
            None => self.linux.evtchn(),
        }
    }

    fn grant_mapper(&self) -> Result<Box<dyn GrantMapper>> {
        match self.gntdev.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            Some(g) => Ok(Box::new(g)),
            None => self.linux.grant_mapper(),
        }
    }

    /// Not held: a backend never grants pages.
    fn grant_allocator(&self) -> Result<Box<dyn GrantAllocator>> {
        self.linux.grant_allocator()
    }

    fn domain_info(&self, domid: DomId) -> Result<Option<DomainInfo>> {
        self.helper.domain_info(domid)
    }
}
