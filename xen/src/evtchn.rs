//! Event channels: the doorbell between two domains.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use crate::{DomId, Result};

/// An event channel port number.
pub type Port = u32;

/// One event channel handle, like an open `/dev/xen/evtchn`: the ports bound through it fire
/// on it. A port that fired stays masked until [`EventChannel::unmask`], so a peer that notifies
/// in a loop costs one wake-up per unmask, not one per notification.
pub trait EventChannel: Send + Sync + std::fmt::Debug {
    /// Binds to `remote_port` of `remote`, which that domain allocated for us; returns the
    /// local port.
    fn bind_interdomain(&self, remote: DomId, remote_port: Port) -> Result<Port>;
    /// Allocates a port that `remote` may bind to.
    fn alloc_unbound(&self, remote: DomId) -> Result<Port>;
    /// Closes a local port.
    fn unbind(&self, port: Port) -> Result<()>;
    /// Signals the peer of a local port.
    fn notify(&self, port: Port) -> Result<()>;
    /// Re-enables delivery of a port that fired.
    fn unmask(&self, port: Port) -> Result<()>;
    /// Waits up to `timeout` (forever when `None`) for a port to fire; `Ok(None)` on timeout.
    fn wait(&self, timeout: Option<Duration>) -> Result<Option<Port>>;
    /// A descriptor that polls readable when a port has fired.
    fn fd(&self) -> BorrowedFd<'_>;
    /// Makes the [`EventChannel::wait`] in progress, or else the next one, return `Ok(None)`
    /// at once: how another thread stops a waiter that waits without a timeout.
    fn interrupt(&self);
}
