//! The bundle of Xen interfaces a backend or frontend needs, real or simulated.

use crate::{DomId, EventChannel, GrantAllocator, GrantMapper, Result, Xenstore};

/// Everything a driver domain needs from Xen. [`crate::linux::LinuxXen`] is the real one,
/// [`crate::sim::SimXen`] the simulation.
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
}
