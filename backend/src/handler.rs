//! What the backend hands TPM commands to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use xvtpm_xen::tpmif::{Tpmif, TpmifState};
use xvtpm_xen::{DomId, SharedPage, ShutdownReason};

use crate::stop::Stop;

/// The device a command came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceInfo {
    /// Frontend domain id.
    pub frontend: DomId,
    /// Device handle (the `<id>` in `device/vtpm/<id>`).
    pub handle: u32,
    /// The device's uuid as libxl wrote it (lower case): the vTPM's identity.
    pub uuid: String,
    /// What tells this life of the frontend domain from another with the same id: its `vm`
    /// path and that path's `start_time` (libxl writes both for every domain it makes), or
    /// `None` where we cannot read them (a backend outside dom0 may not).
    pub life: Option<String>,
    /// This connection was found Connected by an earlier backend process: the guest was using
    /// the TPM before this process started.
    pub adopted: bool,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vtpm {}/{} ({})", self.frontend, self.handle, self.uuid)
    }
}

/// Tells whether the command being handled should stop: the frontend asked to cancel it, or
/// the device is going away (guest destroyed, backend stopping), in which case nobody will read
/// the response. Cheap (two loads) and `Send`, so an engine may poll it from another thread.
/// A probe kept after the command returns keeps the page mapped: drop it.
#[derive(Clone, Debug)]
pub struct CancelProbe(Probe);

#[derive(Clone, Debug)]
enum Probe {
    /// A tpmif connection: the page's CANCEL, or the connection stopped.
    Page(Arc<SharedPage>, Arc<Stop>),
    /// Another transport (an HVM guest's registers) sets a flag.
    Flag(Arc<AtomicBool>),
}

impl CancelProbe {
    pub(crate) fn new(page: Arc<SharedPage>, stop: Arc<Stop>) -> Self {
        CancelProbe(Probe::Page(page, stop))
    }

    /// A probe for a transport without a tpmif page: cancelled while `flag` is set.
    pub fn from_flag(flag: Arc<AtomicBool>) -> Self {
        CancelProbe(Probe::Flag(flag))
    }

    /// True once the frontend wrote CANCEL or the connection was stopped.
    pub fn is_cancelled(&self) -> bool {
        match &self.0 {
            Probe::Page(page, stop) => stop.is_set() || matches!(Tpmif::new(page).state(), Ok(TpmifState::Cancel)),
            Probe::Flag(f) => f.load(Ordering::SeqCst),
        }
    }
}

/// One command from a frontend.
#[derive(Debug)]
pub struct Request<'a> {
    /// The device it came from.
    pub device: &'a DeviceInfo,
    /// The locality byte the frontend set (stock Linux leaves it 0).
    pub locality: u8,
    /// The command bytes (untrusted).
    pub command: &'a [u8],
    /// The largest response that fits the shared page.
    pub max_response: usize,
    pub(crate) cancel: &'a CancelProbe,
}

impl<'a> Request<'a> {
    /// A command from a transport other than tpmback (an HVM guest's registers).
    pub fn new(
        device: &'a DeviceInfo,
        locality: u8,
        command: &'a [u8],
        max_response: usize,
        cancel: &'a CancelProbe,
    ) -> Self {
        Request { device, locality, command, max_response, cancel }
    }

    /// True once the frontend asked to cancel this command or the device is going away; the
    /// backend then discards the response, so a handler may stop early.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// A probe to check cancellation from another thread.
    pub fn cancel_probe(&self) -> CancelProbe {
        self.cancel.clone()
    }
}

/// Handles the commands of every device a backend serves: from several threads at once (one
/// device's calls never overlap, and come in order: `connected`, commands, `disconnected`),
/// never from the thread that follows xenstore; `domain_shut_down` and `frontend_closed` come
/// from that thread, so keep them short.
pub trait CommandHandler: Send + Sync {
    /// Executes a command and returns the response. A response longer than
    /// [`Request::max_response`] is not delivered (the frontend sees the command cancelled).
    fn handle(&self, req: &Request<'_>) -> Vec<u8>;

    /// A device's frontend connected (the page is mapped, the event channel bound).
    fn connected(&self, _device: &DeviceInfo) {}

    /// Whether [`CommandHandler::domain_shut_down`] matters to this handler. Only then does a
    /// backend watch `@releaseDomain` and ask the hypervisor about its guests' domains.
    fn follows_suspends(&self) -> bool {
        false
    }

    /// A connected device's frontend domain shut down, and the hypervisor says why: for a
    /// suspend (`xl save`, `xl migrate`, `xl save -c`), what the guest has now is what its
    /// next domain resumes with; for any other reason (poweroff, reboot, crash) its next
    /// domain is a new platform. Told once per shutdown, only where the backend may ask the
    /// hypervisor (dom0), to a handler that [`CommandHandler::follows_suspends`].
    fn domain_shut_down(&self, _device: &DeviceInfo, _reason: ShutdownReason) {}

    /// A connected device's frontend closed: the guest shuts down or reboots, or unloaded its
    /// driver; or (for a handler that follows suspends) a guest the hypervisor says runs let
    /// go of its device in any way. A suspended guest leaves it connected.
    fn frontend_closed(&self, _device: &DeviceInfo) {}

    /// A device disconnected (frontend closed, device removed, or protocol error).
    fn disconnected(&self, _device: &DeviceInfo) {}
}

/// Returns every command unchanged: for tests and benchmarks of the transport.
#[derive(Debug, Default, Clone, Copy)]
pub struct EchoHandler;

impl CommandHandler for EchoHandler {
    fn handle(&self, req: &Request<'_>) -> Vec<u8> {
        req.command.to_vec()
    }
}
