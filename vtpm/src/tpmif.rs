//! Serving a Xen guest: the vTPM as tpmback's command handler.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use xvtpm_backend::{CancelProbe, CommandHandler, DeviceInfo, Request};

use crate::engine::{error_response, failure_rc, Canceller, TpmEngine};

/// How often a long command is checked for cancellation (libtpms checks its flag in long
/// operations such as RSA key generation).
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// The highest locality a guest may claim unless its device allows more: 0. A Xen guest has
/// no DRTM, so a claim of locality 1-3 is only its kernel's word, and PCRs 17-22 (reset and
/// extended at those localities) would then mean nothing to a verifier; Linux's tpmfront
/// always sends 0. Locality 4 is the platform's own and never allowed.
pub const DEFAULT_MAX_LOCALITY: u8 = 0;
/// Localities a TPM has.
pub const MAX_LOCALITY: u8 = 4;

/// The vTPM behind tpmback: one engine, commands serialized.
pub struct VtpmHandler {
    engine: Mutex<Box<dyn TpmEngine>>,
    running: Arc<Mutex<Option<CancelProbe>>>,
    /// The highest locality the guest may claim.
    max_locality: u8,
    /// The frontend domain served last: a device of another domain is another guest (a new
    /// platform), whose TPM must start reset.
    last_frontend: Mutex<Option<xvtpm_xen::DomId>>,
}

impl std::fmt::Debug for VtpmHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VtpmHandler").finish_non_exhaustive()
    }
}

impl VtpmHandler {
    /// Serves `engine` (powered on by the caller) to a guest that may claim localities up to
    /// [`DEFAULT_MAX_LOCALITY`]. A watcher thread forwards a frontend's CANCEL of a long
    /// command to the engine.
    pub fn new(engine: Box<dyn TpmEngine>) -> Arc<Self> {
        Self::with_max_locality(engine, DEFAULT_MAX_LOCALITY)
    }

    /// [`VtpmHandler::new`] for a guest that may claim localities up to `max_locality` (at
    /// most 3: locality 4 is the platform's).
    pub fn with_max_locality(engine: Box<dyn TpmEngine>, max_locality: u8) -> Arc<Self> {
        let canceller = engine.canceller();
        let running: Arc<Mutex<Option<CancelProbe>>> = Arc::default();
        let weak = Arc::downgrade(&running);
        let spawned = std::thread::Builder::new().name("vtpm-cancel".into()).spawn(move || watch(weak, canceller));
        if let Err(e) = spawned {
            log::warn!("no cancel watcher (commands cannot be cancelled): {e}");
        }
        Arc::new(VtpmHandler {
            engine: Mutex::new(engine),
            running,
            max_locality: max_locality.min(MAX_LOCALITY - 1),
            last_frontend: Mutex::new(None),
        })
    }
}

/// Power-cycles the TPM as a platform reset does: its volatile state (PCRs, sessions, loaded
/// objects) is dropped, the permanent state kept, and it is started with Startup(CLEAR).
fn platform_reset(engine: &mut dyn TpmEngine) -> crate::Result<()> {
    engine.shutdown();
    engine.init(true)?;
    let cmd = xvtpm_proto::tpm::startup(engine.version().into(), xvtpm_proto::tpm::StartupType::Clear)
        .ok_or_else(|| crate::Error::Config("no startup command for this TPM version".into()))?;
    let rsp = engine.process(0, &cmd)?;
    match xvtpm_proto::tpm::code(&rsp) {
        Some(0) => Ok(()),
        code => Err(crate::Error::Config(format!("TPM startup answered {code:x?}"))),
    }
}

fn watch(running: std::sync::Weak<Mutex<Option<CancelProbe>>>, cancel: Canceller) {
    while let Some(slot) = running.upgrade() {
        let cancelled = slot.lock().map(|p| p.as_ref().is_some_and(CancelProbe::is_cancelled)).unwrap_or(false);
        drop(slot);
        if cancelled {
            cancel();
        }
        std::thread::sleep(CANCEL_POLL);
    }
}

impl CommandHandler for VtpmHandler {
    fn handle(&self, req: &Request<'_>) -> Vec<u8> {
        let mut engine = match self.engine.lock() {
            Ok(e) => e,
            Err(p) => p.into_inner(),
        };
        if req.locality > self.max_locality {
            log::warn!(
                "{}: command at locality {} refused (this device allows up to {})",
                req.device,
                req.locality,
                self.max_locality
            );
            let rc = match engine.version() {
                // TPM_RC_LOCALITY; TPM_BAD_LOCALITY.
                crate::TpmVersion::V2_0 => 0x907,
                crate::TpmVersion::V1_2 => 0x3D,
            };
            return error_response(engine.version(), rc);
        }
        if let Ok(mut slot) = self.running.lock() {
            *slot = Some(req.cancel_probe());
        }
        // The stock Linux guest kernel speaks TPM 1.2 to its xen-tpmfront chip on its own.
        let probe = match engine.version() {
            crate::TpmVersion::V2_0 => crate::linux_probe::answer(engine.as_mut(), req.command),
            crate::TpmVersion::V1_2 => None,
        };
        let result = match probe {
            Some(r) => Ok(r),
            None => engine.process(req.locality, req.command),
        };
        if let Ok(mut slot) = self.running.lock() {
            *slot = None;
        }
        match result {
            Ok(rsp) => rsp,
            Err(e) => {
                log::error!("{}: command failed: {e}", req.device);
                error_response(engine.version(), failure_rc(engine.version()))
            }
        }
    }

    fn connected(&self, device: &DeviceInfo) {
        log::info!("{device}: guest connected");
        let mut last = self.last_frontend.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = last.replace(device.frontend);
        // The same domain reconnecting (its tpmfront closed and opened again) keeps its TPM.
        // Another domain is another guest: a rebooted or recreated one gets a new domain. A
        // hardware TPM resets with its platform, so this one resets for the new guest.
        // (A vtpm process that restarts does not know the last domain; it starts reset.)
        if let Some(old) = before.filter(|&d| d != device.frontend) {
            let mut engine = self.engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match platform_reset(engine.as_mut()) {
                Ok(()) => log::info!(
                    "{device}: a new guest (domain {}, the last one was {old}): the TPM is reset, as a platform reset would",
                    device.frontend
                ),
                Err(e) => log::error!("{device}: a new guest, but resetting the TPM failed: {e}"),
            }
        }
    }

    fn disconnected(&self, device: &DeviceInfo) {
        log::info!("{device}: guest disconnected");
    }
}
