//! The bundle of Xen interfaces a backend or frontend needs, real or simulated.

use std::path::Path;
use std::sync::Arc;

use crate::{DomId, DomainInfo, Error, EventChannel, GrantAllocator, GrantMapper, Result, Xenstore};

/// Everything a driver domain needs from Xen. [`crate::linux::LinuxXen`] is the real one,
/// `sim::SimXen` the simulation.
pub trait Xen: Send + Sync + std::fmt::Debug {
    /// Our own domain id.
    fn domid(&self) -> DomId;
    /// A new xenstore connection.
    fn xenstore(&self) -> Result<Xenstore>;
    /// A new event channel handle (each device gets its own, so it can wait on it alone).
    fn evtchn(&self) -> Result<Box<dyn EventChannel>>;
    /// Maps pages granted to us.
    fn grant_mapper(&self) -> Result<Box<dyn GrantMapper>>;
    /// Grants our pages to others.
    fn grant_allocator(&self) -> Result<Box<dyn GrantAllocator>>;
    /// What the hypervisor says of domain `domid` (whether it shut down, and why); `None`
    /// if there is no such domain. Only a privileged domain may ask.
    fn domain_info(&self, domid: DomId) -> Result<Option<DomainInfo>>;
}

/// The Xen a daemon's `--sim DIR --domid N` options name: the simulated one in `sim` (only in
/// builds with the `sim` feature), else the real one, as domain `domid` or the domain
/// xenstore says we are.
pub fn open(sim: Option<&Path>, domid: Option<DomId>) -> Result<Arc<dyn Xen>> {
    Ok(match (sim, domid) {
        (Some(dir), Some(d)) => simulated(dir, d)?,
        (Some(_), None) => return Err(Error::Sim("the simulated Xen needs our domain id (--domid)".into())),
        (None, Some(d)) => Arc::new(crate::linux::LinuxXen::with_domid(d)),
        (None, None) => Arc::new(crate::linux::LinuxXen::open()?),
    })
}

#[cfg(feature = "sim")]
fn simulated(dir: &Path, domid: DomId) -> Result<Arc<dyn Xen>> {
    Ok(Arc::new(crate::sim::SimXen::new(dir, domid)))
}

#[cfg(not(feature = "sim"))]
fn simulated(dir: &Path, _domid: DomId) -> Result<Arc<dyn Xen>> {
    Err(Error::Sim(format!("this build has no simulated Xen (feature `sim`), so {} cannot be used", dir.display())))
}
